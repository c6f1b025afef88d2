"""ODM split-merge's ``seed.zip``: extracted into the project root with its paths kept.

Covered (``fetching.extract_seed`` on zips built here, and ``fetch_inputs`` over an in-memory S3
double): the two seeds ODM's ``opendm/remote.py`` sends (reconstruction and toolchain) land at
their project-relative paths, touch files empty, directory entries created, ``./`` prefixes
dropped; the archive is deleted and counted as no image, nothing of it in ``images/``; only an
object named exactly ``seed.zip`` straight in the task's own upload prefix is a seed
(``Seed.zip``, ``seed.zip`` in an operator's location and in a sub-folder are ordinary zips).
Refused, each with its exact message, the whole fetch failing and nothing written (a sibling of
the project stays empty, the project keeps only what was there): absolute paths, drive letters,
backslashes, ``..`` anywhere, a folder already in the project that links outside, symbolic-link
entries, entries in ``images/`` (any case) or the scratch folder, control characters, a file
where a folder is needed and the reverse, too many entries, too many expanded bytes (declared
and actual), a member over the ratio, a file that is no zip; the disk budget is charged and
given back.

``packaging.collect`` with the ``outputs`` ODM's split-merge asks for (both lists of
``remote.py``): exactly those files, folders recursed, missing paths skipped, a file asked twice
(itself and through its folder) shipped once, a link inside a requested folder that points out of
the project skipped, a linked file kept under its requested name, escaping paths skipped.

Left out: the gateway's upload of the file and a run end to end
(``tests/integration/test_seed_and_outputs.py``); lying central directories, which the seed
shares with every archive (``tests/security/test_zip_bombs.py``).
"""

from __future__ import annotations

import stat
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from scaleodm.common.settings import S3Settings
from scaleodm.common.store.s3 import S3, S3Url
from scaleodm.run.fetching import (
    SEED_NAME,
    DiskBudget,
    InputError,
    Limits,
    extract_seed,
    fetch_inputs,
)
from scaleodm.run.packaging import build_zip, collect

TASK = "0b2f3c4d-5e6f-4a0b-8c9d-0e1f2a3b4c5d"
BUCKET = "scaleodm"
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 32 + b"\xff\xd9"

# What opendm/remote.py's ReconstructionTask and ToolchainTask put in a seed (contents made up).
RECONSTRUCTION_SEED = {
    "opensfm/exif/DJI_0001.JPG.exif": b'{"width": 4000}',
    "opensfm/exif/DJI_0002.JPG.exif": b'{"width": 4000}',
    "opensfm/camera_models.json": b'{"v2 dji fc6310": {}}',
    "opensfm/reference_lla.json": b'{"latitude": 46.8}',
    "opensfm/split_merge_stop_at_reconstruction.txt": b"",
}
TOOLCHAIN_SEED = {
    "opensfm/camera_models.json": b'{"v2 dji fc6310": {}}',
    "opensfm/reference_lla.json": b'{"latitude": 46.8}',
    "opensfm/reconstruction.json": b"[]",
    "opensfm/tracks.csv": b"OPENSFM_TRACKS_VERSION_v1\n",
    "opensfm/features/empty": b"",
    "opensfm/matches/empty": b"",
    "opensfm/exif/empty": b"",
}


def _limits(*, entries: int = 100, expanded: int = 1 << 20, ratio: float = 100.0,
            disk: int = 1 << 22) -> Limits:
    return Limits(download_bytes=1 << 20, expanded_bytes=expanded, member_ratio=ratio,
                  entries=entries, disk_bytes=disk)


def _zip(path: Path, members: dict[str, bytes], *, links: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if name in links:
                info.create_system = 3
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, data)
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "work" / TASK
    (root / "images").mkdir(parents=True)
    (tmp_path / "work" / "sibling").mkdir()
    return root


def _sibling(project: Path) -> list[Path]:
    return list((project.parent / "sibling").rglob("*"))


# --------------------------------------------------------------------------------------------
# extract_seed: what a seed becomes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "members",
    [pytest.param(RECONSTRUCTION_SEED, id="reconstruction-seed"),
     pytest.param(TOOLCHAIN_SEED, id="toolchain-seed")],
)
def test_paths_kept_touch_files_empty(
    tmp_path: Path, project: Path, members: dict[str, bytes]
) -> None:
    archive = _zip(tmp_path / SEED_NAME, members)
    budget = DiskBudget(1 << 22)

    written = extract_seed(archive, project, _limits(), budget)

    assert _tree(project) == members
    assert {p.relative_to(project.resolve()).as_posix() for p in written if p.is_file()} == set(
        members
    )
    assert list((project / "images").iterdir()) == []
    assert budget.used == sum(len(v) for v in members.values())
    assert _sibling(project) == []


