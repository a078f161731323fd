"""How a loader finds the file behind a name: one search protocol, with glibc's and musl's rules.

The link-map walk (:mod:`.linkmap`) asks its :class:`Search` which object a name refers to; the
two implementations differ in every step, so each keeps its own rules whole instead of
branching per step:

* glibc (elf/dl-load.c ``_dl_map_object``): names already loaded, by name, path or DT_SONAME;
  slash names after $ORIGIN/$LIB/$PLATFORM expansion; DT_RPATH up the loader chain unless the
  loader has DT_RUNPATH; LD_LIBRARY_PATH; DT_RUNPATH; ld.so.cache (or ld.so.conf); the
  compiled-in directories. Each directory with its hwcaps subdirectories; a candidate of the
  wrong class or machine is skipped.
* musl (ldso/dynlink.c ``load_library``): the reserved libc names are the loader itself; names
  are matched by the short name they were loaded under; LD_LIBRARY_PATH, then the RUNPATH (or
  RPATH) of the loader and of every object above it, then /etc/ld-musl-$ARCH.path. Only
  $ORIGIN is expanded, and the first file that opens is taken, or the load fails.
"""
from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..elf import DF_1_NODEFLIB, DF_1_PIE, ELFOSABI_GNU, ELFOSABI_SYSV, ET_DYN, ET_EXEC, _LIBC_ABI_MAX, ElfFacts, read_file
from ..errors import ElfError
from .config import LD_SO_CACHE, Arch, GlibcConfig, MuslConfig, arch_for, glibc_config, is_musl_program, musl_config
from .files import LoaderFiles
from .model import Results

if TYPE_CHECKING:
    from .linkmap import LinkMap


@dataclass(frozen=True)
class Dir:
    """One search directory."""

    path: str  # no trailing slash, except "/" itself
    via_origin: bool
    written: str = ""  # the DT_RPATH/DT_RUNPATH entry it was expanded from


@dataclass(eq=False)
class Loaded:
    """One link map entry: an object loaded into the modelled process."""

    path: str  # l_name: the path as the loader spelled it
    facts: ElfFacts
    loader: Loaded | None  # l_loader: the object whose dependency caused the load
    rule: str
    via_origin: bool
    origin: str  # $ORIGIN
    is_main: bool = False
    rpath: tuple[Dir, ...] = ()
    runpath: tuple[Dir, ...] = ()
    chain: tuple[tuple[Dir, ...], ...] = ()  # DT_RPATH lists: own, loader's, ... up to the executable
    descends_from_main: bool = False
    shortname: str | None = None  # the name it was found under by a search (musl matches on it)
    search: str = ""  # the rpath/runpath entry it was found through


@dataclass(frozen=True)
class Found:
    path: str
    facts: ElfFacts
    rule: str
    via_origin: bool
    search: str = ""  # the search-list entry that found it (rpath/runpath)


@dataclass(frozen=True)
class NotFound:
    searched: tuple[str, ...]
    error: str | None = None  # a fatal error that ended the search (the loader stops there)


class Verdict(enum.Enum):
    """What open_verify() makes of a candidate file."""

    OK = "ok"
    MISSING = "missing"    # no such file: the search goes on
    OTHER = "other"        # a valid ELF file of another class or machine: glibc goes on
    FATAL = "fatal"        # the loader stops with an error


