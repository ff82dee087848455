"""deploy/: the Compose file and the Kubernetes manifests hold what the gateway relies on.

Each fact is checked against the gateway itself, never a copy of it: env names against the
names its code reads, config.yaml through its own parser, arguments through its own CLI
parser, the image's entrypoint, environment and files from the Dockerfile. A check returns
the problems it finds; the shipped files must have none, and every named breakage in the
tables below must be reported, so no check passes vacuously. The schemas are checked offline
with the ones check-jsonschema (Compose) and kubernetes-validate (Kubernetes) bundle.
"""

from __future__ import annotations

import ast
import base64
import copy
import importlib
import itertools
import math
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml

import gateway
from gateway.admin.hosts import is_loopback
from gateway.cli import _parser as gateway_arguments
from gateway.config import ENV_OVERRIDES, ConfigError, Settings, parse_config
from gateway.redis_topology import parse_redis_url
from gateway.state import state_dir

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KUSTOMIZATION = KUBERNETES / "kustomization.yaml"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

# The oldest Kubernetes deploy/README.md promises; the newest the validator knows is added.
MIN_KUBERNETES = "1.25"
# Stands in for a value the deployment supplies (a Secret, a shell variable) when the
# config is parsed: 32 visible ASCII characters, as `openssl rand -hex 16` gives.
STAND_IN_TOKEN = "0123456789abcdef0123456789abcdef"
# The variable the gateway reads its admin token from, and the Redis URL's.
TOKEN_ENV = next(name for name, key in ENV_OVERRIDES.items() if key == ("admin", "token"))
REDIS_ENV = next(name for name, key in ENV_OVERRIDES.items() if key == ("redis", "url"))
UPSTREAM_ENV = next(name for name, key in ENV_OVERRIDES.items() if key == ("upstream", "url"))
ENV_NAME = re.compile(r"(GATEWAY|DEVICEGATE)_[A-Z0-9_]+")
REDIS_CLUSTER = re.compile(r"redis\+cluster://(?P<seeds>[^/?#]+)")
REDIS_SENTINEL = re.compile(r"redis\+sentinel://(?P<seeds>[^/?#]+)/(?P<service>[^/?#]+)")
SEED = re.compile(r"(?P<host>[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")
WRITABLE_VOLUMES = ("emptyDir", "persistentVolumeClaim", "ephemeral")

Doc = dict[str, Any]


class Broken(Exception):
    """A fact a check builds on is missing; the message says which."""


# ---- the image (Dockerfile) and the gateway's code ------------------------------------


@dataclass(frozen=True)
class Image:
    """What the Dockerfile's last stage gives a container."""

    entrypoint: tuple[str, ...]
    env: dict[str, str]
    files: dict[str, Path]  # path in the image -> the repository file copied there
    volumes: tuple[str, ...]  # Docker mounts an anonymous volume on each; Kubernetes does not
    user: int


def read_image(dockerfile: Path) -> Image:
    """The last stage's ENTRYPOINT, ENV, USER, VOLUME and the files COPY puts in from the
    build context."""
    text = dockerfile.read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    instructions = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    last = max(i for i, parts in enumerate(instructions) if parts[0].upper() == "FROM")
    entrypoint: tuple[str, ...] = ()
    env: dict[str, str] = {}
    files: dict[str, Path] = {}
    volumes: list[str] = []
    user = 0
    for keyword, rest in ((p[0].upper(), p[1] if len(p) > 1 else "") for p in instructions[last:]):
        if keyword == "ENTRYPOINT":
            entrypoint = tuple(yaml.safe_load(rest))  # the JSON (exec) form
        elif keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
        elif keyword == "VOLUME":
            volumes.extend(yaml.safe_load(rest) if rest.startswith("[") else rest.split())
        elif keyword == "USER":
            user = int(rest.split(":")[0])
        elif keyword == "COPY" and not rest.startswith("--from"):
            *sources, dest = shlex.split(rest)
            for source in sources:
                files[dest if len(sources) == 1 else f"{dest}/{source}"] = ROOT / source
    return Image(entrypoint=entrypoint, env=env, files=files, volumes=tuple(volumes), user=user)


