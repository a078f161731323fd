"""Which files of the root go into the image, and why: the traced union, the ELF closure, companions.

`select(trace, options, root)` is pure apart from reading the root's files: it returns a FileSet
whose `wanted` maps each path to the typed reasons it is there (provenance.py renders them for
explain, inspect, provenance.json and the SBOM; nothing parses them back) and whose `excluded`
says what was left out by which rule (the build summary lists them).

Every candidate, whatever brought it (the trace, the closure, a Python companion, --include), is
judged by what it reaches (root.Root.resolve): a credential reached through a symlink or a `..`
is still a credential, and a file holding a private key is left out whatever its name. Only
`--include` of the real path keeps one.
"""
from __future__ import annotations

import dataclasses
import enum
import fnmatch
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from tracejail import families, pyimports, sensitive
from tracejail import trace as tr
from tracejail.root import RUNTIME_DIRS, NodeKind, Resolution, Root, SourceChanged, Status, parent_of, under

SENSITIVE_RULE = "sensitive file (credentials, keys, history); --include it to keep"
RUNTIME_RULE = "{} is provided by the container runtime"
SELF_RULE = "tracejail itself / the trace"


class Kind(enum.Enum):
    """Why a path is wanted; the values are the kinds provenance.json and `explain --json` show."""

    TRACED = "traced"                  # the recorded run touched it
    ADDED = "added"                    # added to the trace later (verify --fix)
    PATH_PREFIX = "path-prefix"        # a directory walked through before a `..`
    RUN_DIRECTORY = "run-directory"    # the directory the run created or removed something in
    FAMILY = "family"                  # a member of a family looked up by name (families.py)
    INCLUDE = "include"                # --include
    IMPORT = "python-import"           # imported by a kept module on a path the run did not take
    NEEDED = "needed"                  # an edge of the ELF closure (closure.Dependency)
    PYTHON = "python-companion"        # the .py of a kept .pyc, a .pth file
    DIST_INFO = "dist-info"            # metadata of a kept Python distribution


@dataclass(frozen=True)
class Reason:
    """One reason a path is wanted, with the facts that say it (fields by kind)."""

    kind: Kind
    path: str = ""                  # PATH_PREFIX: where the walk went; RUN_DIRECTORY: what the run made
                                    # or removed there; PYTHON: the kept .pyc (empty for a .pth)
    detail: str = ""                # ADDED, FAMILY: why; IMPORT: who imports it; NEEDED: closure's sentence
    name: str = ""                  # NEEDED: the name as written (DT_NEEDED, interpreter); FAMILY: the
                                    # family; ADDED: the tool; IMPORT: the module
    accesses: tuple[str, ...] = ()  # TRACED: the access kinds
    needed_by: str = ""             # NEEDED: the object or script that needs it
    rule: str = ""                  # NEEDED: closure's rule (ld.so.cache, rpath, interp, runtime:nss ...)
    via_origin: bool = False        # NEEDED: the directory came from $ORIGIN
    search: str = ""                # NEEDED: the DT_RPATH/DT_RUNPATH entry that found it
    removed: bool = False           # RUN_DIRECTORY: the run removed (not created) `path`

    @classmethod
    def needed(cls, dep: Any) -> Reason:
        """The reason for one closure.Dependency."""
        return cls(Kind.NEEDED, name=dep.name, needed_by=dep.needed_by, rule=dep.rule,
                   via_origin=dep.via_origin, search=dep.search, detail=dep.reason)


@dataclass(frozen=True)
class SelectOptions:
    include: tuple[str, ...] = ()         # paths (files or whole trees) always kept
    exclude: tuple[str, ...] = ()         # globs dropped after everything else
    extra_excluded_paths: tuple[str, ...] = ()   # e.g. the trace file itself
    families_off: tuple[str, ...] = ()    # families.py names not to add (--no-family)
    import_closure: bool = True           # add what kept Python modules import (pyimports.py)
    exclude_modules: tuple[str, ...] = ()  # module names the import closure does not follow


@dataclass
class FileSet:
    wanted: dict[str, list[Reason]] = field(default_factory=dict)   # path -> why it is there
    dirs_only: set[str] = field(default_factory=set)            # only stat'ed/listed directories
    excluded: list[tuple[str, str]] = field(default_factory=list)   # (path, rule)
    vanished: list[str] = field(default_factory=list)           # traced, gone from the root now
    unresolved: list[tuple[str, str]] = field(default_factory=list)  # (library name, needed by)
    closure_errors: list[str] = field(default_factory=list)
    # Credentials and key files kept only because --include named them: their modes stay as
    # they are (never opened up to the image user).
    secrets: set[str] = field(default_factory=set)
    families: dict[str, list[str]] = field(default_factory=dict)   # family name -> paths it added
    python_imports: list[pyimports.Added] = field(default_factory=list)   # modules the import closure added
    imports_not_parsed: list[tuple[str, str]] = field(default_factory=list)  # (module file, why)
    modules_excluded: list[str] = field(default_factory=list)   # --exclude-module names the closure met

    def want(self, path: str, reason: Reason) -> None:
        reasons = self.wanted.setdefault(path, [])
        if reason not in reasons:
            reasons.append(reason)


