"""ELF facts: what the loader model, the tracer and verify need to know about an ELF file, read
with struct (no pyelftools on this path: the tracer imports this module).

`ElfCache.facts` parses the headers and dynamic section (DT_NEEDED, SONAME, RPATH/RUNPATH, flags)
once per file version for the closure; `interpreter_of` and `shebang_of` read only what the
kernel opens by itself at exec (PT_INTERP, the `#!` line), for the tracer's hot loop and verify.
"""
from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from .errors import ElfError

ELFMAG = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
# e_machine values of the architectures the loader model has tables for (pyelftools' enums name
# them too, but importing them costs every command 40 ms).
EM_386, EM_X86_64, EM_AARCH64 = 3, 62, 183
ELFDATA2LSB, ELFDATA2MSB = 1, 2
ET_EXEC = 2
ET_DYN = 3
PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3
DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5
DT_STRSZ = 10
DT_SONAME = 14
DT_RPATH = 15
DT_RUNPATH = 29
DT_FLAGS_1 = 0x6FFFFFFB
DT_AUXILIARY = 0x7FFFFFFD
DT_FILTER = 0x7FFFFFFF
DF_1_NODEFLIB = 0x00000800
DF_1_PIE = 0x08000000
PN_XNUM = 0xFFFF
ELFOSABI_SYSV, ELFOSABI_GNU = 0, 3
_LIBC_ABI_MAX = 3  # highest EI_ABIVERSION glibc accepts for ELFOSABI_GNU objects (unique, ifunc, absolute)


@dataclass(frozen=True)
class ElfFacts:
    """What the loader needs to know about one ELF file."""

    file_id: tuple[int, int]  # (st_dev, st_ino): ld.so's test for "the same file"
    size: int
    ident: bytes  # e_ident, 16 bytes
    e_version: int
    elf_class: int  # ELFCLASS32 / ELFCLASS64
    data: int  # ELFDATA2LSB / ELFDATA2MSB
    osabi: int
    e_type: int
    machine: int
    phentsize_ok: bool
    interp: str | None
    dynamic: bool
    entries: tuple[tuple[str, str], ...]  # ("needed" | "filter" | "auxiliary", name), in dynamic-section order
    soname: str | None
    rpath: str | None
    runpath: str | None
    flags_1: int
    dynstr: tuple[int, int] | None  # (file offset, size) of the dynamic string table

    @property
    def needed(self) -> tuple[str, ...]:
        return tuple(name for kind, name in self.entries if kind == "needed")

    @property
    def machine_name(self) -> str:
        from elftools.elf.enums import ENUM_E_MACHINE   # only for messages: not on the tracer's path

        names = {v: k for k, v in ENUM_E_MACHINE.items() if isinstance(v, int)}
        return names.get(self.machine, f"machine {self.machine}")

    @property
    def class_name(self) -> str:
        return "ELFCLASS64" if self.elf_class == ELFCLASS64 else "ELFCLASS32"


class _NotElf(Exception):
    pass


class _Corrupt(Exception):
    """Parse failure; the message does not name the file (the cache re-raises it under any name)."""


_EHDR = {
    (ELFCLASS64, "<"): struct.Struct("<HHIQQQIHHHHHH"),
    (ELFCLASS64, ">"): struct.Struct(">HHIQQQIHHHHHH"),
    (ELFCLASS32, "<"): struct.Struct("<HHIIIIIHHHHHH"),
    (ELFCLASS32, ">"): struct.Struct(">HHIIIIIHHHHHH"),
}


def _read_exact(fd: int, size: int, offset: int, file_size: int, what: str) -> bytes:
    if offset < 0 or size < 0 or offset + size > file_size:
        raise _Corrupt(f"truncated: {what} at offset {offset} ({size} bytes) is past the end of the file ({file_size} bytes)")
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise _Corrupt(f"short read of {what}")
    return data


