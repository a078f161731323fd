"""The trace: what one or more recorded runs touched, as a versioned JSON document.

`trace.json` layout (``"format": "tracejail-trace/1"``)::

    {
      "format": "tracejail-trace/1",
      "tool": {"name": "tracejail", "version": "0.1.0"},
      "host": {"arch", "kernel", "libc", "os_release": {...}},
      "runs": [Run...],          # the first run is the image's default command
      "files": [PathRecord...]   # sorted by path
    }

Every field is documented on the dataclasses below; README.md has the reader's version.
"""
from __future__ import annotations

import errno as errno_mod
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from tracejail import __version__
from tracejail.errors import TraceFormatError, TracejailError

FORMAT = "tracejail-trace/1"

# How a path was accessed. "write" covers create, truncate, rename, unlink, mkdir and links.
ACCESS_KINDS = ("exec", "read", "write", "stat", "readlink", "list")

OK = "ok"

# Environment variable names whose values never enter a trace or an image.
SECRET_NAME_PARTS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "AUTH",
                     "COOKIE", "SESSION")
REDACTED = "<redacted>"

# Bounded copies of output kept in the trace (verify compares against them).
OUTPUT_LIMIT = 1 << 20


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(part in upper for part in SECRET_NAME_PARTS)


def redact_environment(env: dict[str, str], keep: Iterable[str] = ()) -> dict[str, str]:
    """Replace secret-looking values; names in `keep` (asked for by name) are kept verbatim."""
    kept = set(keep)
    return {k: (v if k in kept or not is_secret_name(k) else REDACTED) for k, v in sorted(env.items())}


@dataclass
class Access:
    """One kind of access to a path, aggregated: `count` calls of `syscall` with `result`."""

    kind: str            # one of ACCESS_KINDS
    syscall: str         # e.g. "openat", "newfstatat", "execve", "kernel:interp", "kernel:shebang"
    result: str          # "ok" or an errno name such as "ENOENT"
    count: int = 0
    pids: list[int] = field(default_factory=list)   # processes (tgids) that made the call

    @property
    def ok(self) -> bool:
        return self.result == OK


@dataclass
class PathRecord:
    """Everything the runs did with one path, as the program spelled it (made absolute)."""

    path: str
    accesses: list[Access] = field(default_factory=list)
    runs: list[int] = field(default_factory=list)   # indices into Trace.runs
    created_by_run: bool = False   # did not exist when first touched, then was created
    removed_by_run: bool = False   # was unlinked, renamed away or removed by the run
    added_by: str | None = None    # set when not traced but added later (e.g. "verify --fix")
    reason: str | None = None      # why it was added

    @property
    def ok(self) -> bool:
        """True when at least one access found the path (it exists, or existed, on the host)."""
        return any(a.ok for a in self.accesses) or self.added_by is not None

    @property
    def kinds(self) -> set[str]:
        return {a.kind for a in self.accesses if a.ok}

    @property
    def failed(self) -> bool:
        return bool(self.accesses) and not self.ok

    def add(self, kind: str, syscall: str, result: str, pid: int, count: int = 1) -> None:
        self.merge_access(Access(kind, syscall, result, count, [pid]))

    def merge_access(self, new: Access) -> None:
        for a in self.accesses:
            if a.kind == new.kind and a.syscall == new.syscall and a.result == new.result:
                a.count += new.count
                a.pids.extend(p for p in new.pids if p not in a.pids)
                return
        self.accesses.append(Access(new.kind, new.syscall, new.result, new.count, list(new.pids)))


@dataclass
class ProcessInfo:
    pid: int
    ppid: int | None
    argv: list[str]
    exe: str | None
    run: int = 0
    exit_code: int | None = None
    exit_signal: int | None = None


@dataclass
class ExerciseResult:
    command: str
    exit_code: int | None
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration: float = 0.0
    timed_out: bool = False


@dataclass
class Run:
    argv: list[str]
    executable: str                      # absolute path COMMAND resolved to
    cwd: str
    uid: int
    gid: int
    environment: dict[str, str]          # secret-looking values redacted
    started: str                         # ISO 8601 UTC
    duration: float = 0.0
    exit_code: int | None = None         # the command's own exit code
    exit_signal: int | None = None       # or the signal that killed it
    stop_reason: str = "exited"          # exited | stopped | interrupted | timeout
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    exercises: list[ExerciseResult] = field(default_factory=list)
    listening_ports: list[int] = field(default_factory=list)
    processes: list[ProcessInfo] = field(default_factory=list)
    tracing: dict[str, Any] = field(default_factory=dict)   # mode, stops, warnings

    @property
    def status(self) -> int:
        """The shell-style status: the exit code, or 128+N when killed by signal N."""
        if self.exit_signal:
            return 128 + self.exit_signal
        return self.exit_code or 0


