"""The loader's configuration: architectures, hardware capabilities, and what each C library's
loader reads before it searches (glibc: its compiled-in directories, /etc/ld.so.cache or
/etc/ld.so.conf; musl: /etc/ld-musl-$ARCH.path)."""
from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .. import ldcache
from ..elf import ELFCLASS32, ELFCLASS64, EM_386, EM_AARCH64, EM_X86_64, ElfFacts, read_text
from .files import LoaderFiles

LD_SO_CACHE = "/etc/ld.so.cache"


@dataclass(frozen=True)
class Arch:
    name: str  # musl's LDSO_ARCH, and a label
    elf_class: int
    machine: int
    triple: str  # Debian multiarch triple
    glibc_interp: str
    cache_flags: frozenset[int]  # ld.so.cache entry flags ld.so accepts
    cache_default: int  # the flags that end the search (_DL_CACHE_DEFAULT_ID)
    generic_dirs: tuple[str, ...]  # default directories of a non-multiarch glibc

    @property
    def musl_interp(self) -> str:
        return f"/lib/ld-musl-{self.name}.so.1"

    @property
    def header_size(self) -> int:
        """The ELF header's size: a shorter file is refused before anything else is read."""
        return 64 if self.elf_class == ELFCLASS64 else 52


_ARCHES: dict[tuple[int, int], Arch] = {
    (ELFCLASS64, EM_X86_64): Arch(
        "x86_64", ELFCLASS64, EM_X86_64, "x86_64-linux-gnu",
        "/lib64/ld-linux-x86-64.so.2", frozenset({0x0303}), 0x0303, ("/lib64", "/usr/lib64"),
    ),
    (ELFCLASS32, EM_386): Arch(
        "i386", ELFCLASS32, EM_386, "i386-linux-gnu",
        "/lib/ld-linux.so.2", frozenset({0x0001, 0x0003}), 0x0003, ("/lib", "/usr/lib"),
    ),
    (ELFCLASS64, EM_AARCH64): Arch(
        "aarch64", ELFCLASS64, EM_AARCH64, "aarch64-linux-gnu",
        "/lib/ld-linux-aarch64.so.1", frozenset({0x0A03}), 0x0A03, ("/lib64", "/usr/lib64"),
    ),
}


def arch_for(facts: ElfFacts) -> Arch:
    arch = _ARCHES.get((facts.elf_class, facts.machine))
    if arch is None:
        # An architecture we have no table for: glibc's generic rules.
        arch = Arch(facts.machine_name, facts.elf_class, facts.machine, "", "", frozenset({1, 3}), 3, ("/lib", "/usr/lib"))
    return arch


def is_musl_program(facts: ElfFacts) -> bool:
    """Whether musl's loader runs this program: its interpreter is musl's, or (a library root)
    it links musl's libc."""
    interp = facts.interp
    if interp is not None:
        return os.path.basename(interp).startswith("ld-musl-")
    return any(n == "libc.so" or n.startswith("libc.musl-") for n in facts.needed)


# --- hardware capabilities --------------------------------------------------------------------

# x86-64 psABI micro-architecture levels, as /proc/cpuinfo names their
# features (abm = LZCNT, pni = SSE3, xsave stands in for OSXSAVE: the kernel
# hides avx when the OS has not enabled XSAVE).  Each level needs the ones
# before it.
_X86_64_LEVELS: tuple[tuple[str, frozenset[str]], ...] = (
    ("x86-64-v2", frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})),
    ("x86-64-v3", frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})),
    ("x86-64-v4", frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})),
)
_HASWELL = frozenset({"avx2", "fma", "bmi1", "bmi2", "abm", "movbe", "popcnt"})
_AVX512_1 = frozenset({"avx512cd", "avx512bw", "avx512dq", "avx512vl"})
# Legacy hwcap bits and platform numbers in ld.so.cache entries (sysdeps/x86).
_X86_HWCAP_BITS = {"sse2": 1 << 0, "x86_64": 1 << 1, "avx512_1": 1 << 2}
_X86_PLATFORMS = ("i586", "i686", "haswell", "xeon_phi")
_FIRST_PLATFORM_BIT = 48
_PLATFORM_MASK = ((1 << len(_X86_PLATFORMS)) - 1) << _FIRST_PLATFORM_BIT


