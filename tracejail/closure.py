"""Closure: a static model of the dynamic loader, agreeing with glibc's ld.so without running anything.

For each root (an ELF executable, shared library, plugin or extension module,
or a ``#!`` script) :func:`resolve` computes the files the loader would map:
PT_INTERP, then DT_NEEDED (and DT_FILTER / DT_AUXILIARY filtees) breadth
first, exactly in ld.so's order, because the order decides which object is
"already loaded" and whose DT_RPATH applies.  Each edge records the object
that needed the file and the rule that found it.

The model follows glibc 2.36 on x86_64 (elf/dl-load.c ``_dl_map_object``):

1. a name already loaded (by the name it was loaded under, its path or its
   DT_SONAME) is reused; a file found again under another name is reused by
   (device, inode);
2. names containing a slash are paths (after $ORIGIN/$LIB/$PLATFORM
   expansion): rule ``slash``;
3. DT_RPATH of the loading object, then of the object that loaded it, and so
   on up to the executable - skipped entirely when the loading object has
   DT_RUNPATH: rule ``rpath``;
4. LD_LIBRARY_PATH of the recorded environment: ``ld_library_path``;
5. DT_RUNPATH of the loading object only: ``runpath``;
6. /etc/ld.so.cache (parsed by :mod:`tracejail.ldcache`): ``ld.so.cache``;
   a tree without a cache is searched along /etc/ld.so.conf instead, as if
   ldconfig had been run: ``ld.so.conf``;
7. the loader's compiled-in directories: ``default``.

Every search directory is tried with the glibc-hwcaps subdirectories the CPU
supports (x86-64-v4/v3/v2, best first) and glibc 2.36's legacy hwcaps
subdirectories before the directory itself.  Candidates of the wrong ELF
class or machine are skipped, as ld.so does; an existing candidate that is
not a valid ELF file stops the search with an error, as ld.so does.
Programs whose interpreter is musl's are resolved with musl's rules
(LD_LIBRARY_PATH, inherited RUNPATH/RPATH, /etc/ld-musl-$ARCH.path).

Other rules: ``interp`` (PT_INTERP, kept at its exact path), ``preload``
(/etc/ld.so.preload and LD_PRELOAD), ``shebang`` and ``env-shebang`` (script
interpreters), ``runtime:<name>`` (known run-time loads, see
:mod:`tracejail.runtime_loads`).

Paths keep the loader's spelling (a $ORIGIN/../lib path keeps its ``..``),
because that is the name under which the process will open the file.

ELF facts are read with :mod:`struct` from the ELF header, the program
headers and the PT_DYNAMIC / PT_INTERP segments only (and .dynsym, for
run-time load triggers); pyelftools, the project's ELF parser of record,
supplies the constants.  Measured on this project's reference machine:
constructing pyelftools' ``ELFFile`` and DynamicSegment costs about 2.4 ms
per file because it walks the section headers (2.4 s for the 1029 files of
/usr/lib/x86_64-linux-gnu, half the 5 s budget, before any resolution), and
its symbol iteration took ~25 s for /usr/bin; the struct reader does the
same work in ~0.1 s and ~0.3 s.
"""
from __future__ import annotations

import dataclasses
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from elftools.elf.enums import ENUM_E_MACHINE

from . import ldcache, runtime_loads
from .elf import (  # ELF facts live in elf.py; the public ones stay importable from here
    DF_1_NODEFLIB,
    DF_1_PIE,
    ELFCLASS32,
    ELFCLASS64,
    ELFMAG,
    ELFOSABI_GNU,
    ELFOSABI_SYSV,
    ET_DYN,
    ET_EXEC,
    ElfCache,
    ElfFacts,
    _LIBC_ABI_MAX,
    is_elf,
    read_elf_facts,
    read_file,
    read_text,
)
from .errors import ElfError, TracejailError
from .root import NodeKind, Root, Status

__all__ = [
    "Closure",
    "Dependency",
    "ElfCache",
    "ElfFacts",
    "LoaderEnv",
    "Unresolved",
    "format_tree",
    "is_elf",
    "read_elf_facts",
    "resolve",
]

# --- public data types ------------------------------------------------------


@dataclass(frozen=True)
class LoaderEnv:
    """What the recorded run's environment says; `build` passes the recorded values."""

    ld_library_path: str | None = None
    path: str | None = None  # PATH, for #!/usr/bin/env NAME
    root: str = "/"  # filesystem root to resolve in (a staged tree); default host
    ld_preload: str | None = None  # LD_PRELOAD
    cwd: str | None = None  # for relative entries in LD_LIBRARY_PATH / RPATH; unknown -> skipped


@dataclass(frozen=True)
class Dependency:
    path: str  # absolute path as the loader would open it (loader's spelling, not realpath'd)
    needed_by: str  # the object (or script) that needed it
    name: str  # the DT_NEEDED name / interpreter / module name as written
    rule: str  # see the module docstring
    reason: str = ""  # human sentence for run-time loads and other non-obvious edges
    via_origin: bool = False  # the rpath/runpath/slash directory came from $ORIGIN
    search: str = ""  # rpath/runpath: the entry as written in the object ("$ORIGIN/../lib")


@dataclass(frozen=True)
class Unresolved:
    name: str
    needed_by: str
    searched: tuple[str, ...]


@dataclass
class Closure:
    roots: list[str]
    deps: list[Dependency]  # every resolved edge, deduplicated by (path, needed_by)
    unresolved: list[Unresolved]
    errors: list[str]  # per-file parse errors when resolve(..., strict=False)
    notes: list[str] = field(default_factory=list)  # informational: skipped candidates, absent optional loads

    def paths(self) -> set[str]:
        """All files in the closure, including the roots."""
        return set(self.roots) | {d.path for d in self.deps}

    def to_json(self) -> dict:
        return {
            "roots": list(self.roots),
            "deps": [dataclasses.asdict(d) for d in self.deps],
            "unresolved": [
                {"name": u.name, "needed_by": u.needed_by, "searched": list(u.searched)} for u in self.unresolved
            ],
            "errors": list(self.errors),
            "notes": list(self.notes),
            "paths": sorted(self.paths()),
        }


# --- architectures and the loader's configuration -----------------------------


@dataclass(frozen=True)
class _Arch:
    name: str  # musl's LDSO_ARCH, and a label
    elf_class: int
    machine: int
    triple: str  # Debian multiarch triple
    glibc_interp: str
    cache_flags: frozenset[int]  # ld.so.cache entry flags ld.so accepts
    cache_default: int  # the flags that end the search (_DL_CACHE_DEFAULT_ID)
    generic_dirs: tuple[str, ...]  # default directories of a non-multiarch glibc


