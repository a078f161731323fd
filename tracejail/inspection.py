"""`tracejail inspect`: what a trace recorded and what its image would hold.

    runs -> processes (as a tree) -> exercises -> image inventory by kind -> largest files and
    directories -> what was left out -> (--misses) failed lookups, noise hidden behind counts

Everything here is a pure function of the trace, the file set and the plan (plus reading ELF
headers and the first bytes of scripts to tell kinds apart); the CLI only formats.
"""
from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from typing import Any

from tracejail import fileset as fsel
from tracejail import rootfs
from tracejail import trace as tr
from tracejail.misses import Miss, recorded_misses
from tracejail.root import Root, is_runtime_path
from tracejail.text import human, shown

# Kinds of image files, in display order.
FILE_KINDS = ("elf-executable", "shared-library", "python-extension", "python-module",
              "python-metadata", "script", "config", "data")

_CONFIG_SUFFIXES = (".conf", ".cfg", ".ini", ".toml", ".yaml", ".yml", ".cnf", ".rc", ".properties")
_PY_EXT_RE = re.compile(r"\.(cpython-[^/]*|abi3|pypy[^/]*)\.so$")


@dataclass(frozen=True)
class ImageFile:
    path: str
    kind: str
    size: int


def classify(path: str, host_path: str | None = None) -> str:
    """One of FILE_KINDS for an image file, judged by its content where names are not enough."""
    from tracejail import elf

    source = host_path or path
    name = os.path.basename(path)
    if ".dist-info/" in path or ".egg-info/" in path:
        return "python-metadata"
    if name.endswith((".py", ".pyc", ".pyi", ".pth")):
        return "python-module"
    if elf.is_elf(source):
        if _PY_EXT_RE.search(name) or "/lib-dynload/" in path:
            return "python-extension"
        try:
            facts = elf.read_elf_facts(source)
        except Exception:   # a corrupt ELF is still an ELF; the closure reports the error
            facts = None
        if facts is not None and (facts.e_type == elf.ET_EXEC
                                  or facts.flags_1 & elf.DF_1_PIE
                                  or (facts.interp and not re.search(r"\.so(\.[0-9.]+)?$", name))):
            return "elf-executable"
        return "shared-library"
    if path.startswith("/etc/") or name.endswith(_CONFIG_SUFFIXES):
        return "config"
    try:
        if elf.read_file(source, 2) == b"#!":
            return "script"
    except OSError:
        pass
    return "data"


def image_files(plan: rootfs.Plan) -> list[ImageFile]:
    out = []
    for path in sorted(plan.entries, key=rootfs.sort_key):
        e = plan.entries[path]
        if e.kind == "file":
            out.append(ImageFile(path, classify(path, e.source), e.size))
        elif e.kind == "hardlink":
            target = plan.entries.get(e.link_target or "")
            out.append(ImageFile(path, classify(path, target.source if target else None), 0))
    return out


def largest_directories(files: list[ImageFile], top: int) -> list[dict[str, Any]]:
    """Directories by the bytes of everything below them (like `du`), "/" left out."""
    total: dict[str, int] = {}
    count: dict[str, int] = {}
    for f in files:
        d = rootfs.parent_of(f.path)
        while d != "/":
            total[d] = total.get(d, 0) + f.size
            count[d] = count.get(d, 0) + 1
            d = rootfs.parent_of(d)
    # A directory whose only content is one subdirectory (/root -> /root/.pyenv -> ...) says
    # nothing its child does not: show the deepest of such a chain only.
    chained = {rootfs.parent_of(d) for d in total
               if total.get(rootfs.parent_of(d)) == total[d] and count.get(rootfs.parent_of(d)) == count[d]}
    ranked = sorted(((d, b) for d, b in total.items() if d not in chained),
                    key=lambda kv: (-kv[1], kv[0]))[:top]
    return [{"path": d, "bytes": b, "files": count[d]} for d, b in ranked]


def inventory(plan: rootfs.Plan, top: int = 10) -> dict[str, Any]:
    files = image_files(plan)
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in FILE_KINDS:
        mine = [f for f in files if f.kind == kind]
        if mine:
            biggest = sorted(mine, key=lambda f: (-f.size, f.path))
            by_kind[kind] = {"count": len(mine), "bytes": sum(f.size for f in mine),
                             "examples": [f.path for f in biggest[:5]]}
    kinds = [e.kind for e in plan.entries.values()]
    return {
        "files": len(files),
        "bytes": sum(f.size for f in files),
        "directories": kinds.count("dir"),
        "symlinks": kinds.count("symlink"),
        "hardlinks": kinds.count("hardlink"),
        "by_kind": by_kind,
        "largest_files": [{"path": f.path, "bytes": f.size, "kind": f.kind}
                          for f in sorted(files, key=lambda f: (-f.size, f.path))[:top]],
        "largest_directories": largest_directories(files, top),
    }


