"""Options and credentials of admin commands that talk to a running registryd (``--url``)."""
from __future__ import annotations

import argparse
import base64
import os

from registryd.admin import EXIT_USAGE, AdminError

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
