"""Unpack an untrusted tar stream (an image's file system) into a private directory, safely.

What an image holds is someone else's: nothing in it may reach outside the destination, and
nothing it unpacks may grant privileges on this host. So:

* names are made relative and normal; one with a `..` component is left out;
* every parent directory is opened component by component without following a symlink
  (rootfs.open_dir_nofollow): a member below a symlink (`etc -> /etc`, then `etc/passwd`) is
  left out instead of written through it;
* files are created with O_EXCL|O_NOFOLLOW in their parent's fd; a hard link must point to a
  regular file already unpacked;
* setuid and setgid bits are dropped, and device nodes and FIFOs are not created at all;
* owners are kept (numerically) when running as root, so the tree is what the image says;
  directory modes are set last, deepest first, so a 0555 directory still takes its children.

An image's layers are applied in order on one tree (`LayerTree`), as a container engine stacks
them: a `.wh.NAME` entry removes NAME of the layers below, `.wh..wh..opq` empties its directory
of what the layers below put there, and a later entry replaces an earlier one of the same name,
a whole directory included (never by writing through a symlink: removal is fd-based too).
"""
from __future__ import annotations

import gzip
import os
import shutil
import stat
import tarfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import BinaryIO

from tracejail.errors import TracejailError
from tracejail.rootfs import open_dir_nofollow

_COPY_CHUNK = 1 << 20
_OPEN_DIRS = 64   # directory fds kept open while unpacking
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclass
class Unpacked:
    files: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)     # (name, why)
    setuid_dropped: list[str] = field(default_factory=list)


def _normal(name: str) -> str | None:
    """The member's path inside the destination ("a/b"), or None when it would leave it."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


class _Tree:
    def __init__(self, dest: str, layered: bool = False) -> None:
        self.dest = dest
        self.fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.as_root = os.geteuid() == 0
        self.dirs: dict[str, tuple[int, int, int, int]] = {}   # rel -> (mode, uid, gid, mtime); last wins
        # Layers replace what lower layers hold; one stream (an export) never replaces a directory.
        self.layered = layered
        self.this_layer: set[str] = set()   # names the layer being applied has put in place
        # Directories opened lately (a tar lists a directory's files together): rel -> fd. Every
        # one was reached without following a symlink; any directory removal clears them all.
        self.opened: OrderedDict[str, int] = OrderedDict()

    def parent(self, rel: str, create: bool = True) -> tuple[int, str]:
        """(fd of the parent directory, last name); missing parents are created as plain
        directories, or, when not `create`, FileNotFoundError."""
        head, _, name = rel.rpartition("/")
        if not head:
            return os.dup(self.fd), name
        return os.dup(self._directory(head, create)), name

    def _directory(self, head: str, create: bool) -> int:
        """An fd of directory `head` (made when missing and `create`), walked from its nearest
        opened ancestor."""
        hit = self.opened.get(head)
        if hit is not None:
            self.opened.move_to_end(head)
            return hit
        above, _, part = head.rpartition("/")
        base = self._directory(above, create) if above else self.fd
        if create:
            try:
                os.mkdir(part, 0o755, dir_fd=base)
            except FileExistsError:
                pass
        fd = open_dir_nofollow(base, "/" + part)
        self.opened[head] = fd
        if len(self.opened) > _OPEN_DIRS:
            os.close(self.opened.popitem(last=False)[1])
        return fd

    def forget_directories(self) -> None:
        while self.opened:
            os.close(self.opened.popitem()[1])

    def remove_any(self, pfd: int, name: str) -> None:
        """Remove `name` in the directory `pfd`, a whole directory tree included, never following
        a symlink (shutil.rmtree with dir_fd is fd-based); nothing there is fine."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self.forget_directories()
            shutil.rmtree(name, dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)

    def finish(self) -> None:
        """Directory owners, modes and times, deepest first (a 0555 directory took its children)."""
        for rel, (mode, uid, gid, mtime) in sorted(self.dirs.items(), key=lambda d: -d[0].count("/")):
            try:
                fd = open_dir_nofollow(self.fd, "/" + rel)
            except (TracejailError, OSError):
                continue   # removed by a later layer, or replaced by something else
            try:
                if self.as_root:
                    os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)

    def close(self) -> None:
        self.forget_directories()
        os.close(self.fd)


def unpack_tar(stream: BinaryIO, dest: str) -> Unpacked:
    """Unpack the tar (plain or compressed) read from `stream` into the empty directory `dest`."""
    result = Unpacked()
    tree = _Tree(dest)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                _member(tar, member, tree, result)
        tree.finish()
    except tarfile.TarError as exc:
        raise TracejailError(f"the image's file system is not a readable tar stream: {exc}") from None
    finally:
        tree.close()
    return result


