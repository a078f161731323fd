"""Plan and stage the image's file tree from a list of host paths.

`plan()` turns the paths a traced program touched (plus their ELF closure) into the exact set of
nodes the image needs: every symlink met on the way to a path is kept as a symlink, component by
component, and whatever it points to is kept as well, so that the program resolves the same names
the same way inside the image. `stage()` writes a Plan to a directory without ever following a
symlink inside that directory, so a hostile or buggy Plan cannot write outside it.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Mapping

from tracejail import sensitive
from tracejail.errors import TracejailError
from tracejail.text import human
from tracejail.root import (Hop, Identity, NodeKind, Root, SourceChanged, Status, describe_special,
                            open_no_symlinks, parent_of, under)

# The container runtime mounts its own /proc, /sys, /dev and /run over whatever the image holds
# (root.RUNTIME_DIRS), so nothing below them is ever copied; symlinks that point there
# (/etc/mtab -> ../proc/self/mounts) are kept as symlinks.

# Refused unless raised with --max-file-size: a traced path may name a huge file.
DEFAULT_MAX_FILE_SIZE = 4 << 30
# A file this big whose allocated blocks cover less than 1/SPARSE_RATIO of it is refused: staging
# would write every hole out (a 1 TiB sparse file is 4 KiB on disk).
SPARSE_MIN_SIZE = 16 << 20
SPARSE_RATIO = 8

KINDS = ("file", "dir", "symlink", "hardlink")

_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class StageOptions:
    keep_setuid: bool = False
    # False: add the permission bits the image user needs (o+x on directories on the way, o+r on
    # kept files, o+rx on listed directories, o+x on owner-executable files) and list each change.
    keep_modes: bool = False
    image_uid: int = 65532
    image_gid: int = 65532
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    # Kept credentials (fileset.FileSet.secrets): never opened up, whatever their name.
    secrets: frozenset[str] = frozenset()
    # Paths the image user owns (ownership.Ownership.owned: path -> why); the rest is root's.
    owned: Mapping[str, str] = field(default_factory=dict)
    keep_owners: bool = False     # the host's numeric owners, exactly (--keep-owners)


@dataclass(frozen=True)
class Entry:
    """One node in the image, in final form."""

    path: str  # absolute, normalised image path
    kind: str  # "file" | "dir" | "symlink" | "hardlink"
    mode: int  # permission bits incl. setuid etc. after policy
    source: str | None  # host path to copy content from (files); the host node for dirs/symlinks
    link_target: str | None  # symlink target as stored / hardlink's first image path
    size: int
    uid: int
    gid: int
    mtime: int = 0  # integer host mtime; the layer writer clamps it (SOURCE_DATE_EPOCH)
    # The node planned (files): content is read only from this very file (see open_entry).
    identity: Identity | None = None


@dataclass
class Plan:
    entries: dict[str, Entry]
    mode_changes: list[tuple[str, int, int, str]] = field(default_factory=list)  # path, old, new, why
    dropped_setuid: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # wanted paths that do not exist on the host
    # Wanted paths deliberately left out, with the reason: under /proc, /sys or /dev (the runtime
    # provides them), or sockets/FIFOs/devices, which cannot be copied into an image.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Files left out while writing because they were no longer the node planned (see open_entry).
    changed: list[tuple[str, str]] = field(default_factory=list)
    ownership: dict[str, str] = field(default_factory=dict)   # path -> why the image user owns it
    generated: dict[str, str] = field(default_factory=dict)   # path -> why build itself writes it

    def files_size(self) -> int:
        """Bytes of file content the plan copies: the total that `progress` callbacks add up to."""
        return sum(e.size for e in self.entries.values() if e.kind == "file")


# --------------------------------------------------------------------------------------------
# Paths


def check_image_path(path: str) -> str:
    """Return `path` if it is absolute and normalised, else raise naming it.

    Only exact normal form is accepted (no `..`, `.`, `//` or trailing `/`): anything else would
    mean two spellings of one node, or a way out of the staging tree.
    """
    if not isinstance(path, str) or not path.startswith("/"):
        raise TracejailError(f"path {path!r} is not absolute; pass absolute host paths")
    if "\0" in path:
        raise TracejailError(f"path {path!r} contains a NUL byte")
    if path == "/":
        return path
    parts = path[1:].split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise TracejailError(
            f"path {path!r} is not normalised ('..', '.', '//' or trailing '/'); "
            "pass normalised absolute paths"
        )
    return path


def sort_key(path: str) -> tuple[str, ...]:
    """Order parents before children and siblings by name, independent of the separator's rank."""
    return tuple(path.split("/"))


