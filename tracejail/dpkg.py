"""Which Debian packages own the files of an image, read straight from dpkg's database.

Scanners (trivy, grype, syft) find the OS packages of a distroless-style image in
``/var/lib/dpkg/status.d/<package>``: one ``status`` stanza per package. This module reads
``/var/lib/dpkg/status`` and ``/var/lib/dpkg/info/*.list`` once (about 50 ms for 800
packages) instead of running ``dpkg -S`` per file, and answers "who owns these paths".

Merged /usr: on current Debian and Ubuntu ``/lib``, ``/bin``, ``/sbin`` and ``/lib64`` are
symlinks into ``/usr``, but packages still list many files under their old names
(``/lib/x86_64-linux-gnu/libc.so.6``) while the image stores the real location
(``/usr/lib/x86_64-linux-gnu/libc.so.6``). Every path is therefore tried in both spellings.
"""
from __future__ import annotations

import hashlib
import marshal
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import astuple, dataclass, field
from typing import Iterable

from tracejail import __version__, cachedir
from tracejail.errors import TracejailError
from tracejail.root import NodeKind, Root

DPKG_DIR = "var/lib/dpkg"
STATUS_D = "/var/lib/dpkg/status.d"

# Top-level directories that merged-/usr turns into symlinks into /usr.
_MERGED_TOPS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


@dataclass(frozen=True)
class DpkgPackage:
    name: str
    architecture: str
    version: str
    stanza: str                 # the package's paragraph of /var/lib/dpkg/status, verbatim
    source: str | None = None   # source package name when it differs ("glibc" for libc6)
    source_version: str | None = None
    homepage: str | None = None
    maintainer: str | None = None

    @property
    def key(self) -> str:
        """Unique within one database: `name:arch` (two architectures can be installed)."""
        return f"{self.name}:{self.architecture}"


@dataclass
class DpkgDatabase:
    packages: dict[str, DpkgPackage] = field(default_factory=dict)   # key -> package
    # Listed path -> the key of the one package that lists it; paths listed by several (shared
    # directories, mostly) are in `shared` with every key. Two maps rather than one of lists:
    # building them is set and dict work in C, a third of the time on a 100k-path system.
    # (Read back from the cache, `owner` is a ShardedOwners: decoded one directory at a time.)
    owner: dict[str, str] | ShardedOwners = field(default_factory=dict)
    shared: dict[str, list[str]] = field(default_factory=dict)

    def add_list(self, key: str, paths: list[str]) -> None:
        """Record that package `key` lists `paths` (while parsing: `owner` is a dict)."""
        assert isinstance(self.owner, dict)
        for path in self.owner.keys() & set(paths):   # iterates over the smaller side
            keys = self.shared.setdefault(path, [self.owner[path]])
            if key not in keys:
                keys.append(key)
        self.owner.update(dict.fromkeys(paths, key))

    def owners_of(self, path: str) -> list[str]:
        """Keys of the packages that list `path` in either merged-/usr spelling."""
        found: list[str] = []
        for spelling in merged_usr_spellings(path):
            keys = self.shared.get(spelling)
            if keys is None:
                one = self.owner.get(spelling)
                keys = [one] if one is not None else []
            for key in keys:
                if key not in found:
                    found.append(key)
        return found


class ShardedOwners(Mapping[str, str]):
    """The path -> package map as the cache stores it: one marshal blob per directory, decoded
    the first time a path in that directory is looked up. A build asks about a few hundred of a
    system's thousands of directories; decoding all of them took a tenth of a rebuild."""

    def __init__(self, shards: dict[str, bytes], source: str) -> None:
        self._shards = shards
        self._decoded: dict[str, dict[str, str]] = {}
        self._source = source

    @staticmethod
    def shards_of(owner: Mapping[str, str]) -> dict[str, bytes]:
        by_dir: dict[str, dict[str, str]] = {}
        for path, key in owner.items():
            parent, _, name = path.rpartition("/")
            by_dir.setdefault(parent, {})[name] = key
        return {parent: marshal.dumps(names) for parent, names in by_dir.items()}

    def _names(self, parent: str) -> dict[str, str]:
        names = self._decoded.get(parent)
        if names is None:
            blob = self._shards.get(parent)
            try:
                names = marshal.loads(blob) if blob is not None else {}
                if not isinstance(names, dict):
                    raise TypeError(type(names).__name__)
            except (ValueError, TypeError, EOFError):
                raise TracejailError(f"the cached dpkg database {self._source} is damaged; remove it "
                                     "(tracejail cache prune --kind dpkg)") from None
            self._decoded[parent] = names
        return names

    def __getitem__(self, path: str) -> str:
        parent, _, name = path.rpartition("/")
        return self._names(parent)[name]

    def get(self, path: str, default: str | None = None) -> str | None:   # type: ignore[override]
        parent, _, name = path.rpartition("/")
        return self._names(parent).get(name, default)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self.get(path) is not None

    def __iter__(self) -> Iterator[str]:
        for parent in self._shards:
            for name in self._names(parent):
                yield f"{parent}/{name}"

    def __len__(self) -> int:
        return sum(len(self._names(parent)) for parent in self._shards)


