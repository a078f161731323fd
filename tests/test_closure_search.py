"""Tests for tracejail.closure.search: glibc's and musl's rules for finding the file behind a name,
side by side on the same small trees (built with gcc and with musl-gcc).

Each end-to-end rule is also checked against the real loader: glibc's ld.so through `ldd`, musl's
through its own list mode (`ld-musl-x86_64.so.1 --list`). open_verify's verdicts on broken
candidates are compared with what ld.so says about the same file; the Search objects are also
driven directly, as the link-map walk drives them.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from toolchain import GCC, IS_X86_64, LDD, MUSL_GCC, compile_c
from tracejail.closure import Closure, Dependency, LoaderEnv, resolve
from tracejail.closure.files import LoaderFiles
from tracejail.closure.linkmap import LinkMap
from tracejail.closure.model import Results
from tracejail.closure.search import (
    Dir,
    GlibcSearch,
    MuslSearch,
    Searches,
    Verdict,
    load_problem,
    open_verify,
)
from tracejail.elf import ELFDATA2LSB, ElfCache, ElfFacts, read_elf_facts
from tracejail.errors import ElfError
from tracejail.root import Root

MUSL_LDSO = "/lib/ld-musl-x86_64.so.1"
HAVE_MUSL = MUSL_GCC is not None and os.path.exists(MUSL_LDSO)

needs_musl = pytest.mark.skipif(not HAVE_MUSL, reason="needs musl-gcc and musl's loader")
needs_ldd = pytest.mark.skipif(LDD is None, reason="needs ldd to compare with ld.so")


# --- helpers -----------------------------------------------------------------


def cc(compiler: str, out: Path, source: str, *args: str) -> Path:
    return compile_c(out, source, *args, compiler=compiler)


def lib_source(name: str, calls: tuple[str, ...] = ()) -> str:
    decls = "".join(f"int {c}(void);\n" for c in calls)
    body = " + ".join(f"{c}()" for c in calls) or "0"
    return f"{decls}int {name}(void) {{ return 1 + {body}; }}\n"


def main_source(calls: tuple[str, ...] = ()) -> str:
    decls = "".join(f"int {c}(void);\n" for c in calls)
    body = " + ".join(f"{c}()" for c in calls) or "0"
    return f"{decls}int main(void) {{ return {body}; }}\n"


def patched(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    """A copy of `src` with `data` written at `offset`."""
    raw = bytearray(src.read_bytes())
    raw[offset : offset + len(data)] = data
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(raw))
    return dst


def by_name(closure: Closure, name: str) -> list[Dependency]:
    return [d for d in closure.deps if d.name == name]


def edge(closure: Closure, name: str) -> tuple[str, str]:
    (dep,) = by_name(closure, name)
    return dep.path, dep.rule


LIST_LINE = re.compile(r"^\t(?:(\S+) => )?(\S+|not found)(?: \(0x[0-9a-f]+\))?$")


def loader_list(cmd: list[str], ld_library_path: str | None = None) -> tuple[dict[str, str], set[str], str]:
    """What a real loader in list mode says: {name: path found}, names not found or failed, and
    its error output."""
    env = {"PATH": "/usr/bin:/bin"}
    if ld_library_path is not None:
        env["LD_LIBRARY_PATH"] = ld_library_path
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    found: dict[str, str] = {}
    failed = set(re.findall(r"Error loading shared library (\S+):", proc.stderr))
    for line in proc.stdout.splitlines():
        match = LIST_LINE.match(line)
        if match and match.group(1):
            if match.group(2) == "not found":
                failed.add(match.group(1))
            else:
                found[match.group(1)] = match.group(2)
    return found, failed, proc.stdout + proc.stderr


def glibc_list(program: Path, ld_library_path: str | None = None) -> tuple[dict[str, str], set[str], str]:
    return loader_list([LDD, str(program)], ld_library_path)  # type: ignore[list-item]


def musl_list(program: Path, ld_library_path: str | None = None) -> tuple[dict[str, str], set[str], str]:
    return loader_list([MUSL_LDSO, "--list", str(program)], ld_library_path)


def real(path: str) -> str:
    return os.path.realpath(path)


# --- the trees ------------------------------------------------------------------------------

# glibc's $LIB on Debian x86_64; the musl tree has the same layout.
LIB_DST = "lib/x86_64-linux-gnu"
PLATFORMS = ("x86_64", "haswell", "xeon_phi")


def build_tree(root: Path, compiler: str) -> Path:
    """The same small tree for either C library: programs whose one dependency is found (or not)
    by a single rule each."""
    for sub in ("bin", "lib", "rp", "names", "bin-x", "stubs", f"dst/{LIB_DST}", *(f"plat/{p}" for p in PLATFORMS)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lib, bin_ = root / "lib", root / "bin"

    cc(compiler, lib / "libml.so", lib_source("ml"), "-shared", "-Wl,-soname,libml.so")
    shutil.copy(lib / "libml.so", root / "bin-x" / "libml.so")
    cc(compiler, bin_ / "plain", main_source(("ml",)), f"-L{lib}", "-lml")
    cc(compiler, bin_ / "origin", main_source(("ml",)), f"-L{lib}", "-lml", "-Wl,-rpath,$ORIGIN/../lib",
       "-Wl,--enable-new-dtags")
    cc(compiler, bin_ / "origin_dash", main_source(("ml",)), f"-L{lib}", "-lml", "-Wl,-rpath,$ORIGIN-x",
       "-Wl,--enable-new-dtags")
    cc(compiler, bin_ / "mixed", main_source(("ml",)), f"-L{lib}", "-lml",
       f"-Wl,-rpath,{root}/dst/$LIB:$ORIGIN/../lib", "-Wl,--enable-new-dtags")

    # RUNPATH on the program only: libmid needs libleaf, found only in rp/.
    rp = root / "rp"
    cc(compiler, rp / "libleaf.so", lib_source("leaf"), "-shared", "-Wl,-soname,libleaf.so")
    cc(compiler, rp / "libmid.so", lib_source("mid", ("leaf",)), "-shared", "-Wl,-soname,libmid.so", f"-L{rp}", "-lleaf")
    cc(compiler, bin_ / "runpath", main_source(("mid",)), f"-L{rp}", "-lmid", "-Wl,--allow-shlib-undefined",
       f"-Wl,-rpath,{rp}", "-Wl,--enable-new-dtags")

    # $LIB and $PLATFORM.
    cc(compiler, root / "dst" / LIB_DST / "libdst.so", lib_source("dst"), "-shared", "-Wl,-soname,libdst.so")
    cc(compiler, bin_ / "dst_lib", main_source(("dst",)), f"-L{root}/dst/{LIB_DST}", "-ldst",
       f"-Wl,-rpath,{root}/dst/$LIB", "-Wl,--disable-new-dtags")
    for platform in PLATFORMS:
        cc(compiler, root / "plat" / platform / "libplat.so", lib_source("plat_" + platform), "-shared",
           "-Wl,-soname,libplat.so")
    # Link against a stub that defines what the program calls; the platform copies define other symbols.
    cc(compiler, root / "stubs" / "libplat.so", lib_source("plat"), "-shared", "-Wl,-soname,libplat.so")
    cc(compiler, bin_ / "dst_platform", main_source(("plat",)), f"-L{root}/stubs", "-lplat",
       f"-Wl,-rpath,{root}/plat/$PLATFORM", "-Wl,--disable-new-dtags")
    (root / "stubs" / "libplat.so").unlink()

    # An object known by another name: libalias.so's DT_SONAME is libreal.so, a name for which
    # there is also a file of its own.
    names = root / "names"
    cc(compiler, names / "libalias.so", lib_source("alias"), "-shared", "-Wl,-soname,libalias.so")
    cc(compiler, names / "libreal.so", lib_source("realfn"), "-shared", "-Wl,-soname,libreal.so")
    cc(compiler, bin_ / "names", main_source(("alias", "realfn")), f"-L{names}", "-Wl,--no-as-needed", "-lalias", "-lreal")
    cc(compiler, names / "libalias.so", lib_source("alias"), "-shared", "-Wl,-soname,libreal.so")
    return root


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"glibc": tree built with gcc, "musl": the same built with musl-gcc (when there is musl)},
    plus "m32": a directory holding a 32-bit libml.so (when gcc -m32 works)."""
    if GCC is None or not IS_X86_64:
        pytest.skip("needs gcc on x86_64")
    top = tmp_path_factory.mktemp("search")
    built = {"glibc": build_tree(top / "glibc", GCC)}
    if HAVE_MUSL:
        built["musl"] = build_tree(top / "musl", MUSL_GCC)  # type: ignore[arg-type]
    m32 = top / "m32"
    m32.mkdir()
    try:
        cc(GCC, m32 / "libml.so", lib_source("ml"), "-shared", "-m32", "-Wl,-soname,libml.so")
        built["m32"] = m32
    except subprocess.CalledProcessError:
        pass
    return built