def _ancestors(path: str) -> Iterator[str]:
    """Proper ancestors of `path`, nearest first, excluding "/"."""
    p = parent_of(path)
    while p != "/":
        yield p
        p = parent_of(p)


def _join(parent: str, name: str) -> str:
    return "/" + name if parent == "/" else parent + "/" + name


# --------------------------------------------------------------------------------------------
# Mode policy


def _access_shift(owner_uid: int, owner_gid: int, image_uid: int, image_gid: int) -> int | None:
    """Which permission triplet applies to the image user: 6 owner, 3 group, 0 other; None = root."""
    if image_uid == 0:
        return None
    if image_uid == owner_uid:
        return 6
    if image_gid == owner_gid:
        return 3
    return 0


def policy_mode(
    kind: str, mode: int, role: str, uid: int, gid: int, options: StageOptions, *, secret: bool = False
) -> tuple[int, list[str], bool]:
    """Apply setuid and access policy to one node's permission bits.

    `role` is "traverse" (a directory on the way), "list" (a directory the program listed or
    stat'ed) or "keep" (a kept file). A `secret` node (a credential kept with --include) keeps its
    access bits. Returns (new mode, reasons for access changes, setuid dropped).
    """
    new = mode
    dropped = False
    if kind == "file" and not options.keep_setuid and mode & (stat.S_ISUID | stat.S_ISGID):
        new &= ~(stat.S_ISUID | stat.S_ISGID)
        dropped = True
    reasons: list[str] = []
    shift = _access_shift(uid, gid, options.image_uid, options.image_gid)
    if options.keep_modes or secret or shift is None or kind not in ("file", "dir"):
        return new, reasons, dropped
    user = f"image user {options.image_uid}:{options.image_gid}"
    needs: list[tuple[int, str]] = []
    if kind == "dir":
        needs.append((1, f"traversable by {user}"))
        if role == "list":
            needs.append((4, f"listable by {user}"))
    else:
        needs.append((4, f"readable by {user}"))
        # The program was traced as whoever ran it (often root); a 0700 binary it executed must
        # stay executable for the image user, or the image fails with EACCES on start.
        if mode & 0o100:
            needs.append((1, f"executable by {user}"))
    for bits, why in needs:
        if not new & (bits << shift):
            new |= bits << shift
            reasons.append(why)
    return new, reasons, dropped


# --------------------------------------------------------------------------------------------
# Planning


_KIND_NAMES = {NodeKind.DIR: "dir", NodeKind.FILE: "file", NodeKind.SYMLINK: "symlink"}


def _check_size(path: str, st: os.stat_result, options: StageOptions) -> None:
    """Refuse a file too big to stage, or a sparse one (it would be written out in full)."""
    if st.st_size > options.max_file_size:
        raise TracejailError(f"refusing {path}: {human(st.st_size)} is over the {human(options.max_file_size)} "
                             "limit; --exclude it, or raise --max-file-size")
    allocated = st.st_blocks * 512
    if st.st_size >= SPARSE_MIN_SIZE and allocated * SPARSE_RATIO < st.st_size:
        raise TracejailError(f"refusing {path}: a sparse file ({human(st.st_size)} long, {human(allocated)} "
                             "allocated) would be written out in full; --exclude it")


