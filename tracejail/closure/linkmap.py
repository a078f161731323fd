"""The link-map walk: one modelled process, its objects loaded breadth first as ld.so does.

The walk is the same for every C library (elf/dl-deps.c ``_dl_map_object_deps``): the program,
its interpreter, the preloads, then each object's DT_NEEDED (and filtee) entries in order, an
object found again under another name or by another path being the same map. What a name
refers to is the :class:`~.search.Search`'s answer; the run-time loads of the C library
(:mod:`tracejail.runtime_loads`) are mapped last, as dlopen()s made by libc.
"""
from __future__ import annotations

import os

from .. import runtime_loads
from ..elf import ElfCache, ElfFacts
from ..errors import ElfError
from .files import LoaderFiles
from .model import Dependency, Results
from .search import Dir, Found, Loaded, NotFound, Search, load_problem


class RuntimeContext:
    """What the run-time load rules need beyond one process: the paths the trace saw, and which
    rules were already expanded (every process linked against the same libc, with the same
    search state, loads the same modules, so each rule is expanded once per such state)."""

    def __init__(self, triggers: tuple[str, ...], elf: ElfCache) -> None:
        self.triggers = triggers
        self.elf = elf
        self.expanded: set[tuple[object, ...]] = set()
        self._by_path: dict[str, str | None] = {}

    def path_trigger(self, rule: runtime_loads.RuntimeLoad) -> str | None:
        """The first traced path that fires `rule`: the same for every process, so looked for
        once (matching every traced path took a tenth of a rebuild)."""
        if rule.name not in self._by_path:
            self._by_path[rule.name] = runtime_loads.matching_trigger_path(rule, self.triggers)
        return self._by_path[rule.name]