def tree(trees: dict[str, Path], libc: str) -> Path:
    if libc not in trees:
        pytest.skip(f"no {libc} tree (musl-gcc or gcc -m32 missing)")
    return trees[libc]


BOTH = pytest.mark.parametrize("libc", ["glibc", pytest.param("musl", marks=needs_musl)])


# --- the Search objects ---------------------------------------------------------------------


def searches(root: str = "/", cwd: str | None = None) -> tuple[Searches, Results]:
    results = Results(strict=False)
    return Searches(LoaderFiles(Root(root), ElfCache(), cwd), results), results


def facts_of(path: Path | str) -> ElfFacts:
    facts = read_elf_facts(str(path))
    assert facts is not None
    return facts


@BOTH
def test_searches_give_one_search_per_loader(trees: dict[str, Path], libc: str) -> None:
    root = tree(trees, libc)
    factory, _ = searches()
    search = factory.for_program(facts_of(root / "bin" / "plain"))
    assert type(search) is {"glibc": GlibcSearch, "musl": MuslSearch}[libc]
    # Another program of the same C library, architecture and interpreter shares it (and its memo).
    assert factory.for_program(facts_of(root / "bin" / "origin")) is search
    if libc == "glibc":
        assert (search.interp, search.names_by_soname) == ("/lib64/ld-linux-x86-64.so.2", True)
        assert search.runtime_libdir == "/usr/lib/x86_64-linux-gnu"
    else:
        assert (search.interp, search.names_by_soname) == (MUSL_LDSO, False)
        assert search.runtime_libdir is None  # musl's NSS and iconv are built in


