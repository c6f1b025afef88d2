"""A Kubernetes apiserver double on 127.0.0.1 for the real ``kubernetes_asyncio`` client.

It serves, over plain HTTP/1.1 (aiohttp, in its own thread with its own event loop), exactly the
calls ScaleODM's Argo executor and watcher make, with the apiserver semantics those calls rely on:

* ``argoproj.io/v1alpha1`` ``workflows`` (namespaced; list/watch also cluster-wide): create (201,
  ``generateName`` supported, 409 ``AlreadyExists``, 422 ``Invalid`` for bad names/labels, 400 for
  a missing/wrong ``kind``), get, list, merge-patch (RFC 7386, ``metadata.resourceVersion``
  precondition → 409 ``Conflict``; no-op patches change nothing and emit nothing; JSON-patch
  arrays are applied too), delete (returns the deleted object, emits ``DELETED``), watch.
* core ``v1`` ``pods`` (read-only over HTTP; created by the controller double in-process): get,
  list, watch, and ``pods/{name}/log`` with ``container``, ``follow``, ``timestamps``,
  ``sinceSeconds``, ``tailLines``, ``limitBytes``.
* core ``v1`` ``configmaps`` (namespaced): create, get, list, merge-patch, delete, watch, as for
  workflows (a strategic merge patch, ``kubernetes_asyncio``'s default for core types, is applied
  as a merge patch: the same thing for a ConfigMap's ``data``); ``data`` must map strings to
  strings (400 otherwise); delete answers a ``Status`` (``Success``), as for core types. The
  controller double reads its Workflows' semaphore limits there.
* ``/version``, ``/api``, ``/apis`` (minimal discovery; ``kubernetes_asyncio`` does not call them).

Semantics kept: one global, monotonically increasing ``resourceVersion`` (string integers) shared
by all objects (like etcd's revision); lists carry ``metadata.resourceVersion``; watches stream
newline-delimited JSON events after the requested version (``""``/``"0"``/absent: synthetic
``ADDED`` for the current objects first), honour ``labelSelector``/``fieldSelector`` with the
apiserver's transition rules (an object that stops matching arrives as ``DELETED`` carrying its
*previous* state; one that starts matching as ``ADDED``), ``allowWatchBookmarks`` (a ``BOOKMARK``
every :attr:`FakeApiServer.bookmark_interval` seconds and one at the end) and ``timeoutSeconds``.
:meth:`FakeApiServer.compact` drops the event history: a watch from an older version then gets a
410 ``Expired`` "too old resource version" — by default as an ``ERROR`` watch event on a 200 stream
(what the apiserver's watch cache does), or as an HTTP 410 ``Status`` with
``expired_as="status"``; ``kubernetes_asyncio.watch.Watch`` turns either into
``ApiException(status=410)`` when ``timeout_seconds`` is passed (without it, the client retries a
410 once on its own). Bearer-token auth (401 ``Unauthorized`` otherwise). Errors are ``Status``
objects with the apiserver's ``code``/``reason``/``message`` shapes. Every request is recorded
(:attr:`FakeApiServer.requests`: method, path, query, status).

Pod logs: stored per (namespace, pod, container) with a nanosecond timestamp per line. A pod with
more than one container needs ``container=`` (400, as the apiserver); an unknown container is a
400; a container that never started (``state.waiting``) answers 400 "... is waiting to start:
<reason>" like the kubelet. ``follow`` streams appended lines and ends when that container is
``terminated`` (or the pod is deleted, or the server stops). ``timestamps`` prefixes each line with
the kubelet's fixed-width RFC 3339 nano UTC form (``2026-11-22T05:00:00.123456789Z``).

Left out on purpose: other resources and verbs (PUT/update, deleteCollection, status
subresources — Argo's Workflow CRD has none), server-side apply and strategic merge patch (415;
ConfigMaps excepted, above),
pagination (``limit`` is accepted and ignored, no ``continue``), ``resourceVersionMatch``,
``sendInitialEvents``, finalizers, garbage collection (the controller double deletes a workflow's
pods itself), admission and schema validation, TLS, RBAC.

Threading: all state lives on the server's event loop. The in-process methods of
:class:`FakeApiServer` (``create``, ``get``, ``list_objects``, ``patch``, ``delete``,
``append_log``, ``compact``, ...) may be called from any thread: they run the operation on the
server loop and return its result. Code already running on that loop (the controller double) uses
:attr:`FakeApiServer.store` directly.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import copy
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from aiohttp import web

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from kubernetes_asyncio.client import ApiClient

T = TypeVar("T")
JsonObj = dict[str, Any]

ADDED, MODIFIED, DELETED, BOOKMARK, ERROR = "ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"


# ------------------------------------------------------------------------------------ resources


@dataclass(frozen=True)
class ResourceType:
    """A served resource: ``plural`` is also its key in the store."""

    plural: str
    group: str
    version: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """``workflows.argoproj.io`` / ``pods``, as in apiserver messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


