"""The exit status of every ``registryd`` subcommand: one table.

The same failure ends with the same status whichever command meets it: a
missing data directory is 3 for ``ls`` as for ``gc``, and a missing
directory for the htpasswd file is 3 for ``htpasswd`` too. ``registryd
--help`` and the README show ``TABLE``.
"""
from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    #: Done (with --dry-run: nothing was changed).
    OK = 0
    #: The command ran, and what it checked or handled has problems, each one reported.
    PROBLEMS = 1
    #: Bad arguments, or a file of arguments missing or with a bad line; nothing was done.
    USAGE = 2
    #: The command could not be done at all.
    ERROR = 3
    #: SIGINT or SIGTERM (after undoing what the run had half done).
    INTERRUPTED = 130
    #: The reader of standard output went away (``registryd ls | head``), as a shell reports SIGPIPE.
    BROKEN_PIPE = 128 + 13


#: (status, what it means), as ``registryd --help`` and the README show it.
TABLE: tuple[tuple[ExitCode, str], ...] = (
    (ExitCode.OK, "done (with --dry-run: nothing was changed)"),
    (ExitCode.PROBLEMS, "the command ran and found problems, each reported: damage (fsck), an image that "
                        "failed or is unknown or incomplete (preload, export), an invalid layout (import), "
                        "a user or password htpasswd refuses"),
    (ExitCode.USAGE, "bad arguments: an unknown option, a bad value, a file an option names (--input, "
                     "--image-file, --ca-file, --password-file) that is missing or has a bad line; nothing "
                     "was done"),
    (ExitCode.ERROR, "the command could not be done: a bad config file or a secret it names; a data "
                     "directory, htpasswd file or directory that is missing or unreadable; an S3 bucket or "
                     "--url server that cannot be reached or refuses; permission denied; an I/O error"),
    (ExitCode.INTERRUPTED, "interrupted (SIGINT, SIGTERM)"),
    (ExitCode.BROKEN_PIPE, "the reader of the output went away (as for SIGPIPE)"),
)


def describe(width: int = 78) -> str:
    """The table as text: ``exit status:`` and one entry per status, wrapped to ``width``."""
    import textwrap

    lines = ["exit status:"]
    for status, meaning in TABLE:
        lines += textwrap.wrap(meaning, width, initial_indent=f"  {int(status):<3}  ", subsequent_indent=" " * 7)
    return "\n".join(lines)


# The names the subcommands have always used.
EXIT_OK = ExitCode.OK
EXIT_DAMAGE = ExitCode.PROBLEMS
EXIT_USAGE = ExitCode.USAGE
EXIT_ERROR = ExitCode.ERROR
