"""Progress from ODM's console (scaleodm.common.domain.progress; scaleodm.md §11, nodeodm-api §4.4).

Covered:
- ``clean_line``: ANSI colour/erase codes removed, surrounding whitespace trimmed (§4.5);
- ``stage_progress``: the ``Finished`` marker of every stage gives end-percent x 0.9; ``Running``
  markers, split/merge, unknown stages, near-misses and ordinary lines give None;
- ``ProgressTracker``: reports increases only, never repeats or goes back, honours its start value;
- end to end with the real ODM test double (``python -m odm_test_engine``, zero run time): its
  stdout through ``clean_line`` + ``ProgressTracker`` yields a strictly increasing sequence with one
  value per executed stage, ending at 90.0; with ``--fast-orthophoto`` 45.0 (openmvs) is absent.

Left out: the UDP ``PGUP`` datagrams (the test double's own tests cover them; the watcher reads the
console) and the 93/97/100 values reported by packaging and the projection.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scaleodm.common.domain.progress import (
    ENGINE_SCALE,
    STAGE_END_PERCENT,
    ProgressTracker,
    clean_line,
    stage_progress,
)

# Every stage that moves progress, with its expected reported value (end percent x 0.9).
STAGE_VALUES = {
    "dataset": 4.5,
    "opensfm": 22.5,
    "openmvs": 45.0,
    "odm_filterpoints": 46.8,
    "odm_meshing": 54.0,
    "mvs_texturing": 63.0,
    "odm_georeferencing": 72.0,
    "odm_dem": 81.0,
    "odm_orthophoto": 88.2,
    "odm_report": 89.1,
    "odm_postprocess": 90.0,
}
ODM_STAGES = [
    "dataset", "split", "merge", "opensfm", "openmvs", "odm_filterpoints", "odm_meshing",
    "mvs_texturing", "odm_georeferencing", "odm_dem", "odm_orthophoto", "odm_report",
    "odm_postprocess",
]


def _finished(stage: str) -> str:
    return f"[INFO]    Finished {stage} stage"


def _running(stage: str) -> str:
    return f"[INFO]    Running {stage} stage"


# --------------------------------------------------------------------------------------------
# clean_line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        pytest.param(
            "\x1b[39m[INFO]    Finished dataset stage\x1b[0m\n",
            "[INFO]    Finished dataset stage",
            id="odm-info-colour",
        ),
        pytest.param("\x1b[93m[WARNING] x\x1b[0m", "[WARNING] x", id="warning-colour"),
        pytest.param("\x1b[1;31mbold red\x1b[0m", "bold red", id="multi-param-sgr"),
        pytest.param("\x1b[2Kprogress 10%\r\n", "progress 10%", id="erase-line-crlf"),
        pytest.param("\x1b[?25lhidden cursor\x1b[?25h", "hidden cursor", id="private-mode"),
        pytest.param("  \t spaced out \t ", "spaced out", id="trim"),
        pytest.param("\x1b[0m   \x1b[0m", "", id="only-codes-and-spaces"),
        pytest.param("", "", id="empty"),
        pytest.param("a [b] c", "a [b] c", id="brackets-kept"),
        pytest.param("inner  spaces  kept", "inner  spaces  kept", id="inner-spaces-kept"),
    ],
)
def test_clean_line(raw: str, clean: str) -> None:
    assert clean_line(raw) == clean


# --------------------------------------------------------------------------------------------
# stage_progress
# --------------------------------------------------------------------------------------------


def test_the_table_covers_every_stage_but_split_and_merge() -> None:
    assert list(STAGE_END_PERCENT) == [s for s in ODM_STAGES if s not in ("split", "merge")]
    assert ENGINE_SCALE == 0.9
    assert set(STAGE_VALUES) == set(STAGE_END_PERCENT)


@pytest.mark.parametrize(
    ("stage", "value"), [pytest.param(s, v, id=s) for s, v in STAGE_VALUES.items()]
)
def test_finished_marker(stage: str, value: float) -> None:
    assert stage_progress(_finished(stage)) == pytest.approx(value)
    assert stage_progress(_finished(stage)) == pytest.approx(STAGE_END_PERCENT[stage] * 0.9)


@pytest.mark.parametrize("stage", [pytest.param(s, id=s) for s in ODM_STAGES])
def test_running_marker_is_not_progress(stage: str) -> None:
    assert stage_progress(_running(stage)) is None


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(_finished("split"), id="finished-split"),
        pytest.param(_finished("merge"), id="finished-merge"),
        pytest.param(_finished("unknown_stage"), id="finished-unknown"),
        pytest.param("[INFO]    Finished dense point cloud fusion", id="finished-not-a-stage"),
        pytest.param("[WARNING] Finished dataset stage", id="wrong-level"),
        pytest.param("[INFO]    finished dataset stage", id="lower-case-verb"),
        pytest.param("xx [INFO]    Finished dataset stage", id="not-at-start"),
        pytest.param("[INFO]    Finished dataset stages", id="word-boundary"),
        pytest.param("\x1b[39m[INFO]    Finished dataset stage\x1b[0m", id="not-cleaned"),
        pytest.param("[INFO]    Loading dataset from: /x/images", id="ordinary-line"),
        pytest.param("", id="empty"),
    ],
)
def test_not_a_marker(line: str) -> None:
    assert stage_progress(line) is None


# --------------------------------------------------------------------------------------------
# ProgressTracker
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "lines", "reported", "final"),
    [
        pytest.param(
            0.0,
            [_running("dataset"), _finished("dataset"), "chatter", _finished("opensfm")],
            [4.5, 22.5],
            22.5,
            id="increases",
        ),
        pytest.param(
            0.0,
            [_finished("opensfm"), _finished("opensfm"), _finished("dataset")],
            [22.5],
            22.5,
            id="repeat-and-backwards-ignored",
        ),
        pytest.param(
            50.0,
            [_finished("dataset"), _finished("openmvs"), _finished("odm_meshing")],
            [54.0],
            54.0,
            id="resumes-from-start-value",
        ),
        pytest.param(
            0.0,
            [_finished("split"), _finished("merge"), _running("opensfm"), "x"],
            [],
            0.0,
            id="nothing-to-report",
        ),
    ],
)
def test_tracker(start: float, lines: list[str], reported: list[float], final: float) -> None:
    tracker = ProgressTracker(start)
    out = [v for v in (tracker.feed(line) for line in lines) if v is not None]
    assert out == pytest.approx(reported)
    assert tracker.current == pytest.approx(final)


def test_tracker_returns_none_for_non_increases() -> None:
    tracker = ProgressTracker()
    assert tracker.feed(_finished("opensfm")) == pytest.approx(22.5)
    assert tracker.feed(_finished("opensfm")) is None
    assert tracker.feed(_finished("dataset")) is None
    assert tracker.feed("ordinary") is None


# --------------------------------------------------------------------------------------------
# the ODM test double's console, end to end
# --------------------------------------------------------------------------------------------


@pytest.fixture
def progress_port() -> Iterator[int]:
    """A UDP port held open by the test, so the double's datagrams reach nobody else."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _jpeg() -> bytes:
    return b"\xff\xd8\xff\xd9"  # SOI + EOI: the double falls back to a default size


