"""The jail is a sandbox: what a hostile tree, image config or trace tries from inside it.

Each escape is a real program in a real staged tree: a static binary that tries every classic way
out (setuid root, the chroot trick, mounting, device nodes, /proc/1/root) and writes a marker
where it lands. The marker must never appear on the host.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from tracejail import jail
from tracejail import trace as tr

TJ = [sys.executable, "-m", "tracejail"]

ESCAPE_C = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

static void try_write(const char *how, const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT, 0644);
    if (fd >= 0) { dprintf(fd, "escaped by %s\n", how); close(fd); printf("WROTE %s via %s\n", path, how); }
    else printf("no %s: %s\n", how, strerror(errno));
}

int main(int argc, char **argv) {
    const char *marker = argv[1];
    char path[512];
    printf("uid %d euid %d\n", getuid(), geteuid());
    if (setuid(0) == 0) printf("setuid(0) worked\n");
    /* the chroot trick: chroot below the cwd, then climb out with .. */
    mkdir("/tmp/esc", 0755);
    if (chroot("/tmp/esc") == 0) {
        for (int i = 0; i < 64; i++) chdir("..");
        chroot(".");
    } else printf("no chroot: %s\n", strerror(errno));
    snprintf(path, sizeof path, "/tmp/%s", marker);
    try_write("chroot", path);
    snprintf(path, sizeof path, "/proc/1/root/tmp/%s", marker);
    try_write("proc-root", path);
    if (mount("none", "/mnt", "tmpfs", 0, NULL) == 0) printf("mounted tmpfs\n");
    if (mknod("/tmp/sda", S_IFBLK | 0600, makedev(8, 0)) == 0) printf("MKNOD worked\n");
    else printf("no mknod: %s\n", strerror(errno));
    return 0;
}
"""


def needs_jail() -> None:
    problem = jail.check_available()
    if problem:
        pytest.skip(f"no jail here: {problem}")


@pytest.fixture(scope="module")
def escape_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree whose only program is the escape binary, setuid root as a hostile image would ship it."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (tests/run installs it)")
    work = tmp_path_factory.mktemp("escape")
    (work / "escape.c").write_text(ESCAPE_C)
    tree = work / "rootfs"
    for d in ("bin", "tmp", "proc", "dev", "mnt", "etc"):
        (tree / d).mkdir(parents=True)
    (tree / "tmp").chmod(0o1777)
    built = subprocess.run(["gcc", "-static", "-O1", "-o", str(tree / "bin/escape"), str(work / "escape.c")],
                           capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"no static libc to build the escape program: {built.stderr[-200:]}")
    os.chmod(tree / "bin/escape", 0o4755)   # setuid root
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532::/home/nonroot:/x\n")
    return tree


def run_escape(tree: Path, uid: int, userns: bool = True) -> tuple[str, str]:
    marker = f"tj-escape-{uuid.uuid4().hex[:12]}"
    spec = jail.JailSpec(rootfs=str(tree), workdir=jail.make_workdir(), argv=["/bin/escape", marker],
                         env={"PATH": "/bin"}, cwd="/", uid=uid, gid=uid, userns=userns)
    proc = jail.JailProcess(spec)
    proc.start()
    try:
        assert proc.wait(30) is not None
    finally:
        proc.stop(5)
    out, err, _ = proc.output()
    assert not os.path.exists(f"/tmp/{marker}"), (out, err)
    assert not os.path.exists(f"/{marker}")
    return out, err


@pytest.mark.parametrize("uid", [65532, 0], ids=["image-user", "user-root"])
def test_setuid_root_program_and_namespaced_root_stay_inside(escape_tree: Path, uid: int) -> None:
    needs_jail()
    out, err = run_escape(escape_tree, uid)
    assert f"uid {uid} euid {uid}\n" in out, (out, err)     # the setuid bit did nothing
    assert "setuid(0) worked" not in out or uid == 0
    assert "MKNOD worked" not in out
    assert not os.path.exists(escape_tree / "tmp/esc"), "the tree itself is never written"