def test_directories_created_and_dot_prefixes_dropped(tmp_path: Path, project: Path) -> None:
    archive = _zip(tmp_path / SEED_NAME, {
        "opensfm/": b"", "opensfm/undistorted/": b"", "opensfm/undistorted/depthmaps/": b"",
        "./opensfm/./tracks.csv": b"t", "opensfm//reference_lla.json": b"r", "./": b"",
    })

    written = extract_seed(archive, project, _limits())

    assert (project / "opensfm/undistorted/depthmaps").is_dir()
    assert _tree(project) == {"opensfm/tracks.csv": b"t", "opensfm/reference_lla.json": b"r"}
    rel = [p.relative_to(project.resolve()).as_posix() for p in written]
    assert rel[:3] == ["opensfm", "opensfm/undistorted", "opensfm/undistorted/depthmaps"]


def test_existing_file_overwritten_as_nodeodm(tmp_path: Path, project: Path) -> None:
    (project / "opensfm").mkdir()
    (project / "opensfm/tracks.csv").write_bytes(b"old")
    archive = _zip(tmp_path / SEED_NAME, {"opensfm/tracks.csv": b"new"})

    written = extract_seed(archive, project, _limits())

    assert (project / "opensfm/tracks.csv").read_bytes() == b"new"
    assert [p.name for p in written] == ["tracks.csv"]  # the folder was there already


# --------------------------------------------------------------------------------------------
# extract_seed: hostile seeds
# --------------------------------------------------------------------------------------------

_GOOD = {"opensfm/camera_models.json": b"{}", "opensfm/features/empty": b""}


def _refused(name: str, why: str) -> str:
    return f"seed.zip refused: entry '{name}' {why}"


OUTSIDE = "would land outside the project"


@pytest.mark.parametrize(
    ("members", "links", "message"),
    [
        pytest.param({"../sibling/x": b"x"}, (), _refused("../sibling/x", OUTSIDE), id="dotdot"),
        pytest.param({"opensfm/../../sibling/x": b"x"}, (),
                     _refused("opensfm/../../sibling/x", OUTSIDE), id="dotdot-inside"),
        pytest.param({"opensfm/../x": b"x"}, (), _refused("opensfm/../x", OUTSIDE),
                     id="any-dotdot-even-harmless"),
        pytest.param({"/tmp/x": b"x"}, (), _refused("/tmp/x", OUTSIDE), id="absolute"),
        pytest.param({"C:/x": b"x"}, (), _refused("C:/x", OUTSIDE), id="drive-letter"),
        pytest.param({"c:x": b"x"}, (), _refused("c:x", OUTSIDE), id="drive-relative"),
        pytest.param({"..\\sibling\\x": b"x"}, (), _refused("..\\sibling\\x", OUTSIDE),
                     id="backslash-dotdot"),
        pytest.param({"\\tmp\\x": b"x"}, (), _refused("\\tmp\\x", OUTSIDE),
                     id="backslash-absolute"),
        pytest.param({"opensfm\\x": b"x"}, (),
                     _refused("opensfm\\x", "has a backslash in its name"), id="backslash"),
        pytest.param({"opensfm/link": b"/etc/passwd"}, ("opensfm/link",),
                     _refused("opensfm/link", "is a symbolic link"), id="symlink"),
        pytest.param({"images/DJI_9999.JPG": JPEG}, (),
                     _refused("images/DJI_9999.JPG", "is in images/ (a seed must not add images)"),
                     id="images"),
        pytest.param({"Images/x.jpg": JPEG}, (),
                     _refused("Images/x.jpg", "is in images/ (a seed must not add images)"),
                     id="images-other-case"),
        pytest.param({"./images/": b""}, (),
                     _refused("./images/", "is in images/ (a seed must not add images)"),
                     id="images-dir"),
        pytest.param({".downloads/0.zip/": b""}, (),
                     _refused(".downloads/0.zip/", "is in a folder the service reserves"),
                     id="scratch"),
        pytest.param({"opensfm/a\x1b[2Jb": b"x"}, (),
                     _refused("opensfm/a\\x1b[2Jb", "has a control character in its name"),
                     id="control-character-shown-escaped"),
        pytest.param({"odm_x": b"file", "odm_x/tracks.csv": b"t"}, (),
                     _refused("odm_x/tracks.csv", "conflicts with a file of the same name"),
                     id="file-where-folder-needed"),
        pytest.param({"odm_y/tracks.csv/": b"", "odm_y/tracks.csv": b"t"}, (),
                     _refused("odm_y/tracks.csv", "conflicts with a folder of the same name"),
                     id="folder-where-file-needed"),
    ],
)
def test_hostile_entry_refused_and_nothing_left(
    tmp_path: Path, project: Path, members: dict[str, bytes], links: tuple[str, ...],
    message: str,
) -> None:
    # Good entries first: what was written before the bad one must go too.
    archive = _zip(tmp_path / SEED_NAME, _GOOD | members, links=links)
    budget = DiskBudget(1 << 22)

    with pytest.raises(InputError) as err:
        extract_seed(archive, project, _limits(), budget)

    assert str(err.value) == message
    assert [p.name for p in project.iterdir()] == ["images"]
    assert list((project / "images").iterdir()) == []
    assert _sibling(project) == []
    assert budget.used == 0


