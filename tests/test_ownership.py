"""The image user can do what the recorded run did: programs that write, recorded as root and as
an ordinary user, then run from their images as the default user (65532)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import workloads as wl
from tracejail import build as tjbuild
from tracejail import ownership
from tracejail import trace as tr
from tracejail.root import Root

TJ = [sys.executable, "-m", "tracejail"]
PY = "/usr/bin/python3"     # a Python both root and an ordinary user can run

SQLITE_APP = """\
import logging, os, sqlite3
here = os.path.dirname(os.path.abspath(__file__))
logging.basicConfig(filename=os.path.join(here, "data", "app.log"), level=logging.INFO)
db = sqlite3.connect(os.path.join(here, "data", "app.db"))
db.execute("create table if not exists hits (n integer)")
db.execute("insert into hits values (1)")
db.commit()
logging.info("hit")
print("rows:", "many" if db.execute("select count(*) from hits").fetchone()[0] > 0 else "none")
"""

CACHE_APP = """\
import json, os
cache = os.path.join(os.path.expanduser("~"), ".cache", "tj-demo")
os.makedirs(cache, exist_ok=True)
with open(os.path.join(cache, "state.json"), "w") as f:
    json.dump({"ok": True}, f)
print("cached in ~/.cache/tj-demo")
"""

CODEC_APP = """\
import sys
codec = sys.argv[1]
print(codec, "h\\u00e9llo w\\u00f6rld".encode(codec).decode(codec))
"""

ETC_APP = """\
with open("/etc/tj-demo.conf", "a") as f:
    f.write("seen\\n")
print("configured")
"""

SERVER_APP = """\
import http.server, os, sys
log = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "requests.log")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(log, "a") as f:
            f.write(self.path + "\\n")
        with open(log) as f:
            body = f"requests so far: {'some' if f.read() else 'none'}\\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""


def make_app(where: Path, source: str, name: str = "app.py") -> Path:
    app = where / "app"
    (app / "data").mkdir(parents=True)
    (app / name).write_text(textwrap.dedent(source))
    return app


def record(app: Path, argv: list[str], out: Path, as_nobody, home: Path, exercises: tuple[str, ...] = (),
           port: int | None = None, chown: list[Path] | None = None) -> None:
    """Record `argv` from `app` as root or as nobody; for nobody the test's files become
    nobody's (`chown`: these directories, by default the whole test place)."""
    args = ["record", "-o", str(out)]
    for ex in exercises:
        args += ["--exercise", ex]
    if port:
        args += ["--ready-port", str(port)]
    args += ["--", *argv]
    if as_nobody is None:
        proc = subprocess.run([*TJ, *args], capture_output=True, text=True, cwd=app, timeout=300,
                              env={**os.environ, "HOME": str(home)})
    else:
        subprocess.run(["chown", "-R", "65534:65534", *map(str, chown or [app.parent])], check=True)
        proc = as_nobody.run(*args, cwd=str(app), home=str(home))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(params=["root", "nobody"])
def recorder(request: pytest.FixtureRequest):
    """Who records: root, or an ordinary user (uid 65534)."""
    if request.param == "root":
        return None
    return request.getfixturevalue("unprivileged")


@pytest.fixture
def place(public_dir: str) -> Path:
    (Path(public_dir) / "home").mkdir()
    return Path(public_dir)