_ARCHES: dict[tuple[int, int], _Arch] = {
    (ELFCLASS64, ENUM_E_MACHINE["EM_X86_64"]): _Arch(
        "x86_64", ELFCLASS64, ENUM_E_MACHINE["EM_X86_64"], "x86_64-linux-gnu",
        "/lib64/ld-linux-x86-64.so.2", frozenset({0x0303}), 0x0303, ("/lib64", "/usr/lib64"),
    ),
    (ELFCLASS32, ENUM_E_MACHINE["EM_386"]): _Arch(
        "i386", ELFCLASS32, ENUM_E_MACHINE["EM_386"], "i386-linux-gnu",
        "/lib/ld-linux.so.2", frozenset({0x0001, 0x0003}), 0x0003, ("/lib", "/usr/lib"),
    ),
    (ELFCLASS64, ENUM_E_MACHINE["EM_AARCH64"]): _Arch(
        "aarch64", ELFCLASS64, ENUM_E_MACHINE["EM_AARCH64"], "aarch64-linux-gnu",
        "/lib/ld-linux-aarch64.so.1", frozenset({0x0A03}), 0x0A03, ("/lib64", "/usr/lib64"),
    ),
}


def _arch_for(facts: ElfFacts) -> _Arch:
    arch = _ARCHES.get((facts.elf_class, facts.machine))
    if arch is None:
        # An architecture we have no table for: glibc's generic rules.
        arch = _Arch(facts.machine_name, facts.elf_class, facts.machine, "", "", frozenset({1, 3}), 3, ("/lib", "/usr/lib"))
    return arch


# x86-64 psABI micro-architecture levels, as /proc/cpuinfo names their
# features (abm = LZCNT, pni = SSE3, xsave stands in for OSXSAVE: the kernel
# hides avx when the OS has not enabled XSAVE).  Each level needs the ones
# before it.
_X86_64_LEVELS: tuple[tuple[str, frozenset[str]], ...] = (
    ("x86-64-v2", frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})),
    ("x86-64-v3", frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})),
    ("x86-64-v4", frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})),
)
_HASWELL = frozenset({"avx2", "fma", "bmi1", "bmi2", "abm", "movbe", "popcnt"})
_AVX512_1 = frozenset({"avx512cd", "avx512bw", "avx512dq", "avx512vl"})
# Legacy hwcap bits and platform numbers in ld.so.cache entries (sysdeps/x86).
_X86_HWCAP_BITS = {"sse2": 1 << 0, "x86_64": 1 << 1, "avx512_1": 1 << 2}
_X86_PLATFORMS = ("i586", "i686", "haswell", "xeon_phi")
_FIRST_PLATFORM_BIT = 48


def _x86_64_hwcaps(flags: frozenset[str]) -> list[str]:
    """glibc-hwcaps subdirectory names the CPU supports, best first."""
    supported: list[str] = []
    for level, needs in _X86_64_LEVELS:
        if not needs <= flags:
            break
        supported.append(level)
    return supported[::-1]


def _legacy_hwcaps(arch: _Arch, flags: frozenset[str]) -> tuple[list[str], str]:
    """glibc <= 2.36's legacy hwcap names (in bit order) and the platform ($PLATFORM)."""
    intel = "vendor:GenuineIntel" in flags
    if arch.name == "x86_64":
        names = ["x86_64"]
        platform = "x86_64"  # AT_PLATFORM from the kernel
        if intel:
            if "avx512cd" in flags and "avx512er" in flags and "avx512pf" in flags:
                platform = "xeon_phi"
            elif _AVX512_1 <= flags:
                names.append("avx512_1")
            if platform == "x86_64" and _HASWELL <= flags:
                platform = "haswell"
        return names, platform
    if arch.name == "i386":
        return (["sse2"] if "sse2" in flags else []), "i686"
    return [], os.uname().machine


def _power_set_subdirs(components: list[str]) -> list[str]:
    """The legacy subdirectories ld.so tries, in its order (elf/dl-hwcaps.c).

    Every subset of the components, most specific first, joined with the
    last component ("tls") outermost: tls/x86_64/x86_64, tls/x86_64, ...
    """
    count = len(components)
    result: list[str] = []
    for index in range(1 << count):
        mask = (1 << count) - 1 - index
        parts = [components[n] for n in reversed(range(count)) if mask >> n & 1]
        result.append("/".join(parts))
    return result


@dataclass(frozen=True)
class _LoaderConfig:
    flavour: str  # "glibc" or "musl"
    arch: _Arch
    interp: str | None
    system_dirs: tuple[str, ...]
    lib_dst: str  # $LIB
    platform: str  # $PLATFORM
    subdirs: tuple[str, ...]  # tried inside every search directory, "" (the directory itself) last
    cache: ldcache.LdCache | None
    cache_file: str
    conf_dirs: tuple[str, ...]  # ld.so.conf directories, used only when there is no cache
    hwcaps_priority: Mapping[str, int]
    legacy_hwcap_bits: int
    platform_bit: int
    musl_dirs: tuple[str, ...]
    musl_dirs_from: str  # the path file, or "" for musl's built-in default
    libdir: str  # /usr/$LIB, where gconv lives


def _find_system_dirs(blob: bytes, elf_class: int) -> tuple[str, ...] | None:
    """The default search directories compiled into a glibc ld.so.

    ld.so keeps them as consecutive NUL-terminated strings ("/lib/x86_64-linux-gnu/\\0/usr/lib/...")
    preceded by an array of their lengths; finding that pair avoids guessing
    the distribution's layout.
    """
    size_fmt = "Q" if elf_class == ELFCLASS64 else "I"
    width = struct.calcsize(size_fmt)
    for match in re.finditer(rb"(?:/[\x21-\x7e]*/\x00){2,16}", blob):
        dirs = match.group().split(b"\0")[:-1]
        lengths = [len(d) for d in dirs]
        start = match.start() - width * len(lengths)
        if start >= 0 and blob[start : match.start()] == struct.pack(f"<{len(lengths)}{size_fmt}", *lengths):
            return tuple(os.fsdecode(d).rstrip("/") or "/" for d in dirs)
    return None


# --- the filesystem the loader sees ------------------------------------------


class _Root:
    """The loader's view of a root: its paths as host paths, resolved by root.Root."""

    def __init__(self, tree: Root) -> None:
        self.tree = tree
        self.root = tree.path
        self.identity = tree.is_host

    def host(self, path: str) -> str:
        """The host path to open for a loader path: canonical when it exists (no symlink left to
        follow), a path that does not exist otherwise."""
        res = self.tree.resolve(path)
        if res.status is Status.OK:
            return self.tree.host(res.path)
        if res.status is Status.RUNTIME and self.identity:
            return os.path.normpath(path)   # `tracejail deps` on a host file below /run or /dev
        return self.tree.host(res.spelled_tail())

    def realpath(self, path: str) -> str:
        return self.tree.realpath(path)

    def exists(self, path: str) -> bool:
        return self.tree.exists(path)


