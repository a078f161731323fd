"""The tracer's syscall decoding (tracer.py): every file syscall the seccomp filter stops on is
made by a real program through syscall(2) — so no libc wrapper choice hides one — and must reach
the trace with its path, kind and result, at syscall entry (judged on the host) and in --exact mode
(the kernel's own result)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import static_program
from tracejail import seccomp
from tracejail.record import RecordOptions, record

PROGRAM = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/openat2.h>
#include <linux/stat.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static char buf[4096];
static const char *p(const char *dir, const char *name) {
    static char paths[64][512];
    static int n;
    snprintf(paths[n % 64], 512, "%s/%s", dir, name);
    return paths[n++ % 64];
}

int main(int argc, char **argv) {
    const char *d = argv[1];
    struct stat st;
    struct statx stx;
    struct open_how how = {.flags = O_RDONLY};
    char *no_args[] = {"x", NULL};
    close(syscall(SYS_open, p(d, "open.f"), O_CREAT | O_WRONLY, 0644));
    close(syscall(SYS_creat, p(d, "creat.f"), 0644));
    close(syscall(SYS_openat, AT_FDCWD, p(d, "open.f"), O_RDONLY));
    syscall(SYS_openat2, AT_FDCWD, p(d, "openat2.missing"), &how, sizeof how);
    syscall(SYS_symlink, "open.f", p(d, "symlink.l"));
    syscall(SYS_symlinkat, "open.f", AT_FDCWD, p(d, "symlinkat.l"));
    syscall(SYS_stat, p(d, "open.f"), &st);
    syscall(SYS_lstat, p(d, "symlink.l"), &st);
    syscall(SYS_newfstatat, AT_FDCWD, p(d, "creat.f"), &st, 0);
    syscall(SYS_statx, AT_FDCWD, p(d, "statx.missing"), 0, STATX_BASIC_STATS, &stx);
    syscall(SYS_access, p(d, "open.f"), R_OK);
    syscall(SYS_faccessat, AT_FDCWD, p(d, "faccessat.missing"), R_OK);
    syscall(SYS_faccessat2, AT_FDCWD, p(d, "creat.f"), R_OK, 0);
    syscall(SYS_readlink, p(d, "symlink.l"), buf, sizeof buf);
    syscall(SYS_readlinkat, AT_FDCWD, p(d, "readlinkat.missing"), buf, sizeof buf);
    syscall(SYS_mkdir, p(d, "mkdir.d"), 0755);
    syscall(SYS_mkdirat, AT_FDCWD, p(d, "mkdirat.d"), 0755);
    syscall(SYS_rmdir, p(d, "mkdir.d"));
    syscall(SYS_link, p(d, "open.f"), p(d, "link.h"));
    syscall(SYS_linkat, AT_FDCWD, p(d, "open.f"), AT_FDCWD, p(d, "linkat.h"), 0);
    syscall(SYS_rename, p(d, "link.h"), p(d, "rename.to"));
    syscall(SYS_renameat, AT_FDCWD, p(d, "linkat.h"), AT_FDCWD, p(d, "renameat.to"));
    syscall(SYS_renameat2, AT_FDCWD, p(d, "rename.to"), AT_FDCWD, p(d, "renameat2.to"), 0);
    syscall(SYS_unlink, p(d, "renameat2.to"));
    syscall(SYS_unlinkat, AT_FDCWD, p(d, "mkdirat.d"), AT_REMOVEDIR);
    syscall(SYS_execve, p(d, "execve.missing"), no_args, no_args + 1);
    syscall(SYS_execveat, AT_FDCWD, p(d, "execveat.missing"), no_args, no_args + 1, 0);
    puts("done");
    return 0;
}
"""

# path name -> (syscall, kind, result): what the trace must hold for it
EXPECTED = {
    "open.f": [("open", "write", "ok"), ("openat", "read", "ok"), ("stat", "stat", "ok"), ("access", "stat", "ok")],
    "creat.f": [("creat", "write", "ok"), ("newfstatat", "stat", "ok"), ("faccessat2", "stat", "ok")],
    "openat2.missing": [("openat2", "read", "ENOENT")],
    "symlink.l": [("symlink", "write", "ok"), ("lstat", "stat", "ok"), ("readlink", "readlink", "ok")],
    "symlinkat.l": [("symlinkat", "write", "ok")],
    "statx.missing": [("statx", "stat", "ENOENT")],
    "faccessat.missing": [("faccessat", "stat", "ENOENT")],
    "readlinkat.missing": [("readlinkat", "readlink", "ENOENT")],
    "mkdir.d": [("mkdir", "write", "ok"), ("rmdir", "write", "ok")],
    "mkdirat.d": [("mkdirat", "write", "ok"), ("unlinkat", "write", "ok")],
    "link.h": [("link", "write", "ok"), ("rename", "write", "ok")],
    "linkat.h": [("linkat", "write", "ok"), ("renameat", "write", "ok")],
    "rename.to": [("rename", "write", "ok"), ("renameat2", "write", "ok")],
    "renameat.to": [("renameat", "write", "ok")],
    "renameat2.to": [("renameat2", "write", "ok"), ("unlink", "write", "ok")],
    "execve.missing": [("execve", "exec", "ENOENT")],
    "execveat.missing": [("execveat", "exec", "ENOENT")],
}


@pytest.mark.parametrize("exact", [False, True], ids=["at-entry", "exact"])
def test_every_traced_syscall_is_decoded(tmp_path: Path, exact: bool) -> None:
    program = static_program(tmp_path, PROGRAM)
    work = tmp_path / "work"
    work.mkdir()
    rec = record([str(program), str(work)], RecordOptions(exact=exact, passthrough=False))
    assert rec.run.exit_code == 0 and rec.run.stdout == "done\n", rec.run.stderr
    seen = {(path.rsplit("/", 1)[1], a.syscall, a.kind, a.result)
            for path, r in rec.trace.files.items() if path.startswith(str(work) + "/") for a in r.accesses}
    missing = [(name, *want) for name, wants in EXPECTED.items() for want in wants if (name, *want) not in seen]
    assert not missing, (missing, sorted(seen))
    covered = {syscall for wants in EXPECTED.values() for syscall, _, _ in wants}
    assert covered == set(seccomp.SYSCALLS), set(seccomp.SYSCALLS) ^ covered
    assert rec.trace.files[f"{work}/open.f"].created_by_run
