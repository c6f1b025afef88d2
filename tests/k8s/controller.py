"""An Argo Workflows controller double over :class:`tests.k8s.apiserver.FakeApiServer`'s storage.

It reacts, in-process on the apiserver double's event loop, to Workflows created with the label
``app.kubernetes.io/managed-by=<managed_by>`` (default ``scaleodm``; other Workflows stay
phase-less, i.e. "queued", forever) the way the Argo controller does, as far as ScaleODM's executor
and watcher can observe it through the Kubernetes API (stack-notes §3):

* ``status.phase`` ``""`` → ``Pending`` → ``Running`` → ``Succeeded | Failed | Error`` (the real
  controller usually goes ``""`` → ``Running``; ``pending_phase=False`` does that), with
  ``startedAt``, ``finishedAt``, ``progress`` (``0/1`` → ``1/1``), ``message``, ``conditions``
  (``Completed``) and ``nodes``; labels ``workflows.argoproj.io/phase`` and
  ``workflows.argoproj.io/completed`` (``"false"`` → ``"true"``) on the Workflow.
* ``status.nodes``: for a plain entrypoint one ``Pod`` node whose id and name are the workflow name;
  with a ``retryStrategy`` on the entrypoint a ``Retry`` root node (id = workflow name) with one
  ``Pod`` child per attempt named ``<wf>(<n>)``; for a ``containerSet`` each Pod node has
  ``Container`` children named ``<pod node name>.<container>``. Ids other than the workflow name
  are ``<wf>-<FNV-1a 32 of the node name>`` (Argo's ``NodeID``).
* One pod per attempt, named by POD_NAMES v2 (:func:`pod_name`): the workflow name for a root Pod
  node, else ``<wf>-<template>-<FNV-1a(node name)>``. Labels ``workflows.argoproj.io/workflow``,
  ``workflows.argoproj.io/completed`` plus ``spec.podMetadata.labels``; annotations
  ``workflows.argoproj.io/node-name``/``node-id`` plus ``spec.podMetadata.annotations``; an owner
  reference to the Workflow. Containers: ``wait`` plus the template's containers
  (``containerSet.containers[].name``, or ``main`` for a ``container``/``script`` template), with
  ``{{workflow.name}}``, ``{{workflow.namespace}}``, ``{{workflow.uid}}`` and ``{{retries}}``
  substituted in their specs.
* Container execution: as with Argo's emissary, every container of the pod is ``running`` from pod
  start; their commands run one after the other in the listed order (the ``dependencies`` ScaleODM
  declares), and once one fails the rest are not run (their nodes end ``Omitted``, their containers
  ``terminated`` with exit code 0 and reason ``Completed``). The *engine container* (named
  ``engine_container``, default ``main``; else the first one mentioning ``run.py``) runs the ODM
  test double ``sys.executable -m odm_test_engine`` on a temp project with a few fake ``.JPG``
  images: the ODM options found after ``run.py`` in its command/args (or in a ``sh -c`` script),
  or else its ``args``, are passed through without ``--project-path``/the project name; the
  project name is the workflow name. Its stdout+stderr lines are appended to that container's log
  as they arrive. Other containers log two synthetic lines. Exit 0 → ``Succeeded``; exit N →
  the container ``terminated`` (reason ``Error``; with ``terminationMessagePolicy:
  FallbackToLogsOnError`` its ``message`` is the log tail, 80 lines / 2048 bytes, as the kubelet
  does), the Pod node ``Failed`` with Argo's ``inferFailedReason`` text
  ``<container>: Error (exit code N)[: <termination message>]``, the ``Container`` node ``Failed``
  with ``Error (exit code N)`` (approximation), and the Workflow ``Failed`` with the root node's
  message (Argo: ``workflowMessage = node.Message``).
* Retries: ``retryStrategy.limit`` (N → N+1 attempts) with ``retryPolicy`` ``Always``/``OnFailure``
  (default) retry a failed attempt after ``retry_delay`` s; ``OnError``/``OnTransientError`` do not
  retry an exit-code failure. Exhausted → root message ``No more retries left``. ``backoff`` and
  ``expression`` are ignored.
* ``spec.shutdown`` (``Terminate`` or ``Stop``) at creation or patched later: the engine is killed
  (SIGTERM, then SIGKILL), running containers end ``terminated`` with 143, unfinished nodes
  ``Failed`` with ``workflow shutdown with strategy:  <S>`` (two spaces, Argo's wording when it
  terminates a pod; one space when no pod existed yet), Workflow ``Failed`` with
  ``Stopped with strategy '<S>'``. Deleting the Workflow cancels its run and deletes its pods (the
  owner-reference garbage collection).
* Workflow-level semaphores, ``spec.synchronization.semaphores`` (and the older singular
  ``semaphore``, first), as Argo v3.7's ``workflow/sync`` runs them: before anything else the
  Workflow queues on each semaphore (lock key ``<ns>/ConfigMap/<name>/<key>``, ``<ns>`` the
  ref's ``namespace`` or the Workflow's) and takes them all at once, or none: only when it is at
  the front of every queue (ordered by ``spec.priority`` descending, then
  ``creationTimestamp``, ties by creation order) and each has a free slot. The limit is
  ``strconv.Atoi`` of the key in the ConfigMap (apiserver double storage), re-read at every
  attempt: a changed value resizes (holders beyond a lowered limit run on; an unreadable value
  keeps the last limit read; ``"0"`` → message ``Failed to get semaphore limit for <lock>``).
  Waiting: phase ``Pending``, no pod, no ``startedAt``, ``message`` ``Waiting for <lock> lock.
  Lock status: <limit - holders>/<limit>`` (the first lock it cannot take), and
  ``status.synchronization.semaphore.waiting``/``holding`` as Argo writes them. A lock that
  cannot be initialized the first time it is used (no ConfigMap, no key, ``0`` or not a number)
  fails the Workflow: ``Failed`` with ``Failed to acquire the synchronization lock. failed to
  initialize semaphore <lock> with limit`` (also Argo's errors for duplicate items, a ref with
  neither ``configMapKeyRef`` nor ``database``, and database semaphores: ``database session is
  not available ...``); as in Argo, its entries in the queues of the locks listed before the
  failing one stay (ahead of the later Workflows of its priority, which then wait) until the
  Workflow is deleted, and go ``existence_check_period`` s after that (Argo's periodic check,
  1 min), without requeueing anyone. Locks are released when the
  Workflow reaches a final phase (``status.synchronization`` dropped), or is deleted; waiters
  try again ``semaphore_notify_delay`` s later (Argo's ``SEMAPHORE_NOTIFY_DELAY``, 1 s), at once
  on any ConfigMap change, and when their own spec changes (e.g. ``priority``). Shutdown of a
  waiting Workflow: ``Terminate`` releases it as ``Succeeded`` (Argo's
  ``releaseLocksForPendingShuttingdownWfs``), ``Stop`` keeps it waiting and stops it
  (``Failed``, ``Stopped with strategy 'Stop'``) once it holds its locks. Records: per lock, the
  most holders at once (:meth:`Controller.max_holders`, :meth:`Controller.semaphore`); per run,
  when it ran (``RunInfo.started_at``/``ended_at``) and whether it waited.

Scripted scenarios (call before creating the Workflow; keyed by workflow name):
:meth:`Controller.fail_with_exit`, :meth:`Controller.fail_with_image_pull` (pod stays ``Pending``,
engine container ``waiting`` ``ErrImagePull`` then ``ImagePullBackOff``, Pod node ``Pending`` with
message ``ErrImagePull: ...`` then ``ImagePullBackOff: Back-off pulling image "<image>"``, Workflow
``Running`` with no workflow-level message, until shutdown/delete), :meth:`Controller.hold` /
:meth:`Controller.release` (stay phase-less), :meth:`Controller.set_engine_seconds`;
:meth:`Controller.pause_logs`/:meth:`Controller.resume_logs` hold back the engine's lines while
it keeps running (the container is not marked terminated before the held lines are flushed).

Left out: ``onExit`` handlers (so ``Stop`` and ``Terminate`` behave the same), steps/DAG entrypoints
(Failed "invalid spec"), ``workflowTemplateRef`` (Error "not found"), ``activeDeadlineSeconds``,
``podGC`` and ``ttlStrategy`` (delete pods/workflows yourself with the server's ``delete``),
``parallelism`` (Workflow-, template- and controller-level; use ``hold`` to keep one queued),
mutexes (Failed "invalid spec") and template-level ``synchronization``, a controller restart
(Argo rebuilds its locks from the Workflows' ``status.synchronization``), a deleted pod (Argo's
``pod deleted``: use :meth:`Controller.fail_with_exit`), progress-file reporting, artifacts (no
``init`` container), node offloading, Argo's own validation.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import shlex
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.k8s.apiserver import (
    ADDED,
    CONFIGMAPS,
    DELETED,
    MODIFIED,
    PODS,
    WORKFLOWS,
    ApiError,
    FakeApiServer,
    JsonObj,
    ResourceType,
    WatchEvent,
    rfc3339,
)

MANAGED_BY = "app.kubernetes.io/managed-by"
WORKFLOW_LABEL = "workflows.argoproj.io/workflow"
PHASE_LABEL = "workflows.argoproj.io/phase"
COMPLETED_LABEL = "workflows.argoproj.io/completed"
NODE_NAME_ANNOTATION = "workflows.argoproj.io/node-name"
NODE_ID_ANNOTATION = "workflows.argoproj.io/node-id"
EXECUTOR_IMAGE = "quay.io/argoproj/argoexec:v3.7.18"
FINAL_PHASES = frozenset({"Succeeded", "Failed", "Error"})
#: Argo's ``SEMAPHORE_NOTIFY_DELAY`` default: waiters are requeued this long after a release.
SEMAPHORE_NOTIFY_DELAY = 1.0
#: Argo's ``workflowExistenceCheckPeriod``: how often queue entries of deleted Workflows go.
EXISTENCE_CHECK_PERIOD = 60.0
_ATOI = re.compile(r"[+-]?[0-9]+")


def fnv1a_32(text: str) -> int:
    """FNV-1a 32-bit hash (Argo's node ids and pod names): ``fnv1a_32("hello") == 1335831723``."""
    value = 0x811C9DC5
    for byte in text.encode():
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


def node_id(workflow: str, node_name: str) -> str:
    """Argo's ``Workflow.NodeID``: the workflow name for the root node, else ``<wf>-<fnv>``."""
    return workflow if node_name == workflow else f"{workflow}-{fnv1a_32(node_name)}"


def pod_name(workflow: str, node_name: str, template: str | None) -> str:
    """POD_NAMES v2 (stack-notes §3)."""
    if node_name == workflow:
        return workflow
    prefix = f"{workflow}-{template}" if template else workflow
    return f"{prefix[:242]}-{fnv1a_32(node_name)}"


def exit_code_of(returncode: int) -> int:
    """A container exit code from a subprocess return code (signal N → 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def engine_options(container: JsonObj) -> list[str]:
    """ODM options for the test engine from a container spec (see the module docstring)."""
    from odm_test_engine.cli import UsageError, parse

    command = [str(t) for t in container.get("command") or []]
    args = [str(t) for t in container.get("args") or []]
    tokens = command + args
    tail: list[str] | None = None
    for index, token in enumerate(tokens):
        if token.endswith("run.py"):
            tail = tokens[index + 1 :]
            break
        if token == "-c" and index + 1 < len(tokens):
            words = shlex.split(tokens[index + 1], comments=True)
            for j, word in enumerate(words):
                if word.endswith("run.py"):
                    tail = []
                    for rest in words[j + 1 :]:
                        if rest in ("&&", "||", ";", "|", "&"):
                            break
                        tail.append(rest)
                    break
            if tail is not None:
                break
    if tail is None:
        tail = args
    candidates = (
        tail,
        [*tail, "--project-path", "/unused"],
        [*(t for t in tail if t.startswith("--") and "=" in t), "--project-path=/unused"],
    )
    for candidate in candidates:
        try:
            invocation = parse(candidate)
            break
        except UsageError:
            continue
    else:
        return []
    options = []
    for name, value in invocation.options.items():
        if name == "project-path":
            continue
        options.append(f"--{name}" if value is True else f"--{name}={value}")
    return options


def _substitute(value: Any, variables: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, replacement in variables.items():
            value = value.replace("{{" + key + "}}", replacement)
        return value
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    return value


@dataclass
class Scenario:
    """Per-workflow script (by workflow name)."""

    exit_code: int | None = None
    fail_stage: str | None = None
    image_pull: bool = False
    engine_seconds: float | None = None
    held: bool = False


@dataclass
class RunInfo:
    """What a test may inspect about one workflow run (a snapshot)."""

    namespace: str
    name: str
    pods: list[str]
    engine_pids: list[int]
    engine_returncodes: list[int | None]
    engine_args: list[list[str]]
    project_dirs: list[Path]
    shutdown: str | None
    done: bool
    #: ``time.time()`` when it went ``Running`` (its locks held) and when it ended (final phase,
    #: or deleted); ``None`` before that
    started_at: float | None = None
    ended_at: float | None = None
    #: whether it ever waited for a semaphore, and the lock keys it holds now
    waited: bool = False
    locks: list[str] = field(default_factory=list)

    @property
    def pod(self) -> str | None:
        """The latest attempt's pod."""
        return self.pods[-1] if self.pods else None


class _Gone(Exception):
    """The workflow was deleted while running."""


class _LockError(Exception):
    """Argo's ``TryAcquire`` error: the Workflow fails with
    ``Failed to acquire the synchronization lock. <message>``."""


@dataclass(frozen=True)
class LockRef:
    """One semaphore a Workflow names: ``name`` is Argo's lock key,
    ``<namespace>/ConfigMap/<configmap>/<key>`` (``<namespace>/Database/<key>`` for a database
    semaphore, which the double never initializes: it has no database)."""

    name: str
    namespace: str
    configmap: str
    key: str
    database: bool = False


@dataclass
class _Semaphore:
    """Argo's ``prioritySemaphore``: holders, a priority queue, the last limit it could read."""

    ref: LockRef
    limit: int
    holders: list[str] = field(default_factory=list)  # holder keys "<ns>/<workflow>"
    pending: dict[str, tuple[int, str, int]] = field(default_factory=dict)  # key → queue order
    max_holders: int = 0

    def front(self) -> str | None:
        return min(self.pending, key=lambda k: self.pending[k]) if self.pending else None


@dataclass
class SemaphoreInfo:
    """A snapshot of one semaphore (see :meth:`Controller.semaphore`)."""

    name: str
    limit: int
    holders: list[str]
    pending: list[str]
    max_holders: int


def semaphore_refs(spec: JsonObj, namespace: str) -> list[LockRef]:
    """The semaphores of ``spec.synchronization`` in Argo's order (``semaphore`` then
    ``semaphores``), with Argo's configuration errors as :class:`_LockError`. Mutexes raise
    ``NotImplementedError`` (not modelled)."""
    sync = spec.get("synchronization") or {}
    items: list[tuple[str, Any]] = []
    if sync.get("semaphore") is not None:
        items.append(("semaphore", sync["semaphore"]))
    if sync.get("mutex") is not None:
        items.append(("mutex", sync["mutex"]))
    items += [("semaphore", item) for item in sync.get("semaphores") or []]
    items += [("mutex", item) for item in sync.get("mutexes") or []]
    for index, item in enumerate(items):
        if item in items[index + 1 :]:
            raise _LockError(
                "requested configuration is invalid: duplicate synchronization item found"
            )
    refs = []
    for kind, raw in items:
        if kind == "mutex":
            raise NotImplementedError("the controller double does not model mutexes")
        ref: JsonObj = raw or {}
        ns = str(ref.get("namespace") or namespace)
        cm, db = ref.get("configMapKeyRef"), ref.get("database")
        if cm is not None and db is not None:
            raise _LockError(
                "requested configuration is invalid: "
                "invalid semaphore with both ConfigMapKeyRef and Database"
            )
        if cm is not None:
            name, key = str(cm.get("name") or ""), str(cm.get("key") or "")
            refs.append(LockRef(f"{ns}/ConfigMap/{name}/{key}", ns, name, key))
        elif db is not None:
            key = str(db.get("key") or "")
            refs.append(LockRef(f"{ns}/Database/{key}", ns, "", key, database=True))
        else:
            raise _LockError(
                "requested configuration is invalid: cannot get LockName for a Semaphore "
                "without a ConfigMapRef or Database"
            )
    return refs


@dataclass
class _Run:
    namespace: str
    name: str
    scenario: Scenario
    log_gate: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    shutdown: str | None = None
    deleted: bool = False
    done: bool = False
    pods: list[str] = field(default_factory=list)
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    engine_args: list[list[str]] = field(default_factory=list)
    project_dirs: list[Path] = field(default_factory=list)
    nodes: dict[str, JsonObj] = field(default_factory=dict)
    # the attempt in progress
    pod: str | None = None
    pod_node: str | None = None
    container_nodes: dict[str, str] = field(default_factory=dict)
    # synchronization (see Controller._try_acquire)
    seq: int = 0
    order: tuple[int, str, int] = (0, "", 0)
    refs: list[LockRef] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: bool = False
    waited: bool = False
    terminated_waiting: bool = False
    lock_error: str | None = None
    held: list[str] = field(default_factory=list)
    queued: set[str] = field(default_factory=set)
    leaked: set[str] = field(default_factory=set)
    sync_status: JsonObj | None = None
    started_at: float | None = None
    ended_at: float | None = None

    @property
    def holder(self) -> str:
        """Argo's holder key of a Workflow-level lock."""
        return f"{self.namespace}/{self.name}"


class Controller:
    """The Argo controller double. ``start()`` attaches to the server; ``stop()`` cleans up."""

    def __init__(
        self,
        server: FakeApiServer,
        workdir: Path,
        *,
        engine_seconds: float = 2.0,
        step_delay: float = 0.05,
        retry_delay: float = 0.1,
        managed_by: str = "scaleodm",
        engine_container: str = "main",
        images: int = 3,
        ansi: bool = True,
        pending_phase: bool = True,
        semaphore_notify_delay: float = SEMAPHORE_NOTIFY_DELAY,
        existence_check_period: float = EXISTENCE_CHECK_PERIOD,
    ) -> None:
        self.server = server
        self.workdir = Path(workdir)
        self.engine_seconds = engine_seconds
        self.step_delay = step_delay
        self.retry_delay = retry_delay
        self.managed_by = managed_by
        self.engine_container = engine_container
        self.images = images
        self.ansi = ansi
        self.pending_phase = pending_phase
        self.semaphore_notify_delay = semaphore_notify_delay
        self.existence_check_period = existence_check_period
        self._scenarios: dict[str, Scenario] = {}
        self._runs: dict[tuple[str, str], _Run] = {}
        self._semaphores: dict[str, _Semaphore] = {}
        self._seq = 0
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle (any thread)

    def start(self) -> Controller:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.server.call(self.server.store.add_listener, self._on_event)
        return self

    def stop(self) -> None:
        """Cancel every run, kill engine processes, detach from the server."""
        if self.server.loop is None or self.server.loop.is_closed():
            return

        async def shutdown() -> None:
            self._stopping = True
            self.server.store.remove_listener(self._on_event)
            tasks = [r.task for r in self._runs.values() if r.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for run in self._runs.values():
                for process in run.processes:
                    await _kill(process)

        asyncio.run_coroutine_threadsafe(shutdown(), self.server.loop).result(timeout=20)

    # ------------------------------------------------------------------ scenarios (any thread)

    def _update_scenario(self, name: str, **changes: Any) -> None:
        def update() -> None:
            scenario = self._scenarios.setdefault(name, Scenario())
            for key, value in changes.items():
                setattr(scenario, key, value)

        self.server.call(update)

    def fail_with_exit(self, name: str, code: int, stage: str | None = None) -> None:
        """The engine of workflow ``name`` fails with exit ``code`` (1-255) at ``stage``
        (default ``opensfm``), after printing ODM's error block."""
        if not 0 < code <= 255:
            raise ValueError("exit code must be 1-255")
        self._update_scenario(name, exit_code=code, fail_stage=stage)

    def fail_with_image_pull(self, name: str) -> None:
        """The engine container of workflow ``name`` never pulls its image."""
        self._update_scenario(name, image_pull=True)

    def set_engine_seconds(self, name: str, seconds: float) -> None:
        """Run time of the engine for workflow ``name`` (default: the controller's)."""
        self._update_scenario(name, engine_seconds=seconds)

    def hold(self, name: str) -> None:
        """Keep workflow ``name`` phase-less ("queued") until :meth:`release`."""
        self._update_scenario(name, held=True)

    def release(self, name: str) -> None:
        def go() -> None:
            self._scenarios.setdefault(name, Scenario()).held = False
            for run in self._runs.values():
                if run.name == name:
                    run.release.set()

        self.server.call(go)

    def pause_logs(self, name: str) -> None:
        """Hold back the engine's log lines of workflow ``name`` (the engine keeps running)."""
        self.server.call(self._gate, name, False)

    def resume_logs(self, name: str) -> None:
        self.server.call(self._gate, name, True)

    def _gate(self, name: str, open_: bool) -> None:
        for run in self._runs.values():
            if run.name == name:
                if open_:
                    run.log_gate.set()
                else:
                    run.log_gate.clear()

    # ------------------------------------------------------------------ inspection (any thread)

    def run_info(self, name: str, namespace: str | None = None) -> RunInfo | None:
        def snapshot() -> RunInfo | None:
            for (ns, nm), run in self._runs.items():
                if nm == name and (namespace is None or ns == namespace):
                    return RunInfo(
                        namespace=ns,
                        name=nm,
                        pods=list(run.pods),
                        engine_pids=[p.pid for p in run.processes],
                        engine_returncodes=[p.returncode for p in run.processes],
                        engine_args=[list(a) for a in run.engine_args],
                        project_dirs=list(run.project_dirs),
                        shutdown=run.shutdown,
                        done=run.done,
                        started_at=run.started_at,
                        ended_at=run.ended_at,
                        waited=run.waited,
                        locks=list(run.held),
                    )
            return None

        return self.server.call(snapshot)

    def semaphore(self, namespace: str, configmap: str, key: str) -> SemaphoreInfo | None:
        """The semaphore ``<namespace>/ConfigMap/<configmap>/<key>`` (``None``: no Workflow has
        used it yet). ``holders``/``pending`` are holder keys ``<ns>/<workflow>``, the queue in
        the order Argo serves it."""

        def snapshot() -> SemaphoreInfo | None:
            sem = self._semaphores.get(f"{namespace}/ConfigMap/{configmap}/{key}")
            if sem is None:
                return None
            return SemaphoreInfo(
                name=sem.ref.name,
                limit=sem.limit,
                holders=list(sem.holders),
                pending=sorted(sem.pending, key=lambda k: sem.pending[k]),
                max_holders=sem.max_holders,
            )

        return self.server.call(snapshot)

    def max_holders(self, namespace: str, configmap: str, key: str) -> int:
        """The most Workflows that held that semaphore at once (0: never used)."""
        info = self.semaphore(namespace, configmap, key)
        return info.max_holders if info is not None else 0

    def wait_phase(self, namespace: str, name: str, *phases: str, timeout: float = 20.0) -> JsonObj:
        """Block (not on the server loop) until the workflow's phase is one of ``phases``."""
        found: list[JsonObj] = []

        def reached() -> bool:
            obj = self.server.find("workflows", namespace, name)
            if obj is not None and (obj.get("status") or {}).get("phase", "") in phases:
                found.append(obj)
                return True
            return False

        self.server.wait_until(reached, timeout=timeout)
        return found[-1]

    async def wait_phase_async(
        self, namespace: str, name: str, *phases: str, timeout: float = 20.0
    ) -> JsonObj:
        """Like :meth:`wait_phase` for async tests (polls without blocking the caller's loop)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            obj = self.server.find("workflows", namespace, name)
            if obj is not None and (obj.get("status") or {}).get("phase", "") in phases:
                return obj
            if loop.time() > deadline:
                raise TimeoutError(f"workflow {name} never reached {phases}; last: {obj}")
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ events (server loop)

    def _on_event(self, rt: ResourceType, event: WatchEvent) -> None:
        if self._stopping:
            return
        if rt is CONFIGMAPS:
            # Argo's semaphore ConfigMap informer requeues the Workflows waiting on it
            if any(r.waiting for r in self._runs.values()):
                asyncio.get_running_loop().call_soon(self._reevaluate)
            return
        if rt is not WORKFLOWS:
            return
        meta = event.obj["metadata"]
        key = (meta["namespace"], meta["name"])
        run = self._runs.get(key)
        if event.type == ADDED:
            if (meta.get("labels") or {}).get(MANAGED_BY) != self.managed_by:
                return
            scenario = copy.deepcopy(self._scenarios.get(key[1]) or Scenario())
            self._seq += 1
            run = _Run(key[0], key[1], scenario, seq=self._seq)
            run.log_gate.set()
            if not scenario.held:
                run.release.set()
            self._runs[key] = run
            run.task = asyncio.get_running_loop().create_task(self._drive(run))
        elif event.type == MODIFIED and run is not None and not run.done:
            spec = event.obj.get("spec") or {}
            strategy = spec.get("shutdown")
            if run.waiting:
                if strategy == "Terminate":
                    # Argo: a Pending Workflow shut down with Terminate releases its locks and
                    # is marked Succeeded (releaseLocksForPendingShuttingdownWfs)
                    run.waiting, run.terminated_waiting = False, True
                    run.shutdown = "Terminate"
                    run.wake.set()
                elif strategy:
                    run.shutdown = str(strategy)  # Stop: it waits on, and stops once admitted
                if spec != ((event.prev or {}).get("spec") or {}):
                    asyncio.get_running_loop().call_soon(self._reevaluate)  # e.g. its priority
            elif strategy and run.shutdown is None:
                run.shutdown = str(strategy)
                if run.task is not None:
                    run.task.cancel()
        elif event.type == DELETED and run is not None:
            run.deleted = True
            if run.leaked:
                asyncio.get_running_loop().call_later(
                    self.existence_check_period, self._purge, run.holder, set(run.leaked)
                )
            if run.task is not None and not run.task.done():
                run.task.cancel()
            else:
                self._release(run)
                asyncio.get_running_loop().create_task(self._collect_pods(run))

    # ------------------------------------------------------------------ the run (server loop)

    @property
    def _store(self) -> Any:
        return self.server.store

    async def _drive(self, run: _Run) -> None:
        try:
            await self._execute(run)
        except asyncio.CancelledError:
            await self._kill_engines(run)
            if run.deleted:
                await self._collect_pods(run)
            elif run.shutdown and not self._stopping:
                try:
                    self._finish_stopped(run)
                except _Gone:
                    pass
            elif not self._stopping:
                raise
        except _Gone:
            await self._kill_engines(run)
            await self._collect_pods(run)
        finally:
            self._release(run)
            if run.ended_at is None and (run.deleted or run.started_at is not None):
                run.ended_at = time.time()
            run.waiting = False
            await self._kill_engines(run)
            run.done = True

    async def _kill_engines(self, run: _Run) -> None:
        for process in run.processes:
            await _kill(process)

    async def _collect_pods(self, run: _Run) -> None:
        for pod in run.pods:
            try:
                self._store.delete(PODS, run.namespace, pod)
            except ApiError:
                pass

    def _workflow(self, run: _Run) -> JsonObj:
        try:
            return dict(self._store.get(WORKFLOWS, run.namespace, run.name))
        except ApiError as error:
            raise _Gone from error

    def _patch_workflow(self, run: _Run, patch: JsonObj) -> None:
        try:
            self._store.patch(WORKFLOWS, run.namespace, run.name, patch)
        except ApiError as error:
            if error.code == 404:
                raise _Gone from error
            raise

    def _set_phase(self, run: _Run, phase: str, **status: Any) -> None:
        labels = {PHASE_LABEL: phase, COMPLETED_LABEL: "true" if phase in FINAL_PHASES else "false"}
        body: JsonObj = {"phase": phase, **status}
        if run.nodes:
            body["nodes"] = copy.deepcopy(run.nodes)
        if run.sync_status is not None:
            body["synchronization"] = copy.deepcopy(run.sync_status)
        if phase in FINAL_PHASES:
            body.setdefault("finishedAt", rfc3339())
            body["conditions"] = [{"type": "Completed", "status": "True"}]
            body.setdefault("progress", "1/1" if phase == "Succeeded" else "0/1")
            # Argo releases the locks of a completed Workflow as it persists the final state,
            # and drops status.synchronization
            self._release(run)
            run.sync_status = None
            body["synchronization"] = None
            if run.ended_at is None:
                run.ended_at = time.time()
        self._patch_workflow(run, {"metadata": {"labels": labels}, "status": body})

    def _fail(self, run: _Run, phase: str, message: str) -> None:
        self._set_phase(run, phase, message=message)

    # -- synchronization: Workflow-level semaphores (Argo's workflow/sync, v3.7)

    async def _acquire(self, run: _Run) -> bool:
        """Hold every semaphore the Workflow names, waiting ``Pending`` while it cannot. False:
        the run ended instead (lock error → Failed; Terminate while waiting → Succeeded)."""
        wf = self._workflow(run)
        try:
            run.refs = semaphore_refs(wf.get("spec") or {}, run.namespace)
            message = self._try_acquire(run, wf)
        except _LockError as error:
            self._lock_failed(run, str(error))
            return False
        except NotImplementedError as error:
            self._fail(run, "Failed", f"invalid spec: {error}")
            return False
        if message is None:
            return True
        run.waiting = run.waited = True
        self._show_waiting(run, message)
        if (wf.get("spec") or {}).get("shutdown") == "Terminate":
            # Argo: the next operate() of this Pending Workflow releases it as Succeeded
            run.waiting, run.terminated_waiting, run.shutdown = False, True, "Terminate"
            run.wake.set()
        await run.wake.wait()
        if run.lock_error is not None:
            self._lock_failed(run, run.lock_error)
            return False
        if run.terminated_waiting:
            self._release(run)
            run.sync_status = None
            self._set_phase(run, "Succeeded", message=None, startedAt=rfc3339(), progress=None)
            return False
        return True

    def _lock_failed(self, run: _Run, error: str) -> None:
        # the queue entries of the locks it did initialize stay (Argo never removes them: its
        # status lists no waiting lock); they go once the Workflow is deleted (_purge)
        run.leaked |= run.queued
        run.queued = set()
        run.sync_status = None
        self._set_phase(
            run, "Failed", startedAt=rfc3339(), progress=None,
            message=f"Failed to acquire the synchronization lock. {error}",
        )  # fmt: skip

    def _read_limit(self, ref: LockRef) -> int | None:
        """Argo's getSyncLimit: the ConfigMap key as ``strconv.Atoi``; None on any error."""
        try:
            configmap = self._store.get(CONFIGMAPS, ref.namespace, ref.configmap)
        except ApiError:
            return None
        value = (configmap.get("data") or {}).get(ref.key)
        if not isinstance(value, str) or not _ATOI.fullmatch(value):
            return None
        return int(value)

    def _try_acquire(self, run: _Run, wf: JsonObj) -> str | None:
        """One ``TryAcquire``: None when every lock is now held, else the waiting message.
        Raises :class:`_LockError` when a lock cannot be initialized."""
        holder = run.holder
        priority = int((wf.get("spec") or {}).get("priority") or 0)
        run.order = (-priority, str(wf["metadata"].get("creationTimestamp") or ""), run.seq)
        # prepAcquire: initialize each lock (reading its limit) and queue the Workflow on it
        for ref in run.refs:
            sem = self._semaphores.get(ref.name)
            if sem is None:
                if ref.database:
                    raise _LockError(f"database session is not available for semaphore {ref.name}")
                limit = self._read_limit(ref)
                if not limit:  # Argo: a limit of 0, or none read, fails the initialization
                    raise _LockError(f"failed to initialize semaphore {ref.name} with limit")
                sem = self._semaphores[ref.name] = _Semaphore(ref, limit)
            if holder not in sem.holders:
                sem.pending[holder] = run.order
                run.queued.add(ref.name)
        # tryAcquireImpl: all or nothing; each lock only to the front of its queue
        message: str | None = None
        for ref in run.refs:
            sem = self._semaphores[ref.name]
            limit = self._read_limit(ref)
            if limit is not None:
                sem.limit = limit  # a changed value resizes; unreadable: the last known limit
            if holder in sem.holders:
                continue
            blocked: str | None = None
            if sem.limit == 0:
                blocked = f"Failed to get semaphore limit for {ref.name}"
            elif sem.front() != holder or len(sem.holders) >= sem.limit:
                free = sem.limit - len(sem.holders)
                blocked = f"Waiting for {ref.name} lock. Lock status: {free}/{sem.limit}"
            if blocked is not None and message is None:
                message = blocked
        status = run.sync_status if run.sync_status is not None else {}
        waiting: list[JsonObj] = list(status.get("waiting") or [])
        holding: list[JsonObj] = list(status.get("holding") or [])
        if message is None:
            for ref in run.refs:
                sem = self._semaphores[ref.name]
                if holder not in sem.holders:
                    sem.holders.append(holder)
                    sem.max_holders = max(sem.max_holders, len(sem.holders))
                sem.pending.pop(holder, None)
                if ref.name not in run.held:
                    run.held.append(ref.name)
                # LockAcquired: hold it; a waiting entry goes only once its holders are empty
                if not any(h["semaphore"] == ref.name for h in holding):
                    holding.append({"semaphore": ref.name, "holders": [holder]})
                waiting = [w for w in waiting
                           if w["semaphore"] != ref.name or w.get("holders")]  # fmt: skip
            run.queued = set()
        else:
            for ref in run.refs:  # LockWaiting: each lock with its current holders
                entry: JsonObj = {"semaphore": ref.name}
                if self._semaphores[ref.name].holders:
                    entry["holders"] = list(self._semaphores[ref.name].holders)
                index = next((i for i, w in enumerate(waiting) if w["semaphore"] == ref.name), -1)
                if index < 0:
                    waiting.append(entry)
                else:
                    waiting[index] = entry
        run.sync_status = {"semaphore": {"holding": holding or None, "waiting": waiting or None}}
        return message

    def _show_waiting(self, run: _Run, message: str) -> None:
        """Argo's markWorkflowPhase(Pending, msg): phase Pending, the first blocked lock's
        message, no pods."""
        try:
            self._set_phase(run, "Pending", message=message)
        except _Gone:
            pass

    def _reevaluate(self) -> None:
        """The waiting Workflows try again (Argo requeues them), in queue order, until no more
        can be admitted."""
        if self._stopping:
            return
        progress = True
        while progress:
            progress = False
            waiting = [r for r in self._runs.values() if r.waiting and not r.deleted]
            for run in sorted(waiting, key=lambda r: r.order):
                try:
                    wf = self._store.get(WORKFLOWS, run.namespace, run.name)
                except ApiError:
                    continue
                try:
                    message = self._try_acquire(run, wf)
                except _LockError as error:
                    run.waiting, run.lock_error = False, str(error)
                    run.wake.set()
                    continue
                if message is None:
                    run.waiting = False
                    run.wake.set()
                    progress = True
                else:
                    self._show_waiting(run, message)

    def _release(self, run: _Run) -> None:
        """Argo's ReleaseAll: give back the locks held, leave the queues (idempotent). Waiters
        are requeued ``semaphore_notify_delay`` s after a lock is given back."""
        released = False
        for name in run.held:
            sem = self._semaphores.get(name)
            if sem is not None and run.holder in sem.holders:
                sem.holders.remove(run.holder)
                released = True
        for name in run.queued:
            sem = self._semaphores.get(name)
            if sem is not None:
                sem.pending.pop(run.holder, None)
        run.held, run.queued = [], set()
        if released and not self._stopping:
            asyncio.get_running_loop().call_later(self.semaphore_notify_delay, self._reevaluate)

    def _purge(self, holder: str, names: set[str]) -> None:
        """Argo's CheckWorkflowExistence for a deleted Workflow: its queue entries go (no
        waiter is requeued for that)."""
        for name in names:
            sem = self._semaphores.get(name)
            if sem is not None:
                sem.pending.pop(holder, None)

    async def _execute(self, run: _Run) -> None:
        wf = self._workflow(run)
        spec = wf.get("spec") or {}
        synchronized = bool(spec.get("synchronization"))
        if spec.get("shutdown") and not synchronized:
            run.shutdown = str(spec["shutdown"])
            self._finish_stopped(run)
            return
        await run.release.wait()
        if synchronized:
            # Argo's operate(): the Workflow-level locks come first, before anything else
            if not await self._acquire(run):
                return
            wf = self._workflow(run)
            spec = wf.get("spec") or {}
            if spec.get("shutdown") or run.shutdown:
                run.shutdown = str(spec.get("shutdown") or run.shutdown)
                self._finish_stopped(run)
                return
        entry = str(spec.get("entrypoint") or "")
        if spec.get("workflowTemplateRef"):
            ref = (spec.get("workflowTemplateRef") or {}).get("name")
            self._fail(run, "Error", f'workflowtemplates.argoproj.io "{ref}" not found')
            return
        templates = {t.get("name"): t for t in spec.get("templates") or []}
        template = templates.get(entry)
        if template is None:
            self._fail(run, "Failed", f"invalid spec: template name '{entry}' undefined")
            return
        variables = {
            "workflow.name": run.name,
            "workflow.namespace": run.namespace,
            "workflow.uid": wf["metadata"]["uid"],
        }
        if "containerSet" in template:
            containers = list((template["containerSet"] or {}).get("containers") or [])
            container_set = True
        elif "container" in template or "script" in template:
            containers = [
                {**(template.get("container") or template.get("script") or {}), "name": "main"}
            ]
            container_set = False
        else:
            self._fail(
                run,
                "Failed",
                "invalid spec: the controller double only runs container, "
                "script and containerSet entrypoints",
            )
            return
        if not containers:
            self._fail(run, "Failed", f"invalid spec: template '{entry}' has no containers")
            return

        if self.pending_phase and not run.waited:
            await asyncio.sleep(self.step_delay)
            self._set_phase(run, "Pending", progress="0/1")
        await asyncio.sleep(self.step_delay)
        started = rfc3339()
        run.started_at = time.time()
        # once admitted, Argo's markWorkflowRunning clears the waiting message
        self._set_phase(run, "Running", startedAt=started, progress="0/1", message=None)

        retry = template.get("retryStrategy")
        if retry is None:
            outcome = await self._attempt(
                run, wf, entry, containers, container_set, variables, run.name, None, 0
            )
            phase, message = outcome
            if message:
                self._fail(run, phase, message)
            else:
                self._set_phase(run, phase)
            return

        limit_raw = retry.get("limit")
        limit = int(limit_raw) if limit_raw is not None else 10
        policy = retry.get("retryPolicy") or ("Always" if retry.get("expression") else "OnFailure")
        root = run.name
        run.nodes[root] = {
            "id": root, "name": root, "displayName": root, "type": "Retry",
            "templateName": entry, "templateScope": f"local/{run.name}", "phase": "Running",
            "startedAt": started, "progress": "0/1", "children": [],
        }  # fmt: skip
        self._set_phase(run, "Running")
        attempt = 0
        while True:
            node_name = f"{run.name}({attempt})"
            run.nodes[root]["children"].append(node_id(run.name, node_name))
            phase, message = await self._attempt(
                run, wf, entry, containers, container_set, variables, node_name, root, attempt
            )
            if phase == "Succeeded":
                run.nodes[root].update(phase="Succeeded", finishedAt=rfc3339(), progress="1/1")
                self._set_phase(run, "Succeeded")
                return
            retryable = (
                policy in ("Always", "OnFailure")
                if phase == "Failed"
                else policy in ("Always", "OnError", "OnTransientError")
            )
            if not retryable:
                run.nodes[root].update(phase=phase, finishedAt=rfc3339(), message=message)
                self._fail(run, phase, message)
                return
            if attempt >= limit:
                message = "No more retries left"
                run.nodes[root].update(phase=phase, finishedAt=rfc3339(), message=message)
                self._fail(run, phase, message)
                return
            attempt += 1
            self._set_phase(run, "Running")
            await asyncio.sleep(self.retry_delay)

    async def _attempt(
        self,
        run: _Run,
        wf: JsonObj,
        template_name: str,
        containers: list[JsonObj],
        container_set: bool,
        variables: dict[str, str],
        node_name: str,
        parent: str | None,
        attempt: int,
    ) -> tuple[str, str]:
        """One pod: returns the Pod node's final (phase, message)."""
        spec = wf.get("spec") or {}
        containers = _substitute(containers, {**variables, "retries": str(attempt)})
        pid = node_id(run.name, node_name)
        pname = pod_name(run.name, node_name, template_name if parent is not None else None)
        run.pod, run.pod_node = pname, pid
        run.pods.append(pname)
        now = rfc3339()
        node: JsonObj = {
            "id": pid, "name": node_name, "displayName": node_name if parent else run.name,
            "type": "Pod", "templateName": template_name, "templateScope": f"local/{run.name}",
            "phase": "Pending", "startedAt": now, "progress": "0/1",
            "hostNodeName": "fake-node-1",
        }  # fmt: skip
        if parent is not None:
            node["boundaryID"] = parent
        run.nodes[pid] = node
        run.container_nodes = {}
        names = [str(c.get("name")) for c in containers]
        if container_set:
            node["children"] = []
            for cname in names:
                cnode_name = f"{node_name}.{cname}"
                cid = node_id(run.name, cnode_name)
                run.container_nodes[cname] = cid
                node["children"].append(cid)
                run.nodes[cid] = {
                    "id": cid, "name": cnode_name, "displayName": cname, "type": "Container",
                    "templateName": template_name, "templateScope": f"local/{run.name}",
                    "phase": "Pending", "boundaryID": parent or pid, "startedAt": now,
                    "progress": "0/1",
                }  # fmt: skip

        pod_meta = spec.get("podMetadata") or {}
        labels = {
            **(pod_meta.get("labels") or {}),
            WORKFLOW_LABEL: run.name,
            COMPLETED_LABEL: "false",
        }
        annotations = {
            **(pod_meta.get("annotations") or {}),
            NODE_NAME_ANNOTATION: node_name,
            NODE_ID_ANNOTATION: pid,
            "kubectl.kubernetes.io/default-container": names[0],
        }
        pod_containers: list[JsonObj] = [
            {"name": "wait", "image": EXECUTOR_IMAGE, "command": ["argoexec"], "args": ["wait"]}
        ]
        for container in containers:
            pod_containers.append(
                {k: v for k, v in container.items() if k not in ("dependencies",)}
            )
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pname,
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [{
                    "apiVersion": WORKFLOWS.api_version, "kind": WORKFLOWS.kind,
                    "name": run.name, "uid": wf["metadata"]["uid"], "controller": True,
                    "blockOwnerDeletion": True,
                }],
            },
            "spec": {"containers": pod_containers, "restartPolicy": "Never",
                     "nodeName": "fake-node-1"},
            "status": {
                "phase": "Pending",
                "containerStatuses": [
                    _cstatus(c["name"], c.get("image") or "", {"waiting": {
                        "reason": "ContainerCreating"}}) for c in pod_containers
                ],
            },
        }  # fmt: skip
        self._store.create(PODS, run.namespace, pod)
        self._set_phase(run, "Running")

        engine = self._engine_container(containers)
        await asyncio.sleep(self.step_delay)
        if run.scenario.image_pull:
            target = engine or names[-1]
            image = next(str(c.get("image") or "") for c in containers if c["name"] == target)
            for reason, text in (
                ("ErrImagePull", f'failed to pull and unpack image "{image}": not found'),
                ("ImagePullBackOff", f'Back-off pulling image "{image}"'),
            ):
                self._pod_container(run, target, {"waiting": {"reason": reason, "message": text}})
                node["message"] = f"{reason}: {text}"
                self._set_phase(run, "Running")
                await asyncio.sleep(self.step_delay * 2)
            await asyncio.Event().wait()  # until shutdown or deletion cancels the run

        start = rfc3339()
        self._patch_pod(run, {"status": {
            "phase": "Running", "startTime": start,
            "containerStatuses": [
                _cstatus(c["name"], c.get("image") or "", {"running": {"startedAt": start}})
                for c in pod_containers
            ],
        }})  # fmt: skip
        node.update(phase="Running")
        self._append(run, "wait", 'level=info msg="Starting Workflow Executor (test double)"')
        self._set_phase(run, "Running")

        failed: tuple[str, str] | None = None
        for container in containers:
            cname = str(container["name"])
            cnode_id = run.container_nodes.get(cname)
            if failed is not None:
                self._terminate(run, cname, 0, "Completed")
                if cnode_id:
                    run.nodes[cnode_id].update(phase="Omitted", finishedAt=rfc3339())
                continue
            if cnode_id:
                run.nodes[cnode_id].update(phase="Running")
                self._set_phase(run, "Running")
            if cname == engine:
                code = await self._run_engine(run, container, attempt)
            else:
                self._append(run, cname, f"[{cname}] started (controller double)")
                await asyncio.sleep(self.step_delay)
                self._append(run, cname, f"[{cname}] finished (controller double)")
                code = 0
            termination = self._termination_message(run, container) if code else None
            self._terminate(run, cname, code, "Completed" if code == 0 else "Error", termination)
            if cnode_id:
                cmsg = {} if code == 0 else {"message": f"Error (exit code {code})"}
                run.nodes[cnode_id].update(
                    phase="Succeeded" if code == 0 else "Failed", finishedAt=rfc3339(), **cmsg
                )
            if code != 0:
                message = f"{cname}: Error (exit code {code})"
                failed = ("Failed", f"{message}: {termination}" if termination else message)
            self._set_phase(run, "Running")

        self._terminate(run, "wait", 0, "Completed")
        phase, message = failed or ("Succeeded", "")
        self._patch_pod(run, {
            "metadata": {"labels": {COMPLETED_LABEL: "true"}},
            "status": {"phase": phase},
        })  # fmt: skip
        node.update(phase=phase, finishedAt=rfc3339(), progress="1/1" if not failed else "0/1")
        if message:
            node["message"] = message
        run.pod = None
        return phase, message

    def _engine_container(self, containers: list[JsonObj]) -> str | None:
        for container in containers:
            if container.get("name") == self.engine_container:
                return self.engine_container
        for container in containers:
            text = " ".join(
                str(t) for t in (container.get("command") or []) + (container.get("args") or [])
            )
            if "run.py" in text or "odm_test_engine" in text or "odm-test-engine" in text:
                return str(container["name"])
        return None

    async def _run_engine(self, run: _Run, container: JsonObj, attempt: int) -> int:
        root = self.workdir / f"{run.namespace}-{run.name}-{attempt}"
        images = root / run.name / "images"
        images.mkdir(parents=True, exist_ok=True)
        for i in range(self.images):
            (images / f"IMG_{i + 1:04d}.JPG").write_bytes(b"\xff\xd8\xff\xe0fake jpeg\xff\xd9")
        run.project_dirs.append(root)
        options = engine_options(container)
        argv = [*options, "--project-path", str(root), run.name]
        run.engine_args.append(argv)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ODM_TEST_ENGINE_")}
        seconds = run.scenario.engine_seconds
        env["ODM_TEST_ENGINE_SECONDS"] = str(self.engine_seconds if seconds is None else seconds)
        env["ODM_TEST_ENGINE_PROGRESS_PORT"] = str(free_udp_port())
        if run.scenario.exit_code is not None:
            env["ODM_TEST_ENGINE_FAIL"] = str(run.scenario.exit_code)
        if run.scenario.fail_stage is not None:
            env["ODM_TEST_ENGINE_FAIL_STAGE"] = run.scenario.fail_stage
        if not self.ansi:
            env["no_ansiesc"] = "1"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "odm_test_engine", *argv,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL, env=env, cwd=str(root), start_new_session=True,
        )  # fmt: skip
        run.processes.append(process)
        cname = str(container["name"])
        try:
            assert process.stdout is not None
            while line := await process.stdout.readline():
                await run.log_gate.wait()
                self._append(run, cname, line.decode(errors="replace").rstrip("\r\n"))
            returncode = await process.wait()
        finally:
            await _kill(process)
        return exit_code_of(returncode)

    # -- pod helpers

    def _append(self, run: _Run, container: str, text: str) -> None:
        if run.pod is not None and self._store.exists(PODS, run.namespace, run.pod):
            self._store.append_log(run.namespace, run.pod, container, text)

    def _patch_pod(self, run: _Run, patch: JsonObj) -> None:
        if run.pod is None:
            return
        try:
            self._store.patch(PODS, run.namespace, run.pod, patch)
        except ApiError as error:
            if error.code != 404:
                raise

    def _pod_container(self, run: _Run, container: str, state: JsonObj) -> None:
        if run.pod is None or not self._store.exists(PODS, run.namespace, run.pod):
            return
        pod = self._store.get(PODS, run.namespace, run.pod)
        statuses = pod["status"]["containerStatuses"]
        for item in statuses:
            if item["name"] == container:
                item["state"] = state
                item["ready"] = "running" in state
                item["started"] = "running" in state
        self._patch_pod(run, {"status": {"containerStatuses": statuses}})

    def _termination_message(self, run: _Run, container: JsonObj) -> str | None:
        """``FallbackToLogsOnError``: the kubelet's last 80 log lines / 2048 bytes."""
        if container.get("terminationMessagePolicy") != "FallbackToLogsOnError" or not run.pod:
            return None
        lines = self._store.log_lines(run.namespace, run.pod, str(container["name"]))[-80:]
        data = "\n".join(line.text for line in lines).encode()[-2048:]
        return data.decode(errors="replace") or None

    def _terminate(
        self, run: _Run, container: str, code: int, reason: str, message: str | None = None
    ) -> None:
        if run.pod is None or not self._store.exists(PODS, run.namespace, run.pod):
            return
        pod = self._store.get(PODS, run.namespace, run.pod)
        for item in pod["status"]["containerStatuses"]:
            if item["name"] == container:
                started = (item.get("state") or {}).get("running", {}).get("startedAt")
                terminated: JsonObj = {
                    "exitCode": code, "reason": reason, "startedAt": started or rfc3339(),
                    "finishedAt": rfc3339(),
                }  # fmt: skip
                if message:
                    terminated["message"] = message
                self._pod_container(run, container, {"terminated": terminated})

    def _finish_stopped(self, run: _Run) -> None:
        strategy = run.shutdown or "Terminate"
        had_pod = run.pod is not None and self._store.exists(PODS, run.namespace, run.pod)
        # Argo's two wordings: nodes whose pod it terminates get two spaces, others one.
        spaces = "  " if had_pod else " "
        node_message = f"workflow shutdown with strategy:{spaces}{strategy}"
        now = rfc3339()
        if run.pod is not None and had_pod:
            pod = self._store.get(PODS, run.namespace, run.pod)
            for item in pod["status"]["containerStatuses"]:
                state = item.get("state") or {}
                if "terminated" in state:
                    continue
                code, reason = (143, "Error") if "running" in state else (0, "ContainerCannotRun")
                self._terminate(run, item["name"], code, reason)
            self._patch_pod(run, {
                "metadata": {"labels": {COMPLETED_LABEL: "true"}},
                "status": {"phase": "Failed"},
            })  # fmt: skip
        for node in run.nodes.values():
            if node.get("phase") in ("Pending", "Running"):
                node.update(phase="Failed", finishedAt=now, message=node_message)
        run.pod = None
        self._set_phase(run, "Failed", message=f"Stopped with strategy '{strategy}'")


