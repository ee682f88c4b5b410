"""Reading and writing an OCI image layout, as a directory or as a tar file.

The layout (image-spec, "OCI Image Layout Specification") is ``oci-layout``
(``{"imageLayoutVersion": "1.0.0"}``), ``index.json`` (the images, each a
descriptor whose ``org.opencontainers.image.ref.name`` annotation names it)
and ``blobs/<alg>/<hex>``. Blobs go through here in CHUNK pieces and are
hashed on the way, in both directions: a blob is never held in memory whole,
and a file is never trusted for having the right name.

A layout is written into a temporary sibling of its target and renamed into
place by ``commit``: a failed export leaves nothing behind.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import tarfile
import time
import uuid
from typing import IO, Any, BinaryIO, Callable, Iterator, cast

from registryd.digest import Digest, parse_digest
from registryd.errors import RegistryError
from registryd.storage.files import fsync_dir

CHUNK = 1 << 20
LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = "1.0.0"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# index.json and oci-layout are small; anything bigger is no layout of ours.
_META_LIMIT = 16 << 20

OnRead = Callable[[int], None]
Descriptor = tuple[str, Digest, int, dict[str, str]]   # mediaType, digest, size, annotations


class LayoutError(Exception):
    """The input is no usable OCI image layout (one line)."""


class ContentError(Exception):
    """A blob whose bytes do not match its descriptor (digest or size)."""


class _Hashing:
    """A reader that hashes and counts what passes through it (tarfile pulls from it)."""

    def __init__(self, source: BinaryIO, digest: Digest, on_read: OnRead | None) -> None:
        self._source = source
        self._digest = digest
        self._hasher = digest.hasher()
        self._on_read = on_read
        self.count = 0

    def read(self, size: int = CHUNK) -> bytes:
        data = self._source.read(size if size >= 0 else CHUNK)
        self._hasher.update(data)
        self.count += len(data)
        if self._on_read is not None and data:
            self._on_read(len(data))
        return data

    def check(self, size: int) -> None:
        if self.count != size:
            raise ContentError(f"has {self.count} bytes where its descriptor says {size}")
        if self._hasher.hexdigest() != self._digest.hex:
            raise ContentError("does not match its digest")


def verify_stream(source: BinaryIO, digest: Digest, size: int, sink: BinaryIO | None = None,
                  on_read: OnRead | None = None) -> None:
    """Read ``source`` to its end in chunks, hashing it; copy it to ``sink`` if given.

    Raises ContentError when the bytes are not ``size`` long or do not hash
    to ``digest``. Stops reading once past ``size``: a huge wrong file costs
    no more than the right one.
    """
    reader = _Hashing(source, digest, on_read)
    while True:
        chunk = reader.read(CHUNK)
        if not chunk:
            break
        if reader.count > size:
            raise ContentError(f"is larger than the {size} bytes its descriptor says")
        if sink is not None:
            sink.write(chunk)
    reader.check(size)


def blob_name(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


def layout_document() -> bytes:
    return json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode()


def index_document(manifests: list[dict[str, Any]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}, indent=2).encode() + b"\n"


# --- reading ---------------------------------------------------------------------


class LayoutReader:
    """A layout to read: ``size``/``open`` of blobs and the two small files."""

    path: str

    def read_meta(self, name: str) -> bytes | None:
        raise NotImplementedError

    def size(self, digest: Digest) -> int | None:
        """The blob's size in the layout, or None when the layout lacks it."""
        raise NotImplementedError

    def open(self, digest: Digest) -> BinaryIO:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def read_json(self, name: str) -> Any:
        data = self.read_meta(name)
        if data is None:
            raise LayoutError(f"{self.path} is not an OCI image layout: it has no {name}")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise LayoutError(f"{self.path}: {name} is not valid JSON: {e}") from None


