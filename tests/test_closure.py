"""Tests for tracejail.closure: the static loader model, checked against glibc's own ld.so.

Fixtures are small programs built here with gcc.  Wherever it makes sense the
closure is also compared with what `ldd` (the real ld.so in trace mode) says
for the same file and environment; tracejail itself never runs ldd.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import venv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from toolchain import GCC, IS_X86_64, LDCONFIG, LDD, MUSL_GCC, RTLD, run
from toolchain import compile_c as cc
from tracejail import ldcache
from tracejail.root import Root
from tracejail.closure import (
    Closure,
    Dependency,
    ElfCache,
    LoaderEnv,
    format_tree,
    is_elf,
    read_elf_facts,
    resolve,
)
from tracejail.errors import ElfError


needs_gcc = pytest.mark.skipif(GCC is None or not IS_X86_64, reason="needs gcc on x86_64")
needs_ldd = pytest.mark.skipif(LDD is None, reason="needs ldd to compare with the real loader")


# --- helpers -----------------------------------------------------------------


def lib_source(name: str, calls: tuple[str, ...] = ()) -> str:
    decls = "".join(f"int {c}(void);\n" for c in calls)
    body = " + ".join(f"{c}()" for c in calls) or "0"
    return f"{decls}int {name}(void) {{ return 1 + {body}; }}\n"


def main_source(calls: tuple[str, ...] = (), extra: str = "") -> str:
    decls = "".join(f"int {c}(void);\n" for c in calls)
    body = " + ".join(f"{c}()" for c in calls) or "0"
    return f"{extra}\n{decls}int main(void) {{ return {body}; }}\n"


LDD_LINE = re.compile(r"^\t(?:(\S+) => )?(\S+|not found)(?: \(0x[0-9a-f]+\))?$")


def ldd(path: str, env: dict[str, str] | None = None) -> tuple[set[str], set[str]] | None:
    """(paths ldd reports, as it spells them; names it could not find); None when ldd fails or says static."""
    full_env = dict(os.environ)
    full_env.pop("LD_LIBRARY_PATH", None)
    full_env.pop("LD_PRELOAD", None)
    full_env.update(env or {})
    proc = subprocess.run([LDD, path], capture_output=True, text=True, env=full_env)  # type: ignore[list-item]
    out = proc.stdout
    if "not a dynamic executable" in out + proc.stderr or "statically linked" in out:
        return None
    if proc.returncode != 0 and "not found" not in out:
        return None
    paths: set[str] = set()
    missing: set[str] = set()
    for line in out.splitlines():
        match = LDD_LINE.match(line)
        if not match:
            raise AssertionError(f"unexpected ldd line for {path}: {line!r}")
        name, target = match.groups()
        if target == "not found":
            missing.add(name)
        elif not re.match(r"linux-(vdso|gate)\.so", name or target):
            paths.add(target)
    return paths, missing


def compare_with_ldd(path: str, env: LoaderEnv = LoaderEnv(), cache: ElfCache | None = None) -> str | None:
    """None if the closure and ldd agree on `path`; otherwise a description of the difference.

    Both sides are compared as sets of os.path.realpath() (ldd prints the
    spelling ld.so opened; so does the closure, but e.g. /lib64/ld-linux and
    /lib/x86_64-linux-gnu/ld-linux are the same file).
    """
    ldd_env = {}
    if env.ld_library_path is not None:
        ldd_env["LD_LIBRARY_PATH"] = env.ld_library_path
    theirs = ldd(path, ldd_env)
    if theirs is None:
        return "ldd failed"
    their_paths = {os.path.realpath(p) for p in theirs[0]}
    their_missing = theirs[1]
    closure = resolve([path], env, cache=cache, strict=False)
    ours = {os.path.realpath(p) for p in closure.paths()} - {os.path.realpath(path)}
    missing = {u.name for u in closure.unresolved}
    if ours == their_paths and missing == their_missing and not closure.errors:
        return None
    return (
        f"{path}: only in closure {sorted(ours - their_paths)}, only in ldd {sorted(their_paths - ours)}, "
        f"unresolved {sorted(missing)} vs ldd not found {sorted(their_missing)}, errors {closure.errors}"
    )


def write_elf32_stub(path: Path, size: int = 128) -> Path:
    """A minimal 32-bit x86 ELF shared-object header: a wrong-class decoy for a 64-bit search.

    Padded to `size` bytes: a 64-bit ld.so first reads a whole Elf64_Ehdr (64
    bytes) and rejects anything shorter as "file too short" before it looks
    at the class.
    """
    ident = b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8)  # ELFCLASS32, LSB, version 1, SYSV
    header = struct.pack("<HHIIIIIHHHHHH", 3, 3, 1, 0, 0, 0, 0, 52, 32, 0, 40, 0, 0)  # ET_DYN, EM_386
    path.write_bytes((ident + header).ljust(size, b"\0"))
    return path


def by_name(closure: Closure, name: str) -> list[Dependency]:
    return [d for d in closure.deps if d.name == name]


# --- ld.so.cache ---------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/etc/ld.so.cache") or LDCONFIG is None, reason="no ld.so.cache/ldconfig")
def test_ld_so_cache_parser_agrees_with_ldconfig_p() -> None:
    cache = ldcache.parse_ld_so_cache(Path("/etc/ld.so.cache").read_bytes())
    listing = run(LDCONFIG, "-p").stdout  # type: ignore[arg-type]
    expected = set()
    for line in listing.splitlines()[1:]:
        if line.startswith("Cache generated by"):
            continue
        match = re.match(r"^\s+(\S+) \(([^)]*)\) => (\S+)$", line)
        assert match, line
        expected.add((match.group(1), match.group(3)))
    ours = {(e.key, e.value) for entries in cache.entries.values() for e in entries}
    assert ours == expected


def test_cache_key_compares_digits_numerically() -> None:
    assert ldcache.cache_key("libfoo.so.01") == ldcache.cache_key("libfoo.so.1")
    assert ldcache.cache_key("libfoo.so.10") != ldcache.cache_key("libfoo.so.1")


def test_corrupt_cache_is_rejected() -> None:
    with pytest.raises(ldcache.CacheFormatError):
        ldcache.parse_ld_so_cache(b"glibc-ld.so.cache1.1" + b"\xff" * 40)
    with pytest.raises(ldcache.CacheFormatError):
        ldcache.parse_ld_so_cache(b"not a cache")


@needs_gcc
@pytest.mark.skipif(LDCONFIG is None, reason="needs ldconfig to write a cache")
def test_cache_with_glibc_hwcaps_picks_best_supported(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    for sub in ("", "glibc-hwcaps/x86-64-v2", "glibc-hwcaps/x86-64-v3", "glibc-hwcaps/x86-64-v4"):
        (lib / sub).mkdir(parents=True, exist_ok=True)
        cc(lib / sub / "libhw.so.1", lib_source("hw"), "-shared", "-Wl,-soname,libhw.so.1")
    conf = tmp_path / "ld.so.conf"
    conf.write_text(f"{lib}\n")
    cache_file = tmp_path / "ld.so.cache"
    run(LDCONFIG, "-X", "-C", str(cache_file), "-f", str(conf))  # type: ignore[arg-type]
    cache = ldcache.parse_ld_so_cache(cache_file.read_bytes())
    assert set(cache.hwcaps_names) >= {"x86-64-v2", "x86-64-v3", "x86-64-v4"}
    assert any(e.is_hwcaps_subdir for e in cache.entries[ldcache.cache_key("libhw.so.1")])

    def pick(supported: list[str]) -> str | None:
        return cache.lookup(
            "libhw.so.1",
            accept_flags=lambda f: f == 0x0303,
            default_flags=0x0303,
            hwcaps_priority={name: i + 1 for i, name in enumerate(supported)},
        )

    assert pick(["x86-64-v4", "x86-64-v3", "x86-64-v2"]) == f"{lib}/glibc-hwcaps/x86-64-v4/libhw.so.1"
    assert pick(["x86-64-v3", "x86-64-v2"]) == f"{lib}/glibc-hwcaps/x86-64-v3/libhw.so.1"
    assert pick(["x86-64-v2"]) == f"{lib}/glibc-hwcaps/x86-64-v2/libhw.so.1"
    assert pick([]) == f"{lib}/libhw.so.1"


def test_ld_so_conf_includes(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc / "ld.so.conf.d").mkdir(parents=True)
    (etc / "ld.so.conf").write_text("# comment\ninclude /etc/ld.so.conf.d/*.conf\n/opt/first/\n")
    (etc / "ld.so.conf.d" / "b.conf").write_text("/opt/b\n")
    (etc / "ld.so.conf.d" / "a.conf").write_text("/opt/a  # trailing comment\nhwcap 0 nosegneg\n/opt/a\n")
    assert ldcache.parse_ld_so_conf(Root(str(tmp_path))) == ["/opt/a", "/opt/b", "/opt/first"]


def test_musl_path_file() -> None:
    assert ldcache.musl_path_file("/lib/ld-musl-x86_64.so.1", "x86_64") == "/etc/ld-musl-x86_64.path"
    assert ldcache.musl_path_file("/opt/m/lib/ld-musl-x86_64.so.1", "x86_64") == "/opt/m/etc/ld-musl-x86_64.path"
    assert ldcache.parse_musl_path("/a:/b\n/c\n\n") == ["/a", "/b", "/c"]


# --- fixtures built with gcc ----------------------------------------------------------


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree of hand-made programs and libraries exercising the loader rules."""
    if GCC is None or not IS_X86_64:
        pytest.skip("needs gcc on x86_64")
    root = tmp_path_factory.mktemp("fx")
    for sub in ("rp", "bin", "lib", "good", "decoy", "missing", "cyc", "trunc", "hw", "slash"):
        (root / sub).mkdir()
    rp, lib = root / "rp", root / "lib"

    # RPATH inheritance: exe (RPATH rp) -> libmid (no paths) -> libleaf (only in rp).
    cc(rp / "libleaf.so", lib_source("leaf"), "-shared", "-Wl,-soname,libleaf.so")
    cc(rp / "libmid.so", lib_source("mid", ("leaf",)), "-shared", "-Wl,-soname,libmid.so", f"-L{rp}", "-lleaf")
    link = (main_source(("mid",)), f"-L{rp}", "-lmid", "-Wl,--allow-shlib-undefined")
    cc(root / "bin" / "with_rpath", link[0], *link[1:], f"-Wl,-rpath,{rp}", "-Wl,--disable-new-dtags")
    cc(root / "bin" / "with_runpath", link[0], *link[1:], f"-Wl,-rpath,{rp}", "-Wl,--enable-new-dtags")

    # $ORIGIN: bin/origin_app has RUNPATH $ORIGIN/../lib.
    cc(lib / "libori.so", lib_source("ori"), "-shared", "-Wl,-soname,libori.so")
    cc(root / "bin" / "origin_app", main_source(("ori",)), f"-L{lib}", "-lori", "-Wl,-rpath,$ORIGIN/../lib", "-Wl,--enable-new-dtags")

    # Wrong-class decoy: a 32-bit libdec.so earlier on LD_LIBRARY_PATH than the real one.
    cc(root / "good" / "libdec.so", lib_source("dec"), "-shared", "-Wl,-soname,libdec.so")
    write_elf32_stub(root / "decoy" / "libdec.so")
    cc(root / "bin" / "decoy_app", main_source(("dec",)), f"-L{root / 'good'}", "-ldec")

    # A missing library: link against a stub, then remove it.
    cc(root / "missing" / "libgone.so", lib_source("gone"), "-shared", "-Wl,-soname,libgone.so")
    cc(root / "bin" / "missing_app", main_source(("gone",)), f"-L{root / 'missing'}", "-lgone")
    (root / "missing" / "libgone.so").unlink()

    # Circular NEEDED: libcyc1 <-> libcyc2 (build 1 without the dep, 2 against 1, 1 again against 2).
    cyc = root / "cyc"
    cc(cyc / "libcyc1.so", lib_source("c1"), "-shared", "-Wl,-soname,libcyc1.so")
    cc(cyc / "libcyc2.so", lib_source("c2", ("c1",)), "-shared", "-Wl,-soname,libcyc2.so", f"-L{cyc}", "-lcyc1")
    cc(cyc / "libcyc1.so", lib_source("c1"), "-shared", "-Wl,-soname,libcyc1.so", f"-L{cyc}", "-Wl,--no-as-needed", "-lcyc2")
    cc(root / "bin" / "cyc_app", main_source(("c1",)), f"-L{cyc}", "-lcyc1", f"-Wl,-rpath,{cyc}", "-Wl,--disable-new-dtags")

    # Truncated library as a dependency, and truncated files as roots.
    trunc = root / "trunc"
    cc(trunc / "libcut.so", lib_source("cut"), "-shared", "-Wl,-soname,libcut.so")
    cc(root / "bin" / "trunc_app", main_source(("cut",)), f"-L{trunc}", "-lcut", f"-Wl,-rpath,{trunc}")
    data = (trunc / "libcut.so").read_bytes()
    (trunc / "libcut.so").write_bytes(data[:100])
    (root / "truncated_header.so").write_bytes(data[:30])

    # glibc-hwcaps subdirectories in a search directory.
    hw = root / "hw"
    for sub in ("", "glibc-hwcaps/x86-64-v2", "glibc-hwcaps/x86-64-v3", "glibc-hwcaps/x86-64-v4"):
        (hw / sub).mkdir(parents=True, exist_ok=True)
        cc(hw / sub / "libhw.so", lib_source("hw"), "-shared", "-Wl,-soname,libhw.so")
    cc(root / "bin" / "hw_app", main_source(("hw",)), f"-L{hw}", "-lhw", f"-Wl,-rpath,{hw}")

    # $LIB and $PLATFORM in an RPATH.
    platform_dir = root / "dst" / "lib" / "x86_64-linux-gnu"
    platform_dir.mkdir(parents=True)
    cc(platform_dir / "libdst.so", lib_source("dst"), "-shared", "-Wl,-soname,libdst.so")
    cc(root / "bin" / "dst_app", main_source(("dst",)), f"-L{platform_dir}", "-ldst", f"-Wl,-rpath,{root}/dst/$LIB", "-Wl,--disable-new-dtags")

    # A DT_NEEDED with a slash: link with the path and no soname.
    cc(root / "slash" / "libslash.so", lib_source("sl"), "-shared")
    cc(root / "bin" / "slash_app", main_source(("sl",)), str(root / "slash" / "libslash.so"))

    # Run-time loads: NSS, pthread_cancel, iconv.
    runtime_src = (
        "#include <pwd.h>\n#include <pthread.h>\n#include <iconv.h>\n"
        "int main(void) { getpwnam(\"root\"); pthread_cancel(pthread_self()); iconv_open(\"UTF-16\", \"UTF-8\"); return 0; }\n"
    )
    cc(root / "bin" / "runtime_app", runtime_src, "-pthread")
    cc(root / "bin" / "plain_app", main_source())

    # Static and static-pie executables (libc.a is part of libc6-dev).
    try:
        cc(root / "bin" / "static_app", main_source(), "-static")
        cc(root / "bin" / "static_pie_app", main_source(), "-static-pie")
    except subprocess.CalledProcessError:
        pass

    # Scripts.
    (root / "bin" / "sh_script").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "env_script").write_text("#!/usr/bin/env -S mytool -v\n")
    (root / "bin" / "no_interp_script").write_text("#!/nonexistent/interp\n")
    tools = root / "tools"
    tools.mkdir()
    shutil.copy(root / "bin" / "plain_app", tools / "mytool")
    for script in ("sh_script", "env_script", "no_interp_script"):
        (root / "bin" / script).chmod(0o755)
    (root / "notes.txt").write_text("not a program\n")
    return root


