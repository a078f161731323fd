"""`tracejail minify` on fat Debian python3 images: the size before and after, and the time it takes.

Each image is what a Dockerfile `FROM debian + apt-get install python3 (+ pip install ...) + COPY
app` makes, assembled here without an engine: a `debootstrap --variant=minbase --include=python3`
layer (tests/images.py caches it), an optional dependencies layer (wheels installed with this
interpreter's pip into /usr/local/lib/python3.11/dist-packages), and the sample workload's folder
as /app. Layers are gzip-6 in an OCI layout, as a registry would store them.

Every image goes through `tracejail minify LAYOUT -t NAME -o out.tar --json` (no engine needed:
the run is recorded in tracejail's sandbox, and the new image's tree is verified there), with
servers driven by the sample's own exercises. The table gives the files' bytes and the
compressed bytes before and after, their ratios, and minify's wall time (record + build +
verify), median of --reps.

Writes bench/minify.md (or --output) and prints it. Needs root (debootstrap on a cold cache; the
sandbox) and PyPI for the numpy wheel once.

    python bench/minify.py [--only NAME ...] [--reps N] [--cache DIR] [--output FILE]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import images  # noqa: E402
import workloads as wl  # noqa: E402
from tracejail import __version__  # noqa: E402

TJ = [sys.executable, "-m", "tracejail"]
DIST_PACKAGES = "usr/local/lib/python3.11/dist-packages"
# name -> (sample folder, command in the image, pip requirements for the dependencies layer)
IMAGES = {
    "python-cli": ("python-cli", ["python3", "app.py"], []),
    "python-web": ("python-web", ["python3", "server.py", "--port", "8000"], []),
    "threads-subprocess": ("threads-subprocess", ["python3", "app.py"], []),
    "numpy": ("numpy-venv", ["python3", "app.py"], ["numpy==2.1.3"]),
}


def log(msg: str) -> None:
    print(f"[minify] {msg}", file=sys.stderr, flush=True)


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def tar_dir(src: Path, prefix: str) -> bytes:
    """A layer holding `src` at `prefix` (numeric owners root, as COPY makes them)."""
    out = tempfile.SpooledTemporaryFile()
    with tarfile.open(fileobj=out, mode="w") as tar:
        def reset(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            return None if "__pycache__" in info.name or "/.venv" in info.name else info
        tar.add(src, arcname=prefix, filter=reset)
    out.seek(0)
    return out.read()


def gzip_layout(path: Path, layers: list[bytes], config: dict) -> None:
    """An OCI layout with gzip-6 layers (images.write_oci_layout, at the level registries see)."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, media_type: str) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (blobs / digest.split(":")[1]).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}
    descs = [blob(gzip.compress(layer, compresslevel=6, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip")
             for layer in layers]
    cfg = blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = blob(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                "config": cfg, "layers": descs}).encode(), "application/vnd.oci.image.manifest.v1+json")
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest]}))