# --- the loader model ------------------------------------------------------------


@dataclass(frozen=True)
class _Dir:
    path: str  # no trailing slash, except "/" itself
    via_origin: bool
    written: str = ""  # the DT_RPATH/DT_RUNPATH entry it was expanded from


@dataclass(frozen=True)
class _Found:
    path: str
    facts: ElfFacts
    rule: str
    via_origin: bool
    search: str = ""  # the search-list entry that found it (rpath/runpath)


@dataclass(frozen=True)
class _NotFound:
    searched: tuple[str, ...]
    error: str | None = None  # a fatal error that ended the search (ld.so stops there)


@dataclass(eq=False)
class _Obj:
    """One link map: an object loaded into the modelled process."""

    path: str  # l_name: the path as the loader spelled it
    facts: ElfFacts
    loader: _Obj | None  # l_loader: the object whose dependency caused the load
    rule: str
    via_origin: bool
    origin: str  # $ORIGIN
    is_main: bool = False
    rpath: tuple[_Dir, ...] = ()
    runpath: tuple[_Dir, ...] = ()
    chain: tuple[tuple[_Dir, ...], ...] = ()  # DT_RPATH lists: own, loader's, ... up to the executable
    descends_from_main: bool = False
    shortname: str | None = None  # musl: the name it was found under
    search: str = ""  # the rpath/runpath entry it was found through


_LD_SO_CACHE = "/etc/ld.so.cache"
_RESERVED_MUSL = re.compile(r"^lib(c|pthread|rt|m|dl|util|xnet)\.so$")