class LinkMap:
    """One run of the dynamic loader with `main_path` as the program."""

    def __init__(self, files: LoaderFiles, results: Results, search: Search, main_path: str, main_facts: ElfFacts,
                 ld_library_path: str | None, ld_preload: str | None) -> None:
        self.files = files
        self.results = results
        self.search = search
        self.objects: list[Loaded] = []
        self.names: dict[str, Loaded] = {}
        self._by_file: dict[tuple[int, int], Loaded] = {}
        self._ld_library_path = ld_library_path
        self._ld_preload = ld_preload
        self._llp: tuple[Dir, ...] | None = None
        self.rtld: Loaded | None = None
        interp = main_facts.interp
        # The executable's $ORIGIN comes from /proc/self/exe, which the kernel has resolved; a
        # shared library root is taken as dlopen()ed by the path given, whose directory is its
        # $ORIGIN.
        origin = os.path.dirname(files.realpath(main_path) if interp else main_path)
        self.main = self._new(main_path, main_facts, None, "root", False, origin, is_main=True)
        if interp:
            self._load_interp(interp, edge=True)
        elif search.interp:
            # A library root is loaded into some program, whose loader is already there: the
            # architecture's usual one (as under ldd). It joins the closure only if something
            # needs it (libc does).
            self._load_interp(search.interp, edge=False)

    def library_path(self) -> tuple[Dir, ...]:
        """LD_LIBRARY_PATH as this process's loader reads it (its DSTs relative to the program)."""
        if self._llp is None:
            text = self._ld_library_path
            self._llp = self.search.library_path(text, self.main.origin, self.main.path) if text else ()
        return self._llp

    # --- objects ---

    def _new(self, path: str, facts: ElfFacts, loader: Loaded | None, rule: str, via_origin: bool, origin: str,
             is_main: bool = False) -> Loaded:
        obj = Loaded(path, facts, loader, rule, via_origin, origin, is_main=is_main)
        obj.rpath, obj.runpath = self.search.search_lists(facts, origin, path)
        parent_chain = loader.chain if loader is not None else ()
        obj.chain = ((obj.rpath,) if obj.rpath else ()) + parent_chain
        obj.descends_from_main = is_main or (loader is not None and loader.descends_from_main)
        self._add(obj)
        return obj

    def _add(self, obj: Loaded) -> None:
        self.objects.append(obj)
        self._by_file.setdefault(obj.facts.file_id, obj)
        self.names.setdefault(obj.path, obj)
        if obj.facts.soname and self.search.names_by_soname:
            self.names.setdefault(obj.facts.soname, obj)

    def _load_interp(self, interp: str, edge: bool) -> None:
        try:
            facts = self.files.facts(interp)
        except OSError:
            if edge:
                self.results.missing(interp, self.main.path, (interp,))
            return
        except ElfError as err:
            self.results.fail(err)
            return
        if facts is None:
            self.results.fail(ElfError(f"{interp}: interpreter of {self.main.path} is not an ELF file"))
            return
        if edge:
            self.results.edge(Dependency(interp, self.main.path, interp, "interp"))
        # The loader's own map has no search lists of its own and is never walked.
        self.rtld = Loaded(interp, facts, None, "interp", False, os.path.dirname(interp))
        self._add(self.rtld)

    # --- loading ---

    def run(self, runtime: RuntimeContext | None) -> None:
        self._preload()
        self._walk(0)
        if runtime is not None and self.search.runtime_libdir is not None:
            start = len(self.objects)
            self._runtime_loads(runtime, self.search.runtime_libdir)
            self._walk(start)

    def _walk(self, start: int) -> None:
        """ld.so's breadth-first walk over the objects from index `start`."""
        index = start
        while index < len(self.objects):
            obj = self.objects[index]
            index += 1
            if obj is self.rtld:
                continue
            for kind, name in obj.facts.entries:
                dep = self.map(name, obj, quiet=kind == "auxiliary")
                if dep is None:
                    if kind == "auxiliary":
                        self.results.note(f"auxiliary filtee {name} of {obj.path} not found (ld.so ignores that)")
                    continue
                if not dep.is_main:
                    self.results.edge(Dependency(dep.path, obj.path, name, dep.rule, via_origin=dep.via_origin,
                                                 search=dep.search))

    def _preload(self) -> None:
        for name, source in self.search.preloads(self._ld_preload):
            dep = self.map(name, self.main, quiet=True)
            if dep is None:
                self.results.note(f"{source} entry {name} not found (ld.so ignores it)")
                continue
            self.results.edge(Dependency(dep.path, self.main.path, name, "preload", reason=f"listed in {source}",
                                         via_origin=dep.via_origin))

    def map(self, name: str, loader: Loaded, quiet: bool = False) -> Loaded | None:
        """_dl_map_object: the object `name` refers to when `loader` needs it, loading it if new."""
        result = self.search.lookup(name, loader, self)
        if isinstance(result, Loaded):
            return result
        if isinstance(result, NotFound):
            if result.error:
                self.results.fail(ElfError(result.error))
            if not quiet:
                self.results.missing(name, loader.path, result.searched)
            return None
        return self._load(name, loader, result, quiet)

    def _load(self, name: str, loader: Loaded, found: Found, quiet: bool) -> Loaded | None:
        same = self._by_file.get(found.facts.file_id)
        if same is not None:
            # The same file under another name: the loader adds the name to the existing map.
            self.names.setdefault(name, same)
            if same.shortname is None and "/" not in name:
                same.shortname = name
            return same
        problem = load_problem(found.facts, found.path)
        if problem:
            self.results.fail(ElfError(problem))
            if not quiet:
                self.results.missing(name, loader.path, (found.path,))
            return None
        obj = self._new(found.path, found.facts, loader, found.rule, found.via_origin, os.path.dirname(found.path))
        obj.search = found.search
        self.names.setdefault(name, obj)
        if "/" not in name:
            obj.shortname = name
        return obj

    # --- run-time loads ---

    def _runtime_loads(self, runtime: RuntimeContext, libdir: str) -> None:
        libc = next((o for o in self.objects if o.facts.soname == "libc.so.6"), None)
        if libc is None:
            return  # not a dynamically linked glibc program
        for rule in runtime_loads.RUNTIME_LOADS:
            key = (rule.name, libc.path, libc.chain, self.library_path(), id(self.search))
            if key in runtime.expanded:
                continue
            trigger = self._trigger(rule, runtime)
            if trigger is None:
                continue
            runtime.expanded.add(key)
            expansion = runtime_loads.expand(rule, self.files.tree, libdir, trigger)
            rule_name = f"runtime:{rule.name}"
            for conf in expansion.configs:
                self.results.edge(Dependency(conf.path, libc.path, conf.path, rule_name, reason=conf.reason))
            for note in expansion.notes:
                self.results.note(note)
            for library in expansion.libraries:
                # These are dlopen()s made by libc, so libc is the loading object.
                obj = self.map(library.path, libc, quiet=True)
                if obj is None:
                    self.results.note(f"run-time load {library.path} ({rule.name}) not found; glibc tolerates that")
                    continue
                self.results.edge(Dependency(obj.path, libc.path, library.path, rule_name, reason=library.reason,
                                             via_origin=obj.via_origin))

    def _trigger(self, rule: runtime_loads.RuntimeLoad, runtime: RuntimeContext) -> str | None:
        path = runtime.path_trigger(rule)
        if path is not None:
            return f"{path} in the trace"
        wanted = frozenset(rule.trigger_symbols)
        if not wanted:
            return None
        for obj in list(self.objects):
            if obj is self.rtld:
                continue
            hits = runtime.elf.imports(self.files.host(obj.path), obj.facts, wanted)
            if hits:
                return f"{sorted(hits)[0]}() imported by {obj.path}"
        return None
