"""Log observers for ``twistd --logger``.

``twistd -n --logger registryd.logs.json_lines registryd`` writes one JSON
object per line to stdout: every event with its structured fields (access
events carry ``access: true``, method, path, status, bytes, duration, user,
cache and upstream). Text is the default (twistd's own observer).
"""
from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_lines() -> ILogObserver:
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
