"""Smaller content for the same image: ELF files stripped (`--strip`), Python modules shipped as
bytecode only (`--bytecode-only`).

Both rewrite a planned image (rootfs.Plan) after the file set is chosen and before anything is
written. A changed file's entry gets content that the build wrote into its own work directory; the
host file is only ever read, through rootfs.open_entry (the very node that was planned). Staging,
the archive, the SBOM and provenance therefore all see the shrunk file.

Both are deterministic: GNU strip writes no timestamps, and bytecode is either the interpreter's
own cached .pyc (copied) or compiled by a child interpreter with a fixed hash seed.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import marshal
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from typing import BinaryIO
from dataclasses import dataclass, field

from tracejail import pyimports, rootfs
from tracejail import trace as tr
from tracejail.errors import TracejailError, UsageError
from tracejail.root import Root, SourceChanged, Status, parent_of

ELF_MAGIC = b"\x7fELF"
# What `strip --strip-unneeded` leaves that no run needs: the compiler's ident strings.
STRIP_ARGS = ("--strip-unneeded", "--remove-section=.comment")
# Sections whose presence means strip has something to remove. Without any of them the file is
# already stripped, and no process is started for it.
_STRIPPABLE_PREFIXES = (".symtab", ".strtab", ".comment", ".debug", ".zdebug", ".gnu.debuglto", ".stab")
_SHT_NOBITS = "SHT_NOBITS"
_PYC_HEADER = 16


class Option:
    STRIP = "--strip"
    BYTECODE_ONLY = "--bytecode-only"


@dataclass
class Saving:
    """What one option changed: how many files, and their bytes before and after."""

    option: str
    files: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0

    @property
    def saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def to_json(self) -> dict[str, object]:
        return {"files": self.files, "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "bytes_saved": self.saved, "seconds": round(self.seconds, 3)}


@dataclass
class ShrinkResult:
    savings: list[Saving] = field(default_factory=list)
    # Files an option would have changed but left as they are, and why (the summary lists them).
    kept: list[tuple[str, str, str]] = field(default_factory=list)    # (option, path, why)
    # Image paths whose content the build made from another file, and how (provenance, explain).
    derived: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# --strip


def strip_tool() -> str:
    """GNU strip's path, or a UsageError that says how to get it."""
    path = shutil.which("strip")
    if path is None:
        raise UsageError("--strip needs GNU strip, which is not installed: apt-get install binutils")
    return path


@dataclass(frozen=True)
class ElfLayout:
    """What decides whether a file can be stripped safely."""

    loadable: bool            # an executable or a shared object (not a .o, not a core file)
    strippable: bool          # holds something strip removes
    end: int                  # last byte any header, section or segment covers
    interp: str | None
    has_dynsym: bool
    build_id: bool
    sections: int
    loads: tuple[Load, ...] = ()
    headers: tuple[tuple[int, int], ...] = ()   # file ranges of the ELF header and program headers


@dataclass(frozen=True)
class Load:
    """A PT_LOAD segment: what the loader maps, and from where in the file."""

    offset: int
    vaddr: int
    filesz: int
    memsz: int
    flags: int
    align: int

    def mapped(self) -> tuple[int, int, int, int, int]:
        """Everything but the file offset, which strip may legitimately move."""
        return self.vaddr, self.filesz, self.memsz, self.flags, self.align


def elf_layout(f: object) -> ElfLayout:
    """Read the layout of the ELF file open as `f` (raises ELFError, or ValueError/struct errors
    for a corrupt file)."""
    from elftools.elf.elffile import ELFFile   # here: importing pyelftools costs every build 45 ms

    elf = ELFFile(f)
    hdr = elf.header
    end = max(hdr["e_ehsize"], hdr["e_shoff"] + hdr["e_shnum"] * hdr["e_shentsize"],
              hdr["e_phoff"] + hdr["e_phnum"] * hdr["e_phentsize"])
    interp = None
    loads = []
    for seg in elf.iter_segments():
        end = max(end, seg["p_offset"] + seg["p_filesz"])
        if seg["p_type"] == "PT_INTERP":
            interp = seg.get_interp_name()
        elif seg["p_type"] == "PT_LOAD":
            loads.append(Load(seg["p_offset"], seg["p_vaddr"], seg["p_filesz"], seg["p_memsz"], seg["p_flags"],
                              seg["p_align"]))
    strippable = has_dynsym = build_id = False
    for sec in elf.iter_sections():
        if sec["sh_type"] != _SHT_NOBITS:
            end = max(end, sec["sh_offset"] + sec["sh_size"])
        name = sec.name
        strippable = strippable or name.startswith(_STRIPPABLE_PREFIXES)
        has_dynsym = has_dynsym or name == ".dynsym"
        build_id = build_id or name == ".note.gnu.build-id"
    return ElfLayout(loadable=hdr["e_type"] in ("ET_EXEC", "ET_DYN"), strippable=strippable, end=end,
                     interp=interp, has_dynsym=has_dynsym, build_id=build_id, sections=hdr["e_shnum"],
                     loads=tuple(loads),
                     headers=((0, hdr["e_ehsize"]), (hdr["e_phoff"], hdr["e_phnum"] * hdr["e_phentsize"])))