class _Resolver:
    def __init__(
        self,
        env: LoaderEnv,
        cache: ElfCache,
        strict: bool,
        triggers: tuple[str, ...],
        runtime: bool,
        tree: Root,
    ) -> None:
        self.env = env
        self.cache = cache
        self.strict = strict
        self.triggers = triggers
        self.runtime = runtime
        self.fs = _Root(tree)
        self.roots: list[str] = []
        self.deps: dict[tuple[str, str], Dependency] = {}
        self.unresolved: dict[tuple[str, str], Unresolved] = {}
        self.errors: list[str] = []
        self.notes: list[str] = []
        self._configs: dict[tuple[object, ...], _LoaderConfig] = {}
        self._search_memo: dict[tuple[object, ...], _Found | _NotFound] = {}
        self._isdir_memo: dict[str, bool] = {}
        self._done: set[str] = set()
        self.runtime_done: set[tuple[object, ...]] = set()

    # --- bookkeeping ---

    def edge(self, dep: Dependency) -> None:
        self.deps.setdefault((dep.path, dep.needed_by), dep)

    def missing(self, name: str, needed_by: str, searched: Iterable[str]) -> None:
        self.unresolved.setdefault((name, needed_by), Unresolved(name, needed_by, tuple(searched)))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def fail(self, err: TracejailError) -> None:
        if self.strict:
            raise err
        message = str(err)
        if message not in self.errors:
            self.errors.append(message)

    # --- files ---

    def isdir(self, path: str) -> bool:
        known = self._isdir_memo.get(path)
        if known is None:
            known = os.path.isdir(self.fs.host(path))
            self._isdir_memo[path] = known
        return known

    def facts(self, path: str) -> ElfFacts | None:
        """Facts of a loader path; OSError if missing; ElfError if corrupt."""
        return self.cache.facts(self.fs.host(path), path)

    def absolute(self, path: str) -> str | None:
        if path.startswith("/"):
            return path
        if self.env.cwd:
            return os.path.join(self.env.cwd, path)
        return None

    # --- loader configuration ---

    def config(self, flavour: str, arch: _Arch, interp: str | None) -> _LoaderConfig:
        key = (flavour, arch, interp)
        cfg = self._configs.get(key)
        if cfg is None:
            cfg = self._make_config(flavour, arch, interp)
            self._configs[key] = cfg
        return cfg

    def _make_config(self, flavour: str, arch: _Arch, interp: str | None) -> _LoaderConfig:
        flags = self.cache.cpu_flags() if os.uname().machine in ("x86_64", "i686", "i386") else frozenset()
        hwcaps = _x86_64_hwcaps(flags) if arch.name == "x86_64" else []
        legacy, platform = _legacy_hwcaps(arch, flags)
        subdirs: list[str] = [f"glibc-hwcaps/{h}" for h in hwcaps]
        for sub in _power_set_subdirs(legacy + [platform, "tls"]):  # ends with "" (the directory)
            if sub not in subdirs:
                subdirs.append(sub)
        legacy_bits = 0
        for name in legacy:
            legacy_bits |= _X86_HWCAP_BITS.get(name, 0)
        platform_bit = 1 << (_FIRST_PLATFORM_BIT + _X86_PLATFORMS.index(platform)) if platform in _X86_PLATFORMS else 0
        system_dirs = self._system_dirs(arch, interp) if flavour == "glibc" else arch.generic_dirs
        lib_dst = system_dirs[0].strip("/") if system_dirs else "lib"
        cache, conf_dirs = self._ld_so_cache() if flavour == "glibc" else (None, ())
        musl_dirs, musl_from = self._musl_dirs(arch, interp) if flavour == "musl" else ((), "")
        return _LoaderConfig(
            flavour=flavour,
            arch=arch,
            interp=interp,
            system_dirs=system_dirs,
            lib_dst=lib_dst,
            platform=platform,
            subdirs=tuple(subdirs),
            cache=cache,
            cache_file=_LD_SO_CACHE,
            conf_dirs=conf_dirs,
            hwcaps_priority={name: i + 1 for i, name in enumerate(hwcaps)},
            legacy_hwcap_bits=legacy_bits,
            platform_bit=platform_bit,
            musl_dirs=musl_dirs,
            musl_dirs_from=musl_from,
            libdir="/" + lib_dst if lib_dst.startswith("usr/") else "/usr/" + lib_dst,
        )

    def _system_dirs(self, arch: _Arch, interp: str | None) -> tuple[str, ...]:
        """The default directories of the glibc ld.so that will run the program."""
        ld_so = interp or arch.glibc_interp
        if ld_so:
            try:
                found = self.cache.parsed_file(
                    self.fs.host(ld_so), f"system-dirs-{arch.elf_class}", lambda data: _find_system_dirs(data, arch.elf_class)
                )
            except OSError:
                found = None
            if isinstance(found, tuple):
                return found
        # No readable ld.so (a staged tree without one): guess from the layout.
        if arch.triple and self.isdir(f"/lib/{arch.triple}"):
            return (f"/lib/{arch.triple}", f"/usr/lib/{arch.triple}", "/lib", "/usr/lib")
        return arch.generic_dirs

    def _ld_so_cache(self) -> tuple[ldcache.LdCache | None, tuple[str, ...]]:
        """The parsed cache, or, when there is none, the ld.so.conf directories to search instead."""
        try:
            parsed = self.cache.parsed_file(self.fs.host(_LD_SO_CACHE), "ld.so.cache", ldcache.parse_ld_so_cache)
        except OSError:
            parsed = None
        if isinstance(parsed, ldcache.LdCache):
            return parsed, ()
        if isinstance(parsed, Exception):
            self.note(f"{_LD_SO_CACHE} ignored, as ld.so would: {parsed}")
        conf_dirs = tuple(ldcache.parse_ld_so_conf(self.fs.tree))
        if conf_dirs:
            self.note(f"no usable {_LD_SO_CACHE}: searching the /etc/ld.so.conf directories, as if ldconfig had run")
        return None, conf_dirs

    def _musl_dirs(self, arch: _Arch, interp: str | None) -> tuple[tuple[str, ...], str]:
        """musl's system search path and the file it came from ("" for musl's built-in default)."""
        path_file = ldcache.musl_path_file(interp or "", arch.name)
        try:
            return tuple(ldcache.parse_musl_path(read_text(self.fs.host(path_file)))), path_file
        except FileNotFoundError:
            return ("/lib", "/usr/local/lib", "/usr/lib"), ""
        except OSError:
            return (), path_file  # musl then searches nothing more

    # --- roots ---

    def add_root(self, path: str) -> None:
        if not path.startswith("/"):
            path = os.path.abspath(path) if self.fs.identity else "/" + path
        if path in self.roots:
            return
        host = self.fs.host(path)
        if os.path.isdir(host):
            return  # not a program
        try:
            head = read_file(host, 256)
        except OSError as err:
            self.fail(TracejailError(f"{path}: cannot read: {err.strerror or err}"))
            return
        if head.startswith(ELFMAG):
            self.roots.append(path)
            self._elf_program(path)
        elif head.startswith(b"#!"):
            self.roots.append(path)
            if path not in self._done:
                self._script(path, head, depth=0)
        # Anything else (data, text) is not loaded by anyone: ignored.

    def _elf_program(self, path: str) -> None:
        """Model one process whose main object is `path`."""
        if path in self._done:
            return
        self._done.add(path)
        try:
            facts = self.facts(path)
        except ElfError as err:
            self.fail(err)
            return
        except OSError as err:
            self.fail(TracejailError(f"{path}: cannot read: {err.strerror or err}"))
            return
        if facts is None:
            return
        _Process(self, path, facts).run()

    # --- scripts ---

    def _script(self, path: str, head: bytes, depth: int) -> None:
        self._done.add(path)
        line = head[2:].split(b"\n", 1)[0].strip(b" \t\r")
        if not line:
            return
        parts = line.split(None, 1)
        interp = os.fsdecode(parts[0])
        arg = os.fsdecode(parts[1]).strip() if len(parts) > 1 else ""
        interp_path = interp if interp.startswith("/") else self.absolute(interp)
        if interp_path is None or not self.fs.exists(interp_path):
            self.missing(interp, path, (interp_path or interp,))
            return
        self.edge(Dependency(interp_path, path, interp, "shebang"))
        self._program(interp_path, depth + 1)
        if os.path.basename(interp_path) == "env" and arg:
            command = _env_command(arg)
            if command is None:
                return
            found, searched, where = self._which(command)
            if found is None:
                self.missing(command, path, searched)
                return
            self.edge(Dependency(found, path, command, "env-shebang", reason=f"{interp} runs {command} from {where}"))
            self._program(found, depth + 1)

    def _program(self, path: str, depth: int) -> None:
        """A file the kernel executes on the script's behalf: ELF or another script."""
        if path in self._done:
            return
        if depth > 4:  # Linux's binfmt_script recursion limit
            self.fail(TracejailError(f"{path}: too many levels of #! interpreters"))
            return
        try:
            head = read_file(self.fs.host(path), 256)
        except OSError:
            return
        if head.startswith(ELFMAG):
            self._elf_program(path)
        elif head.startswith(b"#!"):
            self._script(path, head, depth)

    def _which(self, command: str) -> tuple[str | None, list[str], str]:
        """execvp()'s PATH search, inside the root."""
        if "/" in command:
            path = self.absolute(command)
            return (path if path and self._executable(path) else None), [path or command], "its path"
        search = self.env.path if self.env.path is not None else "/bin:/usr/bin"  # glibc's default
        searched: list[str] = []
        for directory in search.split(":"):
            directory = directory or "."
            if not directory.startswith("/"):
                absolute = self.absolute(directory)
                if absolute is None:
                    continue
                directory = absolute
            searched.append(directory)
            candidate = directory.rstrip("/") + "/" + command
            if self._executable(candidate):
                return candidate, searched, f"PATH entry {directory}"
        return None, searched, ""

    def _executable(self, path: str) -> bool:
        host = self.fs.host(path)
        return os.path.isfile(host) and os.access(host, os.X_OK)


def _env_command(arg: str) -> str | None:
    """The command `/usr/bin/env ARG` runs: skips options, -S, and NAME=VALUE."""
    tokens = arg.split()
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
            continue
        if token in ("-u", "--unset", "-C", "--chdir"):
            skip_next = True
            continue
        if token.startswith("-"):
            continue  # -S, -i, -, --split-string=... (the split words follow)
        if "=" in token:
            continue
        return token
    return None


