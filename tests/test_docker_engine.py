"""Talking to a Docker engine through the docker CLI (docker_engine.py): finding the CLI, running
it with a timeout, saying in one phrase why no engine answers — from the CLI's own output for a
socket that does not exist, a file that is not a socket, a socket an ordinary user may not open,
an engine that never answers — and `docker load` / `docker image inspect` against the private
engine of the test session, with small FROM-scratch archives written here."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from conftest import DockerEngine
from images import image_config, tar_of, write_docker_archive
from tracejail import docker_engine as de
from tracejail.errors import TracejailError

DOCKER = shutil.which("docker")
needs_cli = pytest.mark.skipif(DOCKER is None, reason="docker CLI not installed")
NOBODY = 65534
UNREACHABLE = "no Docker engine reachable ("
ADVICE = "; start Docker or set DOCKER_HOST"


def engine_env(host: str) -> dict[str, str]:
    """This process's environment aimed at `host` (a context would override DOCKER_HOST)."""
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_CONTEXT"}
    env["DOCKER_HOST"] = host
    return env


def cli_stderr(env: dict[str, str]) -> str:
    """What the docker CLI itself says on stderr when engine_problem's question fails."""
    proc = subprocess.run(["docker", "info", "--format", "{{json .ServerVersion}}"], env=env, capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    return proc.stderr


# --- finding and running the CLI -----------------------------------------------------------------

def test_docker_cli_is_looked_up_on_the_given_path(tmp_path: Path) -> None:
    bin_dir, empty = tmp_path / "bin", tmp_path / "empty"
    bin_dir.mkdir()
    empty.mkdir()
    (bin_dir / "docker").write_text("#!/bin/sh\nexit 0\n")
    assert de.docker_cli({"PATH": str(bin_dir)}) is None          # not executable: not a CLI
    (bin_dir / "docker").chmod(0o755)
    assert de.docker_cli({"PATH": f"{empty}:{bin_dir}"}) == str(bin_dir / "docker")
    assert de.docker_cli({"PATH": str(empty)}) is None
    assert de.docker_cli(None) == shutil.which("docker")            # this process's PATH


def test_run_without_a_cli_raises_the_callers_message(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path)}
    with pytest.raises(TracejailError, match="docker CLI not found on PATH; install Docker"):
        de.run(["version"], env, 10)
    with pytest.raises(TracejailError, match="^no docker here, use --rootfs$"):
        de.run(["version"], env, 10, missing="no docker here, use --rootfs")
    assert de.engine_problem(env) == "no docker CLI on PATH"
    assert not de.engine_available(env)


@needs_cli
def test_run_captures_the_clis_output_and_reads_no_stdin(tmp_path: Path) -> None:
    proc = de.run(["version", "--format", "{{.Client.Version}}"], engine_env(f"unix://{tmp_path}/no.sock"), 30)
    assert proc.stdout.strip()[:1].isdigit(), proc    # the client answers without an engine
    assert isinstance(proc.stderr, str)


