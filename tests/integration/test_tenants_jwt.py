"""OIDC bearer tokens (``TenantDirectory.authenticate_bearer``) against a local JWKS issuer.

The issuer is a small HTTP server on 127.0.0.1 (``tests.harness.oidc``) serving an OIDC
discovery document and a JWKS of an RSA and an EC key made here with ``cryptography``; tokens
are signed with PyJWT, hostile ones built by hand. The directory's monotonic clock is virtual,
so the refetch interval and the key cache are tested without sleeping; token times (``exp``,
``nbf``, ``iat``) are real, as PyJWT reads the wall clock.

Covers: valid RS256 and ES256 tokens (discovery or an explicit ``jwks_url``), the leeway; every
refusal (expired, not yet valid, wrong issuer or audience, another key, ``alg: none``, HS256
signed with the public key, a disallowed algorithm, an unknown ``kid``, a missing or unknown
tenant claim, a tenant removed by a reload, an oversized or malformed token), each a typed error
with a fixed message holding no token material; a flood of unknown ``kid`` s costing at most one
JWKS fetch per interval, also when concurrent; key rotation; a JWKS endpoint that hangs (bounded
by the fetch timeout), answers garbage, an error, too much, or only a symmetric key; stale keys
kept when a refresh fails; discovery naming another issuer; ``unknown_tenant`` and
``role_claim``. Leaves out TLS (the https rule is a settings check, tests/unit/test_tenants.py)
and the gateway routes (``tests/integration/test_tenants.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import structlog
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from scaleodm.common import tenants
from tests.harness.monotonic import Clock
from tests.harness.oidc import (
    AUDIENCE,
    EC_KEY,
    RSA_KEY,
    Issuer,
    b64,
    claims,
    jwk,
    signed,
)

pytestmark = pytest.mark.integration

OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ROTATED_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_HEADER = {"alg": "RS256", "typ": "JWT", "kid": "rsa-1"}

TENANTS = """
tenants:
  - name: alice
    max_images: 100
  - name: bob
    role: admin
  - name: guests
    max_active_runs: 1
"""


@pytest.fixture(scope="module")
def issuer_server() -> Iterator[Issuer]:
    issuer = Issuer()
    issuer.start()
    yield issuer
    issuer.stop()


@pytest.fixture
def issuer(issuer_server: Issuer) -> Issuer:
    issuer_server.reset()
    return issuer_server


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tenants_file(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS)
    return path


def directory_for(issuer: Issuer, path: Path, clock: Clock,
                  **oidc: Any) -> tenants.TenantDirectory:
    settings = tenants.OidcSettings(**{
        "issuer": issuer.url, "audience": AUDIENCE, "fetch_timeout_s": 0.5,
        "jwks_refetch_interval_s": 30.0, "jwks_cache_s": 300.0, **oidc})
    return tenants.TenantDirectory(path, oidc=settings, monotonic=clock)


@pytest.fixture
def directory(issuer: Issuer, tenants_file: Path, clock: Clock) -> tenants.TenantDirectory:
    return directory_for(issuer, tenants_file, clock)


def hand_made(header: dict[str, Any], body: dict[str, Any],
              secret: bytes | rsa.RSAPrivateKey | None) -> str:
    """A JWS built by hand (PyJWT refuses to make these): unsigned, HS256 over a ``secret``, or
    RS256 with an RSA key."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    if secret is None:
        return signing_input + "."
    if isinstance(secret, bytes):
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    else:
        signature = secret.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def public_pem() -> bytes:
    return RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


async def refused(directory: tenants.TenantDirectory, token: str) -> str:
    """The message of the refusal of ``token``, checked to hold none of the token."""
    with pytest.raises(tenants.AuthenticationError) as refusal:
        await directory.authenticate_bearer(token)
    message = refusal.value.message
    assert all(part not in message for part in token.split(".") if len(part) >= 8)
    return message


# --------------------------------------------------------------------------------------------
# Accepted tokens
# --------------------------------------------------------------------------------------------


async def test_a_valid_token_is_its_tenant(
    issuer: Issuer, directory: tenants.TenantDirectory
) -> None:
    rs = await directory.authenticate_bearer(signed(claims(issuer)))
    es = await directory.authenticate_bearer(
        signed(claims(issuer, tenant="bob"), EC_KEY, "ES256", "ec-1"))

    assert (rs.name, rs.max_images, rs.role) == ("alice", 100, "user")
    assert (es.name, es.role) == ("bob", "admin")
    # One discovery and one JWKS fetch, then the cache.
    assert (issuer.count("/.well-known/openid-configuration"), issuer.count("/jwks")) == (1, 1)


