"""Beyond the exercised path: the static closure of Python imports.

A trace shows the modules one run imported; other input takes other paths, whose imports the run
never made (`app.py report` imports `csv`, which `app.py` never did). Starting from every Python
module the file set keeps, this reads each one's source with `ast` (nothing is executed; a
sourceless module's bytecode, of tracejail's own Python version, in a child process) and
follows every import it names — at any depth, inside functions, in `try: … except ImportError`
alternatives, relative ones, `__import__("x")` and `importlib.import_module("x")` with literal
names — resolved the way the recorded interpreter would find them: the run's script directories
and PYTHONPATH, the standard library and its lib-dynload, the site-packages the run used, in that
order. An import that resolves to nothing (an optional dependency that is not installed, a
built-in module) is no error.

What may be added, so that an image does not grow a second site-packages:
* standard-library modules, and the app's own modules (anywhere outside the interpreter's
  installation and site-packages);
* modules of a distribution the run already imported from;
* a distribution the run never imported from only when a module the trace kept, or one of the
  app's own, imports it by name.
Every import of a kept module and of the app's own modules is followed, function bodies included
(other input calls other functions); of a module the closure added from the standard library or
site-packages, only what importing it runs (module and class level), transitively — else the
standard library's own lazy imports (pdb -> pydoc -> http.server, multiprocessing's every start
method) would pull in half of it. Never followed: imports under `if __name__ == "__main__":` in a
module that is not run as a script, under `if TYPE_CHECKING:`, in branches a platform test rules
out on Linux (`sys.platform == "win32"`, `os.name == "nt"`), and names `--exclude-module` gives.

Plugins declared as data: when the run read a distribution's `entry_points.txt` (importlib.metadata
does when a program looks up a plugin group), the modules of every entry point it declares are
added too (console and GUI scripts aside), since other input may pick another plugin.
"""
from __future__ import annotations

import ast
import configparser
import hashlib
import json
import os
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from tracejail import __version__, cachedir
from tracejail import trace as tr
from tracejail.root import NodeKind, Root

MAX_SOURCE = 8 << 20          # a bigger .py is not parsed (generated tables, not code)
_STDLIB_RE = re.compile(r"^(?P<dir>.*/lib/python(?P<major>\d)\.(?P<minor>\d+))(?:/|$)")
_SITE_NAMES = ("site-packages", "dist-packages")
_SCRIPT_GROUPS = ("console_scripts", "gui_scripts")
REASON_PREFIX = "imported by "
ENTRY_POINT_PREFIX = "entry point "
NOT_EXERCISED = "not exercised (static import closure)"
# Modules whose imports an import hook decides, not their text: following them adds modules that
# do not import as found. (setuptools' shim makes `distutils` mean `setuptools._distutils`.)
NOT_FOLLOWED = {"_distutils_hack": "setuptools' distutils shim: an import hook decides what its imports load"}


class Where:
    STDLIB = "stdlib"
    SITE = "site"
    APP = "app"


@dataclass(frozen=True)
class Interpreter:
    """A Python installation the run used, known by its standard library directory."""

    stdlib: str
    version: tuple[int, int]

    @property
    def cache_tag(self) -> str:
        return f"cpython-{self.version[0]}{self.version[1]}"

    @property
    def extension_suffixes(self) -> tuple[str, ...]:
        return (f".cpython-{self.version[0]}{self.version[1]}-x86_64-linux-gnu.so", ".abi3.so", ".so")


@dataclass(frozen=True)
class Entry:
    """A sys.path entry, and what kind of place it is."""

    path: str
    where: str


@dataclass(frozen=True)
class Found:
    """A module on disk: its dotted name, the files that make it, whether it is a package."""

    name: str
    files: tuple[str, ...]
    package_dir: str | None
    source: str | None          # the file to read for its own imports: the .py, or a sourceless .pyc
    entry: Entry


@dataclass(frozen=True)
class Added:
    """A module the closure added: what imports it, and where."""

    name: str
    files: tuple[str, ...]
    importer: str               # the importing module's file, or an entry_points.txt
    line: int
    via: str = ""               # "entry point NAME in group GROUP of DIST" for plugins

    def importer_text(self) -> str:
        """Who imports it: "imported by FILE at line N", or the entry point that names it."""
        if self.via:
            return f"{self.via} ({self.importer})"
        return f"{REASON_PREFIX}{self.importer} at line {self.line}"

    def reason(self) -> str:
        return f"{self.importer_text()}, {NOT_EXERCISED}"