def test_rpath_is_inherited(fx: Path) -> None:
    exe = str(fx / "bin" / "with_rpath")
    closure = resolve([exe])
    leaf = by_name(closure, "libleaf.so")
    assert [(d.path, d.needed_by, d.rule) for d in leaf] == [(f"{fx}/rp/libleaf.so", f"{fx}/rp/libmid.so", "rpath")]
    assert not closure.unresolved


def test_runpath_is_not_inherited(fx: Path) -> None:
    exe = str(fx / "bin" / "with_runpath")
    closure = resolve([exe])
    mid = by_name(closure, "libmid.so")
    assert [(d.path, d.rule) for d in mid] == [(f"{fx}/rp/libmid.so", "runpath")]
    assert [(u.name, u.needed_by) for u in closure.unresolved] == [("libleaf.so", f"{fx}/rp/libmid.so")]
    # The search the loader made for libleaf.so did not include the executable's RUNPATH.
    assert f"{fx}/rp" not in closure.unresolved[0].searched


@needs_ldd
@pytest.mark.parametrize(
    "program,env",
    [
        ("with_rpath", {}),
        ("with_runpath", {}),
        ("origin_app", {}),
        ("missing_app", {}),
        ("cyc_app", {}),
        ("hw_app", {}),
        ("dst_app", {}),
        ("slash_app", {}),
        ("decoy_app", {"ld_library_path": "{fx}/decoy:{fx}/good"}),
        ("with_runpath", {"ld_library_path": "{fx}/rp"}),
    ],
)
def test_fixture_agrees_with_ldd(fx: Path, program: str, env: dict[str, str]) -> None:
    loader_env = LoaderEnv(**{k: v.format(fx=fx) for k, v in env.items()})
    assert compare_with_ldd(str(fx / "bin" / program), loader_env) is None


