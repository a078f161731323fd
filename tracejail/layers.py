"""Split an image into layers by where its files come from, and make each layer once.

`build --layers N|auto` groups the planned entries by origin (the C library and loader, each
dpkg package, the interpreter's own installation, its standard library, each Python
distribution, files from elsewhere, the app's own tree, and what build writes) and orders the
groups from most shared to least, as nix's buildLayeredImage does by popularity: two images built
on one host then hold byte-identical layers for their common parts, which a registry stores once
and an engine unpacks once.

A layer's bytes depend only on its files: its entries (the group's nodes plus their parent
directories, with the plan's modes and owners), the mtime policy and the compression level. So a
layer whose files did not change is taken from the layer cache (keyed on every entry's metadata
and the identity of the node it is read from: device, inode, size, mtime) instead of being
compressed again.
"""
from __future__ import annotations

import enum
import errno
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from tracejail import cachedir, image, rootfs
from tracejail.root import parent_of, under

# Enough layers for the origins of a typical dynamic-language app; well under the engines' limits
# (overlayfs takes about 125 lower directories; each layer costs a request on pull).
AUTO_MAX_LAYERS = 32
MAX_LAYERS = 125
# Bump when anything that decides a layer's bytes changes: old cache entries then never match.
CACHE_FORMAT = 1
CACHE_MAX_BYTES = 4 << 30
CACHE_MAX_AGE = 30 * 24 * 3600


class Tier(enum.IntEnum):
    """Layer order, most shared first."""

    BASE = 0           # the C library and loader, the root's top-level symlinks, os-release
    PACKAGE = 1        # one dpkg package each
    INTERPRETER = 2    # an interpreter installation: its binaries, libraries, codecs
    STDLIB = 3         # the modules of its standard library the app uses
    DISTRIBUTION = 4   # one Python distribution each
    OTHER = 5          # files from anywhere else
    APP = 6            # the run's own tree
    CONFIG = 7         # what build writes: passwd, group, nsswitch.conf, /tmp, the image user's home


@dataclass
class LayerGroup:
    name: str                 # "deb libssl3", "python stdlib /usr/local", "app /srv/app"
    tier: Tier
    paths: list[str] = field(default_factory=list)   # image paths of its entries (not parent dirs)


@dataclass(frozen=True)
class Origins:
    """Where the plan's entries come from (build knows it once it has planned)."""

    deb: Mapping[str, str]             # image path -> dpkg package name
    pypi: Mapping[str, str]            # image path -> Python distribution name
    interpreter_prefixes: tuple[str, ...] = ()
    app_trees: tuple[str, ...] = ()
    generated: frozenset[str] = frozenset()   # entries build wrote (in its work directory)


def parse_layers(value: str) -> int | None:
    """`--layers` value: "auto" -> AUTO_MAX_LAYERS, N -> N (1 = one layer); None when invalid."""
    if value == "auto":
        return AUTO_MAX_LAYERS
    if value.isdigit() and 1 <= int(value) <= MAX_LAYERS:
        return int(value)
    return None


_STDLIB = re.compile(r"(/.*)?/lib/python[0-9]+\.[0-9]+(?=/|$)")
_SITE = re.compile(r".*/(?:site|dist)-packages")
_LIBC_PACKAGES = re.compile(r"libc6(?:-[a-z0-9]+)?$|musl$")


def _distribution_of_top(top: str) -> str:
    """The distribution a top-level name in site-packages most likely belongs to:
    numpy/, numpy.libs/, numpy-1.26.dist-info/, six.py, _cffi_backend.cpython-311-x86_64-linux-gnu.so."""
    name = top.split("-", 1)[0] if top.endswith((".dist-info", ".egg-info")) else top.split(".", 1)[0]
    return name.lower().replace("_", "-").strip("-") or top


