"""The loaders' own configuration (ldcache.py): glibc's ld.so.cache in every layout ld.so reads,
ld.so.conf with its includes, and musl's path file.

The cache is checked three ways: this machine's /etc/ld.so.cache against what `ldconfig -p` prints
and against what ld.so itself loads for a real program; and small caches laid out byte by byte here
(new format, old format alone, old format with the new one appended, glibc-hwcaps entries with
ISA levels, legacy hwcap bits, corrupt files). ld.so.conf is checked against ldconfig's own reading
of a file on the host, and inside trees of the test's own, where no include may leave the root.
"""
from __future__ import annotations

import os
import platform
import re
import struct
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from tracejail.ldcache import (CacheEntry, CacheFormatError, LdCache, cache_key, musl_path_file,
                               parse_ld_so_cache, parse_ld_so_conf, parse_musl_path)
from tracejail.root import Root

LDCONFIG = "/sbin/ldconfig"
SYSTEM_CACHE = "/etc/ld.so.cache"

# The layouts of glibc's elf/dl-cache.h, written out here rather than taken from the module.
NEW_MAGIC = b"glibc-ld.so.cache1.1"
OLD_MAGIC = b"ld.so-1.7.0"
NEW_HEADER = struct.Struct("<20sIIB3xI12x")   # magic+version, nlibs, len_strings, flags, extension_offset
NEW_ENTRY = struct.Struct("<iIIIQ")            # flags, key, value, osversion, hwcap
OLD_ENTRY = struct.Struct("<iII")              # flags, key, value
EXTENSION_MAGIC = 0xEAA42174
LITTLE_ENDIAN = 2                              # header flags: 0 unknown, 1 invalid, 2 little, 3 big

# Entry flags: the kind in the low byte, the architecture in the second.
ELF, LIBC6 = 0x0001, 0x0003
X86_64, X32 = 0x0303, 0x0803
HWCAPS_SUBDIR = 1 << 62


def named(index: int, isa_level: int = 0) -> int:
    """The hwcap field of an entry from glibc-hwcaps subdirectory number `index`."""
    return HWCAPS_SUBDIR | (isa_level << 32) | index


def new_part(entries: list[CacheEntry], hwcaps: tuple[str, ...] = (), *, at: int = 0,
             flags: int = LITTLE_ENDIAN, ext_magic: int = EXTENSION_MAGIC) -> bytes:
    """The new-format cache as ldconfig lays it out, for offset `at` of the file: header, entries,
    strings, then the extension directory with one glibc-hwcaps section. String offsets count from
    the header; the extension's offsets, and the name offsets in it, from the start of the file."""
    strings_at = NEW_HEADER.size + NEW_ENTRY.size * len(entries)
    strings = bytearray()
    where: dict[str, int] = {}

    def intern(s: str) -> int:
        if s not in where:
            where[s] = strings_at + len(strings)
            strings.extend(s.encode() + b"\0")
        return where[s]

    rows = b"".join(NEW_ENTRY.pack(e.flags, intern(e.key), intern(e.value), e.osversion, e.hwcap) for e in entries)
    name_offsets = [intern(n) for n in hwcaps]
    size = strings_at + len(strings)
    pad = -(at + size) % 4
    ext_offset, ext = 0, b""
    if hwcaps:
        ext_offset = at + size + pad
        array_at = ext_offset + 8 + 16
        ext = (struct.pack("<II", ext_magic, 1) + struct.pack("<IIII", 1, 0, array_at, 4 * len(hwcaps))
               + struct.pack(f"<{len(hwcaps)}I", *(at + o for o in name_offsets)))
    header = NEW_HEADER.pack(NEW_MAGIC, len(entries), len(strings), flags, ext_offset)
    return header + rows + bytes(strings) + bytes(pad) + ext