@needs_musl
def test_searches_tell_musl_libraries_from_glibc_ones(trees: dict[str, Path]) -> None:
    factory, _ = searches()
    glibc = factory.for_program(facts_of(tree(trees, "glibc") / "lib" / "libml.so"))
    musl = factory.for_program(facts_of(tree(trees, "musl") / "lib" / "libml.so"))
    assert isinstance(glibc, GlibcSearch) and isinstance(musl, MuslSearch)
    # A library root is loaded by the usual loader of its C library.
    assert (glibc.interp, musl.interp) == ("/lib64/ld-linux-x86-64.so.2", MUSL_LDSO)


def test_glibc_search_lists_expand_every_token(trees: dict[str, Path]) -> None:
    factory, results = searches()
    program = facts_of(tree(trees, "glibc") / "bin" / "plain")
    search = factory.for_program(program)
    assert isinstance(search, GlibcSearch)
    platform, lib = search.config.platform, search.config.lib_dst
    with_rpath = dataclasses.replace(program, rpath="$ORIGIN/a:/x/$LIB:/y/${PLATFORM}/z:/w/$FOO:/v/$LIBX:/u/", runpath=None)
    assert search.search_lists(with_rpath, "/o", "prog") == ((
        Dir("/o/a", True, "$ORIGIN/a"),
        Dir(f"/x/{lib}", False, "/x/$LIB"),
        Dir(f"/y/{platform}/z", False, "/y/${PLATFORM}/z"),
        Dir("/w/$FOO", False, "/w/$FOO"),      # not a token: kept as written, as ld.so does
        Dir("/v/$LIBX", False, "/v/$LIBX"),
        Dir("/u", False, "/u/"),
    ), ())
    # DT_RUNPATH present: DT_RPATH is ignored, and the list is the object's own.
    both = dataclasses.replace(program, rpath="/r", runpath="${ORIGIN}/../lib")
    assert search.search_lists(both, "/o/bin", "prog") == ((), (Dir("/o/bin/../lib", True, "${ORIGIN}/../lib"),))
    assert results.closure().notes == []


@needs_musl
def test_musl_search_lists_expand_only_origin(trees: dict[str, Path]) -> None:
    factory, _ = searches()
    program = facts_of(tree(trees, "musl") / "bin" / "plain")
    search = factory.for_program(program)
    assert isinstance(search, MuslSearch)
    # DT_RUNPATH (or DT_RPATH) becomes the inherited list.
    runpath = dataclasses.replace(program, rpath=None, runpath="$ORIGIN/a:${ORIGIN}/b:/c")
    assert search.search_lists(runpath, "/o", "prog") == ((
        Dir("/o/a", True, "$ORIGIN/a"), Dir("/o/b", True, "${ORIGIN}/b"), Dir("/c", False, "/c"),
    ), ())
    # Any other token makes the list unusable.
    for text in ("/x/$LIB", "/x/${PLATFORM}", "/x/$FOO"):
        assert search.search_lists(dataclasses.replace(program, rpath=text, runpath=None), "/o", "prog") == ((), ())


def test_relative_search_directories_need_the_working_directory(trees: dict[str, Path]) -> None:
    program = dataclasses.replace(facts_of(tree(trees, "glibc") / "bin" / "plain"), rpath="rel/dir:/abs", runpath=None)
    factory, results = searches()
    search = factory.for_program(program)
    assert search.search_lists(program, "/o", "prog") == ((Dir("/abs", False, "/abs"),), ())
    assert results.closure().notes == ["relative search directory 'rel/dir' of prog skipped: working directory unknown"]
    factory, results = searches(cwd="/work")
    search = factory.for_program(program)
    assert search.search_lists(program, "/o", "prog") == ((Dir("/work/rel/dir", False, "rel/dir"), Dir("/abs", False, "/abs")), ())
    # LD_LIBRARY_PATH: ':' and ';' separate, an empty entry is the working directory.
    assert search.library_path("/a;b::/c/", "/o", "prog") == (
        Dir("/a", False, "/a"), Dir("/work/b", False, "b"), Dir("/work", False, ""), Dir("/c", False, "/c/"),
    )
    assert results.closure().notes == []