WORKFLOWS = ResourceType("workflows", "argoproj.io", "v1alpha1", "Workflow")
PODS = ResourceType("pods", "", "v1", "Pod")
CONFIGMAPS = ResourceType("configmaps", "", "v1", "ConfigMap")
SECRETS = ResourceType("secrets", "", "v1", "Secret")
RESOURCES: dict[str, ResourceType] = {
    WORKFLOWS.plural: WORKFLOWS, PODS.plural: PODS, CONFIGMAPS.plural: CONFIGMAPS,
    SECRETS.plural: SECRETS,
}
#: Resources clients may create, patch and delete over HTTP (pods are the controller's).
WRITABLE = frozenset({WORKFLOWS, CONFIGMAPS, SECRETS})


# --------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An apiserver error; :meth:`status` is the ``Status`` object sent to clients."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: JsonObj | None = None,
    ) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> JsonObj:
        body: JsonObj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{rt.qualified} "{name}" not found',
        {"name": name, "group": rt.group, "kind": rt.plural},
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def invalid(rt: ResourceType, name: str, field_path: str, value: str, why: str) -> ApiError:
    message = f'{rt.kind}.{rt.group or "core"} "{name}" is invalid: {field_path}: Invalid value: '
    message += f'"{value}": {why}'
    cause = {
        "reason": "FieldValueInvalid",
        "message": f"Invalid value: {value!r}: {why}",
        "field": field_path,
    }
    details = {"name": name, "group": rt.group, "kind": rt.kind, "causes": [cause]}
    return ApiError(422, "Invalid", message, details)


# ------------------------------------------------------------------------------------ selectors

