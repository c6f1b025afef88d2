"""The web console (``/``) in a real browser (Debian's Chromium through Playwright) against a real
stack with a token and the ODM test double.

Covered:
- serving: the page and its files with their content types, the security headers (CSP without
  inline script or eval, ``nosniff``, ``no-referrer``), ETag revalidation, a long cache for the
  vendored Leaflet, strict paths (traversal, hidden files, unknown types answer 404), no token
  needed for the page, and the console routes absent from the OpenAPI document;
- a task created through the page: 5 geotagged images chosen with the file chooser, upload
  progress and then the task's progress reaching 100 while the page stays loaded (a marker on
  ``window`` survives), ``all.zip`` downloaded from its link (HTTP 200, a zip);
- the map of a completed task with a DSM: tile requests answered 200, none outside the raster's
  bounds, the DSM layer toggled on, and the map not blank (pixels of the screenshot that are not
  the map's background colour);
- the task list following a task created elsewhere (``/events``) without a reload, and its
  filters by name and status;
- cancel, restart (options editor) and cancel again, then remove, from the task page (with the
  confirm dialog);
- a failed upload request: a refusal marked ``noRetry`` reported at once with its file names,
  then two HTTP 500 answers retried until the server accepts (requests intercepted);
- a bad option value refused with NodeODM's message shown verbatim, and marked at its field;
  the file given by drag-and-drop (a DataTransfer dropped on the drop zone);
- XSS: markup in a task name, an option value and an error message is shown as text, and no
  script of it runs (``window.__xss`` stays undefined);
- a wrong token refused with a clear error; the token never in a page URL, nor in local storage.
Every page test also checks that the page raised no script error and no CSP violation, and that
every visible control has an accessible name. Screenshots of every page go to the artifacts
folder (conftest).

Left out: the SSE fallback to polling (the stream refused), a retry that exhausts its four
attempts (7 s of back-off), restart with changed options, upload progress of large files (the
images here are tiny: progress is seen as a value, not as a moving bar), and browsers other than
Chromium.
"""

from __future__ import annotations

import base64
import json
import math
import re
import socket
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Response, Route

from tests.browser.conftest import TOKEN, Watched, geotagged_jpeg, write_images
from tests.harness.data import png_pixels
from tests.harness.stack import Stack

pytestmark = pytest.mark.integration

XSS_NAME = '<script>window.__xss=1</script><img src=x onerror="window.__xss=1">'
XSS_VALUE = '<img src=x onerror="window.__xss=1"><b>bold</b>'
MAP_BACKGROUND = (0xDF, 0xE4, 0xEA)  # --map-bg in app.css


# ------------------------------------------------------------------------------------ helpers


def login(w: Watched, stack: Stack, token: str = TOKEN) -> None:
    """Open the console (no token yet: the login page) and connect with ``token``."""
    w.page.goto(f"{stack.gateway_url}/")
    w.page.wait_for_selector("#token-input")
    w.page.fill("#token-input", token)
    w.page.click("#token-submit")
    w.page.wait_for_url(re.compile(r"#/tasks$"))
    w.page.wait_for_selector("#tasks-count:not(:empty)")


def shot(w: Watched, artifacts: Path, name: str, selector: str | None = None) -> bytes:
    path = artifacts / f"{name}.png"
    if selector is None:
        return w.page.screenshot(path=path, full_page=True)
    return w.page.locator(selector).screenshot(path=path)


def create_task(api: httpx.Client, folder: Path, count: int, *, name: str,
                options: list[dict[str, Any]] | None = None) -> str:
    files = [("images", (p.name, p.read_bytes(), "image/jpeg"))
             for p in write_images(folder, count)]
    resp = api.post("/task/new", files=files,
                    data={"name": name, "options": json.dumps(options or [])})
    body = resp.json()
    assert "uuid" in body, body
    return str(body["uuid"])


