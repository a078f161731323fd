"""The trace: what one or more recorded runs touched, as a versioned JSON document.

`trace.json` layout (``"format": "tracejail-trace/1"``)::

    {
      "format": "tracejail-trace/1",
      "tool": {"name": "tracejail", "version": "0.1.0"},
      "host": {"arch", "kernel", "libc", "os_release": {...}},
      "runs": [Run...],          # the first run is the image's default command
      "files": [PathRecord...],  # sorted by path
      "source": ImageSource      # only when recorded from an image (record --image)
    }

Every field is documented on the dataclasses below; README.md has the reader's version.
"""
from __future__ import annotations

import errno as errno_mod
import gc
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

from tracejail import __version__, sensitive
from tracejail.errors import TraceFormatError, TracejailError

FORMAT = "tracejail-trace/1"

# How a path was accessed. "write" covers create, truncate, rename, unlink, mkdir and links.
ACCESS_KINDS = ("exec", "read", "write", "stat", "readlink", "list")

OK = "ok"

# PathRecord.owner: the path must belong to the image user (verify --fix records it; build honours it).
IMAGE_USER = "image-user"

REDACTED = sensitive.REDACTED
is_secret_name = sensitive.is_secret_name

# Bounded copies of output kept in the trace (verify compares against them).
OUTPUT_LIMIT = 1 << 20


@dataclass(slots=True)
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


@dataclass(slots=True)
class PathRecord:
    """Everything the runs did with one path, as the program spelled it (made absolute)."""

    path: str
    accesses: list[Access] = field(default_factory=list)
    runs: list[int] = field(default_factory=list)   # indices into Trace.runs
    created_by_run: bool = False   # did not exist when first touched, then was created
    removed_by_run: bool = False   # was unlinked, renamed away or removed by the run
    added_by: str | None = None    # set when not traced but added later (e.g. "verify --fix")
    reason: str | None = None      # why it was added, or why it must belong to the image user
    owner: str | None = None       # IMAGE_USER: must belong to the image user (verify --fix)

    @property
    def ok(self) -> bool:
        """True when at least one access found the path (it exists, or existed, on the host)."""
        for a in self.accesses:   # a loop, not any(): this runs for every path of big traces
            if a.result == OK:
                return True
        return self.added_by is not None

    @property
    def kinds(self) -> set[str]:
        return {a.kind for a in self.accesses if a.result == OK}

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


def run_problems(run: Run) -> list[str]:
    """What went wrong in a recorded run itself: a command that failed, an exercise that failed."""
    out = []
    if run.stop_reason == "exited" and run.status != 0:
        last = next((ln.strip() for ln in reversed(run.stderr.splitlines()) if ln.strip()), "")
        how = f"signal {run.exit_signal}" if run.exit_signal else f"exit {run.exit_code}"
        out.append(f"the recorded command failed with {how}" + (f" ({last[:160]})" if last else ""))
    for e in run.exercises:
        if e.exit_code != 0 or e.timed_out:
            out.append(f"exercise {e.command!r} " + ("timed out" if e.timed_out else f"exited {e.exit_code}"))
    return out


def scrub_source(config: SourceConfig, keep_env: Iterable[str] = ()) -> list[str]:
    """Take secrets out of a source image's config before it is stored in a trace (the image holds
    them; the trace, which travels, does not): Env values, Entrypoint/Cmd words, label values."""
    said: list[str] = []
    env, names = sensitive.redact_environment(config.environment, keep_env)
    config.env = [f"{k}={v}" for k, v in env.items()]
    config.entrypoint = sensitive.redact_argv(["", *config.entrypoint])[0][1:]
    config.cmd = sensitive.redact_argv(["", *config.cmd])[0][1:]
    labels = {k: REDACTED if sensitive.secret_in_label(k, v) else v for k, v in config.labels.items()}
    names += [f"label {k}" for k, v in labels.items() if v == REDACTED and config.labels[k] != REDACTED]
    config.labels = labels
    if names:
        said.append(f"the image's config holds secrets, stored as {REDACTED} in the trace: {', '.join(names[:6])}"
                    f"{', ...' if len(names) > 6 else ''}")
    return said


