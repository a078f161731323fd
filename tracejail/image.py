"""Write a single-layer FROM-scratch image, with no daemon.

The archive is an uncompressed tar holding an OCI image layout (`oci-layout`, `index.json`,
`blobs/sha256/...`) *and* a docker `manifest.json` that points into the same blobs, so one file
is accepted by `docker load` (20.10 needs manifest.json; 25+ with the containerd store reads
either), `podman load`, `skopeo` (`oci-archive:` and `docker-archive:`) and containerd.

The layer is streamed straight from a Plan (no staging copy) or from a staged rootfs directory;
the diff_id (sha256 of the tar) and the blob digest are computed while writing. Everything is
deterministic: sorted entries, integer mtimes, numeric owners, empty user/group names, canonical
JSON, a fixed gzip header, and a block-parallel gzip whose bytes depend only on the input, the
level and zlib (not on the thread count or timing).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import BinaryIO, Callable, Iterator, Mapping, Union

from tracejail import rootfs
from tracejail.errors import TracejailError, UsageError
from tracejail.root import SourceChanged

LAYER_MEDIA_TYPE_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_MEDIA_TYPE_TAR = "application/vnd.oci.image.layer.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]

Source = Union["rootfs.Plan", str]  # a Plan, or the path of a staged rootfs directory

_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar pads the archive to whole records, as GNU tar and tarfile do
_READ_CHUNK = 1 << 20
# Parallel gzip block size: a fixed constant, because the compressed bytes depend on it.
_GZIP_BLOCK = 1 << 20
_GZIP_WINDOW = 32 * 1024


# --------------------------------------------------------------------------------------------
# Time and platform


def source_date_epoch(environ: dict[str, str] | None = None) -> int | None:
    """SOURCE_DATE_EPOCH as an int, None when unset; TracejailError when it is not a number."""
    raw = (os.environ if environ is None else environ).get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise TracejailError(f"SOURCE_DATE_EPOCH={raw!r} is not a non-negative integer; unset it or fix it")
    return int(raw)


def rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_created() -> str:
    return rfc3339(source_date_epoch() or 0)


def host_architecture() -> str:
    """The OCI architecture name of this machine: the binaries in the image come from it."""
    machine = platform.machine().lower()
    return {
        "x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
        "i386": "386", "i686": "386", "armv7l": "arm", "armv6l": "arm",
        "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64", "mips64": "mips64",
    }.get(machine, machine)


# --------------------------------------------------------------------------------------------
# Configuration and names


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: list[str]
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=lambda: list(DEFAULT_ENV))
    working_dir: str = "/"
    user: str = "65532:65532"
    exposed_ports: list[str] = field(default_factory=list)  # "8000/tcp"; "8000" means tcp
    labels: dict[str, str] = field(default_factory=dict)  # also written as OCI annotations
    volumes: list[str] = field(default_factory=list)  # directories declared as volumes
    created: str = field(default_factory=default_created)  # SOURCE_DATE_EPOCH or epoch 0
    stop_signal: str = ""  # StopSignal (kept from an image recorded with --image)
    architecture: str = field(default_factory=host_architecture)
    os: str = "linux"


@dataclass(frozen=True)
class Reference:
    domain: str
    path: str
    tag: str

    @property
    def full(self) -> str:
        """Fully qualified, as containerd and podman want it: docker.io/library/app:latest."""
        return f"{self.domain}/{self.path}:{self.tag}"

    @property
    def familiar(self) -> str:
        """What docker shows and writes in RepoTags: app:latest, user/app:1, ghcr.io/x/y:2."""
        if self.domain == "docker.io":
            path = self.path[len("library/"):] if self.path.startswith("library/") else self.path
            return f"{path}:{self.tag}"
        return self.full


_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_DOMAIN = re.compile(
    r"(?:localhost|(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
    r"(?:\.(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]))*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?\Z"
)


def parse_reference(name: str) -> Reference:
    """Normalise an image name the way docker does (app -> docker.io/library/app:latest)."""
    bad = f"invalid image name {name!r}; use [registry/]name[:tag] in lower case, e.g. myapp:1.0"
    if not name or "@" in name or name != name.strip():
        raise UsageError(bad)
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        repo, tag = name[:colon], name[colon + 1:]
    else:
        repo, tag = name, "latest"
    parts = repo.split("/")
    first = parts[0]
    if len(parts) > 1 and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        domain, path_parts = first, parts[1:]
        if not _DOMAIN.match(domain):
            raise UsageError(bad)
    else:
        domain, path_parts = "docker.io", parts
        if len(path_parts) == 1:
            path_parts = ["library", *path_parts]
    if not _TAG.match(tag) or not all(_PATH_COMPONENT.match(p) for p in path_parts):
        raise UsageError(bad)
    return Reference(domain, "/".join(path_parts), tag)


_PORT = re.compile(r"[0-9]{1,5}(?:-[0-9]{1,5})?(?:/(?:tcp|udp|sctp))?\Z")


def normalise_port(port: str) -> str:
    if not _PORT.match(port):
        raise TracejailError(f"invalid exposed port {port!r}; use PORT[/tcp|udp|sctp], e.g. 8000/tcp")
    return port if "/" in port else port + "/tcp"


def canonical_json(obj: object) -> bytes:
    """One byte sequence per value: the digests (and so the image ID) depend on it."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def runtime_config(config: ImageConfig) -> dict[str, object]:
    """The "config" section of the image configuration: how the image runs (what `docker inspect
    -f '{{json .Config}}'` shows; verify reads it back, from an engine or beside a --rootfs tree)."""
    run: dict[str, object] = {"WorkingDir": config.working_dir or "/"}
    if config.entrypoint:
        run["Entrypoint"] = list(config.entrypoint)
    if config.cmd:
        run["Cmd"] = list(config.cmd)
    if config.env:
        run["Env"] = list(config.env)
    if config.user:
        run["User"] = config.user
    if config.exposed_ports:
        run["ExposedPorts"] = {normalise_port(p): {} for p in config.exposed_ports}
    if config.labels:
        run["Labels"] = dict(config.labels)
    if config.volumes:
        run["Volumes"] = {v: {} for v in config.volumes}
    if config.stop_signal:
        run["StopSignal"] = config.stop_signal
    return run


