"""Numbers in task options read back as NodeODM shows them, through HTTP against the running
gateway (nodeodm-api §3.6 ``options``, §5.1 step 4).

What NodeODM 2.2.4 does (``libs/odmInfo.js``, ``filterOptions``; called by ``libs/taskNew.js`` for
``/task/new`` and init, and by the ``/task/restart`` route in ``index.js``): the ``options`` field
is JSON-parsed when it is a string (form data, or a JSON body carrying a string) and used as is
when it is already an array (a JSON body); each value then goes through ``Number.parseFloat`` for
a ``float`` option and ``Number.parseInt`` for an ``int`` option, and the result — a JavaScript
number — is what the task keeps and ``/task/{uuid}/info`` serializes. JavaScript has one number
type, so a float option given ``"7"``, ``7`` or ``7.0`` reads back ``7`` (never ``7.0``),
``"7.5"`` and ``7.5`` read back ``7.5``, ``"1e3"`` reads back ``1000``; an int option given
``"7.9"`` reads back ``7``. Form data and JSON give the same values. Creation and restart run the
same filter, so they agree too.

Covered: ``/task/new`` (multipart), ``/task/restart`` urlencoded (PyODM), JSON with the options as
an array, and JSON with the options as a string; each compared as JSON text with what NodeODM
answers, right after the request and again after the attempt was canceled (the stored document,
not only the answer built from the request).
Left out: the conversions themselves value by value (``tests/unit/test_options.py``) and the
chunked init/commit flow (it shares ``/task/new``'s validation: ``submission.accepted_options``).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.harness import api, data

pytestmark = pytest.mark.integration

# Float options given as a string, an integer, an integral float, a decimal string, a decimal and
# an exponent string; an int option given a decimal string.
SENT = (
    '[{"name":"crop","value":"7"},{"name":"pc-filter","value":7},'
    '{"name":"smrf-window","value":7.0},{"name":"dem-resolution","value":"7.5"},'
    '{"name":"gps-accuracy","value":7.5},{"name":"orthophoto-resolution","value":"1e3"},'
    '{"name":"mesh-size","value":"7.9"}]'
)
# NodeODM's info ``options`` for SENT: /options order, JS numbers, post-processing options added.
EXPECTED = (
    '[{"name":"mesh-size","value":7},{"name":"crop","value":7},{"name":"pc-filter","value":7},'
    '{"name":"smrf-window","value":7},{"name":"dem-resolution","value":7.5},'
    '{"name":"orthophoto-resolution","value":1000},{"name":"gps-accuracy","value":7.5},'
    '{"name":"pc-ept","value":true},{"name":"cog","value":true},{"name":"gltf","value":true}]'
)


def _options_text(info: dict[str, Any]) -> str:
    """The info's options as compact JSON text: ``7`` and ``7.0`` stay apart (``json`` keeps
    int and float apart both ways)."""
    return json.dumps(info["options"], separators=(",", ":"))


async def _cancel(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    resp = await client.post("/task/cancel", data={"uuid": task_id})
    assert resp.json() == {"success": True}, resp.text
    return await api.poll_until(client, task_id, api.status_is(50))


async def test_created_task_shows_numbers_as_given(client: httpx.AsyncClient) -> None:
    created = await api.create(client, files=[("DJI_0001.JPG", data.JPEG)], name="numbers",
                               options=SENT)
    task_id = created["uuid"]
    assert _options_text(await api.info(client, task_id)) == EXPECTED
    assert _options_text(await _cancel(client, task_id)) == EXPECTED


def _urlencoded(task_id: str) -> dict[str, Any]:
    return {"data": {"uuid": task_id, "options": SENT}}


def _json_array(task_id: str) -> dict[str, Any]:
    # json.loads keeps 7.0 a float, which httpx writes back as 7.0: the client's text
    return {"json": {"uuid": task_id, "options": json.loads(SENT)}}


def _json_string(task_id: str) -> dict[str, Any]:
    return {"json": {"uuid": task_id, "options": SENT}}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_urlencoded, id="urlencoded"),
        pytest.param(_json_array, id="json-array"),
        pytest.param(_json_string, id="json-string"),
    ],
)
async def test_restarted_task_shows_numbers_as_given(client: httpx.AsyncClient, body: Any) -> None:
    created = await api.create(client, files=[("DJI_0001.JPG", data.JPEG)], name="numbers")
    task_id = created["uuid"]
    await _cancel(client, task_id)

    resp = await client.post("/task/restart", **body(task_id))
    assert resp.json() == {"success": True}, resp.text
    restarted = await api.info(client, task_id)
    assert restarted["status"]["code"] in (10, 20), restarted
    assert _options_text(restarted) == EXPECTED
    assert _options_text(await _cancel(client, task_id)) == EXPECTED
