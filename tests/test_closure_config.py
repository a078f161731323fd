"""Tests for tracejail.closure.config: what each loader reads before it searches.

glibc's compiled-in directories (found in ld.so's own bytes), its hwcaps subdirectories (checked
against what this machine's ld.so prints with --help and LD_DEBUG=libs), ld.so.cache or
ld.so.conf in a staged tree; musl's /etc/ld-musl-$ARCH.path; and which C library runs a program.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from toolchain import GCC, IS_X86_64, LDCONFIG, MUSL_GCC, RTLD, RTLD32, run
from tracejail import ldcache
from tracejail.closure.config import (
    GlibcConfig,
    MuslConfig,
    arch_for,
    find_system_dirs,
    glibc_config,
    is_musl_program,
    legacy_hwcaps,
    musl_config,
    power_set_subdirs,
    x86_64_hwcaps,
)
from tracejail.closure.files import LoaderFiles
from tracejail.elf import ELFCLASS32, ELFCLASS64, ElfCache, ElfFacts, read_elf_facts
from tracejail.root import Root


needs_x86_64_rtld = pytest.mark.skipif(not IS_X86_64 or not os.path.exists(RTLD), reason="needs x86_64 glibc's ld.so")
needs_rtld32 = pytest.mark.skipif(not IS_X86_64 or not os.path.exists(RTLD32), reason="needs the i386 ld.so (libc6-i386)")


# --- helpers -----------------------------------------------------------------


def ld_so_help(rtld: str) -> str:
    return run(rtld, "--help").stdout


def help_section(text: str, title: str) -> list[str]:
    """The indented lines under a heading of `ld.so --help`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    section: list[str] = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        section.append(line.strip())
    return section


def loader_search_subdirs(program: str) -> list[str]:
    """The subdirectories ld.so tries in every search directory, from LD_DEBUG=libs: the search
    of an LD_PRELOAD name along LD_LIBRARY_PATH, in order, duplicates removed."""
    top = "/nonexistent-tj-dir"
    env = {"PATH": "/usr/bin:/bin", "LD_DEBUG": "libs", "LD_LIBRARY_PATH": top, "LD_PRELOAD": "libtj-none.so"}
    proc = subprocess.run([program], capture_output=True, text=True, env=env)
    match = re.search(r"search path=(\S+)\s+\(LD_LIBRARY_PATH\)", proc.stderr)
    assert match, proc.stderr[:2000]
    subdirs: list[str] = []
    for entry in match.group(1).split(":"):
        assert entry == top or entry.startswith(top + "/"), entry
        sub = entry[len(top) + 1 :]
        if sub not in subdirs:
            subdirs.append(sub)
    return subdirs


def host_files() -> LoaderFiles:
    return LoaderFiles(Root("/"), ElfCache(), None)


def tree_files(root: Path) -> LoaderFiles:
    return LoaderFiles(Root(str(root)), ElfCache(), None)


def x86_64_facts() -> ElfFacts:
    facts = read_elf_facts(RTLD)
    assert facts is not None
    return facts


def system_dirs_blob(dirs: list[bytes], size_fmt: str) -> bytes:
    """Bytes laid out as ld.so keeps its compiled-in directories: an array of their lengths
    (size_t), then the NUL-terminated strings, with unrelated bytes around them."""
    lengths = struct.pack(f"<{len(dirs)}{size_fmt}", *(len(d) for d in dirs))
    return b"\x7fELF\x02\x01junk/x/\0" + lengths + b"".join(d + b"\0" for d in dirs) + b"\0trailing /usr/share/\0"


class Notes(list):
    """Collects the notes a config builder emits."""

    def __call__(self, text: str) -> None:
        self.append(text)


# --- find_system_dirs -----------------------------------------------------------------------


@needs_x86_64_rtld
def test_system_dirs_of_this_machines_ld_so_match_its_help() -> None:
    expected = tuple(
        line.split(" (system search path)")[0].rstrip("/") or "/"
        for line in help_section(ld_so_help(RTLD), "Shared library search path:")
        if line.endswith("(system search path)")
    )
    assert expected  # the heading is there and lists directories
    assert find_system_dirs(Path(RTLD).read_bytes(), ELFCLASS64) == expected


