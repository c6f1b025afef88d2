"""Input image discovery and a small, forgiving metadata reader for the ODM test double.

Only what the fake outputs need is read: pixel size (JPEG SOF, PNG IHDR, TIFF IFD0), and from EXIF
the camera make/model, focal length, capture time and GPS position. Anything missing or unreadable
gets a documented fallback (4000x3000 px, ``unknown`` camera, and a synthetic GPS grid — around the
mean position of the images that have GPS, else around a fixed point — so that the placeholder geo
outputs are never empty). This is not a real EXIF library; it never raises on bad input.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".tif", ".tiff", ".png"})

FALLBACK_SIZE = (4000, 3000)
#: Origin of the synthetic GPS grid used for images without GPS tags (lat, lon, alt).
FALLBACK_ORIGIN = (46.8420, 8.2470, 620.0)
_GRID_SPACING_M = 25.0
_READ_LIMIT = 1 << 20  # metadata lives near the start of the file; never read more than 1 MiB

_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 7: 1, 9: 4, 10: 8, 11: 4, 12: 8}


@dataclass(frozen=True)
class ImageInfo:
    """Metadata of one input image (real where readable, fallback otherwise)."""

    filename: str
    width: int
    height: int
    camera_make: str
    camera_model: str
    focal_length_mm: float | None
    capture_time: str | None
    latitude: float
    longitude: float
    altitude: float
    has_gps: bool


def list_images(images_dir: Path) -> list[Path]:
    """Supported images directly in ``images_dir`` (suffix case-insensitive), sorted by name."""
    if not images_dir.is_dir():
        return []
    return sorted(
        (p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.name,
    )


def read_images(paths: list[Path]) -> list[ImageInfo]:
    """Metadata for every image; images without GPS are placed on a synthetic grid."""
    raw = [_read_one(p) for p in paths]
    cols = max(1, math.ceil(math.sqrt(len(raw))))
    located = [tags.gps for tags in raw if tags.gps is not None]
    origin = FALLBACK_ORIGIN
    if located:
        lat0, lon0, alt0 = (sum(g[k] for g in located) / len(located) for k in range(3))
        origin = (round(lat0, 8), round(lon0, 8), round(alt0, 3))
    result: list[ImageInfo] = []
    for index, (path, tags) in enumerate(zip(paths, raw, strict=True)):
        width, height = tags.size or FALLBACK_SIZE
        if tags.gps is not None:
            lat, lon, alt = tags.gps
            has_gps = True
        else:
            lat, lon, alt = _grid_position(index, cols, origin)
            has_gps = False
        result.append(
            ImageInfo(
                filename=path.name,
                width=width,
                height=height,
                camera_make=tags.make or "unknown",
                camera_model=tags.model or "unknown",
                focal_length_mm=tags.focal,
                capture_time=tags.time,
                latitude=lat,
                longitude=lon,
                altitude=alt,
                has_gps=has_gps,
            )
        )
    return result


def _grid_position(
    index: int, cols: int, origin: tuple[float, float, float]
) -> tuple[float, float, float]:
    lat0, lon0, alt0 = origin
    row, col = divmod(index, cols)
    dlat = row * _GRID_SPACING_M / 111_320.0
    dlon = col * _GRID_SPACING_M / (111_320.0 * math.cos(math.radians(lat0)))
    return round(lat0 + dlat, 8), round(lon0 + dlon, 8), alt0


@dataclass
class _Tags:
    size: tuple[int, int] | None = None
    make: str | None = None
    model: str | None = None
    focal: float | None = None
    time: str | None = None
    gps: tuple[float, float, float] | None = None


def _read_one(path: Path) -> _Tags:
    tags = _Tags()
    try:
        with path.open("rb") as handle:
            data = handle.read(_READ_LIMIT)
        if data.startswith(b"\xff\xd8"):
            _parse_jpeg(data, tags)
        elif data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
            width, height = struct.unpack(">II", data[16:24])
            tags.size = (width, height)
        elif data[:4] in (b"II*\x00", b"MM\x00*"):
            _parse_tiff(data, tags, main_image=True)
    except (OSError, struct.error, ValueError, IndexError, ZeroDivisionError):
        pass
    if tags.size is not None and (tags.size[0] <= 0 or tags.size[1] <= 0):
        tags.size = None
    return tags


def _parse_jpeg(data: bytes, tags: _Tags) -> None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan: no more headers
            return
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            _parse_tiff(segment[6:], tags, main_image=False)
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and len(segment) >= 5:
            height, width = struct.unpack(">HH", segment[1:5])
            tags.size = (width, height)
        pos += 2 + length


def _parse_tiff(data: bytes, tags: _Tags, *, main_image: bool) -> None:
    endian = "<" if data[:2] == b"II" else ">"
    (ifd0,) = struct.unpack(endian + "I", data[4:8])
    ifd = dict(_ifd_entries(data, endian, ifd0))
    if main_image and 256 in ifd and 257 in ifd:
        tags.size = (int(ifd[256][0]), int(ifd[257][0]))
    tags.make = _text(ifd.get(271))
    tags.model = _text(ifd.get(272))
    if 34665 in ifd:
        exif = dict(_ifd_entries(data, endian, int(ifd[34665][0])))
        if 37386 in exif:
            tags.focal = round(float(exif[37386][0]), 3)
        tags.time = _text(exif.get(36867))
        if tags.size is None and 40962 in exif and 40963 in exif:
            tags.size = (int(exif[40962][0]), int(exif[40963][0]))
    if 34853 in ifd:
        gps = dict(_ifd_entries(data, endian, int(ifd[34853][0])))
        if 2 in gps and 4 in gps:
            lat = _dms(gps[2]) * (-1.0 if _text(gps.get(1)) == "S" else 1.0)
            lon = _dms(gps[4]) * (-1.0 if _text(gps.get(3)) == "W" else 1.0)
            alt = float(gps[6][0]) if 6 in gps else 0.0
            if 5 in gps and gps[5] and gps[5][0] == 1:
                alt = -alt
            tags.gps = (round(lat, 8), round(lon, 8), round(alt, 3))


def _ifd_entries(data: bytes, endian: str, offset: int) -> Iterator[tuple[int, list[float]]]:
    (count,) = struct.unpack(endian + "H", data[offset : offset + 2])
    for n in range(count):
        entry = data[offset + 2 + 12 * n : offset + 14 + 12 * n]
        tag, kind, items = struct.unpack(endian + "HHI", entry[:8])
        size = _TIFF_TYPE_SIZES.get(kind)
        if size is None:
            continue
        total = size * items
        if total <= 4:
            raw = entry[8 : 8 + total]
        else:
            (where,) = struct.unpack(endian + "I", entry[8:12])
            raw = data[where : where + total]
        if len(raw) < total:
            continue
        yield tag, _decode(raw, kind, items, endian)


def _decode(raw: bytes, kind: int, items: int, endian: str) -> list[float]:
    if kind in (1, 2, 7):
        return [float(b) for b in raw]
    if kind in (3, 4, 9, 11, 12):
        fmt = {3: "H", 4: "I", 9: "i", 11: "f", 12: "d"}[kind]
        return [float(v) for v in struct.unpack(f"{endian}{items}{fmt}", raw)]
    fmt = "I" if kind == 5 else "i"
    values = struct.unpack(f"{endian}{2 * items}{fmt}", raw)
    return [values[i] / values[i + 1] if values[i + 1] else 0.0 for i in range(0, len(values), 2)]


def _text(value: list[float] | None) -> str | None:
    if not value:
        return None
    text = (
        bytes(int(v) for v in value if 0 <= v < 256)
        .split(b"\x00", 1)[0]
        .decode("ascii", "replace")
        .strip()
    )
    return text or None


def _dms(value: list[float]) -> float:
    parts = [*value, 0.0, 0.0][:3]
    return parts[0] + parts[1] / 60.0 + parts[2] / 3600.0
