"""The static Python import closure: what kept modules import on paths the run did not take.

Unit tests on a made-up tree for the rules (what is followed, what may be added), then real
recordings: a CLI recorded on one path and run from its image on the other, a plugin loaded
through an entry point, a server verified on a request nobody recorded, and verify --import-check.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tracejail import pyimports
from tracejail import trace as tr
from tracejail.root import Root

TJ = [sys.executable, "-m", "tracejail"]
PY = "/usr/bin/python3"


def names(source: str, package: str = "pkg", *, is_script: bool = False) -> list[tuple[str, bool]]:
    return [(r.name, r.in_function) for r in pyimports.imports_of(textwrap.dedent(source), package,
                                                                    is_script=is_script)]


def test_imports_at_any_depth_relative_and_by_literal_name() -> None:
    found = names("""
        import os, xml.dom
        from . import sibling
        from ..up import thing
        from .sub import *
        try:
            import fast_json as json
        except ImportError:
            import json
        def later():
            import csv
            importlib.import_module("statistics")
            __import__("decimal")
            importlib.import_module(".rel", package="pkg")
        class C:
            from collections import OrderedDict
        """, package="pkg.inner")
    assert found == [
        ("os", False), ("xml.dom", False), ("pkg.inner", False), ("pkg.inner.sibling", False),
        ("pkg.up", False), ("pkg.up.thing", False), ("pkg.inner.sub", False),
        ("fast_json", False), ("json", False),
        ("csv", True), ("statistics", True), ("decimal", True), ("pkg.rel", True),
        ("collections", False), ("collections.OrderedDict", False),
    ]


def test_imports_that_never_run_on_linux_or_on_import_are_not_followed() -> None:
    source = """
        import sys, os
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            import only_for_mypy
        if sys.platform == "win32":
            import _winapi
        else:
            import _posixsubprocess
        if os.name != "nt":
            import posix_only
        if sys.platform.startswith("darwin"):
            import _scproxy
        if __name__ == "__main__":
            import argparse
        """
    got = [n for n, _ in names(source)]
    assert got == ["sys", "os", "typing", "typing.TYPE_CHECKING", "_posixsubprocess", "posix_only"]
    # The script a run started does run its __main__ block.
    assert "argparse" in [n for n, _ in names(source, is_script=True)]


def test_relative_import_beyond_the_top_package_is_nothing() -> None:
    assert names("from ... import x", package="pkg") == []


# --------------------------------------------------------------------------------------------
# The rules, on a made-up tree


def write(tree: Path, rel: str, text: str = "") -> None:
    p = tree / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))


def kept_trace(paths: list[str], argv: list[str], cwd: str, env: dict[str, str] | None = None) -> tr.Trace:
    run = tr.Run(argv=argv, executable=argv[0], cwd=cwd, uid=0, gid=0, environment=env or {},
                 started="2026-12-02T00:00:00Z", exit_code=0,
                 processes=[tr.ProcessInfo(100, None, argv, argv[0])])
    trace = tr.Trace(runs=[run])
    for p in paths:
        trace.record(p).add("read", "openat", tr.OK, 100)
    return trace


STD = "/usr/lib/python3.11"
SITE = "/venv/lib/python3.11/site-packages"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    t = tmp_path / "tree"
    write(t, f"{STD}/os.py")
    write(t, f"{STD}/lazy.py", "def f():\n    import onlycalled\n")
    write(t, f"{STD}/onlycalled.py", "import ontheway\ndef g():\n    import notfollowed\n")
    write(t, f"{STD}/ontheway.py", "import thirdparty\n")
    write(t, f"{STD}/notfollowed.py")
    write(t, f"{STD}/json/__init__.py", "from .decoder import JSONDecoder\n")
    write(t, f"{STD}/json/decoder.py")
    write(t, f"{STD}/json/__pycache__/decoder.cpython-311.pyc", "x")
    write(t, f"{STD}/lib-dynload/_fast.cpython-311-x86_64-linux-gnu.so", "\x7fELF")
    write(t, f"{SITE}/touched/__init__.py", "def h():\n    import untouched\n    from touched import later\n")
    write(t, f"{SITE}/touched/later.py")
    write(t, f"{SITE}/untouched.py", "import _fast\n")
    write(t, f"{SITE}/thirdparty/__init__.py")
    write(t, "/app/main.py", "import lazy, touched\ndef cmd():\n    import helpers\n    import missing_optional\n"
                              "if __name__ == '__main__':\n    import json\n")
    write(t, "/app/helpers.py", "def x():\n    import json\n    import thirdparty\n")
    write(t, "/app/unused.py", "import notfollowed\n")
    return t


def closure_of(tree: Path, **kw) -> dict[str, pyimports.Added]:
    kept = ["/app/main.py", f"{STD}/os.py", f"{STD}/lazy.py", f"{SITE}/touched/__init__.py", "/venv/bin/python3"]
    trace = kept_trace(kept, ["/venv/bin/python3", "main.py"], "/app")
    result = pyimports.closure(trace, kept, Root(str(tree)), **kw)
    return {a.name: a for a in result.added}


def test_closure_follows_the_rules(tree: Path) -> None:
    added = closure_of(tree)
    # The app's own modules, at any depth; what they import, stdlib or not.
    assert added["helpers"].importer == "/app/main.py" and added["helpers"].line == 3
    assert added["json"].files == (f"{STD}/json/__init__.py",)
    assert added["json.decoder"].files == (f"{STD}/json/decoder.py", f"{STD}/json/__pycache__/decoder.cpython-311.pyc")
    assert "thirdparty" in added and added["thirdparty"].importer == "/app/helpers.py"
    # A kept stdlib module's function-level import is followed; the added module's only on import.
    assert added["onlycalled"].importer == f"{STD}/lazy.py"
    assert "ontheway" in added and "notfollowed" not in added
    # A kept distribution's lazy import of another one: the kept module names it.
    assert added["untouched"].importer == f"{SITE}/touched/__init__.py"
    assert added["touched.later"].files == (f"{SITE}/touched/later.py",)
    # ...and what that one runs on import: an extension module.
    assert added["_fast"].files == (f"{STD}/lib-dynload/_fast.cpython-311-x86_64-linux-gnu.so",)
    # A module nobody imports is not added; an optional dependency that is not there is no error.
    assert "unused" not in added and "missing_optional" not in added
    assert "imported by /app/main.py at line 3, not exercised" in added["helpers"].reason()


def test_a_distribution_the_run_never_used_comes_only_by_a_kept_or_app_module(tree: Path) -> None:
    # ontheway (added from the stdlib) imports thirdparty: that alone does not bring it in.
    write(tree, "/app/helpers.py", "def x():\n    import json\n")
    added = closure_of(tree)
    assert "ontheway" in added and "thirdparty" not in added


def test_exclude_module_cuts_the_closure_there(tree: Path) -> None:
    added = closure_of(tree, exclude_modules=("helpers", "json"))
    assert "helpers" not in added and "json" not in added and "json.decoder" not in added
    assert "thirdparty" not in added      # only helpers brought it


# --------------------------------------------------------------------------------------------
# Real recordings

CLI = """\
import json, sys
import light

