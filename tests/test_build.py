"""`tracejail build`: file selection, safety, reproducibility and bad input, on real traces."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tracejail import build as tjbuild
from tracejail import fileset
from tracejail import trace as tr
from tracejail.record import RecordOptions, record

TJ = [sys.executable, "-m", "tracejail"]


def run_tj(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*TJ, *args], capture_output=True, text=True, timeout=300, **kw)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def awk_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`awk` is a symlink chain on Debian: /usr/bin/awk -> /etc/alternatives/awk -> mawk."""
    out = tmp_path_factory.mktemp("awk") / "trace.json"
    rec = record(["awk", "BEGIN { printf \"%d\\n\", 6 * 7 }"], RecordOptions(passthrough=False))
    assert rec.run.stdout == "42\n"
    tr.save(rec.trace, str(out))
    return out


def test_selection_keeps_symlink_chain_loader_and_companions(awk_trace: Path) -> None:
    trace = tr.load(str(awk_trace))
    fs = fileset.select(trace)
    assert "/usr/bin/awk" in fs.wanted
    assert "/lib64/ld-linux-x86-64.so.2" in fs.wanted
    result = tjbuild.build(str(awk_trace), tjbuild.BuildOptions(output=str(awk_trace.parent / "a.tar")))
    entries = result.plan.entries
    assert entries["/usr/bin/awk"].kind == "symlink"
    assert entries["/usr/bin/awk"].link_target == "/etc/alternatives/awk"
    assert entries["/etc/alternatives/awk"].kind == "symlink"
    real = os.path.realpath("/usr/bin/awk")
    assert entries[real].kind == "file"
    assert entries["/tmp"].mode == 0o1777
    assert entries["/etc/passwd"].kind == "file" and entries["/etc/group"].kind == "file"
    assert result.config.user == "65532:65532"
    assert result.config.entrypoint[0] == "/usr/bin/awk"


