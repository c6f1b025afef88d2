"""Settings for every service, from the environment only (prefix ``SCALEODM_``).

One tree grouped by concern: the infrastructure groups (``nats``, ``mongo``, ``s3``, ``local``)
are nested models set with a double underscore (``SCALEODM_NATS__URL``); a service's own fields
sit flat on its class (``SCALEODM_GATEWAY_PORT``, ``SCALEODM_TOKEN``), because those names are
part of our contract. Settings are built in cached factories called from ``main()`` or lifespans,
never at import time, so tests can set the environment first.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import types
import typing
import urllib.parse
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    Field,
    IPvAnyNetwork,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from scaleodm.common.domain.text import shown

DEV_CREDENTIAL = "scaleodm-dev-secret"


class NatsSettings(BaseModel):
    """NATS JetStream connection."""

    url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma separated.")
    publish_timeout_s: float = Field(5.0, description="Timeout of one JetStream publish.")
    connect_timeout_s: float = Field(
        5.0, gt=0,
        description="Timeout of one connection attempt (the first one and every reconnection).",
    )
    startup_timeout_s: float = Field(
        60.0, gt=0,
        description="How long a process keeps trying to reach NATS when it starts (an attempt "
        "every `reconnect_wait_s`) before it gives up and exits.",
    )
    reconnect_wait_s: float = Field(
        1.0, gt=0,
        description="Wait before the second reconnection attempt once the connection is lost "
        "(the first is immediate); it doubles with each failed attempt up to "
        "`reconnect_max_wait_s`, with +-25 % jitter.",
    )
    reconnect_max_wait_s: float = Field(
        10.0, gt=0, description="Longest wait between two reconnection attempts."
    )
    max_reconnect_attempts: int = Field(
        -1, ge=-1,
        description="Failed reconnection attempts (per server) before the connection is closed "
        "for good, which fails liveness (`/healthz` 503) so that the process is restarted; "
        "-1 = never give up (readiness fails meanwhile).",
    )
    drain_timeout_s: float = Field(
        3.0, gt=0,
        description="At shutdown, how long the connection may take to drain (pending acks and "
        "publishes) before it is closed.",
    )
    ping_interval_s: float = Field(
        15.0, gt=0,
        description="Client pings to the server; after `max_outstanding_pings` unanswered ones "
        "the connection counts as lost and reconnects (a frozen server is noticed in about "
        "interval × that many; nats-py's default is 2 minutes × 2).",
    )
    max_outstanding_pings: int = Field(
        3, ge=1, description="Unanswered pings before the connection counts as lost."
    )
    stream_replicas: int = Field(
        1, ge=1, le=5,
        description="Replicas of the TASKS and EVENTS streams (their durable consumers follow): "
        "1 on a single server, 3 on a NATS cluster of 3+ nodes (survives one node down). An "
        "existing stream with fewer is raised to it at start-up, never lowered "
        "(docs/operations.md).",
    )
    user: str | None = Field(None, description="NATS user name (with `password`); unset = none.")
    password: SecretStr | None = Field(
        None, description="NATS password of `user` (from a Secret on Kubernetes)."
    )

    def servers(self) -> list[str]:
        return [s.strip() for s in self.url.split(",") if s.strip()]

    def credentials(self) -> dict[str, str]:
        """``user``/``password`` keyword arguments for a NATS client; empty without a user."""
        if self.user is None:
            return {}
        password = self.password.get_secret_value() if self.password is not None else ""
        return {"user": self.user, "password": password}


class MongoSettings(BaseModel):
    """MongoDB connection (MongoDB 6+ or a wire-compatible server)."""

    url: str = Field("mongodb://127.0.0.1:27017", description="MongoDB connection string.")
    database: str = Field("scaleodm", description="Database holding tasks, events and deliveries.")
    server_selection_timeout_ms: int = Field(5000, description="serverSelectionTimeoutMS.")
    timeout_ms: int = Field(
        10000, gt=0,
        description="timeoutMS: deadline of one MongoDB operation, server selection and retries "
        "included; an unreachable or frozen MongoDB fails the operation after this long (the "
        "gateway answers `Storage unavailable, please retry later`).",
    )
    connect_timeout_ms: int = Field(
        5000, gt=0, description="connectTimeoutMS (also the monitors' socket timeout)."
    )
    username: str | None = Field(
        None, description="MongoDB user (with `password`); unset = credentials in `url` or none."
    )
    password: SecretStr | None = Field(
        None, description="MongoDB password of `username` (from a Secret on Kubernetes)."
    )


class S3Settings(BaseModel):
    """S3-compatible object storage for task inputs and outputs."""

    endpoint_url: str | None = Field(
        None, description="S3 endpoint (MinIO, moto, ...). Unset means AWS."
    )
    region: str = Field("us-east-1", description="S3 region.")
    access_key_id: str = Field(DEV_CREDENTIAL, description="S3 access key id.")
    secret_access_key: SecretStr = Field(
        SecretStr(DEV_CREDENTIAL), description="S3 secret access key."
    )
    bucket: str = Field("scaleodm", description="Bucket holding task inputs and outputs.")
    create_bucket: bool = Field(
        False, description="Create the bucket at start-up if missing (development)."
    )
    connect_timeout_s: float = Field(5.0, description="S3 connect timeout.")
    read_timeout_s: float = Field(
        60.0, description="S3 read timeout (one socket read; `request_timeout_s` bounds a request)."
    )
    max_attempts: int = Field(
        3, ge=1,
        description="Attempts of one S3 request, the first included (botocore's standard retry "
        "mode).",
    )
    request_timeout_s: float = Field(
        30.0, gt=0,
        description="Deadline of one S3 request, its retries included (an upload part, a small "
        "object, a listing page, a download's start or next chunk): a frozen S3 fails it after "
        "this long (the gateway answers `Storage unavailable, please retry later`).",
    )
    part_size_bytes: int = Field(
        8 * 1024 * 1024, description="Multipart upload part size (>= 5 MiB)."
    )
    upload_buffers: int = Field(
        8,
        description="Most part buffers a process holds at once across all uploads (memory "
        "bound ~ upload_buffers x part size); further uploads wait. 0 = unbounded.",
    )
    input_allow: list[str] = Field(
        default_factory=list,
        description="`s3://bucket/prefix/` locations (JSON list) that `s3://` zipurls may read "
        "from with the service's credentials; none by default. A task's own upload prefix is "
        "always readable by its own run; other tasks' prefixes never are.",
    )


class LocalRunSettings(BaseModel):
    """Local runs (no Kubernetes): where the scheduler's runner and the watcher meet."""

    runs_dir: Path = Field(
        Path("/tmp/scaleodm/runs"),
        description="Directory holding one sub-directory per local run (shared by scheduler and "
        "watcher, which must run on the same host).",
    )