def _parse_elf(fd: int, file_size: int, file_id: tuple[int, int]) -> ElfFacts:
    head = os.pread(fd, 64, 0)
    if head[:4] != ELFMAG:
        raise _NotElf()
    if len(head) < 16:
        raise _Corrupt(f"truncated ELF header ({file_size} bytes)")
    elf_class, data, osabi = head[4], head[5], head[7]
    if elf_class not in (ELFCLASS32, ELFCLASS64):
        raise _Corrupt(f"invalid ELF class {elf_class}")
    if data not in (ELFDATA2LSB, ELFDATA2MSB):
        raise _Corrupt(f"invalid ELF data encoding {data}")
    endian = "<" if data == ELFDATA2LSB else ">"
    ehdr = _EHDR[(elf_class, endian)]
    if len(head) < 16 + ehdr.size:
        raise _Corrupt(f"truncated ELF header ({file_size} bytes)")
    (e_type, machine, e_version, _entry, phoff, shoff, _flags, _ehsize, phentsize, phnum, shentsize, _shnum, _shstrndx) = ehdr.unpack_from(head, 16)
    is64 = elf_class == ELFCLASS64
    want_phentsize = 56 if is64 else 32
    if phnum == PN_XNUM and shoff:
        # The real count lives in sh_info of section header 0.
        sh0 = _read_exact(fd, shentsize or (64 if is64 else 40), shoff, file_size, "section header 0")
        phnum = struct.unpack_from(endian + "I", sh0, 44 if is64 else 28)[0]
    phdr_fmt = struct.Struct(endian + ("IIQQQQQQ" if is64 else "IIIIIIII"))
    loads: list[tuple[int, int, int]] = []
    dyn_seg: tuple[int, int] | None = None
    interp: str | None = None
    phentsize_ok = phentsize == want_phentsize or phnum == 0
    if phnum and phentsize_ok:
        table = _read_exact(fd, phnum * phentsize, phoff, file_size, "program header table")
        for i in range(phnum):
            fields = phdr_fmt.unpack_from(table, i * phentsize)
            if is64:
                p_type, _pflags, p_offset, p_vaddr, _paddr, p_filesz, _memsz, _align = fields
            else:
                p_type, p_offset, p_vaddr, _paddr, p_filesz, _memsz, _pflags, _align = fields
            if p_type == PT_LOAD:
                loads.append((p_vaddr, p_filesz, p_offset))
            elif p_type == PT_DYNAMIC:
                dyn_seg = (p_offset, p_filesz)
            elif p_type == PT_INTERP:
                raw = _read_exact(fd, p_filesz, p_offset, file_size, "PT_INTERP segment")
                interp = os.fsdecode(raw.split(b"\0", 1)[0])
    elif phnum:
        raise _Corrupt(f"unexpected program header entry size {phentsize}")

    entries: list[tuple[str, str]] = []
    soname = rpath = runpath = None
    flags_1 = 0
    dynstr: tuple[int, int] | None = None
    if dyn_seg is not None:
        raw = _read_exact(fd, dyn_seg[1], dyn_seg[0], file_size, "PT_DYNAMIC segment")
        dyn_fmt = struct.Struct(endian + ("qQ" if is64 else "iI"))
        tags: list[tuple[int, int]] = []
        for off in range(0, len(raw) - dyn_fmt.size + 1, dyn_fmt.size):
            tag, val = dyn_fmt.unpack_from(raw, off)
            if tag == DT_NULL:
                break
            tags.append((tag, val))
        strtab = strsz = None
        for tag, val in tags:
            if tag == DT_STRTAB:
                strtab = val
            elif tag == DT_STRSZ:
                strsz = val
            elif tag == DT_FLAGS_1:
                flags_1 = val
        wants_strings = any(t in (DT_NEEDED, DT_SONAME, DT_RPATH, DT_RUNPATH, DT_FILTER, DT_AUXILIARY) for t, _ in tags)
        strings = b""
        if strtab is not None and strsz is not None:
            str_off = _vaddr_to_offset(strtab, loads)
            if str_off is None:
                if wants_strings:
                    raise _Corrupt(f"DT_STRTAB address {strtab:#x} is not in any PT_LOAD segment")
            else:
                dynstr = (str_off, strsz)
                if wants_strings:
                    strings = _read_exact(fd, strsz, str_off, file_size, "dynamic string table")
        elif wants_strings:
            raise _Corrupt("dynamic section has no DT_STRTAB/DT_STRSZ")

        def string(index: int) -> str:
            end = strings.find(b"\0", index)
            if index >= len(strings) or end < 0:
                raise _Corrupt(f"dynamic string offset {index} outside the string table")
            return os.fsdecode(strings[index:end])

        for tag, val in tags:
            if tag == DT_NEEDED:
                entries.append(("needed", string(val)))
            elif tag == DT_FILTER:
                entries.append(("filter", string(val)))
            elif tag == DT_AUXILIARY:
                entries.append(("auxiliary", string(val)))
            elif tag == DT_SONAME:
                soname = string(val)
            elif tag == DT_RPATH:
                rpath = string(val)
            elif tag == DT_RUNPATH:
                runpath = string(val)
    return ElfFacts(
        file_id=file_id,
        size=file_size,
        ident=bytes(head[:16]),
        e_version=e_version,
        elf_class=elf_class,
        data=data,
        osabi=osabi,
        e_type=e_type,
        machine=machine,
        phentsize_ok=phentsize_ok,
        interp=interp,
        dynamic=dyn_seg is not None,
        entries=tuple(entries),
        soname=soname,
        rpath=rpath,
        runpath=runpath,
        flags_1=flags_1,
        dynstr=dynstr,
    )