# --------------------------------------------------------------------------------------------
# Runs and processes


def process_tree(run: tr.Run) -> list[dict[str, Any]]:
    """The run's processes as nested {"pid", "argv", "exe", "exit", "children"} nodes."""
    nodes: dict[int, dict[str, Any]] = {p.pid: {"pid": p.pid, "argv": p.argv, "exe": p.exe, "exit_code": p.exit_code,
                     "exit_signal": p.exit_signal, "children": []} for p in run.processes}
    roots: list[dict[str, Any]] = []
    for p in run.processes:
        parent = nodes.get(p.ppid) if p.ppid is not None else None
        (parent["children"] if parent is not None and parent is not nodes[p.pid] else roots).append(nodes[p.pid])
    return roots


def runs_summary(trace: tr.Trace) -> list[dict[str, Any]]:
    out = []
    for i, run in enumerate(trace.runs):
        out.append({
            "index": i, "argv": run.argv, "executable": run.executable, "cwd": run.cwd,
            "uid": run.uid, "gid": run.gid, "started": run.started, "duration": run.duration,
            "exit_code": run.exit_code, "exit_signal": run.exit_signal, "status": run.status,
            "stop_reason": run.stop_reason, "listening_ports": run.listening_ports,
            "exercises": [{"command": e.command, "exit_code": e.exit_code, "duration": e.duration,
                           "timed_out": e.timed_out, "ok": e.exit_code == 0 and not e.timed_out}
                          for e in run.exercises],
            "process_count": len(run.processes),
            "processes": process_tree(run),
            "tracing": {k: run.tracing.get(k) for k in ("mode", "exact", "stops", "warnings") if k in run.tracing},
        })
    return out


# --------------------------------------------------------------------------------------------
# Failed lookups


class MissGroup(enum.Enum):
    """What a failed lookup most likely is. The first five are noise, shown as counts only; the
    rest are worth a look: a different environment may have these files, and would behave
    otherwise."""

    LOADER_PROBE = "loader-probe"
    SEARCH_PROBE = "search-probe"
    PYTHON_PROBE = "python-probe"
    LOCALE = "locale"
    RUNTIME = "runtime"
    CONFIG = "config"
    PLUGIN = "plugin"
    OTHER = "other"

    @property
    def noise(self) -> bool:
        return self in _NOISE

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_NOISE = frozenset({MissGroup.LOADER_PROBE, MissGroup.SEARCH_PROBE, MissGroup.PYTHON_PROBE, MissGroup.LOCALE,
                    MissGroup.RUNTIME})
_DESCRIPTIONS = {
    MissGroup.LOADER_PROBE: "the dynamic loader trying hwcaps/tls/platform subdirectories before the directory itself",
    MissGroup.SEARCH_PROBE: "a search path tried before the directory where the name was found",
    MissGroup.PYTHON_PROBE: "Python's start-up landmarks and package __init__ extension-module probes",
    MissGroup.LOCALE: "locale and translation lookups (no locale data is installed for them)",
    MissGroup.RUNTIME: "/proc, /sys, /dev and /run (the container runtime provides them)",
    MissGroup.CONFIG: "configuration a different environment may have (it would change behaviour there)",
    MissGroup.PLUGIN: "plugins and modules looked up by name (another environment may provide them)",
    MissGroup.OTHER: "other failed lookups",
}
NOISE_GROUPS = [g for g in MissGroup if g.noise]
SHOWN_GROUPS = [g for g in MissGroup if not g.noise]

_LOADER_DIRS = {"glibc-hwcaps", "tls", "x86_64", "haswell", "avx512_1", "i686", "i586", "sse2",
                "x86-64-v2", "x86-64-v3", "x86-64-v4", "xeon_phi", "aarch64", "atomics", "asimd"}
_PY_INIT_RE = re.compile(r"/__init__\.(cpython-[^/]*\.so|abi3\.so|so)$")
_PY_LANDMARKS = re.compile(r"(/python\d+\.zip|/pybuilddir\.txt|/Modules/Setup(\.local)?|"
                           r"/lib/python\d\.\d+/os\.pyc?|/lib/python\d\.\d+/lib-dynload)$")


