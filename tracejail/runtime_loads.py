"""Known run-time loads: libraries glibc dlopen()s by itself, which `ldd` never shows.

A static closure (DT_NEEDED, PT_INTERP) misses the shared objects that the C
library loads on demand.  A recording shows them only if the recorded run
happened to take that code path, so an image built from one recording can
fail on the next run (another user name, a cancelled thread, a different
charset).  This module lists those loads as data: what triggers each one, what
it loads, and the sentence that tells the user why it is in the closure.

A rule fires for a traced process when

* one of its ``trigger_paths`` (fnmatch patterns) matches a path the trace
  saw, e.g. glibc reads ``/etc/nsswitch.conf`` on the first NSS call; or
* an object of the process imports one of its ``trigger_symbols`` (an undefined
  symbol in ``.dynsym``), e.g. ``pthread_cancel``.

What a fired rule makes the C library read and dlopen() is worked out here by
:func:`expand`, from the configuration files in the root being resolved
(nsswitch.conf for NSS, gconv-modules for iconv); the closure's link-map walk
then finds each named library with the loader's own search rules.
"""
from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from .root import NodeKind, Root


class LoadKind(enum.Enum):
    """How a rule's libraries are named."""

    NSS = "nss"          # one module per service configured in nsswitch.conf
    LIBRARY = "library"  # fixed library names
    GCONV = "gconv"      # every converter module configured in gconv-modules


@dataclass(frozen=True)
class RuntimeLoad:
    """One kind of library that glibc loads at run time without DT_NEEDED."""

    name: str  # used as Dependency.rule "runtime:<name>"
    kind: LoadKind
    why: str  # human explanation, shown as part of Dependency.reason
    trigger_paths: tuple[str, ...] = ()
    trigger_symbols: tuple[str, ...] = ()
    libraries: tuple[str, ...] = ()  # for kind "library": names dlopen()ed


RUNTIME_LOADS: tuple[RuntimeLoad, ...] = (
    RuntimeLoad(
        name="nss",
        kind=LoadKind.NSS,
        why=(
            "glibc's Name Service Switch dlopen()s libnss_<service>.so.2 for each "
            "service named in /etc/nsswitch.conf ('files' and 'dns' are built into "
            "libc since glibc 2.34)"
        ),
        # Only when the run read nsswitch.conf: the image holds that file only then, and
        # without it glibc uses its built-in 'files'/'dns', so no module is ever loaded. (A
        # symbol trigger such as getpwuid_r would add libnss_systemd to every Rust binary.)
        trigger_paths=("/etc/nsswitch.conf",),
    ),
    RuntimeLoad(
        name="libgcc_s",
        kind=LoadKind.LIBRARY,
        why=(
            "glibc dlopen()s libgcc_s.so.1 to unwind the stack when a thread is "
            "cancelled or calls pthread_exit(); without it the process aborts with "
            "'libgcc_s.so.1 must be installed for pthread_cancel to work'"
        ),
        trigger_symbols=("pthread_cancel", "pthread_exit"),
        libraries=("libgcc_s.so.1",),
    ),
    RuntimeLoad(
        name="gconv",
        kind=LoadKind.GCONV,
        why=(
            "iconv_open() reads the gconv-modules configuration and dlopen()s the "
            "converter module for each charset pair; which charsets a later run "
            "needs depends on its data, so every configured module is included"
        ),
        # A converter module in the trace is the sign that iconv is really used. Reading
        # gconv-modules(.cache) alone is not: glibc reads it on setlocale() and for the
        # charsets built into libc, so even `ls` does, and ~8 MB would join every image.
        trigger_paths=("*/gconv/*.so",),
        # No symbol trigger: libstdc++ imports iconv_open, so one would pull
        # every converter (~8 MB) into each C++ program's image.  glibc reads
        # gconv-modules(.cache) on the first real iconv_open(), which the
        # trace shows.
    ),
)

# NSS services implemented inside libc.so.6 itself (glibc >= 2.34): no module
# is loaded for them.
NSS_BUILTIN_SERVICES = frozenset({"files", "dns"})


def matching_trigger_path(rule: RuntimeLoad, paths: Iterable[str]) -> str | None:
    """The first traced path that fires `rule`, if any."""
    for path in paths:
        for pattern in rule.trigger_paths:
            if fnmatch.fnmatchcase(path, pattern):
                return path
    return None


