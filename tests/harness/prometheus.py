"""A real Prometheus (Debian's ``prometheus`` binary) on a free 127.0.0.1 port, for tests.

It scrapes the given targets every second (one job per service, ``/metrics``), keeps its TSDB in
a temp dir, and answers PromQL over its HTTP API: ``query`` for an instant vector,
``wait_for`` to poll until a predicate holds. Alert rules (``rule_files``) can be loaded too, so a
test can watch ``ALERTS`` of deploy/monitoring/alerts.yaml against live services.

``prometheus_available()`` says why it cannot run here (no binary), for ``pytest.skip``;
.ci/run installs the package.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from tests.harness.servers import free_port, stop_process, wait_http

SCRAPE_INTERVAL_S = 1
QUERY_TIMEOUT_S = 5.0
READY_TIMEOUT_S = 30.0


@functools.cache
def prometheus_available() -> str | None:
    """None if the ``prometheus`` binary is on PATH, else the reason to skip."""
    if shutil.which("prometheus") is None:
        return "prometheus not on PATH (Debian: apt-get install prometheus; .ci/run does)"
    return None


class Sample(NamedTuple):
    """One element of an instant query's result."""

    labels: dict[str, str]
    value: float


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]

    def query(self, expr: str) -> list[Sample]:
        """``expr`` evaluated now (``/api/v1/query``): a vector, or a scalar as one sample."""
        params = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(  # noqa: S310 - loopback only
            f"{self.url}/api/v1/query?{params}", timeout=QUERY_TIMEOUT_S
        ) as resp:
            body: dict[str, Any] = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {body}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return [Sample({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise ValueError(f"{expr!r} is a {data['resultType']}, not an instant vector")
        return [Sample(dict(r["metric"]), float(r["value"][1])) for r in data["result"]]

    def wait_for(self, expr: str, predicate: Callable[[list[Sample]], bool],
                 timeout_s: float = 30.0) -> list[Sample]:
        """Poll ``expr`` until ``predicate(result)`` holds; the result, or ``TimeoutError``
        naming the last one (scrapes are 1 s apart: a few seconds is the usual wait)."""
        deadline = time.monotonic() + timeout_s
        last: list[Sample] | Exception = []
        while time.monotonic() < deadline:
            try:
                result = self.query(expr)
            except (OSError, RuntimeError) as exc:
                last = exc
            else:
                if predicate(result):
                    return result
                last = result
            time.sleep(0.2)
        raise TimeoutError(f"{expr!r}: predicate still false after {timeout_s:.0f}s: {last!r}")

    def value(self, expr: str) -> float:
        """The single value of ``expr`` (NaN when its result is empty)."""
        result = self.query(expr)
        if not result:
            return math.nan
        (sample,) = result
        return sample.value


def config(targets: Mapping[str, str | Sequence[str]],
           rule_files: Sequence[Path] = ()) -> dict[str, Any]:
    """Prometheus' configuration: one job per entry of ``targets`` (job -> ``host:port``s)."""
    return {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                   "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
                   "scrape_timeout": f"{SCRAPE_INTERVAL_S}s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics",
             "static_configs": [{"targets": [hosts] if isinstance(hosts, str) else list(hosts)}]}
            for job, hosts in targets.items()
        ],
    }


@contextlib.contextmanager
def prometheus_server(tmp: Path, targets: Mapping[str, str | Sequence[str]],
                      rule_files: Sequence[Path] = ()) -> Iterator[Prometheus]:
    """Prometheus scraping ``targets`` (job name -> ``host:port`` or a list of them), yielded
    once ``/-/ready``; stopped (SIGTERM, then SIGKILL after 10 s) on exit. Its log is
    ``tmp/prometheus.log``."""
    reason = prometheus_available()
    if reason is not None:
        raise RuntimeError(reason)
    tmp.mkdir(parents=True, exist_ok=True)
    config_file = tmp / "prometheus.yml"
    config_file.write_text(json.dumps(config(targets, rule_files), indent=2))  # YAML ⊇ JSON
    storage = tmp / "tsdb"
    storage.mkdir(exist_ok=True)
    port = free_port()
    log = (tmp / "prometheus.log").open("ab")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config_file}", f"--storage.tsdb.path={storage}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
         "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/-/ready", timeout_s=READY_TIMEOUT_S, proc=proc)
        yield Prometheus(url, proc)
    finally:
        stop_process(proc)
        log.close()