def gateway_env_names() -> frozenset[str]:
    """Every GATEWAY_* / DEVICEGATE_* name written as a string in the gateway's code."""
    names: set[str] = set()
    for path in Path(gateway.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if ENV_NAME.fullmatch(node.value):
                    names.add(node.value)
    return frozenset(names)


IMAGE = read_image(DOCKERFILE)
KNOWN_ENV = gateway_env_names()


def run_arguments(args: list[str]) -> Any:
    """`gateway` arguments through the gateway's own parser; Broken if it refuses them."""
    try:
        parsed = gateway_arguments().parse_args(args)
    except SystemExit:
        raise Broken(f"the gateway refuses the arguments {args}") from None
    if parsed.command != "run":
        raise Broken(f"the arguments {args} do not run the gateway")
    if "--workers" not in args:
        raise Broken("--workers is not given: the default is every CPU the host has")
    return parsed


def redis_seeds(url: str) -> list[tuple[str, int]]:
    """The host:port seeds of a redis+cluster:// or redis+sentinel://.../<service> URL."""
    match = REDIS_CLUSTER.fullmatch(url) or REDIS_SENTINEL.fullmatch(url)
    if match is None:
        raise Broken(
            f"{REDIS_ENV}={url!r}: not redis+cluster://host:port[,host:port...] "
            "nor redis+sentinel://host:port[,host:port...]/<service>"
        )
    seeds = []
    for seed in match["seeds"].split(","):
        found = SEED.fullmatch(seed)
        if found is None or not 0 < int(found["port"]) < 65536:
            raise Broken(f"{REDIS_ENV}: {seed!r} is not host:port")
        seeds.append((found["host"], int(found["port"])))
    return seeds


def settings_for(text: str, source: str, env: Mapping[str, str]) -> Settings:
    """The gateway's settings from `text` and `env`, as it would parse them at start."""
    try:
        return parse_config(text, source, env)
    except ConfigError as exc:
        raise Broken(f"the gateway refuses its config: {exc}") from None


def under(path: str, mounts: Mapping[str, bool]) -> bool:
    """Whether `path` is at or below a mount point marked writable in `mounts`."""
    target = PurePosixPath(path)
    return any(
        writable and (target == PurePosixPath(point) or PurePosixPath(point) in target.parents)
        for point, writable in mounts.items()
    )


def written_dirs(settings: Settings, env: Mapping[str, str]) -> dict[str, str]:
    """The directories the gateway writes to: what -> path."""
    dirs = {"limits.buffer_dir": settings.limits.buffer_dir or env.get("TMPDIR") or "/tmp"}
    state = state_dir(settings.state.dir, env)
    if state is not None:
        dirs["the state directory"] = str(state)
    return dirs


def cpu(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity in cores ("2", "1500m", 0.5)."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def matches(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """A non-empty matchLabels selector that the labels satisfy."""
    return bool(selector) and all(labels.get(k) == v for k, v in (selector or {}).items())


def run_checks(checks: list[Callable[[], Iterator[str]]]) -> list[str]:
    """Every problem the checks report, in order, once each; a Broken fact is one problem."""
    problems: list[str] = []
    for check in checks:
        try:
            problems.extend(check())
        except Broken as exc:
            problems.append(str(exc))
    return list(dict.fromkeys(problems))


# ---- Kubernetes ---------------------------------------------------------------------


def load_kubernetes() -> list[Doc]:
    """Every object in deploy/kubernetes/ but the kustomization."""
    docs: list[Doc] = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path != KUSTOMIZATION:
            docs.extend(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d)
    return docs


class Kube:
    """The manifests, and what the gateway would make of them."""

    def __init__(self, docs: list[Doc], image: Image) -> None:
        self.docs = docs
        self.image = image

    def all(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d.get("kind") == kind]

    def only(self, kind: str) -> Doc:
        found = self.all(kind)
        if len(found) != 1:
            raise Broken(f"{kind}: {len(found)} objects, expected 1")
        return found[0]

    def named(self, kind: str, name: str) -> Doc:
        for doc in self.all(kind):
            if doc["metadata"]["name"] == name:
                return doc
        raise Broken(f"no {kind} named {name!r}")

    @cached_property
    def deployment(self) -> Doc:
        return self.only("Deployment")

    @cached_property
    def pod(self) -> Doc:
        pod: Doc = self.deployment["spec"]["template"]["spec"]
        return pod

    @cached_property
    def labels(self) -> dict[str, str]:
        return dict(self.deployment["spec"]["template"]["metadata"]["labels"])

    @cached_property
    def container(self) -> Doc:
        containers = self.pod["containers"]
        if len(containers) != 1:
            raise Broken(f"the pod has {len(containers)} containers, expected the gateway's")
        container: Doc = containers[0]
        return container

    @cached_property
    def ports(self) -> dict[str, int]:
        """Named container ports."""
        return {
            p["name"]: p["containerPort"] for p in self.container.get("ports", []) if "name" in p
        }

    def secret_value(self, name: str, key: str) -> str:
        secret = self.named("Secret", name)
        if key in secret.get("stringData", {}):
            return str(secret["stringData"][key])
        if key in secret.get("data", {}):
            return base64.b64decode(secret["data"][key]).decode()
        raise Broken(f"Secret {name!r} has no key {key!r}")

    @cached_property
    def env(self) -> dict[str, str]:
        """The gateway process's environment: the image's, then the container's."""
        env = dict(self.image.env)
        for item in self.container.get("env", []):
            name, source = item["name"], item.get("valueFrom", {})
            if "value" in item:
                env[name] = str(item["value"])
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                env[name] = self.secret_value(ref["name"], ref["key"])
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                data = self.named("ConfigMap", ref["name"]).get("data", {})
                if ref["key"] not in data:
                    raise Broken(f"ConfigMap {ref['name']!r} has no key {ref['key']!r}")
                env[name] = str(data[ref["key"]])
            else:
                raise Broken(f"env {name}: no value this test can follow")
        return env

    @cached_property
    def secret_env(self) -> set[str]:
        return {
            item["name"]
            for item in self.container.get("env", [])
            if "secretKeyRef" in item.get("valueFrom", {})
        }

    @cached_property
    def arguments(self) -> Any:
        command = self.container.get("command")
        if command is not None and tuple(command) != self.image.entrypoint:
            raise Broken(f"command {command} replaces the image's entrypoint")
        return run_arguments([str(a) for a in self.container.get("args", [])])

    @cached_property
    def mounts(self) -> dict[str, Doc]:
        """mountPath -> the volume mounted there (with the mount's readOnly and subPath)."""
        volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
        out: dict[str, Doc] = {}
        for mount in self.container.get("volumeMounts", []):
            if mount["name"] not in volumes:
                raise Broken(f"volumeMount {mount['mountPath']}: no volume {mount['name']!r}")
            out[mount["mountPath"]] = {**volumes[mount["name"]], "mount": mount}
        return out

    @cached_property
    def config_text(self) -> tuple[str, str]:
        """(source, text) of the config file the gateway is told to read."""
        path = self.arguments.config or self.env.get("GATEWAY_CONFIG")
        if not path:
            raise Broken("no --config (nor GATEWAY_CONFIG): the gateway would look in its cwd")
        for point, volume in self.mounts.items():
            mount = volume["mount"]
            key = mount.get("subPath") if path == point else None
            if key is None and PurePosixPath(point) in PurePosixPath(path).parents:
                key = str(PurePosixPath(path).relative_to(point))
            if key is None:
                continue
            if "configMap" not in volume:
                raise Broken(f"--config {path}: {point} is not a ConfigMap volume")
            # With items, only the keys listed appear, at the paths given.
            items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])}
            key = items.get(key, "") if items else key
            name = volume["configMap"]["name"]
            data = self.named("ConfigMap", name).get("data", {})
            if key not in data:
                raise Broken(f"--config {path}: ConfigMap {name!r} has no key {key!r}")
            return f"ConfigMap {name}: {key}", str(data[key])
        raise Broken(f"--config {path}: no volume is mounted there")

    @cached_property
    def settings(self) -> Settings:
        """The settings, with a token in place of the checked-in placeholder (which
        k8s_placeholder_token checks) as a deployment sets it (deploy/README.md, step 3)."""
        env = dict(self.env)
        if TOKEN_ENV in self.secret_env:
            env[TOKEN_ENV] = STAND_IN_TOKEN
        source, text = self.config_text
        return settings_for(text, source, env)

    @cached_property
    def hpa(self) -> Doc:
        return self.only("HorizontalPodAutoscaler")

    def port_number(self, port: int | str) -> int:
        if isinstance(port, int):
            return port
        if port not in self.ports:
            raise Broken(f"no container port named {port!r}")
        return self.ports[port]


