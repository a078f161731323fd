"""Errors that the CLI turns into a one-line message and an exit code."""
from __future__ import annotations


class TracejailError(Exception):
    """A user-facing failure: `str(err)` is the one-line message, `exit_code` the process status."""

    exit_code: int = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(TracejailError):
    exit_code = 2


class CommandNotFound(TracejailError):
    exit_code = 127


class TraceFormatError(TracejailError):
    """A trace file that is missing, corrupt, foreign or of an unknown version."""

    exit_code = 65  # EX_DATAERR


class ElfError(TracejailError):
    """An ELF file that cannot be parsed (truncated, corrupt); the message names the file."""

    exit_code = 65


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so every clean-up that Ctrl-C runs (partial
    rootfs, temporary archive, jails, containers) runs for them too; the CLI exits 128+signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
