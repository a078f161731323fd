"""What a closure is: the public results of `resolve`, and the collector that gathers them."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import TracejailError


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
    rule: str  # see the package docstring
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


class Results:
    """Collects what every stage of one `resolve` call finds: edges (deduplicated by path and the
    object that needed it), names not found, notes, and errors (raised at once when strict)."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.roots: list[str] = []
        self._deps: dict[tuple[str, str], Dependency] = {}
        self._unresolved: dict[tuple[str, str], Unresolved] = {}
        self._errors: list[str] = []
        self._notes: list[str] = []

    def edge(self, dep: Dependency) -> None:
        self._deps.setdefault((dep.path, dep.needed_by), dep)

    def missing(self, name: str, needed_by: str, searched: Iterable[str]) -> None:
        self._unresolved.setdefault((name, needed_by), Unresolved(name, needed_by, tuple(searched)))

    def note(self, text: str) -> None:
        if text not in self._notes:
            self._notes.append(text)

    def fail(self, err: TracejailError) -> None:
        if self.strict:
            raise err
        message = str(err)
        if message not in self._errors:
            self._errors.append(message)

    def closure(self) -> Closure:
        return Closure(
            roots=list(self.roots),
            deps=list(self._deps.values()),
            unresolved=list(self._unresolved.values()),
            errors=list(self._errors),
            notes=list(self._notes),
        )