# --- wrong class: glibc goes on, musl stops ------------------------------------------------------


@BOTH
def test_wrong_class_candidate(trees: dict[str, Path], libc: str) -> None:
    root, m32 = tree(trees, libc), tree(trees, "m32")
    program = root / "bin" / "plain"
    llp = f"{m32}:{root}/lib"
    closure = resolve([str(program)], LoaderEnv(ld_library_path=llp), strict=False)
    if libc == "glibc":
        assert edge(closure, "libml.so") == (f"{root}/lib/libml.so", "ld_library_path")
        assert f"skipped {m32}/libml.so is ELFCLASS32 (wrong class or machine) while looking for libml.so" in closure.notes
        assert closure.errors == [] and closure.unresolved == []
        if LDD:
            found, failed, _ = glibc_list(program, llp)
            assert found["libml.so"] == f"{root}/lib/libml.so" and not failed
    else:
        assert by_name(closure, "libml.so") == []
        assert closure.errors == [f"{m32}/libml.so is ELFCLASS32: musl does not skip it"]
        assert [(u.name, u.searched) for u in closure.unresolved] == [("libml.so", (str(m32),))]
        with pytest.raises(ElfError, match=re.escape(f"{m32}/libml.so is ELFCLASS32: musl does not skip it")):
            resolve([str(program)], LoaderEnv(ld_library_path=llp))
        found, failed, _ = musl_list(program, llp)
        assert "libml.so" not in found and failed == {"libml.so"}


# --- dynamic string tokens ----------------------------------------------------------------------


@BOTH
def test_lib_token_in_rpath(trees: dict[str, Path], libc: str) -> None:
    root = tree(trees, libc)
    program = root / "bin" / "dst_lib"
    closure = resolve([str(program)], strict=False)
    if libc == "glibc":
        assert edge(closure, "libdst.so") == (f"{root}/dst/{LIB_DST}/libdst.so", "rpath")
        if LDD:
            assert glibc_list(program)[0]["libdst.so"] == f"{root}/dst/{LIB_DST}/libdst.so"
    else:
        # musl knows only $ORIGIN: the entry is unusable, nothing else has the library.
        assert [u.name for u in closure.unresolved] == ["libdst.so"]
        assert not any(f"{root}/dst" in d for d in closure.unresolved[0].searched)
        assert "libdst.so" in musl_list(program)[1]


@needs_ldd
def test_platform_token_in_rpath_like_ld_so(trees: dict[str, Path]) -> None:
    root = tree(trees, "glibc")
    program = root / "bin" / "dst_platform"
    found, failed, _ = glibc_list(program)
    assert not failed
    closure = resolve([str(program)])
    assert edge(closure, "libplat.so") == (found["libplat.so"], "rpath")


@needs_musl
def test_musl_drops_a_platform_rpath(trees: dict[str, Path]) -> None:
    root = tree(trees, "musl")
    closure = resolve([str(root / "bin" / "dst_platform")], strict=False)
    assert [u.name for u in closure.unresolved] == ["libplat.so"]
    assert "libplat.so" in musl_list(root / "bin" / "dst_platform")[1]


@BOTH
def test_origin_token_in_runpath(trees: dict[str, Path], libc: str) -> None:
    root = tree(trees, libc)
    program = root / "bin" / "origin"
    closure = resolve([str(program)])
    (dep,) = by_name(closure, "libml.so")
    assert (dep.path, dep.rule, dep.via_origin) == (f"{root}/bin/../lib/libml.so", "runpath", True)
    oracle = glibc_list(program)[0] if libc == "glibc" else musl_list(program)[0]
    assert real(oracle["libml.so"]) == real(dep.path)


@needs_musl
def test_musl_ignores_the_whole_runpath_with_another_token(trees: dict[str, Path]) -> None:
    root = tree(trees, "musl")
    program = root / "bin" / "mixed"
    assert "libml.so" in musl_list(program)[1]
    closure = resolve([str(program)], strict=False)
    assert [u.name for u in closure.unresolved] == ["libml.so"]


@needs_ldd
def test_glibc_mixed_runpath_expands_every_element(trees: dict[str, Path]) -> None:
    root = tree(trees, "glibc")
    program = root / "bin" / "mixed"
    closure = resolve([str(program)])
    (dep,) = by_name(closure, "libml.so")
    assert (dep.path, dep.rule, dep.search) == (f"{root}/bin/../lib/libml.so", "runpath", "$ORIGIN/../lib")
    assert real(glibc_list(program)[0]["libml.so"]) == real(dep.path)


