"""The tenants directory (``scaleodm.common.tenants``) without servers.

Covers: parsing the tenants file (a valid one; every refused shape with a clear reason that never
shows a token); the single ``SCALEODM_TOKEN`` admin, the open node and their combination with a
file; token lookup (the right tenant per token, None for a wrong, empty or missing token, every
token compared whatever matched); hot reload on a virtual clock (a rewritten file, a malformed
rewrite keeping the last good directory with a token-free warning, a deleted file, the look
interval); the submission checks (options, images, priority, monthly quota); OIDC settings
validation; who may access whose tasks; the scheduler's per-tenant run limit following reloads.
Leaves out JWT verification against an issuer (tests/integration/test_tenants_jwt.py) and the
gateway's routes (tests/integration/test_tenants.py).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import SecretStr, ValidationError

from scaleodm.common import tenants
from scaleodm.scheduler import app as scheduler_app
from tests.harness.monotonic import Clock

ALICE = "alice-token-0123456789"
ALICE_2 = "alice-second-token-xyz"
BOB = "bob-token-abcdefghijkl"
ADMIN = "node-wide-admin-token"

VALID = f"""
tenants:
  - name: alice
    tokens: [{ALICE}, {ALICE_2}]
    max_images: 500
    allowed_options: [pc-quality, feature-quality, dsm]
    max_active_runs: 2
    monthly_image_quota: 10000
    priority: 10
    max_priority: 20
  - name: bob
    role: admin
    tokens: [{BOB}]
  - name: carol-jwt-only
    denied_options: [dsm]
