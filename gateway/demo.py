"""A built-in echo upstream for `gateway run --demo`: see the gateway work with nothing else."""

from __future__ import annotations

import hashlib

import orjson
from aiohttp import web


async def _echo(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    body = {
        "method": request.method,
        "path": request.raw_path,
        "headers": [[str(name), value] for name, value in request.headers.items()],
        "body_bytes": size,
        "body_sha256": digest.hexdigest(),
    }
    return web.Response(
        body=orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n",
        content_type="application/json",
    )


def echo_app() -> web.Application:
    """An upstream that answers every request with what it received, as JSON."""
    app = web.Application(handler_args={"auto_decompress": False})
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


async def start_echo(host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Start the echo upstream on loopback; returns its runner and origin URL."""
    runner = web.AppRunner(echo_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, f"http://{bound_host}:{bound_port}"


def curl_lines(public_url: str, admin_url: str, token: str) -> str:
    """The commands a person can paste to see auto-registration, blocking and the 403."""
    device = (
        "-H 'X-Device-Id: demo-phone-1' -H 'X-App-Name: FieldApp' -H 'X-App-Version: 2.4.1' "
        "-H 'X-OS-Name: Android' -H 'X-OS-Version: 15' "
        "-H 'X-Device-Manufacturer: Samsung' -H 'X-Device-Model: Galaxy S24'"
    )
    auth = f"-H 'Authorization: Bearer {token}'"
    return "\n".join(
        [
            "",
            "devicegate demo is running. Try:",
            "",
            "  # 1. a device request: forwarded to the echo upstream, the device registers itself",
            f"  curl -i {device} {public_url}/api/data",
            "",
            "  # 2. the device as ops see it",
            f"  curl -s {auth} {admin_url}/devices/demo-phone-1",
            "",
            "  # 3. block it",
            f"  curl -s -X POST {auth} {admin_url}/devices/demo-phone-1/block",
            "",
            "  # 4. the same request now gets 403 Access denied",
            f"  curl -i {device} {public_url}/api/data",
            "",
            f"  # the web page: {admin_url}/  (admin token: {token})",
            "",
        ]
    )
