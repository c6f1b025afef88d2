"""Tasks' STAC Items as the gateway serves them (``routes/stac.py``).

A completed run leaves ``stac.json`` beside its outputs (``scaleodm.run.results``); the gateway
reads it from S3 once per attempt and keeps it (an attempt's outputs never change; a restart is
a new attempt, so a new key): ``ItemCache`` holds the last ``ITEM_CACHE_ENTRIES`` Items read,
and remembers an attempt that has none. A task without one (not completed yet, skipPostProcessing,
a run that made no rasters, or one from before the results step) gets the bare Item built from
its document (``stac.build_item``: its name, its creation time, ``all.zip`` once completed).
Either way the asset hrefs become this gateway's download URLs (``stac.with_hrefs``): no href
points into the bucket, and a stored Item naming any other file loses that asset.

A stored Item larger than ``MAX_ITEM_BYTES``, or not a JSON object, is logged and replaced by
the bare one: the file is the run's, but nothing read from storage is trusted to be small.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
from typing import Any

from scaleodm.common import stac
from scaleodm.common.domain.status import TaskState
from scaleodm.common.logging import get_logger
from scaleodm.common.store import s3 as s3mod
from scaleodm.common.store.s3 import S3

log = get_logger(__name__)

ITEM_CACHE_ENTRIES = 2000  # a few KiB each
MAX_ITEM_BYTES = 1024 * 1024
Item = dict[str, Any]


class ItemCache:
    """Stored Items by (task, attempt), least recently used first out; None = has none."""

    def __init__(self, entries: int = ITEM_CACHE_ENTRIES) -> None:
        self._entries = entries
        self._items: collections.OrderedDict[tuple[str, int], Item | None] = (
            collections.OrderedDict())

    async def stored(self, s3: S3, doc: dict[str, Any]) -> Item | None:
        key = (str(doc["_id"]), int(doc["attempt"]))
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        item = await _read(s3, doc)
        self._items[key] = item
        while len(self._items) > self._entries:
            self._items.popitem(last=False)
        return item


async def _read(s3: S3, doc: dict[str, Any]) -> Item | None:
    prefix = s3mod.parse_s3_url(doc["output_prefix"])
    base = prefix.key if prefix.key.endswith("/") else prefix.key + "/"
    url = s3mod.S3Url(prefix.bucket, base + stac.ITEM_FILE)
    size = await s3.size(url)
    if size is None:
        return None
    if size > MAX_ITEM_BYTES:
        log.warning("stored STAC Item ignored: too large", task_id=doc["_id"], bytes=size)
        return None
    data = b"".join([chunk async for chunk in s3.iter_object(url)])
    try:
        item = json.loads(data)
    except ValueError:
        item = None
    if not isinstance(item, dict) or item.get("type") != "Feature":
        log.warning("stored STAC Item ignored: not an Item", task_id=doc["_id"])
        return None
    return item


def bare_item(doc: dict[str, Any]) -> Item:
    """The Item of a task with no stored one: no geometry; ``all.zip`` once completed."""
    created = dt.datetime.fromtimestamp(int(doc["date_created_ms"]) / 1000, dt.UTC)
    return stac.build_item(str(doc["_id"]), title=str(doc.get("name", "")), start=created,
                           archive=doc.get("state") == TaskState.COMPLETED.value)


async def task_item(cache: ItemCache, s3: S3, doc: dict[str, Any], base_url: str) -> Item:
    """The Item of task ``doc`` with hrefs under ``base_url`` (the gateway's public root)."""
    stored = None
    if doc.get("state") == TaskState.COMPLETED.value:
        stored = await cache.stored(s3, doc)
    item = dict(stored) if stored is not None else bare_item(doc)
    item["id"] = str(doc["_id"])  # whatever the file says, it describes this task
    task_url = f"{base_url.rstrip('/')}/task/{doc['_id']}"
    return stac.with_hrefs(item, task_url=task_url, self_url=f"{task_url}/stac")