def report():
    import csv, io, statistics
    import helpers
    out = io.StringIO()
    csv.writer(out).writerow([statistics.mean([1, 2, 3]), helpers.total(["1.5", "2"])])
    return out.getvalue().strip()

if len(sys.argv) > 1 and sys.argv[1] == "report":
    print(report())
else:
    print(json.dumps({"count": light.count([1, 2, 3])}))
"""
HELPERS = ("from decimal import Decimal\ntry:\n    import tj_optional_not_installed\nexcept ImportError:\n"
           "    tj_optional_not_installed = None\n\ndef total(xs):\n    return str(sum(Decimal(x) for x in xs))\n")
LIGHT = "def count(xs):\n    return len(xs)\n"


def _needs_jail() -> None:
    from tracejail import jail

    if jail.check_available():
        pytest.skip(f"no jail here: {jail.check_available()}")


def run_in_tree(tree: Path, argv: list[str], cwd: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run argv in the staged tree, in the jail, as the image user."""
    from tracejail import jail

    spec = jail.JailSpec(rootfs=str(tree), workdir=jail.make_workdir(), argv=argv, env=env or {"PATH": "/usr/bin:/bin"},
                         cwd=cwd, uid=65532, gid=65532)
    proc = jail.JailProcess(spec)
    proc.start()
    try:
        code = proc.wait(120)
    finally:
        proc.stop(1)
    out, err, _ = proc.output()
    return code if code is not None else -1, out, err


