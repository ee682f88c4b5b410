"""``registryd``: the admin command.

Each subcommand lives in its own function and registers itself in
``build_parser``; errors end with one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from registryd import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A failure to report as one line, with the exit status to use."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registryd",
        description="Administer a registryd registry. The server itself runs as `twistd -n registryd`.",
    )
    parser.add_argument("--version", action="version", version=f"registryd {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.run(args) or EXIT_OK)
    except CommandError as e:
        print(f"registryd {args.command}: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
