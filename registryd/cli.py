"""``registryd``: the admin command.

Each subcommand lives in its own function and registers itself in
``build_parser``; errors end with one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import getpass
import importlib
import os
import sys
from typing import Any, Callable, Sequence

from registryd import __version__
from registryd.admin.exit_codes import ExitCode, describe


class CommandError(Exception):
    """A failure to report as one line, with the exit status to use (``exit_codes``)."""

    def __init__(self, message: str, status: int = ExitCode.PROBLEMS) -> None:
        super().__init__(message)
        self.status = status


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``argv``, only the command it names gets its arguments (and its
    module imported): the others are listed by name and help line, so a command starts in a
    fraction of the time it takes to import them all."""
    parser = argparse.ArgumentParser(
        prog="registryd",
        description="Administer a registryd registry. The server itself runs as `twistd -n registryd`.",
        epilog=describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"registryd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = None if argv is None else _named_command(argv)
    for name, (help_line, add) in COMMANDS.items():
        if argv is None or name == chosen:
            add(commands, name, help_line)
        else:
            commands.add_parser(name, help=help_line)
    return parser


def _named_command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first word (the top level has only flags without values)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


# --- registryd htpasswd ---------------------------------------------------

def add_htpasswd_command(commands: Any, name: str, help_line: str) -> None:
    from registryd.auth.htpasswd_file import DEFAULT_COST

    command = commands.add_parser(
        name,
        help=help_line,
        description=(
            "Add USER to the htpasswd FILE or change their password, with a bcrypt hash "
            "as 'htpasswd -B' writes it; with --delete, remove USER. The file is created "
            "(mode 0640) if missing and replaced atomically; other lines are kept as they are. "
            "The password is asked for twice on the terminal, or read from the first line "
            "of standard input with --password-stdin. A running registryd picks up the change "
            "by itself."
        ),
    )
    command.add_argument("file", metavar="FILE", help="the htpasswd file")
    command.add_argument("user", metavar="USER", help="the user name")
    how = command.add_mutually_exclusive_group()
    how.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    how.add_argument("-D", "--delete", action="store_true", help="remove USER from FILE")
    command.add_argument("--cost", type=int, default=DEFAULT_COST, metavar="N",
                         help=f"bcrypt cost, 4 to 31 (default {DEFAULT_COST})")
    command.set_defaults(run=run_htpasswd)


def _read_password(args: argparse.Namespace) -> bytes:
    if args.password_stdin:
        line = sys.stdin.buffer.readline()
        password = line[:-1] if line.endswith(b"\n") else line
        if password.endswith(b"\r"):
            password = password[:-1]
    elif sys.stdin.isatty():
        first = getpass.getpass("New password: ")
        if getpass.getpass("Re-type new password: ") != first:
            raise CommandError("the passwords do not match")
        password = first.encode("utf-8")
    else:
        raise CommandError("standard input is not a terminal; use --password-stdin", ExitCode.USAGE)
    if not password:
        raise CommandError("the password is empty")
    if b"\0" in password:
        raise CommandError("the password contains a NUL byte")
    return password


def run_htpasswd(args: argparse.Namespace) -> int:
    from registryd.auth.htpasswd import check_user_name
    from registryd.auth.htpasswd_file import (
        HtpasswdFileError,
        HtpasswdFileUnusable,
        delete_user,
        refused_entries,
        set_password,
    )

    problem = check_user_name(args.user)
    if problem:
        raise CommandError(problem, ExitCode.USAGE)
    if not 4 <= args.cost <= 31:
        raise CommandError(f"--cost must be between 4 and 31, not {args.cost}", ExitCode.USAGE)
    try:
        if args.delete:
            delete_user(args.file, args.user)
            print(f"deleted user {args.user} from {args.file}")
        else:
            outcome = set_password(args.file, args.user, _read_password(args), args.cost)
            if outcome == "added":
                print(f"added user {args.user} to {args.file}")
            else:
                print(f"changed the password of user {args.user} in {args.file}")
        for message in refused_entries(args.file):
            print(f"registryd htpasswd: warning: {args.file} {message}; registryd refuses "
                  f"the file until it is bcrypt", file=sys.stderr)
    except HtpasswdFileUnusable as e:
        raise CommandError(str(e), ExitCode.ERROR) from None
    except HtpasswdFileError as e:   # the user is not there, the password is refused
        raise CommandError(str(e), ExitCode.PROBLEMS) from None
    return ExitCode.OK


# --- registryd ls, registryd fsck, ... (registryd.admin) --------------------

def add_admin_command(commands: Any, name: str, help_line: str) -> None:
    """The parser of the admin command ``name``, from its module in registryd.admin (imported
    now: only the command that runs needs it)."""
    module = importlib.import_module(f"registryd.admin.{ADMIN_MODULES[name]}")
    command = commands.add_parser(name, help=help_line, description=module.DESCRIPTION,
                                  epilog=module.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(command)
    command.set_defaults(run=lambda args: _run_admin(module, args))


def _run_admin(module: Any, args: argparse.Namespace) -> int:
    from registryd.admin import AdminError

    try:
        return int(module.run(args))
    except AdminError as e:
        raise CommandError(str(e), e.status) from None


#: The module in registryd.admin of each admin command.
ADMIN_MODULES = {"ls": "inventory", "fsck": "fsck", "gc": "gc", "prune": "prune", "retention": "retention",
                 "preload": "preload", "export": "export", "import": "import_layout", "sync": "sync"}

#: Every command: the line ``registryd --help`` lists, and what adds its parser (importing its
#: module, which only the command that runs needs).
COMMANDS: dict[str, tuple[str, Callable[[Any, str, str], None]]] = {
    "htpasswd": ("add, update or delete a user in an htpasswd file (bcrypt)", add_htpasswd_command),
    "ls": ("list repositories (local and mirrored), their tags, sizes and manifest counts", add_admin_command),
    "fsck": ("re-hash every blob and check every repository; --repair quarantines what is damaged",
             add_admin_command),
    "gc": ("remove blobs no manifest references (mark and sweep); --dry-run only reports", add_admin_command),
    "prune": ("remove cached tags and manifests of mirrored repositories (--older-than, --unused-for, --pattern)",
              add_admin_command),
    "retention": ("apply the [[retention]] rules to local repositories now (--dry-run only reports)",
                  add_admin_command),
    "preload": ("pull images through the pull-through cache now, so they are on disk before anyone asks",
                add_admin_command),
    "export": ("write images and all their content to an OCI image layout (a directory or a .tar)",
               add_admin_command),
    "import": ("import images from an OCI image layout (a directory or a tar file) into the store",
               add_admin_command),
    "sync": ("run a [[sync]] job now (--now JOB), or show the jobs' last runs", add_admin_command),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return ExitCode.USAGE
    try:
        return int(args.run(args) or ExitCode.OK)
    except BrokenPipeError:
        # The reader left (``registryd ls --json | head``): stop quietly, as a
        # command killed by SIGPIPE does; nothing more may reach the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.BROKEN_PIPE
    except CommandError as e:
        print(f"registryd {args.command}: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
