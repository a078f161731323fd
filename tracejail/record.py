"""`tracejail record`: run a command under the tracer, drive it with exercises, make a Trace.

Process layout::

    tracejail (recorder)  -- tees output, waits for readiness, runs exercises, handles Ctrl-C
      └── tracer process  -- the ptrace loop (tracer.py); waitpid(-1) sees only the traced tree
            └── COMMAND and everything it starts (own process group; the terminal's
                foreground group when stdin is a terminal, so Ctrl-C reaches it directly)
"""
from __future__ import annotations

import enum
import marshal
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from tracejail import trace as tr
from tracejail import tracer_process
from tracejail.errors import CommandNotFound, TracejailError, UsageError

EXERCISE_OUTPUT_LIMIT = 256 * 1024
class NotReady(enum.Enum):
    EXITED = "exited"        # the command exited before it was ready
    TIMEOUT = "timeout"      # it did not listen in time


@dataclass(frozen=True)
class ReadyError:
    """Why a command never became ready for its exercises (record, and verify's replays)."""

    why: NotReady
    port: int | None = None   # the port waited for (None: any TCP port)
    waited: float = 0.0       # the readiness timeout, in seconds

    def short(self) -> str:
        if self.why is NotReady.EXITED:
            return "the command exited before it was ready"
        what = f"port {self.port}" if self.port else "any TCP port"
        return f"the command did not listen on {what} within {self.waited:g}s"

    def message(self) -> str:
        """record's line: with what to do about it."""
        if self.why is NotReady.EXITED:
            return "the command exited before it was ready for the exercises (see its output above)"
        return f"{self.short()}; raise --ready-timeout, or use --ready-port / --ready-delay"


@dataclass
class RecordOptions:
    exercises: list[str] = field(default_factory=list)
    ready_port: int | None = None
    ready_delay: float | None = None
    ready_timeout: float = 30.0
    stop_timeout: float = 10.0
    timeout: float | None = None
    exercise_timeout: float = 60.0
    use_seccomp: bool = True
    exact: bool = False               # stop at syscall exit too and keep the kernel's results
    pin_cpu: bool = False             # tracer and program on one CPU: faster stops, no parallelism
    keep_env: Sequence[str] = ()      # environment names to keep unredacted (asked by name)
    keep_argv: bool = False           # keep a secret on the command line verbatim (warned)
    exercise_netns: bool = False      # run exercises in the traced tree's own network namespace
    passthrough: bool = True          # copy the target's output to our stdout/stderr
    env: dict[str, str] | None = None # environment for the command (default: ours)
    cwd: str | None = None
    exercise_cwd: str | None = None   # where exercises run (default: our working directory)
    keep_unready: bool = False        # return the Recording (ready_error set) instead of raising
                                      # when the command dies or times out before it is ready


@dataclass
class Recording:
    trace: tr.Trace
    run: tr.Run
    warnings: list[str]
    ready_error: ReadyError | None = None   # only with RecordOptions.keep_unready
    stopped_by: int | None = None     # the signal the recorder got (and passed on), if any

    @property
    def exercises_ok(self) -> bool:
        return all(e.exit_code == 0 for e in self.run.exercises)


def host_environment() -> dict[str, str]:
    """Our environment as the command should get it: without the LC_CTYPE that Python itself set
    when it started in the C locale (PEP 538 locale coercion). The recorded program would not
    have it, and an image built from the trace would carry it. /proc/self/environ still holds the
    environment this process was started with."""
    env = dict(os.environ)
    if "LC_CTYPE" in env:
        try:
            with open("/proc/self/environ", "rb") as f:
                started = f.read().split(b"\0")
        except OSError:
            return env
        if not any(item.startswith(b"LC_CTYPE=") for item in started):
            del env["LC_CTYPE"]
    return env


def ptrace_refused() -> str:
    """The line for a refused ptrace, saying what is in the way here: a seccomp filter (a
    container's profile, or a `docker build` step's, which cannot be changed), Yama, or rights."""
    status: dict[str, str] = {}
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            status = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    except OSError:
        pass
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope", encoding="ascii") as f:
            yama = int(f.read().strip() or 0)
    except (OSError, ValueError):
        yama = 0
    if status.get("Seccomp", "").strip() == "2":
        return ("ptrace is not permitted here: a seccomp filter refuses it (a container's profile): docker run "
                "--cap-add SYS_PTRACE, or --security-opt seccomp=unconfined; a docker build step can change "
                "neither, so record in a container instead (README: Inside docker build)")
    if yama >= 2:
        return (f"ptrace is not permitted here: kernel.yama.ptrace_scope is {yama} (2: only with CAP_SYS_PTRACE, "
                "3: never); run as root, or lower it (sysctl kernel.yama.ptrace_scope=1)")
    return ("ptrace is not permitted here: run as root, or give the container SYS_PTRACE "
            "(docker run --cap-add SYS_PTRACE), or lower kernel.yama.ptrace_scope")