def plan(
    wanted: Iterable[str],
    *,
    root: Root | str = "/",
    options: StageOptions = StageOptions(),
    dirs_only: Iterable[str] = (),
) -> Plan:
    """Work out every node the image needs to hold `wanted` (and `dirs_only` as empty dirs).

    Paths are image paths, resolved inside `root` by root.Root (absolute symlink targets
    restart at the root, as in a chroot); every hop is kept. Raises TracejailError for a
    non-normalised path, an unreadable one, or a file over the size limits.
    """
    tree = root if isinstance(root, Root) else Root(root)
    nodes: dict[str, Hop] = {}
    roles: dict[str, str] = {}

    def record(hop: Hop, role: str) -> None:
        nodes.setdefault(hop.path, hop)
        # "list" beats "traverse": a directory both listed and walked through needs r and x.
        if role == "list" or hop.path not in roles:
            roles[hop.path] = role

    missing: list[str] = []
    skipped: list[tuple[str, str]] = []
    # Wanted directories and dirs_only alike were opened, listed or stat'ed by the program: they
    # become empty directories (holding only what else is wanted) that the image user can list.
    requests = [check_image_path(p) for p in wanted] + [check_image_path(p) for p in dirs_only]
    for path in dict.fromkeys(requests):
        res = tree.resolve(path)
        for hop in res.hops:
            if hop.kind is NodeKind.SPECIAL:
                continue
            final = res.node is not None and hop.path == res.node.path
            record(hop, "list" if final and hop.kind is NodeKind.DIR else
                   "traverse" if hop.kind is NodeKind.DIR else "keep")
        if res.status is Status.OK:
            if res.node is not None and res.node.kind is NodeKind.FILE:
                _check_size(tree.host(res.path), res.node.st, options)
        elif res.status in (Status.MISSING, Status.NOT_A_DIRECTORY, Status.LOOP):
            missing.append(path)
        elif res.status is Status.RUNTIME:
            skipped.append((path, "provided by the container runtime"))
        elif res.status is Status.SPECIAL:
            assert res.node is not None
            skipped.append((path, describe_special(res.node.st.st_mode)))
        else:
            why = os.strerror(res.error) if res.error else "permission denied"
            raise TracejailError(f"cannot inspect {tree.host(res.path)}: {why}; check permissions")

    root_st = tree.lstat("/")
    if isinstance(root_st, OSError):
        raise TracejailError(f"host root {tree.path} is not readable: {root_st.strerror}")
    nodes["/"] = Hop("/", NodeKind.DIR, None, root_st)
    roles.setdefault("/", "traverse")

    result = Plan(entries={}, missing=sorted(set(missing), key=sort_key), skipped=sorted(set(skipped)))
    # Hard links: the first path (in sort order) of each (dev, inode) carries the content.
    first_of_inode: dict[tuple[int, int], str] = {}
    for path in sorted(nodes, key=sort_key):
        hop = nodes[path]
        st, kind = hop.st, _KIND_NAMES[hop.kind]
        source = tree.host(path)
        mtime = int(st.st_mtime)
        uid, gid = (st.st_uid, st.st_gid) if options.keep_owners else (0, 0)
        if path in options.owned and not options.keep_owners:
            uid, gid = options.image_uid, options.image_gid
            result.ownership[path] = options.owned[path]
        if kind == "symlink":
            entry = Entry(path, "symlink", 0o777, source, hop.target, 0, uid, gid, mtime)
        else:
            old = stat.S_IMODE(st.st_mode)
            new, reasons, dropped = policy_mode(kind, old, roles.get(path, "keep"), uid, gid, options,
                                                secret=path in options.secrets
                                                or sensitive.sensitive_name(path) is not None)
            if dropped:
                result.dropped_setuid.append(path)
            if reasons:
                result.mode_changes.append((path, old, new, "; ".join(reasons)))
            if kind == "dir":
                entry = Entry(path, "dir", new, source, None, 0, uid, gid, mtime)
            else:
                key = (st.st_dev, st.st_ino)
                first = first_of_inode.setdefault(key, path) if st.st_nlink > 1 else path
                if first != path:
                    entry = Entry(path, "hardlink", new, source, first, 0, uid, gid, mtime)
                else:
                    entry = Entry(path, "file", new, source, None, st.st_size, uid, gid, mtime,
                                  identity=Identity.of(st))
        result.entries[path] = entry
    # /tmp must exist and be world-writable with the sticky bit; programs expect it.
    if "/tmp" not in result.entries:
        result.entries["/tmp"] = Entry("/tmp", "dir", 0o1777, None, None, 0, 0, 0, 0)
    return result