@needs_rtld32
def test_system_dirs_of_the_32bit_ld_so_match_its_help() -> None:
    expected = tuple(
        line.split(" (system search path)")[0].rstrip("/")
        for line in help_section(ld_so_help(RTLD32), "Shared library search path:")
        if line.endswith("(system search path)")
    )
    assert expected
    assert find_system_dirs(Path(RTLD32).read_bytes(), ELFCLASS32) == expected


@pytest.mark.parametrize("elf_class, size_fmt", [(ELFCLASS64, "Q"), (ELFCLASS32, "I")])
def test_system_dirs_from_a_hand_made_blob(elf_class: int, size_fmt: str) -> None:
    blob = system_dirs_blob([b"/opt/sys/", b"/usr/lib/tj-triple/", b"/lib/"], size_fmt)
    assert find_system_dirs(blob, elf_class) == ("/opt/sys", "/usr/lib/tj-triple", "/lib")


def test_system_dirs_need_the_lengths_array_of_the_right_width() -> None:
    # 64-bit lengths read as 32-bit ones do not match: the pair is not there.
    blob = system_dirs_blob([b"/opt/sys/", b"/usr/lib/tj-triple/"], "Q")
    assert find_system_dirs(blob, ELFCLASS32) is None
    # Lengths that do not match the strings.
    wrong = b"junk" + struct.pack("<2Q", 9, 5) + b"/opt/sys/\0/usr/lib/tj-triple/\0"
    assert find_system_dirs(wrong, ELFCLASS64) is None


def test_system_dirs_without_the_array_are_none() -> None:
    assert find_system_dirs(b"\x7fELF junk /lib/x86_64-linux-gnu/\0/usr/lib/x86_64-linux-gnu/\0/lib/\0", ELFCLASS64) is None
    assert find_system_dirs(b"", ELFCLASS64) is None
    # A single directory is not a list ld.so would have.
    assert find_system_dirs(b"junk" + struct.pack("<Q", 9) + b"/opt/sys/\0", ELFCLASS64) is None


# --- hwcaps -----------------------------------------------------------------------------------

# The psABI micro-architecture levels, as /proc/cpuinfo names the features.
V2 = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})
V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})
V4 = frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})
BASELINE = frozenset({"fpu", "sse", "sse2", "cmov", "cx8"})


def test_power_set_subdirs_in_glibc_order() -> None:
    # The order glibc 2.36 (elf/dl-hwcaps.c) searched, as LD_DEBUG=libs showed it.
    assert power_set_subdirs(["x86_64", "haswell", "tls"]) == [
        "tls/haswell/x86_64", "tls/haswell", "tls/x86_64", "tls", "haswell/x86_64", "haswell", "x86_64", "",
    ]
    assert power_set_subdirs(["tls"]) == ["tls", ""]
    assert power_set_subdirs([]) == [""]


@pytest.mark.parametrize("flags, expected", [
    (BASELINE, []),
    (BASELINE | V2, ["x86-64-v2"]),
    (BASELINE | V2 | V3, ["x86-64-v3", "x86-64-v2"]),
    (BASELINE | V2 | V3 | V4, ["x86-64-v4", "x86-64-v3", "x86-64-v2"]),
    (BASELINE | V3, []),          # a level needs every level before it
    (BASELINE | V3 | V4, []),
    (BASELINE | V2 | V4, ["x86-64-v2"]),
    (BASELINE | V2 | (V3 - {"movbe"}), ["x86-64-v2"]),
])
def test_x86_64_hwcaps(flags: frozenset[str], expected: list[str]) -> None:
    assert x86_64_hwcaps(flags) == expected


@needs_x86_64_rtld
def test_x86_64_hwcaps_of_this_cpu_match_ld_so_help() -> None:
    section = help_section(ld_so_help(RTLD), "Subdirectories of glibc-hwcaps directories")
    supported = [line.split()[0] for line in section if "supported" in line]
    assert x86_64_hwcaps(ElfCache().cpu_flags()) == supported


