"""Service settings from the environment (scaleodm.common.settings) and the README's table.

Covered:
- nested groups with a double underscore (``SCALEODM_NATS__URL``, ``SCALEODM_MONGO__URL``,
  ``SCALEODM_S3__*``, ``SCALEODM_LOCAL__RUNS_DIR``) and flat service fields
  (``SCALEODM_GATEWAY_PORT``, ``SCALEODM_TOKEN`` as a SecretStr, ...), defaults when unset,
  invalid values rejected;
- ``SCALEODM_MAX_IMAGES``: unset or 0 means unlimited (None; NodeODM's ``maxImages`` is never 0);
- tenants: ``SCALEODM_TENANTS_FILE`` (gateway and scheduler), the optional ``SCALEODM_OIDC__*``
  group (off unless set; an incomplete group, or OIDC without a tenants file, refused; plain http
  only to loopback), expanded by ``env_names`` like the other groups;
- capacity (``SCALEODM_CAPACITY__MAX_ACTIVE``, ``SCALEODM_CAPACITY__CLASSES`` as JSON): size class
  lists that would leave an image count without a class, or two classes for one, are refused;
  ``class_of`` (an unknown count is classed as 200 images) and ``parallel``;
- ``insecure_defaults`` while the development S3 secret is in use;
- ``env_names()`` for each class of ``SETTINGS_CLASSES`` (expected names present, groups expanded,
  other services' names absent);
- ``scripts/settings_table.py --check``: the README's configuration table is current.

Every test starts from an environment without any ``SCALEODM_*`` variable. Left out: the cached
``get_*_settings`` factories and how each service uses its settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from scaleodm.common.settings import (
    DEV_CREDENTIAL,
    SETTINGS_CLASSES,
    CapacitySettings,
    GatewaySettings,
    NotifierSettings,
    SchedulerSettings,
    SizeClass,
    WatcherSettings,
    env_names,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("SCALEODM_"):
            monkeypatch.delenv(name)


def test_nested_nats_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALEODM_NATS__URL", "nats://a:4222, nats://b:4223,")
    s = SchedulerSettings()
    assert s.nats.url == "nats://a:4222, nats://b:4223,"
    assert s.nats.servers() == ["nats://a:4222", "nats://b:4223"]
    assert s.nats.publish_timeout_s == 5.0  # the rest of the group keeps its defaults


def test_nested_mongo_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALEODM_MONGO__URL", "mongodb://db.example:27018/?replicaSet=rs0")
    monkeypatch.setenv("SCALEODM_MONGO__DATABASE", "other")
    s = WatcherSettings()
    assert s.mongo.url == "mongodb://db.example:27018/?replicaSet=rs0"
    assert s.mongo.database == "other"


@pytest.mark.parametrize(
    ("cls", "env", "value", "read"),
    [
        pytest.param(GatewaySettings, "SCALEODM_GATEWAY_PORT", "3100",
                     lambda s: s.gateway_port == 3100, id="gateway-port"),
        pytest.param(GatewaySettings, "SCALEODM_CAPACITY__MAX_ACTIVE", "4",
                     lambda s: s.capacity.max_active == 4, id="capacity-max-active"),
        pytest.param(SchedulerSettings, "SCALEODM_CAPACITY__MAX_ACTIVE", "4",
                     lambda s: s.capacity.max_active == 4, id="scheduler-capacity-max-active"),
        pytest.param(
            SchedulerSettings, "SCALEODM_CAPACITY__CLASSES",
            '[{"name": "small", "max_images": 50, "slots": 3},'
            ' {"name": "huge", "max_images": null, "slots": 1}]',
            lambda s: [(c.name, c.max_images, c.slots) for c in s.capacity.classes]
            == [("small", 50, 3), ("huge", None, 1)],
            id="capacity-classes",
        ),
        pytest.param(SchedulerSettings, "SCALEODM_ADMISSION_INTERVAL_S", "0.5",
                     lambda s: s.admission_interval_s == 0.5, id="admission-interval"),
        pytest.param(SchedulerSettings, "SCALEODM_ARGO__CAPACITY_CONFIGMAP", "caps",
                     lambda s: s.argo.capacity_configmap == "caps", id="capacity-configmap"),
        pytest.param(SchedulerSettings, "SCALEODM_ENGINE", "test",
                     lambda s: s.engine == "test", id="scheduler-engine"),
        pytest.param(SchedulerSettings, "SCALEODM_LOCAL__RUNS_DIR", "/srv/runs",
                     lambda s: s.local.runs_dir == Path("/srv/runs"), id="local-runs-dir"),
        pytest.param(WatcherSettings, "SCALEODM_POLL_INTERVAL_S", "0.5",
                     lambda s: s.poll_interval_s == 0.5, id="poll-interval"),
        pytest.param(NotifierSettings, "SCALEODM_WEBHOOK", "http://hook.example/x",
                     lambda s: s.webhook == "http://hook.example/x", id="webhook"),
        pytest.param(NotifierSettings, "SCALEODM_S3__BUCKET", "b2",
                     lambda s: s.s3.bucket == "b2", id="s3-bucket"),
        pytest.param(GatewaySettings, "SCALEODM_LOG_JSON", "false",
                     lambda s: s.log_json is False, id="bool"),
        pytest.param(GatewaySettings, "scaleodm_gateway_port", "3200",
                     lambda s: s.gateway_port == 3200, id="case-insensitive"),
    ],
)
def test_flat_and_nested_fields(
    monkeypatch: pytest.MonkeyPatch, cls: type, env: str, value: str, read: object
) -> None:
    monkeypatch.setenv(env, value)
    assert read(cls())  # type: ignore[operator]


def test_defaults() -> None:
    s = GatewaySettings()
    assert s.gateway_port == 3000
    assert s.token is None
    assert s.max_images is None
    assert s.nats.url == "nats://127.0.0.1:4222"
    assert s.mongo.url == "mongodb://127.0.0.1:27017"
    assert s.capacity.max_active == 10
    assert [(c.name, c.max_images, c.slots) for c in s.capacity.classes] == [
        ("small", 200, 10), ("medium", 1500, 4), ("large", None, 2)]
    assert s.capacity == SchedulerSettings().capacity  # gateway and scheduler must agree


def _classes(*spec: tuple[str, int | None, int]) -> list[SizeClass]:
    return [SizeClass(name=n, max_images=m, slots=k) for n, m, k in spec]


@pytest.mark.parametrize(
    ("classes", "reason"),
    [
        pytest.param([], "at least one size class", id="empty"),
        pytest.param([{"name": "a", "max_images": 10, "slots": 1},
                      {"name": "a", "max_images": None, "slots": 1}], "distinct",
                     id="duplicate-names"),
        pytest.param([{"name": "a", "max_images": 10, "slots": 1},
                      {"name": "b", "max_images": 100, "slots": 1}], "no `max_images`",
                     id="bounded-last-class"),
        pytest.param([{"name": "a", "max_images": None, "slots": 1},
                      {"name": "b", "max_images": None, "slots": 1}], "no `max_images`",
                     id="unbounded-class-not-last"),
        pytest.param([{"name": "a", "max_images": 500, "slots": 1},
                      {"name": "b", "max_images": 100, "slots": 1},
                      {"name": "c", "max_images": None, "slots": 1}], "ascending",
                     id="descending-max-images"),
        pytest.param([{"name": "a", "max_images": 100, "slots": 1},
                      {"name": "b", "max_images": 100, "slots": 1},
                      {"name": "c", "max_images": None, "slots": 1}], "ascending",
                     id="equal-max-images"),
        pytest.param([{"name": "all", "max_images": None, "slots": 1}], "global cap",
                     id="reserved-name-all"),
    ],
)
def test_invalid_size_classes_refused(
    monkeypatch: pytest.MonkeyPatch, classes: list[dict[str, object]], reason: str
) -> None:
    """Every image count must fall in exactly one class (``class_of``), and the names are the
    semaphore keys of the Workflows beside ``all``."""
    with pytest.raises(ValidationError, match=reason):
        CapacitySettings.model_validate({"classes": classes})
    monkeypatch.setenv("SCALEODM_CAPACITY__CLASSES", json.dumps(classes))
    for cls in (GatewaySettings, SchedulerSettings):
        with pytest.raises(ValidationError, match=reason):
            cls()


def test_class_of_an_image_count() -> None:
    capacity = CapacitySettings(classes=_classes(
        ("small", 100, 1), ("medium", 500, 1), ("large", None, 1)))
    assert [capacity.class_of(n).name for n in (0, 1, 100, 101, 500, 501, 10**6)] == [
        "small", "small", "small", "medium", "medium", "large", "large"]
    # An unknown count (a zipurl, an S3 folder) is classed as 200 images.
    assert capacity.class_of(None) == capacity.class_of(200)
    assert capacity.class_of(None).name == "medium"
    assert CapacitySettings().class_of(None) == CapacitySettings().class_of(200)


@pytest.mark.parametrize(
    ("max_active", "slots", "parallel"),
    [
        pytest.param(10, (2, 3), 5, id="classes-fewer"),
        pytest.param(4, (2, 3), 4, id="cap-fewer"),
        pytest.param(5, (2, 3), 5, id="equal"),
    ],
)
def test_parallel_is_what_can_run_at_once(
    max_active: int, slots: tuple[int, int], parallel: int
) -> None:
    """``maxParallelTasks`` in /info: the global cap or the classes' slots together."""
    capacity = CapacitySettings(max_active=max_active, classes=_classes(
        ("small", 100, slots[0]), ("large", None, slots[1])))
    assert capacity.parallel == parallel