def _group_of(path: str, e: rootfs.Entry, origins: Origins) -> tuple[Tier, str]:
    if path in origins.generated:
        if path.startswith("/var/lib/dpkg/status.d/"):
            # A package's stanza goes with its files: the same layer in every image that has them.
            package = path.rsplit("/", 1)[1].split(":", 1)[0]
            return (Tier.BASE, "base") if _LIBC_PACKAGES.match(package) else (Tier.PACKAGE, "deb " + package)
        if path == "/etc/os-release":
            return Tier.BASE, "base"
        return Tier.CONFIG, "image config"
    package = origins.deb.get(path)
    if package is not None:
        return (Tier.BASE, "base") if _LIBC_PACKAGES.match(package) else (Tier.PACKAGE, "deb " + package)
    if e.kind == "symlink" and parent_of(path) == "/":
        return Tier.BASE, "base"
    stdlib = _STDLIB.match(path)
    site = _SITE.match(path)
    if stdlib and not site and path[stdlib.end():].startswith("/encodings/"):
        # A codec family kept whole: the same files in every image of this interpreter.
        return Tier.INTERPRETER, "python codecs " + path[:stdlib.end()]
    dist = origins.pypi.get(path)
    if dist is not None:
        return Tier.DISTRIBUTION, "python " + dist.lower().replace("_", "-")
    if site and path != site.group(0):
        top = path[site.end() + 1:].split("/", 1)[0]
        return Tier.DISTRIBUTION, "python " + _distribution_of_top(top)
    for prefix in origins.interpreter_prefixes:
        if under(path, prefix):
            if stdlib and path != path[:stdlib.end()]:
                return Tier.STDLIB, "python stdlib " + path[:stdlib.end()]
            return Tier.INTERPRETER, "interpreter " + prefix
    for tree in origins.app_trees:
        if under(path, tree):
            return Tier.APP, "app " + tree
    if e.kind == "dir":
        return Tier.CONFIG, "image config"   # an empty directory build made (/tmp, a home)
    return Tier.OTHER, "other"


def group(plan: rootfs.Plan, origins: Origins) -> list[LayerGroup]:
    """Every entry of the plan in one group, groups ordered most shared first. Directories go
    into layers as parents of what they hold; a directory with nothing below it is an entry of
    its own group."""
    entries = plan.entries
    has_children = {parent_of(p) for p in entries if p != "/"}
    by_key: dict[tuple[Tier, str], LayerGroup] = {}
    hardlinks = []
    for path in sorted(entries, key=rootfs.sort_key):
        e = entries[path]
        if path == "/" or (e.kind == "dir" and path in has_children):
            continue
        if e.kind == "hardlink":
            hardlinks.append(path)   # goes with its target: a link cannot reach into another layer
            continue
        tier, name = _group_of(path, e, origins)
        by_key.setdefault((tier, name), LayerGroup(name, tier)).paths.append(path)
    where = {p: g for g in by_key.values() for p in g.paths}
    for path in hardlinks:
        target = where.get(entries[path].link_target or "")
        if target is None:
            target = by_key.setdefault((Tier.OTHER, "other"), LayerGroup("other", Tier.OTHER))
        target.paths.append(path)
    return sorted(by_key.values(), key=lambda g: (g.tier, g.name))


def limit(groups: list[LayerGroup], max_layers: int) -> list[LayerGroup]:
    """At most `max_layers` groups: the least shared (last) are merged into one."""
    if len(groups) <= max_layers:
        return groups
    keep, rest = groups[:max_layers - 1], groups[max_layers - 1:]
    merged = LayerGroup(f"{rest[0].name} and {len(rest) - 1} more", rest[0].tier,
                        [p for g in rest for p in g.paths])
    return [*keep, merged]


def layer_entries(ordered: list[rootfs.Entry], paths: Iterable[str]) -> list[rootfs.Entry]:
    """The entries of one layer, parents first: `paths` and every directory above them."""
    wanted: set[str] = set()
    for path in paths:
        wanted.add(path)
        while path != "/":
            path = parent_of(path)
            if path in wanted:
                break
            wanted.add(path)
    return [e for e in ordered if e.path in wanted]


# --------------------------------------------------------------------------------------------
# The layer cache


def cache_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """Where layers are cached (None: caching is off, TRACEJAIL_CACHE_DIR="")."""
    root = cachedir.cache_root(environ)
    return os.path.join(root, "layers") if root else None