@pytest.mark.parametrize("libc", ["glibc", pytest.param("musl", marks=needs_musl)])
def test_origin_token_followed_by_punctuation(trees: dict[str, Path], libc: str) -> None:
    root = tree(trees, libc)
    program = root / "bin" / "origin_dash"
    oracle = glibc_list(program)[0] if libc == "glibc" else musl_list(program)[0]
    assert real(oracle["libml.so"]) == f"{root}/bin-x/libml.so"
    closure = resolve([str(program)], strict=False)
    assert [real(d.path) for d in by_name(closure, "libml.so")] == [f"{root}/bin-x/libml.so"]


# --- RUNPATH inheritance -------------------------------------------------------------------------


@BOTH
def test_runpath_inheritance(trees: dict[str, Path], libc: str) -> None:
    root = tree(trees, libc)
    program = root / "bin" / "runpath"
    closure = resolve([str(program)])
    assert edge(closure, "libmid.so") == (f"{root}/rp/libmid.so", "runpath")
    if libc == "glibc":
        # DT_RUNPATH serves the object's own DT_NEEDED only.
        assert [(u.name, u.needed_by) for u in closure.unresolved] == [("libleaf.so", f"{root}/rp/libmid.so")]
        assert f"{root}/rp" not in closure.unresolved[0].searched
        if LDD:
            found, failed, _ = glibc_list(program)
            assert failed == {"libleaf.so"} and found["libmid.so"] == f"{root}/rp/libmid.so"
    else:
        # musl searches the RUNPATH of every object up the chain of loaders.
        (leaf,) = by_name(closure, "libleaf.so")
        assert (leaf.path, leaf.needed_by, leaf.rule) == (f"{root}/rp/libleaf.so", f"{root}/rp/libmid.so", "runpath")
        assert closure.unresolved == []
        assert musl_list(program)[0]["libleaf.so"] == f"{root}/rp/libleaf.so"


# --- names --------------------------------------------------------------------------------------


@BOTH
def test_an_object_is_known_by_its_soname_under_glibc_only(trees: dict[str, Path], libc: str) -> None:
    root = tree(trees, libc)
    program = root / "bin" / "names"
    llp = str(root / "names")
    closure = resolve([str(program)], LoaderEnv(ld_library_path=llp))
    assert edge(closure, "libalias.so") == (f"{root}/names/libalias.so", "ld_library_path")
    # Which object the program's second DT_NEEDED, libreal.so, refers to.
    files = LoaderFiles(Root("/"), ElfCache(), None)
    results = Results(strict=True)
    facts = facts_of(program)
    link = LinkMap(files, results, Searches(files, results).for_program(facts), str(program), facts, llp, None)
    link.run(None)
    if libc == "glibc":
        # libreal.so is the DT_SONAME of the object already loaded as libalias.so: the same map
        # (and so the same edge as libalias.so's).
        assert link.names["libreal.so"].path == f"{root}/names/libalias.so"
        assert f"{root}/names/libreal.so" not in closure.paths()
        assert by_name(closure, "libreal.so") == [] and closure.unresolved == []
        if LDD:
            found, failed, _ = glibc_list(program, llp)
            assert not failed and f"{root}/names/libreal.so" not in found.values()
    else:
        assert link.names["libreal.so"].path == f"{root}/names/libreal.so"
        assert edge(closure, "libreal.so") == (f"{root}/names/libreal.so", "ld_library_path")
        assert musl_list(program, llp)[0]["libreal.so"] == f"{root}/names/libreal.so"


MUSL_RESERVED = ("libc.so", "libpthread.so", "librt.so", "libm.so", "libdl.so", "libutil.so", "libxnet.so")


@pytest.fixture(scope="module")
def musl_stubs(trees: dict[str, Path]) -> tuple[Path, Path]:
    """A musl program needing the reserved names and others, with a library file for every one of
    them in stubs/ (on LD_LIBRARY_PATH): (program, stubs directory)."""
    if "musl" not in trees:
        pytest.skip("needs musl-gcc and musl's loader")
    root = trees["musl"]
    stubs = root / "reserved-stubs"
    stubs.mkdir()
    names = (*MUSL_RESERVED, "libcx.so", "libmx.so", "libm.so.6", "libc.so.6", "libc.musl-x86_64.so.1", "libpthread.so.0")
    for index, name in enumerate(names):
        cc(MUSL_GCC, stubs / name, lib_source(f"stub{index}"), "-shared", f"-Wl,-soname,{name}")  # type: ignore[arg-type]
    # Linked by path (the stub libc.so would hide musl's own; the program needs libc.so anyway).
    linked = [str(stubs / n) for n in names if n != "libc.so"]
    program = cc(MUSL_GCC, root / "bin" / "reserved", main_source(), "-Wl,--no-as-needed", *linked)  # type: ignore[arg-type]
    assert set(facts_of(program).needed) == set(names)
    return program, stubs