def fat_image(name: str, cache: Path) -> Path:
    """The fat image of workload `name` as an OCI layout (made once, cached)."""
    folder, command, requirements = IMAGES[name]
    key = hashlib.sha256(json.dumps([name, command, requirements, images.TARBALL.stat().st_mtime,
                                     sorted(p.name for p in (ROOT / "sample_workloads" / folder).iterdir())]
                                    ).encode()).hexdigest()[:16]
    layout = cache / f"{name}-{key}"
    if (layout / "index.json").exists():
        return layout
    log(f"{name}: assembling the fat image")
    layers = [Path(images.python3_base_tarball()).read_bytes()]
    if requirements:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "site"
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "--only-binary=:all:", "--target", str(target), *requirements], check=True)
            layers.append(tar_dir(target, DIST_PACKAGES))
    layers.append(tar_dir(ROOT / "sample_workloads" / folder, "app"))
    config = images.image_config(layers, Cmd=command, WorkingDir="/app", Env=[
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"])
    tmp_layout = cache / f".{layout.name}.tmp"
    shutil.rmtree(tmp_layout, ignore_errors=True)
    gzip_layout(tmp_layout, layers, config)
    tmp_layout.rename(layout)
    return layout


def minify(name: str, layout: Path, work: Path) -> tuple[dict, float]:
    w = wl.get_workload(IMAGES[name][0])
    args = [*TJ, "minify", str(layout), "-t", f"bench-{name}:min", "-o", str(work / f"{name}.tar"), "--json",
            "--progress", "quiet"]
    for exercise in w.exercises:
        args += ["--exercise", exercise]
    # This checkout's tracejail; no engine, so the new image is verified in the sandbox.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DOCKER_HOST": f"unix://{work}/no-engine.sock"}
    start = time.monotonic()
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=work, timeout=1800)
    took = time.monotonic() - start
    if out.returncode != 0:
        raise SystemExit(f"minify {name} failed ({out.returncode}): {out.stderr[-2000:]}{out.stdout[-2000:]}")
    return json.loads(out.stdout), took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", choices=sorted(IMAGES), default=sorted(IMAGES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path("/var/tmp/tracejail-bench-minify"))
    ap.add_argument("--output", type=Path, default=ROOT / "bench" / "minify.md")
    opts = ap.parse_args()
    opts.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tj-bench-minify-") as tmp:
        # A cache of tracejail's own (unpacked images, parse results) that this run starts empty.
        os.environ["TRACEJAIL_CACHE_DIR"] = str(Path(tmp) / "cache")
        for name in opts.only:
            layout = fat_image(name, opts.cache)
            times, summary = [], None
            for rep in range(opts.reps):
                if rep == 0:
                    shutil.rmtree(Path(tmp) / "cache", ignore_errors=True)   # the first run unpacks the image
                summary, took = minify(name, layout, Path(tmp))
                times.append(took)
                log(f"{name}: run {rep + 1}: {took:.1f}s, passed={summary['passed']}")
            assert summary is not None
            rows.append((name, summary, times))
    lines = [f"# `tracejail minify` on fat Debian python3 images (tracejail {__version__})", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
             f"Python {platform.python_version()}; `python bench/minify.py --reps {opts.reps}` "
             f"on {time.strftime('%Y-%m-%d')}. Each image: Debian {images.SUITE} minbase + python3 "
             "(+ its wheels) + the sample as /app, gzip-6 layers. No engine: verified in the sandbox.", "",
             "| image | files before | files after | ratio | compressed before | compressed after | ratio | "
             "verified | minify, first (unpacks) | minify, warm: median | record / build / verify |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s, times in rows:
        rest = times[1:] or times
        phases = " / ".join(f"{s['seconds'].get(k, 0):.1f}" for k in ("record", "build", "verify"))
        lines.append(f"| {name} | {mb(s['before']['content'])} | {mb(s['after']['content'])} | "
                     f"{s['ratio']['content'] * 100:.1f}% | {mb(s['before']['compressed'])} | "
                     f"{mb(s['after']['compressed'])} | {s['ratio']['compressed'] * 100:.1f}% | "
                     f"{'PASS' if s['passed'] else 'FAIL'} | {times[0]:.1f} s | {statistics.median(rest):.1f} s | "
                     f"{phases} s |")
    lines += ["", "\"files\" is the bytes of regular files (an image's unpacked size), \"compressed\" its layers as "
              "stored. The first minify of an image unpacks it into tracejail's cache; the others reuse that (their "
              "phases are the last run's). Timings include the sandbox's start and the replay; servers wait for "
              "readiness and run their exercises in both. Unpacking is the file system's work: kernel time creating "
              "the base layer's 7,300 files (0.9 s into a tmpfs on this VM, up to 10 s on its ext4 disk)."]
    text = "\n".join(lines) + "\n"
    opts.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
