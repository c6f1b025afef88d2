"""The Prometheus harness (tests/harness/prometheus.py) itself: a real ``prometheus`` scrapes a
prometheus_client HTTP server of this process and answers queries about it; the configured
jobs are what ``up`` reports.

Left out: the services' own metrics (their tests), alert evaluation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from tests.harness import prometheus
from tests.harness.servers import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _needs_prometheus() -> None:
    reason = prometheus.prometheus_available()
    if reason is not None:
        pytest.skip(reason)


def test_scrapes_and_queries_a_counter(tmp_path: Path) -> None:
    registry = CollectorRegistry()  # not the default one: other tests' metrics stay out
    counter = Counter("harness_probe", "Counted by this test.", ["color"], registry=registry)
    counter.labels("red").inc(3)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        with prometheus.prometheus_server(
            tmp_path, {"probe": f"127.0.0.1:{port}", "absent": f"127.0.0.1:{free_port()}"}
        ) as prom:
            (sample,) = prom.wait_for('harness_probe_total{color="red"}', bool)
            assert sample.value == 3
            assert sample.labels["job"] == "probe"
            assert sample.labels["instance"] == f"127.0.0.1:{port}"
            counter.labels("red").inc(2)
            prom.wait_for('harness_probe_total{color="red"}', lambda r: r[0].value == 5)
            up = prom.wait_for("up", lambda r: len(r) == 2)
            assert {s.labels["job"]: s.value for s in up} == {"probe": 1.0, "absent": 0.0}
            assert prom.value("scalar(sum(harness_probe_total))") == 5
            assert prom.query("nothing_like_this") == []
    finally:
        server.shutdown()
        thread.join(5)