class _Process:
    """One run of the dynamic loader with `main` as the program."""

    def __init__(self, resolver: _Resolver, main_path: str, main_facts: ElfFacts) -> None:
        self.r = resolver
        self.objs: list[_Obj] = []
        self.names: dict[str, _Obj] = {}
        self.by_file: dict[tuple[int, int], _Obj] = {}
        interp = main_facts.interp
        arch = _arch_for(main_facts)
        musl = bool(interp and os.path.basename(interp).startswith("ld-musl-")) or (
            interp is None and any(n == "libc.so" or n.startswith("libc.musl-") for n in main_facts.needed)
        )
        self.cfg = resolver.config("musl" if musl else "glibc", arch, interp)
        self._llp: tuple[_Dir, ...] | None = None
        # The executable's $ORIGIN comes from /proc/self/exe, which the kernel
        # has resolved; a shared library root is taken as dlopen()ed by the
        # path given, whose directory is its $ORIGIN.
        if interp:
            origin = os.path.dirname(resolver.fs.realpath(main_path))
        else:
            origin = os.path.dirname(main_path)
        self.main = self._new_obj(main_path, main_facts, None, "root", False, origin, is_main=True)
        self.rtld: _Obj | None = None
        if interp:
            self._load_interp(interp)
        else:
            # A library root is loaded into some program, whose loader is
            # already there: the architecture's usual one (as under ldd).  It
            # joins the closure only if something needs it (libc does).
            default = f"/lib/ld-musl-{arch.name}.so.1" if musl else arch.glibc_interp
            if default:
                self._load_interp(default, edge=False)

    # --- objects ---

    def _new_obj(
        self,
        path: str,
        facts: ElfFacts,
        loader: _Obj | None,
        rule: str,
        via_origin: bool,
        origin: str,
        is_main: bool = False,
    ) -> _Obj:
        obj = _Obj(path, facts, loader, rule, via_origin, origin, is_main=is_main)
        musl = self.cfg.flavour == "musl"
        if facts.runpath is not None or (musl and facts.rpath is not None):
            # musl uses DT_RUNPATH if present, else DT_RPATH, and both are inherited.
            source = facts.runpath if facts.runpath is not None else facts.rpath
            dirs = self._expand_list(source or "", obj, ":")
            if musl:
                obj.rpath = dirs
            else:
                obj.runpath = dirs
        elif facts.rpath is not None:
            obj.rpath = self._expand_list(facts.rpath, obj, ":")
        parent_chain = loader.chain if loader is not None else ()
        obj.chain = ((obj.rpath,) if obj.rpath else ()) + parent_chain
        obj.descends_from_main = is_main or (loader is not None and loader.descends_from_main)
        self.objs.append(obj)
        self.by_file.setdefault(facts.file_id, obj)
        self.names.setdefault(path, obj)
        if facts.soname and not musl:
            self.names.setdefault(facts.soname, obj)
        return obj

    def _load_interp(self, interp: str, edge: bool = True) -> None:
        main = self.main
        try:
            facts = self.r.facts(interp)
        except OSError:
            if edge:
                self.r.missing(interp, main.path, (interp,))
            return
        except ElfError as err:
            self.r.fail(err)
            return
        if facts is None:
            self.r.fail(ElfError(f"{interp}: interpreter of {main.path} is not an ELF file"))
            return
        if edge:
            self.r.edge(Dependency(interp, main.path, interp, "interp"))
        rtld = _Obj(interp, facts, None, "interp", False, os.path.dirname(interp))
        self.rtld = rtld
        self.objs.append(rtld)
        self.by_file.setdefault(facts.file_id, rtld)
        self.names.setdefault(interp, rtld)
        if facts.soname and self.cfg.flavour == "glibc":
            self.names.setdefault(facts.soname, rtld)

    # --- dynamic string tokens ---

    def _expand(self, text: str, obj: _Obj) -> tuple[str | None, bool]:
        """Expand $ORIGIN, $LIB, $PLATFORM (and ${...}) as ld.so does; None if the element is unusable."""
        if "$" not in text:
            return text, False
        musl = self.cfg.flavour == "musl"
        out: list[str] = []
        via_origin = False
        i = 0
        while i < len(text):
            ch = text[i]
            if ch != "$":
                out.append(ch)
                i += 1
                continue
            rest = text[i + 1 :]
            matched = None
            for token in ("ORIGIN", "PLATFORM", "LIB"):
                if rest.startswith("{" + token + "}"):
                    matched = (token, len(token) + 2)
                    break
                if rest.startswith(token) and (len(rest) == len(token) or rest[len(token)] == "/"):
                    matched = (token, len(token))
                    break
            if matched is None or (musl and matched[0] != "ORIGIN"):
                if musl:
                    return None, False  # musl ignores an rpath with any other '$'
                out.append("$")
                i += 1
                continue
            token, length = matched
            if token == "ORIGIN":
                out.append(obj.origin)
                via_origin = True
            elif token == "PLATFORM":
                out.append(self.cfg.platform)
            else:
                out.append(self.cfg.lib_dst)
            i += 1 + length
        return "".join(out), via_origin

    def _expand_list(self, text: str, obj: _Obj, separators: str) -> tuple[_Dir, ...]:
        dirs: list[_Dir] = []
        for element in re.split(f"[{re.escape(separators)}]", text):
            expanded, via_origin = self._expand(element, obj)
            if expanded is None:
                continue
            if len(expanded) > 1:
                expanded = expanded.rstrip("/") or "/"
            if not expanded.startswith("/"):
                # Relative (or empty = current directory) entries are relative
                # to the process's working directory.
                absolute = self.r.absolute(expanded or ".")
                if absolute is None:
                    self.r.note(f"relative search directory {element!r} of {obj.path} skipped: working directory unknown")
                    continue
                expanded = os.path.normpath(absolute)
            entry = _Dir(expanded, via_origin, element)
            if entry not in dirs:
                dirs.append(entry)
        return tuple(dirs)

    # --- loading ---

    def run(self) -> None:
        self._preload()
        self._drain(0)
        if self.r.runtime and self.cfg.flavour == "glibc":
            start = len(self.objs)
            self._runtime_loads()
            self._drain(start)

    def _drain(self, start: int) -> None:
        """ld.so's breadth-first walk (_dl_map_object_deps) over objects from index `start`."""
        index = start
        while index < len(self.objs):
            obj = self.objs[index]
            index += 1
            if obj is self.rtld:
                continue
            for kind, name in obj.facts.entries:
                dep = self.map(name, obj, quiet=kind == "auxiliary")
                if dep is None:
                    if kind == "auxiliary":
                        self.r.note(f"auxiliary filtee {name} of {obj.path} not found (ld.so ignores that)")
                    continue
                if not dep.is_main:
                    self.r.edge(Dependency(dep.path, obj.path, name, dep.rule, via_origin=dep.via_origin,
                                           search=dep.search))

    def _preload(self) -> None:
        if self.cfg.flavour != "glibc":
            return
        names: list[tuple[str, str]] = []
        if self.r.env.ld_preload:
            names += [(n, "LD_PRELOAD") for n in re.split(r"[ :]", self.r.env.ld_preload) if n]
        try:
            text = read_text(self.r.fs.host("/etc/ld.so.preload"))
            names += [(n, "/etc/ld.so.preload") for n in re.split(r"[ \t\n:]", text) if n]
        except OSError:
            pass
        for name, source in names:
            dep = self.map(name, self.main, quiet=True)
            if dep is None:
                self.r.note(f"{source} entry {name} not found (ld.so ignores it)")
                continue
            self.r.edge(Dependency(dep.path, self.main.path, name, "preload", reason=f"listed in {source}", via_origin=dep.via_origin))

    def map(self, name: str, loader: _Obj, quiet: bool = False) -> _Obj | None:
        """_dl_map_object: the object `name` refers to when `loader` needs it, loading it if new."""
        if self.cfg.flavour == "musl":
            return self._map_musl(name, loader, quiet)
        known = self.names.get(name)
        if known is not None:
            return known
        if "/" in name:
            expanded, via_origin = self._expand(name, loader)
            path = self.r.absolute(expanded) if expanded else None
            if path is None:
                if not quiet:
                    self.r.missing(name, loader.path, (name,))
                return None
            result = self._verify_path(path, "slash", via_origin)
        else:
            result = self._search_glibc(name, loader)
        return self._finish(name, loader, result, quiet)

    def _finish(self, name: str, loader: _Obj, result: _Found | _NotFound, quiet: bool) -> _Obj | None:
        if isinstance(result, _NotFound):
            if result.error:
                self.r.fail(ElfError(result.error))
            if not quiet:
                self.r.missing(name, loader.path, result.searched)
            return None
        same = self.by_file.get(result.facts.file_id)
        if same is not None:
            # The same file under another name: ld.so adds the name to the existing map.
            self.names.setdefault(name, same)
            if self.cfg.flavour == "musl" and same.shortname is None and "/" not in name:
                same.shortname = name
            return same
        problem = _load_problem(result.facts, result.path)
        if problem:
            self.r.fail(ElfError(problem))
            if not quiet:
                self.r.missing(name, loader.path, (result.path,))
            return None
        origin = os.path.dirname(result.path)
        obj = self._new_obj(result.path, result.facts, loader, result.rule, result.via_origin, origin)
        obj.search = result.search
        self.names.setdefault(name, obj)
        if "/" not in name:
            obj.shortname = name
        return obj

    # --- glibc search ---

    def _verify(self, path: str) -> tuple[str, ElfFacts | None, str | None]:
        """open_verify(): ("ok", facts) / ("missing"|"other", None, why) / ("fatal", None, message).

        The checks and their order are glibc's: a file shorter than the
        loader's own ELF header is fatal even before its class is looked at;
        a wrong class or machine only makes the search go on.
        """
        arch = self.cfg.arch
        host = self.r.fs.host(path)
        try:
            facts = self.r.cache.facts(host, path)
        except ElfError as err:
            try:
                too_short = os.stat(host).st_size < (64 if arch.elf_class == ELFCLASS64 else 52)
            except OSError:
                too_short = False
            return "fatal", None, f"{path}: file too short" if too_short else str(err)
        except OSError:
            return "missing", None, None
        if facts is None:
            return "fatal", None, f"{path}: invalid ELF header"
        if facts.size < (64 if arch.elf_class == ELFCLASS64 else 52):
            return "fatal", None, f"{path}: file too short"
        if facts.elf_class != arch.elf_class:
            return "other", None, f"{path} is {facts.class_name}"
        if facts.data != self.main.facts.data:
            return "fatal", None, f"{path}: ELF file data encoding does not match the program's"
        if facts.ident[6] != 1:
            return "fatal", None, f"{path}: ELF file version ident does not match current one"
        abiversion = facts.ident[8]
        if facts.osabi not in (ELFOSABI_SYSV, ELFOSABI_GNU):
            return "fatal", None, f"{path}: ELF file OS ABI invalid"
        if abiversion != 0 and not (facts.osabi == ELFOSABI_GNU and abiversion <= _LIBC_ABI_MAX):
            return "fatal", None, f"{path}: ELF file ABI version invalid"
        if any(facts.ident[9:16]):
            return "fatal", None, f"{path}: nonzero padding in e_ident"
        if facts.e_version != 1:
            return "fatal", None, f"{path}: ELF file version does not match current one"
        if facts.machine != arch.machine:
            return "other", None, f"{path} is for {facts.machine_name}"
        if facts.e_type not in (ET_DYN, ET_EXEC):
            return "fatal", None, f"{path}: only ET_DYN and ET_EXEC can be loaded"
        if not facts.phentsize_ok:
            return "fatal", None, f"{path}: ELF file's phentsize not the expected size"
        return "ok", facts, None

    def _verify_path(self, path: str, rule: str, via_origin: bool) -> _Found | _NotFound:
        verdict, facts, why = self._verify(path)
        if verdict == "ok":
            return _Found(path, facts, rule, via_origin)  # type: ignore[arg-type]
        if verdict == "fatal":
            return _NotFound((path,), why)
        if why:
            self.r.note(f"skipped {why}")
        return _NotFound((path,))

    def _search_dirs(self, name: str, dirs: Iterable[_Dir], rule: str, searched: list[str]) -> _Found | _NotFound | None:
        """open_path(): each directory with its hwcaps subdirectories."""
        for directory in dirs:
            searched.append(directory.path)
            base = "" if directory.path == "/" else directory.path
            for sub in self.cfg.subdirs:
                folder = f"{base}/{sub}" if sub else (base or "/")
                if sub and not self.r.isdir(folder):
                    continue
                candidate = f"{folder.rstrip('/')}/{name}"
                verdict, facts, why = self._verify(candidate)
                if verdict == "ok":
                    return _Found(candidate, facts, rule, directory.via_origin,  # type: ignore[arg-type]
                                  directory.written if rule in ("rpath", "runpath") else "")
                if verdict == "fatal":
                    return _NotFound(tuple(searched), why)
                if verdict == "other" and why:
                    self.r.note(f"skipped {why} (wrong class or machine) while looking for {name}")
        return None

    def _search_glibc(self, name: str, loader: _Obj) -> _Found | _NotFound:
        has_runpath = loader.facts.runpath is not None
        lists: list[tuple[_Dir, ...]] = []
        if not has_runpath:
            lists = list(loader.chain)
            if not loader.descends_from_main and self.main.rpath:
                lists.append(self.main.rpath)
        nodeflib = bool(loader.facts.flags_1 & DF_1_NODEFLIB)
        llp = self._ld_library_path()
        key = (name, tuple(lists), llp, loader.runpath, nodeflib, id(self.cfg))
        memo = self.r._search_memo.get(key)
        if memo is not None:
            return memo
        result = self._search_glibc_uncached(name, lists, llp, loader.runpath, nodeflib)
        self.r._search_memo[key] = result
        return result

    def _ld_library_path(self) -> tuple[_Dir, ...]:
        cached = self._llp
        if cached is None:
            text = self.r.env.ld_library_path
            # DSTs in LD_LIBRARY_PATH expand relative to the executable.
            cached = self._expand_list(text, self.main, ":;") if text else ()
            self._llp = cached
        return cached

    def _search_glibc_uncached(
        self,
        name: str,
        lists: list[tuple[_Dir, ...]],
        llp: tuple[_Dir, ...],
        runpath: tuple[_Dir, ...],
        nodeflib: bool,
    ) -> _Found | _NotFound:
        searched: list[str] = []
        for dirs in lists:
            hit = self._search_dirs(name, dirs, "rpath", searched)
            if hit is not None:
                return hit
        for dirs, rule in ((llp, "ld_library_path"), (runpath, "runpath")):
            if dirs:
                hit = self._search_dirs(name, dirs, rule, searched)
                if hit is not None:
                    return hit
        cfg = self.cfg
        system = set(cfg.system_dirs)
        if cfg.cache is not None:
            searched.append(cfg.cache_file)
            cached = cfg.cache.lookup(
                name,
                accept_flags=cfg.arch.cache_flags.__contains__,
                default_flags=cfg.arch.cache_default,
                hwcaps_priority=cfg.hwcaps_priority,
                isa_level_ok=self._isa_level_ok,
                legacy_hwcap_ok=self._legacy_hwcap_ok,
            )
            if cached is not None and not (nodeflib and os.path.dirname(cached) in system):
                verdict, facts, why = self._verify(cached)
                if verdict == "ok":
                    return _Found(cached, facts, "ld.so.cache", False)  # type: ignore[arg-type]
                if verdict == "fatal":
                    return _NotFound(tuple(searched), why)
        elif cfg.conf_dirs:
            dirs = tuple(_Dir(d, False) for d in cfg.conf_dirs if not (nodeflib and d in system))
            hit = self._search_dirs(name, dirs, "ld.so.conf", searched)
            if hit is not None:
                return hit
        if not nodeflib:
            hit = self._search_dirs(name, tuple(_Dir(d, False) for d in cfg.system_dirs), "default", searched)
            if hit is not None:
                return hit
        return _NotFound(tuple(searched))

    def _isa_level_ok(self, level: int) -> bool:
        # Level n (0 = baseline) needs x86-64-v(n+1); hwcaps_priority lists what the CPU has.
        return level == 0 or f"x86-64-v{level + 1}" in self.cfg.hwcaps_priority

    def _legacy_hwcap_ok(self, hwcap: int) -> bool:
        platform_mask = ((1 << len(_X86_PLATFORMS)) - 1) << _FIRST_PLATFORM_BIT
        platform = hwcap & platform_mask
        if platform and platform != self.cfg.platform_bit:
            return False
        return hwcap & ~(self.cfg.legacy_hwcap_bits | platform_mask) == 0

    # --- musl ---

    def _map_musl(self, name: str, loader: _Obj, quiet: bool) -> _Obj | None:
        if _RESERVED_MUSL.match(name) and self.rtld is not None:
            # musl's libc.so is its dynamic loader; these names never load a file.
            return self.rtld
        if "/" not in name:
            for obj in self.objs:
                if obj.shortname == name:
                    return obj
        else:
            known = self.names.get(name)
            if known is not None:
                return known
        if "/" in name:
            path = self.r.absolute(name)
            result: _Found | _NotFound = (
                self._musl_open(path, "slash", False) if path else _NotFound((name,))
            )
        else:
            result = self._search_musl(name, loader)
        return self._finish(name, loader, result, quiet)

    def _musl_open(self, path: str, rule: str, via_origin: bool) -> _Found | _NotFound:
        # musl takes the first file that opens and fails if it cannot map it.
        verdict, facts, why = self._verify(path)
        if verdict == "ok":
            return _Found(path, facts, rule, via_origin)  # type: ignore[arg-type]
        if verdict == "missing":
            return _NotFound((path,))
        return _NotFound((path,), why if verdict == "fatal" else f"{why}: musl does not skip it")

    def _search_musl(self, name: str, loader: _Obj) -> _Found | _NotFound:
        searched: list[str] = []
        lists: list[tuple[tuple[_Dir, ...], str]] = [(self._ld_library_path(), "ld_library_path")]
        obj: _Obj | None = loader
        while obj is not None:
            if obj.rpath:
                lists.append((obj.rpath, "runpath" if obj.facts.runpath is not None else "rpath"))
            obj = obj.loader
        rule = "ld-musl.path" if self.cfg.musl_dirs_from else "default"
        lists.append((tuple(_Dir(d, False) for d in self.cfg.musl_dirs), rule))
        for dirs, rule in lists:
            for directory in dirs:
                searched.append(directory.path)
                candidate = f"{directory.path.rstrip('/')}/{name}"
                result = self._musl_open(candidate, rule, directory.via_origin)
                if isinstance(result, _Found) or result.error:
                    return result if isinstance(result, _Found) else _NotFound(tuple(searched), result.error)
        return _NotFound(tuple(searched))

    # --- run-time loads ---

    def _runtime_loads(self) -> None:
        libc = next((o for o in self.objs if o.facts.soname == "libc.so.6"), None)
        if libc is None:
            return  # not a dynamically linked glibc program
        for rule in runtime_loads.RUNTIME_LOADS:
            # Every process linked against the same libc, with the same search
            # state, loads the same modules: expand each rule once per such
            # state (its edges are deduplicated anyway).
            key = (rule.name, libc.path, libc.chain, self._ld_library_path(), id(self.cfg))
            if key in self.r.runtime_done:
                continue
            trigger = self._trigger(rule)
            if trigger is None:
                continue
            self.r.runtime_done.add(key)
            if rule.kind == "nss":
                self._load_nss(rule, libc, trigger)
            elif rule.kind == "library":
                for library in rule.libraries:
                    self._runtime_one(library, libc, rule, f"{rule.why}; triggered by {trigger}")
            elif rule.kind == "gconv":
                self._load_gconv(rule, libc, trigger)

    def _trigger(self, rule: runtime_loads.RuntimeLoad) -> str | None:
        path = runtime_loads.matching_trigger_path(rule, self.r.triggers)
        if path is not None:
            return f"{path} in the trace"
        wanted = frozenset(rule.trigger_symbols)
        if not wanted:
            return None
        for obj in list(self.objs):
            if obj is self.rtld:
                continue
            hits = self.r.cache.imports(self.r.fs.host(obj.path), obj.facts, wanted)
            if hits:
                return f"{sorted(hits)[0]}() imported by {obj.path}"
        return None

    def _runtime_one(self, name: str, libc: _Obj, rule: runtime_loads.RuntimeLoad, reason: str) -> bool:
        # These are dlopen()s made by libc, so libc is the loading object.
        obj = self.map(name, libc, quiet=True)
        if obj is None:
            self.r.note(f"run-time load {name} ({rule.name}) not found; glibc tolerates that")
            return False
        self.r.edge(Dependency(obj.path, libc.path, name, f"runtime:{rule.name}", reason=reason, via_origin=obj.via_origin))
        return True

    def _load_nss(self, rule: runtime_loads.RuntimeLoad, libc: _Obj, trigger: str) -> None:
        conf = "/etc/nsswitch.conf"
        try:
            pairs = runtime_loads.parse_nsswitch(read_text(self.r.fs.host(conf)))
        except OSError:
            self.r.note(f"{conf} not found: NSS uses only the services built into libc")
            return
        self.r.edge(Dependency(conf, libc.path, conf, f"runtime:{rule.name}", reason=f"configures NSS; triggered by {trigger}"))
        databases: dict[str, list[str]] = {}
        for database, service in pairs:
            if service not in runtime_loads.NSS_BUILTIN_SERVICES:
                databases.setdefault(service, []).append(database)
        for service, dbs in databases.items():
            module = runtime_loads.nss_module_name(service)
            reason = f"{rule.why}: service '{service}' for {', '.join(dbs)} in {conf}; triggered by {trigger}"
            self._runtime_one(module, libc, rule, reason)

    def _load_gconv(self, rule: runtime_loads.RuntimeLoad, libc: _Obj, trigger: str) -> None:
        gconv_dir = f"{self.cfg.libdir}/gconv"
        configs = [f"{gconv_dir}/gconv-modules", f"{gconv_dir}/gconv-modules.cache"]
        conf_d = f"{gconv_dir}/gconv-modules.d"
        configs += [f"{conf_d}/{n}" for n in self.r.fs.tree.listdir(conf_d) if n.endswith(".conf")]
        modules: list[str] = []
        for conf in configs:
            if self.r.fs.tree.resolve(conf).kind is not NodeKind.FILE:
                continue
            self.r.edge(Dependency(conf, libc.path, conf, f"runtime:{rule.name}", reason=f"iconv configuration; triggered by {trigger}"))
            if conf.endswith(".cache"):
                continue
            for module in runtime_loads.parse_gconv_modules(self.r.fs.tree.read_text(conf) or ""):
                if module not in modules:
                    modules.append(module)
        if not modules:
            self.r.note(f"no gconv modules configured under {gconv_dir}")
            return
        reason = f"{rule.why} ({len(modules)} modules); triggered by {trigger}"
        for module in modules:
            path = module if module.startswith("/") else f"{gconv_dir}/{module}"
            self._runtime_one(path + ".so", libc, rule, reason)