# Zero bytes after the last section are alignment padding, not a payload; look at this many.
_PADDING_CHECK = 1 << 16


def _why_not_strip(layout: ElfLayout, size: int, fd: int) -> str | None:
    if layout.sections == 0:
        return "no section headers (a packed or hand-made ELF file): nothing strip can judge"
    tail = size - layout.end
    if tail > 0 and (tail > _PADDING_CHECK or os.pread(fd, tail, layout.end).strip(b"\0")):
        return (f"{tail} bytes follow its ELF contents (an appended payload, as self-extracting "
                "programs carry), which strip would drop")
    return None


def _segment_bytes(f: BinaryIO, load: Load, headers: tuple[tuple[int, int], ...]) -> bytes:
    """The bytes the loader maps from `load`, with the ELF and program headers blanked (strip
    rewrites offsets there: where the section headers are, where a segment now starts)."""
    f.seek(load.offset)
    data = bytearray(f.read(load.filesz))
    for start, length in headers:
        lo, hi = max(start, load.offset), min(start + length, load.offset + load.filesz)
        if lo < hi:
            data[lo - load.offset:hi - load.offset] = bytes(hi - lo)
    return bytes(data)


def _mapping_changed(before: ElfLayout, before_f: BinaryIO, after: ElfLayout, after_f: BinaryIO) -> str | None:
    """Why the stripped copy would not load as the original does: strip must change nothing the
    loader maps. (GNU strip mangles the extra segments patchelf appends, as in auditwheel-repaired
    wheels' libraries: "ELF load command address/offset not page-aligned".)"""
    changed = "strip would change what the loader maps (a segment layout such as patchelf makes)"
    if [lo.mapped() for lo in before.loads] != [lo.mapped() for lo in after.loads]:
        return changed
    for b, a in zip(before.loads, after.loads):
        if a.align > 1 and (a.offset - a.vaddr) % a.align:
            return changed
        if _segment_bytes(before_f, b, before.headers) != _segment_bytes(after_f, a, after.headers):
            return changed
    return None


def _lost(before: ElfLayout, after: ElfLayout) -> str | None:
    """What the stripped copy lost that the loader or run-time tools need, if anything."""
    if after.interp != before.interp:
        return "strip changed its program interpreter"
    if before.has_dynsym and not after.has_dynsym:
        return "strip removed .dynsym"
    if before.build_id and not after.build_id:
        return "strip removed the build-id note"
    if not after.loadable:
        return "strip changed its ELF type"
    return None


@dataclass
class _StripJob:
    entry: rootfs.Entry
    fd: int
    out: str
    before: ElfLayout
    proc: subprocess.Popen[bytes] | None = None


def _candidates(plan: rootfs.Plan, result: ShrinkResult) -> Iterable[tuple[rootfs.Entry, int, ElfLayout]]:
    """Kept ELF executables and shared objects that hold something to strip, each with its host
    file open (the very node planned) and its layout; the caller closes the fd."""
    for path in sorted(plan.entries, key=rootfs.sort_key):
        e = plan.entries[path]
        if e.kind != "file" or e.identity is None or e.size < 64:
            continue      # only host files: build's own (passwd, metadata) are no ELF
        try:
            fd = rootfs.open_entry(e)
        except (SourceChanged, TracejailError):
            continue      # writing the image reports it, as for any other file
        keep_fd = False
        try:
            if os.pread(fd, 4, 0) != ELF_MAGIC:
                continue
            with os.fdopen(os.dup(fd), "rb") as f:
                try:
                    layout = elf_layout(f)
                except Exception as err:  # noqa: BLE001 - pyelftools raises many kinds on corrupt input
                    result.kept.append((Option.STRIP, path, f"not a well-formed ELF file ({err})"))
                    continue
            if not layout.loadable or not layout.strippable:
                continue
            why = _why_not_strip(layout, e.size, fd)
            if why:
                result.kept.append((Option.STRIP, path, why))
                continue
            keep_fd = True
            yield e, fd, layout
        finally:
            if not keep_fd:
                os.close(fd)