def test_tenants_file_for_gateway_and_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GatewaySettings().tenants_file is None and SchedulerSettings().tenants_file is None
    monkeypatch.setenv("SCALEODM_TENANTS_FILE", "/etc/scaleodm/tenants/tenants.yaml")
    for cls in (GatewaySettings, SchedulerSettings):
        assert cls().tenants_file == Path("/etc/scaleodm/tenants/tenants.yaml")


def test_oidc_is_off_unless_its_issuer_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GatewaySettings().oidc is None
    monkeypatch.setenv("SCALEODM_TENANTS_FILE", "/tenants.yaml")
    monkeypatch.setenv("SCALEODM_OIDC__ISSUER", "https://idp.example/realms/odm")
    monkeypatch.setenv("SCALEODM_OIDC__AUDIENCE", "scaleodm")
    monkeypatch.setenv("SCALEODM_OIDC__ALGORITHMS", '["ES256"]')
    monkeypatch.setenv("SCALEODM_OIDC__LEEWAY_S", "5")
    oidc = GatewaySettings().oidc
    assert oidc is not None
    assert (oidc.issuer, oidc.audience, oidc.algorithms, oidc.leeway_s, oidc.tenant_claim) == (
        "https://idp.example/realms/odm", "scaleodm", ["ES256"], 5.0, "tenant")
    assert oidc.discovery_url == (
        "https://idp.example/realms/odm/.well-known/openid-configuration")


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        pytest.param({"SCALEODM_OIDC__AUDIENCE": "a"}, "issuer", id="no-issuer"),
        pytest.param({"SCALEODM_OIDC__ISSUER": "https://idp.example"}, "audience",
                     id="no-audience"),
        pytest.param({"SCALEODM_OIDC__ISSUER": "http://idp.example",
                      "SCALEODM_OIDC__AUDIENCE": "a"}, "must be https", id="plain-http"),
        pytest.param({"SCALEODM_OIDC__ISSUER": "https://idp.example",
                      "SCALEODM_OIDC__AUDIENCE": "a", "SCALEODM_OIDC__ALGORITHMS": '["HS256"]'},
                     "algorithms", id="symmetric-algorithm"),
    ],
)
def test_oidc_refused_when_incomplete_or_unsafe(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], reason: str
) -> None:
    monkeypatch.setenv("SCALEODM_TENANTS_FILE", "/tenants.yaml")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=reason):
        GatewaySettings()