def _cstatus(name: str, image: str, state: JsonObj) -> JsonObj:
    running = "running" in state
    return {"name": name, "image": image, "imageID": "", "ready": running,
            "restartCount": 0, "started": running, "state": state}  # fmt: skip


async def _kill(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the engine's process group, SIGKILL after 3 s; reap it."""
    if process.returncode is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        await asyncio.wait_for(process.wait(), timeout=3)
    except TimeoutError:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await process.wait()


@dataclass
class FakeCluster:
    """A started apiserver double + controller double + kubeconfig (see :func:`fake_cluster`)."""

    server: FakeApiServer
    controller: Controller
    kubeconfig: Path


@contextmanager
def fake_cluster(tmp: Path, **controller_options: Any) -> Iterator[FakeCluster]:
    """Start the apiserver double and the controller double; write ``tmp/kubeconfig``.

    Usable from any test package (``with fake_cluster(tmp_path) as k8s: ...``); the pytest
    fixtures in ``tests/k8s/conftest.py`` wrap it.
    """
    server = FakeApiServer().start()
    controller: Controller | None = None
    try:
        kubeconfig = server.write_kubeconfig(tmp / "kubeconfig")
        controller = Controller(server, tmp / "controller", **controller_options).start()
        yield FakeCluster(server, controller, kubeconfig)
    finally:
        if controller is not None:
            controller.stop()
        server.stop()