def resolve_command(name: str, path: str | None, cwd: str | None = None) -> str:
    """Find COMMAND like a shell in `cwd`: names with a slash as they are, others on PATH."""
    base = cwd or os.getcwd()
    if "/" in name:
        full = os.path.join(base, name)
        if not os.path.exists(full):
            raise CommandNotFound(f"command not found: {name}")
        if os.path.isdir(full) or not os.access(full, os.X_OK):
            raise TracejailError(f"permission denied: {name} is not an executable file", 126)
        return os.path.normpath(full)
    found = shutil.which(name, path=path)
    if found is None:
        raise CommandNotFound(f"command not found: {name}")
    return os.path.normpath(os.path.join(base, found))   # a relative PATH entry, like a shell


class OutputTee(threading.Thread):
    """Copies the target's output to our own stream unchanged, keeping a bounded copy."""

    def __init__(self, fd: int, out_fd: int | None, limit: int) -> None:
        super().__init__(daemon=True)
        self.fd, self.out_fd, self.limit = fd, out_fd, limit
        self.kept = bytearray()
        self.truncated = False

    def run(self) -> None:
        out_fd = self.out_fd
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            if out_fd is not None:
                try:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out_fd, view):]
                except OSError:
                    out_fd = None    # our reader went away (EPIPE): keep recording anyway
            room = self.limit - len(self.kept)
            if room > 0:
                self.kept += chunk[:room]
            if len(chunk) > room:
                self.truncated = True
        os.close(self.fd)

    def text(self) -> str:
        return self.kept.decode("utf-8", "replace")


def spawn_captured(argv: list[str], env: dict[str, str] | None, limit: int):   # noqa: ANN201
    """Start `argv` in its own session with stdin from /dev/null, keeping a bounded copy of its
    stdout and stderr (tees without a copy to our own output). Returns (Popen, [out, err])."""
    import subprocess

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                                start_new_session=True)
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    readers = [OutputTee(out_r, None, limit), OutputTee(err_r, None, limit)]
    for r in readers:
        r.start()
    return proc, readers


def listening_ports(root_pid: int) -> set[int]:
    """TCP ports that root_pid or any of its descendants listens on (in a network namespace of
    their own, as in verify's jail: every port listening there)."""
    import psutil   # imported here: plain runs never pay for it

    ports: set[int] = set()
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return ports
    mine = _netns_inode("self")
    other_netns: dict[int, int] = {}
    for proc in procs:
        netns = _netns_inode(str(proc.pid))
        if netns is not None and netns != mine:
            other_netns.setdefault(netns, proc.pid)
            continue
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN and c.laddr:
                ports.add(c.laddr.port)
    if other_netns:
        from tracejail.jail import netns_listening

        for pid in other_netns.values():
            ports |= netns_listening(pid) or set()
    return ports