def image_config_json(config: ImageConfig, diff_ids: list[str], layer_names: list[str] | None = None) -> bytes:
    """The image configuration blob; its sha256 is the image ID docker reports."""
    run = runtime_config(config)
    names = layer_names or ["rootfs"] * len(diff_ids)
    # One history entry per layer (docker history shows them): what the layer holds.
    history = [{"created": config.created, "created_by": "tracejail build" + ("" if len(diff_ids) == 1 else f": {n}")}
               for n in names]
    return canonical_json({
        "architecture": config.architecture,
        "os": config.os,
        "created": config.created,
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": history,
    })


# --------------------------------------------------------------------------------------------
# The image as values: blobs made once, written to every output (archive, layout, registry)


@dataclass(frozen=True)
class Blob:
    """Content-addressed bytes: held in memory (`data`) or in a file from `offset` (a layer made
    by make_layer, or a member of an archive being pushed)."""

    media_type: str
    digest: str  # "sha256:..." of the bytes
    size: int
    data: bytes | None = None
    path: str | None = None
    offset: int = 0

    @classmethod
    def of(cls, media_type: str, data: bytes) -> Blob:
        return cls(media_type, _digest(data), len(data), data=data)

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    def chunks(self, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        """`length` bytes (default: the rest) from `start`, in pieces, without reading the others;
        a file that no longer holds them is an error."""
        end = self.size if length is None else start + length
        if self.data is not None:
            for at in range(start, end, _READ_CHUNK):
                yield self.data[at:min(at + _READ_CHUNK, end)]
            return
        assert self.path is not None
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + start)
            left = end - start
            while left:
                chunk = f.read(min(left, _READ_CHUNK))
                if not chunk:
                    raise TracejailError(f"{self.path} is shorter than the blob {self.digest[:19]} it should hold")
                left -= len(chunk)
                yield chunk


@dataclass(frozen=True)
class LayerInfo:
    digest: str  # sha256 of the blob as stored (compressed)
    diff_id: str  # sha256 of the uncompressed tar
    size: int  # blob size
    uncompressed_size: int | None  # None: not known (a layer read back from an archive, not built)
    media_type: str


@dataclass(frozen=True)
class Layer:
    """One layer blob and what it holds: `name` says where its files come from (layers.py)."""

    blob: Blob
    diff_id: str
    uncompressed_size: int | None   # the tar's bytes; None for a layer read back, not built
    name: str = "rootfs"
    files: int = 0
    content_bytes: int = 0
    cached: bool = False  # taken from the layer cache, not compressed again

    @property
    def info(self) -> LayerInfo:
        return LayerInfo(self.blob.digest, self.diff_id, self.blob.size, self.uncompressed_size,
                         self.blob.media_type)


@dataclass(frozen=True)
class Image:
    """A whole image, independent of where it goes: layers, config and manifest blobs."""

    layers: tuple[Layer, ...]
    config: Blob
    manifest: Blob
    architecture: str
    os: str

    @property
    def image_id(self) -> str:
        return self.config.digest

    def blobs(self) -> list[Blob]:
        """Layers then config, each digest once (two layers may hold the same bytes)."""
        return list({b.digest: b for b in [*(layer.blob for layer in self.layers), self.config]}.values())