def scrub_run(run: Run, keep_env: Iterable[str] = (), keep_argv: bool = False) -> list[str]:
    """Take secrets out of a run before it is stored: environment values (by name and by value,
    except names in `keep_env`), command lines (`--password=X`, tokens, URL passwords; the run's
    own argv is kept with `keep_argv`) and captured output. Returns what to tell the user."""
    said: list[str] = []
    run.environment, names = sensitive.redact_environment(run.environment, keep_env)
    if names:
        said.append(f"environment: {len(names)} secret value(s) stored as {REDACTED} ({', '.join(names[:6])}"
                    f"{', ...' if len(names) > 6 else ''}); --keep-env NAME keeps one")
    argv, changed = sensitive.redact_argv(run.argv)
    if changed and not keep_argv:
        run.argv = argv
        said.append(f"the command line holds a secret (argument {', '.join(map(str, changed))}): stored as "
                    f"{REDACTED}, so an image built from this trace cannot run it as recorded; pass the "
                    "secret at run time (docker run -e, or --env at build) or give the command at build "
                    "with --entrypoint (--keep-argv keeps it in the trace)")
    elif changed:
        said.append(f"the command line holds a secret (argument {', '.join(map(str, changed))}) and "
                    "--keep-argv keeps it: it is in the trace, and in the Entrypoint of any image built from it")
    for p in run.processes:
        if not (keep_argv and p.argv == run.argv):
            p.argv = sensitive.redact_argv(p.argv)[0]
    found: list[str] = []
    run.stdout, f1 = sensitive.redact_text(run.stdout)
    run.stderr, f2 = sensitive.redact_text(run.stderr)
    found += f1 + f2
    for e in run.exercises:
        e.stdout, f1 = sensitive.redact_text(e.stdout)
        e.stderr, f2 = sensitive.redact_text(e.stderr)
        found += f1 + f2
    if found:
        said.append(f"captured output held {', '.join(dict.fromkeys(found))}: stored as {REDACTED}")
    return said


