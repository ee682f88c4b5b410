"""A token server that issues registry bearer tokens the way Docker Hub does.

Clients (never the registry itself) call it after a registry answered 401
with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``::

    GET /token?service=upstream.test&scope=repository:lib/app:pull,push
    Authorization: Basic ...          (optional)

    200 {"token": JWT, "access_token": JWT, "expires_in": 300,
         "issued_at": "2026-01-01T00:00:00Z"}

The JWT is signed RS256 by a key whose certificate is sent in the ``x5c``
header; docker-registry 2.8 (``registry/auth/token/token.go``,
``parseAndVerifyCertChain``) verifies that chain against its
``rootcertbundle`` and then the signature with the leaf's key. It checks
``iss`` against its configured issuer, ``aud`` (a single string) against its
service, ``exp``/``nbf`` with 60 s leeway, and authorises from ``access``.

Policy, like Docker Hub's:

* known user, right password: every requested action is granted;
* wrong password, unknown user, malformed Basic header: 401;
* no credentials: ``pull`` only, when anonymous access is allowed, else 401;
* ``POST /token`` with an OAuth2 password grant form is accepted too.

Besides ``/token`` there are control endpoints for tests: ``GET /_stats``
(every token request seen: method, user, scopes, status), ``POST /_reset``
(forget them) and ``POST /_policy`` (JSON: ``allow_anonymous``,
``expires_in``, ``fail_status`` to answer every token request with that
status, ``null`` to stop).

Use it in-process (``TokenServer(...).listen(reactor)``) or, as the
reference upstreams do, as a subprocess so that blocking test helpers can
fetch tokens too::

    python tests/token_server.py --key K.pem --chain LEAF.pem --issuer I \\
        --service S --user alice:secret --port-file F [--no-anonymous]
"""
from __future__ import annotations

import argparse
import base64
import binascii
import datetime
import hashlib
import hmac
import json
import os
import time
import uuid
from typing import Any, Callable

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from klein import Klein

ALL_ACTIONS = ("pull", "push", "delete", "*")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def libtrust_key_id(public_key: Any) -> str:
    """The libtrust fingerprint docker tooling uses as a JWT ``kid``."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha256(der).digest()[:30]
    text = base64.b32encode(digest).decode("ascii").rstrip("=")
    return ":".join(text[i:i + 4] for i in range(0, len(text), 4))


def parse_scope(scope: str) -> dict[str, Any] | None:
    """``repository:lib/app:pull,push`` -> {type, name, actions}.

    The name may itself hold a colon (a host:port prefix), so the type is
    before the first colon and the actions after the last.
    """
    first, last = scope.find(":"), scope.rfind(":")
    if first < 0 or first == last:
        return None
    actions = [a for a in scope[last + 1:].split(",") if a]
    return {"type": scope[:first], "name": scope[first + 1:last], "actions": actions}


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a JWT, unverified (for tests)."""
    header, claims, _ = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(claims))


class Unauthorized(Exception):
    """Credentials were wrong, or anonymous access is refused."""


@attrs.define
class TokenIssuer:
    """Authenticates token requests and mints the signed JWTs."""

    key: rsa.RSAPrivateKey
    chain: list[x509.Certificate]
    issuer: str
    service: str
    users: dict[str, str] = attrs.field(factory=dict)
    allow_anonymous: bool = True
    expires_in: int = 300
    clock: Callable[[], float] = time.time

    def authenticate(self, authorization: bytes | None) -> str | None:
        """The user a Basic header names, None for anonymous; raises Unauthorized."""
        if not authorization:
            if not self.allow_anonymous:
                raise Unauthorized("authentication required")
            return None
        scheme, _, value = authorization.partition(b" ")
        if scheme.lower() != b"basic":
            raise Unauthorized("unsupported authorization scheme")
        try:
            user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("malformed basic credentials") from None
        return self.check_password(user, password if sep else None)

    def check_password(self, user: str, password: str | None) -> str:
        expected = self.users.get(user)
        if expected is None or password is None or not hmac.compare_digest(
                expected.encode("utf-8"), password.encode("utf-8")):
            raise Unauthorized("incorrect username or password")
        return user

    def grant(self, user: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        """The access claim: what was asked for, cut down for anonymous users."""
        access = []
        for scope in scopes:
            for item in scope.split(" "):
                wanted = parse_scope(item)
                if wanted is None:
                    continue
                if user is None:
                    wanted["actions"] = [a for a in wanted["actions"] if a == "pull"]
                else:
                    wanted["actions"] = [a for a in wanted["actions"] if a in ALL_ACTIONS]
                access.append(wanted)
        return access

    def mint(self, user: str | None, access: list[dict[str, Any]]) -> dict[str, Any]:
        """The token response document, Docker Hub's shape."""
        now = int(self.clock())
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "kid": libtrust_key_id(self.key.public_key()),
            "x5c": [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii")
                    for c in self.chain],
        }
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + b64url(json.dumps(claims, separators=(",", ":")).encode()))
        signature = self.key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        token = signing_input + "." + b64url(signature)
        issued = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": issued.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


