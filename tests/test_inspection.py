"""`tracejail inspect` and `tracejail explain` on real recordings (no mocks), plus the pure parts:
reason parsing, failed-lookup grouping."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import workloads as wl
from tracejail import inspection as ins
from tracejail import provenance as prov
from tracejail import trace as tr

TJ = [sys.executable, "-m", "tracejail"]


def run_tj(*args: str, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*TJ, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def record(out: Path, command: list[str], cwd: str | Path) -> Path:
    proc = run_tj("record", "-o", str(out), "--", *command, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def shell_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = wl.get_workload("shell-pipeline")
    return record(tmp_path_factory.mktemp("sh") / "trace.json", w.command, w.dir)


@pytest.fixture(scope="module")
def plugin_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = wl.get_workload("c-plugin")
    wl.prepare(w)
    return record(tmp_path_factory.mktemp("cp") / "trace.json", w.command, w.dir)


@pytest.fixture(scope="module")
def python_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A script that imports a stdlib package (its .py files are only stat'ed: the .pyc is read)
    and reads /etc/shadow (root can; the image must still leave it out)."""
    d = tmp_path_factory.mktemp("py")
    (d / "app.py").write_text(textwrap.dedent("""\
        import json
        try:
            open("/etc/shadow").read()
        except OSError:
            pass
        print(json.dumps({"ok": True}))
    """))
    return record(d / "trace.json", [sys.executable, "app.py"], d)


