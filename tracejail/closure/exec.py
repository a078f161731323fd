"""What the kernel runs: a root is an ELF program (one link map) or a ``#!`` script, whose
interpreter (and, for ``#!/usr/bin/env NAME``, the command found along PATH as execvp() finds it)
is run in turn, up to Linux's recursion limit."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from ..elf import ELFMAG, ElfFacts, shebang_words
from ..errors import ElfError, TracejailError
from .files import LoaderFiles
from .model import Dependency, Results

# Linux's limit on interpreters (fs/exec.c: `depth > 5` is ELOOP): the file the exec names and five
# more, so a chain of five scripts ending in a program runs.
MAX_INTERPRETER_DEPTH = 5
# glibc's execvp() search path when PATH is unset.
DEFAULT_PATH = "/bin:/usr/bin"


class Inherit:
    """The PATH a command inherits (as opposed to one env sets, or unsets)."""


INHERIT = Inherit()


@dataclass(frozen=True)
class EnvRun:
    """What `#!/usr/bin/env ARG` runs: the command (None: env runs nothing: it prints the
    environment, or rejects its arguments) and the PATH it is looked up with."""

    command: str | None
    path: str | None | Inherit = INHERIT


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
        interp, arg = shebang_words(head)
        if not interp:
            return
        interp_path = interp if interp.startswith("/") else self.files.absolute(interp)
        if interp_path is None or not self.files.exists(interp_path):
            self.results.missing(interp, path, (interp_path or interp,))
            return
        self.results.edge(Dependency(interp_path, path, interp, "shebang"))
        self._program(interp_path, depth + 1)
        if os.path.basename(interp_path) == "env" and arg is not None:
            run = env_run(arg)
            if run.command is None:
                return
            command = run.command
            found, searched, where = self.which(command, run.path)
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

    def which(self, command: str, path_env: str | None | Inherit = INHERIT) -> tuple[str | None, list[str], str]:
        """execvp()'s PATH search, inside the root: (the path found, the directories searched, and
        where it was found, in words). `path_env`: the PATH env sets for the command (None:
        unset), instead of the one it inherits."""
        if "/" in command:
            path = self.files.absolute(command)
            return (path if path and self.files.is_executable(path) else None), [path or command], "its path"
        current = self.path_env if isinstance(path_env, Inherit) else path_env
        search = current if current is not None else DEFAULT_PATH
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


def env_run(arg: str) -> EnvRun:
    """What GNU env does with the one argument the kernel hands it (the script's path follows it).
    Only `-S` (`--split-string=`) splits it into words: `#!/usr/bin/env python3 -u` looks for a
    command named `python3 -u`, `-i NAME=1 prog` is an invalid cluster of options. Where the
    argument names no command (`NAME=1 prog` only sets a variable), the next word, the script
    itself, is the command, and env runs it again forever: nothing new for the closure either way.
    Checked against the kernel and coreutils' env in tests/test_closure_exec.py."""
    if arg.startswith("--"):
        name, eq, value = arg[2:].partition("=")
        if name and eq and "split-string".startswith(name):   # getopt_long: any unique prefix
            return env_words(value.split())
        return EnvRun(None)
    if arg.startswith("-") and arg != "-":
        cleared = False
        for i, c in enumerate(arg[1:], 1):
            if c == "i":
                cleared = True
            elif c in "v0":
                continue
            elif c == "S":
                run = env_words(arg[i + 1:].split())
                return EnvRun(run.command, None) if cleared and isinstance(run.path, Inherit) else run
            else:
                return EnvRun(None)   # -u and -C take the rest of the word (then no command); others are invalid
        return EnvRun(None)
    if arg == "-" or "=" in arg:
        return EnvRun(None)           # `-` is -i; NAME=VALUE: no command either way
    return EnvRun(arg)


def env_words(tokens: list[str]) -> EnvRun:
    """What env does with separate words (split by -S): skips options, -S, and NAME=VALUE (a
    PATH=... among them, -i and -u PATH change where the command is looked up)."""
    path: str | None | Inherit = INHERIT
    argument_of: str | None = None   # the option whose argument the next word is
    for token in tokens:
        if argument_of is not None:
            if argument_of in ("-u", "--unset") and token == "PATH":
                path = None
            argument_of = None
            continue
        if token in ("-u", "--unset", "-C", "--chdir"):
            argument_of = token
            continue
        if token in ("-uPATH", "--unset=PATH"):
            path = None
            continue
        if token in ("-i", "-", "--ignore-environment"):
            path = None
            continue
        # The string of -SSTRING / --split-string=STRING is split into words: its first is a word too.
        for option in ("--split-string=", "-S"):
            if token.startswith(option) and len(token) > len(option):
                token = token[len(option):]
                break
        if token.startswith("-"):
            continue  # -S, -v, -0, --split-string=... (the split words follow)
        if "=" in token:
            name, _, value = token.partition("=")
            if name == "PATH":
                path = value
            continue
        return EnvRun(token, path)
    return EnvRun(None)
