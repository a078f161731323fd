"""Printing what a trace or a program says: sizes, and control characters written out."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tracejail import trace as tr
from tracejail.text import human, parse_size, shown

TJ = [sys.executable, "-m", "tracejail"]
OSC = "\x1b]0;owned\x07"                     # sets the terminal's title
EVIL = f"/tmp/x{OSC}\x1b[2J\n/fake: line\u202egnp.exe\x9b31m"


def test_shown_writes_controls_out() -> None:
    assert shown(EVIL) == r"/tmp/x\e]0;owned\x07\e[2J\n/fake: line\u202egnp.exe\x9b31m"
    assert shown("line 1\n\tline 2\x1b[31m", block=True) == "line 1\n\tline 2\\e[31m"
    assert shown("caf\u00e9 \u4e2d") == "caf\u00e9 \u4e2d"          # printable text is left alone
    assert shown("bad\udcffbyte") == r"bad\udcffbyte"


def test_sizes() -> None:
    assert (parse_size("4G"), parse_size("512M"), parse_size("100k"), parse_size("7")) == \
        (4 << 30, 512 << 20, 100 << 10, 7)
    with pytest.raises(ValueError):
        parse_size("lots")
    assert human(1500) == "1.5 KB"


def test_inspect_explain_and_errors_never_print_a_control_character(tmp_path: Path) -> None:
    run = tr.Run(argv=["/bin/echo", EVIL], executable="/bin/echo", cwd="/", uid=0, gid=0, environment={},
                 started="2026-11-29T00:00:00Z", exit_code=0,
                 exercises=[tr.ExerciseResult(f"curl {EVIL}", 0, "", "")],
                 processes=[tr.ProcessInfo(7, None, ["/bin/echo", EVIL], "/bin/echo")])
    trace = tr.Trace(runs=[run])
    trace.record("/bin/echo").add("exec", "execve", "ok", 7)
    trace.record(EVIL).add("read", "openat", "ok", 7)
    path = tmp_path / "t.json"
    tr.save(trace, str(path))
    outputs = []
    for args in (["inspect", str(path), "--misses"], ["explain", str(path), EVIL], ["build", str(path), "-o",
                 str(tmp_path / "i.tar")], ["deps", EVIL]):
        proc = subprocess.run([*TJ, *args], capture_output=True, text=True, timeout=120)
        outputs.append(proc.stdout + proc.stderr)
    for out in outputs:
        assert "\x1b" not in out and "\x9b" not in out and "\u202e" not in out, out
        assert "\n/fake: line" not in out
    assert r"\e]0;owned\x07" in outputs[0]
    js = subprocess.run([*TJ, "inspect", str(path), "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(js.stdout)["runs"][0]["argv"][1] == EVIL    # JSON carries it exactly, escaped
