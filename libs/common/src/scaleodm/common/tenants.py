"""Tenants: who a request is, and the limits that apply to it.

A tenant is a name, a role and limits (images per task, allowed and denied options, active runs,
a monthly image quota, default and highest priority). Requests authenticate in one of two ways:

- **NodeODM tokens** (``?token=``, nodeodm-api §1.3): each tenant of the tenants file lists its
  own tokens. The single ``SCALEODM_TOKEN`` keeps working: it is one more tenant, ``admin``, with
  the admin role and no limits. With neither a file nor a token (nor OIDC) the node is open, as
  NodeODM without ``--token``: every request is the one tenant ``default`` (admin, no limits),
  whatever token it carries.
- **OIDC bearer tokens** (``Authorization: Bearer <jwt>``) for clients with an identity provider:
  a JWT signed by a key of the issuer's JWKS, whose ``tenant_claim`` names a tenant of the file.

Design choices, and why:

- **The tenants file** is YAML (``tenants: [...]``), hot-reloaded:
  :meth:`TenantDirectory.reload_if_changed` stats it at most once per ``reload_interval_s``
  (cheap enough for every request) and parses it again when its inode, size or mtime changed
  (a Kubernetes ConfigMap update swaps a symlink: a new inode). A file that does not parse or
  validate is refused whole: the last good directory stays and a warning says why, never with a
  token in it (validation errors are shown without their input; YAML errors by position only, as
  their snippet could show a token). A file that disappears also keeps the last good directory
  (a ConfigMap swap can show a missing file for a moment, and deleting the file must neither
  open the node nor lock every tenant out): removing tenants means rewriting the file. At
  start-up there is no last good directory, so a bad file is an error (:class:`TenantsFileError`):
  the service refuses to start.
- **Strict file**: unknown keys (``extra="forbid"``) and duplicate YAML keys are errors, so a typo
  (``max_image:``) or a repeated key is refused instead of silently dropping or replacing a limit.
  Option names must be in the option catalog (``scaleodm.common.domain.options``), for the same
  reason. Tenant names are unique; no token appears twice (one token, one tenant).
- **Tokens** are 16 to 512 printable ASCII characters without spaces: a token is the tenant's
  only secret and is guessable online when short (16 random characters are 80+ bits); it travels
  in a query string, where spaces and controls get mangled; the bound keeps comparisons cheap.
  ``SCALEODM_TOKEN`` is exempt, so existing deployments keep their token.
- **Constant-time lookup**: :meth:`TenantDirectory.lookup_token` compares the SHA-256 digest of
  the presented token with the digest of every token (``secrets.compare_digest``), always all of
  them, so neither the time nor an early exit tells which tenant matched, how long its token is
  or how far a guess got.
- **Priority**: ``priority`` is the tenant's default (-100..100, the gateway's ``priority`` field).
  A tenant may always ask for less (it only orders its own tasks further back); it may ask for
  more up to ``max_priority``, which defaults to 100 for admins (as every client may today) and
  to ``priority`` itself for users (a user cannot jump the queue unless the file says so).
- **Options**: ``allowed_options`` (None: every option) and ``denied_options`` (an option in
  both is a file error, not a precedence puzzle) are checked on the options the client names,
  before the post-processing options the gateway adds itself (nodeodm-api §5.4). A refused
  option is an error, not silently dropped as ClusterODM's ``optionsWithLimits`` does by hiding
  it: a client asking for an option it may not use learns why its result differs.
- **OIDC tenants**: the claim must name a tenant of the file (its limits apply) unless
  ``unknown_tenant`` names the file tenant unknown values map to; refused by default, since a
  new identity-provider group should not get resources nobody configured. Only file tenants are
  reachable this way (never the implicit ``admin``). With ``role_claim`` set, a file admin stays
  admin only when the claim also says ``admin`` (a string or a list holding it): the identity
  provider can take the admin role away, never grant it.

JWT verification uses **PyJWT** (with ``cryptography``): it is the maintained, widely used
implementation, and the version we require binds a JWK to one algorithm, so a token's ``alg``
header cannot choose how its signature is checked. We fetch the JWKS ourselves with httpx rather
than with ``jwt.PyJWKClient``, which is synchronous (urllib) and would block the event loop, has
no size bound, and refetches on every key-id miss. Our fetch:

- is bounded in time (``fetch_timeout_s`` for the discovery and JWKS requests together) and size
  (:data:`MAX_JWKS_BYTES`), follows no redirect and reads no proxy variables;
- comes from ``jwks_url``, or when unset from OIDC discovery: the ``jwks_uri`` of
  ``<issuer>/.well-known/openid-configuration`` (its ``issuer`` must be ours, OIDC Discovery
  §4.3). Both must be https, except on loopback (tests, a sidecar): a JWKS read over plain http
  could be swapped for an attacker's;
- is cached ``jwks_cache_s``; a key-id miss or a failed fetch allows the next fetch only after
  ``jwks_refetch_interval_s`` (one shared fetch for concurrent requests), so a flood of tokens with
  random ``kid`` s cannot hammer the issuer. A failed refresh keeps the keys held (stale but
  better than locking everyone out while the provider is down);
- keeps only signature keys of asymmetric types (RSA, EC, OKP): an ``oct`` key would let HS256
  tokens be checked with a secret the JWKS publishes.

Tokens larger than :data:`MAX_JWT_BYTES` are refused before any parsing; the ``alg`` header must
be one of ``algorithms`` (asymmetric only: ``none`` and HS* cannot be configured) before any key
is fetched, so ``alg: none`` and HS256-with-the-public-key tokens cost nothing. Signature, ``exp``,
``iat`` (both required), ``nbf`` (when present), ``iss`` and ``aud`` are checked with ``leeway_s``.

Client-facing wording. Refusals are typed errors whose ``message`` is short and never holds
token material (nor a claim value). Authentication failures start with NodeODM's ``Invalid
authentication token`` (nodeodm-api §1.3: CloudODM maps the prefix to "auth required"). Too many
images keeps NodeODM's ``<n> images uploaded, but this node can only process up to <max>.``
(nodeodm-api §3.4 step 5): ``/info`` reports the tenant's limit as ``maxImages``, so
to the client the node's limit *is* its tenant's, and clients already show this message. ClusterODM
(``libs/proxy.js``, ``libs/taskNew.js``) says only ``Max images count exceeded.`` and leaves quota
wording to its cloud provider's ``approveNewTask`` (``Cannot approve task. Please contact
support.``), which tells the client nothing it can act on; our quota message follows NodeODM's
``<n> images uploaded, but ...`` shape and says what is left. A priority refusal keeps the
gateway's ``Invalid priority: <v> (...)``. Active runs are not refused at submission (ClusterODM's
``Reached maximum number of concurrent tasks``): the scheduler's admission holds a tenant's
further tasks queued until one of its runs ends.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Self

import httpx
import jwt
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from scaleodm.common import clock, settings
from scaleodm.common.domain import options as odm_options
from scaleodm.common.domain.text import shown
from scaleodm.common.logging import get_logger
from scaleodm.common.settings import OidcSettings

__all__ = [
    "ADMIN_TENANT",
    "MAX_JWKS_BYTES",
    "MAX_JWT_BYTES",
    "OPEN_TENANT",
    "PRIORITIES",
    "AuthenticationError",
    "IdentityProviderError",
    "OidcSettings",
    "PriorityError",
    "Tenant",
    "TenantDirectory",
    "TenantError",
    "TenantsFile",
    "TenantsFileError",
    "check_images",
    "check_options",
    "check_priority",
    "check_quota",
    "check_zipurl",
    "max_images",
    "parse_tenants",
    "quota_month",
]

log = get_logger(__name__)

# The tenant of SCALEODM_TOKEN, and the one tenant of an open node (the name task documents
# without a tenant belong to, store.tasks.DEFAULT_TENANT).
ADMIN_TENANT = "admin"
OPEN_TENANT = "default"
# The gateway's ``priority`` field (submission.PRIORITIES).
PRIORITIES = range(-100, 101)
MAX_JWT_BYTES = 8 * 1024
MAX_JWKS_BYTES = 256 * 1024
MAX_FILE_BYTES = 1024 * 1024
TOKEN_CHARS = range(16, 513)
_AUTH_PREFIX = "Invalid authentication token"
_ASYMMETRIC_KEY_TYPES = frozenset({"RSA", "EC", "OKP"})

Role = Literal["user", "admin"]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class TenantError(Exception):
    """A refusal; ``message`` is what the client is told (short, no secret in it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AuthenticationError(TenantError):
    """A bearer token refused (malformed, badly signed, expired, unknown tenant, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{_AUTH_PREFIX}: {reason}.")


class IdentityProviderError(TenantError):
    """The issuer's keys cannot be had now: not the client's fault, it may retry later."""

    def __init__(self) -> None:
        super().__init__("Identity provider unavailable, please retry later.")


class PriorityError(TenantError):
    """A requested priority out of range or above what the tenant may ask for."""


class TenantsFileError(ValueError):
    """A tenants file that cannot be used; the message says why (for operators, no tokens)."""


# --------------------------------------------------------------------------------------------
# The tenants file
# --------------------------------------------------------------------------------------------


# One entry of the tenants file; also the runtime record every request is attributed to.
class Tenant(BaseModel):
    """A tenant: who it is, how it authenticates, and its limits (None: no limit)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="Unique tenant name.")
    role: Role = Field(
        "user", description="`admin` may act on every tenant's tasks; `user` on its own only."
    )
    tokens: tuple[SecretStr, ...] = Field(
        (), description="NodeODM tokens (`?token=`) of this tenant; none for OIDC-only tenants."
    )
    max_images: int | None = Field(None, ge=1, description="Most images per task.")
    allowed_options: tuple[str, ...] | None = Field(
        None, description="The only ODM options the tenant may set; None: every option."
    )
    denied_options: tuple[str, ...] = Field(
        (), description="ODM options the tenant may not set (none of `allowed_options`)."
    )
    max_active_runs: int | None = Field(
        None, ge=0, description="Runs of the tenant active at once; further tasks wait queued."
    )
    monthly_image_quota: int | None = Field(
        None, ge=0,
        description="Images the tenant may submit per calendar month (UTC); 0: none at all.",
    )
    priority: int = Field(
        0, ge=PRIORITIES.start, le=PRIORITIES.stop - 1,
        description="Priority of the tenant's tasks when they ask for none.",
    )
    max_priority: int | None = Field(
        None, ge=PRIORITIES.start, le=PRIORITIES.stop - 1,
        description="Highest priority the tenant may ask for; None: 100 for admins, "
        "`priority` for users. Lower priorities are always allowed.",
    )

    # Runtime only, never from the file: the task a parent-scoped token (``splitmerge``) is
    # scoped to. Such a caller is its parent's tenant, limited to the parent's children.
    parent: str | None = Field(None, exclude=True)

    @field_validator("parent")
    @classmethod
    def _not_from_a_file(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError("not a tenant setting")
        return v

    def scoped_to(self, parent: str) -> Tenant:
        """This tenant as a parent-scoped token of ``parent`` holds it: its limits, a user's
        role, its parent's children only."""
        return self.model_copy(update={"parent": parent, "role": "user", "tokens": ()})

    @field_validator("tokens")
    @classmethod
    def _tokens_are_strong(cls, v: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for token in v:
            value = token.get_secret_value()
            if len(value) not in TOKEN_CHARS or not all("!" <= c <= "~" for c in value):
                raise ValueError(
                    f"a token must be {TOKEN_CHARS.start} to {TOKEN_CHARS.stop - 1} printable "
                    "ASCII characters without spaces"
                )
        if len({t.get_secret_value() for t in v}) != len(v):
            raise ValueError("the same token is listed twice")
        return v

    @field_validator("allowed_options", "denied_options")
    @classmethod
    def _options_exist(
        cls, v: tuple[str, ...] | None, info: ValidationInfo
    ) -> tuple[str, ...] | None:
        known = _option_names(info.context)
        unknown = [name for name in v or () if name not in known]
        if unknown:
            raise ValueError(f"unknown ODM option(s): {', '.join(map(shown, unknown))}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        both = set(self.allowed_options or ()) & set(self.denied_options)
        if both:
            raise ValueError(f"options both allowed and denied: {', '.join(sorted(both))}")
        if self.max_priority is not None and self.max_priority < self.priority:
            raise ValueError("max_priority is below priority")
        return self

    @property
    def priority_ceiling(self) -> int:
        """The highest priority the tenant may ask for."""
        if self.max_priority is not None:
            return self.max_priority
        return PRIORITIES.stop - 1 if self.role == "admin" else self.priority

    def may_access(self, owner: str | None, parent: str | None = None) -> bool:
        """Whether the tenant may see and act on a task (or upload) of tenant ``owner``: its
        own, or any as an admin. None: a task from before tenants, which is ``default``'s. A
        parent-scoped caller (``parent`` set) only on the children of its parent (``parent``:
        the task's own parent, None for a task without one)."""
        if self.parent is not None:
            return parent == self.parent and self.name == (owner or OPEN_TENANT)
        return self.role == "admin" or self.name == (owner or OPEN_TENANT)


def _option_names(context: Any) -> frozenset[str]:
    """Option names a file may name: the validation context's ``option_names``, else the
    packaged catalog's."""
    if isinstance(context, Mapping) and "option_names" in context:
        return frozenset(context["option_names"])
    return frozenset(spec.name for spec in odm_options.load_catalog())


# The whole tenants file (YAML).
class TenantsFile(BaseModel):
    """``tenants: [...]``: every tenant, with unique names and no token shared."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenants: tuple[Tenant, ...]

    @model_validator(mode="after")
    def _unique(self) -> Self:
        names = [t.name for t in self.tenants]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"tenant names must be unique: {', '.join(repeated)}")
        owner: dict[str, str] = {}
        for tenant in self.tenants:
            for token in tenant.tokens:
                other = owner.setdefault(token.get_secret_value(), tenant.name)
                if other != tenant.name:
                    raise ValueError(f"a token is shared by tenants {other} and {tenant.name}")
        return self


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing a key repeated in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {shown(str(key))!r} repeated", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """A YAML error by position only: its default text quotes the offending line."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"invalid YAML{where}: {exc.problem or exc.context or 'syntax error'}"
    return "invalid YAML"


def _validation_reason(exc: ValidationError) -> str:
    """Every validation error by location and message, never with the input (a token)."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False, include_context=False):
        where = ".".join(str(p) for p in error["loc"])
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(parts)


def parse_tenants(text: str, option_names: Iterable[str] | None = None) -> TenantsFile:
    """The tenants file ``text`` (YAML), validated; :class:`TenantsFileError` saying why not.

    ``option_names``: the catalog option names may come from (default: the packaged catalog).
    """
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as exc:
        raise TenantsFileError(_yaml_reason(exc)) from None
    if not isinstance(data, dict):
        raise TenantsFileError("the file must be a mapping with a `tenants` list")
    context = None if option_names is None else {"option_names": frozenset(option_names)}
    try:
        return TenantsFile.model_validate(data, context=context)
    except ValidationError as exc:
        raise TenantsFileError(_validation_reason(exc)) from None


# --------------------------------------------------------------------------------------------
# Signing keys (JWKS)
# --------------------------------------------------------------------------------------------


class _FetchError(Exception):
    """A key fetch that failed; the message is for the operator's log."""


async def _get_json(client: httpx.AsyncClient, url: str) -> Any:
    """The JSON document at ``url``: HTTP 200, at most ``MAX_JWKS_BYTES``."""
    async with client.stream("GET", url, headers={"Accept": "application/json"}) as response:
        if response.status_code != httpx.codes.OK:
            raise _FetchError(f"{url} answered HTTP {response.status_code}")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_JWKS_BYTES:
                raise _FetchError(f"{url} answered more than {MAX_JWKS_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError:
        raise _FetchError(f"{url} answered no JSON") from None


def _signing_keys(document: Any) -> tuple[dict[str, Any], ...]:
    """The asymmetric signature keys of a JWKS document."""
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise _FetchError("the JWKS has no `keys` list")
    usable = tuple(
        key for key in keys
        if isinstance(key, dict) and key.get("kty") in _ASYMMETRIC_KEY_TYPES
        and key.get("use", "sig") == "sig" and isinstance(key.get("kid", ""), str)
    )
    if not usable:
        raise _FetchError("the JWKS has no asymmetric signature key")
    return usable


class _SigningKeys:
    """The issuer's keys: fetched when needed, cached, refetched at most once per interval."""

    def __init__(self, oidc: OidcSettings, monotonic: Callable[[], float]) -> None:
        self.oidc = oidc
        self.monotonic = monotonic
        self.jwks_url = oidc.jwks_url
        self.keys: tuple[dict[str, Any], ...] = ()
        self.parsed: dict[tuple[str | None, str], jwt.PyJWK] = {}
        self.fetched_at: float | None = None
        self.tried_at: float | None = None
        self.lock = asyncio.Lock()

    async def key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """The key that must have signed a token of header ``kid``/``alg``."""
        if self.fetched_at is None or self.monotonic() - self.fetched_at >= self.oidc.jwks_cache_s:
            await self._refresh()
        jwk = self._find(kid)
        if jwk is None:  # a rotated key, or a made-up kid: one refetch per interval at most
            await self._refresh()
            jwk = self._find(kid)
        if jwk is None:
            raise AuthenticationError("unknown signing key")
        return self._parsed(kid, alg, jwk)

    def _find(self, kid: str | None) -> dict[str, Any] | None:
        if kid is None:  # a token without kid: only when the issuer has a single key
            return self.keys[0] if len(self.keys) == 1 else None
        return next((key for key in self.keys if key.get("kid") == kid), None)

    def _parsed(self, kid: str | None, alg: str, jwk: dict[str, Any]) -> jwt.PyJWK:
        """``jwk`` bound to ``alg``: its own ``alg`` when it states one (then the token's must
        match), else the token's (an RSA key serves RS* and PS*)."""
        cached = self.parsed.get((kid, alg))
        if cached is None:
            try:
                cached = jwt.PyJWK(jwk, algorithm=None if "alg" in jwk else alg)
            except jwt.PyJWTError:
                raise AuthenticationError("unusable signing key") from None
            self.parsed[(kid, alg)] = cached
        return cached

    async def _refresh(self) -> None:
        """Fetch the keys, unless another request did since this one asked or a fetch was
        tried less than the refetch interval ago (then they stay as they are); without any keys
        after that, :class:`IdentityProviderError`."""
        asked_at = self.monotonic()
        async with self.lock:
            tried = self.tried_at
            if tried is None or (
                tried < asked_at
                and self.monotonic() - tried >= self.oidc.jwks_refetch_interval_s
            ):
                await self._fetch_logged()
        if not self.keys:
            raise IdentityProviderError()

    async def _fetch_logged(self) -> None:
        """One fetch, bounded by ``fetch_timeout_s``; a failure is logged, the keys kept."""
        self.tried_at = self.monotonic()
        try:
            async with asyncio.timeout(self.oidc.fetch_timeout_s):
                keys = await self._fetch()
        except (_FetchError, httpx.HTTPError, TimeoutError) as exc:
            reason = str(exc) or f"no answer within {self.oidc.fetch_timeout_s} s"
            log.warning("cannot fetch the identity provider's keys", reason=reason,
                        keeping=len(self.keys))
            return
        self.keys, self.parsed = keys, {}
        self.fetched_at = self.monotonic()

    async def _fetch(self) -> tuple[dict[str, Any], ...]:
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(self.oidc.fetch_timeout_s), follow_redirects=False,
            trust_env=False,
        ) as client:
            if self.jwks_url is None:
                self.jwks_url = _discovered_jwks_url(
                    await _get_json(client, self.oidc.discovery_url), self.oidc.issuer
                )
            return _signing_keys(await _get_json(client, self.jwks_url))


def _discovered_jwks_url(document: Any, issuer: str) -> str:
    """``jwks_uri`` of a discovery document, whose ``issuer`` must be ours (OIDC Discovery
    §4.3: else another issuer's keys could be served as ours)."""
    if not isinstance(document, dict) or document.get("issuer") != issuer:
        raise _FetchError("the discovery document names another issuer")
    uri = document.get("jwks_uri")
    if not isinstance(uri, str):
        raise _FetchError("the discovery document has no `jwks_uri`")
    try:
        return settings.secure_url(uri)
    except ValueError as exc:
        raise _FetchError(f"jwks_uri {exc}") from None


_JWT_REFUSALS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.PyJWKError, "unusable signing key"),
    (jwt.InvalidKeyError, "unusable signing key"),  # e.g. an RSA key under 2048 bits
)


def _refusal(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing claim {exc.claim!r}"
    return next((reason for kind, reason in _JWT_REFUSALS if isinstance(exc, kind)),
                "malformed token")


# --------------------------------------------------------------------------------------------
# The directory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Snapshot:
    """One consistent directory: every tenant, by name, and the token digests."""

    tenants: tuple[Tenant, ...]
    by_name: Mapping[str, Tenant]
    from_file: Mapping[str, Tenant]  # those an OIDC claim may name
    digests: tuple[tuple[bytes, Tenant], ...]
    open: bool


class _FileState(NamedTuple):
    """What a stat says about the file: a change in any of it means a new file."""

    inode: int
    device: int
    size: int
    mtime_ns: int


def _digest(token: str) -> bytes:
    # surrogatepass: a query string can hold lone surrogates; no token may fail to encode.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _snapshot(file: TenantsFile | None, token: SecretStr | None,
              oidc: OidcSettings | None) -> _Snapshot:
    """The directory of ``file`` and the single token; ``TenantsFileError`` when they clash."""
    tenants = list(file.tenants) if file is not None else []
    names = {t.name for t in tenants}
    if token is not None:
        if ADMIN_TENANT in names:
            raise TenantsFileError(f"tenant name {ADMIN_TENANT!r} is taken by SCALEODM_TOKEN")
        if any(t.get_secret_value() == token.get_secret_value()
               for tenant in tenants for t in tenant.tokens):
            raise TenantsFileError("a tenant's token is the same as SCALEODM_TOKEN")
    if oidc is not None and oidc.unknown_tenant is not None and oidc.unknown_tenant not in names:
        raise TenantsFileError(f"OIDC unknown_tenant {oidc.unknown_tenant!r} is not in the file")
    from_file = {t.name: t for t in tenants}
    is_open = file is None and token is None
    if token is not None:
        tenants.append(Tenant(name=ADMIN_TENANT, role="admin"))
    elif is_open:
        tenants.append(Tenant(name=OPEN_TENANT, role="admin"))
    digests = [(_digest(t.get_secret_value()), tenant) for tenant in tenants for t in tenant.tokens]
    if token is not None:
        digests.append((_digest(token.get_secret_value()), tenants[-1]))
    return _Snapshot(tuple(tenants), {t.name: t for t in tenants}, from_file, tuple(digests),
                     is_open)


class TenantDirectory:
    """Every tenant of the node, hot-reloaded from the tenants file; authenticates requests.

    ``path``: the tenants file (None: none); ``token``: ``SCALEODM_TOKEN`` (the ``admin``
    tenant); ``oidc``: bearer JWTs (needs a tenants file, whose tenants the claim names). Raises
    :class:`TenantsFileError` when the file cannot be used at start-up, ``ValueError`` for OIDC
    without a file. ``catalog``: the option catalog files may name (default: the packaged one).
    """

    def __init__(
        self,
        path: Path | None = None,
        token: SecretStr | None = None,
        oidc: OidcSettings | None = None,
        *,
        catalog: Sequence[odm_options.OptionSpec] | None = None,
        reload_interval_s: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if oidc is not None and path is None:
            raise ValueError("OIDC needs a tenants file: a token's claim names one of its tenants")
        self.path = path
        # An empty SCALEODM_TOKEN (a variable set to nothing) is no token.
        self._token = token if token is not None and token.get_secret_value() else None
        self._oidc = oidc
        self._option_names = frozenset(
            spec.name for spec in (odm_options.load_catalog() if catalog is None else catalog)
        )
        self._reload_interval_s = reload_interval_s
        self._monotonic = monotonic
        self._keys = _SigningKeys(oidc, monotonic) if oidc is not None else None
        self._state: _FileState | None = None
        self._checked_at = monotonic()
        file = None
        if path is not None:
            self._state = self._stat()
            if self._state is None:
                raise TenantsFileError(f"tenants file {path} missing or unreadable")
            file = self._read()
        self._current = _snapshot(file, self._token, oidc)

    @property
    def open(self) -> bool:
        """Whether the node is open (no file, no token): every request is ``default``."""
        return self._current.open

    @property
    def accepts_bearer(self) -> bool:
        """Whether OIDC bearer tokens are configured (:meth:`authenticate_bearer`)."""
        return self._oidc is not None

    @property
    def tenants(self) -> tuple[Tenant, ...]:
        """Every tenant: the file's, then ``admin`` (single token) or ``default`` (open)."""
        return self._current.tenants

    def tenant(self, name: str) -> Tenant | None:
        """The tenant named ``name`` (a task's, for its limits), None when there is none."""
        return self._current.by_name.get(name)

    def lookup_token(self, token: str | None) -> Tenant | None:
        """The tenant whose token is ``token``, None for none (``None``, empty, wrong); on an
        open node always ``default``. Constant time: every token is compared, always."""
        current = self._current
        if current.open:
            return current.tenants[0]
        if not token:
            return None
        digest = _digest(token)
        found: Tenant | None = None
        for candidate, tenant in current.digests:
            if secrets.compare_digest(candidate, digest):
                found = tenant
        return found

    async def authenticate_bearer(self, token: str) -> Tenant:
        """The tenant of an OIDC bearer JWT; :class:`AuthenticationError` (its message for the
        client), :class:`IdentityProviderError` when the issuer's keys cannot be had."""
        if self._oidc is None or self._keys is None:
            raise AuthenticationError("bearer tokens are not accepted on this node")
        if len(token) > MAX_JWT_BYTES:
            raise AuthenticationError("token too large")
        if not token.isascii():
            raise AuthenticationError("malformed token")
        oidc = self._oidc
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("malformed token") from None
        alg = header.get("alg")
        if alg not in oidc.algorithms:
            raise AuthenticationError("algorithm not allowed")
        key = await self._keys.key(header.get("kid"), alg)  # PyJWT checked: a str, or None
        try:
            claims = jwt.decode(
                token, key, algorithms=list(oidc.algorithms), audience=oidc.audience,
                issuer=oidc.issuer, leeway=oidc.leeway_s,
                options={"require": ["exp", "iat", "iss", "aud"],
                         "enforce_minimum_key_length": True},
            )
        except jwt.PyJWTError as exc:
            raise AuthenticationError(_refusal(exc)) from None
        return self._claimed_tenant(claims, oidc)

    def _claimed_tenant(self, claims: dict[str, Any], oidc: OidcSettings) -> Tenant:
        name = claims.get(oidc.tenant_claim)
        if not isinstance(name, str):
            raise AuthenticationError(f"missing claim {oidc.tenant_claim!r}")
        from_file = self._current.from_file
        tenant = from_file.get(name)
        if tenant is None and oidc.unknown_tenant is not None:
            tenant = from_file.get(oidc.unknown_tenant)
        if tenant is None:
            raise AuthenticationError("unknown tenant")  # the name stays out: it is token data
        if tenant.role == "admin" and oidc.role_claim is not None:
            roles = claims.get(oidc.role_claim)
            if not (roles == "admin" or isinstance(roles, list) and "admin" in roles):
                tenant = tenant.model_copy(update={"role": "user"})
        return tenant

    def reload_if_changed(self) -> bool:
        """Load the tenants file again if it changed since the last look (at most one look per
        ``reload_interval_s``); whether a new directory is now in use. A file that cannot be
        used, or is gone, leaves the last good directory and logs a warning saying why."""
        if self.path is None:
            return False
        now = self._monotonic()
        if now - self._checked_at < self._reload_interval_s:
            return False
        self._checked_at = now
        state = self._stat()
        if state == self._state:
            return False
        # Remembered also when refused: a bad file is reported once, not on every look.
        self._state = state
        if state is None:
            log.warning("tenants file missing or unreadable; keeping the last good one",
                        path=str(self.path))
            return False
        try:
            self._current = _snapshot(self._read(), self._token, self._oidc)
        except (TenantsFileError, OSError) as exc:
            log.warning("tenants file refused; keeping the last good one", path=str(self.path),
                        reason=str(exc) if isinstance(exc, TenantsFileError) else exc.strerror)
            return False
        log.info("tenants file loaded", path=str(self.path), tenants=len(self._current.tenants))
        return True

    def _stat(self) -> _FileState | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return _FileState(st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)

    def _read(self) -> TenantsFile:
        assert self.path is not None
        with self.path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise TenantsFileError(f"the file is larger than {MAX_FILE_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise TenantsFileError("the file is not UTF-8") from None
        return parse_tenants(text, self._option_names)


# --------------------------------------------------------------------------------------------
# Limits at submission
# --------------------------------------------------------------------------------------------


def max_images(tenant: Tenant, node_max: int | None = None) -> int | None:
    """Most images per task for ``tenant`` on a node allowing ``node_max`` (None: no limit):
    the smaller; what ``/info`` reports as ``maxImages`` (null when unlimited, nodeodm-api §3.1)."""
    limits = [n for n in (tenant.max_images, node_max) if n]
    return min(limits) if limits else None


def check_images(tenant: Tenant, count: int, node_max: int | None = None) -> str | None:
    """The client's error when a task of ``count`` images is too large, else None."""
    limit = max_images(tenant, node_max)
    if limit is not None and count > limit:
        # NodeODM's wording (nodeodm-api §3.4 step 5): /info shows the tenant's limit.
        return f"{count} images uploaded, but this node can only process up to {limit}."
    return None


def check_options(tenant: Tenant, option_names: Iterable[str]) -> str | None:
    """The client's error for the first option ``tenant`` may not set, else None. Check the
    options the client gave, before the gateway adds post-processing ones (§5.4)."""
    for name in option_names:
        if name in tenant.denied_options or (
            tenant.allowed_options is not None and name not in tenant.allowed_options
        ):
            return f"Option {shown(name)!r} is not allowed for tenant {tenant.name}"
    return None


def check_priority(tenant: Tenant, requested: int | None) -> int:
    """The priority of a task ``tenant`` submits asking for ``requested`` (None: its default);
    :class:`PriorityError` when out of range or above the tenant's ceiling."""
    if requested is None:
        return tenant.priority
    if requested not in PRIORITIES:
        raise PriorityError(f"Invalid priority: {requested} (an integer from "
                            f"{PRIORITIES.start} to {PRIORITIES.stop - 1})")
    if requested > tenant.priority_ceiling:
        raise PriorityError(f"Invalid priority: {requested} (tenant {tenant.name} may ask for "
                            f"at most {tenant.priority_ceiling})")
    return requested


def quota_month(at: dt.datetime) -> str:
    """The quota period ``at`` falls in: its calendar month in UTC, ``YYYY-MM``."""
    return clock.month_of(at)


def check_quota(tenant: Tenant, used: int, count: int) -> str | None:
    """The client's error when ``count`` more images would pass the tenant's monthly quota,
    ``used`` images being already counted this month (``quota_month``), else None."""
    quota = tenant.monthly_image_quota
    if quota is None or used + count <= quota:
        return None
    if quota == 0:
        return f"Tenant {tenant.name} may not submit images (its monthly image quota is 0)."
    left = max(quota - used, 0)
    return (f"{count} images uploaded, but tenant {tenant.name} has {left} of its "
            f"{quota} monthly images left.")


def check_zipurl(tenant: Tenant) -> str | None:
    """The client's error for a ``zipurl`` from a tenant with a monthly image quota, else None:
    the quota counts images when the task is submitted, and a zip's images are known only when
    the run has fetched it, so a zipurl would pass the quota uncounted."""
    if tenant.monthly_image_quota is None:
        return None
    return (f"zipurl is not available to tenant {tenant.name}: its monthly image quota counts "
            "uploaded images only; upload the images instead.")