def test_without_user_namespace_as_root_still_nosuid_and_no_new_privs(escape_tree: Path) -> None:
    if os.geteuid() != 0 or jail.check_available(userns=False):
        pytest.skip("needs root and mount/PID/network namespaces")
    out, err = run_escape(escape_tree, 65532, userns=False)
    assert "uid 65532 euid 65532\n" in out, (out, err)
    assert "setuid(0) worked" not in out and "MKNOD worked" not in out


def test_root_tree_files_are_not_writable_and_host_root_is_not_mapped(escape_tree: Path, tmp_path: Path) -> None:
    needs_jail()
    tree = tmp_path / "tree"
    shutil.copytree(escape_tree, tree, symlinks=True)
    (tree / "bin/sh").symlink_to("/bin/escape")
    spec = jail.JailSpec(rootfs=str(tree), workdir=jail.make_workdir(),
                         argv=["/bin/escape", "x"], env={}, cwd="/", uid=0, gid=0)
    proc = jail.JailProcess(spec)
    proc.start()
    assert proc.wait(30) == 0
    proc.stop(1)
    out = proc.output()[0]
    assert "uid 0 euid 0" in out                        # root in the jail...
    with open(tree / "bin/escape", "rb") as f:          # ...whose writes never reach the tree
        assert f.read(4) == b"\x7fELF"
    assert stat.S_IMODE(os.stat(tree / "bin/escape").st_mode) == 0o4755


def _trace_with_exercise(where: Path, command: str, owner: int | None, mode: int = 0o644) -> Path:
    run = tr.Run(argv=["/bin/escape", "ok"], executable="/bin/escape", cwd="/", uid=0, gid=0, environment={},
                 started="2026-11-29T00:00:00Z", exit_code=0,
                 exercises=[tr.ExerciseResult(command, 0, "", "")], listening_ports=[8000],
                 # ready at once: /bin/escape exits right away, and a delay would race with it
                 tracing={"ready_delay": 0.0})
    trace = tr.Trace(runs=[run])
    path = where / "foreign.json"
    tr.save(trace, str(path))
    if owner is not None:
        os.chown(path, owner, owner)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("owner,mode", [(65534, 0o644), (None, 0o666)], ids=["other-user", "world-writable"])