def test_oidc_needs_a_tenants_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALEODM_OIDC__ISSUER", "http://127.0.0.1:8080")
    monkeypatch.setenv("SCALEODM_OIDC__AUDIENCE", "scaleodm")
    with pytest.raises(ValidationError, match="oidc needs tenants_file"):
        GatewaySettings()


def test_token_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALEODM_TOKEN", "s3cr3t-token")
    s = GatewaySettings()
    assert isinstance(s.token, SecretStr)
    assert s.token.get_secret_value() == "s3cr3t-token"
    assert "s3cr3t-token" not in repr(s)
    assert "s3cr3t-token" not in str(s.model_dump())


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, None, id="unset"),
        pytest.param("0", None, id="zero-is-unlimited"),
        pytest.param("1", 1, id="one"),
        pytest.param("500", 500, id="five-hundred"),
    ],
)
def test_max_images(
    monkeypatch: pytest.MonkeyPatch, value: str | None, expected: int | None
) -> None:
    if value is not None:
        monkeypatch.setenv("SCALEODM_MAX_IMAGES", value)
    assert GatewaySettings().max_images == expected


@pytest.mark.parametrize(
    ("env", "value"),
    [
        pytest.param("SCALEODM_GATEWAY_PORT", "not-a-port", id="gateway-port"),
        pytest.param("SCALEODM_MAX_IMAGES", "many", id="max-images"),
        pytest.param("SCALEODM_ENVIRONMENT", "staging", id="environment"),
        pytest.param("SCALEODM_NATS__PUBLISH_TIMEOUT_S", "soon", id="nested"),
    ],
)
def test_invalid_values_rejected(monkeypatch: pytest.MonkeyPatch, env: str, value: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError):
        GatewaySettings()