@dataclass
class Trace:
    runs: list[Run] = field(default_factory=list)
    files: dict[str, PathRecord] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    tool_version: str = __version__
    format: str = FORMAT

    def record(self, path: str) -> PathRecord:
        rec = self.files.get(path)
        if rec is None:
            rec = self.files[path] = PathRecord(path)
        return rec

    def successful_paths(self) -> list[str]:
        return sorted(p for p, r in self.files.items() if r.ok)

    def failed_paths(self) -> list[str]:
        return sorted(p for p, r in self.files.items() if r.failed)

    def merge(self, other: Trace) -> None:
        """Append `other`'s runs (renumbered) and merge its path records: `--append`."""
        offset = len(self.runs)
        for run in other.runs:
            for proc in run.processes:
                proc.run += offset
            self.runs.append(run)
        for path, rec in other.files.items():
            mine = self.files.get(path)
            rec.runs = [r + offset for r in rec.runs]
            if mine is None:
                self.files[path] = rec
                continue
            for a in rec.accesses:
                mine.merge_access(a)
            mine.runs = sorted(set(mine.runs) | set(rec.runs))
            # A path that existed before the first run stays a host file.
            mine.created_by_run = mine.created_by_run and rec.created_by_run
            mine.removed_by_run = mine.removed_by_run or rec.removed_by_run

    # --- JSON -------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "tool": {"name": "tracejail", "version": self.tool_version},
            "host": self.host,
            "runs": [asdict(r) for r in self.runs],
            "files": [_record_to_json(self.files[p]) for p in sorted(self.files)],
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "trace") -> Trace:
        if not isinstance(data, dict) or "format" not in data:
            raise TraceFormatError(f"{source} is not a tracejail trace (no \"format\" field)")
        fmt = data["format"]
        if fmt != FORMAT:
            if isinstance(fmt, str) and fmt.startswith("tracejail-trace/"):
                raise TraceFormatError(
                    f"{source} has format {fmt!r}, this tracejail {__version__} reads {FORMAT!r}: "
                    "record it again or use a matching tracejail version")
            raise TraceFormatError(f"{source} is not a tracejail trace (format {fmt!r})")
        try:
            runs = [_run_from_json(r) for r in data["runs"]]
            files = {}
            for f in data["files"]:
                rec = _record_from_json(f)
                files[rec.path] = rec
            return cls(runs=runs, files=files, host=dict(data.get("host", {})),
                       tool_version=str(data.get("tool", {}).get("version", "?")), format=fmt)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TraceFormatError(f"{source} is damaged ({type(exc).__name__}: {exc}); "
                                   "record it again") from None


def _record_to_json(rec: PathRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"path": rec.path, "accesses": [asdict(a) for a in rec.accesses],
                           "runs": rec.runs}
    if rec.created_by_run:
        out["created_by_run"] = True
    if rec.removed_by_run:
        out["removed_by_run"] = True
    if rec.added_by:
        out["added_by"] = rec.added_by
        out["reason"] = rec.reason
    return out


def _record_from_json(d: dict[str, Any]) -> PathRecord:
    path = d["path"]
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"path {path!r} is not absolute")
    return PathRecord(
        path=path,
        accesses=[Access(str(a["kind"]), str(a["syscall"]), str(a["result"]), int(a["count"]),
                         [int(p) for p in a.get("pids", [])]) for a in d["accesses"]],
        runs=[int(r) for r in d.get("runs", [])],
        created_by_run=bool(d.get("created_by_run", False)),
        removed_by_run=bool(d.get("removed_by_run", False)),
        added_by=d.get("added_by"),
        reason=d.get("reason"),
    )


def _run_from_json(d: dict[str, Any]) -> Run:
    d = dict(d)
    d["exercises"] = [ExerciseResult(**e) for e in d.get("exercises", [])]
    d["processes"] = [ProcessInfo(**p) for p in d.get("processes", [])]
    known = set(Run.__dataclass_fields__)
    return Run(**{k: v for k, v in d.items() if k in known})


# --- files ---------------------------------------------------------------------------------

def load(path: str) -> Trace:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise TraceFormatError(f"trace not found: {path} (make one with `tracejail record`)") from None
    except IsADirectoryError:
        raise TraceFormatError(f"{path} is a directory, not a trace file") from None
    except OSError as exc:
        raise TraceFormatError(f"cannot read trace {path}: {exc.strerror}") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceFormatError(f"{path} is not valid JSON ({exc}); is it a tracejail trace?") from None
    return Trace.from_json(data, source=path)


def check_writable(path: str) -> None:
    """Fail before any work when `path` cannot be written (missing or read-only directory)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise TracejailError(f"cannot write {path}: it is a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tracejail-check-", dir=directory)
    except OSError as exc:
        raise TracejailError(f"cannot write {path}: {exc.strerror or exc} "
                             "(choose another file with -o)") from None
    os.close(fd)
    os.unlink(tmp)


def write_atomic(path: str, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync, rename: never a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            why = "disk full" if exc.errno == errno_mod.ENOSPC else (exc.strerror or str(exc))
            raise TracejailError(f"cannot write {path}: {why}") from None
        raise


def save(trace: Trace, path: str) -> None:
    data = json.dumps(trace.to_json(), indent=1, sort_keys=False).encode() + b"\n"
    write_atomic(path, data)


# --- host facts ----------------------------------------------------------------------------

def host_info() -> dict[str, Any]:
    try:   # instant, unlike platform.libc_ver() which scans the interpreter binary
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""
    uname = os.uname()
    return {
        "arch": uname.machine,
        "kernel": uname.release,
        "libc": libc or "unknown",
        "os_release": read_os_release(),
    }


def read_os_release(path: str = "/etc/os-release") -> dict[str, str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_os_release(f.read())
    except OSError:
        return {}


def parse_os_release(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Z0-9_]+)=(.*)$", line.strip())
        if m:
            out[m.group(1)] = m.group(2).strip().strip('"').strip("'")
    return out


def errno_name(code: int) -> str:
    return errno_mod.errorcode.get(code, f"E{code}")