def old_format(entries: list[CacheEntry], new: list[CacheEntry] | None = None, hwcaps: tuple[str, ...] = ()) -> bytes:
    """libc5's layout (magic, count, 12-byte entries, strings counted from the end of the table),
    with the new format appended at the next multiple of 8 when `new` is given."""
    table_end = 16 + OLD_ENTRY.size * len(entries)
    new_at = (table_end + 7) & ~7
    appended = b"" if new is None else bytes(new_at - table_end) + new_part(new, hwcaps, at=new_at)
    strings = bytearray()
    where: dict[str, int] = {}

    def intern(s: str) -> int:
        if s not in where:
            where[s] = len(appended) + len(strings)   # the old strings follow the new part
            strings.extend(s.encode() + b"\0")
        return where[s]

    rows = b"".join(OLD_ENTRY.pack(e.flags, intern(e.key), intern(e.value)) for e in entries)
    return OLD_MAGIC + b"\0" + struct.pack("<I", len(entries)) + rows + appended + bytes(strings)


def in_order(cache: LdCache) -> list[CacheEntry]:
    """The entries in file order (the file is sorted by key, so each key's group is contiguous)."""
    return [e for group in cache.entries.values() for e in group]


def x86_64(cache: LdCache, name: str, hwcaps_priority: Mapping[str, int] | None = None,
           isa_level_ok: Callable[[int], bool] = lambda level: level == 0,
           legacy_hwcap_ok: Callable[[int], bool] = lambda hwcap: hwcap == 0, os_version: int = 0) -> str | None:
    """What an x86-64 ld.so takes from the cache (by default a CPU with no glibc-hwcaps level)."""
    return cache.lookup(name, accept_flags={X86_64}.__contains__, default_flags=X86_64,
                        hwcaps_priority=hwcaps_priority or {}, isa_level_ok=isa_level_ok,
                        legacy_hwcap_ok=legacy_hwcap_ok, os_version=os_version)


def i386(cache: LdCache, name: str) -> str | None:
    return cache.lookup(name, accept_flags={ELF, LIBC6}.__contains__, default_flags=LIBC6, hwcaps_priority={})


# --- this machine's cache ---------------------------------------------------------------------

needs_system_cache = pytest.mark.skipif(not (os.path.exists(SYSTEM_CACHE) and os.access(LDCONFIG, os.X_OK)),
                                        reason="needs /etc/ld.so.cache and /sbin/ldconfig")

_KIND = {ELF: "ELF", LIBC6: "libc6"}
_ARCH = {0x0000: "", 0x0300: ",x86-64", 0x0800: ",x32", 0x0900: ",hard-float", 0x0A00: ",AArch64"}


def ldconfig_label(entry: CacheEntry, hwcaps: tuple[str, ...]) -> str:
    """What `ldconfig -p` prints in parentheses for an entry (glibc's print_entry)."""
    label = _KIND.get(entry.flags & 0xFF, "unknown") + _ARCH.get(entry.flags & 0xFF00, f",{entry.flags & 0xFF00}")
    if entry.is_hwcaps_subdir:
        label += f', hwcap: "{hwcaps[entry.hwcap & 0xFFFFFFFF]}"'
    elif entry.hwcap:
        label += f", hwcap: {entry.hwcap:#018x}"
    return label


