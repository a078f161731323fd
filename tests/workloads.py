"""Sample workloads for end-to-end tests (a helper module, not a test file).

Each workload lives in ``sample_workloads/<name>/`` with its app, a README.md
and ``expected_output.txt``. Typical use::

    from tests.workloads import all_workloads, prepare, run_on_host

    for w in all_workloads():
        prepare(w, cache_dir)                     # make / venv set-up, idempotent
        assert run_on_host(w) == w.expected_output

Conventions:

* ``command`` is the argv to hand to ``tracejail record -- ...``; it must be run
  with the working directory set to ``w.dir`` (paths in it are relative to it).
  Stdlib Python workloads use plain ``python3`` (whatever is on PATH); venv
  workloads use ``.venv/bin/python``.
* For servers (``port`` is not None) the output to compare is the
  concatenation of the stdout of each exercise (``/bin/sh -c`` on the host),
  each followed by a newline. The server itself prints nothing to stdout.
* Nothing writes into ``w.dir`` at run time, so a copy of a prepared folder
  (see :func:`copy_workload`) can be run by an unprivileged user.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

WORKLOADS_ROOT = Path(__file__).resolve().parent.parent / "sample_workloads"

#: Seconds allowed for one plain run or one exercise on the host.
RUN_TIMEOUT = 60.0
#: Seconds allowed for a server to start listening.
LISTEN_TIMEOUT = 30.0
#: Seconds a server gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0

_VENV_STAMP = ".workload-ready"  # written by setup.sh inside .venv when complete


@dataclass(frozen=True)
class Workload:
    name: str
    dir: Path
    command: list[str]  # argv for `tracejail record -- ...`, run with cwd=dir
    exercises: list[str]  # shell commands run on the host; empty for plain runs
    port: int | None  # TCP port a server listens on (0.0.0.0); None for plain runs
    expected_output: str

    @property
    def is_server(self) -> bool:
        return self.port is not None

    @property
    def uses_venv(self) -> bool:
        return (self.dir / "setup.sh").is_file()

    @property
    def uses_make(self) -> bool:
        return (self.dir / "Makefile").is_file()


# name -> (command, exercises, port)
_SPECS: dict[str, tuple[list[str], list[str], int | None]] = {
    "python-cli": (["python3", "app.py"], [], None),
    "python-web": (
        ["python3", "server.py", "--port", "8000"],
        [
            "curl -s localhost:8000/",
            "curl -s 'localhost:8000/hash?text=abc'",
            "curl -s localhost:8000/items",
        ],
        8000,
    ),
    "flask-venv": (
        [".venv/bin/python", "app.py", "--port", "8001"],
        [
            "curl -s localhost:8001/",
            "curl -s localhost:8001/api/books",
            "curl -s localhost:8001/api/books/1",
        ],
        8001,
    ),
    "numpy-venv": ([".venv/bin/python", "app.py"], [], None),
    "matplotlib-venv": ([".venv/bin/python", "app.py"], [], None),
    "c-plugin": (["./main", "upper,reverse,crc32", "Hello from tracejail"], [], None),
    "shell-pipeline": (["./report.sh"], [], None),
    "threads-subprocess": (["python3", "app.py"], [], None),
}


def _load(name: str, root: Path) -> Workload:
    command, exercises, port = _SPECS[name]
    wdir = root / name
    return Workload(
        name=name,
        dir=wdir,
        command=list(command),
        exercises=list(exercises),
        port=port,
        expected_output=(wdir / "expected_output.txt").read_text(encoding="utf-8"),
    )


def all_workloads() -> list[Workload]:
    """Every sample workload, in a fixed order."""
    return [_load(name, WORKLOADS_ROOT) for name in _SPECS]


def get_workload(name: str) -> Workload:
    """One workload by folder name (KeyError if unknown)."""
    if name not in _SPECS:
        raise KeyError(f"unknown workload {name!r}; known: {', '.join(_SPECS)}")
    return _load(name, WORKLOADS_ROOT)


def copy_workload(w: Workload, dest: Path) -> Workload:
    """Copy w's folder to *dest* (must not exist) and return the copy.

    The venv (.venv) and __pycache__ folders are left out: run
    :func:`prepare` on the copy (with a cache_dir it is a quick hard-link
    copy). Built C artefacts are copied as they are (a plain build runs
    from anywhere). The copy's folders keep their modes (0755), but *dest*'s
    parents must be traversable by whoever runs it.
    """
    shutil.copytree(w.dir, dest, symlinks=True, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
    return dataclasses.replace(w, dir=Path(dest))


# --------------------------------------------------------------------------
# prepare


def prepare(w: Workload, cache_dir: Path | None = None) -> None:
    """Build what *w* needs (C artefacts, venv); quick when already done.

    Venv workloads: without *cache_dir* ``setup.sh`` builds ``w.dir/.venv``
    (it does nothing when that venv is complete). With *cache_dir* the venv
    is built once under it, keyed by requirements.txt, setup.sh and the base
    interpreter, and ``w.dir/.venv`` becomes a copy of it (hard links where
    possible) — a real directory, not a symlink.
    """
    if w.uses_make:
        _run_checked(["make", "--no-print-directory", "-s"], cwd=w.dir, what=f"{w.name}: make")
    if w.uses_venv:
        if cache_dir is None:
            _run_checked(["sh", "setup.sh"], cwd=w.dir, what=f"{w.name}: setup.sh")
        else:
            _prepare_venv_from_cache(w, Path(cache_dir))


def _prepare_venv_from_cache(w: Workload, cache_dir: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _venv_cache_key(w)
    cached = cache_dir / f"{w.name}-{key}"
    with _locked(cache_dir / f"{w.name}-{key}.lock"):
        cached.mkdir(exist_ok=True)
        for fname in ("setup.sh", "requirements.txt"):
            shutil.copy2(w.dir / fname, cached / fname)
        _run_checked(["sh", "setup.sh"], cwd=cached, what=f"{w.name}: setup.sh (cache)")
        stamp = (cached / ".venv" / _VENV_STAMP).read_text()
        target = w.dir / ".venv"
        target_stamp = target / _VENV_STAMP
        if target.is_dir() and target_stamp.is_file() and target_stamp.read_text() == stamp:
            return
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        tmp = w.dir / ".venv.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(cached / ".venv", tmp, symlinks=True, copy_function=_link_or_copy)
        tmp.rename(target)


def _venv_cache_key(w: Workload) -> str:
    base = os.environ.get("PYTHON", "python3")
    ident = subprocess.run(
        [base, "-c", "import sys; print(sys.executable); print(sys.version)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    h = hashlib.sha256(ident.encode())
    for fname in ("setup.sh", "requirements.txt"):
        h.update((w.dir / fname).read_bytes())
    return h.hexdigest()[:16]


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_checked(argv: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")


# --------------------------------------------------------------------------
# running on the host (untraced)


def run_on_host(w: Workload) -> str:
    """Run *w* untraced from ``w.dir`` and return the output to compare.

    Plain runs: the command's stdout (a non-zero exit raises RuntimeError).
    Servers: start the command, wait until 127.0.0.1:port accepts, run each
    exercise with /bin/sh -c, stop the server with SIGTERM; the result is the
    exercises' stdouts each followed by a newline. A busy port, a server
    that dies early, a failing exercise or a non-zero server exit raises.
    """
    if not w.is_server:
        proc = subprocess.run(
            w.command, cwd=w.dir, capture_output=True, encoding="utf-8", timeout=RUN_TIMEOUT
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{w.name}: exit {proc.returncode}\nstderr:\n{proc.stderr}")
        return proc.stdout
    return _run_server(w)


def _run_server(w: Workload) -> str:
    assert w.port is not None
    if port_open(w.port):
        raise RuntimeError(f"{w.name}: port {w.port} is already in use")
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as out, tempfile.TemporaryFile(
        mode="w+", encoding="utf-8"
    ) as err:
        server = subprocess.Popen(
            w.command, cwd=w.dir, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True
        )

        def server_logs() -> str:
            out.seek(0)
            err.seek(0)
            return f"server stdout:\n{out.read()}\nserver stderr:\n{err.read()}"

        output = []
        try:
            wait_for_port(w.port, LISTEN_TIMEOUT, server)
            for exercise in w.exercises:
                proc = subprocess.run(
                    ["/bin/sh", "-c", exercise],
                    cwd=w.dir,
                    capture_output=True,
                    encoding="utf-8",
                    timeout=RUN_TIMEOUT,
                )
                if proc.returncode != 0:
                    raise RuntimeError(
                        f"{w.name}: exercise {exercise!r} exited {proc.returncode}\n{proc.stderr}\n{server_logs()}"
                    )
                output.append(proc.stdout + "\n")
        except BaseException as exc:
            _kill(server)
            if isinstance(exc, RuntimeError) and "server stderr" not in str(exc):
                raise RuntimeError(f"{exc}\n{server_logs()}") from exc
            raise
        rc = stop_server(server)
        if rc != 0:
            raise RuntimeError(f"{w.name}: server exited {rc} after SIGTERM\n{server_logs()}")
        out.seek(0)
        if out.read():
            raise RuntimeError(f"{w.name}: server wrote to stdout\n{server_logs()}")
    return "".join(output)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until 127.0.0.1:port accepts; raise if *proc* exits first or on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on port {port}")
        time.sleep(0.05)
    raise RuntimeError(f"nothing listened on port {port} within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM *proc*, wait for it (SIGKILL its group after STOP_TIMEOUT); return its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill(proc)
    return proc.wait()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: started with start_new_session
        proc.wait()
