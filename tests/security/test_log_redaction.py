"""No secret in the logs: the ``redact_secrets`` processor (``scaleodm.common.logging``), in memory
and on a real gateway process.

The gateway (its own, no other service) has the token ``SECRETVALUE``. Covered there: requests
with ``?token=SECRETVALUE`` — right, wrong (``WRONGSECRET``), on JSON routes, on an event
stream, refused, in a nested URL-encoded URL — leave the access lines in the log, each with
``token=[REDACTED]``, and neither secret anywhere in the log. In memory, through the very
formatter every service installs: structlog lines and standard-library records (uvicorn's access
record with its ``%``-arguments), values nested in dicts, lists and tuples, secret keys at any
depth, objects shown by ``repr``, exception text, ``Bearer`` credentials and URL passwords; and
that lines without secrets are left alone.

Left out: the other services (same ``configure_logging``) and text written to stderr outside
logging (uncaught tracebacks of a crashing process).
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from pydantic import SecretStr

from scaleodm.common import logging as logmod
from tests.harness import servers
from tests.harness.stack import Stack
from tests.security.gateway_only import gateway_only

TOKEN = "SECRETVALUE"
WRONG = "WRONGSECRET"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, mongo_url: str,
            s3: servers.S3Endpoint) -> Iterator[Stack]:
    with gateway_only(Path(tmp_path_factory.mktemp("log-redaction")), mongo_url, s3,
                      {"SCALEODM_TOKEN": TOKEN}) as stack:
        yield stack


@pytest.mark.integration
def test_the_gateway_log_has_the_access_lines_and_no_token(gateway: Stack) -> None:
    unknown = str(uuid.uuid4())
    with httpx.Client(base_url=gateway.gateway_url, timeout=10) as client:
        assert "version" in client.get("/info", params={"token": TOKEN}).json()
        refused = client.get("/info", params={"token": WRONG}).json()
        assert refused == {"error": "Invalid authentication token: token does not match."}
        assert client.get(f"/task/{unknown}/info", params={"token": TOKEN}).json() == {
            "error": f"{unknown} not found"
        }
        nested = f"http://example.invalid/a.zip?token%3D{TOKEN}"  # once more percent-encoded
        client.post(f"/task/new?token={TOKEN}&zipurl={nested}",
                    files={"zipurl": (None, "ftp://nowhere")})
        client.post("/task/cancel", params={"token": WRONG}, data={"uuid": unknown})
        with client.stream("GET", "/events", params={"token": TOKEN}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
        raw = httpx.get(f"{gateway.gateway_url}/info?TOKEN={TOKEN}&x=1")  # any spelling
        assert raw.status_code == 200
        # The name percent-encoded: the server decodes it and authenticates, so it is the token.
        encoded = httpx.get(f"{gateway.gateway_url}/task/list?tok%65n={TOKEN}")
        assert isinstance(encoded.json(), list), encoded.text  # authenticated: not an error
    gateway.stop()  # flushes and closes the log
    text = gateway.log("gateway")
    assert TOKEN not in text and WRONG not in text
    access = [json.loads(line)["event"] for line in text.splitlines()
              if '"uvicorn.access"' in line]
    for expected in ('"GET /info?token=[REDACTED] HTTP/1.1" 200',
                     f'"GET /task/{unknown}/info?token=[REDACTED] HTTP/1.1" 200',
                     '"POST /task/cancel?token=[REDACTED] HTTP/1.1" 200',
                     '"GET /events?token=[REDACTED] HTTP/1.1" 200',
                     '"GET /info?TOKEN=[REDACTED]&x=1 HTTP/1.1" 200',
                     '"GET /task/list?tok%65n=[REDACTED] HTTP/1.1" 200'):
        assert any(line.endswith(expected) for line in access), (expected, access)
    assert any("token%3D[REDACTED]" in line for line in access), access


# -- the processor and the formatter in memory ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("GET /info?token=abc&x=1", "GET /info?token=[REDACTED]&x=1", id="query"),
        pytest.param("a=1&token=ab%2Bc%3D&b=2", "a=1&token=[REDACTED]&b=2", id="escaped-value"),
        pytest.param("zip=http%3A%2F%2Fh%2Fz%3Ftoken%3Dabc%26b%3D1",
                     "zip=http%3A%2F%2Fh%2Fz%3Ftoken%3D[REDACTED]%26b%3D1", id="nested-url"),
        pytest.param("{'token': 'abc', 'n': 1}", "{'token': '[REDACTED]', 'n': 1}",
                     id="dict-repr"),
        pytest.param('{"password": "a\\"b", "n": 1}', '{"password": "[REDACTED]", "n": 1}',
                     id="json"),
        pytest.param("Authorization: Bearer abc.def-ghi", "Authorization: Bearer [REDACTED]",
                     id="bearer"),
        pytest.param("mongodb://user:pa55@db:27017/x", "mongodb://user:[REDACTED]@db:27017/x",
                     id="url-password"),
        pytest.param("X-Amz-Signature=f00&X-Amz-Credential=AK%2F1",
                     "X-Amz-Signature=[REDACTED]&X-Amz-Credential=[REDACTED]",
                     id="presigned-url"),
        pytest.param("webhook_secret=whsec_abc api_key=k", "webhook_secret=[REDACTED] "
                     "api_key=[REDACTED]", id="other-names"),
        pytest.param("GET /x?%74ok%65n=abc&a=1", "GET /x?%74ok%65n=[REDACTED]&a=1",
                     id="encoded-name"),
        pytest.param("GET /x?na%6De=abc", "GET /x?na%6De=abc", id="encoded-harmless-name"),
        pytest.param("task 5b0e4c3e queued, 3 images", "task 5b0e4c3e queued, 3 images",
                     id="nothing-secret"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert logmod.redact_text(text) == expected


def test_redact_secrets_walks_nested_values_and_keys() -> None:
    error = ValueError(f"GET http://h/x?token={TOKEN} failed")
    line: dict[str, Any] = {
        "event": f"calling /info?token={TOKEN}",
        "token": TOKEN,
        "count": 3,
        "missing_token": None,  # nothing to hide: kept as it is
        "request": {"url": f"/a?token={TOKEN}", "headers": {"Authorization": f"Basic {TOKEN}"},
                    "params": [("token", TOKEN), f"token={TOKEN}"],
                    "deep": {"nats": {"password": TOKEN, "user": "odm"}}},
        "error": error,
        "setting": SecretStr(TOKEN),
    }
    original = json.dumps(line, default=repr)
    out = logmod.redact_secrets(None, "info", line)
    assert TOKEN not in json.dumps(out, default=repr)
    assert json.dumps(line, default=repr) == original  # the caller's values are not changed
    assert out["token"] == out["request"]["deep"]["nats"]["password"] == logmod.REDACTED
    assert out["request"]["deep"]["nats"]["user"] == "odm"
    assert out["missing_token"] is None and out["count"] == 3
    assert out["request"]["params"] == [("token", logmod.REDACTED), "token=[REDACTED]"]
    assert out["error"] == "ValueError('GET http://h/x?token=[REDACTED] failed')"
    assert out["setting"] is line["setting"]  # its repr shows no secret: kept as the object


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing through the services' formatter (JSON lines) into a buffer."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logmod.formatter(
        [structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name],
        structlog.processors.JSONRenderer(),
    ))
    logger = logging.getLogger(f"redaction-test-{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, out
    logger.removeHandler(handler)


def test_standard_library_records_go_through_the_redaction(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = captured
    logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", f"/info?token={TOKEN}",
                "1.1", 200)  # how uvicorn's access log calls it
    try:
        raise RuntimeError(f"upstream said token={TOKEN}")
    except RuntimeError:
        logger.exception("request failed for /x?password=hunter2")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["event"] == '127.0.0.1:5000 - "GET /info?token=[REDACTED] HTTP/1.1" 200'
    assert lines[1]["event"] == "request failed for /x?password=[REDACTED]"
    assert "token=[REDACTED]" in lines[1]["exception"]
    assert TOKEN not in out.getvalue() and "hunter2" not in out.getvalue()


def test_structlog_lines_go_through_the_redaction(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = captured
    log = structlog.wrap_logger(
        logger, wrapper_class=structlog.stdlib.BoundLogger,
        processors=[structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
    )
    log.info("webhook delivered", url=f"https://hooks.example/x?token={TOKEN}",
             headers={"authorization": f"Bearer {TOKEN}"}, attempt=1)
    line = json.loads(out.getvalue())
    assert line["url"] == "https://hooks.example/x?token=[REDACTED]"
    assert line["headers"] == {"authorization": logmod.REDACTED}
    assert line["attempt"] == 1 and line["event"] == "webhook delivered"