_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def label_key_error(key: str) -> str | None:
    """Why ``key`` is not a valid label key, or ``None``."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return "prefix part must be a lowercase RFC 1123 subdomain"
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start "
            "and end with an alphanumeric character (at most 63 characters)"
        )
    return None


def label_value_error(value: str) -> str | None:
    """Why ``value`` is not a valid label value, or ``None``."""
    if value == "":
        return None
    if len(value) > 63 or not _LABEL_NAME.match(value):
        return (
            "a valid label must be an empty string or consist of alphanumeric characters, '-', "
            "'_' or '.', and must start and end with an alphanumeric character (at most 63)"
        )
    return None


@dataclass(frozen=True)
class Requirement:
    """One label-selector term; ``op``: ``=``, ``!=``, ``in``, ``notin``, ``exists``, ``!``."""

    key: str
    op: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "=":
            return present and value == self.values[0]
        if self.op == "!=":
            return not present or value != self.values[0]
        if self.op == "in":
            return present and value in self.values
        if self.op == "notin":
            return not present or value not in self.values
        if self.op == "exists":
            return present
        return not present  # "!"


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_RE_EXISTS = re.compile(rf"^\s*(!?)\s*({_KEY})\s*$")
_RE_EQ = re.compile(rf"^\s*({_KEY})\s*(==|=|!=)\s*([-A-Za-z0-9_.]*)\s*$")
_RE_SET = re.compile(rf"^\s*({_KEY})\s+(in|notin)\s*\(([^()]*)\)\s*$")


def parse_label_selector(text: str | None) -> list[Requirement]:
    """Parse a label selector (``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a)``,
    ``k``, ``!k``, comma-joined). Raises a 400 :class:`ApiError` like the apiserver."""
    if text is None or not text.strip():
        return []
    requirements: list[Requirement] = []
    for part in _split_top_level(text):
        requirement: Requirement | None = None
        if m := _RE_SET.match(part):
            values = tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            if values:
                requirement = Requirement(m.group(1), m.group(2), values)
        elif m := _RE_EQ.match(part):
            op = "=" if m.group(2) in ("=", "==") else "!="
            requirement = Requirement(m.group(1), op, (m.group(3),))
        elif m := _RE_EXISTS.match(part):
            requirement = Requirement(m.group(2), "!" if m.group(1) else "exists")
        if (
            requirement is None
            or label_key_error(requirement.key) is not None
            or any(label_value_error(v) for v in requirement.values)
        ):
            raise bad_request(f"unable to parse requirement: {part.strip()!r} in {text!r}")
        requirements.append(requirement)
    return requirements


_FIELDS: dict[str, tuple[str, ...]] = {
    "workflows": ("metadata.name", "metadata.namespace"),
    "pods": ("metadata.name", "metadata.namespace", "status.phase", "spec.nodeName"),
}


def parse_field_selector(rt: ResourceType, text: str | None) -> list[tuple[str, str, str]]:
    """``metadata.name``/``metadata.namespace`` (pods also ``status.phase``, ``spec.nodeName``)
    with ``=``, ``==``, ``!=``; anything else is a 400 like the apiserver."""
    if text is None or not text.strip():
        return []
    terms = []
    for part in text.split(","):
        m = re.match(r"^\s*([A-Za-z.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{part}'")
        if m.group(1) not in _FIELDS[rt.plural]:
            raise bad_request(f"field label not supported: {m.group(1)}")
        terms.append((m.group(1), "!=" if m.group(2) == "!=" else "=", m.group(3)))
    return terms


def _field_value(obj: JsonObj, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


@dataclass(frozen=True)
class Selector:
    """Namespace + label + field filter of a list or watch."""

    namespace: str | None = None
    labels: tuple[Requirement, ...] = ()
    fields: tuple[tuple[str, str, str], ...] = ()

    def matches(self, obj: JsonObj | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        if not all(r.matches(labels) for r in self.labels):
            return False
        for path, op, want in self.fields:
            if (_field_value(obj, path) == want) != (op == "="):
                return False
        return True


# ---------------------------------------------------------------------------------- merge patch


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (``null`` deletes a key; non-objects replace)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(target: Any, ops: list[Any]) -> Any:
    """RFC 6902 JSON patch: ``add``, ``remove``, ``replace``, ``test`` (enough for a double)."""
    doc = copy.deepcopy(target)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise bad_request("invalid JSON patch operation")
        parts = _pointer(op["path"])
        if not parts:
            raise bad_request("JSON patch on the document root is not supported by the double")
        parent: Any = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.get(part)
            if parent is None:
                raise ApiError(422, "Invalid", f"doc is missing path: {op['path']}")
        last = parts[-1]
        kind = op["op"]
        if kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != op.get("value"):
                raise ApiError(422, "Invalid", f"testing value {op['path']} failed")
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                if kind == "add":
                    parent.insert(index, copy.deepcopy(op.get("value")))
                else:
                    parent[index] = copy.deepcopy(op.get("value"))
            else:
                if kind == "replace" and last not in parent:
                    raise ApiError(422, "Invalid", f"replace operation does not apply: {last}")
                parent[last] = copy.deepcopy(op.get("value"))
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            elif last in parent:
                del parent[last]
            else:
                raise ApiError(422, "Invalid", f"remove operation does not apply: {last}")
        else:
            raise bad_request(f"unsupported JSON patch operation {kind!r}")
    return doc


# ---------------------------------------------------------------------------------------- times


def rfc3339(at: float | None = None) -> str:
    """``metav1.Time`` form: seconds precision, UTC, ``Z``."""
    moment = datetime.fromtimestamp(time.time() if at is None else at, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_nano(ts_ns: int) -> str:
    """The kubelet's log timestamp: fixed nine fractional digits, UTC, ``Z``."""
    seconds, nanos = divmod(ts_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"


def parse_bool(value: str | None) -> bool:
    """Go's ``strconv.ParseBool`` truths (the client sends Python's ``True``)."""
    return value is not None and value in ("1", "t", "T", "true", "TRUE", "True")


# ---------------------------------------------------------------------------------------- store


@dataclass(frozen=True)
class WatchEvent:
    """One stored change: ``obj`` is the new state (last state for ``DELETED``)."""

    rv: int
    type: str
    obj: JsonObj
    prev: JsonObj | None


@dataclass(frozen=True)
class LogLine:
    ts_ns: int
    text: str  # without the trailing newline


Listener = Callable[[ResourceType, WatchEvent], None]


class Store:
    """In-memory objects, history and pod logs. Confined to the server's event loop."""

    def __init__(self) -> None:
        self.rv = 0
        #: Events with ``rv <= compacted_rv`` are gone: watching from an older version is a 410.
        self.compacted_rv = 0
        self.closing = False
        self._objects: dict[str, dict[tuple[str, str], JsonObj]] = {r: {} for r in RESOURCES}
        self._history: dict[str, list[WatchEvent]] = {r: [] for r in RESOURCES}
        self._logs: dict[tuple[str, str, str], list[LogLine]] = {}
        self._changed = asyncio.Event()
        self._listeners: list[Listener] = []

    # -- change notification

    def changed(self) -> asyncio.Event:
        """An event set at the next change (take it *before* reading state, then wait on it)."""
        return self._changed

    def notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(resource, event)`` synchronously after every stored change."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _record(self, rt: ResourceType, kind: str, obj: JsonObj, prev: JsonObj | None) -> None:
        event = WatchEvent(self.rv, kind, copy.deepcopy(obj), copy.deepcopy(prev))
        self._history[rt.plural].append(event)
        self.notify()
        for listener in list(self._listeners):
            listener(rt, event)

    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    # -- objects

    def get(self, rt: ResourceType, namespace: str, name: str) -> JsonObj:
        obj = self._objects[rt.plural].get((namespace, name))
        if obj is None:
            raise not_found(rt, name)
        return copy.deepcopy(obj)

    def exists(self, rt: ResourceType, namespace: str, name: str) -> bool:
        return (namespace, name) in self._objects[rt.plural]

    def list_objects(self, rt: ResourceType, selector: Selector | None = None) -> list[JsonObj]:
        selector = selector or Selector()
        return [
            copy.deepcopy(obj)
            for _, obj in sorted(self._objects[rt.plural].items())
            if selector.matches(obj)
        ]

    def _validate_meta(self, rt: ResourceType, meta: JsonObj, name: str) -> None:
        if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            raise invalid(
                rt,
                name,
                "metadata.name",
                name,
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                "characters, '-' or '.', and must start and end with an alphanumeric character",
            )
        labels = meta.get("labels") or {}
        if not isinstance(labels, dict):
            raise bad_request("metadata.labels must be an object")
        for key, value in labels.items():
            if not isinstance(value, str):
                raise bad_request(f"label {key!r}: value must be a string")
            why = label_key_error(key)
            if why is not None:
                raise invalid(rt, name, "metadata.labels", key, why)
            why = label_value_error(value)
            if why is not None:
                raise invalid(rt, name, "metadata.labels", value, why)

    def create(self, rt: ResourceType, namespace: str, body: Any) -> JsonObj:
        if not isinstance(body, dict):
            raise bad_request("the body of the request must be a JSON object")
        obj = copy.deepcopy(body)
        if rt is WORKFLOWS or "kind" in obj or "apiVersion" in obj:
            if not obj.get("kind"):
                raise bad_request(f"Object 'Kind' is missing in '{json.dumps(body)[:200]}'")
            if obj.get("kind") != rt.kind or obj.get("apiVersion") != rt.api_version:
                raise bad_request(
                    f"the API version in the data ({obj.get('apiVersion')}) and kind "
                    f"({obj.get('kind')}) do not match {rt.api_version} {rt.kind}"
                )
        obj["kind"], obj["apiVersion"] = rt.kind, rt.api_version
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if meta.get("namespace") not in (None, "", namespace):
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on "
                "the request"
            )
        name = meta.get("name") or ""
        if not name:
            prefix = meta.get("generateName") or ""
            if not prefix:
                raise invalid(rt, "", "metadata.name", "", "name or generateName is required")
            name = prefix + uuid.uuid4().hex[:5]
        self._validate_meta(rt, meta, name)
        _validate_body(rt, obj)
        if (namespace, name) in self._objects[rt.plural]:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{rt.qualified} "{name}" already exists',
                {"name": name, "group": rt.group, "kind": rt.plural},
            )
        for key in ("resourceVersion", "uid", "creationTimestamp", "deletionTimestamp"):
            meta.pop(key, None)
        meta.update(
            name=name,
            namespace=namespace,
            uid=str(uuid.uuid4()),
            resourceVersion=str(self._next_rv()),
            creationTimestamp=rfc3339(),
            generation=1,
        )
        self._objects[rt.plural][(namespace, name)] = obj
        self._record(rt, ADDED, obj, None)
        return copy.deepcopy(obj)

    def patch(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        body: Any,
        content_type: str = "application/merge-patch+json",
    ) -> JsonObj:
        current = self._objects[rt.plural].get((namespace, name))
        if current is None:
            raise not_found(rt, name)
        kind = content_type.split(";")[0].strip().lower()
        if kind == "application/strategic-merge-patch+json" and rt is CONFIGMAPS:
            # kubernetes_asyncio's default for core types; for a ConfigMap (maps, no merge-keyed
            # lists outside metadata) it is a JSON merge patch
            kind = "application/merge-patch+json"
        if kind == "application/merge-patch+json":
            if not isinstance(body, dict):
                raise bad_request("merge patch body must be a JSON object")
            wanted_rv = (body.get("metadata") or {}).get("resourceVersion")
            if wanted_rv is not None and str(wanted_rv) != current["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {rt.qualified} "{name}": the object has '
                    "been modified; please apply your changes to the latest version and try again",
                    {"name": name, "group": rt.group, "kind": rt.plural},
                )
            patched = merge_patch(current, body)
        elif kind == "application/json-patch+json":
            if not isinstance(body, list):
                raise bad_request(
                    "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
                )
            patched = json_patch(current, body)
        else:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types "
                f"include: application/json-patch+json, application/merge-patch+json "
                f"(got {kind})",
            )
        meta = patched.get("metadata")
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if meta.get("name") != name or meta.get("namespace") != namespace:
            raise bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL "
                f"({name})"
            )
        for key in ("uid", "creationTimestamp", "resourceVersion", "generation"):
            meta[key] = current["metadata"][key]
        patched["kind"], patched["apiVersion"] = rt.kind, rt.api_version
        self._validate_meta(rt, meta, name)
        _validate_body(rt, patched)
        if patched == current:
            return copy.deepcopy(current)  # a no-op update neither bumps nor notifies
        if {k: v for k, v in patched.items() if k != "metadata"} != {
            k: v for k, v in current.items() if k != "metadata"
        }:
            meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
        meta["resourceVersion"] = str(self._next_rv())
        self._objects[rt.plural][(namespace, name)] = patched
        self._record(rt, MODIFIED, patched, current)
        return copy.deepcopy(patched)

    def delete(self, rt: ResourceType, namespace: str, name: str) -> JsonObj:
        current = self._objects[rt.plural].pop((namespace, name), None)
        if current is None:
            raise not_found(rt, name)
        last = copy.deepcopy(current)
        last["metadata"]["resourceVersion"] = str(self._next_rv())
        self._record(rt, DELETED, last, current)
        if rt is PODS:
            for key in [k for k in self._logs if k[0] == namespace and k[1] == name]:
                del self._logs[key]
        return last

    # -- history

    def events_after(self, rt: ResourceType, rv: int) -> list[WatchEvent]:
        history = self._history[rt.plural]
        start = bisect.bisect_right(history, rv, key=lambda e: e.rv)
        return history[start:]

    def compact(self) -> int:
        """Drop all history; watches from a version older than the current one get 410."""
        self.compacted_rv = self.rv
        for history in self._history.values():
            history.clear()
        self.notify()
        return self.rv

    # -- logs

    def append_log(
        self, namespace: str, pod: str, container: str, text: str, ts_ns: int | None = None
    ) -> None:
        """Append one line (a trailing newline is stripped; embedded newlines split lines)."""
        stamp = time.time_ns() if ts_ns is None else ts_ns
        lines = self._logs.setdefault((namespace, pod, container), [])
        for part in text.rstrip("\n").split("\n"):
            lines.append(LogLine(stamp, part))
        self.notify()

    def log_lines(self, namespace: str, pod: str, container: str) -> list[LogLine]:
        return list(self._logs.get((namespace, pod, container), []))


