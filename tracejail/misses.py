"""Failed lookups: a path a program looked up and did not find, one model for every stage.

`verify` reports the misses of a replay (and fixes some), `inspect` groups the misses of the
recording into noise and what is worth a look; both describe the same thing, so both build it
here from the trace's accesses.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from tracejail import trace as tr
from tracejail.root import Root
from tracejail.text import shown

# A lookup no syscall shows: the program listed a directory and did not find a name in it (Python's
# import system lists package directories and only stats the names it saw).
LISTING = "listing"


@dataclass(frozen=True)
class Miss:
    """A path a program looked up and did not find (one per path)."""

    path: str                 # as the program spelled it, made absolute (a jail path for jail misses)
    syscall: str              # the failing call seen most often: "openat", "execve", "kernel:interp"...
    result: str               # its errno name: "ENOENT"
    count: int                # failed calls on this path, all syscalls together
    pids: tuple[int, ...]     # the processes that asked (host pids as the tracer saw them)
    process: str              # the first one's command line, shortened
    run: int                  # index of the run in the trace
    exists_on_host: bool      # the path exists on the host now
    in_trace: bool = False    # jail misses: the trace has it already (the image left it out)
    needs: str | None = None  # permission misses: the path the image user must own (or be able to write)

    def describe(self) -> str:
        """One line for a report: path, call, errno, who asked."""
        if self.syscall == LISTING:
            return f"{self.path}  (not in the listing of its directory, by {self.process})"
        times = f" x{self.count}" if self.count > 1 else ""
        line = f"{self.path}  ({self.syscall} {self.result}{times}, by {self.process})"
        if self.needs and self.result == "EROFS":
            return line + f"; {self.needs} must be writable"
        if self.needs:
            return line + f"; {self.needs} must belong to the image user"
        return line

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["pids"] = list(self.pids)
        return d


def short_command(argv: list[str], limit: int = 60) -> str:
    text = " ".join(shown(w) for w in argv) if argv else "?"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def who(argv: list[str]) -> str:
    """A process for a report line: the program's name and its arguments (what tells runs apart)."""
    return short_command([os.path.basename(argv[0]), *argv[1:]] if argv else [])


def miss_of(path: str, accesses: list[tr.Access], processes: Mapping[int, tr.ProcessInfo], run: int,
            exists_on_host: bool, in_trace: bool = False) -> Miss:
    """The Miss that `accesses` (all failed) make: the call seen most often (an execve first, at a
    tie) names it, and the first asking process known in `processes` (by pid) says who."""
    main = max(accesses, key=lambda a: (a.count, a.syscall == "execve"))
    pids = tuple(sorted({p for a in accesses for p in a.pids}))
    asker = next((processes[p] for p in pids if p in processes), None)
    return Miss(path=path, syscall=main.syscall, result=main.result, count=sum(a.count for a in accesses),
                pids=pids, process=who(asker.argv) if asker else "?", run=run,
                exists_on_host=exists_on_host, in_trace=in_trace)


def recorded_misses(trace: tr.Trace, run: int | None = None, root: Root | None = None) -> list[Miss]:
    """Paths the recorded run(s) looked up and did not find: every path whose accesses all failed,
    one Miss per path, sorted by path. `run` limits it to one run (an index into trace.runs).

    These are mostly harmless probes (Python's import search, ld.so's library search); what
    `exists_on_host` says True for appeared on the host (`root`: the tree the trace's files come
    from) after the recording."""
    tree = root or Root("/")
    per_run = [{p.pid: p for p in r.processes} for r in trace.runs]
    out = []
    for path in sorted(trace.files):
        rec = trace.files[path]
        if not rec.failed or (run is not None and run not in rec.runs):
            continue
        runs = [run] if run is not None else (rec.runs or [0])
        out.append(miss_of(path, rec.accesses, _first_known(per_run, runs), runs[0],
                           exists_on_host=tree.lexists(tree.normalize(path)[0])))
    return out


def _first_known(per_run: list[dict[int, tr.ProcessInfo]], runs: Iterable[int]) -> dict[int, tr.ProcessInfo]:
    """The processes of `runs`, the earlier run's process winning where pids repeat."""
    merged: dict[int, tr.ProcessInfo] = {}
    for r in runs:
        if 0 <= r < len(per_run):
            for pid, info in per_run[r].items():
                merged.setdefault(pid, info)
    return merged
