"""End to end: record each sample workload, build its image, run it in a real Docker engine as the
default non-root user, and compare with the host run; explain and inspect agree with what build
made. Sizes go to the test log."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import workloads as wl
from tracejail import build as tjbuild
from tracejail import inspection as ins
from tracejail import provenance as prov
from tracejail import trace as tr

TJ = [sys.executable, "-m", "tracejail"]
pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="session")
def venv_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("venv-cache")


def record_workload(w: wl.Workload, out: Path) -> subprocess.CompletedProcess:
    args = [*TJ, "record", "-o", str(out)]
    for ex in w.exercises:
        args += ["--exercise", ex]
    if w.port:
        args += ["--ready-port", str(w.port)]
    return subprocess.run([*args, "--", *w.command], cwd=w.dir, capture_output=True, text=True,
                          timeout=300)


def run_image(engine, w: wl.Workload, tag: str, network: str = "publish") -> str:
    """Run the image like a user would; for servers, run the exercises against the container,
    published on 127.0.0.1 through the engine's bridge (or sharing the host's network)."""
    if not w.port:
        proc = engine.run("run", "--rm", tag, check=False, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout
    name = f"tj-e2e-{w.name}-{int(time.time() * 1000)}"
    how = ["-p", f"127.0.0.1:{w.port}:{w.port}"] if network == "publish" else ["--network", "host"]
    engine.run("run", "-d", "--rm", "--name", name, *how, tag, timeout=120)
    if network == "publish":
        ports = engine.run("port", name).stdout
        assert f"127.0.0.1:{w.port}" in ports, ports
    try:
        wl.wait_for_port(w.port, timeout=30)
        # Published through docker-proxy, the port accepts before the server in the container
        # listens: wait until the first exercise is answered.
        deadline = time.time() + 30
        while subprocess.run(["/bin/sh", "-c", w.exercises[0]], capture_output=True).returncode != 0:
            assert time.time() < deadline, f"{w.name}: no answer through the published port"
            time.sleep(0.2)
        out = []
        for ex in w.exercises:
            res = subprocess.run(["/bin/sh", "-c", ex], capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, (ex, res.stderr)
            out.append(res.stdout + "\n")
        return "".join(out)
    finally:
        engine.run("rm", "-f", name, check=False)
        deadline = time.time() + 20
        while wl.port_open(w.port) and time.time() < deadline:
            time.sleep(0.1)


def explain_and_inspect_agree_with_build(trace_path: Path, result: tjbuild.BuildResult) -> None:
    """One plan for all three: every node build put in the image, explain calls in the image
    for a stated reason (never "other"); whatever explain calls in the image, build holds
    (through its symlinks); inspect counts what build counted."""
    with prov.selected(str(trace_path), tjbuild.BuildOptions()) as sel:
        pv = prov.compute(sel.trace, sel.files, sel.plan, sel.root)
        assert set(sel.plan.entries) == set(result.plan.entries)
        for path in sorted(result.plan.entries):
            ex = prov.explain(path, pv, sel.files, sel.plan)
            assert ex.in_image and ex.reasons, (path, ex.status, ex.summary)
            assert all(r.kind != prov.OTHER for r in ex.reasons), (path, [r.text for r in ex.reasons])
        for path in sorted(sel.files.wanted):
            ex = prov.explain(path, pv, sel.files, sel.plan)
            if ex.in_image:
                assert ex.image_path in result.plan.entries, (path, ex.image_path)
        counted = ins.report(str(trace_path), sel.trace, sel.files, sel.plan, root=sel.root)["image"]
    built = result.summary()
    assert (counted["files"], counted["bytes"]) == (built["files"], built["bytes"])


@pytest.mark.parametrize("name", [w.name for w in wl.all_workloads()])
def test_workload_record_build_run(name: str, docker_engine, tmp_path: Path, venv_cache: Path) -> None:
    w = wl.get_workload(name)
    wl.prepare(w, cache_dir=venv_cache)
    expected = wl.run_on_host(w)
    assert expected == w.expected_output
    trace_path = tmp_path / "trace.json"
    rec = record_workload(w, trace_path)
    assert rec.returncode == 0, rec.stderr
    if not w.port:
        assert rec.stdout == expected
    else:
        run = tr.load(str(trace_path)).runs[0]
        assert "".join(e.stdout + "\n" for e in run.exercises) == expected

    tag = f"tj-e2e-{name}:latest"
    result = tjbuild.build(str(trace_path), tjbuild.BuildOptions(
        tags=[tag], output=str(tmp_path / "image.tar"), docker_env=docker_engine.env))
    assert result.loaded_id, result.warnings
    explain_and_inspect_agree_with_build(trace_path, result)
    assert result.config.user == "65532:65532"
    got = run_image(docker_engine, w, tag)
    assert got == expected
    if w.port:   # the fallback users without a bridge take: the host's network
        assert run_image(docker_engine, w, tag, network="host") == expected
    size = result.image.compressed_size
    print(f"\n[size] {name}: {size / 1e6:.1f} MB compressed, {result.plan.files_size() / 1e6:.1f} MB "
          f"on disk, {len(result.plan.entries)} entries")

    # The same trace with --strip --bytecode-only: a smaller image, the same output.
    small = tjbuild.build(str(trace_path), tjbuild.BuildOptions(
        tags=[tag], output=str(tmp_path / "small.tar"), docker_env=docker_engine.env, strip=True,
        bytecode_only=True))
    assert small.loaded_id, small.warnings
    assert run_image(docker_engine, w, tag) == expected
    savings = small.summary()["shrink"]["savings"]
    assert savings["--strip"]["bytes_saved"] >= 0 and savings["--bytecode-only"]["bytes_saved"] >= 0
    if "python" in " ".join(w.command):
        assert savings["--bytecode-only"]["files"] > 0, small.summary()["shrink"]
        assert small.image.compressed_size < size
    else:     # Debian's programs and libraries come stripped already
        assert small.image.compressed_size <= size
    print(f"[size] {name} --strip --bytecode-only: {small.image.compressed_size / 1e6:.1f} MB compressed, "
          f"{small.plan.files_size() / 1e6:.1f} MB on disk")
    docker_engine.run("rmi", "-f", tag, check=False)
