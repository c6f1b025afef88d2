"""Tests for the ODM test engine (``tools/odm-test-engine``), a TEST DOUBLE of OpenDroneMap.

Covered, by running the engine as a subprocess (``sys.executable -m odm_test_engine``) with
``ODM_TEST_ENGINE_SECONDS=0`` unless timing matters:

* console output: first line, option dump, ``Running``/``Finished`` markers in ODM stage order,
  ``No more stages to run``, ``ODM app finished``, level-tag padding, ANSI codes and ``no_ansiesc``;
* lenient parsing of ODM options (``--x v``, ``--x=v``, unknown flags) and the options it
  interprets (``--fast-orthophoto``, ``--end-with``, ``--dsm``/``--dtm``, ``--skip-orthophoto``,
  ``--skip-report``, ``--pc-ept``, ``--3d-tiles``);
* outputs: presence/absence per options and basic validity (JSON, GeoJSON, TIFF header and tags,
  PDF framing, EXIF values in ``images.json``);
* ``PGUP`` UDP progress datagrams (format, pid, monotonic, 100 at the end) on a private port;
* exit codes: success, no images, injected failures with the "Dumping Info for Geeks" block,
  usage/configuration errors, SIGTERM (143) and SIGINT (130) without further outputs, and 141
  when the reader closes stdout;
* that ``ODM_TEST_ENGINE_SECONDS`` paces the run.

Not covered: realism of the stage-internal chatter, full parsing of the binary placeholders by
GIS/3D libraries (checked by hand), the non-Linux signal path, and the installed console script
(the tests import the package from its ``src`` directory via ``PYTHONPATH``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import data

ENGINE_SRC = Path(__file__).resolve().parents[2] / "tools" / "odm-test-engine" / "src"
PROJECT = "task-1"
ALL_STAGES = [
    "dataset",
    "split",
    "merge",
    "opensfm",
    "openmvs",
    "odm_filterpoints",
    "odm_meshing",
    "mvs_texturing",
    "odm_georeferencing",
    "odm_dem",
    "odm_orthophoto",
    "odm_report",
    "odm_postprocess",
]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
MARKER = re.compile(r"^\[INFO\]    (Running|Finished) (\w+) stage$")


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def project_path(tmp_path: Path) -> Path:
    """A project with five supported images (one with EXIF GPS) and one file to be ignored."""
    images = tmp_path / PROJECT / "images"
    images.mkdir(parents=True)
    exif = data.exif_block("DJI", "FC6310", 46.5, 7.25, 612.5)
    (images / "DJI_0001.JPG").write_bytes(data.jpeg(5472, 3648, exif))
    (images / "DJI_0002.JPG").write_bytes(data.jpeg(5472, 3648))
    (images / "DJI_0003.jpeg").write_bytes(data.jpeg(640, 480))
    (images / "DJI_0004.TIF").write_bytes(b"II*\x00" + struct.pack("<I", 0))
    (images / "DJI_0005.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    (images / "notes.txt").write_text("not an image")
    return tmp_path


@pytest.fixture
def udp_listener() -> Iterator[socket.socket]:
    """A UDP socket on a free loopback port; runs send their PGUP datagrams there, never to 6367."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


def _env(port: int, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ODM_TEST_ENGINE_") and k != "no_ansiesc"
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ENGINE_SRC), env.get("PYTHONPATH")) if p)
    env["ODM_TEST_ENGINE_SECONDS"] = "0"
    env["ODM_TEST_ENGINE_PROGRESS_PORT"] = str(port)
    env.update(extra)
    return env


@dataclass
class Run:
    code: int
    raw: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return ANSI.sub("", self.raw).splitlines()

    @property
    def markers(self) -> list[tuple[str, str]]:
        found = (MARKER.match(line) for line in self.lines)
        return [(m.group(1), m.group(2)) for m in found if m]


def _command(project_path: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "odm_test_engine", *options, "--project-path", str(project_path)]


