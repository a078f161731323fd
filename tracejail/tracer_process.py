"""The tracer process: the child of the recorder that runs the ptrace loop (see record.py).

`tracejail record` starts it first thing, before the CLI's own imports (`prestart`, called by
launch.py): importing the tracer (ctypes and python-ptrace, a fifth of a short recording's
time) then runs on another CPU while the recorder imports click and parses its options, and
`start` hands the waiting process its job. Anything else (verify's replays, minify, a library
caller) forks it when the job is known. Either way the process runs `_serve`.

Only light standard modules are imported here, since `prestart` runs before anything else.
"""
from __future__ import annotations

import marshal
import os
import signal
from typing import NoReturn


class Channels:
    """The pipes between recorder and tracer process, made before the fork that splits them."""

    def __init__(self) -> None:
        self.out_r, self.out_w = os.pipe()        # the program's stdout, to the recorder's tee
        self.err_r, self.err_w = os.pipe()        # its stderr
        self.status_r, self.status_w = os.pipe()  # one line once the program runs, or why not
        # The result comes back in an anonymous memory file: nothing on disk. Closed on exec, so
        # the traced program never holds it.
        self.result_fd = os.memfd_create("tracejail-result")

    def keep_tracer_side(self) -> None:
        for fd in (self.out_r, self.err_r, self.status_r):
            os.close(fd)

    def keep_recorder_side(self) -> None:
        for fd in (self.out_w, self.err_w, self.status_w):
            os.close(fd)

    def close_recorder_side(self) -> None:
        for fd in (self.out_r, self.err_r, self.status_r, self.result_fd):
            _close(fd)


class Job:
    """What the tracer process runs: plain values, so that it crosses a pipe as marshal data."""

    __slots__ = ("argv", "executable", "env", "cwd", "use_seccomp", "exact", "pin_cpu", "foreground_tty")

    def __init__(self, argv: list[str], executable: str, env: dict[str, str], cwd: str, *,
                 use_seccomp: bool, exact: bool, pin_cpu: bool, foreground_tty: int | None) -> None:
        self.argv, self.executable, self.env, self.cwd = argv, executable, env, cwd
        self.use_seccomp, self.exact, self.pin_cpu = use_seccomp, exact, pin_cpu
        self.foreground_tty = foreground_tty

    def dumps(self) -> bytes:
        return marshal.dumps(tuple(getattr(self, name) for name in self.__slots__))

    @classmethod
    def loads(cls, data: bytes) -> Job:
        argv, executable, env, cwd, use_seccomp, exact, pin_cpu, foreground_tty = marshal.loads(data)
        return cls(argv, executable, env, cwd, use_seccomp=use_seccomp, exact=exact, pin_cpu=pin_cpu,
                   foreground_tty=foreground_tty)


class TracerProcess:
    """A started tracer process, as the recorder sees it."""

    def __init__(self, pid: int, channels: Channels) -> None:
        self.pid = pid
        self.channels = channels


class _Prestarted:
    def __init__(self, pid: int, channels: Channels, job_w: int) -> None:
        self.pid, self.channels, self.job_w = pid, channels, job_w


_prestarted: _Prestarted | None = None


def prestart() -> None:
    """Fork the tracer process now, to import the tracer while this process goes on; the next
    `start` in this process hands it its job. Unused, it ends when `discard_prestarted` runs or
    this process exits (the job pipe's end of file)."""
    global _prestarted
    if _prestarted is not None:
        return
    channels = Channels()
    job_r, job_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(job_w)
        _wait_for_job(job_r, channels)
    os.close(job_r)
    channels.keep_recorder_side()
    _prestarted = _Prestarted(pid, channels, job_w)