def x86_64_hwcaps(flags: frozenset[str]) -> list[str]:
    """glibc-hwcaps subdirectory names the CPU supports, best first."""
    supported: list[str] = []
    for level, needs in _X86_64_LEVELS:
        if not needs <= flags:
            break
        supported.append(level)
    return supported[::-1]


def legacy_hwcaps(arch: Arch, flags: frozenset[str]) -> tuple[list[str], str]:
    """glibc <= 2.36's legacy hwcap names (in bit order) and the platform ($PLATFORM)."""
    intel = "vendor:GenuineIntel" in flags
    if arch.name == "x86_64":
        names = ["x86_64"]
        platform = "x86_64"  # AT_PLATFORM from the kernel
        if intel:
            # sysdeps/x86/cpu-features.c: AVX512ER makes a Xeon Phi (with PF) and never avx512_1.
            if "avx512cd" in flags and "avx512er" in flags:
                if "avx512pf" in flags:
                    platform = "xeon_phi"
            elif _AVX512_1 <= flags:
                names.append("avx512_1")
            if platform == "x86_64" and _HASWELL <= flags:
                platform = "haswell"
        return names, platform
    if arch.name == "i386":
        return (["sse2"] if "sse2" in flags else []), "i686"
    # The kernel of that architecture names it (never this host's machine).
    return [], arch.name


def power_set_subdirs(components: list[str]) -> list[str]:
    """The legacy subdirectories ld.so tries, in its order (elf/dl-hwcaps.c).

    Every subset of the components, most specific first, joined with the
    last component ("tls") outermost: tls/x86_64/x86_64, tls/x86_64, ...
    """
    count = len(components)
    result: list[str] = []
    for index in range(1 << count):
        mask = (1 << count) - 1 - index
        parts = [components[n] for n in reversed(range(count)) if mask >> n & 1]
        result.append("/".join(parts))
    return result


# --- glibc ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlibcConfig:
    arch: Arch
    interp: str | None
    system_dirs: tuple[str, ...]
    lib_dst: str  # $LIB
    platform: str  # $PLATFORM
    subdirs: tuple[str, ...]  # tried inside every search directory, "" (the directory itself) last
    cache: ldcache.LdCache | None
    conf_dirs: tuple[str, ...]  # ld.so.conf directories, used only when there is no cache
    hwcaps_priority: Mapping[str, int]
    legacy_hwcap_bits: int
    platform_bit: int

    @property
    def libdir(self) -> str:
        """/usr/$LIB, where gconv lives."""
        return "/" + self.lib_dst if self.lib_dst.startswith("usr/") else "/usr/" + self.lib_dst

    def isa_level_ok(self, level: int) -> bool:
        # Level n (0 = baseline) needs x86-64-v(n+1); hwcaps_priority lists what the CPU has.
        return level == 0 or f"x86-64-v{level + 1}" in self.hwcaps_priority

    def legacy_hwcap_ok(self, hwcap: int) -> bool:
        platform = hwcap & _PLATFORM_MASK
        if platform and platform != self.platform_bit:
            return False
        return hwcap & ~(self.legacy_hwcap_bits | _PLATFORM_MASK) == 0


def glibc_config(files: LoaderFiles, arch: Arch, interp: str | None, note: Callable[[str], None]) -> GlibcConfig:
    """What the glibc ld.so at `interp` (or the architecture's usual one) searches, in this root."""
    flags = files.elf.cpu_flags() if os.uname().machine in ("x86_64", "i686", "i386") else frozenset()
    hwcaps = x86_64_hwcaps(flags) if arch.name == "x86_64" else []
    legacy, platform = legacy_hwcaps(arch, flags)
    subdirs: list[str] = [f"glibc-hwcaps/{h}" for h in hwcaps]
    for sub in power_set_subdirs(legacy + [platform, "tls"]):  # ends with "" (the directory)
        if sub not in subdirs:
            subdirs.append(sub)
    legacy_bits = 0
    for name in legacy:
        legacy_bits |= _X86_HWCAP_BITS.get(name, 0)
    platform_bit = 1 << (_FIRST_PLATFORM_BIT + _X86_PLATFORMS.index(platform)) if platform in _X86_PLATFORMS else 0
    system_dirs = _system_dirs(files, arch, interp)
    cache, conf_dirs = _ld_so_cache(files, note)
    return GlibcConfig(
        arch=arch,
        interp=interp,
        system_dirs=system_dirs,
        lib_dst=system_dirs[0].strip("/") if system_dirs else "lib",
        platform=platform,
        subdirs=tuple(subdirs),
        cache=cache,
        conf_dirs=conf_dirs,
        hwcaps_priority={name: i + 1 for i, name in enumerate(hwcaps)},
        legacy_hwcap_bits=legacy_bits,
        platform_bit=platform_bit,
    )