@dataclass
class ImageResult:
    archive: str  # the archive file, or the OCI layout directory
    image_id: str  # "sha256:..." = config digest
    manifest_digest: str
    layer_digest: str  # the last (or only) layer
    diff_id: str
    compressed_size: int  # all layers
    uncompressed_size: int | None   # None when a layer's is not known (read back, not built)
    reference: str | None = None  # full name written into the annotations, if any
    layers: list[LayerInfo] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# The layer tar


def _tar_header(info: tarfile.TarInfo) -> bytes:
    # GNU format: long names go into ././@LongLink records, which carry no timestamps; PAX
    # headers would add fractional mtimes and vary between Python versions.
    info.uname = info.gname = ""
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def _pad(n: int) -> bytes:
    return b"\0" * (-n % _BLOCK)


def _entry_info(e: rootfs.Entry, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(e.path[1:])  # no leading "/" or "./"
    info.mode = e.mode & 0o7777
    info.uid, info.gid = e.uid, e.gid
    info.mtime = mtime
    if e.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif e.kind == "symlink":
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, e.link_target or "", 0o777
    elif e.kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, (e.link_target or "")[1:]
    else:
        info.type = tarfile.REGTYPE
    return info


def iter_layer_tar(
    entries: list[rootfs.Entry],
    *,
    mtime_of: Callable[[rootfs.Entry], int],
    progress: Callable[[int], None] | None = None,
    on_changed: rootfs.OnChanged | None = None,
) -> Iterator[bytes]:
    """Yield the layer tar for parents-first `entries` (see rootfs.ordered_entries).

    A file that is no longer the node planned raises SourceChanged, or, given `on_changed`, is
    reported to it and left out with its hard links (see rootfs.open_entry)."""
    left_out: set[str] = set()
    for e in entries:
        if e.path == "/":
            continue  # the root is the container's, not the layer's
        if e.kind == "hardlink" and e.link_target in left_out:
            continue
        info = _entry_info(e, mtime_of(e))
        if e.kind != "file":
            yield _tar_header(info)
            continue
        try:
            fd = rootfs.open_entry(e)
        except SourceChanged as err:
            if on_changed is None:
                raise
            on_changed(e, err)
            left_out.add(e.path)
            continue
        try:
            # The size in the header must be known first: take it from the open file, then
            # insist on getting exactly that many bytes.
            info.size = os.fstat(fd).st_size
            yield _tar_header(info)
            left = info.size
            while left:
                chunk = os.read(fd, min(left, _READ_CHUNK))
                if not chunk:
                    raise TracejailError(f"{e.source} shrank while the image was written; run the build again")
                left -= len(chunk)
                yield chunk
                if progress:
                    progress(len(chunk))
        finally:
            os.close(fd)
        yield _pad(info.size)
    yield b"\0" * (2 * _BLOCK)


def _deflate_block(data: bytes, zdict: bytes, level: int, last: bool) -> bytes:
    """Raw deflate of one block, primed with the previous 32 KiB (as pigz does).

    Non-final blocks end with a sync flush (byte-aligned, not BFINAL) so the blocks concatenate
    into one valid deflate stream.
    """
    kwargs = {"zdict": zdict} if zdict else {}
    comp = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL, 0, **kwargs)
    return comp.compress(data) + comp.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


class _GzipWriter:
    """A gzip member compressed in fixed-size blocks on a thread pool (zlib drops the GIL).

    Bytes depend only on the data, the level and zlib; output is emitted in order with a
    bounded number of blocks in flight. The header matches gzip.GzipFile(filename='', mtime=0):
    no name, mtime 0, XFL from the level, OS byte 255.
    """

    def __init__(self, write: Callable[[bytes], None], level: int, workers: int) -> None:
        self.write_out = write
        self.level = level
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tj-gzip") if workers > 1 else None
        self.max_pending = 2 * workers
        self.pending: deque[Future[bytes]] = deque()
        # What is written is held as the caller's chunks and cut into blocks by slicing views:
        # each byte is copied once on the way to a worker (a bytearray buffer copied it three
        # times, a measurable share of a compressed build's time on the main thread).
        self.held: deque[bytes | memoryview] = deque()
        self.held_size = 0
        self.tail = b""
        self.crc = 0
        self.isize = 0
        xfl = b"\x02" if level == 9 else b"\x04" if level == 1 else b"\x00"
        write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + xfl + b"\xff")

    def write(self, data: bytes) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self.isize += len(data)
        self.held.append(data)
        self.held_size += len(data)
        while self.held_size >= _GZIP_BLOCK:
            self._submit(self._take(_GZIP_BLOCK), last=False)

    def _take(self, size: int) -> bytes:
        """The next `size` bytes held (all of them when fewer are held), as one bytes object."""
        parts: list[bytes | memoryview] = []
        need = min(size, self.held_size)
        self.held_size -= need
        while need:
            part = self.held[0]
            if len(part) <= need:
                parts.append(self.held.popleft())
                need -= len(part)
            else:
                view = memoryview(part)
                parts.append(view[:need])
                self.held[0] = view[need:]
                need = 0
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]
        return b"".join(parts)

    def _submit(self, block: bytes, last: bool) -> None:
        zdict, self.tail = self.tail, block[-_GZIP_WINDOW:]
        if self.pool is None:
            self.write_out(_deflate_block(block, zdict, self.level, last))
            return
        self.pending.append(self.pool.submit(_deflate_block, block, zdict, self.level, last))
        while len(self.pending) > self.max_pending:
            self.write_out(self.pending.popleft().result())

    def close(self) -> None:
        self._submit(self._take(self.held_size), last=True)
        while self.pending:
            self.write_out(self.pending.popleft().result())
        self.write_out(self.crc.to_bytes(4, "little") + (self.isize & 0xFFFFFFFF).to_bytes(4, "little"))
        self.shutdown()

    def shutdown(self) -> None:
        if self.pool is not None:
            for fut in self.pending:
                fut.cancel()
            self.pool.shutdown(wait=True)
            self.pool = None