class ArgoSettings(BaseModel):
    """Runs as Argo Workflows on Kubernetes (scheduler creates them, watcher follows them)."""

    namespace: str = Field("scaleodm", description="Namespace of the Workflows and their pods.")
    kubeconfig: Path | None = Field(
        None, description="Kubeconfig file; unset = in-cluster config when running in a pod."
    )
    service_account: str = Field(
        "scaleodm-workflow", description="Service account the workflow pods run as."
    )
    odm_image: str = Field("opendronemap/odm:3.6.0", description="ODM image of the main step.")
    runner_image: str = Field(
        "ghcr.io/scaleodm/scaleodm:latest",
        description="Our image, for the fetch and upload steps (scaleodm.run.stages).",
    )
    s3_secret: str = Field(
        "scaleodm-s3", description="Secret with keys access_key_id / secret_access_key."
    )
    shards: int = Field(
        16, description="Shard labels the scheduler assigns (hash of the task id modulo this)."
    )
    active_deadline_s: int = Field(172800, description="Workflow activeDeadlineSeconds (48 h).")
    pod_gc_delay_s: int = Field(600, description="podGC deleteDelayDuration: logs stay readable.")
    ttl_after_success_s: int = Field(86400, description="ttlStrategy.secondsAfterSuccess.")
    ttl_after_failure_s: int = Field(604800, description="ttlStrategy.secondsAfterFailure.")
    retry_limit: int = Field(1, description="retryStrategy limit for transient failures.")
    request_timeout_s: float = Field(30.0, description="Kubernetes API request timeout.")
    watch_timeout_s: int = Field(300, description="Server-side timeout of one watch request.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="nodeSelector of the workflow pods (JSON object)."
    )
    memory_multiplier: float = Field(
        1.0, description="Scales the sizing table's memory (and derived CPU/storage)."
    )
    max_memory_gib: float = Field(256.0, description="Upper clamp of the sizing table's memory.")
    min_memory_gib: float = Field(4.0, description="Lower clamp of the sizing table's memory.")
    cpu_per_gib: float = Field(0.125, description="CPU request per GiB of memory request.")
    capacity_configmap: str = Field(
        "scaleodm-capacity",
        description="ConfigMap of the Workflows' semaphores (keys `all` and one per size class, "
        "holding the slots): Argo holds a Workflow beyond them pending, a second guard behind "
        "the scheduler's admission; empty: no semaphores.",
    )