def plan_from_rootfs(rootfs: str) -> Plan:
    """Describe an already staged tree as a Plan (image path = path inside `rootfs`).

    Owners are taken from disk when running as root (stage() set them), else every node is
    owned by 0:0, which is what stage() would have written had it been able to.
    """
    root = os.path.abspath(rootfs)
    try:
        root_st = os.lstat(root)
    except OSError as err:
        raise TracejailError(f"cannot read rootfs {root}: {err.strerror}") from None
    if not stat.S_ISDIR(root_st.st_mode):
        raise TracejailError(f"rootfs {root} is not a directory; pass the directory --rootfs wrote")
    as_root = os.geteuid() == 0
    result = Plan(entries={})
    inodes: dict[str, tuple[int, int]] = {}  # multiply-linked files -> (dev, inode)

    def owner(st: os.stat_result) -> tuple[int, int]:
        return (st.st_uid, st.st_gid) if as_root else (0, 0)

    result.entries["/"] = Entry("/", "dir", stat.S_IMODE(root_st.st_mode), root, None, 0,
                                *owner(root_st), int(root_st.st_mtime))
    stack = ["/"]
    while stack:
        image_dir = stack.pop()
        host_dir = root if image_dir == "/" else os.path.join(root, image_dir[1:])
        try:
            names = os.listdir(host_dir)
        except OSError as err:
            raise TracejailError(f"cannot list {host_dir}: {err.strerror}") from None
        for name in names:
            path = _join(image_dir, name)
            host = os.path.join(host_dir, name)
            st = os.lstat(host)
            mode = stat.S_IMODE(st.st_mode)
            uid, gid = owner(st)
            mtime = int(st.st_mtime)
            if stat.S_ISDIR(st.st_mode):
                result.entries[path] = Entry(path, "dir", mode, host, None, 0, uid, gid, mtime)
                stack.append(path)
            elif stat.S_ISLNK(st.st_mode):
                result.entries[path] = Entry(path, "symlink", 0o777, host, os.readlink(host), 0, uid, gid, mtime)
            elif stat.S_ISREG(st.st_mode):
                result.entries[path] = Entry(path, "file", mode, host, None, st.st_size, uid, gid, mtime,
                                             identity=Identity.of(st))
                if st.st_nlink > 1:
                    inodes[path] = (st.st_dev, st.st_ino)
            else:
                result.skipped.append((path, describe_special(st.st_mode)))
    # Same rule as plan(): the first path in sort order of each inode carries the content.
    first_of_inode: dict[tuple[int, int], str] = {}
    for path in sorted(inodes, key=sort_key):
        first = first_of_inode.setdefault(inodes[path], path)
        if first != path:
            result.entries[path] = replace(result.entries[path], kind="hardlink", link_target=first, size=0,
                                           identity=None)
    result.skipped.sort()
    return result


# --------------------------------------------------------------------------------------------
# Checking a Plan before writing it (shared with the layer writer)