def merged_usr_spellings(path: str) -> list[str]:
    """`path` and its other merged-/usr spelling: /usr/lib/x <-> /lib/x, /usr/bin/x <-> /bin/x."""
    parts = path.split("/")
    if len(parts) > 3 and parts[1] == "usr" and parts[2] in _MERGED_TOPS:
        return [path, "/" + "/".join(parts[2:])]
    if len(parts) > 2 and parts[1] in _MERGED_TOPS:
        return [path, "/usr" + path]
    return [path]


def parse_status(text: str) -> list[dict[str, str]]:
    """Paragraphs of a dpkg status file as {field: value}, plus "_stanza" (the raw text)."""
    out: list[dict[str, str]] = []
    for block in re.split(r"\n\s*\n", text):
        block = block.strip("\n")
        if not block.strip():
            continue
        fields: dict[str, str] = {}
        last = None
        for line in block.split("\n"):
            if line[:1] in (" ", "\t") and last is not None:
                fields[last] += "\n" + line
                continue
            name, sep, value = line.partition(":")
            if sep:
                last = name.strip()
                fields[last] = value.strip()
        fields["_stanza"] = block + "\n"
        out.append(fields)
    return out


# Configured packages: "triggers-*" only wait for another package's trigger to run. ("unpacked"
# and "half-configured" have their files too, but dpkg does not count them as installed.)
_INSTALLED_STATES = ("installed", "triggers-pending", "triggers-awaited")


def _installed(fields: dict[str, str]) -> bool:
    # "install ok installed" / "hold ok installed"; "config-files" means the files are gone.
    words = fields.get("Status", "").split()
    return len(words) == 3 and words[2] in _INSTALLED_STATES


def _source(fields: dict[str, str]) -> tuple[str | None, str | None]:
    """`Source: glibc` or `Source: glibc (2.36-9)` (binNMUs name the source version)."""
    raw = fields.get("Source")
    if not raw:
        return None, None
    m = re.match(r"^(\S+)(?:\s+\((\S+)\))?", raw)
    if not m:
        return None, None
    return m.group(1), m.group(2)


def read_database(root: Root | str = "/", native_arch: str | None = None) -> DpkgDatabase | None:
    """The installed packages and their file lists in `root`; None on a tree without dpkg.

    Parsed once per version of the database: a build reads it every time, and parsing a
    Debian system's hundreds of file lists took a fifth of a rebuild. The cached copy is keyed by
    the identity (device, inode, size, times) of the status file and of every file list."""
    tree = root if isinstance(root, Root) else Root(root)
    key = _database_key(tree, native_arch)
    cached = _cached_database(key) if key else None
    if cached is not None:
        return cached
    db = _parse_database(tree, native_arch)
    if db is not None and key:
        _store_database(key, db)
    return db


_CACHE_MAX_BYTES = 256 << 20
_CACHE_FORMAT = 2   # 2: the owner map in per-directory shards
_CACHE_KEEP = 8
DPKG_CACHE_PREFIX = "dpkg-"


def _database_key(tree: Root, native_arch: str | None) -> str | None:
    """What the parsed database depends on, hashed; None when it cannot be told (no dpkg)."""
    base = "/" + DPKG_DIR
    h = hashlib.sha256(f"dpkg {__version__} {_CACHE_FORMAT} {tree.path} {native_arch}\n".encode())

    def identity(path: str) -> os.stat_result | None:
        """The file a path reaches in the tree (every symlink hop resolved inside it)."""
        res = tree.resolve(path)
        if not res.ok or res.kind is not NodeKind.FILE:
            return None
        try:
            return os.stat(tree.host(res.path), follow_symlinks=False)
        except OSError:
            return None

    status = identity(base + "/status")
    if status is None:
        return None
    rows = [("status", status)]
    info = tree.resolve(base + "/info")
    if info.ok and info.kind is NodeKind.DIR:
        # The directory itself was reached inside the tree; its entries are looked at without
        # following them (a link among them is resolved like any path).
        with os.scandir(tree.host(info.path)) as listing:
            for entry in listing:
                if not entry.name.endswith(".list"):
                    continue
                st = entry.stat(follow_symlinks=False) if not entry.is_symlink() \
                    else identity(f"{base}/info/{entry.name}")
                if st is not None:
                    rows.append((entry.name, st))
    for name, st in sorted(rows, key=lambda row: row[0]):
        h.update(f"{name} {st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}\n".encode())
    return h.hexdigest()


def _cache_file(key: str, create: bool) -> str | None:
    """Where the database keyed `key` is cached; None with no cache (or one not the user's own)."""
    root = cachedir.cache_root()
    if not root or not cachedir.safe_dir(root, create):
        return None
    return os.path.join(root, f"{DPKG_CACHE_PREFIX}{key[:32]}.marshal")


