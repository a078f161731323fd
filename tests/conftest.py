"""Shared fixtures: a private Docker engine for tests that load and run images, an ordinary
user, and a check that the tests leave the host as they found it.

`docker_engine` starts its own dockerd (own socket, data root, exec root, pidfile) so tests never
touch a user's images and never see layers loaded by someone else (docker skips a layer whose
chain ID is present, which can hide a broken archive). Set TRACEJAIL_DOCKER_HOST to use an
existing engine instead (e.g. unix:///var/run/docker.sock); it is then left running as found.

Networking: the private engine gets a bridge of its own (`tj<pid>`, an address range nothing on
the host uses, created before dockerd starts and deleted after it stops), and runs with
iptables, ip-forward and masquerading off. Containers publish ports the way users run them
(`-p 127.0.0.1:HOST:CTR`, through docker-proxy over that bridge). A dockerd started with
`--bridge none` instead deletes the host's own `docker0` as it starts (reproduced: the system
engine then fails every `docker run` and RUN step with "could not find bridge docker0"), so the
tests never start one in the host's network: `engine_without_bridge` runs one in a network
namespace of its own, for the `--network host` fallback.

`host_unchanged` (autouse) records the host's interfaces and addresses, iptables rules, mounts,
net.ipv4.ip_forward and, where a system engine answers, its images, containers and networks,
and fails the session, naming each difference, when they changed.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


@dataclass
class DockerEngine:
    """A reachable engine: `env` for subprocess calls, `run()` for docker CLI commands."""

    host: str
    env: dict[str, str] = field(default_factory=dict)
    private: bool = False

    def run(self, *args: str, check: bool = True, timeout: float = 300.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `docker ARGS` against this engine; raise with docker's stderr when check fails."""
        proc = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc


def _engine_env(host: str) -> dict[str, str]:
    env = dict(os.environ)
    env["DOCKER_HOST"] = host
    env.pop("DOCKER_CONTEXT", None)  # a context would override DOCKER_HOST
    return env


def _answers(env: dict[str, str], timeout: float = 5.0) -> bool:
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{json .ServerVersion}}"], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and proc.stdout.strip() not in ("", '""', "null")


def _tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()[-4000:]
    except OSError:
        return "(no log)"
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-lines:])


# Only the engine's own programs are candidates: a user's `tail -f` on our log is not ours to end.
_ENGINE_PROGRAMS = ("dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2", "runc", "docker-proxy")