def test_origin_expansion(fx: Path) -> None:
    closure = resolve([str(fx / "bin" / "origin_app")])
    (dep,) = by_name(closure, "libori.so")
    # The loader's spelling is kept: $ORIGIN/../lib, not normalised.
    assert dep.path == f"{fx}/bin/../lib/libori.so"
    assert dep.rule == "runpath" and dep.via_origin
    assert dep.search == "$ORIGIN/../lib"   # the entry as written: explain shows it, no ELF re-read
    assert os.path.realpath(dep.path) == str(fx / "lib" / "libori.so")


def test_origin_of_executable_follows_symlinks(fx: Path, tmp_path: Path) -> None:
    # The kernel resolves /proc/self/exe, so $ORIGIN is the real directory.
    link = tmp_path / "origin_link"
    link.symlink_to(fx / "bin" / "origin_app")
    closure = resolve([str(link)])
    (dep,) = by_name(closure, "libori.so")
    assert dep.path == f"{fx}/bin/../lib/libori.so"


def test_wrong_class_decoy_is_skipped(fx: Path) -> None:
    env = LoaderEnv(ld_library_path=f"{fx}/decoy:{fx}/good")
    closure = resolve([str(fx / "bin" / "decoy_app")], env)
    (dep,) = by_name(closure, "libdec.so")
    assert dep.path == f"{fx}/good/libdec.so"
    assert dep.rule == "ld_library_path"
    assert any(f"{fx}/decoy/libdec.so is ELFCLASS32" in note for note in closure.notes)


