"""The ``registryd`` command run inside the test process, for argument and error tests.

An interpreter start per call costs about half a second; these tests run
dozens. Only what fails before the command starts its reactor can run
here (the test's own reactor is running): ``run_main`` refuses a command
that gets that far, so a test that should spawn the command says so.
"""
from __future__ import annotations

import io
import subprocess
import sys
from contextlib import ExitStack, redirect_stderr, redirect_stdout
from typing import Any
from unittest import mock

from twisted.logger import globalLogBeginner, globalLogPublisher

from registryd import cli


class StartedAReactor(AssertionError):
    """The command got as far as its reactor: run it as a subprocess instead."""


def _refuse_reactor(main: Any) -> None:
    raise StartedAReactor("this command starts a reactor: run it in a subprocess")


def run_main(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``registryd ARGS`` as the console script runs it: exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    observers: list[Any] = []

    def begin_logging(new: list[Any], **_: Any) -> None:
        # The command's observers see this call's events only; the test's logging stays as it was.
        observers.extend(new)
        for observer in new:
            globalLogPublisher.addObserver(observer)

    stdin_file = io.TextIOWrapper(io.BytesIO(stdin.encode()), encoding="utf-8")
    with ExitStack() as stack:
        stack.enter_context(redirect_stdout(out))
        stack.enter_context(redirect_stderr(err))
        stack.enter_context(mock.patch.object(sys, "stdin", stdin_file))
        stack.enter_context(mock.patch("registryd.admin.store_access.react", _refuse_reactor))
        stack.enter_context(mock.patch.object(globalLogBeginner, "beginLoggingTo", begin_logging))
        try:
            try:
                status: Any = cli.main(list(args))
            except SystemExit as e:     # argparse: --help, usage errors
                status = e.code
        finally:
            for observer in observers:
                globalLogPublisher.removeObserver(observer)
    if status is None:
        status = 0
    elif not isinstance(status, int):
        print(status, file=err)
        status = 1
    return subprocess.CompletedProcess(["registryd", *args], status, out.getvalue(), err.getvalue())