def test_insecure_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GatewaySettings().s3.secret_access_key.get_secret_value() == DEV_CREDENTIAL
    assert GatewaySettings().insecure_defaults() == ["s3.secret_access_key"]
    monkeypatch.setenv("SCALEODM_S3__SECRET_ACCESS_KEY", "real-secret")
    assert GatewaySettings().insecure_defaults() == []


COMMON = {
    "SCALEODM_ENVIRONMENT",
    "SCALEODM_LOG_LEVEL",
    "SCALEODM_HEALTH_PORT",
    "SCALEODM_FAILPOINTS",
    "SCALEODM_NATS__URL",
    "SCALEODM_NATS__PUBLISH_TIMEOUT_S",
    "SCALEODM_MONGO__URL",
    "SCALEODM_MONGO__DATABASE",
    "SCALEODM_S3__ENDPOINT_URL",
    "SCALEODM_S3__BUCKET",
    "SCALEODM_S3__SECRET_ACCESS_KEY",
}


@pytest.mark.parametrize(
    ("service", "present", "absent"),
    [
        pytest.param(
            "gateway",
            {"SCALEODM_GATEWAY_PORT", "SCALEODM_GATEWAY_HOST", "SCALEODM_TOKEN",
             "SCALEODM_MAX_IMAGES", "SCALEODM_CAPACITY__MAX_ACTIVE",
             "SCALEODM_CAPACITY__CLASSES", "SCALEODM_ZIPURL_SCHEMES",
             "SCALEODM_TENANTS_FILE", "SCALEODM_OIDC__ISSUER", "SCALEODM_OIDC__AUDIENCE",
             "SCALEODM_OIDC__JWKS_URL", "SCALEODM_OIDC__ALGORITHMS"},
            {"SCALEODM_ENGINE", "SCALEODM_WEBHOOK", "SCALEODM_LOCAL__RUNS_DIR",
             "SCALEODM_MAX_PARALLEL_TASKS", "SCALEODM_ADMISSION_INTERVAL_S"},
            id="gateway",
        ),
        pytest.param(
            "scheduler",
            {"SCALEODM_EXECUTOR", "SCALEODM_ENGINE", "SCALEODM_ODM_IMAGE",
             "SCALEODM_LOCAL__RUNS_DIR", "SCALEODM_ACK_WAIT_S", "SCALEODM_ZIP_MAX_BYTES",
             "SCALEODM_CAPACITY__MAX_ACTIVE", "SCALEODM_CAPACITY__CLASSES",
             "SCALEODM_ADMISSION_INTERVAL_S", "SCALEODM_ARGO__CAPACITY_CONFIGMAP",
             "SCALEODM_TENANTS_FILE"},
            {"SCALEODM_GATEWAY_PORT", "SCALEODM_TOKEN", "SCALEODM_WEBHOOK",
             "SCALEODM_OIDC__ISSUER"},
            id="scheduler",
        ),
        pytest.param(
            "watcher",
            {"SCALEODM_LOCAL__RUNS_DIR", "SCALEODM_POLL_INTERVAL_S",
             "SCALEODM_OUTPUT_BATCH_LINES"},
            {"SCALEODM_ENGINE", "SCALEODM_GATEWAY_PORT", "SCALEODM_WEBHOOK",
             "SCALEODM_CAPACITY__MAX_ACTIVE", "SCALEODM_TENANTS_FILE"},
            id="watcher",
        ),
        pytest.param(
            "notifier",
            {"SCALEODM_WEBHOOK", "SCALEODM_WEBHOOK_MAX_ATTEMPTS"},
            {"SCALEODM_LOCAL__RUNS_DIR", "SCALEODM_GATEWAY_PORT", "SCALEODM_TOKEN"},
            id="notifier",
        ),
    ],
)
def test_env_names(service: str, present: set[str], absent: set[str]) -> None:
    names = set(env_names(SETTINGS_CLASSES[service]))
    assert present | COMMON <= names
    assert not absent & names
    # groups are expanded, never a variable of their own
    assert not {"SCALEODM_NATS", "SCALEODM_MONGO", "SCALEODM_S3", "SCALEODM_LOCAL",
                "SCALEODM_CAPACITY", "SCALEODM_OIDC"} & names
    assert all(n == n.upper() and n.startswith("SCALEODM_") for n in names)


def test_settings_classes() -> None:
    assert SETTINGS_CLASSES == {
        "gateway": GatewaySettings,
        "scheduler": SchedulerSettings,
        "watcher": WatcherSettings,
        "notifier": NotifierSettings,
    }


ANY_STRING = (str, str | None, Path, Path | None, SecretStr, SecretStr | None)


@pytest.mark.parametrize("service", [pytest.param(s, id=s) for s in SETTINGS_CLASSES])
def test_every_env_name_is_read(monkeypatch: pytest.MonkeyPatch, service: str) -> None:
    """Each listed name reaches its field: a value no type accepts makes construction fail."""
    cls = SETTINGS_CLASSES[service]
    ignored = []
    checked = 0
    for env, field in env_names(cls).items():
        if field.annotation in ANY_STRING:
            continue
        checked += 1
        with monkeypatch.context() as m:
            m.setenv(env, "{not valid for anything")
            try:
                cls()
            except (ValidationError, SettingsError):
                continue
            ignored.append(env)
    assert checked >= 10
    assert ignored == []


def test_readme_settings_table_is_current() -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/settings_table.py", "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, (
        "README.md's configuration table is stale: run `uv run task settings:table`\n"
        + proc.stderr
    )
