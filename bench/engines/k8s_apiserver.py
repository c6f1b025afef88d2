"""The Kubernetes API double (``tests/k8s/apiserver.py``) in a process of its own, for benches.

In the bench's process it would share the GIL with the client it measures; here it has its own.
No controller double runs: Workflows are created and stay as they are (no pods), so nothing else
competes for the CPU.

    python bench/engines/k8s_apiserver.py <kubeconfig path> [<namespace>]

Writes the kubeconfig, prints one JSON line ``{"url": ..., "kubeconfig": ...}``, then answers
one JSON line per command line on stdin:

* ``count <namespace>`` — Workflows created in the namespace;
* ``created <namespace>`` — ``[[name, created_at_epoch_s], ...]`` in creation order (taken in a
  store listener, i.e. when the create is applied, before the response is written);
* ``requests <namespace>`` — the workflow POSTs served: count, mean server time (ms), and the
  concurrency the client achieved: mean in flight (sum of request times / span) and max in flight;
* ``quit`` — stop.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402

from tests.k8s.apiserver import FakeApiServer, ResourceType, WatchEvent  # noqa: E402


class TimedApiServer(FakeApiServer):
    """The double, recording (namespace, start, end) of every workflow POST it serves."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.posts: list[tuple[str, float, float]] = []
        self.created: list[tuple[str, str, float]] = []  # (namespace, name, at)

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        start = time.time()
        response = await super()._middleware(request, handler)
        if request.method == "POST" and request.path.endswith("/workflows"):
            self.posts.append((request.match_info.get("namespace", ""), start, time.time()))
        return response

    def snapshot(self) -> tuple[list[tuple[str, str, float]], list[tuple[str, float, float]]]:
        """Copies of ``created`` and ``posts``, taken on the server loop (which appends)."""
        return self.call(lambda: (list(self.created), list(self.posts)))

    def on_change(self, rt: ResourceType, event: WatchEvent) -> None:
        if rt.plural == "workflows" and event.type == "ADDED":
            meta = event.obj["metadata"]
            self.created.append((meta["namespace"], meta["name"], time.time()))


def request_stats(posts: list[tuple[str, float, float]]) -> dict[str, float]:
    if not posts:
        return {"posts": 0}
    span = max(e for _, _, e in posts) - min(s for _, s, _ in posts)
    busy = sum(e - s for _, s, e in posts)
    edges = sorted([(s, 1) for _, s, _ in posts] + [(e, -1) for _, _, e in posts],
                   key=lambda x: (x[0], x[1]))
    inflight = peak = 0
    for _, step in edges:
        inflight += step
        peak = max(peak, inflight)
    return {"posts": len(posts), "server_ms_mean": busy / len(posts) * 1000,
            "inflight_mean": busy / span if span > 0 else 1.0, "inflight_max": peak,
            "span_s": span}


def answer(server: TimedApiServer, verb: str, namespace: str) -> Any:
    created, posts = server.snapshot()
    if verb == "count":
        return sum(1 for ns, _, _ in created if ns == namespace)
    if verb == "created":
        return [[n, t] for ns, n, t in created if ns == namespace]
    if verb == "requests":
        return request_stats([p for p in posts if p[0] == namespace])
    return {"error": f"unknown command {verb!r}"}


def main(argv: list[str]) -> int:
    kubeconfig = Path(argv[0])
    namespace = argv[1] if len(argv) > 1 else "default"
    server = TimedApiServer()
    server.start()
    try:
        server.call(server.store.add_listener, server.on_change)
        server.write_kubeconfig(kubeconfig, namespace)
        print(json.dumps({"url": server.url, "kubeconfig": str(kubeconfig)}), flush=True)  # noqa: T201
        for line in sys.stdin:
            verb, _, arg = line.strip().partition(" ")
            if verb == "quit":
                break
            print(json.dumps(answer(server, verb, arg)), flush=True)  # noqa: T201
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
