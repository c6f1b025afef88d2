"""Following Argo Workflows: list + watch with bookmarks, and the ``main`` container's log.

Workflows are watched with a label selector on our own stable labels (never on Argo's
``completed`` label, which would hide the final state, stack-notes §2.4): managed-by plus the
shards this replica owns. Several replicas split the work by the ``scaleodm.io/shard`` label
the scheduler sets (replica k of N follows shards s with s % N == k) — chosen over leader
election because it scales the watcher out instead of keeping N-1 replicas idle, needs no Lease
RBAC, and a brief overlap during a rollout is harmless: every event id is deterministic and the
event log deduplicates.

The loop: list (an authoritative snapshot, each item handled idempotently) -> watch from the
list's resourceVersion with bookmarks and a server timeout -> continue from the last seen
version -> relist on 410 Gone. Phases map to NodeODM codes; a Failed workflow that was shut
down is a cancel (50), never a failure. Image-pull and container-config errors end the task 30
with a clear message. Console lines come from the pods' ``main`` container, re-read from the
start on every (re)connect and numbered by ``ConsoleReporter``, so a restart or reconnect
neither loses nor repeats a line. The resource, label and container names are the contract the
scheduler builds Workflows with (``scaleodm.common.argoruns``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from scaleodm.common import argoruns, metrics, tracing
from scaleodm.common.contracts import events
from scaleodm.common.domain.progress import PACKAGING_PROGRESS
from scaleodm.common.domain.status import engine_exit_message
from scaleodm.common.emitting import Emitter
from scaleodm.common.logging import bind_task, get_logger
from scaleodm.common.settings import WatcherSettings
from scaleodm.common.store.tasks import TaskStore
from scaleodm.watcher.console import ConsoleReporter, LineSplitter

log = get_logger(__name__)

INFRA_ERRORS = re.compile(
    r"errimagepull|imagepullbackoff|failed to pull image|back-off pulling image|invalidimagename"
    r"|createcontainerconfigerror|createcontainererror|secret .* not found",
    re.IGNORECASE,
)
EXIT_CODE = re.compile(r"exit code (\d+)", re.IGNORECASE)
LOG_RETRY_S = 1.0


def owned_shards(shards: int, replica: int, replicas: int) -> list[int]:
    return [s for s in range(shards) if s % max(1, replicas) == replica]


def selector(shards: list[int]) -> str:
    """Our Workflows (managed-by) in the given shards."""
    managed = f"{argoruns.LABEL_MANAGED_BY}={argoruns.MANAGED_BY}"
    return f"{managed},{argoruns.LABEL_SHARD} in ({','.join(str(s) for s in shards)})"


def _messages(wf: dict[str, Any]) -> list[str]:
    status = wf.get("status") or {}
    found = [status.get("message") or ""]
    nodes = status.get("nodes") or {}
    found += [(n or {}).get("message") or "" for n in nodes.values()]
    return [m for m in found if m]


class ArgoRunSource:
    def __init__(
        self, api: client.ApiClient, store: TaskStore, emitter: Emitter, settings: WatcherSettings
    ) -> None:
        self.api = api
        self.store = store
        self.emitter = emitter
        self.settings = settings
        self.argo = settings.argo
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.selector = selector(
            owned_shards(self.argo.shards, settings.replica, settings.replicas)
        )
        self.followers: dict[str, asyncio.Task[None]] = {}
        self.reporters: dict[str, ConsoleReporter] = {}
        self.resource_version: str | None = None

    async def run(self) -> None:
        try:
            while True:
                try:
                    if self.resource_version is None:
                        await self._list()
                    await self._watch()
                except ApiException as exc:
                    if exc.status == 410:
                        log.info("watch expired (410); relisting")
                        self.resource_version = None
                        continue
                    log.warning("kubernetes API error; retrying", status=exc.status)
                    await asyncio.sleep(LOG_RETRY_S)
                except (TimeoutError, OSError, client.exceptions.ApiException) as exc:
                    log.warning("kubernetes API unreachable; retrying", error=repr(exc))
                    await asyncio.sleep(LOG_RETRY_S)
        finally:
            for task in self.followers.values():
                task.cancel()
            for task in self.followers.values():
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _list(self) -> None:
        with metrics.kubernetes_call("list", "workflows"):
            listing = await self.custom.list_namespaced_custom_object(
                argoruns.GROUP, argoruns.VERSION, self.argo.namespace, argoruns.PLURAL,
                label_selector=self.selector,
                _request_timeout=self.argo.request_timeout_s,
            )
        for wf in listing.get("items", []):
            await self.handle(wf)
        self.resource_version = listing["metadata"]["resourceVersion"]

    async def _watch(self) -> None:
        w = watch.Watch()
        async with w.stream(
            self.custom.list_namespaced_custom_object, argoruns.GROUP, argoruns.VERSION,
            self.argo.namespace, argoruns.PLURAL, label_selector=self.selector,
            resource_version=self.resource_version, allow_watch_bookmarks=True,
            timeout_seconds=self.argo.watch_timeout_s,
        ) as stream:
            async for event in stream:
                kind, obj = event["type"], event["object"]
                if kind != "BOOKMARK" and kind != "DELETED":
                    await self.handle(obj)
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if rv:
                    self.resource_version = rv

    async def handle(self, wf: dict[str, Any]) -> None:
        meta = wf.get("metadata") or {}
        labels = meta.get("labels") or {}
        task_id = labels.get(argoruns.LABEL_TASK)
        try:
            attempt = int(labels.get(argoruns.LABEL_ATTEMPT, ""))
        except ValueError:
            return
        if not task_id:
            return
        annotations = meta.get("annotations") or {}
        with bind_task(task_id, attempt=attempt, workflow=meta.get("name")), \
                tracing.continued(annotations.get(argoruns.TRACE_ANNOTATION)):
            try:  # its events (and its log followers, started here) join the run's trace
                await self._handle(wf, task_id, attempt)
            except Exception:
                log.exception("workflow event not handled")

    async def _handle(self, wf: dict[str, Any], task_id: str, attempt: int) -> None:
        name = wf["metadata"]["name"]
        phase = (wf.get("status") or {}).get("phase") or ""
        if phase in ("", "Pending", "Running"):
            infra = next((m for m in _messages(wf) if INFRA_ERRORS.search(m)), None)
            if infra is not None:
                await self.emitter.emit(events.new(
                    events.TaskFailed, task_id, attempt,
                    error_message=f"Could not start the run's containers: {infra}",
                ))
                return
        if phase == "Running":
            await self.emitter.emit(events.new(events.TaskRunning, task_id, attempt))
            await self._follow(name, task_id, attempt)
        elif phase in ("Succeeded", "Failed", "Error"):
            if _ran_a_pod(wf):
                await self._follow(name, task_id, attempt)
                follower = self.followers.get(name)
                if follower is not None:  # report every console line before the terminal event
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(follower), 30)
            # else no pod ever ran (shut down or refused while it waited for its semaphores):
            # no log to wait for, and waiting would hold up every later event of the watch.
            await self._finish(wf, task_id, attempt, phase)

    async def _finish(self, wf: dict[str, Any], task_id: str, attempt: int, phase: str) -> None:
        spec, status = wf.get("spec") or {}, wf.get("status") or {}
        message = status.get("message") or ""
        if spec.get("shutdown") or message.startswith("Stopped with strategy"):
            # A cancel, never 30 — nor 40: Argo ends a Workflow shut down while it waited for
            # its semaphores "Succeeded" (and a cancel turns 40 into 50 anyway, §3.9).
            await self.emitter.emit(events.new(events.TaskCanceled, task_id, attempt))
        elif phase == "Succeeded":
            await self.emitter.emit(events.new(events.TaskCompleted, task_id, attempt))
        else:
            await self.emitter.emit(events.new(
                events.TaskFailed, task_id, attempt, error_message=self._failure(wf)
            ))
        self.reporters.pop(wf["metadata"]["name"], None)

    @staticmethod
    def _failure(wf: dict[str, Any]) -> str:
        for message in _messages(wf):
            match = EXIT_CODE.search(message)
            if match:
                return engine_exit_message(int(match.group(1)))
        messages = _messages(wf)
        return messages[0] if messages else "Processing failed"

    async def _follow(self, name: str, task_id: str, attempt: int) -> None:
        if name in self.followers:
            return
        doc = await self.store.get_task(task_id)
        if doc is None or doc["attempt"] != attempt:
            log.info("workflow is not the task's current attempt; log not followed")
            return
        reporter = ConsoleReporter(
            self.emitter, task_id, attempt,
            skip=await self.store.output_end(task_id, attempt),
            progress=float(doc.get("progress", 0.0)),
            batch_lines=self.settings.output_batch_lines,
        )
        self.reporters[name] = reporter
        self.followers[name] = asyncio.create_task(
            self._follow_logs(name, reporter), name=f"logs-{name}"
        )
        log.info("following the workflow's log", skip=reporter.skip)

    async def _follow_logs(self, name: str, reporter: ConsoleReporter) -> None:
        """Stream the engine container of the workflow's pods until they all terminated."""
        with bind_task(reporter.task_id, attempt=reporter.attempt, workflow=name):
            while True:
                try:
                    if await self._read_pods(name, reporter):
                        return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("following the workflow's log failed; retrying")
                await asyncio.sleep(LOG_RETRY_S)

    async def _read_pods(self, name: str, reporter: ConsoleReporter) -> bool:
        """One pass over the workflow's pods; True when every engine container ended."""
        pods = await self._pods(name)
        reporter.rewind()  # each pass re-reads from the first line; recorded lines are skipped
        for pod in pods:
            state = self._main_state(pod)
            if state is None:
                return False  # main not started yet
            try:
                await self._stream_log(pod["metadata"]["name"], reporter)
            except ApiException as exc:
                if exc.status in (400, 404):  # not started yet, or gone (pod GC)
                    return False
                raise
            if state != "terminated" and self._main_state(await self._pod(pod)) != "terminated":
                return False
        if not pods:
            return False
        if any(self._container_running(p, argoruns.UPLOAD_CONTAINER) for p in pods):
            await reporter.phase_progress(PACKAGING_PROGRESS, "packaging")
        return True

    async def _pod(self, pod: dict[str, Any]) -> dict[str, Any]:
        with metrics.kubernetes_call("get", "pods"):
            fresh = await self.core.read_namespaced_pod(
                pod["metadata"]["name"], self.argo.namespace,
                _request_timeout=self.argo.request_timeout_s,
            )
        result: dict[str, Any] = self.api.sanitize_for_serialization(fresh)
        return result

    async def _pods(self, workflow: str) -> list[dict[str, Any]]:
        with metrics.kubernetes_call("list", "pods"):
            listing = await self.core.list_namespaced_pod(
                self.argo.namespace, label_selector=f"{argoruns.LABEL_WORKFLOW}={workflow}",
                _request_timeout=self.argo.request_timeout_s,
            )
        pods = [self.api.sanitize_for_serialization(p) for p in listing.items]
        return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "")

    @staticmethod
    def _main_state(pod: dict[str, Any]) -> str | None:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") == argoruns.ENGINE_CONTAINER:
                state = cs.get("state") or {}
                if "terminated" in state:
                    return "terminated"
                if "running" in state:
                    return "running"
        return None

    @staticmethod
    def _container_running(pod: dict[str, Any], container: str) -> bool:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") == container and "running" in (cs.get("state") or {}):
                return True
        return False

    async def _stream_log(self, pod: str, reporter: ConsoleReporter) -> None:
        resp: Any = await self.core.read_namespaced_pod_log(
            pod, self.argo.namespace, container=argoruns.ENGINE_CONTAINER, follow=True,
            _preload_content=False,
        )  # an aiohttp response, read as it grows
        if resp.status != 200:  # not started yet / pod gone: a Status object, not log lines
            status = resp.status
            resp.release()
            raise ApiException(status=status, reason="pod log unavailable")
        try:
            splitter = LineSplitter()
            async for chunk in resp.content.iter_any():
                await reporter.feed(splitter.feed(chunk))
            await reporter.feed(splitter.flush())
        finally:
            resp.release()


def _ran_a_pod(wf: dict[str, Any]) -> bool:
    """Whether Argo created a pod for the Workflow (a ``Pod`` node in its status)."""
    nodes = (wf.get("status") or {}).get("nodes") or {}
    return any(node.get("type") == "Pod" for node in nodes.values())
