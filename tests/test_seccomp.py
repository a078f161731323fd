"""The seccomp-BPF filter (seccomp.py): the program build_filter writes, read instruction by
instruction; and what it does for real, installed with install() in a forked child that a real
ptrace tracer (python-ptrace's binding) follows: the listed syscalls stop with
PTRACE_EVENT_SECCOMP, every other one runs without a stop, the AT_EMPTY_PATH fstat forms are let
through, and with names=[...] only those stop. The syscall table is checked against the kernel's
own headers."""
from __future__ import annotations

import ctypes
import errno
import os
import re
import signal
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tracejail import seccomp
from tracejail.tracer import pb

UNISTD_64 = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")

PTRACE_O_TRACESECCOMP = 0x80
PTRACE_O_EXITKILL = 0x100000
PTRACE_EVENT_SECCOMP = 7
WALL = 0x40000000
AT_FDCWD = -100
PR_GET_SECCOMP = 21
PR_GET_NO_NEW_PRIVS = 39
SECCOMP_MODE_FILTER = 2
NOBODY = 65534

# Syscalls tracejail does not record, some of them taking a path: none may ever stop.
UNLISTED = {"read": 0, "fstat": 5, "getpid": 39, "truncate": 76, "getcwd": 79, "chdir": 80, "chmod": 90,
            "getxattr": 191, "utimensat": 280}

# The libc handle and its syscall(2), made before any fork: the child calls nothing that loads.
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long


# --- the program, read as data ------------------------------------------------------------------

def instructions(program: bytes) -> list[tuple[int, int, int, int]]:
    """struct sock_filter entries: (code, jt, jf, k)."""
    assert len(program) % 8 == 0
    return [struct.unpack_from("=HBBI", program, off) for off in range(0, len(program), 8)]