def test_too_short_candidate_stops_the_search_like_ld_so(fx: Path, tmp_path: Path) -> None:
    # glibc reads a whole Elf64_Ehdr first: a 52-byte ELF32 header is "file too short", a fatal error.
    write_elf32_stub(tmp_path / "libdec.so", size=52)
    env = LoaderEnv(ld_library_path=f"{tmp_path}:{fx}/good")
    exe = str(fx / "bin" / "decoy_app")
    with pytest.raises(ElfError, match=re.escape(f"{tmp_path}/libdec.so: file too short")):
        resolve([exe], env)
    closure = resolve([exe], env, strict=False)
    assert [u.name for u in closure.unresolved] == ["libdec.so"]
    if LDD:
        ld_env = {**os.environ, "LD_LIBRARY_PATH": env.ld_library_path or ""}
        proc = subprocess.run([LDD, exe], capture_output=True, text=True, env=ld_env)
        assert "file too short" in proc.stdout + proc.stderr


def test_real_32bit_library_is_skipped(fx: Path, tmp_path: Path) -> None:
    decoy = tmp_path / "libdec.so"
    try:
        cc(decoy, lib_source("dec"), "-shared", "-m32", "-Wl,-soname,libdec.so")
    except subprocess.CalledProcessError:
        pytest.skip("gcc -m32 not available (gcc-multilib)")
    env = LoaderEnv(ld_library_path=f"{tmp_path}:{fx}/good")
    closure = resolve([str(fx / "bin" / "decoy_app")], env)
    assert [d.path for d in by_name(closure, "libdec.so")] == [f"{fx}/good/libdec.so"]
    if LDD:
        assert compare_with_ldd(str(fx / "bin" / "decoy_app"), env) is None


