"""The gateway's cache of stored STAC Items and their footprints (``gateway/stacitems.py``).

A search filters every completed task on its footprint (bbox, time) and reads only its page's
Items: footprints outlive the Items in the cache, so searching many more tasks than the Item
cache holds reads each stored Item from S3 once, not once per search. S3 is a counting fake
(the real one: tests/integration/test_stac.py).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

from scaleodm.common import stac
from scaleodm.common.domain.status import TaskState
from scaleodm.gateway import stacitems


class CountingS3:
    """``size`` and ``iter_object`` of the S3 facade: task n's Item has bbox (n, 0, n+1, 1)."""

    def __init__(self) -> None:
        self.reads = 0

    def _body(self, url: Any) -> bytes:
        n = int(url.key.split("/")[-2])
        raster = stac.Raster(key="orthophoto", cog=True, bbox=(n, 0, n + 1, 1), shape=(1, 1),
                             transform=(1, 0, 0, 0, -1, 0), native_bbox=(n, 0, n + 1, 1),
                             code="EPSG:4326", wkt2=None)
        item = stac.build_item("x", title="t", start=dt.datetime(2026, 5, n + 1, tzinfo=dt.UTC),
                               rasters=[raster])
        return json.dumps(item).encode()

    async def size(self, url: Any) -> int:
        return len(self._body(url))

    async def iter_object(self, url: Any, chunk: int = 65536) -> AsyncIterator[bytes]:
        self.reads += 1
        yield self._body(url)


def _doc(n: int, attempt: int = 1) -> dict[str, Any]:
    return {"_id": f"00000000-0000-4000-8000-{n:012d}", "attempt": attempt,
            "state": TaskState.COMPLETED.value, "name": f"t{n}",
            "date_created_ms": 1_700_000_000_000, "output_prefix": f"s3://bucket/tasks/{n}/"}


async def test_footprints_outlive_the_items() -> None:
    s3 = CountingS3()
    cache = stacitems.ItemCache(entries=2)
    docs = [_doc(n) for n in range(10)]
    first = [await cache.footprint(s3, d) for d in docs]  # type: ignore[arg-type]
    assert s3.reads == 10
    assert [f["bbox"] for f in first] == [[n, 0, n + 1, 1] for n in range(10)]
    assert stac.time_span(first[3])[0] == dt.datetime(2026, 5, 4, tzinfo=dt.UTC)

    again = [await cache.footprint(s3, d) for d in docs]  # type: ignore[arg-type]
    assert again == first and s3.reads == 10  # only 2 Items are cached, every footprint is

    await stacitems.task_item(cache, s3, docs[0], "http://gw/")  # type: ignore[arg-type]
    assert s3.reads == 11  # an Item evicted is read again for a page

    await cache.footprint(s3, _doc(3, attempt=2))  # type: ignore[arg-type]
    assert s3.reads == 12  # a new attempt is new outputs


async def test_footprints_are_bounded() -> None:
    s3 = CountingS3()
    cache = stacitems.ItemCache(entries=1, footprint_entries=3)
    for n in range(5):
        await cache.footprint(s3, _doc(n))  # type: ignore[arg-type]
    await cache.footprint(s3, _doc(0))  # type: ignore[arg-type]
    assert s3.reads == 6  # the oldest footprints were dropped
