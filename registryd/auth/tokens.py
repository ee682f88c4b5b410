"""Bearer tokens from registryd's own token endpoint (``GET /v2/token``).

Why: docker answers a ``Basic`` challenge on ``/v2/`` by failing every
request ("no basic auth credentials") unless it holds credentials, so a
registry that lets anonymous users pull cannot challenge docker with
``Basic``. It challenges with ``Bearer`` instead: docker, containers/image
(skopeo, podman) and containerd then fetch a token from the realm, with
their credentials when they have some and without when they have none, and
send ``Authorization: Bearer <token>`` on every request.

A user's token is ``rd2.<user>.<expiry>.<mac>``: an HMAC-SHA256 over the
user name and the expiry, keyed by that user's line of the htpasswd file
(the bcrypt hash, as secret as the file). It carries no password, expires
after TOKEN_LIFETIME seconds, costs no bcrypt to check, is accepted by any
node sharing the htpasswd file, and a changed or removed password stops it
at once (the key changes). The anonymous token is a constant. Like Basic
credentials, a token must only travel over TLS off the local host.
"""
from __future__ import annotations

import binascii
import hashlib
import hmac
import re
import time
from base64 import urlsafe_b64decode, urlsafe_b64encode
from typing import Any

import attrs

ANONYMOUS_TOKEN = "anonymous"
_PREFIX = "rd2."
#: Seconds clients are told a token lasts; they fetch a new one after that.
TOKEN_LIFETIME = 300
#: Seconds a token is still accepted after that: a request sent just before
#: the client's own expiry must not fail in flight.
TOKEN_GRACE = 120
TOKEN_PATH = "/v2/token"
SERVICE = "registryd"
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


class InvalidToken(ValueError):
    """A Bearer token registryd did not issue."""


@attrs.frozen
class UserToken:
    """What a user's token says: who, until when, and the MAC to check."""

    user: str
    expires: int
    mac: bytes

    def valid(self, key: bytes, now: float) -> bool:
        """Signed with ``key`` (the user's htpasswd hash) and not yet expired."""
        return now < self.expires and hmac.compare_digest(self.mac, _mac(key, self.user, self.expires))


def _b64(data: bytes) -> str:
    return urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, user: str, expires: int) -> bytes:
    message = f"{_PREFIX}{_b64(user.encode('utf-8'))}.{expires}".encode("ascii")
    return hmac.new(b"registryd-token\0" + key, message, hashlib.sha256).digest()


def issue(user: str | None, key: bytes, now: float) -> str:
    """The token for ``user`` (None: anonymous), signed with ``key`` (its htpasswd hash)."""
    if user is None:
        return ANONYMOUS_TOKEN
    expires = int(now) + TOKEN_LIFETIME + TOKEN_GRACE
    return f"{_PREFIX}{_b64(user.encode('utf-8'))}.{expires}.{_b64(_mac(key, user, expires))}"


def read(token: str) -> UserToken | None:
    """The claims of a token; None for the anonymous token.

    Raises InvalidToken for anything that is not a token of ours (it is
    checked against its key by the caller).
    """
    token = token.strip()
    if token == ANONYMOUS_TOKEN:
        return None
    if not token.startswith(_PREFIX):
        raise InvalidToken("unknown bearer token")
    parts = token[len(_PREFIX):].split(".")
    try:
        if len(parts) != 3 or not parts[1].isascii() or not parts[1].isdigit() or len(parts[1]) > 12:
            raise ValueError
        user = _unb64(parts[0]).decode("utf-8")
        mac = _unb64(parts[2])
    except (binascii.Error, ValueError):
        raise InvalidToken("malformed bearer token") from None
    if not user:
        raise InvalidToken("malformed bearer token")
    return UserToken(user, int(parts[1]), mac)


def response(token: str, now: float | None = None) -> dict[str, Any]:
    """The token endpoint's JSON document (docker reads ``token``, OAuth2 clients ``access_token``)."""
    issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now))
    return {"token": token, "access_token": token, "expires_in": TOKEN_LIFETIME, "issued_at": issued}


def realm(secure: bool, host: str | None) -> str | None:
    """The absolute token URL for a request that came to ``host`` (its Host
    header), or None when that header cannot be put in a challenge."""
    if not host or not _HOST.match(host):
        return None
    return f"{'https' if secure else 'http'}://{host}{TOKEN_PATH}"


def bearer_challenge(realm_url: str, error: str | None = None) -> str:
    challenge = f'Bearer realm="{realm_url}",service="{SERVICE}"'
    if error:
        challenge += f',error="{error}"'
    return challenge