def open_verify(files: LoaderFiles, path: str, arch: Arch, data: int) -> tuple[Verdict, ElfFacts | None, str | None]:
    """glibc's open_verify(): whether `path` can be loaded into a process of `arch` whose
    program has ELF data encoding `data`, and why not.

    The checks and their order are glibc's: a file shorter than the loader's own ELF header is
    fatal even before its class is looked at; a wrong class or machine only makes the search
    go on.
    """
    host = files.host(path)
    try:
        facts = files.elf.facts(host, path)
    except ElfError as err:
        try:
            head = read_file(host, arch.header_size)
        except OSError:
            head = b""
        if len(head) < arch.header_size:
            return Verdict.FATAL, None, f"{path}: file too short"
        if head[4] != arch.elf_class:
            # ld.so compares the class byte with its own only: any other value (0, 3...) is
            # "another class", and the search goes on.
            return Verdict.OTHER, None, f"{path} is of ELF class {head[4]}"
        return Verdict.FATAL, None, str(err)
    except OSError:
        return Verdict.MISSING, None, None
    if facts is None:
        # ld.so reads a whole header before it looks at the magic.
        try:
            too_short = os.stat(host).st_size < arch.header_size
        except OSError:
            too_short = False
        return Verdict.FATAL, None, f"{path}: file too short" if too_short else f"{path}: invalid ELF header"
    if facts.size < arch.header_size:
        return Verdict.FATAL, None, f"{path}: file too short"
    if facts.elf_class != arch.elf_class:
        return Verdict.OTHER, None, f"{path} is {facts.class_name}"
    if facts.data != data:
        return Verdict.FATAL, None, f"{path}: ELF file data encoding does not match the program's"
    if facts.ident[6] != 1:
        return Verdict.FATAL, None, f"{path}: ELF file version ident does not match current one"
    abiversion = facts.ident[8]
    if facts.osabi not in (ELFOSABI_SYSV, ELFOSABI_GNU):
        return Verdict.FATAL, None, f"{path}: ELF file OS ABI invalid"
    if abiversion != 0 and not (facts.osabi == ELFOSABI_GNU and abiversion <= _LIBC_ABI_MAX):
        return Verdict.FATAL, None, f"{path}: ELF file ABI version invalid"
    if any(facts.ident[9:16]):
        return Verdict.FATAL, None, f"{path}: nonzero padding in e_ident"
    if facts.e_version != 1:
        return Verdict.FATAL, None, f"{path}: ELF file version does not match current one"
    if facts.machine != arch.machine:
        return Verdict.OTHER, None, f"{path} is for {facts.machine_name}"
    if facts.e_type not in (ET_DYN, ET_EXEC):
        return Verdict.FATAL, None, f"{path}: only ET_DYN and ET_EXEC can be loaded"
    if not facts.phentsize_ok:
        return Verdict.FATAL, None, f"{path}: ELF file's phentsize not the expected size"
    return Verdict.OK, facts, None


def load_problem(facts: ElfFacts, path: str) -> str | None:
    """Why a loader would refuse to load `facts` as a shared object, if it would."""
    if facts.e_type == ET_EXEC:
        return f"{path}: cannot dynamically load executable"
    if facts.e_type != ET_DYN:
        return f"{path}: only ET_DYN and ET_EXEC can be loaded"
    if facts.flags_1 & DF_1_PIE:
        return f"{path}: cannot dynamically load position-independent executable"
    return None



class Search(Protocol):
    """One C library's rules for finding what a name refers to, in one loader configuration."""

    arch: Arch
    interp: str                # the loader itself: the program's PT_INTERP, or the usual one
    names_by_soname: bool      # an object is also known by its DT_SONAME
    runtime_libdir: str | None   # /usr/$LIB for the C library's run-time loads; None: not modelled

    def search_lists(self, facts: ElfFacts, origin: str, shown: str) -> tuple[tuple[Dir, ...], tuple[Dir, ...]]:
        """An object's own (DT_RPATH, DT_RUNPATH) search lists, expanded."""
        ...

    def library_path(self, text: str, origin: str, shown: str) -> tuple[Dir, ...]:
        """LD_LIBRARY_PATH, expanded against the executable's $ORIGIN."""
        ...

    def lookup(self, name: str, loader: Loaded, link: LinkMap) -> Loaded | Found | NotFound:
        """The object `name` refers to when `loader` needs it: one already in `link`, or a file."""
        ...

    def preloads(self, ld_preload: str | None) -> list[tuple[str, str]]:
        """Names loaded before the program's own dependencies, with where each is listed."""
        ...


_DST_TOKENS = ("ORIGIN", "PLATFORM", "LIB")


class _SearchLists:
    """Search lists (DT_RPATH, DT_RUNPATH, LD_LIBRARY_PATH) made into directories; each loader
    says how a list is split and its tokens expanded."""

    def __init__(self, files: LoaderFiles, results: Results) -> None:
        self.files = files
        self.results = results

    def _dirs(self, elements: list[tuple[str, str, bool]], shown: str) -> tuple[Dir, ...]:
        """Directories from (as written, expanded, came from $ORIGIN) elements, in order, once each."""
        dirs: list[Dir] = []
        for element, expanded, via_origin in elements:
            if len(expanded) > 1:
                expanded = expanded.rstrip("/") or "/"
            if not expanded.startswith("/"):
                # Relative (or empty = current directory) entries are relative
                # to the process's working directory.
                absolute = self.files.absolute(expanded or ".")
                if absolute is None:
                    self.results.note(f"relative search directory {element!r} of {shown} skipped: working directory unknown")
                    continue
                expanded = os.path.normpath(absolute)
            entry = Dir(expanded, via_origin, element)
            if entry not in dirs:
                dirs.append(entry)
        return tuple(dirs)


