"""Why every node of the image is there: provenance for `explain`, `inspect` and `build`.

The file set (fileset.py) says why each *wanted path* is kept, as typed reasons
(fileset.Reason: traced with which accesses, needed by which object through which search rule
and entry, ...). The plan
(rootfs.py) then walks each wanted path component by component, so the image also holds
symlinks met on the way (``/lib -> usr/lib``) and the files they lead to
(``/usr/lib/x86_64-linux-gnu/libc.so.6`` for the wanted ``/lib/x86_64-linux-gnu/libc.so.6``).
This module turns both into one structured answer per image path:

* `render` turns fileset's typed reasons into `Reason` objects (kind + data + one sentence);
* `compute` joins them with the trace (which process did what) and the plan (symlinks on the
  way, symlink targets, parent directories) into a `Provenance`;
* `explain` answers for any path, in the image or not (excluded by which rule, a failed
  lookup, never touched).

Paths are resolved by the same root.Root the build used (the plan keeps only the nodes, not
which wanted path led to each), so explain and build agree on what every spelling reaches.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

from tracejail import __version__
from tracejail import fileset as fsel
from tracejail import rootfs, sensitive
from tracejail import trace as tr
from tracejail.root import Hop, NodeKind, Resolution, Root, Status
from tracejail.text import shown

FORMAT = "tracejail-provenance/1"
IMAGE_PATH = "/.tracejail/provenance.json"

# Reason kinds (the "kind" field of every reason in JSON); those the file set states are its own.
TRACED = fsel.Kind.TRACED.value    # the recorded run touched it
NEEDED = fsel.Kind.NEEDED.value    # DT_NEEDED of a kept ELF, found by a loader search rule
INTERP = "interpreter"             # PT_INTERP of a kept ELF
SCRIPT = "script-interpreter"      # the #! line of a kept script
PRELOAD = "preload"                # /etc/ld.so.preload or LD_PRELOAD
RUNTIME = "runtime-load"           # a library glibc dlopen()s by itself (NSS, gconv, libgcc_s)
DLOPEN = "dlopen"                  # a shared object opened at run time that no kept ELF needs
PYTHON = fsel.Kind.PYTHON.value    # .py of a kept .pyc, .pth files
DIST_INFO = fsel.Kind.DIST_INFO.value   # metadata of a kept Python distribution
INCLUDE = fsel.Kind.INCLUDE.value  # --include
ADDED = fsel.Kind.ADDED.value      # added to the trace later (verify --fix)
DOTDOT = fsel.Kind.PATH_PREFIX.value   # a directory walked through before a `..`
RUN_DIR = fsel.Kind.RUN_DIRECTORY.value   # the directory the run created or removed something in
SYMLINK = "symlink-on-the-way"     # a symlink met while resolving a kept path
TARGET = "symlink-target"          # reached through symlinks from a kept path
LISTED = "listed-directory"        # a directory the program listed or stat'ed
PARENT = "parent-directory"        # holds kept paths
GENERATED = "generated"            # written by `tracejail build` itself
DERIVED = "derived"                # content made from a kept file (--strip, --bytecode-only: shrink.py)
FAMILY = fsel.Kind.FAMILY.value    # a member of a family looked up by name (families.py)
OWNER = "owner"                    # belongs to the image user (ownership.py)
IMPORT = fsel.Kind.IMPORT.value    # imported by a kept module on a path the run did not take (pyimports.py)
OTHER = "other"

# ld.so search rules (closure.py) as a reader would name them.
RULE_NAMES = {
    "rpath": "DT_RPATH",
    "runpath": "DT_RUNPATH",
    "ld_library_path": "LD_LIBRARY_PATH",
    "ld.so.cache": "the ld.so cache (/etc/ld.so.cache)",
    "ld.so.conf": "a directory of /etc/ld.so.conf",
    "default": "a default directory of the loader",
    "slash": "a path written in DT_NEEDED",
    "ld-musl.path": "musl's /etc/ld-musl-*.path",
}

_EXAMPLES = 3   # paths named in a sentence before "and N more"


@dataclass
class Reason:
    kind: str
    text: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        # "why" is already part of the sentence; repeating it doubled provenance.json.
        return {"kind": self.kind, "text": self.text, **{k: v for k, v in self.data.items() if k != "why"}}


def _some(items: list[str], n: int = _EXAMPLES) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def render(r: fsel.Reason) -> Reason:
    """One of the file set's typed reasons as a sentence with its data (needed-by reasons get
    their sentence once merged: merge_needed)."""
    K = fsel.Kind
    if r.kind is K.TRACED:
        return Reason(TRACED, f"traced ({', '.join(r.accesses)})", {"access": list(r.accesses)})
    if r.kind is K.NEEDED:
        data: dict[str, Any] = {"needed_by": [r.needed_by], "name": r.name, "rule": r.rule,
                                "via_origin": r.via_origin}
        if r.search:
            data["search_path"] = r.search
        if r.detail:
            data["why"] = r.detail
        return Reason(_needed_kind(r.rule), "", data)
    if r.kind is K.PATH_PREFIX:
        return Reason(DOTDOT, f"a directory walked through on the way to {r.path} (the program wrote `..` "
                      "after it)", {"to": r.path})
    if r.kind is K.RUN_DIRECTORY:
        done = "removed" if r.removed else "created"
        return Reason(RUN_DIR, f"the directory the recorded run {done} {r.path} in: kept so that the program "
                      f"finds it{' empty of it' if r.removed else ' and can create it again'}",
                      {"path": r.path, "removed": r.removed})
    if r.kind is K.PYTHON and r.path:
        return Reason(PYTHON, f"the source of the kept {r.path}: Python stats the .py to check whether its "
                      "cached .pyc is stale", {"pyc": r.path})
    if r.kind is K.PYTHON:
        return Reason(PYTHON, "a .pth file of a kept site-packages: Python runs it at start-up", {"pth": True})
    if r.kind is K.DIST_INFO:
        return Reason(DIST_INFO, "metadata (dist-info) of a kept Python distribution: importlib.metadata and "
                      "vulnerability scanners read it")
    if r.kind is K.INCLUDE:
        return Reason(INCLUDE, "named with --include")
    if r.kind is K.FAMILY:
        return Reason(FAMILY, f"a member of the {r.name} family, kept whole: {r.detail}", {"family": r.name})
    if r.kind is K.IMPORT:
        return Reason(IMPORT, f"{r.detail}, not exercised by the recorded run (the static import closure "
                      "follows imports the run did not reach)", {"module": r.name})
    if r.kind is K.ADDED:
        return Reason(ADDED, f"added by {r.name}: {r.detail}".rstrip(": "), {"by": r.name})
    return Reason(OTHER, str(r.kind.value))


def _needed_kind(rule: str) -> str:
    if rule == "interp":
        return INTERP
    if rule in ("shebang", "env-shebang"):
        return SCRIPT
    if rule == "preload":
        return PRELOAD
    if rule.startswith("runtime:"):
        return RUNTIME
    return NEEDED


def _needed_text(r: Reason) -> str:
    by: list[str] = r.data["needed_by"]
    rule: str = r.data["rule"]
    name: str = r.data["name"]
    if r.kind == INTERP and not name.startswith("/"):
        return (f"needed (DT_NEEDED {name}) by {_some(by)}: the dynamic loader itself, already "
                "loaded as the program's interpreter")
    if r.kind == INTERP:
        return (f"the ELF interpreter (PT_INTERP {name}) of {_some(by)}: kept at exactly this path, "
                "which the kernel opens by name")
    if r.kind == SCRIPT:
        return f"the #! interpreter of {_some(by)}" + (f" ({r.data['why']})" if r.data.get("why") else "")
    if r.kind == PRELOAD:
        return f"preloaded into {_some(by)} ({r.data.get('why', rule)})"
    if r.kind == RUNTIME:
        what = rule.split(":", 1)[1]
        return (f"a known run-time load ({what}) of {_some(by)}"
                + (f": {r.data['why']}" if r.data.get("why") else ""))
    how = RULE_NAMES.get(rule, rule)
    if r.data.get("via_origin"):
        search = r.data.get("search_path")
        how += (f" `{search}`" if search else " with $ORIGIN") + " ($ORIGIN: the directory of the object that needs it)"
    return f"needed (DT_NEEDED {name}) by {_some(by)}, found through {how}"


def merge_needed(reasons: list[Reason]) -> list[Reason]:
    """One reason per (kind, rule, name, $ORIGIN, why) with every object that needs it."""
    out: list[Reason] = []
    index: dict[tuple[Any, ...], Reason] = {}
    for r in reasons:
        if "needed_by" not in r.data:
            out.append(r)
            continue
        key = (r.kind, r.data["rule"], r.data["name"], r.data["via_origin"], r.data.get("why"))
        have = index.get(key)
        if have is None:
            have = index[key] = Reason(r.kind, "", {**r.data, "needed_by": []})
            out.append(have)
        for by in r.data["needed_by"]:
            if by not in have.data["needed_by"]:
                have.data["needed_by"].append(by)
    for r in out:
        if "needed_by" in r.data:
            r.text = _needed_text(r)
    return out


# --------------------------------------------------------------------------------------------
# The trace side: which processes did what


_VERBS = {
    "exec": "executed",
    "read": "opened for reading",
    "write": "written",
    "stat": "stat'ed",
    "readlink": "read as a symlink",
    "list": "listed",
}


@dataclass
class TraceIndex:
    """Trace records by their host-normal path, and processes by pid."""

    records: dict[str, list[tr.PathRecord]]
    processes: dict[int, tr.ProcessInfo]
    root: Root

    @classmethod
    def of(cls, trace: tr.Trace, root: Root) -> TraceIndex:
        records: dict[str, list[tr.PathRecord]] = {}
        for rec in trace.files.values():
            norm = root.normalize(rec.path)[0]
            records.setdefault(norm, []).append(rec)
        procs: dict[int, tr.ProcessInfo] = {}
        for run in trace.runs:
            for p in run.processes:
                procs.setdefault(p.pid, p)
        return cls(records, procs, root)

    def command(self, pid: int, width: int = 80) -> str:
        p = self.processes.get(pid)
        if p is None:
            return f"pid {pid}"
        words = " ".join(sensitive.redact_argv(p.argv)[0]) if p.argv else (p.exe or "?")
        if len(words) > width:
            words = words[:width - 3] + "..."
        return f"pid {pid} `{words}`"


def traced_reason(records: list[tr.PathRecord], index: TraceIndex) -> Reason:
    """What the runs did with a path: verbs, syscalls, processes (from every spelling of it)."""
    kinds: list[str] = []
    syscalls: list[str] = []
    pids: list[int] = []
    runs: set[int] = set()
    spellings: list[str] = []
    for rec in records:
        runs.update(rec.runs)
        if rec.path not in spellings:
            spellings.append(rec.path)
        for a in rec.accesses:
            if not a.ok:
                continue
            if a.kind not in kinds:
                kinds.append(a.kind)
            if a.syscall not in syscalls:
                syscalls.append(a.syscall)
            pids.extend(p for p in a.pids if p not in pids)
    verbs = []
    for k in sorted(kinds, key=lambda k: list(_VERBS).index(k) if k in _VERBS else 99):
        verb = _VERBS.get(k, k)
        if k == "exec" and "kernel:interp" in syscalls:
            verb = "loaded by the kernel as an ELF interpreter"
        elif k == "exec" and "kernel:shebang" in syscalls and "execve" not in syscalls:
            verb = "run by the kernel as a #! interpreter"
        if k == "stat" and kinds == ["stat"]:
            verb = "only stat'ed (its metadata was read, not its content)"
        verbs.append(verb)
    who = [index.command(p) for p in pids[:_EXAMPLES]]
    more = f" and {len(pids) - _EXAMPLES} more processes" if len(pids) > _EXAMPLES else ""
    text = f"traced: {' and '.join(verbs) or 'touched'} ({', '.join(syscalls)})"
    if who:
        text += f" by {', '.join(who)}{more}"
    data: dict[str, Any] = {"access": kinds, "syscalls": syscalls, "pids": pids, "runs": sorted(runs)}
    other = [s for s in spellings if index.root.normalize(s)[0] != s]
    if other:
        text += f", spelled {_some(other)}"
        data["spelled"] = other
    return Reason(TRACED, text, data)


# --------------------------------------------------------------------------------------------
# Per-entry provenance


@dataclass
class EntryProvenance:
    path: str
    kind: str                      # the plan entry's kind: file | dir | symlink | hardlink
    reasons: list[Reason] = field(default_factory=list)
    reached_as: list[str] = field(default_factory=list)   # kept spellings that lead here
    link_target: str | None = None
    size: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "reasons": [r.to_json() for r in self.reasons]}
        if self.reached_as:
            out["reached_as"] = self.reached_as
        if self.link_target is not None:
            out["link_target"] = self.link_target
        if self.kind == "file":
            out["size"] = self.size
        return out


@dataclass
class Provenance:
    entries: dict[str, EntryProvenance]
    wanted: dict[str, list[Reason]]              # host path as kept -> its own reasons
    excluded: list[tuple[str, str]]
    index: TraceIndex
    resolved: dict[str, Resolution]              # wanted path -> what it reaches
    root: Root

    def to_json(self, trace_digest: str | None = None, *, parents: bool = False) -> dict[str, Any]:
        """The document written to /.tracejail/provenance.json.

        Plain parent directories are left out unless `parents` (they hold nothing but kept
        paths; size matters). Processes named by pid in traced reasons are listed once.
        """
        entries = {p: e.to_json() for p, e in sorted(self.entries.items(), key=lambda kv: rootfs.sort_key(kv[0]))
                   if parents or any(r.kind != PARENT for r in e.reasons)}
        pids = sorted({pid for e in self.entries.values() for r in e.reasons for pid in r.data.get("pids", ())})
        # (argv through redact_argv: a trace from an older or other recorder may hold a secret there)
        procs = {str(pid): {"argv": sensitive.redact_argv(self.index.processes[pid].argv)[0],
                            "exe": self.index.processes[pid].exe,
                            "ppid": self.index.processes[pid].ppid, "run": self.index.processes[pid].run}
                 for pid in pids if pid in self.index.processes}
        return {
            "format": FORMAT,
            "tool": {"name": "tracejail", "version": __version__},
            "trace_digest": trace_digest,
            "entries": entries,
            "processes": procs,
            "excluded": [{"path": p, "rule": r} for p, r in self.excluded],
        }


def _is_shared_object(path: str, root: Root) -> bool:
    """An ELF ET_DYN that is not a PIE executable: what dlopen() loads."""
    from tracejail import elf

    if not re.search(r"\.so(\.[0-9.]+)?$", path):
        return False
    res = root.resolve(path)
    if not res.ok:
        return False
    try:
        facts = elf.read_elf_facts(root.host(res.path))
    except Exception:   # corrupt ELF: not our question here; closure reports it
        return False
    return facts is not None and facts.e_type == elf.ET_DYN and not facts.flags_1 & elf.DF_1_PIE


def pycs_by_directory(wanted: Iterable[str]) -> dict[str, list[str]]:
    """The kept .pyc files, sorted, by their __pycache__ directory (looked up per .py, where a
    scan of every kept path made explaining a Python app quadratic)."""
    out: dict[str, list[str]] = {}
    for p in sorted(wanted):
        if p.endswith(".pyc"):
            out.setdefault(os.path.dirname(p), []).append(p)
    return out


def _derived(path: str, reasons: list[Reason], pycs: Mapping[str, list[str]], root: Root) -> list[Reason]:
    """Reasons fileset does not state but the evidence shows: dlopen, a stat-only .py."""
    kinds = {r.kind for r in reasons}
    out: list[Reason] = []
    traced = next((r for r in reasons if r.kind == TRACED), None)
    if traced and "read" in traced.data.get("access", ()) and not kinds & {NEEDED, INTERP, RUNTIME, PRELOAD} \
            and _is_shared_object(path, root):
        out.append(Reason(DLOPEN, "loaded at run time with dlopen(): a process opened it, and no kept "
                          "ELF names it in DT_NEEDED (ldd would not show it)"))
    if path.endswith(".py") and PYTHON not in kinds:
        directory, name = os.path.split(path)
        cache_dir = os.path.join(directory, "__pycache__")
        prefix = os.path.join(cache_dir, name[:-3] + ".")
        cached = [p for p in pycs.get(cache_dir, ()) if p.startswith(prefix)]
        if cached:
            out.append(Reason(PYTHON, f"the source of the kept {cached[0]}: Python stats the .py to check "
                              "whether its cached .pyc is stale", {"pyc": cached[0]}))
    return out


def wanted_reasons(path: str, why: list[fsel.Reason], index: TraceIndex,
                   pycs: Mapping[str, list[str]]) -> list[Reason]:
    """The reasons a wanted path is in the image; `pycs`: pycs_by_directory of every wanted path."""
    reasons: list[Reason] = []
    for w in why:
        r = render(w)
        if r.kind == TRACED and index.records.get(path):
            r = traced_reason(index.records[path], index)
        reasons.append(r)
    reasons = merge_needed(reasons)
    return reasons + _derived(path, reasons, pycs, index.root)


def _final(res: Resolution) -> str | None:
    """The node a wanted path reaches (a special file counts), None when it reaches nothing."""
    return res.path if res.status in (Status.OK, Status.SPECIAL) else None


def compute(trace: tr.Trace, files: fsel.FileSet, plan: rootfs.Plan, root: Root | None = None) -> Provenance:
    """Provenance of every plan entry (entries added after planning come from `generated`)."""
    root = root or Root("/")
    index = TraceIndex.of(trace, root)
    pycs = pycs_by_directory(files.wanted)
    wanted = {p: wanted_reasons(p, why, index, pycs) for p, why in files.wanted.items()}
    resolved: dict[str, Resolution] = {}
    via_link: dict[str, list[str]] = {}     # symlink -> wanted paths that resolve through it
    reached: dict[str, list[str]] = {}      # final node -> wanted paths (other spellings)
    holds: dict[str, int] = {}              # directory -> kept paths below it
    for w in sorted(set(files.wanted) | files.dirs_only):
        res = resolved[w] = root.resolve(w)
        final = _final(res)
        for hop in res.hops:
            if hop.kind is NodeKind.SYMLINK:
                via_link.setdefault(hop.path, []).append(w)
            elif hop.kind is NodeKind.DIR and hop.path != final:
                holds[hop.path] = holds.get(hop.path, 0) + 1
        if final is not None and final != w:
            reached.setdefault(final, []).append(w)

    entries: dict[str, EntryProvenance] = {}
    for path, e in plan.entries.items():
        ep = EntryProvenance(path, e.kind, link_target=e.link_target, size=e.size)
        ep.reasons.extend(wanted.get(path, []))
        if path in files.dirs_only and not any(r.kind == LISTED for r in ep.reasons):
            ep.reasons.append(Reason(LISTED, "a directory the program listed or stat'ed: kept (empty "
                                     "but for other kept paths) so the lookup still succeeds"))
        for w in reached.get(path, []):
            ep.reached_as.append(w)
            links = resolved[w].symlinks
            chain = ", ".join(f"{h.path} -> {h.target}" for h in links)
            ep.reasons.append(Reason(TARGET, f"kept as {w}, which resolves here through {chain}",
                                     {"as": w, "symlinks": [h.path for h in links]}))
            for r in wanted.get(w, []):
                ep.reasons.append(Reason(r.kind, f"(as {w}) {r.text}", {**r.data, "as": w}))
        if path in via_link and e.kind == "symlink":
            tos = [w for w in via_link[path] if w != path]
            if tos:
                ep.reasons.append(Reason(SYMLINK, f"a symlink on the way to {_some(tos)}: kept so that "
                                         "those names resolve in the image as on the host",
                                         {"to": tos[:20], "count": len(tos)}))
        if path in plan.generated:
            ep.reasons.append(Reason(GENERATED, plan.generated[path]))
        if path in plan.ownership:
            ep.reasons.append(Reason(OWNER, f"belongs to the image user ({e.uid}:{e.gid}): {plan.ownership[path]}",
                                     {"uid": e.uid, "gid": e.gid}))
        if e.kind == "dir" and not any(r.kind != OWNER for r in ep.reasons):
            ep.reasons.append(Reason(PARENT, f"a directory holding {holds.get(path, 0) or 'other'} kept path(s)",
                                     {"holds": holds.get(path, 0)}))
        if not ep.reasons:   # not expected: every node the plan holds was met by some walk
            ep.reasons.append(Reason(OTHER, "in the plan without a recorded reason"))
        entries[path] = ep
    return Provenance(entries, wanted, list(files.excluded), index, resolved, root)


def add_generated(prov: Provenance, path: str, kind: str, text: str, size: int = 0) -> None:
    """Record an entry that `tracejail build` wrote itself (passwd, status.d, this file)."""
    ep = prov.entries.get(path)
    if ep is None:
        ep = prov.entries[path] = EntryProvenance(path, kind, size=size)
    ep.kind, ep.size = kind, size
    ep.reasons = [r for r in ep.reasons if r.kind != PARENT]
    ep.reasons.append(Reason(GENERATED, text))


# --------------------------------------------------------------------------------------------
# The same selection `build` makes


@dataclass
class Selection:
    trace: tr.Trace
    files: fsel.FileSet
    plan: rootfs.Plan
    root: Root
    db: Any = None      # dpkg.Database | None


@contextlib.contextmanager
def selected(trace_path: str, options: Any = None) -> Iterator[Selection]:
    """select_and_plan in the tree the trace names: the host's, or (a trace recorded with
    `record --image`) that image's, unpacked for as long as the block runs."""
    from tracejail import source

    trace = tr.load(trace_path)
    with source.root_of(trace, options.docker_env if options else None) as where, \
            tempfile.TemporaryDirectory(prefix="tracejail-plan-") as workdir:
        root = Root(where if trace.source is not None else (options.root if options else None) or "/")
        yield _select(trace, trace_path, options, root, workdir)


