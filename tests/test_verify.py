"""`tracejail verify` on real programs: the sample workloads in the rootfs jail and in a real Docker
engine, images broken on purpose (a dlopen'd library, a Python module's .py, a data file a server
reads) and repaired by --fix, the jail itself, bad input. Every test checks that no container,
mount, jail process or temporary directory of ours is left behind."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import workloads as wl
from tracejail import build as tjbuild
from tracejail import jail
from tracejail import trace as tr
from tracejail import verify as tv
from tracejail.errors import TraceFormatError, UsageError
from tracejail.record import RecordOptions, record

TJ = [sys.executable, "-m", "tracejail"]
NAMES = [w.name for w in wl.all_workloads()]
JAIL_PROBLEM = jail.check_available()
needs_jail = pytest.mark.skipif(JAIL_PROBLEM is not None, reason=f"no rootfs jail here: {JAIL_PROBLEM}")

# (workload, --exclude glob, the path verify must name)
BROKEN = {
    "dlopen": ("c-plugin", "*/plugins/libupper.so", "/plugins/libupper.so"),
    "py-source": ("python-cli", "*/python3.11/json/decoder.py", "/json/decoder.py"),
    "server-data": ("python-web", "*/data/items.json", "/data/items.json"),
}


# --- leftovers --------------------------------------------------------------------------------

def _ours(tmp: str) -> dict[str, set[str]]:
    """Everything verify could leave behind: mounts, jail processes, temporary directories. Jail
    work directories and image exports are made under `tmp` (TMPDIR), private to this session, so
    that another test session on the same host never looks like our leak."""
    mounts = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if tmp in line.split()[4]:
                mounts.add(line.split()[4])
    procs = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        root = _readlink(f"/proc/{pid}/root") or ""
        if tmp in cmd or tmp in root:
            procs.add(f"{pid} {cmd[:80]} (root {root})")
    return {"mounts": mounts, "processes": procs, "tmp": set(os.listdir(tmp))}


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


@pytest.fixture(scope="session")
def private_tmp(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("tmpdir"))


@pytest.fixture(autouse=True)
def nothing_left_behind(private_tmp: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tempfile, "tempdir", private_tmp)
    monkeypatch.setenv("TMPDIR", private_tmp)   # for `tracejail verify` subprocesses
    before = _ours(private_tmp)
    yield
    deadline = time.monotonic() + 5   # a killed jail takes a moment to be reaped
    while True:
        after = _ours(private_tmp)
        new = {k: after[k] - before[k] for k in after}
        if not any(new.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not any(new.values()), f"left behind: {new}"


def assert_no_containers(engine) -> None:
    names = engine.run("ps", "-a", "--format", "{{.Names}}").stdout.split()
    assert not [n for n in names if n.startswith("tj-verify-")], names


# --- recording and building ---------------------------------------------------------------------

_RECORDED: dict[str, str] = {}


@pytest.fixture(scope="session")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("verify-traces")


def recorded(name: str, where: Path) -> tr.Trace:
    """The workload recorded once per session (as `tracejail record` would), loaded fresh."""
    if name not in _RECORDED:
        w = wl.get_workload(name)
        wl.prepare(w)
        # From the workload's folder, as `tracejail record` is run (record resolves a relative
        # argv[0] against the process's working directory, not RecordOptions.cwd).
        old = os.getcwd()
        os.chdir(w.dir)
        try:
            rec = record(w.command, RecordOptions(exercises=list(w.exercises), ready_port=w.port,
                                                  passthrough=False))
        finally:
            os.chdir(old)
        assert rec.exercises_ok and rec.run.status == 0, rec.run.stderr
        path = where / f"{name}.json"
        tr.save(rec.trace, str(path))
        _RECORDED[name] = str(path)
    return tr.load(_RECORDED[name])


def trace_copy(name: str, where: Path, dest: Path) -> Path:
    recorded(name, where)
    out = dest / "trace.json"
    shutil.copy(_RECORDED[name], out)
    return out


def stage(trace_path: Path, dest: Path, exclude: tuple[str, ...] = ()) -> Path:
    rootfs = dest / "rootfs"
    tjbuild.build(str(trace_path), tjbuild.BuildOptions(rootfs_dir=str(rootfs), exclude=list(exclude)))
    return rootfs


def build_image(trace_path: Path, tag: str, engine, exclude: tuple[str, ...] = ()) -> None:
    result = tjbuild.build(str(trace_path), tjbuild.BuildOptions(
        tags=[tag], output=str(trace_path.parent / "image.tar"), exclude=list(exclude),
        compress_level=1, docker_env=engine.env))
    assert result.loaded_id, result.warnings
    os.unlink(trace_path.parent / "image.tar")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    if env is not None:
        env = {**env, "TMPDIR": os.environ["TMPDIR"]}
    return subprocess.run([*TJ, "verify", *args], capture_output=True, text=True, timeout=300, env=env)


def port_free(name: str, timeout: float = 60.0) -> None:
    """Sample servers listen on fixed ports, which another test session may be using right now."""
    port = wl.get_workload(name).port
    deadline = time.monotonic() + timeout
    while port and wl.port_open(port) and time.monotonic() < deadline:
        time.sleep(0.2)


# --- the jail itself ----------------------------------------------------------------------------

@needs_jail
def test_jail_environment(recordings: Path, tmp_path: Path) -> None:
    """The sandbox as the program sees it: PID 1 is init, the image user, stdin /dev/null, the six
    devices, tmpfs /tmp, a read-only /proc, loopback only, no capabilities, no new privileges, a
    user namespace whose root is not the host's; and the host sees the jail's root as "/"."""
    trace_path = trace_copy("python-cli", recordings, tmp_path)
    rootfs = stage(trace_path, tmp_path)
    run = tr.load(str(trace_path)).runs[0]
    probe = ("import os, socket, stat, sys, time\n"
             "print(os.getpid(), os.getuid(), os.getgid(), os.getcwd())\n"
             "print(sorted(os.listdir('/dev')))\n"
             "print(os.readlink('/dev/fd'), stat.S_ISCHR(os.stat('/dev/null').st_mode))\n"
             "print(oct(os.stat('/tmp').st_mode & 0o7777), oct(os.stat('/dev/shm').st_mode & 0o7777))\n"
             "print(os.path.exists('/proc/self/status'), repr(sys.stdin.read()))\n"
             "open('/tmp/x', 'w').write('ok')\n"
             "print(os.access('/', os.W_OK))\n"
             "status = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
             "print(status['NoNewPrivs'].strip(), status['CapEff'].strip(), status['CapBnd'].strip())\n"
             "print(' '.join(open('/proc/self/uid_map').read().split()))\n"
             "print(sorted(n for _, n in socket.if_nameindex()), socket.gethostname())\n"
             "try:\n    open('/proc/sys/kernel/hostname', 'w').write('x')\nexcept OSError as e:\n    print(e.errno)\n"
             "sys.stdout.flush(); time.sleep(30)\n")
    spec = jail.JailSpec(rootfs=str(rootfs), workdir=jail.make_workdir(), argv=[run.executable, "-c", probe],
                         env={"PATH": "/usr/bin"}, cwd=run.cwd, uid=65532, gid=65532)
    proc = jail.JailProcess(spec)
    proc.start()
    try:
        deadline = time.monotonic() + 20
        while proc.readers[0].kept.count(b"\n") < 11 and time.monotonic() < deadline and proc.running():
            time.sleep(0.05)
        assert proc.running(), proc.output()
        import psutil

        target = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.uids().real == 65532]
        assert target, proc.output()
        # The host sees the jail's root as "/": paths of a jailed task are jail paths already.
        assert os.readlink(f"/proc/{target[0].pid}/root") == "/"
        assert os.readlink(f"/proc/{target[0].pid}/cwd") == run.cwd
        assert jail.netns_pid(proc.pid) is not None
    finally:
        proc.stop(5)   # also removes spec.workdir
    lines = proc.output()[0].splitlines()
    assert lines[0] == f"2 65532 65532 {run.cwd}"   # PID 1 is the jail's init
    assert lines[1] == str(sorted(["full", "null", "random", "shm", "tty", "urandom", "zero", "fd",
                                   "stdin", "stdout", "stderr"]))
    assert lines[2] == "/proc/self/fd True"
    assert lines[3] == "0o1777 0o1777"
    assert lines[4] == "True ''"
    assert lines[5] == "False"   # the tree is not writable for the image user
    assert lines[6] == "1 0000000000000000 0000000000000000"   # no new privileges, no capabilities at all
    host_uid = jail.NAMESPACED_ROOT if os.geteuid() == 0 else os.geteuid()
    assert lines[7].startswith("0 " if os.geteuid() == 0 else "65532 ") and str(host_uid) in lines[7]
    assert " 0 0 " not in f" {lines[7]} "   # the host's root is not in the jail
    assert lines[8] == "['lo'] tracejail"
    assert lines[9] == "30"   # EROFS: /proc is read-only
    assert not os.listdir(spec.workdir) if os.path.exists(spec.workdir) else True
    assert not (rootfs / "proc").exists() and not (rootfs / "dev").exists(), "overlay: the tree stays as staged"


def test_verify_reads_back_the_config_build_wrote_beside_the_tree(tmp_path: Path) -> None:
    """build's own model (image.runtime_config) as JSON beside the tree: the Dockerfile is for
    `docker build`, never parsed."""
    from tracejail import image

    (tmp_path / "tree").mkdir()
    cfg = image.ImageConfig(entrypoint=["/usr/bin/x", 'say "hi"'], env=['A=1 "q" $HOME \\ x', "B="],
                            working_dir="/w d", user="1:2", cmd=["--flag"], volumes=["/data"],
                            labels={tjbuild.LABEL_TRACE_DIGEST: "sha256:ab", 'k"$': 'v\\"$'})
    image.write_dockerfile(str(tmp_path / "tree"), cfg)
    info = tv.read_rootfs_info(str(tmp_path / "tree"))
    assert info is not None
    assert info.env == {"A": '1 "q" $HOME \\ x', "B": ""}
    assert info.labels == cfg.labels and info.entrypoint == cfg.entrypoint and info.cmd == ["--flag"]
    assert (info.user, info.working_dir, info.volumes) == ("1:2", "/w d", ["/data"])
    (tmp_path / "other").mkdir()
    assert tv.read_rootfs_info(str(tmp_path / "other")) is None   # that config is another tree's
    # A config JSON that tracejail did not write is never replaced.
    (tmp_path / "mine").mkdir()
    (tmp_path / "image-config.json").write_text('{"mine": true}\n')
    with pytest.raises(tv.TracejailError, match="image-config.json exists and was not written by tracejail"):
        image.check_dockerfile_slot(str(tmp_path / "mine"))


# --- every workload passes ----------------------------------------------------------------------

@needs_jail
@pytest.mark.parametrize("name", NAMES)
def test_rootfs_verify_passes(name: str, recordings: Path, tmp_path: Path) -> None:
    trace_path = trace_copy(name, recordings, tmp_path)
    rootfs = stage(trace_path, tmp_path)
    before = trace_path.read_bytes()
    port_free(name)
    report = tv.verify(str(trace_path), tv.VerifyOptions(rootfs=str(rootfs)))
    assert report.passed, tv.format_report(report)
    assert report.user == "65532:65532" and not report.warnings
    run = report.rounds[0].runs[0]
    assert len(run.exercises) == len(wl.get_workload(name).exercises)
    assert trace_path.read_bytes() == before


@needs_jail
@pytest.mark.parametrize("name", NAMES)
def test_rootfs_verify_passes_as_an_ordinary_user(name: str, recordings: Path, unprivileged, public_dir: str) -> None:
    """The same, run by nobody: the sandbox needs no root (the trace is made nobody's own, so its
    exercises may run)."""
    trace_path = trace_copy(name, recordings, Path(public_dir))
    rootfs = stage(trace_path, Path(public_dir))
    subprocess.run(["chmod", "-R", "a+rX", public_dir], check=True)
    os.chown(trace_path, 65534, 65534)
    proc = unprivileged.run("verify", str(trace_path), "--rootfs", str(rootfs))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exercises = len(wl.get_workload(name).exercises)
    assert f"PASS: 1 run(s), {exercises} exercise(s)" in proc.stdout


@pytest.mark.docker
@pytest.mark.parametrize("name", NAMES)
def test_docker_verify_passes(name: str, recordings: Path, tmp_path: Path, docker_engine) -> None:
    trace_path = trace_copy(name, recordings, tmp_path)
    tag = f"tj-verify-test-{name}:latest"
    build_image(trace_path, tag, docker_engine)
    try:
        port_free(name)
        proc = run_cli(str(trace_path), "-t", tag, "--json", env=docker_engine.env)
        report = json.loads(proc.stdout)
        assert proc.returncode == 0 and report["passed"], proc.stdout + proc.stderr
        assert report["user"] == "65532:65532"
        # Servers publish their ports through the engine's bridge, as users run them.
        assert not any("--network host" in n for n in report["notes"]), report["notes"]
        assert report["rounds"][0]["runs"][0]["traced"] is False   # passing runs are not re-traced
        if name == "python-web" and JAIL_PROBLEM is None:
            # Asked for: a traced replay in a jail of the exported image; nothing is missing.
            proc = run_cli(str(trace_path), "-t", tag, "--trace-inside", "--json", env=docker_engine.env)
            check = json.loads(proc.stdout)["rounds"][0]["runs"][0]
            assert proc.returncode == 0 and check["traced"] and check["misses"] == [], proc.stdout
        assert_no_containers(docker_engine)
    finally:
        docker_engine.run("rmi", "-f", tag, check=False)


@needs_jail
def test_traced_replay_of_passing_workloads_finds_no_misses(recordings: Path, tmp_path: Path) -> None:
    """--trace-inside on good trees: the same output under the tracer, and no false misses."""
    for name in ("python-web", "shell-pipeline", "c-plugin"):
        where = tmp_path / name
        where.mkdir()
        trace_path = trace_copy(name, recordings, where)
        rootfs = stage(trace_path, where)
        port_free(name)
        report = tv.verify(str(trace_path), tv.VerifyOptions(rootfs=str(rootfs), trace_inside=True))
        check = report.rounds[0].runs[0]
        assert report.passed and check.traced, tv.format_report(report)
        assert check.misses == [], tv.format_report(report)


# --- broken on purpose, repaired by --fix -------------------------------------------------------

def _named(report: dict, suffix: str) -> list[dict]:
    return [m for r in report["rounds"][0]["runs"] for m in r["misses"] if m["path"].endswith(suffix)]


@needs_jail
@pytest.mark.parametrize("case", list(BROKEN))
def test_rootfs_broken_tree_fails_then_fix_repairs(case: str, recordings: Path, tmp_path: Path) -> None:
    name, glob, suffix = BROKEN[case]
    trace_path = trace_copy(name, recordings, tmp_path)
    rootfs = stage(trace_path, tmp_path, exclude=(glob,))
    port_free(name)
    proc = run_cli(str(trace_path), "--rootfs", str(rootfs))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout and suffix in proc.stdout, proc.stdout
    assert "tj-jail-" not in proc.stdout   # jail paths are shown as the program saw them
    assert "--- recorded" in proc.stdout   # a diff of what differed

    proc = run_cli(str(trace_path), "--rootfs", str(rootfs), "--fix", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["passed"], proc.stdout + proc.stderr
    first = report["rounds"][0]
    assert not first["passed"] and first["rebuilt"] and _named(report, suffix)
    # The trace had it all along (the build's --exclude dropped it): nothing to add, just a rebuild.
    assert any(p.endswith(suffix) for p in first["kept"]) and first["added"] == []
    assert sorted(os.listdir(tmp_path)) == ["Dockerfile", "image-config.json", "rootfs", "trace.json"], \
        "swap left nothing behind"
    assert tv.read_rootfs_info(str(rootfs)).labels[tjbuild.LABEL_TRACE_DIGEST] == tjbuild.trace_digest(str(trace_path))


@pytest.mark.docker
def test_broken_bridge_falls_back_to_host_network(recordings: Path, tmp_path: Path, docker_engine,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine whose bridge network exists but cannot publish (docker0 gone, as on some CI hosts):
    the container never starts and docker exits 125; the server then runs as record ran it."""
    trace_path = trace_copy("python-web", recordings, tmp_path)
    tag = "tj-verify-test-bridge:latest"
    build_image(trace_path, tag, docker_engine)
    try:
        target = tv.DockerTarget(tag, tv.VerifyOptions(image=tag, docker_env=docker_engine.env))
        target._bridge = True   # as if the engine had a bridge network (this one has none)
        real_run = target._run

        def run_or_fail_to_publish(run, first, network, host_net):
            if "-p" in network:
                fail = "echo 'docker: Error response from daemon: could not find bridge docker0.' >&2; exit 125"
                return tv.DockerRunning(["sh", "-c", fail], docker_engine.env, "tj-verify-none", False)
            return real_run(run, first, network, host_net)

        monkeypatch.setattr(target, "_run", run_or_fail_to_publish)
        run = tr.load(str(trace_path)).runs[0]
        port_free("python-web")
        check = tv.compare(0, run, tv.replay(lambda: target.start(run, True), run, target.opts))
        assert check.passed, check
        assert target.host_network() and "could not find bridge docker0" in target.notes[-1]
        assert_no_containers(docker_engine)
    finally:
        docker_engine.run("rmi", "-f", tag, check=False)


