"""registryd's log observers: Twisted's lines and JSON, made cheaper per event.

The text observer (the default of ``twistd -n registryd``) and the JSON-lines
one must write exactly what Twisted's own write; the time text is made once
per second and each format string parsed once (a bounded cache).
"""
from __future__ import annotations

import io
import json
from typing import Any

import pytest
from twisted.logger import (LogLevel, eventAsJSON, formatEventAsClassicLogText, formatTime, textFileLogObserver,
                            timeFormatRFC3339)
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions

from registryd import logs
from registryd.tap import default_log_observer

ACCESS_FORMAT = "{client} {user} \"{method} {uri}\" {status} {bytes_out} {duration_ms}ms{cache_note}"


def access_event(when: float = 1_700_000_000.25) -> dict[str, Any]:
    return {"log_format": ACCESS_FORMAT, "log_level": LogLevel.info, "log_namespace": "registryd.access",
            "log_source": None, "log_time": when, "client": "127.0.0.1", "user": "-", "method": "GET",
            "uri": "/v2/a/manifests/latest", "path": "/v2/a/manifests/latest", "route": "manifest", "status": 200,
            "bytes_out": 1234, "bytes_in": 0, "duration_ms": 1.5, "cache": None, "upstream": None,
            "cache_note": "", "access": True}


def failure() -> Failure:
    try:
        1 / 0
    except ZeroDivisionError:
        return Failure()


class Thing:
    name = "thing"


EVENTS: list[dict[str, Any]] = [
    access_event(),
    {**access_event(), "cache_note": " cache=hit upstream=u"},
    {"log_format": "two\nlines {x!r} {y:>6}", "x": "a", "y": 7, "log_level": LogLevel.warn,
     "log_namespace": "n", "log_time": 1_700_000_001.0},
    {"log_format": "system {x}", "x": 1, "log_system": "sys", "log_time": 1_700_000_002.0},
    {"log_format": "attribute {thing.name} call {f()}", "thing": Thing(), "f": lambda: "called",
     "log_time": 1_700_000_003.0, "log_level": LogLevel.info, "log_namespace": "n"},
    {"log_format": "missing {nothere}", "log_time": 1_700_000_004.0},
    {"log_format": "twice {x} {x}", "x": 2, "log_time": 1_700_000_005.0},
    {"log_format": "failed {what}", "what": "it", "log_failure": failure(), "log_time": 1_700_000_006.0,
     "log_level": LogLevel.critical, "log_namespace": "n"},
    {"log_format": "", "log_time": 1_700_000_007.0},
    {"message": ("legacy",), "log_time": 1_700_000_008.0},
    {"log_format": "bytes {b}", "b": b"\xff", "log_time": None},
]


def twisted_text(event: dict[str, Any]) -> str | None:
    return formatEventAsClassicLogText(event, formatTime=lambda t: formatTime(t, timeFormatRFC3339))


@pytest.mark.parametrize("event", EVENTS, ids=range(len(EVENTS)))
def test_text_lines_are_twisteds(event: dict[str, Any]) -> None:
    assert logs.ClassicText()(dict(event)) == twisted_text(dict(event))


@pytest.mark.parametrize("event", EVENTS, ids=range(len(EVENTS)))
def test_json_lines_are_twisteds(event: dict[str, Any]) -> None:
    if "log_failure" in event:
        # a traceback's text holds addresses: compare what survives a round trip
        ours, theirs = json.loads(logs.event_as_json(dict(event))), json.loads(eventAsJSON(dict(event)))
        assert ours.keys() == theirs.keys()
        return
    try:
        expected = eventAsJSON(dict(event))
    except KeyError:
        with pytest.raises(KeyError):      # Twisted's observer then reports the event unformattable
            logs.event_as_json(dict(event))
        return
    assert logs.event_as_json(dict(event)) == expected


def test_the_observers_write_what_twisteds_write() -> None:
    ours, theirs = io.StringIO(), io.StringIO()
    text, stock = logs.text_file_observer(ours), textFileLogObserver(theirs)
    for event in EVENTS[:4]:
        text(dict(event))
        stock(dict(event))
    assert ours.getvalue() == theirs.getvalue() and ours.getvalue().count("\n") == 5
    out = io.StringIO()
    logs.json_file_observer(out)(access_event())
    assert json.loads(out.getvalue())["status"] == 200 and out.getvalue().endswith("}\n")


def test_the_time_text_is_made_once_per_second() -> None:
    made: list[float] = []

    def format_time(when: float, time_format: str) -> str:
        made.append(when)
        return formatTime(when, time_format)

    cached = logs.SecondTimeFormat(format_time=format_time)
    first = cached(1_700_000_000.1)
    assert first == formatTime(1_700_000_000.1, timeFormatRFC3339)
    assert cached(1_700_000_000.9) == first and len(made) == 1      # the same second: no new text
    assert cached(1_700_000_001.0) == formatTime(1_700_000_001.0, timeFormatRFC3339) and len(made) == 2
    assert cached(1_700_000_000.5) == first and len(made) == 3     # a clock that stepped back
    assert cached(None) == "-" and len(made) == 3


def test_the_format_cache_is_bounded() -> None:
    text = logs.ClassicText()
    for i in range(logs.MAX_FORMATS * 2 + 5):
        assert text({"log_format": f"event {i} {{x}}", "x": i, "log_time": 1.0}).endswith(f"event {i} {i}\n")
    assert len(logs._parsed) <= logs.MAX_FORMATS


def test_twistd_logs_through_registryd_text_to_stdout_only() -> None:
    def observer(*argv: str) -> Any:
        options = ServerOptions()
        options.parseOptions([*argv, "registryd"])
        return default_log_observer(options.subOptions.parent)

    assert isinstance(observer("-n").formatEvent, logs.ClassicText)
    assert isinstance(observer("-n", "--logfile", "-").formatEvent, logs.ClassicText)
    assert observer("-n", "--logfile", "/tmp/registryd-test.log") is None      # twistd's rotating file
    assert observer("-n", "--logger", "registryd.logs.json_lines") is None      # the one named wins
    assert observer("-n", "--syslog") is None