HASWELL = frozenset({"avx2", "fma", "bmi1", "bmi2", "abm", "movbe", "popcnt"})
AVX512_1 = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
INTEL = frozenset({"vendor:GenuineIntel"})
AMD = frozenset({"vendor:AuthenticAMD"})


@pytest.mark.parametrize("flags, expected", [
    (INTEL | HASWELL, (["x86_64"], "haswell")),
    (INTEL | HASWELL | AVX512_1, (["x86_64", "avx512_1"], "haswell")),
    (INTEL | HASWELL | {"avx512f", "avx512cd", "avx512er", "avx512pf"}, (["x86_64"], "xeon_phi")),
    (INTEL | {"popcnt", "sse4_2"}, (["x86_64"], "x86_64")),
    (INTEL | (HASWELL - {"movbe"}), (["x86_64"], "x86_64")),
    # glibc gives the legacy names and platforms to Intel CPUs only.
    (AMD | HASWELL | AVX512_1, (["x86_64"], "x86_64")),
    (HASWELL, (["x86_64"], "x86_64")),
])
def test_legacy_hwcaps_x86_64(flags: frozenset[str], expected: tuple[list[str], str]) -> None:
    arch = arch_for(x86_64_facts())
    assert legacy_hwcaps(arch, flags) == expected


def test_legacy_hwcaps_avx512er_without_pf_is_not_avx512_1() -> None:
    arch = arch_for(x86_64_facts())
    flags = INTEL | HASWELL | AVX512_1 | {"avx512er"}
    assert legacy_hwcaps(arch, flags) == (["x86_64"], "haswell")


@needs_rtld32
@pytest.mark.parametrize("flags, expected", [
    (frozenset({"sse", "sse2"}), (["sse2"], "i686")),
    (frozenset({"sse"}), ([], "i686")),
])
def test_legacy_hwcaps_i386(flags: frozenset[str], expected: tuple[list[str], str]) -> None:
    facts = read_elf_facts(RTLD32)
    assert facts is not None
    assert legacy_hwcaps(arch_for(facts), flags) == expected


@needs_x86_64_rtld
def test_legacy_hwcaps_of_this_cpu_match_ld_so_help() -> None:
    section = help_section(ld_so_help(RTLD), "Legacy HWCAP subdirectories")
    platform = next(line.split()[0] for line in section if "AT_PLATFORM" in line)
    names = [line.split()[0] for line in section
             if "AT_PLATFORM" not in line and line.split()[0] != "tls" and "supported" in line]
    assert legacy_hwcaps(arch_for(x86_64_facts()), ElfCache().cpu_flags()) == (names, platform)


@pytest.mark.skipif(not IS_X86_64, reason="shows the host leaking into a foreign tree on x86_64")
def test_legacy_hwcaps_of_a_foreign_architecture_do_not_come_from_the_host() -> None:
    aarch64 = arch_for(dataclasses.replace(x86_64_facts(), machine=183))  # EM_AARCH64
    assert aarch64.name == "aarch64"
    assert legacy_hwcaps(aarch64, frozenset()) == ([], "aarch64")


@needs_x86_64_rtld
def test_glibc_subdirs_match_ld_so_search_order() -> None:
    # Every search directory is tried with these subdirectories, in ld.so's order (ld.so tries
    # a repeated one twice: the same file, so the model keeps one).
    facts = x86_64_facts()
    config = glibc_config(host_files(), arch_for(facts), RTLD, Notes())
    assert list(config.subdirs) == loader_search_subdirs("/bin/true")
    assert config.subdirs[-1] == ""


@needs_rtld32
@pytest.mark.skipif(GCC is None, reason="needs gcc")
def test_glibc_subdirs_of_a_32bit_program_match_ld_so(tmp_path: Path) -> None:
    (tmp_path / "m.c").write_text("int main(void) { return 0; }\n")
    built = subprocess.run([GCC, "-m32", "-o", str(tmp_path / "m32"), str(tmp_path / "m.c")], capture_output=True)
    if built.returncode != 0:
        pytest.skip("gcc -m32 not available (gcc-multilib)")
    facts = read_elf_facts(str(tmp_path / "m32"))
    assert facts is not None and facts.interp == RTLD32
    config = glibc_config(host_files(), arch_for(facts), facts.interp, Notes())
    assert list(config.subdirs) == loader_search_subdirs(str(tmp_path / "m32"))
    assert config.platform == "i686"


