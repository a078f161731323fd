"""Image size of each sample workload: tracejail's way vs the seed's way (ldd closure only).

For every workload in sample_workloads/ (tests/workloads.py):

* tracejail: `tracejail record [--exercise ...] -- CMD` in the workload folder, then
  `tracejail build --json -t tj-sizes-NAME:tracejail` four ways (the default, `--no-import-closure`,
  `--strip`, and `--strip --bytecode-only`); run each image as it comes (non-root 65532) and compare its output
  with expected_output.txt; then time `build --no-load` of each, interleaved, --reps times.
* the seed's way, as a person following the recipe would do it: `ldd` the workload's main binary
  (the real Python interpreter behind `python3` / `.venv/bin/python`, `./main`, or the `#!`
  interpreter of a script), `cp -L --parents` the binary (every hop of its symlink chain), each
  `=> /path` library and /lib64/ld-linux-x86-64.so.2 into an empty rootfs, copy the app folder as
  it is (symlinks kept, like `COPY app/ ...`), then `FROM scratch` + `COPY rootfs /` +
  `WORKDIR <app folder>` + `CMD [the workload's command]` with `docker build`; run it (as root:
  the recipe sets no USER) and compare.

Sizes: tracejail's is the one it reports (its gzip -6 layer); the seed image's layer is taken from
`docker save` and gzip -6'ed the same way. "on disk" is the sum of the regular files' sizes.
Servers run with `--network host` (their exercises are run from the host, as in tests/test_e2e.py),
plain workloads with `--network none`.

Writes bench/sizes.md (or --output) and prints the table. Uses the engine of DOCKER_HOST (default
socket); needs root for the seed's ldd copy of /root/.pyenv-style interpreters, gcc/make for
c-plugin, curl for the server exercises, PyPI (or a pip mirror) once for the venv workloads.

    python bench/sizes.py [--only NAME ...] [--venv-cache DIR] [--keep-images] [--reps N] [--output FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import workloads as wl  # noqa: E402
from tracejail import __version__  # noqa: E402

TJ = [sys.executable, "-m", "tracejail"]
LOADER = "/lib64/ld-linux-x86-64.so.2"
RUN_TIMEOUT = 180.0
LISTEN_TIMEOUT = 20.0


@dataclass
class Outcome:
    compressed: int | None = None   # bytes, gzip -6 of the single layer
    on_disk: int | None = None      # bytes of regular files in the rootfs
    families: int | None = None     # of those, bytes kept as families looked up by name
    imports: int | None = None      # of those, bytes the static import closure added
    import_modules: int = 0
    works: bool = False
    error: str = ""                 # first error line when it does not work
    seconds: float = 0.0
    build_times: list[float] = field(default_factory=list)   # `build --no-load` wall times (s)

    @property
    def build_median(self) -> float | None:
        return statistics.median(self.build_times) if self.build_times else None


# ------------------------------------------------------------------------------------------------
# helpers


def log(msg: str) -> None:
    print(f"[sizes] {msg}", file=sys.stderr, flush=True)


def docker(*args: str, check: bool = True, timeout: float = 300.0,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])}... failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


ERROR_HINT = re.compile(r"error|not found|no such|cannot|can't|fatal|denied|failed|refused|unable",
                        re.IGNORECASE)


def first_error_line(*texts: str) -> str:
    """The first line that looks like an error (else the first non-empty line), shortened."""
    lines = [ln.strip() for t in texts for ln in (t or "").splitlines() if ln.strip()]
    pick = next((ln for ln in lines if ERROR_HINT.search(ln)), lines[0] if lines else "")
    pick = pick.replace("|", "\\|")
    return pick if len(pick) <= 160 else pick[:157] + "..."


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def first_diff(got: str, want: str) -> str:
    g, w = got.splitlines(), want.splitlines()
    for i, (a, b) in enumerate(zip(g, w)):
        if a != b:
            return f"output differs at line {i + 1}: got {a[:60]!r}, want {b[:60]!r}"
    return f"output has {len(g)} lines, expected {len(w)}"


def gzip6_size_of_saved_layers(tag: str) -> int:
    """gzip -6 size of the image's layer tar(s), as `docker save` gives them."""
    total = 0
    with tempfile.TemporaryDirectory(prefix="tj-sizes-save-") as d:
        saved = os.path.join(d, "img.tar")
        docker("save", "-o", saved, tag)
        with tarfile.open(saved) as t:
            manifest = json.load(t.extractfile("manifest.json"))  # type: ignore[arg-type]
            for layer in manifest[0]["Layers"]:
                comp = zlib.compressobj(6, zlib.DEFLATED, 31)   # gzip container, level 6
                f = t.extractfile(layer)
                assert f is not None
                while chunk := f.read(1 << 20):
                    total += len(comp.compress(chunk))
                total += len(comp.flush())
    return total