def _run_engine(tmp_path: Path, port: int, *options: str) -> list[str]:
    name = "progress-task"
    images = tmp_path / name / "images"
    images.mkdir(parents=True)
    for n in range(3):
        (images / f"DJI_{n:04d}.JPG").write_bytes(_jpeg())
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith("ODM_TEST_ENGINE_") and k != "no_ansiesc"
    }
    env |= {"ODM_TEST_ENGINE_SECONDS": "0", "ODM_TEST_ENGINE_PROGRESS_PORT": str(port)}
    proc = subprocess.run(
        [sys.executable, "-m", "odm_test_engine", *options, "--project-path", str(tmp_path), name],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" in proc.stdout  # colour codes are on, so clean_line has work to do
    return proc.stdout.splitlines(keepends=True)


def _track(raw_lines: list[str]) -> tuple[list[float], list[str]]:
    tracker = ProgressTracker()
    values: list[float] = []
    finished: list[str] = []
    for raw in raw_lines:
        line = clean_line(raw)
        if line.startswith("[INFO]    Finished ") and line.endswith(" stage"):
            finished.append(line.split()[2])
        value = tracker.feed(line)
        if value is not None:
            values.append(value)
    return values, finished


@pytest.mark.parametrize(
    ("options", "skipped"),
    [
        pytest.param(["--dsm"], set(), id="dsm"),
        pytest.param(["--dsm", "--fast-orthophoto"], {"openmvs"}, id="fast-orthophoto"),
    ],
)
def test_odm_test_engine_console(
    tmp_path: Path, progress_port: int, options: list[str], skipped: set[str]
) -> None:
    values, finished = _track(_run_engine(tmp_path, progress_port, *options))

    assert finished == [s for s in ODM_STAGES if s not in skipped]
    expected = [v for s, v in STAGE_VALUES.items() if s not in skipped]
    assert values == pytest.approx(expected)
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == pytest.approx(90.0)
    assert (45.0 in values) is ("openmvs" not in skipped)