def parse_nsswitch(text: str) -> list[tuple[str, str]]:
    """(database, service) pairs in file order, from nsswitch.conf text.

    Action items such as ``[NOTFOUND=return]`` are not services and are dropped.
    """
    pairs: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if ":" not in line:
            continue
        database, _, rest = line.partition(":")
        database = database.strip()
        # Remove bracketed action lists, which may contain spaces.
        cleaned: list[str] = []
        depth = 0
        for ch in rest:
            if ch == "[":
                depth += 1
            elif ch == "]":
                depth = max(0, depth - 1)
                cleaned.append(" ")
            elif depth == 0:
                cleaned.append(ch)
        for service in "".join(cleaned).split():
            pairs.append((database, service))
    return pairs


def nss_module_name(service: str) -> str:
    # NSS_SHLIB_REVISION is ".2" for every glibc since 2.1.
    return f"libnss_{service}.so.2"


def parse_gconv_modules(text: str) -> list[str]:
    """Module file names (without the .so suffix) named by a gconv-modules file.

    A line reads ``module FROM TO FILE [COST]``; ``alias`` lines name no file.
    """
    files: list[str] = []
    for raw in text.splitlines():
        fields = raw.split("#", 1)[0].split()
        if len(fields) >= 4 and fields[0] == "module":
            if fields[3] not in files:
                files.append(fields[3])
    return files


NSSWITCH_CONF = "/etc/nsswitch.conf"


@dataclass(frozen=True)
class RuntimeFile:
    """A file a fired rule makes the C library read or dlopen(), and why."""

    path: str  # a configuration file's path, or a library's name or path to find
    reason: str


@dataclass(frozen=True)
class Expansion:
    """What one fired rule adds to a process."""

    configs: tuple[RuntimeFile, ...]     # configuration files read (joining the closure as they are)
    libraries: tuple[RuntimeFile, ...]   # libraries dlopen()ed, found with the loader's search rules
    notes: tuple[str, ...] = ()


def expand(rule: RuntimeLoad, tree: Root, libdir: str, trigger: str) -> Expansion:
    """What `rule`, fired by `trigger`, makes glibc read and load in `tree`; `libdir` is the
    loader's /usr/$LIB, where gconv lives."""
    if rule.kind is LoadKind.NSS:
        return _nss(rule, tree, trigger)
    if rule.kind is LoadKind.GCONV:
        return _gconv(rule, tree, libdir, trigger)
    reason = f"{rule.why}; triggered by {trigger}"
    return Expansion((), tuple(RuntimeFile(name, reason) for name in rule.libraries))


def _nss(rule: RuntimeLoad, tree: Root, trigger: str) -> Expansion:
    text = tree.read_text(NSSWITCH_CONF)
    if text is None:
        return Expansion((), (), (f"{NSSWITCH_CONF} not found: NSS uses only the services built into libc",))
    databases: dict[str, list[str]] = {}
    for database, service in parse_nsswitch(text):
        if service not in NSS_BUILTIN_SERVICES:
            databases.setdefault(service, []).append(database)
    modules = tuple(
        RuntimeFile(nss_module_name(service),
                    f"{rule.why}: service '{service}' for {', '.join(dbs)} in {NSSWITCH_CONF}; triggered by {trigger}")
        for service, dbs in databases.items()
    )
    return Expansion((RuntimeFile(NSSWITCH_CONF, f"configures NSS; triggered by {trigger}"),), modules)


def _gconv(rule: RuntimeLoad, tree: Root, libdir: str, trigger: str) -> Expansion:
    gconv_dir = f"{libdir}/gconv"
    candidates = [f"{gconv_dir}/gconv-modules", f"{gconv_dir}/gconv-modules.cache"]
    conf_d = f"{gconv_dir}/gconv-modules.d"
    candidates += [f"{conf_d}/{n}" for n in tree.listdir(conf_d) if n.endswith(".conf")]
    configs: list[RuntimeFile] = []
    modules: list[str] = []
    for conf in candidates:
        if tree.resolve(conf).kind is not NodeKind.FILE:
            continue
        configs.append(RuntimeFile(conf, f"iconv configuration; triggered by {trigger}"))
        if conf.endswith(".cache"):
            continue  # a binary digest of the text files, which name the same modules
        for module in parse_gconv_modules(tree.read_text(conf) or ""):
            if module not in modules:
                modules.append(module)
    if not modules:
        return Expansion(tuple(configs), (), (f"no gconv modules configured under {gconv_dir}",))
    reason = f"{rule.why} ({len(modules)} modules); triggered by {trigger}"
    libraries = tuple(
        RuntimeFile((module if module.startswith("/") else f"{gconv_dir}/{module}") + ".so", reason) for module in modules
    )
    return Expansion(tuple(configs), libraries)