class Judge:
    """Decides whether a resolved path may enter the image; remembers content checks."""

    def __init__(self, root: Root, include_exact: Iterable[str] = (), self_paths: Iterable[str] = (),
                 cache: pyimports.ParseCache | None = None) -> None:
        self.root = root
        self.include_exact = frozenset(include_exact)
        self.self_paths = tuple(self_paths)
        self.cache = cache
        self._keys: dict[str, str | None] = {}
        self.secrets: set[str] = set()     # canonical paths kept by --include although sensitive

    @staticmethod
    def runtime_rule(spelled: str) -> str | None:
        for top in RUNTIME_DIRS:
            if under(spelled, top):
                return RUNTIME_RULE.format(top)
        return None

    def rule(self, spelled: str, res: Resolution) -> str | None:
        """The rule that leaves `spelled` (normal form) out, given what it resolves to; None keeps it."""
        runtime = self.runtime_rule(spelled)
        if runtime:
            return runtime
        canonical = [h.path for h in res.hops]
        if any(under(p, s) for s in self.self_paths for p in [spelled, *canonical]):
            return SELF_RULE
        for p in dict.fromkeys([spelled, *canonical]):
            if sensitive.sensitive_name(p):
                if p not in self.include_exact:
                    return SENSITIVE_RULE
                self.secrets.add(p)
        if res.ok and res.node is not None and res.node.kind is NodeKind.FILE and self.private_key(res):
            if res.path not in self.include_exact:
                return f"holds {self.private_key(res)}; --include its real path to keep it"
            self.secrets.add(res.path)
        return None

    def private_key(self, res: Resolution) -> str | None:
        """What private key the file `res` reaches holds (first bytes only), or None. Remembered
        between builds by the file's identity (inode, size, mtime, ctime: any write changes
        ctime), since reading up to a megabyte of every kept file took a tenth of a rebuild."""
        if res.path in self._keys:
            return self._keys[res.path]
        assert res.node is not None
        key = pyimports.ParseCache.key(self.root.path, res.path, res.node.st, "private-key")
        known = self.cache.get_names(key) if self.cache is not None else None
        if known is not None:
            found = known[0] if known else None
        else:
            try:
                head = self.root.read_head(res.path, sensitive.HEAD_BYTES, res.node.identity)
                found = sensitive.private_key_in(head, res.node.st.st_size)
                if self.cache is not None:
                    self.cache.put_names(key, [found] if found else [])
            except (OSError, SourceChanged):
                found = None   # unreadable or changing: staging opens it again and checks it then
        self._keys[res.path] = found
        return found


def _matches_any(path: str, globs: Iterable[str]) -> str | None:
    for g in globs:
        if fnmatch.fnmatchcase(path, g) or fnmatch.fnmatchcase(path, g.rstrip("/") + "/*"):
            return g
    return None