def test_missing_library_is_reported_not_raised(fx: Path) -> None:
    exe = str(fx / "bin" / "missing_app")
    closure = resolve([exe])  # strict: a missing library is not an error
    (missing,) = closure.unresolved
    assert missing.name == "libgone.so" and missing.needed_by == exe
    assert "/etc/ld.so.cache" in missing.searched and "/usr/lib" in missing.searched
    tree = format_tree(closure)
    assert "libgone.so => not found" in tree
    assert f"not found: libgone.so (needed by {exe}" in tree
    assert not closure.errors


def test_circular_needed_terminates(fx: Path) -> None:
    closure = resolve([str(fx / "bin" / "cyc_app")])
    assert {d.name for d in closure.deps} >= {"libcyc1.so", "libcyc2.so"}
    edges = {(os.path.basename(d.path), os.path.basename(d.needed_by)) for d in closure.deps}
    assert ("libcyc2.so", "libcyc1.so") in edges and ("libcyc1.so", "libcyc2.so") in edges
    # Either library as a root: its dependency's need for it resolves to the root itself.
    lib_closure = resolve([str(fx / "cyc" / "libcyc1.so")], LoaderEnv(ld_library_path=str(fx / "cyc")))
    assert not lib_closure.unresolved
    assert {os.path.basename(p) for p in lib_closure.paths()} >= {"libcyc1.so", "libcyc2.so"}


def test_truncated_root_raises_naming_the_file(fx: Path) -> None:
    path = str(fx / "truncated_header.so")
    with pytest.raises(ElfError, match=re.escape(path) + ".*truncated"):
        resolve([path])
    closure = resolve([path], strict=False)
    assert len(closure.errors) == 1 and path in closure.errors[0]


def test_truncated_dependency(fx: Path) -> None:
    exe = str(fx / "bin" / "trunc_app")
    lib = f"{fx}/trunc/libcut.so"
    with pytest.raises(ElfError) as info:
        resolve([exe])
    assert lib in str(info.value) and "truncated" in str(info.value)
    closure = resolve([exe], strict=False)
    assert any(lib in e for e in closure.errors)
    assert [u.name for u in closure.unresolved] == ["libcut.so"]


def test_hwcaps_subdirectory_chosen_like_ld_so(fx: Path) -> None:
    closure = resolve([str(fx / "bin" / "hw_app")])
    (dep,) = by_name(closure, "libhw.so")
    flags = ElfCache().cpu_flags()
    if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2"} <= flags:
        assert dep.path.endswith("glibc-hwcaps/x86-64-v4/libhw.so")
    elif {"avx2", "bmi2", "fma", "movbe"} <= flags:
        assert dep.path.endswith("glibc-hwcaps/x86-64-v3/libhw.so")
    assert dep.rule == "runpath"  # Debian's gcc links with --enable-new-dtags


def test_lib_and_platform_tokens(fx: Path) -> None:
    closure = resolve([str(fx / "bin" / "dst_app")])
    (dep,) = by_name(closure, "libdst.so")
    assert dep.path == f"{fx}/dst/lib/x86_64-linux-gnu/libdst.so"
    assert dep.rule == "rpath" and not dep.via_origin


def test_needed_with_slash_is_a_path(fx: Path) -> None:
    closure = resolve([str(fx / "bin" / "slash_app")])
    (dep,) = [d for d in closure.deps if d.rule == "slash"]
    assert dep.path == dep.name == f"{fx}/slash/libslash.so"


def test_interpreter_kept_at_exact_path(fx: Path) -> None:
    exe = str(fx / "bin" / "plain_app")
    closure = resolve([exe])
    interp = [d for d in closure.deps if d.needed_by == exe and d.rule == "interp"]
    assert [(d.path, d.name) for d in interp] == [(RTLD, RTLD)]
    # libc's own need for ld-linux-x86-64.so.2 is the already-loaded interpreter.
    libc_needs = [d for d in closure.deps if d.name == "ld-linux-x86-64.so.2"]
    assert [d.path for d in libc_needs] == [RTLD]


def test_static_executables_have_no_deps(fx: Path) -> None:
    for name in ("static_app", "static_pie_app"):
        path = fx / "bin" / name
        if not path.exists():
            pytest.skip("gcc cannot link static programs here")
        closure = resolve([str(path)])
        assert closure.deps == [] and closure.unresolved == []
        assert closure.paths() == {str(path)}


def test_script_interpreter_and_its_closure(fx: Path) -> None:
    script = str(fx / "bin" / "sh_script")
    closure = resolve([script])
    assert closure.roots == [script]
    (shebang,) = [d for d in closure.deps if d.rule == "shebang"]
    assert (shebang.path, shebang.needed_by) == ("/bin/sh", script)
    assert any(d.needed_by == "/bin/sh" and d.name == "libc.so.6" for d in closure.deps)


