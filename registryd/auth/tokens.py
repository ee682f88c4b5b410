"""Bearer tokens from registryd's own token endpoint (``GET /v2/token``).

Why: docker answers a ``Basic`` challenge on ``/v2/`` by failing every
request ("no basic auth credentials") unless it holds credentials, so a
registry that lets anonymous users pull cannot challenge docker with
``Basic``. It challenges with ``Bearer`` instead: docker, containers/image
(skopeo, podman) and containerd then fetch a token from the realm, with
their credentials when they have some and without when they have none, and
send ``Authorization: Bearer <token>`` on every request.

A token is not a capability of its own: an anonymous one is a constant,
and a user's carries the user name and password it was issued for
(``rd1.<base64url(user:password)>``), which every request checks again
like Basic credentials (cached, throttled). So any node sharing the
htpasswd file accepts a token another node issued, and a changed or
removed password stops its tokens at once. Like Basic credentials, a
token must therefore only travel over TLS off the local host.
"""
from __future__ import annotations

import binascii
import re
import time
from base64 import urlsafe_b64decode, urlsafe_b64encode
from typing import Any

ANONYMOUS_TOKEN = "anonymous"
_PREFIX = "rd1."
#: Seconds clients are told a token lasts; they fetch a new one after that.
TOKEN_LIFETIME = 300
TOKEN_PATH = "/v2/token"
SERVICE = "registryd"
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


class InvalidToken(ValueError):
    """A Bearer token registryd did not issue."""


def issue(user: str | None, password: bytes = b"") -> str:
    """The token for ``user`` (None: anonymous)."""
    if user is None:
        return ANONYMOUS_TOKEN
    raw = user.encode("utf-8") + b":" + password
    return _PREFIX + urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def read(token: str) -> tuple[str, bytes] | None:
    """(user, password) a token carries; None for the anonymous token.

    Raises InvalidToken for anything registryd did not issue.
    """
    token = token.strip()
    if token == ANONYMOUS_TOKEN:
        return None
    if not token.startswith(_PREFIX):
        raise InvalidToken("unknown bearer token")
    body = token[len(_PREFIX):]
    try:
        raw = urlsafe_b64decode(body + "=" * (-len(body) % 4))
        user, sep, password = raw.partition(b":")
        name = user.decode("utf-8")
    except (binascii.Error, ValueError):
        raise InvalidToken("malformed bearer token") from None
    if not sep or not name:
        raise InvalidToken("malformed bearer token")
    return name, password


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
