"""One resolver for every stage: paths inside a root directory, resolved as the kernel would.

A `Root` is bound to a directory: the host's `/` today, an unpacked image tomorrow. closure,
fileset, rootfs (planning and staging), provenance/explain and the jail all ask it what a path
reaches; nobody else walks symlinks by hand. It resolves component by component with the
kernel's rules inside a chroot: a symlink's absolute target restarts at the root, `..` is the
physical parent of the directory reached so far and never leaves the root, more than 40
symlinks is a loop, a trailing `/` or `.` needs a directory. It returns a typed `Resolution`:
the status, the canonical path reached, the components not walked, and every hop on the way
(each directory, and each symlink with its target), so callers judge a path by what it reaches,
never by its spelling.

The directories a container runtime provides (`RUNTIME_DIRS`) are never looked at: a walk that
reaches one stops with RUNTIME, whether it is spelled `/run/x`, `/var/run/x` or through a link.

Planning reads the tree through lstat/readlink (cached: one consistent view per Root). Reading
*content* is where a race would leak a file: `open_node` opens a canonical path with
`openat2(RESOLVE_NO_SYMLINKS)` (or an `O_NOFOLLOW` walk where the kernel lacks openat2), never
blocks on a FIFO, and checks device, inode and type against what the plan saw.
"""
from __future__ import annotations

import ctypes
import enum
import errno
import os
import stat
from dataclasses import dataclass
from typing import Iterator

from tracejail.errors import TracejailError

# What a container runtime mounts over the image: nothing below them is ever copied or read.
# /var/run is a link to /run on current systems; listed too for trees where it is a directory
# (Kubernetes mounts service-account tokens under /var/run/secrets).
RUNTIME_DIRS = ("/proc", "/sys", "/dev", "/run", "/var/run")

# Linux gives up after 40 symlinks while resolving one path (ELOOP).
MAX_SYMLINKS = 40


class Status(enum.Enum):
    OK = "ok"
    MISSING = "missing"
    NOT_A_DIRECTORY = "not-a-directory"   # a file, special file or dangling end where a directory must be
    LOOP = "loop"
    DENIED = "denied"                     # lstat or readlink failed for another reason (EACCES...)
    RUNTIME = "runtime-provided"
    SPECIAL = "special-file"              # the path reaches a FIFO, socket or device node


class NodeKind(enum.Enum):
    DIR = "dir"
    FILE = "file"
    SYMLINK = "symlink"
    SPECIAL = "special"


@dataclass(frozen=True)
class Identity:
    """Which node a path named when it was planned: a later open must find the same one."""

    dev: int
    ino: int
    fmt: int        # stat.S_IFMT bits
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)

    def mismatch(self, st: os.stat_result) -> str | None:
        """Why `st` is not this node (None when it is, unchanged)."""
        if (st.st_dev, st.st_ino) != (self.dev, self.ino):
            return "it was replaced by another file"
        if stat.S_IFMT(st.st_mode) != self.fmt:
            return "its type changed"
        if st.st_size != self.size or st.st_mtime_ns != self.mtime_ns:
            return "its content changed"
        return None


@dataclass(frozen=True)
class Hop:
    """One node met while resolving: a directory walked through, a symlink, or the final node."""

    path: str                 # canonical path inside the root
    kind: NodeKind
    target: str | None        # a symlink's target, as stored
    st: os.stat_result        # lstat of the node

    @property
    def identity(self) -> Identity:
        return Identity.of(self.st)


@dataclass(frozen=True)
class Resolution:
    """What a path reaches inside a root.

    `path` is the canonical path where the walk ended: the final node (OK, SPECIAL), the
    component that is missing, denied, not a directory or runtime-provided, or the symlink that
    made a loop. `rest` holds the spelled components not walked after it.
    """

    asked: str
    status: Status
    path: str
    rest: tuple[str, ...]
    hops: tuple[Hop, ...]
    node: Hop | None = None   # the final node (OK, SPECIAL); None for the root itself
    error: int | None = None  # errno of a DENIED lstat/readlink
    links: int = 0            # symlinks followed (the kernel allows MAX_SYMLINKS)

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def kind(self) -> NodeKind | None:
        """The final node's kind: DIR, FILE or SPECIAL (None when the path reaches nothing)."""
        if self.node is not None:
            return self.node.kind
        return NodeKind.DIR if self.status is Status.OK else None

    @property
    def symlinks(self) -> tuple[Hop, ...]:
        return tuple(h for h in self.hops if h.kind is NodeKind.SYMLINK)

    def spelled_tail(self) -> str:
        """`path` with the unwalked components after it (`..` applied by name, as
        os.path.realpath does): the loader's name for a file that is not there."""
        head, tail = self.path, []
        for c in self.rest:
            if c in ("", "."):
                continue
            if c != "..":
                tail.append(c)
            elif tail:
                tail.pop()
            else:
                head = parent_of(head)
        return join(head, "/".join(tail)) if tail else head