def ldconfig_print() -> tuple[int, list[tuple[str, str, str]]]:
    """`ldconfig -p`: the count it announces and its (name, label, path) lines, in file order."""
    out = subprocess.run([LDCONFIG, "-p", "-C", SYSTEM_CACHE], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    announced = re.search(r"^(\d+) libs found in cache", out, re.M)
    assert announced is not None, out[:200]
    count = int(announced.group(1))
    lines = [m.groups() for m in re.finditer(r"^\t(\S+) \((.*)\) => (.+)$", out, re.M)]
    return count, lines


@needs_system_cache
def test_the_system_cache_holds_what_ldconfig_prints() -> None:
    cache = parse_ld_so_cache(Path(SYSTEM_CACHE).read_bytes())
    count, printed = ldconfig_print()
    entries = in_order(cache)
    assert cache.format in ("new", "old+new")
    assert len(entries) == count == len(printed)
    assert [(e.key, ldconfig_label(e, cache.hwcaps_names), e.value) for e in entries] == printed


@needs_system_cache
def test_system_cache_lookups_take_the_first_entry_of_the_right_kind() -> None:
    """Without glibc-hwcaps entries ld.so takes the first entry of a name whose flags it accepts:
    for x86-64 `libc6,x86-64`, for i386 `libc6` or `ELF`."""
    cache = parse_ld_so_cache(Path(SYSTEM_CACHE).read_bytes())
    _, printed = ldconfig_print()
    with_hwcaps = {name for name, label, _ in printed if "hwcap:" in label}
    want64: dict[str, str] = {}
    want32: dict[str, str] = {}
    for name, label, path in printed:
        if label == "libc6,x86-64":
            want64.setdefault(name, path)
        elif label in ("libc6", "ELF"):
            want32.setdefault(name, path)
    assert want64, "no x86-64 entry in the system cache"
    for name in {n for n, _, _ in printed} - with_hwcaps:
        assert x86_64(cache, name) == want64.get(name), name
        assert i386(cache, name) == want32.get(name), name


@needs_system_cache
@pytest.mark.skipif(platform.machine() != "x86_64" or not os.path.exists("/lib64/ld-linux-x86-64.so.2"),
                    reason="needs an x86-64 glibc loader")
def test_lookup_names_the_file_the_loader_maps() -> None:
    """ld.so --list /bin/ls (no RUNPATH, empty environment): every library comes from the cache."""
    listed = subprocess.run(["/lib64/ld-linux-x86-64.so.2", "--list", "/bin/ls"], env={}, capture_output=True,
                            text=True, timeout=30, check=True).stdout
    mapped = dict(re.findall(r"^\t(\S+) => (\S+) \(0x", listed, re.M))
    assert "libc.so.6" in mapped
    cache = parse_ld_so_cache(Path(SYSTEM_CACHE).read_bytes())
    assert {name: x86_64(cache, name) for name in mapped} == mapped


# --- caches laid out here ---------------------------------------------------------------------

LIBS = [CacheEntry(X32, "libz.so.1", "/libx32/libz.so.1"),
        CacheEntry(X86_64, "libz.so.1", "/lib/x86_64-linux-gnu/libz.so.1"),
        CacheEntry(LIBC6, "libz.so.1", "/lib32/libz.so.1"),
        CacheEntry(X86_64, "libssl.so.3", "/usr/lib/x86_64-linux-gnu/libssl.so.3"),
        CacheEntry(ELF, "ld-linux.so.2", "/lib32/ld-linux.so.2"),
        CacheEntry(ELF, "ld-linux.so.2", "/lib/ld-linux.so.2")]


def test_new_format_is_read_entry_by_entry() -> None:
    cache = parse_ld_so_cache(new_part(LIBS))
    assert cache.format == "new" and cache.hwcaps_names == ()
    assert in_order(cache) == LIBS
    assert list(cache.entries) == ["libz.so.1", "libssl.so.3", "ld-linux.so.2"]


def test_lookup_picks_the_entry_of_the_loaders_architecture() -> None:
    cache = parse_ld_so_cache(new_part(LIBS))
    assert x86_64(cache, "libz.so.1") == "/lib/x86_64-linux-gnu/libz.so.1"
    assert i386(cache, "libz.so.1") == "/lib32/libz.so.1"
    assert x86_64(cache, "libssl.so.3") == "/usr/lib/x86_64-linux-gnu/libssl.so.3"
    assert i386(cache, "libssl.so.3") is None
    # two plain entries ld.so accepts: the first one wins
    assert i386(cache, "ld-linux.so.2") == "/lib32/ld-linux.so.2"
    assert x86_64(cache, "libz.so") is None and x86_64(cache, "libz.so.2") is None


@pytest.mark.parametrize("spelled, key", [("libz.so.01", "libz.so.1"), ("libfoo-007.so.0010.2", "libfoo-7.so.10.2"),
                                          ("libz.so.1", "libz.so.1"), ("libc.so.6", "libc.so.6"),
                                          ("libx.so.0", "libx.so.0"), ("libx.so.00", "libx.so.0")])
def test_digits_compare_as_numbers_like_glibcs_libcmp(spelled: str, key: str) -> None:
    assert cache_key(spelled) == key


def test_a_name_with_leading_zeros_finds_the_same_entry() -> None:
    cache = parse_ld_so_cache(new_part([CacheEntry(X86_64, "libfoo.so.01", "/opt/libfoo.so.01")]))
    assert x86_64(cache, "libfoo.so.1") == x86_64(cache, "libfoo.so.001") == "/opt/libfoo.so.01"
    assert x86_64(cache, "libfoo.so.10") is None


def test_old_format_alone() -> None:
    entries = [CacheEntry(LIBC6, "libm.so.5", "/lib/libm.so.5"), CacheEntry(ELF, "libm.so.5", "/usr/i486/libm.so.5"),
               CacheEntry(LIBC6, "libc.so.5", "/lib/libc.so.5")]
    cache = parse_ld_so_cache(old_format(entries))
    assert cache.format == "old" and cache.hwcaps_names == ()
    assert in_order(cache) == entries
    assert i386(cache, "libm.so.5") == "/lib/libm.so.5"
    assert x86_64(cache, "libm.so.5") is None


@pytest.mark.parametrize("old_count", [1, 2])   # 28 bytes (padded to 32) or 40 (aligned already)
def test_the_new_format_appended_to_the_old_one_is_the_one_read(old_count: int) -> None:
    old = [CacheEntry(LIBC6, "libz.so.1", "/old/libz.so.1"), CacheEntry(LIBC6, "libold.so.1", "/old/libold.so.1")]
    data = old_format(old[:old_count], new=LIBS)
    cache = parse_ld_so_cache(data)
    assert cache.format == "old+new"
    assert in_order(cache) == LIBS
    assert i386(cache, "libz.so.1") == "/lib32/libz.so.1"
    assert i386(cache, "libold.so.1") is None     # only in the old part, which glibc then ignores


# glibc-hwcaps subdirectories, in ldconfig's order: their entries first, then the plain one.
HWCAPS = ("x86-64-v4", "x86-64-v3", "x86-64-v2")
ZSTD = [CacheEntry(X86_64, "libzstd.so.1", "/usr/lib/glibc-hwcaps/x86-64-v2/libzstd.so.1", hwcap=named(2, 1)),
        CacheEntry(X86_64, "libzstd.so.1", "/usr/lib/glibc-hwcaps/x86-64-v4/libzstd.so.1", hwcap=named(0, 3)),
        CacheEntry(X86_64, "libzstd.so.1", "/usr/lib/glibc-hwcaps/x86-64-v3/libzstd.so.1", hwcap=named(1, 2)),
        CacheEntry(X86_64, "libzstd.so.1", "/usr/lib/x86_64-linux-gnu/libzstd.so.1")]


def priorities(*names: str) -> dict[str, int]:
    """hwcaps_priority for a CPU that supports `names`, best first."""
    return {n: i + 1 for i, n in enumerate(names)}


def test_hwcaps_entries_carry_their_subdirectory_and_isa_level() -> None:
    cache = parse_ld_so_cache(new_part(ZSTD, HWCAPS))
    assert cache.hwcaps_names == HWCAPS
    entries = in_order(cache)
    assert [(e.is_hwcaps_subdir, e.isa_level) for e in entries] == [(True, 1), (True, 3), (True, 2), (False, 0)]
    # a legacy hwcap bit, or bit 62 with others above the ISA level, is not a subdirectory
    assert not CacheEntry(X86_64, "k", "v", hwcap=1 << 1).is_hwcaps_subdir
    assert not CacheEntry(X86_64, "k", "v", hwcap=HWCAPS_SUBDIR | 1 << 50).is_hwcaps_subdir


@pytest.mark.parametrize("cpu, isa_max, want", [
    (("x86-64-v4", "x86-64-v3", "x86-64-v2"), 3, "/usr/lib/glibc-hwcaps/x86-64-v4/libzstd.so.1"),
    (("x86-64-v3", "x86-64-v2"), 3, "/usr/lib/glibc-hwcaps/x86-64-v3/libzstd.so.1"),
    (("x86-64-v2",), 3, "/usr/lib/glibc-hwcaps/x86-64-v2/libzstd.so.1"),
    ((), 3, "/usr/lib/x86_64-linux-gnu/libzstd.so.1"),
    # the CPU names v3, but the library's ISA level marker says v4's instructions: skipped
    (("x86-64-v4", "x86-64-v3", "x86-64-v2"), 2, "/usr/lib/glibc-hwcaps/x86-64-v3/libzstd.so.1"),
    (("x86-64-v4", "x86-64-v3", "x86-64-v2"), 0, "/usr/lib/x86_64-linux-gnu/libzstd.so.1"),
])
def test_the_best_supported_hwcaps_subdirectory_wins_whatever_its_place(
        cpu: tuple[str, ...], isa_max: int, want: str) -> None:
    cache = parse_ld_so_cache(new_part(ZSTD, HWCAPS))
    got = x86_64(cache, "libzstd.so.1", hwcaps_priority=priorities(*cpu), isa_level_ok=lambda level: level <= isa_max)
    assert got == want


def test_hwcaps_in_a_cache_with_the_old_format_before_it() -> None:
    """The extension's offsets count from the start of the file, not from the new header."""
    cache = parse_ld_so_cache(old_format([CacheEntry(LIBC6, "libzstd.so.1", "/old/libzstd.so.1")], ZSTD, HWCAPS))
    assert cache.format == "old+new" and cache.hwcaps_names == HWCAPS
    assert x86_64(cache, "libzstd.so.1", hwcaps_priority=priorities("x86-64-v3"), isa_level_ok=lambda _: True) \
        == "/usr/lib/glibc-hwcaps/x86-64-v3/libzstd.so.1"


def test_without_a_readable_extension_hwcaps_entries_are_never_taken() -> None:
    cache = parse_ld_so_cache(new_part(ZSTD, HWCAPS, ext_magic=0x12345678))
    assert cache.hwcaps_names == ()
    assert x86_64(cache, "libzstd.so.1", hwcaps_priority=priorities(*HWCAPS), isa_level_ok=lambda _: True) \
        == "/usr/lib/x86_64-linux-gnu/libzstd.so.1"


def test_legacy_hwcap_bits_and_the_tls_bit() -> None:
    """Plain entries with legacy hwcap bits are taken only when the loader accepts those bits;
    bit 63 (the old `tls` marker) is ignored."""
    entries = [CacheEntry(X86_64, "libm.so.6", "/lib/x86_64-linux-gnu/avx512_1/x86_64/libm.so.6",
                          hwcap=1 << 2 | 1 << 1),
               CacheEntry(X86_64, "libm.so.6", "/lib/x86_64-linux-gnu/tls/libm.so.6", hwcap=1 << 63),
               CacheEntry(X86_64, "libm.so.6", "/lib/x86_64-linux-gnu/libm.so.6")]
    cache = parse_ld_so_cache(new_part(entries))
    assert x86_64(cache, "libm.so.6") == "/lib/x86_64-linux-gnu/tls/libm.so.6"
    assert x86_64(cache, "libm.so.6", legacy_hwcap_ok=lambda hwcap: hwcap & ~0b110 == 0) \
        == "/lib/x86_64-linux-gnu/avx512_1/x86_64/libm.so.6"
    asked: list[int] = []
    assert x86_64(cache, "libm.so.6", legacy_hwcap_ok=lambda hwcap: asked.append(hwcap) is not None) is None
    assert asked == [0b110, 0, 0]   # the loader is asked without bit 63


def test_an_entry_for_a_newer_kernel_is_skipped_when_the_kernel_version_is_known() -> None:
    entries = [CacheEntry(X86_64, "libc.so.6", "/lib/new/libc.so.6", osversion=0x050A00),
               CacheEntry(X86_64, "libc.so.6", "/lib/old/libc.so.6", osversion=0x020600)]
    cache = parse_ld_so_cache(new_part(entries))
    assert x86_64(cache, "libc.so.6", os_version=0x040400) == "/lib/old/libc.so.6"
    assert x86_64(cache, "libc.so.6", os_version=0x060100) == "/lib/new/libc.so.6"
    assert x86_64(cache, "libc.so.6") == "/lib/new/libc.so.6"


def test_the_header_flags_may_be_unknown_or_little_endian() -> None:
    for flags in (0, LITTLE_ENDIAN):
        cache = parse_ld_so_cache(new_part(LIBS, flags=flags))
        assert x86_64(cache, "libz.so.1") == "/lib/x86_64-linux-gnu/libz.so.1"


def _corrupt() -> list[tuple[str, bytes]]:
    good = new_part(LIBS)
    nlibs_at = len(NEW_MAGIC)
    many = bytearray(good)
    struct.pack_into("<I", many, nlibs_at, 1000)
    far = bytearray(good)
    struct.pack_into("<I", far, NEW_HEADER.size + 8, len(good) + 10)        # first entry's value offset
    unterminated = good.rstrip(b"\0")                                     # the last string loses its NUL
    old_many = bytearray(old_format(LIBS[:2]))
    struct.pack_into("<I", old_many, 12, 50)
    return [
        ("empty file", b""),
        ("not a cache", b"\x7fELF" + bytes(100)),
        ("new header cut short", good[:30]),
        ("new entry table past the end", bytes(many)),
        ("new entries cut off", good[:NEW_HEADER.size + NEW_ENTRY.size * 2]),
        ("string offset past the end", bytes(far)),
        ("unterminated string", unterminated),
        ("big-endian cache", new_part(LIBS, flags=3)),
        ("cache marked invalid", new_part(LIBS, flags=1)),
        ("old header cut short", OLD_MAGIC + b"\0\x01"),
        ("old entry table past the end", bytes(old_many)),
        ("old strings cut off", old_format(LIBS[:2])[:-3]),
    ]


@pytest.mark.parametrize("what, data", _corrupt(), ids=[w for w, _ in _corrupt()])
def test_a_file_glibc_would_not_use_raises_cache_format_error(what: str, data: bytes) -> None:
    with pytest.raises(CacheFormatError):
        parse_ld_so_cache(data)
    assert issubclass(CacheFormatError, ValueError)


# --- ld.so.conf ------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def ldconfig_dirs(conf: Path, under: Path) -> list[str]:
    """The directories ldconfig itself reads from `conf` (-N -X: it writes no cache and no link),
    those below `under`, in its order."""
    out = subprocess.run([LDCONFIG, "-N", "-X", "-v", "-f", str(conf)], capture_output=True, text=True,
                         timeout=30).stdout
    return [m.group(1) for m in re.finditer(r"^(/\S*): \(from ", out, re.M) if m.group(1).startswith(f"{under}/")]


@pytest.mark.skipif(not os.access(LDCONFIG, os.X_OK), reason="needs /sbin/ldconfig")
def test_ld_so_conf_is_read_as_ldconfig_reads_it(tmp_path: Path) -> None:
    """Comments, blank and indented lines, `dir=TYPE`, trailing slashes, hwcap lines, duplicates,
    include globs (sorted, hidden files skipped, a directory among the matches), several patterns on
    one line, an include of a file with no magic, and a relative include."""
    d = tmp_path / "dirs"
    want = [d / n for n in ("one", "a1", "a2", "b", "old", "slashes", "extra", "rel", "more")]
    for p in want + [d / "hidden", d / "txt"]:
        p.mkdir(parents=True)
    confd = tmp_path / "conf.d"
    write(confd / "b.conf", f"{d}/b\n")
    write(confd / "a.conf", f"{d}/a1\n\t{d}/a2  \n")
    write(confd / ".hidden.conf", f"{d}/hidden\n")
    write(confd / "c.txt", f"{d}/txt\n")
    (confd / "dir.conf").mkdir()
    write(tmp_path / "extra.conf", f"{d}/extra\n")
    write(tmp_path / "rel/x.conf", f"{d}/rel\n")
    write(tmp_path / "more.conf", f"{d}/more\n")
    conf = write(tmp_path / "ld.so.conf", "\n".join([
        "# the system's libraries", "", f"   {d}/one   # indented, with a comment",
        f"include {confd}/*.conf", f"{d}/old=libc6", f"{d}/slashes///", "hwcap 0 nosegneg",
        f"{d}/one", f"include\t{tmp_path}/extra.conf", f"include rel/*.conf {tmp_path}/missing.conf",
        f"include {tmp_path}/more.conf", ""]))
    expected = [str(p) for p in want]
    assert ldconfig_dirs(conf, d) == expected
    assert parse_ld_so_conf(Root("/"), str(conf)) == expected


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """A root whose /etc the tests fill."""
    (tmp_path / "root/etc").mkdir(parents=True)
    return tmp_path / "root/etc"


def test_relative_includes_count_from_the_including_file(etc: Path) -> None:
    write(etc / "ld.so.conf", "include ld.so.conf.d/*.conf\n")
    write(etc / "ld.so.conf.d/10-app.conf", "/opt/app/lib\ninclude ../extra/*.conf\n")
    write(etc / "extra/x.conf", "/opt/extra/lib\n")
    write(etc / "ld.so.conf.d/extra/x.conf", "/wrong/base\n")
    assert parse_ld_so_conf(Root(str(etc.parent))) == ["/opt/app/lib", "/opt/extra/lib"]


def test_a_glob_in_a_directory_component(etc: Path) -> None:
    write(etc / "conf.b/x.conf", "/b\n")
    write(etc / "conf.a/x.conf", "/a\n")
    write(etc / "other/x.conf", "/other\n")
    write(etc / "ld.so.conf", "include /etc/conf.*/x.conf\n")
    assert parse_ld_so_conf(Root(str(etc.parent))) == ["/a", "/b"]


def test_include_cycles_end(etc: Path) -> None:
    write(etc / "ld.so.conf", "/a\ninclude /etc/ld.so.conf\ninclude ld.so.conf.d/*.conf\n")
    write(etc / "ld.so.conf.d/x.conf", "/x\ninclude /etc/ld.so.conf.d/y.conf\n")
    write(etc / "ld.so.conf.d/y.conf", "/y\ninclude /etc/ld.so.conf.d/x.conf x.conf /etc/ld.so.conf\n")
    assert parse_ld_so_conf(Root(str(etc.parent))) == ["/a", "/x", "/y"]


def _depth() -> int:
    frame, n = sys._getframe(), 0
    while frame is not None:
        frame, n = frame.f_back, n + 1
    return n


def test_a_file_including_itself_through_a_dot_is_read_once(etc: Path) -> None:
    write(etc / "ld.so.conf", "/a\ninclude ./ld.so.conf\n")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(_depth() + 300)   # fail in milliseconds rather than after 1000 levels
    try:
        dirs = parse_ld_so_conf(Root(str(etc.parent)))
    finally:
        sys.setrecursionlimit(limit)
    assert dirs == ["/a"]


def test_an_include_separated_by_a_tab_with_several_patterns(etc: Path) -> None:
    write(etc / "a.conf", "/a\n")
    write(etc / "b.conf", "/b\n")
    write(etc / "ld.so.conf", "include\t/etc/a.conf /etc/b.conf\n")
    assert parse_ld_so_conf(Root(str(etc.parent))) == ["/a", "/b"]


def test_includes_never_leave_the_root(tmp_path: Path, etc: Path) -> None:
    """Absolute links restart at the root, `..` stops there: what the host holds beyond it is not read."""
    write(tmp_path / "outside.conf", "/host/outside\n")
    write(tmp_path / "outdir/evil.conf", "/host/outdir\n")
    write(etc.parent / "outside.conf", "/in/root/outside\n")
    write(etc / "ld.so.conf.d/own.conf", "/usr/lib/own\n")
    os.symlink(tmp_path / "outside.conf", etc / "ld.so.conf.d/abs.conf")
    os.symlink("../../../outside.conf", etc / "ld.so.conf.d/rel.conf")
    os.symlink(tmp_path / "outdir", etc / "linked.d")
    write(etc / "ld.so.conf", "include /etc/ld.so.conf.d/*.conf\n"
                              "include /etc/linked.d/*.conf /etc/linked.d/evil.conf\n")
    # on the host, the links do lead out
    assert (etc / "ld.so.conf.d/rel.conf").read_text() == "/host/outside\n"
    assert (etc / "linked.d/evil.conf").read_text() == "/host/outdir\n"
    assert parse_ld_so_conf(Root(str(etc.parent))) == ["/usr/lib/own", "/in/root/outside"]


def test_a_conf_that_is_a_link_out_of_the_root_reads_as_missing(tmp_path: Path, etc: Path) -> None:
    write(tmp_path / "host.conf", "/host/lib\n")
    os.symlink(tmp_path / "host.conf", etc / "ld.so.conf")
    assert parse_ld_so_conf(Root(str(etc.parent))) == []
    assert parse_ld_so_conf(Root(str(etc.parent)), "/etc/no-such.conf") == []


# --- musl ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, dirs", [
    ("/lib\n/usr/local/lib\n/usr/lib\n", ["/lib", "/usr/local/lib", "/usr/lib"]),
    ("/lib:/usr/lib", ["/lib", "/usr/lib"]),
    ("/opt/a::/opt/b\n\n/opt/c:\n", ["/opt/a", "/opt/b", "/opt/c"]),
    ("", []), ("\n \n", []),
])
def test_musl_path_files(text: str, dirs: list[str]) -> None:
    assert parse_musl_path(text) == dirs