def files_size(top: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def run_image(w: wl.Workload, tag: str, extra: list[str] | None = None) -> tuple[bool, str]:
    """Run the image like a user would; servers get their exercises from the host."""
    extra = extra or []
    if not w.is_server:
        proc = docker("run", "--rm", "--network", "none", *extra, tag, check=False, timeout=RUN_TIMEOUT)
        if proc.returncode != 0:
            return False, first_error_line(proc.stderr, proc.stdout) or f"exit {proc.returncode}"
        if proc.stdout != w.expected_output:
            return False, first_diff(proc.stdout, w.expected_output)
        return True, ""
    assert w.port is not None
    if wl.port_open(w.port):
        raise RuntimeError(f"port {w.port} is busy on the host; free it first")
    name = f"tj-sizes-{w.name}-{os.getpid()}"
    docker("run", "-d", "--name", name, "--network", "host", *extra, tag, timeout=RUN_TIMEOUT)
    try:
        deadline = time.monotonic() + LISTEN_TIMEOUT
        while not wl.port_open(w.port):
            state = docker("inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", name).stdout.split()
            if state[0] != "true" or time.monotonic() > deadline:
                logs = docker("logs", name, check=False)
                why = first_error_line(logs.stderr, logs.stdout)
                if state[0] == "true":
                    return False, f"nothing listened on port {w.port} within {LISTEN_TIMEOUT:.0f} s"
                return False, why or f"exited {state[1]} before listening"
            time.sleep(0.1)
        out = []
        for ex in w.exercises:
            res = subprocess.run(["/bin/sh", "-c", ex], capture_output=True, text=True, timeout=60)
            if res.returncode != 0:
                return False, f"exercise {ex!r} exited {res.returncode}"
            out.append(res.stdout + "\n")
        got = "".join(out)
        if got != w.expected_output:
            return False, first_diff(got, w.expected_output)
        return True, ""
    finally:
        docker("rm", "-f", name, check=False)
        deadline = time.monotonic() + 20
        while wl.port_open(w.port) and time.monotonic() < deadline:
            time.sleep(0.1)


# ------------------------------------------------------------------------------------------------
# tracejail's way


# The builds compared: tracejail's default and its size options, from one recording.
DEFAULT, NO_IMPORTS, STRIP, SMALLEST = "default", "--no-import-closure", "--strip", "--strip --bytecode-only"
COLD = "default, no import cache"      # timed only: the closure parses every module again
VARIANTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (DEFAULT, ()),
    (NO_IMPORTS, ("--no-import-closure",)),
    (STRIP, ("--strip",)),
    (SMALLEST, ("--strip", "--bytecode-only")),
)