def _entries_of(source: Source) -> list[rootfs.Entry]:
    plan = rootfs.plan_from_rootfs(source) if isinstance(source, str) else source
    return rootfs.ordered_entries(plan)


def pyc_sources(entries: list[rootfs.Entry]) -> set[str]:
    """`.py` files whose compiled `__pycache__/NAME.*.pyc` is in the image too.

    CPython trusts a timestamp-based .pyc only while the .py's mtime (and size) match the values
    recorded inside the .pyc; with the .py at mtime 0 every import recompiles in memory (measured:
    an import-heavy script went from 0.08 s to 0.27 s). The .pyc bytes already carry the host
    mtime, so keeping it on the .py adds no new variation to the image.
    """
    from tracejail.pyimports import cached_pyc

    out = set()
    for e in entries:
        cached = cached_pyc(e.path) if e.kind in ("file", "hardlink") else None
        if cached is not None:
            out.add(cached.source)
    return out


def mtime_policy(
    entries: list[rootfs.Entry], mtime_clamp: int | None, preserve_mtimes: bool
) -> tuple[int, Callable[[rootfs.Entry], int]]:
    """Return (the archive's own timestamp, per-entry mtime function).

    Default: clamp every mtime to SOURCE_DATE_EPOCH, or to 0 when it is unset (so all are 0),
    except sources of kept .pyc files (see pyc_sources). Clamping, not setting, is the
    reproducible-builds convention: files older than the epoch keep their time.
    """
    clamp = mtime_clamp if mtime_clamp is not None else (source_date_epoch() or 0)
    if preserve_mtimes:
        return clamp, lambda e: max(0, e.mtime)
    keep = pyc_sources(entries)
    return clamp, lambda e: max(0, e.mtime if e.path in keep else min(e.mtime, clamp))


def write_layer(
    source: Source | list[rootfs.Entry],
    write: Callable[[bytes], object],
    *,
    compress_level: int | None = 6,
    mtime_clamp: int | None = None,
    preserve_mtimes: bool = False,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
    on_changed: rootfs.OnChanged | None = None,
    mtime_of: Callable[[rootfs.Entry], int] | None = None,
) -> LayerInfo:
    """Stream the layer blob for `source` (a Plan, a staged rootfs dir, or parents-first entries)
    into `write`.

    compress_level None writes a plain tar. `progress` gets the number of file-content bytes
    just written (they add up to the plan's files_size()). `workers` is the gzip thread count
    (default: CPUs); it never changes the output. `mtime_of` (from mtime_policy over the whole
    image) overrides mtime_clamp and preserve_mtimes.
    """
    if compress_level is not None and not 0 <= compress_level <= 9:
        raise TracejailError(f"compression level {compress_level} is out of range; use 0-9")
    entries = source if isinstance(source, list) else _entries_of(source)
    if mtime_of is None:
        _, mtime_of = mtime_policy(entries, mtime_clamp, preserve_mtimes)
    diff_hash, blob_hash = hashlib.sha256(), hashlib.sha256()
    sizes = {"tar": 0, "blob": 0}

    def emit(data: bytes) -> None:
        blob_hash.update(data)
        sizes["blob"] += len(data)
        write(data)

    gz = None
    if compress_level is not None:
        gz = _GzipWriter(emit, compress_level, workers or os.cpu_count() or 1)
    sink = gz.write if gz else emit
    try:
        for chunk in iter_layer_tar(entries, mtime_of=mtime_of, progress=progress, on_changed=on_changed):
            if not chunk:
                continue
            diff_hash.update(chunk)
            sizes["tar"] += len(chunk)
            sink(chunk)
        # Pad the tar to whole records like tar(1); some old readers insist.
        tail = b"\0" * (-sizes["tar"] % _RECORD)
        if tail:
            diff_hash.update(tail)
            sizes["tar"] += len(tail)
            sink(tail)
        if gz:
            gz.close()
    finally:
        if gz:
            gz.shutdown()
    diff_id = "sha256:" + diff_hash.hexdigest()
    return LayerInfo(
        digest="sha256:" + blob_hash.hexdigest() if gz else diff_id,
        diff_id=diff_id,
        size=sizes["blob"],
        uncompressed_size=sizes["tar"],
        media_type=LAYER_MEDIA_TYPE_GZIP if gz else LAYER_MEDIA_TYPE_TAR,
    )


