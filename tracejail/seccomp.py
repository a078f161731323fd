"""A seccomp-BPF filter that makes only the file syscalls stop the tracee (x86_64).

Everything else runs at native speed; this is what `strace --seccomp-bpf` does. The filter is
installed in the forked child after the tracer has attached with PTRACE_O_TRACESECCOMP (a
SECCOMP_RET_TRACE with no tracer fails the call with ENOSYS), right before exec.
"""
from __future__ import annotations

import ctypes
import os
import struct

from tracejail import syscalls

# x86_64 syscall numbers of the calls tracejail records (the table is syscalls.SYSCALLS).
SYSCALLS: dict[str, int] = {s.name: s.nr for s in syscalls.SYSCALLS}
SYSCALL_NAMES: dict[int, str] = {nr: name for name, nr in SYSCALLS.items()}

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
AT_EMPTY_PATH = syscalls.AT_EMPTY_PATH

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_TRACE = 0x7FF00000

# classic BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06

# offsets in struct seccomp_data
_NR = 0
_ARCH = 4


def _arg_low(i: int) -> int:
    return 16 + 8 * i   # low 32 bits of args[i] on little-endian


# An fstat in disguise (`newfstatat(fd, "", buf, AT_EMPTY_PATH)`) runs untraced: see
# syscalls.FSTAT_IN_DISGUISE. The argument that holds AT_EMPTY_PATH, per call.
_EMPTY_PATH_FLAG_ARG: dict[str, int] = {
    name: arg for name in syscalls.FSTAT_IN_DISGUISE if (arg := syscalls.BY_NAME[name].empty_path_flag) is not None
}


def build_filter(names: list[str] | None = None) -> bytes:
    """Return the BPF program (array of struct sock_filter) tracing `names` (None: all of them;
    an empty list: none)."""
    traced = [SYSCALLS[n] for n in (list(SYSCALLS) if names is None else names)]
    # Each insn: (code, jt, jf, k) where jt/jf are label names (or None for "next").
    prog: list[tuple[int, str | None, str | None, int]] = [
        (_LD_W_ABS, None, None, _ARCH),
        # not x86_64 (int 0x80 from a 32-bit program): let it run, it is not what we trace
        (_JEQ_K, None, "allow", AUDIT_ARCH_X86_64),
        (_LD_W_ABS, None, None, _NR),
        (_JGE_K, "allow", None, X32_SYSCALL_BIT),
    ]
    for nr in traced:
        if SYSCALL_NAMES[nr] not in _EMPTY_PATH_FLAG_ARG:
            prog.append((_JEQ_K, "trace", None, nr))
    for name, arg in _EMPTY_PATH_FLAG_ARG.items():
        if SYSCALLS[name] in traced:
            prog.append((_JEQ_K, f"flags_{name}", None, SYSCALLS[name]))
    prog.append((_RET_K, None, None, SECCOMP_RET_ALLOW))
    labels = {"allow": len(prog) - 1}
    prog.append((_RET_K, None, None, SECCOMP_RET_TRACE))
    labels["trace"] = len(prog) - 1
    for name, arg in _EMPTY_PATH_FLAG_ARG.items():
        if SYSCALLS[name] in traced:
            labels[f"flags_{name}"] = len(prog)
            prog.append((_LD_W_ABS, None, None, _arg_low(arg)))
            prog.append((_JSET_K, "allow_back", "trace_back", AT_EMPTY_PATH))
    # BPF jumps only go forward: end with our own copies of the two returns.
    prog.append((_RET_K, None, None, SECCOMP_RET_ALLOW))
    labels["allow_back"] = len(prog) - 1
    prog.append((_RET_K, None, None, SECCOMP_RET_TRACE))
    labels["trace_back"] = len(prog) - 1

    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        jt_off = labels[jt] - i - 1 if jt else 0
        jf_off = labels[jf] - i - 1 if jf else 0
        if not (0 <= jt_off < 256 and 0 <= jf_off < 256):
            raise ValueError("seccomp filter jump out of range")
        out.append(struct.pack("=HBBI", code, jt_off, jf_off, k))
    return b"".join(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


PR_SET_NO_NEW_PRIVS = 38
SYS_seccomp = 317
SECCOMP_SET_MODE_FILTER = 1


def install(program: bytes) -> None:
    """Install `program` in the calling process (used in the forked child before exec).

    As root (CAP_SYS_ADMIN) no_new_privs is not needed, and leaving it off keeps setuid programs
    in the traced tree working; otherwise the kernel requires it.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(SYS_seccomp), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                      ctypes.c_long(0), ctypes.byref(fprog))
    if rc == 0:
        return
    err = ctypes.get_errno()
    if err != 13:   # EACCES: need no_new_privs
        raise OSError(err, os.strerror(err))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    rc = libc.syscall(ctypes.c_long(SYS_seccomp), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                      ctypes.c_long(0), ctypes.byref(fprog))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