def _load_problem(facts: ElfFacts, path: str) -> str | None:
    """Why ld.so would refuse to load `facts` as a shared object, if it would."""
    if facts.e_type == ET_EXEC:
        return f"{path}: cannot dynamically load executable"
    if facts.e_type != ET_DYN:
        return f"{path}: only ET_DYN and ET_EXEC can be loaded"
    if facts.flags_1 & DF_1_PIE:
        return f"{path}: cannot dynamically load position-independent executable"
    return None


# --- entry points -------------------------------------------------------------------


def resolve(
    paths: Iterable[str],
    env: LoaderEnv = LoaderEnv(),
    *,
    cache: ElfCache | None = None,
    strict: bool = True,
    runtime_triggers: Iterable[str] = (),
    runtime: bool | None = None,
    root: Root | None = None,
) -> Closure:
    """The loader closure of `paths` (ELF files and #! scripts; other files are ignored).

    strict: raise ElfError / TracejailError on the first unreadable or corrupt
    file; otherwise record the message in Closure.errors and go on.

    runtime_triggers: paths the trace saw; known run-time loads
    (:mod:`tracejail.runtime_loads`) whose trigger path is among them are
    added with rule "runtime:<name>".  runtime: also fire run-time loads whose
    trigger is an imported symbol; defaults to True when runtime_triggers are
    given (a trace) and False otherwise (the ldd view).

    root: the tree to resolve in (shared with the caller's other stages); by default a new
    root.Root for `env.root`.
    """
    triggers = tuple(runtime_triggers)
    if runtime is None:
        runtime = bool(triggers)
    tree = root if root is not None else Root(env.root)
    resolver = _Resolver(env, cache if cache is not None else ElfCache(), strict, triggers, runtime, tree)
    for path in paths:
        resolver.add_root(path)
    return Closure(
        roots=resolver.roots,
        deps=list(resolver.deps.values()),
        unresolved=list(resolver.unresolved.values()),
        errors=resolver.errors,
        notes=resolver.notes,
    )