def ordered_entries(p: Plan) -> list[Entry]:
    """Validate a Plan and return its entries parents-first, adding missing parent directories.

    Rejects anything that could write outside the tree or be ambiguous: non-normalised paths,
    a key that differs from its entry's path, a node below a symlink or file, a hard link whose
    target is not a regular file in the plan, unknown kinds.
    """
    entries: dict[str, Entry] = {}
    for key, e in p.entries.items():
        check_image_path(e.path)
        if key != e.path:
            raise TracejailError(f"plan entry {key!r} describes {e.path!r}; the plan is inconsistent")
        if e.kind not in KINDS:
            raise TracejailError(f"plan entry {e.path} has unknown kind {e.kind!r}")
        if e.kind == "symlink" and not e.link_target:
            raise TracejailError(f"plan symlink {e.path} has no target")
        if e.kind == "file" and not e.source:
            raise TracejailError(f"plan file {e.path} has no source to copy from")
        entries[e.path] = e
    for e in list(entries.values()):
        for anc in _ancestors(e.path):
            a = entries.get(anc)
            if a is None:
                entries[anc] = Entry(anc, "dir", 0o755, None, None, 0, 0, 0, 0)
            elif a.kind != "dir":
                raise TracejailError(
                    f"plan puts {e.path} below {anc}, which is a {a.kind}, not a directory; "
                    "refusing to write through it"
                )
    for e in entries.values():
        if e.kind == "hardlink":
            t = entries.get(e.link_target or "")
            if t is None or t.kind != "file":
                raise TracejailError(
                    f"plan hard link {e.path} points to {e.link_target!r}, which is not a file in the plan"
                )
            # Tar needs the content before the link; plan() always picks the first path.
            if sort_key(t.path) > sort_key(e.path):
                raise TracejailError(f"plan hard link {e.path} sorts before its target {t.path}; the plan is inconsistent")
    return sorted(entries.values(), key=lambda e: sort_key(e.path))


# --------------------------------------------------------------------------------------------
# Staging


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir_nofollow(root_fd: int, image_dir: str) -> int:
    """Open `image_dir` below `root_fd` one component at a time, refusing any symlink.

    This is the last line of defence: even if the tree changed under us, or the Plan checks
    missed something, a symlink inside the staging tree is never followed.
    """
    fd = os.dup(root_fd)
    try:
        for name in image_dir.split("/")[1:] if image_dir != "/" else []:
            if name in ("", ".", ".."):
                raise TracejailError(f"refusing path {image_dir!r}: not normalised")
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise TracejailError(
                        f"refusing to write below {image_dir}: a component is a symlink or not a directory"
                    ) from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


