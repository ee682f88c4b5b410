"""Log observers for ``twistd --logger``, cheap per event.

``twistd -n --logger registryd.logs.json_lines registryd`` writes one JSON
object per line to stdout: every event with its structured fields (access
events carry ``access: true``, method, path, status, bytes, duration, user,
cache and upstream). Text is the default: ``registryd.logs.text`` (which
``twistd -n registryd`` uses when it logs to stdout) writes the lines
twistd's own observer writes, at a fraction of the cost per event.

Every request logs an access event, so formatting is on the hot path of
small requests. Twisted's observers format the time zone and the time anew
for every event and parse the format string every time; here the time text
is kept for the second it names and each format string is parsed once.
"""
from __future__ import annotations

import json
import sys
from string import Formatter
from typing import IO, Any, Callable

from twisted.logger import (ILogObserver, FileLogObserver, LogEvent, Logger, eventAsJSON, formatEventAsClassicLogText,
                            formatTime, timeFormatRFC3339)
from twisted.logger._json import objectSaveHook   # what eventAsJSON makes of log_level, loggers, failures

#: Format strings kept parsed; past this many (a bug logging unbounded formats) the cache starts over.
MAX_FORMATS = 512

_parser = Formatter()
#: Format string -> its parsed pieces, or None when Twisted's formatter must render it
#: (attribute, index or call fields, positional fields, nested specs).
_parsed: dict[str, list[tuple[str, str | None, str | None, str | None]] | None] = {}
#: Format string -> its field names when they are plain and each used once (see _simple_fields).
_simple: dict[str, list[str] | None] = {}


class SecondTimeFormat:
    """``formatTime(when, timeFormat)``, computed once per second: the format has no
    fraction of a second, so every event of one second gets the same text."""

    def __init__(self, time_format: str = timeFormatRFC3339,
                 format_time: Callable[[float, str], str] = formatTime) -> None:
        self._format = time_format
        self._format_time = format_time
        self._second: int | None = None
        self._text = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when // 1)
        if second != self._second:
            self._text = self._format_time(when, self._format)
            self._second = second
        return self._text


def _pieces(format_string: str) -> list[tuple[str, str | None, str | None, str | None]] | None:
    pieces = _parsed.get(format_string, False)
    if pieces is not False:
        return pieces  # type: ignore[return-value]
    try:
        parsed = list(_parser.parse(format_string))
    except ValueError:
        parsed = None
    if parsed is not None:
        for _, name, spec, _conversion in parsed:
            if name is not None and (not name.isidentifier() or "{" in (spec or "")):
                parsed = None
                break
    if len(_parsed) >= MAX_FORMATS:
        _parsed.clear()
    _parsed[format_string] = parsed
    return parsed


def render_message(event: LogEvent) -> str | None:
    """The event's message as Twisted's ``formatEvent`` renders it, or None when
    only Twisted's formatter can (an unusual field, a missing key, an error)."""
    format_string = event.get("log_format")
    if not isinstance(format_string, str) or "log_flattened" in event:
        return None
    pieces = _pieces(format_string)
    if pieces is None:
        return None
    out = []
    try:
        for literal, name, spec, conversion in pieces:
            out.append(literal)
            if name is None:
                continue
            value = event[name]
            if conversion == "r":
                value = repr(value)
            elif conversion == "s":
                value = str(value)
            elif conversion == "a":
                value = ascii(value)
            out.append(format(value, spec or ""))
    except Exception:
        return None
    return "".join(out)


class ClassicText:
    """``formatEventAsClassicLogText`` with a per-second time text and parsed formats:
    ``{time} [{namespace}#{level}] {message}``, continuation lines indented."""

    def __init__(self, time_format: Callable[[float | None], str] | None = None) -> None:
        self._time = time_format or SecondTimeFormat()

    def __call__(self, event: LogEvent) -> str | None:
        message = None if "log_failure" in event else render_message(event)
        if message is None:
            return formatEventAsClassicLogText(event, formatTime=self._time)
        if not message:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
        return f"{self._time(event.get('log_time'))} [{system}] {message}".replace("\n", "\n\t") + "\n"


def _simple_fields(format_string: str) -> list[str] | None:
    """The field names of a format whose fields are plain names, each once, without
    conversion or spec (as registryd's own are), or None."""
    names = _simple.get(format_string, False)
    if names is False:
        if len(_simple) >= MAX_FORMATS:
            _simple.clear()
        names = _simple[format_string] = _find_simple_fields(format_string)
    return names  # type: ignore[return-value]


def _find_simple_fields(format_string: str) -> list[str] | None:
    pieces = _pieces(format_string)
    if pieces is None:
        return None
    names = [name for _, name, spec, conversion in pieces if name is not None]
    if len(set(names)) != len(names) or any(spec or conversion
                                            for _, name, spec, conversion in pieces if name is not None):
        return None
    return names


def event_as_json(event: LogEvent) -> str:
    """``eventAsJSON(event)``: the same JSON, with the format's fields flattened from
    the parsed format instead of a new parse and a formatter per field."""
    format_string = event.get("log_format")
    names = _simple_fields(format_string) if isinstance(format_string, str) else None
    if names is None or "log_flattened" in event or not all(name in event for name in names):
        return eventAsJSON(event)
    flattened: dict[str, Any] = {}
    for name in names:
        value = event[name]
        flattened[f"{name}!s:"] = str(value)
        flattened[f"{name}!:"] = value
    if flattened:
        event["log_flattened"] = flattened      # what flattenEvent adds
    encoded = dict(event)
    level = encoded.get("log_level")
    if level is not None:
        saved = _levels.get(level)
        if saved is None:
            saved = _levels[level] = objectSaveHook(level)
        encoded["log_level"] = saved
    if isinstance(encoded.get("log_logger"), Logger):
        encoded["log_logger"] = _UNPERSISTABLE
    return _encoder.encode(encoded)


#: Log levels as eventAsJSON writes them, made once per level.
_levels: dict[Any, Any] = {}
_UNPERSISTABLE = {"unpersistable": True}


def _json_default(value: Any) -> Any:
    """eventAsJSON's serializer of what JSON has no type for."""
    if isinstance(value, bytes):
        return value.decode("charmap")
    return objectSaveHook(value)


#: eventAsJSON's json.dumps arguments, in one encoder made once.
_encoder = json.JSONEncoder(skipkeys=True, default=_json_default)


def text_file_observer(out: IO[Any]) -> ILogObserver:
    """What ``textFileLogObserver(out)`` writes, cheaper per event."""
    return FileLogObserver(out, ClassicText())


def text() -> ILogObserver:
    return text_file_observer(sys.stdout)


def json_file_observer(out: IO[Any]) -> ILogObserver:
    """What ``jsonFileLogObserver(out, recordSeparator="")`` writes, cheaper per event."""
    return FileLogObserver(out, lambda event: event_as_json(event) + "\n")


def json_lines() -> ILogObserver:
    return json_file_observer(sys.stdout)


__all__ = ["ClassicText", "SecondTimeFormat", "event_as_json", "json_file_observer", "json_lines",
           "render_message", "text", "text_file_observer"]