def _select(trace: tr.Trace, trace_path: str, options: Any, root: Root, workdir: str) -> Selection:
    from tracejail import build

    chosen = build.plan_image(trace, root, options or build.BuildOptions(), workdir, (os.path.abspath(trace_path),))
    return Selection(trace, chosen.files, chosen.plan, root, chosen.db)


# --------------------------------------------------------------------------------------------
# Explaining one path


@dataclass
class Explanation:
    path: str                       # as asked (made absolute)
    in_image: bool
    status: str                     # kept | reached | generated | excluded | skipped | vanished |
                                    # failed-lookup | created-by-run | not-traced
    summary: str
    reasons: list[Reason] = field(default_factory=list)
    image_path: str | None = None   # the node the path leads to in the image
    entry_kind: str | None = None
    resolves_through: list[Hop] = field(default_factory=list)
    package: str | None = None      # owning dpkg package "name version", when known

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "in_image": self.in_image, "status": self.status,
            "summary": self.summary, "image_path": self.image_path, "entry_kind": self.entry_kind,
            "reasons": [r.to_json() for r in self.reasons],
            "resolves_through": [{"path": h.path, "kind": h.kind.value, "target": h.target}
                                 for h in self.resolves_through if h.kind is NodeKind.SYMLINK],
            "package": self.package,
        }