@pytest.mark.docker
def test_engine_without_bridge_runs_servers_on_the_host_network(recordings: Path, tmp_path: Path,
                                                                engine_without_bridge) -> None:
    """A real engine started with --bridge none (in a network namespace of its own, where it can
    delete no docker0): verify runs the server with --network host, as record ran it, and says so."""
    engine, netns = engine_without_bridge
    trace_path = trace_copy("python-web", recordings, tmp_path)
    tag = "tj-verify-test-nobridge:latest"
    build_image(trace_path, tag, engine)
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", *TJ, "verify", str(trace_path), "-t", tag, "--json"],
                          env={**engine.env, "TMPDIR": os.environ["TMPDIR"]}, capture_output=True, text=True,
                          timeout=300)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["passed"], proc.stdout + proc.stderr
    assert any("--network host" in n for n in report["notes"]), report["notes"]
    assert_no_containers(engine)


@pytest.mark.docker
@needs_jail
@pytest.mark.parametrize("case", list(BROKEN))
def test_docker_broken_image_fails_then_fix_repairs(case: str, recordings: Path, tmp_path: Path,
                                                     docker_engine) -> None:
    name, glob, suffix = BROKEN[case]
    trace_path = trace_copy(name, recordings, tmp_path)
    tag = f"tj-verify-test-broken-{case}:latest"
    build_image(trace_path, tag, docker_engine, exclude=(glob,))
    try:
        port_free(name)
        proc = run_cli(str(trace_path), "-t", tag, "--json", env=docker_engine.env)
        report = json.loads(proc.stdout)
        assert proc.returncode == 1 and not report["passed"], proc.stdout + proc.stderr
        assert _named(report, suffix), proc.stdout   # found in a jail of the exported image
        proc = run_cli(str(trace_path), "-t", tag, "--fix", env=docker_engine.env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "round 2:" in proc.stdout and f"rebuilt image {tag}" in proc.stdout
        assert proc.stdout.rstrip().endswith("(passed after 1 rebuild(s))"), proc.stdout
        assert_no_containers(docker_engine)
        assert run_cli(str(trace_path), "-t", tag, env=docker_engine.env).returncode == 0
    finally:
        docker_engine.run("rmi", "-f", tag, check=False)


@needs_jail
def test_fix_adds_a_path_the_trace_missed(recordings: Path, tmp_path: Path) -> None:
    """A real trace gap (the data file is not in the trace at all): --fix adds it, marked."""
    trace_path = trace_copy("python-web", recordings, tmp_path)
    trace = tr.load(str(trace_path))
    data = next(p for p in trace.files if p.endswith("/data/items.json"))
    del trace.files[data]
    tr.save(trace, str(trace_path))
    rootfs = stage(trace_path, tmp_path)
    port_free("python-web")
    report = tv.verify(str(trace_path), tv.VerifyOptions(rootfs=str(rootfs), fix=True))
    assert report.passed and len(report.rounds) == 2, tv.format_report(report)
    assert report.rounds[0].added == [data]
    rec = tr.load(str(trace_path)).files[data]
    assert rec.added_by == "verify --fix"
    assert "openat -> ENOENT" in (rec.reason or "") and "server.py" in (rec.reason or "")
    text = tv.format_report(report)
    assert f"+ {data}" in text and "added 1 path(s)" in text


@needs_jail
def test_fix_stops_when_a_round_adds_nothing(recordings: Path, tmp_path: Path) -> None:
    """A difference that no file explains: no misses, so --fix stops after the first round."""
    trace_path = trace_copy("python-cli", recordings, tmp_path)
    trace = tr.load(str(trace_path))
    trace.runs[0].stdout += "a line the program never prints\n"
    tr.save(trace, str(trace_path))
    rootfs = stage(trace_path, tmp_path)
    report = tv.verify(str(trace_path), tv.VerifyOptions(rootfs=str(rootfs), fix=True))
    assert not report.passed and len(report.rounds) == 1
    assert "no new misses" in report.end
    check = report.rounds[0].runs[0]
    assert check.traced and check.misses == []
    assert "+a line the program never prints" not in check.diff and "-a line the program never prints" in check.diff


# --- more runs, timeouts, the fallback ------------------------------------------------------------

@needs_jail
def test_every_recorded_run_is_replayed(recordings: Path, tmp_path: Path) -> None:
    w = wl.get_workload("python-cli")
    trace = recorded("python-cli", recordings)
    second = record(["python3", "-c", "import json; print(json.dumps({'second': 2}))"],
                    RecordOptions(cwd=str(w.dir), passthrough=False))
    trace.merge(second.trace)
    trace_path = tmp_path / "trace.json"
    tr.save(trace, str(trace_path))
    rootfs = stage(trace_path, tmp_path)
    report = tv.verify(str(trace_path), tv.VerifyOptions(rootfs=str(rootfs)))
    assert report.passed and [c.index for c in report.rounds[0].runs] == [0, 1], tv.format_report(report)
    assert report.rounds[0].runs[1].command[1:] == ["-c", "import json; print(json.dumps({'second': 2}))"]


@needs_jail
def test_a_recorded_failure_builds_with_a_warning_and_verifies_as_that_failure(tmp_path: Path) -> None:
    rec = record(["python3", "nope.py"], RecordOptions(cwd=str(tmp_path), passthrough=False))
    assert rec.run.exit_code == 2
    trace_path = tmp_path / "trace.json"
    tr.save(rec.trace, str(trace_path))
    built = subprocess.run([*TJ, "build", str(trace_path), "--rootfs", str(tmp_path / "rootfs"), "--no-load"],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0
    assert "WARNING: the recorded command failed with exit 2 (" in built.stderr, built.stderr
    proc = run_cli(str(trace_path), "--rootfs", str(tmp_path / "rootfs"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS (the recorded run itself failed with exit 2): the same failure" in proc.stdout
    assert "\n  PASS  exit" not in proc.stdout


@needs_jail
def test_a_replay_that_runs_too_long_is_stopped(tmp_path: Path) -> None:
    rec = record(["sleep", "2"], RecordOptions(passthrough=False))
    trace_path = tmp_path / "trace.json"
    tr.save(rec.trace, str(trace_path))
    rootfs = stage(trace_path, tmp_path)
    t0 = time.monotonic()
    proc = run_cli(str(trace_path), "--rootfs", str(rootfs), "--timeout", "1", "--no-trace-inside")
    assert proc.returncode == 1 and "still running after 1s" in proc.stdout, proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 10


@needs_jail
def test_bind_fallback_without_overlay(recordings: Path, tmp_path: Path) -> None:
    trace_path = trace_copy("shell-pipeline", recordings, tmp_path)
    rootfs = stage(trace_path, tmp_path)
    report = tv.verify(str(trace_path), tv.VerifyOptions(rootfs=str(rootfs), overlay=False))
    assert report.passed, tv.format_report(report)
    assert (rootfs / "proc").is_dir() and (rootfs / "dev").is_dir()   # mount points had to be made


def _hanging_server_trace(recordings: Path, dest: Path) -> Path:
    """A server whose recorded readiness port it never opens: the replay waits until stopped."""
    trace = recorded("flask-venv", recordings)
    trace.runs[0].tracing["ready_port"] = 9
    trace.runs[0].listening_ports = [9]
    path = dest / "trace.json"
    tr.save(trace, str(path))
    return path


def _interrupt_when(proc: subprocess.Popen, up, sig: int) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + 60
    while not up() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@needs_jail
@pytest.mark.parametrize("traced", [False, True])
def test_interrupted_rootfs_verify_leaves_nothing(traced: bool, recordings: Path, tmp_path: Path,
                                                  private_tmp: str) -> None:
    import signal

    trace_path = _hanging_server_trace(recordings, tmp_path)
    rootfs = stage(trace_path, tmp_path)
    args = [*TJ, "verify", str(trace_path), "--rootfs", str(rootfs)] + (["--trace-inside"] if traced else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = _interrupt_when(proc, lambda: bool(_ours(private_tmp)["processes"]), signal.SIGINT)
    assert done.returncode == 130 and "interrupted" in done.stderr, done.stderr
    # (the autouse fixture checks that no jail process, mount or directory is left)


@pytest.mark.docker
def test_terminated_docker_verify_removes_its_container(recordings: Path, tmp_path: Path, docker_engine) -> None:
    import signal

    trace_path = _hanging_server_trace(recordings, tmp_path)
    tag = "tj-verify-test-hang:latest"
    build_image(trace_path, tag, docker_engine)
    try:
        proc = subprocess.Popen([*TJ, "verify", str(trace_path), "-t", tag], env=docker_engine.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Up = the server listens (it is PID 1 in the container: before its SIGTERM handler is
        # installed, `docker stop` has to wait its timeout out, as for any image).
        up = lambda: wl.port_open(8001)  # noqa: E731
        done = _interrupt_when(proc, up, signal.SIGTERM)
        assert done.returncode == 143 and "stopped by SIGTERM" in done.stderr, done.stderr
        assert_no_containers(docker_engine)
    finally:
        docker_engine.run("rmi", "-f", tag, check=False)


# --- bad input ---------------------------------------------------------------------------------

def test_usage_errors(recordings: Path, tmp_path: Path) -> None:
    trace_path = trace_copy("c-plugin", recordings, tmp_path)
    proc = run_cli(str(trace_path))
    assert proc.returncode == 2 and "-t IMAGE or a staged tree with --rootfs DIR" in proc.stderr
    proc = run_cli(str(trace_path), "-t", "x", "--rootfs", "y")
    assert proc.returncode == 2
    proc = run_cli(str(trace_path), "--rootfs", str(tmp_path), "--fix", "--no-trace-inside")
    assert proc.returncode == 2 and "--fix needs" in proc.stderr
    proc = run_cli(str(tmp_path / "missing.json"), "--rootfs", str(tmp_path))
    assert proc.returncode == 65 and "trace not found" in proc.stderr
    assert proc.stderr.count("\n") == 1   # one line, no traceback


def test_usage_errors_are_one_line(recordings: Path, tmp_path: Path) -> None:
    trace_path = trace_copy("c-plugin", recordings, tmp_path)
    proc = run_cli(str(trace_path), "--rootfs", str(tmp_path), "--fix", "--no-trace-inside")
    assert proc.returncode == 2 and "--fix needs" in proc.stderr
    proc = run_cli(str(tmp_path / "missing.json"), "--rootfs", str(tmp_path))
    assert proc.returncode == 65 and "trace not found" in proc.stderr
    assert proc.stderr.count("\n") == 1   # one line, no traceback


def test_no_docker_engine_suggests_rootfs(recordings: Path, tmp_path: Path) -> None:
    trace_path = trace_copy("c-plugin", recordings, tmp_path)
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-such.sock"}
    env.pop("DOCKER_CONTEXT", None)
    proc = run_cli(str(trace_path), "-t", "app", env=env)
    assert proc.returncode == 1, proc.stderr
    assert "--rootfs" in proc.stderr   # the way out without Docker
    assert "no Docker engine reachable" in proc.stderr or "docker CLI not found" in proc.stderr


@needs_jail
def test_rootfs_of_another_trace_is_refused(recordings: Path, tmp_path: Path) -> None:
    trace_path = trace_copy("c-plugin", recordings, tmp_path)
    rootfs = stage(trace_path, tmp_path)
    other = tmp_path / "other.json"
    trace = tr.load(str(trace_path))
    trace.runs[0].stdout = "different\n"
    tr.save(trace, str(other))
    with pytest.raises(TraceFormatError, match="built from another trace"):
        tv.verify(str(other), tv.VerifyOptions(rootfs=str(rootfs)))


@pytest.mark.docker
def test_docker_bad_input(recordings: Path, tmp_path: Path, docker_engine) -> None:
    trace_path = trace_copy("c-plugin", recordings, tmp_path)
    env = docker_engine.env
    proc = run_cli(str(trace_path), "-t", "tj-verify-no-such-image:1", env=env)
    assert proc.returncode == 1 and "not found" in proc.stderr and "tracejail build" in proc.stderr
    tag = "tj-verify-test-mismatch:latest"
    other = tmp_path / "other.json"
    trace = tr.load(str(trace_path))
    trace.runs[0].stdout = "different\n"
    tr.save(trace, str(other))
    build_image(other, tag, docker_engine)
    try:
        proc = run_cli(str(trace_path), "-t", tag, env=env)
        assert proc.returncode == 65 and "built from another trace" in proc.stderr
        image_id = docker_engine.run("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
        with pytest.raises(UsageError, match="not the ID"):
            tv.verify(str(other), tv.VerifyOptions(image=image_id, fix=True, docker_env=env))
    finally:
        docker_engine.run("rmi", "-f", tag, check=False)
    assert_no_containers(docker_engine)