def strip_plan(plan: rootfs.Plan, workdir: str, result: ShrinkResult, *, jobs: int | None = None,
               tool: str | None = None) -> Saving:
    """Replace every kept ELF executable and shared object in `plan` by a stripped copy made in
    `workdir` (see the module docstring). A file strip cannot handle, or whose copy lost something
    the loader needs, stays as it is and is named in `result.kept`."""
    tool = tool or strip_tool()
    saving = Saving(Option.STRIP)
    started = time.monotonic()
    out_dir = os.path.join(workdir, "strip")
    os.mkdir(out_dir, 0o700)
    limit = max(1, jobs or os.cpu_count() or 1)
    running: list[_StripJob] = []
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}

    def judge(job: _StripJob, err: bytes) -> None:
        e = job.entry
        assert job.proc is not None
        if job.proc.returncode != 0:
            first = (err.decode("utf-8", "replace").strip().splitlines() or ["failed"])[0]
            result.kept.append((Option.STRIP, e.path, f"strip failed: {first}"))
            return
        size = os.stat(job.out).st_size
        if size >= e.size:
            return       # nothing gained (already stripped apart from a tiny section)
        with open(job.out, "rb") as f, os.fdopen(os.dup(job.fd), "rb") as original:
            try:
                after = elf_layout(f)
                lost = _lost(job.before, after) or _mapping_changed(job.before, original, after, f)
            except Exception as exc:  # noqa: BLE001 - pyelftools raises many kinds
                lost = f"strip wrote a file pyelftools cannot read ({exc})"
        if lost:
            result.kept.append((Option.STRIP, e.path, lost))
            return
        plan.entries[e.path] = dataclasses.replace(e, source=job.out, size=size, identity=None)
        result.derived[e.path] = f"stripped by `tracejail build --strip` ({e.size} -> {size} bytes)"
        saving.files += 1
        saving.bytes_before += e.size
        saving.bytes_after += size

    def finish(job: _StripJob) -> None:
        assert job.proc is not None
        _, err = job.proc.communicate()
        try:
            judge(job, err)
        finally:
            os.close(job.fd)

    try:
        for n, (e, fd, layout) in enumerate(_candidates(plan, result)):
            job = _StripJob(e, fd, os.path.join(out_dir, str(n)), layout)
            running.append(job)
            # Strip reads the planned node itself through the inherited descriptor: no path on
            # the host is opened again, and the host file is never written.
            job.proc = subprocess.Popen([tool, *STRIP_ARGS, "-o", job.out, f"/dev/fd/{fd}"],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, pass_fds=(fd,), env=env)
            while len(running) >= limit:
                finish(running.pop(0))
        while running:
            finish(running.pop(0))
    except BaseException:
        for job in running:
            if job.proc is not None:
                job.proc.kill()
                job.proc.wait()
            os.close(job.fd)
        raise
    saving.seconds = time.monotonic() - started
    return saving


# --------------------------------------------------------------------------------------------
# --bytecode-only

# Compiles (image path, source, opt level, mtime, size, output) jobs read from stdin with the
# interpreter running it; prints one error line per source that does not compile.
_COMPILE = r"""
import importlib.util, marshal, sys
for path, source, optimize, mtime, size, out in marshal.loads(sys.stdin.buffer.read()):
    try:
        code = compile(source, path, "exec", dont_inherit=True, optimize=optimize)
    except (SyntaxError, ValueError) as err:
        print(path + "\t" + str(err).replace("\n", " "))
        continue
    header = importlib.util.MAGIC_NUMBER + bytes(4) + (mtime & 0xFFFFFFFF).to_bytes(4, "little") \
        + (size & 0xFFFFFFFF).to_bytes(4, "little")
    with open(out, "xb") as f:
        f.write(header + marshal.dumps(code))
"""


