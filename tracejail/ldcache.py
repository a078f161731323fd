"""Readers for the loaders' own configuration files, without running ldconfig or ld.so.

* ``/etc/ld.so.cache``: glibc's binary cache, in the "new" format
  (``glibc-ld.so.cache1.1``, with the glibc-hwcaps extension of glibc >= 2.33),
  the old libc5 format, or the old format with the new one embedded.
* ``/etc/ld.so.conf`` with its ``include`` globs: ldconfig's input, used as a
  fallback when a tree has no cache (as if ldconfig had been run on it).
* ``/etc/ld-musl-$ARCH.path``: musl's search path.

The lookup in :meth:`LdCache.lookup` follows glibc 2.36's ``search_cache``
(elf/dl-cache.c) so that the entry picked is the one ld.so would pick.
"""
from __future__ import annotations

import fnmatch
import glob
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tracejail.root import Root, Status

CACHE_MAGIC_NEW = b"glibc-ld.so.cache1.1"
CACHE_MAGIC_OLD = b"ld.so-1.7.0"
_NEW_HEADER = struct.Struct("<20sIIB3xI12x")  # magic+version, nlibs, len_strings, flags, extension_offset
_NEW_ENTRY = struct.Struct("<iIIIQ")  # flags, key, value, osversion, hwcap
_OLD_ENTRY = struct.Struct("<iII")  # flags, key, value
_EXT_HEADER = struct.Struct("<II")  # magic, count
_EXT_SECTION = struct.Struct("<IIII")  # tag, flags, offset, size
EXTENSION_MAGIC = 0xEAA42174
EXTENSION_TAG_GLIBC_HWCAPS = 1

# hwcap bit 62 alone (ignoring the ISA-level bits 32..41) marks an entry from
# a glibc-hwcaps subdirectory; its low 32 bits index the hwcaps name table.
HWCAP_EXTENSION = 1 << 62
_ISA_LEVEL_MASK = (1 << 10) - 1
# glibc ignores legacy hwcap bit 63 (the old "tls" marker) when matching.
_HWCAP_TLS = 1 << 63

# Cache entry flags (ldconfig.h): the ELF/libc6 kind in the low byte, the
# architecture in the second byte.
FLAG_ELF = 0x0001
FLAG_ELF_LIBC6 = 0x0003
FLAG_X8664_LIB64 = 0x0300
FLAG_AARCH64_LIB64 = 0x0A00


@dataclass(frozen=True)
class CacheEntry:
    flags: int
    key: str
    value: str
    osversion: int = 0
    hwcap: int = 0

    @property
    def is_hwcaps_subdir(self) -> bool:
        return ((self.hwcap >> 32) & ~_ISA_LEVEL_MASK) == (HWCAP_EXTENSION >> 32)

    @property
    def isa_level(self) -> int:
        return (self.hwcap >> 32) & _ISA_LEVEL_MASK


_DIGITS = re.compile(r"\d+")


def cache_key(name: str) -> str:
    """Normalise a library name the way _dl_cache_libcmp compares it.

    glibc compares runs of digits numerically, so ``libfoo.so.01`` and
    ``libfoo.so.1`` name the same cache entry.
    """
    return _DIGITS.sub(lambda m: str(int(m.group())), name)


@dataclass(frozen=True)
class LdCache:
    """A parsed ld.so.cache: entries by normalised key, in file order."""

    entries: Mapping[str, tuple[CacheEntry, ...]]
    hwcaps_names: tuple[str, ...]  # by extension index
    format: str  # "new", "old+new" or "old"

    def lookup(
        self,
        name: str,
        *,
        accept_flags: Callable[[int], bool],
        default_flags: int,
        hwcaps_priority: Mapping[str, int],
        isa_level_ok: Callable[[int], bool] = lambda level: level == 0,
        legacy_hwcap_ok: Callable[[int], bool] = lambda hwcap: hwcap == 0,
        os_version: int = 0,
    ) -> str | None:
        """The path ld.so would take from the cache for `name`, or None.

        `hwcaps_priority` maps the glibc-hwcaps subdirectory names the CPU
        supports to their priority (1 is best); unsupported names are absent.
        """
        best: str | None = None
        best_priority = 0
        for entry in self.entries.get(cache_key(name), ()):
            if not accept_flags(entry.flags):
                continue
            named = entry.is_hwcaps_subdir and self.format != "old"
            if named and not isa_level_ok(entry.isa_level):
                continue
            # Entries from glibc-hwcaps subdirectories sort first; once they
            # are exhausted a match among them wins over plain entries.
            if not named and best is not None:
                break
            if not named and not legacy_hwcap_ok(entry.hwcap & ~_HWCAP_TLS):
                continue
            if os_version and entry.osversion > os_version:
                continue
            if named:
                index = entry.hwcap & 0xFFFFFFFF
                subdir = self.hwcaps_names[index] if index < len(self.hwcaps_names) else None
                priority = hwcaps_priority.get(subdir, 0) if subdir else 0
                if priority == 0:
                    continue
                if best is not None and priority >= best_priority:
                    continue
                best_priority = priority
            best = entry.value
            if not named and entry.flags == default_flags:
                break
        return best


