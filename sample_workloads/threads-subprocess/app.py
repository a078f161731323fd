#!/usr/bin/env python3
"""threads-subprocess: threads that read files and spawn processes at once.

Several worker threads start together (behind a barrier): some read bundled
data files, some run programs (/bin/echo by absolute path, `sort` and
`uname` looked up on PATH). A tracer has to follow every thread and every
child process (Python starts them with vfork/clone + execve). Results are
printed in a fixed order, so the output does not depend on scheduling.
"""

import csv
import hashlib
import os
import subprocess
import threading
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
# Fixed environment for the children: C locale for sort, and a PATH to search
# (a FROM-scratch container may not set one).
CHILD_ENV = {"LC_ALL": "C", "PATH": os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin"}


def read_text(name: str) -> str:
    raw = (DATA / name).read_bytes()
    lines = raw.decode("utf-8").splitlines()
    return f"{len(lines)} lines, sha256 {hashlib.sha256(raw).hexdigest()[:16]}"


def read_csv(name: str) -> str:
    with (DATA / name).open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    biggest = max(rows, key=lambda r: int(r["population_k"]))
    total = sum(int(r["population_k"]) for r in rows)
    return f"{len(rows)} cities, total {total}k, biggest {biggest['city']}"


def run(argv: list[str], stdin: str | None = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True, env=CHILD_ENV)
    return proc.stdout.strip().replace("\n", " | ")


TASKS = {
    "read alpha.txt": lambda: read_text("alpha.txt"),
    "read beta.txt": lambda: read_text("beta.txt"),
    "read gamma.csv": lambda: read_csv("gamma.csv"),
    "run /bin/echo": lambda: run(["/bin/echo", "hello", "from", "a", "thread"]),
    "run sort": lambda: run(["sort"], stdin="pear\napple\nfig\nbanana\n"),
    "run sort -u (data)": lambda: run(["sort", "-u", str(DATA / "alpha.txt"), str(DATA / "alpha.txt")]),
    "run uname -s": lambda: run(["uname", "-s"]),
}


def main() -> None:
    results: dict[str, str] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(len(TASKS))

    def worker(label: str, fn) -> None:
        barrier.wait(timeout=30)
        try:
            value = fn()
        except Exception as exc:  # reported, not raised: keep other threads' results
            value = f"ERROR {type(exc).__name__}: {exc}"
        with lock:
            results[label] = value

    threads = [threading.Thread(target=worker, args=(label, fn), name=label) for label, fn in TASKS.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    print(f"threads-subprocess: {len(threads)} threads")
    for label in TASKS:
        print(f"{label}: {results[label]}")
    failed = sum(v.startswith("ERROR") for v in results.values())
    print(f"done: {len(results) - failed} ok, {failed} failed")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