def _failed_text(records: list[tr.PathRecord], index: TraceIndex) -> str:
    parts = []
    for rec in records:
        for a in rec.accesses:
            if not a.ok:
                who = ", ".join(index.command(p) for p in a.pids[:2])
                parts.append(f"{a.syscall} -> {a.result} ({a.count}x, {who})")
    return "; ".join(parts[:4])


def explain(path: str, prov: Provenance, files: fsel.FileSet, plan: rootfs.Plan) -> Explanation:
    """Why `path` is, or is not, in the image described by `files` and `plan`."""
    root = prov.root
    asked = os.path.abspath(path)
    norm = root.normalize(asked)[0]
    index = prov.index
    ep = prov.entries.get(norm)
    res = prov.resolved.get(norm) or root.resolve(norm)
    final = _final(res)
    links = list(res.symlinks)

    if ep is not None:
        reasons = list(ep.reasons)
        status = "kept"
        if any(r.kind == GENERATED for r in reasons):
            status = "generated"
        what = {"file": "a file", "dir": "a directory", "symlink": f"a symlink to {ep.link_target}",
                "hardlink": f"a hard link to {ep.link_target}"}.get(ep.kind, ep.kind)
        summary = f"in the image as {what}"
        if ep.kind == "symlink" and final and final != norm:
            summary += f", resolving to {final}"
        return Explanation(asked, True, status, summary, reasons, norm, ep.kind, links)

    if norm in prov.wanted:
        # Kept under this spelling, which the plan stores through symlinks (/lib -> usr/lib).
        summary = "in the image" + (f", resolving to {final}" if final and final != norm else "")
        through: list[Reason] = []
        if final and final != norm:
            chain = ", ".join(f"{h.path} -> {h.target}" for h in links)
            through = [Reason(TARGET, f"resolves through {chain} to {final}", {"to": final})]
        kind = prov.entries[final].kind if final in prov.entries else None
        return Explanation(asked, True, "kept", summary, prov.wanted[norm] + through, final, kind, links)

    if final is not None and final in prov.entries and all(h.path in plan.entries for h in links):
        # Not kept under this name, but the name works in the image: symlinks lead to a kept node.
        chain = ", ".join(f"{h.path} -> {h.target}" for h in links)
        target = prov.entries[final]
        reasons = [Reason(TARGET, f"resolves through {chain} to {final}", {"to": final})] + target.reasons
        return Explanation(asked, True, "reached", f"in the image through symlinks, as {final}",
                           reasons, final, target.kind, links)

    rules = [rule for p, rule in files.excluded if p == norm]
    rules += [why for p, why in plan.skipped if p == norm]
    if rules:
        status = "created-by-run" if rules == ["created by the recorded run"] else "excluded"
        return Explanation(asked, False, status, f"not in the image: {rules[0]}",
                           [Reason("excluded", rule, {"rule": rule}) for rule in dict.fromkeys(rules)])
    if norm in files.vanished or norm in plan.missing:
        return Explanation(asked, False, "vanished", "not in the image: the run used it, but it no longer "
                           "exists on the host (record again, or restore it)")
    records = index.records.get(norm, [])
    secret = [Reason("excluded", "it would be left out anyway: sensitive file (credentials, keys, "
                     "history); --include it to keep", {"rule": "sensitive"})] \
        if any(sensitive.sensitive_name(p) for p in [norm, *(h.path for h in res.hops)]) else []
    if records and not any(r.ok for r in records):
        return Explanation(asked, False, "failed-lookup",
                           "not in the image: the run looked for it and did not get it; the image "
                           "reproduces that absence",
                           [Reason("failed-lookup", _failed_text(records, index))] + secret)
    why = "not in the image: no recorded run touched it and no kept file needs it"
    extra: list[Reason] = list(secret)
    if root.lexists(norm):
        extra.append(Reason(OTHER, "to add it: --include it at build time, or exercise the code path "
                            "that uses it while recording"))
    else:
        why += " (it does not exist on the host either)"
    return Explanation(asked, False, "not-traced", why, extra)