"""


# Makes a tenants file of the given text and its directory (on the virtual clock).
Make = Callable[[str], tuple[Path, tenants.TenantDirectory]]


def tenant(**fields: Any) -> tenants.Tenant:
    return tenants.Tenant(**{"name": "alice", **fields})


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------


def test_a_valid_file_parses_with_every_field() -> None:
    parsed = tenants.parse_tenants(VALID)

    alice, bob, carol = parsed.tenants
    assert alice.name == "alice" and alice.role == "user"
    assert [t.get_secret_value() for t in alice.tokens] == [ALICE, ALICE_2]
    assert (alice.max_images, alice.max_active_runs, alice.monthly_image_quota) == (500, 2, 10000)
    assert alice.allowed_options == ("pc-quality", "feature-quality", "dsm")
    assert alice.denied_options == () and (alice.priority, alice.max_priority) == (10, 20)
    assert bob.role == "admin" and bob.max_images is None and bob.allowed_options is None
    assert carol.tokens == () and carol.priority == 0 and carol.denied_options == ("dsm",)
    assert ALICE not in repr(parsed)  # tokens are SecretStr


def _one(**fields: Any) -> str:
    """A file of one tenant ``alice`` (token ALICE unless told) with ``fields`` as YAML flow
    values."""
    fields = {"tokens": f"[{ALICE}]", **fields}
    lines = "".join(f"    {key}: {value}\n" for key, value in fields.items())
    return f"tenants:\n  - name: alice\n{lines}"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param(f"tenants:\n  - name: a\n    tokens: [{ALICE}]\n  - name: a\n",
                     "tenant names must be unique: a", id="duplicate-name"),
        pytest.param(f"tenants:\n  - name: a\n    tokens: [{ALICE}]\n"
                     f"  - name: b\n    tokens: [{BOB}, {ALICE}]\n",
                     "a token is shared by tenants a and b", id="shared-token"),
        pytest.param(_one(tokens="[short-token]"), "tenants.0.tokens: Value error, a token must "
                     "be 16 to 512 printable ASCII characters", id="short-token"),
        pytest.param(_one(tokens='["spaces in this token value"]'),
                     "printable ASCII characters without spaces", id="token-with-spaces"),
        pytest.param(_one(tokens=f"[{ALICE}, {ALICE}]"), "the same token is listed twice",
                     id="token-twice"),
        pytest.param(_one(max_image=5), "tenants.0.max_image: Extra inputs are not permitted",
                     id="unknown-key"),
        pytest.param("tenants: []\nversion: 2\n", "version: Extra inputs are not permitted",
                     id="unknown-top-level-key"),
        pytest.param(_one(role="root"), "tenants.0.role: Input should be 'user' or 'admin'",
                     id="bad-role"),
        pytest.param(_one(max_images=0), "tenants.0.max_images: Input should be greater than "
                     "or equal to 1", id="zero-max-images"),
        pytest.param(_one(max_active_runs=-1), "tenants.0.max_active_runs: Input should be "
                     "greater than or equal to 0", id="negative-active-runs"),
        pytest.param(_one(monthly_image_quota=-5), "tenants.0.monthly_image_quota: Input should "
                     "be greater than or equal to 0", id="negative-quota"),
        pytest.param(_one(priority=101), "tenants.0.priority: Input should be less than or "
                     "equal to 100", id="priority-out-of-range"),
        pytest.param(_one(priority=5, max_priority=1), "max_priority is below priority",
                     id="ceiling-below-default"),
        pytest.param(_one(denied_options="[pc-quality, no-such-option]"),
                     "tenants.0.denied_options: Value error, unknown ODM option(s): "
                     "no-such-option", id="unknown-option"),
        pytest.param(_one(allowed_options="[dsm]", denied_options="[dsm]"),
                     "options both allowed and denied: dsm", id="allowed-and-denied"),
        pytest.param("tenants:\n  - name: Alice\n", "tenants.0.name: String should match "
                     "pattern", id="bad-name"),
        pytest.param(_one(max_images=5) + "    max_images: 50\n",
                     "invalid YAML at line 5, column 5: key 'max_images' repeated",
                     id="repeated-yaml-key"),
        pytest.param("- alice\n", "the file must be a mapping with a `tenants` list",
                     id="not-a-mapping"),
        pytest.param("", "the file must be a mapping", id="empty"),
        pytest.param("tenants: [\n", "invalid YAML at line 2", id="yaml-syntax"),
        pytest.param("{}\n", "tenants: Field required", id="no-tenants"),
    ],
)
def test_a_bad_file_is_refused_with_a_clear_reason(text: str, reason: str) -> None:
    with pytest.raises(tenants.TenantsFileError) as refused:
        tenants.parse_tenants(text)

    assert reason in str(refused.value)
    for token in (ALICE, BOB, "short-token", "spaces in this token value"):
        assert token not in str(refused.value)


def test_a_yaml_error_next_to_a_token_does_not_quote_it() -> None:
    # PyYAML's own message quotes the offending line, here the token's.
    text = f"tenants:\n  - name: alice\n    tokens: [{ALICE}\n    role: user\n"

    with pytest.raises(tenants.TenantsFileError) as refused:
        tenants.parse_tenants(text)

    assert str(refused.value).startswith("invalid YAML at line")
    assert ALICE not in str(refused.value)


def test_option_names_come_from_the_given_catalog() -> None:
    text = _one(denied_options="[new-odm-option]")

    parsed = tenants.parse_tenants(text, option_names=["new-odm-option"])

    assert parsed.tenants[0].denied_options == ("new-odm-option",)
    with pytest.raises(tenants.TenantsFileError, match="unknown ODM option"):
        tenants.parse_tenants(text)  # not in the packaged catalog


# --------------------------------------------------------------------------------------------
# Directory: single token, open node, lookup
# --------------------------------------------------------------------------------------------


def test_the_single_token_is_an_admin_tenant_without_limits() -> None:
    directory = tenants.TenantDirectory(token=SecretStr("short"))  # exempt from the length rule

    admin = directory.lookup_token("short")

    assert admin is not None and admin.name == tenants.ADMIN_TENANT and admin.role == "admin"
    assert (admin.max_images, admin.allowed_options, admin.max_active_runs,
            admin.monthly_image_quota, admin.priority_ceiling) == (None, None, None, None, 100)
    assert not directory.open and directory.tenant("admin") == admin
    for wrong in ("shorT", "short ", "", None):
        assert directory.lookup_token(wrong) is None


@pytest.mark.parametrize("token", [None, SecretStr("")], ids=["unset", "empty"])
def test_without_file_or_token_the_node_is_open(token: SecretStr | None) -> None:
    directory = tenants.TenantDirectory(token=token)

    assert directory.open
    for presented in (None, "", "anything", ADMIN):
        found = directory.lookup_token(presented)
        assert found is not None and found.name == tenants.OPEN_TENANT and found.role == "admin"
    assert [t.name for t in directory.tenants] == [tenants.OPEN_TENANT]


def test_each_token_finds_its_tenant(tmp_path: Path) -> None:
    directory = tenants.TenantDirectory(write(tmp_path / "t.yaml", VALID), SecretStr(ADMIN))

    found = {token: directory.lookup_token(token) for token in (ALICE, ALICE_2, BOB, ADMIN)}

    assert {token: t.name if t else None for token, t in found.items()} == {
        ALICE: "alice", ALICE_2: "alice", BOB: "bob", ADMIN: "admin"}
    assert [t.name for t in directory.tenants] == ["alice", "bob", "carol-jwt-only", "admin"]
    assert not directory.open


@pytest.mark.parametrize(
    "token",
    [None, "", ALICE[:-1], ALICE + "x", ALICE.upper(), "caf\u00e9-" + ALICE, "\udcff" * 20],
    ids=["none", "empty", "prefix", "longer", "case", "non-ascii", "lone-surrogates"],
)
def test_a_wrong_token_finds_no_tenant(tmp_path: Path, token: str | None) -> None:
    directory = tenants.TenantDirectory(write(tmp_path / "t.yaml", VALID))

    assert directory.lookup_token(token) is None


@pytest.mark.parametrize("token", [ALICE, BOB, "no-such-token-at-all"], ids=["first", "last",
                                                                              "none"])
def test_every_token_is_compared_whatever_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    directory = tenants.TenantDirectory(write(tmp_path / "t.yaml", VALID))
    compared: list[tuple[int, int]] = []
    real = tenants.secrets.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(tenants.secrets, "compare_digest", counting)
    directory.lookup_token(token)

    assert compared == [(32, 32)] * 3  # all three tokens, as digests of one length


def test_the_single_token_and_a_file_must_not_clash(tmp_path: Path) -> None:
    path = write(tmp_path / "t.yaml", VALID)

    with pytest.raises(tenants.TenantsFileError, match="same as SCALEODM_TOKEN"):
        tenants.TenantDirectory(path, SecretStr(BOB))
    write(path, "tenants:\n  - name: admin\n")
    with pytest.raises(tenants.TenantsFileError, match="'admin' is taken by SCALEODM_TOKEN"):
        tenants.TenantDirectory(path, SecretStr(ADMIN))


def test_a_bad_or_missing_file_at_start_up_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(tenants.TenantsFileError, match="missing or unreadable"):
        tenants.TenantDirectory(tmp_path / "missing.yaml")
    with pytest.raises(tenants.TenantsFileError, match="Extra inputs"):
        tenants.TenantDirectory(write(tmp_path / "t.yaml", _one(max_image=5)))
    (tmp_path / "bin.yaml").write_bytes(b"tenants: [\xff]\n")
    with pytest.raises(tenants.TenantsFileError, match="not UTF-8"):
        tenants.TenantDirectory(tmp_path / "bin.yaml")


def test_oidc_needs_a_file_naming_its_unknown_tenant(tmp_path: Path) -> None:
    oidc = tenants.OidcSettings(issuer="https://idp.example", audience="scaleodm",
                                unknown_tenant="guests")

    with pytest.raises(ValueError, match="OIDC needs a tenants file"):
        tenants.TenantDirectory(oidc=oidc)
    with pytest.raises(tenants.TenantsFileError, match="unknown_tenant 'guests' is not in"):
        tenants.TenantDirectory(write(tmp_path / "t.yaml", VALID), oidc=oidc)


async def test_bearer_tokens_are_refused_without_oidc(tmp_path: Path) -> None:
    directory = tenants.TenantDirectory(write(tmp_path / "t.yaml", VALID))

    with pytest.raises(tenants.AuthenticationError) as refused:
        await directory.authenticate_bearer("a.b.c")

    assert refused.value.message == (
        "Invalid authentication token: bearer tokens are not accepted on this node.")


# --------------------------------------------------------------------------------------------
# Hot reload
# --------------------------------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reloading(tmp_path: Path, clock: Clock) -> Make:
    def make(text: str) -> tuple[Path, tenants.TenantDirectory]:
        path = write(tmp_path / "tenants.yaml", text)
        return path, tenants.TenantDirectory(path, reload_interval_s=1.0, monotonic=clock)
    return make


def _rewrite(path: Path, text: str) -> None:
    """A new file in place of ``path``, as a ConfigMap update makes it (a new inode)."""
    new = path.with_suffix(".new")
    new.write_text(text)
    os.replace(new, path)


def test_a_rewritten_file_is_loaded_after_the_interval(
    reloading: Make, clock: Clock
) -> None:
    path, directory = reloading(VALID)
    _rewrite(path, f"tenants:\n  - name: bob\n    tokens: [{BOB}]\n    max_images: 7\n")

    assert not directory.reload_if_changed()  # within the interval: not even a stat
    assert directory.lookup_token(ALICE) is not None
    clock.advance(1.0)
    assert directory.reload_if_changed()

    assert directory.lookup_token(ALICE) is None and directory.tenant("alice") is None
    bob = directory.lookup_token(BOB)
    assert bob is not None and bob.max_images == 7 and bob.role == "user"
    clock.advance(1.0)
    assert not directory.reload_if_changed()  # unchanged


def test_an_edit_in_place_is_noticed(
    reloading: Make, clock: Clock
) -> None:
    path, directory = reloading(VALID)
    path.write_text(VALID.replace("max_images: 500", "max_images: 50"))  # same inode, new size

    clock.advance(5.0)
    assert directory.reload_if_changed()

    assert directory.tenant("alice") is not None
    assert directory.tenant("alice").max_images == 50  # type: ignore[union-attr]


def test_a_malformed_rewrite_keeps_the_last_good_directory(
    reloading: Make, clock: Clock
) -> None:
    path, directory = reloading(VALID)
    secret = "brand-new-secret-token-0001"
    _rewrite(path, f"tenants:\n  - name: dave\n    tokens: [{secret}, short]\n")

    clock.advance(1.0)
    with structlog.testing.capture_logs() as logs:
        assert not directory.reload_if_changed()
        clock.advance(1.0)
        assert not directory.reload_if_changed()  # the same bad file is reported once

    assert directory.lookup_token(ALICE) is not None and directory.lookup_token(secret) is None
    assert [(e["log_level"], e["event"]) for e in logs] == [
        ("warning", "tenants file refused; keeping the last good one")]
    assert "tenants.0.tokens: Value error, a token must be 16" in logs[0]["reason"]
    assert secret not in repr(logs) and "short" not in logs[0]["reason"]

    _rewrite(path, f"tenants:\n  - name: dave\n    tokens: [{secret}]\n")
    clock.advance(1.0)
    assert directory.reload_if_changed()
    assert directory.lookup_token(secret) is not None and directory.lookup_token(ALICE) is None


def test_a_deleted_file_keeps_the_last_good_directory(
    reloading: Make, clock: Clock
) -> None:
    path, directory = reloading(VALID)
    path.unlink()

    clock.advance(1.0)
    with structlog.testing.capture_logs() as logs:
        assert not directory.reload_if_changed()

    assert directory.lookup_token(ALICE) is not None and not directory.open
    assert [e["event"] for e in logs] == [
        "tenants file missing or unreadable; keeping the last good one"]
    write(path, f"tenants:\n  - name: bob\n    tokens: [{BOB}]\n")
    clock.advance(1.0)
    assert directory.reload_if_changed() and directory.lookup_token(ALICE) is None


def test_a_reload_clashing_with_oidc_settings_is_refused(
    tmp_path: Path, clock: Clock
) -> None:
    path = write(tmp_path / "t.yaml", VALID)
    oidc = tenants.OidcSettings(issuer="https://idp.example", audience="scaleodm",
                                unknown_tenant="carol-jwt-only")
    directory = tenants.TenantDirectory(path, oidc=oidc, monotonic=clock)
    _rewrite(path, f"tenants:\n  - name: bob\n    tokens: [{BOB}]\n")

    clock.advance(1.0)
    with structlog.testing.capture_logs() as logs:
        assert not directory.reload_if_changed()

    assert "unknown_tenant 'carol-jwt-only' is not in the file" in logs[0]["reason"]
    assert directory.tenant("carol-jwt-only") is not None


def test_without_a_file_nothing_reloads(clock: Clock) -> None:
    directory = tenants.TenantDirectory(token=SecretStr(ADMIN), monotonic=clock)
    clock.advance(10.0)

    assert not directory.reload_if_changed()


# --------------------------------------------------------------------------------------------
# Submission checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "names", "error"),
    [
        pytest.param({}, ["pc-quality", "dsm"], None, id="no-limits"),
        pytest.param({"denied_options": ["pc-quality"]}, ["dsm", "pc-quality"],
                     "Option 'pc-quality' is not allowed for tenant alice", id="denied"),
        pytest.param({"allowed_options": ["dsm"]}, ["dsm"], None, id="allowed"),
        pytest.param({"allowed_options": ["dsm"]}, ["dsm", "orthophoto-resolution"],
                     "Option 'orthophoto-resolution' is not allowed for tenant alice",
                     id="not-in-allowed"),
        pytest.param({"allowed_options": []}, [], None, id="none-allowed-none-given"),
        pytest.param({"allowed_options": []}, ["bogus\nname"],
                     "Option 'bogus\\\\x0aname' is not allowed for tenant alice",
                     id="client-text-escaped"),
    ],
)
def test_check_options(fields: dict[str, Any], names: list[str], error: str | None) -> None:
    assert tenants.check_options(tenant(**fields), names) == error


@pytest.mark.parametrize(
    ("limit", "node_max", "count", "error"),
    [
        pytest.param(None, None, 100_000, None, id="unlimited"),
        pytest.param(100, None, 100, None, id="at-limit"),
        pytest.param(100, None, 101,
                     "101 images uploaded, but this node can only process up to 100.",
                     id="over-tenant-limit"),
        pytest.param(100, 50, 60, "60 images uploaded, but this node can only process up to 50.",
                     id="node-limit-smaller"),
        pytest.param(None, 50, 50, None, id="node-limit-only"),
    ],
)
def test_check_images(limit: int | None, node_max: int | None, count: int,
                      error: str | None) -> None:
    alice = tenant(max_images=limit)

    assert tenants.check_images(alice, count, node_max) == error
    assert tenants.max_images(alice, node_max) == (
        min(n for n in (limit, node_max) if n) if limit or node_max else None)


@pytest.mark.parametrize(
    ("fields", "requested", "expected"),
    [
        pytest.param({"priority": 5}, None, 5, id="default"),
        pytest.param({"priority": 5}, -100, -100, id="lower-always-allowed"),
        pytest.param({"priority": 5}, 5, 5, id="user-at-default"),
        pytest.param({"priority": 5}, 6, "Invalid priority: 6 (tenant alice may ask for at "
                     "most 5)", id="user-above-default"),
        pytest.param({"priority": 5, "max_priority": 50}, 50, 50, id="user-up-to-ceiling"),
        pytest.param({"role": "admin"}, 100, 100, id="admin-any"),
        pytest.param({"role": "admin", "max_priority": 10}, 11, "Invalid priority: 11 (tenant "
                     "alice may ask for at most 10)", id="admin-with-ceiling"),
        pytest.param({"role": "admin"}, 101, "Invalid priority: 101 (an integer from -100 to "
                     "100)", id="out-of-range"),
        pytest.param({}, -101, "Invalid priority: -101 (an integer from -100 to 100)",
                     id="below-range"),
    ],
)
def test_check_priority(fields: dict[str, Any], requested: int | None,
                        expected: int | str) -> None:
    alice = tenant(**fields)

    if isinstance(expected, int):
        assert tenants.check_priority(alice, requested) == expected
    else:
        with pytest.raises(tenants.PriorityError) as refused:
            tenants.check_priority(alice, requested)
        assert refused.value.message == expected


@pytest.mark.parametrize(
    ("quota", "used", "count", "error"),
    [
        pytest.param(None, 10**9, 10**6, None, id="no-quota"),
        pytest.param(1000, 900, 100, None, id="exactly-used-up"),
        pytest.param(1000, 950, 100, "100 images uploaded, but tenant alice has 50 of its 1000 "
                     "monthly images left.", id="over"),
        pytest.param(1000, 1200, 1, "1 images uploaded, but tenant alice has 0 of its 1000 "
                     "monthly images left.", id="already-over"),
        pytest.param(0, 0, 1, "Tenant alice may not submit images (its monthly image quota is "
                     "0).", id="zero-quota"),
    ],
)
def test_check_quota(quota: int | None, used: int, count: int, error: str | None) -> None:
    assert tenants.check_quota(tenant(monthly_image_quota=quota), used, count) == error


@pytest.mark.parametrize(
    ("caller", "owner", "allowed"),
    [
        pytest.param(tenant(), "alice", True, id="own"),
        pytest.param(tenant(), "bob", False, id="another-tenants"),
        pytest.param(tenant(), None, False, id="from-before-tenants"),
        pytest.param(tenant(name="default"), None, True, id="from-before-tenants-default"),
        pytest.param(tenant(role="admin"), "bob", True, id="admin-any"),
        pytest.param(tenant(role="admin"), None, True, id="admin-old"),
    ],
)
def test_may_access(caller: tenants.Tenant, owner: str | None, allowed: bool) -> None:
    """A tenant acts on its own tasks, an admin on any; a task without a tenant (from before
    tenants) is ``default``'s."""
    assert caller.may_access(owner) is allowed