def _pids_mentioning(marker: str) -> list[int]:
    """Engine processes whose command line names our unique temp dir: dockerd, its containerd, shims."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]).decode(errors="replace") in _ENGINE_PROGRAMS and \
                any(marker.encode() in a for a in argv):
            found.append(int(name))
    return found


def _mounts_under(root: str) -> list[str]:
    """Mount points below `root`, deepest first (dockerd leaves exec-root/netns/default mounted)."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == root or point.startswith(root + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def _stop_private(proc: subprocess.Popen[bytes], env: dict[str, str], workdir: str) -> list[str]:
    """Stop the private engine and everything it started; return problems found (for the report)."""
    problems: list[str] = []
    if proc.poll() is None and _answers(env):
        ids = subprocess.run(["docker", "ps", "-aq"], env=env, capture_output=True, text=True).stdout.split()
        if ids:
            problems.append(f"{len(ids)} container(s) left by tests; removed")
            subprocess.run(["docker", "rm", "-f", *ids], env=env, capture_output=True, timeout=60)
    pid = proc.pid
    try:
        with open(os.path.join(workdir, "dockerd.pid")) as f:
            pid = int(f.read().strip() or proc.pid)
    except (OSError, ValueError):
        pass
    if proc.poll() is None:
        os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            problems.append("dockerd ignored SIGTERM; killed")
            proc.kill()
            proc.wait(timeout=10)
    # dockerd normally takes its containerd and shims down with it; anything still running with
    # our private directory in its command line was started by this fixture: end it by pid.
    deadline = time.monotonic() + 10
    while _pids_mentioning(workdir) and time.monotonic() < deadline:
        time.sleep(0.2)
    for leftover in _pids_mentioning(workdir):
        problems.append(f"process {leftover} outlived dockerd; killed")
        try:
            os.kill(leftover, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for point in _mounts_under(workdir):
        subprocess.run(["umount", "-l", point], capture_output=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return problems


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """A Docker engine for the session: private dockerd, or TRACEJAIL_DOCKER_HOST's engine.

    Skips (with the reason) when docker/dockerd are not installed, when not root, or when dockerd
    cannot start (e.g. inside an unprivileged container).
    """
    if shutil.which("docker") is None:
        pytest.skip("docker CLI not installed")
    external = os.environ.get("TRACEJAIL_DOCKER_HOST")
    if external:
        env = _engine_env(external)
        if not _answers(env, timeout=15):
            pytest.skip(f"TRACEJAIL_DOCKER_HOST={external} does not answer `docker info`")
        yield DockerEngine(external, env, private=False)
        return
    engine = _start_private(bridge=True)
    if isinstance(engine, str):
        pytest.skip(engine)
    try:
        yield engine.engine
    finally:
        problems = engine.stop()
        if problems:
            # Visible with -rA / in the terminal summary; a leak is a test bug worth seeing.
            print("docker_engine teardown: " + "; ".join(problems))


@dataclass
class _Private:
    engine: DockerEngine
    proc: subprocess.Popen[bytes]
    workdir: str
    bridge: str | None = None
    netns: str | None = None
    netns_mount_made: bool = False   # `ip netns add` made the /run/netns mount: undo it

    def stop(self) -> list[str]:
        problems = _stop_private(self.proc, self.engine.env, self.workdir)
        if self.bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        if self.netns:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
            if self.netns_mount_made and not os.listdir(NETNS_DIR):
                subprocess.run(["umount", NETNS_DIR], capture_output=True)
        return problems


NETNS_DIR = "/run/netns"


def _is_mount_point(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def _free_subnet() -> str | None:
    """A /24 in 172.31.240.0/20 that no address or route of the host uses."""
    used = subprocess.run(["ip", "-o", "-4", "route", "show", "table", "all"], capture_output=True,
                          text=True).stdout + subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True,
                                                             text=True).stdout
    for third in range(250, 239, -1):
        if f"172.31.{third}." not in used:
            return f"172.31.{third}"
    return None


def _start_private(bridge: bool, netns: str | None = None) -> _Private | str:
    """A private dockerd, with a bridge of its own or (in the network namespace `netns`, which is
    made here) none at all. The reason it cannot start, as a string."""
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        return "dockerd not installed (set TRACEJAIL_DOCKER_HOST to use a running engine)"
    if os.geteuid() != 0:
        return "a private dockerd needs root (set TRACEJAIL_DOCKER_HOST to use a running engine)"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed (tests/run installs it)"
    # Unix socket paths are limited to ~108 bytes: keep the directory short, under /tmp.
    workdir = tempfile.mkdtemp(prefix="tj-dockerd-", dir="/tmp")
    sock = os.path.join(workdir, "docker.sock")
    host = "unix://" + sock
    env = _engine_env(host)
    log_path = os.path.join(workdir, "dockerd.log")
    cmd = [dockerd, "-H", host, "--data-root", os.path.join(workdir, "data"),
           "--exec-root", os.path.join(workdir, "exec"), "--pidfile", os.path.join(workdir, "dockerd.pid"),
           "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false"]
    name = None
    if bridge:
        subnet = _free_subnet()
        name = f"tj{os.getpid() % 1000000}"
        netns_mount_made = False
        made = subprocess.run(["ip", "link", "add", name, "type", "bridge"], capture_output=True, text=True)
        if subnet is None or made.returncode != 0:
            shutil.rmtree(workdir, ignore_errors=True)
            return f"cannot make a bridge for the private dockerd: {made.stderr.strip() or 'no free subnet'}"
        for args in (["addr", "add", f"{subnet}.1/24", "dev", name], ["link", "set", name, "up"]):
            subprocess.run(["ip", *args], check=True, capture_output=True)
        cmd += ["--bridge", name]
    else:
        cmd += ["--bridge", "none"]
        # The first `ip netns add` on a machine bind-mounts /run/netns and leaves it mounted.
        netns_mount_made = not _is_mount_point(NETNS_DIR)
        made = subprocess.run(["ip", "netns", "add", netns or "tj-nobridge"], capture_output=True, text=True)
        if made.returncode != 0:
            shutil.rmtree(workdir, ignore_errors=True)
            return f"cannot make a network namespace: {made.stderr.strip()}"
        # nsenter, not `ip netns exec`: that also remounts /sys, hiding the cgroups dockerd needs.
        enter = ["nsenter", f"--net=/run/netns/{netns or 'tj-nobridge'}"]
        subprocess.run([*enter, "ip", "link", "set", "lo", "up"], check=True)
        cmd = [*enter, *cmd]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    private = _Private(DockerEngine(host, env, private=True), proc, workdir, name,
                       None if bridge else netns or "tj-nobridge", not bridge and netns_mount_made)
    deadline = time.monotonic() + START_TIMEOUT
    while not _answers(env, timeout=2):
        if proc.poll() is not None or time.monotonic() > deadline:
            why = "exited" if proc.poll() is not None else f"did not answer within {START_TIMEOUT:.0f} s"
            reason = f"private dockerd {why}: {_tail(log_path)}"
            private.stop()
            return reason
        time.sleep(0.2)
    return private


@pytest.fixture
def engine_without_bridge() -> Iterator[tuple[DockerEngine, str]]:
    """A second private engine with no bridge network (`--bridge none`), in a network namespace
    of its own, so the host's docker0 is never touched; and the name of that namespace (run the
    command under test there: `nsenter --net=/run/netns/NAME ...`)."""
    name = f"tj-nobr-{os.getpid()}"
    private = _start_private(bridge=False, netns=name)
    if isinstance(private, str):
        pytest.skip(private)
    try:
        yield private.engine, name
    finally:
        private.stop()


# --- the host as the tests found it -----------------------------------------------------------

def _lines(*argv: str) -> list[str] | None:
    if shutil.which(argv[0]) is None:
        return None
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    return proc.stdout.splitlines() if proc.returncode == 0 else None


def _host_state() -> dict[str, set[str]]:
    state: dict[str, set[str]] = {}
    link = _lines("ip", "-o", "link")
    if link is not None:
        state["interfaces"] = {ln.split(":")[1].strip().split("@")[0] for ln in link if ":" in ln}
        state["addresses"] = {" ".join(ln.split()[1:4]) for ln in _lines("ip", "-o", "addr") or []}
    for tool in ("iptables-save", "ip6tables-save"):
        rules = _lines(tool)
        if rules is not None:   # counters change with traffic: compare rules and policies only
            state[tool] = {re.sub(r"\[\d+:\d+\]", "", ln) for ln in rules if not ln.startswith("#")}
    with open("/proc/self/mountinfo") as f:
        state["mounts"] = {" ".join(ln.split()[4:5] + ln.split(" - ")[1].split()[:1]) for ln in f}
    try:
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            state["net.ipv4.ip_forward"] = {f.read().strip()}
    except OSError:
        pass
    system = _engine_env("unix:///var/run/docker.sock")
    if os.path.exists("/var/run/docker.sock") and _answers(system):
        for what, argv in (("engine images", ["images", "-aq", "--no-trunc"]),
                           ("engine containers", ["ps", "-aq", "--no-trunc"]),
                           ("engine networks", ["network", "ls", "-q", "--no-trunc"])):
            out = subprocess.run(["docker", *argv], env=system, capture_output=True, text=True, timeout=60)
            state[what] = set(out.stdout.split())
    return state


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """tracejail's caches (what Python modules import) in a directory of the session's own."""
    old = os.environ.get("TRACEJAIL_CACHE_DIR")
    os.environ["TRACEJAIL_CACHE_DIR"] = str(tmp_path_factory.mktemp("tracejail-cache"))
    yield
    if old is None:
        os.environ.pop("TRACEJAIL_CACHE_DIR", None)
    else:
        os.environ["TRACEJAIL_CACHE_DIR"] = old


@pytest.fixture(scope="session", autouse=True)
def host_unchanged() -> Iterator[None]:
    before = _host_state()
    yield
    after = _host_state()
    changes = []
    for what in sorted(set(before) | set(after)):
        gone, new = before.get(what, set()) - after.get(what, set()), after.get(what, set()) - before.get(what, set())
        if gone or new:
            changes.append(f"{what}: " + "; ".join([*(f"+ {x}" for x in sorted(new)[:5]),
                                                   *(f"- {x}" for x in sorted(gone)[:5])]))
    if changes:
        raise AssertionError("the tests changed the host: " + " | ".join(changes))


# --- an ordinary user ------------------------------------------------------------------------

NOBODY = 65534


@dataclass
class Unprivileged:
    """Runs tracejail as uid/gid 65534 (nobody), with a Python that user can run: a venv made
    from the system's /usr/bin/python3 (this machine's own python3 may live under a 0700 /root),
    holding tracejail as it is in this checkout."""

    python: str

    def run(self, *args: str, cwd: str = "/", timeout: float = 300.0, home: str = "/") -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home}
        return subprocess.run([self.python, "-m", "tracejail", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=cwd, env=env, preexec_fn=_become_nobody)


def _become_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@pytest.fixture(scope="session")
def unprivileged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unprivileged]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a command as another user")
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("no /usr/bin/python3 for an ordinary user's venv")
    venv = os.environ.get("TRACEJAIL_NOBODY_VENV", "/var/tmp/tracejail-test-nobody-venv")
    if not os.path.exists(os.path.join(venv, "bin", "python")):
        subprocess.run(["/usr/bin/python3", "-m", "venv", venv], check=True, capture_output=True)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "python-ptrace>=0.9.8",
                        "pyelftools>=0.29", "click>=8.0", "psutil>=5.8"], check=True, capture_output=True)
    # This checkout's tracejail, copied where nobody may read it (a checkout under /root may not be).
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = tempfile.mkdtemp(prefix="tj-nobody-src-")
    try:
        shutil.copytree(os.path.join(repo, "tracejail"), os.path.join(src, "tracejail"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy(os.path.join(repo, name), src)
        proc = subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "--no-deps",
                               "--force-reinstall", src], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot install tracejail for an ordinary user: {proc.stderr.strip()[-300:]}")
    finally:
        shutil.rmtree(src, ignore_errors=True)
    subprocess.run(["chmod", "-R", "a+rX", venv], check=True)
    yield Unprivileged(os.path.join(venv, "bin", "python"))


@pytest.fixture
def public_dir() -> Iterator[str]:
    """A directory nobody may enter and read (the tests' own temp dirs are 0700 root)."""
    path = tempfile.mkdtemp(prefix="tj-public-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def static_program(directory: Path, source: str) -> Path:
    """C `source` compiled with `gcc -static` in `directory` (an image needs no libc for it); the
    test is skipped where that cannot be done."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    (directory / "hello.c").write_text(source)
    proc = subprocess.run(["gcc", "-static", "-O2", "-o", str(directory / "hello"), str(directory / "hello.c")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"gcc -static does not work here (install libc6-dev): {proc.stderr.strip()[-200:]}")
    return directory / "hello"


@contextmanager
def private_podman(tmp_path: Path) -> Iterator[list[str]]:
    """The podman command line with a storage root and run root of the test's own, reset and
    removed afterwards; skipped without podman."""
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman not installed (tests/run installs it)")
    root = tmp_path / "podman-root"
    runroot = Path(tempfile.mkdtemp(prefix="tj-pr-"))   # podman wants a runroot under 50 chars
    base = [podman, "--root", str(root), "--runroot", str(runroot), "--storage-driver", "vfs"]
    try:
        yield base
    finally:
        subprocess.run([*base, "system", "reset", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(runroot, ignore_errors=True)


@pytest.fixture(scope="module")
def containerd_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private containerd (own root, state and socket), for `ctr images import`."""
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.skip("containerd/ctr not installed")
    if os.geteuid() != 0:
        pytest.skip("a private containerd needs root")
    d = tempfile.mkdtemp(prefix="tj-ctrd-", dir="/tmp")  # short: unix socket path limit
    sock = os.path.join(d, "c.sock")
    with open(os.path.join(d, "log"), "wb") as log:
        proc = subprocess.Popen(["containerd", "--root", os.path.join(d, "root"), "--state", os.path.join(d, "state"),
                                 "--address", sock], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["ctr", "--address", sock, "version"], capture_output=True).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip("private containerd did not start: " + Path(d, "log").read_text()[-300:])
            time.sleep(0.2)
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with open("/proc/self/mountinfo") as f:
            for point in sorted((ln.split()[4] for ln in f if ln.split()[4].startswith(d + "/")), reverse=True):
                subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