def tracejail_way(w: wl.Workload, work: Path, tag: str, reps: int) -> dict[str, Outcome]:
    """Record once; build, load and run each variant; then time `build --no-load` of every
    variant `reps` times, interleaved (so a busy moment of the machine hits all alike)."""
    t0 = time.monotonic()
    outcomes = {name: Outcome() for name, _ in VARIANTS}
    trace = work / "trace.json"
    args = [*TJ, "record", "-o", str(trace)]
    for ex in w.exercises:
        args += ["--exercise", ex]
    if w.port:
        args += ["--ready-port", str(w.port)]
    rec = subprocess.run([*args, "--", *w.command], cwd=w.dir, capture_output=True, text=True,
                         timeout=600)
    if rec.returncode != 0:
        for out in outcomes.values():
            out.error = "record: " + first_error_line(rec.stderr)
        return outcomes
    for name, options in VARIANTS:
        out = outcomes[name]
        build = subprocess.run([*TJ, "build", str(trace), "-t", tag, "-o", str(work / "image.tar"), "--json",
                                *options], capture_output=True, text=True, timeout=600)
        if build.returncode != 0:
            out.error = "build: " + first_error_line(build.stderr)
            continue
        summary = json.loads(build.stdout)
        out.compressed, out.on_disk = summary["image_size"], summary["bytes"]
        out.families = sum(f["bytes"] for f in summary.get("families", {}).values())
        out.imports = summary["python_imports"]["bytes"]
        out.import_modules = summary["python_imports"]["modules"]
        for option, reasons in summary.get("shrink", {}).get("kept_as_is", {}).items():
            for why, v in reasons.items():
                log(f"{w.name} {name}: {option} left {v['count']} as they are: {why} (e.g. {v['examples'][0]})")
        if not summary.get("loaded_id"):
            out.error = "build: image not loaded into Docker"
            continue
        out.works, out.error = run_image(w, tag)
        docker("rmi", "-f", tag, check=False)
    # The variants' first builds above filled the import-closure cache; COLD builds without it.
    outcomes[COLD] = Outcome()
    for _ in range(reps):
        for name, options in [*VARIANTS, (COLD, ())]:
            env = dict(os.environ, TRACEJAIL_CACHE_DIR="") if name == COLD else None
            start = time.monotonic()
            timed = subprocess.run([*TJ, "build", str(trace), "--no-load", "-o", str(work / "timed.tar"), *options],
                                   capture_output=True, text=True, timeout=600, env=env)
            if timed.returncode == 0:
                outcomes[name].build_times.append(time.monotonic() - start)
    for out in outcomes.values():
        out.seconds = time.monotonic() - t0
    return outcomes


# ------------------------------------------------------------------------------------------------
# the seed's way: ldd closure only


def real_python(executable: str) -> str:
    """What a person gets asking the interpreter itself (python3 may be a pyenv shim script)."""
    return subprocess.run([executable, "-c", "import sys; print(sys.executable)"], capture_output=True,
                          text=True, check=True).stdout.strip()


def main_binary(w: wl.Workload) -> tuple[str, list[str]]:
    """(main binary, argv for the image): the binary the recipe runs ldd on."""
    argv0 = w.command[0]
    if "/" in argv0:
        path = str((w.dir / argv0).absolute())
    else:
        found = shutil.which(argv0)
        if found is None:
            raise RuntimeError(f"{argv0} not on PATH")
        path = found
    if os.path.basename(argv0).startswith("python") and "/" not in argv0:
        path = real_python(path)                     # the shim is a shell script: ask Python
        return path, [path, *w.command[1:]]
    with open(os.path.realpath(path), "rb") as f:
        head = f.read(256)
    if head.startswith(b"#!"):
        interp = head[2:].split(b"\n", 1)[0].split()[0].decode()
        return interp, list(w.command)               # the kernel runs the #! interpreter
    return path, list(w.command)


def symlink_chain(path: str) -> list[str]:
    """path and every hop of its symlink chain (absolute)."""
    hops = [path]
    seen = {path}
    while os.path.islink(hops[-1]):
        nxt = os.path.normpath(os.path.join(os.path.dirname(hops[-1]), os.readlink(hops[-1])))
        if nxt in seen:
            break
        hops.append(nxt)
        seen.add(nxt)
    return hops


