#!/usr/bin/env python3
"""Wall time of `tracejail record` against the untraced run and strace, in one invocation.

First a calibration: what one bare ptrace stop costs on this machine (a child stats a missing
path under tracejail's seccomp filter; the cheapest Python loop there is, waitpid and
PTRACE_CONT, traces it). Then every workload under every tracer, interleaved (round-robin) so
that machine noise hits all of them alike; medians and ratios, once on an idle machine and once
with a CPU-bound neighbour process on another CPU. Goal (issue 15): the geometric mean of
tracejail / `strace -f --seccomp-bpf` at most 1.0 idle and 1.2 busy, the fork-heavy workload at
most 1.2. A last row, outside the mean, times a run of /bin/true: the fixed cost of start-up
and of writing the trace.

    python3 bench/record.py [--reps 7] [--no-busy]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tracejail.seccomp import SYSCALLS  # noqa: E402

PY = os.path.realpath(sys.executable)   # the real interpreter, not a pyenv shim
STAT_CALLS = 20000

WORKLOADS = {
    "import-heavy python": [PY, "-c", "import json, email, http.server, sqlite3, ssl, decimal, "
                                      "asyncio, unittest, xml.dom.minidom"],
    "20k os.path.exists (missing)": [PY, "-c", f"import os\nfor i in range({STAT_CALLS}):\n"
                                               "    os.path.exists('/nonexistent/%d' % i)"],
    "shell loop, 200 processes": ["/bin/sh", "-c", "i=0; while [ $i -lt 200 ]; do /bin/true; "
                                                   "i=$((i+1)); done"],
}
FORK_HEAVY = "shell loop, 200 processes"
# Not in the mean: what a tracer costs before the first traced call (interpreter, imports, the
# tracer process) and after the last one (writing the trace).
STARTUP = "start-up and finish (/bin/true)"
MEASURED = {**WORKLOADS, STARTUP: ["/bin/true"]}
STRACE = "strace -f --seccomp-bpf"


def tracers(out_dir: str) -> dict[str, list[str]]:
    trace_set = ",".join(sorted(SYSCALLS))
    tj = [sys.executable, "-m", "tracejail", "record", "-o", os.path.join(out_dir, "t.json"), "--"]
    found = {"native": [], "tracejail": tj, "tracejail --pin-cpu": tj[:-1] + ["--pin-cpu", "--"]}
    if shutil.which("strace"):
        found["strace -f"] = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={trace_set}"]
        found[STRACE] = ["strace", "-f", "-qq", "--seccomp-bpf", "-o", "/dev/null", "-e", f"trace={trace_set}"]
    return found


def time_once(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


# --- calibration: one bare stop ------------------------------------------------------------------

def _stat_loop(n: int) -> None:
    for _ in range(n):
        try:
            os.stat("/nonexistent/calibration")
        except OSError:
            pass


def bare_stop_us(n: int = STAT_CALLS, polls: int = 0) -> tuple[float, float]:
    """(µs per stop of the cheapest Python tracer loop, µs per untraced call), measured on a child
    that stats a missing path `n` times under tracejail's seccomp filter. `polls`: WNOHANG polls
    before each blocking wait, as tracejail makes them."""
    from ptrace.binding import func as pb

    from tracejail import seccomp

    t0 = time.perf_counter()
    _stat_loop(n)
    native = time.perf_counter() - t0
    program = seccomp.build_filter(["newfstatat", "stat"])
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.kill(os.getpid(), signal.SIGSTOP)
        seccomp.install(program)
        start = time.perf_counter()
        _stat_loop(n)
        os.write(write_end, str(time.perf_counter() - start).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, os.WUNTRACED)
    pb.ptrace(0x4206, pid, 0, 0x80 | 0x100000)   # PTRACE_SEIZE, O_TRACESECCOMP | O_EXITKILL
    os.kill(pid, signal.SIGCONT)
    stops = 0
    while True:
        for _ in range(polls):
            got, status = os.waitpid(pid, 0x40000000 | os.WNOHANG)   # __WALL
            if got:
                break
            os.sched_yield()
        else:
            _, status = os.waitpid(pid, 0x40000000)
        if not os.WIFSTOPPED(status):
            break
        event = status >> 16
        sig = os.WSTOPSIG(status)
        stops += event == 7   # PTRACE_EVENT_SECCOMP
        pb.ptrace(pb.PTRACE_CONT, pid, 0, 0 if event or sig == signal.SIGTRAP else sig)
    traced = float(os.read(read_end, 64))
    os.close(read_end)
    return 1e6 * (traced - native) / max(stops, 1), 1e6 * native / n


# --- the matrix ----------------------------------------------------------------------------------

@contextmanager
def neighbour(busy: bool) -> Iterator[None]:
    """A CPU-bound process for the duration (on a 2-CPU machine: the other CPU is taken)."""
    if not busy:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        yield
    finally:
        proc.kill()
        proc.wait()


def measure(reps: int, busy: bool) -> tuple[dict[tuple[str, str], float], dict[str, int], list[str]]:
    """Medians per (workload, tracer), tracejail's stops per workload, and the tracer names."""
    results: dict[tuple[str, str], list[float]] = {}
    stops: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp, neighbour(busy):
        tools = tracers(tmp)
        for w, cmd in MEASURED.items():
            for prefix in tools.values():     # warm-up
                time_once(prefix + cmd)
            with open(os.path.join(tmp, "t.json")) as f:
                stops[w] = json.load(f)["runs"][0]["tracing"]["stops"]
            for _ in range(reps):
                for name, prefix in tools.items():
                    results.setdefault((w, name), []).append(time_once(prefix + cmd))
    return {k: statistics.median(v) for k, v in results.items()}, stops, list(tools)


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def report(title: str, med: dict[tuple[str, str], float], stops: dict[str, int], names: list[str],
           reps: int) -> list[str]:
    out = [f"**{title}** (median of {reps} interleaved runs)", ""]
    header = "| workload | " + " | ".join(f"{n} (s)" for n in names) + " | tracejail / native |" + \
        (" tracejail / strace --seccomp-bpf |" if STRACE in names else "")
    out += [header, "|" + "---|" * (header.count("|") - 1)]
    ratios, pinned = [], []
    for w in WORKLOADS:
        line = f"| {w} | " + " | ".join(f"{med[(w, n)]:.3f}" for n in names) + \
            f" | {med[(w, 'tracejail')] / med[(w, 'native')]:.2f} |"
        if STRACE in names:
            ratios.append(med[(w, "tracejail")] / med[(w, STRACE)])
            pinned.append(med[(w, "tracejail --pin-cpu")] / med[(w, STRACE)])
            line += f" {ratios[-1]:.2f} |"
        out.append(line)
    w = STARTUP
    out.append(f"| {w}, not in the mean | " + " | ".join(f"{med[(w, n)]:.3f}" for n in names) + " | — |"
               + (f" {med[(w, 'tracejail')] / med[(w, STRACE)]:.1f} |" if STRACE in names else ""))
    if ratios:
        w = "20k os.path.exists (missing)"
        per_call = {n: 1e6 * (med[(w, n)] - med[(w, "native")]) / stops[w] for n in ("tracejail", STRACE)}
        out += ["", f"geometric mean tracejail / strace -f --seccomp-bpf: **{geomean(ratios):.2f}** "
                    f"(`--pin-cpu`: {geomean(pinned):.2f}); fork-heavy workload: {ratios[-1]:.2f}; "
                    f"cost per traced call on the stat loop ({stops[w]} stops): tracejail "
                    f"{per_call['tracejail']:.0f} µs (one stop), strace {per_call[STRACE]:.0f} µs (two stops)"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-busy", action="store_true", help="skip the series with a busy neighbour")
    args = ap.parse_args()
    from tracejail.tracer import SPIN_POLLS

    load = os.getloadavg()[0]
    stop_us, call_us = bare_stop_us()
    polled_us, _ = bare_stop_us(polls=SPIN_POLLS)
    cpus = len(os.sched_getaffinity(0))
    lines = [f"Machine: {cpus} CPUs, load average {load:.2f} before the run, kernel {os.uname().release}. "
             f"Calibration: one bare ptrace stop (the cheapest Python loop, waitpid and PTRACE_CONT, on a "
             f"seccomp-filtered stat) costs **{stop_us:.0f} µs** here with a blocking wait and "
             f"{polled_us:.0f} µs polling first as tracejail does; the untraced call {call_us:.1f} µs.", ""]
    med, stops, names = measure(args.reps, busy=False)
    lines += report("Idle", med, stops, names, args.reps)
    if not args.no_busy:
        med, stops, names = measure(args.reps, busy=True)
        lines += [""] + report("With a CPU-bound neighbour process", med, stops, names, args.reps)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