def _arg(args: dict[bytes, list[bytes]], name: bytes) -> list[str]:
    return [v.decode("utf-8", "replace") for v in args.get(name, [])]


@attrs.define(slots=False)
class TokenServer:
    """The Klein app around a TokenIssuer; records every token request."""

    issuer: TokenIssuer
    fail_status: int | None = None
    requests: list[dict[str, Any]] = attrs.field(factory=list)

    app = Klein()

    def count(self, **match: Any) -> int:
        """Token requests seen, optionally those whose fields equal ``match``."""
        return sum(1 for r in self.requests if all(r.get(k) == v for k, v in match.items()))

    def listen(self, reactor: Any, port: int = 0, interface: str = "127.0.0.1") -> Any:
        from twisted.web.server import Site

        return reactor.listenTCP(port, Site(self.app.resource()), interface=interface)

    def _json(self, request: Any, status: int, document: Any) -> bytes:
        body = json.dumps(document).encode("utf-8")
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        return body

    @app.route("/token", methods=["GET", "POST"])
    def token(self, request: Any) -> bytes:
        method = request.method.decode()
        args = request.args
        record: dict[str, Any] = {"method": method, "user": None, "status": None}
        self.requests.append(record)
        # twisted.web merges a urlencoded POST form (the OAuth2 password
        # grant, distribution's "oauth.md") into request.args.
        scopes = _arg(args, b"scope")
        service = (_arg(args, b"service") or [""])[0]
        record.update(scopes=scopes, service=service)
        if self.fail_status is not None:
            record["status"] = self.fail_status
            return self._json(request, self.fail_status, {"details": "injected failure"})
        try:
            if method == "POST":
                if (_arg(args, b"grant_type") or [""])[0] != "password":
                    record["status"] = 400
                    return self._json(request, 400, {"details": "unsupported grant_type"})
                user: str | None = self.issuer.check_password(
                    (_arg(args, b"username") or [""])[0], next(iter(_arg(args, b"password")), None))
            else:
                header = request.getHeader(b"Authorization")
                user = self.issuer.authenticate(header.encode("latin-1") if isinstance(header, str) else header)
        except Unauthorized as e:
            record["status"] = 401
            request.setHeader(b"WWW-Authenticate", b'Basic realm="token"')
            return self._json(request, 401, {"details": str(e)})
        record["user"] = user
        record["status"] = 200
        return self._json(request, 200, self.issuer.mint(user, self.issuer.grant(user, scopes)))

    @app.route("/_stats", methods=["GET"])
    def stats(self, request: Any) -> bytes:
        return self._json(request, 200, {"count": len(self.requests), "requests": self.requests})

    @app.route("/_reset", methods=["POST"])
    def reset(self, request: Any) -> bytes:
        del self.requests[:]
        return self._json(request, 200, {})

    @app.route("/_policy", methods=["POST"])
    def policy(self, request: Any) -> bytes:
        change = json.loads(request.content.read() or b"{}")
        if "allow_anonymous" in change:
            self.issuer.allow_anonymous = bool(change["allow_anonymous"])
        if "expires_in" in change:
            self.issuer.expires_in = int(change["expires_in"])
        if "fail_status" in change:
            self.fail_status = change["fail_status"]
        return self._json(request, 200, {"allow_anonymous": self.issuer.allow_anonymous,
                                         "expires_in": self.issuer.expires_in,
                                         "fail_status": self.fail_status})


def load_issuer(key_file: str, chain_file: str, issuer: str, service: str,
                users: dict[str, str], allow_anonymous: bool, expires_in: int) -> TokenIssuer:
    with open(key_file, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    with open(chain_file, "rb") as f:
        chain = x509.load_pem_x509_certificates(f.read())
    return TokenIssuer(key, chain, issuer, service, users, allow_anonymous, expires_in)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", required=True, help="PEM RSA signing key")
    parser.add_argument("--chain", required=True, help="PEM certificates, leaf first")
    parser.add_argument("--issuer", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--user", action="append", default=[], help="NAME:PASSWORD")
    parser.add_argument("--no-anonymous", action="store_true")
    parser.add_argument("--expires-in", type=int, default=300)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", required=True, help="written with the bound port once listening")
    options = parser.parse_args(argv)
    users = dict(u.split(":", 1) for u in options.user)
    issuer = load_issuer(options.key, options.chain, options.issuer, options.service, users,
                         not options.no_anonymous, options.expires_in)
    from twisted.internet import reactor

    port = TokenServer(issuer).listen(reactor, options.port)
    tmp = options.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(port.getHost().port))
    os.replace(tmp, options.port_file)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