# Images assumed for a task whose count is not known when it is sized or classed.
ASSUMED_IMAGES = 200


class SizeClass(BaseModel):
    """One size class of runs: the tasks of at most ``max_images`` images (the sizing table's
    key), with ``slots`` runs of the class active at once."""

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")
    max_images: int | None = Field(None, ge=1, description="None: no upper bound.")
    slots: int = Field(ge=0)


def _default_classes() -> list[SizeClass]:
    return [SizeClass(name="small", max_images=200, slots=10),
            SizeClass(name="medium", max_images=1500, slots=4),
            SizeClass(name="large", max_images=None, slots=2)]


class CapacitySettings(BaseModel):
    """How many runs may be active at once (admitted and not ended): a global cap and one per
    size class. A task beyond them waits queued (status 10) with no run, and is admitted when a
    slot frees: highest priority first, then fair share across tenants, then oldest
    (scheduler/admission.py). Gateway and scheduler must be given the same values."""

    max_active: int = Field(
        10, ge=1,
        description="Runs active at once, all classes together; reported as `maxParallelTasks` "
        "in /info.",
    )
    classes: list[SizeClass] = Field(
        default_factory=_default_classes,
        description="Size classes (JSON list of `{name, max_images, slots}`, by ascending "
        "`max_images`; the last has no bound): a task belongs to the first class its image count "
        "fits (an unknown count counts as 200 images). On Kubernetes the Workflows also wait on "
        "the semaphores of `argo.capacity_configmap` (deploy/k8s ships it with these values).",
    )

    @field_validator("classes")
    @classmethod
    def _classes_cover_every_count(cls, v: list[SizeClass]) -> list[SizeClass]:
        if not v:
            raise ValueError("at least one size class is needed")
        names = [c.name for c in v]
        if len(set(names)) != len(names):
            raise ValueError(f"size class names must be distinct: {names}")
        if "all" in names:
            raise ValueError("`all` names the global cap (the Workflows' semaphore key)")
        bounds = [c.max_images for c in v[:-1]]
        if any(b is None for b in bounds) or v[-1].max_images is not None:
            raise ValueError("only the last size class, and it always, has no `max_images`")
        if bounds != sorted({b for b in bounds if b is not None}):
            raise ValueError("size classes must be listed by strictly ascending `max_images`")
        return v

    @property
    def parallel(self) -> int:
        """Runs that can be active at once: the global cap, or the classes' slots together
        when fewer (NodeODM's ``maxParallelTasks``)."""
        return min(self.max_active, sum(c.slots for c in self.classes))

    def class_of(self, images_count: int | None) -> SizeClass:
        """The size class of a task of ``images_count`` images (None: unknown yet, a zipurl or
        an S3 folder: counted as ``ASSUMED_IMAGES``)."""
        count = ASSUMED_IMAGES if images_count is None else images_count
        for size_class in self.classes:
            if size_class.max_images is None or count <= size_class.max_images:
                return size_class
        raise AssertionError("the last class has no bound")  # _classes_cover_every_count


