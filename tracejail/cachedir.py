"""Where tracejail keeps what it may reuse between runs, and how it reads and writes there.

One directory for every cache (the import closure's parse results, the layer cache, the record
of which registry repositories hold which blobs): $TRACEJAIL_CACHE_DIR (empty: no cache at
all), else $XDG_CACHE_HOME/tracejail or ~/.cache/tracejail. A cache only saves time, so anything
wrong with it (a directory that is not the user's own, a symlink, a file someone else could
have written) means no cache, never an error and never a trusted foreign file.
"""
from __future__ import annotations

import os
import secrets
import shutil
import stat
import sys
from typing import Callable, Mapping


def cache_root(environ: Mapping[str, str] | None = None) -> str | None:
    """The cache directory, or None when caching is off (TRACEJAIL_CACHE_DIR="") or no home."""
    env = os.environ if environ is None else environ
    configured = env.get("TRACEJAIL_CACHE_DIR")
    if configured is not None:
        return configured or None
    home = env.get("HOME") or os.path.expanduser("~")
    base = env.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    return os.path.join(base, "tracejail") if base.startswith("/") else None


def safe_dir(directory: str, create: bool) -> bool:
    """Whether `directory` is one of the user's own that only they may write (made 0700 first
    when `create`)."""
    try:
        if create:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.lstat(directory)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def remove_tree(path: str) -> None:
    """Remove a file or a whole tree, never following a symlink (shutil.rmtree works on directory
    fds); directories an image made read-only for its owner are made writable first. OSError
    when something stays."""
    def retry(func: Callable[[str], object], failed: str) -> None:
        os.chmod(os.path.dirname(failed), 0o700)
        func(failed)

    if not stat.S_ISDIR(os.lstat(path).st_mode):
        os.unlink(path)
        return
    os.chmod(path, 0o700)
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=lambda func, failed, _exc: retry(func, failed))
    else:
        shutil.rmtree(path, onerror=lambda func, failed, _info: retry(func, failed))


def tree_size(path: str) -> int:
    """Bytes of the regular files below `path` (os.walk never follows a symlink to a directory)."""
    total = 0
    for top, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(top, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def mtime(path: str) -> float:
    """When `path` (not followed) was last modified; 0 when it is gone."""
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def read_private(path: str, max_bytes: int) -> bytes | None:
    """The content of a regular file of the user's own (not a symlink, at most `max_bytes`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size > max_bytes:
            return None
        chunks, left = [], st.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def write_private(path: str, data: bytes) -> bool:
    """Replace `path` with `data` atomically (a 0600 temporary file beside it, renamed over it).
    False when it could not; no temporary file stays behind, also when SIGTERM lands mid-write."""
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    # One try around the open too: SIGTERM right after the file exists would otherwise leave it.
    # Only a failed open (O_EXCL: maybe someone else's name) has nothing of ours to remove.
    open_failed = False
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            open_failed = True
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return True
    except OSError:
        return False
    finally:
        if not open_failed:
            try:
                os.unlink(tmp)   # gone already after the rename
            except OSError:
                pass