async def test_an_explicit_jwks_url_needs_no_discovery(
    issuer: Issuer, tenants_file: Path, clock: Clock
) -> None:
    directory = directory_for(issuer, tenants_file, clock, jwks_url=issuer.url + "/jwks")

    found = await directory.authenticate_bearer(signed(claims(issuer)))

    assert found.name == "alice"
    assert (issuer.count("/.well-known/openid-configuration"), issuer.count("/jwks")) == (0, 1)


async def test_clock_skew_within_the_leeway_is_accepted(
    issuer: Issuer, directory: tenants.TenantDirectory
) -> None:
    now = int(time.time())
    token = signed(claims(issuer, exp=now - 10, iat=now + 10, nbf=now + 10))

    assert (await directory.authenticate_bearer(token)).name == "alice"


async def test_a_jwk_without_alg_serves_the_tokens_rsa_algorithm(
    issuer: Issuer, tenants_file: Path, clock: Clock
) -> None:
    directory = directory_for(issuer, tenants_file, clock, algorithms=["PS256"])

    found = await directory.authenticate_bearer(signed(claims(issuer), alg="PS256"))

    assert found.name == "alice"


async def test_a_token_without_kid_needs_an_issuer_of_one_key(
    issuer: Issuer, directory: tenants.TenantDirectory
) -> None:
    issuer.jwks = {"keys": [jwk(RSA_KEY, "rsa-1")]}

    found = await directory.authenticate_bearer(jwt.encode(claims(issuer), RSA_KEY, "RS256"))

    assert found.name == "alice"  # with several keys: refused, see REFUSALS


async def test_hand_made_tokens_verify_when_nothing_is_wrong_with_them(
    issuer: Issuer, directory: tenants.TenantDirectory
) -> None:
    # The hostile tokens below are refused for what they change, not for how they are made.
    token = hand_made(RSA_HEADER, claims(issuer), RSA_KEY)

    assert (await directory.authenticate_bearer(token)).name == "alice"


# --------------------------------------------------------------------------------------------
# Refused tokens
# --------------------------------------------------------------------------------------------


Build = Callable[[Issuer], str]


def _at(**offsets: int | None) -> Build:
    """A token signed by the issuer's RSA key, with claims ``now + offset`` (None: no claim)."""
    def build(issuer: Issuer) -> str:
        now = int(time.time())
        return signed(claims(issuer, **{k: v if v is None else now + v
                                        for k, v in offsets.items()}))
    return build


def _with(**overrides: Any) -> Build:
    """A token signed by the issuer's RSA key, with these claims (None: no claim)."""
    return lambda issuer: signed(claims(issuer, **overrides))


REFUSALS: list[tuple[str, Build, str]] = [
    ("expired", _at(exp=-120), "token expired"),
    ("not-yet-valid", _at(nbf=120), "token not yet valid"),
    ("issued-in-the-future", _at(iat=120), "token not yet valid"),
    ("no-exp", _at(exp=None), "missing claim 'exp'"),
    ("no-iat", _at(iat=None), "missing claim 'iat'"),
    ("wrong-issuer", _with(iss="https://evil.example"), "wrong issuer"),
    ("wrong-audience", _with(aud="another-api"), "wrong audience"),
    ("no-audience", _with(aud=None), "missing claim 'aud'"),
    ("another-key", lambda i: signed(claims(i), OTHER_RSA_KEY), "bad signature"),
    ("ec-token-on-an-rsa-kid", lambda i: signed(claims(i), EC_KEY, "ES256", "rsa-1"),
     "unusable signing key"),
    ("alg-none", lambda i: hand_made({**RSA_HEADER, "alg": "none"}, claims(i), None),
     "algorithm not allowed"),
    ("hs256-signed-with-the-public-key",
     lambda i: hand_made({**RSA_HEADER, "alg": "HS256"}, claims(i), public_pem()),
     "algorithm not allowed"),
    ("alg-not-configured", lambda i: signed(claims(i), alg="RS512"), "algorithm not allowed"),
    ("unknown-kid", lambda i: signed(claims(i), kid="no-such-key"), "unknown signing key"),
    ("no-kid-with-several-keys", lambda i: jwt.encode(claims(i), RSA_KEY, algorithm="RS256"),
     "unknown signing key"),
    ("kid-not-a-string", lambda i: hand_made({**RSA_HEADER, "kid": 7}, claims(i), RSA_KEY),
     "malformed token"),
    ("unknown-tenant", _with(tenant="mallory"), "unknown tenant"),
    ("implicit-admin-unreachable", _with(tenant="admin"), "unknown tenant"),
    ("tenant-not-a-string", _with(tenant=["alice"]), "missing claim 'tenant'"),
    ("no-tenant", _with(tenant=None), "missing claim 'tenant'"),
    ("oversized", _with(padding="x" * tenants.MAX_JWT_BYTES), "token too large"),
    ("not-a-jwt", lambda i: "not-a-jwt-at-all", "malformed token"),
    ("bad-base64", lambda i: "eyJhbGciOiJSUzI1NiJ9.%%%%%%%%.%%%%%%%%", "malformed token"),
    ("non-ascii", lambda i: "\u00e9" + signed(claims(i)), "malformed token"),
]