# --- is_musl_program --------------------------------------------------------------------------


def test_is_musl_program() -> None:
    glibc_program = x86_64_facts()
    assert is_musl_program(dataclasses.replace(glibc_program, interp="/lib/ld-musl-x86_64.so.1"))
    assert is_musl_program(dataclasses.replace(glibc_program, interp="/opt/m/lib/ld-musl-armhf.so.1"))
    assert not is_musl_program(dataclasses.replace(glibc_program, interp=RTLD))
    # A library root has no interpreter: its C library tells.
    lib = dataclasses.replace(glibc_program, interp=None)
    assert is_musl_program(dataclasses.replace(lib, entries=(("needed", "libz.so.1"), ("needed", "libc.so"))))
    assert is_musl_program(dataclasses.replace(lib, entries=(("needed", "libc.musl-x86_64.so.1"),)))
    assert not is_musl_program(dataclasses.replace(lib, entries=(("needed", "libc.so.6"),)))
    assert not is_musl_program(dataclasses.replace(lib, entries=()))
    # A filtee named libc.so is not a DT_NEEDED.
    assert not is_musl_program(dataclasses.replace(lib, entries=(("filter", "libc.so"),)))


@pytest.mark.skipif(GCC is None or MUSL_GCC is None, reason="needs gcc and musl-gcc")
def test_is_musl_program_on_built_programs(tmp_path: Path) -> None:
    src = tmp_path / "m.c"
    src.write_text("int main(void) { return 0; }\n")
    run(GCC, "-o", str(tmp_path / "glibc_prog"), str(src))  # type: ignore[arg-type]
    run(MUSL_GCC, "-o", str(tmp_path / "musl_prog"), str(src))  # type: ignore[arg-type]
    run(MUSL_GCC, "-shared", "-fPIC", "-o", str(tmp_path / "libm_musl.so"), str(src))  # type: ignore[arg-type]
    facts = {name: read_elf_facts(str(tmp_path / name)) for name in ("glibc_prog", "musl_prog", "libm_musl.so")}
    assert {name: is_musl_program(f) for name, f in facts.items() if f is not None} == {
        "glibc_prog": False, "musl_prog": True, "libm_musl.so": True,
    }


# --- glibc_config in a staged tree --------------------------------------------------------------


def staged_glibc_config(root: Path, interp: str | None = None) -> tuple[GlibcConfig, Notes]:
    notes = Notes()
    config = glibc_config(tree_files(root), arch_for(x86_64_facts()), interp, notes)
    return config, notes


@needs_x86_64_rtld
def test_glibc_config_without_ld_so_guesses_multiarch_layout(tmp_path: Path) -> None:
    (tmp_path / "lib/x86_64-linux-gnu").mkdir(parents=True)
    config, notes = staged_glibc_config(tmp_path, RTLD)
    assert config.system_dirs == ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib", "/usr/lib")
    assert config.lib_dst == "lib/x86_64-linux-gnu"
    assert config.libdir == "/usr/lib/x86_64-linux-gnu"
    assert config.interp == RTLD
    assert config.cache is None and config.conf_dirs == ()
    assert notes == []


@needs_x86_64_rtld
def test_glibc_config_without_ld_so_or_multiarch_uses_generic_dirs(tmp_path: Path) -> None:
    (tmp_path / "usr/lib").mkdir(parents=True)
    config, _ = staged_glibc_config(tmp_path, None)
    assert config.system_dirs == ("/lib64", "/usr/lib64")
    assert config.lib_dst == "lib64"
    assert config.libdir == "/usr/lib64"


