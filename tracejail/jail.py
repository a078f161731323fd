"""Run a command in a staged rootfs without Docker: the sandbox behind `tracejail verify`.

The tree and the program in it are untrusted (a trace or an image may come from anyone), so the
jail is a sandbox in the manner of bubblewrap, not only a chroot:

* namespaces: user, mount, PID, IPC, UTS and network (loopback only). In the user namespace the
  jail's root is an unprivileged host uid (NAMESPACED_ROOT, or the invoking user's own uid when
  tracejail is not run as root) and the image user another; host root is not mapped at all, so
  nothing in the jail has any power over the host, `--user root` included;
* PR_SET_NO_NEW_PRIVS, an empty capability bounding set for a non-root user, every mount nosuid
  and nodev (but the six device nodes bound from the host's /dev), /proc mounted read-only,
  rlimits on processes, open files, memory and core dumps.

Without user namespaces (a kernel or container that refuses them) the jail runs only with an
explicit `userns=False` (`--no-user-namespace`), as root: the same mounts, but the jail's root
is the host's root in a chroot.

Process layout (each arrow is a fork)::

    launcher "outer"  host namespaces; writes the child's uid/gid maps; dies with whoever started it
      └── holder      unshares every namespace; dies with the launcher (PDEATHSIG)
            └── init  PID 1 of the new PID namespace: mounts, chroot, reaps
                  └── target  chdir, drop to UID:GID, no new privileges, exec   (PID 2)

Mounts, all in the private mount namespace (the host never sees them)::

    WORKDIR                tmpfs (the only host path involved: an empty directory we create)
    WORKDIR/lower          bind of the staged tree, read-only, nosuid, nodev
    WORKDIR/root           overlay: lower read-only, upper on the tmpfs -> the jail's "/"
    /proc /dev /tmp        proc (read-only); tmpfs with null zero full random urandom tty bound
                           from the host, shm, fd -> /proc/self/fd; tmpfs 1777

The overlay gives the jail what Docker gives a container: a writable layer over the image. The
staged tree is never written to, and Docker's own files (/etc/hosts, /etc/hostname,
/etc/resolv.conf) are put in the upper layer before it is mounted. Without overlayfs the tree is
bind-mounted read-only as it is.

Exercises reach a server in the jail by running in its network namespace (`netns_entry`): the
jail's ports never touch the host's.

Lifetime: when the target exits, init exits with its status; the kernel then kills whatever is left
in the PID namespace and the other namespaces go with their last process. Whoever stops the jail
signals the whole tree (as `record` does for a traced tree) and SIGKILLs the outer launcher last;
the others follow through PDEATHSIG. So that the target gets each stop signal exactly once, the
launchers pass a stop signal on only when it came before their child existed (`_StopLatch`);
otherwise the sender reached the child itself.

Exit status of the launcher: the target's (128+N when killed by signal N); 127/126 when the command
cannot be executed; 125 with a "tracejail-jail:" line on stderr when the jail cannot be set up.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import resource   # (imported before the chroot: the jail has no Python library)
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, NoReturn

if TYPE_CHECKING:   # the launcher imports this module: keep its start-up to the standard library
    from tracejail.record import OutputTee

SETUP_FAILED = 125
MARKER = "tracejail-jail:"

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# The host uid (and gid) that the jail's root is, when tracejail runs as root: unprivileged, and
# owning nothing on the host. (Not run as root, the jail's user is the invoking user's own uid.)
NAMESPACED_ROOT = 2_147_000_000

# rlimits of everything in the jail: (resource name, limit); memory is twice the machine's RAM
# in address space (a JVM reserves much more than it touches), processes per user, open files.
RLIMIT_PROCESSES = 4096
RLIMIT_FILES = 65536

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
    userns: bool = True          # False: no user namespace (root only; --no-user-namespace)
    read_only: bool = False      # the root read-only (tmpfs /tmp and the volumes stay writable)
    volumes: list[str] = field(default_factory=list)   # directories writable on their own (VOLUME)

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


def check_available(userns: bool = True) -> str | None:
    """None when this process can build jails here, else why not (for an error or a test skip)."""
    if not hasattr(os, "fork"):
        return "no fork() on this platform"
    if not userns and os.geteuid() != 0:
        return "a jail without a user namespace needs root"
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | (CLONE_NEWUSER if userns else 0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.unshare(flags) == 0
        os.write(w, b"0" if ok else str(ctypes.get_errno()).encode())
        os._exit(0)
    os.close(w)
    answer = os.read(r, 16).decode() or "?"
    os.close(r)
    os.waitpid(pid, 0)
    if answer == "0":
        return None
    why = os.strerror(int(answer)) if answer.isdigit() else "unknown"
    if userns:
        return (f"this kernel refuses user namespaces to this process ({why}; see "
                "/proc/sys/user/max_user_namespaces and kernel.unprivileged_userns_clone)")
    return f"new mount, PID and network namespaces are not permitted here ({why})"


def make_workdir() -> str:
    """An empty directory for the jail's mounts. 0711: the jail's own (unprivileged) ids must
    pass through it to mount in it; nobody may list it."""
    path = tempfile.mkdtemp(prefix="tj-jail-")
    os.chmod(path, 0o711)
    return path


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


# Whether the launcher runs as root on the host. Set in main() before any fork: the holder and init
# are forked from it and inherit it (inside the user namespace, geteuid() no longer says).
_AS_ROOT = False


def _id_maps(spec: JailSpec) -> tuple[str, str, bool]:
    """(uid_map, gid_map, setgroups allowed) for the jail's user namespace.

    As root: the jail's root is NAMESPACED_ROOT and the image user keeps its number (a host uid
    that owns what build chowned to it); host root is not in the maps. Otherwise the only id
    there is to give is our own: it becomes the jail's user (and setgroups must be denied)."""
    if _AS_ROOT:
        uids = [f"0 {NAMESPACED_ROOT} 1"] + ([f"{spec.uid} {spec.uid} 1"] if spec.uid != 0 else [])
        gids = [f"0 {NAMESPACED_ROOT} 1"] + ([f"{spec.gid} {spec.gid} 1"] if spec.gid != 0 else [])
        return "\n".join(uids) + "\n", "\n".join(gids) + "\n", True
    return f"{spec.uid} {os.geteuid()} 1\n", f"{spec.gid} {os.getegid()} 1\n", False


def _write_maps(pid: int, spec: JailSpec) -> None:
    uid_map, gid_map, setgroups = _id_maps(spec)
    with open(f"/proc/{pid}/setgroups", "w") as f:
        f.write("allow\n" if setgroups else "deny\n")
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(uid_map)
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(gid_map)


def main(argv: list[str]) -> NoReturn:
    """The outer launcher: starts the holder in new namespaces (writing its id maps), then
    exits with the target's status."""
    global _AS_ROOT
    try:
        spec = JailSpec.from_json(argv[0])
    except (IndexError, ValueError, TypeError) as exc:
        _die(f"bad jail spec: {exc}")
    _AS_ROOT = os.geteuid() == 0
    latch = _StopLatch()
    libc = _libc()
    parent = os.getppid()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:   # our starter died before PDEATHSIG was armed
        os._exit(SETUP_FAILED)
    null = os.open("/dev/null", os.O_RDONLY)   # `docker run` without -i: stdin is /dev/null
    os.dup2(null, 0)
    os.close(null)
    for d in ("lower", "root", "rw"):
        os.mkdir(os.path.join(spec.workdir, d), 0o755)
    unshared_r, unshared_w = os.pipe()
    mapped_r, mapped_w = os.pipe()
    pid = latch.fork()
    if pid == 0:
        os.close(unshared_r)
        os.close(mapped_w)
        _holder(spec, libc, unshared_w, mapped_r)
    os.close(unshared_w)
    os.close(mapped_r)
    news = os.read(unshared_r, 256)
    if news == b"ok" and spec.userns:
        try:
            _write_maps(pid, spec)
        except OSError as exc:
            os.kill(pid, signal.SIGKILL)
            _die(f"cannot map the jail's users: {exc.strerror}")
    os.write(mapped_w, b"go")
    _exit_with(pid)