def _netns_inode(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


class _PortWatcher(threading.Thread):
    """Polls which TCP ports the traced tree listens on, for readiness and for ExposedPorts."""

    def __init__(self, tracer_pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.tracer_pid, self.interval = tracer_pid, interval
        self.seen: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        # Short runs never pay for importing psutil: the first look waits one interval.
        while not self.done.wait(self.interval):
            self.seen |= listening_ports(self.tracer_pid)

    def poll_now(self) -> set[int]:
        ports = listening_ports(self.tracer_pid)
        self.seen |= ports
        return ports


def record(argv: Sequence[str], options: RecordOptions | None = None, *,
           progress: Callable[[str], None] | None = None) -> Recording:
    """Run `argv` under the tracer and return the recorded trace (one run)."""
    opts = options or RecordOptions()
    if not argv:
        raise UsageError("no command given: put it after `--`, e.g. tracejail record -- python3 app.py")
    env = host_environment() if opts.env is None else dict(opts.env)
    executable = resolve_command(argv[0], env.get("PATH"), opts.cwd)
    cwd = os.path.abspath(opts.cwd or os.getcwd())
    warnings: list[str] = []
    say = progress or (lambda _msg: None)

    foreground_tty = None
    try:
        if os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp():
            foreground_tty = 0
    except OSError:
        foreground_tty = None

    started = time.monotonic()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tracer = tracer_process.start(tracer_process.Job(
        list(argv), executable, env, cwd, use_seccomp=opts.use_seccomp, exact=opts.exact,
        pin_cpu=opts.pin_cpu, foreground_tty=foreground_tty))
    tracer_pid, channels = tracer.pid, tracer.channels
    result_fd = channels.result_fd
    tees = [OutputTee(channels.out_r, 1 if opts.passthrough else None, tr.OUTPUT_LIMIT),
            OutputTee(channels.err_r, 2 if opts.passthrough else None, tr.OUTPUT_LIMIT)]
    for t in tees:
        t.start()

    state = _RunState(tracer_pid)
    with _signals_forwarded(state):
        status_line = _read_line(channels.status_r)
        os.close(channels.status_r)
        if not status_line.startswith("ok "):
            _reap(tracer_pid)
            os.close(result_fd)
            if status_line.startswith("eperm"):
                raise TracejailError(ptrace_refused(), 3)
            why = status_line.strip().removeprefix("error ")
            raise TracejailError(f"the tracer failed to start: {why or 'no answer'}", 4)
        _, pid_s, mode = status_line.split()
        state.root_pid = int(pid_s)
        if mode != "seccomp":
            warnings.append("seccomp is unavailable: tracing every syscall (slower)")
        # Plain runs are polled rarely: a short program never pays for psutil, a long server
        # still gets its ports recorded.
        watcher = _PortWatcher(tracer_pid, 0.1 if opts.exercises else 1.0)
        watcher.start()
        exercise_results: list[tr.ExerciseResult] = []
        ready_error: ReadyError | None = None
        deadline = started + opts.timeout if opts.timeout else None
        if opts.exercises:
            say("waiting for the command to be ready")
            ready_error = _wait_ready(state, watcher, opts, deadline)
            if ready_error is None:
                for cmd in opts.exercises:
                    if state.finished.is_set() or state.stop_reason:
                        break
                    say(f"exercise: {cmd}")
                    exercise_results.append(run_exercise(cmd, opts.exercise_timeout, deadline,
                                                          opts.exercise_cwd, _netns_of(tracer_pid)
                                                          if opts.exercise_netns else None))
                if not state.finished.is_set() and not state.stop_reason:
                    state.stop_reason = "stopped"
            _stop_tree(state, opts.stop_timeout)
        else:
            _wait_finished(state, deadline, opts.stop_timeout)
        watcher.done.set()
        watcher.join(timeout=2)
        for t in tees:
            t.join(timeout=5)

    try:
        with os.fdopen(result_fd, "rb") as f:
            f.seek(0)
            result = marshal.load(f)
    except (OSError, EOFError, ValueError, TypeError):
        result = None
    if result is None:
        raise TracejailError("the tracer ended without a result (was it killed?); nothing was written", 4)
    if ready_error and not opts.keep_unready:
        raise TracejailError(ready_error.message(), 1)

    duration = time.monotonic() - started
    run = tr.Run(
        argv=list(argv), executable=executable, cwd=cwd, uid=os.getuid(), gid=os.getgid(),
        environment=dict(env), started=started_at,
        duration=round(duration, 3), exit_code=result["exit_code"], exit_signal=result["exit_signal"],
        stop_reason=state.stop_reason or ("interrupted" if result["interrupted_by"] else "exited"),
        stdout=tees[0].text(), stderr=tees[1].text(),
        stdout_truncated=tees[0].truncated, stderr_truncated=tees[1].truncated,
        exercises=exercise_results, listening_ports=sorted(watcher.seen),
        processes=[tr.ProcessInfo(pid, ppid if pid != result["root_pid"] else None, argv, exe, 0, code, sig)
                   for pid, ppid, argv, exe, code, sig in sorted(result["processes"])],
        tracing={"mode": result["mode"], "exact": opts.exact, "stops": result["stops"],
                 "warnings": warnings,
                 # how readiness was decided, so that `verify` can wait the same way
                 **({"ready_port": opts.ready_port, "ready_delay": opts.ready_delay}
                    if opts.exercises else {})},
    )
    # Nothing secret is stored: environment values, command lines, captured output.
    said = tr.scrub_run(run, opts.keep_env, opts.keep_argv)
    trace = tr.Trace(runs=[run], host=tr.host_info())
    _fill_files(trace, result, run_index=0)
    return Recording(trace=trace, run=run, warnings=warnings + said, ready_error=ready_error,
                     stopped_by=state.stop_signal)


def _fill_files(trace: tr.Trace, result: dict, run_index: int) -> None:
    for (path, kind, syscall, res, tgid), count in result["events"].items():
        rec = trace.record(path)
        rec.add(kind, syscall, res, tgid, count)
        if run_index not in rec.runs:
            rec.runs.append(run_index)
    for path in result["created"]:
        if path in trace.files:
            trace.files[path].created_by_run = True
    for path in result["removed"]:
        if path in trace.files:
            trace.files[path].removed_by_run = True
    for rec in trace.files.values():
        rec.accesses.sort(key=lambda a: (a.kind, a.syscall, a.result))
        for a in rec.accesses:
            a.pids.sort()


class _RunState:
    def __init__(self, tracer_pid: int) -> None:
        self.tracer_pid = tracer_pid
        self.root_pid: int | None = None
        self.stop_reason: str | None = None
        self.stop_signal: int | None = None      # the signal that interrupted the recorder
        self.finished = threading.Event()
        self.interrupts = 0
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        _reap(self.tracer_pid)
        self.finished.set()

    def graceful_stop(self) -> None:
        _signal(self.tracer_pid, signal.SIGUSR1)

    def kill(self) -> None:
        _signal(self.tracer_pid, signal.SIGUSR2)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _reap(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except ChildProcessError:
            return
        except InterruptedError:
            continue


class _signals_forwarded:
    """Ctrl-C / SIGTERM on the recorder go to the target; the trace so far is still written."""

    def __init__(self, state: _RunState) -> None:
        self.state = state
        self.saved: dict[int, object] = {}

    def _handler(self, signum: int, _frame) -> None:
        st = self.state
        st.interrupts += 1
        if st.stop_reason is None:
            st.stop_reason = "interrupted"
            st.stop_signal = signum
        if st.interrupts > 1 or st.root_pid is None:
            st.kill()
            return
        try:
            os.killpg(st.root_pid, signum)
        except OSError:
            _signal(st.root_pid, signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self.saved[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        if exc[0] is not None and not self.state.finished.is_set():
            # Our own failure: never leave the tree behind
            self.state.kill()
            self.state.finished.wait(5)


def _read_line(fd: int) -> str:
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace")


def _wait_finished(state: _RunState, deadline: float | None, stop_timeout: float) -> None:
    while not state.finished.is_set():
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            state.stop_reason = "timeout"
            _stop_tree(state, stop_timeout)
            return
        state.finished.wait(0.5 if remaining is None else min(0.5, remaining))


def _stop_tree(state: _RunState, stop_timeout: float) -> None:
    if state.finished.is_set():
        return
    state.graceful_stop()
    if not state.finished.wait(stop_timeout):
        state.kill()
        if not state.finished.wait(10):
            _signal(state.tracer_pid, signal.SIGKILL)   # EXITKILL takes the tree with it
            state.finished.wait(5)


def _wait_ready(state: _RunState, watcher: _PortWatcher, opts: RecordOptions,
                deadline: float | None) -> ReadyError | None:
    """Block until the command is ready for exercises; why, if it never is."""
    start = time.monotonic()
    if opts.ready_delay is not None:
        end = start + opts.ready_delay
        while time.monotonic() < end:
            if state.finished.wait(min(0.1, max(0.0, end - time.monotonic()))):
                return ReadyError(NotReady.EXITED)
        return None
    limit = start + opts.ready_timeout
    if deadline is not None:
        limit = min(limit, deadline)
    while True:
        ports = watcher.poll_now()
        if (opts.ready_port in ports) if opts.ready_port else bool(ports):
            return None
        if state.finished.is_set():
            return ReadyError(NotReady.EXITED)
        if state.stop_reason:
            return None   # interrupted while waiting: write what ran
        if time.monotonic() >= limit:
            return ReadyError(NotReady.TIMEOUT, opts.ready_port, opts.ready_timeout)
        state.finished.wait(0.05)


def _netns_of(tree_pid: int) -> int | None:
    from tracejail.jail import netns_pid

    return netns_pid(tree_pid)


def run_exercise(cmd: str, timeout: float, deadline: float | None,
                 cwd: str | None = None, netns_pid: int | None = None) -> tr.ExerciseResult:
    """Run one exercise with /bin/sh on the host (in `netns_pid`'s network namespace when given:
    a jailed server's)."""
    if deadline is not None:
        timeout = max(0.1, min(timeout, deadline - time.monotonic()))
    import subprocess   # here: plain records never pay for importing it

    t0 = time.monotonic()
    timed_out = False
    enter = None
    if netns_pid is not None:
        from tracejail.jail import netns_entry

        enter = netns_entry(netns_pid)
    try:
        proc = subprocess.run(["/bin/sh", "-c", cmd], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, cwd=cwd, preexec_fn=enter)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, err, timed_out = None, exc.stdout or b"", exc.stderr or b"", True
    except subprocess.SubprocessError as exc:   # the namespace could not be entered
        code, out, err = 126, b"", f"tracejail: {exc}\n".encode()
    finally:
        if enter is not None:
            from tracejail.jail import close_entry

            close_entry(enter)
    return tr.ExerciseResult(
        command=cmd, exit_code=code,
        stdout=out[:EXERCISE_OUTPUT_LIMIT].decode("utf-8", "replace"),
        stderr=err[:EXERCISE_OUTPUT_LIMIT].decode("utf-8", "replace"),
        stdout_truncated=len(out) > EXERCISE_OUTPUT_LIMIT,
        stderr_truncated=len(err) > EXERCISE_OUTPUT_LIMIT,
        duration=round(time.monotonic() - t0, 3), timed_out=timed_out)