@pytest.mark.parametrize(("build", "reason"),
                         [pytest.param(b, r, id=i) for i, b, r in REFUSALS])
async def test_a_bad_token_is_refused_with_a_short_message(
    issuer: Issuer, directory: tenants.TenantDirectory, build: Build, reason: str
) -> None:
    message = await refused(directory, build(issuer))

    assert message == f"Invalid authentication token: {reason}."
    assert "mallory" not in message and "evil" not in message


async def test_tokens_refused_before_any_key_is_fetched_cost_no_fetch(
    issuer: Issuer, directory: tenants.TenantDirectory
) -> None:
    early = {"alg-none", "hs256-signed-with-the-public-key", "alg-not-configured",
             "kid-not-a-string", "oversized", "not-a-jwt", "bad-base64", "non-ascii"}
    for _, build, _ in [r for r in REFUSALS if r[0] in early]:
        await refused(directory, build(issuer))

    assert issuer.count("/jwks") == 0 and issuer.count("/.well-known/openid-configuration") == 0


async def test_a_tenant_removed_by_a_reload_is_refused(
    issuer: Issuer, directory: tenants.TenantDirectory, tenants_file: Path, clock: Clock
) -> None:
    token = signed(claims(issuer))
    assert (await directory.authenticate_bearer(token)).name == "alice"
    tenants_file.write_text("tenants:\n  - name: bob\n")

    clock.advance(1.0)
    assert directory.reload_if_changed()

    assert await refused(directory, token) == "Invalid authentication token: unknown tenant."


async def test_unknown_tenants_may_map_to_a_file_tenant(
    issuer: Issuer, tenants_file: Path, clock: Clock
) -> None:
    directory = directory_for(issuer, tenants_file, clock, unknown_tenant="guests")

    mapped = await directory.authenticate_bearer(signed(claims(issuer, tenant="mallory")))
    known = await directory.authenticate_bearer(signed(claims(issuer, tenant="alice")))

    assert (mapped.name, mapped.max_active_runs, known.name) == ("guests", 1, "alice")


@pytest.mark.parametrize(
    ("roles", "role"),
    [
        pytest.param(["viewer", "admin"], "admin", id="list-with-admin"),
        pytest.param("admin", "admin", id="string-admin"),
        pytest.param(["viewer"], "user", id="list-without-admin"),
        pytest.param(None, "user", id="no-claim"),
    ],
)
async def test_the_role_claim_can_only_take_admin_away(
    issuer: Issuer, tenants_file: Path, clock: Clock, roles: Any, role: str
) -> None:
    directory = directory_for(issuer, tenants_file, clock, role_claim="roles")

    bob = await directory.authenticate_bearer(signed(claims(issuer, tenant="bob", roles=roles)))
    alice = await directory.authenticate_bearer(signed(claims(issuer, roles=["admin"])))

    assert (bob.name, bob.role) == ("bob", role)
    assert alice.role == "user"  # the identity provider cannot grant admin
    assert directory.tenant("bob").role == "admin"  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------
# Fetching keys
# --------------------------------------------------------------------------------------------


