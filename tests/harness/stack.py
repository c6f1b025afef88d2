"""The four services as real processes, wired to real servers through ``SCALEODM_*`` settings."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaleodm.common import localruns
from tests.harness.servers import S3Endpoint, free_port, stop_process, wait_http

SERVICES = ("gateway", "scheduler", "watcher", "notifier")
S3_INPUT_PREFIX = "drone-uploads/"  # where tests put images for s3:// zipurls
SPLIT_KEY = "split-key-for-tests-only-0123456789abcdef"  # SCALEODM_SPLIT__TOKEN_KEY


def split_env(gateway_port: int) -> dict[str, str]:
    """``SCALEODM_SPLIT__*`` for a stack whose gateway will listen on ``gateway_port`` (start it
    there: ``ports``), so that its runs' ODM sends submodels back to it (docs/split-merge.md)."""
    return {"SCALEODM_SPLIT__TOKEN_KEY": SPLIT_KEY,
            "SCALEODM_SPLIT__CLUSTER_URL": f"http://127.0.0.1:{gateway_port}"}


@dataclass
class Stack:
    tmp: Path
    nats_url: str
    mongo_url: str
    s3: S3Endpoint
    database: str
    bucket: str = "scaleodm"
    extra_env: dict[str, str] = field(default_factory=dict)
    console: bool = False  # services log to this terminal instead of files
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    # Processes per service in ``start_all``: "scheduler", then "scheduler-2", ... (instance
    # names key ``procs``/``ports``/logs; every method taking a service takes an instance name).
    replicas: int = 1

    @property
    def runs_dir(self) -> Path:
        return self.tmp / "runs"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    def env(self, service: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCALEODM_")}
        env.update({
            "SCALEODM_NATS__URL": self.nats_url,
            "SCALEODM_MONGO__URL": self.mongo_url,
            "SCALEODM_MONGO__DATABASE": self.database,
            "SCALEODM_S3__ENDPOINT_URL": self.s3.url,
            "SCALEODM_S3__ACCESS_KEY_ID": self.s3.access_key,
            "SCALEODM_S3__SECRET_ACCESS_KEY": self.s3.secret_key,
            "SCALEODM_S3__REGION": self.s3.region,
            "SCALEODM_S3__BUCKET": self.bucket,
            "SCALEODM_S3__CREATE_BUCKET": "true",
            "SCALEODM_LOCAL__RUNS_DIR": str(self.runs_dir),
            "SCALEODM_ENGINE": "test",
            "SCALEODM_TEST_ENGINE_SECONDS": "2",
            "SCALEODM_LOG_LEVEL": "INFO",
            "SCALEODM_HEALTH_HOST": "127.0.0.1",
            "SCALEODM_GATEWAY_HOST": "127.0.0.1",
            "SCALEODM_OUTBOX_INTERVAL_S": "1",
            "SCALEODM_OUTBOX_MIN_AGE_S": "1",
            "SCALEODM_OUTBOUND_ALLOW": '["127.0.0.0/8"]',  # fixtures and hooks are on loopback
            # Room for every test's tasks at once (tests of admission set their own capacity).
            "SCALEODM_CAPACITY__MAX_ACTIVE": "200",
            "SCALEODM_CAPACITY__CLASSES": '[{"name": "any", "max_images": null, "slots": 200}]',
            # s3:// zipurls the tests use (S3Settings.input_allow; none by default)
            "SCALEODM_S3__INPUT_ALLOW": f'["s3://{self.bucket}/{S3_INPUT_PREFIX}"]',
        })
        env.update(self.extra_env)
        env.update(extra or {})
        return env

    def start(self, service: str, extra: dict[str, str] | None = None,
              port: int | None = None) -> None:
        self.spawn(service, extra, port)
        self.wait_ready(service)

    def start_all(self, *services: str, extra: dict[str, dict[str, str]] | None = None,
                  ports: dict[str, int] | None = None) -> None:
        """Start several services (each ``replicas`` times) at once (their imports overlap),
        then wait for each; ``ports``: the port of an instance chosen beforehand."""
        names = [name for service in services for name in self.instances(service)]
        for name in names:
            self.spawn(name, (extra or {}).get(service_of(name)), (ports or {}).get(name))
        for name in names:
            self.wait_ready(name)

    def instances(self, service: str) -> list[str]:
        """``service`` and its further replicas (``service-2``, ...); an instance name stays."""
        if service != service_of(service):
            return [service]
        return [service, *(f"{service}-{i}" for i in range(2, self.replicas + 1))]

    def wait_ready(self, service: str) -> None:
        wait_http(f"http://127.0.0.1:{self.ports[service]}/readyz", timeout_s=60,
                  proc=self.procs[service])

    def spawn(self, service: str, extra: dict[str, str] | None = None,
              port: int | None = None) -> None:
        port = port or free_port()
        self.ports[service] = port
        kind = service_of(service)
        env = self.env(service, extra)
        env["SCALEODM_GATEWAY_PORT" if kind == "gateway" else "SCALEODM_HEALTH_PORT"] = str(port)
        if kind == "watcher" and self.replicas > 1:  # as the StatefulSet ordinal does
            env.setdefault("SCALEODM_REPLICA", str(self.instances(kind).index(service)))
            env.setdefault("SCALEODM_REPLICAS", str(self.replicas))
        out = None if self.console else (self.tmp / f"{service}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", f"scaleodm.{kind}.main"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the launcher only, which stops in order
        )
        if out is not None:
            out.close()
        self.procs[service] = proc

    def kill(self, service: str) -> None:
        """SIGKILL: no cleanup, no ack, as a crash."""
        proc = self.procs.pop(service)
        proc.kill()
        proc.wait()

    def _s3_client(self) -> Any:
        import boto3  # only the tests that look at S3 pay for it

        return boto3.client("s3", endpoint_url=self.s3.url,
                            aws_access_key_id=self.s3.access_key,
                            aws_secret_access_key=self.s3.secret_key,
                            region_name=self.s3.region)

    def s3_keys(self, prefix: str) -> list[str]:
        """The keys under ``prefix`` in the stack's bucket (the first 1,000)."""
        listed = self._s3_client().list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for o in listed.get("Contents", [])]

    def s3_get(self, key: str) -> bytes:
        """One object of the stack's bucket, whole (small test objects only)."""
        body: bytes = self._s3_client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return body

    def log(self, service: str) -> str:
        path = self.tmp / f"{service}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            stop_process(proc, 25)
        self.procs.clear()
        kill_runners(self.runs_dir)


def service_of(instance: str) -> str:
    """``scheduler-2`` -> ``scheduler``."""
    return instance.partition("-")[0]


def kill_runners(runs_dir: Path) -> None:
    """Runners live in their own sessions; end whatever a test left running."""
    for rd in localruns.runs(runs_dir):
        for name in (localruns.ENGINE_PID, localruns.RUNNER_PID):
            pid = localruns.read_pid(rd.file(name))
            if pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def running_stack(stack: Stack, services: tuple[str, ...] = SERVICES,
                  extra: dict[str, dict[str, str]] | None = None,
                  ports: dict[str, int] | None = None) -> Iterator[Stack]:
    try:
        stack.start_all(*services, extra=extra, ports=ports)
        yield stack
    finally:
        stack.stop()
