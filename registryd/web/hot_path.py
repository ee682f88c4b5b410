"""The manifest GET, dispatched without Klein's router and Deferred chain.

A manifest GET or HEAD is most of what a registry answers (every pull of
every node starts with one) and its handler usually finishes without
waiting: the tag is checked with a ``stat`` and the manifest comes from the
in-memory cache. Through Klein, routing (werkzeug's matcher) and the
Deferreds around the handler cost more than the handler itself (a profile
of a c=32 run: Klein's own steps about a fifth of the reactor thread's time).
Here a path that Klein would route to ``get_manifest`` with the same
arguments (plain ASCII, nothing percent-encoded, no empty segment: the
name and reference are then the path's own text) runs the handler's
coroutine directly; when it finishes at once, no Deferred is made at all.
Errors go to the same handlers Klein calls, and the response is written
and finished as Klein writes it. Every other request goes to Klein.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Coroutine

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from registryd.errors import RegistryError

log = Logger()

#: ``/v2/<name>/manifests/<reference>`` as Klein's rule matches it, for paths whose raw text is
#: their decoded text: the name runs to the last ``/manifests/`` (the reference has no ``/``).
MANIFEST_PATH = re.compile(rb"/v2/([A-Za-z0-9._:-]+(?:/[A-Za-z0-9._:-]+)*)/manifests/([A-Za-z0-9._:+=-]+)")

Handler = Callable[[Any, Failure], Any]


class HotPath(Resource):
    """Manifest GETs and HEADs straight to the handler; the rest to ``rest`` (Klein)."""

    isLeaf = True

    def __init__(self, rest: Resource, get_manifest: Callable[[Any, str, str], Coroutine[Any, Any, bytes]],
                 registry_error: Handler, internal_error: Handler) -> None:
        super().__init__()
        self._rest = rest
        self._get_manifest = get_manifest
        self._registry_error = registry_error
        self._internal_error = internal_error

    def render(self, request: Any) -> Any:
        if request.method == b"GET" or request.method == b"HEAD":
            match = MANIFEST_PATH.fullmatch(request.path)
            if match is not None:
                self._run(request, self._get_manifest(request, match[1].decode("ascii"), match[2].decode("ascii")))
                return server.NOT_DONE_YET
        return self._rest.render(request)

    def _run(self, request: Any, coroutine: Coroutine[Any, Any, bytes]) -> None:
        """Step the handler once; only a handler that waits gets a Deferred (and is cancelled,
        as under Klein, when its connection goes)."""
        try:
            coroutine.send(None)
        except StopIteration as done:
            _write(request, done.value)
            return
        except Exception:
            self._failed(Failure(), request)
            return
        # It awaits a Deferred that has not fired: the rest runs as any coroutine does (sending
        # None only makes the awaited Deferred look at its result again).
        pending: Deferred[bytes] = Deferred.fromCoroutine(coroutine)
        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))
        request.notifyFinish().addErrback(lambda _: pending.cancel())

        def failed(failure: Failure) -> None:
            if finished:
                if not failure.check(CancelledError):
                    log.failure("{method} {uri} failed after its connection went", failure,
                                method=request.method.decode("latin-1"), uri=request.uri.decode("latin-1"))
                return
            self._failed(failure, request)

        pending.addCallbacks(lambda body: _write(request, body), failed)

    def _failed(self, failure: Failure, request: Any) -> None:
        """The handler Klein would choose: the API's error document, or its 500/503/507."""
        handler = self._registry_error if failure.check(RegistryError) else self._internal_error
        try:
            answer = handler(request, failure)
        except Exception:
            log.failure("answering a failed {uri}", uri=request.uri.decode("latin-1"))
            request.processingFailed(Failure())
            return
        if isinstance(answer, Deferred):   # a cut response: it ends the connection itself
            return
        _write(request, answer)


def _write(request: Any, body: bytes | None) -> None:
    """As Klein's write_response: the body, then the end (not to a connection that went)."""
    if request.finished or getattr(request, "_disconnected", False):
        return
    if body:
        request.write(body)
    request.finish()