@needs_musl
def test_musl_reserved_names_are_the_loader(musl_stubs: tuple[Path, Path]) -> None:
    program, stubs = musl_stubs
    closure = resolve([str(program)], LoaderEnv(ld_library_path=str(stubs)))
    # No file of stubs/ for a reserved name: each is the loader, already in the closure as the interpreter.
    assert not any(p.endswith(f"/{n}") for p in closure.paths() for n in MUSL_RESERVED)
    assert [d.path for d in closure.deps if d.needed_by == str(program) and d.rule == "interp"] == [MUSL_LDSO]
    # Names that only start like a reserved one are searched as usual.
    assert edge(closure, "libcx.so") == (f"{stubs}/libcx.so", "ld_library_path")
    assert edge(closure, "libmx.so") == (f"{stubs}/libmx.so", "ld_library_path")
    # musl lists each reserved name it meets first (libc.so comes last: its "c." was libc.so.6).
    found, failed, _ = musl_list(program, str(stubs))
    assert not failed
    assert {n: found.get(n) for n in MUSL_RESERVED if n != "libc.so"} == {n: MUSL_LDSO for n in MUSL_RESERVED if n != "libc.so"}
    assert (found["libcx.so"], found["libmx.so"]) == (f"{stubs}/libcx.so", f"{stubs}/libmx.so")


@needs_musl
def test_musl_lookup_of_reserved_names_returns_the_loaders_map(musl_stubs: tuple[Path, Path]) -> None:
    program, stubs = musl_stubs
    files = LoaderFiles(Root("/"), ElfCache(), None)
    results = Results(strict=False)
    facts = facts_of(program)
    search = Searches(files, results).for_program(facts)
    link = LinkMap(files, results, search, str(program), facts, str(stubs), None)
    assert link.rtld is not None and link.rtld.path == MUSL_LDSO
    for name in MUSL_RESERVED:
        assert search.lookup(name, link.main, link) is link.rtld, name


@needs_musl
def test_musl_reserved_prefixes_cover_versioned_names(musl_stubs: tuple[Path, Path]) -> None:
    program, stubs = musl_stubs
    versioned = ("libm.so.6", "libc.so.6", "libc.musl-x86_64.so.1", "libpthread.so.0")
    found, failed, _ = musl_list(program, str(stubs))
    assert not failed and found["libc.so.6"] == MUSL_LDSO
    assert not any(os.path.dirname(p) == str(stubs) and os.path.basename(p) in versioned for p in found.values())
    closure = resolve([str(program)], LoaderEnv(ld_library_path=str(stubs)))
    assert [d.path for d in closure.deps if d.name in versioned] == []
    assert not any(p.startswith(f"{stubs}/") and os.path.basename(p) in versioned for p in closure.paths())


@needs_musl
def test_musl_library_path_does_not_split_at_semicolons(trees: dict[str, Path]) -> None:
    root = tree(trees, "musl")
    llp = f"{root}/lib;/nonexistent"
    assert "libml.so" in musl_list(root / "bin" / "plain", llp)[1]
    closure = resolve([str(root / "bin" / "plain")], LoaderEnv(ld_library_path=llp), strict=False)
    assert [u.name for u in closure.unresolved] == ["libml.so"]


@needs_musl
def test_musl_library_path_empty_entry_is_not_the_working_directory(trees: dict[str, Path]) -> None:
    root = tree(trees, "musl")
    env = LoaderEnv(ld_library_path=":/nonexistent", cwd=str(root / "lib"))
    closure = resolve([str(root / "bin" / "plain")], env, strict=False)
    assert [u.name for u in closure.unresolved] == ["libml.so"]


# --- musl's system directories in a staged tree ------------------------------------------------


@pytest.fixture
def musl_root(trees: dict[str, Path], tmp_path: Path) -> Path:
    """A tree with musl's loader, /app/prog needing libsys.so, and two different libsys.so."""
    if "musl" not in trees:
        pytest.skip("needs musl-gcc and musl's loader")
    root = tmp_path / "root"
    for sub in ("lib", "app", "etc", "opt/sys", "usr/lib"):
        (root / sub).mkdir(parents=True)
    shutil.copy(os.path.realpath(MUSL_LDSO), root / "lib/ld-musl-x86_64.so.1")
    build = tmp_path / "build"
    build.mkdir()
    cc(MUSL_GCC, build / "libsys.so", lib_source("sys"), "-shared", "-Wl,-soname,libsys.so")  # type: ignore[arg-type]
    cc(MUSL_GCC, root / "app/prog", main_source(("sys",)), f"-L{build}", "-lsys")  # type: ignore[arg-type]
    shutil.copy(build / "libsys.so", root / "opt/sys/libsys.so")
    cc(MUSL_GCC, root / "usr/lib/libsys.so", lib_source("sys") + "int other(void) { return 2; }\n",  # type: ignore[arg-type]
       "-shared", "-Wl,-soname,libsys.so")
    return root