# --------------------------------------------------------------------------------------------
# Layers and manifests


def make_layer(
    entries: list[rootfs.Entry],
    blob_dir: str,
    *,
    mtime_of: Callable[[rootfs.Entry], int],
    name: str = "rootfs",
    compress_level: int | None = 6,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
    on_changed: rootfs.OnChanged | None = None,
) -> Layer:
    """Write the layer blob for parents-first `entries` into `blob_dir` (named by its digest)."""
    tmp = os.path.join(blob_dir, f".layer.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb", buffering=_READ_CHUNK) as f:
            info = write_layer(entries, f.write, compress_level=compress_level, progress=progress,
                               workers=workers, on_changed=on_changed, mtime_of=mtime_of)
        final = os.path.join(blob_dir, info.digest.split(":", 1)[1])
        os.replace(tmp, final)
    except OSError as err:
        _unlink_quietly(tmp)
        raise _os_error(f"cannot write a layer in {blob_dir}", err) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    files = [e for e in entries if e.kind == "file"]
    return Layer(Blob(info.media_type, info.digest, info.size, path=final), info.diff_id, info.uncompressed_size,
                 name=name, files=len(files) + sum(1 for e in entries if e.kind == "hardlink"),
                 content_bytes=sum(e.size for e in files))


def assemble(layers: list[Layer] | tuple[Layer, ...], config: ImageConfig,
             annotations: Mapping[str, str] | None = None) -> Image:
    """The config and manifest for `layers` (bottom first). The manifest's annotations are the
    labels plus `annotations` (--annotation)."""
    config_blob = Blob.of(CONFIG_MEDIA_TYPE, image_config_json(
        config, [layer.diff_id for layer in layers], [layer.name for layer in layers]))
    manifest: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config_blob.descriptor(),
        "layers": [layer.blob.descriptor() for layer in layers],
    }
    notes = {**config.labels, **(annotations or {})}
    if notes:
        manifest["annotations"] = notes
    return Image(tuple(layers), config_blob, Blob.of(MANIFEST_MEDIA_TYPE, canonical_json(manifest)),
                 config.architecture, config.os)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob_path(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


def _layout_files(img: Image, refs: list[Reference]) -> list[tuple[str, bytes]]:
    """index.json (one descriptor per name, as podman and containerd read it), the docker
    manifest.json (docker load 20.10 needs it), and oci-layout."""
    descs = []
    for ref in refs or [None]:
        desc = img.manifest.descriptor()
        desc["platform"] = {"architecture": img.architecture, "os": img.os}
        if ref is not None:
            # podman and containerd name the image from io.containerd.image.name (full reference);
            # skopeo's oci-archive:FILE:TAG and umoci look at ref.name (the tag).
            desc["annotations"] = {"io.containerd.image.name": ref.full, "org.opencontainers.image.ref.name": ref.tag}
        descs.append(desc)
    index = canonical_json({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": descs})
    docker = canonical_json([{
        "Config": _blob_path(img.config.digest),
        "RepoTags": [ref.familiar for ref in refs],
        "Layers": [_blob_path(layer.blob.digest) for layer in img.layers],
    }])
    return [(_blob_path(img.config.digest), img.config.data or b""),
            (_blob_path(img.manifest.digest), img.manifest.data or b""),
            ("index.json", index), ("manifest.json", docker),
            ("oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))]


def image_result(where: str, img: Image, refs: list[Reference]) -> ImageResult:
    last = img.layers[-1]
    sizes = [layer.uncompressed_size for layer in img.layers]
    return ImageResult(
        archive=where,
        image_id=img.image_id,
        manifest_digest=img.manifest.digest,
        layer_digest=last.blob.digest,
        diff_id=last.diff_id,
        compressed_size=sum(layer.blob.size for layer in img.layers),
        uncompressed_size=None if None in sizes else sum(sizes),   # type: ignore[arg-type]
        reference=refs[0].full if refs else None,
        layers=[layer.info for layer in img.layers],
    )


# --------------------------------------------------------------------------------------------
# Atomic output


def _os_error(what: str, err: OSError) -> TracejailError:
    return TracejailError(rootfs.os_error_message(what, err))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(out: str) -> Iterator[BinaryIO]:
    """A temp file beside `out`, renamed over it only after everything was written and fsync'ed.

    On any failure the temp file is removed and `out` is left as it was.
    """
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    if os.path.isdir(out):
        raise TracejailError(f"{out} is a directory; give a file name for the archive")
    if not os.path.isdir(parent):
        raise TracejailError(f"cannot write {out}: directory {parent} does not exist; create it first")
    tmp = os.path.join(parent, f".{os.path.basename(out)}.{secrets.token_hex(4)}.tmp")
    # One try around the open too: SIGTERM right after the file exists (before a second try
    # began) would otherwise leave it behind. Only a failed open has nothing of ours to remove.
    open_failed = False
    try:
        try:
            # O_EXCL: never reuse someone else's file; 0o666 lets the umask decide, as for any output.
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except OSError as err:
            open_failed = True
            raise _os_error(f"cannot write {out}", err) from None
        with os.fdopen(fd, "w+b", buffering=_READ_CHUNK) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, out)
        _fsync_dir(parent)
    except OSError as err:
        _unlink_quietly(tmp)
        raise _os_error(f"cannot write {out}", err) from None
    except BaseException:
        if not open_failed:
            _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _outer_header(name: str, size: int, mtime: int, is_dir: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if is_dir else size
    info.mtime = mtime
    info.mode = 0o755 if is_dir else 0o644
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    return _tar_header(info)


def write_image_archive(img: Image, out: str, refs: list[Reference] | None = None,
                        mtime: int | None = None) -> str:
    """Write `img` as one archive file `out`, atomically; return its absolute path."""
    refs = refs or []
    archive_mtime = mtime if mtime is not None else (source_date_epoch() or 0)
    with atomic_file(out) as f:
        f.write(_outer_header("blobs/", 0, archive_mtime, is_dir=True))
        f.write(_outer_header("blobs/sha256/", 0, archive_mtime, is_dir=True))
        for blob in img.blobs():
            if blob.data is not None:
                continue   # the config goes with the other small members below
            f.write(_outer_header(_blob_path(blob.digest), blob.size, archive_mtime))
            _copy_blob(blob, f)
            f.write(_pad(blob.size))
        for member, data in _layout_files(img, refs):
            f.write(_outer_header(member, len(data), archive_mtime) + data + _pad(len(data)))
        f.write(b"\0" * (2 * _BLOCK))
        f.write(b"\0" * (-f.tell() % _RECORD))
    return os.path.abspath(out)


def _copy_blob(blob: Blob, f: BinaryIO) -> None:
    """Append a blob to `f`: in the kernel (copy_file_range) when it can, else by reading."""
    if blob.path is None:
        f.write(blob.data or b"")
        return
    f.flush()
    start = f.seek(0, os.SEEK_END)
    try:
        with open(blob.path, "rb", buffering=0) as src:
            left, at = blob.size, blob.offset
            while left:
                n = os.copy_file_range(src.fileno(), f.fileno(), left, at)
                if n == 0:
                    raise TracejailError(f"{blob.path} is shorter than the blob {blob.digest[:19]} it should hold")
                left -= n
                at += n
        f.seek(0, os.SEEK_END)
        return
    except OSError:
        pass   # another filesystem on an old kernel, or no copy_file_range: copy by reading
    f.seek(start)
    f.truncate()
    for chunk in blob.chunks():
        f.write(chunk)


def write_image_dir(img: Image, out_dir: str, refs: list[Reference] | None = None) -> str:
    """Write `img` as an OCI image layout directory (plus manifest.json), atomically: `out_dir`
    must not exist or be empty; the layout is made beside it and renamed into place."""
    refs = refs or []
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    if os.path.lexists(out_dir) and (not os.path.isdir(out_dir) or os.path.islink(out_dir) or os.listdir(out_dir)):
        raise TracejailError(f"{out_dir} exists and is not an empty directory; remove it or choose another")
    if not os.path.isdir(parent):
        raise TracejailError(f"cannot write {out_dir}: directory {parent} does not exist; create it first")
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.{secrets.token_hex(4)}.tmp")
    try:
        os.mkdir(tmp, 0o777)
        blobs = os.path.join(tmp, "blobs", "sha256")
        os.makedirs(blobs)
        members = [(_blob_path(b.digest), b) for b in img.blobs() if b.data is None]
        for member, blob in members:
            with open(os.path.join(tmp, member), "xb") as f:
                _copy_blob(blob, f)
                f.flush()
                os.fsync(f.fileno())
        for member, data in _layout_files(img, refs):
            with open(os.path.join(tmp, member), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for d in (blobs, os.path.join(tmp, "blobs"), tmp):
            _fsync_dir(d)
        os.rename(tmp, out_dir)  # replaces an empty directory atomically
        _fsync_dir(parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(f"cannot write {out_dir}", err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_single_layer(source: Source, out: str, config: ImageConfig, name: str | None,
                        write: Callable[[Image, list[Reference]], str], *, compress_level: int | None,
                        mtime_clamp: int | None, preserve_mtimes: bool, progress: Callable[[int], None] | None,
                        workers: int | None, on_changed: rootfs.OnChanged | None) -> ImageResult:
    refs = [parse_reference(name)] if name else []
    entries = _entries_of(source)
    _, mtime_of = mtime_policy(entries, mtime_clamp, preserve_mtimes)
    with blob_workdir(os.path.dirname(os.path.abspath(out))) as blob_dir:
        layer = make_layer(entries, blob_dir, mtime_of=mtime_of, compress_level=compress_level, progress=progress,
                           workers=workers, on_changed=on_changed)
        img = assemble([layer], config)
        where = write(img, refs)
    return image_result(where, img, refs)


def write_archive(source: Source, out: str, config: ImageConfig, *, name: str | None = None,
                  compress_level: int | None = 6, progress: Callable[[int], None] | None = None,
                  mtime_clamp: int | None = None, preserve_mtimes: bool = False, workers: int | None = None,
                  on_changed: rootfs.OnChanged | None = None) -> ImageResult:
    """Write a single-layer image archive `out` atomically from a Plan or a staged rootfs dir."""
    archive_mtime, _ = mtime_policy([], mtime_clamp, preserve_mtimes)
    return _write_single_layer(source, out, config, name, lambda img, refs: write_image_archive(
        img, out, refs, archive_mtime), compress_level=compress_level, mtime_clamp=mtime_clamp,
        preserve_mtimes=preserve_mtimes, progress=progress, workers=workers, on_changed=on_changed)


def write_oci_dir(source: Source, out_dir: str, config: ImageConfig, *, name: str | None = None,
                  compress_level: int | None = 6, progress: Callable[[int], None] | None = None,
                  mtime_clamp: int | None = None, preserve_mtimes: bool = False, workers: int | None = None,
                  on_changed: rootfs.OnChanged | None = None) -> ImageResult:
    """Write a single-layer OCI image layout directory (plus manifest.json) atomically."""
    return _write_single_layer(source, out_dir, config, name, lambda img, refs: write_image_dir(img, out_dir, refs),
                               compress_level=compress_level, mtime_clamp=mtime_clamp,
                               preserve_mtimes=preserve_mtimes, progress=progress, workers=workers,
                               on_changed=on_changed)


@contextmanager
def blob_workdir(near: str | None = None) -> Iterator[str]:
    """A private directory for layer blobs, removed afterwards (also on errors and SIGTERM).

    Made beside the output when it can be (same filesystem: copy_file_range can share extents),
    else in the temp directory."""
    parent = near if near and os.path.isdir(near) and os.access(near, os.W_OK | os.X_OK) else None
    # The name is chosen first and made inside the try: SIGTERM right after mkdir removes it too.
    d = os.path.join(parent or tempfile.gettempdir(), f".tracejail-blobs-{secrets.token_hex(6)}")
    made = False
    try:
        try:
            os.mkdir(d, 0o700)
        except OSError:
            d = os.path.join(tempfile.gettempdir(), f"tracejail-blobs-{secrets.token_hex(6)}")
            os.mkdir(d, 0o700)
        made = True
        yield d
    finally:
        if made or os.path.isdir(d):
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Dockerfile for --rootfs


def _quote(value: str, what: str) -> str:
    """A double-quoted Dockerfile word: escape \\, " and $ (ENV/LABEL/WORKDIR expand variables)."""
    if "\n" in value or "\r" in value:
        raise TracejailError(f"{what} {value!r} contains a line break, which a Dockerfile cannot hold")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


_USER = re.compile(r"[A-Za-z0-9_.-]+(?::[A-Za-z0-9_.-]+)?\Z")


# The first line of every Dockerfile tracejail writes: only a file that starts with it is replaced.
DOCKERFILE_MARKER = "# Written by tracejail."


def dockerfile_text(rootfs_name: str, config: ImageConfig) -> str:
    # JSON form of COPY: the directory name may hold spaces.
    lines = [f"{DOCKERFILE_MARKER} Build with: docker build -t NAME .", "FROM scratch",
             "COPY " + json.dumps([rootfs_name, "/"])]
    for item in config.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TracejailError(f"environment entry {item!r} is not KEY=VALUE")
        lines.append(f"ENV {key}={_quote(value, 'environment value')}")
    for key, value in sorted(config.labels.items()):
        lines.append(f"LABEL {_quote(key, 'label key')}={_quote(value, 'label value')}")
    for port in config.exposed_ports:
        lines.append(f"EXPOSE {normalise_port(port)}")
    if config.volumes:
        lines.append("VOLUME " + json.dumps(list(config.volumes)))
    if config.working_dir:
        lines.append(f"WORKDIR {_quote(config.working_dir, 'working directory')}")
    if config.user:
        if not _USER.match(config.user):
            raise TracejailError(f"image user {config.user!r} is not USER[:GROUP] (names or numbers)")
        lines.append(f"USER {config.user}")
    # JSON (exec) form: no shell in a FROM-scratch image to run the string form. JSON escapes
    # quotes and backslashes; Docker does not expand variables in exec form.
    if config.stop_signal:
        if not re.fullmatch(r"[A-Z0-9+]{1,16}", config.stop_signal):
            raise TracejailError(f"stop signal {config.stop_signal!r} is not a signal name or number")
        lines.append(f"STOPSIGNAL {config.stop_signal}")
    if config.entrypoint:
        lines.append("ENTRYPOINT " + json.dumps(list(config.entrypoint)))
    if config.cmd:
        lines.append("CMD " + json.dumps(list(config.cmd)))
    return "\n".join(lines) + "\n"


# Beside the Dockerfile: the same config as JSON (runtime_config), which verify reads back.
CONFIG_NAME = "image-config.json"
_CONFIG_MARKER = "written_by"   # {"written_by": "tracejail", "rootfs": NAME, "config": {...}}


def dockerfile_path(rootfs_dir: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(rootfs_dir)), "Dockerfile")


def config_path(rootfs_dir: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(rootfs_dir)), CONFIG_NAME)


def _head_of(path: str, n: int) -> bytes | None:
    """The first `n` bytes of the regular file `path` (never through a symlink); None when there
    is nothing there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise TracejailError(f"{path} exists and cannot be read ({err.strerror}); move it, or choose "
                             "another --rootfs directory") from None
    try:
        return os.read(fd, n) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    finally:
        os.close(fd)


def check_dockerfile_slot(rootfs_dir: str) -> None:
    """Refuse, before anything is staged, to overwrite a Dockerfile (or the config JSON beside
    it) that tracejail did not write."""
    path = dockerfile_path(rootfs_dir)
    head = _head_of(path, len(DOCKERFILE_MARKER))
    if head is not None and head != DOCKERFILE_MARKER.encode():
        raise TracejailError(f"{path} exists and was not written by tracejail; move it, or choose "
                             "another --rootfs directory (the Dockerfile goes beside it)")
    path = config_path(rootfs_dir)
    head = _head_of(path, 64)
    if head is not None and not head.startswith(b'{"' + _CONFIG_MARKER.encode() + b'":"tracejail"'):
        raise TracejailError(f"{path} exists and was not written by tracejail; move it, or choose "
                             "another --rootfs directory (the image config goes beside it)")


def write_dockerfile(rootfs_dir: str, config: ImageConfig) -> str:
    """Write `Dockerfile` beside `rootfs_dir` (FROM scratch, COPY <rootfs> /, ...) and the same
    config as JSON (`image-config.json`, for verify); return the Dockerfile's path.

    Note: `docker build` COPY keeps modes, setuid bits and symlinks but turns hard links into
    copies, and sets every mtime as in the tree.
    """
    rootfs_dir = os.path.abspath(rootfs_dir)
    if not os.path.isdir(rootfs_dir):
        raise TracejailError(f"rootfs {rootfs_dir} is not a directory; stage it first")
    check_dockerfile_slot(rootfs_dir)
    path = dockerfile_path(rootfs_dir)
    text = dockerfile_text(os.path.basename(rootfs_dir), config)
    with atomic_file(path) as f:
        f.write(text.encode())
    doc = {_CONFIG_MARKER: "tracejail", "rootfs": os.path.basename(rootfs_dir), "config": runtime_config(config)}
    with atomic_file(config_path(rootfs_dir)) as f:
        f.write(json.dumps(doc, separators=(",", ":"), sort_keys=False).encode() + b"\n")
    return path


def read_rootfs_config(rootfs_dir: str) -> dict[str, object] | None:
    """The runtime config that `write_dockerfile` wrote beside `rootfs_dir`, if it is the one for
    that very tree (it names it); None otherwise."""
    path = config_path(rootfs_dir)
    try:
        from tracejail.elf import read_file

        doc = json.loads(read_file(path, 1 << 22))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get(_CONFIG_MARKER) != "tracejail" \
            or doc.get("rootfs") != os.path.basename(os.path.abspath(rootfs_dir)) \
            or not isinstance(doc.get("config"), dict):
        return None
    return doc["config"]
