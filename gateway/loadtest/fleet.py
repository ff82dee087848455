"""A simulated device fleet (pure): stable, realistic identification headers and cadences.

Everything follows from the seed: the same seed and size give the same fleet, device for
device, so a run can be repeated and its devices found again in the admin API (every id
starts with `loadtest-`). Cadences are drawn for every device up front (a few arrays); a
device's headers come from its own seeded stream when it first sends, so a fleet of a
million devices costs a second and some 20 MB until they call.
"""

from __future__ import annotations

import array
import bisect
import functools
import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import overload

from gateway import schema

ID_PREFIX = "loadtest-"

# The gateway's default identification header names (config.yaml `devices.headers`).
HEADER_NAMES: Mapping[str, str] = {
    "id": schema.ID_HEADER,
    **{field.name: field.header for field in schema.DECLARED_FIELDS},
}

# (application, [(version, weight)]): most of a fleet runs the newest releases.
APPLICATIONS: Sequence[tuple[str, Sequence[tuple[str, float]]]] = (
    ("FieldApp", (("2.5.1", 5), ("2.5.0", 3), ("2.4.1", 1.5), ("2.3.7", 0.5))),
    ("ScanPro", (("7.12.0", 6), ("7.11.3", 3), ("7.10.9", 1))),
    ("RouteMate", (("1.9.4", 5), ("1.9.2", 3), ("1.8.0", 2))),
    ("StockTaker", (("3.0.2", 4), ("3.0.0", 2), ("2.9.5", 1))),
    ("CareConnect", (("12.4", 3), ("12.3", 2))),
)
APPLICATION_WEIGHTS: Sequence[float] = (35, 25, 20, 12, 8)

# (os, [(version, weight)], [(manufacturer, [models])], weight): hardware matches its OS.
PLATFORMS: Sequence[
    tuple[str, Sequence[tuple[str, float]], Sequence[tuple[str, Sequence[str]]], float]
] = (
    (
        "Android",
        (("15", 3), ("14", 4), ("13", 2.5), ("12", 1.5), ("11", 0.5)),
        (
            ("Samsung", ("Galaxy S24", "Galaxy A54 5G", "Galaxy XCover7", "Galaxy Tab Active5")),
            ("Zebra", ("TC52", "TC58", "TC22", "ET40")),
            ("Honeywell", ("CT40", "CT60 XP", "EDA52")),
            ("Google", ("Pixel 8", "Pixel 7a", "Pixel 9")),
            ("Xiaomi", ("Redmi Note 13", "Redmi 13C")),
            ("Motorola", ("moto g54", "moto g84")),
        ),
        70,
    ),
    (
        "iOS",
        (("18.1", 4), ("17.6.1", 3), ("17.5", 1.5), ("16.7.10", 1)),
        (("Apple", ("iPhone 15", "iPhone 14", "iPhone 13", "iPhone SE (3rd generation)")),),
        24,
    ),
    (
        "iPadOS",
        (("18.1", 3), ("17.6.1", 2)),
        (("Apple", ("iPad (10th generation)", "iPad Air (5th generation)")),),
        6,
    ),
)

# (cadence class, relative request rate, share of the fleet): a few chatty foreground
# devices, many that sync now and then, a tail that only reports in the background.
CADENCES: Sequence[tuple[str, float, float]] = (
    ("foreground", 4.0, 0.2),
    ("sync", 1.0, 0.5),
    ("background", 0.25, 0.3),
)
JITTER = (0.8, 1.25)  # each device's rate is its class's times a factor in this range


@dataclass(frozen=True, slots=True)
class SimDevice:
    """One simulated device: its headers (identity and User-Agent), rate weight and phase."""

    index: int
    id: str
    headers: Mapping[str, str]
    cadence: str
    weight: float  # relative request rate; a device's share of the load is weight / total
    phase: float  # in [0, 1): where in its own interval the device's first request falls


