"""Benchmark: load (parse and check) a well-formed trace of N paths; time and peak memory.

Each load runs in a fresh interpreter (peak RSS is per process). The trace is a real recording
(`true`) with N extra failed lookups of the shape a path-probing program leaves.

    python bench/trace_load.py [--paths 1000000] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from tracejail import trace as tr  # noqa: E402
from tracejail.record import RecordOptions, record  # noqa: E402

PROBE = """
import resource, sys, time
sys.path.insert(0, {root!r})
from tracejail import trace
t = time.perf_counter()
loaded = trace.load({path!r})
print(time.perf_counter() - t, len(loaded.files), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    data = record(["true"], RecordOptions(passthrough=False)).trace.to_json()
    data["files"] += [{"path": f"/srv/app/lib/d{i // 1000}/mod{i}.py",
                       "accesses": [{"kind": "stat", "syscall": "newfstatat", "result": "ENOENT",
                                     "count": 1, "pids": [4242]}], "runs": [0]}
                      for i in range(args.paths)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        with open(path, "w") as f:
            json.dump(data, f)
        del data
        size = os.path.getsize(path)
        times, rss = [], []
        for _ in range(args.reps):
            out = subprocess.run([sys.executable, "-c", PROBE.format(root=ROOT, path=path)],
                                 capture_output=True, text=True, check=True).stdout.split()
            times.append(float(out[0]))
            rss.append(int(out[2]) / 1024)
            assert int(out[1]) >= args.paths
    print(f"{args.paths} paths, {size / 1e6:.0f} MB of JSON: load median {statistics.median(times):.1f} s "
          f"(min {min(times):.1f}, max {max(times):.1f}), peak RSS median {statistics.median(rss):.0f} MB; "
          f"{os.cpu_count()} CPUs, {tr.FORMAT}")


if __name__ == "__main__":
    main()
