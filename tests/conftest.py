"""Session fixtures: real servers on 127.0.0.1, the four services, an HTTP fixture server.

Everything is started and stopped here; nothing leaves loopback. MongoDB is the nx-27017 wire
server unless ``SCALEODM_TEST_MONGODB_URL`` points at a real MongoDB; the store's own tests also
run on mongoeco (see ``tests/integration/test_store.py``).
"""

from __future__ import annotations

import compileall
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient

from tests.harness import properties, servers  # noqa: F401 - registers the fast profile
from tests.harness.httpfixture import HttpFixture
from tests.harness.stack import Stack, running_stack

ROOT = Path(__file__).resolve().parents[1]


_WHOLLY_INTEGRATION = re.compile(r"^pytestmark = \[?pytest\.mark\.integration\b", re.MULTILINE)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Under ``-m "not integration"`` (``task test:fast``), skip importing the modules marked
    integration as a whole: every test of theirs would be deselected anyway, and importing them
    (schemathesis, PyODM, the harness) costs seconds of the fast layer's collection."""
    if config.option.markexpr.replace(" ", "") != "notintegration":
        return None
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    return True if _WHOLLY_INTEGRATION.search(collection_path.read_text()) else None


def pytest_configure(config: pytest.Config) -> None:  # noqa: ARG001
    # The services' own sources are editable installs, so uv does not compile them; the tests
    # start hundreds of service processes, and with PYTHONDONTWRITEBYTECODE set each would
    # compile them again.
    for src in ("libs", "services", "tools"):
        compileall.compile_dir(ROOT / src, quiet=1, workers=0)


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scaleodm")


@pytest.fixture(scope="session")
def nats(session_tmp: Path) -> Iterator[servers.Nats]:
    with servers.nats_server(session_tmp / "nats") as n:
        yield n


@pytest.fixture(scope="session")
def mongo_url(session_tmp: Path) -> Iterator[str]:
    with servers.mongo_server("nx", session_tmp / "mongo") as url:
        yield url


@pytest.fixture(scope="session")
def s3(session_tmp: Path) -> Iterator[servers.S3Endpoint]:  # noqa: ARG001
    with servers.s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def http_fixture(session_tmp: Path) -> Iterator[HttpFixture]:
    fixture = HttpFixture(root=session_tmp / "www")
    fixture.root.mkdir()
    fixture.start()
    yield fixture
    fixture.stop()


@pytest.fixture(scope="session")
def stack(
    session_tmp: Path, nats: servers.Nats, mongo_url: str, s3: servers.S3Endpoint
) -> Iterator[Stack]:
    """The whole system, shared by the integration tests (tasks never collide: fresh uuids)."""
    base = Stack(tmp=session_tmp / "stack", nats_url=nats.url, mongo_url=mongo_url, s3=s3,
                 database="scaleodm_it")
    base.tmp.mkdir()
    with running_stack(base) as running:
        yield running


@pytest.fixture
def fresh_stack(
    tmp_path: Path, mongo_url: str, s3: servers.S3Endpoint
) -> Iterator[tuple[Stack, servers.Nats]]:
    """A stack of its own (own NATS, own database), for tests that kill or reconfigure services.

    Services are not started: the test starts them, with whatever settings it needs.
    """
    with servers.nats_server(tmp_path / "nats") as n:
        own = Stack(tmp=tmp_path, nats_url=n.url, mongo_url=mongo_url, s3=s3,
                    database=f"t_{uuid.uuid4().hex[:12]}")
        try:
            yield own, n
        finally:
            own.stop()


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module", params=list(servers.MONGO_KINDS))
def wire_url(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MongoDB wire server per kind (nx-27017, mongoeco; or the real one from the env), one
    per test module: for the store's queries, which every server must answer alike."""
    kind: str = request.param
    if kind == "mongoeco" and not os.environ.get("SCALEODM_TEST_MONGODB_URL"):
        reason = servers.mongoeco_available()
        if reason is not None:
            pytest.skip(reason)
    with servers.mongo_server(kind, tmp_path_factory.mktemp(f"wire-{kind}")) as url:
        yield url


@pytest.fixture
async def wire_db(wire_url: str) -> AsyncIterator[Any]:
    """A fresh database on ``wire_url``, dropped afterwards."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        wire_url, tz_aware=True, serverSelectionTimeoutMS=5000)
    name = f"t_{uuid.uuid4().hex[:12]}"
    try:
        yield client[name]
    finally:
        await client.drop_database(name)
        await client.close()