def select(trace: tr.Trace, options: SelectOptions = SelectOptions(), root: Root | None = None) -> FileSet:
    root = root or Root("/")
    fs = FileSet()
    includes = [os.path.normpath(os.path.abspath(p)) for p in options.include]
    self_paths: list[str] = []
    if root.is_host:
        self_paths.append(os.path.realpath(os.path.dirname(os.path.abspath(__file__))))
        self_paths.extend(os.path.realpath(p) for p in options.extra_excluded_paths)
    # One cache of per-file facts between builds (what a module imports, what a RECORD installs,
    # whether a file holds a private key).
    cache = pyimports.ParseCache(pyimports.default_cache_dir())
    judge = Judge(root, includes, self_paths, cache)

    def consider(path: str, reason: Reason, res: Resolution | None = None, *, dir_only: bool = False) -> bool:
        rule = judge.rule(path, res if res is not None else root.resolve(path))
        if rule is not None:
            fs.excluded.append((path, rule))
            return False
        if dir_only:
            fs.dirs_only.add(path)
        fs.want(path, reason)
        return True

    made_by_run = {root.normalize(r.path)[0] for r in trace.files.values() if r.ok and r.created_by_run}

    def keep_parent(spelled: str, reason: Reason) -> None:
        """Keep the directory the run made or removed `spelled` in: the nearest one it did not
        make itself (`rm -rf site; mkdir -p site/css` leaves `site` out too)."""
        parent = parent_of(root.normalize(spelled)[0])
        while parent in made_by_run and parent != "/":
            parent = parent_of(parent)
        res = root.resolve(parent)
        if parent != "/" and res.ok and res.kind is NodeKind.DIR and judge.runtime_rule(parent) is None:
            consider(parent, reason, res, dir_only=True)

    for rec in trace.files.values():
        if not rec.ok:
            continue
        path, via = root.normalize(rec.path)
        if rec.created_by_run:
            fs.excluded.append((path, "created by the recorded run"))
            # ...but the directory it was made in is the image's, or the program cannot make it again
            keep_parent(rec.path, Reason(Kind.RUN_DIRECTORY, path=rec.path))
            continue
        runtime = judge.runtime_rule(path)
        if runtime:
            fs.excluded.append((path, runtime))
            continue
        # Judged as spelled in the trace: the hops then include the symlinks before each `..`.
        res = root.resolve(rec.path)
        # (A path that leads into a runtime directory is kept up to there: plan keeps its links.)
        if res.status is not Status.RUNTIME and not root.lexists(path):
            if rec.removed_by_run:
                fs.excluded.append((path, "removed by the recorded run"))
                keep_parent(rec.path, Reason(Kind.RUN_DIRECTORY, path=rec.path, removed=True))
            else:
                fs.vanished.append(path)
            continue
        if rec.added_by:
            reason = Reason(Kind.ADDED, name=rec.added_by, detail=rec.reason or "")
        else:
            reason = Reason(Kind.TRACED, accesses=tuple(sorted(rec.kinds)))
        if not consider(path, reason, res, dir_only=res.ok and res.kind is NodeKind.DIR):
            continue
        for prefix in via:
            consider(prefix, Reason(Kind.PATH_PREFIX, path=rec.path), dir_only=True)

    # Families chosen by name from input: the trace shows one member, keep them all.
    found = [root.normalize(r.path)[0] for r in trace.files.values() if r.ok and not r.created_by_run]
    for family, path in families.members(found, root, options.families_off):
        if path not in fs.wanted and consider(path, Reason(Kind.FAMILY, name=family.name, detail=family.why)):
            fs.families.setdefault(family.name, []).append(path)

    for inc in includes:
        top = root.resolve(inc)
        if not root.lexists(inc):
            fs.vanished.append(inc)
            continue
        if top.ok and top.kind is NodeKind.DIR and not root.lstat_is_link(inc):
            for rel in root.walk_tree(inc):
                consider(inc + rel if inc != "/" else (rel or "/"), Reason(Kind.INCLUDE))
        else:
            consider(inc, Reason(Kind.INCLUDE), top)

    try:
        if options.import_closure:
            _add_python_imports(trace, fs, root, consider, options.exclude_modules, cache)
        _add_closure(trace, fs, root, consider)
        _add_python_companions(fs, root, consider, cache)
    finally:
        cache.save()

    if options.exclude:
        for path in list(fs.wanted):
            g = _matches_any(path, options.exclude)
            if g is not None and not any(path == inc for inc in includes):
                del fs.wanted[path]
                fs.dirs_only.discard(path)
                fs.excluded.append((path, f"--exclude {g}"))
    fs.excluded.sort()
    fs.vanished = sorted(set(fs.vanished))
    fs.secrets = judge.secrets
    return fs


Consider = Callable[..., bool]


def _add_python_imports(trace: tr.Trace, fs: FileSet, root: Root, consider: Consider,
                        exclude_modules: tuple[str, ...], cache: pyimports.ParseCache) -> None:
    """What the kept Python modules import on paths the run did not take (pyimports.py); before
    the ELF closure, which then covers the extension modules added here."""
    kept = [p for p in fs.wanted if p not in fs.dirs_only]
    result = pyimports.closure(trace, kept, root, exclude_modules=exclude_modules, cache=cache)
    for added in result.added:
        why = Reason(Kind.IMPORT, name=added.name, detail=added.importer_text())
        files = tuple(f for f in added.files if f not in fs.wanted and consider(f, why))
        if files:
            fs.python_imports.append(dataclasses.replace(added, files=files))
    fs.imports_not_parsed = result.not_parsed
    fs.modules_excluded = result.excluded


