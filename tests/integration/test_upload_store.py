"""``store.uploads.UploadStore``'s counts, on every wire server: what commit reads in one document.

Covered: a session counts the files stored while it is open (count and bytes) and the names in
flight, following claims, renames, stores and both kinds of release (a file never stored, a stored
file deleted again); commit flips the session once and returns those counts, which match the stored
names; a file claimed or recorded after the commit is counted nowhere; ``delete`` with the
committed session and nothing in flight removes every record, and with a name in flight keeps that
one as an orphan; a session opened without counters (an older gateway) is counted from its names;
``unreserve`` frees a held id and leaves an open upload alone; an upload is its tenant's only
(re-init, the open-upload lookup and commit by another tenant find nothing; a session from before
tenants is ``default``'s).

Left out: the retention sweep (``test_retention.py``) and the HTTP routes
(``tests/conformance``).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from scaleodm.common import clock
from scaleodm.common.store.uploads import UploadNotFoundError, UploadStore

pytestmark = pytest.mark.integration


def _rename(name: str) -> str:
    return f"_{name}"


@pytest.fixture
async def uploads(wire_db: Any) -> UploadStore:
    store = UploadStore(wire_db)
    await store.ensure_indexes()
    return store


async def _counts(uploads: UploadStore, upload_id: str) -> tuple[int, int, int]:
    doc = await uploads.get(upload_id)
    assert doc is not None
    return doc["stored_count"], doc["stored_bytes"], doc["in_flight"]


async def test_the_session_counts_what_is_stored_and_commit_returns_it(
    uploads: UploadStore,
) -> None:
    upload_id = str(uuid.uuid4())
    await uploads.init(upload_id, {"name": "u"}, "alice")
    names = [await uploads.claim_name(upload_id, n, _rename)
             for n in ("a.jpg", "a.jpg", "b.jpg", "c.jpg")]
    assert names == ["a.jpg", "_a.jpg", "b.jpg", "c.jpg"]
    assert await _counts(uploads, upload_id) == (0, 0, 4)
    for name, size in (("a.jpg", 10), ("_a.jpg", 20), ("b.jpg", 30)):
        await uploads.mark_stored(upload_id, name, size)
    assert await _counts(uploads, upload_id) == (3, 60, 1)
    await uploads.release_name(upload_id, "c.jpg")  # never stored (its request failed)
    await uploads.release_name(upload_id, "b.jpg", stored_size=30)  # stored, then deleted
    await uploads.init(upload_id, {"name": "again"}, "alice")  # a re-init keeps files and counts
    assert await _counts(uploads, upload_id) == (2, 30, 0)

    session = await uploads.commit(upload_id, "alice")
    assert session is not None and session["committed"]
    assert (session["stored_count"], session["stored_bytes"], session["in_flight"]) == (2, 30, 0)
    assert await uploads.stored_count(session) == 2 == len(await uploads.stored_names(upload_id))
    assert await uploads.commit(upload_id, "alice") is None  # once

    await uploads.delete(upload_id, session)
    assert await uploads.get(upload_id) is None
    assert await uploads.files.count_documents({"upload_id": upload_id}) == 0


async def test_a_file_recorded_after_the_commit_is_not_counted_and_stays_an_orphan(
    uploads: UploadStore,
) -> None:
    upload_id = str(uuid.uuid4())
    await uploads.init(upload_id, {}, "alice")
    await uploads.claim_name(upload_id, "done.jpg", _rename)
    await uploads.mark_stored(upload_id, "done.jpg", 5)
    await uploads.claim_name(upload_id, "late.jpg", _rename)  # its bytes still arriving
    session = await uploads.commit(upload_id, "alice")
    assert session is not None and session["in_flight"] == 1
    await uploads.claim_name(upload_id, "later.jpg", _rename)  # after the commit: an orphan
    await uploads.mark_stored(upload_id, "later.jpg", 9)
    assert await _counts(uploads, upload_id) == (1, 5, 1)
    assert await uploads.stored_count(session) == 1

    await uploads.delete(upload_id, session)  # a name in flight: marked, kept
    await uploads.mark_stored(upload_id, "late.jpg", 7)  # lands after the upload is gone
    left = await uploads.files.find({"upload_id": upload_id}).sort("name").to_list(None)
    assert [(d["name"], d["orphan_at_ms"] is not None) for d in left] == [
        ("late.jpg", True), ("later.jpg", True)]


async def test_a_session_without_counters_is_counted_from_its_names(
    uploads: UploadStore,
) -> None:
    upload_id = str(uuid.uuid4())
    await uploads.sessions.insert_one({  # as an older gateway opened it
        "_id": upload_id, "fields": {}, "committed": False, "created_at": clock.now(),
        "active_at_ms": clock.now_ms()})
    for name in ("a.jpg", "b.jpg"):
        await uploads.claim_name(upload_id, name, _rename)
    await uploads.mark_stored(upload_id, "a.jpg", 1)
    assert await uploads.commit(upload_id, "alice") is None  # an older session is default's
    session = await uploads.commit(upload_id, "default")
    assert session is not None
    assert await uploads.stored_count(session) == 1
    await uploads.delete(upload_id, session)  # no counters: names in flight are looked for
    left = await uploads.files.find({"upload_id": upload_id}).to_list(None)
    assert [d["name"] for d in left] == ["b.jpg"] and left[0]["orphan_at_ms"] is not None


async def test_unreserve_frees_a_held_id_only(uploads: UploadStore) -> None:
    held, open_id = str(uuid.uuid4()), str(uuid.uuid4())
    assert await uploads.reserve(held)
    assert not await uploads.reserve(held)
    await uploads.unreserve(held)
    assert await uploads.get(held) is None
    assert await uploads.reserve(held)

    await uploads.init(open_id, {}, "alice")
    await uploads.unreserve(open_id)
    assert await uploads.get_open(open_id, "alice")


async def test_an_upload_is_its_tenants_only(uploads: UploadStore) -> None:
    """Re-init, a look for the open upload and commit match the tenant in the same query: to
    another tenant the upload is none."""
    upload_id = str(uuid.uuid4())
    await uploads.init(upload_id, {"name": "a"}, "alice")
    with pytest.raises(UploadNotFoundError):
        await uploads.init(upload_id, {"name": "b"}, "bob")
    with pytest.raises(UploadNotFoundError):
        await uploads.get_open(upload_id, "bob")
    assert await uploads.commit(upload_id, "bob") is None
    session = await uploads.get_open(upload_id, "alice")
    assert (session["fields"], session["tenant"], session["committed"]) == (
        {"name": "a"}, "alice", False)
    assert await uploads.commit(upload_id, "alice") is not None
