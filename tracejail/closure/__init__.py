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

The package follows the loader's own division of work:

* :mod:`.model`: what a closure is (Dependency, Unresolved, Closure) and the collector of results;
* :mod:`.files`: the root as the loader sees it, every path through :class:`tracejail.root.Root`;
* :mod:`.config`: architectures, hwcaps, and each loader's configuration (ld.so's compiled-in
  directories, ld.so.cache or ld.so.conf; musl's path file);
* :mod:`.search`: the search protocol, with glibc's and musl's implementations;
* :mod:`.linkmap`: the breadth-first link-map walk of one process, and libc's run-time loads;
* :mod:`.exec`: what the kernel runs for a root (ELF, ``#!``, ``env`` along PATH);
* :mod:`.render`: the lddtree-like view.

ELF facts come from :mod:`tracejail.elf` (struct only, shared with the tracer).
"""
from __future__ import annotations

from collections.abc import Iterable

from ..elf import ElfCache, ElfFacts, is_elf, read_elf_facts
from ..root import Root
from .exec import Programs
from .files import LoaderFiles
from .linkmap import LinkMap, RuntimeContext
from .model import Closure, Dependency, LoaderEnv, Results, Unresolved
from .render import format_tree
from .search import Searches

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
    elf = cache if cache is not None else ElfCache()
    files = LoaderFiles(root if root is not None else Root(env.root), elf, env.cwd)
    results = Results(strict)
    searches = Searches(files, results)
    context = RuntimeContext(triggers, elf) if runtime else None

    def link(path: str, facts: ElfFacts) -> None:
        LinkMap(files, results, searches.for_program(facts), path, facts, env.ld_library_path, env.ld_preload).run(context)

    programs = Programs(files, results, env.path, link)
    for path in paths:
        programs.add_root(path)
    return results.closure()