def wait_status(api: httpx.Client, task_id: str, code: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        info = api.get(f"/task/{task_id}/info").json()
        if info.get("status", {}).get("code") == code:
            return
        time.sleep(0.3)
    raise AssertionError(f"task {task_id} not at status {code}: {info}")


def open_task(w: Watched, stack: Stack, task_id: str) -> None:
    w.page.goto(f"{stack.gateway_url}/#/task/{task_id}")
    w.page.wait_for_selector("#task-status:not(:empty)")


def init_error(api: httpx.Client, options: list[dict[str, Any]]) -> str:
    """The server's own answer to these options at ``/task/new/init``."""
    body = api.post("/task/new/init", files={"options": (None, json.dumps(options))}).json()
    assert "error" in body, body
    return str(body["error"])


def drop_file(w: Watched, name: str, data: bytes) -> None:
    """Drop one file on the drop zone, as a drag from the desktop does."""
    w.page.evaluate(
        """({name, b64}) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: 'image/jpeg' }));
            const zone = document.querySelector('#dropzone');
            const init = { dataTransfer: dt, bubbles: true, cancelable: true };
            zone.dispatchEvent(new DragEvent('dragover', init));
            zone.dispatchEvent(new DragEvent('drop', init));
        }""",
        {"name": name, "b64": base64.b64encode(data).decode()},
    )


def rgb_pixels(png: bytes) -> list[tuple[int, int, int]]:
    """The RGB pixels of a PNG screenshot."""
    bands = png_pixels(png)
    red, green, blue = (bands[i].ravel().tolist() for i in range(3))
    return list(zip(red, green, blue, strict=True))


def raw_get(stack: Stack, raw_path: str) -> tuple[int, bytes]:
    """GET ``raw_path`` exactly as written (HTTP clients normalise ``..`` away)."""
    port = stack.ports["gateway"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {raw_path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     "Connection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def tile_bounds(z: int, x: int, y: int) -> tuple[float, float, float, float]:
    """A web-mercator tile's (west, south, east, north) in degrees."""
    def lat(row: int) -> float:
        return math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * row / 2**z))))

    return x / 2**z * 360 - 180, lat(y + 1), (x + 1) / 2**z * 360 - 180, lat(y)


# ----------------------------------------------------------------------------------- serving


