"""``POST /task/new`` fuzzed with hostile text fields and file names, as real multipart requests to
one running gateway (no scheduler: nothing accepted runs or fetches anything).

Hypothesis builds ``name``, ``options`` (JSON from the option catalog, with hostile values: template
syntax, ``$``/dotted keys, nesting, huge and non-finite numbers, control characters),
``webhook``, ``outputs``, ``dateCreated``, ``skipPostProcessing``, ``zipurl`` (values that could
never be fetched here) and file names (any Unicode incl. NUL, separators, long). Invariants for
every request: HTTP 200 with either ``{"uuid"}`` or ``{"error": <bounded str>}``, never an internal
error; an accepted task's stored options are scalars of their declared type without ``{{``, its
webhook passes ``netguard.validate_url``, and S3 holds only valid file names, all under the task's
own prefix; a refused request leaves nothing in S3 and no task.

Left out: runs (no scheduler), chunked uploads (same validation code, attacked in
``test_input_attacks.py``), and the other routes.
"""

from __future__ import annotations

import json
import math
import unicodedata
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pymongo import AsyncMongoClient

from scaleodm.common import netguard
from scaleodm.common.domain import options as odm_options
from scaleodm.common.store.tasks import TaskStore
from tests.harness import data, servers
from tests.harness.stack import Stack
from tests.security.gateway_only import gateway_only, multipart_body, s3_keys

pytestmark = pytest.mark.integration

CATALOG = {spec.name: spec for spec in odm_options.load_catalog()}
MAX_ERROR_CHARS = 32 * 1024  # 80 options x a bounded message each, at most
WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"{p}{i}" for p in ("COM", "LPT")
                                                 for i in range(1, 10))}


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, mongo_url: str, s3: servers.S3Endpoint
) -> Iterator[Stack]:
    with gateway_only(tmp_path_factory.mktemp("fuzz"), mongo_url, s3) as stack:
        yield stack


@pytest.fixture(scope="module")
async def gw(gateway: Stack) -> AsyncIterator[tuple[httpx.AsyncClient, TaskStore]]:
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(gateway.mongo_url)
    async with httpx.AsyncClient(base_url=gateway.gateway_url, timeout=30) as client:
        yield client, TaskStore(mongo[gateway.database])
    await mongo.close()


# --------------------------------------------------------------------------------------------
# Strategies

HOSTILE_TEXT = st.sampled_from([
    "{{workflow.name}}", "{{=sprig.env('AWS_SECRET_ACCESS_KEY')}}", "$(id)", "${HOME}",
    "'; rm -rf / #", "\x00", "a\nb", "\u2028", "\ud7ff", "..", "$where", "a.b", "None", "",
    "Infinity", "-Infinity", "NaN", "1e400", "0x10", " 12 ", "true", "1",
])
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40), HOSTILE_TEXT,
)
KEYS = st.one_of(st.sampled_from(["$where", "$gt", "a.b", ".", "$", "\x00", ""]),
                 st.text(max_size=8))
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(KEYS, inner, max_size=3)),
    max_leaves=8,
)
OPTION = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(sorted(CATALOG)), st.text(max_size=10))},
    optional={"value": JSON_VALUES},
)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=True)


OPTION_LISTS = st.lists(OPTION, min_size=1, max_size=6).map(_dumps)
OPTIONS = st.one_of(
    OPTION_LISTS, OPTION_LISTS, OPTION_LISTS,  # mostly option lists: one_of picks evenly
    JSON_VALUES.map(_dumps),
    st.one_of(st.text(max_size=30), st.just("[" * 5000)),  # not JSON, nested too deep
)
URL_LIKE = st.sampled_from([
    "", " ", "abc", "http://[::1", "http://[::1]:99999/", "file:///etc/passwd",
    "gopher://127.0.0.1:70/_x", "javascript:alert(1)", "http://169.254.169.254/latest/",
    "http://10.0.0.1/h", "http://127.0.0.1:9/hook", "https://127.0.0.1/a?b=c#d",
    "http://a b/", "http://x/\x00", "http://:80/", "http://0/", "http://[::ffff:10.0.0.1]/",
    "http://h/" + "a" * 3000,
])
WEBHOOK = st.one_of(URL_LIKE, st.text(max_size=30))
ZIPURL = st.one_of(URL_LIKE, st.sampled_from([
    "http://127.0.0.1:1/a.zip", "s3://scaleodm/tasks/00000000-0000-4000-8000-000000000000/",
    "s3://scaleodm/", "s3://other-bucket/a.zip", "s3://x", "ftp://127.0.0.1/a.zip",
]), st.text(max_size=20))
OUTPUTS = st.one_of(st.lists(st.text(max_size=20), max_size=4).map(_dumps), st.text(max_size=20),
                    JSON_VALUES.map(_dumps))
DATE_CREATED = st.one_of(st.integers(min_value=-(2**70), max_value=2**70).map(str),
                         st.text(max_size=12), st.just("9" * 5000))