def run_engine(
    project_path: Path, listener: socket.socket, *options: str, name: str = PROJECT, **env: str
) -> Run:
    port = listener.getsockname()[1]
    done = subprocess.run(
        [*_command(project_path, *options), name],
        env=_env(port, **env),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def _expected_markers(stages: list[str]) -> list[tuple[str, str]]:
    return [(kind, stage) for stage in stages for kind in ("Running", "Finished")]


def _tiff_tags(data: bytes) -> dict[int, tuple[int, int]]:
    """``tag -> (type, count)`` of the first IFD of a little-endian TIFF (header checked)."""
    assert data[:4] == b"II*\x00"
    (ifd,) = struct.unpack("<I", data[4:8])
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    tags = {}
    for n in range(count):
        tag, kind, items = struct.unpack("<HHI", data[ifd + 2 + 12 * n : ifd + 10 + 12 * n])
        tags[tag] = (kind, items)
    return tags


# --------------------------------------------------------------------------------------- tests


def test_full_run_prints_odm_markers_and_writes_outputs(
    project_path: Path, udp_listener: socket.socket
) -> None:
    result = run_engine(project_path, udp_listener)
    assert result.code == 0, result.stderr
    lines = result.lines
    assert re.fullmatch(r"\[INFO\]    Initializing ODM 3\.6\.0 - .+", lines[0])
    assert lines[1] == "[INFO]    =============="
    assert "[INFO]    fast_orthophoto: False" in lines
    assert f"[INFO]    name: {PROJECT}" in lines
    assert result.markers == _expected_markers(ALL_STAGES)
    assert lines[-2] == "[INFO]    No more stages to run"
    assert lines.index("[INFO]    Finished odm_postprocess stage") == len(lines) - 3
    assert re.fullmatch(r"\[INFO\]    ODM app finished - .+", lines[-1])
    assert "[INFO]    Normal dataset, will process all at once." in lines
    assert "[INFO]    Found 5 usable images" in lines
    assert "Matching DJI_0001.JPG  -  1 / 5" in lines
    pair = re.compile(r"DJI_0001\.JPG - DJI_0002\.JPG has \d+ candidate matches")
    assert any(pair.fullmatch(line) for line in lines)
    # ANSI colour codes as ODM prints them
    assert "\x1b[39m[INFO]    Running dataset stage\x1b[0m\n" in result.raw

    project = project_path / PROJECT
    for relative in [
        "images.json",
        "cameras.json",
        "log.json",
        "opensfm/reconstruction.json",
        "odm_filterpoints/point_cloud.ply",
        "odm_meshing/odm_mesh.ply",
        "odm_texturing/odm_textured_model_geo.obj",
        "odm_texturing/odm_textured_model_geo.glb",
        "odm_georeferencing/odm_georeferenced_model.laz",
        "odm_orthophoto/odm_orthophoto.tif",
        "odm_orthophoto/odm_orthophoto.png",
        "odm_report/report.pdf",
        "odm_report/shots.geojson",
    ]:
        assert (project / relative).is_file(), relative
    for relative in ["odm_dem/dsm.tif", "odm_dem/dtm.tif", "entwine_pointcloud", "3d_tiles"]:
        assert not (project / relative).exists(), relative

    images = json.loads((project / "images.json").read_text())
    assert [i["filename"] for i in images] == [
        "DJI_0001.JPG",
        "DJI_0002.JPG",
        "DJI_0003.jpeg",
        "DJI_0004.TIF",
        "DJI_0005.png",
    ]
    required = {
        "width",
        "height",
        "camera_make",
        "camera_model",
        "latitude",
        "longitude",
        "altitude",
    }
    assert all(required <= set(image) for image in images)
    first = images[0]
    assert (first["width"], first["height"]) == (5472, 3648)
    assert (first["camera_make"], first["camera_model"]) == ("DJI", "FC6310")
    assert first["latitude"] == pytest.approx(46.5, abs=1e-6)
    assert first["longitude"] == pytest.approx(7.25, abs=1e-6)
    assert first["altitude"] == pytest.approx(612.5)
    assert (images[2]["width"], images[2]["height"]) == (640, 480)

    shots = json.loads((project / "odm_report/shots.geojson").read_text())
    assert shots["type"] == "FeatureCollection"
    assert len(shots["features"]) == 5
    assert json.loads((project / "opensfm/reconstruction.json").read_text())[0]["shots"]
    assert json.loads((project / "cameras.json").read_text())

    tags = _tiff_tags((project / "odm_orthophoto/odm_orthophoto.tif").read_bytes())
    assert {256, 257, 258, 273, 279, 33550, 33922, 34735} <= set(tags)
    pdf = (project / "odm_report/report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-1.") and pdf.rstrip().endswith(b"%%EOF")
    assert (project / "odm_texturing/odm_textured_model_geo.glb").read_bytes()[:4] == b"glTF"

    log = json.loads((project / "log.json").read_text())
    assert log["success"] is True
    assert [stage["name"] for stage in log["stages"]] == ALL_STAGES
    assert all(stage["startTime"] and stage["endTime"] for stage in log["stages"])


def test_lenient_options_and_interpreted_flags(
    project_path: Path, udp_listener: socket.socket
) -> None:
    result = run_engine(
        project_path,
        udp_listener,
        "--fast-orthophoto",
        "--orthophoto-resolution",
        "2.5",
        "--dem-resolution=4",
        "--dsm",
        "--dtm",
        "--pc-ept",
        "--3d-tiles",
        "--some-future-flag",
        "--some-future-option",
        "value",
        "--max-concurrency=2",
    )
    assert result.code == 0, result.stderr
    lines = result.lines
    for expected in [
        "fast_orthophoto: True",
        "orthophoto_resolution: 2.5",
        "dem_resolution: 4",
        "dsm: True",
        "some_future_flag: True",
        "some_future_option: value",
        "max_concurrency: 2",
        f"name: {PROJECT}",
    ]:
        assert f"[INFO]    {expected}" in lines
    stages = [s for s in ALL_STAGES if s != "openmvs"]
    assert result.markers == _expected_markers(stages)

    project = project_path / PROJECT
    for dem in ("dsm", "dtm"):
        tags = _tiff_tags((project / f"odm_dem/{dem}.tif").read_bytes())
        assert tags[339] == (3, 1)  # SampleFormat: one float sample
    ept = json.loads((project / "entwine_pointcloud/ept.json").read_text())
    assert ept["points"] > 0 and len(ept["bounds"]) == 6
    for part in ("model", "pointcloud"):
        tileset = json.loads((project / f"3d_tiles/{part}/tileset.json").read_text())
        assert tileset["asset"]["version"] == "1.0"
    assert not (project / "opensfm/undistorted/openmvs").exists()


def test_rasters_are_real_georeferenced_geotiffs(
    project_path: Path, udp_listener: socket.socket
) -> None:
    """The orthophoto, DSM and DTM open in rasterio (GDAL) as GeoTIFFs in WGS84 over the
    images' footprint, with plausible content: an RGBA orthophoto transparent outside the mapped
    area, DEMs with nodata there and, inside, a DSM never below the DTM and higher somewhere
    (what stands on the ground), a terrain that is not flat."""
    rasterio = pytest.importorskip("rasterio")
    result = run_engine(project_path, udp_listener, "--dsm", "--dtm")
    assert result.code == 0, result.stderr
    project = project_path / PROJECT
    with rasterio.open(project / "odm_orthophoto/odm_orthophoto.tif") as ortho:
        assert ortho.crs.to_epsg() == 4326 and ortho.count == 4 and ortho.width >= 64
        west, south, east, north = ortho.bounds
        assert west < 7.25 < east and south < 46.5 < north  # the geotagged image is inside
        rgba = ortho.read()
    assert rgba[3, 0, 0] == 0 and rgba[3, ortho.height // 2, ortho.width // 2] == 255
    assert len({tuple(rgba[:3, r, c]) for r in range(0, 64, 8) for c in range(0, 64, 8)}) > 5
    with rasterio.open(project / "odm_dem/dsm.tif") as dsm_file, \
            rasterio.open(project / "odm_dem/dtm.tif") as dtm_file:
        assert dsm_file.crs.to_epsg() == 4326 and dsm_file.nodata == -9999
        assert dsm_file.bounds == dtm_file.bounds
        dsm, dtm = dsm_file.read(1), dtm_file.read(1)
    valid = dsm != -9999
    assert not valid[0, 0] and valid.sum() > 0.8 * valid.size
    assert (dsm[valid] >= dtm[valid]).all() and (dsm[valid] > dtm[valid]).any()
    assert dtm[valid].max() - dtm[valid].min() > 3  # hills and a valley, not a plane


def test_end_with_stops_after_that_stage(project_path: Path, udp_listener: socket.socket) -> None:
    result = run_engine(project_path, udp_listener, "--end-with", "odm_dem", "--dsm")
    assert result.code == 0, result.stderr
    assert result.markers == _expected_markers(ALL_STAGES[: ALL_STAGES.index("odm_dem") + 1])
    lines = result.lines
    finished = lines.index("[INFO]    Finished odm_dem stage")
    assert lines[finished + 1] == "[INFO]    No more stages to run"
    assert lines[finished + 2].startswith("[INFO]    ODM app finished - ")
    project = project_path / PROJECT
    assert (project / "odm_dem/dsm.tif").is_file()
    assert not (project / "odm_dem/dtm.tif").exists()
    assert not (project / "odm_orthophoto").exists()
    assert not (project / "odm_report").exists()


def test_skip_flags_trailing_unknown_flag_and_no_ansiesc(
    project_path: Path, udp_listener: socket.socket
) -> None:
    # one run for three cheap checks (keeps the module fast)
    result = run_engine(
        project_path,
        udp_listener,
        "--skip-orthophoto",
        "--skip-report",
        "--mystery-flag",  # unknown and right before the project name: stays a boolean
        no_ansiesc="1",
    )
    assert result.code == 0, result.stderr
    assert "\x1b" not in result.raw
    assert "[INFO]    Running dataset stage\n" in result.raw
    assert "[INFO]    mystery_flag: True" in result.lines
    assert f"[INFO]    name: {PROJECT}" in result.lines
    project = project_path / PROJECT
    assert not (project / "odm_orthophoto/odm_orthophoto.tif").exists()
    assert not (project / "odm_report/report.pdf").exists()
    assert (project / "odm_report/shots.geojson").is_file()


@pytest.mark.parametrize("create_dir", [True, False], ids=["empty-images", "missing-project"])
def test_no_images_fails_with_exit_1(
    tmp_path: Path, udp_listener: socket.socket, create_dir: bool
) -> None:
    images = tmp_path / PROJECT / "images"
    if create_dir:
        images.mkdir(parents=True)
        (images / "readme.txt").write_text("no images here")
    result = run_engine(tmp_path, udp_listener)
    assert result.code == 1
    assert result.lines[-1] == f"[ERROR]   Not enough supported images in {images}"
    assert "\x1b[91m[ERROR]   Not enough supported images" in result.raw
    assert result.markers == [("Running", "dataset")]


@pytest.mark.parametrize(
    ("code", "stage", "absent"),
    [
        ("1", "", "opensfm/reconstruction.json"),
        ("137", "odm_meshing", "odm_texturing"),
    ],
)
def test_injected_failure_prints_geeks_block_and_exits_with_code(
    project_path: Path, udp_listener: socket.socket, code: str, stage: str, absent: str
) -> None:
    env = {"ODM_TEST_ENGINE_FAIL": code}
    if stage:
        env["ODM_TEST_ENGINE_FAIL_STAGE"] = stage
    failing = stage or "opensfm"
    result = run_engine(project_path, udp_listener, **env)
    assert result.code == int(code)
    lines = result.lines
    assert ("Running", failing) in result.markers
    assert ("Finished", failing) not in result.markers
    assert result.markers[-1] == ("Running", failing)
    dump = lines.index("===== Dumping Info for Geeks (developers need this to fix bugs) =====")
    done = lines.index("===== Done, human-readable information to follow... =====")
    assert dump < done
    assert lines[-1].startswith(f"[ERROR]   The program exited with a strange value ({code})")
    assert not any("ODM app finished" in line for line in lines)
    project = project_path / PROJECT
    assert (project / "images.json").is_file()
    assert not (project / absent).exists()
    log = json.loads((project / "log.json").read_text())
    assert log["success"] is False and log["error"]["code"] == int(code)


def test_failure_stage_not_in_chain_means_success(
    project_path: Path, udp_listener: socket.socket
) -> None:
    result = run_engine(
        project_path,
        udp_listener,
        "--fast-orthophoto",
        ODM_TEST_ENGINE_FAIL="1",
        ODM_TEST_ENGINE_FAIL_STAGE="openmvs",
    )
    assert result.code == 0


def test_pgup_datagrams_are_monotonic_and_end_at_100(
    project_path: Path, udp_listener: socket.socket
) -> None:
    port = udp_listener.getsockname()[1]
    process = subprocess.Popen(
        [*_command(project_path), PROJECT],
        env=_env(port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert process.wait(timeout=20) == 0
    values = []
    while True:
        try:
            payload = udp_listener.recv(512).decode()
        except BlockingIOError:
            break
        prefix, pid, name, value = payload.split("/")
        assert (prefix, pid, name) == ("PGUP", str(process.pid), PROJECT)
        values.append(float(value))
    assert values == sorted(values)
    assert values[-1] == 100.0
    assert {5.0, 25.0, 50.0, 90.0, 98.0} <= set(values)
    assert len(values) > len(ALL_STAGES)  # stage ends plus stage-internal checkpoints


def test_seconds_paces_the_run(project_path: Path, udp_listener: socket.socket) -> None:
    started = time.monotonic()
    result = run_engine(project_path, udp_listener, ODM_TEST_ENGINE_SECONDS="0.25")
    elapsed = time.monotonic() - started
    assert result.code == 0
    assert 0.24 <= elapsed < 3.0


def test_seconds_per_image_adds_to_the_run(project_path: Path,
                                           udp_listener: socket.socket) -> None:
    """Five images at 0.1 s each: at least 0.5 s on top of the fixed part (here none)."""
    started = time.monotonic()
    result = run_engine(project_path, udp_listener, ODM_TEST_ENGINE_SECONDS="0",
                        ODM_TEST_ENGINE_SECONDS_PER_IMAGE="0.1")
    elapsed = time.monotonic() - started
    assert result.code == 0
    assert 0.49 <= elapsed < 4.0


@pytest.mark.parametrize(
    ("signum", "expected"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"]
)
def test_signal_stops_the_run_without_more_outputs(
    project_path: Path, udp_listener: socket.socket, signum: int, expected: int
) -> None:
    port = udp_listener.getsockname()[1]
    process = subprocess.Popen(
        [*_command(project_path), PROJECT],
        env=_env(port, ODM_TEST_ENGINE_SECONDS="120"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    try:
        seen = []
        for line in process.stdout:
            seen.append(ANSI.sub("", line.rstrip("\n")))
            if seen[-1] == "[INFO]    Running dataset stage":
                break
        process.send_signal(signum)
        rest, errors = process.communicate(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == expected, errors
    assert "Traceback" not in errors
    assert "Finished dataset stage" not in rest
    project = project_path / PROJECT
    assert not (project / "images.json").exists()
    assert not (project / "log.json").exists()


@pytest.mark.parametrize(
    ("options", "env"),
    [
        ((), {"ODM_TEST_ENGINE_SECONDS": "soon"}),
        ((), {"ODM_TEST_ENGINE_FAIL": "yes"}),
        ((), {"ODM_TEST_ENGINE_FAIL_STAGE": "not_a_stage"}),
        (("--end-with", "odm_nothing"), {}),
    ],
    ids=["bad-seconds", "bad-fail", "bad-fail-stage", "bad-end-with"],
)
def test_configuration_errors_exit_2(
    project_path: Path, udp_listener: socket.socket, options: tuple[str, ...], env: dict[str, str]
) -> None:
    result = run_engine(project_path, udp_listener, *options, **env)
    assert result.code == 2
    assert result.raw == ""
    assert "odm-test-engine: error:" in result.stderr


def test_missing_project_path_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "odm_test_engine", "--dsm", PROJECT],
        env=_env(9),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 2
    assert "--project-path" in done.stderr


def test_closed_stdout_stops_the_run_quietly(
    project_path: Path, udp_listener: socket.socket
) -> None:
    port = udp_listener.getsockname()[1]
    process = subprocess.Popen(
        [*_command(project_path), PROJECT],
        env=_env(port, ODM_TEST_ENGINE_SECONDS="5"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        process.stdout.readline()
        process.stdout.close()
        assert process.wait(timeout=5) == 141
        assert process.stderr.read() == b""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