@pytest.mark.parametrize(("path", "content_type", "cache"), [
    pytest.param("/", "text/html", "no-cache", id="page"),
    pytest.param("/console/app.js", "text/javascript", "no-cache", id="script"),
    pytest.param("/console/app.css", "text/css", "no-cache", id="styles"),
    pytest.param("/console/vendor/leaflet/leaflet.js?v=1.9.4", "text/javascript",
                 "public, max-age=31536000, immutable", id="leaflet"),
    pytest.param("/console/vendor/leaflet/images/layers.png", "image/png",
                 "public, max-age=31536000, immutable", id="leaflet-image"),
    pytest.param("/console/vendor/leaflet/LICENSE", "text/plain",
                 "public, max-age=31536000, immutable", id="leaflet-license"),
])
def test_files_served_with_types_and_headers(console_stack: Stack, path: str,
                                             content_type: str, cache: str) -> None:
    # No token: the console's files are not API routes (nodeodm-api §1.3).
    resp = httpx.get(console_stack.gateway_url + path, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith(content_type)
    assert resp.headers["cache-control"] == cache
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["referrer-policy"] == "no-referrer"
    csp = resp.headers["content-security-policy"]
    assert "script-src 'self';" in csp
    assert "style-src 'self';" in csp
    assert "img-src 'self' data: blob:;" in csp
    assert "connect-src 'self';" in csp
    assert "unsafe" not in csp
    again = httpx.get(console_stack.gateway_url + path, timeout=10,
                      headers={"If-None-Match": resp.headers["etag"]})
    assert again.status_code == 304
    assert not again.content


@pytest.mark.parametrize("raw_path", [
    pytest.param("/console/", id="folder"),
    pytest.param("/console/%2e%2e/main.py", id="encoded-traversal"),
    pytest.param("/console/..%2fmain.py", id="encoded-slash"),
    pytest.param("/console/vendor/../app.js", id="dot-dot-segment"),
    pytest.param("/console/.hidden", id="hidden-file"),
    pytest.param("/console/app.js/", id="trailing-slash"),
    pytest.param("/console/vendor//leaflet/leaflet.js", id="empty-segment"),
    pytest.param("/console/nothing.js", id="unknown-file"),
    pytest.param("/console/vendor/leaflet", id="a-folder"),
    pytest.param("/console/%00app.js", id="nul"),
    pytest.param("/index.html", id="page-elsewhere"),
])
def test_unsafe_or_unknown_paths_are_404(console_stack: Stack, raw_path: str) -> None:
    status, body = raw_get(console_stack, raw_path)
    assert status == 404, (raw_path, status, body[:200])
    assert b"Cannot GET" in body


def test_console_routes_not_in_openapi(console_stack: Stack) -> None:
    doc = httpx.get(console_stack.gateway_url + "/openapi.json", timeout=10).json()
    assert "/" not in doc["paths"]
    assert not [p for p in doc["paths"] if p.startswith("/console")]


# ------------------------------------------------------------------------------------- pages


def test_upload_through_page_live_progress_and_download(
    watched: Watched, console_stack: Stack, artifacts: Path, tmp_path: Path,
) -> None:
    w, page = watched, watched.page
    images = write_images(tmp_path / "images", 5)
    login(w, console_stack)
    page.click("nav >> text=New task")
    page.wait_for_selector("[data-option='dsm']", state="attached")
    # Every value the progress bars take, recorded by the page itself; and a marker that a
    # reload would lose.
    page.evaluate("""() => {
        window.__marker = 'kept';
        window.__values = { 'upload-progress': [], 'task-progress': [] };
        const record = () => {
            for (const id of Object.keys(window.__values)) {
                const el = document.getElementById(id);
                const list = window.__values[id];
                if (el && el.isConnected && list[list.length - 1] !== el.value) list.push(el.value);
            }
        };
        new MutationObserver(record).observe(document.body,
            { subtree: true, childList: true, attributes: true, attributeFilter: ['value'] });
    }""")
    page.set_input_files("#files", [str(p) for p in images])
    page.wait_for_selector("text=5 files")
    page.fill("#task-name", "Browser upload")
    page.click("summary >> text=Processing options")
    page.check("[data-option='dsm']")
    page.fill(".options-tools input[type=search]", "dsm")  # a short page for the screenshot
    shot(w, artifacts, "new-task")

    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"#/task/[0-9a-f-]{36}$"))
    task_id = page.url.rsplit("/", 1)[1]
    page.wait_for_selector("#task-console:not(:empty)")
    page.wait_for_function(
        "() => document.querySelector('#task-status')?.textContent === 'completed'",
        timeout=60_000)
    page.wait_for_function("() => document.querySelector('#task-progress')?.value === 100")

    values = page.evaluate("window.__values")
    assert values["upload-progress"][-1] == 100, values
    task_values = values["task-progress"]
    assert task_values[-1] == 100, values
    assert any(0 < v < 100 for v in task_values), f"no progress seen between 0 and 100: {values}"
    assert page.evaluate("window.__marker") == "kept"  # the same document all along
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    assert page.locator("#task-title").text_content() == "Browser upload"
    assert "ODM app finished" in (page.locator("#task-console").text_content() or "") or \
        int((page.locator("#console-lines").text_content() or "0").split()[0]) > 10
    page.wait_for_selector("#task-map img.leaflet-tile-loaded")  # dsm: a map, with a DSM layer
    shot(w, artifacts, "task")

    link = page.locator("#download-all")
    href = link.get_attribute("href")
    assert href is not None and href.startswith(f"/task/{task_id}/download/all.zip?token=")
    resp = page.request.get(console_stack.gateway_url + href)
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/zip"
    with page.expect_download() as download_info:
        link.click()
    saved = download_info.value.path()
    assert zipfile.is_zipfile(saved)
    with zipfile.ZipFile(saved) as archive:
        assert archive.namelist()

    page.click("nav >> text=Tasks")
    page.wait_for_selector(f"tr[data-uuid='{task_id}']")
    row = page.locator(f"tr[data-uuid='{task_id}']")
    assert row.locator(".badge").text_content() == "completed"
    page.fill("#filter-name", "no task has this name")
    assert row.is_hidden()
    page.fill("#filter-name", "browser UPLOAD")
    page.select_option("#filter-status", "40")
    assert row.is_visible()
    page.select_option("#filter-status", "50")
    assert row.is_hidden()
    page.select_option("#filter-status", "")
    page.fill("#filter-name", "")
    shot(w, artifacts, "tasks")
    page.set_viewport_size({"width": 390, "height": 844})
    shot(w, artifacts, "tasks-phone")
    w.assert_clean()


