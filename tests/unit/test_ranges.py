"""``Range`` of single-file downloads (``downloads.parse_range``, RFC 9110 §14).

One range of bytes is served (clamped to the file); a range starting past the end is
unsatisfiable (416); anything else — several ranges, other units, bad syntax, non-ASCII digits,
an oversized header — is ignored, and the whole file sent. Served over HTTP (206, 416, GDAL's
``/vsicurl/``): tests/integration/test_stac.py.
"""

from __future__ import annotations

import pytest

from scaleodm.gateway.downloads import Unsatisfiable, parse_range

SIZE = 1000


@pytest.mark.parametrize(("header", "expected"), [
    ("bytes=0-99", (0, 99)),
    ("bytes=900-", (900, 999)),
    ("bytes=-100", (900, 999)),
    ("bytes=-5000", (0, 999)),
    ("bytes=990-5000", (990, 999)),
    ("bytes=999-999", (999, 999)),
    ("BYTES = 1-2", (1, 2)),
    ("bytes=0-1,5-6", None),
    ("items=0-1", None),
    ("bytes=5-2", None),
    ("bytes=-", None),
    ("bytes=", None),
    ("bytes=x-1", None),
    ("bytes=1", None),
    ("bytes=١-٢", None),  # Arabic-Indic digits: str.isdigit() says yes, HTTP says no
    ("bytes=+1-2", None),
    ("bytes=0-" + "9" * 300, None),  # too long for one range
])
def test_parse(header: str, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, SIZE) == expected


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_unsatisfiable(header: str) -> None:
    with pytest.raises(Unsatisfiable) as caught:
        parse_range(header, SIZE)
    assert caught.value.size == SIZE


def test_empty_file() -> None:
    with pytest.raises(Unsatisfiable):
        parse_range("bytes=-10", 0)
    with pytest.raises(Unsatisfiable):
        parse_range("bytes=0-", 0)
