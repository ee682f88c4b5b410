"""One run of one ``[[sync]]`` job, through the mirror cache's own code paths.

Everything lands in the store exactly as a client's pull through the
cache leaves it: manifests through ``MirrorCache.fetch_manifest`` (checked
against their digest, stored with their referrer entry), blobs through
``MirrorCache.fill`` (the one transfer per upstream repository and digest
that pulls share, streamed to a partial file, verified, committed and
linked into the repository). Tags are written last, once their image is
whole.

Toward the upstream: tags are listed page by page (``Link``); each
selected tag is asked for with a ``HEAD`` first (Docker Hub does not count
those against its pull limits) and its manifest fetched only when the
store does not hold that digest; a blob the repository already has is not
fetched. A 429 waits its ``Retry-After`` (else a doubling backoff) and
tries again. The state (registryd.sync.state) is written after each image:
a restart mid-run resumes with the images not done yet.
"""
from __future__ import annotations

import datetime
import re
from typing import Any

from twisted.logger import Logger

from registryd.deferreds import bounded_each, shielded
from registryd.digest import Digest, parse_digest
from registryd.errors import RegistryError
from registryd.json_documents import load_json
from registryd.manifests import INDEX_TYPES, parse_manifest
from registryd.mirror.cache import Mirror, MirrorCache
from registryd.mirror.client import UpstreamUnavailable
from registryd.mirror.routing import Route
from registryd.storage import Store
from registryd.sync.errors import ImageFailed, JobFailed, RunStopped
from registryd.sync.referrers import referrer_tags, referrers_of
from registryd.sync.report import ImageReport, Progress, RunResult
from registryd.sync.state import JobState, RunSummary, load_state, save_state
from registryd.sync.upstream import ACCEPT, PatientUpstream
from registryd.sync.versions import all_versions, newest
from registryd.sync_settings import SyncJob
from registryd.upkeep.pins import write_pins

log = Logger()

_MAX_DEPTH = 4          # an index of indexes of ..., and referrers of referrers
_SHOWN_ERRORS = 10
_CONFIG_LIMIT = 4 * 1024 * 1024


def created_time(config: bytes) -> float | None:
    """An image config's ``created`` (RFC 3339), in seconds."""
    try:
        text = load_json(config).get("created")
        if not isinstance(text, str):
            return None
        text = re.sub(r"(\.\d{6})\d+", r"\1", text.strip()).replace("Z", "+00:00")
        moment = datetime.datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        return moment.timestamp()
    except (ValueError, AttributeError):
        return None


def _is_glob(text: str) -> bool:
    return "*" in text or "?" in text