def test_task_list_updates_live(watched: Watched, console_stack: Stack, api: httpx.Client,
                                tmp_path: Path) -> None:
    w, page = watched, watched.page
    login(w, console_stack)
    page.evaluate("window.__marker = 'kept'")
    task_id = create_task(api, tmp_path / "images", 2, name="Appears live")
    row = page.locator(f"tr[data-uuid='{task_id}']")
    row.wait_for()
    page.wait_for_function(
        f"() => document.querySelector(\"tr[data-uuid='{task_id}'] .badge\")?.textContent "
        "=== 'completed'", timeout=60_000)
    assert row.locator("progress").get_attribute("value") == "100"
    assert page.evaluate("window.__marker") == "kept"
    w.assert_clean()


def test_map_shows_orthophoto_tiles(
    watched: Watched, console_stack: Stack, api: httpx.Client, artifacts: Path, tmp_path: Path,
) -> None:
    w, page = watched, watched.page
    task_id = create_task(api, tmp_path / "images", 5, name="Map task",
                          options=[{"name": "dsm", "value": True}])
    wait_status(api, task_id, 40)
    tiles: list[Response] = []
    page.on("response", lambda r: tiles.append(r) if "/tiles/" in r.url else None)
    login(w, console_stack)
    open_task(w, console_stack, task_id)
    page.wait_for_selector("#download-stac")  # the STAC Item was read
    note = page.locator("#map-section p.muted")
    assert page.locator("#map-section").is_visible(), note.text_content()
    page.wait_for_function("""() => {
        const tiles = [...document.querySelectorAll('#task-map img.leaflet-tile')];
        return tiles.length > 0 && tiles.every((t) => t.classList.contains('leaflet-tile-loaded'));
    }""")
    assert tiles, "no tile requested"
    assert all(r.status == 200 for r in tiles), [(r.url, r.status) for r in tiles]
    bounds = api.get(f"/task/{task_id}/tilejson.json", params={"layer": "orthophoto"}).json()
    west, south, east, north = bounds["bounds"]
    for r in tiles:
        z, x, y = (int(v) for v in re.findall(r"/tiles/(\d+)/(\d+)/(\d+)\.png", r.url)[0])
        assert z <= bounds["maxzoom"]
        tw, ts, te, tn = tile_bounds(z, x, y)
        assert tw <= east and te >= west and ts <= north and tn >= south, (r.url, bounds)

    # The controls are hidden for the pixel count (they are not the map); not the tiles.
    page.evaluate("document.querySelector('#task-map .leaflet-control-container')"
                  ".style.visibility = 'hidden'")
    png = shot(w, artifacts, "map-only", "#task-map")
    pixels = rgb_pixels(png)
    drawn = [p for p in pixels
             if sum(abs(a - b) for a, b in zip(p, MAP_BACKGROUND, strict=True)) > 30]
    assert len(drawn) > len(pixels) * 0.05, f"{len(drawn)} of {len(pixels)} pixels drawn"
    page.evaluate("document.querySelector('#task-map .leaflet-control-container')"
                  ".style.visibility = ''")

    with page.expect_response(lambda r: "/tiles/" in r.url and "layer=dsm" in r.url) as dsm:
        page.check(".leaflet-control-layers-overlays input >> nth=1")
    assert dsm.value.status == 200
    page.locator("#map-section").scroll_into_view_if_needed()
    shot(w, artifacts, "map", "#map-section")
    assert page.locator("#download-orthophoto").count() == 1
    assert page.locator("#download-dsm").count() == 1
    shot(w, artifacts, "task-completed")
    w.assert_clean()