@pytest.fixture
def silent_engine(tmp_path: Path) -> Iterator[str]:
    """A DOCKER_HOST whose socket accepts connections and never answers a request."""
    path = str(tmp_path / "silent.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(16)
    try:
        yield f"unix://{path}"
    finally:
        server.close()


@needs_cli
def test_run_is_bounded_by_its_timeout(silent_engine: str) -> None:
    env = engine_env(silent_engine)
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        de.run(["info"], env, 1.0)
    assert time.monotonic() - started < 10
    started = time.monotonic()
    assert de.engine_problem(env, timeout=1.0) == "the Docker engine did not answer in 1 s"
    assert time.monotonic() - started < 10


# --- why no engine answers -------------------------------------------------------------------------

@needs_cli
@pytest.mark.parametrize("what", ["missing socket", "regular file"])
def test_engine_problem_when_nothing_listens(tmp_path: Path, what: str) -> None:
    target = tmp_path / ("no.sock" if what == "missing socket" else "plain")
    if what == "regular file":
        target.write_text("not a socket\n")
    env = engine_env(f"unix://{target}")
    problem = de.engine_problem(env)
    assert problem is not None and "\n" not in problem
    assert problem.startswith(UNREACHABLE) and problem.endswith(ADVICE), problem
    # diagnose on the CLI's real complaint
    said = de.diagnose(cli_stderr(env))
    assert said == f"{UNREACHABLE}Cannot connect to the Docker daemon at unix://{target}. " \
                   f"Is the docker daemon running?){ADVICE}"


@needs_cli
def test_engine_problem_keeps_the_clis_reason(tmp_path: Path) -> None:
    target = tmp_path / "no.sock"
    env = engine_env(f"unix://{target}")
    printed = subprocess.run(["docker", "info", "--format", "{{json .ServerVersion}}"], env=env, capture_output=True,
                             text=True, timeout=30, stdin=subprocess.DEVNULL).stdout
    if not printed.strip():
        pytest.skip("this docker CLI prints nothing on stdout without an engine: the fault does not show")
    problem = de.engine_problem(env)
    assert problem == f"{UNREACHABLE}Cannot connect to the Docker daemon at unix://{target}. " \
                      f"Is the docker daemon running?){ADVICE}"


@pytest.fixture
def root_only_socket(public_dir: str) -> Iterator[str]:
    """A listening socket that only root may connect to, in a directory anyone may enter."""
    path = os.path.join(public_dir, "docker.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(4)
    os.chmod(path, 0o600)
    try:
        yield path
    finally:
        server.close()


def problem_as_nobody(env: dict[str, str]) -> str | None:
    """engine_problem(env), called in a child that became uid 65534."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write_end, json.dumps(de.engine_problem(env)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        said = f.read()
    os.waitpid(pid, 0)
    assert said, "the child said nothing"
    return json.loads(said)


@needs_cli
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the docker CLI as another user")
def test_socket_an_ordinary_user_may_not_open(root_only_socket: str, public_dir: str) -> None:
    mode = stat.S_IMODE(os.stat(DOCKER).st_mode)   # type: ignore[arg-type]
    if not mode & 0o001:
        pytest.skip("the docker CLI is not executable by others")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": public_dir, "DOCKER_HOST": f"unix://{root_only_socket}"}
    problem = problem_as_nobody(env)
    assert problem == (f"permission denied on the Docker socket {root_only_socket}: add your user to the docker group "
                       "(sudo usermod -aG docker $USER, then log in again) or run as root")
    # root may connect: the socket is fine, only nobody's permission was the problem
    assert de.engine_problem(env, timeout=1.0) == "the Docker engine did not answer in 1 s"


def test_diagnose_names_the_socket_or_the_default_one() -> None:
    # docker 20.10's client, as users still paste it
    old = ('Got permission denied while trying to connect to the Docker daemon socket at unix:///run/user/1000/docker.sock: '
           'Get "http://%2Frun%2Fuser%2F1000%2Fdocker.sock/v1.24/info": dial unix /run/user/1000/docker.sock: '
           'connect: permission denied\n')
    assert de.diagnose(old).startswith("permission denied on the Docker socket /run/user/1000/docker.sock: add your user")
    bare = "Got permission denied while trying to connect to the Docker daemon socket\n"
    assert de.diagnose(bare).startswith("permission denied on the Docker socket /var/run/docker.sock: ")
    assert de.diagnose("") == f"{UNREACHABLE}no output){ADVICE}"
    assert de.diagnose("first\n\n  last line  \n\n") == f"{UNREACHABLE}last line){ADVICE}"


def test_diagnose_knows_the_docker_29_permission_message() -> None:
    said = "permission denied while trying to connect to the docker API at unix:///var/run/docker.sock\n"
    assert de.diagnose(said).startswith("permission denied on the Docker socket /var/run/docker.sock: add your user")


# --- docker load output ------------------------------------------------------------------------------

def test_parse_load_output_reads_names_and_ids() -> None:
    digest = "sha256:" + "ab" * 32
    output = ("The image tjtest/app:1 already exists, renaming the old one with ID sha256:" + "cd" * 32
              + " to empty string\nLoaded image: tjtest/app:1\nLoaded image: localhost:5000/other:2 \r\n"
              + f"Loaded image ID: {digest}\n")
    assert de.parse_load_output(output) == (["tjtest/app:1", "localhost:5000/other:2"], [digest])
    assert de.parse_load_output("") == ([], [])
    # a short or upper-case ID is not an image ID
    assert de.parse_load_output("Loaded image ID: sha256:abc\nLoaded image ID: sha256:" + "AB" * 32) == ([], [])


# --- against the engine ------------------------------------------------------------------------------

@pytest.fixture
def token() -> str:
    return uuid.uuid4().hex[:10]


def scratch_archive(tmp_path: Path, token: str, tags: list[str] | None = None) -> tuple[Path, str]:
    """A one-layer FROM-scratch docker-archive holding one file unique to `token`; its image ID."""
    layer = tar_of({"hello.txt": f"hello {token}\n".encode()})
    path = tmp_path / f"{token}.tar"
    ident = write_docker_archive(path, [layer], image_config([layer], Cmd=["/hello"]), tags)
    return path, ident


@pytest.fixture
def remove_images(docker_engine: DockerEngine) -> Iterator[list[str]]:
    """Names and IDs the test loaded, removed from the engine afterwards."""
    names: list[str] = []
    yield names
    if names:
        docker_engine.run("rmi", "-f", *names, check=False)


@pytest.mark.docker
def test_real_load_output_parses(tmp_path: Path, token: str, docker_engine: DockerEngine,
                                 remove_images: list[str]) -> None:
    name = f"tjtest/de-named-{token}:1"
    named, named_id = scratch_archive(tmp_path, token, [name])
    untagged, untagged_id = scratch_archive(tmp_path, token + "u")
    remove_images += [name, untagged_id]
    out = docker_engine.run("load", "-i", str(named)).stdout
    assert de.parse_load_output(out) == ([name], []), out
    out = docker_engine.run("load", "-i", str(untagged)).stdout
    assert de.parse_load_output(out) == ([], [untagged_id]), out


@pytest.mark.docker
def test_load_returns_the_image_id_and_tags_every_name(tmp_path: Path, token: str, docker_engine: DockerEngine,
                                                       remove_images: list[str]) -> None:
    own = f"tjtest/de-own-{token}:1"
    archive, ident = scratch_archive(tmp_path, token, [own])
    extra = [f"tjtest/de-extra-{token}:2", f"127.0.0.1:5000/de-{token}", f"docker.io/tjtest/de-own-{token}:1"]
    remove_images += [own, *extra[:2], ident]
    assert de.load(str(archive), extra, env=docker_engine.env) == ident
    for name in [own, *extra]:
        assert de.image_id(name, env=docker_engine.env) == ident, name
    # the same archive again, one tag as a plain string: the same ID, nothing refused
    assert de.load(str(archive), f"tjtest/de-extra-{token}:2", env=docker_engine.env) == ident


@pytest.mark.docker
def test_load_of_an_untagged_archive_tags_it(tmp_path: Path, token: str, docker_engine: DockerEngine,
                                             remove_images: list[str]) -> None:
    archive, ident = scratch_archive(tmp_path, token)
    name = f"tjtest/de-untagged-{token}"
    remove_images += [name, ident]
    assert de.load(str(archive), [name], env=docker_engine.env) == ident
    assert de.image_id(f"{name}:latest", env=docker_engine.env) == ident
    assert de.image_id(ident[len("sha256:"):][:12], env=docker_engine.env) == ident   # a short ID


@pytest.mark.docker
def test_load_and_image_id_fail_with_dockers_own_line(tmp_path: Path, token: str,
                                                      docker_engine: DockerEngine) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\0not an archive" * 64)
    with pytest.raises(TracejailError, match=f"^docker load refused {junk}: .+") as err:
        de.load(str(junk), env=docker_engine.env)
    assert "\n" not in str(err.value)
    missing = tmp_path / "missing.tar"
    with pytest.raises(TracejailError, match=f"^docker load refused {missing}: .*no such file"):
        de.load(str(missing), env=docker_engine.env)
    with pytest.raises(TracejailError, match=f"^docker cannot find image tjtest/none-{token}:1: .*No such image"):
        de.image_id(f"tjtest/none-{token}:1", env=docker_engine.env)


@needs_cli
def test_load_without_an_engine_says_why(tmp_path: Path, token: str) -> None:
    # an engine that is not there: its diagnosis, not "docker load refused"
    archive, _ = scratch_archive(tmp_path, token)
    with pytest.raises(TracejailError, match="^" + re.escape(f"{UNREACHABLE}Cannot connect to the Docker daemon at "
                                                             f"unix://{tmp_path}/gone.sock")):
        de.load(str(archive), ["tjtest/x:1"], env=engine_env(f"unix://{tmp_path}/gone.sock"))


@pytest.mark.docker
def test_engine_problem_is_none_for_the_running_engine(docker_engine: DockerEngine) -> None:
    assert de.engine_problem(docker_engine.env) is None
    assert de.engine_available(docker_engine.env)
