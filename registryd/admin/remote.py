"""Options and credentials of admin commands that talk to a running registryd (``--url``)."""
from __future__ import annotations

import argparse
import base64
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

from registryd.admin import EXIT_ERROR, EXIT_USAGE, AdminError

PASSWORD_ENV = "REGISTRYD_PASSWORD"


def add_remote_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group("through a running registryd")
    group.add_argument("--url", metavar="URL", help=f"the registryd to {what}, http(s)://host[:port]")
    group.add_argument("--user", metavar="USER", help="user name for Basic authentication")
    group.add_argument("--password-file", metavar="FILE",
                       help=f"the password is its first line (default: ${PASSWORD_ENV})")
    group.add_argument("--ca-file", metavar="FILE", help="CA certificates to trust for an https URL")
    group.add_argument("--insecure", action="store_true", help="do not verify the https URL's certificate")


def check_url(url: str) -> str:
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1].strip("/")) == 0:
        raise AdminError(f"--url must be http://host[:port] or https://host[:port], not {url!r}", EXIT_USAGE)
    return url.rstrip("/")


def password(args: argparse.Namespace) -> str:
    """From --password-file's first line, or the REGISTRYD_PASSWORD environment variable."""
    if args.password_file is not None:
        try:
            with open(args.password_file, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise AdminError(f"cannot read --password-file {args.password_file}: "
                             f"{getattr(e, 'strerror', None) or e}", EXIT_USAGE) from None
    found = os.environ.get(PASSWORD_ENV)
    if found is None:
        raise AdminError(f"--user needs a password: --password-file FILE or ${PASSWORD_ENV}", EXIT_USAGE)
    return found


def authorization(args: argparse.Namespace) -> str | None:
    """The Basic Authorization header value for --user, or None without it."""
    if args.user is None:
        return None
    raw = f"{args.user}:{password(args)}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def post_admin(args: argparse.Namespace, path: str, query: Sequence[tuple[str, str]], what: str) -> dict[str, Any]:
    """POST an admin endpoint of --url as --user; its JSON document, or AdminError saying why not.

    ``what`` names the request in the refusal ("the collection"). A 400 is the
    command's bad arguments (exit 2); anything else that fails exits 3.
    """
    url = check_url(args.url)
    # JSON, not a form: the server refuses form-encodable POSTs (cross-site forms).
    headers = {"Accept": "application/json", "Content-Type": "application/json"}
    credentials = authorization(args)
    if credentials is not None:
        headers["Authorization"] = credentials
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=args.ca_file)
        if args.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    target = f"{url}{path}?{urllib.parse.urlencode(list(query))}" if query else f"{url}{path}"
    request = urllib.request.Request(target, data=b"{}", method="POST", headers=headers)
    try:
        # Work on a large store takes long: the server answers when it is done.
        with urllib.request.urlopen(request, context=context, timeout=24 * 3600) as response:
            return dict(json.load(response))
    except urllib.error.HTTPError as e:
        try:
            message = json.load(e)["errors"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            message = e.reason
        raise AdminError(f"{url} refused {what}: {e.code} {message}",
                         EXIT_USAGE if e.code == 400 else EXIT_ERROR) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise AdminError(f"cannot reach {url}: {reason}") from None