def run_bpf(program: bytes, nr: int, arch: int = seccomp.AUDIT_ARCH_X86_64, args: tuple[int, ...] = (0,) * 6) -> int:
    """The action the program returns for one struct seccomp_data, by a small interpreter of the
    five opcodes build_filter uses (any other opcode fails the test)."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *args)
    prog = instructions(program)
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x20:                                    # BPF_LD | BPF_W | BPF_ABS
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code in (0x15, 0x35, 0x45):                    # BPF_JMP | JEQ/JGE/JSET | BPF_K
            taken = acc == k if code == 0x15 else acc >= k if code == 0x35 else bool(acc & k)
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:                                  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x} at {pc}")


def expected_length(names: list[str]) -> int:
    """Instructions: 4 for the arch and x32 checks, one compare per name, two returns, two loads
    and tests for each AT_EMPTY_PATH-aware call, and the two returns they jump forward to."""
    flagged = sum(1 for n in names if n in ("newfstatat", "statx"))
    return 4 + len(names) + 2 + 2 * flagged + 2


@pytest.mark.parametrize("names", [None, [], ["open"], ["openat", "statx"], ["newfstatat"],
                                   ["execve", "statx", "newfstatat"]],
                         ids=["all", "none", "open", "openat+statx", "newfstatat", "execve+both-stats"])
def test_program_length_and_shape(names: list[str] | None) -> None:
    program = seccomp.build_filter(names)
    prog = instructions(program)
    assert len(prog) == expected_length(list(seccomp.SYSCALLS) if names is None else names)
    # The kernel's checker wants every jump inside the program and a return at its end.
    for pc, (code, jt, jf, _k) in enumerate(prog):
        if code & 0x07 == 0x05:
            assert pc + 1 + max(jt, jf) < len(prog), pc
    assert prog[-1][0] == 0x06 and prog[0] == (0x20, 0, 0, 4)   # starts by loading the arch


def test_default_program_is_the_one_for_every_name() -> None:
    assert seccomp.build_filter() == seccomp.build_filter(list(seccomp.SYSCALLS))


def test_program_traces_exactly_the_listed_numbers() -> None:
    program = seccomp.build_filter()
    listed = set(seccomp.SYSCALLS.values())
    for nr in range(0, 600):
        want = seccomp.SECCOMP_RET_TRACE if nr in listed else seccomp.SECCOMP_RET_ALLOW
        assert run_bpf(program, nr) == want, nr
        # x32 numbers and other architectures (int 0x80 from a 32-bit program) are never traced
        assert run_bpf(program, nr | seccomp.X32_SYSCALL_BIT) == seccomp.SECCOMP_RET_ALLOW, nr
        assert run_bpf(program, nr, arch=0x40000003) == seccomp.SECCOMP_RET_ALLOW, nr   # AUDIT_ARCH_I386


@pytest.mark.parametrize("name,flag_arg", [("newfstatat", 3), ("statx", 2)])
def test_program_lets_the_empty_path_fstat_through(name: str, flag_arg: int) -> None:
    program = seccomp.build_filter()
    nr = seccomp.SYSCALLS[name]

    def action(flags: int) -> int:
        args = [0] * 6
        args[flag_arg] = flags
        return run_bpf(program, nr, args=tuple(args))
    assert action(0) == seccomp.SECCOMP_RET_TRACE
    assert action(0x100) == seccomp.SECCOMP_RET_TRACE                   # AT_SYMLINK_NOFOLLOW: a lookup
    assert action(seccomp.AT_EMPTY_PATH) == seccomp.SECCOMP_RET_ALLOW   # glibc's fstat
    assert action(seccomp.AT_EMPTY_PATH | 0x100) == seccomp.SECCOMP_RET_ALLOW
    # the flag is looked for in its own argument only
    other = [0] * 6
    other[5 - flag_arg] = seccomp.AT_EMPTY_PATH
    assert run_bpf(program, nr, args=tuple(other)) == seccomp.SECCOMP_RET_TRACE


@pytest.mark.parametrize("names", [["openat", "statx", "execve"], []], ids=["three", "none"])
def test_subset_program_traces_only_the_subset(names: list[str]) -> None:
    program = seccomp.build_filter(names)
    for name, nr in {**seccomp.SYSCALLS, **UNLISTED}.items():
        want = seccomp.SECCOMP_RET_TRACE if name in names else seccomp.SECCOMP_RET_ALLOW
        assert run_bpf(program, nr) == want, name


# --- the syscall table --------------------------------------------------------------------------

# From the x86_64 syscall ABI (arch/x86/entry/syscalls/syscall_64.tbl), for hosts without headers.
KNOWN_NUMBERS = {"open": 2, "stat": 4, "execve": 59, "openat": 257, "newfstatat": 262, "execveat": 322,
                 "statx": 332, "openat2": 437, "faccessat2": 439, "seccomp": 317}


def kernel_numbers() -> dict[str, int]:
    if not UNISTD_64.exists():
        return KNOWN_NUMBERS
    found = re.findall(r"^#define __NR_(\w+)\s+(\d+)\s*$", UNISTD_64.read_text(), re.M)
    return {name: int(nr) for name, nr in found}


def test_every_name_is_a_real_x86_64_syscall_with_its_number() -> None:
    numbers = kernel_numbers()
    wrong = {name: (nr, numbers.get(name)) for name, nr in seccomp.SYSCALLS.items()
             if name in numbers and numbers[name] != nr}
    assert not wrong
    if numbers is not KNOWN_NUMBERS:
        assert set(seccomp.SYSCALLS) <= set(numbers), set(seccomp.SYSCALLS) - set(numbers)
    assert numbers["seccomp"] == seccomp.SYS_seccomp
    for name, nr in UNLISTED.items():   # the tests' own numbers, too
        assert numbers.get(name, nr) == nr, name


def test_names_and_numbers_are_one_to_one() -> None:
    assert len(seccomp.SYSCALL_NAMES) == len(seccomp.SYSCALLS)
    assert all(seccomp.SYSCALLS[name] == nr for nr, name in seccomp.SYSCALL_NAMES.items())


# --- installed for real, under a real tracer ------------------------------------------------------

@dataclass
class Observed:
    """What a traced child did after installing a filter."""

    stops: list[tuple[int, int, int]]       # (syscall number, rdi, rsi) at each seccomp stop
    results: list[tuple[int, int]]           # (return value, errno) of each call, in order
    no_new_privs: int
    seccomp_mode: int


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[int]:
    """The address of a path that cannot exist (its directory does not): every path argument the
    child passes. Made before fork, so the child has it at the same address; a stop whose
    argument registers hold it is one of the test's calls, not one of Python's own."""
    buf = ctypes.create_string_buffer(str(tmp_path / "no-such-dir" / "file").encode())
    yield ctypes.addressof(buf)
    del buf


def calls_for(names: list[str], path: int) -> list[tuple[int, ...]]:
    """One call of each named syscall, its path arguments pointing at `path` (never written to)."""
    table = {**seccomp.SYSCALLS, **UNLISTED}
    args: dict[str, tuple[int, ...]] = {
        "openat": (AT_FDCWD, path, 0), "mkdirat": (AT_FDCWD, path, 0o755), "newfstatat": (AT_FDCWD, path, 0, 0),
        "unlinkat": (AT_FDCWD, path, 0), "renameat": (AT_FDCWD, path, AT_FDCWD, path),
        "linkat": (AT_FDCWD, path, AT_FDCWD, path, 0), "symlinkat": (path, AT_FDCWD, path),
        "readlinkat": (AT_FDCWD, path, 0, 0), "faccessat": (AT_FDCWD, path, 0),
        "renameat2": (AT_FDCWD, path, AT_FDCWD, path, 0), "execveat": (AT_FDCWD, path, 0, 0, 0),
        "statx": (AT_FDCWD, path, 0, 0, 0), "openat2": (AT_FDCWD, path, 0, 0), "faccessat2": (AT_FDCWD, path, 0, 0),
        "rename": (path, path), "link": (path, path), "symlink": (path, path), "readlink": (path, 0, 0),
        "read": (-1, path, 0), "fstat": (-1, path), "getpid": (), "getcwd": (path, 0), "getxattr": (path, path, 0, 0),
        "utimensat": (AT_FDCWD, path, 0, 0),
    }
    return [(table[n], *args.get(n, (path, 0))) for n in names]


def _child(program: bytes | None, calls: list[tuple[int, ...]], report: int, traced: bool, uid: int | None) -> None:
    """In the forked child: be traced, install the filter, make the calls, report on the pipe."""
    try:
        if traced:
            pb.ptrace_traceme()
            os.kill(os.getpid(), signal.SIGSTOP)     # the tracer sets its options meanwhile
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        if program is not None:
            seccomp.install(program)
        lines = [f"{LIBC.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)} {LIBC.prctl(PR_GET_SECCOMP, 0, 0, 0, 0)}"]
        for nr, *args in calls:
            ctypes.set_errno(0)
            rc = LIBC.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
            lines.append(f"{rc} {ctypes.get_errno()}")
        os.write(report, ("\n".join(lines) + "\n").encode())
        os._exit(0)
    except OSError as exc:
        os.write(report, f"error {exc.errno}\n".encode())
        os._exit(3)
    except BaseException:
        os._exit(4)


def run_child(program: bytes | None, calls: list[tuple[int, ...]], traced: bool = True,
              uid: int | None = None) -> Observed:
    """Fork a child that installs `program` (when given) and makes `calls`; when `traced`, follow
    it with PTRACE_O_TRACESECCOMP and note every seccomp stop. The child is gone on return."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(program, calls, write_end, traced, uid)
    os.close(write_end)
    stops: list[tuple[int, int, int]] = []
    try:
        if traced:
            _, status = os.waitpid(pid, WALL)
            assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP, status
            pb.ptrace_setoptions(pid, PTRACE_O_TRACESECCOMP | PTRACE_O_EXITKILL)
            pb.ptrace_cont(pid, 0)                 # the SIGSTOP is swallowed
            while True:
                _, status = os.waitpid(pid, WALL)
                if not os.WIFSTOPPED(status):
                    break
                if status >> 16 == PTRACE_EVENT_SECCOMP:
                    regs = pb.ptrace_getregs(pid)
                    stops.append((regs.orig_rax, regs.rdi, regs.rsi))
                    pb.ptrace_cont(pid, 0)
                elif status >> 16:
                    pb.ptrace_cont(pid, 0)
                else:                                # a signal for the child: deliver it
                    pb.ptrace_cont(pid, os.WSTOPSIG(status))
        else:
            _, status = os.waitpid(pid, 0)
        with os.fdopen(read_end, "rb") as f:
            lines = f.read().decode().split("\n")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, lines)
    nnp, mode = (int(v) for v in lines[0].split())
    results = [(int(rc), int(err)) for rc, err in (ln.split() for ln in lines[1:] if ln)]
    assert len(results) == len(calls)
    return Observed(stops, results, nnp, mode)