def test_cancel_and_remove_from_task_page(
    watched: Watched, console_stack: Stack, api: httpx.Client, artifacts: Path, tmp_path: Path,
) -> None:
    w, page = watched, watched.page
    task_id = create_task(api, tmp_path / "images", 40, name="To be canceled")  # ~13 s of run
    login(w, console_stack)
    open_task(w, console_stack, task_id)
    assert page.locator("#task-status").text_content() in ("queued", "running")
    page.click("#task-cancel")
    page.wait_for_function(
        "() => document.querySelector('#task-status')?.textContent === 'canceled'")
    assert api.get(f"/task/{task_id}/info").json()["status"]["code"] == 50
    assert page.locator("#task-cancel").is_disabled()
    shot(w, artifacts, "task-canceled")

    # Restart (the options editor starts from the task's options), then cancel again.
    page.click("#task-restart")
    page.click("#restart-go")
    page.wait_for_function(
        "() => ['queued', 'running'].includes(document.querySelector('#task-status')?.textContent)")
    page.wait_for_selector("#notice >> text=Task restarted.")
    assert api.get(f"/task/{task_id}/info").json()["status"]["code"] in (10, 20)
    page.wait_for_selector("#task-cancel:enabled")
    page.click("#task-cancel")
    page.wait_for_function(
        "() => document.querySelector('#task-status')?.textContent === 'canceled'")

    dialogs: list[str] = []

    def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.once("dialog", accept)
    page.click("#task-remove")
    page.wait_for_url(re.compile(r"#/tasks$"))
    assert dialogs and "To be canceled" in dialogs[0]
    page.wait_for_selector("#notice >> text=Task removed.")
    assert api.get(f"/task/{task_id}/info").json() == {"error": f"{task_id} not found"}
    page.wait_for_selector("#tasks-count:not(:empty)")
    assert page.locator(f"tr[data-uuid='{task_id}']").count() == 0
    w.assert_clean()


def test_failed_upload_retried_then_reported(
    watched: Watched, console_stack: Stack, artifacts: Path, tmp_path: Path,
) -> None:
    w, page = watched, watched.page
    images = write_images(tmp_path / "images", 1)
    login(w, console_stack)
    page.goto(f"{console_stack.gateway_url}/#/new")
    page.wait_for_selector("#files", state="attached")

    # A request refused for good (NodeODM's noRetry): reported at once, with its files.
    refused: list[str] = []

    def refuse(route: Route) -> None:
        refused.append(route.request.url)
        route.fulfill(status=200, content_type="application/json",
                      body='{"error": "Refused by the test", "noRetry": true}')

    page.route("**/task/new/upload/**", refuse)
    page.set_input_files("#files", [str(p) for p in images])
    page.fill("#task-name", "Retried upload")
    page.click("button[type=submit]")
    banner = page.locator("#banner")
    banner.wait_for()
    text = banner.text_content() or ""
    assert "Upload failed for 1 file; the task was not started." in text
    assert "Files: DJI_0001.JPG" in text
    assert "Error: Refused by the test (1 attempt)" in text
    assert len(refused) == 1
    shot(w, artifacts, "upload-failed")
    page.unroute("**/task/new/upload/**")

    # Then two failures of the server (HTTP 500) before it accepts: retried, then created.
    calls: list[int] = []

    def flaky(route: Route) -> None:
        calls.append(1)
        if len(calls) <= 2:
            route.fulfill(status=500, body="")
        else:
            route.continue_()

    page.route("**/task/new/upload/**", flaky)
    page.click("#upload-retry")
    page.wait_for_url(re.compile(r"#/task/[0-9a-f-]{36}$"), timeout=30_000)
    assert len(calls) == 3
    page.wait_for_function("() => document.querySelector('#task-title')?.textContent "
                           "=== 'Retried upload'")
    w.assert_clean()


def test_bad_option_value_shows_nodeodm_message(
    watched: Watched, console_stack: Stack, api: httpx.Client, artifacts: Path,
) -> None:
    w, page = watched, watched.page
    login(w, console_stack)
    page.goto(f"{console_stack.gateway_url}/#/new")
    page.wait_for_selector("[data-option='orthophoto-resolution']", state="attached")
    drop_file(w, "DJI_0001.JPG", geotagged_jpeg(0))
    page.wait_for_selector(".file-list >> text=DJI_0001.JPG")
    page.click("summary >> text=Processing options")
    page.fill("[data-option='orthophoto-resolution']", "-5")
    page.click("button[type=submit]")
    banner = page.locator("#banner strong")
    banner.wait_for()
    expected = init_error(api, [{"name": "orthophoto-resolution", "value": "-5"}])
    assert "Invalid value -5 (out of range)" in expected
    assert banner.text_content() == expected  # verbatim, as the server answered it
    field_error = page.locator(".option[data-name='orthophoto-resolution'] .field-error")
    assert field_error.text_content() == "Invalid value -5 (out of range)"
    assert page.locator("[data-option='orthophoto-resolution']").get_attribute(
        "aria-invalid") == "true"
    assert page.url.endswith("#/new")  # nothing was created
    shot(w, artifacts, "bad-option")
    w.assert_clean()


