"""``scaleodm-bootstrap`` creates both streams and the two durables on a real nats-server.

Also checks it is idempotent (a second run succeeds and changes nothing). Leaves out KEDA itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.harness import servers

pytestmark = pytest.mark.integration


def test_bootstrap_creates_streams_and_durables(tmp_path: Path) -> None:
    with servers.nats_server(tmp_path / "nats") as nats:
        env = {**os.environ, "SCALEODM_NATS__URL": nats.url, "SCALEODM_ACK_WAIT_S": "42"}
        script = Path(sys.executable).parent / "scaleodm-bootstrap"
        for _ in range(2):
            done = subprocess.run([str(script)], env=env, capture_output=True, timeout=60)
            assert done.returncode == 0, done.stderr.decode()[-2000:]
        url = f"{nats.monitor_url}/jsz?streams=true&consumers=true&config=true"
        with urllib.request.urlopen(url, timeout=5) as resp:
            jsz = json.load(resp)
    streams = {s["name"]: s for a in jsz["account_details"] for s in a["stream_detail"]}
    assert set(streams) == {"TASKS", "EVENTS"}
    assert streams["TASKS"]["config"]["retention"] == "workqueue"
    assert streams["EVENTS"]["config"]["retention"] == "limits"
    consumers = {
        c["name"]: c["config"] for s in streams.values() for c in s.get("consumer_detail") or []
    }
    assert set(consumers) == {"scheduler", "notifier"}
    assert consumers["scheduler"]["ack_wait"] == 42 * 10**9
    assert sorted(consumers["notifier"]["filter_subjects"]) == [
        "events.task.*.canceled", "events.task.*.completed", "events.task.*.failed"
    ]