class CacheFormatError(ValueError):
    """The file is not a cache glibc would use (ld.so then ignores it)."""


def _cstr(data: bytes, offset: int) -> str:
    if offset >= len(data):
        raise CacheFormatError(f"string offset {offset} beyond end of file")
    end = data.find(b"\0", offset)
    if end < 0:
        raise CacheFormatError("unterminated string")
    return os.fsdecode(data[offset:end])


def _parse_new(data: bytes, base: int, file_fmt: str) -> LdCache:
    if len(data) - base < _NEW_HEADER.size:
        raise CacheFormatError("truncated header")
    magic, nlibs, _len_strings, flags, ext_offset = _NEW_HEADER.unpack_from(data, base)
    if magic != CACHE_MAGIC_NEW:
        raise CacheFormatError("bad magic")
    # flags & 3: 0 unknown, 1 invalid, 2 little endian, 3 big endian.
    if flags & 3 not in (0, 2):
        raise CacheFormatError("cache is not little-endian or marked invalid")
    if (len(data) - base - _NEW_HEADER.size) // _NEW_ENTRY.size < nlibs:
        raise CacheFormatError("entry table extends beyond end of file")
    entries: dict[str, list[CacheEntry]] = {}
    pos = base + _NEW_HEADER.size
    for _ in range(nlibs):
        eflags, key, value, osversion, hwcap = _NEW_ENTRY.unpack_from(data, pos)
        pos += _NEW_ENTRY.size
        # String offsets are relative to the new header.
        entry = CacheEntry(eflags, _cstr(data, base + key), _cstr(data, base + value), osversion, hwcap)
        entries.setdefault(cache_key(entry.key), []).append(entry)
    hwcaps_names: tuple[str, ...] = ()
    if ext_offset and ext_offset % 4 == 0 and ext_offset + _EXT_HEADER.size <= len(data):
        # The extension directory offset, and the offsets in it, are relative
        # to the start of the file.
        ext_magic, count = _EXT_HEADER.unpack_from(data, ext_offset)
        if ext_magic == EXTENSION_MAGIC and ext_offset + _EXT_HEADER.size + count * _EXT_SECTION.size <= len(data):
            for i in range(count):
                tag, _sflags, offset, size = _EXT_SECTION.unpack_from(
                    data, ext_offset + _EXT_HEADER.size + i * _EXT_SECTION.size
                )
                if tag != EXTENSION_TAG_GLIBC_HWCAPS or offset + size > len(data):
                    continue
                if size == 0 or size % 4 or offset % 4:
                    continue
                indices = struct.unpack_from(f"<{size // 4}I", data, offset)
                hwcaps_names = tuple(_cstr(data, idx) for idx in indices)
    return LdCache({k: tuple(v) for k, v in entries.items()}, hwcaps_names, file_fmt)


