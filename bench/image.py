"""Benchmark: write an image of a ~50 MB tree vs `tar czf` of the same tree, in one invocation.

The tree is real host content (shared libraries and Python sources, the typical payload of a
traced program) selected through rootfs.plan(), staged once so that `tar czf` has a directory to
read. tracejail writes from the Plan (its normal path: no staging copy; every file opened with
openat2(RESOLVE_NO_SYMLINKS) and checked against the plan) and from the staged dir. Page cache
is warm for every contender (staging reads everything first). Best of N runs. Planning itself
(resolving every path through root.Root, cold) is timed too.

    python bench/image.py [--size-mb 50] [--repeat 3]
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tracejail import image, rootfs  # noqa: E402


def pick_files(limit: int) -> list[str]:
    """About `limit` bytes: shared libraries first (binary), then Python stdlib sources (text)."""
    candidates = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/*.so*")) + \
        sorted(glob.glob("/usr/lib/python3*/**/*.py", recursive=True))
    chosen: list[str] = []
    total = 0
    libs_budget = limit * 0.7
    for path in candidates:
        if not os.path.isfile(path) or os.path.islink(path):
            continue
        size = os.path.getsize(path)
        if not path.endswith(".py") and total + size > libs_budget:
            continue
        if total + size > limit:
            break
        chosen.append(path)
        total += size
    return chosen


def best_of(n: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    files = pick_files(int(args.size_mb * 1e6))
    plan_s = best_of(args.repeat, lambda: rootfs.plan(files))
    plan = rootfs.plan(files)
    work = tempfile.mkdtemp(prefix="tj-bench-")
    try:
        staged = os.path.join(work, "rootfs")
        t0 = time.perf_counter()
        rootfs.stage(plan, staged)
        stage_s = time.perf_counter() - t0
        size = plan.files_size()
        cfg = image.ImageConfig(entrypoint=["/bin/true"])
        out = os.path.join(work, "img.tar")
        tgz = os.path.join(work, "tree.tgz")
        cpus = os.cpu_count() or 1

        def ours(source: rootfs.Plan | str, level: int | None, workers: int | None = None) -> Callable[[], object]:
            return lambda: image.write_archive(source, out, cfg, compress_level=level, workers=workers)

        def tar_czf() -> None:
            subprocess.run(["tar", "czf", tgz, "-C", staged, "."], check=True)

        results = [
            ("tar czf (GNU tar | gzip -6)", best_of(args.repeat, tar_czf)),
            (f"tracejail plan, gzip-6, {cpus} threads", best_of(args.repeat, ours(plan, 6))),
            ("tracejail plan, gzip-6, 1 thread", best_of(args.repeat, ours(plan, 6, 1))),
            (f"tracejail staged dir, gzip-6, {cpus} threads", best_of(args.repeat, ours(staged, 6))),
            (f"tracejail plan, gzip-1 (--fast), {cpus} threads", best_of(args.repeat, ours(plan, 1))),
            ("tracejail plan, no compression", best_of(args.repeat, ours(plan, None))),
        ]
        res6 = image.write_archive(plan, out, cfg)
        tar_s = results[0][1]
        print(f"tree: {len(files)} files, {size / 1e6:.1f} MB content, {len(plan.entries)} entries; "
              f"planning took {plan_s:.3f} s, staging {stage_s:.2f} s; {cpus} CPUs")
        print(f"gzip-6 layer: {res6.compressed_size / 1e6:.1f} MB (tar czf: {os.path.getsize(tgz) / 1e6:.1f} MB)")
        for label, secs in results:
            print(f"  {label:<46} {secs:6.2f} s  {size / secs / 1e6:6.1f} MB/s  ratio vs tar czf {secs / tar_s:4.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