# ------------------------------------------------------------------------------- request record


@dataclass
class RequestRecord:
    """One HTTP request as received (``status`` is filled when the response starts)."""

    method: str
    path: str
    query: dict[str, str]
    at: float
    status: int | None = None
    content_type: str | None = None
    body: Any = None


_RECORD = web.RequestKey("record", RequestRecord)


# ------------------------------------------------------------------------------------ the server


@dataclass
class FakeApiServer:
    """The apiserver double. ``start()`` → ``url``; ``write_kubeconfig(path)``; ``stop()``."""

    token: str = "fake-token"
    #: Seconds between BOOKMARK events on watches with ``allowWatchBookmarks=true``.
    bookmark_interval: float = 1.0
    #: How a watch from a compacted version is refused: ERROR event (200) or HTTP 410 Status.
    expired_as: Literal["event", "status"] = "event"
    requests: list[RequestRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._store: Store | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._requests_lock = threading.Lock()

    # -- lifecycle

    @property
    def url(self) -> str:
        assert self._port is not None, "server not started"
        return f"http://127.0.0.1:{self._port}"

    @property
    def store(self) -> Store:
        """The storage; use only on the server loop (see :meth:`call` otherwise)."""
        assert self._store is not None, "server not started"
        return self._store

    def start(self) -> FakeApiServer:
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            asyncio.set_event_loop(loop)

            async def boot() -> None:
                self._store = Store()
                self._runner = web.AppRunner(
                    self._app(),
                    access_log=None,
                    shutdown_timeout=0.5,
                    handler_cancellation=True,
                )
                await self._runner.setup()
                await web.SockSite(self._runner, sock).start()

            try:
                loop.run_until_complete(boot())
            except BaseException as error:  # noqa: BLE001 - reported to start()
                ready.set_exception(error)
                return
            ready.set_result(None)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-apiserver", daemon=True)
        self._thread.start()
        ready.result(timeout=10)
        return self

    def stop(self) -> None:
        if self.loop is None or self._thread is None:
            return
        loop = self.loop

        async def shutdown() -> None:
            self.store.closing = True
            self.store.notify()
            if self._runner is not None:
                await self._runner.cleanup()
            current = asyncio.current_task()
            others = [t for t in asyncio.all_tasks() if t is not current]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=15)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_kubeconfig(self, path: Path | str, namespace: str = "default") -> Path:
        """Write a kubeconfig (cluster ``fake`` at :attr:`url`, insecure, token user, context
        ``fake`` as current-context with ``namespace``). JSON is valid YAML."""
        target = Path(path)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "fake", "cluster": {"server": self.url, "insecure-skip-tls-verify": True}}
            ],
            "users": [{"name": "fake-user", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake-user", "namespace": namespace},
                }
            ],
            "current-context": "fake",
            "preferences": {},
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(config, indent=2))
        return target

    # -- running things on the server loop

    def on_loop(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the server loop and return its result (any thread)."""
        if self.on_loop():
            return fn(*args, **kwargs)
        assert self.loop is not None, "server not started"
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller
                future.set_exception(error)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout=10)

    # -- in-process API (any thread)

    def create(self, resource: str, namespace: str, obj: JsonObj) -> JsonObj:
        return self.call(self.store.create, RESOURCES[resource], namespace, obj)

    def get(self, resource: str, namespace: str, name: str) -> JsonObj:
        return self.call(self.store.get, RESOURCES[resource], namespace, name)

    def find(self, resource: str, namespace: str, name: str) -> JsonObj | None:
        """Like :meth:`get` but ``None`` when missing."""
        try:
            return self.get(resource, namespace, name)
        except ApiError as error:
            if error.code == 404:
                return None
            raise

    def list_objects(
        self, resource: str, namespace: str | None = None, label_selector: str | None = None
    ) -> list[JsonObj]:
        selector = Selector(namespace, tuple(parse_label_selector(label_selector)))
        return self.call(self.store.list_objects, RESOURCES[resource], selector)

    def patch(self, resource: str, namespace: str, name: str, patch: JsonObj) -> JsonObj:
        """Merge-patch (RFC 7386)."""
        return self.call(self.store.patch, RESOURCES[resource], namespace, name, patch)

    def delete(self, resource: str, namespace: str, name: str) -> JsonObj:
        return self.call(self.store.delete, RESOURCES[resource], namespace, name)

    def resource_version(self) -> str:
        return str(self.call(lambda: self.store.rv))

    def compact(self) -> str:
        """Drop the watch history (returns the compaction version); see the module docstring."""
        return str(self.call(self.store.compact))

    def append_log(
        self, namespace: str, pod: str, container: str, text: str, at: float | None = None
    ) -> None:
        """Append a log line; ``at`` (epoch seconds) back-dates it (for ``sinceSeconds``)."""
        ts_ns = None if at is None else int(at * 1_000_000_000)
        self.call(self.store.append_log, namespace, pod, container, text, ts_ns)

    def log_text(self, namespace: str, pod: str, container: str) -> str:
        lines = self.call(self.store.log_lines, namespace, pod, container)
        return "".join(f"{line.text}\n" for line in lines)

    def find_requests(
        self, method: str | None = None, path: str | None = None, contains: str | None = None
    ) -> list[RequestRecord]:
        """Recorded requests, filtered by method, exact path, or a path substring."""
        with self._requests_lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method)
                and (path is None or r.path == path)
                and (contains is None or contains in r.path)
            ]

    def clear_requests(self) -> None:
        with self._requests_lock:
            self.requests.clear()

    def wait_until(
        self, predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02
    ) -> None:
        """Poll ``predicate`` (from a thread other than the server's) until true."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            time.sleep(interval)

    # -- HTTP

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_get("/version", self._version)
        r.add_get("/api", self._api_versions)
        r.add_get("/apis", self._api_groups)
        r.add_route("*", "/apis/{group}/{version}/namespaces/{namespace}/{plural}", self._coll)
        r.add_route(
            "*", "/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}", self._item
        )
        r.add_route("*", "/apis/{group}/{version}/{plural}", self._coll_all)
        r.add_route("*", "/api/v1/namespaces/{namespace}/pods/{name}/log", self._pod_log)
        r.add_route("*", "/api/{version}/namespaces/{namespace}/{plural}", self._coll)
        r.add_route("*", "/api/{version}/namespaces/{namespace}/{plural}/{name}", self._item)
        r.add_route("*", "/api/{version}/{plural}", self._coll_all)
        r.add_route("*", "/{tail:.*}", self._no_route)
        return app

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        record = RequestRecord(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            at=time.time(),
            content_type=request.headers.get("Content-Type"),
        )
        if request.can_read_body:
            raw = await request.read()
            try:
                record.body = json.loads(raw) if raw else None
            except ValueError:
                record.body = raw
        request[_RECORD] = record
        with self._requests_lock:
            self.requests.append(record)
        response: web.StreamResponse
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            response = _status_response(ApiError(401, "Unauthorized", "Unauthorized"))
        else:
            try:
                response = await handler(request)
            except ApiError as error:
                response = _status_response(error)
        if record.status is None:
            record.status = response.status
        return response

    async def _no_route(self, request: web.Request) -> web.StreamResponse:
        return _status_response(
            ApiError(404, "NotFound", "the server could not find the requested resource")
        )

    async def _version(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "platform": "linux/amd64"}
        )

    async def _api_versions(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"kind": "APIVersions", "versions": ["v1"]})

    async def _api_groups(self, request: web.Request) -> web.StreamResponse:
        gv = {"groupVersion": WORKFLOWS.api_version, "version": WORKFLOWS.version}
        return web.json_response(
            {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [{"name": WORKFLOWS.group, "versions": [gv], "preferredVersion": gv}],
            }
        )

    @staticmethod
    def _resource(request: web.Request) -> ResourceType:
        info = request.match_info
        group = info.get("group", "")
        version = info.get("version", "")
        rt = RESOURCES.get(info["plural"])
        if rt is None or rt.group != group or rt.version != version:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return rt

    @staticmethod
    def _method_not_allowed(request: web.Request) -> ApiError:
        return ApiError(
            405,
            "MethodNotAllowed",
            f"the server does not allow this method on the requested resource "
            f"({request.method} {request.path}; not served by the test double)",
        )

    async def _coll(self, request: web.Request) -> web.StreamResponse:
        rt = self._resource(request)
        namespace = request.match_info["namespace"]
        if request.method == "GET":
            return await self._list_or_watch(request, rt, namespace)
        if request.method == "POST" and rt in WRITABLE:
            body = request[_RECORD].body
            created = self.store.create(rt, namespace, body)
            return web.json_response(created, status=201)
        raise self._method_not_allowed(request)

    async def _coll_all(self, request: web.Request) -> web.StreamResponse:
        rt = self._resource(request)
        if request.method == "GET":
            return await self._list_or_watch(request, rt, None)
        raise self._method_not_allowed(request)

    async def _item(self, request: web.Request) -> web.StreamResponse:
        rt = self._resource(request)
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        if request.method == "GET":
            return web.json_response(self.store.get(rt, namespace, name))
        if request.method == "PATCH" and rt in WRITABLE:
            record: RequestRecord = request[_RECORD]
            content_type = request.headers.get("Content-Type", "")
            patched = self.store.patch(rt, namespace, name, record.body, content_type)
            return web.json_response(patched)
        if request.method == "DELETE" and rt in WRITABLE:
            deleted = self.store.delete(rt, namespace, name)
            if rt.group:  # custom resources answer with the deleted object
                return web.json_response(deleted)
            # core types without ReturnDeletedObject (ConfigMaps) answer with a Status
            return web.json_response({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": name, "kind": rt.plural, "uid": deleted["metadata"]["uid"]},
            })
        raise self._method_not_allowed(request)

    async def _list_or_watch(
        self, request: web.Request, rt: ResourceType, namespace: str | None
    ) -> web.StreamResponse:
        query = request.query
        selector = Selector(
            namespace,
            tuple(parse_label_selector(query.get("labelSelector"))),
            tuple(parse_field_selector(rt, query.get("fieldSelector"))),
        )
        if parse_bool(query.get("watch")):
            return await self._watch(request, rt, selector)
        items = self.store.list_objects(rt, selector)
        if not rt.group:  # core types' list items carry no kind/apiVersion
            for item in items:
                item.pop("kind", None)
                item.pop("apiVersion", None)
        return web.json_response(
            {
                "apiVersion": rt.api_version,
                "kind": f"{rt.kind}List",
                "metadata": {"resourceVersion": str(self.store.rv)},
                "items": items,
            }
        )

    async def _watch(
        self, request: web.Request, rt: ResourceType, selector: Selector
    ) -> web.StreamResponse:
        store = self.store
        loop = asyncio.get_running_loop()
        query = request.query
        rv_param = query.get("resourceVersion", "")
        bookmarks = parse_bool(query.get("allowWatchBookmarks"))
        timeout_param = query.get("timeoutSeconds")
        try:
            timeout = float(timeout_param) if timeout_param else None
        except ValueError as error:
            raise bad_request(f"invalid timeoutSeconds {timeout_param!r}") from error
        initial: list[JsonObj] = []
        if rv_param in ("", "0"):
            cursor = store.rv
            initial = store.list_objects(rt, selector)
        else:
            try:
                cursor = int(rv_param)
            except ValueError as error:
                raise bad_request(f"invalid resource version: {rv_param!r}") from error
            if cursor < store.compacted_rv:
                expired = _expired(cursor, store.compacted_rv)
                if self.expired_as == "status":
                    raise expired
                response = await self._start_stream(request)
                await _send(response, {"type": ERROR, "object": expired.status()})
                return response

        response = await self._start_stream(request)
        deadline = None if timeout is None else loop.time() + timeout
        next_bookmark = loop.time() + self.bookmark_interval
        try:
            for obj in initial:
                await _send(response, {"type": ADDED, "object": obj})
            while True:
                changed = store.changed()
                if cursor < store.compacted_rv:
                    gone = _expired(cursor, store.compacted_rv)
                    await _send(response, {"type": ERROR, "object": gone.status()})
                    break
                snapshot = store.rv
                for event in store.events_after(rt, cursor):
                    out = _convert(event, selector)
                    if out is not None:
                        await _send(response, out)
                cursor = max(cursor, snapshot)
                now = loop.time()
                if store.closing or _closed(request):
                    break
                if deadline is not None and now >= deadline:
                    if bookmarks:
                        await _send(response, _bookmark(rt, cursor))
                    break
                if bookmarks and now >= next_bookmark:
                    await _send(response, _bookmark(rt, cursor))
                    next_bookmark = now + self.bookmark_interval
                wait = 0.5
                if deadline is not None:
                    wait = min(wait, deadline - now)
                if bookmarks:
                    wait = min(wait, max(0.0, next_bookmark - now))
                try:
                    await asyncio.wait_for(changed.wait(), timeout=max(wait, 0.0))
                except TimeoutError:
                    pass
        except (ConnectionError, RuntimeError):
            return response  # the client went away
        return response

    async def _start_stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        response.content_type = "application/json"
        response.enable_chunked_encoding()
        await response.prepare(request)
        request[_RECORD].status = 200
        return response

    async def _pod_log(self, request: web.Request) -> web.StreamResponse:
        if request.method != "GET":
            raise self._method_not_allowed(request)
        store = self.store
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        query = request.query
        pod = store.get(PODS, namespace, name)
        container = query.get("container") or _default_container(pod)
        _check_log_container(pod, container)
        follow = parse_bool(query.get("follow"))
        stamps = parse_bool(query.get("timestamps"))
        since = _int_param(query, "sinceSeconds")
        tail = _int_param(query, "tailLines")
        limit_bytes = _int_param(query, "limitBytes")
        if since is not None and since < 1:
            raise invalid(PODS, name, "sinceSeconds", str(since), "must be greater than 0")

        lines = store.log_lines(namespace, name, container)
        if since is not None:
            floor = time.time_ns() - since * 1_000_000_000
            lines = [line for line in lines if line.ts_ns >= floor]
        if tail is not None:
            lines = lines[-tail:] if tail > 0 else []

        def render(line: LogLine) -> bytes:
            prefix = f"{rfc3339_nano(line.ts_ns)} " if stamps else ""
            return f"{prefix}{line.text}\n".encode()

        if not follow:
            data = b"".join(render(line) for line in lines)
            if limit_bytes is not None:
                data = data[:limit_bytes]
            return web.Response(body=data, content_type="text/plain")

        response = web.StreamResponse(status=200)
        response.content_type = "text/plain"
        response.enable_chunked_encoding()
        await response.prepare(request)
        request[_RECORD].status = 200
        sent = len(store.log_lines(namespace, name, container))
        budget = limit_bytes
        try:
            pending = lines
            while True:
                changed = store.changed()
                for line in pending:
                    data = render(line)
                    if budget is not None:
                        data = data[:budget]
                        budget -= len(data)
                    await response.write(data)
                    if budget is not None and budget <= 0:
                        return response
                current = store.log_lines(namespace, name, container)
                pending, sent = current[sent:], len(current)
                if pending:
                    continue
                if not store.exists(PODS, namespace, name) or store.closing or _closed(request):
                    break
                if _terminated(store.get(PODS, namespace, name), container):
                    current = store.log_lines(namespace, name, container)
                    if len(current) == sent:
                        break
                    continue
                try:
                    await asyncio.wait_for(changed.wait(), timeout=0.5)
                except TimeoutError:
                    pass
        except (ConnectionError, RuntimeError):
            return response
        return response


