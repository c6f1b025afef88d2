"""Tasks' STAC Items as the gateway serves them (``routes/stac.py``).

A completed run leaves ``stac.json`` beside its outputs (``scaleodm.run.results``); the gateway
reads it from S3 once per attempt and keeps it (an attempt's outputs never change; a restart is
a new attempt, so a new key): ``ItemCache`` holds the last ``ITEM_CACHE_ENTRIES`` Items read,
and remembers an attempt that has none. A task without one (not completed yet, skipPostProcessing,
a run that made no rasters, or one from before the results step) gets the bare Item built from
its document (``stac.build_item``: its name, its creation time, ``all.zip`` once completed).
Either way the asset hrefs become this gateway's download URLs (``stac.with_hrefs``): no href
points into the bucket, and a stored Item naming any other file loses that asset.

A stored Item larger than ``MAX_ITEM_BYTES``, or not an Item of the shape the run writes, is
logged and replaced by the bare one. The file is the run's, but the run's project may hold what
the user sent (a ``seed.zip`` extracts anywhere but images/; with ``skipPostProcessing`` the run
writes no Item and ships the one it finds): so the stored Item is rebuilt from the fields the
run writes, each of the type it writes (``_sanitized``: finite numbers, bounded strings, parsable
times), and anything else is dropped, links included. The cache is bounded in bytes too.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

from scaleodm.common import stac
from scaleodm.common.domain.status import TaskState
from scaleodm.common.logging import get_logger
from scaleodm.common.store import s3 as s3mod
from scaleodm.common.store.s3 import S3
from scaleodm.gateway.cached import BoundedLRU

log = get_logger(__name__)

ITEM_CACHE_ENTRIES = 2000  # a few KiB each
# What a search filters on (bbox and time, ~0.5 KiB each), kept for many more attempts than the
# Items: a search reads the Items of its answer's page only, and an attempt's footprint from S3
# once per process (until this many other attempts have been searched since).
FOOTPRINT_ENTRIES = 100_000
_FOOTPRINT_PROPERTIES = ("datetime", "start_datetime", "end_datetime")
ITEM_CACHE_BYTES = 32 * 1024 * 1024  # of the stored files the cached Items were read from
MAX_ITEM_BYTES = 64 * 1024  # the run's Items are a few KiB (a WKT2 CRS is the largest part)
MAX_TEXT = 16 * 1024  # longest string kept from a stored Item
_PROPERTIES = ("datetime", "start_datetime", "end_datetime", "title")
_ASSET_TEXT = ("href", "title", "type", "proj:code", "proj:wkt2")
_ASSET_NUMBERS = {"proj:shape": (2,), "proj:transform": (6, 9), "proj:bbox": (4,)}
Item = dict[str, Any]


class ItemCache:
    """Stored Items by (task, attempt), least recently used first out (None: has none); and
    their footprints, for searches (``footprint``)."""

    def __init__(self, entries: int = ITEM_CACHE_ENTRIES, max_bytes: int = ITEM_CACHE_BYTES,
                 footprint_entries: int = FOOTPRINT_ENTRIES) -> None:
        # Each Item costs the bytes it was read from.
        self._items: BoundedLRU[tuple[str, int], tuple[Item | None, int]] = BoundedLRU(
            max_bytes, lambda found: found[1], max_entries=entries)
        self._footprints: BoundedLRU[tuple[str, int], Item] = BoundedLRU(
            footprint_entries, lambda _: 1)

    async def item(self, s3: S3, doc: dict[str, Any]) -> Item:
        """Task ``doc``'s Item as stored by its run, else its bare Item (``bare_item``)."""
        stored = None
        if doc.get("state") == TaskState.COMPLETED.value:
            stored = await self.stored(s3, doc)
        return stored if stored is not None else bare_item(doc)

    async def footprint(self, s3: S3, doc: dict[str, Any]) -> Item:
        """The part of task ``doc``'s Item a search filters on: ``bbox`` (when it has one) and
        the time ``properties`` — what ``stac.intersects`` and ``stac.time_span`` read."""
        key = (str(doc["_id"]), int(doc["attempt"]))
        found = self._footprints.get(key)
        if found is not None:
            return found
        item = await self.item(s3, doc)
        found = {"properties": {k: item["properties"][k] for k in _FOOTPRINT_PROPERTIES
                                if k in item["properties"]}}
        if item.get("bbox") is not None:
            found["bbox"] = item["bbox"]
        self._footprints.put(key, found)
        return found

    async def stored(self, s3: S3, doc: dict[str, Any]) -> Item | None:
        key = (str(doc["_id"]), int(doc["attempt"]))
        cached = self._items.get(key)
        if cached is not None:
            return cached[0]
        item, size = await _read(s3, doc)
        self._items.put(key, (item, size))
        return item


