"""Talk to a Docker engine through the `docker` CLI: is one reachable, load an archive.

The CLI (not the HTTP API) is used so that DOCKER_HOST, contexts, TLS settings and credential
helpers work exactly as they do for the user. Any client version works: a newer client
negotiates the API version down (a 28.x client against the 20.10 engine was checked).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from typing import Mapping, Sequence

from tracejail.errors import TracejailError

# `docker info` on a reachable local engine answers in well under a second; an unreachable
# DOCKER_HOST over TCP can hang for a long time, so availability checks are bounded.
INFO_TIMEOUT = 10.0
LOAD_TIMEOUT = 1800.0

_LOADED_NAME = re.compile(r"^Loaded image: (\S+)\s*$", re.M)
# Docker's clients up to 28 say "...to the Docker daemon socket at unix://...", 29 "...to the docker API at ...".
_SOCKET_DENIED = re.compile(r"permission denied while trying to connect to the Docker (?:daemon socket|API)"
                            r"(?: at (?:unix://)?(\S+?)[:;,]?(?:\s|$))?", re.I)
_LOADED_ID = re.compile(r"^Loaded image ID: (sha256:[0-9a-f]{64})\s*$", re.M)


def docker_cli(env: Mapping[str, str] | None = None) -> str | None:
    """Path of the docker CLI on env's PATH (or this process's), None when absent."""
    return shutil.which("docker", path=env.get("PATH") if env is not None else None)


def run(args: Sequence[str], env: Mapping[str, str] | None, timeout: float,
        missing: str = "docker CLI not found on PATH; install Docker or write an archive with --output",
        ) -> subprocess.CompletedProcess[str]:
    """`docker ARGS` against the engine `env` names (DOCKER_HOST), output captured; `missing` is
    the error when there is no docker CLI."""
    cli = docker_cli(env)
    if cli is None:
        raise TracejailError(missing)
    return subprocess.run([cli, *args], env=dict(env) if env is not None else None, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def engine_problem(env: Mapping[str, str] | None = None, timeout: float = INFO_TIMEOUT) -> str | None:
    """None when the docker CLI exists and `docker info` reaches an engine within `timeout`;
    otherwise why not, in one phrase (a socket the user may not open gets its own diagnosis)."""
    try:
        proc = run(["info", "--format", "{{json .ServerVersion}}"], env, timeout)
    except TracejailError:
        return "no docker CLI on PATH"
    except subprocess.TimeoutExpired:
        return f"the Docker engine did not answer in {timeout:.0f} s"
    except OSError as err:
        return f"the docker CLI could not run ({err.strerror})"
    # Some clients exit 0 and print an error field when the engine is down: insist on a version.
    if proc.returncode == 0 and proc.stdout.strip() not in ("", '""', "null"):
        return None
    # The reason is on stderr; stdout then holds only the empty answer ('""').
    return diagnose(proc.stderr if proc.stderr.strip() else proc.stdout)


def diagnose(output: str) -> str:
    """One phrase for why the docker CLI could not reach an engine."""
    m = _SOCKET_DENIED.search(output)
    if m:
        return (f"permission denied on the Docker socket {m.group(1) or '/var/run/docker.sock'}: add your user "
                "to the docker group (sudo usermod -aG docker $USER, then log in again) or run as root")
    return f"no Docker engine reachable ({_last_line(output)}); start Docker or set DOCKER_HOST"


def engine_available(env: Mapping[str, str] | None = None, timeout: float = INFO_TIMEOUT) -> bool:
    """True when the docker CLI exists and `docker info` reaches an engine within `timeout`."""
    return engine_problem(env, timeout) is None


def image_id(ref: str, env: Mapping[str, str] | None = None) -> str:
    """The engine's ID ("sha256:...") for an image reference or ID."""
    proc = run(["image", "inspect", "--format", "{{.Id}}", ref], env, INFO_TIMEOUT * 3)
    if proc.returncode != 0:
        raise TracejailError(f"docker cannot find image {ref}: {_last_line(proc.stderr)}")
    return proc.stdout.strip()


def parse_load_output(output: str) -> tuple[list[str], list[str]]:
    """Names and IDs reported by `docker load` ("Loaded image: x:y" / "Loaded image ID: sha256:...")."""
    return _LOADED_NAME.findall(output), _LOADED_ID.findall(output)


def load(archive: str, tags: Sequence[str] | str | None = None, env: Mapping[str, str] | None = None) -> str:
    """`docker load -i archive`, tag the result with every name in `tags` that the archive did not
    already name; return its image ID.

    Raises TracejailError with docker's own last error line when the engine refuses.
    """
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    try:
        proc = run(["load", "-i", archive], env, LOAD_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise TracejailError(f"docker load of {archive} did not finish in {LOAD_TIMEOUT:.0f} s; check the engine") from None
    if proc.returncode != 0:
        detail = proc.stderr or proc.stdout
        if "Cannot connect" in detail or "daemon running" in detail or _SOCKET_DENIED.search(detail):
            raise TracejailError(diagnose(detail))
        raise TracejailError(f"docker load refused {archive}: {_last_line(detail)}")
    names, ids = parse_load_output(proc.stdout)
    if ids:
        loaded = ids[-1]
    elif names:
        loaded = names[-1]
    else:
        raise TracejailError(f"docker load of {archive} reported no image: {_last_line(proc.stdout + proc.stderr)}")
    ident = image_id(loaded, env)
    for tag in tags:
        if any(_same_name(tag, n) for n in names):
            continue
        tagged = run(["tag", ident, tag], env, INFO_TIMEOUT * 3)
        if tagged.returncode != 0:
            raise TracejailError(f"docker could not tag {ident} as {tag}: {_last_line(tagged.stderr)}")
    return ident


def _same_name(wanted: str, loaded: str) -> bool:
    """Compare names the way docker shows them (app == app:latest == docker.io/library/app:latest)."""
    def norm(name: str) -> str:
        if ":" not in name.rsplit("/", 1)[-1]:
            name += ":latest"
        for prefix in ("docker.io/library/", "docker.io/"):
            if name.startswith(prefix):
                return name[len(prefix):]
        return name
    return norm(wanted) == norm(loaded)
