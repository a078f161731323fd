"""The ptrace loop: start a command and record the file syscalls of its whole process tree.

Built on python-ptrace's low-level binding (`ptrace.binding`), not its debugger objects: the
debugger polls every pid, swallows SIGTRAP and costs ~4x more per stop. The loop here is what a
correct tracer needs (see ../shared/notes/tracing.md):

* the child stops itself, is PTRACE_SEIZE'd (so group-stops can be PTRACE_LISTEN'ed), installs the
  seccomp filter only after the tracer set PTRACE_O_TRACESECCOMP, then execs;
* one `waitpid(-1, __WALL)` for every thread; stops of unknown tids (a new child's first stop can
  arrive before its parent's fork event) are adopted on the spot;
* every signal that is not a trace trap is re-injected, the program's own SIGTRAP included;
* `/proc/PID/mem` is reopened after exec; an exec from a non-leader thread makes that thread's id
  vanish into the leader's;
* PTRACE_O_EXITKILL: the tree never outlives the tracer.

Results come in two precisions. By default the tracee stops once per traced call (at entry) and
the tracer checks the path on the host right then: the state the call is about to see, so files
the run creates, renames or deletes later are judged right. With `exact=True` the tracer also
stops at syscall exit and records the kernel's return value (used when the tracee sees another
filesystem than the tracer, e.g. chrooted by `verify`).

The tracer runs in its own process (forked by `record`), so that `waitpid(-1)` only ever sees the
traced tree, never the exercise commands the recorder runs at the same time.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import stat as stat_mod
import struct
from dataclasses import dataclass, field


def _import_ptrace_binding():   # noqa: ANN202
    """python-ptrace looks libc up with ctypes.util.find_library, which runs `ldconfig -p` (~7 ms
    of every record's start-up); on glibc its answer is known."""
    import ctypes.util

    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        glibc = None
    original = ctypes.util.find_library
    if glibc:
        ctypes.util.find_library = lambda name: "libc.so.6" if name == "c" else original(name)
    try:
        from ptrace.binding import func
    finally:
        ctypes.util.find_library = original
    return func


pb = _import_ptrace_binding()

from tracejail import seccomp, syscalls
from tracejail.elf import interpreter_of, shebang_of
from tracejail.syscalls import Effect, NoFollow

PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208

O_TRACESYSGOOD = 0x1
O_TRACEFORK = 0x2
O_TRACEVFORK = 0x4
O_TRACECLONE = 0x8
O_TRACEEXEC = 0x10
O_TRACESECCOMP = 0x80
O_EXITKILL = 0x100000

EV_FORK, EV_VFORK, EV_CLONE, EV_EXEC, EV_VFORK_DONE, EV_EXIT, EV_SECCOMP = 1, 2, 3, 4, 5, 6, 7
EV_STOP = 128
SYSCALL_TRAP = signal.SIGTRAP | 0x80
WALL = 0x40000000
WALL_NOHANG = WALL | os.WNOHANG
SPIN_POLLS = 300   # WNOHANG polls (each yielding the CPU) before a blocking wait; bench/record.md
GROUP_STOP_SIGNALS = {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = syscalls.AT_SYMLINK_NOFOLLOW
AT_EMPTY_PATH = syscalls.AT_EMPTY_PATH
O_WRONLY, O_RDWR, O_CREAT, O_EXCL, O_TRUNC = 0o1, 0o2, 0o100, 0o200, 0o1000
O_DIRECTORY, O_NOFOLLOW, O_PATH = 0o200000, 0o400000, 0o10000000

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

# An event key: (path, kind, syscall, result, tgid) -> count
EventKey = tuple


@dataclass
class TracedProcess:
    pid: int
    ppid: int | None
    argv: list[str]
    exe: str | None
    exit_code: int | None = None
    exit_signal: int | None = None


@dataclass
class TraceResult:
    """What the tracer process hands back to the recorder."""

    root_pid: int
    exit_code: int | None = None
    exit_signal: int | None = None
    events: dict = field(default_factory=dict)         # EventKey -> count
    created: set = field(default_factory=set)          # paths the run created
    removed: set = field(default_factory=set)          # paths the run removed/renamed away
    processes: dict = field(default_factory=dict)      # pid -> TracedProcess
    mode: str = "seccomp"
    stops: int = 0
    interrupted_by: int | None = None                  # signal that ended the root, if any


class PtraceNotPermitted(Exception):
    pass


# -- small helpers on /proc and tracee memory -------------------------------------------------

def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _read_cmdline(pid: int) -> list[str]:
    # os.open/os.read: Python's open() adds fstat, ioctl and lseek calls, at every exec
    try:
        fd = os.open(f"/proc/{pid}/cmdline", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
    except OSError:
        return []
    finally:
        os.close(fd)
    return [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0")[:-1]]


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Memory:
    """Reads NUL-terminated strings from tracees, one page at a time.

    process_vm_readv needs no per-process file descriptor (no open/close per process, nothing
    stale after exec); where it is refused, /proc/PID/mem with one pread per page.
    """

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}
        libc = ctypes.CDLL(None, use_errno=True)
        self._readv = libc.process_vm_readv
        self._readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                                ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
        self._readv.restype = ctypes.c_ssize_t
        self._buf = ctypes.create_string_buffer(4096)
        self._local = _IoVec(ctypes.addressof(self._buf), 4096)
        self._remote = _IoVec(0, 0)
        self._local_p = ctypes.byref(self._local)
        self._remote_p = ctypes.byref(self._remote)
        self.use_readv = True

    def fd(self, tgid: int) -> int:
        fd = self.fds.get(tgid)
        if fd is None:
            fd = self.fds[tgid] = os.open(f"/proc/{tgid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        return fd

    def forget(self, tgid: int) -> None:
        fd = self.fds.pop(tgid, None)
        if fd is not None:
            os.close(fd)

    def _chunk(self, pid: int, addr: int, size: int) -> bytes:
        if self.use_readv:
            self._remote.base = addr
            self._remote.len = self._local.len = size
            got = self._readv(pid, self._local_p, 1, self._remote_p, 1, 0)
            if got > 0:
                return ctypes.string_at(self._buf, got)
            err = ctypes.get_errno()
            if err not in (errno.ENOSYS, errno.EPERM):
                return b""
            self.use_readv = False
        return os.pread(self.fd(pid), size, addr)

    def string(self, pid: int, addr: int, limit: int = 4096) -> str | None:
        if not addr:
            return None
        out = b""
        try:
            while len(out) < limit:
                chunk = self._chunk(pid, addr, 4096 - (addr & 4095))
                if not chunk:
                    return None
                nul = chunk.find(b"\0")
                if nul >= 0:
                    return (out + chunk[:nul]).decode("utf-8", "surrogateescape")
                out += chunk
                addr += len(chunk)
        except OSError:
            return None
        return None

    def u64(self, pid: int, addr: int) -> int | None:
        try:
            data = self._chunk(pid, addr, 8)
        except OSError:
            return None
        return struct.unpack("<Q", data)[0] if len(data) == 8 else None


# -- classifying a call --------------------------------------------------------------------

def _open_kind(flags: int) -> str:
    if flags & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC):
        return "write"
    if flags & O_PATH:
        return "stat"
    if flags & O_DIRECTORY:
        return "list"
    return "read"


def _host_result(kind: str, path: str, flags: int, nofollow: bool, access_mode: int) -> str:
    """What the call will find, judged on the host at syscall entry."""
    try:
        if kind == "readlink":
            st = os.lstat(path)
            return "ok" if stat_mod.S_ISLNK(st.st_mode) else "EINVAL"
        st = os.lstat(path) if nofollow else os.stat(path)
        if kind == "list" and not stat_mod.S_ISDIR(st.st_mode):
            return "ENOTDIR"
        if kind == "exec":
            if not stat_mod.S_ISREG(st.st_mode):
                return "EACCES"
            if not st.st_mode & 0o111:
                return "EACCES"
        if kind == "read" and nofollow and stat_mod.S_ISLNK(st.st_mode) and not flags & O_PATH:
            return "ELOOP"
        if access_mode and not os.access(path, access_mode, follow_symlinks=not nofollow):
            return "EACCES"
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, "EIO")


def _has_controlling_tty(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[4]) != 0   # tty_nr, the 7th field of stat(5)
    except (OSError, IndexError, ValueError):
        return True


def _exists(path: str) -> bool:
    return os.path.lexists(path)


# -- ptrace calls of the hot path --------------------------------------------------------------

_PTRACE_FAILED = ctypes.c_ulong(-1).value


class _Ptrace:
    """The loop's requests, without the binding's per-call wrapping: PTRACE_GETREGS into one
    preallocated register set (python-ptrace's ptrace_getregs allocates one per call and
    converts every error into an exception), and `call` for the resume and listen requests,
    whose failure only means the task died (its exit comes next)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.call = libc.ptrace
        self.call.argtypes = (ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
        self.call.restype = ctypes.c_ulong
        self.regs = pb.ptrace_registers_t()
        self._regs_at = ctypes.addressof(self.regs)

    def getregs(self, tid: int):   # noqa: ANN201 - the binding's user_regs_struct
        """The task's registers (valid until the next call), or None when it is gone."""
        if self.call(pb.PTRACE_GETREGS, tid, 0, self._regs_at) == _PTRACE_FAILED:
            return None
        return self.regs


# -- the tracer ----------------------------------------------------------------------------

class Tracer:
    def __init__(self, argv: list[str], executable: str, env: dict[str, str], *,
                 use_seccomp: bool = True, exact: bool = False,
                 stdout_fd: int | None = None, stderr_fd: int | None = None,
                 foreground_tty: int | None = None, spin_polls: int = SPIN_POLLS) -> None:
        self.argv = argv
        self.executable = executable
        self.env = env
        self.use_seccomp = use_seccomp
        self.exact = exact
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self.foreground_tty = foreground_tty
        self.spin_polls = spin_polls
        self.mem = _Memory()
        self.raw = _Ptrace()
        self.tasks: dict[int, int] = {}          # tid -> tgid
        self.in_syscall: dict[int, bool] = {}    # plain-ptrace mode: entry/exit toggle
        self.pending: dict[int, tuple] = {}      # exact mode: tid -> [(path, kind, name, created?)]
        self.pre_exec: set[int] = set()
        self.exited: set[int] = set()            # tids whose exit came before their fork event
        self.stashed: set[int] = set()           # new tids stopped before their parent's event
        self.header_cache: dict[tuple, str | None] = {}   # PT_INTERP / #! per file version
        root = os.stat("/")
        self.host_root = (root.st_dev, root.st_ino)      # a tracee whose root is this one sees our paths
        self.result: TraceResult | None = None
        self._stop_requested = 0

    # The child: stop, wait to be seized, install the filter, exec.
    def _child(self, program: bytes | None) -> None:
        try:
            os.setpgid(0, 0)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ,
                        signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTOU, signal.SIGQUIT):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            if self.stdout_fd is not None:
                os.dup2(self.stdout_fd, 1)
            if self.stderr_fd is not None:
                os.dup2(self.stderr_fd, 2)
            os.kill(os.getpid(), signal.SIGSTOP)
            if program is not None:
                seccomp.install(program)
            os.execve(self.executable, self.argv, self.env)
        except OSError as exc:
            os.write(2, f"tracejail: cannot execute {self.executable}: {exc.strerror}\n".encode())
            os._exit(126)
        except BaseException:
            os._exit(126)

    def start(self) -> int:
        """Fork the command, attach to it, and leave it about to install the filter and exec."""
        program = seccomp.build_filter() if self.use_seccomp else None
        if program is not None and not _seccomp_available():
            program = None
            self.use_seccomp = False
        pid = os.fork()
        if pid == 0:
            self._child(program)
        _, status = os.waitpid(pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            raise RuntimeError("the command's process ended before it could be traced")
        options = (O_TRACESYSGOOD | O_TRACEFORK | O_TRACEVFORK | O_TRACECLONE | O_TRACEEXEC
                   | O_EXITKILL | (O_TRACESECCOMP if program is not None else 0))
        try:
            pb.ptrace(PTRACE_SEIZE, pid, 0, options)
        except pb.PtraceError as exc:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise PtraceNotPermitted(str(exc)) from None
            raise
        if self.foreground_tty is not None:
            try:
                os.tcsetpgrp(self.foreground_tty, pid)
            except OSError:
                pass
        self.tasks[pid] = pid
        self.pre_exec.add(pid)
        self.result = TraceResult(root_pid=pid, mode="seccomp" if program is not None else "ptrace")
        self.result.processes[pid] = TracedProcess(pid, os.getpid(), list(self.argv), self.executable)
        os.kill(pid, signal.SIGCONT)
        return pid

    def request_stop(self, sig: int) -> None:
        """Signal every traced process (called from a signal handler in the tracer process)."""
        for tgid in set(self.tasks.values()):
            try:
                os.kill(tgid, sig)
            except OSError:
                pass

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> TraceResult:
        res = self.result
        assert res is not None
        events = res.events
        tasks = self.tasks
        waitpid = os.waitpid
        cont = self._resume
        getregs = self.raw.getregs
        seccomp_mode = self.use_seccomp
        spin = self.spin_polls
        yield_cpu = os.sched_yield
        stops = 0
        while tasks or self.stashed:
            if not tasks:
                # parents died before their fork events were seen: adopt the orphans
                for child in list(self.stashed):
                    self._adopt(child)
                    self._release(child)
            try:
                # Poll briefly before sleeping: a tracee that stops again within a few hundred
                # microseconds (most file-heavy code) then finds the tracer awake, and the
                # cross-CPU wake-up that dominates a stop on VMs is skipped. Each poll yields
                # the CPU: when the tracee (or anything else) waits for this CPU, polling must
                # not take it (with a busy neighbour process, polling without yielding made the
                # fork-heavy workload twice as slow). Bounded, so a long-running tracee costs at
                # most SPIN_POLLS polls per stop.
                for _ in range(spin):
                    tid, status = waitpid(-1, WALL_NOHANG)
                    if tid:
                        break
                    yield_cpu()
                else:
                    tid, status = waitpid(-1, WALL)
            except ChildProcessError:
                break
            stops += 1
            if status & 0x7F == 0x7F:        # stopped
                sig = (status >> 8) & 0xFF
                event = status >> 16
                if tid not in tasks:
                    if event == EV_STOP and tid not in self.exited:
                        # a new child's first stop, before its parent's fork event: keep it
                        # stopped until that event says whether it is a thread or a process
                        self.stashed.add(tid)
                        continue
                    self._adopt(tid)
                if event == EV_SECCOMP:
                    regs = getregs(tid)
                    if regs is not None:
                        self._on_syscall_entry(tid, regs, events)
                    cont(tid, 0)   # to the exit stop when exact mode waits for the result
                elif sig == SYSCALL_TRAP:
                    regs = getregs(tid)
                    if regs is None:
                        pass   # gone: its exit follows
                    elif seccomp_mode:   # exact mode: the exit of a call we saw at entry
                        self._on_syscall_exit(tid, regs.rax)
                    elif self.in_syscall.get(tid):
                        self.in_syscall[tid] = False
                        if tid in self.pending:
                            self._on_syscall_exit(tid, regs.rax)
                    else:
                        self.in_syscall[tid] = True
                        self._on_syscall_entry(tid, regs, events)
                    cont(tid, 0)
                elif event in (EV_FORK, EV_VFORK, EV_CLONE):
                    self._on_new_task(tid, event)
                    cont(tid, 0)
                elif event == EV_EXEC:
                    self._on_exec(tid)
                    cont(tid, 0)
                elif event == EV_STOP:
                    if sig in GROUP_STOP_SIGNALS:
                        self.raw.call(PTRACE_LISTEN, tid, 0, 0)
                    else:
                        cont(tid, 0)
                elif event:
                    cont(tid, 0)
                else:
                    # signal-delivery-stop: deliver it as if untraced
                    if sig == signal.SIGINT and tasks.get(tid) == res.root_pid:
                        res.interrupted_by = sig
                    cont(tid, sig)
            else:
                self._on_exit(tid, status)
        res.stops = stops
        for tgid in list(self.mem.fds):
            self.mem.forget(tgid)
        self._restore_foreground()
        return res

    def _restore_foreground(self) -> None:
        if self.foreground_tty is None:
            return
        old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            os.tcsetpgrp(self.foreground_tty, os.getpgrp())
        except OSError:
            pass
        finally:
            signal.signal(signal.SIGTTOU, old)

    def _resume(self, tid: int, sig: int) -> None:
        req = pb.PTRACE_CONT if self.use_seccomp and tid not in self.pending else pb.PTRACE_SYSCALL
        # A failure means the task died under us (SIGKILL, exec of a sibling thread): its exit follows.
        self.raw.call(req, tid, 0, sig)

    def _adopt(self, tid: int) -> None:
        tgid = tid
        try:
            with open(f"/proc/{tid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Tgid:"):
                        tgid = int(line.split()[1])
                        break
        except OSError:
            pass
        self.tasks[tid] = tgid

    def _on_new_task(self, parent_tid: int, event: int) -> None:
        res = self.result
        try:
            child = pb.ptrace_geteventmsg(parent_tid)
        except pb.PtraceError:
            return
        parent_tgid = self.tasks.get(parent_tid, parent_tid)
        if child in self.exited:
            self.exited.discard(child)
            if event == EV_CLONE and child not in self.result.processes:
                return
        elif event == EV_CLONE and os.path.exists(f"/proc/{parent_tgid}/task/{child}"):
            self.tasks[child] = parent_tgid       # a thread
            self._release(child)
            return
        else:
            self.tasks[child] = child
        self._release(child)
        parent = res.processes.get(parent_tgid)
        proc = res.processes.get(child)
        if proc is None:
            res.processes[child] = TracedProcess(
                child, parent_tgid, list(parent.argv) if parent else [], parent.exe if parent else None)
        else:
            proc.ppid = parent_tgid

    def _release(self, child: int) -> None:
        if child in self.stashed:
            self.stashed.discard(child)
            self._resume(child, 0)

    def _on_exec(self, tid: int) -> None:
        res = self.result
        try:
            former = pb.ptrace_geteventmsg(tid)
        except pb.PtraceError:
            former = tid
        if former != tid:
            # exec from a non-leader thread: that thread now is the leader; its old id is gone
            self.tasks.pop(former, None)
            self.pending.pop(former, None)
            self.in_syscall.pop(former, None)
        self.tasks[tid] = tid
        self.mem.forget(tid)
        self.pre_exec.discard(tid)
        exe = _readlink(f"/proc/{tid}/exe")
        proc = res.processes.get(tid)
        argv = _read_cmdline(tid)
        if proc is None:
            res.processes[tid] = TracedProcess(tid, None, argv, exe)
        else:
            proc.argv, proc.exe = argv, exe
        if exe:
            # /proc/TID/exe is the very file that runs, also for a tracee in another mount
            # namespace (a jail), where `exe` names a path the host cannot open.
            interp = self._cached(interpreter_of, f"/proc/{tid}/exe")
            if interp:   # the kernel opened it (the exec succeeded): no syscall names it
                key = (interp, "exec", "kernel:interp", "ok", tid)
                res.events[key] = res.events.get(key, 0) + 1

    def _on_exit(self, tid: int, status: int) -> None:
        res = self.result
        if tid not in self.tasks:
            self.exited.add(tid)
        tgid = self.tasks.pop(tid, tid)
        self.pending.pop(tid, None)
        self.in_syscall.pop(tid, None)
        if tid != tgid:
            return
        self.mem.forget(tgid)
        proc = res.processes.get(tgid)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        if proc is not None:
            proc.exit_code, proc.exit_signal = code, sig
        if tgid == res.root_pid:
            res.exit_code, res.exit_signal = code, sig

    # -- decoding file syscalls ----------------------------------------------------------
    def _path_at(self, tid: int, tgid: int, dirfd: int, addr: int, flags: int = 0) -> str | None:
        path = self.mem.string(tgid, addr)
        if path is None:
            return None
        if path.startswith("/"):
            return path
        dirfd = ctypes.c_int(dirfd & 0xFFFFFFFF).value
        if dirfd == AT_FDCWD:
            base = _readlink(f"/proc/{tid}/cwd")
        else:
            base = _readlink(f"/proc/{tid}/fd/{dirfd}")
        if not base or not base.startswith("/") or base.endswith(" (deleted)"):
            return None
        if path == "":
            # AT_EMPTY_PATH: the call is about the fd itself; without it the kernel says ENOENT
            return base if flags & AT_EMPTY_PATH else None
        if base == "/":
            return "/" + path
        return base + "/" + path

    def _on_syscall_entry(self, tid: int, regs, events: dict) -> None:
        sc = syscalls.BY_NR.get(regs.orig_rax)
        if sc is None:
            return
        name = sc.name
        tgid = self.tasks.get(tid, tid)
        if tgid in self.pre_exec and name != "execve":
            return   # our own child's Python between fork and exec: not the program
        args = (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9)
        flags = args[sc.flags] if sc.flags is not None else 0
        empty = AT_EMPTY_PATH if sc.empty_path_ok else (flags if sc.empty_path_flag is not None else 0)
        path = self._path_at(tid, tgid, args[sc.dirfd] if sc.dirfd is not None else AT_FDCWD, args[sc.path], empty)
        calls: list[tuple[str, str, int, bool, int]] = []   # (path, kind, flags, nofollow, amode)
        created: list[str] = []
        removed: list[str] = []
        effect = sc.effect
        if effect is Effect.OPEN:
            if sc.fixed_open_flags:
                flags = sc.fixed_open_flags
            elif sc.open_how:
                flags = self.mem.u64(tgid, flags) or 0
            if path is None:
                return
            if flags & O_CREAT and not _exists(path):
                created.append(path)
            calls.append((path, _open_kind(flags), flags, bool(flags & O_NOFOLLOW), 0))
        elif effect is Effect.STAT or effect is Effect.ACCESS:
            if path is None:
                return
            nofollow = sc.nofollow is NoFollow.ALWAYS or (sc.nofollow is NoFollow.AT_FLAG and bool(flags & AT_SYMLINK_NOFOLLOW))
            mode = args[sc.mode] & 7 if sc.mode is not None else 0
            calls.append((path, "stat", 0, nofollow, mode))
        elif effect is Effect.READLINK:
            if path is None:
                return
            calls.append((path, "readlink", 0, True, 0))
        elif effect is Effect.EXEC:
            if path is None:
                return
            calls.append((path, "exec", 0, False, 0))
            self._record_shebangs(path, tgid, events)
        elif effect is Effect.RENAME:
            # mutations: only for telling which files the run itself created or removed
            to_dirfd = args[sc.to_dirfd] if sc.to_dirfd is not None else AT_FDCWD
            dst = self._path_at(tid, tgid, to_dirfd, args[sc.to_path]) if sc.to_path is not None else None
            if path:
                removed.append(path)
                calls.append((path, "write", 0, True, 0))
            if dst:
                if not _exists(dst):
                    created.append(dst)
                calls.append((dst, "write", O_CREAT, True, 0))
        elif effect is Effect.REMOVE:
            if path:
                removed.append(path)
                calls.append((path, "write", 0, True, 0))
        elif path:   # Effect.MAKE
            if not _exists(path):
                created.append(path)
            # these make a new name or fail: an existing one is EEXIST, as O_EXCL is
            calls.append((path, "write", O_CREAT | O_EXCL, True, 0))
        res = self.result
        res.created.update(created)
        res.removed.update(removed)
        if self.exact:
            self.pending[tid] = tuple((c[0], c[1], name) for c in calls)
            return
        for path, kind, flags, nofollow, amode in calls:
            if path == "/dev/tty" and kind in ("read", "write") and not _has_controlling_tty(tgid):
                result = "ENXIO"   # exists on the host, but this process has no terminal
            elif kind == "write":
                if flags & O_CREAT:
                    result = "EEXIST" if flags & O_EXCL and _exists(path) and path not in created else "ok"
                else:
                    result = "ok" if _exists(path) else "ENOENT"
            else:
                result = _host_result(kind, path, flags, nofollow, amode)
            key = (path, kind, name, result, tgid)
            events[key] = events.get(key, 0) + 1

    def _on_syscall_exit(self, tid: int, rax: int) -> None:
        calls = self.pending.pop(tid, None)
        if not calls:
            return
        ret = ctypes.c_long(rax).value
        result = "ok" if ret >= 0 else errno.errorcode.get(-ret, f"E{-ret}")
        tgid = self.tasks.get(tid, tid)
        events = self.result.events
        for path, kind, name in calls:
            key = (path, kind, name, result, tgid)
            events[key] = events.get(key, 0) + 1

    def _cached(self, reader, path: str) -> str | None:   # noqa: ANN001
        """`reader(path)`, remembered per file version: a fork-heavy program execs the same few
        binaries again and again."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (reader, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        if key not in self.header_cache:
            self.header_cache[key] = reader(path)
        return self.header_cache[key]

    def _record_shebangs(self, path: str, tgid: int, events: dict) -> None:
        # The kernel opens `#!` interpreters itself; follow the chain like binfmt_script does.
        # The path is read on the host: only for a tracee whose root is the host's (a jailed
        # one's scripts are the jail's; build's closure follows their `#!` lines statically).
        try:
            st = os.stat(f"/proc/{tgid}/root")
        except OSError:
            return
        if (st.st_dev, st.st_ino) != self.host_root:
            return
        for _ in range(4):
            interp = self._cached(shebang_of, path)
            if not interp:
                return
            key = (interp, "exec", "kernel:shebang", "ok" if os.path.exists(interp) else "ENOENT", tgid)
            events[key] = events.get(key, 0) + 1
            path = interp


def result_to_plain(res: TraceResult) -> dict:
    """Builtins only, so the recorder can `marshal` it without importing this module."""
    return {
        "root_pid": res.root_pid, "exit_code": res.exit_code, "exit_signal": res.exit_signal,
        "events": res.events, "created": set(res.created), "removed": set(res.removed),
        "processes": [(p.pid, p.ppid, p.argv, p.exe, p.exit_code, p.exit_signal)
                      for p in res.processes.values()],
        "mode": res.mode, "stops": res.stops, "interrupted_by": res.interrupted_by,
    }


def _seccomp_available() -> bool:
    """Seccomp filters exist on this kernel (prctl(PR_GET_SECCOMP) answers)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(21, 0, 0, 0, 0) >= 0   # PR_GET_SECCOMP


def become_tracer_process() -> None:
    """Settings for the forked tracer process: die with the recorder, adopt orphans."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # Daemonizing double forks reparent to us, so psutil sees the whole tree under one pid.
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