def discard_prestarted() -> None:
    """End a prestarted tracer process that got no job, and reap it."""
    global _prestarted
    waiting, _prestarted = _prestarted, None
    if waiting is None:
        return
    _close(waiting.job_w)
    waiting.channels.close_recorder_side()
    try:
        os.kill(waiting.pid, signal.SIGKILL)
        os.waitpid(waiting.pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def start(job: Job) -> TracerProcess:
    """The tracer process running `job`: the prestarted one, or a new fork."""
    global _prestarted
    waiting, _prestarted = _prestarted, None
    if waiting is not None:
        data = job.dumps()
        try:
            # Its length, then the job; one larger than the pipe's buffer is written as the
            # process reads it (once its imports are done).
            view = memoryview(len(data).to_bytes(8, "little") + data)
            while view:
                view = view[os.write(waiting.job_w, view):]
            os.close(waiting.job_w)
            return TracerProcess(waiting.pid, waiting.channels)
        except OSError:
            # It died waiting (killed by someone): fork a new one below.
            _prestarted = waiting
            discard_prestarted()
    channels = Channels()
    pid = os.fork()
    if pid == 0:
        _serve(job, channels)
    channels.keep_recorder_side()
    return TracerProcess(pid, channels)


def _wait_for_job(job_r: int, channels: Channels) -> NoReturn:
    """The prestarted process: import the tracer, then wait for the job (or the end)."""
    recorder = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the recorder's to handle
    try:
        # The point of starting early: the tracer's imports, here and not in the recorder's time.
        from tracejail.tracer import become_tracer_process

        become_tracer_process()
        if os.getppid() != recorder:   # it died before the line above could tie us to it
            os._exit(0)
        header = _read_exactly(job_r, 8)
        data = _read_exactly(job_r, int.from_bytes(header, "little")) if len(header) == 8 else b""
        os.close(job_r)
        job = Job.loads(data) if data else None
    except BaseException:
        job = None
    if job is None:   # the recorder did not need it (usage error, --help, another path)
        os._exit(0)
    _serve(job, channels)


def _read_exactly(fd: int, n: int) -> bytes:
    """`n` bytes from `fd`, or fewer when it ends first."""
    data = bytearray()
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _serve(job: Job, channels: Channels) -> NoReturn:
    """Body of the tracer process: start the program under the tracer, say so on the status
    pipe, run the loop, hand the result back. Never returns."""
    code = 0
    status_w = channels.status_w
    try:
        channels.keep_tracer_side()
        from tracejail.tracer import PtraceNotPermitted, Tracer, become_tracer_process, result_to_plain

        become_tracer_process()
        try:
            os.chdir(job.cwd)
        except OSError as exc:
            os.write(status_w, f"error cannot enter {job.cwd}: {exc.strerror}\n".encode())
            os._exit(4)
        if job.pin_cpu:
            # Each stop wakes the tracer; across CPUs that costs most of a stop here. The program
            # inherits the mask, so it runs on this one CPU too.
            os.sched_setaffinity(0, {cpu_to_pin()})
        # Pinned, polling would only take the CPU from the program the tracer waits for.
        tracer = Tracer(job.argv, job.executable, job.env, use_seccomp=job.use_seccomp, exact=job.exact,
                        stdout_fd=channels.out_w, stderr_fd=channels.err_w,
                        foreground_tty=job.foreground_tty, **({"spin_polls": 0} if job.pin_cpu else {}))
        try:
            pid = tracer.start()
        except PtraceNotPermitted as exc:
            os.write(status_w, f"eperm {exc}\n".encode())
            os._exit(3)
        os.close(channels.out_w)
        os.close(channels.err_w)
        signal.signal(signal.SIGUSR1, lambda *_: tracer.request_stop(signal.SIGTERM))
        signal.signal(signal.SIGUSR2, lambda *_: tracer.request_stop(signal.SIGKILL))
        signal.signal(signal.SIGTERM, lambda *_: tracer.request_stop(signal.SIGKILL))
        os.write(status_w, f"ok {pid} {tracer.result.mode}\n".encode())
        os.close(status_w)
        result = tracer.run()
        with os.fdopen(channels.result_fd, "wb") as f:
            marshal.dump(result_to_plain(result), f)
    except BaseException as exc:   # report, never fall back into the recorder's code
        try:
            os.write(status_w, f"error {type(exc).__name__}: {exc}\n".encode())
        except OSError:
            pass
        code = 4
    finally:
        os._exit(code)


def cpu_to_pin() -> int:
    """The CPU for --pin-cpu: the one the scheduler runs this process on (it chose it over busier
    ones), else the lowest this process may use."""
    allowed = os.sched_getaffinity(0)
    try:
        with open("/proc/self/stat", "rb") as f:
            current = int(f.read().rsplit(b")", 1)[1].split()[36])   # field 39, `processor`
    except (OSError, IndexError, ValueError):
        current = -1
    return current if current in allowed else min(allowed)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
