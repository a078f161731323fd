"""`record --image`: the image's command runs in the sandbox on the image's own files, and the
trace names image paths only (record_image.py); build then takes every file from the image."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import static_program
from images import image_config, tar_of, write_docker_archive
from tracejail import build as tjbuild
from tracejail import jail, trace as tr
from tracejail.record import RecordOptions
from tracejail.record_image import ImageRunOptions, program_pids, record_image

TJ = [sys.executable, "-m", "tracejail"]

PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char buf[256] = "";
    FILE *f = fopen("/etc/marker", "r");
    if (f) { if (!fgets(buf, sizeof buf, f)) buf[0] = 0; fclose(f); }
    printf("marker=%s", buf);
    printf("host-only=%s\n", access(getenv("HOST_ONLY") ? getenv("HOST_ONLY") : "/nonexistent", F_OK) == 0 ? "seen" : "absent");
    printf("uid=%d gid=%d cwd=%s mode=%s\n", (int)getuid(), (int)getgid(), getcwd(buf, sizeof buf), getenv("MODE"));
    for (int i = 1; i < argc; i++) printf("arg=%s\n", argv[i]);
    return argc > 1 && strcmp(argv[1], "fail") == 0 ? 7 : 0;
}
"""


@pytest.fixture(scope="module")
def jail_ok() -> None:
    problem = jail.check_available()
    if problem:
        pytest.skip(f"record --image needs tracejail's sandbox: {problem}")


@pytest.fixture
def image(tmp_path: Path, jail_ok: None) -> Path:
    """A two-layer docker-archive: a static program, its own /etc, a user, and a host-only path
    (a file that exists on this host and not in the image)."""
    program = static_program(tmp_path, PROGRAM).read_bytes()
    host_only = tmp_path / "host-only"
    host_only.write_text("on the host\n")
    base = tar_of({"etc": None, "etc/passwd": b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
                   "etc/group": b"root:x:0:\napp:x:1000:\n", "etc/marker": b"lower\n",
                   "usr": None, "usr/bin": None, "usr/bin/hello": program, "bin": "usr/bin",
                   "srv": None, "tmp": None}, modes={"usr/bin/hello": 0o755})
    app = tar_of({"etc/marker": b"only in the image\n"})
    path = tmp_path / "image.tar"
    write_docker_archive(path, [base, app], image_config(
        [base, app], Cmd=["hello", "default"], Env=["PATH=/usr/bin:/bin", "MODE=prod", f"HOST_ONLY={host_only}", "API_TOKEN=abc123"],
        WorkingDir="/srv", User="app", Labels={"org.example": "yes"}, StopSignal="SIGINT"))
    return path


def test_the_run_happens_in_the_image(image: Path) -> None:
    rec = record_image(ImageRunOptions(image=str(image)), RecordOptions(passthrough=False))
    run = rec.run
    assert run.exit_code == 0
    assert run.stdout.splitlines() == ["marker=only in the image", "host-only=absent",
                                       "uid=1000 gid=1000 cwd=/srv mode=prod", "arg=default"]
    assert run.argv == ["hello", "default"] and run.executable == "/usr/bin/hello"
    assert (run.cwd, run.uid, run.gid, run.environment["MODE"]) == ("/srv", 1000, 1000, "prod")
    # Only the program's own process, as the image names its files.
    assert [(p.ppid, p.argv, p.exe) for p in run.processes] == [(None, ["hello", "default"], "/usr/bin/hello")]
    files = rec.trace.files
    assert files["/etc/marker"].ok and files["/usr/bin/hello"].ok
    assert not files[str(image.parent / "host-only")].ok
    assert not any(p.startswith(("/tmp/", str(image.parent))) and files[p].ok for p in files), sorted(files)
    assert not any("tracejail" in p or "python" in p for p in files), sorted(files)
    src = rec.trace.source
    assert src is not None and src.image == str(image) and src.config.user == "app"
    # The image's secret reached the program, not the trace.
    assert "API_TOKEN=<redacted>" in src.config.env and run.environment["API_TOKEN"] == "<redacted>"
    assert any("the image's config holds secrets" in w for w in rec.warnings)
    assert src.rootfs and os.path.isfile(os.path.join(src.rootfs, "usr/bin/hello"))


