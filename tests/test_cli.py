"""The click layer (cli.py, cli_inspect.py, cli_verify.py): every command and group answers --help;
click's own usage errors; tracejail's usage errors and bad input (a trace that is missing, not
JSON, JSON but not a trace) end in one line on stderr with the README's exit code and no
traceback; --json output parses; a piped run prints no progress lines, a terminal gets them; exit
codes of `record` for a command's status, a missing command and an unwritable -o. The commands run
in-process through click's test runner where nothing is forked, as `python -m tracejail` otherwise;
nothing here records more than /bin/true, `sleep` and `echo`, or builds an image."""
from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import click
import pytest
from click.testing import CliRunner, Result

from tracejail import __version__
from tracejail.cli import main

TJ = [sys.executable, "-m", "tracejail"]
COMMANDS = ["build", "cache", "deps", "explain", "inspect", "minify", "push", "record", "verify"]
SUBCOMMANDS = ["cache df", "cache prune"]
FORMAT = "tracejail-trace/1"


@pytest.fixture(autouse=True)
def in_tmp_and_signals_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Commands run in a directory of the test's own (record's default -o is ./trace.json), and
    the SIGTERM/SIGHUP handlers handle_errors installs in-process are put back afterwards."""
    monkeypatch.chdir(tmp_path)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def runner() -> CliRunner:
    """A runner that keeps stderr apart (click before 8.2 mixes it in unless told not to)."""
    try:
        return CliRunner(mix_stderr=False)   # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def invoke(*args: str) -> Result:
    """`tracejail ARGS` in this process; an exception that is not an exit fails the test."""
    return runner().invoke(main, list(args), prog_name="tracejail", catch_exceptions=False)


def run_tj(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TJ, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def one_line(stderr: str) -> str:
    """The single line tracejail's own errors are: `tracejail: ...`."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tracejail: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def click_usage_error(result: Result) -> str:
    """click's usage error: exit 2, usage and hint lines, and one `Error:` line; no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stdout == ""
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and result.stderr.startswith("Usage: tracejail"), result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


# --- help and version ----------------------------------------------------------------------------

def test_the_group_lists_every_command_lazy_ones_included() -> None:
    with click.Context(main) as ctx:
        assert main.list_commands(ctx) == COMMANDS
        assert all(isinstance(main.get_command(ctx, name), click.Command) for name in COMMANDS)
    listed = invoke("--help").stdout
    assert all(f"\n  {name} " in listed for name in COMMANDS), listed


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("command", ["", *COMMANDS, *SUBCOMMANDS])
def test_every_command_answers_help(command: str, flag: str) -> None:
    result = invoke(*command.split(), flag)
    assert result.exit_code == 0 and result.stderr == ""
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"Usage: tracejail {command}".rstrip() + " "), first


def test_module_entry_point_answers_help_and_version() -> None:
    proc = run_tj("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: ") and proc.stderr == ""
    for flag in ("--version", "-V"):
        proc = run_tj(flag)
        assert proc.returncode == 0 and proc.stdout == f"tracejail, version {__version__}\n", proc


# --- click's usage errors --------------------------------------------------------------------------

def test_unknown_command_is_a_usage_error() -> None:
    assert click_usage_error(invoke("bogus")) == "Error: No such command 'bogus'."
    assert click_usage_error(invoke("recrod")) == "Error: No such command 'recrod'. Did you mean 'record'?"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "record"])
def test_unknown_option_is_a_usage_error(command: str) -> None:
    assert click_usage_error(invoke(command, "--no-such-option")).startswith(
        "Error: No such option '--no-such-option'")


def test_unknown_option_of_record_is_a_usage_error() -> None:
    proc = run_tj("record", "--exercize", "true", "--", "true")
    assert proc.returncode == 2, proc


@pytest.mark.parametrize("args,wanted", [
    (["explain", "t.json"], "Error: Missing argument 'PATH...'."),
    (["minify"], "Error: Missing argument 'IMAGE'."),
    (["inspect", "--top", "0", "t.json"], "Error: Invalid value for '--top': 0 is not in the range x>=1."),
    (["record", "--timeout", "-1", "--", "true"], "Error: Invalid value for '--timeout': -1.0 is not in the range x>=0."),
    (["verify", "--max-rounds", "99", "t.json"], "Error: Invalid value for '--max-rounds': 99 is not in the range 1<=x<=50."),
    (["build", "t.json", "--sbom-format", "xml"], "Error: Invalid value for '--sbom-format': 'xml' is not one of 'spdx', 'cyclonedx'."),
    (["push", "no-such-archive.tar", "r/x:1"], "Error: Invalid value for 'ARCHIVE|DIR': Path 'no-such-archive.tar' does not exist."),
], ids=["explain-no-path", "minify-no-image", "inspect-top", "record-timeout", "verify-rounds", "build-sbom", "push-archive"])
def test_bad_arguments_are_clicks_usage_errors(args: list[str], wanted: str) -> None:
    assert click_usage_error(invoke(*args)) == wanted


# --- tracejail's own usage errors: one line, exit 2 --------------------------------------------------

@pytest.mark.parametrize("args,wanted", [
    (["record"], "no command given: put it after `--`"),
    (["record", "--ready-port", "8000", "--", "true"], "--ready-port and --ready-delay only apply with --exercise"),
    (["record", "--ready-delay", "1", "--", "true"], "--ready-port and --ready-delay only apply with --exercise"),
    (["record", "--user", "app", "--", "true"], "--user only applies with --image"),
    (["verify", "t.json"], "give the image with -t IMAGE or a staged tree with --rootfs DIR"),
    (["verify", "-t", "x", "--rootfs", ".", "t.json"], "give the image with -t IMAGE or a staged tree with --rootfs DIR"),
    (["verify", "--rootfs", ".", "--fix", "--no-trace-inside", "t.json"], "--fix needs the misses that --trace-inside finds"),
    (["build", "t.json", "--max-file-size", "12Q"], "--max-file-size: '12Q' is not a size"),
    (["build", "t.json", "--label", "novalue"], "--label 'novalue': give KEY=VALUE"),
], ids=["record-no-command", "ready-port", "ready-delay", "user-without-image", "verify-no-target", "verify-two-targets",
        "fix-without-trace-inside", "max-file-size", "label"])
def test_own_usage_errors_are_one_line_exit_2(args: list[str], wanted: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2 and result.stdout == ""
    assert one_line(result.stderr).startswith(f"tracejail: {wanted}")


def test_push_of_a_bad_reference_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "junk.tar").write_bytes(b"junk" * 100)
    result = invoke("push", "junk.tar", "Bad::Ref")
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith("tracejail: invalid image name 'Bad::Ref'")


# --- bad traces: one line, exit 65 -------------------------------------------------------------------

BAD_TRACES = {
    "not-json": b"not json {",
    "not-utf8": b"\xff\xfe{}",
    "empty-object": b"{}",
    "other-format": json.dumps({"format": "something-else/1", "runs": [], "files": []}).encode(),
    "newer-version": json.dumps({"format": "tracejail-trace/9", "runs": [], "files": []}).encode(),
    "bad-field": json.dumps({"format": FORMAT, "runs": 5, "files": []}).encode(),
    "no-files": json.dumps({"format": FORMAT, "runs": []}).encode(),
    "truncated": json.dumps({"format": FORMAT, "runs": [], "files": []}).encode()[:-3],
}
# what the one line says about each
BAD_SAYS = {"missing": "trace not found: ", "not-json": "is not valid JSON", "not-utf8": "is not valid JSON",
            "empty-object": "is not a tracejail trace", "other-format": "is not a tracejail trace",
            "newer-version": "has format 'tracejail-trace/9'", "bad-field": "field runs must be a list",
            "no-files": "field files must be present", "truncated": "is not valid JSON"}


def command_on(command: str, trace: str, tmp_path: Path) -> list[str]:
    """The cheapest form of `command` that reads `trace` first."""
    return {"inspect": ["inspect", trace], "explain": ["explain", trace, "/bin/true"],
            "build": ["build", trace, "--no-load", "-o", str(tmp_path / "out.tar")],
            "verify": ["verify", "--rootfs", str(tmp_path), trace]}[command]


@pytest.mark.parametrize("kind", ["missing", *BAD_TRACES])
@pytest.mark.parametrize("command", ["inspect", "explain", "build", "verify"])
def test_bad_trace_is_one_line_exit_65(tmp_path: Path, command: str, kind: str) -> None:
    trace = tmp_path / f"{kind}.json"
    if kind != "missing":
        trace.write_bytes(BAD_TRACES[kind])
    result = invoke(*command_on(command, str(trace), tmp_path))
    assert result.exit_code == 65, result.output
    line = one_line(result.stderr)
    assert str(trace) in line and BAD_SAYS[kind] in line, line
    assert result.stdout == ""
    assert not (tmp_path / "out.tar").exists()


@pytest.mark.parametrize("document", ["[1, 2]", "5", "null", '"a string"'])
def test_json_that_is_not_an_object_is_not_a_trace_rather_than_invalid_json(tmp_path: Path, document: str) -> None:
    (tmp_path / "t.json").write_text(document)
    result = invoke("inspect", "t.json")
    assert result.exit_code == 65
    assert "is not a tracejail trace" in one_line(result.stderr)


def test_verify_of_a_trace_without_runs_is_exit_65(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text(json.dumps({"format": FORMAT, "runs": [], "files": []}))
    result = invoke("verify", "--rootfs", str(tmp_path), "t.json")
    assert result.exit_code == 65
    assert one_line(result.stderr) == "tracejail: t.json holds no runs; record one with `tracejail record`"


def test_a_directory_given_as_trace_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "d.json").mkdir()
    assert click_usage_error(invoke("inspect", "d.json")) == \
        "Error: Invalid value for 'TRACE.json': File 'd.json' is a directory."


def test_error_lines_write_control_characters_out(tmp_path: Path) -> None:
    # A name that would recolour the terminal or forge a second line is shown escaped.
    result = invoke("inspect", "a\x1b[31mred\nforged.json")
    assert result.exit_code == 65
    line = one_line(result.stderr)
    assert "\x1b" not in result.stderr and "a\\e[31mred\\nforged.json" in line


def test_push_of_a_corrupt_archive_is_exit_65(tmp_path: Path) -> None:
    (tmp_path / "junk.tar").write_bytes(b"junk" * 100)
    result = invoke("push", "junk.tar", "127.0.0.1:9/tjtest/x:1")
    assert result.exit_code == 65
    assert one_line(result.stderr).startswith("tracejail: junk.tar is neither an OCI layout directory nor")


# --- deps -------------------------------------------------------------------------------------------

def test_deps_json_parses_and_names_libc() -> None:
    result = invoke("deps", "--json", "/bin/true")
    assert result.exit_code == 0 and result.stderr == ""
    closure = json.loads(result.stdout)
    assert closure["unresolved"] == [] and closure["errors"] == []
    names = {d["name"] for d in closure["deps"]}
    assert "libc.so.6" in names
    assert all(d["path"].startswith("/") for d in closure["deps"])


def test_deps_says_which_files_load_nothing(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a program\n")
    result = invoke("deps", str(text), "/bin/true")
    assert result.exit_code == 0 and "libc.so.6" in result.stdout
    assert one_line(result.stderr) == f"tracejail: {text}: neither an ELF file nor a #! script: it has no closure"


def test_deps_tree_and_missing_file() -> None:
    result = invoke("deps", "/bin/true")
    assert result.exit_code == 0 and "libc.so.6" in result.stdout
    result = invoke("deps", "/bin/true", "no-such-file")
    assert result.exit_code == 1 and result.stdout == ""
    assert one_line(result.stderr) == "tracejail: no such file: no-such-file"


# --- a real trace of /bin/true: inspect and explain, --json -------------------------------------------

@pytest.fixture(scope="module")
def true_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tracejail record -- /bin/true`, recorded in its own directory (the run's cwd)."""
    where = tmp_path_factory.mktemp("true")
    proc = run_tj("record", "-o", "trace.json", "--", "/bin/true", cwd=where)
    assert proc.returncode == 0, proc.stderr
    return where / "trace.json"