class SyncRun:
    """One run of ``job``; ``run()`` never raises for one image, only JobFailed for the whole."""

    def __init__(self, job: SyncJob, cache: MirrorCache, store: Store, reactor: Any,
                 dry_run: bool = False, progress: Progress | None = None,
                 max_manifest_size: int = 4 * 1024 * 1024) -> None:
        self.job = job
        self._cache = cache
        self._store = store
        self._reactor = reactor
        self._mirror: Mirror = cache.mirrors[job.upstream]
        self.dry_run = dry_run
        self.progress = progress or Progress()
        self._state = JobState()
        self._limit = max(max_manifest_size, 4 * 1024 * 1024)   # as the mirror cache reads them
        self._pins: dict[str, set[Digest]] = {}
        self._looked: set[str] = set()  # images whose creation time this run needed
        self.upstream = PatientUpstream(self._mirror.client, reactor, job.name, self._limit)
        #: Set by a stopping server: no image is begun any more, and the run ends in RunStopped.
        self.stopping = False

    def _route(self, remote: str) -> Route:
        return Route(self._mirror.config, remote)

    # --- the store ----------------------------------------------------------------

    async def stored_manifest(self, remote: str, digest: Digest) -> tuple[str, bytes] | None:
        media_type = await self._mirror.repositories.manifest_media_type(remote, digest)
        if media_type is None:
            return None
        data = await self._store.blobs.read(digest, self._limit)
        return None if data is None else (media_type, data)

    async def _manifest(self, remote: str, digest: Digest, report: ImageReport) -> tuple[str, bytes]:
        """The manifest from the store, or fetched (a GET by digest) and stored as a pull stores it."""
        stored = await self.stored_manifest(remote, digest)
        if stored is not None:
            return stored
        try:
            # Shielded: a stop mid-job must not leave a manifest fetched but not stored (fetched again).
            cached = await self.upstream.patiently(f"manifest {digest}", lambda: shielded(self._cache.fetch_manifest(
                self._mirror, remote, digest, ACCEPT)))
        except UpstreamUnavailable as e:
            raise ImageFailed(f"manifest {digest}: {e}") from None
        except RegistryError as e:
            raise ImageFailed(f"manifest {digest}: {e.message}") from None
        report.manifests += 1
        return cached.media_type, cached.data

    async def _blob(self, remote: str, digest: Digest, report: ImageReport) -> None:
        """Fetch the blob into the repository unless it is there already (one fill, as a pull's)."""
        route = self._route(remote)
        if await self._cache.cached_blob(route, digest):
            return
        try:
            fill = await self.upstream.patiently(f"blob {digest}", lambda: self._cache.fill(route, digest))
        except RegistryError as e:
            raise ImageFailed(f"blob {digest}: {e.message}") from None
        await fill.ended()
        if fill.error is not None:
            raise ImageFailed(f"blob {digest}: {fill.error}")
        report.blobs += 1
        report.bytes += fill.written
        self.progress.bytes += fill.written

    # --- one image -----------------------------------------------------------------

    async def _copy_tree(self, remote: str, digest: Digest, report: ImageReport, keeps: set[Digest],
                         tags: set[str], depth: int = 0) -> None:
        """The manifest ``digest``, what it names (the chosen children of an index, the blobs of an
        image) and, recursively, its referrers; ``keeps`` collects every manifest."""
        if digest in keeps:
            return
        if depth > _MAX_DEPTH:
            raise ImageFailed(f"manifests nested more than {_MAX_DEPTH} deep")
        media_type, data = await self._manifest(remote, digest, report)
        keeps.add(digest)
        try:
            parsed = parse_manifest(data, media_type)
        except RegistryError as e:
            raise ImageFailed(f"manifest {digest}: {e.message}") from None
        if media_type in INDEX_TYPES:
            for child in self._chosen_children(data):
                await self._copy_tree(remote, child, report, keeps, tags, depth + 1)
        else:
            await bounded_each(parsed.blobs, lambda blob: self._blob(remote, blob, report), 3)
        if self.job.referrers:
            for attached in await referrers_of(self.upstream, remote, digest, tags):
                await self._copy_tree(remote, attached.digest, report, keeps, tags, depth + 1)
                if attached.tag is not None:
                    await self._mirror.repositories.touch_tag(remote, attached.tag, attached.digest)

    def _chosen_children(self, data: bytes) -> list[Digest]:
        try:
            children = load_json(data).get("manifests") or []
            chosen = [child for child in children if not self.job.platforms
                      or any(p.matches(child.get("platform")) for p in self.job.platforms)]
            return [parse_digest(child["digest"]) for child in chosen]
        except (ValueError, AttributeError, KeyError, TypeError, RegistryError):
            raise ImageFailed("an index with unusable children") from None

    async def _image(self, remote: str, tag: str, tags: set[str]) -> ImageReport:
        """Copy ``remote:tag``; never raises for this image alone (the report says what failed)."""
        key = f"{remote}:{tag}"
        previous = await self._local_tag(remote, tag)
        report = ImageReport(remote, tag, "failed", previous=str(previous) if previous else None)
        done = self._state.done.get(key)
        if done is not None and not self.dry_run:
            report.outcome, report.digest = "resumed", done[0] if done else None
            self._pin(remote, done)
            return report
        try:
            digest = await self.upstream.head_manifest(remote, tag)
            if digest is None:
                raise ImageFailed("the upstream no longer has this tag")
            report.digest = str(digest)
            if self.dry_run:
                whole = previous == digest and await self.stored_manifest(remote, digest) is not None
                report.outcome = "unchanged" if whole else ("would update" if previous else "would copy")
                return report
            keeps: set[Digest] = set()
            await self._copy_tree(remote, digest, report, keeps, tags)
            # The tag last: its image is whole now. Also marks it confirmed (the mirror's TTL clock).
            await self._mirror.repositories.touch_tag(remote, tag, digest)
            report.outcome = ("unchanged" if previous == digest and not report.manifests and not report.blobs
                              else "updated" if previous is not None else "copied")
            self._pin(remote, [str(d) for d in [digest, *sorted(keeps - {digest}, key=str)]])
            self._state.done[key] = [str(digest), *sorted(str(d) for d in keeps - {digest})]
            self._state.synced.setdefault(remote, {})[tag] = self._state.done[key]
        except (ImageFailed, UpstreamUnavailable) as e:
            report.outcome, report.error = "failed", str(e)
            # What an earlier run copied for this tag stays listed (so never evicted) until one succeeds.
            self._pin(remote, self._state.synced.get(remote, {}).get(tag, []))
        return report

    async def _local_tag(self, remote: str, tag: str) -> Digest | None:
        try:
            return await self._mirror.repositories.resolve_tag(remote, tag)
        except RegistryError:
            return None

    def _pin(self, remote: str, digests: list[str]) -> None:
        for text in digests:
            try:
                self._pins.setdefault(remote, set()).add(parse_digest(text))
            except RegistryError:
                pass

    # --- choosing ------------------------------------------------------------------

    async def repositories(self) -> list[str]:
        """The job's repositories: exact names as given, globs expanded with the upstream's catalog."""
        exact = [g.text for g in self.job.repositories if not _is_glob(g.text)]
        globs = [g for g in self.job.repositories if _is_glob(g.text)]
        names = set(self._upstream_name(name) for name in exact)
        if globs:
            catalog = await self.upstream.catalog()
            if catalog is None:
                raise JobFailed(f"{self.job.upstream} has no catalog (or refuses it) to expand "
                                f"{', '.join(g.text for g in globs)}: list those repositories by name")
            names.update(name for name in catalog if any(g.matches(name) for g in globs))
        return sorted(names)

    def _upstream_name(self, name: str) -> str:
        if self.job.upstream == "docker.io" and "/" not in name:
            return f"library/{name}"
        return name

    async def choose(self, remote: str, listed: list[str]) -> list[str]:
        """The tags of ``remote`` to copy: selected by the patterns (never a tag-schema referrer tag),
        then the ``keep_latest`` newest."""
        selected = [t for t in listed if self.job.selects_tag(t) and not referrer_tags.match(t)]
        if not self.job.keep_latest or len(selected) <= self.job.keep_latest or all_versions(selected):
            return newest(selected, self.job.keep_latest)
        created = {}
        for tag in selected:
            when = await self._created(remote, tag)
            if when is not None:
                created[tag] = when
        return newest(selected, self.job.keep_latest, created)

    async def _created(self, remote: str, tag: str) -> float | None:
        """The creation time of the image ``tag`` names (its config's ``created``), remembered by digest."""
        try:
            digest = await self.upstream.head_manifest(remote, tag)
            if digest is None:
                return None
            self._looked.add(str(digest))
            known = self._state.created.get(str(digest))
            if known is not None:
                return known
            report = ImageReport(remote, tag, "looked")
            media_type, data = await self._manifest(remote, digest, report)
            if media_type in INDEX_TYPES:
                children = self._chosen_children(data)
                if not children:
                    return None
                media_type, data = await self._manifest(remote, children[0], report)
            config = parse_manifest(data, media_type).blobs[0]
            stored = await self._store.blobs.read(config, _CONFIG_LIMIT) \
                if await self._cache.cached_blob(self._route(remote), config) else None
            if stored is None:
                status, stored, _ = await self.upstream.get(f"/v2/{remote}/blobs/{config}", remote, {}, _CONFIG_LIMIT)
                if status != 200:
                    return None
            when = created_time(stored)
            if when is not None:
                self._state.created[str(digest)] = when
            return when
        except (ImageFailed, UpstreamUnavailable, RegistryError, IndexError):
            return None

    # --- the run -------------------------------------------------------------------

    async def run(self) -> RunResult:
        driver = self._store.objects
        started = self._reactor.seconds()
        self._state = await load_state(driver, self.job.name)
        resuming = self._state.running_since is not None and not self.dry_run
        if not resuming:
            self._state.done = {}
        if not self.dry_run:
            self._state.running_since = self._state.running_since if resuming else started
            await save_state(driver, self.job.name, self._state)
        summary = RunSummary(started, started)
        result = RunResult(self.job.name, self.dry_run, summary)
        try:
            repositories = result.repositories = await self.repositories()
            plan: list[tuple[str, str, set[str]]] = []
            listed_by_repository: dict[str, set[str]] = {}
            for remote in repositories:
                listed = await self.upstream.tags(remote)
                if listed is None:
                    summary.errors += 1
                    summary.messages.append(f"{remote}: the upstream has no such repository (or refuses it)")
                    continue
                listed_by_repository[remote] = set(listed)
                plan += [(remote, tag, set(listed)) for tag in await self.choose(remote, listed)]
            self.progress.planned = len(plan)
            self.progress.tell(None)

            async def one(item: tuple[str, str, set[str]]) -> None:
                if self.stopping:
                    return
                report = await self._image(*item)
                if report.outcome == "resumed":
                    result.resumed += 1
                result.images.append(report)
                if report.error is not None:
                    summary.errors += 1
                    if len(summary.messages) < _SHOWN_ERRORS:
                        summary.messages.append(f"{item[0]}:{item[1]}: {report.error}")
                elif report.outcome in ("copied", "updated"):
                    summary.images += 1
                summary.bytes += report.bytes
                if not self.dry_run and report.outcome != "resumed" and report.error is None:
                    await save_state(driver, self.job.name, self._state)
                self.progress.done += 1
                self.progress.tell(report)

            await bounded_each(plan, one, self.job.concurrency)
            if self.stopping:
                raise RunStopped()      # its state says what is done: the next start resumes it
            planned = {(remote, tag) for remote, tag, _ in plan}
            await self._vanished(listed_by_repository, planned, result)
        except (JobFailed, UpstreamUnavailable) as e:
            summary.errors += 1
            summary.messages.append(str(e) if isinstance(e, JobFailed) else f"{self.job.upstream}: {e}")
            # A run that could not look (the upstream away) keeps listing what earlier runs copied.
            for remote, tags in self._state.synced.items():
                for keeps in tags.values():
                    self._pin(remote, keeps)
        summary.ended = self._reactor.seconds()
        result.throttled = self.upstream.throttled
        if not self.dry_run:
            await write_pins(driver, self.job.name, self.job.upstream, self._pins)
            self._state.last = summary
            self._state.running_since = None
            # Creation times of images no longer looked at are forgotten (the state stays small).
            self._state.created = {d: t for d, t in self._state.created.items() if d in self._looked}
            self._state.done = {}
            await save_state(driver, self.job.name, self._state)
        return result

    async def _vanished(self, listed: dict[str, set[str]], planned: set[tuple[str, str]], result: RunResult) -> None:
        """Tags this job copied before that the upstream no longer has: removed with ``mirror_deletes``,
        else kept (and still listed, so never evicted); tags no longer selected are simply no longer listed."""
        for remote, tags in sorted(self._state.synced.items()):
            for tag, keeps in sorted(tags.items()):
                if (remote, tag) in planned:
                    continue
                gone_upstream = remote in listed and tag not in listed[remote]
                if not gone_upstream:
                    if remote in listed or remote not in result.repositories:
                        del self._state.synced[remote][tag]     # deselected, or the repository left the job
                    else:
                        self._pin(remote, keeps)     # its tag list could not be read this time
                    continue
                if self.job.mirror_deletes:
                    outcome = "would delete" if self.dry_run else "deleted"
                    if not self.dry_run:
                        await self._mirror.repositories.delete_tag(remote, tag)
                        del self._state.synced[remote][tag]
                else:
                    outcome = "kept"
                    self._pin(remote, keeps)
                result.images.append(ImageReport(remote, tag, outcome, digest=keeps[0] if keeps else None))
        self._state.synced = {remote: tags for remote, tags in self._state.synced.items() if tags}
