"""``task up``: the whole stack on this machine, in the foreground, without Docker or Kubernetes.

Starts an embedded nats-server (JetStream on ``.data/nats``), the nx-27017 MongoDB wire server
(data in ``.data/mongo``, so tasks survive restarts), an S3 endpoint (moto, in memory) and the
four services, then serves the gateway on http://127.0.0.1:3000 (``SCALEODM_GATEWAY_PORT``).
Runs use ODM in docker when a docker engine answers, else the ODM test double (with a warning:
it processes nothing). Ctrl-C or SIGTERM stops everything it started. Any ``SCALEODM_*``
variable already set (e.g. ``SCALEODM_TOKEN``) is passed to the services.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scaleodm.scheduler.engines import docker_answers  # noqa: E402
from tests.harness import servers  # noqa: E402
from tests.harness.stack import Stack  # noqa: E402

log = logging.getLogger("devstack")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="devstack: %(message)s")
    data = Path(os.environ.get("SCALEODM_DEV_DATA", ROOT / ".data"))
    data.mkdir(parents=True, exist_ok=True)
    stop_requested = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, request_stop)
    engine = os.environ.get("SCALEODM_ENGINE")
    if not engine:
        engine = "docker" if asyncio.run(docker_answers()) else "test"
        if engine == "test":
            log.warning("no docker engine answers: runs use the ODM TEST DOUBLE (processes "
                        "nothing). Start docker to process imagery for real.")
    with contextlib.ExitStack() as stack:
        try:
            nats = stack.enter_context(servers.nats_server(data / "nats"))
            mongo = stack.enter_context(
                servers.mongo_server("nx", data / "mongo-log", data_dir=data / "mongo")
            )
            s3 = stack.enter_context(servers.s3_server())
            services = Stack(tmp=data, nats_url=nats.url, mongo_url=mongo, s3=s3,
                             database="scaleodm", console=True, extra_env={
                                 **{k: v for k, v in os.environ.items()
                                    if k.startswith("SCALEODM_")},
                                 "SCALEODM_ENGINE": engine,
                                 "SCALEODM_OUTBOUND_ALLOW": os.environ.get(
                                     "SCALEODM_OUTBOUND_ALLOW", '["127.0.0.0/8"]'),
                                 "SCALEODM_TEST_ENGINE_SECONDS": os.environ.get(
                                     "SCALEODM_TEST_ENGINE_SECONDS", "20"),
                                 "SCALEODM_LOG_JSON": os.environ.get("SCALEODM_LOG_JSON", "true"),
                             })
            stack.callback(services.stop)
            gateway_port = int(os.environ.get("SCALEODM_GATEWAY_PORT", "3000"))
            for name in ("scheduler", "watcher", "notifier"):
                services.start(name)
            services.start("gateway", {"SCALEODM_GATEWAY_PORT": str(gateway_port)},
                           port=gateway_port)
            log.info("NATS %s | MongoDB %s | S3 %s | data in %s", nats.url, mongo, s3.url, data)
            log.info("ScaleODM (NodeODM API) on http://127.0.0.1:%d — Ctrl-C stops everything",
                     gateway_port)
            while True:
                for name, proc in services.procs.items():
                    if proc.poll() is not None:
                        log.error("%s exited (%s); see %s", name, proc.returncode,
                                  data / f"{name}.log")
                        return 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            log.info("stopping%s", " (SIGTERM)" if stop_requested else "")
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