@dataclass
class ImportClosure:
    added: list[Added] = field(default_factory=list)
    not_parsed: list[tuple[str, str]] = field(default_factory=list)   # (file, why)
    excluded: list[str] = field(default_factory=list)                  # module names --exclude-module cut


# --------------------------------------------------------------------------------------------
# Where CPython keeps a module's bytecode


@dataclass(frozen=True)
class CachedPyc:
    """`D/__pycache__/NAME.TAG[.opt-N].pyc`, the interpreter's cache of `D/NAME.py`."""

    path: str
    source: str
    tag: str          # e.g. "cpython-311"
    optimize: int     # 0, or N of ".opt-N"


def cached_pyc(path: str) -> CachedPyc | None:
    head, _, name = path.rpartition("/")
    if not head.endswith("/__pycache__") or not name.endswith(".pyc"):
        return None
    parts = name[:-4].split(".")
    if len(parts) == 3 and parts[2].startswith("opt-") and parts[2][4:].isdigit():
        optimize = int(parts[2][4:])
    elif len(parts) == 2:
        optimize = 0
    else:
        return None
    if not parts[0] or not parts[1]:
        return None
    return CachedPyc(path, head[: -len("/__pycache__")] + "/" + parts[0] + ".py", parts[1], optimize)


def sourceless_standin(path: str) -> str | None:
    """The sourceless .pyc that takes the place of `path` when `path` is a module's source or its
    cached .pyc (--bytecode-only ships it so); None for any other file."""
    cached = cached_pyc(path)
    source = cached.source if cached is not None else path if path.endswith(".py") else None
    return sourceless_path(source) if source is not None else None


def sourceless_path(source: str) -> str:
    """Where the import system finds the bytecode of `source` when the source is gone."""
    return source[:-3] + ".pyc"


# --------------------------------------------------------------------------------------------
# What a module imports


@dataclass(frozen=True)
class ImportRef:
    name: str            # absolute dotted name
    line: int
    in_function: bool = False   # runs only when a function is called, not on import


def _is_main_guard(test: ast.expr) -> bool:
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and len(test.comparators) == 1 and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


# What the platform tests in `if` statements evaluate to in a Linux image.
_PLATFORM = {("sys", "platform"): "linux", ("os", "name"): "posix"}


def _platform_value(node: ast.expr) -> str | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return _PLATFORM.get((node.value.id, node.attr))
    return None