def secure_url(url: str) -> str:
    """``url`` when https, or http to a loopback host (tests, a sidecar); else ``ValueError``.
    For what must not be swapped on the way: an identity provider's keys."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {shown(url)}")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise ValueError(f"must be https (http only to a loopback host): {shown(url)}")
    if parts.fragment:
        raise ValueError(f"must have no fragment: {shown(url)}")
    return url


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Asymmetric JWS algorithms only: ``none`` and HS* (a secret) make no sense with a public JWKS.
Algorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]


def _default_algorithms() -> list[Algorithm]:
    return ["RS256", "ES256"]


class SplitSettings(BaseModel):
    """Split-merge on the cluster (``scaleodm.common.splitmerge``): a run whose options ask for
    ``split`` gets ``--sm-cluster`` pointing at the gateway, with a token scoped to its task."""

    token_key: SecretStr | None = Field(
        None,
        description="Key the parent-scoped tokens are signed with (HMAC-SHA256; give the "
        "gateway and the scheduler the same, 32+ random bytes, e.g. `openssl rand -hex 32`). "
        "Unset: no sm-cluster; a `split` task runs its submodels in its own run, as ODM alone.",
    )
    cluster_url: str | None = Field(
        None,
        description="The gateway's base URL as a run reaches it (the in-cluster Service on "
        "Kubernetes, e.g. `http://scaleodm-gateway:3000`; loopback for local runs). Unset: no "
        "sm-cluster.",
    )
    admit_wait_s: float = Field(
        5.0, ge=0,
        description="How long creating a child task (a parent-scoped token) waits for it to "
        "leave QUEUED before answering: ODM reads a child still queued right after its creation "
        "as a full node, removes it and sends it again later.",
    )

    @field_validator("token_key")
    @classmethod
    def _key_is_strong(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and v.get_secret_value() and len(v.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return v

    @property
    def enabled(self) -> bool:
        return bool(self.token_key and self.token_key.get_secret_value() and self.cluster_url)


class TilesSettings(BaseModel):
    """Map tiles of a completed task's rasters (``/task/{uuid}/tiles/...``), rendered by the
    gateway from the objects in S3 (range reads through GDAL, never whole files)."""

    cache_bytes: int = Field(
        64 * 1024 * 1024, ge=0,
        description="Bytes of rendered PNG tiles each gateway process keeps in memory (least "
        "recently used dropped first; only completed tasks' tiles, which never change); 0: no "
        "cache.",
    )
    worker_threads: int = Field(
        4, ge=1, le=64,
        description="Tiles rendered at once per gateway process (GDAL reads and PNG encoding run "
        "in worker threads, never on the event loop); further requests wait, within the S3 "
        "request deadline.",
    )
    renders_per_tenant: int = Field(
        2, ge=1, le=64,
        description="Tiles of one tenant rendered at once per gateway process (of "
        "`worker_threads`): a tenant's map cannot hold every thread while others wait; its "
        "further tiles wait their turn, within the S3 request deadline.",
    )
    max_zoom_over_native: int = Field(
        2, ge=0, le=8,
        description="Zoom levels served beyond a raster's native resolution (upsampled); deeper "
        "tiles answer 404.",
    )


class OidcSettings(BaseModel):
    """Bearer JWTs from an OpenID Connect issuer (``Authorization: Bearer``), verified by
    ``scaleodm.common.tenants``. Off unless ``issuer`` is set (then ``audience`` is needed too)."""

    issuer: str = Field(
        description="The issuer, exactly as in the tokens' `iss` claim; setting it turns bearer "
        "tokens on (with `audience`; needs `tenants_file`)."
    )
    audience: str = Field(description="The `aud` value tokens must carry (this API's id).")
    jwks_url: str | None = Field(
        None,
        description="The issuer's JWKS; unset: `jwks_uri` of "
        "`<issuer>/.well-known/openid-configuration` (OIDC discovery).",
    )
    tenant_claim: str = Field("tenant", description="Claim naming the tenant (top level).")
    role_claim: str | None = Field(
        None,
        description="Claim (a string or list) that must hold `admin` for an admin tenant to act "
        "as admin; unset: the tenants file's role applies as is.",
    )
    unknown_tenant: str | None = Field(
        None,
        description="File tenant whose limits apply to tokens naming a tenant not in the file; "
        "unset: such tokens are refused.",
    )
    algorithms: list[Algorithm] = Field(
        default_factory=_default_algorithms, min_length=1,
        description="Accepted signature algorithms (asymmetric only).",
    )
    leeway_s: float = Field(
        30.0, ge=0, le=300, description="Clock skew allowed on `exp`, `nbf` and `iat`."
    )
    jwks_cache_s: float = Field(300.0, gt=0, description="How long fetched keys are used.")
    jwks_refetch_interval_s: float = Field(
        30.0, gt=0,
        description="Least time between two JWKS fetches caused by unknown key ids or failures.",
    )
    fetch_timeout_s: float = Field(
        5.0, gt=0, description="Deadline of one key fetch (discovery and JWKS together)."
    )

    @field_validator("issuer", "jwks_url")
    @classmethod
    def _secure_url(cls, v: str | None) -> str | None:
        return None if v is None else secure_url(v)

    @property
    def discovery_url(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"


class Environment(enum.StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class BaseServiceSettings(BaseSettings):
    """Settings every service has."""

    model_config = SettingsConfigDict(
        env_prefix="SCALEODM_",
        env_nested_delimiter="__",
        extra="ignore",
        case_sensitive=False,
    )

    environment: Environment = Field(
        Environment.DEVELOPMENT,
        description="`production` refuses development credentials; `development` warns.",
    )
    log_level: str = Field("INFO", description="Log level (DEBUG, INFO, WARNING, ERROR).")
    log_json: bool | None = Field(
        None, description="JSON log lines (false: human-readable console); unset: JSON unless "
        "stdout is a terminal (`task up` in a terminal reads as text, a pod's log is JSON).")
    traces_file: Path | None = Field(
        None, description="Also write this process's trace spans to this file, as JSON lines "
        "(tests, local debugging); traces are otherwise configured by the standard `OTEL_*` "
        "variables (`OTEL_TRACES_EXPORTER=otlp`, `OTEL_EXPORTER_OTLP_ENDPOINT`) and off by "
        "default.")
    metrics_enabled: bool = Field(
        True, description="Per-request and per-message metrics (the gateway's HTTP metrics, "
        "FastStream's consumer/publisher metrics); `/metrics` and the other counts stay. Off: "
        "for comparing their cost (bench.observability).")
    health_host: str = Field("0.0.0.0", description="Bind address of health/readiness endpoints.")
    health_port: int = Field(8080, description="Port of /healthz and /readyz (non-gateway).")
    failpoints: str = Field(
        "",
        description="Fault injection for tests and chaos runs: `name=action` pairs separated by "
        "commas (e.g. `scheduler.create.before_ack=hang`). Empty in production.",
    )
    outbound_allow: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="CIDRs (JSON list) that webhook and zipurl targets may resolve to although "
        "not public (loopback, RFC1918, ULA, ...); none by default. Link-local, cloud "
        "metadata and reserved blocks (0.0.0.0/8, CGNAT, ULA, ::1, multicast, ...) need an entry "
        "inside them, a broader one does not open them (scaleodm.common.netguard).",
    )
    nats: NatsSettings = Field(default_factory=NatsSettings)
    mongo: MongoSettings = Field(default_factory=MongoSettings)
    s3: S3Settings = Field(default_factory=S3Settings)

    def insecure_defaults(self) -> list[str]:
        """Names of settings still holding development credentials."""
        found = []
        if self.s3.secret_access_key.get_secret_value() == DEV_CREDENTIAL:
            found.append("s3.secret_access_key")
        # The password deploy/k8s/overlays/dev ships for NATS and MongoDB.
        for name, password in (("nats", self.nats.password), ("mongo", self.mongo.password)):
            if password is not None and password.get_secret_value() == DEV_CREDENTIAL:
                found.append(f"{name}.password")
        return found


class GatewaySettings(BaseServiceSettings):
    """The NodeODM-compatible HTTP gateway."""

    gateway_host: str = Field("0.0.0.0", description="Bind address of the gateway.")
    gateway_port: int = Field(3000, description="Gateway port (NodeODM's default is 3000).")
    token: SecretStr | None = Field(
        None,
        description="When set, every API route requires `?token=<token>` (NodeODM); this token "
        "is the `admin` tenant (every task, no limits).",
    )
    tenants_file: Path | None = Field(
        None,
        description="Tenants file (YAML: names, tokens, roles, limits; README \"Tenants\"), "
        "reloaded when it changes; unset: no tenants but `admin` (`token`), or an open node.",
    )
    oidc: OidcSettings | None = Field(
        None,
        description="OIDC bearer tokens (`Authorization: Bearer <jwt>`) naming a tenant of "
        "`tenants_file`; off unless `SCALEODM_OIDC__ISSUER` is set.",
    )
    max_images: int | None = Field(
        None,
        description="Most images per task; unset = unlimited (`maxImages: null`). A tenant's "
        "own `max_images` can only lower it.",
    )
    capacity: CapacitySettings = Field(default_factory=CapacitySettings)
    split: SplitSettings = Field(default_factory=SplitSettings)
    tiles: TilesSettings = Field(default_factory=TilesSettings)
    task_counts_interval_s: float = Field(
        15.0, gt=0,
        description="How often `/metrics`' task counts (`scaleodm_tasks`) are read from MongoDB, "
        "in the background (a scrape never waits on it; a failed read marks them stale).",
    )
    max_request_bytes: int = Field(
        100 * 1024**3,
        description="Largest request body accepted (uploads stream to S3; this bounds abuse).",
    )
    engine_version: str = Field(
        "?", description="Reported as `engineVersion` in /info (the ODM version runs use)."
    )
    zipurl_schemes: list[str] = Field(
        default_factory=lambda: ["http", "https", "s3"],
        description="URL schemes accepted for `zipurl`.",
    )
    info_cache_s: float = Field(
        1.0, ge=0,
        description="`/info`: how long `taskQueueCount` is reused (one store count per interval, "
        "shared by concurrent polls; 0 counts on every call).",
    )
    read_model_size: int = Field(
        10_000, ge=0,
        description="Task documents each gateway process keeps in memory, kept current by the "
        "task events (least recently read dropped first; 0: every read goes to MongoDB).",
    )
    read_model_negative_size: int = Field(
        10_000, ge=0,
        description="Unknown task ids each gateway process remembers as unknown (apart from "
        "the documents: polls of random ids never evict the working set).",
    )
    read_model_max_age_s: float = Field(
        30.0, gt=0,
        description="A document (or an unknown id) read from MongoDB longer ago than this is "
        "read again, whatever the events said.",
    )
    read_model_echo_timeout_s: float = Field(
        1.0, ge=0,
        description="A write answers once its event came back from NATS (then every gateway "
        "process sees it), waiting at most this long.",
    )
    sse_heartbeat_s: float = Field(
        15.0, gt=0,
        description="Event streams (SSE): interval of heartbeat comments; an idle per-task "
        "stream also re-reads the event log this often.",
    )
    sse_queue_size: int = Field(
        1000, ge=1,
        description="Event streams (SSE): live events buffered per client; a client that falls "
        "further behind is disconnected (it resumes with Last-Event-ID).",
    )
    sse_send_timeout_s: float = Field(
        30.0, gt=0,
        description="Event streams (SSE): a client that accepts no write for this long is "
        "disconnected.",
    )
    sse_max_streams: int = Field(
        1000, ge=1, description="Event streams (SSE): most open streams per gateway process."
    )
    sse_max_streams_per_client: int = Field(
        16, ge=1,
        description="Event streams (SSE): most open streams per client (its address, behind "
        "`trusted_proxies` the forwarded one, together with its token) per gateway process.",
    )
    sse_max_pending_bytes: int = Field(
        1024 * 1024, ge=1024,
        description="Event streams (SSE): most bytes of events buffered for one client; a "
        "client further behind is disconnected (it resumes with Last-Event-ID).",
    )
    trusted_proxies: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="CIDRs (JSON list) of reverse proxies (the ingress) whose X-Forwarded-For and "
        "X-Forwarded-Proto are believed: per-client limits then count the client behind the "
        "proxy. None by default (forwarded headers ignored).",
    )
    max_action_body_bytes: int = Field(
        64 * 1024, ge=1024,
        description="Largest body of /task/cancel, /task/remove and /task/restart.",
    )
    max_field_bytes: int = Field(
        1024 * 1024, ge=1024,
        description="Largest multipart text field (options, name, webhook, ...).",
    )
    max_form_text_bytes: int = Field(
        2 * 1024 * 1024, ge=1024,
        description="Largest total of a multipart request's text fields.",
    )
    max_form_fields: int = Field(64, ge=1, description="Most text fields in a multipart request.")
    max_files_per_request: int = Field(
        20_000, ge=1,
        description="Most files one upload request may carry (each becomes an S3 object; "
        "`max_images` is checked only once the request is complete).",
    )
    body_idle_timeout_s: float = Field(
        30.0, gt=0,
        description="A request body that sends nothing for this long is cut off (stalled "
        "uploads release what they hold).",
    )
    upload_buffer_wait_s: float = Field(
        30.0, gt=0,
        description="How long an upload waits for one of the process's part buffers "
        "(`s3.upload_buffers`) before it is refused as busy.",
    )
    upload_buffer_hold_s: float = Field(
        120.0, gt=0,
        description="Longest time one upload may hold a part buffer while filling it when "
        "other uploads wait for one: an upload slower than part size / this is then cut off, so "
        "slow clients cannot starve the others (with buffers free, slow uploads go on).",
    )
    header_timeout_s: float = Field(
        10.0, gt=0,
        description="A connection must send a request's complete headers within this long.",
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="Idle keep-alive connections are closed after this long."
    )
    max_connections: int = Field(
        2000, ge=1,
        description="Most concurrent connections/requests of a gateway process (beyond: 503).",
    )
    output_page_lines: int = Field(
        10000, ge=1,
        description="Most console lines one `with_output`/`/output` response returns; clients "
        "page on with the line count they have.",
    )

    @field_validator("max_images")
    @classmethod
    def _no_zero_max_images(cls, v: int | None) -> int | None:
        # NodeODM §3.1: maxImages is null when unlimited, never 0.
        return v if v else None

    @model_validator(mode="after")
    def _oidc_names_file_tenants(self) -> Self:
        if self.oidc is not None and self.tenants_file is None:
            raise ValueError("oidc needs tenants_file: a token's claim names one of its tenants")
        return self


class EngineKind(enum.StrEnum):
    AUTO = "auto"
    DOCKER = "docker"
    TEST = "test"
    COMMAND = "command"


class RunPlatform(enum.StrEnum):
    """Where runs live: the scheduler starts them there (``executor``), the watcher follows them
    there (``source``)."""

    LOCAL = "local"  # a runner process and a run directory per attempt (``localruns``)
    ARGO = "argo"  # an Argo Workflow per attempt (``argoruns``)


class SchedulerSettings(BaseServiceSettings):
    """Turns task commands into runs."""

    executor: RunPlatform = Field(RunPlatform.LOCAL, description="Where runs go: local | argo.")
    engine: EngineKind = Field(
        EngineKind.AUTO,
        description="Local runs: `docker` (opendronemap/odm), `test` (the ODM test double, never "
        "for production), `command` (`engine_command`), `auto` (docker when a docker engine "
        "answers, else refuse to start).",
    )
    engine_command: str = Field(
        "",
        description="Engine command template for `engine=command`; placeholders {options}, "
        "{project_path}, {project_name}.",
    )
    odm_image: str = Field("opendronemap/odm:3.6.0", description="ODM image for docker runs.")
    test_engine_seconds: float = Field(
        3.0, description="Run length of the ODM test double (engine=test)."
    )
    local: LocalRunSettings = Field(default_factory=LocalRunSettings)
    argo: ArgoSettings = Field(default_factory=ArgoSettings)
    capacity: CapacitySettings = Field(default_factory=CapacitySettings)
    split: SplitSettings = Field(default_factory=SplitSettings)
    admission_interval_s: float = Field(
        2.0, gt=0,
        description="Admission passes run when a task is queued or a run ends, and at least "
        "this often (a missed wake-up costs at most this long).",
    )
    ack_wait_s: float = Field(60.0, description="JetStream ack_wait of the command consumer.")
    max_deliver: int = Field(10, description="Deliveries of one command before it is given up.")
    zip_max_bytes: int = Field(
        50 * 1024**3, description="Largest input archive a run downloads."
    )
    zip_max_expanded_bytes: int = Field(
        100 * 1024**3,
        description="Most bytes one archive may expand to (counted while extracting).",
    )
    zip_max_ratio: float = Field(
        100.0, gt=1,
        description="Largest expansion ratio of an archive member (uncompressed / compressed).",
    )
    zip_max_entries: int = Field(
        50_000, ge=1, description="Most entries in one input archive."
    )
    task_disk_budget_bytes: int = Field(
        200 * 1024**3,
        description="Most bytes a run's fetched inputs may take on disk, all sources together.",
    )
    fetch_timeout_s: float = Field(60.0, description="Read timeout when fetching zipurl inputs.")
    tenants_file: Path | None = Field(
        None,
        description="The gateway's tenants file, for each tenant's `max_active_runs` "
        "(admission); reloaded when it changes. Unset: no per-tenant limit.",
    )


# A deleted task's uuid is refused at least this long: the TASKS stream's duplicate window (2 min)
# and the redelivery of its commands (max_deliver x (ack_wait + back-off), ~20 min by default).
TOMBSTONE_KEEP_FLOOR_MIN = 60.0


class WatcherSettings(BaseServiceSettings):
    """Follows runs, turns them into events, and relays the outbox."""

    source: RunPlatform = Field(
        RunPlatform.LOCAL, description="What it follows: local runs or Argo Workflows."
    )
    local: LocalRunSettings = Field(default_factory=LocalRunSettings)
    argo: ArgoSettings = Field(default_factory=ArgoSettings)
    replica: int = Field(
        0, description="This replica's index (StatefulSet ordinal) among `replicas`."
    )
    replicas: int = Field(
        1, description="Watcher replicas; replica k follows shards s with s % replicas == k."
    )
    poll_interval_s: float = Field(0.25, description="How often local runs are polled.")
    output_batch_lines: int = Field(200, description="Most console lines in one output event.")
    run_start_grace_s: float = Field(
        30.0, description="A local run with no live runner after this long is failed."
    )
    outbox_interval_s: float = Field(5.0, description="How often unpublished events are resent.")
    outbox_min_age_s: float = Field(5.0, description="Age before an unpublished event is resent.")
    cleanup_tasks_after_min: float = Field(
        2880.0, ge=0,
        description="Finished tasks (completed, failed, canceled) are removed, as by /task/remove "
        "(inputs, outputs, run directories, events), this many minutes after they finished "
        "(NodeODM `--cleanup_tasks_after`, 48 h); 0 keeps them forever.",
    )
    cleanup_uploads_after_min: float = Field(
        2880.0, ge=0,
        description="Chunked uploads never committed, and files that arrived after their upload "
        "closed, are deleted (records and S3 objects) this many minutes after their last init "
        "or file (NodeODM `--cleanup_uploads_after`, 48 h); 0 keeps them forever.",
    )
    cleanup_interval_s: float = Field(
        600.0, gt=0,
        description="How often each watcher looks for expired tasks and abandoned uploads (one "
        "pass handles a bounded batch of each; after a full batch the next pass follows in 1 s).",
    )
    tombstone_keep_min: float = Field(
        1440.0, ge=0,
        description="A deleted task's uuid stays refused (`Invalid set-uuid`) this many minutes "
        f"(at least {TOMBSTONE_KEEP_FLOOR_MIN:g}: longer than JetStream's duplicate window and "
        "any redelivery of the old task's commands); 0 refuses it forever.",
    )

    @field_validator("tombstone_keep_min")
    @classmethod
    def _tombstones_outlive_old_commands(cls, v: float) -> float:
        if 0 < v < TOMBSTONE_KEEP_FLOOR_MIN:
            raise ValueError(f"must be 0 (forever) or at least {TOMBSTONE_KEEP_FLOOR_MIN:g}")
        return v


class NotifierSettings(BaseServiceSettings):
    """Delivers webhooks on terminal task events."""

    webhook: str | None = Field(
        None, description="Node-level webhook called for every finished task (NodeODM --webhook)."
    )
    webhook_timeout_s: float = Field(10.0, description="Timeout of one webhook attempt.")
    webhook_max_attempts: int = Field(
        0, description="Attempts per delivery before giving up; 0 = no cap (the horizon decides)."
    )
    webhook_backoff_base_s: float = Field(1.0, description="First retry delay; doubles each time.")
    webhook_backoff_max_s: float = Field(300.0, description="Longest retry delay.")
    webhook_horizon_s: float = Field(
        86400.0,
        description="Retries stop (delivery dead-lettered) this long after the first attempt.",
    )
    webhook_secret: SecretStr | None = Field(
        None, description="Standard Webhooks secret (`whsec_...`); when set, deliveries are signed."
    )
    webhook_concurrency: int = Field(
        64, description="Terminal events handled at once (a slow receiver holds only one)."
    )
    webhook_max_response_bytes: int = Field(
        4096, ge=0,
        description="Most bytes of a webhook receiver's response read (the rest is discarded "
        "unread and the connection closed).",
    )
    webhook_ack_wait_s: float = Field(
        60.0,
        description="JetStream ack_wait of the notifier's consumer: an event whose handler died "
        "is redelivered after this long (must exceed webhook_timeout_s).",
    )


ServiceName = Literal["gateway", "scheduler", "watcher", "notifier"]
SETTINGS_CLASSES: dict[str, type[BaseServiceSettings]] = {
    "gateway": GatewaySettings,
    "scheduler": SchedulerSettings,
    "watcher": WatcherSettings,
    "notifier": NotifierSettings,
}


def _group(annotation: Any) -> type[BaseModel] | None:
    """The settings group a field holds (``NatsSettings``, or ``OidcSettings | None``), if any."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def env_names(cls: type[BaseModel], prefix: str = "SCALEODM_") -> dict[str, Any]:
    """Every environment variable a settings class reads, mapped to its field info; groups
    (optional ones too) are expanded into their fields."""
    names: dict[str, Any] = {}
    for name, field in cls.model_fields.items():
        group = _group(field.annotation)
        if group is not None:
            names.update(env_names(group, f"{prefix}{name.upper()}__"))
        else:
            names[f"{prefix}{name.upper()}"] = field
    return names


@functools.cache
def get_gateway_settings() -> GatewaySettings:
    return GatewaySettings()


@functools.cache
def get_scheduler_settings() -> SchedulerSettings:
    return SchedulerSettings()


@functools.cache
def get_watcher_settings() -> WatcherSettings:
    return WatcherSettings()


@functools.cache
def get_notifier_settings() -> NotifierSettings:
    return NotifierSettings()
