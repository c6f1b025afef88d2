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
parallelism/queueing (use ``hold``), progress-file reporting, artifacts (no ``init`` container),
node offloading, Argo's own validation.
"""

from __future__ import annotations

import asyncio
import copy
import os
import shlex
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.k8s.apiserver import (
    ADDED,
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

    @property
    def pod(self) -> str | None:
        """The latest attempt's pod."""
        return self.pods[-1] if self.pods else None


class _Gone(Exception):
    """The workflow was deleted while running."""


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
        self._scenarios: dict[str, Scenario] = {}
        self._runs: dict[tuple[str, str], _Run] = {}
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
                    )
            return None

        return self.server.call(snapshot)

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
        if rt is not WORKFLOWS or self._stopping:
            return
        meta = event.obj["metadata"]
        key = (meta["namespace"], meta["name"])
        run = self._runs.get(key)
        if event.type == ADDED:
            if (meta.get("labels") or {}).get(MANAGED_BY) != self.managed_by:
                return
            scenario = copy.deepcopy(self._scenarios.get(key[1]) or Scenario())
            run = _Run(key[0], key[1], scenario)
            run.log_gate.set()
            if not scenario.held:
                run.release.set()
            self._runs[key] = run
            run.task = asyncio.get_running_loop().create_task(self._drive(run))
        elif event.type == MODIFIED and run is not None and not run.done:
            strategy = (event.obj.get("spec") or {}).get("shutdown")
            if strategy and run.shutdown is None:
                run.shutdown = str(strategy)
                if run.task is not None:
                    run.task.cancel()
        elif event.type == DELETED and run is not None:
            run.deleted = True
            if run.task is not None and not run.task.done():
                run.task.cancel()
            else:
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
        if phase in FINAL_PHASES:
            body.setdefault("finishedAt", rfc3339())
            body["conditions"] = [{"type": "Completed", "status": "True"}]
            body.setdefault("progress", "1/1" if phase == "Succeeded" else "0/1")
        self._patch_workflow(run, {"metadata": {"labels": labels}, "status": body})

    def _fail(self, run: _Run, phase: str, message: str) -> None:
        self._set_phase(run, phase, message=message)

    async def _execute(self, run: _Run) -> None:
        wf = self._workflow(run)
        spec = wf.get("spec") or {}
        if spec.get("shutdown"):
            run.shutdown = str(spec["shutdown"])
            self._finish_stopped(run)
            return
        await run.release.wait()
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

        if self.pending_phase:
            await asyncio.sleep(self.step_delay)
            self._set_phase(run, "Pending", progress="0/1")
        await asyncio.sleep(self.step_delay)
        started = rfc3339()
        self._set_phase(run, "Running", startedAt=started, progress="0/1")

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