def record(app: Path, argv: list[str], out: Path, *extra: str) -> None:
    proc = subprocess.run([*TJ, "record", "-o", str(out), *extra, "--", *argv], cwd=app, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def build_tree(trace: Path, dest: Path, *options: str) -> dict:
    proc = subprocess.run([*TJ, "build", str(trace), "--rootfs", str(dest), "--no-load", "--json", *options],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def cli_app(public_dir: str) -> tuple[Path, Path]:
    app = Path(public_dir) / "cli"
    app.mkdir()
    (app / "app.py").write_text(CLI)
    (app / "helpers.py").write_text(HELPERS)
    (app / "light.py").write_text(LIGHT)
    trace = Path(public_dir) / "t.json"
    record(app, [PY, "app.py"], trace)
    return app, trace


def test_a_cli_recorded_on_one_path_runs_on_another(cli_app, tmp_path: Path) -> None:
    _needs_jail()
    app, trace = cli_app
    summary = build_tree(trace, tmp_path / "with" / "rootfs")
    added = {a["module"]: a for a in summary["python_imports"]["added"]}
    assert added["helpers"]["imported_by"] == str(app / "app.py") and added["helpers"]["line"] == 6
    assert {"csv", "statistics", "decimal"} <= set(added)
    assert "tj_optional_not_installed" not in added       # an optional dependency that is not there
    assert summary["python_imports"]["bytes"] > 0
    code, out, err = run_in_tree(tmp_path / "with" / "rootfs", [PY, "app.py", "report"], str(app))
    assert (code, out) == (0, "2,3.5\n"), err
    # Without the closure the image has only what the recorded path needed.
    build_tree(trace, tmp_path / "without" / "rootfs", "--no-import-closure")
    code, out, err = run_in_tree(tmp_path / "without" / "rootfs", [PY, "app.py", "report"], str(app))
    assert code == 1 and "ModuleNotFoundError: No module named 'csv'" in err
    # explain says why, and verify --import-check imports every added module in the image.
    explained = subprocess.run([*TJ, "explain", str(trace), str(app / "helpers.py")], capture_output=True,
                               text=True, timeout=120)
    assert explained.returncode == 0, explained.stderr
    assert f"imported by {app}/app.py at line 6" in explained.stdout and "not exercised" in explained.stdout
    checked = subprocess.run([*TJ, "verify", str(trace), "--rootfs", str(tmp_path / "with" / "rootfs"), "--import-check"],
                             capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "module(s) the static import closure added all import in the image" in checked.stdout


def test_import_check_names_a_module_that_does_not_import(cli_app, tmp_path: Path) -> None:
    _needs_jail()
    app, trace = cli_app
    tree = tmp_path / "r"
    build_tree(trace, tree)
    (tree / str(app / "helpers.py").lstrip("/")).write_text("import no_such_module_in_the_image\n")
    checked = subprocess.run([*TJ, "verify", str(trace), "--rootfs", str(tree), "--import-check", "--json"],
                             capture_output=True, text=True, timeout=300)
    assert checked.returncode == 1, checked.stderr
    report = json.loads(checked.stdout)
    assert report["import_check"]["failed"] == {
        "helpers": "ModuleNotFoundError: No module named 'no_such_module_in_the_image'"}
    assert report["rounds"][-1]["passed"]


PLUGIN_APP = """\
import sys
from importlib.metadata import entry_points
for ep in entry_points(group="tj.plugins"):
    if ep.name == sys.argv[1]:
        print(ep.load()("Hello"))
"""


def test_a_plugin_declared_as_an_entry_point_is_kept(public_dir: str, tmp_path: Path) -> None:
    """Recorded with the `upper` plugin; the image runs with `lower`, which the run never loaded."""
    _needs_jail()
    place = Path(public_dir)
    subprocess.run([PY, "-m", "venv", "--without-pip", str(place / "venv")], check=True)
    site = next((place / "venv" / "lib").glob("python3*/site-packages"))
    dist = site / "tjplugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tjplugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[tj.plugins]\nupper = tjplug_upper:run\nlower = tjplug_lower:run\n\n"
                                          "[console_scripts]\ntjtool = tjplug_tool:main\n")
    (site / "tjplug_upper.py").write_text("def run(s):\n    return s.upper()\n")
    (site / "tjplug_lower.py").write_text("import textwrap\ndef run(s):\n    return textwrap.shorten(s.lower(), 40)\n")
    (site / "tjplug_tool.py").write_text("def main():\n    pass\n")
    app = place / "app"
    app.mkdir()
    (app / "app.py").write_text(PLUGIN_APP)
    python = str(place / "venv" / "bin" / "python")
    record(app, [python, "app.py", "upper"], place / "t.json")
    summary = build_tree(place / "t.json", tmp_path / "r")
    added = {a["module"]: a for a in summary["python_imports"]["added"]}
    assert added["tjplug_lower"]["via"] == "entry point lower in group tj.plugins of tjplugins"
    assert "tjplug_tool" not in added          # a console script is no plugin
    code, out, err = run_in_tree(tmp_path / "r", [python, "app.py", "lower"], str(app))
    assert (code, out) == (0, "hello\n"), err


SERVER = """\
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/stats":
            import statistics
            import report_helper
            body = report_helper.render(statistics.median([3, 1, 2]))
        else:
            body = "ok"
        data = (body + "\\n").encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
        self.wfile.write(data)
    def log_message(self, *a): pass
http.server.HTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""


@pytest.mark.docker
def test_a_server_answers_a_request_nobody_recorded(public_dir: str, docker_engine, tmp_path: Path) -> None:
    app = Path(public_dir) / "srv"
    app.mkdir()
    (app / "server.py").write_text(SERVER)
    (app / "report_helper.py").write_text("import fractions\ndef render(x):\n    return f'median {fractions.Fraction(x)}'\n")
    port = 8137
    trace = Path(public_dir) / "t.json"
    record(app, [PY, "server.py", str(port)], trace, "--exercise", f"curl -s localhost:{port}/",
           "--ready-port", str(port))
    tag = "tj-pyimports-server:latest"
    built = subprocess.run([*TJ, "build", str(trace), "-t", tag, "-o", str(tmp_path / "i.tar")],
                           capture_output=True, text=True, timeout=300, env={**os.environ, **docker_engine.env})
    assert built.returncode == 0, built.stderr
    name = f"tj-pyimports-{os.getpid()}"
    docker_engine.run("run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:{port}", tag)
    try:
        deadline = time.time() + 30
        while True:
            got = subprocess.run(["curl", "-s", f"localhost:{port}/stats"], capture_output=True, text=True)
            if got.returncode == 0 and got.stdout:
                break
            assert time.time() < deadline, "the server in the image did not answer"
            time.sleep(0.2)
        assert got.stdout == "median 2\n"
    finally:
        docker_engine.run("rm", "-f", name, check=False)
        docker_engine.run("rmi", "-f", tag, check=False)


def test_parse_cache_skips_unchanged_files_and_parses_changed_ones(tree: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    first = pyimports.ParseCache(str(cache_dir))
    kept = ["/app/main.py", f"{STD}/os.py", f"{STD}/lazy.py", f"{SITE}/touched/__init__.py"]
    trace = kept_trace(kept, ["/venv/bin/python3", "main.py"], "/app")
    before = {a.name for a in pyimports.closure(trace, kept, Root(str(tree)), cache=first).added}
    shards = cache_dir / f"pyimports-{pyimports.__version__}"
    assert oct(shards.stat().st_mode & 0o777) == "0o700"
    # One file of facts per directory parsed (/app, the standard library, site-packages...).
    assert len(list(shards.glob("*.json"))) >= 3
    # A second build reads what each file imports from the cache: a made-up entry proves it.
    second = pyimports.ParseCache(str(cache_dir))
    st = (tree / "app/helpers.py").stat()
    key = pyimports.ParseCache.key(str(tree), "/app/helpers.py", st, "imports  0")
    assert second.get(key) is not None
    second.put(key, [pyimports.ImportRef("only_in_the_cache", 1, False)])
    write(tree, f"{STD}/only_in_the_cache.py")
    got = {a.name for a in pyimports.closure(trace, kept, Root(str(tree)), cache=second).added}
    assert got == (before - {"thirdparty"}) | {"only_in_the_cache"}   # helpers now "imports" only that
    # A file that changed is parsed again, and its fact replaced rather than added beside it.
    write(tree, "/app/helpers.py", "def x():\n    import json\n    import notfollowed\n")
    third = pyimports.ParseCache(str(cache_dir))
    got = {a.name for a in pyimports.closure(trace, kept, Root(str(tree)), cache=third).added}
    assert "notfollowed" in got and "only_in_the_cache" not in got
    shard = json.loads((shards / f"{key.shard}.json").read_text())
    assert [slot for slot in shard if slot.startswith("helpers.py\0")] == [key.slot]
    # A cache directory others may write in is not used.
    cache_dir.chmod(0o777)
    assert pyimports.ParseCache(str(cache_dir)).get(key) is None


def test_parse_cache_reads_only_the_directories_a_build_asks_about(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in ("a/x.py", "b/y.py"):
        (tmp_path / name).write_text("import os\n")
    keys = {name: pyimports.ParseCache.key("/", f"{tmp_path}/{name}", (tmp_path / name).stat(), "imports  0")
            for name in ("a/x.py", "b/y.py")}
    writer = pyimports.ParseCache(str(cache_dir))
    for key in keys.values():
        writer.put(key, [pyimports.ImportRef("os", 1)])
    writer.save()
    shards = cache_dir / f"pyimports-{pyimports.__version__}"
    (shards / f"{keys['b/y.py'].shard}.json").write_text("not json")   # damaged: that directory only
    reader = pyimports.ParseCache(str(cache_dir))
    assert reader.get(keys["a/x.py"]) == [pyimports.ImportRef("os", 1)]
    assert reader.get(keys["b/y.py"]) is None
    assert list(reader._shards) == [keys["a/x.py"].shard, keys["b/y.py"].shard]
    reader.save()   # nothing changed: nothing written
    assert (shards / f"{keys['b/y.py'].shard}.json").read_text() == "not json"
    # The single file earlier versions kept goes at the next save.
    legacy = cache_dir / f"pyimports-{pyimports.__version__}.json"
    legacy.write_text("{}")
    reader.put(keys["a/x.py"], [])
    reader.save()
    assert not legacy.exists() and reader.get(keys["a/x.py"]) == []


BYTECODE_SOURCE = """\
import os
from . import sib
from .sub import thing, other
def f():
    import csv
class C:
    import json
"""


def test_bytecode_is_read_like_source(tmp_path: Path) -> None:
    import py_compile

    src, pyc = tmp_path / "m.py", tmp_path / "m.pyc"
    src.write_text(BYTECODE_SOURCE)
    py_compile.compile(str(src), str(pyc), doraise=True)
    from_source = pyimports.imports_of(BYTECODE_SOURCE, "pkg")
    assert pyimports.imports_of_bytecode(pyc.read_bytes(), "pkg") == from_source
    with pytest.raises(ValueError, match="another Python version"):
        pyimports.imports_of_bytecode(b"\0" * 32, "pkg")
    with pytest.raises(ValueError, match="does not load"):
        pyimports.imports_of_bytecode(pyc.read_bytes()[:16] + b"\xff" * 64, "pkg")


def test_a_sourceless_module_is_followed_through_its_bytecode(tree: Path) -> None:
    import py_compile

    write(tree, "/app/main.py", "def cmd():\n    import shipped_as_bytecode\n    import broken_bytecode\n")
    write(tree, "/build/shipped_as_bytecode.py", "import json\n")
    py_compile.compile(str(tree / "build/shipped_as_bytecode.py"), str(tree / "app/shipped_as_bytecode.pyc"),
                       doraise=True)
    (tree / "app/broken_bytecode.pyc").write_bytes(b"\x7fELF not bytecode at all")
    kept = ["/app/main.py", f"{STD}/os.py"]
    trace = kept_trace(kept, ["/venv/bin/python3", "main.py"], "/app")
    result = pyimports.closure(trace, kept, Root(str(tree)), cache=pyimports.ParseCache(None))
    added = {a.name: a for a in result.added}
    assert added["shipped_as_bytecode"].files == ("/app/shipped_as_bytecode.pyc",)
    assert added["json"].importer == "/app/shipped_as_bytecode.pyc"
    assert ("/app/broken_bytecode.pyc", "ValueError") in result.not_parsed


def test_a_package_whose_init_is_an_extension_module_is_added_not_parsed(tree: Path) -> None:
    write(tree, "/app/main.py", "def cmd():\n    import extpkg\n")
    write(tree, "/app/extpkg/__init__.cpython-311-x86_64-linux-gnu.so", "\x7fELF import nothing")
    kept = ["/app/main.py", f"{STD}/os.py"]
    trace = kept_trace(kept, ["/venv/bin/python3", "main.py"], "/app")
    result = pyimports.closure(trace, kept, Root(str(tree)), cache=pyimports.ParseCache(None))
    added = {a.name: a for a in result.added}
    assert added["extpkg"].files == ("/app/extpkg/__init__.cpython-311-x86_64-linux-gnu.so",)
    assert result.not_parsed == []


def test_parse_cache_leaves_no_temporary_file_when_interrupted(tmp_path: Path, monkeypatch) -> None:
    from tracejail.errors import Interrupted

    (tmp_path / "cache").mkdir(mode=0o700)
    cache = pyimports.ParseCache(str(tmp_path / "cache"))
    cache.put(pyimports.ParseCache.key("/", "/app/m.py", os.stat("/"), "imports  0"), [pyimports.ImportRef("os", 1)])

    def interrupted(*_a, **_k):
        raise Interrupted(15)

    monkeypatch.setattr(pyimports.cachedir.os, "replace", interrupted)   # SIGTERM between write and rename
    with pytest.raises(Interrupted):
        cache.save()
    assert [files for _top, _dirs, files in os.walk(tmp_path / "cache")] == [[], []]
