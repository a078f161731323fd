"""Tests for tracejail.closure.exec: what the kernel runs for a root, through resolve().

`#!` scripts and their interpreters (chains of scripts, Linux's recursion limit, relative
interpreters), `#!/usr/bin/env` with the command found along PATH as execvp() finds it, and
which roots are programs at all. Where the kernel itself can answer (does a chain of scripts
run?), the test runs the chain.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from toolchain import GCC, run
from tracejail.closure import Closure, Dependency, LoaderEnv, resolve
from tracejail.closure.exec import DEFAULT_PATH, INHERIT, EnvRun, env_run, env_words
from tracejail.errors import TracejailError

ENV = "/usr/bin/env"
TOO_DEEP = ": too many levels of #! interpreters"


# --- helpers -----------------------------------------------------------------


def script(path: Path, first_line: str, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{first_line}\nexit 0\n")
    path.chmod(mode)
    return path


def chain(top: Path, elf: Path, count: int) -> Path:
    """`count` scripts, each the interpreter of the next, the first run by `elf`: the last one's path."""
    interp = elf
    for level in range(1, count + 1):
        interp = script(top / f"s{level}", f"#!{interp}")
    return interp


def shebang_edges(closure: Closure) -> list[tuple[str, str, str]]:
    return [(d.path, d.needed_by, d.name) for d in closure.deps if d.rule == "shebang"]


def env_edges(closure: Closure) -> list[Dependency]:
    return [d for d in closure.deps if d.rule == "env-shebang"]


def kernel_runs(path: Path, env: dict[str, str] | None = None) -> bool:
    """Whether execve() of `path` runs it to a successful exit."""
    try:
        return subprocess.run([str(path)], capture_output=True, env=env).returncode == 0
    except OSError:   # the exec itself failed (ELOOP for too many #! levels)
        return False