def test_env_shebang_resolved_on_recorded_path(fx: Path) -> None:
    script = str(fx / "bin" / "env_script")
    closure = resolve([script], LoaderEnv(path=f"/nonexistent:{fx}/tools"))
    rules = {d.rule: d for d in closure.deps if d.needed_by == script}
    assert rules["shebang"].path == "/usr/bin/env"
    assert rules["env-shebang"].path == f"{fx}/tools/mytool" and rules["env-shebang"].name == "mytool"
    assert any(d.needed_by == f"{fx}/tools/mytool" and d.rule == "interp" for d in closure.deps)
    # Not on PATH: unresolved, naming the directories searched.
    closure = resolve([script], LoaderEnv(path="/nonexistent"))
    assert [(u.name, u.searched) for u in closure.unresolved] == [("mytool", ("/nonexistent",))]


def test_missing_script_interpreter(fx: Path) -> None:
    closure = resolve([str(fx / "bin" / "no_interp_script")])
    assert [u.name for u in closure.unresolved] == ["/nonexistent/interp"]


def test_read_elf_facts(fx: Path) -> None:
    facts = read_elf_facts(str(fx / "rp" / "libmid.so"))
    assert facts is not None
    assert facts.soname == "libmid.so" and facts.needed[0] == "libleaf.so"
    assert facts.interp is None and facts.dynamic and facts.class_name == "ELFCLASS64"
    exe = read_elf_facts(str(fx / "bin" / "with_runpath"))
    assert exe is not None and exe.interp == RTLD and exe.runpath == f"{fx}/rp" and exe.rpath is None
    assert read_elf_facts(str(fx / "notes.txt")) is None


def test_non_elf_non_script_is_ignored(fx: Path) -> None:
    closure = resolve([str(fx / "notes.txt")])
    assert closure.roots == [] and closure.deps == [] and not closure.errors
    assert not is_elf(str(fx / "notes.txt"))
    assert is_elf(str(fx / "bin" / "plain_app"))


def test_runtime_loads_only_when_triggered(fx: Path) -> None:
    exe = str(fx / "bin" / "runtime_app")
    plain = resolve([exe])
    assert not [d for d in plain.deps if d.rule.startswith("runtime:")]

    closure = resolve([exe], runtime=True)
    runtime = [d for d in closure.deps if d.rule.startswith("runtime:")]
    rules = {d.rule for d in runtime}
    assert "runtime:libgcc_s" in rules
    gcc_s = [d for d in runtime if d.rule == "runtime:libgcc_s"][0]
    assert gcc_s.name == "libgcc_s.so.1" and "pthread_cancel" in gcc_s.reason
    assert gcc_s.needed_by.endswith("libc.so.6")
    # iconv is only a run-time load when the trace shows the gconv configuration being read.
    assert not [d for d in runtime if d.rule == "runtime:gconv"]
    gconv_dir = "/usr/lib/x86_64-linux-gnu/gconv"
    if os.path.isdir(gconv_dir):
        # reading only the configuration (as setlocale() does) is not iconv use
        assert not [d for d in resolve([exe], runtime_triggers=[f"{gconv_dir}/gconv-modules.cache"]).deps
                    if d.rule == "runtime:gconv"]
        traced = resolve([exe], runtime_triggers=[f"{gconv_dir}/ISO8859-15.so"])
        gconv = [d for d in traced.deps if d.rule == "runtime:gconv"]
        assert any(d.path == f"{gconv_dir}/UTF-16.so" for d in gconv)
        assert any(d.path == f"{gconv_dir}/gconv-modules" for d in gconv)
        assert all("ISO8859-15.so in the trace" in d.reason for d in gconv)
        # Converter modules bring their own dependencies (found via their $ORIGIN runpath).
        assert any(d.name == "libJIS.so" and d.via_origin for d in traced.deps) or not os.path.exists(f"{gconv_dir}/libJIS.so")
    # NSS modules only when the run read nsswitch.conf (the image holds it only then), even
    # though runtime_app imports getpwnam.
    assert not [d for d in runtime if d.rule == "runtime:nss"]
    # A program that imports none of the symbols: only the traced path fires.
    other = str(fx / "bin" / "plain_app")
    assert not [d for d in resolve([other], runtime=True).deps if d.rule.startswith("runtime:")]
    traced = resolve([other], runtime_triggers=["/etc/nsswitch.conf"])
    assert {d.rule for d in traced.deps if d.rule.startswith("runtime:")} <= {"runtime:nss"}
    assert all("/etc/nsswitch.conf in the trace" in d.reason for d in traced.deps if d.rule == "runtime:nss")


def test_nsswitch_parsing() -> None:
    from tracejail.runtime_loads import parse_gconv_modules, parse_nsswitch

    text = "passwd: files systemd\nhosts: files [NOTFOUND=return] mdns4_minimal dns # c\n#x: y\n"
    assert parse_nsswitch(text) == [
        ("passwd", "files"), ("passwd", "systemd"), ("hosts", "files"), ("hosts", "mdns4_minimal"), ("hosts", "dns"),
    ]
    assert parse_gconv_modules("alias A// B//\nmodule X// INTERNAL FOO 1\nmodule INTERNAL X// FOO 1\n") == ["FOO"]


