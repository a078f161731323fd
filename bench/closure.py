"""Benchmark: the loader closure of every shared library under a directory tree.

    python bench/closure.py [DIR ...]        (default: /usr/lib/x86_64-linux-gnu)

The target is <= 5 s for /usr/lib/x86_64-linux-gnu on a 2-core machine.
Three figures are printed:

* cold, one call:    resolve(all libraries) with an empty ElfCache (every file parsed once);
* cold, per library: resolve([lib]) for each library, sharing one ElfCache
                     (the `tracejail deps` / test pattern: each call models its own process);
* warm, per library: the same again with the cache filled, i.e. pure resolution cost.

Not a test: it prints figures and exits 0, or 1 when the cold one-call run
exceeds --budget seconds.
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tracejail.closure import ElfCache, resolve  # noqa: E402

ET_DYN = 3


def shared_libraries(top: str) -> list[str]:
    """Regular ELF files of type ET_DYN (symlinks skipped: they name the same files)."""
    found: list[str] = []
    for dirpath, _dirnames, filenames in os.walk(top):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            try:
                with open(path, "rb") as fh:
                    head = fh.read(18)
            except OSError:
                continue
            if len(head) == 18 and head[:4] == b"\x7fELF" and head[5] == 1:
                if struct.unpack_from("<H", head, 16)[0] == ET_DYN:
                    found.append(path)
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", default=["/usr/lib/x86_64-linux-gnu"])
    parser.add_argument("--budget", type=float, default=5.0, help="seconds allowed for the cold one-call run")
    args = parser.parse_args(argv)

    libs: list[str] = []
    for top in args.dirs:
        libs += shared_libraries(top)
    print(f"{len(libs)} shared libraries under {', '.join(args.dirs)}")

    cache = ElfCache()
    start = time.perf_counter()
    closure = resolve(libs, cache=cache, strict=False)
    cold_one = time.perf_counter() - start
    print(
        f"cold, one call:    {cold_one:6.2f} s  "
        f"({len(closure.deps)} edges, {len(closure.paths())} files, {len(closure.unresolved)} unresolved, "
        f"{len(closure.errors)} errors; {cache.parsed} files parsed, {cache.hits} cache hits)"
    )

    cache = ElfCache()
    start = time.perf_counter()
    edges = 0
    for lib in libs:
        edges += len(resolve([lib], cache=cache, strict=False).deps)
    cold_each = time.perf_counter() - start
    print(f"cold, per library: {cold_each:6.2f} s  ({edges} edges in total; {cache.parsed} files parsed)")

    start = time.perf_counter()
    for lib in libs:
        resolve([lib], cache=cache, strict=False)
    warm_each = time.perf_counter() - start
    print(f"warm, per library: {warm_each:6.2f} s  ({1000 * warm_each / max(1, len(libs)):.2f} ms per library)")

    verdict = "within" if cold_one <= args.budget else "OVER"
    print(f"{verdict} the {args.budget:.1f} s budget")
    return 0 if cold_one <= args.budget else 1


if __name__ == "__main__":
    sys.exit(main())
