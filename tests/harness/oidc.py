"""A local OpenID Connect issuer for tests: discovery and JWKS documents over HTTP on 127.0.0.1,
an RSA and an EC signing key made here with ``cryptography``, tokens signed with PyJWT.

Used by ``tests/integration/test_tenants_jwt.py`` (the directory against the issuer) and
``tests/integration/test_tenants.py`` (bearer tokens through the gateway). Each test scripts the
issuer's answers (``jwks``, ``jwks_status``, ``jwks_hangs``, ...) and counts its fetches.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

AUDIENCE = "scaleodm"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    """The public JWK of ``key`` as an issuer publishes it."""
    if isinstance(key, rsa.RSAPrivateKey):
        public: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        public = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**public, "kid": kid, "use": "sig"}


def default_jwks() -> dict[str, Any]:
    return {"keys": [jwk(RSA_KEY, "rsa-1"), jwk(EC_KEY, "ec-1")]}


@dataclass
class Issuer:
    """The issuer's HTTP side: discovery and JWKS documents, scripted per test."""

    server: ThreadingHTTPServer | None = None
    jwks: Any = field(default_factory=default_jwks)
    jwks_body: bytes | None = None  # served as is instead of ``jwks``
    jwks_status: int = 200
    jwks_hangs: bool = False
    discovery_issuer: str | None = None  # None: the real base URL
    gets: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def count(self, path: str) -> int:
        with self.lock:
            return self.gets.get(path, 0)

    def reset(self) -> None:
        with self.lock:
            self.jwks, self.jwks_body, self.jwks_status = default_jwks(), None, 200
            self.jwks_hangs, self.discovery_issuer = False, None
            self.gets.clear()

    def answer(self, path: str) -> tuple[int, bytes] | None:
        """Status and body for a GET of ``path``; None: hang."""
        with self.lock:
            self.gets[path] = self.gets.get(path, 0) + 1
            if path == "/.well-known/openid-configuration":
                doc = {"issuer": self.discovery_issuer or self.url, "jwks_uri": self.url + "/jwks"}
                return 200, json.dumps(doc).encode()
            if path != "/jwks":
                return 404, b"{}"
            if self.jwks_hangs:
                return None
            return self.jwks_status, self.jwks_body or json.dumps(self.jwks).encode()

    def start(self) -> None:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                answer = issuer.answer(self.path)
                if answer is None:
                    issuer.release.wait(30)
                    return
                status, body = answer
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def claims(issuer: Issuer, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": issuer.url, "aud": AUDIENCE, "sub": "user-1", "tenant": "alice",
            "iat": now, "exp": now + 300}
    return {k: v for k, v in {**base, **overrides}.items() if v is not None}


def signed(body: dict[str, Any], key: Any = RSA_KEY, alg: str = "RS256",
           kid: str = "rsa-1") -> str:
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