def test_two_builds_are_byte_identical_and_skopeo_reads_both_transports(awk_trace: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    assert run_tj("build", str(awk_trace), "-o", str(a)).returncode == 0
    assert run_tj("build", str(awk_trace), "-o", str(b)).returncode == 0
    assert sha256(a) == sha256(b)
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed (tests/run installs it)")
    for transport in ("oci-archive", "docker-archive"):
        proc = subprocess.run(["skopeo", "inspect", "--config", f"{transport}:{a}"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        cfg = json.loads(proc.stdout)
        assert cfg["config"]["User"] == "65532:65532"
        assert cfg["config"]["Labels"][tjbuild.LABEL_TRACE_DIGEST] == \
            "sha256:" + sha256(awk_trace)


@pytest.mark.docker
def test_symlink_chain_program_runs_in_docker(awk_trace: Path, tmp_path: Path, docker_engine) -> None:
    result = tjbuild.build(str(awk_trace), tjbuild.BuildOptions(
        tags=["tj-test-awk:1"], output=str(tmp_path / "awk.tar"), docker_env=docker_engine.env))
    assert result.loaded_id
    proc = docker_engine.run("run", "--rm", "tj-test-awk:1")
    assert proc.stdout == "42\n"
    docker_engine.run("rmi", "-f", "tj-test-awk:1", check=False)


def _hostile_trace(tmp_path: Path, evil_link: Path) -> Path:
    rec = record(["true"], RecordOptions(passthrough=False))
    trace = rec.trace
    for p in (f"{evil_link}/etc/hostname", "/etc/../../../../tmp/escape-target",
              f"{tmp_path}/../{tmp_path.name}/x/../../../etc/hostname"):
        trace.record(p).add("read", "openat", "ok", 1)
    out = tmp_path / "hostile.json"
    tr.save(trace, str(out))
    return out


def test_hostile_trace_cannot_write_outside_the_output(tmp_path: Path) -> None:
    evil = tmp_path / "evil"
    evil.symlink_to("/")
    trace_path = _hostile_trace(tmp_path, evil)
    rootfs = tmp_path / "out" / "rootfs"
    rootfs.parent.mkdir()
    outside_before = sorted(os.listdir(tmp_path))
    # what the hostile paths aim at: /etc/hostname through the link, /tmp/escape-target via ..
    hostname_before = (os.lstat("/etc/hostname").st_mtime_ns, Path("/etc/hostname").read_bytes())
    proc = run_tj("build", str(trace_path), "--rootfs", str(rootfs), "-o", str(tmp_path / "out" / "i.tar"))
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 0, proc.stderr
    # the symlink to / is kept as a symlink inside the tree, never followed while writing
    staged_evil = rootfs / str(evil).lstrip("/")
    assert staged_evil.is_symlink() and os.readlink(staged_evil) == "/"
    assert sorted(os.listdir(tmp_path)) == outside_before
    assert (os.lstat("/etc/hostname").st_mtime_ns, Path("/etc/hostname").read_bytes()) == hostname_before
    assert not os.path.exists("/tmp/escape-target")
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in dirnames + filenames:
            real = os.path.realpath(os.path.join(dirpath, name)) if not os.path.islink(
                os.path.join(dirpath, name)) else os.path.join(dirpath, name)
            assert real.startswith(str(rootfs))


def test_sensitive_files_left_out_unless_included(tmp_path: Path) -> None:
    rec = record(["sh", "-c", "cat /etc/shadow /etc/hostname > /dev/null"], RecordOptions(passthrough=False))
    trace_path = tmp_path / "t.json"
    tr.save(rec.trace, str(trace_path))
    fs = fileset.select(rec.trace)
    assert "/etc/shadow" not in fs.wanted
    assert any(p == "/etc/shadow" and "sensitive" in rule for p, rule in fs.excluded)
    fs = fileset.select(rec.trace, fileset.SelectOptions(include=("/etc/shadow",)))
    assert "/etc/shadow" in fs.wanted


def test_excludes_created_files_and_virtual_filesystems(tmp_path: Path) -> None:
    made = tmp_path / "made-by-run.txt"
    rec = record(["sh", "-c", f"echo x > {made}; cat {made} /proc/self/status > /dev/null"],
                 RecordOptions(passthrough=False))
    fs = fileset.select(rec.trace)
    assert str(made) not in fs.wanted
    assert (str(made), "created by the recorded run") in fs.excluded
    assert not any(p.startswith("/proc/") for p in fs.wanted)


def test_bad_inputs(tmp_path: Path, awk_trace: Path) -> None:
    proc = run_tj("build", str(tmp_path / "nope.json"), "-o", str(tmp_path / "x.tar"))
    assert proc.returncode == 65 and "trace not found" in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("garbage")
    proc = run_tj("build", str(bad), "-o", str(tmp_path / "x.tar"))
    assert proc.returncode == 65 and "not valid JSON" in proc.stderr
    data = json.loads(awk_trace.read_text())
    data["format"] = "tracejail-trace/99"
    bad.write_text(json.dumps(data))
    proc = run_tj("build", str(bad), "-o", str(tmp_path / "x.tar"))
    assert proc.returncode == 65 and "tracejail-trace/99" in proc.stderr
    proc = run_tj("build", str(awk_trace), "-o", "/nonexistent-dir/x.tar")
    assert proc.returncode != 0 and "cannot write" in proc.stderr
    for p in (proc,):
        assert "Traceback" not in p.stderr
    assert not list(tmp_path.glob("*.tar*"))


def test_vanished_file_warns_and_strict_fails(tmp_path: Path) -> None:
    victim = tmp_path / "data.txt"
    victim.write_text("soon gone")
    rec = record(["cat", str(victim)], RecordOptions(passthrough=False))
    trace_path = tmp_path / "t.json"
    tr.save(rec.trace, str(trace_path))
    victim.unlink()
    proc = run_tj("build", str(trace_path), "-o", str(tmp_path / "ok.tar"))
    assert proc.returncode == 0 and "no longer exist" in proc.stderr
    proc = run_tj("build", str(trace_path), "--strict", "-o", str(tmp_path / "strict.tar"))
    assert proc.returncode == 1 and "--strict" in proc.stderr
    assert not (tmp_path / "strict.tar").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".strict")]


def test_disk_full_leaves_no_partial_archive(tmp_path: Path, awk_trace: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        proc = run_tj("build", str(awk_trace), "-o", str(mnt / "img.tar"))
        assert proc.returncode != 0
        assert "disk full" in proc.stderr and "Traceback" not in proc.stderr
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.skipif(shutil.which("rg") is None, reason="ripgrep is not installed (tests/run installs it)")
def test_ripgrep_image_no_larger_than_the_ldd_recipe(tmp_path: Path) -> None:
    """The seed's recipe: ldd closure of rg + the searched files, copied by hand."""
    data = tmp_path / "corpus"
    data.mkdir()
    for i in range(20):
        (data / f"f{i}.txt").write_text(f"line {i}\nneedle {i}\n" * 50)
    rec = record(["rg", "-c", "needle", str(data)], RecordOptions(passthrough=False))
    assert rec.run.exit_code == 0
    trace_path = tmp_path / "rg.json"
    tr.save(rec.trace, str(trace_path))
    # like for like: the recipe writes no dpkg metadata (tracejail's default adds ~3 KB of it)
    result = tjbuild.build(str(trace_path), tjbuild.BuildOptions(output=str(tmp_path / "rg.tar"),
                                                                 package_metadata=False))
    # by hand: ldd's files (dereferenced, as `cp -L` would) plus the searched files, tar+gzip -6
    ldd = subprocess.run(["ldd", shutil.which("rg")], capture_output=True, text=True, check=True).stdout
    libs = [p for line in ldd.splitlines() for p in line.split() if p.startswith("/")]
    by_hand = tmp_path / "by-hand"
    for src in [shutil.which("rg"), *libs, *map(str, data.iterdir())]:
        dst = by_hand / src.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.realpath(src), dst)
    hand_tar = tmp_path / "by-hand.tar.gz"
    subprocess.run(["tar", "-C", str(by_hand), "-czf", str(hand_tar), "."], check=True)
    print(f"\n[size] rg: tracejail {result.image.compressed_size} B, ldd recipe {hand_tar.stat().st_size} B")
    # tracejail also keeps /etc/ld.so.cache, which the loader read (~4 KB compressed): within 1%
    assert result.image.compressed_size <= hand_tar.stat().st_size * 1.01


def test_imported_script_with_shebang_does_not_pull_its_interpreter(tmp_path: Path) -> None:
    mod = tmp_path / "helper_mod.py"
    mod.write_text("#!/usr/bin/env perl\nVALUE = 3\n")
    mod.chmod(0o755)
    app = tmp_path / "app.py"
    app.write_text("import helper_mod\nprint(helper_mod.VALUE)\n")
    rec = record(["python3", str(app)], RecordOptions(passthrough=False, cwd=str(tmp_path)))
    assert rec.run.stdout == "3\n"
    fs = fileset.select(rec.trace)
    assert str(mod) in fs.wanted
    assert not any(p.endswith("/perl") for p in fs.wanted)


# ------------------------------------------------------------------------------------------
# Hostile traces and hosts: races, special files, limits, signals, outputs


def _crafted(tmp_path: Path, *paths: str) -> Path:
    """A trace someone else wrote: `true` plus reads of `paths`."""
    rec = record(["true"], RecordOptions(passthrough=False))
    for p in paths:
        rec.trace.record(p).add("read", "openat", "ok", 1)
    out = tmp_path / "crafted.json"
    tr.save(rec.trace, str(out))
    return out


def test_directory_flipped_to_a_link_during_builds_never_ships_the_secret(tmp_path: Path) -> None:
    """A thread flips a kept directory to a symlink to /etc (or, unprivileged, to a directory of
    secrets) while builds run in a loop: the secret's bytes never reach an output."""
    import threading

    real_etc = os.geteuid() == 0 and os.access("/etc/shadow", os.R_OK)
    secrets = Path("/etc") if real_etc else tmp_path / "secrets"
    if not real_etc:
        secrets.mkdir()
        (secrets / "shadow").write_bytes(b"root:$6$SECRET:1:0:99999:7:::\n")
    secret = (secrets / "shadow").read_bytes()
    app = tmp_path / "srv/app"
    (app / "d").mkdir(parents=True)
    (app / "d/shadow").write_text("harmless content of the app\n")
    trace_path = _crafted(tmp_path, f"{app}/d/shadow")
    stop = threading.Event()

    def flip() -> None:
        # Each state lasts from nothing to a few builds' worth, at random: some builds see one
        # state throughout, others a flip between planning and copying.
        rnd = random.Random(1)
        while not stop.is_set():
            os.rename(app / "d", app / "d.real")
            os.symlink(secrets, app / "d")
            time.sleep(rnd.choice((0.0002, 0.002, 0.02)))
            os.unlink(app / "d")
            os.rename(app / "d.real", app / "d")
            time.sleep(rnd.choice((0.0002, 0.002, 0.02, 0.2)))

    flipper = threading.Thread(target=flip)
    flipper.start()
    kept = 0
    try:
        for i in range(30):
            out = tmp_path / f"out{i}"
            out.mkdir()
            result = tjbuild.build(str(trace_path), tjbuild.BuildOptions(
                output=str(out / "i.tar"), rootfs_dir=str(out / "rootfs"), load=False, compress_level=None,
                package_metadata=False))
            staged = [p for p in (out / "rootfs").rglob("*") if p.is_file() and not p.is_symlink()]
            for blob in [(out / "i.tar").read_bytes(), *(p.read_bytes() for p in staged)]:
                assert secret not in blob
            kept += any(p.name == "shadow" for p in staged)
            assert not any(m[0].endswith("/shadow") and "/etc/" in m[0] for m in result.plan.mode_changes)
            shutil.rmtree(out)
    finally:
        stop.set()
        flipper.join()
    assert kept > 0   # the harmless file did get through when the directory was one


def test_a_fifo_named_pem_hangs_neither_build_nor_inspect(tmp_path: Path) -> None:
    fifo = tmp_path / "cert.pem"
    os.mkfifo(fifo)
    trace_path = _crafted(tmp_path, str(fifo))
    for args in (["build", str(trace_path), "-o", str(tmp_path / "i.tar")], ["inspect", str(trace_path)],
                 ["explain", str(trace_path), str(fifo)]):
        proc = run_tj(*args)   # would time out on a blocking open()
        assert proc.returncode == 0, proc.stderr
    assert "a FIFO cannot be copied into an image" in run_tj("inspect", str(trace_path)).stdout


def test_sparse_and_oversized_files_are_refused_with_one_line(tmp_path: Path) -> None:
    sparse = tmp_path / "disk.img"
    with open(sparse, "wb") as f:
        f.truncate(1 << 40)
    proc = run_tj("build", str(_crafted(tmp_path, str(sparse))), "-o", str(tmp_path / "i.tar"),
                  "--max-file-size", "2T")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "sparse file" in proc.stderr and "--exclude" in proc.stderr
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (3 << 20))
    proc = run_tj("build", str(_crafted(tmp_path, str(big))), "-o", str(tmp_path / "i.tar"),
                  "--max-file-size", "1M")
    assert proc.returncode == 1 and "over the 1.0 MB limit" in proc.stderr, proc.stderr
    proc = run_tj("build", str(_crafted(tmp_path, str(big))), "-o", str(tmp_path / "i.tar"),
                  "--max-file-size", "lots")
    assert proc.returncode == 2 and "--max-file-size" in proc.stderr
    assert not (tmp_path / "i.tar").exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.mark.parametrize("sig,stage", [(signal.SIGTERM, "rootfs"), (signal.SIGHUP, "archive"),
                                       (signal.SIGTERM, "archive")])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(tmp_path: Path, sig: int, stage: str) -> None:
    """The build is frozen (SIGSTOP) while it writes, signalled, then let go: it exits 128+N and
    leaves no partial rootfs and no temporary archive."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(150):
        (data / f"f{i:03}.bin").write_bytes(os.urandom(1 << 20))
    trace_path = _crafted(tmp_path, *(str(p) for p in sorted(data.iterdir())))
    out = tmp_path / "out"
    out.mkdir()
    args = [*TJ, "build", str(trace_path), "-o", str(out / "i.tar"), "--no-package-metadata"]
    if stage == "rootfs":
        args += ["--rootfs", str(out / "rootfs")]
    # (a suite started under nohup passes SIGHUP on ignored, which the build then rightly keeps)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        names = os.listdir(out)
        if (stage == "rootfs" and "rootfs" in names) or (stage == "archive" and any(n.endswith(".tmp") for n in names)):
            os.kill(proc.pid, signal.SIGSTOP)
            break
        time.sleep(0.001)
    else:
        proc.kill()
        pytest.fail("the build ended before it could be frozen mid-write")
    names = os.listdir(out)
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err.strip() == f"tracejail: stopped by {signal.Signals(sig).name}"
    assert names and os.listdir(out) == []


def test_rootfs_output_never_overwrites_a_users_dockerfile(tmp_path: Path, awk_trace: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM debian\nRUN make\n")
    proc = run_tj("build", str(awk_trace), "--rootfs", str(tmp_path / "rootfs"), "-o", str(tmp_path / "i.tar"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "was not written by tracejail" in proc.stderr
    assert (tmp_path / "Dockerfile").read_text() == "FROM debian\nRUN make\n"
    assert not (tmp_path / "rootfs").exists() and not (tmp_path / "i.tar").exists()
    # one that tracejail wrote is replaced; missing parents of DIR are created
    deep = tmp_path / "a/b"
    assert run_tj("build", str(awk_trace), "--rootfs", str(deep / "rootfs"), "--no-load").returncode == 0
    first = (deep / "Dockerfile").read_text()
    shutil.rmtree(deep / "rootfs")
    proc = run_tj("build", str(awk_trace), "--rootfs", str(deep / "rootfs"), "--user", "1000:1000", "--no-load")
    assert proc.returncode == 0, proc.stderr
    assert (deep / "Dockerfile").read_text() != first and "USER 1000:1000" in (deep / "Dockerfile").read_text()


# ------------------------------------------------------------------------------------------
# The image behaves like every other image: ENTRYPOINT/CMD, Env, Created, names, labels, outputs


def _config(archive: Path) -> tuple[dict, dict]:
    """(the image config, the manifest) of an archive build wrote."""
    import tarfile

    with tarfile.open(archive) as t:
        index = json.load(t.extractfile("index.json"))
        manifest = json.load(t.extractfile("blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]))
        config = json.load(t.extractfile("blobs/sha256/" + manifest["config"]["digest"].split(":")[1]))
    return config, manifest


def test_entrypoint_is_the_program_and_cmd_its_arguments(awk_trace: Path, tmp_path: Path) -> None:
    run = tr.load(str(awk_trace)).runs[0]
    assert run_tj("build", str(awk_trace), "-o", str(tmp_path / "a.tar")).returncode == 0
    cfg, _ = _config(tmp_path / "a.tar")
    assert cfg["config"]["Entrypoint"] == [run.executable]
    assert cfg["config"]["Cmd"] == run.argv[1:]
    assert run_tj("build", str(awk_trace), "-o", str(tmp_path / "b.tar"), "--cmd", "'BEGIN { print 1 }'").returncode == 0
    cfg, _ = _config(tmp_path / "b.tar")
    assert cfg["config"]["Entrypoint"] == [run.executable] and cfg["config"]["Cmd"] == ["BEGIN { print 1 }"]
    # --entrypoint alone is the whole command, as a Dockerfile's ENTRYPOINT resets CMD.
    assert run_tj("build", str(awk_trace), "-o", str(tmp_path / "c.tar"), "--entrypoint", "/usr/bin/awk -f /x"
                  ).returncode == 0
    cfg, _ = _config(tmp_path / "c.tar")
    assert cfg["config"]["Entrypoint"] == ["/usr/bin/awk", "-f", "/x"] and "Cmd" not in cfg["config"]


def test_env_keeps_only_what_the_image_holds(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": "/nonexistent/bin:/usr/local/sbin:/usr/bin:/bin",
           "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt", "LANG": "C.UTF-8", "PYTHONPATH": "/nowhere"}
    trace = tmp_path / "t.json"
    assert subprocess.run([*TJ, "record", "-o", str(trace), "--", "awk", "BEGIN { print 1 }"], env=env,
                          capture_output=True, timeout=120).returncode == 0
    proc = run_tj("build", str(trace), "-o", str(tmp_path / "a.tar"), "--env", "SSL_CERT_FILE=/given/as/is")
    assert proc.returncode == 0, proc.stderr
    cfg, _ = _config(tmp_path / "a.tar")
    image_env = dict(e.split("=", 1) for e in cfg["config"]["Env"])
    # /usr/bin holds awk; /bin only if the run went through it (a link the image then holds).
    assert image_env["PATH"] in ("/usr/bin", "/usr/bin:/bin")
    assert image_env["LANG"] == "C.UTF-8"
    assert image_env["SSL_CERT_FILE"] == "/given/as/is"   # --env: exactly as given
    assert "PYTHONPATH" not in image_env
    assert "environment not carried into the image" in proc.stderr and "/nonexistent/bin" in proc.stderr


def test_created_is_the_recording_start_or_source_date_epoch(awk_trace: Path, tmp_path: Path) -> None:
    from datetime import datetime

    started = datetime.fromisoformat(tr.load(str(awk_trace)).runs[0].started.replace("Z", "+00:00"))
    assert run_tj("build", str(awk_trace), "-o", str(tmp_path / "a.tar")).returncode == 0
    cfg, _ = _config(tmp_path / "a.tar")
    assert cfg["created"] == started.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert cfg["config"]["Labels"][tjbuild.LABEL_CREATED] == cfg["created"]
    # Reproducible all the same: the archive does not change between builds of one trace.
    assert run_tj("build", str(awk_trace), "-o", str(tmp_path / "b.tar")).returncode == 0
    assert sha256(tmp_path / "a.tar") == sha256(tmp_path / "b.tar")
    proc = run_tj("build", str(awk_trace), "-o", str(tmp_path / "c.tar"),
                  env={**os.environ, "SOURCE_DATE_EPOCH": "1000"})
    assert proc.returncode == 0
    assert _config(tmp_path / "c.tar")[0]["created"] == "1970-01-01T00:16:40Z"


def test_labels_annotations_iidfile_metadata_and_quiet(awk_trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.tar"
    proc = run_tj("build", str(awk_trace), "-o", str(out), "--label", "org.example.team=data",
                  "--annotation", "org.opencontainers.image.source=https://example.org/x",
                  "--iidfile", str(tmp_path / "iid"), "--metadata-file", str(tmp_path / "meta.json"), "-q")
    assert proc.returncode == 0, proc.stderr
    cfg, manifest = _config(out)
    image_id = proc.stdout.strip()
    assert image_id.startswith("sha256:") and len(proc.stdout.splitlines()) == 1
    assert (tmp_path / "iid").read_text() == image_id
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["containerimage.config.digest"] == image_id
    assert meta["containerimage.descriptor"]["digest"] == meta["containerimage.digest"]
    assert cfg["config"]["Labels"]["org.example.team"] == "data"
    assert manifest["annotations"]["org.opencontainers.image.source"] == "https://example.org/x"
    for bad in (["--label", "novalue"], ["--annotation", "=x"]):
        proc = run_tj("build", str(awk_trace), "-o", str(tmp_path / "b.tar"), *bad)
        assert proc.returncode == 2 and "KEY=VALUE" in proc.stderr and not (tmp_path / "b.tar").exists()


def test_progress_plain_tells_each_step_and_quiet_tells_none(awk_trace: Path, tmp_path: Path) -> None:
    plain = run_tj("build", str(awk_trace), "-o", str(tmp_path / "a.tar"), "--progress", "plain")
    assert plain.returncode == 0
    assert "tracejail: planning" in plain.stderr and "tracejail: layer 1/1 rootfs" in plain.stderr
    quiet = run_tj("build", str(awk_trace), "-o", str(tmp_path / "b.tar"), "--progress", "quiet")
    assert quiet.returncode == 0 and "layer 1/1" not in quiet.stderr


@pytest.mark.docker
def test_tags_run_args_and_no_archive_left_behind(awk_trace: Path, tmp_path: Path, docker_engine) -> None:
    env = {**docker_engine.env}
    proc = subprocess.run([*TJ, "build", str(awk_trace), "-t", "tj-conv-a:1", "-t", "tj-conv-b:2"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp_path) == []     # loaded; no NAME.tar in the working directory
    try:
        ids = {docker_engine.run("image", "inspect", "--format", "{{.Id}}", t).stdout.strip()
               for t in ("tj-conv-a:1", "tj-conv-b:2")}
        assert len(ids) == 1
        assert docker_engine.run("run", "--rm", "tj-conv-a:1").stdout == "42\n"
        assert docker_engine.run("run", "--rm", "tj-conv-a:1", "BEGIN { print 6 + 1 }").stdout == "7\n"
        created = docker_engine.run("image", "inspect", "--format", "{{.Created}}", "tj-conv-a:1").stdout
        assert not created.startswith("1970")
    finally:
        docker_engine.run("rmi", "-f", "tj-conv-a:1", "tj-conv-b:2", check=False)


@pytest.mark.docker
def test_init_passes_docker_stop_on_to_the_program(tmp_path: Path, docker_engine) -> None:
    """`sleep` sets no SIGTERM handler: as PID 1 the kernel ignores the signal and docker kills it
    after the timeout (137); behind --init, tini passes SIGTERM on and sleep dies of it (143)."""
    trace = tmp_path / "t.json"
    assert subprocess.run([*TJ, "record", "-o", str(trace), "--", "sleep", "0"], capture_output=True,
                          timeout=120).returncode == 0
    statuses = {}
    for name, extra in (("tj-noinit:1", []), ("tj-init:1", ["--init"])):
        proc = subprocess.run([*TJ, "build", str(trace), "-t", name, "--cmd", "300", *extra], capture_output=True,
                              text=True, timeout=300, env=docker_engine.env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        cid = docker_engine.run("run", "-d", name).stdout.strip()
        try:
            time.sleep(0.5)
            docker_engine.run("stop", "-t", "2", cid)
            statuses[name] = docker_engine.run("inspect", "--format", "{{.State.ExitCode}}", cid).stdout.strip()
        finally:
            docker_engine.run("rm", "-f", cid, check=False)
            docker_engine.run("rmi", "-f", name, check=False)
    assert statuses == {"tj-noinit:1": "137", "tj-init:1": "143"}


def test_docker_socket_permission_gets_its_own_diagnosis(awk_trace: Path, public_dir: str, unprivileged) -> None:
    """An ordinary user who may not open the engine's socket is told so (and how to fix it); the
    image goes to an archive instead; verify's advice leads somewhere that works."""
    import socket

    from conftest import _become_nobody

    if shutil.which("docker") is None:
        pytest.skip("docker CLI not installed: there is no socket error to diagnose")
    sock_path = os.path.join(public_dir, "docker.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(1)
    os.chmod(sock_path, 0o600)     # root's only, like a docker.sock the user's group cannot open
    work = Path(public_dir) / "work"
    work.mkdir()
    os.chown(work, 65534, 65534)
    trace = work / "t.json"
    shutil.copy(awk_trace, trace)
    os.chmod(trace, 0o644)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work),
           "DOCKER_HOST": f"unix://{sock_path}"}
    try:
        proc = subprocess.run([unprivileged.python, "-m", "tracejail", "build", str(trace), "-t", "app"],
                              capture_output=True, text=True, timeout=300, cwd=work, env=env,
                              preexec_fn=_become_nobody)
        assert proc.returncode == 0, proc.stderr
        assert "permission denied on the Docker socket" in proc.stderr and "docker group" in proc.stderr
        assert (work / "app.tar").exists()
        verify = subprocess.run([unprivileged.python, "-m", "tracejail", "verify", str(trace), "-t", "app"],
                                capture_output=True, text=True, timeout=300, cwd=work, env=env,
                                preexec_fn=_become_nobody)
        assert verify.returncode != 0 and "Traceback" not in verify.stderr
        assert "docker group" in verify.stderr
        from tracejail import jail

        if "--rootfs DIR" in verify.stderr:   # advised only where the jail can run for this user
            assert jail.check_available(True) is None
    finally:
        server.close()


def test_layers_are_made_once_for_every_output(awk_trace: Path, tmp_path: Path, monkeypatch) -> None:
    """An archive and an OCI layout asked for together hold the same image, compressed once."""
    from tracejail import image

    made = []
    real = image.make_layer

    def counting(*args, **kwargs):
        layer = real(*args, **kwargs)
        made.append(layer.blob.digest)
        return layer

    monkeypatch.setattr(image, "make_layer", counting)
    result = tjbuild.build(str(awk_trace), tjbuild.BuildOptions(output=str(tmp_path / "a.tar"),
                                                                oci_dir=str(tmp_path / "layout"), load=False))
    assert made == [result.image.layer_digest]
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    _, manifest = _config(tmp_path / "a.tar")
    assert index["manifests"][0]["digest"] == result.image.manifest_digest
    assert [la["digest"] for la in manifest["layers"]] == made
    assert (tmp_path / "layout" / "blobs" / "sha256" / made[0].split(":")[1]).exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tracejail-blobs-")]   # the blob dir is gone