@needs_musl
def test_musl_system_dirs_from_the_trees_path_file(musl_root: Path) -> None:
    (musl_root / "etc/ld-musl-x86_64.path").write_text("/opt/sys\n")
    closure = resolve(["/app/prog"], LoaderEnv(root=str(musl_root)))
    assert edge(closure, "libsys.so") == ("/opt/sys/libsys.so", "ld-musl.path")
    # musl's libc.so is its loader, in the tree.
    assert {(d.path, d.rule) for d in by_name(closure, "libc.so")} == {("/lib/ld-musl-x86_64.so.1", "interp")}
    assert closure.unresolved == []


@needs_musl
def test_musl_system_dirs_default_without_path_file(musl_root: Path) -> None:
    closure = resolve(["/app/prog"], root=Root(str(musl_root)))
    assert edge(closure, "libsys.so") == ("/usr/lib/libsys.so", "default")


@needs_musl
def test_musl_searches_only_the_path_file_dirs(musl_root: Path) -> None:
    (musl_root / "etc/ld-musl-x86_64.path").write_text("/nowhere:/opt/none\n")
    closure = resolve(["/app/prog"], LoaderEnv(root=str(musl_root)))
    assert [(u.name, u.needed_by, u.searched) for u in closure.unresolved] == [
        ("libsys.so", "/app/prog", ("/nowhere", "/opt/none")),
    ]
    (musl_root / "etc/ld-musl-x86_64.path").unlink()
    (musl_root / "usr/lib/libsys.so").unlink()
    closure = resolve(["/app/prog"], LoaderEnv(root=str(musl_root)))
    assert [u.searched for u in closure.unresolved] == [("/lib", "/usr/local/lib", "/usr/lib")]


# --- open_verify -----------------------------------------------------------------------------------

# name: (offset, bytes written into a copy of a good library) or whole contents; the verdict;
# the message after "<path>" (None: no message).
CANDIDATES: dict[str, tuple[tuple[int, bytes] | bytes, Verdict, str | None]] = {
    "text": (b"this is not an ELF file, but it is long enough to hold an ELF header\n", Verdict.FATAL,
             ": invalid ELF header"),
    "ten_bytes": (b"\x7fELF\x02\x01\x01\0\0\0", Verdict.FATAL, ": file too short"),
    "machine": ((18, (183).to_bytes(2, "little")), Verdict.OTHER, " is for EM_AARCH64"),
    "padding": ((10, b"\x01"), Verdict.FATAL, ": nonzero padding in e_ident"),
    "osabi": ((7, b"\x09"), Verdict.FATAL, ": ELF file OS ABI invalid"),
    "abi_version": ((7, b"\x03\x04"), Verdict.FATAL, ": ELF file ABI version invalid"),
    "gnu_abi_3": ((7, b"\x03\x03"), Verdict.OK, None),
    "ident_version": ((6, b"\x02"), Verdict.FATAL, ": ELF file version ident does not match current one"),
    "e_version": ((20, (2).to_bytes(4, "little")), Verdict.FATAL, ": ELF file version does not match current one"),
    "e_type": ((16, (1).to_bytes(2, "little")), Verdict.FATAL, ": only ET_DYN and ET_EXEC can be loaded"),
}


def make_candidate(good: Path, directory: Path, spec: tuple[int, bytes] | bytes) -> Path:
    path = directory / "libml.so"
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(spec, bytes):
        path.write_bytes(spec)
        return path
    return patched(good, path, *spec)


def verify(path: Path | str, good: Path) -> tuple[Verdict, ElfFacts | None, str | None]:
    arch_facts = facts_of(good)
    search = Searches(LoaderFiles(Root("/"), ElfCache(), None), Results(False)).for_program(arch_facts)
    return open_verify(LoaderFiles(Root("/"), ElfCache(), None), str(path), search.arch, ELFDATA2LSB)


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_open_verify_verdicts(trees: dict[str, Path], tmp_path: Path, name: str) -> None:
    good = tree(trees, "glibc") / "lib" / "libml.so"
    spec, verdict, message = CANDIDATES[name]
    path = make_candidate(good, tmp_path, spec)
    got_verdict, facts, why = verify(path, good)
    assert (got_verdict, why) == (verdict, None if message is None else f"{path}{message}")
    assert (facts is not None) == (verdict is Verdict.OK)


def test_open_verify_good_missing_and_wrong_class(trees: dict[str, Path], tmp_path: Path) -> None:
    good = tree(trees, "glibc") / "lib" / "libml.so"
    verdict, facts, why = verify(good, good)
    assert (verdict, why) == (Verdict.OK, None) and facts is not None and facts.soname == "libml.so"
    assert verify(tmp_path / "libnone.so", good) == (Verdict.MISSING, None, None)
    m32 = tree(trees, "m32") / "libml.so"
    assert verify(m32, good) == (Verdict.OTHER, None, f"{m32} is ELFCLASS32")