def join(parent: str, name: str) -> str:
    return "/" + name if parent == "/" else parent + "/" + name


def parent_of(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def under(path: str, top: str) -> bool:
    """`path` is `top` or below it (no trailing-slash games: both are absolute, normal paths)."""
    if top == "/":
        return path.startswith("/")
    return path == top or path.startswith(top + "/")


def is_runtime_path(path: str) -> bool:
    return any(under(path, d) for d in RUNTIME_DIRS)


# RUNTIME_DIRS as parent -> names, for the walk's one-step check of each candidate.
_RUNTIME_CHILDREN: dict[str, frozenset[str]] = {}
for _d in RUNTIME_DIRS:
    _RUNTIME_CHILDREN[parent_of(_d)] = _RUNTIME_CHILDREN.get(parent_of(_d), frozenset()) | {_d.rsplit("/", 1)[1]}


def _is_runtime_child(parent: str, name: str) -> bool:
    names = _RUNTIME_CHILDREN.get(parent)
    return names is not None and name in names


def is_canonical(path: str) -> bool:
    """Absolute and normal: no `.`, `..`, `//`, trailing `/` or NUL."""
    if not path.startswith("/") or "\0" in path:
        return False
    return path == "/" or all(p not in ("", ".", "..") for p in path[1:].split("/"))


def _kind_of(mode: int) -> NodeKind:
    if stat.S_ISDIR(mode):
        return NodeKind.DIR
    if stat.S_ISREG(mode):
        return NodeKind.FILE
    if stat.S_ISLNK(mode):
        return NodeKind.SYMLINK
    return NodeKind.SPECIAL


def describe_special(mode: int) -> str:
    if stat.S_ISSOCK(mode):
        return "a socket cannot be copied into an image"
    if stat.S_ISFIFO(mode):
        return "a FIFO cannot be copied into an image"
    return "a device node cannot be copied into an image"


class SourceChanged(TracejailError):
    """A planned file is no longer the node the plan judged (swapped, retyped or rewritten)."""


class Root:
    """A directory tree seen as `/`, resolved with the kernel's rules and one cached view."""

    def __init__(self, path: str = "/") -> None:
        real = os.path.realpath(path or "/")
        if not os.path.isdir(real):
            raise TracejailError(f"root {path} is not a directory")
        self.path = real                      # canonical host path of the root
        self.is_host = real == "/"
        self._lstat: dict[str, os.stat_result | OSError] = {}
        self._link: dict[str, str | OSError] = {}
        self._memo: dict[str, Resolution] = {}
        self._busy: set[str] = set()

    def __repr__(self) -> str:
        return f"Root({self.path!r})"

    # --- host paths and cached reads ---

    def host(self, path: str) -> str:
        """Host path of a canonical path inside the root (no resolution: see `resolve`)."""
        if self.is_host:
            return path
        return self.path if path == "/" else self.path + path

    def lstat(self, path: str) -> os.stat_result | OSError:
        hit = self._lstat.get(path)
        if hit is None:
            try:
                hit = os.lstat(self.host(path))
            except OSError as err:
                hit = err
            self._lstat[path] = hit
        return hit

    def _readlink(self, path: str) -> str | OSError:
        hit = self._link.get(path)
        if hit is None:
            try:
                hit = os.readlink(self.host(path))
            except OSError as err:
                hit = err
            self._link[path] = hit
        return hit

    # --- resolution ---

    def resolve(self, path: str) -> Resolution:
        """Resolve an absolute path (any spelling) inside the root."""
        hit = self._memo.get(path)
        if hit is not None:
            return hit
        if not path.startswith("/") or "\0" in path:
            raise TracejailError(f"path {path!r} is not absolute; pass absolute paths")
        # Reuse the parent spelling's result: most paths share long prefixes. (Bounded depth:
        # a hostile trace may hold a path of thousands of components.)
        head, _, name = path.rpartition("/")
        if name not in ("", ".", "..") and head and not head.endswith("/") and path.count("/") <= 64:
            base = self.resolve(head)
            if base.status is Status.OK and base.kind is NodeKind.DIR:
                result = self._step(path, base, name)
            elif base.status in (Status.OK, Status.SPECIAL):
                result = Resolution(path, Status.NOT_A_DIRECTORY, base.path, (name,), base.hops)
            else:
                result = Resolution(path, base.status, base.path, base.rest + (name,), base.hops,
                                    error=base.error, links=base.links)
        else:
            result = self._walk(path, "/", None, [], 0, path.split("/")[1:])
        self._memo[path] = result
        return result

    def _step(self, asked: str, base: Resolution, name: str) -> Resolution:
        """One plain name below the directory `base` reached: the common case, without a walk."""
        if _is_runtime_child(base.path, name):
            return self._walk(asked, base.path, base.node, list(base.hops), base.links, [name])
        cand = join(base.path, name)
        st = self.lstat(cand)
        if isinstance(st, OSError) or stat.S_ISLNK(st.st_mode):
            return self._walk(asked, base.path, base.node, list(base.hops), base.links, [name])
        hop = Hop(cand, _kind_of(st.st_mode), None, st)
        hops = base.hops if any(h.path == cand for h in base.hops) else base.hops + (hop,)
        status = Status.SPECIAL if hop.kind is NodeKind.SPECIAL else Status.OK
        return Resolution(asked, status, cand, (), hops, hop, links=base.links)

    def _walk(self, asked: str, cur: str, cur_node: Hop | None, hops: list[Hop], links: int,
              spelled: list[str]) -> Resolution:
        """The kernel's walk from the directory `cur` (its hop `cur_node`, None for the root);
        `spelled` are the components left."""
        todo = list(reversed(spelled))
        seen = {h.path: h for h in hops}
        trailing_dir = bool(spelled) and spelled[-1] in ("", ".")

        def end(status: Status, where: str, rest: tuple[str, ...], node: Hop | None = None,
                error: int | None = None) -> Resolution:
            return Resolution(asked, status, where, rest, tuple(hops), node, error, links)

        while todo:
            name = todo.pop()
            if name == "":
                if todo or not trailing_dir:
                    continue          # `//` inside a path
                name = "."            # a trailing slash: the node must be a directory
            if name == ".":
                continue              # cur is always a directory here
            if name == "..":
                cur = parent_of(cur)  # physical; the root's parent is the root
                cur_node = seen.get(cur) if cur != "/" else None
                if cur != "/" and cur_node is None:     # walked through before this walk began
                    st = self.lstat(cur)
                    if isinstance(st, OSError):
                        return end(Status.DENIED, cur, tuple(reversed(todo)), error=st.errno)
                    cur_node = Hop(cur, NodeKind.DIR, None, st)
                continue
            if _is_runtime_child(cur, name):
                return end(Status.RUNTIME, join(cur, name), tuple(reversed(todo)))
            cand = join(cur, name)
            st = self.lstat(cand)
            if isinstance(st, OSError):
                rest = tuple(reversed(todo))
                if st.errno == errno.ENOENT:
                    return end(Status.MISSING, cand, rest)
                if st.errno == errno.ENOTDIR:
                    return end(Status.NOT_A_DIRECTORY, cur, (name, *rest))
                if st.errno == errno.ENAMETOOLONG:
                    return end(Status.MISSING, cand, rest, error=st.errno)
                return end(Status.DENIED, cand, rest, error=st.errno)
            kind = _kind_of(st.st_mode)
            if kind is NodeKind.SYMLINK:
                target = self._readlink(cand)
                if isinstance(target, OSError):
                    return end(Status.DENIED, cand, tuple(reversed(todo)), error=target.errno)
                if cand not in seen:
                    seen[cand] = hop = Hop(cand, kind, target, st)
                    hops.append(hop)
                links += 1
                if links > MAX_SYMLINKS:
                    return end(Status.LOOP, cand, tuple(reversed(todo)))
                if target == "":
                    return end(Status.MISSING, cand, tuple(reversed(todo)))
                if target.startswith("/"):
                    cur = "/"
                todo.extend(reversed(target.split("/")))
                continue
            hop = seen.get(cand) or Hop(cand, kind, None, st)
            if cand not in seen:
                seen[cand] = hop
                hops.append(hop)
            if kind is NodeKind.DIR:
                cur, cur_node = cand, hop
                continue
            if trailing_dir or any(t not in ("", ".") for t in todo):
                return end(Status.NOT_A_DIRECTORY, cand, tuple(reversed(todo)))
            return end(Status.SPECIAL if kind is NodeKind.SPECIAL else Status.OK, cand, (), hop)
        return end(Status.OK, cur, (), cur_node)

    def realpath(self, path: str) -> str:
        """The canonical path `path` reaches; for a missing end, its spelled tail kept."""
        return self.resolve(path).spelled_tail()

    def exists(self, path: str) -> bool:
        return self.resolve(path).ok

    def lstat_last(self, path: str) -> os.stat_result | None:
        """lstat of the node a normal path names itself (its last component not followed)."""
        if path == "/":
            st = self.lstat("/")
            return None if isinstance(st, OSError) else st
        parent = self.resolve(parent_of(path))
        if not parent.ok or parent.kind is not NodeKind.DIR:
            return None
        st = self.lstat(join(parent.path, path.rsplit("/", 1)[1]))
        return None if isinstance(st, OSError) else st

    def lexists(self, path: str) -> bool:
        """As os.path.lexists inside the root: a dangling symlink exists."""
        return self.lstat_last(path) is not None

    def lstat_is_link(self, path: str) -> bool:
        st = self.lstat_last(path)
        return st is not None and stat.S_ISLNK(st.st_mode)

    def normalize(self, path: str) -> tuple[str, list[str]]:
        """`path` with `.`, `//` and every `..` applied the way the kernel would (each `..` to
        the physical parent of what was reached), later components kept as spelled.

        Also returns the spelled prefixes walked before each `..`: a program that spells
        `a/b/../c` needs `a/b` (and its symlinks) in the image as well.
        """
        if "/." not in path and "//" not in path and not path.endswith("/"):
            return path, []          # already normal (the common case: called for every traced path)
        parts = path.split("/")
        last_up = max((i for i, p in enumerate(parts) if p == ".."), default=-1)
        if last_up < 0:
            return "/" + "/".join(p for p in parts if p not in ("", ".")), []
        via: list[str] = []
        for i in range(1, last_up + 1):
            if parts[i] == ".." and any(p not in ("", ".", "..") for p in parts[1:i]):
                prefix = "/".join(parts[:i])
                via.append(self._spelled_normal(prefix))
        head = self.resolve("/".join(parts[:last_up + 1]) or "/").spelled_tail()
        tail = [p for p in parts[last_up + 1:] if p not in ("", ".")]
        normal = head if not tail else join(head, "/".join(tail))
        return normal, [v for v in dict.fromkeys(via) if v != "/"]

    def _spelled_normal(self, prefix: str) -> str:
        normal, _ = self.normalize(prefix)
        return normal

    # --- safe reads ---

    def open_node(self, path: str, expect: Identity | None = None, *, directory: bool = False) -> int:
        """Open a canonical path read-only, following no symlink anywhere, without blocking on a
        FIFO; then check it is a regular file (or directory) and, given `expect`, the same node.

        Raises SourceChanged when the node is not what was planned, OSError otherwise.
        """
        if not is_canonical(path):
            raise TracejailError(f"refusing to open {path!r}: not a canonical path")
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
        if directory:
            flags |= os.O_DIRECTORY
        try:
            fd = open_no_symlinks(self.host(path), flags)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
                raise SourceChanged(f"{self.host(path)} changed since it was planned: a component "
                                    "is now a symlink or not a directory") from None
            raise
        try:
            st = os.fstat(fd)
            want = stat.S_ISDIR if directory else stat.S_ISREG
            if not want(st.st_mode):
                raise SourceChanged(f"{self.host(path)} is no longer a "
                                    f"{'directory' if directory else 'regular file'}")
            if expect is not None:
                why = expect.mismatch(st)
                if why is not None:
                    raise SourceChanged(f"{self.host(path)} changed since it was planned: {why}")
            return fd
        except BaseException:
            os.close(fd)
            raise

    def read_head(self, path: str, limit: int, expect: Identity | None = None) -> bytes:
        """Up to `limit` bytes from the start of a canonical regular file (see open_node)."""
        fd = self.open_node(path, expect)
        try:
            return os.pread(fd, limit, 0)
        finally:
            os.close(fd)

    def read_text(self, path: str, limit: int = 1 << 24, errors: str = "surrogateescape") -> str | None:
        """The text of a config file, any spelling, resolved inside the root; None when it is
        missing, not a regular file, or unreadable."""
        res = self.resolve(path)
        if not res.ok or res.kind is not NodeKind.FILE:
            return None
        try:
            data = self.read_head(res.path, limit)
        except (OSError, SourceChanged):
            return None
        return data.decode("utf-8", errors)

    def listdir(self, path: str) -> list[str]:
        """Names in a directory (any spelling), sorted; [] when it is not a readable directory."""
        res = self.resolve(path)
        if not res.ok or res.kind is not NodeKind.DIR:
            return []
        try:
            fd = self.open_node(res.path, directory=True)
        except (OSError, SourceChanged):
            return []
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def walk_tree(self, path: str) -> Iterator[str]:
        """Every node below the directory `path` reaches, as paths relative to it ("" for the
        directory itself, then "/name", "/name/sub", ...), parents first; symlinks are listed, not
        followed; runtime-provided directories are not entered."""
        for rel, _st in self._tree_nodes(path):
            yield rel

    def walk_files(self, path: str) -> Iterator[str]:
        """The paths below the directory `path` reaches (spelled under `path`) that reach a regular
        file: walk_tree's nodes, a symlink among them judged by where it leads inside the root."""
        prefix = path.rstrip("/")
        for rel, st in self._tree_nodes(path):
            if not rel:
                continue
            if stat.S_ISREG(st.st_mode) or (stat.S_ISLNK(st.st_mode)
                                            and self.resolve(prefix + rel).kind is NodeKind.FILE):
                yield prefix + rel

    def _tree_nodes(self, path: str) -> Iterator[tuple[str, os.stat_result]]:
        top = self.resolve(path)
        if not top.ok:
            return
        st = top.node.st if top.node is not None else self.lstat(top.path)   # no node: the root
        if isinstance(st, OSError):
            return
        yield "", st
        if top.kind is not NodeKind.DIR:
            return
        stack = [""]
        while stack:
            rel = stack.pop()
            directory = top.path + rel if top.path != "/" else (rel or "/")
            children = []
            for name in self.listdir(directory):
                child = join(directory, name)
                st = self.lstat(child)
                if isinstance(st, OSError) or is_runtime_path(child):
                    continue
                yield rel + "/" + name, st
                if stat.S_ISDIR(st.st_mode):
                    children.append(rel + "/" + name)
            stack.extend(reversed(children))


# --------------------------------------------------------------------------------------------
# openat2(RESOLVE_NO_SYMLINKS), with an O_NOFOLLOW walk where the kernel lacks it

_SYS_OPENAT2 = 437          # the same number on every architecture (generic syscall table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_AT_FDCWD = -100


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _Openat2:
    """Calls openat2 through libc's syscall(); remembers when the kernel (or a seccomp profile)
    does not have it, and then walks instead."""

    def __init__(self) -> None:
        self.available: bool | None = None
        self._syscall = None

    def __call__(self, path: str, flags: int) -> int | None:
        if self.available is False:
            return None
        if self._syscall is None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                self._syscall = libc.syscall
                self._syscall.restype = ctypes.c_long
            except (OSError, AttributeError):
                self.available = False
                return None
        how = _OpenHow(flags, 0, _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
        fd = self._syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(_AT_FDCWD), os.fsencode(path),
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            self.available = True
            return int(fd)
        err = ctypes.get_errno()
        # ENOSYS: an old kernel; EPERM: a seccomp profile that predates openat2 (Docker's did).
        if err in (errno.ENOSYS, errno.EPERM) and self.available is not True:
            self.available = False
            return None
        raise OSError(err, os.strerror(err), path)


_openat2 = _Openat2()


def open_no_symlinks(path: str, flags: int, *, walk: bool = False) -> int:
    """Open an absolute canonical host path following no symlink in any component.

    A symlink anywhere gives OSError(ELOOP). `walk` forces the fallback (tested both ways).
    """
    if not walk:
        fd = _openat2(path, flags)
        if fd is not None:
            return fd
    return _open_walk(path, flags)


def _open_walk(path: str, flags: int) -> int:
    names = [p for p in path.split("/") if p]
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in names[:-1]:
            nfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        if not names:
            return os.open(".", flags, dir_fd=fd)
        return os.open(names[-1], flags | os.O_NOFOLLOW, dir_fd=fd)
    finally:
        os.close(fd)