def _cached_database(key: str) -> DpkgDatabase | None:
    path = _cache_file(key, create=False)
    data = cachedir.read_private(path, _CACHE_MAX_BYTES) if path else None
    if data is None:
        return None
    try:
        packages, shards, shared = marshal.loads(data)
        if not isinstance(shards, dict):
            return None
        return DpkgDatabase({p[0] + ":" + p[1]: DpkgPackage(*p) for p in packages},
                            ShardedOwners(shards, path), shared)
    except (ValueError, TypeError, EOFError):
        return None   # not what this version writes: parsed again, and replaced


def _store_database(key: str, db: DpkgDatabase) -> None:
    path = _cache_file(key, create=True)
    if path is None:
        return
    data = marshal.dumps(([astuple(p) for p in db.packages.values()], ShardedOwners.shards_of(db.owner),
                          db.shared))
    if len(data) > _CACHE_MAX_BYTES or not cachedir.write_private(path, data):
        return
    root = os.path.dirname(path)
    # A few databases (the host's, some images'), the most recently written kept.
    kept = sorted((n for n in os.listdir(root) if n.startswith(DPKG_CACHE_PREFIX) and n.endswith(".marshal")),
                  key=lambda n: cachedir.mtime(os.path.join(root, n)), reverse=True)
    for name in kept[_CACHE_KEEP:]:
        try:
            os.unlink(os.path.join(root, name))
        except OSError:
            pass


def _parse_database(tree: Root, native_arch: str | None) -> DpkgDatabase | None:
    base = "/" + DPKG_DIR
    text = tree.read_text(base + "/status", limit=1 << 30, errors="replace")
    if text is None:
        return None
    db = DpkgDatabase()
    by_name: dict[str, list[str]] = {}
    for fields in parse_status(text):
        if not _installed(fields) or "Package" not in fields:
            continue
        source, source_version = _source(fields)
        pkg = DpkgPackage(
            name=fields["Package"], architecture=fields.get("Architecture", "all"),
            version=fields.get("Version", ""), stanza=fields["_stanza"], source=source,
            source_version=source_version, homepage=fields.get("Homepage"),
            maintainer=fields.get("Maintainer"))
        db.packages[pkg.key] = pkg
        by_name.setdefault(pkg.name, []).append(pkg.key)
    info = base + "/info"
    names = [n for n in tree.listdir(info) if n.endswith(".list")]
    for name in names:
        stem = name[:-len(".list")]
        key = _key_for_list(stem, by_name, db, native_arch)
        if key is None:
            continue   # a leftover list of a removed package
        paths = (tree.read_text(f"{info}/{name}", limit=1 << 30) or "").split("\n")
        db.add_list(key, [p for p in paths if p and p != "/."])
    return db


def _key_for_list(stem: str, by_name: dict[str, list[str]], db: DpkgDatabase,
                  native_arch: str | None) -> str | None:
    """info/NAME.list belongs to the only NAME; info/NAME:ARCH.list (Multi-Arch: same) to that arch."""
    if ":" in stem:
        return stem if stem in db.packages else None
    keys = by_name.get(stem, [])
    if len(keys) == 1:
        return keys[0]
    for key in keys:   # several architectures and an unqualified list: dpkg means the native one
        if native_arch and key.endswith(":" + native_arch):
            return key
    return keys[0] if keys else None


@dataclass
class Ownership:
    """Which packages own which of the image's paths."""

    files: dict[str, list[str]] = field(default_factory=dict)   # package key -> image paths
    unowned: list[str] = field(default_factory=list)


def owners(db: DpkgDatabase, paths: Iterable[str]) -> Ownership:
    """Map image paths (files and symlinks, not directories) to the packages that ship them."""
    result = Ownership()
    for path in sorted(set(paths)):
        keys = db.owners_of(path)
        if not keys:
            result.unowned.append(path)
        for key in keys:
            result.files.setdefault(key, []).append(path)
    return result


def status_d_name(pkg: DpkgPackage, packages: Iterable[DpkgPackage]) -> str:
    """File name under status.d: the package name, as distroless writes it; `name:arch` only
    when two architectures of one package are both in the image."""
    same = [p for p in packages if p.name == pkg.name]
    return pkg.name if len(same) <= 1 else f"{pkg.name}:{pkg.architecture}"


def status_d_files(db: DpkgDatabase, ownership: Ownership) -> dict[str, str]:
    """Image path -> content for /var/lib/dpkg/status.d/<package> of every owning package."""
    kept = [db.packages[k] for k in sorted(ownership.files) if k in db.packages]
    out: dict[str, str] = {}
    for pkg in kept:
        out[f"{STATUS_D}/{status_d_name(pkg, kept)}"] = pkg.stanza
    return out