def parse_ld_so_cache(data: bytes) -> LdCache:
    """Parse the bytes of an ld.so.cache.  Raises CacheFormatError if glibc would ignore it."""
    if data.startswith(CACHE_MAGIC_NEW):
        return _parse_new(data, 0, "new")
    if data.startswith(CACHE_MAGIC_OLD):
        header = len(CACHE_MAGIC_OLD) + 1  # magic + padding to 4 bytes
        if len(data) < header + 4:
            raise CacheFormatError("truncated header")
        (nlibs,) = struct.unpack_from("<I", data, 12)
        table = 16
        if (len(data) - table) // _OLD_ENTRY.size < nlibs:
            raise CacheFormatError("entry table extends beyond end of file")
        # The new format may follow, aligned to 8 bytes; glibc prefers it.
        new_base = (table + nlibs * _OLD_ENTRY.size + 7) & ~7
        if data[new_base : new_base + len(CACHE_MAGIC_NEW)] == CACHE_MAGIC_NEW:
            return _parse_new(data, new_base, "old+new")
        strings = table + nlibs * _OLD_ENTRY.size
        entries: dict[str, list[CacheEntry]] = {}
        for i in range(nlibs):
            eflags, key, value = _OLD_ENTRY.unpack_from(data, table + i * _OLD_ENTRY.size)
            entry = CacheEntry(eflags, _cstr(data, strings + key), _cstr(data, strings + value))
            entries.setdefault(cache_key(entry.key), []).append(entry)
        return LdCache({k: tuple(v) for k, v in entries.items()}, (), "old")
    raise CacheFormatError("not an ld.so.cache (bad magic)")


# --- ld.so.conf -----------------------------------------------------------


def parse_ld_so_conf(root: Root, path: str = "/etc/ld.so.conf") -> list[str]:
    """Directories named by ld.so.conf and its includes, in ldconfig's order.

    `path` is inside `root`; included globs are matched inside `root` too (never through a
    symlink out of it), relative ones against the including file's directory (as ldconfig
    does). Missing files yield nothing.
    """
    dirs: list[str] = []
    _read_conf(root, path, dirs, set())
    return dirs


def _glob_in_root(root: Root, pattern: str) -> list[str]:
    """glob.glob for an absolute pattern, each component matched inside `root`."""
    matches = ["/"]
    for part in [p for p in pattern.split("/") if p]:
        found: list[str] = []
        for base in matches:
            if glob.has_magic(part):
                found += [os.path.join(base, n) for n in root.listdir(base)
                          if fnmatch.fnmatchcase(n, part) and (part.startswith(".") or not n.startswith("."))]
            else:
                candidate = os.path.join(base, part)
                if root.resolve(candidate).status is Status.OK:
                    found.append(candidate)
        matches = found
    return sorted(matches)


def _read_conf(root: Root, path: str, dirs: list[str], seen: set[str]) -> None:
    # Include loops, however the file is spelled (./, ../, a symlink): by the file it reaches.
    reached = root.realpath(path)
    if reached in seen:
        return
    seen.add(reached)
    text = root.read_text(path)
    if text is None:
        return
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        word, _, rest = line.replace("\t", " ").partition(" ")
        if word == "include" and rest.strip():
            for pattern in rest.split():
                if not pattern.startswith("/"):
                    pattern = os.path.join(os.path.dirname(path), pattern)
                for match in _glob_in_root(root, pattern):
                    _read_conf(root, match, dirs, seen)
        elif word.lower() == "hwcap" and rest.strip():
            continue  # obsolete; ignored by current ldconfig
        else:
            # Old syntax "dir=TYPE" still parses; the type is ignored.
            directory = line.split("=", 1)[0].strip()
            if len(directory) > 1:
                directory = directory.rstrip("/") or "/"
            if directory and directory not in dirs:
                dirs.append(directory)


# --- musl -----------------------------------------------------------------


def parse_musl_path(text: str) -> list[str]:
    """Directories of an /etc/ld-musl-$ARCH.path file (separated by newlines or colons)."""
    return [d for d in re.split(r"[:\n]", text) if d.strip()]


def musl_path_file(interp: str, arch: str) -> str:
    """Where musl looks for its path file, given its loader's path.

    musl takes its own path up to the second-to-last slash as a prefix, so
    /lib/ld-musl-x86_64.so.1 reads /etc/ld-musl-x86_64.path and
    /opt/musl/lib/ld-musl-x86_64.so.1 reads /opt/musl/etc/ld-musl-x86_64.path.
    """
    prefix = ""
    if interp.startswith("/"):
        slashes = [i for i, ch in enumerate(interp) if ch == "/"]
        if len(slashes) >= 2:
            prefix = interp[: slashes[-2]]
    return f"{prefix}/etc/ld-musl-{arch}.path"