@needs_x86_64_rtld
def test_glibc_config_reads_the_trees_own_ld_so(tmp_path: Path) -> None:
    # The interpreter named by the program, inside the tree: its bytes name the directories,
    # whatever the tree's layout suggests.
    (tmp_path / "lib/x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "opt/glibc/lib").mkdir(parents=True)
    blob = system_dirs_blob([b"/opt/glibc/lib/", b"/opt/glibc/lib64/"], "Q")
    (tmp_path / "opt/glibc/lib/ld-linux-x86-64.so.2").write_bytes(blob)
    config, _ = staged_glibc_config(tmp_path, "/opt/glibc/lib/ld-linux-x86-64.so.2")
    assert config.system_dirs == ("/opt/glibc/lib", "/opt/glibc/lib64")
    assert config.lib_dst == "opt/glibc/lib"
    # A real ld.so copied in (through an absolute symlink, resolved inside the tree).
    (tmp_path / "lib64").mkdir()
    shutil.copy(os.path.realpath(RTLD), tmp_path / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    (tmp_path / "lib64/ld-linux-x86-64.so.2").symlink_to("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    config, _ = staged_glibc_config(tmp_path, RTLD)
    assert config.system_dirs == find_system_dirs(Path(RTLD).read_bytes(), ELFCLASS64)


@needs_x86_64_rtld
def test_glibc_config_with_an_ld_so_that_names_no_dirs_falls_back(tmp_path: Path) -> None:
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64/ld-linux-x86-64.so.2").write_bytes(b"\x7fELF not really a loader\n")
    config, _ = staged_glibc_config(tmp_path, RTLD)
    assert config.system_dirs == ("/lib64", "/usr/lib64")


@needs_x86_64_rtld
def test_glibc_config_corrupt_cache_is_ignored_and_conf_dirs_used(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc / "ld.so.conf.d").mkdir(parents=True)
    corrupt = b"glibc-ld.so.cache1.1" + b"\xff" * 40
    (etc / "ld.so.cache").write_bytes(corrupt)
    (etc / "ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n/opt/lib\n")
    (etc / "ld.so.conf.d/a.conf").write_text("/opt/a\n")
    with pytest.raises(ldcache.CacheFormatError) as info:
        ldcache.parse_ld_so_cache(corrupt)
    config, notes = staged_glibc_config(tmp_path, RTLD)
    assert config.cache is None
    assert config.conf_dirs == ("/opt/a", "/opt/lib")
    assert notes == [
        f"/etc/ld.so.cache ignored, as ld.so would: {info.value}",
        "no usable /etc/ld.so.cache: searching the /etc/ld.so.conf directories, as if ldconfig had run",
    ]


@needs_x86_64_rtld
def test_glibc_config_without_cache_uses_ld_so_conf(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/ld.so.conf").write_text("/opt/lib/\n/usr/local/lib\n")
    config, notes = staged_glibc_config(tmp_path, RTLD)
    assert config.cache is None
    assert config.conf_dirs == ("/opt/lib", "/usr/local/lib")
    assert notes == ["no usable /etc/ld.so.cache: searching the /etc/ld.so.conf directories, as if ldconfig had run"]


@needs_x86_64_rtld
def test_glibc_config_without_cache_or_conf_has_neither(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    config, notes = staged_glibc_config(tmp_path, RTLD)
    assert config.cache is None and config.conf_dirs == ()
    assert notes == []


@needs_x86_64_rtld
@pytest.mark.skipif(LDCONFIG is None, reason="needs ldconfig to write a cache")
def test_glibc_config_uses_a_valid_cache_and_not_the_conf(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "opt/lib").mkdir(parents=True)
    shutil.copy(os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6"), tmp_path / "opt/lib/libc.so.6")
    (tmp_path / "etc/ld.so.conf").write_text("/opt/lib\n")
    run(LDCONFIG, "-r", str(tmp_path), "-X")  # type: ignore[arg-type]
    config, notes = staged_glibc_config(tmp_path, RTLD)
    assert isinstance(config.cache, ldcache.LdCache)
    assert config.conf_dirs == ()
    assert notes == []
    assert config.cache.lookup("libc.so.6", accept_flags=config.arch.cache_flags.__contains__,
                               default_flags=config.arch.cache_default,
                               hwcaps_priority=config.hwcaps_priority) == "/opt/lib/libc.so.6"


# --- musl_config ----------------------------------------------------------------------------------


def staged_musl_config(root: Path, interp: str | None = "/lib/ld-musl-x86_64.so.1") -> MuslConfig:
    return musl_config(tree_files(root), arch_for(x86_64_facts()), interp)


MUSL_DEFAULT = ("/lib", "/usr/local/lib", "/usr/lib")


@needs_x86_64_rtld
def test_musl_config_reads_the_path_file_in_the_tree(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/ld-musl-x86_64.path").write_text("/opt/a:/opt/b\n/usr/lib\n")
    config = staged_musl_config(tmp_path)
    assert config.dirs == ("/opt/a", "/opt/b", "/usr/lib")
    assert config.dirs_from == "/etc/ld-musl-x86_64.path"


@needs_x86_64_rtld
def test_musl_config_path_file_follows_the_loaders_prefix(tmp_path: Path) -> None:
    # musl reads <prefix>/etc/ld-musl-$ARCH.path, <prefix> being its own path up to the second-to-last slash.
    (tmp_path / "opt/m/etc").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    (tmp_path / "opt/m/etc/ld-musl-x86_64.path").write_text("/opt/m/lib\n")
    (tmp_path / "etc/ld-musl-x86_64.path").write_text("/not/this/one\n")
    config = staged_musl_config(tmp_path, "/opt/m/lib/ld-musl-x86_64.so.1")
    assert (config.dirs, config.dirs_from) == (("/opt/m/lib",), "/opt/m/etc/ld-musl-x86_64.path")


@needs_x86_64_rtld
def test_musl_config_without_path_file_is_the_built_in_default(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    assert staged_musl_config(tmp_path) == MuslConfig(arch_for(x86_64_facts()), "/lib/ld-musl-x86_64.so.1", MUSL_DEFAULT, "")
    # A dangling symlink is missing too (ENOENT).
    (tmp_path / "etc/ld-musl-x86_64.path").symlink_to("/etc/nowhere.path")
    assert staged_musl_config(tmp_path).dirs == MUSL_DEFAULT


@needs_x86_64_rtld
def test_musl_config_path_file_symlink_is_resolved_inside_the_tree(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv/musl.path").write_text("/srv/lib\n")
    (tmp_path / "etc/ld-musl-x86_64.path").symlink_to("/srv/musl.path")
    config = staged_musl_config(tmp_path)
    assert (config.dirs, config.dirs_from) == (("/srv/lib",), "/etc/ld-musl-x86_64.path")


@needs_x86_64_rtld
def test_musl_config_unreadable_path_file_means_no_system_dirs(tmp_path: Path) -> None:
    # musl: any open() error but ENOENT leaves the system path empty.
    if os.geteuid() == 0:
        pytest.skip("root reads a mode-000 file")
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc/ld-musl-x86_64.path"
    path.write_text("/opt/a\n")
    path.chmod(0)
    try:
        config = staged_musl_config(tmp_path)
    finally:
        path.chmod(0o644)
    assert (config.dirs, config.dirs_from) == ((), "/etc/ld-musl-x86_64.path")


@needs_x86_64_rtld
def test_musl_config_path_file_that_cannot_be_read_means_no_system_dirs(tmp_path: Path) -> None:
    # What root cannot read either: a directory (musl's read fails: EISDIR), or /etc a file
    # (open fails with ENOTDIR, not ENOENT). musl then searches nothing more.
    (tmp_path / "etc/ld-musl-x86_64.path").mkdir(parents=True)
    config = staged_musl_config(tmp_path)
    assert (config.dirs, config.dirs_from) == ((), "/etc/ld-musl-x86_64.path")
    other = tmp_path / "other"
    other.mkdir()
    (other / "etc").write_text("a file\n")
    config = staged_musl_config(other)
    assert (config.dirs, config.dirs_from) == ((), "/etc/ld-musl-x86_64.path")


@needs_x86_64_rtld
def test_musl_config_empty_path_file_means_no_system_dirs(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/ld-musl-x86_64.path").write_text("")
    assert staged_musl_config(tmp_path).dirs == ()