def platform_test(test: ast.expr) -> bool | None:
    """The value of `sys.platform == "win32"`, `os.name != "nt"`, `sys.platform.startswith("win")`
    (and `not` of those) on Linux; None for any other test."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        inner = platform_test(test.operand)
        return None if inner is None else not inner
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.comparators[0], ast.Constant):
        value, other = _platform_value(test.left), test.comparators[0].value
        if value is not None and isinstance(other, str):
            if isinstance(test.ops[0], ast.Eq):
                return value == other
            if isinstance(test.ops[0], ast.NotEq):
                return value != other
        return None
    if isinstance(test, ast.Call) and isinstance(test.func, ast.Attribute) and test.func.attr == "startswith" \
            and len(test.args) == 1 and isinstance(test.args[0], ast.Constant) and isinstance(test.args[0].value, str):
        value = _platform_value(test.func.value)
        return None if value is None else value.startswith(test.args[0].value)
    return None


def _absolute(name: str | None, level: int, package: str) -> str | None:
    if level == 0:
        return name
    parts = package.split(".") if package else []
    if level - 1 > len(parts) or (level - 1 == len(parts) and not name):
        return None      # beyond the top-level package: an ImportError at run time
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, *([name] if name else [])]) or None


# Statement fields that hold nested statement lists (if/for/while/with/try/match bodies).
_BODIES = ("body", "orelse", "finalbody", "handlers", "cases")


class _Scanner:
    """Collects imports by walking statements only: expressions are searched (for
    `__import__("x")` and `import_module("x")`) only in files that mention those names, which
    keeps a build's scan of hundreds of modules cheap."""

    def __init__(self, package: str, is_script: bool, by_name: bool) -> None:
        self.package = package
        self.is_script = is_script
        self.by_name = by_name
        self.refs: list[ImportRef] = []

    def _ref(self, name: str, line: int, in_function: bool) -> None:
        self.refs.append(ImportRef(name, line, in_function))

    def statements(self, body: list[ast.stmt], in_function: bool) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self._ref(alias.name, node.lineno, in_function)
            elif isinstance(node, ast.ImportFrom):
                self._import_from(node, in_function)
            elif isinstance(node, ast.If):
                self._if(node, in_function)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if self.by_name:      # decorators and defaults run on import
                    for expr in [*node.decorator_list, *node.args.defaults, *node.args.kw_defaults]:
                        if expr is not None:
                            self.calls(expr, in_function)
                self.statements(node.body, True)
            else:
                if self.by_name:
                    for child in ast.iter_child_nodes(node):
                        if not isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                            self.calls(child, in_function)
                for attr in _BODIES:
                    nested = getattr(node, attr, None)
                    if nested:
                        # except handlers and match cases hold their own bodies
                        for item in nested:
                            if isinstance(item, (ast.excepthandler, ast.match_case)):
                                self.statements(item.body, in_function)
                        self.statements([n for n in nested if isinstance(n, ast.stmt)], in_function)

    def _if(self, node: ast.If, in_function: bool) -> None:
        dead = _is_type_checking(node.test) or (not self.is_script and _is_main_guard(node.test))
        on_linux = platform_test(node.test)
        if dead or on_linux is False:
            self.statements(node.orelse, in_function)
        elif on_linux is True:
            self.statements(node.body, in_function)
        else:
            if self.by_name:
                self.calls(node.test, in_function)
            self.statements(node.body, in_function)
            self.statements(node.orelse, in_function)

    def _import_from(self, node: ast.ImportFrom, in_function: bool) -> None:
        base = _absolute(node.module, node.level, self.package)
        if base is None:
            return
        self._ref(base, node.lineno, in_function)
        for alias in node.names:
            if alias.name != "*":      # a submodule, or an attribute (then nothing is found)
                self._ref(f"{base}.{alias.name}", node.lineno, in_function)

    def calls(self, expr: ast.AST, in_function: bool) -> None:
        for node in ast.walk(expr):
            if isinstance(node, ast.Call):
                self._call(node, in_function or isinstance(expr, ast.Lambda))

    def _call(self, node: ast.Call, in_function: bool) -> None:
        func = node.func
        named = (isinstance(func, ast.Name) and func.id in ("__import__", "import_module")) or \
            (isinstance(func, ast.Attribute) and func.attr == "import_module"
             and isinstance(func.value, ast.Name) and func.value.id == "importlib")
        if not (named and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            return
        name = node.args[0].value
        if name.startswith("."):
            level = len(name) - len(name.lstrip("."))
            package = next((k.value.value for k in node.keywords if k.arg == "package"
                            and isinstance(k.value, ast.Constant) and isinstance(k.value.value, str)),
                           self.package)
            resolved = _absolute(name[level:] or None, level, package)
            if resolved:
                self._ref(resolved, node.lineno, in_function)
        elif name:
            self._ref(name, node.lineno, in_function)


def imports_of(source: str | bytes, package: str, *, is_script: bool = False,
               filename: str = "<module>") -> list[ImportRef]:
    """Every import `source` names, as absolute module names, in source order (raises
    SyntaxError, ValueError, RecursionError or MemoryError for source it cannot parse)."""
    raw = source.encode("utf-8", "surrogateescape") if isinstance(source, str) else source
    if b"import" not in raw:
        return []
    by_name = b"__import__" in raw or b"import_module" in raw
    tree = ast.parse(source, filename=filename)
    scanner = _Scanner(package, is_script, by_name)
    scanner.statements(tree.body, False)
    return sorted(scanner.refs, key=lambda r: r.line)


# Lists what a module's bytecode imports: (name, level, fromlist, line, in a function) for every
# IMPORT_NAME. Run in a child: marshal is not safe on hostile input, and a crash stays there.
_SCAN_BYTECODE = r"""
import dis, json, marshal, sys
code = marshal.loads(sys.stdin.buffer.read()[16:])
out = []
def walk(co, in_function):
    line, prev = co.co_firstlineno, []
    for ins in dis.get_instructions(co):
        if ins.positions is not None and ins.positions.lineno:
            line = ins.positions.lineno
        if ins.opname == "IMPORT_NAME" and len(prev) == 2 and all(p.opname == "LOAD_CONST" for p in prev):
            level, fromlist = prev[0].argval, prev[1].argval
            out.append([ins.argval, level if isinstance(level, int) else 0,
                        [f for f in (fromlist or ()) if isinstance(f, str)], line, in_function])
        prev = (prev + [ins])[-2:]
    for c in co.co_consts:
        if isinstance(c, type(co)):
            walk(c, in_function or bool(c.co_flags & 0x2))   # CO_NEWLOCALS: a function body
walk(code, False)
print(json.dumps(out))
"""
BYTECODE_TIMEOUT = 30.0


def imports_of_bytecode(data: bytes, package: str) -> list[ImportRef]:
    """What a sourceless module's bytecode imports (`import`/`from … import` statements; calls
    by name are not seen). Only bytecode of tracejail's own Python version can be read: another
    raises ValueError, as does bytecode the child cannot load."""
    import importlib.util
    import subprocess
    import sys

    if data[:4] != importlib.util.MAGIC_NUMBER:
        raise ValueError("bytecode of another Python version")
    try:
        proc = subprocess.run([sys.executable, "-I", "-c", _SCAN_BYTECODE], input=data, capture_output=True,
                              timeout=BYTECODE_TIMEOUT, env={"PATH": "/usr/bin:/bin"}, check=False)
    except subprocess.TimeoutExpired:
        raise ValueError("reading its bytecode took too long") from None
    if proc.returncode != 0:
        raise ValueError("its bytecode does not load")
    refs = []
    for name, level, fromlist, line, in_function in json.loads(proc.stdout):
        base = _absolute(name or None, level, package)
        if base is None:
            continue
        refs.append(ImportRef(base, line, in_function))
        refs += [ImportRef(f"{base}.{f}", line, in_function) for f in fromlist if f != "*"]
    return refs


# --------------------------------------------------------------------------------------------
# What each file imports, kept between builds


def default_cache_dir() -> str | None:
    """The cache directory (cachedir.cache_root); None: no cache."""
    return cachedir.cache_root()


@dataclass(frozen=True)
class FactKey:
    """One fact about one version of a file: the tree it is in, its path there, its identity
    (device, inode, size, mtime, ctime: any write changes ctime) and which fact ("imports ...",
    "record-tops", "private-key")."""

    root: str
    path: str
    identity: str
    fact: str

    @property
    def shard(self) -> str:
        """The file of facts it is kept in: one per directory of one tree."""
        return hashlib.sha256(f"{self.root}\0{os.path.dirname(self.path)}".encode()).hexdigest()[:24]

    @property
    def slot(self) -> str:
        """Its place in that file: one per file name and fact, so a newer version replaces it."""
        return f"{os.path.basename(self.path)}\0{self.fact}"


class ParseCache:
    """Facts about files, between builds: what a module imports (parsing is most of the import
    closure's time: a numpy app's 700 modules take seconds), what a RECORD installs, whether a
    file holds a private key. A fact counts only for the version of the file it was learned
    from (FactKey.identity); a changed file is read again and its fact replaced.

    Facts are kept in one file per directory (`pyimports-VERSION/SHARD.json`), read the first
    time a build asks about that directory and written back only when they changed: a build
    pays for what it asks, not for every project built before (one file for everything took a
    rebuild 70 ms more once six apps had been built). The files live in a directory of the
    user's own (0700; one that is a symlink, not the user's or writable by others is not used)
    and are replaced atomically; anything wrong with one means no cache for that directory."""

    MAX_SHARD_BYTES = 16 << 20

    def __init__(self, directory: str | None) -> None:
        self.cache_root = directory
        self.directory = os.path.join(directory, f"pyimports-{__version__}") if directory else None
        self._readable: bool | None = None   # whether the directories are safe: asked once
        self._shards: dict[str, dict[str, list[object]]] = {}
        self._dirty: set[str] = set()

    def _safe(self, create: bool) -> bool:
        if not (self.cache_root and self.directory):
            return False
        if not create and self._readable is not None:
            return self._readable
        ok = cachedir.safe_dir(self.cache_root, create) and cachedir.safe_dir(self.directory, create)
        self._readable = ok
        return ok

    @staticmethod
    def key(root: str, path: str, st: os.stat_result, fact: str) -> FactKey:
        identity = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        return FactKey(root, path, identity, fact)

    def _shard(self, name: str) -> dict[str, list[object]]:
        shard = self._shards.get(name)
        if shard is None:
            shard = self._shards[name] = self._load(name)
        return shard

    def _load(self, name: str) -> dict[str, list[object]]:
        if not self._safe(create=False):
            return {}
        assert self.directory is not None
        raw = cachedir.read_private(os.path.join(self.directory, name + ".json"), self.MAX_SHARD_BYTES)
        try:
            data = json.loads(raw) if raw is not None else {}
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _value(self, key: FactKey) -> object:
        entry = self._shard(key.shard).get(key.slot)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == key.identity:
            return entry[1]
        return None

    def _set(self, key: FactKey, value: object) -> None:
        self._shard(key.shard)[key.slot] = [key.identity, value]
        self._dirty.add(key.shard)

    def get(self, key: FactKey) -> list[ImportRef] | None:
        raw = self._value(key)
        if not isinstance(raw, list):
            return None
        try:
            return [ImportRef(str(n), int(ln), bool(f)) for n, ln, f in raw]
        except (TypeError, ValueError):
            return None

    def put(self, key: FactKey, refs: list[ImportRef]) -> None:
        self._set(key, [[r.name, r.line, r.in_function] for r in refs])

    def get_names(self, key: FactKey) -> list[str] | None:
        """A list of names kept under `key` (another fact about a file, e.g. a RECORD's top names)."""
        raw = self._value(key)
        if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
            return None
        return list(raw)

    def put_names(self, key: FactKey, names: list[str]) -> None:
        self._set(key, list(names))

    def save(self) -> None:
        """Write back the directories whose facts changed."""
        if not (self._dirty and self._safe(create=True)):
            return
        assert self.directory is not None
        for name in sorted(self._dirty):
            data = json.dumps(self._shards[name], separators=(",", ":")).encode()
            if len(data) <= self.MAX_SHARD_BYTES:
                cachedir.write_private(os.path.join(self.directory, name + ".json"), data)
        self._dirty.clear()
        try:
            os.unlink(self.directory + ".json")   # the one file earlier versions kept: never read now
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# Where the recorded interpreter looks


def interpreters(paths: Iterable[str], root: Root) -> list[Interpreter]:
    """Python installations whose standard library holds a kept path (its landmark os.py or
    os.pyc present), by first appearance."""
    found: dict[str, Interpreter] = {}
    for path in paths:
        m = _STDLIB_RE.match(path)
        if m is None or m.group("dir") in found:
            continue
        d = m.group("dir")
        if root.exists(d + "/os.py") or root.exists(d + "/os.pyc"):
            found[d] = Interpreter(d, (int(m.group("major")), int(m.group("minor"))))
    return list(found.values())


def _site_dir(path: str) -> str | None:
    parts = path.split("/")
    for i, part in enumerate(parts):
        if part in _SITE_NAMES:
            return "/".join(parts[: i + 1])
    return None


def python_processes(trace: tr.Trace) -> list[tr.ProcessInfo]:
    """The recorded processes that ran a Python interpreter (by the executable's name)."""
    out = []
    for run in trace.runs:
        for p in run.processes:
            exe = os.path.basename(p.exe or (p.argv[0] if p.argv else ""))
            if re.fullmatch(r"python(\d(\.\d+)?)?", exe):
                out.append(p)
    return out


def _script_of(p: tr.ProcessInfo, cwd: str) -> str | None:
    """The script a `python [options] SCRIPT ...` process ran (absolute), if any."""
    args = p.argv[1:]
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-c", "-m") or a.startswith(("-c", "-m")):
            return None
        if a in ("-W", "-X"):
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return os.path.normpath(os.path.join(cwd, a))
    return None


def search_path(trace: tr.Trace, kept: Iterable[str], root: Root) -> tuple[list[Entry], list[Interpreter], set[str]]:
    """(sys.path entries in order, the interpreters, the scripts the runs started) as the trace
    shows them: script directories (the working directory for -c/-m), PYTHONPATH, each
    interpreter's standard library and lib-dynload, then the site-packages the run touched."""
    kept = list(kept)
    interps = interpreters(kept, root)
    entries: dict[str, str] = {}
    scripts: set[str] = set()
    pythons = python_processes(trace)
    for index, run in enumerate(trace.runs):
        for p in (p for p in pythons if p.run == index):
            script = _script_of(p, run.cwd)
            if script is not None:
                resolved = root.resolve(script)
                if resolved.ok and resolved.kind is NodeKind.FILE:
                    scripts.add(resolved.path)
                    entries.setdefault(os.path.dirname(resolved.path), Where.APP)
            else:
                entries.setdefault(run.cwd, Where.APP)
        for item in (run.environment.get("PYTHONPATH") or "").split(":"):
            if item.startswith("/"):
                entries.setdefault(os.path.normpath(item), Where.APP)
    for interp in interps:
        entries.setdefault(interp.stdlib, Where.STDLIB)
        entries.setdefault(interp.stdlib + "/lib-dynload", Where.STDLIB)
    for path in kept:
        site = _site_dir(path)
        if site is not None:
            entries.setdefault(site, Where.SITE)
    out = []
    for path, where in entries.items():
        res = root.resolve(path)
        if res.ok and res.kind is NodeKind.DIR:
            out.append(Entry(res.path, where))
    return list(dict.fromkeys(out)), interps, scripts


# --------------------------------------------------------------------------------------------
# Finding modules


class _Finder:
    """Finds modules by name in the search path, inside the root, the way importlib's FileFinder
    does: a package directory, then an extension module, then source, then sourceless bytecode."""

    def __init__(self, entries: list[Entry], interps: list[Interpreter], root: Root) -> None:
        self.entries = entries
        self.root = root
        self.suffixes = tuple(dict.fromkeys(s for i in interps for s in i.extension_suffixes)) or (".so",)
        self.tags = tuple(i.cache_tag for i in interps)
        self._names: dict[str, frozenset[str]] = {}
        self._memo: dict[str, Found | None] = {}

    def names(self, directory: str) -> frozenset[str]:
        if directory not in self._names:
            self._names[directory] = frozenset(self.root.listdir(directory))
        return self._names[directory]

    def _is_dir(self, path: str) -> bool:
        res = self.root.resolve(path)
        return res.ok and res.kind is NodeKind.DIR

    def _in(self, directory: str, name: str, full: str, entry: Entry) -> tuple[Found | None, bool]:
        """(the module `name` in `directory`, whether a namespace portion is there)."""
        names = self.names(directory)
        if name in names and self._is_dir(f"{directory}/{name}"):
            pkg = f"{directory}/{name}"
            inside = self.names(pkg)
            for init in ("__init__.py", *(f"__init__{s}" for s in self.suffixes), "__init__.pyc"):
                if init in inside:
                    return self._found(full, pkg, "__init__", init, entry, package=True), False
            namespace = True
        else:
            namespace = False
        for suffix in self.suffixes:
            if name + suffix in names:
                return Found(full, (f"{directory}/{name}{suffix}",), None, None, entry), False
        for filename in (name + ".py", name + ".pyc"):
            if filename in names:
                return self._found(full, directory, name, filename, entry, package=False), False
        return None, namespace

    def _found(self, full: str, directory: str, stem: str, filename: str, entry: Entry, *, package: bool) -> Found:
        files = [f"{directory}/{filename}"]
        source = files[0] if filename.endswith((".py", ".pyc")) else None   # an extension: no text
        if filename.endswith(".py") and "__pycache__" in self.names(directory):
            cached = self.names(f"{directory}/__pycache__")
            files += [f"{directory}/__pycache__/{stem}.{tag}.pyc" for tag in self.tags
                      if f"{stem}.{tag}.pyc" in cached]
        return Found(full, tuple(files), directory if package else None, source, entry)

    def find(self, name: str) -> Found | None:
        """The module `name` (dotted), or None. Its parent packages are found by find() too."""
        if name in self._memo:
            return self._memo[name]
        head, _, tail = name.rpartition(".")
        found: Found | None = None
        if not head:
            for entry in self.entries:
                found, _ = self._in(entry.path, name, name, entry)
                if found is not None:
                    break
        else:
            parent_dirs = self.package_dirs(head)
            for d, entry in parent_dirs:
                found, _ = self._in(d, tail, name, entry)
                if found is not None:
                    break
        self._memo[name] = found
        return found

    def package_dirs(self, name: str) -> list[tuple[str, Entry]]:
        """The directories a package's submodules are looked up in: its own, or every portion of a
        namespace package."""
        found = self.find(name)
        if found is not None:
            return [(found.package_dir, found.entry)] if found.package_dir else []
        head, _, tail = name.rpartition(".")
        parents = self.package_dirs(head) if head else [(e.path, e) for e in self.entries]
        portions = []
        for d, entry in parents:
            if tail in self.names(d) and self._is_dir(f"{d}/{tail}"):
                portions.append((f"{d}/{tail}", entry))
        return portions


def module_name(path: str, entries: list[Entry]) -> tuple[str, str, Entry] | None:
    """(dotted name, its package, the entry) of a module file under a search path entry."""
    best = None
    for entry in entries:
        if path.startswith(entry.path.rstrip("/") + "/") and (best is None or len(entry.path) > len(best.path)):
            best = entry
    if best is None:
        return None
    rel = path[len(best.path.rstrip("/")) + 1:]
    parts = rel.split("/")
    if "__pycache__" in parts:
        return None
    stem = parts[-1].split(".", 1)[0]
    if not stem.isidentifier() or not all(p.isidentifier() for p in parts[:-1]):
        return None
    if stem == "__init__":
        name = ".".join(parts[:-1])
        return (name, name, best) if name else None
    name = ".".join([*parts[:-1], stem])
    return name, ".".join(parts[:-1]), best


# --------------------------------------------------------------------------------------------
# The closure


def _entry_point_refs(text: str) -> list[tuple[str, str, str, int]]:
    """(group, entry point name, module, line) for every plugin entry point in entry_points.txt."""
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None, strict=False)
    parser.optionxform = str      # type: ignore[assignment,method-assign]  # names are case-sensitive
    try:
        parser.read_string(text)
    except configparser.Error:
        return []
    lines = text.splitlines()
    out = []
    for group in parser.sections():
        if group in _SCRIPT_GROUPS:
            continue
        for ep_name, value in parser.items(group):
            module = value.split(":", 1)[0].split("[", 1)[0].strip()
            if not module or not all(p.isidentifier() for p in module.split(".")):
                continue
            line = next((n for n, ln in enumerate(lines, 1) if ln.split("=", 1)[0].strip() == ep_name), 0)
            out.append((group, ep_name, module, line))
    return out


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def closure(trace: tr.Trace, kept: Iterable[str], root: Root, *,
            exclude_modules: Iterable[str] = (), cache: ParseCache | None = None) -> ImportClosure:
    """The modules the kept ones import (transitively) that the file set lacks; see the module
    docstring for the rules. `kept` holds the file set's paths (canonical, as fileset keeps them).
    `cache` (default: the user's, see ParseCache) remembers what each file imports."""
    cache = cache if cache is not None else ParseCache(default_cache_dir())
    try:
        return _closure(trace, set(kept), root, tuple(exclude_modules), cache)
    finally:
        cache.save()


