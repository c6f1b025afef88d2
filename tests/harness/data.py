"""Input data for tests: small JPEG files and zips of them."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path
from typing import Any

# A tiny JPEG-shaped payload (SOI ... EOI); the ODM test double only needs image files.
JPEG = (
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    + b"\x00" * 64
    + b"\xff\xd9"
)


def image_names(n: int) -> list[str]:
    return [f"DJI_{i:04d}.JPG" for i in range(1, n + 1)]


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def images_zip(n: int, *, nested: bool = True, extra: dict[str, bytes] | None = None) -> bytes:
    files = {(f"flight/{name}" if nested else name): JPEG for name in image_names(n)}
    files.update(extra or {})
    return zip_bytes(files)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# Geotagged JPEGs for the ODM test double (it reads EXIF GPS; pixels are never decoded).
def jpeg(width: int, height: int, exif: bytes | None = None) -> bytes:
    """A header-only JPEG: SOI, optional APP1/Exif, SOF0 with the pixel size, EOI."""
    out = b"\xff\xd8"
    if exif is not None:
        body = b"Exif\x00\x00" + exif
        out += b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return out + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def exif_block(make: str, model: str, lat: float, lon: float, alt: float) -> bytes:
    """A big-endian TIFF block with Make, Model and a GPS IFD (N/E, altitude above sea level)."""

    def rationals(*values: float) -> bytes:
        return b"".join(struct.pack(">II", round(v * 1000), 1000) for v in values)

    def dms(value: float) -> bytes:
        degrees = int(value)
        minutes = int((value - degrees) * 60)
        seconds = (value - degrees - minutes / 60) * 3600
        return rationals(degrees, minutes, seconds)

    make_b, model_b = make.encode() + b"\x00", model.encode() + b"\x00"
    ifd0_at, gps_at = 8, 8 + 2 + 3 * 12 + 4
    data_at = gps_at + 2 + 5 * 12 + 4
    blobs = [make_b, model_b, dms(lat), dms(lon), rationals(alt)]
    offsets = []
    cursor = data_at
    for blob in blobs:
        offsets.append(cursor)
        cursor += len(blob)
    ifd0 = struct.pack(">H", 3)
    for tag, text, offset in ((271, make_b, offsets[0]), (272, model_b, offsets[1])):
        # TIFF stores values of up to four bytes inside the entry itself
        where = text.ljust(4, b"\x00") if len(text) <= 4 else struct.pack(">I", offset)
        ifd0 += struct.pack(">HHI4s", tag, 2, len(text), where)
    ifd0 += struct.pack(">HHII", 34853, 4, 1, gps_at) + struct.pack(">I", 0)
    gps = struct.pack(">H", 5)
    gps += struct.pack(">HHI4s", 1, 2, 2, b"N\x00\x00\x00")
    gps += struct.pack(">HHII", 2, 5, 3, offsets[2])
    gps += struct.pack(">HHI4s", 3, 2, 2, b"E\x00\x00\x00")
    gps += struct.pack(">HHII", 4, 5, 3, offsets[3])
    gps += struct.pack(">HHII", 6, 5, 1, offsets[4]) + struct.pack(">I", 0)
    return b"MM\x00*" + struct.pack(">I", ifd0_at) + ifd0 + gps + b"".join(blobs)


def png_pixels(png: bytes) -> Any:
    """A PNG's bands as a (bands, rows, columns) array, decoded by rasterio's PNG driver (no
    Pillow here); fails unless the bytes are a PNG."""
    import warnings  # noqa: PLC0415 - rasterio only for the tests that decode images

    from rasterio.errors import NotGeoreferencedWarning  # noqa: PLC0415
    from rasterio.io import MemoryFile  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(png) as memfile, memfile.open() as image:
            assert image.driver == "PNG"
            return image.read()
