"""The file syscalls tracejail records (x86_64): one table that the seccomp filter and the
tracer's decoder both read.

Each row says what the call does to the path it names (its :class:`Effect`), which arguments hold
the path, its directory fd and its flags, and when the last component is not followed. The filter
(:mod:`tracejail.seccomp`) stops exactly these calls; the tracer (:mod:`tracejail.tracer`) decodes
them from this table alone.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Effect(enum.Enum):
    """What a call does with its path."""

    OPEN = "open"          # opens it: its open flags say read, write, list or stat
    STAT = "stat"          # looks at it
    ACCESS = "access"      # checks permissions on it (mode argument)
    READLINK = "readlink"  # reads a symlink
    EXEC = "exec"          # runs it
    RENAME = "rename"      # moves one path to another: the first goes away, the second is made
    REMOVE = "remove"      # removes it
    MAKE = "make"          # makes a new name (mkdir, symlink, link): fails when it exists


class NoFollow(enum.Enum):
    """When the last component of the path is not followed if it is a symlink."""

    NEVER = "never"
    ALWAYS = "always"
    AT_FLAG = "at-flag"       # AT_SYMLINK_NOFOLLOW in the flags argument
    OPEN_FLAG = "open-flag"   # O_NOFOLLOW in the open flags


AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000


@dataclass(frozen=True)
class Syscall:
    name: str
    nr: int
    effect: Effect
    path: int                        # argument index of the path (the made one for MAKE)
    dirfd: int | None = None         # argument index of its directory fd; None: the working directory
    flags: int | None = None         # argument index of the flags (open flags, or AT_* flags)
    mode: int | None = None          # ACCESS: argument index of the mode
    nofollow: NoFollow = NoFollow.NEVER
    fixed_open_flags: int = 0        # creat(): the open flags it implies
    open_how: bool = False           # openat2(): the flags are the first field of struct open_how
    empty_path_ok: bool = False      # an empty path names the fd itself, whatever the flags say
    # RENAME: where the new name is
    to_path: int | None = None
    to_dirfd: int | None = None

    @property
    def empty_path_flag(self) -> int | None:
        """The argument whose AT_EMPTY_PATH makes an empty path name the fd itself."""
        return self.flags if self.effect in (Effect.STAT, Effect.EXEC, Effect.ACCESS) else None


_CREAT_FLAGS = 0o100 | 0o1 | 0o1000   # O_CREAT | O_WRONLY | O_TRUNC

SYSCALLS: tuple[Syscall, ...] = (
    Syscall("open", 2, Effect.OPEN, path=0, flags=1, nofollow=NoFollow.OPEN_FLAG),
    Syscall("stat", 4, Effect.STAT, path=0),
    Syscall("lstat", 6, Effect.STAT, path=0, nofollow=NoFollow.ALWAYS),
    Syscall("access", 21, Effect.ACCESS, path=0, mode=1),
    Syscall("execve", 59, Effect.EXEC, path=0),
    Syscall("rename", 82, Effect.RENAME, path=0, to_path=1),
    Syscall("mkdir", 83, Effect.MAKE, path=0),
    Syscall("rmdir", 84, Effect.REMOVE, path=0),
    Syscall("creat", 85, Effect.OPEN, path=0, fixed_open_flags=_CREAT_FLAGS),
    Syscall("link", 86, Effect.MAKE, path=1),
    Syscall("unlink", 87, Effect.REMOVE, path=0),
    Syscall("symlink", 88, Effect.MAKE, path=1),
    Syscall("readlink", 89, Effect.READLINK, path=0),
    Syscall("openat", 257, Effect.OPEN, dirfd=0, path=1, flags=2, nofollow=NoFollow.OPEN_FLAG),
    Syscall("mkdirat", 258, Effect.MAKE, dirfd=0, path=1),
    Syscall("newfstatat", 262, Effect.STAT, dirfd=0, path=1, flags=3, nofollow=NoFollow.AT_FLAG),
    Syscall("unlinkat", 263, Effect.REMOVE, dirfd=0, path=1),
    Syscall("renameat", 264, Effect.RENAME, dirfd=0, path=1, to_dirfd=2, to_path=3),
    Syscall("linkat", 265, Effect.MAKE, dirfd=2, path=3),
    Syscall("symlinkat", 266, Effect.MAKE, dirfd=1, path=2),
    Syscall("readlinkat", 267, Effect.READLINK, dirfd=0, path=1, empty_path_ok=True),
    Syscall("faccessat", 269, Effect.ACCESS, dirfd=0, path=1, mode=2),
    Syscall("renameat2", 316, Effect.RENAME, dirfd=0, path=1, to_dirfd=2, to_path=3),
    Syscall("execveat", 322, Effect.EXEC, dirfd=0, path=1, flags=4),
    Syscall("statx", 332, Effect.STAT, dirfd=0, path=1, flags=2, nofollow=NoFollow.AT_FLAG),
    Syscall("openat2", 437, Effect.OPEN, dirfd=0, path=1, flags=2, nofollow=NoFollow.OPEN_FLAG, open_how=True),
    Syscall("faccessat2", 439, Effect.ACCESS, dirfd=0, path=1, mode=2, flags=3, nofollow=NoFollow.AT_FLAG),
)

BY_NAME: dict[str, Syscall] = {s.name: s for s in SYSCALLS}
BY_NR: dict[int, Syscall] = {s.nr: s for s in SYSCALLS}

# An fstat in disguise (`newfstatat(fd, "", buf, AT_EMPTY_PATH)`, glibc's fstat) is let through by
# the filter: it removes a quarter of all stops on directory walks, and the file itself was
# recorded when it was opened. These are the calls where that form exists and is common.
FSTAT_IN_DISGUISE = ("newfstatat", "statx")