@pytest.fixture(scope="module")
def numpy_trace(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Path:
    w = wl.get_workload("numpy-venv")
    try:   # the venv is built once per machine under the pytest cache (pip needs PyPI once)
        wl.prepare(w, cache_dir=Path(pytestconfig.cache.mkdir("tracejail-venvs")))
    except RuntimeError as exc:
        pytest.skip(f"numpy-venv could not be prepared: {str(exc).splitlines()[0]}")
    return record(tmp_path_factory.mktemp("np") / "trace.json", w.command, w.dir)


def explain(trace_path: Path, *paths: str) -> list[dict]:
    proc = run_tj("explain", str(trace_path), *paths, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def kinds(ex: dict) -> set[str]:
    return {r["kind"] for r in ex["reasons"]}


# --- explain: the acceptance cases ----------------------------------------------------------


def test_explain_dlopened_plugin(plugin_trace: Path) -> None:
    lib = str(wl.get_workload("c-plugin").dir / "plugins" / "libupper.so")
    [ex] = explain(plugin_trace, lib)
    assert ex["in_image"] and ex["status"] == "kept"
    assert prov.DLOPEN in kinds(ex), ex
    traced = next(r for r in ex["reasons"] if r["kind"] == prov.TRACED)
    assert "read" in traced["access"] and "openat" in traced["syscalls"]
    assert "./main upper,reverse,crc32" in traced["text"]      # which process, which command
    assert not kinds(ex) & {prov.NEEDED, prov.INTERP}


def test_explain_origin_library_of_a_wheel(numpy_trace: Path) -> None:
    site = wl.get_workload("numpy-venv").dir / ".venv" / "lib"
    libs = sorted(site.glob("python3*/site-packages/numpy.libs/libscipy_openblas*.so"))
    assert libs, "numpy wheel without its vendored OpenBLAS?"
    [ex] = explain(numpy_trace, str(libs[0]))
    assert ex["in_image"]
    needed = [r for r in ex["reasons"] if r["kind"] == prov.NEEDED]
    assert needed, ex
    r = needed[0]
    assert r["rule"] in ("rpath", "runpath") and r["via_origin"] is True
    assert any("_multiarray_umath" in by for by in r["needed_by"])
    assert r["search_path"].startswith("$ORIGIN")
    assert "$ORIGIN" in r["text"] and ("DT_RPATH" in r["text"] or "DT_RUNPATH" in r["text"])


def test_explain_loader_symlink(shell_trace: Path) -> None:
    loader = "/lib64/ld-linux-x86-64.so.2"
    if not os.path.islink(loader):
        pytest.skip("this host has no /lib64/ld-linux-x86-64.so.2 symlink")
    [ex, lib64] = explain(shell_trace, loader, "/lib64")
    assert ex["in_image"]
    interp = [r for r in ex["reasons"] if r["kind"] == prov.INTERP and r["name"] == loader]
    assert interp and "PT_INTERP" in interp[0]["text"]
    assert any(by.endswith("/sh") for by in interp[0]["needed_by"])
    # whatever the layout, the name resolves through symlinks to the real loader file
    assert ex["image_path"] == os.path.realpath(loader)
    assert ex["resolves_through"], ex
    if os.path.islink("/lib64"):      # merged-/usr with /lib64 -> usr/lib64
        assert lib64["entry_kind"] == "symlink"
        assert prov.SYMLINK in kinds(lib64)
        assert any(loader in r.get("to", []) for r in lib64["reasons"])
    else:                             # Debian 12: /lib64 is a directory holding the symlink
        assert ex["entry_kind"] == "symlink" or ex["status"] == "kept"


def test_explain_stat_only_python_source(python_trace: Path) -> None:
    trace = tr.load(str(python_trace))
    stat_only = sorted((not p.endswith("/json/decoder.py"), p) for p, r in trace.files.items()
                       if r.ok and r.kinds == {"stat"} and p.endswith(".py"))
    if not stat_only:
        pytest.skip("no .py was only stat'ed (no cached .pyc on this host?)")
    stat_only = [p for _, p in stat_only]
    [ex] = explain(python_trace, stat_only[0])
    assert ex["in_image"]
    traced = next(r for r in ex["reasons"] if r["kind"] == prov.TRACED)
    assert traced["access"] == ["stat"] and "only stat'ed" in traced["text"]
    companion = [r for r in ex["reasons"] if r["kind"] == prov.PYTHON]
    assert companion and companion[0]["pyc"].endswith(".pyc") and "__pycache__" in companion[0]["pyc"]


def test_explain_excluded_shadow(python_trace: Path) -> None:
    [ex] = explain(python_trace, "/etc/shadow")
    assert not ex["in_image"]
    assert ex["status"] in ("excluded", "failed-lookup")   # failed when not root
    rules = [r.get("rule", "") for r in ex["reasons"]]
    assert any("sensitive" in rule for rule in rules), ex
    if os.access("/etc/shadow", os.R_OK):
        assert ex["status"] == "excluded"
        assert "sensitive file" in ex["summary"]


def test_explain_other_answers(shell_trace: Path, tmp_path: Path) -> None:
    never = tmp_path / "never-touched.txt"
    never.write_text("x")
    [preload, untouched, passwd, grep] = explain(shell_trace, "/etc/ld.so.preload", str(never),
                                                 "/etc/passwd", "/usr/bin/grep")
    assert preload["status"] == "failed-lookup" and "ENOENT" in preload["reasons"][0]["text"]
    assert untouched["status"] == "not-traced" and not untouched["in_image"]
    assert passwd["status"] == "generated"
    assert grep["in_image"] and "exec" in next(r for r in grep["reasons"] if r["kind"] == "traced")["access"]


def test_explain_text_output(shell_trace: Path) -> None:
    proc = run_tj("explain", str(shell_trace), "/usr/bin/grep", "/etc/shadow")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("/usr/bin/grep: in the image")
    assert "\n/etc/shadow: not in the image" in proc.stdout
    assert run_tj("explain", str(shell_trace)).returncode == 2           # no PATH: usage error
    assert run_tj("explain", "/nonexistent.json", "/x").returncode == 65


def test_symlink_targets_carry_the_reasons_of_their_names(shell_trace: Path) -> None:
    with prov.selected(str(shell_trace)) as sel:
        pv = prov.compute(sel.trace, sel.files, sel.plan)
        for path, e in sel.plan.entries.items():
            ep = pv.entries[path]
            assert ep.reasons, f"{path} has no reason"
            if e.kind == "symlink":
                assert ep.reasons[0].kind in (prov.SYMLINK, prov.TRACED, prov.INTERP, prov.SCRIPT,
                                              prov.NEEDED, prov.TARGET) or any(
                    r.kind == prov.SYMLINK for r in ep.reasons), (path, ep.reasons)
        doc = pv.to_json("sha256:x")
        json.dumps(doc)
        assert doc["format"] == prov.FORMAT
        assert all(p in doc["entries"] for p, e in sel.plan.entries.items() if e.kind == "file")


# --- inspect --------------------------------------------------------------------------------


def test_inspect_json_report(shell_trace: Path) -> None:
    proc = run_tj("inspect", str(shell_trace), "--json", "--top", "3")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    [run] = r["runs"]
    assert run["exit_code"] == 0 and run["process_count"] > 10
    [root] = run["processes"]
    assert root["argv"][-1].endswith("report.sh") and root["children"]   # a tree, not a list
    assert any(c["argv"][0] == "sort" for c in root["children"])
    img = r["image"]
    assert "/usr/bin/grep" in img["by_kind"]["elf-executable"]["examples"] or \
        img["by_kind"]["elf-executable"]["count"] >= 8
    assert img["by_kind"]["shared-library"]["count"] >= 2
    assert img["by_kind"]["script"]["examples"][0].endswith("report.sh")
    assert len(img["largest_files"]) == 3
    sizes = [f["bytes"] for f in img["largest_files"]]
    assert sizes == sorted(sizes, reverse=True)
    assert img["bytes"] == sum(v["bytes"] for v in img["by_kind"].values())
    assert "misses" not in r


def test_inspect_text_with_misses(shell_trace: Path) -> None:
    proc = run_tj("inspect", str(shell_trace), "--misses")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for heading in ("run 0:", "processes:", "files by kind:", "largest files:", "largest directories",
                    "failed lookups:"):
        assert heading in out
    # PATH probes are noise (hidden behind a count); ld.so.preload is config another host may have
    assert "search-probe" in out
    config_block = out.split("configuration a different environment may have")[1]
    assert "/etc/ld.so.preload" in config_block


def test_inspect_exercises_and_ports(tmp_path: Path) -> None:
    w = wl.get_workload("python-web")
    out = tmp_path / "trace.json"
    args = ["record", "-o", str(out), "--ready-port", str(w.port)]
    for ex in w.exercises:
        args += ["--exercise", ex]
    proc = run_tj(*args, "--", *w.command, cwd=w.dir)
    if proc.returncode != 0 and "already in use" in proc.stderr:
        pytest.skip(f"port {w.port} busy")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(run_tj("inspect", str(out), "--json").stdout)
    run = r["runs"][0]
    assert [e["command"] for e in run["exercises"]] == w.exercises
    assert all(e["ok"] for e in run["exercises"]) and w.port in run["listening_ports"]
    text = run_tj("inspect", str(out)).stdout
    assert f"exercise: {w.exercises[0]}  [ok" in text


# --- pure parts -----------------------------------------------------------------------------


def _trace_with(records: dict[str, list[tuple[str, str, str]]]) -> tr.Trace:
    t = tr.Trace()
    for path, accesses in records.items():
        rec = t.record(path)
        for kind, syscall, result in accesses:
            rec.add(kind, syscall, result, pid=7)
    return t


def test_misses_are_grouped() -> None:
    t = _trace_with({
        "/usr/lib/x86_64-linux-gnu/libfoo.so.1": [("read", "openat", "ok")],
        "/opt/app/lib/glibc-hwcaps/x86-64-v3/libfoo.so.1": [("read", "openat", "ENOENT")],
        "/opt/app/lib/libfoo.so.1": [("read", "openat", "ENOENT")],
        "/usr/bin/sort": [("exec", "execve", "ok")],
        "/usr/local/bin/sort": [("exec", "execve", "ENOENT")],
        "/etc/app/app.conf": [("read", "openat", "ENOENT")],
        "/root/.apprc": [("read", "openat", "ENOENT")],
        "/opt/app/plugins/libextra.so": [("read", "openat", "ENOENT")],
        "/proc/self/nothing": [("read", "openat", "ENOENT")],
        "/srv/data/input.bin": [("read", "openat", "EACCES")],
    })
    groups = {m.miss.path: (m.group.value, m.found_at) for m in ins.grouped_misses(t)}
    assert groups["/opt/app/lib/glibc-hwcaps/x86-64-v3/libfoo.so.1"][0] == "loader-probe"
    assert groups["/opt/app/lib/libfoo.so.1"] == ("search-probe", "/usr/lib/x86_64-linux-gnu/libfoo.so.1")
    assert groups["/usr/local/bin/sort"] == ("search-probe", "/usr/bin/sort")
    assert groups["/etc/app/app.conf"][0] == "config"
    assert groups["/root/.apprc"][0] == "config"
    assert groups["/opt/app/plugins/libextra.so"][0] == "plugin"
    assert groups["/proc/self/nothing"][0] == "runtime"
    assert groups["/srv/data/input.bin"][0] == "other"
    summary = ins.misses_summary(ins.grouped_misses(t))
    assert summary["total"] == 8 and summary["hidden"] == {"loader-probe": 1, "search-probe": 2, "runtime": 1}
    assert [m["path"] for m in summary["groups"]["config"]] == ["/etc/app/app.conf", "/root/.apprc"]
