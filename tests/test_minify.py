"""`tracejail minify`: a fat Debian python3 image made small, end to end with a real engine: the
image's own files only, its config kept, the same output, verified by replay (minify.py)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from images import docker_build, import_python3_base
from tracejail import jail, registry

TJ = [sys.executable, "-m", "tracejail"]
PORT = 8012

CLI = """\
import decimal, email.mime.text, json, os, sys
print(json.dumps({"args": sys.argv[1:], "motd": open("/etc/motd").read().strip(),
                  "mode": os.environ.get("APP_MODE"), "home": os.environ.get("HOME"), "uid": os.getuid(),
                  "sum": str(decimal.Decimal("1.1") + decimal.Decimal("2.2")),
                  "host_only": os.path.exists(os.environ["HOST_ONLY"])}, sort_keys=True))
"""

SERVER = f"""\
import http.server, json
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({{"path": self.path, "motd": open("/etc/motd").read().strip()}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("0.0.0.0", {PORT}), Handler).serve_forever()
"""


def dockerfile(base: str, host_only: str) -> str:
    return f"""\
FROM {base}
COPY app /app
RUN printf 'motd of the image\\n' > /etc/motd && useradd -m -u 1000 appuser && chown -R appuser /app \\
 && printf 'Package: tj-fat-app\\nStatus: install ok installed\\nArchitecture: all\\nVersion: 4.2-1\\nMaintainer: t <t@example.org>\\nDescription: the app, as a package of the image only\\n\\n' >> /var/lib/dpkg/status \\
 && echo /app/cli.py > /var/lib/dpkg/info/tj-fat-app.list
USER appuser
WORKDIR /app
ENV APP_MODE=production HOST_ONLY={host_only}
LABEL org.example.app=fat
EXPOSE {PORT}
STOPSIGNAL SIGINT
CMD ["python3", "/app/cli.py", "hello"]
"""


@pytest.fixture(scope="module")
def fat(docker_engine, tmp_path_factory: pytest.TempPathFactory):   # noqa: ANN001, ANN201
    """(engine, the fat image's tag, a host-only path): a debootstrap base with python3 and an app,
    built with a real `docker build`."""
    if os.geteuid() != 0:
        pytest.skip("minify tests need root (debootstrap, the private engine)")
    problem = jail.check_available()
    if problem:
        pytest.skip(f"minify records in tracejail's sandbox: {problem}")
    base = import_python3_base(docker_engine)
    context = tmp_path_factory.mktemp("fat")
    (context / "app").mkdir()
    (context / "app" / "cli.py").write_text(CLI)
    (context / "app" / "server.py").write_text(SERVER)
    host_only = context / "host-only"
    host_only.write_text("a file of this host\n")
    docker_build(docker_engine, context, "tracejail-test-fat:1", dockerfile(base, str(host_only)))
    yield docker_engine, "tracejail-test-fat:1", host_only
    for tag in ("tracejail-test-fat:1", "tracejail-test-fat:min", "tracejail-test-fat:server-min"):
        docker_engine.run("rmi", "-f", tag, check=False)


def tj(engine, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:   # noqa: ANN001
    env = {**os.environ, **engine.env}
    return subprocess.run([*TJ, *args], capture_output=True, text=True, timeout=900, env=env, cwd=cwd)


def archive_file(archive: Path, path: str) -> bytes | None:
    """A file's content in the image in `archive`, its layers applied in order."""
    img, _ = registry.read_image(str(archive))
    found = None
    for layer in img.layers:
        with tarfile.open(fileobj=io.BytesIO(b"".join(layer.blob.chunks())), mode="r:*") as tar:
            for member in tar:
                if member.name.lstrip("./") == path.lstrip("/") and member.isreg():
                    found = tar.extractfile(member).read()   # type: ignore[union-attr]
    return found


def test_a_fat_python_image_is_minified_with_identical_output(fat, tmp_path: Path) -> None:   # noqa: ANN001
    engine, tag, host_only = fat
    out = tj(engine, "minify", tag, "-t", "tracejail-test-fat:min", "--trace", str(tmp_path / "t.json"),
             "-o", str(tmp_path / "min.tar"), "--sbom", str(tmp_path / "sbom.json"), "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["passed"] and summary["verified"]["passed"]
    # The goal: at most a quarter of the original, in files and compressed.
    assert summary["ratio"]["content"] <= 0.25, summary["ratio"]
    assert summary["ratio"]["compressed"] <= 0.25, summary["ratio"]
    original = engine.run("run", "--rm", tag).stdout
    minified = engine.run("run", "--rm", "tracejail-test-fat:min").stdout
    assert minified == original and json.loads(original)["motd"] == "motd of the image"
    assert json.loads(original)["host_only"] is False and host_only.exists()
    # Package metadata from the image's own dpkg database (the host has no such package).
    packages = {p["name"]: p.get("versionInfo") for p in json.loads((tmp_path / "sbom.json").read_text())["packages"]}
    assert packages.get("tj-fat-app") == "4.2-1", sorted(packages)
    assert archive_file(tmp_path / "min.tar", "/var/lib/dpkg/status.d/tj-fat-app") is not None
    # The image's own /etc/motd, not this host's; the host-only file nowhere.
    assert archive_file(tmp_path / "min.tar", "/etc/motd") == b"motd of the image\n"
    assert archive_file(tmp_path / "min.tar", str(host_only)) is None
    cfg = json.loads(engine.run("image", "inspect", "-f", "{{json .Config}}", "tracejail-test-fat:min").stdout)
    assert cfg["User"] == "1000:1000" and cfg["WorkingDir"] == "/app"
    assert cfg["Cmd"] == ["python3", "/app/cli.py", "hello"] and not cfg.get("Entrypoint")
    assert "APP_MODE=production" in cfg["Env"] and cfg["Labels"]["org.example.app"] == "fat"
    assert f"{PORT}/tcp" in cfg["ExposedPorts"] and cfg["StopSignal"] == "SIGINT"
    # `docker run IMAGE ARGS` replaces Cmd, as in the original.
    again = engine.run("run", "--rm", "tracejail-test-fat:min", "python3", "/app/cli.py", "other").stdout
    assert json.loads(again)["args"] == ["other"]
    # The same image read from a `docker save` archive is the same source.
    engine.run("save", "-o", str(tmp_path / "fat.tar"), tag)
    rec = tj(engine, "record", "--image", str(tmp_path / "fat.tar"), "-o", str(tmp_path / "t2.json"), cwd=tmp_path)
    assert rec.returncode == 0, rec.stderr
    first = json.loads((tmp_path / "t.json").read_text())["source"]
    second = json.loads((tmp_path / "t2.json").read_text())["source"]
    assert first["image_id"] == second["image_id"] and first["rootfs"] == second["rootfs"]


def test_a_server_image_is_minified_and_its_exercise_replayed(fat, tmp_path: Path) -> None:   # noqa: ANN001
    engine, tag, _ = fat
    out = tj(engine, "minify", tag, "-t", "tracejail-test-fat:server-min", "--exercise",
             f"curl -fsS localhost:{PORT}/hello", "--progress", "plain", "--", "python3", "/app/server.py",
             cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "verified: PASS" in out.stdout and "1/1 exercises passed" in out.stdout
    cfg = json.loads(engine.run("image", "inspect", "-f", "{{json .Config}}",
                                "tracejail-test-fat:server-min").stdout)
    # COMMAND replaced Cmd: the new image's default is the recorded command.
    assert cfg["Entrypoint"] == ["/usr/bin/python3.11"] or cfg["Cmd"][-1] == "/app/server.py"


def test_minify_refuses_a_run_that_failed(fat, tmp_path: Path) -> None:   # noqa: ANN001
    engine, tag, _ = fat
    out = tj(engine, "minify", tag, "-t", "tracejail-test-fat:never", "--", "python3", "-c", "raise SystemExit(3)",
             cwd=tmp_path)
    assert out.returncode == 1 and "did not succeed" in out.stderr and "nothing was built" in out.stderr
    assert engine.run("image", "inspect", "tracejail-test-fat:never", check=False).returncode != 0
