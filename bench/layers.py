"""Layers that dedupe, the layer cache, and compression throughput, in one invocation.

For each chosen sample workload (default: the Python ones), recorded once in a private copy of
its folder (so its main file can be changed):

* **registry bytes**: every workload is pushed by `tracejail build --push` twice, single-layer to
  one docker-registry and `--layers auto` to another (both started here on 127.0.0.1); the table
  gives each image's compressed size and what each registry stores on disk in the end.
* **rebuild after an app change**: a first build (`--layers auto` with an empty cache directory:
  nothing cached, neither layers nor the import closure's parse results) and `--layers auto
  --no-cache` (every layer compressed, parse results cached), against `build --layers auto` with
  a warm cache right after a comment was appended to the workload's main file (only the app's
  layer is made again); interleaved, median of --reps.
* **compression throughput**: for the largest workload's plan, the single-layer archive written
  with one gzip thread (the writer before block-parallel gzip) and with one per CPU, against an
  uncompressed one; content MB/s, best of --reps.

Writes bench/layers.md (or --output) and prints it. Needs root (pyenv under /root), Debian's
docker-registry (`apt-get install docker-registry`), and PyPI once for the venv workloads.

    python bench/layers.py [--only NAME ...] [--venv-cache DIR] [--reps N] [--output FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import workloads as wl  # noqa: E402
from tracejail import __version__, image  # noqa: E402
from tracejail import build as tjbuild  # noqa: E402

TJ = [sys.executable, "-m", "tracejail"]
PYTHON_WORKLOADS = ["python-cli", "python-web", "flask-venv", "numpy-venv", "matplotlib-venv", "threads-subprocess"]
MAIN_FILE = {"python-web": "server.py"}   # the app's own file a change touches (default app.py)


def log(msg: str) -> None:
    print(f"[layers] {msg}", file=sys.stderr, flush=True)


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class Registry:
    """docker-registry on a free loopback port with its own storage, stopped by stop()."""

    def __init__(self, work: Path, name: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.storage = work / f"{name}-data"
        conf = work / f"{name}.yml"
        conf.write_text(json.dumps({"version": "0.1", "log": {"level": "error", "accesslog": {"disabled": True}},
                                    "storage": {"filesystem": {"rootdirectory": str(self.storage)}},
                                    "http": {"addr": f"127.0.0.1:{self.port}"}}))
        self.proc = subprocess.Popen(["docker-registry", "serve", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("docker-registry did not start") from None
                time.sleep(0.1)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stored_bytes(self) -> int:
        total = 0
        for top, _dirs, files in os.walk(self.storage / "docker" / "registry" / "v2" / "blobs"):
            total += sum(os.path.getsize(os.path.join(top, f)) for f in files if f == "data")
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)


def record(w: wl.Workload, trace: Path) -> None:
    args = [*TJ, "record", "-o", str(trace)]
    for ex in w.exercises:
        args += ["--exercise", ex]
    if w.port:
        args += ["--ready-port", str(w.port)]
    proc = subprocess.run([*args, "--", *w.command], cwd=w.dir, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{w.name}: record failed: {proc.stderr.strip().splitlines()[-1:]}")


def build(trace: Path, *args: str, env: dict[str, str]) -> tuple[dict, float]:
    start = time.monotonic()
    proc = subprocess.run([*TJ, "build", str(trace), "--no-load", "--json", *args], capture_output=True, text=True,
                          timeout=900, env=env)
    took = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"build {trace} {' '.join(args)} failed: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout), took


def throughput(trace: Path, reps: int) -> dict[str, float]:
    """Seconds to write the single-layer archive of `trace`'s plan: no compression, gzip-6 on one
    thread, gzip-6 on every CPU (best of `reps`); and the plan's content bytes."""
    from tracejail import provenance

    cfg = image.ImageConfig(entrypoint=["/x"])
    with provenance.selected(str(trace), tjbuild.BuildOptions()) as sel, \
            tempfile.TemporaryDirectory(prefix="tj-layers-tp-") as d:
        plan = sel.plan
        out: dict[str, float] = {"bytes": float(plan.files_size())}
        archive = os.path.join(d, "i.tar")
        for label, level, workers in (("none", None, None), ("gzip6-1", 6, 1), ("gzip6-all", 6, None)):
            best = float("inf")
            for _ in range(reps):
                start = time.perf_counter()
                image.write_archive(plan, archive, cfg, compress_level=level, workers=workers)
                best = min(best, time.perf_counter() - start)
            out[label] = best
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these workloads")
    ap.add_argument("--venv-cache", default="/var/tmp/tracejail-bench-venvs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--output", help="markdown file (default bench/layers.md; with --only: none)")
    args = ap.parse_args()
    if shutil.which("docker-registry") is None:
        raise SystemExit("docker-registry is not installed (apt-get install docker-registry)")
    names = args.only or PYTHON_WORKLOADS
    t_all = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tj-layers-") as d:
        work = Path(d)
        env = dict(os.environ, TRACEJAIL_CACHE_DIR=str(work / "cache"))
        single, layered = Registry(work, "single"), Registry(work, "layered")
        rows = []
        try:
            traces: dict[str, tuple[wl.Workload, Path]] = {}
            for name in names:
                w = wl.copy_workload(wl.get_workload(name), work / name)
                log(f"{name}: prepare and record")
                wl.prepare(w, cache_dir=Path(args.venv_cache))
                trace = work / f"{name}.json"
                record(w, trace)
                traces[name] = (w, trace)
            for name, (w, trace) in traces.items():
                log(f"{name}: push single-layer and --layers auto")
                one, _ = build(trace, "-t", f"{single.host}/bench/{name}:1", "--push", env=env)
                many, _ = build(trace, "-t", f"{layered.host}/bench/{name}:1", "--push", "--layers", "auto", env=env)
                rows.append({"name": name, "single": one["image_size"], "layered": many["image_size"],
                             "layers": len(many["layers"]),
                             "mounted": many["pushed"][0]["mounted"], "skipped": many["pushed"][0]["skipped"]})
            stored_single, stored_layered = single.stored_bytes(), layered.stored_bytes()
        finally:
            single.stop()
            layered.stop()

        log("rebuild after an app change: first build and --no-cache vs warm cache, interleaved")
        first: dict[str, list[float]] = {n: [] for n in traces}
        cold: dict[str, list[float]] = {n: [] for n in traces}
        warm: dict[str, list[float]] = {n: [] for n in traces}
        for rep in range(args.reps):
            for name, (w, trace) in traces.items():
                out = work / f"{name}.tar"
                empty = work / f"empty-cache-{rep}-{name}"
                _, took = build(trace, "-o", str(out), "--layers", "auto", env=dict(env, TRACEJAIL_CACHE_DIR=str(empty)))
                shutil.rmtree(empty, ignore_errors=True)
                first[name].append(took)
                _, took = build(trace, "-o", str(out), "--layers", "auto", "--no-cache", env=env)
                cold[name].append(took)
                main_file = w.dir / MAIN_FILE.get(name, "app.py")
                with open(main_file, "a") as f:
                    f.write(f"# bench change {rep}\n")
                summary, took = build(trace, "-o", str(out), "--layers", "auto", env=env)
                made = [la["name"] for la in summary["layers"] if not la["cached"]]
                if len(made) != 1 or not made[0].startswith("app "):
                    log(f"{name}: expected only the app layer to be made again, made {made}")
                warm[name].append(took)
        largest = max(rows, key=lambda r: r["single"])["name"]
        log(f"compression throughput on {largest}'s plan")
        tp = throughput(traces[largest][1], args.reps)

    total_images = sum(r["single"] for r in rows)
    lines = [
        "# Layers, layer cache and compression (bench/layers.py)",
        "",
        f"{platform.system()} {platform.machine()}, kernel {platform.release()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, tracejail {__version__}; measured "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, nothing else running. A ratio measured on one machine "
        "is not a claim about all.",
        "",
        "## Bytes a registry stores",
        "",
        "Each workload pushed once with `build --push` (single layer) to one registry, and once with "
        "`--layers auto` to another; the workloads share this host's interpreter and libraries.",
        "",
        "| workload | single-layer image | `--layers auto` image | layers | blobs mounted / already there |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {mb(r['single'])} | {mb(r['layered'])} | {r['layers']} | "
                     f"{r['mounted']} / {r['skipped']} |")
    lines += [
        "",
        f"Stored by the registry: single-layer **{mb(stored_single)}** (the images add up to {mb(total_images)}), "
        f"`--layers auto` **{mb(stored_layered)}**: {stored_layered / stored_single:.2f} of the single-layer bytes.",
        "",
        "## Rebuild after only the app's own file changed",
        "",
        "`build --layers auto` right after appending a comment to the workload's main file (warm caches), "
        "against a first build (an empty cache directory: nothing cached) and against `--no-cache` (every "
        f"layer compressed, the import closure's parse results cached); median of {args.reps}, interleaved.",
        "",
        "| workload | first build (s) | `--no-cache` (s) | rebuild (s) | rebuild / first | rebuild / `--no-cache` |",
        "|---|---|---|---|---|---|",
    ]
    for name in traces:
        f, c, h = (statistics.median(x[name]) for x in (first, cold, warm))
        lines.append(f"| {name} | {f:.2f} | {c:.2f} | {h:.2f} | {h / f:.2f} | {h / c:.2f} |")
    content = tp["bytes"]
    lines += [
        "",
        "Both include what every build does before writing layers (loading the trace, the ELF and import "
        "closures, planning), which the cache cannot save.",
        "",
        f"## Compression throughput ({largest}, {mb(content)} of content)",
        "",
        f"The single-layer archive of the same plan, best of {args.reps}:",
        "",
        "| writer | seconds | content MB/s | vs one gzip thread |",
        "|---|---|---|---|",
    ]
    for label, key in (("no compression", "none"), ("gzip-6, one thread", "gzip6-1"),
                       (f"gzip-6, {os.cpu_count()} threads (tracejail's)", "gzip6-all")):
        lines.append(f"| {label} | {tp[key]:.2f} | {content / tp[key] / 1e6:.1f} | {tp['gzip6-1'] / tp[key]:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    output = args.output or (None if args.only else str(ROOT / "bench" / "layers.md"))
    if output:
        Path(output).write_text(text)
        log(f"wrote {output}")
    log(f"done in {time.monotonic() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