def _add_closure(trace: tr.Trace, fs: FileSet, root: Root, consider: Consider) -> None:
    from tracejail import closure, elf

    env = trace.runs[0].environment if trace.runs else {}
    loader_env = closure.LoaderEnv(ld_library_path=env.get("LD_LIBRARY_PATH"), path=env.get("PATH"),
                                   ld_preload=env.get("LD_PRELOAD"),
                                   cwd=trace.runs[0].cwd if trace.runs else None, root=root.path)
    # Scripts count only when executed: Python's stdlib has executable files with a `#!` line
    # (base64.py, cgi.py ...) that a program merely imports.
    executed = {root.normalize(p)[0] for p, r in trace.files.items()
                if any(a.kind == "exec" and a.result == tr.OK for a in r.accesses)}
    roots = []
    for path in fs.wanted:
        if path in fs.dirs_only:
            continue
        res = root.resolve(path)
        if not res.ok or res.kind is not NodeKind.FILE:
            continue
        head = _head(root, res, 4)
        if head.startswith(elf.ELFMAG) or (path in executed and head.startswith(b"#!")):
            roots.append(path)
    triggers = [p for p, r in trace.files.items() if r.ok]
    result = closure.resolve(sorted(roots), loader_env, strict=False, runtime_triggers=triggers, root=root)
    fs.closure_errors.extend(result.errors)
    for dep in result.deps:
        # $ORIGIN/../lib spellings: keep what ld.so walks through, store the normal form
        path, via = root.normalize(dep.path)
        if not consider(path, Reason.needed(dep), root.resolve(dep.path)):
            continue
        fs.dirs_only.discard(path)
        for prefix in via:
            if prefix not in fs.wanted and consider(prefix, Reason(Kind.PATH_PREFIX, path=dep.path)):
                fs.dirs_only.add(prefix)
    for u in result.unresolved:
        fs.unresolved.append((u.name, u.needed_by))


def _head(root: Root, res: Resolution, n: int) -> bytes:
    """The first `n` bytes of the regular file `res` reaches (b"" when unreadable)."""
    if res.node is None:
        return b""
    try:
        return root.read_head(res.path, n, res.node.identity)
    except (OSError, SourceChanged):
        return b""


def _add_python_companions(fs: FileSet, root: Root, consider: Consider, cache: pyimports.ParseCache) -> None:
    """Python validates a cached .pyc against its .py, and reads .pth and dist-info metadata."""
    site_dirs: set[str] = set()
    for path in list(fs.wanted):
        cached = pyimports.cached_pyc(path)
        if cached is not None and cached.source not in fs.wanted and root.exists(cached.source):
            consider(cached.source, Reason(Kind.PYTHON, path=path))
        m = re.match(r"(.*/(?:site|dist)-packages)(/|$)", path)
        if m:
            site_dirs.add(m.group(1))
    for site in sorted(site_dirs):
        names = root.listdir(site)
        kept_tops = {_top_name(p[len(site) + 1:]) for p in fs.wanted if p.startswith(site + "/")}
        for name in names:
            full = os.path.join(site, name)
            if name.endswith(".pth"):
                consider(full, Reason(Kind.PYTHON))
            elif name.endswith(".dist-info") and root.resolve(full).kind is NodeKind.DIR:
                tops = _distribution_tops(root, full, cache)
                if tops & kept_tops:
                    why = Reason(Kind.DIST_INFO)
                    consider(full, why)
                    fs.dirs_only.discard(full)
                    for rel in root.walk_tree(full):
                        if rel and root.resolve(full + rel).kind is NodeKind.FILE:
                            consider(full + rel, why)


def _top_name(rel: str) -> str:
    """The importable name a site-packages path belongs to: `six` for six.py, __pycache__/six.*.pyc
    and six/...; `_cffi_backend` for _cffi_backend.cpython-311-x86_64-linux-gnu.so."""
    parts = rel.split("/")
    first = parts[1] if parts[0] == "__pycache__" and len(parts) > 1 else parts[0]
    if len(parts) == 1 or parts[0] == "__pycache__":
        first = first.split(".", 1)[0]
    return first


def _distribution_tops(root: Root, dist_info: str, cache: pyimports.ParseCache) -> set[str]:
    """Top-level names (packages, modules, .libs folders) a distribution installed, from its
    RECORD (remembered by the file's identity: an interpreter's site-packages may hold hundreds)."""
    res = root.resolve(dist_info + "/RECORD")
    if not res.ok or res.kind is not NodeKind.FILE or res.node is None:
        return set()
    key = pyimports.ParseCache.key(root.path, res.path, res.node.st, "record-tops")
    names = cache.get_names(key)
    if names is None:
        tops: set[str] = set()
        for line in (root.read_text(res.path) or "").splitlines():
            rel = line.split(",", 1)[0]
            if rel and not rel.startswith("..") and ".dist-info" not in rel.split("/", 1)[0]:
                tops.add(_top_name(rel))
        names = sorted(tops)
        cache.put_names(key, names)
    return set(names)