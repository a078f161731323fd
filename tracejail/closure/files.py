"""The filesystem the loader sees: loader paths inside one root, opened through root.Root."""
from __future__ import annotations

import os

from ..elf import ElfCache, ElfFacts, read_file
from ..root import Root, Status


class LoaderFiles:
    """A root as the modelled processes see it: every path goes through the root's resolver (so
    a symlink never leads out of it), ELF facts through the shared ElfCache, and relative
    paths through the recorded working directory."""

    def __init__(self, tree: Root, elf: ElfCache, cwd: str | None) -> None:
        self.tree = tree
        self.elf = elf
        self.cwd = cwd
        self.is_host = tree.is_host
        self._isdir: dict[str, bool] = {}

    def host(self, path: str) -> str:
        """The host path to open for a loader path: canonical when it exists (no symlink left to
        follow), a path that does not exist otherwise."""
        res = self.tree.resolve(path)
        if res.status is Status.OK:
            return self.tree.host(res.path)
        if res.status is Status.RUNTIME and self.is_host:
            return os.path.normpath(path)   # `tracejail deps` on a host file below /run or /dev
        return self.tree.host(res.spelled_tail())

    def realpath(self, path: str) -> str:
        return self.tree.realpath(path)

    def exists(self, path: str) -> bool:
        return self.tree.exists(path)

    def isdir(self, path: str) -> bool:
        known = self._isdir.get(path)
        if known is None:
            known = os.path.isdir(self.host(path))
            self._isdir[path] = known
        return known

    def is_executable(self, path: str) -> bool:
        host = self.host(path)
        return os.path.isfile(host) and os.access(host, os.X_OK)

    def head(self, path: str, size: int = 256) -> bytes:
        """The first bytes of a file; OSError when it cannot be read."""
        return read_file(self.host(path), size)

    def facts(self, path: str) -> ElfFacts | None:
        """Facts of a loader path; OSError if missing; ElfError if corrupt."""
        return self.elf.facts(self.host(path), path)

    def absolute(self, path: str) -> str | None:
        """`path` made absolute against the recorded working directory; None when that is unknown."""
        if path.startswith("/"):
            return path
        if self.cwd:
            return os.path.join(self.cwd, path)
        return None
