"""The tracer process: started early (prestart) or forked when the job is known, under real
ptrace; what it hands back, and that it never outlives the recorder."""
from __future__ import annotations

import marshal
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tracejail import tracer_process
from tracejail.errors import TracejailError
from tracejail.record import RecordOptions, record
from tracejail.tracer_process import Job

FD_LISTER = ("import os; print(' '.join(sorted(os.listdir('/proc/self/fd'), key=int)))")


def _job(argv: list[str], cwd: str = "/") -> Job:
    return Job(argv, argv[0], {"PATH": "/usr/bin:/bin"}, cwd, use_seccomp=True, exact=False, pin_cpu=False,
               foreground_tty=None)


def _finish(tp: tracer_process.TracerProcess) -> tuple[str, bytes, dict]:
    """Read what the tracer process says and hands back, as record() does."""
    ch = tp.channels
    status = os.read(ch.status_r, 4096).decode()
    out = b""
    while chunk := os.read(ch.out_r, 65536):
        out += chunk
    os.waitpid(tp.pid, 0)
    for fd in (ch.status_r, ch.out_r, ch.err_r):
        os.close(fd)
    with os.fdopen(ch.result_fd, "rb") as f:
        f.seek(0)
        result = marshal.load(f) if status.startswith("ok ") else {}
    return status, out, result


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def test_job_crosses_a_pipe_whole() -> None:
    job = Job(["/bin/sh", "-c", "x" * 100_000], "/bin/sh", {"A": "1", "B": "é"}, "/tmp", use_seccomp=False,
              exact=True, pin_cpu=True, foreground_tty=0)
    back = Job.loads(job.dumps())
    assert {n: getattr(back, n) for n in Job.__slots__} == {n: getattr(job, n) for n in Job.__slots__}


def test_prestarted_process_runs_the_job_it_is_handed(tmp_path: Path) -> None:
    tracer_process.prestart()
    waiting = tracer_process._prestarted
    assert waiting is not None
    # A job larger than a pipe's buffer (64 KiB): written while the process reads it.
    tp = tracer_process.start(_job(["/bin/sh", "-c", f"cat {tmp_path}/x.txt", *["y" * 50_000] * 4],
                                   cwd=str(tmp_path)))
    assert tp.pid == waiting.pid and tracer_process._prestarted is None
    (tmp_path / "x.txt").write_text("")   # written after the job: the run had not started yet
    status, _out, result = _finish(tp)
    assert status.startswith("ok ") and status.split()[2] == "seccomp"
    assert result["exit_code"] == 0
    assert any(path == f"{tmp_path}/x.txt" for path, *_ in result["events"])


def test_without_prestart_a_new_process_is_forked() -> None:
    assert tracer_process._prestarted is None
    tp = tracer_process.start(_job(["/bin/echo", "forked"]))
    status, out, result = _finish(tp)
    assert status.startswith("ok ") and out == b"forked\n" and result["exit_code"] == 0


def test_discarded_prestart_leaves_no_process() -> None:
    tracer_process.prestart()
    pid = tracer_process._prestarted.pid
    tracer_process.discard_prestarted()
    assert tracer_process._prestarted is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)   # killed and reaped, not a zombie
    tracer_process.discard_prestarted()   # nothing left: a no-op


def test_prestart_after_its_process_died_forks_a_new_one() -> None:
    tracer_process.prestart()
    dead = tracer_process._prestarted.pid
    os.kill(dead, 9)
    os.waitpid(dead, 0)
    tp = tracer_process.start(_job(["/bin/true"]))
    assert tp.pid != dead
    status, _out, result = _finish(tp)
    assert status.startswith("ok ") and result["exit_code"] == 0


def test_prestarted_process_ends_with_a_recorder_that_never_sends_a_job() -> None:
    code = ("import os, sys; from tracejail import tracer_process; tracer_process.prestart(); "
            "print(tracer_process._prestarted.pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert _gone(int(out.stdout))


@pytest.mark.parametrize("prestarted", [True, False])
def test_the_traced_program_holds_no_descriptor_of_the_recorder(prestarted: bool) -> None:
    argv = [os.path.realpath(sys.executable), "-c", FD_LISTER]
    # What this process itself hands down (the test runner's own descriptors included).
    native = subprocess.run(argv, close_fds=False, capture_output=True, text=True, check=True).stdout
    if prestarted:
        tracer_process.prestart()
    rec = record(argv, RecordOptions(passthrough=False))
    assert rec.run.stdout == native
    assert tracer_process._prestarted is None


def test_a_working_directory_that_cannot_be_entered_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(TracejailError) as err:
        record(["/bin/true"], RecordOptions(cwd=str(tmp_path / "gone"), passthrough=False))
    assert str(err.value) == f"the tracer failed to start: cannot enter {tmp_path}/gone: No such file or directory"
    assert err.value.exit_code == 4


def test_record_runs_in_the_working_directory_it_is_given(tmp_path: Path) -> None:
    rec = record(["/bin/pwd"], RecordOptions(cwd=str(tmp_path), passthrough=False))
    assert rec.run.stdout == f"{tmp_path}\n" and rec.run.cwd == str(tmp_path)


def test_pinning_takes_the_cpu_the_scheduler_runs_us_on() -> None:
    saved = os.sched_getaffinity(0)
    try:
        for cpu in sorted(saved):
            os.sched_setaffinity(0, {cpu})   # the only one it may run on: it runs there
            assert tracer_process.cpu_to_pin() == cpu
    finally:
        os.sched_setaffinity(0, saved)
    assert tracer_process.cpu_to_pin() in saved