def _ends_token(rest: str, length: int) -> bool:
    """ld.so's is_dst(): a bare token ends where a name character (ASCII letter, digit, _) cannot
    continue it."""
    if len(rest) == length:
        return True
    follower = rest[length]
    return not (follower.isascii() and (follower.isalnum() or follower == "_"))


class GlibcSearch(_SearchLists):
    names_by_soname = True

    def __init__(self, files: LoaderFiles, results: Results, config: GlibcConfig) -> None:
        super().__init__(files, results)
        self.config = config
        self.arch = config.arch
        self.interp = config.interp or config.arch.glibc_interp
        self.runtime_libdir = config.libdir
        # Every process searched with the same lists finds the same file: shared by all the
        # processes this configuration serves.
        self._memo: dict[tuple[object, ...], Found | NotFound] = {}

    def expand(self, text: str, origin: str) -> tuple[str, bool]:
        """Expand $ORIGIN, $LIB, $PLATFORM (and ${...}) as ld.so does; another '$' stays as it is."""
        if "$" not in text:
            return text, False
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
            for token in _DST_TOKENS:
                if rest.startswith("{" + token + "}"):
                    matched = (token, len(token) + 2)
                    break
                if rest.startswith(token) and _ends_token(rest, len(token)):
                    matched = (token, len(token))
                    break
            if matched is None:
                out.append("$")
                i += 1
                continue
            token, length = matched
            if token == "ORIGIN":
                out.append(origin)
                via_origin = True
            elif token == "PLATFORM":
                out.append(self.config.platform)
            else:
                out.append(self.config.lib_dst)
            i += 1 + length
        return "".join(out), via_origin

    def expand_list(self, text: str, origin: str, separators: str, shown: str) -> tuple[Dir, ...]:
        # An empty element is the working directory.
        elements = [(e, *self.expand(e, origin)) for e in re.split(f"[{re.escape(separators)}]", text)]
        return self._dirs(elements, shown)

    def library_path(self, text: str, origin: str, shown: str) -> tuple[Dir, ...]:
        return self.expand_list(text, origin, ":;", shown)

    def search_lists(self, facts: ElfFacts, origin: str, shown: str) -> tuple[tuple[Dir, ...], tuple[Dir, ...]]:
        if facts.runpath is not None:
            return (), self.expand_list(facts.runpath, origin, ":", shown)
        if facts.rpath is not None:
            return self.expand_list(facts.rpath, origin, ":", shown), ()
        return (), ()

    def preloads(self, ld_preload: str | None) -> list[tuple[str, str]]:
        names: list[tuple[str, str]] = []
        if ld_preload:
            names += [(n, "LD_PRELOAD") for n in re.split(r"[ :]", ld_preload) if n]
        text = self.files.tree.read_text("/etc/ld.so.preload")
        if text is not None:
            names += [(n, "/etc/ld.so.preload") for n in re.split(r"[ \t\n:]", text) if n]
        return names

    def lookup(self, name: str, loader: Loaded, link: LinkMap) -> Loaded | Found | NotFound:
        known = link.names.get(name)
        if known is not None:
            return known
        data = link.main.facts.data
        if "/" in name:
            expanded, via_origin = self.expand(name, loader.origin)
            path = self.files.absolute(expanded) if expanded else None
            if path is None:
                return NotFound((name,))
            return self._open(path, "slash", via_origin, data)
        lists: list[tuple[Dir, ...]] = []
        if loader.facts.runpath is None:
            lists = list(loader.chain)
            if not loader.descends_from_main and link.main.rpath:
                lists.append(link.main.rpath)
        nodeflib = bool(loader.facts.flags_1 & DF_1_NODEFLIB)
        llp = link.library_path()
        key = (name, tuple(lists), llp, loader.runpath, nodeflib, data)
        result = self._memo.get(key)
        if result is None:
            result = self._search(name, lists, llp, loader.runpath, nodeflib, data)
            self._memo[key] = result
        return result

    def _open(self, path: str, rule: str, via_origin: bool, data: int) -> Found | NotFound:
        verdict, facts, why = open_verify(self.files, path, self.arch, data)
        if verdict is Verdict.OK:
            return Found(path, facts, rule, via_origin)  # type: ignore[arg-type]
        if verdict is Verdict.FATAL:
            return NotFound((path,), why)
        if why:
            self.results.note(f"skipped {why}")
        return NotFound((path,))

    def _search_dirs(self, name: str, dirs: Iterable[Dir], rule: str, searched: list[str], data: int) -> Found | NotFound | None:
        """open_path(): each directory with its hwcaps subdirectories."""
        for directory in dirs:
            searched.append(directory.path)
            base = "" if directory.path == "/" else directory.path
            for sub in self.config.subdirs:
                folder = f"{base}/{sub}" if sub else (base or "/")
                if sub and not self.files.isdir(folder):
                    continue
                candidate = f"{folder.rstrip('/')}/{name}"
                verdict, facts, why = open_verify(self.files, candidate, self.arch, data)
                if verdict is Verdict.OK:
                    return Found(candidate, facts, rule, directory.via_origin,  # type: ignore[arg-type]
                                 directory.written if rule in ("rpath", "runpath") else "")
                if verdict is Verdict.FATAL:
                    return NotFound(tuple(searched), why)
                if verdict is Verdict.OTHER and why:
                    self.results.note(f"skipped {why} (wrong class or machine) while looking for {name}")
        return None

    def _search(
        self,
        name: str,
        lists: list[tuple[Dir, ...]],
        llp: tuple[Dir, ...],
        runpath: tuple[Dir, ...],
        nodeflib: bool,
        data: int,
    ) -> Found | NotFound:
        searched: list[str] = []
        for dirs in lists:
            hit = self._search_dirs(name, dirs, "rpath", searched, data)
            if hit is not None:
                return hit
        for dirs, rule in ((llp, "ld_library_path"), (runpath, "runpath")):
            if dirs:
                hit = self._search_dirs(name, dirs, rule, searched, data)
                if hit is not None:
                    return hit
        cfg = self.config
        system = set(cfg.system_dirs)
        if cfg.cache is not None:
            searched.append(LD_SO_CACHE)
            cached = cfg.cache.lookup(
                name,
                accept_flags=cfg.arch.cache_flags.__contains__,
                default_flags=cfg.arch.cache_default,
                hwcaps_priority=cfg.hwcaps_priority,
                isa_level_ok=cfg.isa_level_ok,
                legacy_hwcap_ok=cfg.legacy_hwcap_ok,
            )
            if cached is not None and not (nodeflib and os.path.dirname(cached) in system):
                verdict, facts, why = open_verify(self.files, cached, self.arch, data)
                if verdict is Verdict.OK:
                    return Found(cached, facts, "ld.so.cache", False)  # type: ignore[arg-type]
                if verdict is Verdict.FATAL:
                    return NotFound(tuple(searched), why)
        elif cfg.conf_dirs:
            dirs = tuple(Dir(d, False) for d in cfg.conf_dirs if not (nodeflib and d in system))
            hit = self._search_dirs(name, dirs, "ld.so.conf", searched, data)
            if hit is not None:
                return hit
        if not nodeflib:
            hit = self._search_dirs(name, tuple(Dir(d, False) for d in cfg.system_dirs), "default", searched, data)
            if hit is not None:
                return hit
        return NotFound(tuple(searched))