_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15  # odd: index * it is a bijection modulo 2**64
DEVICE_CACHE = 65_536  # devices kept built; a million-device fleet stays small in memory


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a bijection of 64-bit integers that scatters their bits."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def device_id(seed: int, index: int) -> str:
    """The id of device `index`: random-looking, and distinct for distinct indexes."""
    return f"{ID_PREFIX}{_mix64((_mix64(seed & _MASK64) + index * _GOLDEN64) & _MASK64):016x}"


def _weighted(rng: random.Random, pairs: Sequence[tuple[str, float]]) -> str:
    return rng.choices([p[0] for p in pairs], weights=[p[1] for p in pairs])[0]


def _headers(seed: int, index: int) -> dict[str, str]:
    rng = random.Random(f"device:{seed}:{index}")  # its own stream: built in any order
    app, versions = rng.choices(APPLICATIONS, weights=APPLICATION_WEIGHTS)[0]
    os_name, os_versions, makers, _ = rng.choices(PLATFORMS, weights=[p[3] for p in PLATFORMS])[0]
    manufacturer, models = rng.choice(makers)
    values = {
        "id": device_id(seed, index),
        "application": app,
        "application_version": _weighted(rng, versions),
        "os": os_name,
        "os_version": _weighted(rng, os_versions),
        "manufacturer": manufacturer,
        "model": rng.choice(models),
    }
    headers = {HEADER_NAMES[field]: value for field, value in values.items()}
    headers["User-Agent"] = (
        f"{app}/{values['application_version']} ({os_name} {values['os_version']}; "
        f"{manufacturer} {values['model']})"
    )
    return headers


class Fleet(Sequence[SimDevice]):
    """`size` devices from `seed`: cadences drawn up front, each device built when asked."""

    def __init__(self, size: int, seed: int) -> None:
        if size < 1:
            raise ValueError("a fleet needs at least one device")
        self.seed = seed
        rng = random.Random(seed)
        cumulative = list(itertools.accumulate(c[2] for c in CADENCES))
        self._cadences = array.array("B")
        self.weights = array.array("d")
        self.phases = array.array("d")
        for _ in range(size):  # one device after the other: a larger fleet extends a smaller
            c = bisect.bisect(cumulative, rng.random() * cumulative[-1])
            self._cadences.append(c)
            self.weights.append(CADENCES[c][1] * rng.uniform(*JITTER))
            self.phases.append(rng.random())
        self._build = functools.lru_cache(maxsize=DEVICE_CACHE)(self._device)

    def __len__(self) -> int:
        return len(self.weights)

    @overload
    def __getitem__(self, index: int) -> SimDevice: ...
    @overload
    def __getitem__(self, index: slice) -> list[SimDevice]: ...
    def __getitem__(self, index: int | slice) -> SimDevice | list[SimDevice]:
        if isinstance(index, slice):
            return [self._build(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("device index out of range")
        return self._build(index)

    def _device(self, index: int) -> SimDevice:
        return SimDevice(
            index=index,
            id=device_id(self.seed, index),
            headers=_headers(self.seed, index),
            cadence=CADENCES[self._cadences[index]][0],
            weight=self.weights[index],
            phase=self.phases[index],
        )

    def rates(self, total_rate: float) -> list[float]:
        """Each device's requests per second when the fleet sends `total_rate` in all."""
        total = sum(self.weights)
        return [total_rate * w / total for w in self.weights]


def build_fleet(size: int, seed: int) -> Fleet:
    """`size` devices, the same for the same seed; ids are unique."""
    return Fleet(size, seed)


def choose_blocked(size: int, share: float, seed: int) -> list[int]:
    """Indexes of round(size * share) devices (at least one when share > 0), sorted."""
    if not 0 <= share <= 1:
        raise ValueError("the blocked share must be within [0, 1]")
    count = min(size, max(1, round(size * share))) if share > 0 else 0
    # A separate stream, so the choice does not shift the fleet's own draws.
    return sorted(random.Random(f"blocked:{seed}").sample(range(size), count))