def build_and_run(engine, trace: Path, tag: str, *args: str, keep_image: bool = False, **opts) -> str:
    result = tjbuild.build(str(trace), tjbuild.BuildOptions(tags=[tag], output=str(trace.parent / "i.tar"),
                                                           docker_env=engine.env, compress_level=1, **opts))
    assert result.loaded_id and result.config.user == "65532:65532", result.warnings
    proc = engine.run("run", "--rm", tag, *args, check=False, timeout=120)
    if not keep_image:
        engine.run("rmi", "-f", tag, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.docker
def test_sqlite_app_writes_its_database_and_log(place: Path, recorder, docker_engine) -> None:
    app = make_app(place, SQLITE_APP)
    record(app, [PY, "app.py"], place / "t.json", recorder, place / "home")
    out = build_and_run(docker_engine, place / "t.json", "tj-own-sqlite:1")
    assert out == "rows: many\n"


@pytest.mark.docker
def test_git_log_in_a_repository_under_the_working_directory(place: Path, recorder, docker_engine) -> None:
    repo = place / "app"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x", "HOME": str(place / "home")}
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "commit", "-q", "--allow-empty", "-m", "first commit"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    record(repo, ["/usr/bin/git", "log", "--format=%s"], place / "t.json", recorder, place / "home")
    out = build_and_run(docker_engine, place / "t.json", "tj-own-git:1")
    assert out == "first commit\n"   # no "dubious ownership": the repository is the image user's


@pytest.mark.docker
def test_app_writing_under_its_home_cache(place: Path, recorder, docker_engine) -> None:
    home = place / "home"
    (home / ".cache").mkdir()
    app = make_app(place, CACHE_APP)
    record(app, [PY, "app.py"], place / "t.json", recorder, home)
    trace = tr.load(str(place / "t.json"))
    assert trace.runs[0].environment["HOME"] == str(home)
    out = build_and_run(docker_engine, place / "t.json", "tj-own-cache:1")
    assert out == "cached in ~/.cache/tj-demo\n"


@pytest.mark.docker
def test_server_appending_a_file_on_each_request(place: Path, recorder, docker_engine) -> None:
    port = 18733
    app = make_app(place, SERVER_APP)
    url = f"curl -sf localhost:{port}/hello"
    record(app, [PY, "app.py", str(port)], place / "t.json", recorder, place / "home", (url, url), port)
    tag = "tj-own-server:1"
    result = tjbuild.build(str(place / "t.json"), tjbuild.BuildOptions(
        tags=[tag], output=str(place / "i.tar"), docker_env=docker_engine.env, compress_level=1))
    assert result.loaded_id
    name = f"tj-own-server-{os.getpid()}"
    docker_engine.run("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:{port}", tag)
    try:
        deadline = time.time() + 30
        while (got := subprocess.run(["sh", "-c", url], capture_output=True, text=True)).returncode != 0:
            logs = docker_engine.run("logs", name, check=False)
            assert time.time() < deadline, logs.stdout + logs.stderr
            time.sleep(0.2)
        assert got.stdout == "requests so far: some\n"
    finally:
        docker_engine.run("rm", "-f", name, check=False)
        docker_engine.run("rmi", "-f", tag, check=False)


@pytest.mark.docker
def test_a_codec_named_by_the_input_that_the_recording_never_used(place: Path, docker_engine) -> None:
    app = make_app(place, CODEC_APP)
    record(app, [PY, "app.py", "latin-1"], place / "t.json", None, place / "home")
    trace = tr.load(str(place / "t.json"))
    assert not any("utf_16_be" in p for p in trace.files)
    # The image's entrypoint is the recorded command; here the codec comes from `docker run`.
    entrypoint = [trace.runs[0].executable, "app.py"]
    out = build_and_run(docker_engine, place / "t.json", "tj-own-codec:1", "utf-16-be", entrypoint=entrypoint)
    assert out == "utf-16-be h\u00e9llo w\u00f6rld\n"


@pytest.mark.docker
def test_matplotlib_finds_its_fonts_even_when_it_rebuilds_the_font_list(place: Path, recorder, docker_engine,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The recording reads a warm font cache under its HOME. In the image that HOME is the image
    user's, so the cache is found; and where it is not (another MPLCONFIGDIR), matplotlib rebuilds
    the font list with the utf-16-be codec that only the encodings family brings."""
    monkeypatch.setenv("PYTHON", PY)    # a venv an ordinary user can run (python3 may be under /root)
    w = wl.copy_workload(wl.get_workload("matplotlib-venv"), place / "app")
    try:
        wl.prepare(w, cache_dir=Path(os.environ.get("TRACEJAIL_TEST_VENVS", "/var/tmp/tracejail-test-venvs")))
    except RuntimeError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"matplotlib-venv could not be prepared: {str(exc).splitlines()[0]}")
    home, traces = place / "home", place / "traces"
    traces.mkdir()
    for _ in range(2):   # the first run writes the font cache, the second (kept) one only reads it
        # (not chown -R of the place: the venv's files are hard links into the shared cache)
        record(w.dir, w.command, traces / "t.json", recorder, home, chown=[home, traces])
    trace = tr.load(str(traces / "t.json"))
    cache = [p for p in trace.files if p.startswith(str(home / ".cache/matplotlib/fontlist"))]
    assert cache and not any(trace.files[p].created_by_run for p in cache)
    assert not any(p.endswith("utf_16_be.py") for p in trace.files)
    fresh = ["-e", f"MPLCONFIGDIR={home}/fresh"]
    assert build_and_run(docker_engine, traces / "t.json", "tj-own-mpl:1", keep_image=True) == w.expected_output
    out = docker_engine.run("run", "--rm", *fresh, "tj-own-mpl:1", check=False, timeout=120)
    docker_engine.run("rmi", "-f", "tj-own-mpl:1", check=False)
    assert out.returncode == 0 and out.stdout == w.expected_output, out.stderr
    assert "findfont" not in out.stderr
    # The family is what makes that work: without it, the rebuilt font list is empty.
    result = tjbuild.build(str(traces / "t.json"), tjbuild.BuildOptions(
        tags=["tj-own-mpl:2"], output=str(traces / "i.tar"), docker_env=docker_engine.env, compress_level=1,
        families_off=("python-encodings",)))
    assert result.loaded_id
    out = docker_engine.run("run", "--rm", *fresh, "tj-own-mpl:2", check=False, timeout=120)
    docker_engine.run("rmi", "-f", "tj-own-mpl:2", check=False)
    assert out.returncode != 0 and "Failed to find font" in out.stderr, out.stdout + out.stderr


def _needs_jail() -> None:
    from tracejail import jail

    if jail.check_available():
        pytest.skip(f"no jail here: {jail.check_available()}")


SITE_APP = """\
import os, shutil
shutil.rmtree("site", ignore_errors=True)
os.makedirs("site/css")
with open("site/css/style.css", "w") as f:
    f.write("p { color: red }")
with open("site/index.html", "w") as f:
    f.write("<p>hello</p>")
print(sorted(os.listdir("site")), sorted(os.listdir("site/css")))
"""


def test_a_tool_that_replaces_its_output_directory(place: Path, recorder) -> None:
    """mkdocs and sphinx remove their output tree and write it again. The recording found the
    tree from an earlier run: the image leaves it out (the run makes it) but keeps the directory
    it lives in, the image user's; in the sandbox's overlay a directory removed and made again
    works as in Docker's."""
    _needs_jail()
    app = make_app(place, SITE_APP)
    for _ in range(2):    # the second recording removes the site the first one wrote
        record(app, [PY, "app.py"], place / "t.json", recorder, place / "home")
    trace = tr.load(str(place / "t.json"))
    assert trace.files[str(app / "site")].removed_by_run
    built = subprocess.run([*TJ, "build", str(place / "t.json"), "--rootfs", str(place / "rootfs"), "--no-load"],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    staged = place / "rootfs" / str(app).lstrip("/")
    assert os.stat(staged).st_uid == 65532 and not (staged / "site").exists()
    proc = subprocess.run([*TJ, "verify", str(place / "t.json"), "--rootfs", str(place / "rootfs")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and over a tree that still holds the old output (rm -rf of a lower directory, then mkdir)
    shutil.copytree(app / "site", staged / "site")
    subprocess.run(["chown", "-R", "65532:65532", str(staged / "site")], check=True)
    proc = subprocess.run([*TJ, "verify", str(place / "t.json"), "--rootfs", str(place / "rootfs")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_verify_read_only_lists_what_must_be_writable(place: Path) -> None:
    _needs_jail()
    app = make_app(place, SQLITE_APP)
    record(app, [PY, "app.py"], place / "t.json", None, place / "home")
    for volumes, expected in (([], 1), (["--writable-volumes"], 0)):
        shutil.rmtree(place / "rootfs", ignore_errors=True)
        built = subprocess.run([*TJ, "build", str(place / "t.json"), "--rootfs", str(place / "rootfs"),
                                "--no-load", *volumes], capture_output=True, text=True, timeout=300)
        assert built.returncode == 0, built.stderr
        proc = subprocess.run([*TJ, "verify", str(place / "t.json"), "--rootfs", str(place / "rootfs"),
                               "--read-only"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == expected, proc.stdout + proc.stderr
        if expected:
            assert f"read-only: these must be writable: {app}/data;" in proc.stdout
            assert "EROFS" in proc.stdout
        else:
            assert f'VOLUME ["{app}/data"]' in (place / "Dockerfile").read_text()


def test_a_permission_miss_is_named_and_fix_repairs_it(place: Path) -> None:
    """A run that writes a file under /etc (a system location: build keeps it root's): verify
    names the permission miss, --fix records the ownership in the trace and rebuilds."""
    _needs_jail()
    if os.geteuid() != 0:
        pytest.skip("needs root to write under /etc on the host")
    app = make_app(place, ETC_APP)
    conf = Path("/etc/tj-demo.conf")
    conf.write_text("")
    try:
        record(app, [PY, "app.py"], place / "t.json", None, place / "home")
    finally:
        conf.unlink()
    conf.write_text("")   # the build stages it as the recording found it
    try:
        assert subprocess.run([*TJ, "build", str(place / "t.json"), "--rootfs", str(place / "rootfs"),
                               "--no-load"], capture_output=True, timeout=300).returncode == 0
        proc = subprocess.run([*TJ, "verify", str(place / "t.json"), "--rootfs", str(place / "rootfs")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1
        assert "permission misses (the recorded run could, the image user cannot):" in proc.stdout
        assert "/etc/tj-demo.conf  (openat EACCES" in proc.stdout
        assert "/etc/tj-demo.conf must belong to the image user" in proc.stdout
        fixed = subprocess.run([*TJ, "verify", str(place / "t.json"), "--rootfs", str(place / "rootfs"), "--fix",
                                "--json"], capture_output=True, text=True, timeout=300)
        report = json.loads(fixed.stdout)
        assert fixed.returncode == 0 and report["passed"], fixed.stdout + fixed.stderr
        assert report["rounds"][0]["owned"] == ["/etc/tj-demo.conf"]
        rec = tr.load(str(place / "t.json")).files["/etc/tj-demo.conf"]
        assert rec.owner == "image-user" and "EACCES" in (rec.reason or "")
        assert os.stat(place / "rootfs/etc/tj-demo.conf").st_uid == 65532
    finally:
        conf.unlink()


# --- the rules themselves -----------------------------------------------------------------------

def _trace(cwd: str, home: str, uid: int = 0) -> tr.Trace:
    run = tr.Run(argv=["/usr/bin/python3", "app.py"], executable="/usr/bin/python3", cwd=cwd, uid=uid, gid=uid,
                 environment={"HOME": home}, started="2026-11-29T00:00:00Z", exit_code=0)
    return tr.Trace(runs=[run])


def test_rules_give_the_run_what_it_wrote_and_keep_the_system(tmp_path: Path) -> None:
    t = tmp_path / "root"
    for d in ("srv/app/data", "etc", "usr/lib", "home/u/.cache", "var/log", "tmp"):
        (t / d).mkdir(parents=True)
    (t / "tmp").chmod(0o1777)
    for f in ("srv/app/app.py", "srv/app/data/db", "etc/app.conf", "usr/lib/libx.so", "var/log/pkg.log",
              "home/u/.cache/x"):
        (t / f).write_text("x")
    trace = _trace("/srv/app", "/home/u")
    trace.record("/srv/app/app.py").add("read", "openat", "ok", 1)
    trace.record("/srv/app/data/db").add("write", "openat", "ok", 1)
    journal = trace.record("/srv/app/data/db-journal")
    journal.add("write", "openat", "ok", 1)
    journal.created_by_run = journal.removed_by_run = True
    trace.record("/etc/app.conf").add("write", "openat", "ok", 1)
    trace.record("/var/log/pkg.log").add("write", "openat", "ok", 1)
    trace.record("/tmp/scratch").created_by_run = True
    trace.record("/tmp/scratch").add("write", "openat", "ok", 1)
    trace.record("/home/u/.cache/x").add("read", "openat", "ok", 1)
    kept = {"/srv", "/srv/app", "/srv/app/app.py", "/srv/app/data", "/srv/app/data/db", "/etc", "/etc/app.conf",
            "/usr", "/usr/lib", "/usr/lib/libx.so", "/var", "/var/log", "/var/log/pkg.log", "/tmp", "/home",
            "/home/u", "/home/u/.cache", "/home/u/.cache/x"}
    own = ownership.compute(trace, Root(str(t)), kept, package_owned=lambda p: p == "/var/log/pkg.log")
    assert set(own.owned) == {"/srv/app", "/srv/app/app.py", "/srv/app/data", "/srv/app/data/db", "/home/u"}
    assert own.owned["/srv/app/data"].startswith("the run created /srv/app/data/db-journal")
    assert own.owned["/srv/app/data/db"] == "the run opened it for writing"
    assert set(own.system) >= {"/etc/app.conf", "/var/log/pkg.log"}   # system files stay root's
    assert own.home == "/home/u" and own.written_dirs == ["/srv/app/data"]
    # a recording user's files become the image user's; a recorded owner is always honoured
    trace.runs[0].uid = os.stat(t / "srv/app/app.py").st_uid or 4321
    trace.record("/etc/app.conf").owner = "image-user"
    own = ownership.compute(trace, Root(str(t)), kept)
    assert "/etc/app.conf" in own.owned


def test_build_lists_and_explain_explains_every_ownership_change(place: Path) -> None:
    app = make_app(place, SQLITE_APP)
    for _ in range(2):    # the first run creates the database, the second (kept) one writes to it
        record(app, [PY, "app.py"], place / "t.json", None, place / "home")
    built = subprocess.run([*TJ, "build", str(place / "t.json"), "--rootfs", str(place / "rootfs"), "--no-load",
                            "--json"], capture_output=True, text=True, timeout=300)
    given = {g["path"]: g["why"] for g in json.loads(built.stdout)["owned_by_image_user"]}
    assert given[str(app / "data")].startswith("the run created ") and str(app / "app.py") in given
    assert given[str(app / "data/app.db")] == "the run opened it for writing"
    assert os.stat(place / "rootfs" / str(app / "data/app.db").lstrip("/")).st_uid == 65532
    assert all(not p.startswith(("/usr/", "/etc/")) for p in given)
    explain = [*TJ, "explain", str(place / "t.json"), "data/app.db", "/usr/bin/python3"]
    said = subprocess.run(explain, capture_output=True, text=True, timeout=300).stdout
    assert "belongs to the image user (65532:65532): the run opened it for writing" in said
    assert said.count("belongs to the image user") == 1     # not the interpreter
    for other in (["--keep-owners"], ["--user", "root"]):
        said = subprocess.run([*explain, *other], capture_output=True, text=True, timeout=300).stdout
        assert "in the image as a file" in said and "belongs to the image user" not in said
    kept = subprocess.run([*TJ, "build", str(place / "t.json"), "--rootfs", str(place / "kept"), "--no-load",
                           "--keep-owners", "--json"], capture_output=True, text=True, timeout=300)
    assert json.loads(kept.stdout)["owned_by_image_user"] == []
    assert os.stat(place / "kept" / str(app / "data/app.db").lstrip("/")).st_uid == os.stat(app / "data/app.db").st_uid


def test_no_family_offers_every_family() -> None:
    from tracejail import cli, families

    choices = next(o.type.choices for o in cli.main.commands["build"].params if o.name == "families_off")
    assert tuple(choices) == families.NAMES