def ours(observed: Observed, path: int) -> list[int]:
    """Numbers of the stops made by the test's own calls (a path argument at the marker)."""
    return [nr for nr, rdi, rsi in observed.stops if path in (rdi, rsi)]


def test_listed_syscalls_stop_and_unlisted_ones_do_not(marker: int) -> None:
    names = [*seccomp.SYSCALLS, *UNLISTED]
    observed = run_child(seccomp.build_filter(), calls_for(names, marker))
    assert observed.seccomp_mode == SECCOMP_MODE_FILTER
    assert ours(observed, marker) == list(seccomp.SYSCALLS.values())
    # nothing else stopped the child, not even the calls Python made on its own
    assert {nr for nr, _, _ in observed.stops} <= set(seccomp.SYSCALLS.values())
    # a traced call then runs as usual: the path's directory does not exist
    by_name = dict(zip(names, observed.results))
    assert by_name["openat"] == (-1, errno.ENOENT) and by_name["chdir"] == (-1, errno.ENOENT)
    assert by_name["getpid"][0] > 0


@pytest.mark.parametrize("subset", [["openat"], ["stat", "execve"], ["statx"], ["newfstatat", "unlinkat"]])
def test_only_the_named_subset_stops(marker: int, subset: list[str]) -> None:
    names = [*seccomp.SYSCALLS, *UNLISTED]
    observed = run_child(seccomp.build_filter(subset), calls_for(names, marker))
    assert ours(observed, marker) == [seccomp.SYSCALLS[n] for n in names if n in subset]
    assert {nr for nr, _, _ in observed.stops} <= {seccomp.SYSCALLS[n] for n in subset}