def cache_key(entries: list[rootfs.Entry], mtime_of: Callable[[rootfs.Entry], int],
              compress_level: int | None, generated: frozenset[str]) -> str:
    """What decides a layer's bytes: every entry as the tar writes it, and which node each file's
    content comes from (its identity, or for files build wrote, their content)."""
    h = hashlib.sha256(f"tracejail-layer {CACHE_FORMAT} {compress_level}\n".encode())
    for e in entries:
        row: list[object] = [e.path, e.kind, e.mode, e.uid, e.gid, e.link_target, mtime_of(e)]
        if e.kind == "file":
            if e.path in generated or e.identity is None:
                row.append(hashlib.sha256(rootfs.read_entry(e)).hexdigest())
            else:
                i = e.identity
                row += [i.dev, i.ino, i.size, i.mtime_ns]
        h.update(json.dumps(row).encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


class LayerCache:
    """Layer blobs by cache key, under `root`: keys/<key>.json names the blob in blobs/."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.blobs = os.path.join(root, "blobs")
        self.keys = os.path.join(root, "keys")
        if not all(cachedir.safe_dir(d, create=True) for d in (os.path.dirname(root), root, self.blobs, self.keys)):
            raise OSError(errno.EACCES, "not a private directory of this user", root)

    def get(self, key: str, name: str) -> image.Layer | None:
        try:
            meta = json.loads(cachedir.read_private(os.path.join(self.keys, key + ".json"), 1 << 16) or b"null")
            blob_path = os.path.join(self.blobs, meta["digest"].split(":", 1)[1])
            if os.stat(blob_path).st_size != meta["size"]:
                return None
            os.utime(blob_path)   # recently used: pruned last
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return image.Layer(image.Blob(meta["media_type"], meta["digest"], meta["size"], path=blob_path),
                           meta["diff_id"], meta["uncompressed_size"], name=name, files=meta.get("files", 0),
                           content_bytes=meta.get("content_bytes", 0), cached=True)

    def put(self, key: str, layer: image.Layer) -> None:
        meta = {"digest": layer.blob.digest, "size": layer.blob.size, "media_type": layer.blob.media_type,
                "diff_id": layer.diff_id, "uncompressed_size": layer.uncompressed_size, "files": layer.files,
                "content_bytes": layer.content_bytes}
        cachedir.write_private(os.path.join(self.keys, key + ".json"), json.dumps(meta).encode())

    def prune(self, max_bytes: int = CACHE_MAX_BYTES, max_age: float = CACHE_MAX_AGE) -> None:
        """Drop blobs unused for `max_age`, then the least recently used beyond `max_bytes`; keys
        whose blob is gone simply miss."""
        now = time.time()
        blobs = []
        for name in os.listdir(self.blobs):
            path = os.path.join(self.blobs, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if name.startswith(".") and now - st.st_mtime < 3600:
                continue   # another build's blob being written
            blobs.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in blobs)
        for mtime, size, path in sorted(blobs):
            if now - mtime > max_age or total > max_bytes:
                try:
                    os.unlink(path)
                    total -= size
                except OSError:
                    pass


# --------------------------------------------------------------------------------------------
# Making the layers


@dataclass
class LayerSet:
    layers: list[image.Layer]
    groups: list[LayerGroup]
    compressed_seconds: float = 0.0   # time spent writing layers that were not in the cache


def make_layers(
    plan: rootfs.Plan,
    groups: list[LayerGroup],
    blob_dir: str,
    *,
    compress_level: int | None,
    cache: LayerCache | None = None,
    generated: frozenset[str] = frozenset(),
    progress: Callable[[int], None] | None = None,
    on_changed: rootfs.OnChanged | None = None,
    workers: int | None = None,
) -> LayerSet:
    """One layer per group, bottom first, written into `blob_dir` (or the cache's blob directory
    when there is a cache) or taken from the cache."""
    ordered = rootfs.ordered_entries(plan)
    _, mtime_of = image.mtime_policy(ordered, None, False)
    out = LayerSet([], groups)
    for g in groups:
        entries = layer_entries(ordered, g.paths)
        key = cache_key(entries, mtime_of, compress_level, generated) if cache is not None else None
        layer = cache.get(key, g.name) if cache is not None and key is not None else None
        if layer is not None:
            if progress:
                progress(sum(e.size for e in entries if e.kind == "file"))
            out.layers.append(layer)
            continue
        started = time.perf_counter()
        changed: list[str] = []

        def note_change(entry: rootfs.Entry, err: Exception) -> None:
            changed.append(entry.path)
            if on_changed is not None:
                on_changed(entry, err)   # type: ignore[arg-type]

        layer = image.make_layer(entries, cache.blobs if cache is not None else blob_dir, mtime_of=mtime_of,
                                 name=g.name, compress_level=compress_level, progress=progress,
                                 workers=workers, on_changed=note_change if on_changed is not None else None)
        out.compressed_seconds += time.perf_counter() - started
        if cache is not None and key is not None and not changed:
            cache.put(key, layer)
        out.layers.append(layer)
    return out
