"""Resources of a run's ODM container, from its image count and options (scaleodm.md §5).

Pure: no I/O, no Kubernetes types. The rules are the Go ScaleODM's sizing table without its swap
mode (we request the peak, so a run never depends on node swap):

- peak RAM (GiB) interpolated linearly in the image-count table of scaleodm.md §5 (≤ 40 images →
  18 GiB … 12000 → 800 GiB, extrapolated on the last slope beyond); an unknown count (a zipurl or
  an S3 prefix not yet listed) is taken as ``ASSUMED_IMAGES`` images;
- × the option multiplier: ``fast-orthophoto`` 0.5, else ``dsm`` or ``dtm`` 1.5, else 1;
- × ``ArgoSettings.memory_multiplier``, clamped to ``[min_memory_gib, max_memory_gib]``;
- memory request = that peak, limit = request × 1.2;
- CPU request = max(1, request GiB × ``cpu_per_gib``) cores, limit = request × 1.5;
- ephemeral storage request = max(10 GiB, memory request), limit = request × 1.2 (the workspace
  emptyDir counts against the pod's ephemeral storage, so this is mostly the workspace's room).

Quantities are Kubernetes strings in ``Mi`` and millicores (``18432Mi``, ``2250m``), rounded up,
so equal inputs always give byte-identical manifests. :attr:`Resources.cpu_cores` and
:attr:`Resources.memory_gib` read the requests back as numbers: what a run is charged for in
the usage records (the admission records them; ``store/usage.py``), the very quantities the pod
asks for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from scaleodm.common.settings import ASSUMED_IMAGES, ArgoSettings

__all__ = ["ASSUMED_IMAGES", "MEMORY_TABLE", "Resources", "option_multiplier", "peak_gib", "size"]

# scaleodm.md §5: (images, peak GiB); at most the first count → its value.
MEMORY_TABLE: Final[tuple[tuple[int, float], ...]] = (
    (40, 18.0),
    (200, 25.0),
    (500, 37.0),
    (1000, 58.0),
    (1500, 79.0),
    (2500, 121.0),
    (3500, 163.0),
    (5000, 227.0),
    (12000, 800.0),
)
FAST_ORTHOPHOTO_MULTIPLIER: Final = 0.5
DSM_DTM_MULTIPLIER: Final = 1.5
MEMORY_LIMIT_FACTOR: Final = 1.2
CPU_LIMIT_FACTOR: Final = 1.5
MIN_CPU_CORES: Final = 1.0
MIN_EPHEMERAL_GIB: Final = 10.0
EPHEMERAL_LIMIT_FACTOR: Final = 1.2


@dataclass(frozen=True, slots=True)
class Resources:
    """Requests and limits of one container, as Kubernetes quantity strings."""

    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    ephemeral_request: str
    ephemeral_limit: str

    @property
    def cpu_cores(self) -> float:
        """The CPU request in cores (``2250m`` → 2.25)."""
        return int(self.cpu_request.removesuffix("m")) / 1000

    @property
    def memory_gib(self) -> float:
        """The memory request in GiB (``18432Mi`` → 18.0)."""
        return int(self.memory_request.removesuffix("Mi")) / 1024

    def requests(self) -> dict[str, str]:
        return {
            "cpu": self.cpu_request,
            "memory": self.memory_request,
            "ephemeral-storage": self.ephemeral_request,
        }

    def limits(self) -> dict[str, str]:
        return {
            "cpu": self.cpu_limit,
            "memory": self.memory_limit,
            "ephemeral-storage": self.ephemeral_limit,
        }


def peak_gib(images_count: int) -> float:
    """The table's peak RAM for ``images_count`` images (scaleodm.md §5), before multipliers."""
    first_count, first_gib = MEMORY_TABLE[0]
    if images_count <= first_count:
        return first_gib
    segments = list(zip(MEMORY_TABLE, MEMORY_TABLE[1:], strict=False))
    # The segment holding the count; past the last point, the last segment (extrapolation).
    (lo_count, lo_gib), (hi_count, hi_gib) = next(
        (seg for seg in segments if images_count <= seg[1][0]), segments[-1]
    )
    slope = (hi_gib - lo_gib) / (hi_count - lo_count)
    return lo_gib + (images_count - lo_count) * slope


def _enabled(options: Sequence[Mapping[str, object]], name: str) -> bool:
    return any(o.get("name") == name and o.get("value") is True for o in options)


def option_multiplier(options: Sequence[Mapping[str, object]]) -> float:
    """``fast-orthophoto`` 0.5 (it skips the dense reconstruction), else ``dsm``/``dtm`` 1.5."""
    if _enabled(options, "fast-orthophoto"):
        return FAST_ORTHOPHOTO_MULTIPLIER
    if _enabled(options, "dsm") or _enabled(options, "dtm"):
        return DSM_DTM_MULTIPLIER
    return 1.0


def _ceil(value: float) -> int:
    # Round away float noise first: 18 GiB must be 18432Mi, not 18433Mi.
    return math.ceil(round(value, 6))


def _mi(gib: float) -> str:
    return f"{_ceil(gib * 1024)}Mi"


def _millicores(cores: float) -> str:
    return f"{_ceil(cores * 1000)}m"


def size(
    images_count: int | None, options: Sequence[Mapping[str, object]], settings: ArgoSettings
) -> Resources:
    """Requests and limits of the ODM container of one run (scaleodm.md §5, without swap)."""
    count = ASSUMED_IMAGES if images_count is None else images_count
    gib = peak_gib(count) * option_multiplier(options) * settings.memory_multiplier
    gib = min(max(gib, settings.min_memory_gib), settings.max_memory_gib)
    cpu = max(MIN_CPU_CORES, gib * settings.cpu_per_gib)
    ephemeral = max(MIN_EPHEMERAL_GIB, gib)
    return Resources(
        cpu_request=_millicores(cpu),
        cpu_limit=_millicores(cpu * CPU_LIMIT_FACTOR),
        memory_request=_mi(gib),
        memory_limit=_mi(gib * MEMORY_LIMIT_FACTOR),
        ephemeral_request=_mi(ephemeral),
        ephemeral_limit=_mi(ephemeral * EPHEMERAL_LIMIT_FACTOR),
    )