def pyc_is_current(data: bytes, source: rootfs.Entry) -> bool | None:
    """True when a cached .pyc matches its source as the interpreter checks it, False when stale,
    None when tracejail cannot tell (a checked hash-based .pyc of another interpreter)."""
    if len(data) < _PYC_HEADER:
        return False
    flags = int.from_bytes(data[4:8], "little")
    if flags & 0b1:                       # hash-based
        if not flags & 0b10:
            return True                   # unchecked: the interpreter trusts it as it is
        if data[:4] != importlib.util.MAGIC_NUMBER:
            return None
        src = rootfs.read_entry(source)
        return data[8:16] == importlib.util.source_hash(src)
    mtime = int.from_bytes(data[8:12], "little")
    size = int.from_bytes(data[12:16], "little")
    return mtime == source.mtime & 0xFFFFFFFF and size == source.size & 0xFFFFFFFF


def replaced_by_bytecode(path: str, tree: Root) -> bool:
    """True when `path` is a module source, or its cached .pyc, that an image built with
    --bytecode-only holds as sourceless bytecode: looking it up and not finding it is no miss."""
    standin = pyimports.sourceless_standin(path)
    return standin is not None and tree.exists(standin)


def _link_targets(plan: rootfs.Plan) -> set[str]:
    """Image paths something else in the image points at: hard links' first paths and the nodes
    symlinks name (one hop). Such a file is left as it is: removing it would break the link."""
    out = set()
    for e in plan.entries.values():
        if e.kind == "hardlink" and e.link_target:
            out.add(e.link_target)
        elif e.kind == "symlink" and e.link_target:
            target = e.link_target if e.link_target.startswith("/") else \
                os.path.join(parent_of(e.path), e.link_target)
            out.add(os.path.normpath(target))
    return out


@dataclass
class _Module:
    source: rootfs.Entry
    pycs: list[pyimports.CachedPyc]
    chosen: pyimports.CachedPyc


def _modules(plan: rootfs.Plan, read: set[str], result: ShrinkResult) -> list[_Module]:
    """Kept sources the run imported through their cached .pyc, and did not read as data."""
    groups: dict[str, list[pyimports.CachedPyc]] = {}
    for path, e in plan.entries.items():
        c = pyimports.cached_pyc(path)
        if c is not None and e.kind == "file":
            groups.setdefault(c.source, []).append(c)
    linked = _link_targets(plan)
    modules = []
    for source_path in sorted(groups, key=rootfs.sort_key):
        pycs = sorted(groups[source_path], key=lambda c: (c.tag, c.optimize))
        src = plan.entries.get(source_path)
        if src is None or src.kind != "file":
            continue
        why = None
        tags = sorted({c.tag for c in pycs})
        if source_path in read:
            why = "the run read its source (as data, or to compile it)"
        elif len(tags) > 1:
            why = f"imported by {len(tags)} interpreters ({', '.join(tags)}); one sourceless .pyc serves one"
        elif pyimports.sourceless_path(source_path) in plan.entries:
            why = f"{pyimports.sourceless_path(source_path)} is already in the image"
        elif source_path in linked or any(c.path in linked for c in pycs):
            why = "a link in the image points at it"
        if why:
            result.kept.append((Option.BYTECODE_ONLY, source_path, why))
            continue
        modules.append(_Module(src, pycs, pycs[0]))
    return modules


