"""Fixtures for tests against the Kubernetes API double (:mod:`tests.k8s.apiserver`) and the Argo
controller double (:mod:`tests.k8s.controller`).

* ``k8s`` (session): a :class:`tests.k8s.controller.FakeCluster` — ``.server`` (started
  :class:`~tests.k8s.apiserver.FakeApiServer`), ``.controller`` (started
  :class:`~tests.k8s.controller.Controller`, engine runs of 2 s) and ``.kubeconfig`` (path).
  Shared by all tests: isolate with the per-test ``namespace`` and unique workflow names.
* ``namespace``: a fresh namespace name per test.
* ``api``: a ``kubernetes_asyncio`` ``ApiClient`` built from the kubeconfig
  (``load_kube_config(config_file=..., client_configuration=cfg)`` then ``ApiClient(cfg)``),
  closed after the test. :func:`tests.k8s.apiserver.api_client` does the same anywhere.

Nothing here talks to a real cluster.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from kubernetes_asyncio.client import ApiClient

from tests.k8s.apiserver import api_client
from tests.k8s.controller import FakeCluster, fake_cluster


@pytest.fixture(scope="session")
def k8s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    with fake_cluster(tmp_path_factory.mktemp("k8s")) as cluster:
        yield cluster


@pytest.fixture
def namespace() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def api(k8s: FakeCluster) -> AsyncIterator[ApiClient]:
    async with api_client(k8s.kubeconfig) as client:
        yield client