def test_empty_path_fstat_forms_run_without_a_stop(marker: int) -> None:
    empty = ctypes.create_string_buffer(b"")
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    statbuf = ctypes.create_string_buffer(512)
    try:
        nfsa, statx = seccomp.SYSCALLS["newfstatat"], seccomp.SYSCALLS["statx"]
        e, buf = ctypes.addressof(empty), ctypes.addressof(statbuf)
        calls = [(nfsa, fd, e, buf, seccomp.AT_EMPTY_PATH),     # glibc's fstat(fd): no stop
                 (statx, fd, e, seccomp.AT_EMPTY_PATH, 0x7FF, buf),
                 (nfsa, AT_FDCWD, marker, buf, 0),              # a real lookup: stops
                 (statx, AT_FDCWD, marker, 0, 0x7FF, buf)]
        observed = run_child(seccomp.build_filter(), calls)
    finally:
        os.close(fd)
    assert not [stop for stop in observed.stops if stop[2] == e]
    assert ours(observed, marker) == [nfsa, statx]
    assert observed.results[0] == (0, 0) and observed.results[1] == (0, 0)   # the fstat forms worked


def test_x32_numbers_are_let_through(marker: int) -> None:
    x32_openat = seccomp.X32_SYSCALL_BIT | seccomp.SYSCALLS["openat"]
    observed = run_child(seccomp.build_filter(), [(x32_openat, AT_FDCWD, marker),
                                                  (seccomp.SYSCALLS["openat"], AT_FDCWD, marker)])
    assert ours(observed, marker) == [seccomp.SYSCALLS["openat"]]


def test_traced_call_without_a_tracer_fails_with_enosys(marker: int) -> None:
    # Why the filter goes in only after the tracer attached (module docstring).
    calls = calls_for(["openat", "getpid"], marker)
    observed = run_child(seccomp.build_filter(["openat"]), calls, traced=False)
    assert observed.results[0] == (-1, errno.ENOSYS)
    assert observed.results[1][0] > 0


def _has_cap_sys_admin() -> bool:
    with open("/proc/self/status") as f:
        caps = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))
    return bool(caps & (1 << 21))


@pytest.mark.skipif(os.geteuid() != 0 or not _has_cap_sys_admin(), reason="needs root with CAP_SYS_ADMIN")
def test_as_root_no_new_privs_stays_off(marker: int) -> None:
    # so that setuid programs in the traced tree keep working
    observed = run_child(seccomp.build_filter(), calls_for(["open"], marker))
    assert observed.no_new_privs == 0 and observed.seccomp_mode == SECCOMP_MODE_FILTER
    assert ours(observed, marker) == [seccomp.SYSCALLS["open"]]


def test_as_an_ordinary_user_no_new_privs_is_set(marker: int) -> None:
    # the kernel requires it without CAP_SYS_ADMIN; root tests it as nobody
    uid = NOBODY if os.geteuid() == 0 else None
    observed = run_child(seccomp.build_filter(), calls_for(["open", "getpid"], marker), uid=uid)
    assert observed.no_new_privs == 1 and observed.seccomp_mode == SECCOMP_MODE_FILTER
    assert ours(observed, marker) == [seccomp.SYSCALLS["open"]]


def test_kernel_refuses_a_program_without_a_return() -> None:
    # One load and nothing after it: install() must raise, not leave a half-filtered process.
    bad = struct.pack("=HBBI", 0x20, 0, 0, 0)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(bad, [], write_end, traced=False, uid=None)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        said = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 3 and said == f"error {errno.EINVAL}\n"
