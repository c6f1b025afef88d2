"""Helpers of the security tests: a gateway of its own (no scheduler: nothing submitted runs or
fetches anything), hand-built multipart bodies (httpx escapes file names, attacks must not be
escaped), S3 listings and the gateway process's peak memory."""

from __future__ import annotations

import contextlib
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3

from tests.harness import servers
from tests.harness.stack import Stack


@contextlib.contextmanager
def gateway_only(
    tmp: Path, mongo_url: str, s3: servers.S3Endpoint, env: dict[str, str] | None = None
) -> Iterator[Stack]:
    """A gateway with its own NATS and database; the other services are not started."""
    tmp.mkdir(parents=True, exist_ok=True)
    with servers.nats_server(tmp / "nats") as nats:
        own = Stack(tmp=tmp, nats_url=nats.url, mongo_url=mongo_url, s3=s3,
                    database=f"sec_{uuid.uuid4().hex[:12]}", extra_env=dict(env or {}))
        try:
            own.start("gateway")
            yield own
        finally:
            own.stop()


def s3_keys(stack: Stack, prefix: str = "") -> list[str]:
    client = boto3.client(
        "s3", endpoint_url=stack.s3.url, aws_access_key_id=stack.s3.access_key,
        aws_secret_access_key=stack.s3.secret_key, region_name=stack.s3.region,
    )
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix=prefix)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


Part = tuple[str, str | None, bytes]
"""(field name, file name or None for a text field, payload)"""


def multipart_body(parts: list[Part]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with file names sent as RFC 5987 ``filename*``, so that any
    character (NUL, CR, LF, quotes) reaches the server unescaped; (body, content type)."""
    boundary = uuid.uuid4().hex
    out = bytearray()
    for name, filename, payload in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            encoded = urllib.parse.quote(filename.encode("utf-8", "surrogatepass"), safe="")
            disposition += f"; filename*=UTF-8''{encoded}"
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: image/jpeg\r\n"
        out += b"\r\n" + payload + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"