def k8s_env_names(k: Kube) -> Iterator[str]:
    for item in k.container.get("env", []):
        if ENV_NAME.fullmatch(item["name"]) and item["name"] not in KNOWN_ENV:
            yield f"env {item['name']}: the gateway reads no such variable"


def k8s_config(k: Kube) -> Iterator[str]:
    """The Redis URL names a cluster or sentinels (memory:// would be one store per
    process), and the gateway takes its config with the container's environment."""
    redis_seeds(k.env.get(REDIS_ENV, ""))
    k.settings  # noqa: B018 - Broken, with the gateway's message, when it refuses them
    yield from ()


def k8s_placeholder_token(k: Kube) -> Iterator[str]:
    if TOKEN_ENV not in k.secret_env:
        yield f"{TOKEN_ENV}: not taken from a Secret"
        return
    source, text = k.config_text
    try:
        parse_config(text, source, k.env)
    except ConfigError as exc:
        if exc.path == "admin.token":
            return  # refused, as it must be
        raise Broken(f"the gateway refuses its config: {exc}") from None
    yield (
        f"the checked-in Secret's {TOKEN_ENV} would be accepted by the gateway: a deployment "
        "that skipped setting it would run with a token published in this repository"
    )


def k8s_listeners(k: Kube) -> Iterator[str]:
    for what, listen in (("server", k.settings.server.listen), ("admin", k.settings.admin.listen)):
        if is_loopback(listen.host):
            yield f"{what}.listen {listen}: loopback, out of reach of the Service and the kubelet"
        if listen.port not in k.ports.values():
            yield f"{what}.listen {listen}: no named container port {listen.port}"


def k8s_probes(k: Kube) -> Iterator[str]:
    admin = k.settings.admin
    live = k.container.get("livenessProbe", {}).get("httpGet")
    if live is None or live.get("path") != "/healthz":
        yield "livenessProbe: not an httpGet of /healthz"
    elif k.port_number(live["port"]) != admin.listen.port:
        yield f"livenessProbe: port {live['port']} is not the admin port {admin.listen.port}"
    elif admin.allowed_hosts:
        # The kubelet sends Host <pod IP>:<port> unless told otherwise.
        hosts = [h["value"] for h in live.get("httpHeaders", []) if h["name"].lower() == "host"]
        if not hosts or hosts[0].rsplit(":", 1)[0].lower() not in admin.allowed_hosts:
            yield "livenessProbe: sends no Host that admin.allowed_hosts accepts (403)"
    ready = k.container.get("readinessProbe", {})
    if "httpGet" in ready:
        get = ready["httpGet"]
        if get.get("path") != "/readyz" or k.port_number(get["port"]) != admin.listen.port:
            yield f"readinessProbe: not /readyz on the admin port {admin.listen.port}"
        yield "readinessProbe: an httpGet of /readyz carries no admin token (it answers 401)"
        return
    command = " ".join(ready.get("exec", {}).get("command", []))
    url = re.search(r"http://([^/:\s\"']+):(\d+)(/[^\s\"'?]*)", command)
    if url is None or url[3] != "/readyz" or int(url[2]) != admin.listen.port:
        yield f"readinessProbe: does not ask /readyz on the admin port {admin.listen.port}"
    elif admin.allowed_hosts and url[1] not in admin.allowed_hosts:
        yield f"readinessProbe: Host {url[1]} is not in admin.allowed_hosts"
    token = re.search(r"environ\[[\"'](\w+)[\"']\]", command)
    if token is None or token[1] != TOKEN_ENV or TOKEN_ENV not in k.env:
        yield f"readinessProbe: does not send the admin token from {TOKEN_ENV}"


def k8s_termination(k: Kube) -> Iterator[str]:
    pre_stop = k.container.get("lifecycle", {}).get("preStop", {})
    pause = float(pre_stop.get("sleep", {}).get("seconds", 0))
    command = pre_stop.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] == "sleep":
        pause = float(command[1])
    grace = k.pod.get("terminationGracePeriodSeconds", 30)
    drain = k.settings.server.shutdown_timeout
    if grace <= pause + drain:
        yield (
            f"terminationGracePeriodSeconds {grace}: not longer than the preStop pause "
            f"({pause:g} s) plus server.shutdown_timeout ({drain:g} s)"
        )


def k8s_security(k: Kube) -> Iterator[str]:
    pod_ctx = k.pod.get("securityContext", {})
    ctx = {**pod_ctx, **k.container.get("securityContext", {})}
    if not ctx.get("runAsNonRoot"):
        yield "securityContext: runAsNonRoot is not set"
    if ctx.get("runAsUser", k.image.user) != k.image.user:
        yield f"securityContext: runAsUser is not the image's user {k.image.user}"
    if ctx.get("allowPrivilegeEscalation", True):
        yield "securityContext: allowPrivilegeEscalation is not false"
    if not ctx.get("readOnlyRootFilesystem"):
        yield "securityContext: readOnlyRootFilesystem is not set"
    writable = {
        point: any(kind in volume for kind in WRITABLE_VOLUMES)
        and not volume["mount"].get("readOnly", False)
        for point, volume in k.mounts.items()
    }
    for what, path in written_dirs(k.settings, k.env).items():
        if not under(path, writable):
            yield f"{what} {path}: the root filesystem is read-only and no writable volume is there"


def k8s_volumes(k: Kube) -> Iterator[str]:
    mounted = {v["mount"]["name"] for v in k.mounts.values()}
    for volume in k.pod.get("volumes", []):
        if volume["name"] not in mounted:
            yield f"volume {volume['name']!r}: mounted nowhere"
        if "configMap" in volume:
            k.named("ConfigMap", volume["configMap"]["name"])
        if "secret" in volume:
            k.named("Secret", volume["secret"]["secretName"])


def k8s_resources(k: Kube) -> Iterator[str]:
    resources = k.container.get("resources", {})
    for bound in ("requests", "limits"):
        for what in ("cpu", "memory"):
            if what not in resources.get(bound, {}):
                yield f"resources.{bound}.{what}: not set"
    limit = resources.get("limits", {}).get("cpu") or resources.get("requests", {}).get("cpu")
    workers = k.arguments.workers
    if limit is not None and workers > math.ceil(cpu(limit)):
        yield f"--workers {workers}: more processes than the {limit} CPU the container may use"


