"""Run a command in a staged rootfs without Docker: the jail behind `tracejail verify --rootfs`.

Process layout (each arrow is a fork)::

    launcher "outer"  host PID namespace; dies with whoever started it (PDEATHSIG); stdin /dev/null
      └── init        PID 1 of a new PID namespace, in a new mount namespace: mounts, chroot, reaps
            └── target  chdir, drop to UID:GID, exec the command         (PID 2 in the namespace)

Mounts, all in the private mount namespace (the host never sees them)::

    WORKDIR                tmpfs (the only host path involved: an empty directory we create)
    WORKDIR/lower          bind of the staged tree
    WORKDIR/root           overlay: lower read-only, upper on the tmpfs -> the jail's "/"
    /proc /dev /tmp        proc; tmpfs with null zero full random urandom tty, shm, fd -> /proc/self/fd;
                           tmpfs 1777 (mounted after chroot, so symlinks in the tree resolve inside it)

The overlay gives the jail what Docker gives a container: a writable layer over the image. The
staged tree is never written to, and Docker's own mount points (/etc/hosts, /etc/hostname,
/etc/resolv.conf, the working directory) can be provided as Docker does. Without overlayfs the tree
is bind-mounted as it is and only missing mount points are created in it (noted on stderr).

Lifetime: when the target exits, init exits with its status; the kernel then kills whatever is left
in the PID namespace and the mount namespace goes away with its last process. Whoever stops the
jail signals the whole tree (as `record` does for a traced tree) and SIGKILLs the outer launcher
last; init follows it through PDEATHSIG. So that the target gets each stop signal exactly once, the
launchers pass a stop signal on only when it came before their child existed (`_StopLatch`);
otherwise the sender reached the child itself.

Exit status of the launcher: the target's (128+N when killed by signal N); 127/126 when the command
cannot be executed; 125 with a "tracejail-jail:" line on stderr when the jail cannot be set up.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:   # the launcher imports this module: keep its start-up to the standard library
    from tracejail.record import OutputTee

SETUP_FAILED = 125
MARKER = "tracejail-jail:"

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG = 1

# What `docker run` puts in the environment when the image has no PATH.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# (name, major, minor): the character devices Docker gives every container.
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9),
           ("tty", 5, 0))
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
             ("stderr", "/proc/self/fd/2"))
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


@dataclass(frozen=True)
class JailSpec:
    """Everything the launcher needs; passed to it as one JSON argument."""

    rootfs: str                  # the staged tree (host path); never written to with overlayfs
    workdir: str                 # an empty host directory for the jail's own mounts
    argv: list[str]              # argv[0] is the program as the image names it (found in the jail)
    env: dict[str, str]
    cwd: str                     # inside the jail; created (as Docker does) when missing
    uid: int
    gid: int
    overlay: bool = True         # False: bind the tree itself (tests the fallback)

    @property
    def root(self) -> str:
        """Host path of the jail's "/" as the host's /proc shows it (/proc/PID/cwd, exe, fd/N)."""
        return os.path.join(self.workdir, "root")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JailSpec:
        return cls(**json.loads(text))


def strip_root(path: str, root: str) -> str:
    """A host-view path of a jailed task (e.g. a relative path resolved via /proc/TID/cwd) as the
    task saw it; absolute paths the task spelled itself are already jail paths and stay as they are."""
    if path == root:
        return "/"
    if path.startswith(root + "/"):
        return path[len(root):]
    return path


# -- host side ---------------------------------------------------------------------------------

def launcher_argv(spec: JailSpec) -> list[str]:
    """The command that runs `spec` in a jail. `-I` keeps the user's site and PYTHON* variables out
    of the launcher; the package directory is put on sys.path explicitly instead."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    boot = f"import sys; sys.path.insert(0, {pkg_parent!r}); from tracejail.jail import main; main(sys.argv[1:])"
    return [sys.executable, "-I", "-c", boot, spec.to_json()]


def launcher_env() -> dict[str, str]:
    # The launcher needs nothing from our environment; the target gets spec.env.
    return {"PATH": os.environ.get("PATH", DEFAULT_PATH), "LANG": "C.UTF-8"}


def check_available() -> str | None:
    """None when this process can build jails here, else why not (for an error or a test skip)."""
    if os.geteuid() != 0:
        return "the rootfs jail needs root (it mounts /proc, /dev and /tmp in new namespaces and chroots)"
    if not hasattr(os, "fork"):
        return "no fork() on this platform"
    pid = os.fork()
    if pid == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.unshare(CLONE_NEWNS | CLONE_NEWPID) == 0 and \
            libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return None
    return "new mount and PID namespaces are not permitted here (unshare --mount --pid fails)"


def make_workdir() -> str:
    return tempfile.mkdtemp(prefix="tj-jail-")