@dataclass(frozen=True)
class GroupedMiss:
    """One failed lookup of the recording and the group it falls in."""

    miss: Miss
    group: MissGroup
    found_at: str | None = None  # search probes: where the same name was found

    def to_json(self) -> dict[str, Any]:
        m = self.miss
        out: dict[str, Any] = {"path": m.path, "error": m.result, "syscall": m.syscall, "count": m.count,
                               "pids": list(m.pids), "process": m.process, "group": self.group.value,
                               "exists_on_host": m.exists_on_host}
        if self.found_at:
            out["found_at"] = self.found_at
        return out


def _miss_group(path: str, found: dict[str, str]) -> tuple[MissGroup, str | None]:
    parts = path.split("/")
    if is_runtime_path(path):
        return MissGroup.RUNTIME, None
    name = parts[-1]
    if _PY_INIT_RE.search(path) or _PY_LANDMARKS.search(path):
        return MissGroup.PYTHON_PROBE, None
    if name.endswith(("._pth", "pyvenv.cfg")):
        return MissGroup.CONFIG, None   # a venv or an embedded Python would have it, and change sys.path
    if any(p in _LOADER_DIRS for p in parts[:-1]) or (name in _LOADER_DIRS and "lib" in path):
        return MissGroup.LOADER_PROBE, None
    if name in found and found[name] != path:
        return MissGroup.SEARCH_PROBE, found[name]
    if "/locale/" in path or name.endswith(".mo") or name == "locale-archive":
        return MissGroup.LOCALE, None
    if path.startswith("/etc/") or name.endswith(_CONFIG_SUFFIXES) or _home_config(parts):
        return MissGroup.CONFIG, None
    if re.search(r"\.so(\.[0-9.]+)?$", name) or any(p in ("plugins", "plugin", "modules", "gconv") for p in parts):
        return MissGroup.PLUGIN, None
    return MissGroup.OTHER, None


def _home_config(parts: list[str]) -> bool:
    """~/.something or ~/.config/...: per-user configuration (root's or a user's home)."""
    rest = parts[2:] if parts[1:2] == ["root"] else parts[3:] if parts[1:2] == ["home"] else []
    return bool(rest) and rest[0].startswith(".") and (len(rest) == 1 or rest[0] == ".config")


def grouped_misses(trace: tr.Trace, root: Root | None = None) -> list[GroupedMiss]:
    """Every failed lookup of the recorded runs with its group."""
    root = root or Root("/")
    found: dict[str, str] = {}
    for path in sorted(trace.files):
        if trace.files[path].ok:
            norm = root.normalize(path)[0]
            found.setdefault(os.path.basename(norm), norm)
    return [GroupedMiss(m, *_miss_group(root.normalize(m.path)[0], found)) for m in recorded_misses(trace, root=root)]


def misses_summary(misses: list[GroupedMiss], shown_per_group: int = 50) -> dict[str, Any]:
    counts = {g: sum(1 for m in misses if m.group is g) for g in MissGroup}
    shown: dict[str, list[dict[str, Any]]] = {}
    for g in SHOWN_GROUPS:
        mine = [m for m in misses if m.group is g]
        if mine:
            ordered = sorted(mine, key=lambda m: (-len(m.miss.pids), m.miss.path))
            shown[g.value] = [m.to_json() for m in ordered[:shown_per_group]]
    return {
        "total": len(misses),
        "hidden": {g.value: counts[g] for g in NOISE_GROUPS if counts[g]},
        "shown_counts": {g.value: counts[g] for g in SHOWN_GROUPS},
        "groups": shown,
    }


# --------------------------------------------------------------------------------------------
# The whole report


def report(trace_path: str, trace: tr.Trace, files: fsel.FileSet, plan: rootfs.Plan, *,
           top: int = 10, misses: bool = False, root: Root | None = None) -> dict[str, Any]:
    left_out: dict[str, list[str]] = {}
    for path, rule in files.excluded:
        left_out.setdefault(rule, []).append(path)
    for path, why in plan.skipped:
        left_out.setdefault(why, []).append(path)
    out: dict[str, Any] = {
        "trace": trace_path,
        "format": trace.format,
        "tool_version": trace.tool_version,
        "host": trace.host,
        "runs": runs_summary(trace),
        "paths_recorded": len(trace.files),
        "failed_lookups": sum(1 for r in trace.files.values() if r.failed),
        "image": inventory(plan, top),
        "left_out": {rule: {"count": len(p), "examples": sorted(p)[:5]} for rule, p in sorted(left_out.items())},
        "vanished": files.vanished,
        "unresolved_libraries": [{"name": n, "needed_by": b} for n, b in files.unresolved],
    }
    if misses:
        out["misses"] = misses_summary(grouped_misses(trace, root))
    return out