def test_markup_is_shown_as_text(
    watched: Watched, console_stack: Stack, api: httpx.Client, artifacts: Path, tmp_path: Path,
) -> None:
    w, page = watched, watched.page
    login(w, console_stack)
    page.goto(f"{console_stack.gateway_url}/#/new")
    page.wait_for_selector("[data-option='primary-band']", state="attached")
    page.set_input_files("#files", [str(p) for p in write_images(tmp_path / "images", 1)])
    page.fill("#task-name", XSS_NAME)
    page.click("summary >> text=Processing options")
    page.fill("[data-option='primary-band']", XSS_VALUE)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"#/task/[0-9a-f-]{36}$"))
    task_id = page.url.rsplit("/", 1)[1]
    title = page.locator("#task-title")
    title.wait_for()
    page.wait_for_function(
        f"() => document.querySelector('#task-title')?.textContent === {json.dumps(XSS_NAME)}")
    assert title.evaluate("el => el.children.length") == 0
    assert XSS_VALUE in (page.locator(".options-shown").text_content() or "")
    assert api.get(f"/task/{task_id}/info").json()["name"] == XSS_NAME
    shot(w, artifacts, "xss-task")

    page.click("nav >> text=Tasks")
    link = page.locator(f"tr[data-uuid='{task_id}'] .task-link")
    link.wait_for()
    assert link.text_content() == XSS_NAME

    # An error message carrying markup (the server echoes the bad value).
    page.click("nav >> text=New task")
    page.wait_for_selector("[data-option='min-num-features']", state="attached")
    page.set_input_files("#files", [str(p) for p in write_images(tmp_path / "more", 1)])
    page.click("summary >> text=Processing options")
    page.fill("[data-option='min-num-features']", XSS_VALUE)
    page.click("button[type=submit]")
    banner = page.locator("#banner strong")
    banner.wait_for()
    assert banner.text_content() == init_error(
        api, [{"name": "min-num-features", "value": XSS_VALUE}])
    page.wait_for_timeout(500)  # an injected <img onerror> would have fired by now
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.locator("img[src='x'], b:text('bold')").count() == 0
    shot(w, artifacts, "xss-error")
    w.assert_clean()


def test_wrong_token_refused_and_token_never_in_urls(
    watched: Watched, console_stack: Stack, artifacts: Path,
) -> None:
    w, page = watched, watched.page
    page.goto(f"{console_stack.gateway_url}/")
    page.wait_for_selector("#token-input")  # no token: the login page
    assert page.url.endswith("#/login")
    shot(w, artifacts, "login")
    wrong = "wrong-token-4f9c0e1a8b7d"
    page.fill("#token-input", wrong)
    page.click("#token-submit")
    banner = page.locator("#banner")
    banner.wait_for()
    text = banner.text_content() or ""
    assert "This token was refused by the server." in text
    assert "Invalid authentication token: token does not match." in text
    assert page.url.endswith("#/login")
    assert page.locator("#node-status").text_content() == "not connected"
    shot(w, artifacts, "login-refused")

    page.fill("#token-input", TOKEN)
    page.click("#token-submit")
    page.wait_for_url(re.compile(r"#/tasks$"))
    assert banner.is_hidden()
    page.click("nav >> text=New task")
    page.wait_for_selector("#files", state="attached")
    page.click("nav >> text=Tasks")
    page.wait_for_selector("#tasks-count:not(:empty)")

    assert w.urls
    for url in [*w.urls, page.url]:
        assert TOKEN not in url and wrong not in url, url
    assert page.evaluate("sessionStorage.getItem('scaleodm.console.token')") == TOKEN
    assert page.evaluate("localStorage.length") == 0
    assert not [line for line in w.console if TOKEN in line or wrong in line]
    w.assert_clean()