# musl's libc.so is its dynamic loader: a name that starts with one of these (libc.so,
# libc.so.6, libm.so.6, Alpine's libc.musl-x86_64.so.1...) never loads a file.
_RESERVED_MUSL = re.compile(r"^lib(c|pthread|rt|m|dl|util|xnet)\.")


class MuslSearch(_SearchLists):
    names_by_soname = False
    runtime_libdir = None  # musl's iconv and name lookups are built in: nothing is dlopen()ed

    def __init__(self, files: LoaderFiles, results: Results, config: MuslConfig) -> None:
        super().__init__(files, results)
        self.config = config
        self.arch = config.arch
        self.interp = config.interp or config.arch.musl_interp

    def expand_list(self, text: str, origin: str, separators: str, shown: str) -> tuple[Dir, ...]:
        """fixup_rpath(): $ORIGIN (or ${ORIGIN}) is the only token, and one '$' that starts
        anything else makes musl ignore the whole list; then path_open()'s split, at ':' and
        newlines, empty entries skipped."""
        if "$" in text:
            at = text.find("$")
            while at >= 0:
                if not text.startswith(("$ORIGIN", "${ORIGIN}"), at):
                    self.results.note(f"search path {text!r} of {shown} ignored, as musl does: "
                                      "$ORIGIN is the only token it expands")
                    return ()
                at = text.find("$", at + 1)
        elements = [(e, e.replace("${ORIGIN}", origin).replace("$ORIGIN", origin), "$" in e)
                    for e in re.split("[:\n]", text) if e]
        return self._dirs(elements, shown)

    def library_path(self, text: str, origin: str, shown: str) -> tuple[Dir, ...]:
        # Taken as written: musl expands no token in LD_LIBRARY_PATH.
        return self._dirs([(e, e, False) for e in re.split("[:\n]", text) if e], shown)

    def search_lists(self, facts: ElfFacts, origin: str, shown: str) -> tuple[tuple[Dir, ...], tuple[Dir, ...]]:
        # DT_RUNPATH if present, else DT_RPATH; either is inherited by what the object loads.
        source = facts.runpath if facts.runpath is not None else facts.rpath
        if source is None:
            return (), ()
        return self.expand_list(source, origin, ":", shown), ()

    def preloads(self, ld_preload: str | None) -> list[tuple[str, str]]:
        return []  # not modelled for musl

    def lookup(self, name: str, loader: Loaded, link: LinkMap) -> Loaded | Found | NotFound:
        if _RESERVED_MUSL.match(name) and link.rtld is not None:
            return link.rtld
        data = link.main.facts.data
        if "/" in name:
            known = link.names.get(name)
            if known is not None:
                return known
            path = self.files.absolute(name)
            return self._open(path, "slash", False, data) if path else NotFound((name,))
        for obj in link.objects:
            if obj.shortname == name:
                return obj
        searched: list[str] = []
        lists: list[tuple[tuple[Dir, ...], str]] = [(link.library_path(), "ld_library_path")]
        above: Loaded | None = loader
        while above is not None:
            if above.rpath:
                lists.append((above.rpath, "runpath" if above.facts.runpath is not None else "rpath"))
            above = above.loader
        system_rule = "ld-musl.path" if self.config.dirs_from else "default"
        lists.append((tuple(Dir(d, False) for d in self.config.dirs), system_rule))
        for dirs, rule in lists:
            for directory in dirs:
                searched.append(directory.path)
                candidate = f"{directory.path.rstrip('/')}/{name}"
                result = self._open(candidate, rule, directory.via_origin, data)
                if isinstance(result, Found):
                    return result
                if result.error:
                    return NotFound(tuple(searched), result.error)
        return NotFound(tuple(searched))

    def _open(self, path: str, rule: str, via_origin: bool, data: int) -> Found | NotFound:
        # musl takes the first file that opens and fails if it cannot map it.
        verdict, facts, why = open_verify(self.files, path, self.arch, data)
        if verdict is Verdict.OK:
            return Found(path, facts, rule, via_origin)  # type: ignore[arg-type]
        if verdict is Verdict.MISSING:
            return NotFound((path,))
        return NotFound((path,), why if verdict is Verdict.FATAL else f"{why}: musl does not skip it")


class Searches:
    """One search per loader configuration (C library, architecture, interpreter), shared by
    every process of one `resolve` call, so that their memos are too."""

    def __init__(self, files: LoaderFiles, results: Results) -> None:
        self.files = files
        self.results = results
        self._by_key: dict[tuple[object, ...], Search] = {}

    def for_program(self, facts: ElfFacts) -> Search:
        arch = arch_for(facts)
        musl = is_musl_program(facts)
        key = (musl, arch, facts.interp)
        search = self._by_key.get(key)
        if search is None:
            if musl:
                search = MuslSearch(self.files, self.results, musl_config(self.files, arch, facts.interp))
            else:
                search = GlibcSearch(self.files, self.results,
                                     glibc_config(self.files, arch, facts.interp, self.results.note))
            self._by_key[key] = search
        return search
