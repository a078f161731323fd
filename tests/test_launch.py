"""The console entry point: record's early tracer process never outlives the command, and the
quick exit still does what interpreter shutdown does (threads, atexit, flushed streams)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

TJ = [sys.executable, "-m", "tracejail"]


def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds `marker` (a forked child keeps its parent's)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in environ and state != b"Z":
            found.append(int(entry))
    return found


@pytest.mark.parametrize("args, code", [
    (["record", "--help"], 0),
    (["record", "--no-such-option", "--", "/bin/true"], 2),
    (["record"], 2),
    (["record", "-o", "/nonexistent-dir/t.json", "--", "/bin/true"], 1),
    (["record", "-o", "{tmp}/t.json", "--", "/no/such/command"], 127),
])
def test_record_leaves_no_process_behind(tmp_path: Path, args: list[str], code: int) -> None:
    marker = f"TJ_TEST_{uuid.uuid4().hex}"
    env = {**os.environ, marker: "1"}
    proc = subprocess.run([*TJ, *(a.format(tmp=tmp_path) for a in args)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert _processes_with(marker) == []


def test_record_through_the_entry_point_records(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    proc = subprocess.run([*TJ, "record", "-o", str(out), "--", "/bin/cat", "/etc/hostname"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from tracejail import trace as tr

    assert tr.load(str(out)).files["/etc/hostname"].ok


def _exit_now(body: str) -> subprocess.CompletedProcess:
    code = "from tracejail.launch import exit_now\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)


def test_quick_exit_joins_threads_runs_atexit_and_flushes() -> None:
    proc = _exit_now("""
        import atexit, sys, threading, time
        atexit.register(lambda: print("atexit ran"))
        def late():
            time.sleep(0.2)
            print("thread done")
        threading.Thread(target=late).start()
        print("buffered", end="")
        sys.stderr.write("to stderr")
        exit_now(3)
    """)
    assert proc.returncode == 3
    assert proc.stdout == "bufferedthread done\natexit ran\n" and proc.stderr == "to stderr"


def test_quick_exit_stops_an_executor_nobody_shut_down() -> None:
    # Its idle workers wait for work until threading's exit hook tells them to stop: joined
    # without it, the exit would wait forever.
    proc = _exit_now("""
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(2)
        print(pool.submit(lambda: 41 + 1).result())
        exit_now(0)
    """)
    assert (proc.returncode, proc.stdout) == (0, "42\n")


@pytest.mark.parametrize("code, status, stderr", [(None, 0, ""), (0, 0, ""), (2, 2, ""), (256 + 7, 7, ""),
                                                  ("a message", 1, "a message\n")])
def test_quick_exit_takes_a_system_exit_code(code: object, status: int, stderr: str) -> None:
    proc = _exit_now(f"exit_now({code!r})")
    assert (proc.returncode, proc.stderr) == (status, stderr)


def test_quick_exit_to_a_reader_that_went_away_is_exit_1() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-c", "from tracejail.launch import exit_now\n"
                               "print('x' * 100)\nexit_now(0)"], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60, env={**os.environ, "PYTHONUNBUFFERED": ""})
    finally:
        os.close(write_end)
    assert proc.returncode == 1 and proc.stderr == ""