@pytest.fixture(scope="module")
def elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small dynamically linked program that exits 0."""
    if GCC is None:
        pytest.skip("needs gcc")
    out = tmp_path_factory.mktemp("elf") / "tool"
    src = out.with_name("tool.c")
    src.write_text("int main(void) { return 0; }\n")
    run(GCC, "-o", str(out), str(src))
    return out


def tool_in(directory: Path, elf: Path, name: str = "mytool", mode: int = 0o755) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(elf, directory / name)
    (directory / name).chmod(mode)
    return directory / name


# --- #! chains ------------------------------------------------------------------------------


def test_script_chain_ends_in_the_elf_program(tmp_path: Path, elf: Path) -> None:
    s1 = script(tmp_path / "s1", f"#!{elf}")
    s2 = script(tmp_path / "s2", f"#! {s1}  -x")  # blanks around the interpreter, an argument after it
    closure = resolve([str(s2)])
    assert closure.roots == [str(s2)]
    assert shebang_edges(closure) == [(str(s1), str(s2), str(s1)), (str(elf), str(s1), str(elf))]
    # The ELF program at the end is linked like any program.
    assert [d.path for d in closure.deps if d.needed_by == str(elf) and d.rule == "interp"] == ["/lib64/ld-linux-x86-64.so.2"]
    assert any(d.needed_by == str(elf) and d.name == "libc.so.6" for d in closure.deps)
    assert closure.errors == [] and closure.unresolved == []
    assert kernel_runs(s2)


def test_four_levels_of_scripts(tmp_path: Path, elf: Path) -> None:
    top = chain(tmp_path, elf, 4)
    assert kernel_runs(top)
    closure = resolve([str(top)])
    assert len(shebang_edges(closure)) == 4 and closure.errors == []


def test_too_many_levels_of_scripts(tmp_path: Path, elf: Path) -> None:
    top = chain(tmp_path, elf, 6)
    with pytest.raises(OSError) as info:
        subprocess.run([str(top)], capture_output=True)
    assert info.value.errno == errno.ELOOP
    closure = resolve([str(top)], strict=False)
    assert len(closure.errors) == 1 and closure.errors[0].endswith(TOO_DEEP), closure.errors
    # The program at the end of the chain is never linked.
    assert not any(d.needed_by == str(elf) for d in closure.deps)
    with pytest.raises(TracejailError, match=re.escape(TOO_DEEP)):
        resolve([str(top)])


def test_five_levels_of_scripts_run_on_linux(tmp_path: Path, elf: Path) -> None:
    top = chain(tmp_path, elf, 5)
    assert kernel_runs(top)
    closure = resolve([str(top)], strict=False)
    assert closure.errors == []


def test_env_starts_a_new_exec(tmp_path: Path, elf: Path) -> None:
    chain(tmp_path / "bin", elf, 5)
    top = script(tmp_path / "top", f"#!{ENV} s5")
    path = f"{tmp_path / 'bin'}:/usr/bin:/bin"
    assert kernel_runs(top, env={"PATH": path})
    closure = resolve([str(top)], LoaderEnv(path=path), strict=False)
    assert closure.errors == []


def test_script_with_empty_shebang_is_a_root_with_nothing(tmp_path: Path) -> None:
    path = script(tmp_path / "empty", "#!   ")
    closure = resolve([str(path)])
    assert (closure.roots, closure.deps, closure.unresolved, closure.errors) == ([str(path)], [], [], [])


def test_interpreter_that_is_not_a_program(tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("plain text\n")
    path = script(tmp_path / "s", f"#!{data}")
    closure = resolve([str(path)])
    assert shebang_edges(closure) == [(str(data), str(path), str(data))]
    assert len(closure.deps) == 1 and closure.errors == []


def test_missing_interpreter(tmp_path: Path) -> None:
    path = script(tmp_path / "s", f"#!{tmp_path}/nowhere/interp")
    closure = resolve([str(path)])
    assert closure.deps == []
    assert [(u.name, u.needed_by, u.searched) for u in closure.unresolved] == [
        (f"{tmp_path}/nowhere/interp", str(path), (f"{tmp_path}/nowhere/interp",)),
    ]


def test_relative_interpreter_against_the_working_directory(tmp_path: Path, elf: Path) -> None:
    # The kernel opens a relative interpreter from the caller's working directory.
    tool_in(tmp_path / "tools", elf, "interp")
    path = script(tmp_path / "scripts" / "s", "#!tools/interp")
    closure = resolve([str(path)], LoaderEnv(cwd=str(tmp_path)))
    assert shebang_edges(closure) == [(f"{tmp_path}/tools/interp", str(path), "tools/interp")]
    assert subprocess.run([str(path)], cwd=tmp_path).returncode == 0
    # Another working directory, where there is no tools/interp.
    closure = resolve([str(path)], LoaderEnv(cwd=str(tmp_path / "scripts")))
    assert [(u.name, u.searched) for u in closure.unresolved] == [("tools/interp", (f"{tmp_path}/scripts/tools/interp",))]


def test_relative_interpreter_without_working_directory_is_missing(tmp_path: Path, elf: Path) -> None:
    tool_in(tmp_path / "tools", elf, "interp")
    path = script(tmp_path / "s", "#!tools/interp")
    closure = resolve([str(path)])
    assert shebang_edges(closure) == []
    assert [(u.name, u.needed_by, u.searched) for u in closure.unresolved] == [("tools/interp", str(path), ("tools/interp",))]


# --- #!/usr/bin/env -----------------------------------------------------------------------------


@pytest.mark.parametrize("line, command", [
    (f"#!{ENV} mytool", "mytool"),
    (f"#!{ENV} -S python3 -u", "python3"),
    (f"#!{ENV} -S -u X NAME=1 mytool", "mytool"),
])
def test_env_shebang_finds_the_command(tmp_path: Path, elf: Path, line: str, command: str) -> None:
    tools = tmp_path / "tools"
    tool_in(tools, elf, command)
    path = script(tmp_path / "s", line)
    closure = resolve([str(path)], LoaderEnv(path=f"/nonexistent:{tools}"))
    assert shebang_edges(closure)[0] == (ENV, str(path), ENV)
    assert env_edges(closure) == [Dependency(f"{tools}/{command}", str(path), command, "env-shebang",
                                             reason=f"{ENV} runs {command} from PATH entry {tools}")]
    # The command found is linked in turn.
    assert any(d.needed_by == f"{tools}/{command}" and d.rule == "interp" for d in closure.deps)


def test_env_shebang_path_order(tmp_path: Path, elf: Path) -> None:
    first, second = tool_in(tmp_path / "a", elf), tool_in(tmp_path / "b", elf)
    path = script(tmp_path / "s", f"#!{ENV} mytool")
    closure = resolve([str(path)], LoaderEnv(path=f"{tmp_path}/a:{tmp_path}/b"))
    assert [d.path for d in env_edges(closure)] == [str(first)]
    closure = resolve([str(path)], LoaderEnv(path=f"{tmp_path}/b:{tmp_path}/a"))
    assert [d.path for d in env_edges(closure)] == [str(second)]


def test_env_shebang_skips_what_cannot_be_executed(tmp_path: Path, elf: Path) -> None:
    # execvp() goes on past a file it may not execute and past a directory of that name.
    tool_in(tmp_path / "noexec", elf, mode=0o644)
    (tmp_path / "dir" / "mytool").mkdir(parents=True)
    good = tool_in(tmp_path / "good", elf)
    path = script(tmp_path / "s", f"#!{ENV} mytool")
    search = f"{tmp_path}/noexec:{tmp_path}/dir:{tmp_path}/good"
    closure = resolve([str(path)], LoaderEnv(path=search))
    assert [(d.path, d.reason) for d in env_edges(closure)] == [(str(good), f"{ENV} runs mytool from PATH entry {good.parent}")]
    assert kernel_runs(path, env={"PATH": search})
    # Without the good one: not found, naming every directory searched.
    closure = resolve([str(path)], LoaderEnv(path=f"{tmp_path}/noexec:{tmp_path}/dir"))
    assert env_edges(closure) == []
    assert [(u.name, u.needed_by, u.searched) for u in closure.unresolved] == [
        ("mytool", str(path), (f"{tmp_path}/noexec", f"{tmp_path}/dir")),
    ]


def test_env_shebang_relative_path_entries(tmp_path: Path, elf: Path) -> None:
    tool_in(tmp_path / "rel", elf)
    path = script(tmp_path / "s", f"#!{ENV} mytool")
    closure = resolve([str(path)], LoaderEnv(path="rel:/nonexistent", cwd=str(tmp_path)))
    assert [(d.path, d.reason) for d in env_edges(closure)] == [
        (f"{tmp_path}/rel/mytool", f"{ENV} runs mytool from PATH entry {tmp_path}/rel"),
    ]
    # An empty entry is the working directory.
    closure = resolve([str(path)], LoaderEnv(path="/nonexistent:", cwd=str(tmp_path / "rel")))
    assert [os.path.normpath(d.path) for d in env_edges(closure)] == [f"{tmp_path}/rel/mytool"]
    # Working directory unknown: relative entries are not searched.
    closure = resolve([str(path)], LoaderEnv(path="rel:/nonexistent"))
    assert env_edges(closure) == []
    assert [(u.name, u.searched) for u in closure.unresolved] == [("mytool", ("/nonexistent",))]


def test_env_shebang_command_with_a_slash(tmp_path: Path, elf: Path) -> None:
    tool = tool_in(tmp_path / "tools", elf)
    path = script(tmp_path / "s", f"#!{ENV} {tool}")
    closure = resolve([str(path)], LoaderEnv(path="/nonexistent"))
    assert [(d.path, d.reason) for d in env_edges(closure)] == [(str(tool), f"{ENV} runs {tool} from its path")]


@pytest.fixture
def staged(tmp_path: Path, elf: Path) -> Path:
    """A tree with its own /usr/bin/env (any ELF file named env) and a script /s using it."""
    root = tmp_path / "root"
    tool_in(root / "usr/bin", elf, "env")
    script(root / "s", f"#!{ENV} mytool")
    return root


def test_env_shebang_default_path(staged: Path, elf: Path) -> None:
    # No PATH recorded: execvp()'s default, /bin:/usr/bin, inside the tree.
    tool_in(staged / "usr/bin", elf)
    closure = resolve(["/s"], LoaderEnv(root=str(staged)))
    assert [(d.path, d.needed_by, d.reason) for d in env_edges(closure)] == [
        ("/usr/bin/mytool", "/s", f"{ENV} runs mytool from PATH entry /usr/bin"),
    ]
    tool_in(staged / "bin", elf)
    closure = resolve(["/s"], LoaderEnv(root=str(staged)))
    assert [d.path for d in env_edges(closure)] == ["/bin/mytool"]


def test_env_shebang_default_path_not_found(staged: Path) -> None:
    closure = resolve(["/s"], LoaderEnv(root=str(staged)), strict=False)
    assert [(u.name, u.searched) for u in closure.unresolved if u.name == "mytool"] == [("mytool", ("/bin", "/usr/bin"))]


def test_env_without_a_command(tmp_path: Path) -> None:
    path = script(tmp_path / "s", f"#!{ENV} -i NAME=1")
    closure = resolve([str(path)], LoaderEnv(path="/nonexistent"))
    assert env_edges(closure) == [] and closure.unresolved == []
    assert shebang_edges(closure)[0] == (ENV, str(path), ENV)


# --- roots ---------------------------------------------------------------------------------------


def test_directories_and_data_files_are_not_roots(tmp_path: Path, elf: Path) -> None:
    data = tmp_path / "notes.txt"
    data.write_text("not a program\n")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    closure = resolve([str(tmp_path), str(data), str(empty)])
    assert (closure.roots, closure.deps, closure.unresolved, closure.errors) == ([], [], [], [])


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(TracejailError, match=re.escape(f"{missing}: cannot read: No such file or directory")):
        resolve([str(missing)])
    closure = resolve([str(missing)], strict=False)
    assert closure.errors == [f"{missing}: cannot read: No such file or directory"] and closure.roots == []


def test_relative_root_on_the_host(tmp_path: Path, elf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool_in(tmp_path / "bin", elf)
    monkeypatch.chdir(tmp_path)
    closure = resolve(["bin/mytool", "./bin/../bin/mytool"])
    # Made absolute against the current directory; the same spelling once.
    assert closure.roots == [f"{tmp_path}/bin/mytool"]
    assert {d.needed_by for d in closure.deps if d.rule == "interp" and d.path == d.name} == {f"{tmp_path}/bin/mytool"}


def test_relative_root_in_a_tree(tmp_path: Path, elf: Path) -> None:
    root = tmp_path / "root"
    tool_in(root / "app", elf, "prog")
    closure = resolve(["app/prog"], LoaderEnv(root=str(root)), strict=False)
    assert closure.roots == ["/app/prog"]


def test_same_root_twice_is_one_root(tmp_path: Path, elf: Path) -> None:
    path = script(tmp_path / "s", f"#!{elf}")
    closure = resolve([str(path), str(path)])
    assert closure.roots == [str(path)]
    assert shebang_edges(closure) == [(str(elf), str(path), str(elf))]


# --- what env runs, against the kernel and GNU env ------------------------------------------------


ITSELF = "the script itself"


@pytest.mark.parametrize("arg, runs", [
    ("mytool", "mytool"),
    ("mytool -u", "mytool -u"),            # one word: env looks for a command with a space in its name
    ("missing -u", None),
    ("-S mytool -u", "mytool"),
    ("-Smytool -u", "mytool"),
    ("--split-string=mytool -u", "mytool"),
    ("--s=mytool", "mytool"),             # getopt_long takes a unique prefix
    ("-vS mytool", "mytool"),
    ("-iS mytool", None),                 # the environment cleared: PATH too, so /bin:/usr/bin
    ("-S PATH={other} othertool", "othertool"),
    ("-S -u PATH mytool", None),
    ("-S -i PATH={tools} mytool", "mytool"),
    ("-i NAME=1 mytool", None),           # one word: an invalid cluster of options
    # The next word env gets is the script's own path: with no command in ARG, env runs the
    # script again, forever. The closure needs nothing more for it.
    ("NAME=1 mytool", ITSELF),            # one word: a variable set
    ("-u X mytool", ITSELF),              # one word: the name of a variable to unset
    ("-", ITSELF),
    ("", ITSELF),
    ("mytool\r", None),                   # a CRLF script: the \r is part of the name
])
def test_env_shebang_runs_what_the_kernel_and_env_run(tmp_path: Path, arg: str, runs: str | None) -> None:
    if not Path(ENV).exists():
        pytest.skip("needs /usr/bin/env")
    tools, other = tmp_path / "tools", tmp_path / "other"
    ran = tmp_path / "ran"
    for directory, name in ((tools, "mytool"), (tools, "mytool -u"), (other, "othertool")):
        directory.mkdir(exist_ok=True)
        tool = directory / name
        tool.write_text(f"#!/bin/sh\nprintf %s {name!r} > {ran}\n")
        tool.chmod(0o755)
    arg = arg.format(tools=tools, other=other)
    path = tmp_path / "s"
    path.write_bytes(f"#!{ENV} {arg}\nexit 0\n".encode())
    path.chmod(0o755)
    search = f"{tools}:/usr/bin:/bin"
    try:
        subprocess.run([str(path)], capture_output=True, env={"PATH": search}, timeout=1)
        kernel = ran.read_text() if ran.exists() else None
    except subprocess.TimeoutExpired:   # the exec loop (killed by run())
        kernel = ITSELF
    closure = resolve([str(path)], LoaderEnv(path=search), strict=False)
    model = [d.name for d in env_edges(closure)]
    assert kernel == runs and model == ([runs] if runs and runs != ITSELF else []), (kernel, model)


@pytest.mark.parametrize("arg, run", [
    ("python3", EnvRun("python3")),
    ("python3 -u", EnvRun("python3 -u")),
    ("-S python3 -u", EnvRun("python3")),
    ("-S-i", EnvRun(None)),
    ("-iS python3", EnvRun("python3", None)),
    ("-S PATH=/opt/bin python3", EnvRun("python3", "/opt/bin")),
    ("--split-string", EnvRun(None)),
    ("--null", EnvRun(None)),
    ("-0", EnvRun(None)),
    ("-x python3", EnvRun(None)),
])
def test_env_run(arg: str, run: EnvRun) -> None:
    assert env_run(arg) == run


@pytest.mark.parametrize("words, run", [
    (["python3"], EnvRun("python3")),
    (["-u", "X", "NAME=1", "prog"], EnvRun("prog")),
    (["--unset", "X", "prog"], EnvRun("prog")),
    (["--unset=X", "prog"], EnvRun("prog")),
    (["-u", "PATH", "prog"], EnvRun("prog", None)),
    (["-uPATH", "prog"], EnvRun("prog", None)),
    (["-C", "/tmp", "prog"], EnvRun("prog")),
    (["--chdir=/tmp", "prog"], EnvRun("prog")),
    (["-i", "A=1", "B=2", "prog", "arg=3"], EnvRun("prog", None)),
    (["-i", "PATH=/x", "prog"], EnvRun("prog", "/x")),
    (["-", "prog"], EnvRun("prog", None)),
    (["--", "prog", "-x"], EnvRun("prog")),
    (["-Spython3", "-u"], EnvRun("python3")),
    (["NAME=1"], EnvRun(None)),
    (["-i"], EnvRun(None)),
    ([], EnvRun(None)),
])
def test_env_words(words: list[str], run: EnvRun) -> None:
    assert env_words(words) == run
    assert INHERIT is EnvRun("x").path and DEFAULT_PATH == "/bin:/usr/bin"
