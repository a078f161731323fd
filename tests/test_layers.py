"""`build --layers`: grouping by origin, determinism, the layer cache, sharing between two apps,
and layered images in real consumers (a private Docker engine, skopeo)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import private_podman
from tracejail import build as tjbuild
from tracejail import layers, rootfs
from tracejail import trace as tr
from tracejail.record import RecordOptions, record

TJ = [sys.executable, "-m", "tracejail"]

APP_JSON = "import json, sys\nprint(json.dumps({'args': sys.argv[1:]}))\n"
APP_CSV = "import csv, io, sys\nw = csv.writer(sys.stdout)\nw.writerow(['args', *sys.argv[1:]])\n"


def record_app(where: Path, source: str, *args: str) -> Path:
    """Record `python3 app.py ARGS` in `where`; return the trace."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "app.py").write_text(source)
    rec = record(["python3", "app.py", *args], RecordOptions(passthrough=False, cwd=str(where)))
    assert rec.run.exit_code == 0, rec.run.stderr
    out = where / "trace.json"
    tr.save(rec.trace, str(out))
    return out


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small Python apps on the host's interpreter, each importing different modules."""
    base = tmp_path_factory.mktemp("layer-apps")
    return {"json": record_app(base / "json-app", APP_JSON, "x"),
            "csv": record_app(base / "csv-app", APP_CSV, "y")}


@pytest.fixture
def layer_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRACEJAIL_CACHE_DIR", str(cache))
    return cache