def remove_workdir(path: str) -> None:
    """The jail's mounts lived in its own namespace: on the host the directory is empty."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        import shutil   # only in the fallback mode can anything be left (nothing today)

        shutil.rmtree(path, ignore_errors=True)


def _tree(pid: int) -> list:
    import psutil

    try:
        top = psutil.Process(pid)
        return [top, *top.children(recursive=True)]
    except psutil.Error:
        return []


@dataclass
class JailProcess:
    """An untraced jailed command: start, watch its ports, stop it, read its output. It owns
    spec.workdir: stop() (or a failed start()) removes it."""

    spec: JailSpec
    output_limit: int = 1 << 20
    proc: subprocess.Popen | None = None
    readers: list[OutputTee] = field(default_factory=list)

    def start(self) -> None:
        from tracejail.record import spawn_captured

        try:
            # Own session: a Ctrl-C meant for verify does not reach the jail; verify stops it.
            self.proc, self.readers = spawn_captured(launcher_argv(self.spec), launcher_env(),
                                                     self.output_limit)
        except BaseException:
            remove_workdir(self.spec.workdir)
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float | None) -> int | None:
        """The launcher's status (the target's), or None on timeout."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return code if code >= 0 else 128 - code

    def listening_ports(self) -> set[int]:
        from tracejail.record import listening_ports

        return listening_ports(self.pid) if self.running() else set()

    def stop(self, stop_timeout: float) -> None:
        """SIGTERM the whole tree, then SIGKILL the outer launcher: init dies with it (PDEATHSIG)
        and takes the PID namespace along."""
        proc = self.proc
        try:
            if proc is not None and proc.poll() is None:
                for p in _tree(proc.pid):
                    try:
                        p.send_signal(signal.SIGTERM)
                    except Exception:   # psutil.Error: gone already
                        pass
                if self.wait(stop_timeout) is None:
                    proc.kill()
                    proc.wait()
            for r in self.readers:
                r.join(timeout=5)
        finally:
            remove_workdir(self.spec.workdir)

    def output(self) -> tuple[str, str, bool]:
        out, err = self.readers
        return out.text(), err.text(), out.truncated


def setup_error(status: int | None, stderr: str) -> str | None:
    """The launcher's own failure message, if the status and stderr say the jail never started."""
    if status != SETUP_FAILED:
        return None
    for line in stderr.splitlines():
        if line.startswith(MARKER):
            return line[len(MARKER):].strip()
    return None


# -- the launcher (runs as `python -I -c ... SPEC`) -----------------------------------------------

def _die(message: str, code: int = SETUP_FAILED) -> NoReturn:
    try:
        os.write(2, f"{MARKER} {message}\n".encode("utf-8", "replace"))
    finally:
        os._exit(code)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(libc: ctypes.CDLL, source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} on {target}: {os.strerror(err)}")


class _StopLatch:
    """A launcher's stop-signal handling: a SIGTERM/SIGINT/SIGHUP/SIGQUIT that arrives before the
    child exists is kept and sent to it right after fork (the child starts with the signals blocked
    and unblocks them only once their default actions are back); one that arrives later is dropped,
    because whoever stops a jail signals every process in it, the child included."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.child: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def _handler(self, signum: int, _frame: object) -> None:
        if self.child is None and self.pending is None:
            self.pending = signum

    def fork(self) -> int:
        """fork(); the child returns 0 with the stop signals blocked."""
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:
            return 0
        self.child = pid
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)   # runs the handler for any held
        if self.pending is not None:
            os.kill(pid, self.pending)
        return pid


def _status_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def main(argv: list[str]) -> NoReturn:
    """The outer launcher: namespaces, then init in them; exits with the target's status."""
    try:
        spec = JailSpec.from_json(argv[0])
    except (IndexError, ValueError, TypeError) as exc:
        _die(f"bad jail spec: {exc}")
    latch = _StopLatch()
    libc = _libc()
    parent = os.getppid()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:   # our starter died before PDEATHSIG was armed
        os._exit(SETUP_FAILED)
    null = os.open("/dev/null", os.O_RDONLY)   # `docker run` without -i: stdin is /dev/null
    os.dup2(null, 0)
    os.close(null)
    if libc.unshare(CLONE_NEWNS | CLONE_NEWPID) != 0:
        _die(f"unshare(mount, pid): {os.strerror(ctypes.get_errno())}")
    pid = latch.fork()
    if pid == 0:
        try:
            _init(spec, libc)
        except OSError as exc:
            _die(f"{exc.strerror or exc}")
        except BaseException as exc:   # never fall back into the launcher's code
            _die(f"{type(exc).__name__}: {exc}")
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            os._exit(_status_code(status))
        except InterruptedError:
            continue


def _init(spec: JailSpec, libc: ctypes.CDLL) -> NoReturn:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    latch = _StopLatch()   # PID 1 gets signals from outside only for signals it handles: it does
    notes = _setup_root(spec, libc)
    home = _home_of(spec.uid)
    for note in notes:
        os.write(2, f"{MARKER} note: {note}\n".encode())
    env = dict(spec.env)
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", home)   # as Docker does: from the image's /etc/passwd, else "/"
    target = latch.fork()
    if target == 0:
        _exec_target(spec, env)
    while True:   # PID 1 reaps every orphan; the target's end is the jail's end
        try:
            pid, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            os._exit(SETUP_FAILED)
        if pid == target:
            os._exit(_status_code(status))