# ------------------------------------------------------------------------------------- helpers


def _status_response(error: ApiError) -> web.Response:
    return web.json_response(error.status(), status=error.code)


def _expired(rv: int, compacted: int) -> ApiError:
    return ApiError(410, "Expired", f"too old resource version: {rv} ({compacted})")


def _closed(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _send(response: web.StreamResponse, event: JsonObj) -> None:
    await response.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")


def _bookmark(rt: ResourceType, rv: int) -> JsonObj:
    return {
        "type": BOOKMARK,
        "object": {
            "kind": rt.kind,
            "apiVersion": rt.api_version,
            "metadata": {"resourceVersion": str(rv)},
        },
    }


def _convert(event: WatchEvent, selector: Selector) -> JsonObj | None:
    """The event a watcher with ``selector`` sees (the apiserver's cacheWatcher rules)."""
    if event.type == ADDED:
        return {"type": ADDED, "object": event.obj} if selector.matches(event.obj) else None
    if event.type == DELETED:
        return {"type": DELETED, "object": event.obj} if selector.matches(event.obj) else None
    now_ok, was_ok = selector.matches(event.obj), selector.matches(event.prev)
    if now_ok and was_ok:
        return {"type": MODIFIED, "object": event.obj}
    if now_ok:
        return {"type": ADDED, "object": event.obj}
    if was_ok:
        assert event.prev is not None
        previous = copy.deepcopy(event.prev)
        previous["metadata"]["resourceVersion"] = str(event.rv)
        return {"type": DELETED, "object": previous}
    return None


def _validate_body(rt: ResourceType, obj: JsonObj) -> None:
    """The decoding errors the apiserver gives for a ConfigMap's ``data``."""
    if rt is not CONFIGMAPS:
        return
    data = obj.get("data")
    if data is None:
        return
    if not isinstance(data, dict):
        raise bad_request("json: cannot unmarshal into Go struct field ConfigMap.data of type "
                          "map[string]string")
    for key, value in data.items():
        if not isinstance(value, str):
            raise bad_request(f"json: cannot unmarshal {type(value).__name__} into Go struct "
                              f"field ConfigMap.data of type string (key {key!r})")


def _int_param(query: Mapping[str, str], name: str) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as error:
        raise bad_request(f"invalid {name}: {value!r}") from error


def _container_names(pod: JsonObj) -> list[str]:
    spec = pod.get("spec") or {}
    names = [c["name"] for c in spec.get("initContainers") or []]
    return names + [c["name"] for c in spec.get("containers") or []]


def _default_container(pod: JsonObj) -> str:
    name = pod["metadata"]["name"]
    containers = [c["name"] for c in (pod.get("spec") or {}).get("containers") or []]
    if len(containers) == 1:
        return str(containers[0])
    choices = " ".join(_container_names(pod))
    raise bad_request(
        f"a container name must be specified for pod {name}, choose one of: [{choices}]"
    )


def _container_status(pod: JsonObj, container: str) -> JsonObj | None:
    status = pod.get("status") or {}
    for key in ("initContainerStatuses", "containerStatuses"):
        for item in status.get(key) or []:
            if item.get("name") == container:
                return dict(item)
    return None


def _check_log_container(pod: JsonObj, container: str) -> None:
    name = pod["metadata"]["name"]
    if container not in _container_names(pod):
        raise bad_request(f"container {container} is not valid for pod {name}")
    status = _container_status(pod, container)
    state = (status or {}).get("state") or {"waiting": {"reason": "ContainerCreating"}}
    if "waiting" in state and not (status or {}).get("lastState"):
        reason = (state.get("waiting") or {}).get("reason") or "ContainerCreating"
        raise bad_request(f'container "{container}" in pod "{name}" is waiting to start: {reason}')


def _terminated(pod: JsonObj, container: str) -> bool:
    status = _container_status(pod, container)
    return bool(status and "terminated" in (status.get("state") or {}))


@asynccontextmanager
async def api_client(kubeconfig: Path | str) -> AsyncIterator[ApiClient]:
    """A ``kubernetes_asyncio`` ``ApiClient`` configured from ``kubeconfig`` (closed on exit)."""
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    async with client.ApiClient(configuration) as api:
        yield api