def test_open_verify_short_text_file_is_too_short(trees: dict[str, Path], tmp_path: Path) -> None:
    good = tree(trees, "glibc") / "lib" / "libml.so"
    path = make_candidate(good, tmp_path, b"hello\n")
    assert verify(path, good) == (Verdict.FATAL, None, f"{path}: file too short")


@needs_ldd
@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_candidates_handled_like_ld_so(trees: dict[str, Path], tmp_path: Path, name: str) -> None:
    """The candidate first on LD_LIBRARY_PATH, the good library after it: ld.so and the closure
    agree whether the search goes on, and on the error when it stops."""
    root = tree(trees, "glibc")
    good = root / "lib" / "libml.so"
    spec, verdict, message = CANDIDATES[name]
    path = make_candidate(good, tmp_path / "cand", spec)
    llp = f"{path.parent}:{root}/lib"
    program = root / "bin" / "plain"
    found, _, output = glibc_list(program, llp)
    closure = resolve([str(program)], LoaderEnv(ld_library_path=llp), strict=False)
    if verdict is Verdict.FATAL:
        assert "libml.so" not in found and f"{path}{message}" in output
        assert closure.errors == [f"{path}{message}"]
        assert [u.name for u in closure.unresolved] == ["libml.so"]
    else:
        expected = str(path) if verdict is Verdict.OK else str(good)
        assert found["libml.so"] == expected
        assert edge(closure, "libml.so") == (expected, "ld_library_path")
        assert closure.errors == []


@needs_ldd
@pytest.mark.parametrize("ei_class", [0, 3])
def test_invalid_class_is_skipped_like_ld_so(trees: dict[str, Path], tmp_path: Path, ei_class: int) -> None:
    root = tree(trees, "glibc")
    good = root / "lib" / "libml.so"
    path = make_candidate(good, tmp_path / "cand", (4, bytes([ei_class])))
    llp = f"{path.parent}:{root}/lib"
    assert glibc_list(root / "bin" / "plain", llp)[0]["libml.so"] == str(good)
    closure = resolve([str(root / "bin" / "plain")], LoaderEnv(ld_library_path=llp), strict=False)
    assert closure.errors == []
    assert edge(closure, "libml.so") == (str(good), "ld_library_path")


# --- load_problem ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def executables(trees: dict[str, Path]) -> dict[str, Path]:
    root = tree(trees, "glibc")
    out = root / "exe"
    out.mkdir()
    lib = root / "lib"
    return {
        "exec": cc(GCC, out / "exec", main_source(("ml",)), "-no-pie", f"-L{lib}", "-lml"),  # type: ignore[arg-type]
        "pie": cc(GCC, out / "pie", main_source(("ml",)), "-pie", "-fPIE", f"-L{lib}", "-lml"),  # type: ignore[arg-type]
    }


def test_load_problem(trees: dict[str, Path], executables: dict[str, Path], tmp_path: Path) -> None:
    lib = tree(trees, "glibc") / "lib" / "libml.so"
    assert load_problem(facts_of(executables["exec"]), "/x/exec") == "/x/exec: cannot dynamically load executable"
    assert load_problem(facts_of(executables["pie"]), "/x/pie") == (
        "/x/pie: cannot dynamically load position-independent executable")
    assert load_problem(facts_of(lib), "/x/lib") is None
    relocatable = patched(lib, tmp_path / "rel.o", 16, (1).to_bytes(2, "little"))
    assert load_problem(facts_of(relocatable), "/x/rel.o") == "/x/rel.o: only ET_DYN and ET_EXEC can be loaded"


@needs_ldd
@pytest.mark.parametrize("kind, message", [
    ("exec", "cannot dynamically load executable"),
    ("pie", "cannot dynamically load position-independent executable"),
])
def test_executable_as_a_dependency_is_refused_like_ld_so(trees: dict[str, Path], executables: dict[str, Path],
                                                          tmp_path: Path, kind: str, message: str) -> None:
    root = tree(trees, "glibc")
    candidate = tmp_path / "libml.so"
    shutil.copy(executables[kind], candidate)
    llp = f"{tmp_path}:{root}/lib"
    program = root / "bin" / "plain"
    _, _, output = glibc_list(program, llp)
    assert f"libml.so: {message}" in output
    closure = resolve([str(program)], LoaderEnv(ld_library_path=llp), strict=False)
    assert closure.errors == [f"{candidate}: {message}"]
    assert [(u.name, u.searched) for u in closure.unresolved] == [("libml.so", (str(candidate),))]
    with pytest.raises(ElfError, match=re.escape(message)):
        resolve([str(program)], LoaderEnv(ld_library_path=llp))