async def test_a_flood_of_unknown_kids_fetches_at_most_once_per_interval(
    issuer: Issuer, directory: tenants.TenantDirectory, clock: Clock
) -> None:
    def random_kid() -> str:
        return signed(claims(issuer), kid=uuid.uuid4().hex)

    await directory.authenticate_bearer(signed(claims(issuer)))  # the first fetch
    for _ in range(50):
        await refused(directory, random_kid())
    assert issuer.count("/jwks") == 1

    clock.advance(30.0)
    await asyncio.gather(*(refused(directory, random_kid()) for _ in range(50)))
    for _ in range(50):
        await refused(directory, random_kid())
    assert issuer.count("/jwks") == 2  # one refetch for the whole concurrent burst and after
    assert issuer.count("/.well-known/openid-configuration") == 1


async def test_a_rotated_key_is_fetched_on_its_first_token(
    issuer: Issuer, directory: tenants.TenantDirectory, clock: Clock
) -> None:
    await directory.authenticate_bearer(signed(claims(issuer)))
    issuer.jwks = {"keys": [jwk(ROTATED_KEY, "rsa-2")]}
    rotated = signed(claims(issuer), ROTATED_KEY, kid="rsa-2")

    assert await refused(directory, rotated) == (
        "Invalid authentication token: unknown signing key.")  # within the interval
    clock.advance(30.0)
    assert (await directory.authenticate_bearer(rotated)).name == "alice"
    assert await refused(directory, signed(claims(issuer))) == (
        "Invalid authentication token: unknown signing key.")  # the old key is gone


async def test_a_hanging_jwks_endpoint_is_bounded_by_the_timeout(
    issuer: Issuer, directory: tenants.TenantDirectory
) -> None:
    issuer.jwks_hangs = True
    token = signed(claims(issuer))

    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(tenants.IdentityProviderError) as unavailable:
            await directory.authenticate_bearer(token)
    elapsed = time.monotonic() - started

    assert unavailable.value.message == "Identity provider unavailable, please retry later."
    assert 0.4 < elapsed < 3.0
    assert [(e["event"], e["reason"]) for e in logs] == [
        ("cannot fetch the identity provider's keys", "no answer within 0.5 s")]
    with pytest.raises(tenants.IdentityProviderError):  # within the interval: no new fetch
        await directory.authenticate_bearer(token)
    assert issuer.count("/jwks") == 1


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        pytest.param({"jwks_body": b"<html>not json</html>"}, "/jwks answered no JSON",
                     id="not-json"),
        pytest.param({"jwks": {"keys": "none"}}, "the JWKS has no `keys` list", id="no-keys"),
        pytest.param({"jwks": {"keys": [{"kty": "oct", "k": b64(b"secret"), "kid": "rsa-1"}]}},
                     "the JWKS has no asymmetric signature key", id="only-symmetric"),
        pytest.param({"jwks": {"keys": [{**jwk(RSA_KEY, "rsa-1"), "use": "enc"}]}},
                     "the JWKS has no asymmetric signature key", id="only-encryption"),
        pytest.param({"jwks_status": 500}, "/jwks answered HTTP 500", id="http-500"),
        pytest.param({"jwks_body": b" " * (tenants.MAX_JWKS_BYTES + 1)},
                     f"/jwks answered more than {tenants.MAX_JWKS_BYTES} bytes", id="too-large"),
        pytest.param({"discovery_issuer": "https://evil.example"},
                     "the discovery document names another issuer", id="discovery-issuer"),
    ],
)
async def test_a_bad_jwks_answer_is_a_clear_error(
    issuer: Issuer, directory: tenants.TenantDirectory, script: dict[str, Any], reason: str
) -> None:
    for name, value in script.items():
        setattr(issuer, name, value)

    with structlog.testing.capture_logs() as logs:
        with pytest.raises(tenants.IdentityProviderError):
            await directory.authenticate_bearer(signed(claims(issuer)))

    assert len(logs) == 1 and logs[0]["log_level"] == "warning"
    assert reason in logs[0]["reason"]


async def test_keys_held_survive_a_failed_refresh(
    issuer: Issuer, directory: tenants.TenantDirectory, clock: Clock
) -> None:
    token = signed(claims(issuer))
    await directory.authenticate_bearer(token)
    issuer.jwks_status = 503

    clock.advance(301.0)  # the cache expired: a refresh, which fails
    with structlog.testing.capture_logs() as logs:
        found = await directory.authenticate_bearer(token)

    assert found.name == "alice" and issuer.count("/jwks") == 2
    assert logs[0]["keeping"] == 2
    issuer.jwks_status = 200
    clock.advance(30.0)
    await directory.authenticate_bearer(token)
    assert issuer.count("/jwks") == 3  # fetched again once the interval passed