def _closure(trace: tr.Trace, kept: set[str], root: Root, exclude_modules: tuple[str, ...],
             cache: ParseCache) -> ImportClosure:
    result = ImportClosure()
    entries, interps, scripts = search_path(trace, kept, root)
    if not interps and not scripts:
        return result
    finder = _Finder(entries, interps, root)
    blocked = tuple(exclude_modules)

    def is_blocked(name: str) -> bool:
        return any(name == b or name.startswith(b + ".") for b in blocked)

    # The distributions the run imported from: top-level names of kept modules in site-packages.
    touched: set[tuple[str, str]] = set()
    start: list[tuple[str, str, Entry, bool]] = []       # (source, package, entry, trace-kept)
    seen_sources: set[str] = set()                       # a .py and its cached .pyc: one module
    for path in sorted(kept):
        if not path.endswith((".py", ".pyc", ".so")):
            continue
        cached = cached_pyc(path)
        if cached is not None:
            path = cached.source
        if path in seen_sources:
            continue
        seen_sources.add(path)
        named = module_name(path, entries)
        if named is None:
            continue
        name, package, entry = named
        if entry.where == Where.SITE:
            touched.add((entry.path, _top(name)))
        if path.endswith(".py") and (path in kept or root.exists(path)):
            start.append((path, package, entry, True))
        elif path.endswith(".pyc") and cached is None and not root.exists(path[:-1]):
            start.append((path, package, entry, True))      # sourceless: its bytecode is read

    def allowed(found: Found, importer_entry: Entry, importer_kept: bool) -> bool:
        if found.entry.where != Where.SITE:
            return True
        if (found.entry.path, _top(found.name)) in touched:
            return True
        return importer_kept or importer_entry.where == Where.APP

    seen_sources = {s for s, *_ in start}      # the sources parsed, or queued to be
    queue = deque(start)
    have = set(kept)

    def add(ref_name: str, importer: str, line: int, importer_entry: Entry, importer_kept: bool,
            via: str = "") -> None:
        if is_blocked(ref_name):
            if ref_name not in result.excluded:
                result.excluded.append(ref_name)
            return
        # `import a.b.c` runs a/__init__ and a/b/__init__ first.
        parts = ref_name.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[:n])
            found = finder.find(name)
            if found is None:
                return   # not installed, built in, or an attribute: nothing to add
            if not allowed(found, importer_entry, importer_kept):
                return
            new = tuple(f for f in found.files if f not in have)
            if new:
                have.update(new)
                result.added.append(Added(name, new, importer, line, via))
            if found.source is not None and found.source not in seen_sources:
                seen_sources.add(found.source)
                package = name if found.package_dir else name.rpartition(".")[0]
                queue.append((found.source, package, found.entry, False))

    # Plugins declared as data: entry_points.txt files the run read.
    for rec in trace.files.values():
        if not rec.path.endswith("/entry_points.txt") or "read" not in rec.kinds:
            continue
        res = root.resolve(rec.path)
        if not res.ok:
            continue
        dist_dir = os.path.dirname(res.path)
        site = Entry(os.path.dirname(dist_dir), Where.SITE)
        dist = os.path.basename(dist_dir).split("-", 1)[0]
        for group, ep_name, module, line in _entry_point_refs(root.read_text(res.path) or ""):
            add(module, res.path, line, site, True, via=f"{ENTRY_POINT_PREFIX}{ep_name} in group {group} of {dist}")

    while queue:
        source, package, entry, is_kept = queue.popleft()
        named = module_name(source, entries)
        if named is not None and _top(named[0]) in NOT_FOLLOWED:
            result.not_parsed.append((source, NOT_FOLLOWED[_top(named[0])]))
            continue
        res = root.resolve(source)
        if not res.ok or res.kind is not NodeKind.FILE or res.node is None:
            continue
        if res.node.st.st_size > MAX_SOURCE:
            result.not_parsed.append((source, f"over {MAX_SOURCE >> 20} MiB"))
            continue
        is_script = source in scripts
        key = ParseCache.key(root.path, res.path, res.node.st, f"imports {package} {int(is_script)}")
        refs = cache.get(key)
        if refs is None:
            try:
                data = root.read_head(res.path, MAX_SOURCE, res.node.identity)
                refs = imports_of_bytecode(data, package) if source.endswith(".pyc") else \
                    imports_of(data, package, is_script=is_script, filename=source)
            except Exception as err:  # noqa: BLE001 - a hostile file (SyntaxError, RecursionError...) must not stop the build
                result.not_parsed.append((source, type(err).__name__))
                continue
            cache.put(key, refs)
        # Kept modules and the app's own: every import, functions included (other input calls
        # other functions). Modules added here: what importing them runs, transitively.
        follow_all = is_kept or entry.where == Where.APP
        for ref in refs:
            if follow_all or not ref.in_function:
                add(ref.name, source, ref.line, entry, is_kept)
    return result