class _DirCursor:
    """Keeps the chain of directory fds for the current position in a parents-first walk,
    so each entry costs one openat instead of a walk from the root."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.chain: list[tuple[str, int]] = []  # (image dir, fd), outermost first

    def fd_for(self, image_dir: str) -> int:
        while self.chain and not under(image_dir, self.chain[-1][0]):
            os.close(self.chain.pop()[1])
        base_path, base_fd = self.chain[-1] if self.chain else ("/", self.root_fd)
        if base_path == image_dir:
            return base_fd
        rest = image_dir[len(base_path):].strip("/") if base_path != "/" else image_dir[1:]
        for name in rest.split("/"):
            base_path = _join(base_path, name)
            base_fd = open_dir_nofollow(base_fd, "/" + name)
            self.chain.append((base_path, base_fd))
        return base_fd

    def close(self) -> None:
        while self.chain:
            os.close(self.chain.pop()[1])


def _copy_content(src_fd: int, dst_fd: int, progress: Callable[[int], None] | None) -> None:
    """Copy a whole file: reflink if the filesystem can, else copy_file_range, else read/write."""
    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
        if progress:
            progress(os.fstat(dst_fd).st_size)
        return
    except OSError:
        pass
    use_cfr = hasattr(os, "copy_file_range")
    while use_cfr:
        try:
            n = os.copy_file_range(src_fd, dst_fd, _COPY_CHUNK * 16)
        except OSError as err:
            if err.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                if os.lseek(dst_fd, 0, os.SEEK_CUR) == 0:
                    use_cfr = False  # not supported between these filesystems: fall back
                    break
            raise
        if n == 0:
            if os.lseek(dst_fd, 0, os.SEEK_CUR) == 0 and os.fstat(src_fd).st_size > 0:
                break  # some filesystems answer 0 instead of an error: copy by hand
            return
        if progress:
            progress(n)
    with os.fdopen(os.dup(src_fd), "rb") as src, os.fdopen(os.dup(dst_fd), "wb") as dst:
        while chunk := src.read(_COPY_CHUNK):
            dst.write(chunk)
            if progress:
                progress(len(chunk))


_SOURCE_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


def open_entry(e: Entry) -> int:
    """Open a file entry's content for copying.

    A planned host file (it has an `identity`) is opened following no symlink in any component
    (its source path is canonical: the plan recorded every symlink as a node of its own), and
    must still be that node, unchanged: otherwise SourceChanged. A file that build wrote itself
    (no identity) is opened with O_NOFOLLOW.
    """
    path = e.source or ""
    if e.identity is not None:
        try:
            fd = open_no_symlinks(path, _SOURCE_FLAGS)
        except FileNotFoundError:
            raise SourceChanged(f"{path} vanished since it was planned") from None
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
                raise SourceChanged(f"{path} changed since it was planned: a component is now a "
                                    "symlink or not a directory") from None
            raise TracejailError(f"cannot read {path}: {err.strerror}") from None
    else:
        try:
            fd = os.open(path, _SOURCE_FLAGS)
        except FileNotFoundError:
            raise TracejailError(f"{path} vanished since it was traced; run the build again") from None
        except OSError as err:
            raise TracejailError(f"cannot read {path}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SourceChanged(f"{path} is no longer a regular file")
        why = e.identity.mismatch(st) if e.identity is not None else None
        if why is not None:
            raise SourceChanged(f"{path} changed since it was planned: {why}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_entry(e: Entry) -> bytes:
    """A file entry's whole content, read through open_entry (SourceChanged when it changed)."""
    with os.fdopen(open_entry(e), "rb") as f:
        return f.read()


OnChanged = Callable[[Entry, SourceChanged], None]