def k8s_selectors(k: Kube) -> Iterator[str]:
    name = k.deployment["metadata"]["name"]
    if not matches(k.deployment["spec"]["selector"].get("matchLabels"), k.labels):
        yield f"Deployment {name}: its selector does not match its pods' labels"
    for service in k.all("Service"):
        if not matches(service["spec"].get("selector"), k.labels):
            yield f"Service {service['metadata']['name']}: its selector misses the gateway's pods"
    pdb = k.only("PodDisruptionBudget")
    if not matches(pdb["spec"].get("selector", {}).get("matchLabels"), k.labels):
        yield "PodDisruptionBudget: its selector misses the gateway's pods"
    spread = k.pod.get("topologySpreadConstraints", [])
    anti = k.pod.get("affinity", {}).get("podAntiAffinity")
    if not spread and not anti:
        yield "the pods are neither spread (topologySpreadConstraints) nor anti-affine"
    for constraint in spread:
        if not matches(constraint.get("labelSelector", {}).get("matchLabels"), k.labels):
            yield f"topologySpreadConstraints {constraint['topologyKey']}: selects no gateway pod"


def k8s_services(k: Kube) -> Iterator[str]:
    public = k.settings.server.listen.port
    targets: set[int] = set()
    for service in k.all("Service"):
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str) and target not in k.ports:
                yield f"Service {service['metadata']['name']}: no container port named {target!r}"
            elif isinstance(target, int) and target not in k.ports.values():
                yield f"Service {service['metadata']['name']}: no container port {target}"
            else:
                targets.add(k.port_number(target))
    if public not in targets:
        yield f"no Service sends traffic to the public port {public}"
    prefixes = ("GATEWAY", "DEVICEGATE")
    linked = [s["metadata"]["name"] for s in k.all("Service")]
    if k.pod.get("enableServiceLinks", True) and any(
        n.upper().replace("-", "_").startswith(prefixes) for n in linked
    ):
        yield "enableServiceLinks: Services would set DEVICEGATE_* variables in the gateway's env"


def k8s_disruption_and_scaling(k: Kube) -> Iterator[str]:
    pdb, hpa = k.only("PodDisruptionBudget")["spec"], k.hpa["spec"]
    target = hpa["scaleTargetRef"]
    deployment = k.deployment["metadata"]["name"]
    if (target.get("apiVersion"), target.get("kind"), target.get("name")) != (
        "apps/v1",
        "Deployment",
        deployment,
    ):
        yield f"HorizontalPodAutoscaler: scales {target}, not Deployment {deployment}"
    if k.hpa["apiVersion"] != "autoscaling/v2":
        yield "HorizontalPodAutoscaler: not autoscaling/v2"
    metrics = hpa.get("metrics", [])
    if not any(m.get("resource", {}).get("name") == "cpu" for m in metrics):
        yield "HorizontalPodAutoscaler: does not scale on CPU"
    if "cpu" not in k.container.get("resources", {}).get("requests", {}):
        yield "HorizontalPodAutoscaler: CPU utilization needs the container's CPU request"
    least = hpa.get("minReplicas", 1)
    if not 2 <= least <= hpa["maxReplicas"]:
        yield f"HorizontalPodAutoscaler: minReplicas {least}: not 2 to maxReplicas"
    available = pdb.get("minAvailable")
    if not isinstance(available, int):
        yield "PodDisruptionBudget: minAvailable is not a number of pods"
    elif available >= least:
        yield f"PodDisruptionBudget: minAvailable {available} >= minReplicas {least}: drains block"


def kubernetes_problems(docs: list[Doc], image: Image = IMAGE) -> list[str]:
    """Every fact the gateway relies on that the manifests break."""
    k = Kube(docs, image)
    checks: list[Callable[[Kube], Iterator[str]]] = [
        k8s_env_names,
        k8s_config,
        k8s_placeholder_token,
        k8s_listeners,
        k8s_probes,
        k8s_termination,
        k8s_security,
        k8s_volumes,
        k8s_resources,
        k8s_selectors,
        k8s_services,
        k8s_disruption_and_scaling,
    ]
    return run_checks([partial(check, k) for check in checks])


# ---- Docker Compose -----------------------------------------------------------------


def load_compose() -> Doc:
    return dict(yaml.safe_load(COMPOSE.read_text(encoding="utf-8")))


def as_list(value: str | list[str] | None) -> list[str]:
    """A Compose command or entrypoint as a list (the string form is split as a shell would)."""
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def seconds(duration: str | int) -> float:
    """A Compose duration ("40s", "1m30s") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"([0-9.]+)(h|ms|us|m|s)", str(duration))
    return sum(float(n) * units[u] for n, u in parts)


def strings(value: Any) -> Iterator[str]:
    """Every string in a loaded YAML value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


class Compose:
    """The Compose file, and what each service would run."""

    def __init__(self, doc: Doc, image: Image) -> None:
        self.doc = doc
        self.image = image
        self.services: dict[str, Doc] = doc.get("services", {})

    def builds_gateway_image(self, service: Doc) -> bool:
        build = service.get("build")
        if isinstance(build, str):
            build = {"context": build}
        if not isinstance(build, dict) or "context" not in build:
            return False
        dockerfile: Path = COMPOSE.parent / build["context"] / build.get("dockerfile", "Dockerfile")
        return dockerfile.resolve() == DOCKERFILE

    @cached_property
    def gateways(self) -> dict[str, Doc]:
        return {
            name: s
            for name, s in self.services.items()
            if self.builds_gateway_image(s)
            and "entrypoint" not in s
            and as_list(s.get("command"))[:1] == ["run"]
        }

    @cached_property
    def nodes(self) -> dict[str, Doc]:
        def clustered(s: Doc) -> bool:
            command = as_list(s.get("command"))
            return any(
                a == "--cluster-enabled" and b == "yes" for a, b in itertools.pairwise(command)
            )

        return {name: s for name, s in self.services.items() if clustered(s)}

    def script(self, service: Doc) -> str:
        return " ".join(as_list(service.get("entrypoint")) + as_list(service.get("command")))

    @cached_property
    def init(self) -> tuple[str, Doc]:
        found = [(n, s) for n, s in self.services.items() if "--cluster create" in self.script(s)]
        if len(found) != 1:
            raise Broken(f"{len(found)} services run redis-cli --cluster create, expected 1")
        return found[0]

    def node_port(self, name: str) -> int:
        command = as_list(self.nodes[name].get("command"))
        return int(command[command.index("--port") + 1]) if "--port" in command else 6379

    def env(self, service: Doc) -> dict[str, str]:
        """The service's environment as the gateway process sees it (the image's first)."""
        env = dict(self.image.env)
        raw = service.get("environment", {})
        for name, value in (
            raw.items() if isinstance(raw, dict) else (item.partition("=")[::2] for item in raw)
        ):
            env[name] = str(value)
        return env

    def upstream_port(self, name: str) -> int:
        """The port the upstream service listens on, read from its run_app call."""
        service = self.services[name]
        command = as_list(service.get("entrypoint")) + as_list(service.get("command"))
        if not self.builds_gateway_image(service) or command[:2] != ["python", "-c"]:
            raise Broken(f"service {name}: not the gateway image's demo upstream (python -c)")
        tree = ast.parse(command[2])
        port = 8080  # aiohttp's run_app default
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gateway"):
                module = importlib.import_module(str(node.module))
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        raise Broken(f"service {name}: {node.module} has no {alias.name}")
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("run_app"):
                for keyword in node.keywords:
                    value = keyword.value
                    if keyword.arg == "port" and isinstance(value, ast.Constant):
                        port = int(str(value.value))
        return port