def bytecode_plan(plan: rootfs.Plan, read: set[str], workdir: str, result: ShrinkResult, *,
                  keep_dirs: Iterable[str] = ()) -> Saving:
    """Ship each module the run imported through its cached .pyc as `NAME.pyc` beside where its
    `NAME.py` was (the import system loads such sourceless modules), and drop the `.py` and its
    `__pycache__` copies. `read` holds the image paths the run read or executed: a source read is
    kept. Bytecode is the interpreter's own cached .pyc when it is current, else compiled for it
    by a child of tracejail's own interpreter when that is the same version (same magic number);
    otherwise the source stays. `keep_dirs` (the image user's directories) are never dropped."""
    saving = Saving(Option.BYTECODE_ONLY)
    started = time.monotonic()
    out_dir = os.path.join(workdir, "bytecode")
    os.mkdir(out_dir, 0o700)
    ready: list[tuple[_Module, str]] = []            # module, file holding its bytecode
    to_compile: list[tuple[_Module, str]] = []
    compiled: set[str] = set()
    compile_jobs: list[tuple[str, bytes, int, int, int, str]] = []
    for n, m in enumerate(_modules(plan, read, result)):
        out = os.path.join(out_dir, str(n))
        try:
            data = rootfs.read_entry(plan.entries[m.chosen.path])
            current = pyc_is_current(data, m.source)
            if current:
                with open(out, "xb") as f:
                    f.write(data)
                ready.append((m, out))
                continue
            if data[:4] != importlib.util.MAGIC_NUMBER or m.chosen.tag != sys.implementation.cache_tag:
                result.kept.append((Option.BYTECODE_ONLY, m.source.path,
                                    f"its cached .pyc is {'stale' if current is False else 'unverifiable'} and "
                                    f"tracejail's Python ({sys.implementation.cache_tag}) cannot compile for "
                                    f"{m.chosen.tag}"))
                continue
            source = rootfs.read_entry(m.source)
        except SourceChanged:
            continue      # writing the image reports it
        compile_jobs.append((m.source.path, source, m.chosen.optimize, m.source.mtime, m.source.size, out))
        to_compile.append((m, out))
    if compile_jobs:
        failed = _compile(compile_jobs)
        for m, out in to_compile:
            if m.source.path in failed:
                result.kept.append((Option.BYTECODE_ONLY, m.source.path, f"does not compile: {failed[m.source.path]}"))
            else:
                ready.append((m, out))
                compiled.add(out)
    for m, out in sorted(ready, key=lambda r: rootfs.sort_key(r[0].source.path)):
        src = m.source
        target = pyimports.sourceless_path(src.path)
        size = os.stat(out).st_size
        before = src.size + sum(plan.entries[c.path].size for c in m.pycs)
        for gone in [src.path, *(c.path for c in m.pycs)]:
            del plan.entries[gone]
            plan.ownership.pop(gone, None)
        mode = src.mode & ~0o111     # bytecode is read, never executed
        plan.entries[target] = rootfs.Entry(target, "file", mode, out, None, size, src.uid, src.gid, src.mtime)
        how = "compiled" if out in compiled else "current cached"
        result.derived[target] = (f"bytecode of {src.path} for {m.chosen.tag} ({how} .pyc), in place of the "
                                  "source (`tracejail build --bytecode-only`)")
        saving.files += 1
        saving.bytes_before += before
        saving.bytes_after += size
    _drop_empty_pycache_dirs(plan, set(keep_dirs))
    saving.seconds = time.monotonic() - started
    return saving


def _compile(jobs: list[tuple[str, bytes, int, int, int, str]]) -> dict[str, str]:
    """Compile in a child of this interpreter (-I: no user site, no environment) with a fixed
    hash seed, so the bytes depend only on the sources. Returns {path: error} for failures."""
    env = {"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    proc = subprocess.run([sys.executable, "-I", "-c", _COMPILE], input=marshal.dumps(jobs),
                          capture_output=True, env=env, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"])[-1]
        raise TracejailError(f"--bytecode-only: compiling failed ({last})")
    failed = {}
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        path, _, err = line.partition("\t")
        failed[path] = err
    return failed


def _drop_empty_pycache_dirs(plan: rootfs.Plan, keep: set[str]) -> None:
    parents = {parent_of(p) for p in plan.entries}
    for path in sorted(plan.entries, key=rootfs.sort_key, reverse=True):
        e = plan.entries[path]
        if e.kind == "dir" and path.endswith("/__pycache__") and path not in parents and path not in keep:
            del plan.entries[path]


# --------------------------------------------------------------------------------------------


def read_paths(trace: tr.Trace, root: Root) -> set[str]:
    """The image paths (every symlink hop followed) of the files the run read or executed."""
    out = set()
    for rec in trace.files.values():
        if rec.kinds & {"read", "exec"}:
            res = root.resolve(rec.path)
            if res.status is Status.OK:
                out.add(res.path)
    return out


def shrink(plan: rootfs.Plan, workdir: str, *, strip: bool, bytecode_only: bool, read: set[str],
           owned: Mapping[str, str] | None = None, jobs: int | None = None) -> ShrinkResult:
    """Apply the options asked for to `plan`, in place; see strip_plan and bytecode_plan."""
    result = ShrinkResult()
    if strip:
        result.savings.append(strip_plan(plan, workdir, result, jobs=jobs))
    if bytecode_only:
        result.savings.append(bytecode_plan(plan, read, workdir, result, keep_dirs=(owned or {}).keys()))
    return result