def test_a_foreign_trace_runs_nothing_on_the_host(escape_tree: Path, tmp_path: Path, owner: int | None,
                                                  mode: int) -> None:
    needs_jail()
    if owner is not None and os.geteuid() != 0:
        pytest.skip("needs root to give the trace to another user")
    marker = tmp_path / f"PWNED-{uuid.uuid4().hex[:8]}"
    trace_path = _trace_with_exercise(tmp_path, f"touch {marker}", owner, mode)
    proc = subprocess.run([*TJ, "verify", str(trace_path), "--rootfs", str(escape_tree)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "is not your own trace" in proc.stderr and "--trust-trace" in proc.stderr
    assert f"touch {marker}" in proc.stderr
    assert not marker.exists()
    trusted = subprocess.run([*TJ, "verify", str(trace_path), "--rootfs", str(escape_tree), "--trust-trace"],
                             capture_output=True, text=True, timeout=120)
    assert f"will run on this host (an exercise of the trace): touch {marker}" in trusted.stderr
    assert marker.exists()    # the user said so: the command ran, after it was shown


def test_a_tree_config_saying_user_0_does_not_make_the_jail_root(escape_tree: Path, tmp_path: Path) -> None:
    needs_jail()
    from tracejail.build import LABEL_TRACE_DIGEST, trace_digest

    tree = tmp_path / "rootfs"
    shutil.copytree(escape_tree, tree, symlinks=True)
    run = tr.Run(argv=["/bin/escape", "m"], executable="/bin/escape", cwd="/", uid=0, gid=0, environment={},
                 started="2026-11-29T00:00:00Z", exit_code=0, stdout="uid 0 euid 0\n")
    path = tmp_path / "t.json"
    tr.save(tr.Trace(runs=[run]), str(path))
    # The config beside the tree is as untrusted as the tree: it says root.
    (tmp_path / "image-config.json").write_text(json.dumps({
        "written_by": "tracejail", "rootfs": "rootfs",
        "config": {"User": "0:0", "Entrypoint": ["/bin/escape"], "Labels": {LABEL_TRACE_DIGEST: trace_digest(str(path))}}}))
    proc = subprocess.run([*TJ, "verify", str(path), "--rootfs", str(tree)], capture_output=True, text=True,
                          timeout=120)
    assert "uid 65532 euid 65532" in proc.stdout, proc.stdout + proc.stderr
    assert "the image's user is root; the jail ran it as 65532:65532" in proc.stdout


def test_an_ordinary_user_verifies_a_server_in_the_sandbox(unprivileged, public_dir: str) -> None:
    """No root anywhere: nobody runs verify --rootfs on a recorded server, exercises and the traced
    replay included; the exercises reach the server inside the jail's own network."""
    needs_jail()
    server = Path(public_dir) / "server.py"
    server.write_text(textwrap.dedent("""\
        import http.server, sys
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = b"hello from the jail\\n"
                self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
                self.wfile.write(body)
            def log_message(self, *a): pass
        http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
        """))
    port = "18431"
    trace_path = Path(public_dir) / "t.json"
    rec = subprocess.run([*TJ, "record", "-o", str(trace_path), "--exercise",
                          f"python3 -c \"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/').read().decode(), end='')\"",
                          "--", "/usr/bin/python3", str(server), port], capture_output=True, text=True,
                         timeout=120, cwd=public_dir)
    assert rec.returncode == 0, rec.stderr
    built = subprocess.run([*TJ, "build", str(trace_path), "--rootfs", f"{public_dir}/rootfs", "--no-load"],
                           capture_output=True, text=True, timeout=300, cwd=public_dir)
    assert built.returncode == 0, built.stderr
    subprocess.run(["chmod", "-R", "a+rX", public_dir], check=True)
    os.chown(trace_path, 65534, 65534)        # nobody's own trace: its exercises may run
    for extra in ([], ["--trace-inside"]):
        proc = unprivileged.run("verify", str(trace_path), "--rootfs", f"{public_dir}/rootfs", *extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "PASS: 1 run(s), 1 exercise(s)" in proc.stdout
    time.sleep(0.1)


def test_without_user_namespaces_one_line_and_an_explicit_fallback(escape_tree: Path, tmp_path: Path) -> None:
    """A kernel that refuses user namespaces, made for real: inside a user namespace of our own
    whose max_user_namespaces is 0."""
    needs_jail()
    if shutil.which("unshare") is None:
        pytest.skip("util-linux unshare is not installed")
    run = tr.Run(argv=["/bin/escape", "m"], executable="/bin/escape", cwd="/", uid=0, gid=0, environment={},
                 started="2026-11-29T00:00:00Z", exit_code=0, stdout="uid 65532 euid 65532\n")
    path = tmp_path / "t.json"
    tr.save(tr.Trace(runs=[run]), str(path))
    script = (f"echo 0 > /proc/sys/user/max_user_namespaces && exec {' '.join(TJ)} verify {path} "
              f"--rootfs {escape_tree} \"$@\"")
    refused = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", script, "sh"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "refuses user namespaces" in refused.stderr and "--no-user-namespace" in refused.stderr
    # With the flag it goes on without one (this namespace maps only root, so it ends when the
    # jail drops to 65532; a host without user namespaces runs it: see the test above).
    fallback = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", script, "sh",
                               "--no-user-namespace"], capture_output=True, text=True, timeout=120)
    assert "refuses user namespaces" not in fallback.stderr
    assert "cannot enter / as 65532:65532" in fallback.stderr or fallback.returncode == 0, fallback.stderr