_QUIET_RULES = ("ld.so.cache", "default")


def _describe(dep: Dependency) -> str:
    if dep.rule in _QUIET_RULES:
        return ""
    tag = dep.rule + (" $ORIGIN" if dep.via_origin else "")
    text = f" [{tag}]"
    if dep.rule.startswith("runtime:") and dep.reason:
        text += f" ({dep.reason})"
    return text


def format_tree(closure: Closure) -> str:
    """An lddtree-like view: each root, then what it needs, indented.

    Each file appears once per root, under the object that made the loader
    load it first (the breadth-first order ld.so itself follows).
    """
    children: dict[str, list[Dependency]] = {}
    for dep in closure.deps:
        children.setdefault(dep.needed_by, []).append(dep)
    missing: dict[str, list[Unresolved]] = {}
    for item in closure.unresolved:
        missing.setdefault(item.needed_by, []).append(item)
    lines: list[str] = []

    for root in closure.roots:
        interp = next((d for d in children.get(root, []) if d.rule == "interp"), None)
        lines.append(root + (f" (interpreter => {interp.path})" if interp else ""))
        # Breadth first: the first object to reach a file becomes its parent.
        seen = {root} | ({interp.path} if interp else set())
        tree: dict[str, list[Dependency]] = {}
        queue = [root]
        while queue:
            node = queue.pop(0)
            for dep in children.get(node, []):
                if dep.path in seen:
                    continue
                seen.add(dep.path)
                tree.setdefault(node, []).append(dep)
                queue.append(dep.path)

        def walk(node: str, depth: int) -> None:
            indent = "    " * depth
            for dep in tree.get(node, []):
                lines.append(f"{indent}{dep.name} => {dep.path}{_describe(dep)}")
                walk(dep.path, depth + 1)
            for item in missing.get(node, []):
                lines.append(f"{indent}{item.name} => not found")

        walk(root, 1)
    for error in closure.errors:
        lines.append(f"error: {error}")
    for item in closure.unresolved:
        searched = ", ".join(item.searched) or "nothing"
        lines.append(f"not found: {item.name} (needed by {item.needed_by}; searched {searched})")
    return "\n".join(lines) + ("\n" if lines else "")