def find_system_dirs(blob: bytes, elf_class: int) -> tuple[str, ...] | None:
    """The default search directories compiled into a glibc ld.so.

    ld.so keeps them as consecutive NUL-terminated strings ("/lib/x86_64-linux-gnu/\\0/usr/lib/...")
    preceded by an array of their lengths; finding that pair avoids guessing
    the distribution's layout.
    """
    size_fmt = "Q" if elf_class == ELFCLASS64 else "I"
    width = struct.calcsize(size_fmt)
    for match in re.finditer(rb"(?:/[\x21-\x7e]*/\x00){2,16}", blob):
        dirs = match.group().split(b"\0")[:-1]
        lengths = [len(d) for d in dirs]
        start = match.start() - width * len(lengths)
        if start >= 0 and blob[start : match.start()] == struct.pack(f"<{len(lengths)}{size_fmt}", *lengths):
            return tuple(os.fsdecode(d).rstrip("/") or "/" for d in dirs)
    return None


def _system_dirs(files: LoaderFiles, arch: Arch, interp: str | None) -> tuple[str, ...]:
    """The default directories of the glibc ld.so that will run the program."""
    ld_so = interp or arch.glibc_interp
    if ld_so:
        try:
            found = files.elf.parsed_file(
                files.host(ld_so), f"system-dirs-{arch.elf_class}", lambda data: find_system_dirs(data, arch.elf_class)
            )
        except OSError:
            found = None
        if isinstance(found, tuple):
            return found
    # No readable ld.so (a staged tree without one): guess from the layout.
    if arch.triple and files.isdir(f"/lib/{arch.triple}"):
        return (f"/lib/{arch.triple}", f"/usr/lib/{arch.triple}", "/lib", "/usr/lib")
    return arch.generic_dirs


def _ld_so_cache(files: LoaderFiles, note: Callable[[str], None]) -> tuple[ldcache.LdCache | None, tuple[str, ...]]:
    """The parsed cache, or, when there is none, the ld.so.conf directories to search instead."""
    try:
        parsed = files.elf.parsed_file(files.host(LD_SO_CACHE), "ld.so.cache", ldcache.parse_ld_so_cache)
    except OSError:
        parsed = None
    if isinstance(parsed, ldcache.LdCache):
        return parsed, ()
    if isinstance(parsed, Exception):
        note(f"{LD_SO_CACHE} ignored, as ld.so would: {parsed}")
    conf_dirs = tuple(ldcache.parse_ld_so_conf(files.tree))
    if conf_dirs:
        note(f"no usable {LD_SO_CACHE}: searching the /etc/ld.so.conf directories, as if ldconfig had run")
    return None, conf_dirs


# --- musl -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MuslConfig:
    arch: Arch
    interp: str | None
    dirs: tuple[str, ...]  # the system search path
    dirs_from: str  # the path file it came from, or "" for musl's built-in default


def musl_config(files: LoaderFiles, arch: Arch, interp: str | None) -> MuslConfig:
    path_file = ldcache.musl_path_file(interp or "", arch.name)
    try:
        dirs = tuple(ldcache.parse_musl_path(read_text(files.host(path_file))))
        return MuslConfig(arch, interp, dirs, path_file)
    except FileNotFoundError:
        return MuslConfig(arch, interp, ("/lib", "/usr/local/lib", "/usr/lib"), "")
    except OSError:
        return MuslConfig(arch, interp, (), path_file)  # musl then searches nothing more