def _exit_with(pid: int) -> NoReturn:
    """Wait for the child `pid` and exit with its status (128+N for signal N)."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            os._exit(_status_code(status))
        except InterruptedError:
            continue


def _holder(spec: JailSpec, libc: ctypes.CDLL, unshared_w: int, mapped_r: int) -> NoReturn:
    """Unshare every namespace, wait for the id maps, start init (PID 1) and wait for it."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    latch = _StopLatch()
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if spec.userns:
        flags |= CLONE_NEWUSER
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        os.write(unshared_w, b"failed")
        what = "user, mount, PID, network" if spec.userns else "mount, PID, network"
        _die(f"unshare({what}): {os.strerror(err)}")
    os.write(unshared_w, b"ok")
    os.close(unshared_w)
    if os.read(mapped_r, 16) != b"go":
        _die("the launcher could not map the jail's users")
    os.close(mapped_r)
    # A pipe that stays open while the holder lives: init checks it after its credentials change
    # (which clears PDEATHSIG) and after re-arming PDEATHSIG, so it never outlives the holder.
    alive_r, alive_w = os.pipe()
    pid = latch.fork()
    if pid == 0:
        os.close(alive_w)
        try:
            _init(spec, libc, alive_r)
        except OSError as exc:
            _die(f"{exc.strerror or exc}")
        except BaseException as exc:   # never fall back into the holder's code
            _die(f"{type(exc).__name__}: {exc}")
    os.close(alive_r)
    _exit_with(pid)


def _init(spec: JailSpec, libc: ctypes.CDLL, alive_r: int) -> NoReturn:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    latch = _StopLatch()   # PID 1 gets signals from outside only for signals it handles: it does
    notes = _setup_root(spec, libc)
    # Becoming the jail's ids cleared PDEATHSIG: arm it again, then make sure the holder did not
    # die in between (its end of the pipe would be closed: poll says readable, EOF).
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if select.select([alive_r], [], [], 0)[0]:
        os._exit(SETUP_FAILED)
    os.close(alive_r)
    home = _home_of(spec.uid)
    for note in notes:
        os.write(2, f"{MARKER} note: {note}\n".encode())
    env = dict(spec.env)
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", home)   # as Docker does: from the image's /etc/passwd, else "/"
    _limits()
    target = latch.fork()
    if target == 0:
        _exec_target(spec, env, libc)
    while True:   # PID 1 reaps every orphan; the target's end is the jail's end
        try:
            pid, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            os._exit(SETUP_FAILED)
        if pid == target:
            os._exit(_status_code(status))


def _limits() -> None:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for res, want in ((resource.RLIMIT_NPROC, RLIMIT_PROCESSES), (resource.RLIMIT_NOFILE, RLIMIT_FILES),
                      (resource.RLIMIT_AS, 2 * ram), (resource.RLIMIT_CORE, 0)):
        soft, hard = resource.getrlimit(res)
        limit = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(res, (limit, limit))