@pytest.mark.parametrize("interp, arch, path", [
    ("/lib/ld-musl-x86_64.so.1", "x86_64", "/etc/ld-musl-x86_64.path"),
    ("/opt/musl/lib/ld-musl-aarch64.so.1", "aarch64", "/opt/musl/etc/ld-musl-aarch64.path"),
    ("/ld-musl-x86_64.so.1", "x86_64", "/etc/ld-musl-x86_64.path"),
    ("lib/ld-musl-x86_64.so.1", "x86_64", "/etc/ld-musl-x86_64.path"),
    ("", "armhf", "/etc/ld-musl-armhf.path"),
])
def test_musl_reads_the_path_file_next_to_its_prefix(interp: str, arch: str, path: str) -> None:
    assert musl_path_file(interp, arch) == path


def test_a_musl_path_file_read_from_a_tree(tmp_path: Path, etc: Path) -> None:
    write(etc.parent / "opt/musl/etc/ld-musl-x86_64.path", "/opt/musl/lib:/opt/app/lib\n")
    write(tmp_path / "host.path", "/host/lib\n")
    os.symlink(tmp_path / "host.path", etc / "ld-musl-x86_64.path")
    root = Root(str(etc.parent))
    text = root.read_text(musl_path_file("/opt/musl/lib/ld-musl-x86_64.so.1", "x86_64"))
    assert parse_musl_path(text or "") == ["/opt/musl/lib", "/opt/app/lib"]
    assert root.read_text(musl_path_file("/lib/ld-musl-x86_64.so.1", "x86_64")) is None   # its link leaves the root