class _Dest:
    """The staging directory, and what to undo when staging fails or is interrupted.

    A directory goes on the `created` list just *before* it is made, so a signal that lands
    between a mkdir and the line after it still finds it there."""

    def __init__(self, dest: str) -> None:
        self.path = os.path.abspath(dest)
        self.missing: list[str] = []           # outermost first: parents dest needs, then dest
        d = self.path
        while not os.path.lexists(d):
            self.missing.insert(0, d)
            d = os.path.dirname(d)
        self.created: list[str] = []
        self.fd: int | None = None

    def open(self) -> int:
        """Create dest (and parents) if absent, open it; it must be an empty real directory."""
        for d in self.missing:
            self.created.append(d)
            try:
                os.mkdir(d, 0o755)
            except FileExistsError:
                self.created.pop()         # someone else's now: never ours to remove
            except OSError as err:
                self.created.pop()
                raise TracejailError(f"cannot create {d}: {err.strerror}") from None
        try:
            fd = os.open(self.path, _DIR_FLAGS)
        except OSError as err:
            raise TracejailError(f"{self.path} is not a directory (or is a symlink): {err.strerror}; "
                                 "choose another path") from None
        if os.listdir(fd):
            os.close(fd)
            raise TracejailError(f"{self.path} is not empty; pass an empty or new directory")
        self.fd = fd
        return fd

    def undo(self) -> None:
        """Remove what staging wrote, and the directories it created. shutil.rmtree never
        follows symlinks (it walks with fds)."""
        try:
            if self.path in self.created:
                shutil.rmtree(self.path, ignore_errors=True)
            elif self.fd is not None:
                for name in os.listdir(self.fd):
                    full = os.path.join(self.path, name)
                    if os.path.isdir(full) and not os.path.islink(full):
                        shutil.rmtree(full)
                    else:
                        os.unlink(full)
            for d in reversed(self.created):
                if d != self.path:
                    os.rmdir(d)
        except OSError:
            pass  # best effort; the original error is what the user needs to see
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def stage(plan: Plan, dest: str, *, progress: Callable[[int], None] | None = None,
          on_changed: OnChanged | None = None) -> None:
    """Write the Plan's tree into `dest` (which must be empty or absent; missing parents are
    created).

    `progress` is called with the number of content bytes just copied; they add up to
    `plan.files_size()`. A file that is no longer the node planned (see open_entry) raises
    SourceChanged, or, given `on_changed`, is reported to it and left out (with its hard links).
    On failure the partial tree is removed and TracejailError raised.
    """
    entries = ordered_entries(plan)
    target = _Dest(dest)
    as_root = os.geteuid() == 0
    left_out: set[str] = set()
    try:
        dest_fd = target.open()
        cursor = _DirCursor(dest_fd)
        try:
            for e in entries:
                if e.path == "/":
                    continue
                if e.kind == "hardlink" and e.link_target in left_out:
                    continue
                parent, name = parent_of(e.path), e.path.rsplit("/", 1)[1]
                pfd = cursor.fd_for(parent)
                try:
                    _write_entry(e, name, pfd, dest_fd, as_root, progress)
                except SourceChanged as err:
                    if on_changed is None:
                        raise
                    on_changed(e, err)
                    left_out.add(e.path)
            # Directory modes last and deepest first, so a 0555 directory is still writable
            # while its children are created, and child writes do not bump parent mtimes.
            for e in reversed(entries):
                if e.kind == "dir":
                    cursor.close()
                    fd = dest_fd if e.path == "/" else open_dir_nofollow(dest_fd, e.path)
                    try:
                        _set_attrs_fd(fd, e, as_root)
                    finally:
                        if fd != dest_fd:
                            os.close(fd)
        finally:
            cursor.close()
    except OSError as err:
        target.undo()
        raise TracejailError(os_error_message(f"cannot stage into {dest}", err)) from None
    except BaseException:
        target.undo()
        raise
    target.close()


def os_error_message(what: str, err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return f"{what}: disk full; free some space or choose another destination"
    if err.errno == errno.EROFS:
        return f"{what}: read-only file system; choose another destination"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"{what}: permission denied; choose a writable destination"
    where = f" ({err.filename})" if err.filename else ""
    return f"{what}: {err.strerror}{where}"


def _set_attrs_fd(fd: int, e: Entry, as_root: bool) -> None:
    if as_root:
        os.fchown(fd, e.uid, e.gid)
    os.fchmod(fd, e.mode)  # after chown, which clears setuid bits
    os.utime(fd, (e.mtime, e.mtime))


def _write_entry(
    e: Entry, name: str, pfd: int, root_fd: int, as_root: bool, progress: Callable[[int], None] | None
) -> None:
    if e.kind == "dir":
        os.mkdir(name, 0o700, dir_fd=pfd)  # final mode is set after the children
    elif e.kind == "symlink":
        os.symlink(e.link_target or "", name, dir_fd=pfd)
        if as_root:
            os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(name, (e.mtime, e.mtime), dir_fd=pfd, follow_symlinks=False)
    elif e.kind == "hardlink":
        target = e.link_target or ""
        tfd = open_dir_nofollow(root_fd, parent_of(target))
        try:
            tname = target.rsplit("/", 1)[1]
            if not stat.S_ISREG(os.stat(tname, dir_fd=tfd, follow_symlinks=False).st_mode):
                raise TracejailError(f"refusing hard link {e.path}: {target} is not a regular file")
            # follow_symlinks=False: linkat without AT_SYMLINK_FOLLOW never dereferences.
            os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)
    else:
        src = open_entry(e)
        try:
            dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600, dir_fd=pfd)
            try:
                _copy_content(src, dst, progress)
                _set_attrs_fd(dst, e, as_root)
            finally:
                os.close(dst)
        finally:
            os.close(src)