def depends_on(service: Doc) -> dict[str, Doc]:
    """depends_on in its long form (the short form's condition is service_started)."""
    raw = service.get("depends_on", {})
    if isinstance(raw, list):
        return {name: {"condition": "service_started"} for name in raw}
    return dict(raw)


def published(service: Doc) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append(
                (port.get("host_ip", "0.0.0.0"), int(port["published"]), int(port["target"]))
            )
            continue
        *host, target = str(port).split("/")[0].split(":")
        address = host[0] if len(host) == 2 else "0.0.0.0"
        out.append((address, int(host[-1]) if host else int(target), int(target)))
    return out


def compose_services(c: Compose) -> Iterator[str]:
    if len(c.gateways) != 2:
        yield f"{len(c.gateways)} gateway services (the Dockerfile's image, `run`), expected 2"
    if len(c.nodes) != 6:
        yield f"{len(c.nodes)} Redis Cluster nodes (--cluster-enabled yes), expected 6"
    for name, node in c.nodes.items():
        if "healthcheck" not in node:
            yield f"{name}: no healthcheck for the cluster's init to wait on"
    seen: dict[int, str] = {}
    for name, service in c.services.items():
        for _, host_port, _ in published(service):
            if host_port in seen:
                yield f"{name}: host port {host_port} is published by {seen[host_port]} too"
            seen[host_port] = name


def compose_init(c: Compose) -> Iterator[str]:
    name, init = c.init
    script = c.script(init)
    named = {(m["host"], int(m["port"])) for m in SEED.finditer(script) if m["host"] in c.services}
    expected = {(node, c.node_port(node)) for node in c.nodes}
    if named != expected:
        yield f"{name}: creates the cluster from {sorted(named)}, not {sorted(expected)}"
    if not re.search(r"--cluster-replicas\s+1\b", script) or "--cluster-yes" not in script:
        yield f"{name}: not --cluster-replicas 1 --cluster-yes"
    depends = depends_on(init)
    for node in c.nodes:
        if depends.get(node, {}).get("condition") != "service_healthy":
            yield f"{name}: does not wait for {node} to be healthy"


def compose_gateway_wiring(c: Compose, name: str, service: Doc) -> Iterator[str]:
    """A gateway's env names, and the services its URLs and depends_on name."""
    env = c.env(service)
    for key in service.get("environment", {}):
        if ENV_NAME.fullmatch(key) and key not in KNOWN_ENV:
            yield f"{name}: env {key}: the gateway reads no such variable"
    try:
        seeds = redis_seeds(env.get(REDIS_ENV, ""))
    except Broken as exc:
        raise Broken(f"{name}: {exc}") from None
    for host, port in seeds:
        if host not in c.nodes:
            yield f"{name}: {REDIS_ENV} names {host}, not a Redis Cluster node of this file"
        elif port != c.node_port(host):
            yield f"{name}: {REDIS_ENV} names {host}:{port}; {host} listens on {c.node_port(host)}"
    upstream = re.fullmatch(r"http://([^:/]+)(?::(\d+))?", env.get(UPSTREAM_ENV, ""))
    if upstream is None or upstream[1] not in c.services:
        yield f"{name}: {UPSTREAM_ENV} names no service of this file"
    elif int(upstream[2] or 80) != c.upstream_port(upstream[1]):
        yield f"{name}: {UPSTREAM_ENV} port {upstream[2]}: {upstream[1]} listens elsewhere"
    depends = depends_on(service)
    init_name, _ = c.init
    if depends.get(init_name, {}).get("condition") != "service_completed_successfully":
        yield f"{name}: does not wait for {init_name} to complete"
    if upstream is not None and upstream[1] not in depends:
        yield f"{name}: does not depend on its upstream {upstream[1]}"


def compose_gateway_process(c: Compose, name: str, service: Doc) -> Iterator[str]:
    """A gateway's arguments and config as the gateway takes them, its ports, its stop
    grace period, and where it writes."""
    env = c.env(service)
    arguments = run_arguments(as_list(service.get("command")))
    path = arguments.config or env.get("GATEWAY_CONFIG")
    if path not in c.image.files:
        raise Broken(f"{name}: --config {path}: the image has no such file")
    text = c.image.files[path].read_text(encoding="utf-8")
    settings = settings_for(text, f"{name}: {path}", {**env, TOKEN_ENV: STAND_IN_TOKEN})

    server, admin = settings.server.listen, settings.admin.listen
    listeners = {server.port: server, admin.port: admin}
    for address, _, target in published(service):
        listen = listeners.get(target)
        if listen is None:
            yield f"{name}: publishes container port {target}, which the gateway does not listen on"
        elif is_loopback(listen.host):
            yield f"{name}: publishes port {target}, which the gateway binds to loopback"
        elif listen is admin and not is_loopback(address):
            yield f"{name}: the admin port is published on {address}, not this host's loopback"
    if server.port not in [t for _, _, t in published(service)]:
        yield f"{name}: the public port {settings.server.listen.port} is not published"

    drain = settings.server.shutdown_timeout
    grace = seconds(service.get("stop_grace_period", "10s"))
    if grace <= drain:
        yield f"{name}: stop_grace_period {grace:g} s is not longer than server.shutdown_timeout"

    if service.get("read_only"):
        writable = {p: True for p in [*c.image.volumes, *as_list(service.get("tmpfs"))]}
        for volume in service.get("volumes", []):
            parts = str(volume).split(":") if isinstance(volume, str) else [volume["target"]]
            writable[parts[1] if len(parts) > 1 else parts[0]] = not str(volume).endswith(":ro")
        for what, path in written_dirs(settings, env).items():
            if not under(path, writable):
                yield f"{name}: {what} {path}: read_only and no volume or tmpfs there"