FILE_NAME = st.one_of(
    st.text(min_size=0, max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=300),
    st.sampled_from(["CON.jpg", "nul", "lpt1.tar.gz", "..", "...", " . ", "a\x00b.jpg",
                     "../../etc/passwd", "C:\\Windows\\x.jpg", "/abs/p.jpg", "body.json",
                     ".hidden.jpg", "a/", "DJI_0001.JPG"]),
)
GOOD_NAMES = st.from_regex(r"[A-Za-z0-9_]{1,12}\.(JPG|jpg|tif|txt)", fullmatch=True)
# Mostly good files, so that most requests get past the files to the text fields' checks.
NAMES = st.one_of(st.lists(GOOD_NAMES, min_size=1, max_size=2), st.lists(FILE_NAME, max_size=3))
FIELDS = st.fixed_dictionaries({}, optional={
    "name": st.text(max_size=50),
    "options": OPTIONS,
    "webhook": WEBHOOK,
    "outputs": OUTPUTS,
    "dateCreated": DATE_CREATED,
    "skipPostProcessing": st.one_of(st.sampled_from(["true", "false", "1"]), st.text(max_size=5)),
    "zipurl": ZIPURL,
})


# --------------------------------------------------------------------------------------------
# Invariants


def _valid_stored_name(name: str) -> bool:
    return (
        not any(unicodedata.category(c) == "Cc" for c in name)
        and 0 < len(name.encode("utf-8")) <= 255
        and name.strip(". ") != ""
        and name.split(".", 1)[0].rstrip(" ").upper() not in WINDOWS_DEVICES
        and "/" not in name and "\\" not in name
    )


def _of_declared_type(spec: odm_options.OptionSpec, value: Any) -> bool:
    if spec.type == "int":  # JavaScript numbers: beyond 64 bits an integral double
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if spec.type == "float":  # a JavaScript number: an integral one is held as an int
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
            value)
    if spec.type == "bool":
        return isinstance(value, bool)
    return isinstance(value, str)


def _as_js(option: dict[str, Any]) -> dict[str, Any]:
    """An option with a number as the double JavaScript holds (info shows doubles beyond int64
    in JavaScript's digits, which need not be the double's exact binary value)."""
    value = option["value"]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {**option, "value": float(value)}
    return option


async def _check_accepted(
    client: httpx.AsyncClient, store: TaskStore, gateway: Stack, task_id: str
) -> None:
    doc = await store.get_task(task_id)
    assert doc is not None
    for option in doc["options"]:
        assert set(option) == {"name", "value"}, option
        spec = CATALOG[option["name"]]
        assert _of_declared_type(spec, option["value"]), option
        assert "{{" not in str(option["value"]), option
    if doc["webhook"] is not None:
        netguard.validate_url(doc["webhook"])
    assert doc["outputs"] is None or all(isinstance(p, str) for p in doc["outputs"])
    info = (await client.get(f"/task/{task_id}/info")).json()
    assert info["uuid"] == task_id, info
    assert [_as_js(o) for o in info["options"]] == [_as_js(o) for o in doc["options"]], info
    for key in s3_keys(gateway, f"tasks/{task_id}/"):
        assert key.startswith(f"tasks/{task_id}/inputs/"), key
        assert _valid_stored_name(key.removeprefix(f"tasks/{task_id}/inputs/")), key


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(fields=FIELDS, names=NAMES, files_first=st.booleans())
async def test_task_new_invariants(
    gw: tuple[httpx.AsyncClient, TaskStore], gateway: Stack,
    fields: dict[str, str], names: list[str], files_first: bool,
) -> None:
    client, store = gw
    task_id = str(uuid.uuid4())
    text_parts = [(k, None, v.encode("utf-8", "surrogatepass")) for k, v in fields.items()]
    file_parts = [("images", n, data.JPEG[:16]) for n in names]
    body, ctype = multipart_body(file_parts + text_parts if files_first
                                 else text_parts + file_parts)
    resp = await client.post("/task/new", content=body,
                             headers={"content-type": ctype, "set-uuid": task_id})
    assert resp.status_code == 200, resp.text[:300]
    assert "application/json" in resp.headers["content-type"]
    answer = resp.json()
    if "uuid" in answer:
        event("accepted")
        assert answer == {"uuid": task_id}
        await _check_accepted(client, store, gateway, task_id)
        await client.post("/task/remove", data={"uuid": task_id})
        return
    assert set(answer) == {"error"}, answer
    assert isinstance(answer["error"], str) and 0 < len(answer["error"]) <= MAX_ERROR_CHARS
    event("refused: " + ("options" if answer["error"].startswith("[{") else
                         answer["error"].split(":", 1)[0]))
    assert not answer["error"].startswith("Internal error"), answer
    assert await store.get_task(task_id, include_removed=True) is None
    assert s3_keys(gateway, f"tasks/{task_id}/") == []
