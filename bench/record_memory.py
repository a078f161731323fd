#!/usr/bin/env python3
"""Memory of a long recording: does the tracer's grow with the number of events?

The tracer keeps one counter per distinct (path, kind, syscall, result, process), never one
entry per call. This runs the tracer on a program that makes N stat calls over K distinct paths
and prints the tracer process's peak resident memory (VmHWM) for growing N at a fixed K, and
for growing K: the first must stay flat, the second grows with what the trace has to hold.

    python3 bench/record_memory.py [--calls 100000,1000000,3000000] [--paths 1000]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PY = os.path.realpath(sys.executable)

# Runs in a fresh interpreter: the tracer in this process, the program as its child.
TRACER = f"""
import os, sys, time
sys.path.insert(0, {ROOT!r})
from tracejail import tracer
argv = sys.argv[1:]
t = tracer.Tracer(argv, argv[0], dict(os.environ))
t.start()
start = time.perf_counter()
result = t.run()
seconds = time.perf_counter() - start
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(result.stops, len(result.events), peak, round(seconds, 2))
"""


def program(calls: int, paths: int) -> list[str]:
    return [PY, "-c", f"import os\nfor i in range({calls}):\n    os.path.exists('/nonexistent/%d' % (i % {paths}))"]


def run(calls: int, paths: int) -> tuple[int, int, int, float]:
    out = subprocess.run([sys.executable, "-c", TRACER, *program(calls, paths)], capture_output=True, text=True, check=True)
    stops, keys, peak_kb, seconds = out.stdout.split()
    return int(stops), int(keys), int(peak_kb), float(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", default="100000,1000000,3000000", help="comma-separated call counts")
    ap.add_argument("--paths", type=int, default=1000, help="distinct paths for the call series")
    ap.add_argument("--path-series", default="1000,10000,100000",
                    help="distinct path counts, each with 200,000 calls")
    args = ap.parse_args()
    print("| stat calls | distinct paths | stops | counters kept | tracer peak RSS | seconds |")
    print("|---|---|---|---|---|---|")
    started = time.strftime("%Y-%m-%d")
    for calls in (int(c) for c in args.calls.split(",")):
        stops, keys, peak, seconds = run(calls, args.paths)
        print(f"| {calls:,} | {args.paths:,} | {stops:,} | {keys:,} | {peak / 1024:.1f} MB | {seconds} |")
    for paths in (int(p) for p in args.path_series.split(",")):
        stops, keys, peak, seconds = run(200_000, paths)
        print(f"| 200,000 | {paths:,} | {stops:,} | {keys:,} | {peak / 1024:.1f} MB | {seconds} |")
    print(f"\n{started}, {len(os.sched_getaffinity(0))} CPUs, kernel {os.uname().release}")


if __name__ == "__main__":
    main()