def format_explanation(ex: Explanation) -> str:
    lines = [f"{shown(ex.path)}: {shown(ex.summary)}"]
    if ex.package:
        lines.append(f"  package: {shown(ex.package)}")
    for r in ex.reasons:
        lines.append(f"  - {shown(r.text)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Build integration: provenance and package metadata written into the image


@dataclass
class BuildMetadata:
    provenance: Provenance
    packages: list[Any] = field(default_factory=list)   # sbom.Package: dpkg and Python
    notes: list[str] = field(default_factory=list)
    generated: list[str] = field(default_factory=list)  # image paths this step added


def _add_dirs(plan: rootfs.Plan, path: str) -> bool:
    """Make every ancestor of `path` a directory entry; False if one is a symlink or file."""
    for anc in reversed(list(_ancestors(path))):
        e = plan.entries.get(anc)
        if e is None:
            plan.entries[anc] = rootfs.Entry(anc, "dir", 0o755, None, None, 0, 0, 0)
        elif e.kind != "dir":
            return False
    return True


def _ancestors(path: str) -> Iterable[str]:
    p = rootfs.parent_of(path)
    while p != "/":
        yield p
        p = rootfs.parent_of(p)


def _add_file(plan: rootfs.Plan, workdir: str, path: str, content: bytes) -> None:
    src = os.path.join(workdir, "meta" + path.replace("/", "_"))
    with open(src, "wb") as f:
        f.write(content)
    plan.entries[path] = rootfs.Entry(path, "file", 0o644, src, None, len(content), 0, 0)


def add_package_metadata(plan: rootfs.Plan, workdir: str, root: Root, db: Any) -> list[str]:
    """Add dpkg status.d stanzas (for every package that owns a kept file) and /etc/os-release
    to the plan, as files in `workdir` (build.plan_image calls it, so inspect and explain see
    them too). Read from `root`. Returns a note for the build summary."""
    from tracejail import dpkg, sbom

    status_files = dpkg.status_d_files(db, dpkg.owners(db, sbom.owned_candidates(plan, root)))
    if not status_files:
        return []
    if not _add_dirs(plan, dpkg.STATUS_D + "/x"):
        return [f"package metadata not written: a parent of {dpkg.STATUS_D} is not a directory"]
    for path, text in status_files.items():
        _add_file(plan, workdir, path, text.encode())
        plan.generated[path] = ("written by `tracejail build` (package metadata): the dpkg status stanza of a "
                                "package that owns kept files, where scanners look for it (as in distroless)")
    release = (root.read_text("/etc/os-release") or "").encode("utf-8", "surrogateescape")
    if "/etc/os-release" not in plan.entries and release and not sensitive.private_key_in(release, len(release)):
        _add_file(plan, workdir, "/etc/os-release", release)
        plan.generated["/etc/os-release"] = ("kept by `tracejail build` (package metadata): scanners identify the "
                                             "distribution by it")
    return [f"package metadata: {len(status_files)} dpkg package(s) in {dpkg.STATUS_D}"]


def add_build_metadata(trace: tr.Trace, files: fsel.FileSet, plan: rootfs.Plan, workdir: str, *,
                       write_provenance: bool = False, trace_digest: str | None = None, root: Root | None = None,
                       db: Any = None, derived: Mapping[str, str] | None = None) -> BuildMetadata:
    """Called by `build` once its plan is final: the provenance of every entry and the image's
    packages (dpkg and Python); with `write_provenance`, /.tracejail/provenance.json as a file
    in `workdir`. Package databases and /etc/os-release are read from `root` (the host's / by
    default)."""
    from tracejail import dpkg, sbom

    root = root or Root("/")
    prov = compute(trace, files, plan, root)
    meta = BuildMetadata(prov)
    for path, why in (derived or {}).items():
        # Content made from a kept file: why that file is there still holds.
        e = plan.entries.get(path)
        if e is None:
            continue
        ep = prov.entries.get(path)
        if ep is None:
            ep = prov.entries[path] = EntryProvenance(path, e.kind, size=e.size)
        ep.size = e.size
        ep.reasons.append(Reason(DERIVED, why))

    db = db if db is not None else dpkg.read_database(root)
    if db is not None:
        os_release = tr.parse_os_release(root.read_text("/etc/os-release") or "")
        meta.packages.extend(sbom.debian_packages(db, dpkg.owners(db, sbom.owned_candidates(plan, root)),
                                                  os_release, root))
    meta.packages.extend(sbom.python_packages(plan))

    if write_provenance:
        _add_dirs(plan, IMAGE_PATH)
        add_generated(prov, os.path.dirname(IMAGE_PATH), "dir", "created by `tracejail build --provenance`")
        add_generated(prov, IMAGE_PATH, "file", "written by `tracejail build --provenance`: this provenance "
                      "document")
        data = json.dumps(prov.to_json(trace_digest), indent=None, sort_keys=True,
                          separators=(",", ":")).encode() + b"\n"
        _add_file(plan, workdir, IMAGE_PATH, data)
        plan.generated[IMAGE_PATH] = "written by `tracejail build --provenance`: this provenance document"
        prov.entries[IMAGE_PATH].size = len(data)
        meta.generated.append(IMAGE_PATH)
        meta.notes.append(f"provenance of {len(prov.entries)} entries in {IMAGE_PATH} ({len(data)} bytes)")
    return meta