def ldd_libraries(binary: str) -> tuple[list[str], str]:
    proc = subprocess.run(["ldd", binary], capture_output=True, text=True)
    libs = []
    for line in proc.stdout.splitlines():
        m = re.search(r"=>\s+(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
        if m:
            libs.append(m.group(1))
    return libs, (proc.stdout + proc.stderr).strip()


def cp_parents(src: str, rootfs: Path) -> None:
    """`cp -L --parents SRC rootfs/`: the file's content at the path as named, symlinks followed."""
    subprocess.run(["cp", "-L", "--parents", src, str(rootfs) + "/"], check=True)


def seed_way(w: wl.Workload, work: Path, tag: str) -> Outcome:
    t0 = time.monotonic()
    out = Outcome()
    ctx = work / "seed"
    rootfs = ctx / "rootfs"
    rootfs.mkdir(parents=True)
    binary, argv = main_binary(w)
    libs, ldd_text = ldd_libraries(binary)
    if not libs:
        out.error = "ldd: " + first_error_line(ldd_text)
        return out
    app_dir = str(w.dir.resolve())
    wanted: list[str] = []
    # the main binary along its whole chain, e.g. .venv/bin/python -> python3 -> /root/.pyenv/.../python3
    # (hops inside the app folder come with the folder, as symlinks)
    for hop in symlink_chain(str(Path(binary).absolute())):
        if not (hop == app_dir or hop.startswith(app_dir + "/")):
            wanted.append(hop)
    wanted += [*libs, LOADER]
    for src in dict.fromkeys(wanted):
        cp_parents(src, rootfs)
    # the app folder, as it is (symlinks kept, venv included)
    dest = rootfs / app_dir.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(app_dir, dest, symlinks=True)
    (ctx / "Dockerfile").write_text(
        "FROM scratch\nCOPY rootfs /\n"
        f"WORKDIR {json.dumps(app_dir)}\n"
        f"CMD {json.dumps(argv)}\n")
    env = dict(os.environ, DOCKER_BUILDKIT="0")  # the classic builder ships with dockerd 20.10
    docker("build", "-q", "-t", tag, str(ctx), env=env, timeout=600)
    out.on_disk = files_size(rootfs)
    out.compressed = gzip6_size_of_saved_layers(tag)
    out.works, out.error = run_image(w, tag)
    out.seconds = time.monotonic() - t0
    return out


# ------------------------------------------------------------------------------------------------
# report


def python_note() -> str:
    exe = real_python(shutil.which("python3") or sys.executable)
    libs, _ = ldd_libraries(exe)
    shared = any("libpython" in os.path.basename(p) for p in libs)
    return f"{exe} ({'shared' if shared else 'static'} libpython)"


def ratio(a: int | float | None, b: int | float | None, digits: int = 2) -> str:
    return "-" if a is None or not b else f"{a / b:.{digits}f}"


def markdown(rows: list[tuple[wl.Workload, dict[str, Outcome], Outcome]], host: str, reps: int) -> str:
    def works(o: Outcome) -> str:
        return "yes" if o.works else f"no: `{o.error}`" if o.error else "no"

    def seconds(o: Outcome) -> str:
        return "-" if o.build_median is None else f"{o.build_median:.2f}"

    names = [name for name, _ in VARIANTS]
    lines = [
        "# Image sizes: tracejail vs the ldd-only recipe",
        "",
        "Written by `python bench/sizes.py` (do not edit by hand). Each sample workload is recorded once and",
        "built with tracejail four ways — the default, `--no-import-closure`, `--strip`, and",
        "`--strip --bytecode-only` — and built again the seed's way: `ldd` of its main binary, `cp -L --parents`",
        "of the binary, its libraries and the loader, plus the app folder, `FROM scratch` + `COPY rootfs /`.",
        "\"works\" means the image's output equals the workload's `expected_output.txt` (servers: the",
        "exercises' output, run from the host against the container on `--network host`).",
        "Sizes are the gzip -6 compressed single layer (on-disk bytes of the files in brackets).",
        "\"families\" and \"import closure\": on-disk bytes, in the default build, of the files kept whole as",
        "families looked up by name (codecs, time zones: `--no-family NAME`) and of the Python modules the",
        "static import closure added (imported on paths the run did not take: `--no-import-closure`).",
        "",
        "| workload | " + " | ".join(f"tracejail {n}" for n in names)
        + " | smallest / default | families | import closure | tracejail works | seed-way image | seed-way works |",
        "|---|" + "---|" * len(names) + "---|---|---|---|---|---|",
    ]
    for w, tj, seed in rows:
        base, small = tj[DEFAULT], tj[SMALLEST]
        all_work = "yes" if all(tj[n].works for n in names) else \
            "; ".join(f"{n}: {works(tj[n])}" for n in names if not tj[n].works)
        lines.append(f"| {w.name} | " + " | ".join(f"{mb(tj[n].compressed)} ({mb(tj[n].on_disk)})" for n in names)
                     + f" | {ratio(small.compressed, base.compressed, 3)} ({ratio(small.on_disk, base.on_disk, 3)})"
                     f" | {mb(base.families)} | {mb(base.imports)} ({base.import_modules} modules) | {all_work}"
                     f" | {mb(seed.compressed)} ({mb(seed.on_disk)}) | {works(seed)} |")
    lines += [
        "",
        f"Build time (`tracejail build --no-load`, seconds, median of {reps}, the variants interleaved;",
        "recording not included). The import closure caches what each module imports between builds;",
        f"\"{COLD}\" is the default build with that cache off (a first build):",
        "",
        "| workload | " + " | ".join([*names, COLD]) + " | default / --no-import-closure | cold / --no-import-closure"
        " | --strip / default | --strip --bytecode-only / default |",
        "|---|" + "---|" * (len(names) + 1) + "---|---|---|---|",
    ]
    for w, tj, _seed in rows:
        base, bare = tj[DEFAULT].build_median, tj[NO_IMPORTS].build_median
        lines.append(f"| {w.name} | " + " | ".join(seconds(tj[n]) for n in [*names, COLD])
                     + f" | {ratio(base, bare)} | {ratio(tj[COLD].build_median, bare)}"
                     f" | {ratio(tj[STRIP].build_median, base)} | {ratio(tj[SMALLEST].build_median, base)} |")
    lines += [
        "",
        "The tracejail images run as 65532:65532 (its default); the seed-way images as root (the recipe",
        "sets no USER). Plain workloads run with `--network none`, servers with `--network host`.",
        "",
        f"Host: {host}; `python3` is {python_note()}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these workloads")
    ap.add_argument("--venv-cache", default="/var/tmp/tracejail-bench-venvs",
                    help="where venv workloads' venvs are built once (default: %(default)s)")
    ap.add_argument("--output", help="markdown file to write (default bench/sizes.md; with --only: none)")
    ap.add_argument("--keep-images", action="store_true", help="leave the images in Docker")
    ap.add_argument("--reps", type=int, default=3, help="timed builds per variant (default: %(default)s)")
    args = ap.parse_args()

    docker("info", "--format", "{{.ServerVersion}}", timeout=30)
    chosen = [wl.get_workload(n) for n in args.only] if args.only else wl.all_workloads()
    rows: list[tuple[wl.Workload, dict[str, Outcome], Outcome]] = []
    failures = 0
    t_all = time.monotonic()
    for w in chosen:
        log(f"{w.name}: prepare")
        wl.prepare(w, cache_dir=Path(args.venv_cache))
        host_out = wl.run_on_host(w)
        if host_out != w.expected_output:
            raise RuntimeError(f"{w.name}: the host run does not give expected_output.txt")
        tags = (f"tj-sizes-{w.name}:tracejail", f"tj-sizes-{w.name}:ldd")
        with tempfile.TemporaryDirectory(prefix=f"tj-sizes-{w.name}-") as d:
            work = Path(d)
            try:
                log(f"{w.name}: tracejail record + build + run")
                tj = tracejail_way(w, work, tags[0], args.reps)
                log(f"{w.name}: seed way (ldd closure) build + run")
                seed = seed_way(w, work, tags[1])
            finally:
                if not args.keep_images:
                    docker("rmi", "-f", *tags, check=False)
        failures += not all(tj[n].works for n, _ in VARIANTS)
        log(f"{w.name}: tracejail " + ", ".join(f"{n} {mb(tj[n].compressed)} works={tj[n].works}" for n, _ in VARIANTS)
            + f"; seed {mb(seed.compressed)} works={seed.works} {seed.error}")
        rows.append((w, tj, seed))
    host = (f"{platform.system()} {platform.machine()}, kernel {platform.release()}, "
            f"Python {platform.python_version()}, Docker {docker('version', '--format', '{{.Server.Version}}').stdout.strip()}, "
            f"tracejail {__version__}")
    text = markdown(rows, host, args.reps)
    output = args.output or (None if args.only else str(ROOT / "bench" / "sizes.md"))
    if output:
        Path(output).write_text(text)
        log(f"wrote {output}")
    log(f"done in {time.monotonic() - t_all:.0f} s")
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