def test_long_name_shown_bounded(tmp_path: Path, project: Path) -> None:
    name = "../" + "a" * 5000
    archive = _zip(tmp_path / SEED_NAME, {name: b"x"})
    with pytest.raises(InputError) as err:
        extract_seed(archive, project, _limits())
    assert len(str(err.value)) < 300
    assert str(err.value).startswith("seed.zip refused: entry '../aaa")


def test_existing_link_out_of_project_refused(tmp_path: Path, project: Path) -> None:
    outside = project.parent / "sibling"
    (project / "opensfm").symlink_to(outside, target_is_directory=True)
    archive = _zip(tmp_path / SEED_NAME, {"opensfm/tracks.csv": b"t"})

    with pytest.raises(InputError) as err:
        extract_seed(archive, project, _limits())

    assert str(err.value) == _refused("opensfm/tracks.csv", OUTSIDE)
    assert _sibling(project) == []


@pytest.mark.parametrize(
    ("limits", "members", "message"),
    [
        pytest.param(
            _limits(entries=3), {f"opensfm/exif/{i}.exif": b"{}" for i in range(4)},
            "Input archive refused: it has 4 entries, more than the limit of 3", id="entries",
        ),
        pytest.param(
            _limits(expanded=1024), {"opensfm/tracks.csv": b"t" * 700, "opensfm/b": b"b" * 700},
            "Input archive refused: it expands to more than the limit of 1 KiB", id="expanded",
        ),
        pytest.param(
            _limits(ratio=2.0), {"opensfm/tracks.csv": b"\0" * (3 << 20)},
            "Input archive refused: a file in it expands more than the limit of 2 times its "
            "compressed size", id="ratio",
        ),
        pytest.param(
            _limits(disk=1024), {"opensfm/tracks.csv": b"t" * 2048},
            "Inputs refused: they take more disk space than the task's limit of 1 KiB",
            id="disk",
        ),
    ],
)
def test_limits(
    tmp_path: Path, project: Path, limits: Limits, members: dict[str, bytes], message: str
) -> None:
    archive = _zip(tmp_path / SEED_NAME, members)
    with pytest.raises(InputError) as err:
        extract_seed(archive, project, limits)
    assert str(err.value) == message
    assert [p.name for p in project.iterdir()] == ["images"]