def test_command_replaces_cmd_and_the_status_passes_through(image: Path) -> None:
    rec = record_image(ImageRunOptions(image=str(image), command=["hello", "fail", "x"], user="0:0"),
                       RecordOptions(passthrough=False))
    assert rec.run.exit_code == 7 and "arg=x" in rec.run.stdout and "uid=0 gid=0" in rec.run.stdout


def test_the_cli_records_builds_and_verifies_from_the_image(image: Path, tmp_path: Path) -> None:
    trace = tmp_path / "t.json"
    out = subprocess.run([*TJ, "record", "--image", str(image), "-o", str(trace)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "marker=only in the image" in out.stdout
    # The host holds a file at the image's path with other content: the image's goes in.
    staged = tmp_path / "out" / "rootfs"
    result = tjbuild.build(str(trace), tjbuild.BuildOptions(rootfs_dir=str(staged), load=False))
    assert (staged / "etc/marker").read_text() == "only in the image\n"
    assert (staged / "usr/bin/hello").read_bytes() == (tmp_path / "hello").read_bytes()
    assert result.config.user == "1000:1000" and result.config.working_dir == "/srv"
    assert result.config.cmd == ["hello", "default"] and result.config.entrypoint == []
    assert result.config.labels["org.example"] == "yes" and result.config.stop_signal == "SIGINT"
    assert "MODE=prod" in result.config.env and not any(e.startswith("API_TOKEN") for e in result.config.env)
    assert any("Env holds secrets, left out of the image: API_TOKEN" in a for a in result.alerts)
    assert "STOPSIGNAL SIGINT" in (tmp_path / "out" / "Dockerfile").read_text()
    verified = subprocess.run([*TJ, "verify", str(trace), "--rootfs", str(staged)], capture_output=True, text=True,
                              timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # explain reads the same tree.
    explained = subprocess.run([*TJ, "explain", str(trace), "/etc/marker", "--json"], capture_output=True,
                               text=True, timeout=60)
    assert json.loads(explained.stdout)[0]["in_image"] is True
    # The unpacked image is gone from the cache: build reads the image again, to the same tree.
    shutil.rmtree(os.path.dirname(tr.load(str(trace)).source.rootfs))
    again = tmp_path / "again" / "rootfs"
    tjbuild.build(str(trace), tjbuild.BuildOptions(rootfs_dir=str(again), load=False))
    assert sorted(p.relative_to(again) for p in again.rglob("*")) == sorted(p.relative_to(staged)
                                                                        for p in staged.rglob("*"))
    assert (again / "etc/marker").read_text() == "only in the image\n"


def test_appending_a_run_from_another_tree_is_refused(image: Path, tmp_path: Path) -> None:
    trace = tmp_path / "t.json"
    subprocess.run([*TJ, "record", "--image", str(image), "-o", str(trace)], capture_output=True, check=True,
                   timeout=120)
    out = subprocess.run([*TJ, "record", "--append", "-o", str(trace), "--", "true"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "cannot append a run recorded in the host" in out.stderr
    assert len(tr.load(str(trace)).runs) == 1


@pytest.mark.parametrize("args, code, message", [
    (["--", "nothere"], 127, "command not found in"),
    (["--user", "ghost"], 2, "not in the image's /etc/passwd"),
])
def test_bad_runs_get_one_line(image: Path, tmp_path: Path, args: list[str], code: int, message: str) -> None:
    out = subprocess.run([*TJ, "record", "--image", str(image), "-o", str(tmp_path / "t.json"), *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == code and message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "t.json").exists()


def test_an_image_without_a_command_needs_one(tmp_path: Path, jail_ok: None) -> None:
    path = tmp_path / "empty.tar"
    layer = tar_of({"etc": None})
    write_docker_archive(path, [layer], image_config([layer]))
    out = subprocess.run([*TJ, "record", "--image", str(path), "-o", str(tmp_path / "t.json")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "has no Entrypoint or Cmd" in out.stderr


def test_program_pids_leave_out_the_jails_own_processes() -> None:
    procs = [tr.ProcessInfo(10, None, ["launcher"], None), tr.ProcessInfo(11, 10, ["holder"], None),
             tr.ProcessInfo(12, 11, ["init"], None), tr.ProcessInfo(13, 12, ["app"], None),
             tr.ProcessInfo(14, 13, ["child"], None)]
    assert program_pids(procs) == {13, 14}
    assert program_pids(procs, with_init=True) == {12, 13, 14}


def test_minify_without_an_engine_verifies_in_the_sandbox(image: Path, tmp_path: Path) -> None:
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    out = subprocess.run([*TJ, "minify", str(image), "-t", "small:1", "-o", str(tmp_path / "small.tar"), "--json"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout)
    assert summary["passed"] and summary["verified"]["target"].startswith("rootfs ")
    assert summary["before"]["compressed"] > 0 and summary["after"]["files"] >= 3
    assert (tmp_path / "small.tar").stat().st_size > 0 and summary["trace"] is None
    assert sorted(os.listdir(tmp_path)) == sorted(["small.tar", "hello", "hello.c", "host-only", "image.tar"])


def test_minify_of_an_image_that_is_nowhere_is_one_line(tmp_path: Path, jail_ok: None) -> None:
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    out = subprocess.run([*TJ, "minify", "no/such:image", "-t", "x:1"], capture_output=True, text=True,
                         timeout=60, env=env, cwd=tmp_path)
    assert out.returncode == 1 and "no/such:image is neither a file nor a directory" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and os.listdir(tmp_path) == []


def test_sigterm_while_unpacking_leaves_nothing(tmp_path: Path, jail_ok: None) -> None:
    """SIGTERM while the image's layers are being unpacked: exit 143, one line, no partial tree in
    the cache and no trace."""
    many = tar_of({"data": None, **{f"data/f{i:05}": b"x" * 512 for i in range(6000)}})
    path = tmp_path / "big.tar"
    write_docker_archive(path, [many], image_config([many], Cmd=["/bin/true"]))
    cache = tmp_path / "cache"
    env = {**os.environ, "TRACEJAIL_CACHE_DIR": str(cache)}
    proc = subprocess.Popen([*TJ, "record", "--image", str(path), "-o", str(tmp_path / "t.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    images = cache / "images"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [n for n in os.listdir(images)] if images.is_dir() else []
        if any(".unpack-" in n for n in partial) and any((images / n / "rootfs" / "data").is_dir() for n in partial):
            break
        time.sleep(0.005)
    else:
        proc.kill()
        pytest.fail("the unpack ended before it could be interrupted")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "tracejail: stopped by SIGTERM"
    assert os.listdir(images) == [] and not (tmp_path / "t.json").exists()


def test_an_ordinary_user_records_builds_and_verifies_from_an_image(image: Path, unprivileged,
                                                                      public_dir: str) -> None:
    """No root: nobody unpacks the image (no cache of its own: a temporary tree), records in the
    sandbox, builds from the image again and verifies."""
    archive = Path(public_dir) / "image.tar"
    shutil.copy(image, archive)
    os.chmod(archive, 0o644)
    os.chmod(public_dir, 0o777)
    rec = unprivileged.run("record", "--image", str(archive), "-o", f"{public_dir}/t.json", cwd=public_dir)
    assert rec.returncode == 0, rec.stderr
    assert "marker=only in the image" in rec.stdout
    built = unprivileged.run("build", f"{public_dir}/t.json", "--rootfs", f"{public_dir}/rootfs", "--no-load",
                             cwd=public_dir)
    assert built.returncode == 0, built.stderr
    assert (Path(public_dir) / "rootfs/etc/marker").read_text() == "only in the image\n"
    verified = unprivileged.run("verify", f"{public_dir}/t.json", "--rootfs", f"{public_dir}/rootfs", cwd=public_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr
