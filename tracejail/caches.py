"""What tracejail's cache holds, and emptying it (`tracejail cache df`, `tracejail cache prune`).

The cache (cachedir.cache_root) holds four kinds of things, each only ever saving time:

* `images`: unpacked images (`record --image`, `minify`, builds of their traces), one directory
  per image ID; the largest by far;
* `layers`: compressed layer blobs by what went into them (`build`); build also trims it itself;
* `imports`: facts about each file by its identity (what a Python module imports, what a RECORD
  installs, whether it holds a private key);
* `dpkg`: parsed package databases (the host's, and images'), by the version of their files;
* `registry`: which registry repositories hold which blobs (`push` mounts instead of uploading).

Pruning removes whole entries, never following a symlink, and only inside a cache directory of
the user's own; an image being unpacked (its temporary directory younger than an hour) is left
alone.
"""
from __future__ import annotations

import enum
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tracejail import cachedir
from tracejail.dpkg import DPKG_CACHE_PREFIX
from tracejail.registry import BLOB_RECORD_FILE
from tracejail.source import IMAGES_DIR, MARKER

LAYERS_DIR = "layers"
IMPORTS_PREFIX = "pyimports-"
# An unpack in progress writes into a temporary directory beside its final place.
_IN_PROGRESS = 3600.0


class Kind(enum.Enum):
    IMAGES = "images"
    LAYERS = "layers"
    IMPORTS = "imports"
    DPKG = "dpkg"
    REGISTRY = "registry"


@dataclass(frozen=True)
class Entry:
    """One thing in the cache that prune removes whole."""

    kind: Kind
    path: str
    size: int            # bytes on disk (regular files)
    last_used: float     # seconds since the epoch
    name: str            # what it is, for people: the image's name and ID, a layer's digest...

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind.value, "path": self.path, "size": self.size, "name": self.name,
                "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_used))}


def _images(root: str) -> Iterator[Entry]:
    images = os.path.join(root, IMAGES_DIR)
    if not cachedir.safe_dir(images, create=False):
        return
    now = time.time()
    for name in sorted(os.listdir(images)):
        path = os.path.join(images, name)
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue   # not an unpack of ours (a symlink is never followed, nor removed)
        except OSError:
            continue
        marker = os.path.join(path, MARKER)
        data = cachedir.read_private(marker, 1 << 20)
        try:
            source = json.loads(data) if data is not None else None
            label = f"{source['image']} ({source['image_id'][:19]})"
        except (ValueError, TypeError, KeyError):
            if now - cachedir.mtime(path) < _IN_PROGRESS:
                continue   # another command's unpack, still being written
            label = "an unfinished unpack"
        yield Entry(Kind.IMAGES, path, cachedir.tree_size(path), cachedir.mtime(marker) or cachedir.mtime(path), label)


def _layers(root: str) -> Iterator[Entry]:
    blobs = os.path.join(root, LAYERS_DIR, "blobs")
    if not cachedir.safe_dir(blobs, create=False):
        return
    now = time.time()
    for name in sorted(os.listdir(blobs)):
        path = os.path.join(blobs, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if name.startswith(".") and now - st.st_mtime < _IN_PROGRESS:
            continue   # another build's blob, still being written
        if stat.S_ISREG(st.st_mode):
            yield Entry(Kind.LAYERS, path, st.st_size, st.st_mtime, f"layer sha256:{name[:12]}")


def _files(root: str) -> Iterator[Entry]:
    for name in sorted(os.listdir(root)):
        kind = (Kind.IMPORTS if name.startswith(IMPORTS_PREFIX) else Kind.REGISTRY if name == BLOB_RECORD_FILE
                else Kind.DPKG if name.startswith(DPKG_CACHE_PREFIX) else None)
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if kind is not None and stat.S_ISREG(st.st_mode):
            yield Entry(kind, path, st.st_size, st.st_mtime, name)
        elif kind is Kind.IMPORTS and stat.S_ISDIR(st.st_mode):
            # One file per directory of facts: the newest says when the entry was last used.
            newest = max((cachedir.mtime(os.path.join(path, n)) for n in os.listdir(path)), default=st.st_mtime)
            yield Entry(kind, path, cachedir.tree_size(path), newest, name)


def entries(root: str | None = None, kinds: set[Kind] | None = None) -> list[Entry]:
    """Everything in the cache (of `kinds`), by kind; [] when there is no cache (or it is not the
    user's own). Images are only looked at, and their trees added up, when asked for."""
    root = root if root is not None else cachedir.cache_root()
    if root is None or not cachedir.safe_dir(root, create=False):
        return []
    wanted = set(Kind) if kinds is None else kinds
    found = [*(_images(root) if Kind.IMAGES in wanted else ()), *(_layers(root) if Kind.LAYERS in wanted else ()),
             *_files(root)]
    return [e for e in found if e.kind in wanted]


def prune(kinds: set[Kind], older_than: float | None = None, root: str | None = None) -> list[Entry]:
    """Remove the entries of `kinds` (those unused for `older_than` seconds, when given); what was
    removed."""
    now = time.time()
    removed = []
    for entry in entries(root, kinds):
        if older_than is not None and now - entry.last_used < older_than:
            continue
        try:
            cachedir.remove_tree(entry.path)
        except FileNotFoundError:
            continue
        removed.append(entry)
    if Kind.LAYERS in kinds and older_than is None:
        keys = os.path.join(root or cachedir.cache_root() or "", LAYERS_DIR, "keys")
        if cachedir.safe_dir(keys, create=False):
            for name in os.listdir(keys):   # keys whose blob is gone would only miss
                try:
                    os.unlink(os.path.join(keys, name))
                except OSError:
                    pass
    return removed
