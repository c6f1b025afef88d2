"""A loopback HTTP server for tests: serves files (zipurl inputs) and records webhook POSTs.

Behaviour per path can be scripted: ``fail_times(path, n, status)`` answers ``status`` to the
first ``n`` POSTs on ``path``, then 200; ``script(path, *actions)`` queues any mix of statuses,
``"hang"`` (never answers until the fixture stops) and ``"close"`` (drops the connection
without an answer); ``script(path, "hang", forever=True)`` repeats its last action.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class HttpFixture:
    root: Path
    received: list[Received] = field(default_factory=list)
    failures: dict[str, list[int | str]] = field(default_factory=dict)
    forever: dict[str, int | str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)
    server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def fail_times(self, path: str, n: int, status: int = 500) -> None:
        with self.lock:
            self.failures[path] = [status] * n
            self.forever.pop(path, None)

    def script(self, path: str, *actions: int | str, forever: bool = False) -> None:
        with self.lock:
            self.failures[path] = list(actions)
            if forever:
                self.forever[path] = actions[-1]
            else:
                self.forever.pop(path, None)

    def posts(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def wait_posts(self, path: str, count: int = 1, timeout_s: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.posts(path)
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise TimeoutError(f"{count} POST(s) to {path} not received; got {len(self.posts(path))}")

    def start(self) -> None:
        fixture = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                target = (fixture.root / self.path.lstrip("/").split("?")[0]).resolve()
                if not target.is_relative_to(fixture.root.resolve()) or not target.is_file():
                    self.send_error(404)
                    return
                data = target.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                path = self.path.split("?")[0]
                with fixture.lock:
                    fixture.received.append(
                        Received(path, dict(self.headers.items()), body, time.time())
                    )
                    queue = fixture.failures.get(path) or []
                    action = queue.pop(0) if queue else fixture.forever.get(path, 200)
                if action == "hang":
                    fixture.release.wait(60)
                    return
                if action == "close":
                    self.close_connection = True
                    return
                self.send_response(int(action))
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