def test_runtime_nss_module_resolved(tmp_path: Path, fx: Path) -> None:
    if not os.path.exists("/lib/x86_64-linux-gnu/libnss_systemd.so.2"):
        pytest.skip("libnss_systemd.so.2 not installed")
    exe = str(fx / "bin" / "runtime_app")
    closure = resolve([exe], runtime_triggers=["/etc/nsswitch.conf"])
    nss = [d for d in closure.deps if d.rule == "runtime:nss" and d.name.startswith("libnss_")]
    if "systemd" in Path("/etc/nsswitch.conf").read_text():
        assert any(d.name == "libnss_systemd.so.2" for d in nss)
    assert not any(d.name in ("libnss_files.so.2", "libnss_dns.so.2") for d in nss)


def test_ld_preload(fx: Path) -> None:
    exe = str(fx / "bin" / "plain_app")
    closure = resolve([exe], LoaderEnv(ld_preload=f"{fx}/good/libdec.so"))
    (dep,) = [d for d in closure.deps if d.rule == "preload"]
    assert dep.path == f"{fx}/good/libdec.so" and dep.needed_by == exe


def test_facts_parsed_once_per_file(fx: Path, tmp_path: Path) -> None:
    cache = ElfCache()
    resolve([str(fx / "bin" / "with_rpath")], cache=cache)
    parsed = cache.parsed
    # Another spelling of the same files (a symlink) and a second run parse nothing new.
    link = tmp_path / "alias"
    link.symlink_to(fx / "bin" / "with_rpath")
    resolve([str(link), str(fx / "bin" / "with_rpath")], cache=cache)
    assert cache.parsed == parsed
    assert cache.hits > 0


def test_json_and_tree(fx: Path) -> None:
    exe = str(fx / "bin" / "with_runpath")
    closure = resolve([exe])
    data = json.loads(json.dumps(closure.to_json()))
    assert data["roots"] == [exe]
    assert {"path", "needed_by", "name", "rule", "reason", "via_origin"} <= set(data["deps"][0])
    assert data["unresolved"][0]["name"] == "libleaf.so"
    assert set(data["paths"]) == closure.paths()
    tree = format_tree(closure)
    assert tree.splitlines()[0] == f"{exe} (interpreter => {RTLD})"
    assert f"    libmid.so => {fx}/rp/libmid.so [runpath]" in tree
    assert "        libleaf.so => not found" in tree


# --- a staged root with its own ld.so.cache / ld.so.conf ------------------------------