class LayerTree:
    """An image's layers applied one after another on the empty directory `dest`."""

    def __init__(self, dest: str) -> None:
        self.tree = _Tree(dest, layered=True)
        self.result = Unpacked()

    def apply(self, stream: BinaryIO, what: str = "a layer") -> None:
        """Apply one layer (a tar, plain or compressed) read from `stream`."""
        self.tree.this_layer = set()
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    _layer_member(tar, member, self.tree, self.result)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise TracejailError(f"{what} of the image is not a readable tar stream: {exc}") from None

    def finish(self) -> Unpacked:
        self.tree.finish()
        return self.result

    def close(self) -> None:
        self.tree.close()

    def __enter__(self) -> LayerTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _layer_member(tar: tarfile.TarFile, m: tarfile.TarInfo, tree: _Tree, result: Unpacked) -> None:
    """One entry of a layer: a whiteout removes from the layers below, anything else is unpacked."""
    rel = _normal(m.name)
    head, _, name = (rel or "").rpartition("/")
    if rel is None or not name.startswith(WHITEOUT):
        _member(tar, m, tree, result)
        if rel is not None:
            tree.this_layer.add(rel)
        return
    try:
        # An opaque directory is part of this layer; a plain whiteout only removes, so a missing
        # parent means there is nothing to remove (and no directory to make).
        pfd, _ = tree.parent(rel, create=name == OPAQUE)
    except FileNotFoundError:
        return
    except TracejailError:
        result.skipped.append((rel, "a whiteout below a symlink or a file"))
        return
    try:
        if name == OPAQUE:
            # Lower layers' entries go; what this layer put there already stays.
            for child in os.listdir(pfd):
                if (f"{head}/{child}" if head else child) not in tree.this_layer:
                    tree.remove_any(pfd, child)
        else:
            target = name[len(WHITEOUT):]
            if target and target not in (".", ".."):
                tree.remove_any(pfd, target)
    finally:
        os.close(pfd)


def _member(tar: tarfile.TarFile, m: tarfile.TarInfo, tree: _Tree, result: Unpacked) -> None:
    rel = _normal(m.name)
    if rel is None:
        if m.name.strip("/.") != "":
            result.skipped.append((m.name, "its name leaves the tree"))
        return
    if m.ischr() or m.isblk() or m.isfifo():
        result.skipped.append((rel, "a device node or FIFO is not created"))
        return
    mode = stat.S_IMODE(m.mode)
    if mode & (stat.S_ISUID | stat.S_ISGID) and not m.isdir():
        mode &= ~(stat.S_ISUID | stat.S_ISGID)
        result.setuid_dropped.append(rel)
    try:
        pfd, name = tree.parent(rel)
    except TracejailError:
        result.skipped.append((rel, "a parent directory is a symlink or a file"))
        return
    try:
        if m.isdir():
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
            except FileExistsError:
                if not stat.S_ISDIR(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode):
                    if not tree.layered:
                        result.skipped.append((rel, "a directory where something else already is"))
                        return
                    os.unlink(name, dir_fd=pfd)   # a lower layer's file or symlink
                    os.mkdir(name, 0o700, dir_fd=pfd)
            tree.dirs[rel] = (mode, m.uid, m.gid, int(m.mtime))
            return
        try:
            if tree.layered:
                tree.remove_any(pfd, name)
            else:
                _remove(pfd, name)
        except TracejailError:
            result.skipped.append((rel, "a file where a directory already is"))
            return
        if m.issym():
            os.symlink(m.linkname, name, dir_fd=pfd)
            if tree.as_root:
                os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        elif m.islnk():
            target = _normal(m.linkname)
            if target is None:
                result.skipped.append((rel, "a hard link out of the tree"))
                return
            try:
                tfd, tname = tree.parent(target)
            except TracejailError:
                result.skipped.append((rel, "a hard link through a symlink"))
                return
            try:
                if not stat.S_ISREG(os.stat(tname, dir_fd=tfd, follow_symlinks=False).st_mode):
                    result.skipped.append((rel, "a hard link to something not a regular file"))
                    return
                os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                result.skipped.append((rel, "a hard link to a file not unpacked"))
                return
            finally:
                os.close(tfd)
        elif m.isreg():
            src = tar.extractfile(m)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=pfd)
            try:
                while src is not None and (chunk := src.read(_COPY_CHUNK)):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                if tree.as_root:
                    os.fchown(fd, m.uid, m.gid)
                os.fchmod(fd, mode)   # after chown, which clears setuid bits anyway
                os.utime(fd, (int(m.mtime), int(m.mtime)))
            finally:
                os.close(fd)
        else:
            result.skipped.append((rel, f"tar member type {m.type!r} is not unpacked"))
            return
        result.files += 1
    finally:
        os.close(pfd)


def _remove(pfd: int, name: str) -> None:
    """Make room for a member: a later entry of the same name replaces an earlier one (never a
    directory's content)."""
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise TracejailError(f"refusing to replace the directory {name!r} with a file")
    os.unlink(name, dir_fd=pfd)