def test_record_of_true_is_quiet_and_ends_with_its_summary(tmp_path: Path) -> None:
    proc = run_tj("record", "-o", "t.json", "--", "/bin/true", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == ""
    line = one_line(proc.stderr)
    assert line.startswith("tracejail: recorded: exit 0, 1 processes, ") and line.endswith(" -> t.json"), line
    assert json.loads((tmp_path / "t.json").read_text())["format"] == FORMAT


def test_inspect_json_parses(true_trace: Path) -> None:
    result = invoke("inspect", "--json", str(true_trace))
    assert result.exit_code == 0 and result.stderr == ""
    report = json.loads(result.stdout)
    assert report["format"] == FORMAT
    assert "/usr/bin/true" in report["image"]["by_kind"]["elf-executable"]["examples"]


def test_explain_json_parses_and_relative_paths_mean_the_runs_cwd(true_trace: Path) -> None:
    result = invoke("explain", "--json", str(true_trace), "/bin/true", "/etc/shadow", "here.txt")
    assert result.exit_code == 0 and result.stderr == ""
    kept, shadow, here = json.loads(result.stdout)
    assert kept["path"] == "/bin/true" and kept["in_image"] is True
    assert shadow["in_image"] is False
    assert here["path"] == str(true_trace.parent / "here.txt")


def test_inspect_and_explain_print_nothing_on_stderr_when_piped(true_trace: Path) -> None:
    for args in (["inspect", str(true_trace)], ["explain", str(true_trace), "/bin/true"]):
        proc = run_tj(*args)
        assert proc.returncode == 0 and proc.stderr == "" and proc.stdout, proc


# --- record's exit codes and its output on a pipe and on a terminal -----------------------------------

@pytest.mark.parametrize("script,status", [("exit 7", 7), ("kill -TERM $$", 128 + signal.SIGTERM)],
                         ids=["exit-7", "sigterm"])
def test_record_exits_with_the_commands_status(tmp_path: Path, script: str, status: int) -> None:
    proc = run_tj("record", "-o", "t.json", "--", "/bin/sh", "-c", script, cwd=tmp_path)
    assert proc.returncode == status, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert any(ln.startswith("tracejail: recorded: ") for ln in lines)
    assert any(ln.startswith("tracejail: warning: ") for ln in lines), proc.stderr   # a failed run says so
    assert (tmp_path / "t.json").exists()                                            # and is written all the same


def test_record_of_an_unknown_command_is_exit_127(tmp_path: Path) -> None:
    proc = run_tj("record", "-o", "t.json", "--", "no-such-command-tj", cwd=tmp_path)
    assert proc.returncode == 127
    assert one_line(proc.stderr) == "tracejail: command not found: no-such-command-tj"
    assert not (tmp_path / "t.json").exists()


def test_record_to_an_unwritable_output_fails_before_the_command_runs(tmp_path: Path) -> None:
    proc = run_tj("record", "-o", "missing-dir/t.json", "--", "/bin/touch", "ran", cwd=tmp_path)
    assert proc.returncode == 1
    assert one_line(proc.stderr).startswith("tracejail: cannot write missing-dir/t.json: No such file or directory")
    assert not (tmp_path / "ran").exists()
    (tmp_path / "dir.json").mkdir()
    proc = run_tj("record", "-o", "dir.json", "--", "/bin/touch", "ran", cwd=tmp_path)
    assert proc.returncode == 1 and one_line(proc.stderr) == "tracejail: cannot write dir.json: it is a directory"
    assert not (tmp_path / "ran").exists()


EXERCISED = ["record", "-o", "t.json", "--exercise", "echo hi", "--ready-delay", "0", "--stop-timeout", "5",
             "--", "sleep", "30"]


def test_record_with_exercises_prints_no_progress_when_piped(tmp_path: Path) -> None:
    proc = run_tj(*EXERCISED, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == ""
    assert one_line(proc.stderr).startswith("tracejail: recorded: stopped after the exercises, ")
    assert "1/1 exercises passed" in proc.stderr


def test_record_with_exercises_prints_progress_on_a_terminal(tmp_path: Path) -> None:
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run([*TJ, *EXERCISED], stdout=subprocess.PIPE, stderr=terminal, stdin=subprocess.DEVNULL,
                              cwd=tmp_path, timeout=60)
    finally:
        os.close(terminal)
    said = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:          # EIO: nothing left on a terminal nobody holds open
            break
        if not chunk:
            break
        said += chunk
    os.close(controller)
    assert proc.returncode == 0
    lines = said.decode().splitlines()
    assert lines[:2] == ["tracejail: waiting for the command to be ready", "tracejail: exercise: echo hi"], lines
    assert lines[-1].startswith("tracejail: recorded: stopped after the exercises, ")


def test_broken_pipe_ends_quietly() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*TJ, "deps", "--json", "/bin/true"], stdout=write_end, stderr=subprocess.PIPE, text=True,
                              timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 1 and proc.stderr == ""
