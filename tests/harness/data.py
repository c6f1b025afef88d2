"""Input data for tests: small JPEG files and zips of them."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

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
