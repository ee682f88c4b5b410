"""What the status page and the mirror page know from memory, for one process or a whole node.

Part of what those pages show lives in each process: the mirror's traffic
ring (registryd.web.ui.traffic), the manifest pulls per repository and the
recent errors (registryd.web.status), the fills running and each upstream's
health (registryd.mirror.cache). A ``NodeView`` gathers them. With one
process a page reads the live objects (``local_view``). With workers, each
worker writes its view as a small JSON document every few seconds
(registryd.web.worker_snapshots) and a page adds up its own live view and
the other live workers' documents (``merge``): whichever worker answers,
the page shows the node. Everything here is bounded whatever the traffic.
"""
from __future__ import annotations

import heapq
from typing import Any, Awaitable, Callable, Collection, Iterable, Mapping, Sequence

import attrs

from registryd.mirror.cache import UpstreamHealth
from registryd.web.ui.traffic import Traffic

#: The status page's bounds: repositories counted, recent errors kept.
MAX_REPOSITORIES = 1000
MAX_ERRORS = 20
#: Fills a worker writes down (a node runs far fewer at once).
MAX_FILLS = 10_000
VERSION = 1


@attrs.frozen
class RecentError:
    at: float
    kind: str  # "response" or "upstream"
    where: str  # the request path, or the upstream's namespace
    status: int | None
    message: str


@attrs.frozen
class NodeView:
    """Traffic, pulls, recent errors (oldest first), fills running and upstream health."""

    traffic: Traffic
    pulls: Mapping[str, int]
    errors: Sequence[RecentError]
    #: (upstream namespace, upstream repository, digest) of each transfer running.
    fills: Collection[tuple[str, str, Any]]
    health: Mapping[str, UpstreamHealth]

    def fills_of(self, namespace: str) -> int:
        return sum(1 for key in self.fills if key[0] == namespace)

    def top_repositories(self, n: int) -> list[tuple[str, int]]:
        return sorted(self.pulls.items(), key=lambda item: (-item[1], item[0]))[:n]


def local_view(traffic: Traffic, pulls: Mapping[str, int], errors: Sequence[RecentError],
               fills: Collection[tuple[str, str, Any]], health: Mapping[str, UpstreamHealth]) -> NodeView:
    """This process's own view: the live objects themselves, nothing copied."""
    return NodeView(traffic, pulls, errors, fills, health)


class NodeViews:
    """Where a page gets its view: this process's memory, or (``node`` set, a worker of a
    node) this process's and every other live worker's, added up."""

    def __init__(self, local: Callable[[], NodeView]) -> None:
        self.local = local
        self.node: Callable[[], Awaitable[NodeView]] | None = None

    async def current(self) -> NodeView:
        if self.node is None:
            return self.local()
        return await self.node()


# --- written down, read back ----------------------------------------------------------------------

def document(view: NodeView, pid: int, at: float) -> dict[str, Any]:
    """The view as plain JSON values (copies: safe to serialise off the reactor), with the
    writer's pid and the time it was written (how a reader tells a live worker)."""
    fills = [[ns, remote, str(digest)] for ns, remote, digest in list(view.fills)[:MAX_FILLS]]
    return {
        "version": VERSION, "pid": pid, "at": at,
        "traffic": view.traffic.document(),
        "pulls": dict(view.pulls),
        "errors": [[e.at, e.kind, e.where, e.status, e.message] for e in list(view.errors)[-MAX_ERRORS:]],
        "fills": fills,
        "health": {ns: [h.last_success, h.last_error, h.last_error_message, h.errors]
                   for ns, h in view.health.items()},
    }


def _number(value: Any, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if type(value) not in (int, float):
        raise ValueError(f"not a number: {value!r}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"not text: {value!r}")
    return value


def from_document(found: Any, like: Traffic) -> NodeView:
    """A view read back from ``document`` (traffic shaped like ``like``); ValueError if malformed."""
    try:
        if not isinstance(found, dict) or found.get("version") != VERSION:
            raise ValueError("not a worker view of this version")
        traffic = Traffic(like.namespaces, like.clock, like.bucket_seconds, like.buckets)
        traffic.add_document(found["traffic"])
        pulls = {_text(name): int(_number(count)) for name, count in dict(found["pulls"]).items()}
        errors = [RecentError(_number(at), _text(kind), _text(where),
                              None if status is None else int(_number(status)), _text(message))
                  for at, kind, where, status, message in found["errors"][-MAX_ERRORS:]]
        fills = {(_text(ns), _text(remote), _text(digest)) for ns, remote, digest in found["fills"][:MAX_FILLS]}
        health = {_text(ns): UpstreamHealth(_number(success, True), _number(error, True), _text(message),
                                            int(_number(count)))
                  for ns, (success, error, message, count) in dict(found["health"]).items()}
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"malformed worker view: {e!r}") from None
    return NodeView(traffic, pulls, errors, fills, health)


# --- added up --------------------------------------------------------------------------------------

def merge(own: NodeView, others: Iterable[NodeView]) -> NodeView:
    """The node's view: traffic and pulls added up, the latest errors, every fill once (one
    followed in several workers is one transfer), each upstream's latest success and error."""
    views = [own, *others]
    traffic = Traffic(own.traffic.namespaces, own.traffic.clock, own.traffic.bucket_seconds, own.traffic.buckets)
    pulls: dict[str, int] = {}
    fills: set[tuple[str, str, str]] = set()
    health: dict[str, UpstreamHealth] = {}
    for view in views:
        traffic.add(view.traffic)
        for name, count in view.pulls.items():
            pulls[name] = pulls.get(name, 0) + count
        fills.update((ns, remote, str(digest)) for ns, remote, digest in view.fills)
        for ns, seen in view.health.items():
            into = health.setdefault(ns, UpstreamHealth())
            if seen.last_success is not None and (into.last_success is None or seen.last_success > into.last_success):
                into.last_success = seen.last_success
            if seen.last_error is not None and (into.last_error is None or seen.last_error > into.last_error):
                into.last_error, into.last_error_message = seen.last_error, seen.last_error_message
            into.errors += seen.errors
    if len(pulls) > MAX_REPOSITORIES:
        pulls = dict(heapq.nlargest(MAX_REPOSITORIES, pulls.items(), key=lambda item: (item[1], item[0])))
    errors = heapq.nlargest(MAX_ERRORS, (e for view in views for e in view.errors), key=lambda e: e.at)
    errors.reverse()
    return NodeView(traffic, pulls, errors, fills, health)
