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
"""
from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

from tracejail.errors import TracejailError
from tracejail.rootfs import open_dir_nofollow

_COPY_CHUNK = 1 << 20


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
    def __init__(self, dest: str) -> None:
        self.dest = dest
        self.fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.as_root = os.geteuid() == 0
        self.dirs: list[tuple[str, int, int, int, int]] = []   # (rel, mode, uid, gid, mtime)

    def parent(self, rel: str) -> tuple[int, str]:
        """(fd of the parent directory, last name); parents are created as plain directories."""
        head, _, name = rel.rpartition("/")
        if not head:
            return os.dup(self.fd), name
        fd = os.dup(self.fd)
        try:
            for part in head.split("/"):
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                nfd = open_dir_nofollow(fd, "/" + part)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd, name

    def close(self) -> None:
        os.close(self.fd)


def unpack_tar(stream: BinaryIO, dest: str) -> Unpacked:
    """Unpack the tar (plain or compressed) read from `stream` into the empty directory `dest`."""
    result = Unpacked()
    tree = _Tree(dest)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                _member(tar, member, tree, result)
        for rel, mode, uid, gid, mtime in sorted(tree.dirs, key=lambda d: -d[0].count("/")):
            try:
                fd = open_dir_nofollow(tree.fd, "/" + rel)
            except (TracejailError, OSError):
                continue
            try:
                if tree.as_root:
                    os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)
    except tarfile.TarError as exc:
        raise TracejailError(f"the image's file system is not a readable tar stream: {exc}") from None
    finally:
        tree.close()
    return result


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
                    result.skipped.append((rel, "a directory where something else already is"))
                    return
            tree.dirs.append((rel, mode, m.uid, m.gid, int(m.mtime)))
            return
        try:
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