def compose_interpolation(c: Compose) -> Iterator[str]:
    """Compose substitutes $NAME and ${NAME...} in every value; $$ is a literal $."""
    for text in strings(c.doc):
        for m in re.finditer(r"(?<!\$)\$(?:\{(\w+)([^}]*)\}|([A-Za-z_]\w*))", text):
            variable = m[1] or m[3]
            if variable != TOKEN_ENV:
                yield f"${variable}: Compose would substitute it (a shell $ is written $$)"
            elif not (m[2] or "").startswith(":?"):
                yield f"{m[0]}: the admin token must be required (:?), never defaulted"


def compose_problems(doc: Doc, image: Image = IMAGE) -> list[str]:
    """Every fact the gateway relies on that the Compose file breaks."""
    c = Compose(doc, image)
    checks: list[Callable[[], Iterator[str]]] = [
        partial(compose_services, c),
        partial(compose_init, c),
        partial(compose_interpolation, c),
    ]
    for name, service in c.gateways.items():
        checks += [partial(compose_gateway_wiring, c, name, service)]
        checks += [partial(compose_gateway_process, c, name, service)]
    return run_checks(checks)


# ---- the tests ----------------------------------------------------------------------


def test_the_image_facts_the_checks_use_are_read() -> None:
    """The Dockerfile and code readers find something, so the checks have ground to stand on."""
    assert IMAGE.entrypoint == ("gateway",)
    assert "/etc/devicegate/config.yaml" in IMAGE.files
    assert IMAGE.user != 0
    assert set(ENV_OVERRIDES) | {"GATEWAY_CONFIG", "DEVICEGATE_LOOP"} <= KNOWN_ENV


def test_kubernetes_manifests_hold_what_the_gateway_relies_on() -> None:
    assert kubernetes_problems(load_kubernetes()) == []


def test_compose_file_holds_what_the_gateway_relies_on() -> None:
    assert compose_problems(load_compose()) == []


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text(encoding="utf-8"))
    files = sorted(p.name for p in KUBERNETES.glob("*.y*ml") if p != KUSTOMIZATION)
    assert sorted(kustomization["resources"]) == files


