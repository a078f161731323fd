#!/usr/bin/env python3
"""Wall time of `tracejail record` against the untraced run and strace, in one invocation.

Runs each workload under each tracer, interleaved (round-robin) so that machine noise hits all
of them alike; reports medians and ratios. Target (issue 2): the geometric mean of
tracejail / `strace -f --seccomp-bpf` over the three workloads is at most 1.3.

    python3 bench/record.py [--reps 7] [--markdown]
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from tracejail.seccomp import SYSCALLS

PY = os.path.realpath(sys.executable)   # the real interpreter, not a pyenv shim

WORKLOADS = {
    "import-heavy python": [PY, "-c", "import json, email, http.server, sqlite3, ssl, decimal, "
                                      "asyncio, unittest, xml.dom.minidom"],
    "20k os.path.exists (missing)": [PY, "-c", "import os\nfor i in range(20000):\n"
                                               "    os.path.exists('/nonexistent/%d' % i)"],
    "shell loop, 200 processes": ["/bin/sh", "-c", "i=0; while [ $i -lt 200 ]; do /bin/true; "
                                                   "i=$((i+1)); done"],
}


def tracers(out_dir: str) -> dict[str, list[str]]:
    trace_set = ",".join(sorted(SYSCALLS))
    tj = [sys.executable, "-m", "tracejail", "record", "-o", os.path.join(out_dir, "t.json"), "--"]
    found = {"native": [], "tracejail": tj,
             "tracejail --pin-cpu": tj[:-1] + ["--pin-cpu", "--"]}
    if shutil.which("strace"):
        found["strace -f"] = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={trace_set}"]
        found["strace -f --seccomp-bpf"] = ["strace", "-f", "-qq", "--seccomp-bpf", "-o", "/dev/null",
                                            "-e", f"trace={trace_set}"]
    return found


def time_once(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--markdown", action="store_true", help="print a README-ready table")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tools = tracers(tmp)
        results: dict[tuple[str, str], list[float]] = {}
        for w, cmd in WORKLOADS.items():
            for name, prefix in tools.items():     # warm-up
                time_once(prefix + cmd)
            for _ in range(args.reps):
                for name, prefix in tools.items():
                    results.setdefault((w, name), []).append(time_once(prefix + cmd))
    med = {k: statistics.median(v) for k, v in results.items()}
    names = list(tools)
    header = "| workload | " + " | ".join(f"{n} (s)" for n in names) + " | tracejail / native |" + \
        (" tracejail / strace --seccomp-bpf |" if "strace -f --seccomp-bpf" in names else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    ratios = []
    for w in WORKLOADS:
        row = [f"{med[(w, n)]:.3f}" for n in names]
        line = f"| {w} | " + " | ".join(row) + f" | {med[(w, 'tracejail')] / med[(w, 'native')]:.2f} |"
        if "strace -f --seccomp-bpf" in names:
            r = med[(w, "tracejail")] / med[(w, "strace -f --seccomp-bpf")]
            ratios.append(r)
            line += f" {r:.2f} |"
        print(line)
    if ratios:
        gm = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        print(f"\ngeometric mean tracejail / strace -f --seccomp-bpf: {gm:.2f} (target <= 1.3); "
              f"median of {args.reps} interleaved runs each")
        pinned = [med[(w, "tracejail --pin-cpu")] / med[(w, "strace -f --seccomp-bpf")] for w in WORKLOADS]
        gm_pinned = math.exp(sum(math.log(r) for r in pinned) / len(pinned))
        print(f"geometric mean tracejail --pin-cpu / strace -f --seccomp-bpf: {gm_pinned:.2f}")


if __name__ == "__main__":
    main()
