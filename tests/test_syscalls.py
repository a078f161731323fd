"""The syscall table (syscalls.py) that drives both the seccomp filter and the tracer's decoder:
each row holds what its effect needs, and its argument positions agree with the kernel's
prototypes. (That the decoder reads every row right is test_tracer.py's job, with real calls.)"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tracejail import seccomp
from tracejail.syscalls import BY_NAME, BY_NR, FSTAT_IN_DISGUISE, SYSCALLS, Effect, NoFollow

UNISTD_64 = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")

# The kernel's argument lists (include/linux/syscalls.h), by role: d = directory fd, p = path,
# f = flags, m = mode, x = anything else. The table's indexes must point at these roles.
PROTOTYPES = {
    "open": "pfm", "stat": "px", "lstat": "px", "access": "pm", "execve": "pxx", "rename": "pp",
    "mkdir": "pm", "rmdir": "p", "creat": "pm", "link": "pp", "unlink": "p", "symlink": "xp",
    "readlink": "pxx", "openat": "dpfm", "mkdirat": "dpm", "newfstatat": "dpxf", "unlinkat": "dpf",
    "renameat": "dpdp", "linkat": "dpdpf", "symlinkat": "xdp", "readlinkat": "dpxx",
    "faccessat": "dpm", "renameat2": "dpdpf", "execveat": "dpxxf", "statx": "dpfxx",
    "openat2": "dpxx", "faccessat2": "dpmf",
}


def test_names_and_numbers_are_unique_and_the_filter_uses_them_all() -> None:
    assert len(BY_NAME) == len(BY_NR) == len(SYSCALLS)
    assert seccomp.SYSCALLS == {s.name: s.nr for s in SYSCALLS}


@pytest.mark.skipif(not UNISTD_64.exists(), reason="needs the kernel headers")
def test_numbers_are_the_kernels() -> None:
    kernel = {m[1]: int(m[2]) for m in re.finditer(r"#define __NR_(\w+) (\d+)", UNISTD_64.read_text())}
    assert {s.name: s.nr for s in SYSCALLS} == {s.name: kernel[s.name] for s in SYSCALLS}


@pytest.mark.parametrize("call", SYSCALLS, ids=[s.name for s in SYSCALLS])
def test_argument_positions_match_the_prototype(call) -> None:   # noqa: ANN001
    roles = PROTOTYPES[call.name]
    assert roles[call.path] == "p"
    # An *at call's base is the directory fd right before the path it resolves.
    assert (call.dirfd is None) == ("d" not in roles[:call.path])
    assert call.dirfd is None or (call.dirfd == call.path - 1 and roles[call.dirfd] == "d")
    if call.flags is not None:
        # openat2's flags live in struct open_how, which its third argument points at.
        assert roles[call.flags] == ("x" if call.open_how else "f")
    if call.mode is not None:
        assert roles[call.mode] == "m"
    if call.to_path is not None:
        assert roles[call.to_path] == "p"
        assert call.to_dirfd is None or (call.to_dirfd == call.to_path - 1 and roles[call.to_dirfd] == "d")


@pytest.mark.parametrize("call", SYSCALLS, ids=[s.name for s in SYSCALLS])
def test_each_effect_has_what_the_decoder_needs(call) -> None:   # noqa: ANN001
    if call.effect is Effect.OPEN:
        assert (call.flags is not None) != bool(call.fixed_open_flags)
        assert call.nofollow in (NoFollow.OPEN_FLAG, NoFollow.NEVER)
    if call.effect is Effect.ACCESS:
        assert call.mode is not None
    if call.effect is Effect.RENAME:
        assert call.to_path is not None
    else:
        assert call.to_path is None and call.to_dirfd is None
    if call.nofollow is NoFollow.AT_FLAG:
        assert call.flags is not None


def test_the_fstat_forms_let_through_have_their_empty_path_flag() -> None:
    # The filter lets `newfstatat(fd, "", ..., AT_EMPTY_PATH)` run untraced: it must know where
    # AT_EMPTY_PATH is, and it must be where the flags are.
    for name in FSTAT_IN_DISGUISE:
        assert BY_NAME[name].empty_path_flag == BY_NAME[name].flags is not None
    assert seccomp._EMPTY_PATH_FLAG_ARG == {"newfstatat": 3, "statx": 2}