async def _read(s3: S3, doc: dict[str, Any]) -> tuple[Item | None, int]:
    """The stored Item, sanitized (None: none, or not usable), and the bytes it was read from."""
    url = s3mod.parse_s3_url(doc["output_prefix"]).child(stac.ITEM_FILE)
    size = await s3.size(url)
    if size is None:
        return None, 0
    if size > MAX_ITEM_BYTES:
        log.warning("stored STAC Item ignored: too large", task_id=doc["_id"], bytes=size)
        return None, 0
    data = bytearray()
    async for chunk in s3.iter_object(url):
        data += chunk
        if len(data) > MAX_ITEM_BYTES:  # the object changed since its size was read
            log.warning("stored STAC Item ignored: too large", task_id=doc["_id"])
            return None, 0
    try:
        item = _sanitized(json.loads(data))
    # RecursionError: nested too deep; OverflowError: an integer beyond any float.
    except (ValueError, TypeError, AttributeError, RecursionError, OverflowError):
        item = None
    if item is None:
        log.warning("stored STAC Item ignored: not an Item", task_id=doc["_id"])
        return None, 0
    return item, len(data)


def _text(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise TypeError("not a string of the Item")
    return value


def _numbers(value: Any, lengths: tuple[int, ...]) -> list[float]:
    if not isinstance(value, list) or len(value) not in lengths or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value):
        raise TypeError("not the numbers of the Item")
    return list(value)


def _sanitized(raw: Any) -> Item | None:
    """The Item as the run writes it (``stac.build_item``), rebuilt from ``raw`` field by field;
    None when a field the run writes is of another shape. Unknown fields, links and assets
    other than the served downloads are dropped; the geometry is the bbox's polygon."""
    if not isinstance(raw, dict) or raw.get("type") != "Feature":
        return None
    props = raw.get("properties")
    if not isinstance(props, dict):
        return None
    properties = {k: _text(props[k]) for k in _PROPERTIES if props.get(k) is not None}
    if "datetime" not in properties and not (
            "start_datetime" in properties and "end_datetime" in properties):
        return None
    item: Item = {"type": "Feature", "stac_version": _text(raw.get("stac_version")),
                  "stac_extensions": [_text(e) for e in raw.get("stac_extensions") or []],
                  "id": "", "properties": {"datetime": None, **properties}}
    stac.time_span(item)  # ValueError: a time that does not parse
    bbox = raw.get("bbox")
    if bbox is None:
        item.update(geometry=None)
    else:
        item.update(bbox=_numbers(bbox, (4,)), geometry=stac.polygon(tuple(bbox)))
    item["links"] = []
    assets = raw.get("assets") or {}
    if not isinstance(assets, dict):
        return None
    kept = {}
    for key in (*stac.RASTERS, "archive"):
        asset = assets.get(key)
        if not isinstance(asset, dict):
            continue
        clean: dict[str, Any] = {k: _text(asset[k]) for k in _ASSET_TEXT
                                 if asset.get(k) is not None}
        roles = asset.get("roles") or []
        if not isinstance(roles, list):
            return None
        clean["roles"] = [_text(r) for r in roles]
        for name, lengths in _ASSET_NUMBERS.items():
            if asset.get(name) is not None:
                clean[name] = _numbers(asset[name], lengths)
        kept[key] = clean
    item["assets"] = kept
    return item


def bare_item(doc: dict[str, Any]) -> Item:
    """The Item of a task with no stored one: no geometry; ``all.zip`` once completed."""
    created = dt.datetime.fromtimestamp(int(doc["date_created_ms"]) / 1000, dt.UTC)
    return stac.build_item(str(doc["_id"]), title=str(doc.get("name", "")), start=created,
                           archive=doc.get("state") == TaskState.COMPLETED.value)


async def task_item(cache: ItemCache, s3: S3, doc: dict[str, Any], base_url: str) -> Item:
    """The Item of task ``doc`` with hrefs under ``base_url`` (the gateway's public root)."""
    item = dict(await cache.item(s3, doc))
    item["id"] = str(doc["_id"])  # whatever the file says, it describes this task
    task_url = f"{base_url.rstrip('/')}/task/{doc['_id']}"
    return stac.with_hrefs(item, task_url=task_url, self_url=f"{task_url}/stac")