class DirectoryReader(LayoutReader):
    def __init__(self, path: str) -> None:
        self.path = path

    def read_meta(self, name: str) -> bytes | None:
        try:
            with open(os.path.join(self.path, name), "rb") as f:
                data = f.read(_META_LIMIT + 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        if len(data) > _META_LIMIT:
            raise LayoutError(f"{self.path}: {name} is larger than {_META_LIMIT} bytes")
        return data

    def _blob(self, digest: Digest) -> str:
        return os.path.join(self.path, "blobs", digest.algorithm, digest.hex)

    def size(self, digest: Digest) -> int | None:
        path = self._blob(digest)
        return os.path.getsize(path) if os.path.isfile(path) else None

    def open(self, digest: Digest) -> BinaryIO:
        return open(self._blob(digest), "rb")


class TarReader(LayoutReader):
    """A layout in a tar file (plain or compressed); members are read in place."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._tar = tarfile.open(path, "r:*")
            members = self._tar.getmembers()
        except (tarfile.TarError, EOFError) as e:
            # tarfile's "r:*" lists what every decompressor said, one per line.
            why = (str(e).splitlines() or ["truncated"])[0].rstrip(":")
            raise LayoutError(f"{path} is not a directory, nor a readable tar file: {why}") from None
        self._members: dict[str, tarfile.TarInfo] = {}
        for member in members:
            self._members[_member_name(member.name)] = member

    def _member(self, name: str) -> tarfile.TarInfo | None:
        member = self._members.get(name)
        for _ in range(8):  # a hard link names another member
            if member is None or not member.islnk():
                break
            member = self._members.get(_member_name(member.linkname))
        return member if member is not None and member.isreg() else None

    def read_meta(self, name: str) -> bytes | None:
        member = self._member(name)
        if member is None:
            return None
        if member.size > _META_LIMIT:
            raise LayoutError(f"{self.path}: {name} is larger than {_META_LIMIT} bytes")
        f = self._tar.extractfile(member)
        assert f is not None
        with f:
            return f.read()

    def size(self, digest: Digest) -> int | None:
        member = self._member(blob_name(digest))
        return None if member is None else member.size

    def open(self, digest: Digest) -> BinaryIO:
        member = self._member(blob_name(digest))
        f = self._tar.extractfile(member) if member is not None else None
        if f is None:
            raise FileNotFoundError(blob_name(digest))
        return cast(BinaryIO, _Member(f))

    def close(self) -> None:
        self._tar.close()


class _Member:
    """A tar member being read: a tar cut short is bad content, not a crash."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f

    def read(self, size: int = -1) -> bytes:
        try:
            return self._f.read(size)
        except (tarfile.TarError, EOFError) as e:
            raise ContentError(f"is cut short in the tar file ({e})") from None

    def __enter__(self) -> "_Member":
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _member_name(name: str) -> str:
    # "./blobs/sha256/..." and "blobs/sha256/..." are the same member.
    return posixpath.normpath("/" + name).lstrip("/")


def open_layout(path: str) -> LayoutReader:
    """A reader for the layout at ``path`` (a directory or a tar file), with oci-layout checked."""
    reader: LayoutReader = DirectoryReader(path) if os.path.isdir(path) else TarReader(path)
    try:
        document = reader.read_json(LAYOUT_FILE)
        version = document.get("imageLayoutVersion") if isinstance(document, dict) else None
        if not isinstance(version, str):
            raise LayoutError(f"{path}: {LAYOUT_FILE} has no imageLayoutVersion")
        if version.split(".")[0] != "1":
            raise LayoutError(f"{path}: imageLayoutVersion {version[:20]!r} is not supported (1.x is)")
    except BaseException:
        reader.close()
        raise
    return reader


def parse_descriptor(value: Any, where: str) -> Descriptor:
    """(mediaType, digest, size, annotations) of a descriptor; LayoutError if it is none."""
    if not isinstance(value, dict):
        raise LayoutError(f"{where} is not a descriptor object")
    media_type, size, digest = value.get("mediaType"), value.get("size"), value.get("digest")
    if not isinstance(media_type, str) or not media_type:
        raise LayoutError(f"{where} has no mediaType")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise LayoutError(f"{where} has no valid size")
    if not isinstance(digest, str):
        raise LayoutError(f"{where} has no digest")
    try:
        parsed = parse_digest(digest)
    except RegistryError as e:
        raise LayoutError(f"{where}: {e.message}") from None
    annotations = value.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise LayoutError(f"{where}: annotations must map strings to strings")
    return media_type, parsed, size, annotations


def read_index(reader: LayoutReader) -> list[Any]:
    """The ``manifests`` of index.json (each still to be checked by the caller)."""
    document = reader.read_json(INDEX_FILE)
    if not isinstance(document, dict) or document.get("schemaVersion") != 2:
        raise LayoutError(f"{reader.path}: {INDEX_FILE} is not an image index (schemaVersion 2)")
    manifests = document.get("manifests")
    if not isinstance(manifests, list):
        raise LayoutError(f"{reader.path}: {INDEX_FILE} has no manifests list")
    if not manifests:
        raise LayoutError(f"{reader.path}: {INDEX_FILE} lists no images")
    return manifests


# --- writing ---------------------------------------------------------------------


def check_output(target: str) -> None:
    """Refuse a target that exists (an empty directory is allowed for a directory layout)."""
    if not os.path.isdir(os.path.dirname(target)):
        raise LayoutError(f"{os.path.dirname(target)} is not a directory")
    if is_tar(target):
        if os.path.lexists(target):
            raise LayoutError(f"{target} already exists")
    elif os.path.lexists(target) and (not os.path.isdir(target) or os.path.islink(target) or os.listdir(target)):
        raise LayoutError(f"{target} already exists and is not an empty directory")


def is_tar(target: str) -> bool:
    return target.endswith(".tar")


class BlobWriter:
    """One blob on its way into a layout: written chunk by chunk, hashed and counted on the way.

    Blocking (each ``write`` is a file write): run it in a thread. ``write``
    refuses a chunk that would take the blob past its size before writing
    any of it; ``finish`` raises ContentError unless the bytes were exactly
    the size and the digest of the descriptor.
    """

    def __init__(self, digest: Digest, size: int, sink: BinaryIO, done: Callable[[], None]) -> None:
        self.digest = digest
        self.size = size
        self.count = 0
        self._hasher = digest.hasher()
        self._sink = sink
        self._done = done

    def write(self, data: bytes) -> None:
        if self.count + len(data) > self.size:
            raise ContentError(f"is larger than the {self.size} bytes its descriptor says")
        self._hasher.update(data)
        self._sink.write(data)
        self.count += len(data)

    def finish(self) -> None:
        if self.count != self.size:
            raise ContentError(f"has {self.count} bytes where its descriptor says {self.size}")
        if self._hasher.hexdigest() != self.digest.hex:
            raise ContentError("does not match its digest")
        self._done()


class LayoutWriter:
    """Writes a layout beside ``target``; ``commit`` moves it into place, ``abort`` removes it.

    Blocking, one call at a time: blobs go in one after the other, either
    pulled from a file (``add_blob``) or pushed chunk by chunk into the
    BlobWriter of ``open_blob``.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.temporary = os.path.join(os.path.dirname(target),
                                      f".{os.path.basename(target)}.export-{uuid.uuid4().hex[:12]}")

    def open_blob(self, digest: Digest, size: int) -> BlobWriter:
        """Start the blob ``digest`` of ``size`` bytes; it is complete once its ``finish`` passed."""
        raise NotImplementedError

    def add_blob(self, digest: Digest, size: int, source: BinaryIO, on_read: OnRead | None = None) -> None:
        """Copy ``source`` to its end as the blob ``digest``, in CHUNK pieces (ContentError: it is not)."""
        blob = self.open_blob(digest, size)
        while True:
            chunk = source.read(CHUNK)
            if not chunk:
                break
            blob.write(chunk)
            if on_read is not None:
                on_read(len(chunk))
        blob.finish()

    def add_bytes(self, digest: Digest, data: bytes) -> None:
        self.add_blob(digest, len(data), io.BytesIO(data))

    def commit(self, manifests: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class DirectoryWriter(LayoutWriter):
    def __init__(self, target: str) -> None:
        super().__init__(target)
        self._open: BinaryIO | None = None
        os.mkdir(self.temporary)
        self._write(LAYOUT_FILE, layout_document())

    def _write(self, name: str, data: bytes) -> None:
        with open(os.path.join(self.temporary, name), "wb") as f:
            f.write(data)
            os.fsync(f.fileno())

    def open_blob(self, digest: Digest, size: int) -> BlobWriter:
        directory = os.path.join(self.temporary, "blobs", digest.algorithm)
        os.makedirs(directory, exist_ok=True)
        f = self._open = open(os.path.join(directory, digest.hex), "wb")

        def done() -> None:
            os.fsync(f.fileno())
            f.close()
            self._open = None
        return BlobWriter(digest, size, f, done)

    def commit(self, manifests: list[dict[str, Any]]) -> None:
        self._write(INDEX_FILE, index_document(manifests))
        for directory, _, _ in os.walk(self.temporary):
            fsync_dir(directory)
        # rename(2) replaces an empty directory, and fails on one that is not.
        os.rename(self.temporary, self.target)
        fsync_dir(os.path.dirname(self.target))

    def abort(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None
        shutil.rmtree(self.temporary, ignore_errors=True)


#: tar's units: members are padded to whole blocks, the archive to a whole record.
_BLOCK = 512
_RECORD = 20 * _BLOCK


class TarWriter(LayoutWriter):
    """A plain tar (pax format), members in order: oci-layout first, blobs, index.json last.

    Members are written here rather than with TarFile.addfile, which pulls a
    member's bytes from a file object: a blob read from the store arrives
    pushed, chunk by chunk. TarInfo still makes every header, so the archive
    is the one tarfile would write.
    """

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self._file = open(self.temporary, "xb")
        self._dirs: set[str] = set()
        self._now = int(time.time())
        self._add(LAYOUT_FILE, layout_document())

    def _info(self, name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime = self._now
        info.mode = 0o755 if directory else 0o644
        if directory:
            info.type = tarfile.DIRTYPE
        return info

    def _header(self, info: tarfile.TarInfo) -> None:
        self._file.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def _pad(self, size: int) -> None:
        if size % _BLOCK:
            self._file.write(bytes(_BLOCK - size % _BLOCK))

    def _add(self, name: str, data: bytes) -> None:
        self._header(self._info(name, len(data)))
        self._file.write(data)
        self._pad(len(data))

    def _directories(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            directory = "/".join(parts[:i])
            if directory not in self._dirs:
                self._dirs.add(directory)
                self._header(self._info(directory, directory=True))

    def open_blob(self, digest: Digest, size: int) -> BlobWriter:
        name = blob_name(digest)
        self._directories(name)
        self._header(self._info(name, size))
        # Never more than ``size`` bytes follow the header (BlobWriter refuses them), and
        # a blob cut short aborts the whole archive: the padding is all that is left to do.
        return BlobWriter(digest, size, cast(BinaryIO, self._file), lambda: self._pad(size))

    def commit(self, manifests: list[dict[str, Any]]) -> None:
        self._add(INDEX_FILE, index_document(manifests))
        # The end of an archive, as TarFile.close writes it: two zero blocks, zeros to a whole record.
        self._file.write(bytes(2 * _BLOCK))
        if self._file.tell() % _RECORD:
            self._file.write(bytes(_RECORD - self._file.tell() % _RECORD))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.rename(self.temporary, self.target)
        fsync_dir(os.path.dirname(self.target))

    def abort(self) -> None:
        self._file.close()
        try:
            os.unlink(self.temporary)
        except FileNotFoundError:
            pass


def open_writer(target: str) -> LayoutWriter:
    """A writer for ``target``: a tar file when it ends in ``.tar``, else a directory."""
    return TarWriter(target) if is_tar(target) else DirectoryWriter(target)


def descriptors_in(document: Any, where: str) -> Iterator[tuple[str, dict[str, Any], Descriptor]]:
    """(key, raw, parsed) for the config, layers and child manifests of a manifest document.

    Not the subject: a referrer travels without the image it refers to.
    """
    if not isinstance(document, dict):
        return
    if document.get("config") is not None:
        yield "config", document["config"], parse_descriptor(document["config"], f"{where} config")
    for key in ("layers", "manifests"):
        for i, value in enumerate(document.get(key) or []):
            yield key, value, parse_descriptor(value, f"{where} {key}[{i}]")
