"""A run's inputs and outputs on local disk (scheduler ``fetching`` and ``packaging``).

Covered (nodeodm-api §6, §7.1, §4.5):
- ``extract_zip``: nested paths flattened, non-images dropped except ``.txt``, extensions matched
  case-insensitively, clashes renamed with ``_`` suffixes, traversal and absolute names kept inside
  the destination, the expanded-size bound, a non-zip and a corrupt member both raising
  ``InputError`` with ``Could not extract .zip file`` and no exception text;
- ``control_file_args``: ``geo.txt`` -> ``--geo``, ``image_groups.txt`` -> ``--split-image-groups``,
  the first other ``.txt`` -> ``--gcp``; every ``.txt`` moves from ``images/`` to ``gcp/``;
- ``collect``: the default list in its order, directories recursively, missing entries skipped,
  custom ``outputs`` replacing the defaults, paths and symlinks escaping the project skipped;
- ``build_zip``: exactly the collected files, project-relative, no top-level folder, deflated;
- ``write_task_output``: ANSI codes stripped and lines trimmed, empty when there is no console.

Left out: downloading (``fetch_inputs`` over http/S3) and ``upload_outputs`` (integration tests);
hostile archives and the other limits (``tests/security/test_zip_bombs.py``).
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import pytest

from scaleodm.run.fetching import InputError, Limits, control_file_args, extract_zip
from scaleodm.run.packaging import (
    DEFAULT_OUTPUTS,
    NODEODM_OUTPUTS,
    build_zip,
    collect,
    write_task_output,
)


def _limits(expanded: int = 1024) -> Limits:
    return Limits(download_bytes=1 << 20, expanded_bytes=expanded, member_ratio=100.0,
                  entries=1000, disk_bytes=1 << 20)


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()
    }


# --------------------------------------------------------------------------------------------
# extract_zip
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        pytest.param(
            {"a/b/c/IMG_1.JPG": b"1", "IMG_2.jpg": b"2", "x/y.tif": b"3"},
            {"IMG_1.JPG": b"1", "IMG_2.jpg": b"2", "y.tif": b"3"},
            id="flattened",
        ),
        pytest.param(
            {"a.JPEG": b"1", "b.TIFF": b"2", "c.Png": b"3", "d.dng": b"4", "e.tiff": b"5"},
            {"a.JPEG": b"1", "b.TIFF": b"2", "c.Png": b"3", "d.dng": b"4", "e.tiff": b"5"},
            id="image-extensions-any-case",
        ),
        pytest.param(
            {"IMG.jpg": b"i", "notes.pdf": b"p", "inner.zip": b"z", "run.sh": b"s",
             "noext": b"n", "gcp_list.txt": b"g", "sub/GEO.TXT": b"geo", "seed.las": b"l",
             "folder/": b""},
            {"IMG.jpg": b"i", "gcp_list.txt": b"g", "GEO.TXT": b"geo"},
            id="non-images-dropped-txt-kept",
        ),
        pytest.param(
            {"a/IMG.jpg": b"1", "b/IMG.jpg": b"2", "c/IMG.jpg": b"3"},
            {"IMG.jpg": b"1", "IMG_.jpg": b"2", "IMG__.jpg": b"3"},
            id="clashes-renamed",
        ),
        pytest.param(
            {"../../evil.jpg": b"e", "/abs/root.jpg": b"r", "..\\..\\win.jpg": b"w",
             "a/../../../up.txt": b"u"},
            {"evil.jpg": b"e", "root.jpg": b"r", "win.jpg": b"w", "up.txt": b"u"},
            id="traversal-names-land-inside",
        ),
        pytest.param({"readme.md": b"x"}, {}, id="nothing-wanted"),
    ],
)
def test_extract_zip(tmp_path: Path, members: dict[str, bytes], expected: dict[str, bytes]) -> None:
    archive = _zip(tmp_path / "in.zip", members)
    dest = tmp_path / "run" / "project" / "images"
    dest.mkdir(parents=True)

    written = extract_zip(archive, dest, _limits())

    assert written == len(expected)
    assert _tree(dest) == expected
    # nothing was written anywhere else
    outside = {k for k in _tree(tmp_path) if not k.startswith("run/project/images/")}
    assert outside == {"in.zip"}


def test_extract_zip_keeps_existing_files(tmp_path: Path) -> None:
    dest = tmp_path / "images"
    dest.mkdir()
    (dest / "IMG.jpg").write_bytes(b"uploaded")
    extract_zip(_zip(tmp_path / "in.zip", {"IMG.jpg": b"zipped"}), dest, _limits())
    assert _tree(dest) == {"IMG.jpg": b"uploaded", "IMG_.jpg": b"zipped"}


@pytest.mark.parametrize(
    ("sizes", "max_bytes", "ok"),
    [
        pytest.param({"a.jpg": 100, "b.jpg": 100}, 200, True, id="at-the-bound"),
        pytest.param({"a.jpg": 100, "b.jpg": 101}, 200, False, id="one-byte-over"),
        pytest.param({"a.jpg": 300}, 200, False, id="single-member-over"),
        pytest.param({"a.jpg": 100, "b.bin": 1000}, 200, True, id="dropped-members-not-counted"),
    ],
)
def test_extract_zip_size_bound(
    tmp_path: Path, sizes: dict[str, int], max_bytes: int, ok: bool
) -> None:
    archive = _zip(tmp_path / "in.zip", {name: b"\0" * n for name, n in sizes.items()})
    dest = tmp_path / "images"
    dest.mkdir()
    if ok:
        extract_zip(archive, dest, _limits(max_bytes))
    else:
        with pytest.raises(InputError, match=f"expands to more than the limit of {max_bytes} b"):
            extract_zip(archive, dest, _limits(max_bytes))
        assert list(dest.iterdir()) == []  # nothing half-extracted is left


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"<html>404 Not Found</html>", id="html"),
        pytest.param(b"", id="empty"),
        pytest.param(b"PK\x03\x04truncated", id="truncated"),
    ],
)
def test_extract_zip_not_a_zip(tmp_path: Path, content: bytes) -> None:
    archive = tmp_path / "in.zip"
    archive.write_bytes(content)
    dest = tmp_path / "images"
    dest.mkdir()
    with pytest.raises(InputError, match="^Could not extract .zip file: [a-z ,]+$"):
        extract_zip(archive, dest, _limits())


def _damaged(kind: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("IMG.jpg", b"A" * 64)
    data = bytearray(buf.getvalue())
    local, central = data.index(b"PK\x03\x04"), data.index(b"PK\x01\x02")
    if kind == "crc":
        data[data.index(b"A" * 64)] = ord("B")  # the directory stays valid
    elif kind == "encrypted":
        data[local + 6] |= 1  # general purpose flag bit 0, in both headers
        data[central + 8] |= 1
    else:  # an unknown compression method
        struct.pack_into("<H", data, local + 8, 99)
        struct.pack_into("<H", data, central + 10, 99)
    return bytes(data)


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("crc", id="bad-crc"),
        pytest.param("encrypted", id="encrypted"),
        pytest.param("method", id="unsupported-method"),
    ],
)
def test_extract_zip_damaged_member(tmp_path: Path, kind: str) -> None:
    """A readable directory with an unreadable member is an input error, not a crash of the run."""
    archive = tmp_path / "in.zip"
    archive.write_bytes(_damaged(kind))
    dest = tmp_path / "images"
    dest.mkdir()
    with pytest.raises(InputError, match="^Could not extract .zip file: [a-z ,]+$"):
        extract_zip(archive, dest, _limits())


# --------------------------------------------------------------------------------------------
# control_file_args
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "args", "moved"),
    [
        pytest.param(
            ["IMG_1.JPG", "geo.txt", "image_groups.txt", "gcp_list.txt"],
            ["--gcp", "gcp_list.txt", "--geo", "geo.txt",
             "--split-image-groups", "image_groups.txt"],
            ["gcp_list.txt", "geo.txt", "image_groups.txt"],
            id="all-three",
        ),
        pytest.param(
            ["IMG_1.JPG", "a_gcp.txt", "b_gcp.txt"],
            ["--gcp", "a_gcp.txt"],
            ["a_gcp.txt", "b_gcp.txt"],
            id="first-other-txt-only",
        ),
        pytest.param(
            ["IMG_1.JPG", "GEO.TXT", "Image_Groups.txt"],
            ["--geo", "GEO.TXT", "--split-image-groups", "Image_Groups.txt"],
            ["GEO.TXT", "Image_Groups.txt"],
            id="case-insensitive",
        ),
        pytest.param(["IMG_1.JPG", "IMG_2.tif"], [], [], id="no-control-files"),
    ],
)
def test_control_file_args(
    tmp_path: Path, files: list[str], args: list[str], moved: list[str]
) -> None:
    project = tmp_path / "project"
    images = project / "images"
    images.mkdir(parents=True)
    for name in files:
        (images / name).write_text(name)

    out = control_file_args(images, project)

    gcp = project / "gcp"
    assert out == [a if a.startswith("--") else str(gcp / a) for a in args]
    assert sorted(p.name for p in images.iterdir()) == sorted(set(files) - set(moved))
    if moved:
        assert sorted(p.name for p in gcp.iterdir()) == sorted(moved)
        assert all((gcp / name).read_text() == name for name in moved)
    else:
        assert not gcp.exists()


# --------------------------------------------------------------------------------------------
# packaging
# --------------------------------------------------------------------------------------------

PRESENT = [
    "odm_orthophoto/odm_orthophoto.tif",
    "odm_orthophoto/odm_orthophoto.png",
    "odm_georeferencing/odm_georeferenced_model.laz",
    "odm_georeferencing/sub/ground_control_points.geojson",
    "odm_texturing/odm_textured_model_geo.obj",
    "odm_dem/dsm.tif",
    "entwine_pointcloud/ept.json",
    "images.json",
    "cameras.json",
    "task_output.txt",
    "log.json",
    "odm_report/report.pdf",
    "odm_report/shots.geojson",
]
NOT_SHIPPED = [
    "images/IMG_1.JPG",
    "opensfm/reconstruction.json",
    "odm_dem/other.tif",
    "odm_meshing/odm_mesh.ply",
    "gcp/gcp_list.txt",
]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "task-uuid"
    for rel in [*PRESENT, *NOT_SHIPPED]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"content of {rel}")
    return root


def _rel(project: Path, files: list[Path]) -> list[str]:
    return [f.relative_to(project.resolve()).as_posix() for f in files]


@pytest.mark.parametrize("outputs", [pytest.param(None, id="none"), pytest.param([], id="empty")])
def test_collect_default_list(project: Path, outputs: list[str] | None) -> None:
    assert _rel(project, collect(project, outputs)) == PRESENT  # PRESENT is in the default order


def test_default_list_is_nodeodms_and_the_stac_item() -> None:
    assert NODEODM_OUTPUTS[0] == "odm_orthophoto/odm_orthophoto.tif"
    assert NODEODM_OUTPUTS[-1] == "odm_report"
    assert len(NODEODM_OUTPUTS) == len(set(NODEODM_OUTPUTS)) == 25
    assert DEFAULT_OUTPUTS == (*NODEODM_OUTPUTS, "stac.json")


@pytest.mark.parametrize(
    ("outputs", "expected"),
    [
        pytest.param(
            ["odm_report", "images.json"],
            ["odm_report/report.pdf", "odm_report/shots.geojson", "images.json"],
            id="list-order-dirs-sorted",
        ),
        pytest.param(["missing.tif", "cameras.json", "no_dir/"], ["cameras.json"],
                     id="missing-skipped"),
        pytest.param(
            ["../outside.txt", "../outside", "/etc/passwd", "odm_dem/../../outside.txt",
             "log.json"],
            ["log.json"],
            id="escaping-skipped",
        ),
        pytest.param(["link_out", "link_out/secret.txt", "log.json"], ["log.json"],
                     id="symlink-escape-skipped"),
        pytest.param(["opensfm/../images.json"], ["images.json"], id="normalised-inside"),
    ],
)
def test_collect_outputs(project: Path, outputs: list[str], expected: list[str]) -> None:
    outside = project.parent / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (project.parent / "outside.txt").write_text("secret")
    (project / "link_out").symlink_to(outside, target_is_directory=True)

    assert _rel(project, collect(project, outputs)) == expected


def test_build_zip(project: Path, tmp_path: Path) -> None:
    files = collect(project, None)
    archive = tmp_path / "all.zip"

    build_zip(project, files, archive)

    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        assert names == PRESENT
        assert all(not n.startswith(("/", "task-uuid")) and ".." not in n for n in names)
        assert not [n for n in names if n.endswith("/")]  # no directory entries
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
        assert all(zf.read(n) == f"content of {n}".encode() for n in names)
        assert zf.testzip() is None


def test_build_zip_empty(project: Path, tmp_path: Path) -> None:
    build_zip(project, [], tmp_path / "all.zip")
    with zipfile.ZipFile(tmp_path / "all.zip") as zf:
        assert zf.namelist() == []


@pytest.mark.parametrize(
    ("console", "expected"),
    [
        pytest.param(
            "\x1b[39m[INFO]    Running dataset stage\x1b[0m\n"
            "  raw sub-process line  \r\n"
            "\x1b[91m[ERROR]   boom\x1b[0m\n",
            "[INFO]    Running dataset stage\nraw sub-process line\n[ERROR]   boom",
            id="ansi-stripped-trimmed",
        ),
        pytest.param("one\n\ntwo", "one\n\ntwo", id="blank-line-kept-no-trailing-newline"),
        pytest.param("", "", id="empty-console"),
        pytest.param(None, "", id="no-console"),
    ],
)
def test_write_task_output(tmp_path: Path, console: str | None, expected: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    path = tmp_path / "console.log"
    if console is not None:
        path.write_bytes(console.encode())

    write_task_output(path, project)

    assert (project / "task_output.txt").read_bytes() == expected.encode()