def _setup_root(spec: JailSpec, libc: ctypes.CDLL) -> list[str]:
    """Mount the jail and chroot into it (this process: init). Returns notes for stderr."""
    notes: list[str] = []
    work = spec.workdir
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)   # nothing we mount propagates to the host
    _mount(libc, "tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700")
    lower, root = os.path.join(work, "lower"), spec.root
    for d in (lower, root):
        os.mkdir(d, 0o755)
    overlay = spec.overlay
    if overlay:
        # Through a bind at a path we chose, so no character of the user's path reaches the
        # overlay option string (",", ":" and "\" are special there).
        _mount(libc, spec.rootfs, lower, None, MS_BIND | MS_REC)
        for d in ("upper", "ovlwork"):
            os.mkdir(os.path.join(work, d), 0o755)
        try:
            _mount(libc, "overlay", root, "overlay", 0,
                   f"lowerdir={lower},upperdir={work}/upper,workdir={work}/ovlwork")
        except OSError as exc:
            notes.append(f"overlayfs unavailable ({exc.strerror}); the tree is used as it is")
            overlay = False
    if not overlay:
        _mount(libc, spec.rootfs, root, None, MS_BIND | MS_REC)
    resolv_conf = _host_resolv_conf()
    os.chroot(root)
    os.chdir("/")
    # From here on every path is inside the jail: a symlink in the tree cannot point a mount or
    # a write at the host.
    for d, mode in (("/proc", 0o555), ("/dev", 0o755), ("/tmp", 0o1777)):
        if not os.path.isdir(d):
            os.mkdir(d, mode)
            if not overlay:
                notes.append(f"created mount point {d} in {spec.rootfs}")
    _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount(libc, "tmpfs", "/dev", "tmpfs", MS_NOSUID, "mode=0755")
    for name, major, minor in DEVICES:
        os.mknod(f"/dev/{name}", 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(f"/dev/{name}", 0o666)   # the umask applies to mknod
    for name, target in DEV_LINKS:
        os.symlink(target, f"/dev/{name}")
    os.mkdir("/dev/shm")
    _mount(libc, "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    if os.listdir("/tmp"):
        # The image keeps files under /tmp (an app that lives there): a tmpfs would hide them,
        # and Docker does not mount one either. The overlay already makes /tmp writable.
        if not overlay:
            notes.append(f"{spec.rootfs}/tmp holds files: no tmpfs mounted over it")
    else:
        _mount(libc, "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    if overlay:
        _docker_files(resolv_conf)
        os.makedirs(spec.cwd, 0o755, exist_ok=True)   # Docker creates a missing WORKDIR too
    elif not os.path.isdir(spec.cwd):
        raise OSError(errno.ENOENT, f"working directory {spec.cwd} is not in {spec.rootfs}")
    return notes


def _host_resolv_conf() -> bytes:
    try:
        with open("/etc/resolv.conf", "rb") as f:
            return f.read(65536)
    except OSError:
        return b""


def _docker_files(resolv_conf: bytes) -> None:
    """/etc/hosts, /etc/hostname and /etc/resolv.conf, which Docker mounts into every container
    (the jail shares the host's network, as `docker run --network host` does). Written to the
    overlay's upper layer only."""
    files = {"/etc/hosts": b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
             "/etc/hostname": b"tracejail\n", "/etc/resolv.conf": resolv_conf}
    os.makedirs("/etc", 0o755, exist_ok=True)
    for path, data in files.items():
        if os.path.islink(path):
            os.unlink(path)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o644)


def _home_of(uid: int) -> str:
    try:
        with open("/etc/passwd", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 6 and fields[2] == str(uid):
                    return fields[5] or "/"
    except OSError:
        pass
    return "/"


def _exec_target(spec: JailSpec, env: dict[str, str]) -> NoReturn:
    try:
        for sig in STOP_SIGNALS:   # the program starts with default actions and nothing blocked;
            signal.signal(sig, signal.SIG_DFL)   # a stop request held for it takes effect here
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.chdir(spec.cwd)
        os.setgroups([])
        os.setgid(spec.gid)
        os.setuid(spec.uid)
    except OSError as exc:
        _die(f"cannot enter {spec.cwd} as {spec.uid}:{spec.gid}: {exc.strerror}")
    try:
        os.execvpe(spec.argv[0], spec.argv, env)
    except OSError as exc:
        # Like a shell (and Docker): 127 when the program is not there, 126 when it cannot run.
        os.write(2, f"{MARKER} cannot execute {spec.argv[0]}: {exc.strerror}\n".encode())
        os._exit(127 if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126)
    _die("exec returned")