@pytest.mark.parametrize("version", [MIN_KUBERNETES, kubernetes_validate.latest_version()])
def test_kubernetes_manifests_match_the_schemas(version: str) -> None:
    for doc in load_kubernetes():
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_kubernetes_validator_refuses_an_unknown_field() -> None:
    deployment = next(d for d in load_kubernetes() if d["kind"] == "Deployment")
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError, match="'replica' was unexpected"):
        kubernetes_validate.validate(deployment, MIN_KUBERNETES, strict=True)


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema against the Compose spec it bundles (no download)."""
    return subprocess.run(
        [
            sys.executable,
            *("-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = load_compose()
    broken["services"]["gateway-1"]["depends_onn"] = []
    (tmp_path / "compose.yml").write_text(yaml.safe_dump(broken), encoding="utf-8")
    result = check_compose_schema(tmp_path / "compose.yml")
    assert result.returncode == 1 and "'depends_onn' was unexpected" in result.stdout


def redis_urls() -> dict[str, str]:
    """The Redis URL each gateway is given, by where it is given."""
    urls = {"kubernetes": Kube(load_kubernetes(), IMAGE).env[REDIS_ENV]}
    c = Compose(load_compose(), IMAGE)
    urls.update({f"compose {name}": c.env(s)[REDIS_ENV] for name, s in c.gateways.items()})
    return urls


@pytest.mark.parametrize("where", ["kubernetes", "compose gateway-1", "compose gateway-2"])
def test_redis_url_is_accepted_by_the_gateway(where: str) -> None:
    """The cluster URL each gateway is given parses, as a cluster of the seeds it names."""
    url = redis_urls()[where]
    settings = parse_config("", "probe", {REDIS_ENV: url})
    topology = parse_redis_url(settings.redis.url)
    assert topology.kind == "cluster"
    assert [(a.host, a.port) for a in topology.seeds] == redis_seeds(url)


# ---- every check can fail -----------------------------------------------------------


def _container(docs: list[Doc]) -> Doc:
    container: Doc = _pod(docs)["containers"][0]
    return container


def _kind(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    return next(
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    )


def _env(docs: list[Doc], name: str) -> Doc:
    item: Doc = next(e for e in _container(docs)["env"] if e["name"] == name)
    return item


def _set_config(docs: list[Doc], old: str, new: str) -> None:
    config = _kind(docs, "ConfigMap")["data"]
    assert old in config["config.yaml"]
    config["config.yaml"] = config["config.yaml"].replace(old, new)


def _probe_command(docs: list[Doc], old: str, new: str) -> None:
    command = _container(docs)["readinessProbe"]["exec"]["command"]
    command[-1] = command[-1].replace(old, new)


def _pod(docs: list[Doc]) -> Doc:
    pod: Doc = _kind(docs, "Deployment")["spec"]["template"]["spec"]
    return pod


# name -> (what breaks the shipped manifests, a fragment of the problem it must cause)
KUBERNETES_BREAKS: dict[str, tuple[Callable[[list[Doc]], object], str]] = {
    "env name the gateway does not read": (
        lambda d: _container(d)["env"].append({"name": "GATEWAY_REDIS_URI", "value": "x"}),
        "env GATEWAY_REDIS_URI: the gateway reads no such variable",
    ),
    "secret key renamed": (
        lambda d: _env(d, TOKEN_ENV)["valueFrom"]["secretKeyRef"].update(key="token"),
        "Secret 'devicegate-admin' has no key 'token'",
    ),
    "secret renamed": (
        lambda d: _kind(d, "Secret")["metadata"].update(name="admin"),
        "no Secret named 'devicegate-admin'",
    ),
    "placeholder token the gateway accepts": (
        lambda d: _kind(d, "Secret")["stringData"].update({"admin-token": STAND_IN_TOKEN}),
        "would be accepted by the gateway",
    ),
    "config the gateway refuses": (
        lambda d: _set_config(d, "on_error: open", "on_error: ajar"),
        "redis.on_error: must be open or closed",
    ),
    "admin listener on loopback": (
        lambda d: _set_config(d, '"0.0.0.0:8081"', '"127.0.0.1:8081"'),
        "admin.listen 127.0.0.1:8081: loopback",
    ),
    "public port not a container port": (
        lambda d: _set_config(d, '"0.0.0.0:8080"', '"0.0.0.0:8000"'),
        "server.listen 0.0.0.0:8000: no named container port 8000",
    ),
    "config not mounted where --config points": (
        lambda d: _container(d)["volumeMounts"][0].update(mountPath="/etc/gateway"),
        "--config /etc/devicegate/config.yaml: no volume is mounted there",
    ),
    "config key renamed": (
        lambda d: _kind(d, "ConfigMap").update(data={"gateway.yaml": "{}"}),
        "ConfigMap 'devicegate-config' has no key 'config.yaml'",
    ),
    "liveness on another path": (
        lambda d: _container(d)["livenessProbe"]["httpGet"].update(path="/health"),
        "livenessProbe: not an httpGet of /healthz",
    ),
    "liveness on the public port": (
        lambda d: _container(d)["livenessProbe"]["httpGet"].update(port="http"),
        "livenessProbe: port http is not the admin port 8081",
    ),
    "admin hosts the probes do not send": (
        lambda d: _set_config(
            d, '"0.0.0.0:8081"', '"0.0.0.0:8081"\n  allowed_hosts: [admin.internal]'
        ),
        "livenessProbe: sends no Host that admin.allowed_hosts accepts",
    ),
    "readiness on the public port": (
        lambda d: _probe_command(d, "127.0.0.1:8081", "127.0.0.1:8080"),
        "readinessProbe: does not ask /readyz on the admin port 8081",
    ),
    "readiness without the token": (
        lambda d: _probe_command(d, f'environ["{TOKEN_ENV}"]', 'environ["TOKEN"]'),
        f"readinessProbe: does not send the admin token from {TOKEN_ENV}",
    ),
    "readiness as an httpGet": (
        lambda d: _container(d).update(
            readinessProbe={"httpGet": {"path": "/readyz", "port": "admin"}}
        ),
        "carries no admin token",
    ),
    "grace period shorter than the drain": (
        lambda d: _kind(d, "Deployment")["spec"]["template"]["spec"].update(
            terminationGracePeriodSeconds=30
        ),
        "terminationGracePeriodSeconds 30: not longer than",
    ),
    "root filesystem writable": (
        lambda d: _container(d)["securityContext"].update(readOnlyRootFilesystem=False),
        "readOnlyRootFilesystem is not set",
    ),
    "runs as root": (
        lambda d: _pod(d)["securityContext"].update(runAsNonRoot=False, runAsUser=0),
        "runAsNonRoot is not set",
    ),
    "state directory not writable": (
        lambda d: _env(d, "GATEWAY_STATE_DIR").update(value="/var/lib/gateway"),
        "the state directory /var/lib/gateway: the root filesystem is read-only",
    ),
    "no writable /tmp": (
        lambda d: _container(d)["volumeMounts"].pop(2),
        "limits.buffer_dir /tmp: the root filesystem is read-only",
    ),
    "mount of an undefined volume": (
        lambda d: _container(d)["volumeMounts"][1].update(name="data"),
        "no volume 'data'",
    ),
    "more workers than CPUs": (
        lambda d: _container(d)["args"].__setitem__(-1, "4"),
        "--workers 4: more processes than the 2 CPU",
    ),
    "workers left to the host's CPU count": (
        lambda d: _container(d).update(args=["run", "--config", "/etc/devicegate/config.yaml"]),
        "--workers is not given",
    ),
    "arguments the gateway refuses": (
        lambda d: _container(d)["args"].append("--worker-count"),
        "the gateway refuses the arguments",
    ),
    "no memory limit": (
        lambda d: _container(d)["resources"]["limits"].pop("memory"),
        "resources.limits.memory: not set",
    ),
    "no CPU request for the HPA": (
        lambda d: _container(d)["resources"]["requests"].pop("cpu"),
        "CPU utilization needs the container's CPU request",
    ),
    "service targets an unnamed port": (
        lambda d: _kind(d, "Service", "devicegate")["spec"]["ports"][0].update(targetPort="web"),
        "Service devicegate: no container port named 'web'",
    ),
    "service selector misses the pods": (
        lambda d: _kind(d, "Service", "devicegate-admin")["spec"]["selector"].update(
            {"app.kubernetes.io/component": "admin"}
        ),
        "Service devicegate-admin: its selector misses the gateway's pods",
    ),
    "no service for the public port": (
        lambda d: d.remove(_kind(d, "Service", "devicegate")),
        "no Service sends traffic to the public port 8080",
    ),
    "service links on": (
        lambda d: _pod(d).pop("enableServiceLinks"),
        "enableServiceLinks",
    ),
    "deployment selector misses its pods": (
        lambda d: _kind(d, "Deployment")["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/name": "gateway"}
        ),
        "Deployment devicegate: its selector does not match its pods' labels",
    ),
    "pdb selector misses the pods": (
        lambda d: _kind(d, "PodDisruptionBudget")["spec"]["selector"].update(matchLabels={}),
        "PodDisruptionBudget: its selector misses the gateway's pods",
    ),
    "pdb blocks drains": (
        lambda d: _kind(d, "PodDisruptionBudget")["spec"].update(minAvailable=2),
        "minAvailable 2 >= minReplicas 2",
    ),
    "hpa scales another deployment": (
        lambda d: _kind(d, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"].update(
            name="gateway"
        ),
        "not Deployment devicegate",
    ),
    "hpa on memory": (
        lambda d: _kind(d, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["resource"].update(
            name="memory"
        ),
        "does not scale on CPU",
    ),
    "spread selects nothing": (
        lambda d: _pod(d)["topologySpreadConstraints"][0]["labelSelector"].update(
            matchLabels={"app": "other"}
        ),
        "topologySpreadConstraints topology.kubernetes.io/zone: selects no gateway pod",
    ),
    "not spread": (
        lambda d: _pod(d).pop("topologySpreadConstraints"),
        "neither spread",
    ),
    "redis url without a port": (
        lambda d: _env(d, REDIS_ENV).update(value="redis+cluster://redis-cluster"),
        "'redis-cluster' is not host:port",
    ),
}


@pytest.mark.parametrize("case", list(KUBERNETES_BREAKS))
def test_kubernetes_check_reports(case: str) -> None:
    docs = copy.deepcopy(load_kubernetes())
    breaks, expected = KUBERNETES_BREAKS[case]
    breaks(docs)
    problems = kubernetes_problems(docs)
    assert any(expected in p for p in problems), problems


def _svc(doc: Doc, name: str) -> Doc:
    service: Doc = doc["services"][name]
    return service


def _init_script(doc: Doc, old: str, new: str) -> None:
    command = _svc(doc, "redis-cluster-init")["command"]
    assert old in command[0]
    command[0] = command[0].replace(old, new)


def _gateway_env(doc: Doc, name: str, value: str) -> None:
    # The gateways share one environment mapping (a YAML anchor): both see the change.
    _svc(doc, "gateway-1")["environment"][name] = value


COMPOSE_BREAKS: dict[str, tuple[Callable[[Doc], object], str]] = {
    "one gateway": (
        lambda c: c["services"].pop("gateway-2"),
        "1 gateway services",
    ),
    "five cluster nodes": (
        lambda c: c["services"].pop("redis-6"),
        "5 Redis Cluster nodes",
    ),
    "node without a healthcheck": (
        lambda c: _svc(c, "redis-6").pop("healthcheck"),
        "redis-6: no healthcheck",
    ),
    "no cluster init": (
        lambda c: c["services"].pop("redis-cluster-init"),
        "0 services run redis-cli --cluster create",
    ),
    "init misses a node": (
        lambda c: _init_script(c, " redis-6:6379;", ";"),
        "redis-cluster-init: creates the cluster from",
    ),
    "init without replicas": (
        lambda c: _init_script(c, "--cluster-replicas 1", "--cluster-replicas 0"),
        "not --cluster-replicas 1 --cluster-yes",
    ),
    "init does not wait for a node": (
        lambda c: _svc(c, "redis-cluster-init")["depends_on"]["redis-3"].update(
            condition="service_started"
        ),
        "does not wait for redis-3 to be healthy",
    ),
    "seed that is no service": (
        lambda c: _gateway_env(c, REDIS_ENV, "redis+cluster://redis-9:6379"),
        "names redis-9, not a Redis Cluster node",
    ),
    "seed on the wrong port": (
        lambda c: _gateway_env(c, REDIS_ENV, "redis+cluster://redis-1:6380"),
        "names redis-1:6380; redis-1 listens on 6379",
    ),
    "redis url in no known form": (
        lambda c: _gateway_env(c, REDIS_ENV, "redis-cluster://redis-1:6379"),
        "not redis+cluster://",
    ),
    "env name the gateway does not read": (
        lambda c: _gateway_env(c, "GATEWAY_UPSTREAM", "http://upstream:9000"),
        "env GATEWAY_UPSTREAM: the gateway reads no such variable",
    ),
    "upstream on another port": (
        lambda c: _gateway_env(c, UPSTREAM_ENV, "http://upstream:9001"),
        "port 9001: upstream listens elsewhere",
    ),
    "upstream that is no service": (
        lambda c: _gateway_env(c, UPSTREAM_ENV, "http://api:9000"),
        "names no service of this file",
    ),
    "upstream code naming what gateway.demo lacks": (
        lambda c: _svc(c, "upstream")["entrypoint"].__setitem__(
            2, _svc(c, "upstream")["entrypoint"][2].replace("echo_app", "echo")
        ),
        "service upstream: gateway.demo has no echo",
    ),
    "gateway does not wait for the cluster": (
        lambda c: _svc(c, "gateway-1")["depends_on"]["redis-cluster-init"].update(
            condition="service_started"
        ),
        "does not wait for redis-cluster-init to complete",
    ),
    "admin port open to every interface": (
        lambda c: _svc(c, "gateway-2").update(ports=["8082:8080", "8083:8081"]),
        "gateway-2: the admin port is published on 0.0.0.0",
    ),
    "admin listener left on loopback": (
        lambda c: _svc(c, "gateway-1")["environment"].pop("GATEWAY_ADMIN_LISTEN"),
        "publishes port 8081, which the gateway binds to loopback",
    ),
    "two gateways on one host port": (
        lambda c: _svc(c, "gateway-2").update(ports=["8080:8080"]),
        "host port 8080 is published by gateway-1 too",
    ),
    "config path not in the image": (
        lambda c: _svc(c, "gateway-1").update(
            command=["run", "--config", "/c.yaml", "--workers", "2"]
        ),
        "--config /c.yaml: the image has no such file",
    ),
    "grace shorter than the drain": (
        lambda c: _svc(c, "gateway-1").update(stop_grace_period="10s"),
        "stop_grace_period 10 s is not longer than server.shutdown_timeout",
    ),
    "read-only without a writable /tmp": (
        lambda c: _svc(c, "gateway-1").pop("tmpfs"),
        "limits.buffer_dir /tmp: read_only and no volume or tmpfs there",
    ),
    "state directory on the read-only root": (
        lambda c: _gateway_env(c, "GATEWAY_STATE_DIR", "/var/lib/gateway"),
        "the state directory /var/lib/gateway: read_only",
    ),
    "a shell variable Compose would substitute": (
        lambda c: _init_script(c, 'nodes="$$nodes', 'nodes="$nodes'),
        "$nodes: Compose would substitute it",
    ),
    "a default admin token": (
        lambda c: _gateway_env(c, TOKEN_ENV, "${GATEWAY_ADMIN_TOKEN:-0123456789abcdef}"),
        "the admin token must be required",
    ),
}


@pytest.mark.parametrize("case", list(COMPOSE_BREAKS))
def test_compose_check_reports(case: str) -> None:
    doc = copy.deepcopy(load_compose())
    breaks, expected = COMPOSE_BREAKS[case]
    breaks(doc)
    problems = compose_problems(doc)
    assert any(expected in p for p in problems), problems
