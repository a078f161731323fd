"""What the kernel runs: a root is an ELF program (one link map) or a ``#!`` script, whose
interpreter (and, for ``#!/usr/bin/env NAME``, the command found along PATH as execvp() finds it)
is run in turn, up to Linux's recursion limit."""
from __future__ import annotations

import os
from collections.abc import Callable

from ..elf import ELFMAG, ElfFacts
from ..errors import ElfError, TracejailError
from .files import LoaderFiles
from .model import Dependency, Results

# Linux's limit on interpreters (fs/exec.c: `depth > 5` is ELOOP): the file the exec names and five
# more, so a chain of five scripts ending in a program runs.
MAX_INTERPRETER_DEPTH = 5
# glibc's execvp() search path when PATH is unset.
DEFAULT_PATH = "/bin:/usr/bin"


class Programs:
    """Roots and the programs the kernel runs for them; `link` models one ELF program's loader
    run (it is called once per program path)."""

    def __init__(self, files: LoaderFiles, results: Results, path_env: str | None,
                 link: Callable[[str, ElfFacts], None]) -> None:
        self.files = files
        self.results = results
        self.path_env = path_env
        self._link = link
        self._done: set[str] = set()

    def add_root(self, path: str) -> None:
        if not path.startswith("/"):
            path = os.path.abspath(path) if self.files.is_host else "/" + path
        if path in self.results.roots:
            return
        if os.path.isdir(self.files.host(path)):
            return  # not a program
        try:
            head = self.files.head(path)
        except OSError as err:
            self.results.fail(TracejailError(f"{path}: cannot read: {err.strerror or err}"))
            return
        if head.startswith(ELFMAG):
            self.results.roots.append(path)
            self._elf(path)
        elif head.startswith(b"#!"):
            self.results.roots.append(path)
            if path not in self._done:
                self._script(path, head, depth=0)
        # Anything else (data, text) is not loaded by anyone: ignored.

    def _elf(self, path: str) -> None:
        if path in self._done:
            return
        self._done.add(path)
        try:
            facts = self.files.facts(path)
        except ElfError as err:
            self.results.fail(err)
            return
        except OSError as err:
            self.results.fail(TracejailError(f"{path}: cannot read: {err.strerror or err}"))
            return
        if facts is not None:
            self._link(path, facts)

    def _script(self, path: str, head: bytes, depth: int) -> None:
        self._done.add(path)
        line = head[2:].split(b"\n", 1)[0].strip(b" \t\r")
        if not line:
            return
        parts = line.split(None, 1)
        interp = os.fsdecode(parts[0])
        arg = os.fsdecode(parts[1]).strip() if len(parts) > 1 else ""
        interp_path = interp if interp.startswith("/") else self.files.absolute(interp)
        if interp_path is None or not self.files.exists(interp_path):
            self.results.missing(interp, path, (interp_path or interp,))
            return
        self.results.edge(Dependency(interp_path, path, interp, "shebang"))
        self._program(interp_path, depth + 1)
        if os.path.basename(interp_path) == "env" and arg:
            command = env_command(arg)
            if command is None:
                return
            found, searched, where = self.which(command)
            if found is None:
                self.results.missing(command, path, searched)
                return
            self.results.edge(Dependency(found, path, command, "env-shebang", reason=f"{interp} runs {command} from {where}"))
            self._program(found, 0)   # env execve()s it: the kernel counts interpreters afresh

    def _program(self, path: str, depth: int) -> None:
        """A file the kernel executes on the script's behalf: ELF or another script."""
        if path in self._done:
            return
        if depth > MAX_INTERPRETER_DEPTH:
            self.results.fail(TracejailError(f"{path}: too many levels of #! interpreters"))
            return
        try:
            head = self.files.head(path)
        except OSError:
            return
        if head.startswith(ELFMAG):
            self._elf(path)
        elif head.startswith(b"#!"):
            self._script(path, head, depth)

    def which(self, command: str) -> tuple[str | None, list[str], str]:
        """execvp()'s PATH search, inside the root: (the path found, the directories searched, and
        where it was found, in words)."""
        if "/" in command:
            path = self.files.absolute(command)
            return (path if path and self.files.is_executable(path) else None), [path or command], "its path"
        search = self.path_env if self.path_env is not None else DEFAULT_PATH
        searched: list[str] = []
        for directory in search.split(":"):
            directory = directory or "."
            if not directory.startswith("/"):
                absolute = self.files.absolute(directory)
                if absolute is None:
                    continue
                directory = absolute
            searched.append(directory)
            candidate = directory.rstrip("/") + "/" + command
            if self.files.is_executable(candidate):
                return candidate, searched, f"PATH entry {directory}"
        return None, searched, ""


def env_command(arg: str) -> str | None:
    """The command `/usr/bin/env ARG` runs: skips options, -S, and NAME=VALUE."""
    tokens = arg.split()
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
            continue
        if token in ("-u", "--unset", "-C", "--chdir"):
            skip_next = True
            continue
        # The string of -SSTRING / --split-string=STRING is split into words: its first is a word too.
        for option in ("--split-string=", "-S"):
            if token.startswith(option) and len(token) > len(option):
                token = token[len(option):]
                break
        if token.startswith("-"):
            continue  # -S, -i, -, --split-string=... (the split words follow)
        if "=" in token:
            continue
        return token
    return None
