"""`tracejail verify`: replay every recorded run in the jail and compare it with the recording.

Where a run is replayed:

* ``-t IMAGE``: ``docker run --rm`` in the engine DOCKER_HOST names, as the image's user. Runs with
  exercises publish their recorded ports on 127.0.0.1 (``-p 127.0.0.1:P:P``); an engine without a
  bridge network (``dockerd --bridge none``) cannot publish, so there the container shares the
  host's network instead (``--network host``, as the recording did) and the report says so.
* ``--rootfs DIR``: a staged tree, in the jail of `tracejail.jail` (new mount and PID namespaces,
  /proc, a minimal /dev, tmpfs /tmp, chroot, the image's user). Root only.

Each replay uses the run's argv with the recorded executable as argv[0] (the image's entrypoint),
the recorded working directory and the environment the image would get (its config, and for later
runs the run's own allowed variables). Plain runs compare exit status and stdout; runs with
exercises wait for readiness as `record` did, run the same exercises on the host and compare each
one's exit code and stdout.

Misses: a failing run is replayed once more under tracejail's own tracer with the tracee in the
jail (``--trace-inside``; `record` with exact results, since only the kernel knows what the chrooted
task found). A miss is a path that the jailed program looked up and did not find (ENOENT/ENOTDIR),
that exists on the host, and that did not fail in the host recording either (such noise, e.g.
Python's import probes, is no miss). With ``-t IMAGE`` the jail runs the image's own file system,
exported from the engine, so what an ``--exclude`` left out is missing there too.

``--fix`` adds the misses to the trace (``added_by="verify --fix"`` and the reason), rebuilds (the
image under the same name, or the tree in place), and verifies again, until everything passes or a
round finds nothing new, at most ``--max-rounds`` rebuilds. The rebuild uses the trace and what the
image itself says (user, extra environment, entrypoint); options of the original build that the
image does not record (--exclude, --include, --keep-modes...) are not repeated.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Protocol

from tracejail import build as tjbuild
from tracejail import fileset as fsel
from tracejail import image as image_mod
from tracejail import jail, pyimports, sensitive, shrink
from tracejail import trace as tr
from tracejail.errors import Interrupted, TraceFormatError, TracejailError, UsageError
from tracejail.misses import LISTING, Miss, miss_of, short_command
from tracejail.record import NotReady, ReadyError, listening_ports, run_exercise, spawn_captured
from tracejail.root import NodeKind, Root, is_runtime_path
from tracejail.source import root_of as trace_root
from tracejail.text import shown

NOT_FOUND = ("ENOENT", "ENOTDIR")
DENIED = ("EACCES", "EPERM", "EROFS")
# Calls that change a directory's entries: when they are refused, the directory is what needs the user.
_DIRECTORY_CALLS = ("rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir", "mkdir", "mkdirat",
                    "symlink", "symlinkat", "link", "linkat")
FIXED_BY = "verify --fix"
# Paths the runtime provides (Docker, the jail); fileset never copies them either.
DIFF_LINES = 24
STDERR_TAIL_LINES = 12
DOCKER_TIMEOUT = 60.0
EXPORT_TIMEOUT = 600.0


# --- results ------------------------------------------------------------------------------------

@dataclass
class ExerciseCheck:
    command: str
    passed: bool
    expected_exit: int | None
    exit_code: int | None
    diff: str = ""            # unified diff of stdout (recorded -> replayed), empty when equal
    stderr: str = ""          # tail of the exercise's stderr, when it failed
    note: str = ""            # e.g. "not run: the command was not ready"


@dataclass
class RunCheck:
    index: int
    command: list[str]
    passed: bool
    expected_status: int | None = None     # plain runs
    status: int | None = None
    diff: str = ""
    stderr: str = ""
    error: str | None = None               # never ready, timed out...
    exercises: list[ExerciseCheck] = field(default_factory=list)
    misses: list[Miss] = field(default_factory=list)
    denied: list[Miss] = field(default_factory=list)   # found in the jail but not readable there
    traced: bool = False                   # misses were looked for (a traced replay ran)
    notes: list[str] = field(default_factory=list)


@dataclass
class Round:
    number: int
    runs: list[RunCheck]
    added: list[str] = field(default_factory=list)     # paths added to the trace after this round
    kept: list[str] = field(default_factory=list)      # misses the trace had already: only rebuilt
    owned: list[str] = field(default_factory=list)     # recorded as needing the image user (owner)
    rebuilt: str | None = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.runs)


@dataclass
class VerifyReport:
    trace: str
    target: str               # "image NAME" or "rootfs DIR"
    user: str
    rounds: list[Round] = field(default_factory=list)
    end: str = ""             # why the --fix loop ended
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)      # how the replays ran, when it matters
    import_check: ImportCheck | None = None

    @property
    def passed(self) -> bool:
        return bool(self.rounds) and self.rounds[-1].passed and (self.import_check is None or self.import_check.passed)

    def to_json(self) -> dict[str, Any]:
        return {"trace": self.trace, "target": self.target, "user": self.user, "passed": self.passed,
                "end": self.end, "warnings": self.warnings, "notes": self.notes,
                "rounds": [_round_json(r) for r in self.rounds],
                "import_check": asdict(self.import_check) if self.import_check else None}


@dataclass
class ImportCheck:
    """`--import-check`: the modules the static import closure added, imported in the image."""

    interpreter: str
    modules: list[str]
    failed: dict[str, str] = field(default_factory=dict)    # module -> the exception it raised
    problem: str = ""        # why the check could not run to its end

    @property
    def passed(self) -> bool:
        return not self.failed and not self.problem


def _round_json(r: Round) -> dict[str, Any]:
    runs = []
    for c in r.runs:
        d = asdict(c)
        d["misses"] = [m.to_json() for m in c.misses]
        d["denied"] = [m.to_json() for m in c.denied]
        runs.append(d)
    return {"round": r.number, "passed": r.passed, "added": r.added, "kept": r.kept, "owned": r.owned,
            "rebuilt": r.rebuilt, "runs": runs}


# --- options --------------------------------------------------------------------------------

@dataclass
class VerifyOptions:
    image: str | None = None
    rootfs: str | None = None
    user: str | None = None               # UID:GID or root; default: the image's
    fix: bool = False
    max_rounds: int = 3                   # rebuilds at most
    trace_inside: bool | None = None      # None: on failure, when a jail can be made here
    timeout: float = 120.0                # per run
    ready_timeout: float = 30.0
    stop_timeout: float = 10.0
    exercise_timeout: float = 60.0
    docker_env: Mapping[str, str] | None = None   # environment for the docker CLI (DOCKER_HOST)
    overlay: bool = True                  # jail: False forces the bind-mount fallback (tests)
    trust_trace: bool = False             # run the exercise commands of a trace that is not ours
    userns: bool = True                   # jail in a user namespace (False: --no-user-namespace, root)
    read_only: bool = False               # run with a read-only root (and tmpfs /tmp), like --read-only
    import_check: bool = False            # import every module the static import closure added


# --- what the recording says -------------------------------------------------------------------

@dataclass(frozen=True)
class ReadyRule:
    """How `record` decided the command was ready; replayed the same way."""

    port: int | None
    delay: float | None
    ports: tuple[int, ...]      # every port the recorded run listened on (published)


def ready_rule(run: tr.Run) -> ReadyRule:
    t = run.tracing or {}
    ports = tuple(sorted(run.listening_ports))
    port = t.get("ready_port")
    if port is None and len(ports) == 1 and t.get("ready_delay") is None:
        port = ports[0]   # traces from before the rule was kept: the one port it listened on
    return ReadyRule(port=port, delay=t.get("ready_delay"), ports=ports)


# --- the image's own view of itself ---------------------------------------------------------------

@dataclass
class ImageInfo:
    """What an image's runtime config says: from the engine, or the one `build --rootfs` writes
    beside the tree (image.runtime_config, read back as the same JSON)."""

    user: str
    env: dict[str, str]
    entrypoint: list[str]
    working_dir: str
    labels: dict[str, str]
    volumes: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, cfg: Mapping[str, Any]) -> ImageInfo:
        """From a runtime config (`docker inspect -f '{{json .Config}}'`); wrong types count as absent."""
        def strings(key: str) -> list[str]:
            value = cfg.get(key)
            return [str(v) for v in value] if isinstance(value, list) else []

        def text(key: str, default: str) -> str:
            value = cfg.get(key)
            return value if isinstance(value, str) and value else default

        labels, volumes = cfg.get("Labels"), cfg.get("Volumes")
        return cls(user=text("User", ""), env=tr.env_dict(strings("Env")), entrypoint=strings("Entrypoint"),
                   cmd=strings("Cmd"), working_dir=text("WorkingDir", "/"),
                   labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
                   volumes=sorted(str(v) for v in volumes) if isinstance(volumes, dict) else [])


def read_rootfs_info(rootfs_dir: str) -> ImageInfo | None:
    """The config of a tree staged by `tracejail build --rootfs DIR`: the image-config.json beside
    it, if it is the one for DIR. None otherwise."""
    cfg = image_mod.read_rootfs_config(rootfs_dir)
    return ImageInfo.of(cfg) if cfg is not None else None


def _docker(args: list[str], env: Mapping[str, str] | None, timeout: float = DOCKER_TIMEOUT,
            ) -> subprocess.CompletedProcess[str]:
    from tracejail import docker_engine

    return docker_engine.run(args, env, timeout, missing="docker CLI not found on PATH; install Docker, or verify "
                             "a staged tree with --rootfs DIR (tracejail build TRACE --rootfs DIR)")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def inspect_image(ref: str, env: Mapping[str, str] | None) -> ImageInfo:
    proc = _docker(["image", "inspect", "--format", "{{json .Config}}", ref], env)
    if proc.returncode != 0:
        raise TracejailError(f"image {ref} not found in the Docker engine ({_last_line(proc.stderr)}); "
                             f"build it with `tracejail build TRACE.json -t {ref}`")
    cfg = json.loads(proc.stdout or "{}") or {}
    return ImageInfo.of(cfg if isinstance(cfg, dict) else {})


def check_digest(trace_path: str, info: ImageInfo | None, what: str) -> str | None:
    """Fail when the image was built from another trace; a warning when it cannot be told."""
    if info is None:
        return f"cannot check that {what} was built from {trace_path} (no image-config.json beside it)"
    label = info.labels.get(tjbuild.LABEL_TRACE_DIGEST)
    if label is None:
        # e.g. the final stage of a multi-stage `docker build` that copied a --rootfs tree
        return f"cannot check that {what} was built from {trace_path} (it has no {tjbuild.LABEL_TRACE_DIGEST} label)"
    digest = tjbuild.trace_digest(trace_path)
    if label != digest:
        raise TraceFormatError(f"{what} was built from another trace ({label[:19]}...), not from "
                               f"{trace_path} ({digest[:19]}...): rebuild it, or pass the trace it was built from")
    return None


def _numeric_user(user: str) -> tuple[int, int]:
    try:
        return tjbuild.parse_user(user or "root")
    except UsageError:
        raise UsageError(f"user {user!r}: the jail needs UID:GID numbers (or root); pass --user") from None


def run_env(info: ImageInfo, run: tr.Run, first: bool) -> dict[str, str]:
    """The environment the image gives a replay of `run`: its config, plus for runs after the first
    (which are not the image's default command) the run's own allowed variables."""
    env = dict(info.env)
    if not first:
        env.update(tr.env_dict(tjbuild.image_env(run, [])))
    return env


# --- replaying: one running command, in Docker or in the jail ------------------------------------

class Running(Protocol):
    def running(self) -> bool: ...
    def wait(self, timeout: float | None) -> int | None: ...
    def listening_ports(self) -> set[int] | None: ...   # None: cannot see it; probe the ports
    def stop(self, stop_timeout: float) -> None: ...
    def output(self) -> tuple[str, str, bool]: ...


@dataclass
class Outcome:
    status: int | None
    stdout: str
    stderr: str
    exercises: list[tr.ExerciseResult] = field(default_factory=list)
    error: str | None = None


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class DockerRunning:
    """`docker run --rm` attached (so a container that dies early still shows its output)."""

    def __init__(self, argv: list[str], env: Mapping[str, str] | None, name: str, host_network: bool) -> None:
        self.env, self.name, self.host_network = env, name, host_network
        self.proc, self.readers = spawn_captured(argv, dict(env) if env is not None else None,
                                                 tr.OUTPUT_LIMIT)
        self._pid: int | None = None

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _container_pid(self) -> int | None:
        if self._pid is None:
            proc = _docker(["inspect", "--format", "{{.State.Pid}}", self.name], self.env)
            pid = int(proc.stdout.strip() or 0) if proc.returncode == 0 else 0
            if pid > 0 and os.path.exists(f"/proc/{pid}"):
                self._pid = pid
        return self._pid

    def listening_ports(self) -> set[int] | None:
        pid = self._container_pid()
        if pid is None:
            return None   # not started yet, or an engine on another machine
        # With the host's network the namespace is ours: ask for the container's own sockets.
        return listening_ports(pid) if self.host_network else jail.netns_listening(pid)

    def stop(self, stop_timeout: float) -> None:
        try:
            if self.running():
                _docker(["stop", "-t", str(int(stop_timeout)), self.name], self.env, timeout=stop_timeout + 30)
                if self.wait(30) is None:
                    self.proc.kill()
                    self.proc.wait()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            # --rm removes it; this is for a CLI that died or an engine that was slow to.
            _docker(["rm", "-f", self.name], self.env)
        for r in self.readers:
            r.join(timeout=5)

    def output(self) -> tuple[str, str, bool]:
        out, err = self.readers
        return out.text(), err.text(), out.truncated


def _wait_ready(proc: Running, rule: ReadyRule, timeout: float) -> str | None:
    """Block until the replay is ready for exercises; the reason when it never is."""
    start = time.monotonic()
    if rule.delay is not None:
        if proc.wait(rule.delay) is not None:
            return ReadyError(NotReady.EXITED).short()
        return None
    while True:
        if not proc.running():
            return ReadyError(NotReady.EXITED).short()
        ports = proc.listening_ports()
        if ports is None:
            ports = {p for p in ((rule.port,) if rule.port else rule.ports) if port_open(p)}
        if (rule.port in ports) if rule.port else bool(ports & set(rule.ports) if rule.ports else ports):
            return None
        if time.monotonic() - start > timeout:
            return ReadyError(NotReady.TIMEOUT, rule.port, timeout).short()
        time.sleep(0.05)


def _wait_ports_free(ports: tuple[int, ...], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while any(port_open(p) for p in ports) and time.monotonic() < end:
        time.sleep(0.1)


def _check_ports_free(ports: tuple[int, ...], grace: float = 5.0) -> None:
    _wait_ports_free(ports, grace)   # a replay that just ended may still be letting go of them
    busy = [p for p in ports if port_open(p)]
    if busy:
        raise TracejailError(f"port {busy[0]} is already in use on 127.0.0.1; the replay needs it "
                             "(stop what listens there and verify again)")


def replay(start: Callable[[], Running], run: tr.Run, opts: VerifyOptions, host_ports: bool = True) -> Outcome:
    """Run one replay to its end: plain runs until exit, runs with exercises until the exercises ran.
    `host_ports`: the server publishes on the host's ports (a container); else it is in a jail's
    own network namespace, where the exercises run too."""
    rule = ready_rule(run)
    if run.exercises and host_ports:
        _check_ports_free(rule.ports)
    proc = start()
    error = None
    results: list[tr.ExerciseResult] = []
    status = None
    try:
        if run.exercises:
            error = _wait_ready(proc, rule, opts.ready_timeout)
            cwd = run.cwd if os.path.isdir(run.cwd) else None
            for ex in run.exercises if error is None else []:
                if not proc.running():
                    error = "the command exited during the exercises"
                    break
                netns = None if host_ports else jail.netns_pid(getattr(proc, "pid"))
                results.append(run_exercise(ex.command, opts.exercise_timeout, None, cwd, netns))
            if not proc.running():
                status = proc.wait(0)
        else:
            status = proc.wait(opts.timeout)
            if status is None:
                error = f"still running after {opts.timeout:g}s (raise --timeout); stopped"
    finally:
        proc.stop(opts.stop_timeout)
        if run.exercises and host_ports:
            _wait_ports_free(rule.ports)
    out, err, _ = proc.output()
    return Outcome(status=status, stdout=out, stderr=err, exercises=results, error=error)


# --- comparing ------------------------------------------------------------------------------

def _diff(expected: str, got: str) -> str:
    if expected == got:
        return ""
    lines = list(difflib.unified_diff(expected.splitlines(keepends=True), got.splitlines(keepends=True),
                                      "recorded", "replayed", n=2))
    lines = [ln if ln.endswith("\n") else ln + "\n\\ No newline at end of file\n" for ln in lines]
    if len(lines) > DIFF_LINES:
        lines = lines[:DIFF_LINES] + [f"... ({len(lines) - DIFF_LINES} more diff lines)\n"]
    return "".join(lines)


def _tail(text: str) -> str:
    return "\n".join(text.rstrip().splitlines()[-STDERR_TAIL_LINES:])


def _scrubbed(text: str) -> str:
    """Output as record stores it (secrets redacted), so that a replay compares like for like."""
    return sensitive.redact_text(text)[0]


def compare(index: int, run: tr.Run, outcome: Outcome) -> RunCheck:
    command = [run.executable, *run.argv[1:]]
    if not run.exercises:
        diff = _diff(run.stdout, _scrubbed(outcome.stdout))
        passed = outcome.error is None and outcome.status == run.status and not diff
        check = RunCheck(index=index, command=command, passed=passed, expected_status=run.status,
                         status=outcome.status, diff=diff, error=outcome.error)
    else:
        checks = []
        for i, ex in enumerate(run.exercises):
            got = outcome.exercises[i] if i < len(outcome.exercises) else None
            if got is None:
                checks.append(ExerciseCheck(ex.command, False, ex.exit_code, None,
                                            note="not run: " + (outcome.error or "the command was gone")))
                continue
            diff = _diff(ex.stdout, _scrubbed(got.stdout))
            ok = got.exit_code == ex.exit_code and not diff and not got.timed_out
            checks.append(ExerciseCheck(ex.command, ok, ex.exit_code, got.exit_code, diff=diff,
                                        stderr="" if ok else _tail(got.stderr),
                                        note="timed out" if got.timed_out else ""))
        passed = outcome.error is None and all(c.passed for c in checks)
        check = RunCheck(index=index, command=command, passed=passed, status=outcome.status,
                         error=outcome.error, exercises=checks)
    if not check.passed:
        check.stderr = _tail(outcome.stderr)
    if run.stop_reason != "exited" and not run.exercises:
        check.notes.append(f"the recorded run did not exit by itself ({run.stop_reason})")
    return check


# --- misses: a traced replay in the jail ---------------------------------------------------------

def jail_view(jtrace: tr.Trace, root: str) -> dict[str, list[tr.Access]]:
    """The traced replay's accesses by the jailed program only, keyed by the path it saw."""
    from tracejail.record_image import jailed_records, program_pids

    pids = program_pids(jtrace.runs[0].processes if jtrace.runs else [], with_init=True)
    return {path: rec.accesses for path, rec in jailed_records(jtrace, root, pids).items()}


def _interpreter_misses(view: dict[str, list[tr.Access]], rootfs: str) -> dict[str, tuple[str, list[tr.Access]]]:
    """The kernel opens ELF and `#!` interpreters itself: an exec that fails with ENOENT although the
    program is in the tree names a missing interpreter. No syscall shows it; look it up."""
    from tracejail.elf import interpreter_of, shebang_of

    tree = Root(rootfs)
    found: dict[str, tuple[str, list[tr.Access]]] = {}
    for path, accesses in view.items():
        failed = [a for a in accesses if a.kind == "exec" and a.result == "ENOENT"]
        res = tree.resolve(path) if failed else None
        if res is None or res.kind is not NodeKind.FILE:
            continue
        host = tree.host(res.path)
        for interp, how in ((interpreter_of(host), "kernel:interp"), (shebang_of(host), "kernel:shebang")):
            if interp and not tree.exists(interp):
                acc = [tr.Access("exec", how, "ENOENT", a.count, list(a.pids)) for a in failed]
                found.setdefault(interp, (how, []))[1].extend(acc)
    return found


def _listing_misses(host: tr.Trace, view: dict[str, list[tr.Access]], rootfs: str) -> dict[str, list[tr.Access]]:
    """Names the host run used in a directory that the jailed program listed, and that the jail's
    tree lacks: the program looked for them by reading the directory, not by a failing call."""
    listed = {path: [a for a in acc if a.kind == "list" and a.ok] for path, acc in view.items()}
    listed = {path: acc for path, acc in listed.items() if acc}
    found: dict[str, list[tr.Access]] = {}
    if not listed:
        return found
    tree = Root(rootfs)
    for path, rec in host.files.items():
        parent = os.path.dirname(path)
        if parent not in listed or path in view or not rec.ok or rec.created_by_run:
            continue
        if not tree.exists(path):
            found[path] = [tr.Access("list", LISTING, "ENOENT", a.count, list(a.pids)) for a in listed[parent]]
    return found


def jail_misses(host: tr.Trace, view: dict[str, list[tr.Access]], processes: list[tr.ProcessInfo],
                rootfs: str, run_index: int, source: Root | None = None) -> tuple[list[Miss], list[Miss]]:
    """(misses, denied) of one traced replay. See the module docstring for what counts. `source`
    is the tree the trace's files come from (the host's /, or the image it was recorded in)."""
    procs = {p.pid: p for p in processes}
    view = dict(view)
    for interp, (_how, accesses) in _interpreter_misses(view, rootfs).items():
        view.setdefault(interp, []).extend(accesses)
    view.update(_listing_misses(host, view, rootfs))

    def make(path: str, accesses: list[tr.Access], in_trace: bool) -> Miss:
        return miss_of(path, accesses, procs, run_index, exists_on_host=True, in_trace=in_trace)

    source = source or Root("/")
    tree = Root(rootfs)
    misses: dict[str, Miss] = {}   # canonical path in the source -> the best spelling
    denied: list[Miss] = []
    for path in sorted(view):
        accesses = view[path]
        if any(a.ok for a in accesses) or is_runtime_path(path):
            continue
        rec = host.files.get(path)
        refused = [a for a in accesses if a.result in DENIED]
        if refused and rec is not None and rec.ok:
            # A permission miss: the recorded run could, the image user cannot.
            # A directory needs the user when the call changes its entries; a read-only root
            # needs a volume, which is a directory, whatever the call.
            changes_dir = rec.created_by_run or rec.removed_by_run or \
                any(a.syscall in _DIRECTORY_CALLS or a.result == "EROFS" for a in refused)
            needs = os.path.dirname(path) if changes_dir else path
            denied.append(dataclasses.replace(make(path, refused, True), needs=needs))
            continue
        if rec is not None and (rec.failed or rec.created_by_run):
            continue   # failed on the host too (noise), or the run makes it itself
        if not source.lexists(source.normalize(path)[0]) or shrink.replaced_by_bytecode(path, tree):
            continue
        not_found = [a for a in accesses if a.result in NOT_FOUND]
        if not_found:
            m = make(path, not_found, rec is not None)
            key = source.realpath(path)
            # One file, many spellings (ld.so tries /lib/... and /usr/lib/...): keep the traced one.
            if key not in misses or (m.in_trace and not misses[key].in_trace):
                misses[key] = m
    return sorted(misses.values(), key=lambda m: m.path), denied


def trace_inside(spec: jail.JailSpec, run: tr.Run, host: tr.Trace, run_index: int,
                 opts: VerifyOptions, source: Root | None = None) -> tuple[Outcome, list[Miss], list[Miss]]:
    """Replay `run` in the jail under tracejail's tracer (on the host; the tracee chroots itself)."""
    from tracejail.record import RecordOptions, record

    rule = ready_rule(run)
    ropts = RecordOptions(
        exercises=[e.command for e in run.exercises], ready_port=rule.port, ready_delay=rule.delay,
        ready_timeout=opts.ready_timeout, stop_timeout=opts.stop_timeout, timeout=opts.timeout,
        exercise_timeout=opts.exercise_timeout, exact=True, passthrough=False, env=jail.launcher_env(),
        cwd="/", exercise_cwd=run.cwd if os.path.isdir(run.cwd) else None, keep_unready=True,
        exercise_netns=True)
    rec = record(jail.launcher_argv(spec), ropts)
    got = rec.run
    if got.stop_reason == "interrupted":
        # record passed the Ctrl-C (or SIGTERM, SIGHUP) on to the replay; now it is ours
        if rec.stopped_by in (signal.SIGTERM, signal.SIGHUP):
            raise Interrupted(rec.stopped_by)
        raise KeyboardInterrupt
    problem = jail.setup_error(got.status, got.stderr)
    if problem:
        raise TracejailError(f"the jail could not be set up: {problem}")
    error = rec.ready_error.short() if rec.ready_error else None
    if got.stop_reason == "timeout":
        error = f"still running after {opts.timeout:g}s (raise --timeout); stopped"
    outcome = Outcome(status=got.status if not run.exercises or got.stop_reason == "exited" else None,
                      stdout=got.stdout, stderr=got.stderr, exercises=got.exercises, error=error)
    view = jail_view(rec.trace, spec.root)
    misses, denied = jail_misses(host, view, got.processes, spec.rootfs, run_index, source)
    return outcome, misses, denied


# --- targets: where runs are replayed and how they are rebuilt -----------------------------------

class Target:
    """Where the runs are replayed: a Docker image or a staged tree."""

    label: str
    info: ImageInfo | None     # None: the tree has no image-config.json to say how it was built
    source: Root               # where the trace's files come from: verify() sets it (source.root_of)
                               # before any run, and each target has its own
    user: str
    opts: VerifyOptions
    notes: list[str]           # said once in the report (e.g. how ports were published)

    def start(self, run: tr.Run, first: bool) -> Running:
        raise NotImplementedError

    def jail_rootfs(self) -> str:
        """A tree to jail for a traced replay (made on first use)."""
        raise NotImplementedError

    def jail_rootfs_if_made(self) -> str | None:
        return self.jail_rootfs()

    def rebuild(self, trace_path: str, trace: tr.Trace) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def config(self) -> ImageInfo:
        return self.info or ImageInfo(user="", env={}, entrypoint=[], working_dir="/", labels={})

    def jail_user(self) -> tuple[int, int]:
        """Who runs in the jail: --user, else the image's user, but never root by default (a
        config beside a tree or an image's config is as untrusted as the tree): root only
        with an explicit --user root, and then the jail's namespaced root."""
        uid, gid = _numeric_user(self.user)
        if uid == 0 and not self.opts.user:
            self.notes.append(f"the image's user is root; the jail ran it as {tjbuild.DEFAULT_USER} "
                              "(--user root runs it as the jail's own, namespaced root)")
            return tjbuild.parse_user(tjbuild.DEFAULT_USER)
        if uid == 0 and not self.opts.userns:
            raise UsageError("--user root without a user namespace would be the host's root in a chroot; "
                             "drop --no-user-namespace")
        return uid, gid

    def jail_spec(self, run: tr.Run, first: bool, rootfs: str) -> jail.JailSpec:
        uid, gid = self.jail_user()
        return jail.JailSpec(rootfs=rootfs, workdir=jail.make_workdir(), argv=[run.executable, *run.argv[1:]],
                             env=run_env(self.config(), run, first), cwd=run.cwd, uid=uid, gid=gid,
                             overlay=self.opts.overlay, userns=self.opts.userns, read_only=self.opts.read_only,
                             volumes=list(self.config().volumes))

    def build_options(self, trace: tr.Trace) -> tjbuild.BuildOptions:
        """Build options that reproduce this image from the trace: its user, the environment beyond
        what the trace gives, an entrypoint that is not the recorded command, and provenance when
        the image carries it. (--exclude, --include and the like leave no trace in an image.)"""
        from tracejail.provenance import IMAGE_PATH

        info, run = self.config(), trace.runs[0]
        base = tr.env_dict(tjbuild.image_env(run, [], trace.source.config if trace.source else None))
        extra = [f"{k}={v}" for k, v in sorted(info.env.items()) if base.get(k) != v]
        # What build would write by itself: the program, behind the init if there is one.
        init = info.labels.get(tjbuild.LABEL_INIT)
        program = info.entrypoint[2:] if init and info.entrypoint[:2] == [init, "--"] else info.entrypoint
        entry = program if program and program != [run.executable] else None
        cmd = info.cmd if entry is not None or info.cmd != run.argv[1:] else None
        tree = self.jail_rootfs_if_made()
        provenance = tree is not None and os.path.lexists(tree + IMAGE_PATH)
        return tjbuild.BuildOptions(user=self.user or tjbuild.DEFAULT_USER, env=extra, entrypoint=entry, cmd=cmd,
                                    provenance=provenance, **tjbuild.content_options(info.labels))


class DockerTarget(Target):
    def __init__(self, image: str, opts: VerifyOptions) -> None:
        from tracejail import docker_engine

        self.image, self.opts, self.env = image, opts, opts.docker_env
        self.label = f"image {image}"
        if opts.fix and _is_image_id(image):
            raise UsageError(f"--fix rebuilds the image under its name: give NAME[:TAG], not the ID {image}")
        if docker_engine.docker_cli(self.env) is None:
            raise TracejailError("docker CLI not found on PATH; install Docker, or verify a staged tree "
                                 "with --rootfs DIR (tracejail build TRACE.json --rootfs DIR)")
        problem = docker_engine.engine_problem(self.env)
        if problem is not None:
            # Advise the jail only where it can run: advice must never lead back here.
            other = ("; or verify a staged tree without Docker: tracejail build TRACE.json --rootfs DIR, then "
                     "tracejail verify TRACE.json --rootfs DIR") if jail.check_available(opts.userns) is None else ""
            raise TracejailError(problem + other)
        self.info = inspect_image(image, self.env)
        self.user = opts.user or self.info.user or "root"
        self.notes = []
        self._bridge: bool | None = None
        self._exported: str | None = None

    def host_network(self) -> bool:
        """Whether servers share the host's network instead of publishing their ports."""
        if self._bridge is None:
            self._bridge = _docker(["network", "inspect", "bridge"], self.env).returncode == 0
            if not self._bridge:
                self.notes.append("the engine has no bridge network (dockerd --bridge none): servers ran "
                                  "with --network host instead of publishing their ports on 127.0.0.1")
        return not self._bridge

    def start(self, run: tr.Run, first: bool) -> Running:
        if not run.exercises:
            return self._run(run, first, network=[], host_net=False)
        if self.host_network():
            return self._run(run, first, network=["--network", "host"], host_net=True)
        publish = [arg for p in run.listening_ports for arg in ("-p", f"127.0.0.1:{p}:{p}")]
        running = self._run(run, first, network=publish, host_net=False)
        problem = self._network_failure(running)
        if problem is None:
            return running
        # A bridge network that exists but does not work (docker0 gone): do what record did.
        self._bridge = False
        self.notes.append(f"the engine could not publish ports ({problem}): servers ran with --network host")
        return self._run(run, first, network=["--network", "host"], host_net=True)

    def _run(self, run: tr.Run, first: bool, network: list[str], host_net: bool) -> DockerRunning:
        from tracejail import docker_engine

        name = f"tj-verify-{uuid.uuid4().hex[:12]}"
        # --init: the engine's tini is PID 1 and passes `docker stop`'s SIGTERM on, so a server
        # that sets no handler of its own stops at once (as PID 1 it would ignore it for the whole
        # stop timeout); the image's own init, when it has one, is the same kind of program.
        args = ["run", "--rm", "--init", "--name", name, "--entrypoint", run.executable, "-w", run.cwd, *network]
        if self.opts.read_only:
            args += ["--read-only", "--tmpfs", "/tmp"]
        if self.opts.user:
            args += ["--user", self.opts.user]
        for k, v in sorted(run_env(self.config(), run, first).items()):
            args += ["-e", f"{k}={v}"]
        argv = [docker_engine.docker_cli(self.env) or "docker", *args, self.image, *run.argv[1:]]
        return DockerRunning(argv, self.env, name, host_net)

    def _network_failure(self, running: DockerRunning, timeout: float = 15.0) -> str | None:
        """Docker sets up the network before the program starts: a container that never starts
        and leaves a networking error (status 125) shows publishing is broken on this engine."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not running.running():
                running.stop(0)   # joins the output readers
                _out, err, _ = running.output()
                if running.wait(0) == 125 and re.search(r"network|bridge|docker0|port", err, re.I):
                    return _last_line(err)
                return None
            state = _docker(["inspect", "--format", "{{.State.Running}}", running.name], self.env)
            if state.stdout.strip() == "true":
                return None
            time.sleep(0.1)
        return None

    def jail_rootfs(self) -> str:
        if self._exported is None:
            self._exported = export_image(self.image, self.env)
        return self._exported

    def jail_rootfs_if_made(self) -> str | None:
        return self._exported   # --fix only rebuilds after misses came from an export

    def rebuild(self, trace_path: str, trace: tr.Trace) -> str:
        bopts = self.build_options(trace)
        with tempfile.TemporaryDirectory(prefix="tj-verify-") as tmp:
            bopts.tags, bopts.output, bopts.docker_env = [self.image], os.path.join(tmp, "image.tar"), \
                dict(self.env) if self.env is not None else None
            result = tjbuild.build(trace_path, bopts)
        if not result.loaded_id:
            raise TracejailError(f"rebuilt {self.image} but could not load it: {'; '.join(result.warnings)}")
        self.info = inspect_image(self.image, self.env)
        self._drop_export()
        return f"rebuilt image {self.image}"

    def _drop_export(self) -> None:
        if self._exported is not None:
            shutil.rmtree(os.path.dirname(self._exported), ignore_errors=True)
            self._exported = None

    def close(self) -> None:
        self._drop_export()


def _is_image_id(ref: str) -> bool:
    return re.fullmatch(r"(sha256:)?[0-9a-f]{12,64}", ref) is not None


def export_image(image: str, env: Mapping[str, str] | None) -> str:
    """The image's file system, unpacked to a temporary tree (`docker create` + `docker export`):
    exactly what the image holds, whatever options built it, but unpacked safely (unpack.py):
    no setuid bits, no device nodes, nothing written through a symlink or out of the tree."""
    from tracejail import docker_engine
    from tracejail.unpack import unpack_tar

    created = _docker(["create", image], env)
    if created.returncode != 0:
        raise TracejailError(f"docker create {image} failed: {_last_line(created.stderr)}")
    cid = created.stdout.strip()
    top = tempfile.mkdtemp(prefix="tj-verify-export-")
    os.chmod(top, 0o711)   # the jail's unprivileged ids pass through it to the tree
    dest = os.path.join(top, "rootfs")
    os.mkdir(dest, 0o755)
    try:
        cli = docker_engine.docker_cli(env) or "docker"
        exporter = subprocess.Popen([cli, "export", cid], env=dict(env) if env is not None else None,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert exporter.stdout is not None
        try:
            unpack_tar(exporter.stdout, dest)
        finally:
            exporter.stdout.close()
            export_err = exporter.communicate(timeout=EXPORT_TIMEOUT)[1]
        if exporter.returncode != 0:
            raise TracejailError(f"cannot export {image}: {_last_line((export_err or b'').decode())}")
    except BaseException:
        shutil.rmtree(top, ignore_errors=True)
        raise
    finally:
        _docker(["rm", "-f", cid], env)
    return dest


class RootfsTarget(Target):
    def __init__(self, rootfs: str, trace_path: str, trace: tr.Trace, opts: VerifyOptions) -> None:
        self.rootfs, self.opts = os.path.abspath(rootfs), opts
        self.label = f"rootfs {rootfs}"
        self.notes = []
        if not os.path.isdir(self.rootfs):
            raise TracejailError(f"rootfs {rootfs} is not a directory; stage one with "
                                 f"`tracejail build {trace_path} --rootfs {rootfs}`")
        problem = jail.check_available(opts.userns)
        if problem:
            from tracejail import docker_engine

            if opts.userns and os.geteuid() == 0:
                hint = "; --no-user-namespace runs the jail without one, as root"
            elif docker_engine.engine_problem() is None:
                hint = "; verify the image with -t IMAGE instead"
            else:
                hint = "; and no Docker engine is usable for -t IMAGE either, so verify on another machine"
            raise TracejailError(f"--rootfs cannot run here: {problem}{hint}")
        self.info = read_rootfs_info(self.rootfs)
        self.user = opts.user or (self.info.user if self.info and self.info.user else tjbuild.DEFAULT_USER)
        _numeric_user(self.user)
        self._default_env = tr.env_dict(tjbuild.image_env(trace.runs[0], [],
                                                        trace.source.config if trace.source else None))

    def config(self) -> ImageInfo:
        # Without image-config.json: what `build` would have put in the image config.
        return self.info or ImageInfo(user=self.user, env=dict(self._default_env), entrypoint=[],
                                      working_dir="/", labels={})

    def start(self, run: tr.Run, first: bool) -> Running:
        proc = jail.JailProcess(self.jail_spec(run, first, self.rootfs))
        proc.start()
        return proc

    def jail_rootfs(self) -> str:
        return self.rootfs

    def rebuild(self, trace_path: str, trace: tr.Trace) -> str:
        from tracejail import image

        bopts = self.build_options(trace)
        tag = f".tj-verify-{os.getpid()}"
        new, old = self.rootfs + tag + "-new", self.rootfs + tag + "-old"
        bopts.rootfs_dir, bopts.load = new, False
        try:
            result = tjbuild.build(trace_path, bopts)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        # Swap, then write the Dockerfile and config for the real name (build wrote them for the new one).
        os.rename(self.rootfs, old)
        os.rename(new, self.rootfs)
        image.write_dockerfile(self.rootfs, result.config)
        shutil.rmtree(old, ignore_errors=True)
        self.info = read_rootfs_info(self.rootfs)
        return f"rebuilt rootfs {self.rootfs}"


# --- the loop --------------------------------------------------------------------------------

def _traced_replay(target: Target, run: tr.Run, index: int, trace: tr.Trace, opts: VerifyOptions,
                   rootfs: str) -> tuple[Outcome, list[Miss], list[Miss]]:
    spec = target.jail_spec(run, index == 0, rootfs)
    try:
        return trace_inside(spec, run, trace, index, opts, target.source)
    finally:
        jail.remove_workdir(spec.workdir)


def check_run(target: Target, run: tr.Run, index: int, trace: tr.Trace, opts: VerifyOptions,
              jail_ok: bool, say: Callable[[str], None]) -> RunCheck:
    """Replay one run and compare; look for misses when asked, or on failure when possible."""
    rootfs_mode = isinstance(target, RootfsTarget)
    if opts.trace_inside and rootfs_mode:
        say(f"run {index}: traced replay in the jail")
        outcome, misses, denied = _traced_replay(target, run, index, trace, opts, target.jail_rootfs())
        check = compare(index, run, outcome)
        check.misses, check.denied, check.traced = misses, denied, True
        return check
    say(f"run {index}: replay in {target.label}")
    check = compare(index, run, replay(lambda: target.start(run, index == 0), run, opts,
                                       host_ports=not rootfs_mode))
    wanted = opts.trace_inside or (opts.trace_inside is None and not check.passed)
    if wanted and jail_ok:
        say(f"run {index}: traced replay in the jail to find misses")
        jailed, check.misses, check.denied = _traced_replay(target, run, index, trace, opts, target.jail_rootfs())
        check.traced = True
        jailed_passed = compare(index, run, jailed).passed
        if not rootfs_mode and jailed_passed != check.passed:
            check.notes.append("the traced replay in a jail of the exported image "
                               + ("passed" if jailed_passed else "failed"))
    elif wanted:
        check.notes.append("misses not looked for: the jail needs root and mount/PID namespaces")
    return check


def add_misses(trace: tr.Trace, misses: list[Miss], round_no: int) -> tuple[list[str], list[str]]:
    """Add misses to the trace as paths added by verify; return (added, already in the trace)."""
    added, kept = [], []
    for m in misses:
        rec = trace.files.get(m.path)
        if rec is not None and rec.ok:
            kept.append(m.path)
            continue
        rec = trace.record(m.path)
        rec.added_by = FIXED_BY
        rec.reason = (f"looked up in the jail by {m.process} ({m.syscall} -> {m.result}) and found on "
                      f"the host (round {round_no})")
        if m.run not in rec.runs:
            rec.runs.append(m.run)
        added.append(m.path)
    return added, kept


def add_permission_fixes(trace: tr.Trace, misses: list[Miss], round_no: int) -> list[str]:
    """Record in the trace that what each permission miss needs must belong to the image user
    (PathRecord.owner, which build honours); return those paths. EROFS (a read-only root) is not
    something ownership fixes: it is left to volumes."""
    fixed = []
    for m in misses:
        if not m.needs or m.result == "EROFS":
            continue
        rec = trace.files.get(m.needs)
        if rec is None:
            rec = trace.record(m.needs)
            rec.added_by = FIXED_BY
        if rec.owner != tr.IMAGE_USER:
            rec.owner = tr.IMAGE_USER
            rec.reason = (f"must belong to the image user: {m.syscall} of {m.path} failed with {m.result} "
                          f"in the jail (round {round_no}), where the recorded run succeeded")
            if m.run not in rec.runs:
                rec.runs.append(m.run)
            fixed.append(m.needs)
    return fixed


def exercise_commands(trace: tr.Trace) -> list[str]:
    return list(dict.fromkeys(e.command for r in trace.runs for e in r.exercises))


def check_trust(trace_path: str, trace: tr.Trace, st: os.stat_result, trusted: bool) -> list[str]:
    """The host commands a verify of this trace would run (its exercises): refused unless the
    trace is the user's own or --trust-trace says to run someone else's. A replay of the program
    itself runs in the jail or a container, never on the host."""
    commands = exercise_commands(trace)
    why = tr.foreign(st)
    if commands and why and not trusted:
        raise TracejailError(
            f"{trace_path} is not your own trace ({why}); its {len(commands)} exercise command(s) would run "
            f"on this machine as you, the first: {commands[0]!r}. Read them (tracejail inspect {trace_path}), "
            "then pass --trust-trace to run them")
    return commands


def verify(trace_path: str, opts: VerifyOptions,
           progress: Callable[[str], None] | None = None,
           announce: Callable[[str], None] | None = None) -> VerifyReport:
    """Verify the image or tree in `opts` against the trace; with opts.fix, repair and repeat.
    `announce` hears, before anything runs, each command of the trace that will run on the host."""
    say = progress or (lambda _m: None)
    if bool(opts.image) == bool(opts.rootfs):
        raise UsageError("give the image with -t IMAGE or a staged tree with --rootfs DIR (one of them)")
    if opts.fix and opts.trace_inside is False:
        raise UsageError("--fix needs the misses that --trace-inside finds; drop --no-trace-inside")
    if opts.max_rounds < 1:
        raise UsageError("--max-rounds must be at least 1")
    if opts.user is not None:
        tjbuild.parse_user(opts.user)   # a bad value fails before any work
    trace, st = tr.load_with_owner(trace_path)
    if not trace.runs:
        raise TraceFormatError(f"{trace_path} holds no runs; record one with `tracejail record`")
    commands = check_trust(trace_path, trace, st, opts.trust_trace)
    if opts.fix:
        tr.check_writable(trace_path)
    target: Target = DockerTarget(opts.image, opts) if opts.image else RootfsTarget(opts.rootfs or "", trace_path, trace, opts)
    report = VerifyReport(trace=trace_path, target=target.label, user=target.user)
    for command in commands:
        (announce or say)(f"will run on this host (an exercise of the trace): {command}")
    roots = contextlib.ExitStack()
    try:
        target.source = Root(roots.enter_context(trace_root(trace, opts.docker_env, say)))
        warning = check_digest(trace_path, target.info, target.label)
        if warning:
            report.warnings.append(warning)
        problem = None if isinstance(target, RootfsTarget) else jail.check_available(opts.userns)
        jail_ok = problem is None
        if (opts.trace_inside or opts.fix) and problem:
            raise TracejailError(f"{'--fix' if opts.fix else '--trace-inside'} replays the image in a jail "
                                 f"to find misses: {problem}")
        handled: set[str] = set()
        while True:
            rnd = Round(number=len(report.rounds) + 1, runs=[])
            report.rounds.append(rnd)
            for i, run in enumerate(trace.runs):
                rnd.runs.append(check_run(target, run, i, trace, opts, jail_ok, say))
            if rnd.passed:
                report.end = "passed" if rnd.number == 1 else f"passed after {rnd.number - 1} rebuild(s)"
                break
            if not opts.fix:
                break
            misses = [m for c in rnd.runs for m in c.misses if m.path not in handled]
            permission = [m for c in rnd.runs for m in c.denied
                          if m.needs and m.result != "EROFS" and f"owner:{m.needs}" not in handled]
            if not misses and not permission:
                report.end = "no new misses to add: what still differs is not a missing file or a permission"
                break
            if rnd.number > opts.max_rounds:
                report.end = f"stopped after --max-rounds {opts.max_rounds} rebuild(s)"
                break
            rnd.added, rnd.kept = add_misses(trace, _unique(misses), rnd.number)
            rnd.owned = add_permission_fixes(trace, permission, rnd.number)
            handled.update(m.path for m in misses)
            handled.update(f"owner:{m.needs}" for m in permission)
            if rnd.added or rnd.owned:
                tr.save(trace, trace_path)
            owners = f" and {len(rnd.owned)} owner(s)" if rnd.owned else ""
            say(f"round {rnd.number}: added {len(rnd.added)} path(s){owners} to {trace_path}; rebuilding")
            rnd.rebuilt = target.rebuild(trace_path, trace)
        if opts.import_check:
            say("import check: importing the modules the static import closure added")
            report.import_check = import_check(target, trace, opts)
    finally:
        target.close()
        roots.close()
        report.notes = list(dict.fromkeys(target.notes))
    return report


# Run in the image by the recorded interpreter: import each module named and report each failure
# on a marked line (a module may print on import). Only built-ins: the image holds what the app
# needs, maybe not importlib or json.
_IMPORT_CHECK = r"""
import sys
sys.path[:0] = [p for p in sys.argv[1].split(":") if p]
for name in sys.argv[2:]:
    try:
        __import__(name)
    except BaseException as err:
        why = (type(err).__name__ + ": " + str(err)).replace("\n", " ")[:300]
        sys.stdout.write("\nTJ-IMPORT-FAIL " + name + "\t" + why + "\n")
sys.stdout.write("\nTJ-IMPORT-DONE\n")
sys.stdout.flush()
"""
_IMPORT_FAIL, _IMPORT_DONE = "TJ-IMPORT-FAIL ", "TJ-IMPORT-DONE"


def _check_interpreter(trace: tr.Trace) -> tuple[str, tr.Run] | None:
    """The interpreter of the first recorded Python process, as it was started (a venv's
    bin/python, for its site-packages), and its run."""
    for p in pyimports.python_processes(trace):
        run = trace.runs[p.run]
        argv0 = p.argv[0] if p.argv else ""
        if "/" in argv0:
            return os.path.normpath(os.path.join(run.cwd, argv0)), run
        if p.exe:
            return p.exe, run
    return None


def import_check(target: Target, trace: tr.Trace, opts: VerifyOptions) -> ImportCheck:
    """Import, inside the image, every module the static import closure added for it (the image's
    io.tracejail.imports label says how it was built), with the recorded interpreter."""
    found = _check_interpreter(trace)
    if found is None:
        return ImportCheck("", [], problem="the trace shows no Python process")
    python, run = found
    content = tjbuild.content_options(target.config().labels)
    if not content["import_closure"]:
        return ImportCheck(python, [], problem="the image was built with --no-import-closure")
    files = fsel.select(trace, fsel.SelectOptions(exclude_modules=tuple(content["exclude_modules"])), target.source)
    names = sorted({a.name for a in files.python_imports})
    check = ImportCheck(python, names)
    if not names:
        return check
    entries, _, _ = pyimports.search_path(trace, files.wanted, target.source)
    app_dirs = [e.path for e in entries if e.where == pyimports.Where.APP]
    probe = dataclasses.replace(run, argv=[python, "-c", _IMPORT_CHECK, ":".join(app_dirs), *names],
                                executable=python, exercises=[], listening_ports=[])
    proc = target.start(probe, first=True)
    try:
        code = proc.wait(opts.timeout)
        if code is None:
            check.problem = f"the import check did not end within {opts.timeout:.0f} s"
            return check
    finally:
        proc.stop(opts.stop_timeout)
    out, err, _ = proc.output()
    lines = out.splitlines()
    if _IMPORT_DONE not in lines:
        check.problem = f"the import check ended early (exit {code}): {_last_line(err) or 'no output'}"
        return check
    for line in lines:
        if line.startswith(_IMPORT_FAIL):
            name, _, why = line[len(_IMPORT_FAIL):].partition("\t")
            check.failed[name] = why
    return check


def _unique(misses: list[Miss]) -> list[Miss]:
    seen: dict[str, Miss] = {}
    for m in misses:
        seen.setdefault(m.path, m)
    return list(seen.values())


# --- text report -----------------------------------------------------------------------------

def _indent(text: str, prefix: str) -> str:
    return "".join(prefix + line + "\n" for line in text.rstrip("\n").splitlines())


def format_report(report: VerifyReport) -> str:
    out = [f"verify {report.trace} against {report.target} as user {report.user}\n"]
    for w in report.warnings:
        out.append(f"warning: {w}\n")
    for n in report.notes:
        out.append(f"note: {n}\n")
    for rnd in report.rounds:
        if len(report.rounds) > 1:
            out.append(f"round {rnd.number}:\n")
        for c in rnd.runs:
            out.append(_format_run(c))
        if rnd.rebuilt:
            if rnd.added:
                out.append(f"  added {len(rnd.added)} path(s) to {report.trace} (added_by \"{FIXED_BY}\"):\n")
                out += [f"    + {shown(p)}\n" for p in rnd.added]
            if rnd.kept:
                out.append(f"  already in the trace, missing from the image only: {', '.join(rnd.kept)}\n")
            if rnd.owned:
                out.append(f"  recorded in {report.trace} as needing the image user (owner \"{tr.IMAGE_USER}\"):\n")
                out += [f"    + {shown(p)}\n" for p in rnd.owned]
            out.append(f"  {rnd.rebuilt}\n")
    runs = report.rounds[-1].runs if report.rounds else []
    exercises = [e for c in runs for e in c.exercises]
    writable = sorted({m.needs for c in runs for m in c.denied if m.result == "EROFS" and m.needs})
    if writable:
        out.append("read-only: these must be writable: " + ", ".join(shown(p) for p in writable)
                   + "; declare them volumes at build (--volume DIR, or --writable-volumes)\n")
    ic = report.import_check
    if ic is not None:
        if ic.problem:
            out.append(f"import check: {ic.problem}\n")
        elif ic.failed:
            out.append(f"import check: {len(ic.failed)} of {len(ic.modules)} module(s) the static import closure "
                       f"added do not import in the image ({shown(ic.interpreter)}):\n")
            out += [f"  {shown(name)}: {shown(why)}\n" for name, why in sorted(ic.failed.items())]
        else:
            out.append(f"import check: the {len(ic.modules)} module(s) the static import closure added all "
                       "import in the image\n")
    if report.passed:
        out.append(f"PASS: {len(runs)} run(s), {len(exercises)} exercise(s)"
                   + (f" ({report.end})" if report.end and report.end != "passed" else "") + "\n")
    elif ic is not None and not ic.passed and report.rounds and report.rounds[-1].passed:
        out.append("FAIL: every run passed, but the import check "
                   + (f"found {len(ic.failed)} module(s) that do not import" if ic.failed else "did not finish")
                   + "\n")
    else:
        failed_ex = sum(1 for e in exercises if not e.passed)
        out.append(f"FAIL: {sum(1 for c in runs if not c.passed)} of {len(runs)} run(s) failed"
                   + (f" ({failed_ex} of {len(exercises)} exercise(s))" if exercises else "")
                   + (f"; {report.end}" if report.end else "") + "\n")
    return "".join(out)


def _format_run(c: RunCheck) -> str:
    out = [f"run {c.index}: {short_command(c.command, 100)}\n"]
    if not c.exercises:
        if c.passed and c.expected_status:
            out.append(f"  PASS (the recorded run itself failed with exit {c.expected_status}): "
                       "the same failure, stdout as recorded\n")
        elif c.passed:
            out.append(f"  PASS  exit {c.status}, stdout as recorded\n")
        else:
            why = c.error or (f"exit {c.status}, recorded {c.expected_status}" if c.status != c.expected_status
                              else "stdout differs")
            out.append(f"  FAIL  {why}\n")
            if c.diff:
                out.append(_indent(c.diff, "        "))
    else:
        if c.error:
            out.append(f"  FAIL  {c.error}" + (f" (status {c.status})" if c.status is not None else "") + "\n")
        for i, e in enumerate(c.exercises, 1):
            head = f"exercise {i}: {shown(e.command)}"
            if e.passed and e.expected_exit:
                out.append(f"  PASS (the recorded exercise itself failed with exit {e.expected_exit})  {head}\n")
                continue
            if e.passed:
                out.append(f"  PASS  {head}\n")
                continue
            detail = e.note or (f"exit {e.exit_code}, recorded {e.expected_exit}" if e.exit_code != e.expected_exit
                                else "stdout differs")
            out.append(f"  FAIL  {head}  ({detail})\n")
            if e.diff:
                out.append(_indent(e.diff, "        "))
            if e.stderr:
                out.append(_indent(e.stderr, "        ! "))
    if not c.passed and c.stderr:
        out.append("  stderr (last lines):\n" + _indent(c.stderr, "        | "))
    if c.misses:
        out.append("  missing in the jail, present on the host:\n")
        out += [f"    {shown(m.describe())}" + (" [in the trace; left out of the image]" if m.in_trace else "") + "\n"
                for m in c.misses]
    elif c.traced and not c.passed:
        out.append("  no missing paths found in the traced replay\n")
    if c.denied:
        out.append("  permission misses (the recorded run could, the image user cannot):\n")
        out += [f"    {shown(m.describe())}\n" for m in c.denied]
    out += [f"  note: {n}\n" for n in c.notes]
    return "".join(out)