@dataclass
class SourceConfig:
    """What the source image's config says about how it runs, kept so the minified image can
    keep it (`record --image`; build reads it, never the image again)."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)           # KEY=VALUE
    working_dir: str = ""
    user: str = ""                                         # as the image says it ("" is root)
    exposed_ports: list[str] = field(default_factory=list)  # "8000/tcp"
    labels: dict[str, str] = field(default_factory=dict)
    volumes: list[str] = field(default_factory=list)
    stop_signal: str = ""

    @property
    def environment(self) -> dict[str, str]:
        return env_dict(self.env)


def env_dict(items: Iterable[str]) -> dict[str, str]:
    """KEY=VALUE items (an image config's Env) as a dict; an item without `=` is no variable."""
    return dict(item.split("=", 1) for item in items if "=" in item)


@dataclass
class ImageSource:
    """Where the paths of a trace recorded from an image point: that image's file system, not
    the recording host's. `rootfs` is where it was unpacked (build unpacks it again when that is
    gone or is not tracejail's own unpack of `image_id`)."""

    image: str                 # as the user named it: an engine image, an archive or a layout
    image_id: str              # "sha256:..." of its config: the image itself
    rootfs: str | None         # the unpacked tree, when it was kept (the cache)
    config: SourceConfig = field(default_factory=SourceConfig)
    compressed_size: int = 0   # its layers as stored
    content_size: int = 0      # its files' bytes, unpacked


@dataclass
class Trace:
    runs: list[Run] = field(default_factory=list)
    files: dict[str, PathRecord] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    tool_version: str = __version__
    format: str = FORMAT
    source: ImageSource | None = None   # None: the paths are the recording host's

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
            if rec.owner and not mine.owner:
                mine.owner, mine.reason = rec.owner, mine.reason or rec.reason

    def check_same_source(self, other: Trace) -> None:
        """`--append` merges runs of one tree only: the host's, or one image's."""
        mine = self.source.image_id if self.source else None
        theirs = other.source.image_id if other.source else None
        if mine != theirs:
            where = {None: "the host"}
            raise TracejailError(f"cannot append a run recorded in {where.get(theirs, theirs)} to a trace "
                                 f"recorded in {where.get(mine, mine)}; record into a new trace", 2)

    # --- JSON -------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {**self._head_json(), "files": [_record_to_json(self.files[p]) for p in sorted(self.files)]}

    def _head_json(self) -> dict[str, Any]:
        """Everything but the file records."""
        return {
            "format": self.format,
            "tool": {"name": "tracejail", "version": self.tool_version},
            "host": self.host,
            "runs": [asdict(r) for r in self.runs],
            **({"source": asdict(self.source)} if self.source else {}),
        }

    def dumps(self) -> bytes:
        """The trace file's bytes: the head indented, then the file records one per line, last
        (the streamable layout). Each record goes through json's C encoder, which an indented
        dump never uses: for 20,000 paths that took 0.42 s of a 1.2 s recording, now 0.1 s."""
        head = json.dumps(self._head_json(), indent=1)
        encode = json.JSONEncoder(separators=(", ", ": ")).encode
        records = ",\n  ".join(encode(_record_to_json(self.files[p])) for p in sorted(self.files))
        files = f"[\n  {records}\n ]" if records else "[]"
        return f'{head[:-2]},\n "files": {files}\n}}\n'.encode()

    @classmethod
    def from_json(cls, data: Any, source: str = "trace") -> Trace:
        """The trace in `data` (parsed JSON), every field checked against the schema (README,
        "The trace format"). The first bad field raises TraceFormatError naming it."""
        _check_format(data, source)
        try:
            runs = _runs_from_json(_key(data, "runs", ""))
            raw = _list(_key(data, "files", ""), "files", MAX_FILES)
            return cls._assemble(data, runs, _files_from_json(iter(raw), len(runs)))
        except _Bad as bad:
            raise TraceFormatError(f"{source} is not a valid trace: {bad}") from None

    @classmethod
    def _assemble(cls, data: dict[str, Any], runs: list[Run], files: dict[str, PathRecord]) -> Trace:
        tool = _dict(data.get("tool", {}), "tool")
        source = data.get("source")
        return cls(runs=runs, files=files, host=_host_from_json(data.get("host", {})),
                   tool_version=_str(tool.get("version", "?"), "tool.version", 64), format=FORMAT,
                   source=_source_from_json(source) if source is not None else None)


def _check_format(data: Any, source: str) -> None:
    if not isinstance(data, dict) or "format" not in data:
        raise TraceFormatError(f"{source} is not a tracejail trace (no \"format\" field)")
    fmt = data["format"]
    if fmt != FORMAT:
        if isinstance(fmt, str) and fmt.startswith("tracejail-trace/"):
            raise TraceFormatError(
                f"{source} has format {fmt!r}, this tracejail {__version__} reads {FORMAT!r}: "
                "record it again or use a matching tracejail version")
        raise TraceFormatError(f"{source} is not a tracejail trace (format {str(fmt)[:40]!r})")


def _runs_from_json(v: Any) -> list[Run]:
    return [_run_from_json(r, f"runs[{n}]") for n, r in enumerate(_list(v, "runs", MAX_RUNS))]


def _files_from_json(items: Iterator[Any], n_runs: int) -> dict[str, PathRecord]:
    files: dict[str, PathRecord] = {}
    seen: dict[Any, str] = {}
    for n, item in enumerate(items):
        if n >= MAX_FILES:
            raise _Bad("files", f"a list of at most {MAX_FILES} paths", raw=True)
        rec = _record_from_json(item, n, n_runs, seen)
        files[rec.path] = rec
    return files


# --- reading a trace file without holding its parsed JSON and its model at once -----------------

_WS = re.compile(r"[ \t\n\r]*")


class _Stream:
    """The top-level object of a trace, read key by key with json's raw_decode. The "files"
    array, a million entries in a big trace, is turned into the model one element at a time,
    so the parsed JSON of all of them never exists at once (that halved the peak memory of
    loading a 1e6-path trace). Used when "format" and "runs" come before "files", as tracejail
    writes them; anything else is read whole."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.at = 0
        self.decoder = json.JSONDecoder()

    def skip(self) -> str:
        self.at = _WS.match(self.text, self.at).end()  # type: ignore[union-attr]
        return self.text[self.at:self.at + 1]

    def expect(self, char: str) -> None:
        if self.skip() != char:
            raise json.JSONDecodeError(f"expected {char!r}", self.text, self.at)
        self.at += 1

    def value(self) -> Any:
        self.skip()
        value, self.at = self.decoder.raw_decode(self.text, self.at)
        return value

    def elements(self) -> Iterator[Any]:
        self.expect("[")
        if self.skip() == "]":
            self.at += 1
            return
        while True:
            yield self.value()
            if self.skip() == ",":
                self.at += 1
                continue
            self.expect("]")
            return

    def trace(self, source: str) -> Trace | None:
        """The trace, or None when its layout is not the streamable one."""
        self.expect("{")
        top: dict[str, Any] = {}
        files: dict[str, PathRecord] | None = None
        runs: list[Run] | None = None
        while self.skip() != "}":
            if top or files is not None:
                self.expect(",")
            key = self.value()
            if type(key) is not str:
                raise json.JSONDecodeError("expected a key", self.text, self.at)
            self.expect(":")
            if key == "files" and "format" in top and "runs" in top and files is None:
                _check_format(top, source)
                try:
                    runs = _runs_from_json(top["runs"])
                    files = _files_from_json(self.elements(), len(runs))
                except _Bad as bad:
                    raise TraceFormatError(f"{source} is not a valid trace: {bad}") from None
                continue
            if key == "files":
                return None
            top[key] = self.value()
        self.at += 1
        if self.skip():
            raise json.JSONDecodeError("extra data", self.text, self.at)
        if files is None or runs is None:
            _check_format(top, source)
            raise TraceFormatError(f"{source} is not a valid trace: field files must be present")
        try:
            return Trace._assemble(top, runs, files)
        except _Bad as bad:
            raise TraceFormatError(f"{source} is not a valid trace: {bad}") from None


# --- the schema, checked field by field (README: "The trace format") ---------------------------

# Bounds on what a trace may hold: a trace may come from someone else.
MAX_TRACE_BYTES = 1 << 30
MAX_RUNS = 10_000
MAX_FILES = 20_000_000
MAX_ITEMS = 1_000_000        # processes, exercises, argv words, pids, ports... in one list
MAX_PATH = 1 << 16
STOP_REASONS = ("exited", "stopped", "interrupted", "timeout")
_ERRNO_NAME = re.compile(r"E[A-Z0-9]{1,15}\Z")
_SYSCALL = re.compile(r"[a-z0-9_:]{1,40}\Z")


class _Bad(Exception):
    """A field that does not fit the schema: where it is and what it should be."""

    def __init__(self, where: str, want: str, value: Any = None, *, raw: bool = False) -> None:
        got = "" if raw else f", not {_describe(value)}"
        super().__init__(f"field {where} must be {want}{got}")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"[:60]
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _key(d: dict[str, Any], name: str, where: str) -> Any:
    if name not in d:
        raise _Bad(f"{where}.{name}" if where else name, "present", raw=True)
    return d[name]


def _str(v: Any, where: str, limit: int = MAX_TRACE_BYTES) -> str:
    if type(v) is not str:
        raise _Bad(where, "a string", v)
    if len(v) > limit:
        raise _Bad(where, f"at most {limit} characters", raw=True)
    return v


def _ostr(v: Any, where: str) -> str | None:
    return None if v is None else _str(v, where)


def _int(v: Any, where: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _Bad(where, f"an integer from {lo} to {hi}", v)
    return v


def _oint(v: Any, where: str, lo: int = -(1 << 31), hi: int = 1 << 31) -> int | None:
    return None if v is None else _int(v, where, lo, hi)


def _num(v: Any, where: str) -> float:
    if type(v) not in (int, float) or not 0 <= v < 1e12:
        raise _Bad(where, "a non-negative number", v)
    return float(v)


def _bool(v: Any, where: str) -> bool:
    if type(v) is not bool:
        raise _Bad(where, "true or false", v)
    return v


def _list(v: Any, where: str, limit: int = MAX_ITEMS) -> list[Any]:
    if type(v) is not list:
        raise _Bad(where, "a list", v)
    if len(v) > limit:
        raise _Bad(where, f"a list of at most {limit} items", raw=True)
    return v


def _dict(v: Any, where: str) -> dict[str, Any]:
    if type(v) is not dict:
        raise _Bad(where, "an object", v)
    return v


def _strs(v: Any, where: str) -> list[str]:
    return [_str(x, f"{where}[{n}]") for n, x in enumerate(_list(v, where))]


def _abs_path(v: Any, where: str) -> str:
    path = _str(v, where, MAX_PATH)
    if not path.startswith("/") or "\0" in path:
        raise _Bad(where, "an absolute path without NUL bytes", raw=True)
    return path


def _scalars(v: Any, where: str) -> dict[str, Any]:
    """A free-form object of scalars (or lists of scalars): tracing details, host facts."""
    out = {}
    for k, x in _dict(v, where).items():
        if type(x) is list:
            for n, y in enumerate(_list(x, f"{where}.{k}")):
                if type(y) not in (str, int, float, bool) and y is not None:
                    raise _Bad(f"{where}.{k}[{n}]", "a string, number, true, false or null", y)
        elif type(x) not in (str, int, float, bool) and x is not None:
            raise _Bad(f"{where}.{k}", "a string, number, true, false, null or a list of those", x)
        out[k] = x
    return out


def _host_from_json(v: Any) -> dict[str, Any]:
    host = dict(_dict(v, "host"))
    release = host.pop("os_release", {})
    out = _scalars(host, "host")
    out["os_release"] = {k: _str(x, f"host.os_release.{k}") for k, x in _dict(release, "host.os_release").items()}
    return out


def source_from_json(v: Any) -> ImageSource:
    """An ImageSource from its JSON form (the trace's "source", or the image cache's marker)."""
    try:
        return _source_from_json(v)
    except _Bad as bad:
        raise TraceFormatError(f"not a valid image source: {bad}") from None


IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}\Z")   # an image's ID: its config's digest


def _source_from_json(v: Any) -> ImageSource:
    d = _dict(v, "source")
    image_id = _str(_key(d, "image_id", "source"), "source.image_id", 80)
    if not IMAGE_ID.match(image_id):
        raise _Bad("source.image_id", "a sha256: digest", image_id)
    rootfs = d.get("rootfs")
    c = _dict(d.get("config", {}), "source.config")
    where = "source.config"
    config = SourceConfig(
        entrypoint=_strs(c.get("entrypoint", []), f"{where}.entrypoint"),
        cmd=_strs(c.get("cmd", []), f"{where}.cmd"),
        env=_strs(c.get("env", []), f"{where}.env"),
        working_dir=_str(c.get("working_dir", ""), f"{where}.working_dir", MAX_PATH),
        user=_str(c.get("user", ""), f"{where}.user", 256),
        exposed_ports=_strs(c.get("exposed_ports", []), f"{where}.exposed_ports"),
        labels={k: _str(x, f"{where}.labels.{k}") for k, x in _dict(c.get("labels", {}), f"{where}.labels").items()},
        volumes=_strs(c.get("volumes", []), f"{where}.volumes"),
        stop_signal=_str(c.get("stop_signal", ""), f"{where}.stop_signal", 32))
    return ImageSource(image=_str(_key(d, "image", "source"), "source.image", MAX_PATH), image_id=image_id,
                       rootfs=_abs_path(rootfs, "source.rootfs") if rootfs is not None else None, config=config,
                       compressed_size=_int(d.get("compressed_size", 0), "source.compressed_size"),
                       content_size=_int(d.get("content_size", 0), "source.content_size"))


_KINDS = {k: k for k in ACCESS_KINDS}


def _record_from_json(d: Any, n: int, n_runs: int, seen: dict[Any, str]) -> PathRecord:
    """One files[] entry. This runs once per path (a million times for a big trace), so the
    checks are inline and the message is built only on failure; `seen` holds the syscall names
    and results already checked, and interns them: a million records share a few strings."""
    if type(d) is not dict:
        raise _Bad(f"files[{n}]", "an object", d)
    path = d.get("path")
    if type(path) is not str or not path.startswith("/") or "\0" in path or len(path) > MAX_PATH:
        raise _Bad(f"files[{n}].path", "an absolute path without NUL bytes", path)
    raw = d.get("accesses")
    if type(raw) is not list or len(raw) > 4096:
        raise _Bad(f"files[{n}].accesses", "a list of at most 4096 accesses", raw)
    accesses = []
    for m, a in enumerate(raw):
        if type(a) is not dict:
            raise _Bad(f"files[{n}].accesses[{m}]", "an object", a)
        kind, syscall, result, count = a.get("kind"), a.get("syscall"), a.get("result"), a.get("count")
        kind = _KINDS.get(kind) if type(kind) is str else None
        if kind is None:
            raise _Bad(f"files[{n}].accesses[{m}].kind", "one of " + ", ".join(ACCESS_KINDS), a.get("kind"))
        if type(syscall) is not str:
            raise _Bad(f"files[{n}].accesses[{m}].syscall", "a system call name", syscall)
        checked = seen.get(syscall)
        if checked is None:
            if not _SYSCALL.match(syscall):
                raise _Bad(f"files[{n}].accesses[{m}].syscall", "a system call name", syscall)
            checked = seen[syscall] = syscall
        syscall = checked
        if type(result) is not str:
            raise _Bad(f"files[{n}].accesses[{m}].result", '"ok" or an errno name', result)
        checked = seen.get(result)
        if checked is None:
            if result != OK and not _ERRNO_NAME.match(result):
                raise _Bad(f"files[{n}].accesses[{m}].result", '"ok" or an errno name', result)
            checked = seen[result] = result
        result = checked
        if type(count) is not int or count < 0:
            raise _Bad(f"files[{n}].accesses[{m}].count", "a non-negative integer", count)
        pids = a.get("pids", [])
        if type(pids) is not list or len(pids) > MAX_ITEMS:
            raise _Bad(f"files[{n}].accesses[{m}].pids", "a list of process ids", pids)
        for p in pids:
            if type(p) is not int or p < 0:
                raise _Bad(f"files[{n}].accesses[{m}].pids", "a list of process ids", p)
        accesses.append(Access(kind, syscall, result, count, pids))
    runs = d.get("runs", [])
    if type(runs) is not list:
        raise _Bad(f"files[{n}].runs", "a list of run indices", runs)
    for r in runs:
        if type(r) is not int or not 0 <= r < n_runs:
            raise _Bad(f"files[{n}].runs", f"a list of run indices below {n_runs}", r)
    created, removed = d.get("created_by_run", False), d.get("removed_by_run", False)
    if type(created) is not bool:
        raise _Bad(f"files[{n}].created_by_run", "true or false", created)
    if type(removed) is not bool:
        raise _Bad(f"files[{n}].removed_by_run", "true or false", removed)
    added_by, reason, owner = d.get("added_by"), d.get("reason"), d.get("owner")
    if added_by is not None or reason is not None:
        _ostr(added_by, f"files[{n}].added_by")
        _ostr(reason, f"files[{n}].reason")
    if owner is not None and owner != IMAGE_USER:
        raise _Bad(f"files[{n}].owner", f'"{IMAGE_USER}" or absent', owner)
    return PathRecord(path, accesses, runs, created, removed, added_by, reason, owner)


def _exercise_from_json(d: Any, where: str) -> ExerciseResult:
    d = _dict(d, where)
    return ExerciseResult(
        command=_str(_key(d, "command", where), f"{where}.command"),
        exit_code=_oint(_key(d, "exit_code", where), f"{where}.exit_code", 0, 255),
        stdout=_str(d.get("stdout", ""), f"{where}.stdout"),
        stderr=_str(d.get("stderr", ""), f"{where}.stderr"),
        stdout_truncated=_bool(d.get("stdout_truncated", False), f"{where}.stdout_truncated"),
        stderr_truncated=_bool(d.get("stderr_truncated", False), f"{where}.stderr_truncated"),
        duration=_num(d.get("duration", 0.0), f"{where}.duration"),
        timed_out=_bool(d.get("timed_out", False), f"{where}.timed_out"))


def _process_from_json(d: Any, where: str) -> ProcessInfo:
    d = _dict(d, where)
    return ProcessInfo(
        pid=_int(_key(d, "pid", where), f"{where}.pid"),
        ppid=_oint(d.get("ppid"), f"{where}.ppid", 0, 1 << 62),
        argv=_strs(d.get("argv", []), f"{where}.argv"),
        exe=_ostr(d.get("exe"), f"{where}.exe"),
        run=_int(d.get("run", 0), f"{where}.run", 0, MAX_RUNS),
        exit_code=_oint(d.get("exit_code"), f"{where}.exit_code", 0, 255),
        exit_signal=_oint(d.get("exit_signal"), f"{where}.exit_signal", 0, 127))


def _run_from_json(d: Any, where: str) -> Run:
    d = _dict(d, where)
    argv = _strs(_key(d, "argv", where), f"{where}.argv")
    if not argv:
        raise _Bad(f"{where}.argv", "a non-empty list of strings", raw=True)
    stop_reason = d.get("stop_reason", "exited")
    if stop_reason not in STOP_REASONS:
        raise _Bad(f"{where}.stop_reason", "one of " + ", ".join(STOP_REASONS), stop_reason)
    env = _dict(_key(d, "environment", where), f"{where}.environment")
    return Run(
        argv=argv,
        executable=_abs_path(_key(d, "executable", where), f"{where}.executable"),
        cwd=_abs_path(_key(d, "cwd", where), f"{where}.cwd"),
        uid=_int(_key(d, "uid", where), f"{where}.uid", 0, (1 << 32) - 1),
        gid=_int(_key(d, "gid", where), f"{where}.gid", 0, (1 << 32) - 1),
        environment={_str(k, f"{where}.environment"): _str(v, f"{where}.environment.{k}") for k, v in env.items()},
        started=_str(_key(d, "started", where), f"{where}.started", 64),
        duration=_num(d.get("duration", 0.0), f"{where}.duration"),
        exit_code=_oint(d.get("exit_code"), f"{where}.exit_code", 0, 255),
        exit_signal=_oint(d.get("exit_signal"), f"{where}.exit_signal", 0, 127),
        stop_reason=stop_reason,
        stdout=_str(d.get("stdout", ""), f"{where}.stdout"),
        stderr=_str(d.get("stderr", ""), f"{where}.stderr"),
        stdout_truncated=_bool(d.get("stdout_truncated", False), f"{where}.stdout_truncated"),
        stderr_truncated=_bool(d.get("stderr_truncated", False), f"{where}.stderr_truncated"),
        exercises=[_exercise_from_json(e, f"{where}.exercises[{n}]")
                   for n, e in enumerate(_list(d.get("exercises", []), f"{where}.exercises"))],
        listening_ports=[_int(p, f"{where}.listening_ports[{n}]", 1, 65535)
                         for n, p in enumerate(_list(d.get("listening_ports", []), f"{where}.listening_ports"))],
        processes=[_process_from_json(p, f"{where}.processes[{n}]")
                   for n, p in enumerate(_list(d.get("processes", []), f"{where}.processes"))],
        tracing=_scalars(d.get("tracing", {}), f"{where}.tracing"),
    )


def _record_to_json(rec: PathRecord) -> dict[str, Any]:
    # By hand: dataclasses.asdict deep-copies, and took half of saving a big trace.
    out: dict[str, Any] = {"path": rec.path,
                           "accesses": [{"kind": a.kind, "syscall": a.syscall, "result": a.result, "count": a.count,
                                         "pids": a.pids} for a in rec.accesses],
                           "runs": rec.runs}
    if rec.created_by_run:
        out["created_by_run"] = True
    if rec.removed_by_run:
        out["removed_by_run"] = True
    if rec.added_by:
        out["added_by"] = rec.added_by
    if rec.added_by or rec.reason:
        out["reason"] = rec.reason
    if rec.owner:
        out["owner"] = rec.owner
    return out


# --- files ---------------------------------------------------------------------------------

def load(path: str) -> Trace:
    """Read and check a trace file: one line and exit 65 for anything that is not a trace."""
    return load_with_owner(path)[0]


def load_with_owner(path: str) -> tuple[Trace, os.stat_result]:
    """The trace and the stat of the very file it was read from (whose is it: see `foreign`)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size > MAX_TRACE_BYTES:
                raise TraceFormatError(f"{path} is {st.st_size} bytes; a trace is at most {MAX_TRACE_BYTES} "
                                       "(1 GiB)")
            raw = f.read(MAX_TRACE_BYTES + 1)
    except FileNotFoundError:
        raise TraceFormatError(f"trace not found: {path} (make one with `tracejail record`)") from None
    except IsADirectoryError:
        raise TraceFormatError(f"{path} is a directory, not a trace file") from None
    except OSError as exc:
        raise TraceFormatError(f"cannot read trace {path}: {exc.strerror}") from None
    if len(raw) > MAX_TRACE_BYTES:
        raise TraceFormatError(f"{path} holds more than {MAX_TRACE_BYTES} bytes; a trace is at most 1 GiB")
    # Millions of small objects: the cyclic collector would rescan them again and again (it
    # doubled the load time of a 1e6-path trace); nothing here makes cycles.
    gc_was = gc.isenabled()
    gc.disable()
    try:
        text = raw.decode("utf-8")
        del raw
        # Only an object can be a trace; anything else is parsed whole, to be told apart from
        # text that is not JSON at all.
        trace = _Stream(text).trace(path) if text.lstrip().startswith("{") else None
        if trace is None:
            trace = Trace.from_json(json.loads(text), source=path)
        return trace, st
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceFormatError(f"{path} is not valid JSON ({str(exc)[:200]}); is it a tracejail trace?") from None
    except RecursionError:
        raise TraceFormatError(f"{path} is nested too deeply to be a trace") from None
    finally:
        if gc_was:
            gc.enable()


def foreign(st: os.stat_result) -> str | None:
    """Why a trace file is not the invoking user's own (None when it is): commands in someone
    else's trace are someone else's code."""
    me = os.geteuid()
    if st.st_uid != me:
        return f"it belongs to uid {st.st_uid}, not to you (uid {me})"
    if st.st_mode & 0o022:
        return f"others can write it (mode {oct(st.st_mode & 0o777)})"
    return None


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
    write_atomic(path, trace.dumps())


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

