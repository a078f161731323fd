"""--strip and --bytecode-only: real ELF files compiled here and stripped by GNU strip, real Python
runs recorded and rebuilt with sourceless bytecode, and the images run in the jail."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from tracejail import pyimports, rootfs, shrink
from tracejail.errors import UsageError

TJ = [sys.executable, "-m", "tracejail"]
PY = "/usr/bin/python3"
TAG = sys.implementation.cache_tag

LIB_C = "int twice(int x) { return 2 * x; }\n"
MAIN_C = """\
#include <stdio.h>
int twice(int x);
int main(void) { printf("twice 21 is %d\\n", twice(21)); return 0; }
"""


def sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def section_names(path: str) -> set[str]:
    with open(path, "rb") as f:
        return {s.name for s in ELFFile(f).iter_sections()}


@pytest.fixture
def elf_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A shared library and a program that needs it, both with debug info and a build-id."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    (tmp_path / "lib.c").write_text(LIB_C)
    (tmp_path / "main.c").write_text(MAIN_C)
    lib, exe = tmp_path / "libtwice.so", tmp_path / "main"
    subprocess.run(["gcc", "-g", "-O0", "-shared", "-fPIC", "-Wl,--build-id", "-o", str(lib), str(tmp_path / "lib.c")],
                   check=True)
    subprocess.run(["gcc", "-g", "-O0", "-Wl,--build-id", "-o", str(exe), str(tmp_path / "main.c"), str(lib),
                    f"-Wl,-rpath,{tmp_path}"], check=True)
    return lib, exe


def plan_of(*paths: Path) -> rootfs.Plan:
    return rootfs.plan(sorted(str(p) for p in paths), root="/")


def test_strip_removes_symbols_and_debug_and_keeps_what_the_loader_needs(elf_pair, tmp_path: Path) -> None:
    lib, exe = elf_pair
    before = {p: sha256(p) for p in (lib, exe)}
    plan = plan_of(lib, exe)
    work = tmp_path / "work"
    work.mkdir()
    result = shrink.ShrinkResult()
    saving = shrink.strip_plan(plan, str(work), result)
    assert saving.files == 2 and saving.saved > 0, result.kept
    for p in (lib, exe):
        e = plan.entries[str(p)]
        assert e.source.startswith(str(work)) and e.identity is None and e.size == os.path.getsize(e.source)
        names = section_names(e.source)
        assert {".dynsym", ".dynstr", ".note.gnu.build-id"} <= names, names
        assert not names & {".symtab", ".strtab", ".comment", ".debug_info", ".debug_line"}, names
        assert "stripped by `tracejail build --strip`" in result.derived[str(p)]
        assert sha256(p) == before[p]        # the host file is never written
    # The stripped program still runs with the stripped library.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(plan.entries[str(lib)].source, run_dir / "libtwice.so")
    shutil.copy(plan.entries[str(exe)].source, run_dir / "main")
    (run_dir / "main").chmod(0o755)
    out = subprocess.run([str(run_dir / "main")], env={"LD_LIBRARY_PATH": str(run_dir)},
                         capture_output=True, text=True, check=True)
    assert out.stdout == "twice 21 is 42\n"


def test_strip_is_deterministic(elf_pair, tmp_path: Path) -> None:
    digests = []
    for n in range(2):
        plan = plan_of(*elf_pair)
        work = tmp_path / f"work{n}"
        work.mkdir()
        shrink.strip_plan(plan, str(work), shrink.ShrinkResult())
        digests.append([sha256(plan.entries[str(p)].source) for p in elf_pair])
    assert digests[0] == digests[1]


def test_strip_leaves_what_it_cannot_handle_as_it_is(elf_pair, tmp_path: Path) -> None:
    lib, exe = elf_pair
    payload = tmp_path / "selfextracting"
    payload.write_bytes(exe.read_bytes() + b"PAYLOAD" * 1000)
    padded = tmp_path / "padded"
    padded.write_bytes(exe.read_bytes() + bytes(100))        # zero padding is no payload
    corrupt = tmp_path / "corrupt.so"
    corrupt.write_bytes(b"\x7fELF\x02\x01\x01" + b"\xff" * 200)
    obj = tmp_path / "lib.o"
    subprocess.run(["gcc", "-g", "-c", "-o", str(obj), str(tmp_path / "lib.c")], check=True)
    text = tmp_path / "notes.txt"
    text.write_text("not an ELF file\n" * 10)
    plan = plan_of(payload, padded, corrupt, obj, text)
    before = dict(plan.entries)
    work = tmp_path / "work"
    work.mkdir()
    result = shrink.ShrinkResult()
    saving = shrink.strip_plan(plan, str(work), result)
    assert saving.files == 1 and plan.entries[str(padded)].source.startswith(str(work))
    plan.entries[str(padded)] = before[str(padded)]
    kept = {path: why for _option, path, why in result.kept}
    assert "appended payload" in kept[str(payload)] and "7000 bytes follow" in kept[str(payload)]
    assert "not a well-formed ELF file" in kept[str(corrupt)]
    assert str(obj) not in kept and str(text) not in kept     # not loadable / not ELF: not strip's business
    assert plan.entries == before


def test_strip_leaves_a_patchelf_layout_it_would_change_as_it_is(tmp_path: Path) -> None:
    """patchelf (auditwheel, for every manylinux wheel's bundled libraries) appends segments that
    GNU strip moves or trims: numpy's OpenBLAS then fails to load ("ELF load command
    address/offset not page-aligned"). Whatever strip changes in what the loader maps, the file
    stays as it was."""
    if shutil.which("patchelf") is None or shutil.which("gcc") is None:
        pytest.skip("patchelf and gcc are needed (tests/run installs them)")
    source = tmp_path / "big.c"
    source.write_text("\n".join(f"struct s{i} {{ int a; long b[{i % 7 + 1}]; }};\n"
                                f"int f{i}(struct s{i} *p) {{ return p->a + (int)p->b[0]; }}" for i in range(800))
                      + "\nint twice(int x) { return 2 * x; }\n")
    lib = tmp_path / "libbig.so"
    subprocess.run(["gcc", "-g3", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    subprocess.run(["patchelf", "--set-rpath", "/opt/" + "x" * 300, str(lib)], check=True)
    plan = plan_of(lib)
    before = dict(plan.entries)
    work = tmp_path / "work"
    work.mkdir()
    result = shrink.ShrinkResult()
    assert shrink.strip_plan(plan, str(work), result).files == 0
    assert result.kept == [(shrink.Option.STRIP, str(lib),
                            "strip would change what the loader maps (a segment layout such as patchelf makes)")]
    assert plan.entries == before


def test_a_strip_that_fails_keeps_the_file_with_its_error(elf_pair, tmp_path: Path) -> None:
    plan = plan_of(*elf_pair)
    before = dict(plan.entries)
    work = tmp_path / "work"
    work.mkdir()
    result = shrink.ShrinkResult()
    fake = tmp_path / "strip"
    fake.write_text("#!/bin/sh\necho 'strip: bfd: file format not recognized' >&2\nexit 1\n")
    fake.chmod(0o755)
    assert shrink.strip_plan(plan, str(work), result, tool=str(fake)).files == 0
    assert {why for _o, _p, why in result.kept} == {"strip failed: strip: bfd: file format not recognized"}
    assert plan.entries == before


def test_build_strip_without_binutils_says_how_to_get_it(tmp_path: Path, monkeypatch) -> None:
    trace = tmp_path / "t.json"
    rec = subprocess.run([*TJ, "record", "-o", str(trace), "--", "/bin/true"], capture_output=True, text=True,
                         timeout=120)
    assert rec.returncode == 0, rec.stderr
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UsageError, match="apt-get install binutils"):
        shrink.strip_tool()
    proc = subprocess.run([*TJ, "build", str(trace), "--strip", "--rootfs", str(tmp_path / "r"), "--no-load"],
                          capture_output=True, text=True, env={"PATH": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "tracejail: --strip needs GNU strip, which is not installed: apt-get install binutils"]
    assert not (tmp_path / "r").exists()


def test_cached_pyc_names() -> None:
    c = pyimports.cached_pyc("/a/b/__pycache__/mod.cpython-311.opt-1.pyc")
    assert c == pyimports.CachedPyc("/a/b/__pycache__/mod.cpython-311.opt-1.pyc", "/a/b/mod.py", "cpython-311", 1)
    assert pyimports.cached_pyc("/a/b/__pycache__/mod.cpython-311.pyc").optimize == 0
    assert pyimports.cached_pyc("/a/b/mod.pyc") is None
    assert pyimports.cached_pyc("/a/__pycache__/x.y.z.w.pyc") is None
    assert pyimports.sourceless_path("/a/b/mod.py") == "/a/b/mod.pyc"


# --------------------------------------------------------------------------------------------
# --bytecode-only, on a recorded run

APP = """\
import ctypes, inspect, os
import pkg
from pkg import fresh, changed, introspected
print(fresh.greet("image"))
print(changed.VALUE)
print(len(inspect.getsource(introspected.documented)) > 0)
try:
    fresh.fail()
except ZeroDivisionError as err:
    print("caught", type(err).__name__)
twice = ctypes.CDLL(os.path.join(os.path.dirname(os.path.abspath(__file__)), "libtwice.so")).twice
print("twice 21 is", twice(21))
"""
PKG = {
    "__init__.py": "",
    "fresh.py": "def greet(who):\n    return f'hello {who}'\n\ndef fail():\n    return 1 / 0\n",
    "changed.py": "VALUE = 'changed module loaded'\n",
    "introspected.py": "def documented():\n    '''Its source is read as data.'''\n    return 1\n",
}
EXPECTED = "hello image\nchanged module loaded\nTrue\ncaught ZeroDivisionError\ntwice 21 is 42\n"


def _needs_jail() -> None:
    from tracejail import jail

    if jail.check_available():
        pytest.skip(f"no jail here: {jail.check_available()}")


@pytest.fixture
def recorded_app(public_dir: str) -> tuple[Path, Path]:
    """An app whose package was byte-compiled before the run (as pip does), and which loads a
    library built with debug information, recorded with the system Python; then one module's
    source changes after the recording (its cache is stale)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    if not os.path.exists(PY):
        pytest.skip(f"{PY} is not installed")
    if subprocess.run([PY, "-c", "import sys; print(sys.implementation.cache_tag)"], capture_output=True,
                      text=True).stdout.strip() != TAG:
        pytest.skip(f"{PY} is not the same Python version as the tests' ({TAG})")
    place = Path(public_dir)
    app = place / "app"
    (app / "pkg").mkdir(parents=True)
    (app / "app.py").write_text(APP)
    for name, text in PKG.items():
        (app / "pkg" / name).write_text(text)
    subprocess.run([PY, "-m", "compileall", "-q", str(app / "pkg")], check=True)
    (place / "lib.c").write_text(LIB_C)
    subprocess.run(["gcc", "-g", "-shared", "-fPIC", "-o", str(app / "libtwice.so"), str(place / "lib.c")], check=True)
    trace = place / "t.json"
    proc = subprocess.run([*TJ, "record", "-o", str(trace), "--", PY, "app.py"], cwd=app, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == EXPECTED, proc.stderr
    changed = app / "pkg" / "changed.py"
    changed.write_text(PKG["changed.py"] + "# edited after the recording\n")
    os.utime(changed, (1_700_000_000, 1_700_000_000))
    return app, trace


def build_rootfs(trace: Path, dest: Path, *options: str) -> dict:
    proc = subprocess.run([*TJ, "build", str(trace), "--rootfs", str(dest), "--no-load", "--json", *options],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_bytecode_only_ships_modules_without_their_sources(recorded_app, tmp_path: Path) -> None:
    app, trace = recorded_app
    out = tmp_path / "r1"
    summary = build_rootfs(trace, out, "--bytecode-only")
    image_pkg = out / str(app / "pkg").lstrip("/")
    host_cache = app / "pkg" / "__pycache__"
    # A current cached .pyc is shipped as it is, in place of its source.
    assert (image_pkg / "fresh.pyc").read_bytes() == (host_cache / f"fresh.{TAG}.pyc").read_bytes()
    assert not (image_pkg / "fresh.py").exists() and not (image_pkg / "__pycache__" / f"fresh.{TAG}.pyc").exists()
    # (introspected.py stays, with its cache: the only file left in __pycache__)
    assert os.listdir(image_pkg / "__pycache__") == [f"introspected.{TAG}.pyc"]
    assert (image_pkg / "__init__.pyc").exists()
    # A stale one is compiled again from the source as it is now.
    compiled = (image_pkg / "changed.pyc").read_bytes()
    assert compiled[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(compiled[8:12], "little") == 1_700_000_000
    assert compiled != (host_cache / f"changed.{TAG}.pyc").read_bytes()
    # A source the run read as data stays, and so does the script the run was started with.
    assert (image_pkg / "introspected.py").exists() and not (image_pkg / "introspected.pyc").exists()
    assert (out / str(app / "app.py").lstrip("/")).exists()
    kept = summary["shrink"]["kept_as_is"]["--bytecode-only"]
    reason = "the run read its source (as data, or to compile it)"
    assert str(app / "pkg" / "introspected.py") in kept[reason]["examples"]
    saving = summary["shrink"]["savings"]["--bytecode-only"]
    assert saving["files"] > 10 and saving["bytes_saved"] > 0        # the stdlib modules too
    # The same trace and host files give the same bytes.
    again = tmp_path / "r2"
    build_rootfs(trace, again, "--bytecode-only")
    for name in ("changed.pyc", "fresh.pyc", "__init__.pyc"):
        assert (image_pkg / name).read_bytes() == (again / str(app / "pkg").lstrip("/") / name).read_bytes()

    # The image runs as recorded: verify replays the run in the jail.
    _needs_jail()
    proc = subprocess.run([*TJ, "verify", str(trace), "--rootfs", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_strip_and_bytecode_only_image_runs_and_reports_its_savings(recorded_app, tmp_path: Path) -> None:
    _needs_jail()
    _, trace = recorded_app
    default = build_rootfs(trace, tmp_path / "d")
    small = build_rootfs(trace, tmp_path / "s", "--strip", "--bytecode-only")
    savings = small["shrink"]["savings"]
    assert savings["--strip"]["files"] >= 1 and savings["--strip"]["bytes_saved"] > 0   # libtwice.so
    assert small["bytes"] == default["bytes"] - savings["--strip"]["bytes_saved"] \
        - savings["--bytecode-only"]["bytes_saved"]
    # What the import closure added is still listed, a module shipped as bytecode included.
    assert small["python_imports"]["modules"] == default["python_imports"]["modules"] > 0
    proc = subprocess.run([*TJ, "verify", str(trace), "--rootfs", str(tmp_path / "s")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = subprocess.run([*TJ, "build", str(trace), "--rootfs", str(tmp_path / "t"), "--no-load", "--strip",
                           "--bytecode-only"], capture_output=True, text=True, timeout=300)
    assert "--strip: " in text.stdout and "--bytecode-only: " in text.stdout and "saved" in text.stdout


def test_verify_counts_no_miss_for_a_source_replaced_by_bytecode(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "lib" / "__pycache__").mkdir(parents=True)
    (tree / "lib" / "mod.pyc").write_bytes(b"")
    from tracejail.root import Root

    root = Root(str(tree))
    assert shrink.replaced_by_bytecode("/lib/mod.py", root)
    assert shrink.replaced_by_bytecode(f"/lib/__pycache__/mod.{TAG}.pyc", root)
    assert not shrink.replaced_by_bytecode("/lib/other.py", root)
    assert not shrink.replaced_by_bytecode("/lib/mod.so", root)


def test_verify_fix_rebuilds_with_the_options_the_image_was_built_with(recorded_app, tmp_path: Path) -> None:
    """The image's io.tracejail.shrink label carries --strip and --bytecode-only into the rebuild
    that --fix makes (an --exclude, which leaves no trace in an image, is not repeated)."""
    _needs_jail()
    app, trace = recorded_app
    tree = tmp_path / "r"
    build_rootfs(trace, tree, "--strip", "--bytecode-only", "--exclude", "*/libtwice.so")
    assert 'LABEL "io.tracejail.shrink"="strip,bytecode-only"' in (tmp_path / "Dockerfile").read_text()
    proc = subprocess.run([*TJ, "verify", str(trace), "--rootfs", str(tree), "--fix"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "libtwice.so" in proc.stdout
    lib = tree / str(app / "libtwice.so").lstrip("/")
    assert ".symtab" not in section_names(str(lib)) and ".symtab" in section_names(str(app / "libtwice.so"))
    assert (tree / str(app / "pkg").lstrip("/") / "fresh.pyc").exists()
