"""Resource sizing of the ODM container (``scaleodm.scheduler.sizing``, scaleodm.md §5).

Covered: every point of the image-count table (clamp lifted), linear interpolation between
points, ≤ 40 images (and 0) at the first value, extrapolation past 12000 on the last slope, an
unknown count taken as 200 images; the option multipliers (fast-orthophoto 0.5 winning over
dsm/dtm 1.5, a false flag ignored); ``memory_multiplier``; the [min, max] clamp; the derived
values (memory limit × 1.2, CPU max(1, GiB × cpu_per_gib) with limit × 1.5, ephemeral
max(10 GiB, memory) with limit × 1.2); quantity formats (``Mi``, millicores) without float
noise; monotonic growth with the image count; the requests read back as numbers
(``cpu_cores``, ``memory_gib``: what the admission records and a run is charged for).

Left out: how the workflow uses the record (``tests/golden/test_workflows.py``).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from scaleodm.common.settings import ArgoSettings
from scaleodm.scheduler import sizing

UNCLAMPED = ArgoSettings(min_memory_gib=0.0, max_memory_gib=10_000.0)
FAST = {"name": "fast-orthophoto", "value": True}
DSM = {"name": "dsm", "value": True}
DTM = {"name": "dtm", "value": True}


def mi(gib: float) -> str:
    return f"{round(gib * 1024)}Mi"


@pytest.mark.parametrize(
    ("images", "gib"),
    [pytest.param(n, g, id=f"{n}-images") for n, g in sizing.MEMORY_TABLE],
)
def test_table_points(images: int, gib: float) -> None:
    assert sizing.peak_gib(images) == gib
    assert sizing.size(images, [], UNCLAMPED).memory_request == mi(gib)


@pytest.mark.parametrize(
    ("images", "gib"),
    [
        pytest.param(0, 18.0, id="zero"),
        pytest.param(3, 18.0, id="few"),
        pytest.param(41, 18.0 + 7 / 160, id="just-above-40"),
        pytest.param(120, 21.5, id="between-40-and-200"),
        pytest.param(750, 47.5, id="between-500-and-1000"),
        pytest.param(4250, 195.0, id="between-3500-and-5000"),
        pytest.param(19_000, 1373.0, id="extrapolated"),
    ],
)
def test_interpolation_and_extrapolation(images: int, gib: float) -> None:
    assert sizing.peak_gib(images) == pytest.approx(gib)


def test_unknown_count_is_200_images() -> None:
    assert sizing.size(None, [], ArgoSettings()) == sizing.size(200, [], ArgoSettings())
    assert sizing.size(None, [], ArgoSettings()).memory_request == mi(25)


@pytest.mark.parametrize(
    ("options", "factor"),
    [
        pytest.param([], 1.0, id="none"),
        pytest.param([FAST], 0.5, id="fast-orthophoto"),
        pytest.param([DSM], 1.5, id="dsm"),
        pytest.param([DTM], 1.5, id="dtm"),
        pytest.param([DSM, DTM], 1.5, id="dsm-and-dtm"),
        pytest.param([DSM, FAST], 0.5, id="fast-orthophoto-wins"),
        pytest.param([{"name": "dsm", "value": False}], 1.0, id="false-flag"),
        pytest.param([{"name": "orthophoto-resolution", "value": 2}], 1.0, id="other-option"),
    ],
)
def test_option_multiplier(options: list[dict[str, Any]], factor: float) -> None:
    assert sizing.option_multiplier(options) == factor
    assert sizing.size(1000, options, UNCLAMPED).memory_request == mi(58 * factor)


def test_memory_multiplier() -> None:
    settings = ArgoSettings(memory_multiplier=2.0)
    assert sizing.size(200, [], settings).memory_request == mi(50)


@pytest.mark.parametrize(
    ("images", "options", "settings", "gib"),
    [
        pytest.param(3, [FAST], ArgoSettings(min_memory_gib=12), 12, id="min"),
        pytest.param(5000, [DSM], ArgoSettings(), 256, id="max-default"),
        pytest.param(12_000, [], ArgoSettings(max_memory_gib=300), 300, id="max-setting"),
        pytest.param(3, [], ArgoSettings(memory_multiplier=0.01), 4, id="min-default"),
    ],
)
def test_clamp(
    images: int, options: list[dict[str, Any]], settings: ArgoSettings, gib: float
) -> None:
    assert sizing.size(images, options, settings).memory_request == mi(gib)


def test_default_three_images() -> None:
    assert sizing.size(3, [], ArgoSettings()) == sizing.Resources(
        cpu_request="2250m",
        cpu_limit="3375m",
        memory_request="18432Mi",
        memory_limit="22119Mi",
        ephemeral_request="18432Mi",
        ephemeral_limit="22119Mi",
    )


def test_small_run_floors() -> None:
    # 4 GiB (the clamp): CPU 0.5 → 1 core, ephemeral 4 → 10 GiB.
    res = sizing.size(3, [], ArgoSettings(memory_multiplier=0.1))
    assert res == sizing.Resources(
        cpu_request="1000m",
        cpu_limit="1500m",
        memory_request="4096Mi",
        memory_limit="4916Mi",
        ephemeral_request="10240Mi",
        ephemeral_limit="12288Mi",
    )


def test_cpu_per_gib() -> None:
    res = sizing.size(1000, [], ArgoSettings(cpu_per_gib=0.25))
    assert (res.cpu_request, res.cpu_limit) == ("14500m", "21750m")


def test_requests_and_limits_dicts() -> None:
    res = sizing.size(3, [], ArgoSettings())
    assert res.requests() == {"cpu": "2250m", "memory": "18432Mi", "ephemeral-storage": "18432Mi"}
    assert res.limits() == {"cpu": "3375m", "memory": "22119Mi", "ephemeral-storage": "22119Mi"}


@pytest.mark.parametrize("images", [0, 1, 40, 41, 199, 333, 999, 4999, 12_001, 50_000, None])
@pytest.mark.parametrize("options", [[], [FAST], [DSM]], ids=["plain", "fast", "dsm"])
def test_quantity_formats(images: int | None, options: list[dict[str, Any]]) -> None:
    res = sizing.size(images, options, ArgoSettings())
    for value in (res.cpu_request, res.cpu_limit):
        assert re.fullmatch(r"[1-9][0-9]*m", value), value
    for value in (res.memory_request, res.memory_limit, res.ephemeral_request, res.ephemeral_limit):
        assert re.fullmatch(r"[1-9][0-9]*Mi", value), value


def test_monotonic_in_image_count() -> None:
    values = [sizing.peak_gib(n) for n in range(0, 20_000, 37)]
    assert values == sorted(values)


@pytest.mark.parametrize(
    ("images", "options"),
    [pytest.param(40, [], id="small"), pytest.param(777, [DSM], id="dsm"),
     pytest.param(None, [FAST], id="unknown-count")],
)
def test_requests_read_back_as_numbers(images: int | None, options: list[Any]) -> None:
    res = sizing.size(images, options, ArgoSettings())
    assert res.cpu_request == f"{round(res.cpu_cores * 1000)}m"
    assert res.memory_request == f"{round(res.memory_gib * 1024)}Mi"
    assert res.cpu_cores >= sizing.MIN_CPU_CORES and res.memory_gib > 0


def test_requests_of_the_first_table_point() -> None:
    res = sizing.size(40, [], UNCLAMPED)
    assert res.memory_gib == 18.0
    assert res.cpu_cores == max(1.0, 18.0 * UNCLAMPED.cpu_per_gib)