def _vaddr_to_offset(addr: int, loads: list[tuple[int, int, int]]) -> int | None:
    for vaddr, filesz, offset in loads:
        if vaddr <= addr < vaddr + filesz:
            return addr - vaddr + offset
    return None


def open_regular(host_path: str) -> int:
    """Open a host file for reading without blocking on a FIFO or opening a device: OSError
    (EINVAL) unless it is a regular file."""
    fd = os.open(host_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", host_path)
    return fd


def read_file(host_path: str, limit: int = -1) -> bytes:
    """The first `limit` bytes (all with -1) of a regular host file; OSError otherwise."""
    fd = open_regular(host_path)
    try:
        if limit >= 0:
            return os.pread(fd, limit, 0)
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read()
    finally:
        os.close(fd)


def read_text(host_path: str) -> str:
    return read_file(host_path).decode("utf-8", "surrogateescape")


def is_elf(path: str) -> bool:
    """Cheap magic check: does `path` start with \\x7fELF?"""
    try:
        return read_file(path, 4) == ELFMAG
    except OSError:
        return False


def read_elf_facts(path: str) -> ElfFacts | None:
    """Parse one file without a cache: None if it is not ELF; ElfError if corrupt."""
    return ElfCache().facts(path)


class ElfCache:
    """Parsed facts by file identity (device, inode, mtime, size), shared across resolve() calls.

    Also keeps other parsed files that are keyed the same way (ld.so.cache,
    the loader's compiled-in paths) and the host CPU's features.  Not
    thread-safe.
    """

    def __init__(self) -> None:
        self._facts: dict[tuple[int, int, int, int], ElfFacts | str | None] = {}
        self._files: dict[tuple[object, ...], object] = {}
        self._imports: dict[tuple[object, ...], frozenset[str]] = {}
        self._cpu_flags: frozenset[str] | None = None
        self.parsed = 0  # files actually read
        self.hits = 0  # lookups answered from the cache

    @staticmethod
    def _key(st: os.stat_result) -> tuple[int, int, int, int]:
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def facts(self, host_path: str, shown: str | None = None) -> ElfFacts | None:
        """Facts of the file at `host_path`; None if it is not an ELF file.

        Raises OSError if it cannot be opened, ElfError (naming `shown`, the
        path as the loader spells it) if it is a corrupt or truncated ELF file.
        """
        st = os.stat(host_path)
        name = shown or host_path
        key = self._key(st)
        cached = self._facts.get(key, _MISSING)
        if cached is _MISSING:
            self.parsed += 1
            if not stat.S_ISREG(st.st_mode):
                cached = None
            else:
                fd = open_regular(host_path)
                try:
                    cached = _parse_elf(fd, st.st_size, (st.st_dev, st.st_ino))
                except _NotElf:
                    cached = None
                except _Corrupt as err:
                    cached = str(err)
                finally:
                    os.close(fd)
            self._facts[key] = cached
        else:
            self.hits += 1
        if isinstance(cached, str):
            raise ElfError(f"{name}: {cached}")
        return cached  # type: ignore[return-value]

    def parsed_file(self, host_path: str, parser_id: str, parser: Callable[[bytes], object]) -> object:
        """`parser(contents)` of a (non-ELF) file, cached by file identity; OSError if unreadable."""
        st = os.stat(host_path)
        key = (parser_id, self._key(st))
        if key not in self._files:
            data = read_file(host_path)
            try:
                self._files[key] = parser(data)
            except Exception as err:  # noqa: BLE001 - remembered and reported by the caller
                self._files[key] = err
        return self._files[key]

    def cpu_flags(self) -> frozenset[str]:
        if self._cpu_flags is None:
            self._cpu_flags = _read_cpu_flags()
        return self._cpu_flags

    def imports(self, host_path: str, facts: ElfFacts, symbols: frozenset[str]) -> frozenset[str]:
        """Which of `symbols` the object imports (undefined in .dynsym)."""
        if facts.dynstr is None or not symbols:
            return frozenset()
        key = (facts.file_id, symbols)
        if key in self._imports:
            return self._imports[key]
        result = self._scan_imports(host_path, facts, symbols)
        self._imports[key] = result
        return result

    @staticmethod
    def _scan_imports(host_path: str, facts: ElfFacts, symbols: frozenset[str]) -> frozenset[str]:
        try:
            with os.fdopen(open_regular(host_path), "rb") as fh:
                return _undefined_symbols(fh, facts, symbols)
        except (OSError, struct.error, ValueError):
            return frozenset()


_SHT_DYNSYM = 11


def _undefined_symbols(fh: BinaryIO, facts: ElfFacts, symbols: frozenset[str]) -> frozenset[str]:
    """Which of `symbols` are undefined (imported) in the file's .dynsym.

    Read with struct: pyelftools' symbol iteration took ~25 s for the
    programs in /usr/bin, this takes well under one.
    """
    offset, size = facts.dynstr  # type: ignore[misc]
    fh.seek(offset)
    strings = fh.read(size)
    # Names may share a tail with longer names in the table, so look for
    # "name\0" rather than "\0name\0".
    wanted = {s.encode() for s in symbols if s.encode() + b"\0" in strings}
    if not wanted:
        return frozenset()
    endian = "<" if facts.data == ELFDATA2LSB else ">"
    is64 = facts.elf_class == ELFCLASS64
    fh.seek(0)
    head = fh.read(64)
    fields = _EHDR[(facts.elf_class, endian)].unpack_from(head, 16)
    shoff, shentsize, shnum = fields[5], fields[10], fields[11]
    shdr = struct.Struct(endian + ("IIQQQQIIQQ" if is64 else "IIIIIIIIII"))
    if not shoff or not shnum or shentsize < shdr.size:
        # No section headers: the names are in the string table, so assume
        # they are imports (the conservative answer).
        return frozenset(w.decode() for w in wanted)
    fh.seek(shoff)
    table = fh.read(shnum * shentsize)
    sections = [shdr.unpack_from(table, i * shentsize) for i in range(len(table) // shentsize)]
    found: set[str] = set()
    for _name, sh_type, _flags, _addr, sh_offset, sh_size, sh_link, _info, _align, entsize in sections:
        if sh_type != _SHT_DYNSYM or sh_link >= len(sections):
            continue
        str_section = sections[sh_link]
        fh.seek(str_section[4])
        names = fh.read(str_section[5])
        sym = struct.Struct(endian + ("IBBHQQ" if is64 else "IIIBBH"))
        fh.seek(sh_offset)
        raw = fh.read(sh_size)
        step = entsize or sym.size
        for index in range(0, len(raw) - sym.size + 1, step):
            entry = sym.unpack_from(raw, index)
            st_name, st_shndx = (entry[0], entry[3]) if is64 else (entry[0], entry[5])
            if st_shndx != 0 or not st_name:
                continue
            end = names.find(b"\0", st_name)
            name = names[st_name:end] if end >= 0 else b""
            if name in wanted:
                found.add(name.decode())
    return frozenset(found)


_MISSING = object()


def _read_cpu_flags() -> frozenset[str]:
    flags: set[str] = set()
    vendor = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags") and not flags:
                    flags.update(line.split(":", 1)[1].split())
                elif line.startswith("vendor_id") and not vendor:
                    vendor = line.split(":", 1)[1].strip()
                if flags and vendor:
                    break
    except OSError:
        pass
    if vendor:
        flags.add("vendor:" + vendor)
    return frozenset(flags)


# (e_phoff format and offset, e_phentsize offset, program header format) by ELF class
_ELF_LAYOUT = {1: ("I", 28, 42, "IIIIIIII"), 2: ("Q", 32, 54, "IIQQQQQQ")}


def interpreter_of(path: str) -> str | None:
    """PT_INTERP of an ELF file of either class and byte order, following symlinks (the tracer
    reads /proc/TID/exe): a few reads, for the tracer's hot loop at every exec. ElfFacts.interp
    says the same for the closure, with the whole dynamic section."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in _ELF_LAYOUT or head[5] not in (1, 2):
                return None
            order = "<" if head[5] == 1 else ">"
            off_fmt, off_at, ent_at, ph_fmt = _ELF_LAYOUT[head[4]]
            phoff, = struct.unpack_from(order + off_fmt, head, off_at)
            phentsize, phnum = struct.unpack_from(order + "HH", head, ent_at)
            if phentsize < struct.calcsize(ph_fmt) or phnum > 4096:
                return None
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum):
                fields = struct.unpack_from(order + ph_fmt, table, i * phentsize)
                # ELF64: type, flags, offset, vaddr, paddr, filesz; ELF32: type, offset, vaddr, paddr, filesz
                p_type, p_offset, p_filesz = (fields[0], fields[2], fields[5]) if head[4] == 2 else \
                    (fields[0], fields[1], fields[4])
                if p_type == 3:   # PT_INTERP
                    f.seek(p_offset)
                    return f.read(min(p_filesz, 4096)).split(b"\0")[0].decode("utf-8", "surrogateescape")
    except (OSError, struct.error):
        return None
    return None


def shebang_of(path: str) -> str | None:
    """The interpreter a `#!` file names, as the kernel reads it (shebang_words); None for others."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    return shebang_words(head)[0] or None


def shebang_words(head: bytes) -> tuple[str, str | None]:
    """(interpreter, argument) of a `#!` line as Linux splits it (fs/binfmt_script.c): spaces and
    tabs around them are dropped, nothing else (a `\\r` stays part of the name), the name ends at
    a space, tab or NUL, and the rest of the line is one argument (None: none)."""
    line = head[2:].split(b"\n", 1)[0].split(b"\0", 1)[0].strip(b" \t")
    cut = min((i for i in (line.find(b" "), line.find(b"\t")) if i >= 0), default=len(line))
    interp, rest = line[:cut], line[cut:].lstrip(b" \t")
    return os.fsdecode(interp), (os.fsdecode(rest) if rest else None)