@pytest.fixture()
def staged(fx: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for sub in ("etc", "opt/lib", "lib/x86_64-linux-gnu", "lib64", "app"):
        (root / sub).mkdir(parents=True)
    shutil.copy(os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6"), root / "lib/x86_64-linux-gnu/libc.so.6")
    shutil.copy(os.path.realpath(RTLD), root / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    (root / "lib64/ld-linux-x86-64.so.2").symlink_to("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    shutil.copy(fx / "rp" / "libleaf.so", root / "opt/lib/libleaf.so")
    shutil.copy(fx / "rp" / "libmid.so", root / "opt/lib/libmid.so")
    shutil.copy(fx / "bin" / "with_runpath", root / "app/prog")  # its RUNPATH points outside the root
    (root / "etc/ld.so.conf").write_text("/opt/lib\n")
    return root


@pytest.mark.skipif(LDCONFIG is None, reason="needs ldconfig to write the staged cache")
def test_staged_root_uses_its_own_cache(staged: Path) -> None:
    run(LDCONFIG, "-r", str(staged), "-X")  # type: ignore[arg-type]
    closure = resolve(["/app/prog"], LoaderEnv(root=str(staged)))
    found = {d.name: (d.path, d.rule) for d in closure.deps}
    assert found["libmid.so"] == ("/opt/lib/libmid.so", "ld.so.cache")
    assert found["libleaf.so"] == ("/opt/lib/libleaf.so", "ld.so.cache")
    assert found["libc.so.6"] == ("/lib/x86_64-linux-gnu/libc.so.6", "ld.so.cache")
    assert found["/lib64/ld-linux-x86-64.so.2"] == ("/lib64/ld-linux-x86-64.so.2", "interp")
    assert not closure.unresolved


def test_staged_root_without_cache_falls_back_to_ld_so_conf(staged: Path) -> None:
    closure = resolve(["/app/prog"], LoaderEnv(root=str(staged)))
    found = {d.name: (d.path, d.rule) for d in closure.deps}
    assert found["libmid.so"] == ("/opt/lib/libmid.so", "ld.so.conf")
    # libc is not in an ld.so.conf directory: the ld.so copied into the tree names its default directories.
    assert found["libc.so.6"] == ("/lib/x86_64-linux-gnu/libc.so.6", "default")
    assert any("ld.so.conf" in note for note in closure.notes)
    assert not closure.unresolved


# --- musl ------------------------------------------------------------------------------



@pytest.mark.skipif(MUSL_GCC is None or not os.path.exists("/lib/ld-musl-x86_64.so.1"), reason="needs musl-gcc and musl's loader")
def test_musl_program(tmp_path: Path) -> None:
    libdir = tmp_path / "lib"
    libdir.mkdir()
    src = tmp_path / "m.c"
    (tmp_path / "l.c").write_text(lib_source("ml"))
    run(MUSL_GCC, "-shared", "-fPIC", "-o", str(libdir / "libml.so"), str(tmp_path / "l.c"), "-Wl,-soname,libml.so")  # type: ignore[arg-type]
    src.write_text(main_source(("ml",)))
    exe = tmp_path / "m"
    run(MUSL_GCC, "-o", str(exe), str(src), f"-L{libdir}", "-lml", "-Wl,-rpath,$ORIGIN/lib", "-Wl,--enable-new-dtags")  # type: ignore[arg-type]
    closure = resolve([str(exe)])
    found = {d.name: d for d in closure.deps}
    interp = next(d for d in closure.deps if d.rule == "interp")
    assert interp.path.startswith("/lib/ld-musl-")
    assert found["libml.so"].path == f"{tmp_path}/lib/libml.so" and found["libml.so"].via_origin
    # musl's libc.so is its loader: no separate file.
    assert found["libc.so"].path == interp.path
    assert not closure.unresolved


# --- the big comparison with ldd ---------------------------------------------------------

PYENV_DYNLOAD = os.path.join(
    os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))),
    "lib",
    f"python{sys.version_info.major}.{sys.version_info.minor}",
    "lib-dynload",
)


@pytest.fixture(scope="session")
def numpy_pillow_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the numpy and Pillow wheels, whose extensions use $ORIGIN runpaths into *.libs."""
    home = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True, symlinks=True).create(home)
    pip = subprocess.run(
        [str(home / "bin" / "python"), "-m", "pip", "install", "--quiet", "--only-binary=:all:", "numpy", "pillow"],
        capture_output=True,
        text=True,
    )
    if pip.returncode != 0:
        pytest.skip(f"pip could not install numpy and pillow: {pip.stderr.strip()[-300:]}")
    (site,) = (home / "lib").glob("python*/site-packages")
    return site


def elf_files(top: str, recursive: bool = True) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path) and os.path.isfile(path) and is_elf(path):
                found.append(path)
        if not recursive:
            dirnames[:] = []
    return sorted(found)


@pytest.mark.slow
@needs_ldd
@pytest.mark.skipif(not IS_X86_64, reason="the ldd comparison is for x86_64 hosts")
def test_closure_matches_ldd_everywhere(numpy_pillow_venv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The closure equals ldd's list for every ELF file where ldd succeeds.

    Sets compared: os.path.realpath() of every path on both sides (the file
    itself excluded, linux-vdso ignored), plus the names each side could not
    find.  Files where ldd fails or reports a static binary are counted and
    skipped.  The paths as spelled (ld.so's l_name, e.g. /lib64/ld-linux...
    vs /lib/x86_64-linux-gnu/ld-linux...) are compared too, and must agree.
    """
    groups = {
        "/usr/bin": elf_files("/usr/bin", recursive=False),
        "/usr/sbin": elf_files("/usr/sbin", recursive=False),
        "/usr/lib/x86_64-linux-gnu": elf_files("/usr/lib/x86_64-linux-gnu"),
        "lib-dynload": elf_files(PYENV_DYNLOAD),
        "numpy+pillow venv": [
            p for p in elf_files(str(numpy_pillow_venv))
            if "/numpy" in p or "/PIL/" in p or "/pillow.libs/" in p
        ],
    }
    assert groups["lib-dynload"], f"no extension modules found in {PYENV_DYNLOAD}"
    assert any("numpy.libs" in p for p in groups["numpy+pillow venv"])
    files = sorted({p for paths in groups.values() for p in paths})
    with ThreadPoolExecutor(max_workers=max(2, 2 * (os.cpu_count() or 1))) as pool:
        ldd_results = dict(zip(files, pool.map(ldd, files)))

    cache = ElfCache()
    compared = ldd_failed = 0
    differences: list[str] = []
    spelling: list[str] = []
    origin_edges = 0
    for path in files:
        theirs = ldd_results[path]
        if theirs is None:
            ldd_failed += 1
            continue
        compared += 1
        their_spelling, their_missing = theirs
        their_paths = {os.path.realpath(p) for p in their_spelling}
        closure = resolve([path], cache=cache, strict=False)
        origin_edges += sum(d.via_origin for d in closure.deps)
        if closure.paths() - {path} != their_spelling:
            spelling.append(f"{path}: {sorted(closure.paths() - {path} - their_spelling)} vs {sorted(their_spelling - closure.paths())}")
        ours = {os.path.realpath(p) for p in closure.paths()} - {os.path.realpath(path)}
        missing = {u.name for u in closure.unresolved}
        if ours != their_paths or missing != their_missing or closure.errors:
            differences.append(
                f"{path}: only in closure {sorted(ours - their_paths)}, only in ldd {sorted(their_paths - ours)}, "
                f"unresolved {sorted(missing)} vs {sorted(their_missing)}, errors {closure.errors}"
            )
    with capsys.disabled():
        print(
            f"\nclosure vs ldd: {len(files)} ELF files "
            + ", ".join(f"{k}: {len(v)}" for k, v in groups.items())
            + f"; compared {compared}, ldd failed/static {ldd_failed}, identical {compared - len(differences)}, "
            f"different {len(differences)}; spelled differently {len(spelling)}; {origin_edges} $ORIGIN edges"
        )
        for line in differences:
            print("  DIFF", line)
        for line in spelling[:20]:
            print("  SPELLING", line)
    assert compared > 1000
    assert origin_edges > 0
    assert not differences, "\n".join(differences)
    assert not spelling, "\n".join(spelling)