def _build(trace: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([*TJ, "build", str(trace), "-o", str(out), "--no-load", "--json", *extra],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _manifest(archive: Path) -> dict:
    with tarfile.open(archive) as t:
        index = json.load(t.extractfile("index.json"))  # type: ignore[arg-type]
        digest = index["manifests"][0]["digest"].split(":")[1]
        return json.load(t.extractfile(f"blobs/sha256/{digest}"))  # type: ignore[arg-type]


def test_groups_follow_origins_and_hold_every_entry_once(apps: dict[str, Path], tmp_path: Path,
                                                        layer_cache: Path) -> None:
    result = tjbuild.build(str(apps["json"]), tjbuild.BuildOptions(output=str(tmp_path / "a.tar"), layers="auto",
                                                                   load=False))
    groups = result.layers.groups
    names = [g.name for g in groups]
    by_path = {p: g for g in groups for p in g.paths}
    # Each non-directory entry (and each empty directory) is in exactly one group.
    counted = [p for g in groups for p in g.paths]
    assert len(counted) == len(set(counted))
    for path, e in result.plan.entries.items():
        if e.kind != "dir":
            assert path in by_path, path
    libc = os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6")
    assert by_path[libc].name == "base"
    assert by_path[str(apps["json"].parent / "app.py")].tier is layers.Tier.APP
    assert by_path["/etc/passwd"].name == "image config"
    libpython = [p for p in by_path if os.path.basename(p).startswith("libpython3")]
    exe = result.config.entrypoint[0]
    real_exe = os.path.realpath(exe)
    if real_exe.startswith("/usr/"):   # a Debian python: its packages' layers
        assert by_path[real_exe].tier is layers.Tier.PACKAGE
    else:                              # pyenv or a source build: the installation's own layer
        assert by_path[real_exe].tier is layers.Tier.INTERPRETER
        assert all(by_path[p].tier is layers.Tier.INTERPRETER for p in libpython)
    json_init = [p for p in by_path if p.endswith("/json/__init__.py")]
    assert json_init and by_path[json_init[0]].tier in (layers.Tier.STDLIB, layers.Tier.PACKAGE)
    # Most shared first.
    assert [g.tier for g in groups] == sorted(g.tier for g in groups)
    assert len(names) == len(result.image.layers) <= layers.AUTO_MAX_LAYERS
    # The config's history names each layer; the manifest lists them in the same order.
    manifest = _manifest(tmp_path / "a.tar")
    assert [la["digest"] for la in manifest["layers"]] == [la.digest for la in result.image.layers]


def test_layers_are_deterministic_cached_and_only_changed_ones_are_made_again(
        apps: dict[str, Path], tmp_path: Path, layer_cache: Path) -> None:
    trace = apps["json"]
    first = _build(trace, tmp_path / "1.tar", "--layers", "auto")
    assert not any(la["cached"] for la in first["layers"])
    second = _build(trace, tmp_path / "2.tar", "--layers", "auto")
    assert all(la["cached"] for la in second["layers"])
    uncached = _build(trace, tmp_path / "3.tar", "--layers", "auto", "--no-cache")
    assert not any(la["cached"] for la in uncached["layers"])
    digest = [hashlib.sha256((tmp_path / f"{n}.tar").read_bytes()).hexdigest() for n in (1, 2, 3)]
    assert digest[0] == digest[1] == digest[2]

    # Only the app changes: its layer alone is made again, and the bytes equal a cold build's.
    app = trace.parent / "app.py"
    original = app.read_text()
    try:
        app.write_text(original + "# a change\n")
        changed = _build(trace, tmp_path / "4.tar", "--layers", "auto")
        remade = [la["name"] for la in changed["layers"] if not la["cached"]]
        assert remade == [f"app {trace.parent}"]
        cold = _build(trace, tmp_path / "5.tar", "--layers", "auto", "--no-cache")
        assert (tmp_path / "4.tar").read_bytes() == (tmp_path / "5.tar").read_bytes()
        assert changed["image_id"] != first["image_id"] and cold["image_id"] == changed["image_id"]
    finally:
        app.write_text(original)


def test_a_corrupt_cache_entry_is_made_again(apps: dict[str, Path], tmp_path: Path, layer_cache: Path) -> None:
    a = _build(apps["json"], tmp_path / "a.tar", "--layers", "auto")
    # Truncate every cached blob: a size that does not match is a miss, never a broken image.
    for blob in (layer_cache / "layers" / "blobs").iterdir():
        with open(blob, "r+b") as f:
            f.truncate(10)
    b = _build(apps["json"], tmp_path / "b.tar", "--layers", "auto")
    assert not any(la["cached"] for la in b["layers"])
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert a["image_id"] == b["image_id"]


def test_two_apps_share_at_least_half_of_their_bytes(apps: dict[str, Path], tmp_path: Path,
                                                     layer_cache: Path) -> None:
    a = _build(apps["json"], tmp_path / "a.tar", "--layers", "auto")
    b = _build(apps["csv"], tmp_path / "b.tar", "--layers", "auto")
    size_a = {la["digest"]: la["size"] for la in a["layers"]}
    size_b = {la["digest"]: la["size"] for la in b["layers"]}
    shared = sum(size for digest, size in size_a.items() if digest in size_b)
    assert shared >= 0.5 * sum(size_a.values()) and shared >= 0.5 * sum(size_b.values()), (a["layers"], b["layers"])
    names_shared = {la["name"] for la in a["layers"] if la["digest"] in size_b}
    assert "base" in names_shared
    # Single-layer images of the same apps share nothing.
    one_a = _build(apps["json"], tmp_path / "c.tar")
    one_b = _build(apps["csv"], tmp_path / "d.tar")
    assert {la["digest"] for la in one_a["layers"]}.isdisjoint({la["digest"] for la in one_b["layers"]})


def test_layer_count_is_capped_and_bad_values_are_usage_errors(apps: dict[str, Path], tmp_path: Path,
                                                                layer_cache: Path) -> None:
    three = _build(apps["json"], tmp_path / "a.tar", "--layers", "3")
    assert len(three["layers"]) == 3
    assert three["layers"][0]["name"] == "base" and " more" in three["layers"][2]["name"]
    one = _build(apps["json"], tmp_path / "b.tar", "--layers", "1")
    assert len(one["layers"]) == 1
    for bad in ("0", "abc", "1000", "-2"):
        proc = subprocess.run([*TJ, "build", str(apps["json"]), "-o", str(tmp_path / "x.tar"), "--layers", bad],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (bad, proc.stderr)
        assert "Traceback" not in proc.stderr and "--layers" in proc.stderr
        assert not (tmp_path / "x.tar").exists()


def test_limit_merges_the_least_shared_groups() -> None:
    groups = [layers.LayerGroup(f"g{n}", layers.Tier(min(n, 7)), [f"/f{n}"]) for n in range(6)]
    merged = layers.limit(groups, 4)
    assert [g.name for g in merged[:3]] == ["g0", "g1", "g2"]
    assert merged[3].paths == ["/f3", "/f4", "/f5"]
    assert layers.limit(groups, 10) == groups


def test_layer_entries_bring_their_parent_directories() -> None:
    plan = rootfs.Plan({
        "/": rootfs.Entry("/", "dir", 0o755, None, None, 0, 0, 0),
        "/a": rootfs.Entry("/a", "dir", 0o750, None, None, 0, 0, 0),
        "/a/b": rootfs.Entry("/a/b", "dir", 0o755, None, None, 0, 0, 0),
        "/a/b/f": rootfs.Entry("/a/b/f", "file", 0o644, "/etc/hostname", None, 1, 0, 0),
        "/c": rootfs.Entry("/c", "symlink", 0o777, None, "a/b", 0, 0, 0),
    })
    ordered = rootfs.ordered_entries(plan)
    assert [e.path for e in layers.layer_entries(ordered, ["/a/b/f"])] == ["/", "/a", "/a/b", "/a/b/f"]
    assert [e.path for e in layers.layer_entries(ordered, ["/c"])] == ["/", "/c"]


def test_hard_links_stay_with_their_target(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_text("x")
    plan = rootfs.Plan({
        "/app": rootfs.Entry("/app", "dir", 0o755, None, None, 0, 0, 0),
        "/app/f": rootfs.Entry("/app/f", "file", 0o644, str(src), None, 1, 0, 0),
        "/opt": rootfs.Entry("/opt", "dir", 0o755, None, None, 0, 0, 0),
        "/opt/g": rootfs.Entry("/opt/g", "hardlink", 0o644, None, "/app/f", 0, 0, 0),
    })
    groups = layers.group(plan, layers.Origins(deb={}, pypi={}, app_trees=("/app",)))
    assert len(groups) == 1 and groups[0].paths == ["/app/f", "/opt/g"]


@pytest.mark.docker
def test_layered_image_runs_in_docker_and_skopeo_reads_it(apps: dict[str, Path], tmp_path: Path, layer_cache: Path,
                                                          docker_engine) -> None:
    tag = "tj-layers-json:1"
    env = {**docker_engine.env, "TRACEJAIL_CACHE_DIR": str(layer_cache)}
    proc = subprocess.run([*TJ, "build", str(apps["json"]), "-t", tag, "--layers", "auto", "--json"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["loaded_id"] and len(summary["layers"]) > 3
    assert [n for n in os.listdir(tmp_path) if n != "cache"] == []   # -t alone: loaded, no archive left behind
    out = docker_engine.run("run", "--rm", tag)
    assert json.loads(out.stdout) == {"args": ["x"]}
    history = docker_engine.run("history", "--no-trunc", "--format", "{{.CreatedBy}}", tag).stdout.splitlines()
    assert len(history) == len(summary["layers"]) and any("base" in h for h in history)
    docker_engine.run("rmi", "-f", tag, check=False)
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed (tests/run installs it)")
    archive = tmp_path / "a.tar"
    _build(apps["json"], archive, "--layers", "auto")
    inspected = subprocess.run(["skopeo", "inspect", f"oci-archive:{archive}"], capture_output=True, text=True,
                               timeout=60)
    assert inspected.returncode == 0, inspected.stderr
    assert len(json.loads(inspected.stdout)["Layers"]) == len(summary["layers"])


def test_podman_loads_a_layered_archive(apps: dict[str, Path], tmp_path: Path, layer_cache: Path) -> None:
    archive = tmp_path / "a.tar"
    summary = _build(apps["json"], archive, "--layers", "auto", "-t", "tjtest/layered:1")
    with private_podman(tmp_path) as base:
        proc = subprocess.run([*base, "load", "-i", str(archive)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 and "permission" in proc.stderr.lower():
            pytest.skip(f"podman cannot run here: {proc.stderr.strip().splitlines()[-1]}")
        assert proc.returncode == 0, proc.stderr
        inspected = subprocess.run([*base, "image", "inspect", "docker.io/tjtest/layered:1"], capture_output=True,
                                   text=True, timeout=60)
        assert inspected.returncode == 0, inspected.stderr
        info = json.loads(inspected.stdout)[0]
        assert "sha256:" + info["Id"] == summary["image_id"]
        assert len(info["RootFS"]["Layers"]) == len(summary["layers"])


def test_containerd_imports_a_layered_archive(apps: dict[str, Path], tmp_path: Path, layer_cache: Path,
                                              containerd_address: str) -> None:
    """containerd itself (a private one) imports the archive and names it."""
    archive = tmp_path / "a.tar"
    summary = _build(apps["json"], archive, "--layers", "auto", "-t", "tjtest/layered-ctr:1")
    base = ["ctr", "--address", containerd_address, "--namespace", "tj-test"]
    proc = subprocess.run([*base, "images", "import", str(archive)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    listed = subprocess.run([*base, "images", "ls"], capture_output=True, text=True, timeout=60).stdout
    line = next(ln for ln in listed.splitlines() if ln.startswith("docker.io/tjtest/layered-ctr:1"))
    assert summary["manifest_digest"] in line