def test_the_scheduler_reads_each_tenants_active_runs_and_follows_reloads(
    reloading: Make, clock: Clock
) -> None:
    path, directory = reloading(VALID)
    limit = scheduler_app.tenant_limits(directory)
    assert (limit("alice"), limit("bob"), limit("nobody")) == (2, None, None)

    _rewrite(path, "tenants:\n  - name: alice\n    max_active_runs: 0\n")
    assert limit("alice") == 2  # within the interval: not even a stat
    clock.advance(1.0)
    assert limit("alice") == 0


def test_the_quota_month_is_the_utc_calendar_month() -> None:
    late = dt.datetime(2026, 1, 31, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5)))

    assert tenants.quota_month(late) == "2026-02"
    assert tenants.quota_month(dt.datetime(2026, 3, 1, tzinfo=dt.UTC)) == "2026-03"


# --------------------------------------------------------------------------------------------
# OIDC settings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        pytest.param({"issuer": "http://idp.example"}, "must be https", id="plain-http"),
        pytest.param({"jwks_url": "http://10.0.0.1/jwks"}, "must be https", id="plain-http-jwks"),
        pytest.param({"issuer": "ftp://idp.example"}, "not an http(s) URL", id="scheme"),
        pytest.param({"algorithms": ["none"]}, "algorithms.0", id="alg-none"),
        pytest.param({"algorithms": ["HS256"]}, "algorithms.0", id="alg-hs256"),
        pytest.param({"algorithms": []}, "at least 1 item", id="no-algorithm"),
    ],
)
def test_oidc_settings_refuse_insecure_values(fields: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error.replace("(", r"\(").replace(")", r"\)")):
        tenants.OidcSettings(**{"issuer": "https://idp.example", "audience": "a", **fields})


@pytest.mark.parametrize("issuer", ["https://idp.example/realms/x", "http://127.0.0.1:8080",
                                    "http://localhost/", "http://[::1]:9000"])
def test_oidc_settings_accept_https_and_loopback(issuer: str) -> None:
    oidc = tenants.OidcSettings(issuer=issuer, audience="scaleodm")

    assert oidc.issuer == issuer  # kept exactly: it is compared with `iss`
    assert oidc.discovery_url == issuer.rstrip("/") + "/.well-known/openid-configuration"
    assert oidc.algorithms == ["RS256", "ES256"] and oidc.tenant_claim == "tenant"