def test_limits_hold_on_bytes_written_when_sizes_lie(
    tmp_path: Path, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The up-front check on declared sizes off: the same refusal comes while writing.
    monkeypatch.setattr("scaleodm.run.fetching._check_declared", lambda *_a: None)
    archive = _zip(tmp_path / SEED_NAME, {"opensfm/a": b"a" * 700, "opensfm/b": b"b" * 700})
    budget = DiskBudget(1 << 22)
    with pytest.raises(InputError) as err:
        extract_seed(archive, project, _limits(expanded=1024), budget)
    assert str(err.value) == "Input archive refused: it expands to more than the limit of 1 KiB"
    assert [p.name for p in project.iterdir()] == ["images"]
    assert budget.used == 0


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04broken"])
def test_not_a_zip(tmp_path: Path, project: Path, content: bytes) -> None:
    archive = tmp_path / SEED_NAME
    archive.write_bytes(content)
    with pytest.raises(InputError) as err:
        extract_seed(archive, project, _limits())
    assert str(err.value) == "Could not extract seed.zip: not a valid zip archive"


# --------------------------------------------------------------------------------------------
# fetch_inputs: which upload is a seed
# --------------------------------------------------------------------------------------------


class _MemoryS3:
    """The two reads ``fetch_inputs`` makes, over a dict of keys (one bucket)."""

    def __init__(self, objects: dict[str, bytes], allow: list[str] | None = None) -> None:
        self.objects = objects
        self.settings = S3Settings(bucket=BUCKET, input_allow=allow or [])

    async def list_objects(self, prefix: S3Url) -> list[tuple[str, int]]:
        return [(k, len(v)) for k, v in sorted(self.objects.items()) if k.startswith(prefix.key)]

    async def iter_object(self, url: S3Url, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        data = self.objects[url.key]
        for at in range(0, len(data), chunk_size):
            yield data[at : at + chunk_size]


async def _fetch(project: Path, s3: _MemoryS3, prefix: str) -> int:
    return await fetch_inputs(
        [f"s3://{BUCKET}/{prefix}"], project / "images", cast(S3, s3), task_id=TASK,
        limits=_limits(), timeout_s=5.0,
    )


def _seed_bytes(tmp_path: Path, members: dict[str, bytes]) -> bytes:
    return _zip(tmp_path / "built.zip", members).read_bytes()


async def test_uploaded_seed_goes_to_project_root(tmp_path: Path, project: Path) -> None:
    uploads = f"tasks/{TASK}/inputs/"
    s3 = _MemoryS3({
        uploads + "DJI_0001.JPG": JPEG, uploads + "DJI_0002.JPG": JPEG,
        uploads + "gcp_list.txt": b"EPSG:4326\n",
        uploads + SEED_NAME: _seed_bytes(tmp_path, TOOLCHAIN_SEED),
    })

    count = await _fetch(project, s3, uploads)

    assert count == 2  # the seed is no image
    assert sorted(p.name for p in (project / "images").iterdir()) == [
        "DJI_0001.JPG", "DJI_0002.JPG", "gcp_list.txt"]
    assert {k: v for k, v in _tree(project).items() if not k.startswith("images/")} == (
        TOOLCHAIN_SEED)
    assert not (project / SEED_NAME).exists()
    assert not (project / ".downloads").exists()


@pytest.mark.parametrize(
    "key",
    [pytest.param(f"tasks/{TASK}/inputs/Seed.zip", id="other-case"),
     pytest.param(f"tasks/{TASK}/inputs/sub/seed.zip", id="in-a-sub-folder"),
     pytest.param(f"tasks/{TASK}/inputs/my-seed.zip", id="other-name")],
)
async def test_other_zips_are_flattened_into_images(
    tmp_path: Path, project: Path, key: str
) -> None:
    uploads = f"tasks/{TASK}/inputs/"
    seed = _seed_bytes(tmp_path, {"opensfm/camera_models.json": b"{}", "a/DJI_0009.JPG": JPEG})
    s3 = _MemoryS3({uploads + "DJI_0001.JPG": JPEG, key: seed})

    assert await _fetch(project, s3, uploads) == 2
    assert sorted(p.name for p in project.iterdir()) == ["images"]


async def test_seed_outside_own_uploads_is_an_ordinary_zip(
    tmp_path: Path, project: Path
) -> None:
    # An operator's location: NodeODM would have received it as zipurl.zip, never as a seed.
    s3 = _MemoryS3(
        {"drone/DJI_0001.JPG": JPEG, "drone/seed.zip": _seed_bytes(tmp_path, TOOLCHAIN_SEED)},
        allow=[f"s3://{BUCKET}/drone/"],
    )

    assert await _fetch(project, s3, "drone/") == 1
    assert sorted(p.name for p in project.iterdir()) == ["images"]


async def test_hostile_seed_fails_the_fetch_and_leaves_nothing(
    tmp_path: Path, project: Path
) -> None:
    uploads = f"tasks/{TASK}/inputs/"
    s3 = _MemoryS3({
        uploads + "DJI_0001.JPG": JPEG,
        uploads + SEED_NAME: _seed_bytes(tmp_path, _GOOD | {"../sibling/evil": b"x"}),
    })

    with pytest.raises(InputError) as err:
        await _fetch(project, s3, uploads)

    assert str(err.value) == _refused("../sibling/evil", OUTSIDE)
    assert sorted(p.name for p in project.iterdir()) == ["images"]
    assert list((project / "images").iterdir()) == []
    assert _sibling(project) == []


async def test_later_failure_removes_the_seed(tmp_path: Path, project: Path) -> None:
    uploads = f"tasks/{TASK}/inputs/"
    s3 = _MemoryS3({
        uploads + "DJI_0001.JPG": JPEG,
        uploads + SEED_NAME: _seed_bytes(tmp_path, TOOLCHAIN_SEED),
        uploads + "zz.zip": b"not a zip",  # listed after the seed
    })

    with pytest.raises(InputError):
        await _fetch(project, s3, uploads)

    assert sorted(p.name for p in project.iterdir()) == ["images"]


# --------------------------------------------------------------------------------------------
# packaging.collect: the outputs ODM asks a submodel for
# --------------------------------------------------------------------------------------------

RECONSTRUCTION_OUTPUTS = [
    "opensfm/matches", "opensfm/features", "opensfm/reconstruction.json", "opensfm/tracks.csv",
    "cameras.json",
]
TOOLCHAIN_OUTPUTS = [
    "odm_orthophoto/cutline.gpkg", "odm_orthophoto/odm_orthophoto_cut.tif",
    "odm_orthophoto/odm_orthophoto_feathered.tif", "odm_dem", "odm_report", "odm_georeferencing",
]
# A finished submodel's project: what the outputs select, and what they must leave behind.
PROJECT_FILES = [
    "opensfm/matches/DJI_0001.JPG.pkl.gz", "opensfm/matches/empty",
    "opensfm/features/DJI_0001.JPG.features.npz", "opensfm/features/sub/deep.npz",
    "opensfm/reconstruction.json", "opensfm/tracks.csv", "opensfm/camera_models.json",
    "opensfm/reference_lla.json", "cameras.json", "images.json",
    "odm_orthophoto/cutline.gpkg", "odm_orthophoto/odm_orthophoto_cut.tif",
    "odm_orthophoto/odm_orthophoto.tif",
    "odm_dem/dsm.tif", "odm_dem/dsm.euclideand.tif",
    "odm_report/report.pdf", "odm_report/stats/stats.json",
    "odm_georeferencing/odm_georeferenced_model.laz", "images/DJI_0001.JPG",
    "task_output.txt",
]


@pytest.fixture
def finished(tmp_path: Path) -> Path:
    root = tmp_path / "work" / TASK
    for rel in PROJECT_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


def _shipped(project: Path, outputs: list[str]) -> list[str]:
    return [f.relative_to(project.resolve()).as_posix() for f in collect(project, outputs)]


@pytest.mark.parametrize(
    ("outputs", "expected"),
    [
        pytest.param(RECONSTRUCTION_OUTPUTS, [
            "opensfm/matches/DJI_0001.JPG.pkl.gz", "opensfm/matches/empty",
            "opensfm/features/DJI_0001.JPG.features.npz", "opensfm/features/sub/deep.npz",
            "opensfm/reconstruction.json", "opensfm/tracks.csv", "cameras.json",
        ], id="reconstruction"),
        pytest.param(TOOLCHAIN_OUTPUTS, [  # the feathered orthophoto is missing: skipped
            "odm_orthophoto/cutline.gpkg", "odm_orthophoto/odm_orthophoto_cut.tif",
            "odm_dem/dsm.euclideand.tif", "odm_dem/dsm.tif",
            "odm_report/report.pdf", "odm_report/stats/stats.json",
            "odm_georeferencing/odm_georeferenced_model.laz",
        ], id="toolchain"),
        pytest.param(["opensfm/features", "opensfm/features/sub/deep.npz", "cameras.json",
                      "./cameras.json"],
                     ["opensfm/features/DJI_0001.JPG.features.npz",
                      "opensfm/features/sub/deep.npz", "cameras.json"], id="asked-twice-once"),
        pytest.param(["../work", "..", ".", "", "/etc", "opensfm/../../" + TASK + "/cameras.json",
                      "opensfm/../cameras.json"],
                     ["cameras.json"], id="escaping-and-root-skipped"),
    ],
)
def test_collect_split_merge_outputs(
    finished: Path, outputs: list[str], expected: list[str]
) -> None:
    assert _shipped(finished, outputs) == expected


def test_collect_links_judged_where_they_point(finished: Path) -> None:
    outside = finished.parent / "secret.txt"
    outside.write_text("secret")
    (finished / "odm_report/leak.txt").symlink_to(outside)
    (finished / "odm_dem/alias.tif").symlink_to(finished / "odm_dem/dsm.tif")

    shipped = _shipped(finished, ["odm_report", "odm_dem"])

    assert "odm_report/leak.txt" not in shipped
    assert "odm_dem/alias.tif" in shipped  # inside the project: kept, under its own name


def test_all_zip_is_extractable_into_a_submodel(finished: Path, tmp_path: Path) -> None:
    """PyODM's ``download_assets`` extracts all.zip into the submodel: names must be the
    requested project-relative paths, each once."""
    archive = tmp_path / "all.zip"
    build_zip(finished, collect(finished, ["opensfm/features", "opensfm/features/sub",
                                           "cameras.json"]), archive)
    with zipfile.ZipFile(archive) as zf:
        assert zf.namelist() == ["opensfm/features/DJI_0001.JPG.features.npz",
                                 "opensfm/features/sub/deep.npz", "cameras.json"]