# --------------------------------------------------------------------------------------------
# Text


def _argv(argv: list[str], width: int = 100) -> str:
    text = " ".join(shown(w) for w in argv)
    return text if len(text) <= width else text[:width - 3] + "..."


def _tree_lines(nodes: list[dict[str, Any]], depth: int, out: list[str], limit: int = 200) -> None:
    for n in nodes:
        if len(out) >= limit:
            return
        status = f"exit {n['exit_code']}" if n["exit_signal"] is None else f"signal {n['exit_signal']}"
        if n["exit_code"] is None and n["exit_signal"] is None:
            status = "running at stop"
        out.append(f"{'  ' * depth}{n['pid']}  {_argv(n['argv'])}  [{status}]")
        _tree_lines(n["children"], depth + 1, out, limit)


def format_report(r: dict[str, Any]) -> str:
    lines = [f"trace {r['trace']} ({r['format']}, tracejail {r['tool_version']}); host "
             f"{r['host'].get('os_release', {}).get('PRETTY_NAME', '?')}, {r['host'].get('arch', '?')}, "
             f"{r['host'].get('libc', '?')}"]
    for run in r["runs"]:
        how = f"exit {run['exit_code']}" if run["exit_signal"] is None else f"signal {run['exit_signal']}"
        lines.append(f"run {run['index']}: {_argv(run['argv'])}  [{how}, {run['stop_reason']}, "
                     f"{run['duration']:.2f}s, {run['process_count']} processes]")
        if run["listening_ports"]:
            lines.append(f"  listened on: {', '.join(str(p) for p in run['listening_ports'])}")
        for e in run["exercises"]:
            mark = "ok" if e["ok"] else ("timed out" if e["timed_out"] else f"FAILED exit {e['exit_code']}")
            lines.append(f"  exercise: {shown(e['command'])}  [{mark}, {e['duration']:.2f}s]")
        tree: list[str] = []
        _tree_lines(run["processes"], 2, tree)
        lines.append("  processes:")
        lines += tree
        if len(tree) < run["process_count"]:
            lines.append(f"    ... {run['process_count'] - len(tree)} more")
    img = r["image"]
    lines.append(f"image: {img['files']} files, {human(img['bytes'])}; {img['directories']} directories, "
                 f"{img['symlinks']} symlinks, {img['hardlinks']} hard links "
                 f"({r['paths_recorded']} paths recorded, {r['failed_lookups']} failed lookups)")
    lines.append("files by kind:")
    for kind, v in img["by_kind"].items():
        lines.append(f"  {kind:<17} {v['count']:>6}  {human(v['bytes']):>9}   e.g. {shown(v['examples'][0])}")
    lines.append("largest files:")
    lines += [f"  {human(f['bytes']):>9}  {shown(f['path'])}" for f in img["largest_files"]]
    lines.append("largest directories (everything below them):")
    lines += [f"  {human(d['bytes']):>9}  {shown(d['path'])}  ({d['files']} files)" for d in img["largest_directories"]]
    if r["left_out"]:
        lines.append("left out:")
        lines += [f"  {v['count']:>5}  {shown(rule)}  (e.g. {shown(v['examples'][0])})" for rule, v in r["left_out"].items()]
    if r["vanished"]:
        lines.append(f"vanished from the host since recording: {len(r['vanished'])}, e.g. {shown(r['vanished'][0])}")
    if r["unresolved_libraries"]:
        u = r["unresolved_libraries"][0]
        lines.append(f"unresolved libraries: {len(r['unresolved_libraries'])}, e.g. {u['name']} needed by {u['needed_by']}")
    if "misses" in r:
        lines += format_misses(r["misses"])
    return "\n".join(lines)


def format_misses(m: dict[str, Any]) -> list[str]:
    hidden = sum(m["hidden"].values())
    lines = [f"failed lookups: {m['total']} paths; {hidden} hidden as noise"
             + (": " + ", ".join(f"{n} {g}" for g, n in m["hidden"].items()) if hidden else "")]
    for g, items in m["groups"].items():
        lines.append(f"{MissGroup(g).description} ({m['shown_counts'][g]}):")
        for it in items:
            procs = len(it["pids"])
            now = "; exists on the host now" if it["exists_on_host"] else ""
            lines.append(f"  {it['path']}  {it['error']} ({it['syscall']}; {it['count']}x by {procs} "
                         f"process{'es' if procs != 1 else ''}, e.g. `{it['process']}`{now})")
        if m["shown_counts"][g] > len(items):
            lines.append(f"  ... {m['shown_counts'][g] - len(items)} more (--json lists them)")
    return lines