def _setup_root(spec: JailSpec, libc: ctypes.CDLL) -> list[str]:
    """Mount the jail and chroot into it (this process: init). Returns notes for stderr."""
    notes: list[str] = []
    # Everything below happens in the workdir, by relative paths: once we are the jail's own
    # ids (in a user namespace), the directories on the way to it (a 0700 temp dir, /root) may
    # be closed to us, and the tree itself is reached through the bind made before that.
    os.chdir(spec.workdir)
    lower, root = "lower", "root"
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)   # nothing we mount propagates to the host
    if not spec.overlay:
        # No writable layer to add mount points in: they are made in the tree itself, now,
        # while we may still write there.
        for d, mode in (("proc", 0o555), ("dev", 0o755), ("tmp", 0o1777)):
            path = os.path.join(spec.rootfs, d)
            if not os.path.lexists(path):
                os.mkdir(path, mode)
                os.chmod(path, mode)
                notes.append(f"created mount point /{d} in {spec.rootfs}")
    _mount(libc, spec.rootfs, lower, None, MS_BIND | MS_REC)
    _mount(libc, None, lower, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    if spec.userns:
        _become_setup_user(spec)
    # The writable layer lives on a tmpfs of its own beside the lower bind.
    _mount(libc, "tmpfs", "rw", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    upper, ovlwork = "rw/upper", "rw/work"
    os.mkdir(upper, 0o755)
    os.mkdir(ovlwork, 0o755)
    resolv_conf = _host_resolv_conf()
    overlay = spec.overlay
    if overlay:
        _prepare_upper(lower, upper, spec, resolv_conf)
        try:
            _mount_overlay(libc, root, lower, upper, ovlwork, spec.userns)
        except OSError as exc:
            notes.append(f"overlayfs unavailable ({exc.strerror}); the tree is used as it is, read-only")
            overlay = False
    if not overlay:
        _mount(libc, lower, root, None, MS_BIND | MS_REC)
        _mount(libc, None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for d in ("proc", "dev", "tmp"):
        st = os.lstat(os.path.join(root, d)) if os.path.lexists(os.path.join(root, d)) else None
        if st is None or not stat.S_ISDIR(st.st_mode):
            what = "is not a directory" if st is not None else "is missing (and there is no overlay to add it)"
            raise OSError(errno.ENOTDIR, f"the tree's /{d} {what}; the jail mounts its own there")
    _mount_dev(libc, os.path.join(root, "dev"))
    for n, vol in enumerate(spec.volumes):
        _mount_volume(libc, root, lower, vol, f"rw/vol{n}", spec.uid, spec.gid, spec.userns)
    # /proc before the pivot: in a user namespace the kernel mounts a new proc only while a
    # full one is still visible (and this process, PID 1 of the new namespace, is the one whose
    # processes it shows).
    proc = os.path.join(root, "proc")
    if os.path.islink(proc):
        raise OSError(errno.ELOOP, "the tree's /proc is a symlink")
    try:
        _mount(libc, "proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    except OSError:
        _mount(libc, "proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        notes.append("/proc could not be mounted read-only here; it is writable in the jail")
    _enter_root(libc, root)
    # From here on every path is inside the jail, and the host's tree is gone from this mount
    # namespace: no symlink, chroot trick or mount can reach it.
    if os.listdir("/tmp"):
        # The image keeps files under /tmp (an app that lives there): a tmpfs would hide them,
        # and Docker does not mount one either. The overlay already makes /tmp writable.
        if not overlay:
            notes.append(f"{spec.rootfs}/tmp holds files: no tmpfs mounted over it")
    else:
        _mount(libc, "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    if spec.read_only:   # as `docker run --read-only --tmpfs /tmp`: only /tmp and the volumes are writable
        _mount(libc, None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _loopback_up()
    host = b"tracejail"
    libc.sethostname(host, len(host))
    if not os.path.isdir(spec.cwd):
        raise OSError(errno.ENOENT, f"working directory {spec.cwd} is not in {spec.rootfs}")
    return notes


_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "i686": 217, "armv7l": 218}
MNT_DETACH = 2


def _enter_root(libc: ctypes.CDLL, root: str) -> None:
    """Make `root` the mount namespace's root and detach the old one (pivot_root, as runc and
    bubblewrap do). A chroot alone can be left again by anyone allowed to chroot, namespaced
    root included, and would leave the host's tree reachable."""
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(errno.ENOSYS, f"no pivot_root number known for {os.uname().machine}")
    os.chdir(root)
    if libc.syscall(ctypes.c_long(number), b".", b".") != 0:
        raise OSError(ctypes.get_errno(), "pivot_root")
    if libc.umount2(b".", MNT_DETACH) != 0:   # the old root, now stacked on "/"
        raise OSError(ctypes.get_errno(), "umount2(old root)")
    os.chdir("/")


def _become_setup_user(spec: JailSpec) -> None:
    """In the user namespace: be the id that sets the jail up (its root when the launcher is
    root; else the only id mapped, the jail's user, which holds every capability of the
    namespace until it execs)."""
    uid, gid = (0, 0) if _AS_ROOT else (spec.uid, spec.gid)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _prepare_upper(lower: str, upper: str, spec: JailSpec, resolv_conf: bytes) -> None:
    """Before the overlay is mounted, in the writable layer: every directory of the tree, the
    mount points it lacks, the working directory (Docker creates a missing WORKDIR too) and
    Docker's own files.

    The directories come first because of ownership in a user namespace: the tree's files belong
    to host ids that are not mapped in the jail (host root above all), and overlayfs cannot copy
    such a directory up when something is written below it. A directory made here belongs to the
    jail's root (or, for one the tree gives the image user, to that user), so writes work where
    the tree's modes allow them, as in a container."""
    _mirror_directories(lower, upper, spec.uid, spec.gid)
    for d, mode in (("proc", 0o555), ("dev", 0o755), ("tmp", 0o1777)):
        if not os.path.lexists(os.path.join(lower, d)):
            os.mkdir(os.path.join(upper, d), mode)
            os.chmod(os.path.join(upper, d), mode)
    parts = [p for p in spec.cwd.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise OSError(errno.EINVAL, f"working directory {spec.cwd!r} is not a normal path")
    for n in range(1, len(parts) + 1):
        if not os.path.lexists(os.path.join(lower, *parts[:n])):
            os.makedirs(os.path.join(upper, *parts), 0o755, exist_ok=True)
            break
    etc = os.path.join(lower, "etc")
    if os.path.islink(etc) or (os.path.lexists(etc) and not os.path.isdir(etc)):
        return   # an /etc that is not a directory: leave the image's arrangement alone
    os.makedirs(os.path.join(upper, "etc"), 0o755, exist_ok=True)
    files = {"hosts": b"127.0.0.1\tlocalhost tracejail\n::1\tlocalhost ip6-localhost ip6-loopback\n",
             "hostname": b"tracejail\n", "resolv.conf": resolv_conf}
    for name, data in files.items():
        path = os.path.join(upper, "etc", name)
        if os.path.lexists(path):
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o644)


def _mirror_directories(lower: str, upper: str, uid: int, gid: int) -> None:
    """Every directory of `lower` (that we may read) as a directory of `upper`, same mode; owned
    by the image user where lower's is (`uid`/`gid`, as ids seen in the jail), by us elsewhere."""
    for dirpath, dirnames, _files in os.walk(lower, onerror=lambda _e: None):
        rel = os.path.relpath(dirpath, lower)
        for name in dirnames:
            src = os.path.join(dirpath, name)
            try:
                st = os.lstat(src)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue   # os.walk lists a symlink to a directory among the directories
            dst = os.path.join(upper, rel, name) if rel != "." else os.path.join(upper, name)
            os.mkdir(dst, 0o700)
            if st.st_uid == uid or st.st_gid == gid:
                os.chown(dst, uid if st.st_uid == uid else -1, gid if st.st_gid == gid else -1)
            os.chmod(dst, stat.S_IMODE(st.st_mode))


def _mount_overlay(libc: ctypes.CDLL, target: str, lower: str, upper: str, work: str, userns: bool) -> None:
    """An overlay of `upper` on `lower` at `target`. In a user namespace overlayfs may not set its
    trusted.* xattrs, and without them it cannot make an opaque directory: a directory removed
    and made again (`rm -rf site; mkdir site`) fails with EIO. `userxattr` (Linux 5.11) keeps
    them as user.overlay.* instead; an older kernel mounts without it."""
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if userns:
        try:
            _mount(libc, "overlay", target, "overlay", MS_NOSUID | MS_NODEV, options + ",userxattr")
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    _mount(libc, "overlay", target, "overlay", MS_NOSUID | MS_NODEV, options)


def _mount_volume(libc: ctypes.CDLL, root: str, lower: str, vol: str, scratch: str, uid: int, gid: int,
                  userns: bool) -> None:
    """A volume: its directory writable on its own (an overlay of the tree's content), as
    Docker's anonymous volume starts with the image's content."""
    parts = [p for p in vol.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise OSError(errno.EINVAL, f"volume {vol!r} is not a normal absolute path")
    for n in range(1, len(parts) + 1):   # never mount through a symlink of the tree
        if os.path.islink(os.path.join(root, *parts[:n])):
            raise OSError(errno.ELOOP, f"volume {vol} goes through a symlink of the tree")
    target = os.path.join(root, *parts)
    os.makedirs(target, 0o755, exist_ok=True)
    os.makedirs(f"{scratch}/upper")
    os.makedirs(f"{scratch}/work")
    below = os.path.join(lower, *parts)
    if os.path.isdir(below) and not os.path.islink(below):
        # The volume's own top takes the tree's mode and, where the tree gives it to the image
        # user, that owner (see _mirror_directories).
        st = os.lstat(below)
        if st.st_uid == uid or st.st_gid == gid:
            os.chown(f"{scratch}/upper", uid if st.st_uid == uid else -1, gid if st.st_gid == gid else -1)
        os.chmod(f"{scratch}/upper", stat.S_IMODE(st.st_mode))
        _mount_overlay(libc, target, below, f"{scratch}/upper", f"{scratch}/work", userns)
    else:
        _mount(libc, f"{scratch}/upper", target, None, MS_BIND)


def _mount_dev(libc: ctypes.CDLL, dev: str) -> None:
    """A tmpfs /dev holding the host's six character devices Docker gives every container, bound
    one by one (a user namespace may not mknod), shm and the fd links."""
    _mount(libc, "tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755")
    for name, _major, _minor in DEVICES:
        node = os.path.join(dev, name)
        os.close(os.open(node, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        _mount(libc, f"/dev/{name}", node, None, MS_BIND)
        _mount(libc, None, node, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NOEXEC)
    for name, target in DEV_LINKS:
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "shm"))
    _mount(libc, "tmpfs", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")


def _loopback_up() -> None:
    """The jail's network namespace starts with `lo` down: bring it up (and nothing else)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, siocgifflags, struct.pack("16sH", b"lo", 0)))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH", b"lo", flags | iff_up))


def _host_resolv_conf() -> bytes:
    try:
        with open("/etc/resolv.conf", "rb") as f:
            return f.read(65536)
    except OSError:
        return b""


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


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_privileges(spec: JailSpec, libc: ctypes.CDLL) -> None:
    """Become the jail's user for good: no supplementary groups, and for any user but root an
    empty bounding set and no capabilities; then no new privileges (setuid bits and file
    capabilities mean nothing from here on)."""
    if spec.uid != 0:
        for cap in range(64):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
                break   # past the last capability this kernel knows
        libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    try:
        os.setgroups([])
    except OSError:
        pass   # a user namespace made without privileges denies setgroups: there are none to drop
    os.setresgid(spec.gid, spec.gid, spec.gid)
    os.setresuid(spec.uid, spec.uid, spec.uid)
    if spec.uid != 0:
        header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
        if libc.capset(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def _exec_target(spec: JailSpec, env: dict[str, str], libc: ctypes.CDLL) -> NoReturn:
    try:
        for sig in STOP_SIGNALS:   # the program starts with default actions and nothing blocked;
            signal.signal(sig, signal.SIG_DFL)   # a stop request held for it takes effect here
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.chdir(spec.cwd)
        _drop_privileges(spec, libc)
    except OSError as exc:
        _die(f"cannot enter {spec.cwd} as {spec.uid}:{spec.gid}: {exc.strerror or exc}")
    try:
        os.execvpe(spec.argv[0], spec.argv, env)
    except OSError as exc:
        # Like a shell (and Docker): 127 when the program is not there, 126 when it cannot run.
        os.write(2, f"{MARKER} cannot execute {spec.argv[0]}: {exc.strerror}\n".encode())
        os._exit(127 if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126)
    _die("exec returned")


# -- exercises in the jail's network ------------------------------------------------------------

def netns_pid(launcher_pid: int) -> int | None:
    """A process of the jail (started by `launcher_pid`) that is in the jail's own network
    namespace, or None when there is none yet."""
    import psutil

    try:
        mine = os.stat("/proc/self/ns/net").st_ino
        for p in psutil.Process(launcher_pid).children(recursive=True):
            try:
                if os.stat(f"/proc/{p.pid}/ns/net").st_ino != mine:
                    return p.pid
            except OSError:
                continue
    except psutil.Error:
        return None
    return None


def netns_listening(pid: int) -> set[int] | None:
    """TCP ports in LISTEN state in `pid`'s network namespace (a jail's or a bridged container's
    own; psutil reads only the caller's)."""
    ports: set[int] = set()
    found = False
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}", encoding="ascii", errors="replace") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == "0A":
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
            found = True
        except OSError:
            continue
    return ports if found else None


def netns_entry(pid: int) -> Callable[[], None]:
    """What a child calls before exec to run in `pid`'s network namespace: an exercise then
    reaches the jail's server on localhost, and the server never touches the host's ports. (Not
    as root, the user namespace is joined first: only there may the namespace be entered.)"""
    user_fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC) if os.geteuid() != 0 else -1
    net_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def enter() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if user_fd >= 0 and libc.setns(user_fd, CLONE_NEWUSER) != 0:
            raise OSError(ctypes.get_errno(), "cannot enter the jail's user namespace")
        if libc.setns(net_fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "cannot enter the jail's network namespace")

    enter.fds = (user_fd, net_fd)  # type: ignore[attr-defined]   # closed by close_entry
    return enter


def close_entry(enter: Callable[[], None]) -> None:
    for fd in getattr(enter, "fds", ()):
        if fd >= 0:
            os.close(fd)
