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
/* "rel" mode: the calls without a directory fd name their paths relative to the working directory
   (which is "/"), the *at calls relative to a directory fd of d; otherwise every path is absolute. */
static int rel;
static int D = AT_FDCWD;
static const char *dir;
static const char *p(const char *d, const char *name) {
    static char paths[64][512];
    static int n;
    snprintf(paths[n % 64], 512, "%s/%s", d, name);
    return paths[n++ % 64] + (rel ? 1 : 0);
}
static const char *q(const char *name) { return rel ? name : p(dir, name); }

int main(int argc, char **argv) {
    const char *d = argv[1];
    dir = d;
    if (argc > 2 && strcmp(argv[2], "rel") == 0) {
        D = open(d, O_RDONLY | O_DIRECTORY);
        rel = 1;
        if (D < 0 || chdir("/") != 0) return 1;
    }
    struct stat st;
    struct statx stx;
    struct open_how how = {.flags = O_RDONLY};
    char *no_args[] = {"x", NULL};
    close(syscall(SYS_open, p(d, "open.f"), O_CREAT | O_WRONLY, 0644));
    close(syscall(SYS_creat, p(d, "creat.f"), 0644));
    close(syscall(SYS_openat, D, q("open.f"), O_RDONLY));
    syscall(SYS_openat2, D, q("openat2.missing"), &how, sizeof how);
    syscall(SYS_symlink, "open.f", p(d, "symlink.l"));
    syscall(SYS_symlinkat, "open.f", D, q("symlinkat.l"));
    syscall(SYS_stat, p(d, "open.f"), &st);
    syscall(SYS_lstat, p(d, "symlink.l"), &st);
    syscall(SYS_newfstatat, D, q("creat.f"), &st, 0);
    syscall(SYS_statx, D, q("statx.missing"), 0, STATX_TYPE, &stx);
    syscall(SYS_access, p(d, "open.f"), R_OK);
    syscall(SYS_faccessat, D, q("faccessat.missing"), R_OK);
    syscall(SYS_faccessat2, D, q("creat.f"), R_OK, 0);
    syscall(SYS_readlink, p(d, "symlink.l"), buf, sizeof buf);
    syscall(SYS_readlinkat, D, q("readlinkat.missing"), buf, sizeof buf);
    syscall(SYS_mkdir, p(d, "mkdir.d"), 0755);
    syscall(SYS_mkdirat, D, q("mkdirat.d"), 0755);
    syscall(SYS_rmdir, p(d, "mkdir.d"));
    syscall(SYS_link, p(d, "open.f"), p(d, "link.h"));
    syscall(SYS_linkat, AT_FDCWD, p(d, "open.f"), D, q("linkat.h"), 0);   /* two different bases */
    syscall(SYS_rename, p(d, "link.h"), p(d, "rename.to"));
    syscall(SYS_renameat, D, q("linkat.h"), AT_FDCWD, p(d, "renameat.to"));
    syscall(SYS_renameat2, AT_FDCWD, p(d, "rename.to"), D, q("renameat2.to"), 0);
    syscall(SYS_unlink, p(d, "renameat2.to"));
    syscall(SYS_unlinkat, D, q("mkdirat.d"), AT_REMOVEDIR);
    syscall(SYS_execve, p(d, "execve.missing"), no_args, no_args + 1);
    syscall(SYS_execveat, D, q("execveat.missing"), no_args, no_args + 1, 0);
    /* the last component, followed or not, and a path that is only a directory fd */
    syscall(SYS_symlink, "nowhere", p(d, "dangling.l"));
    syscall(SYS_stat, p(d, "dangling.l"), &st);
    syscall(SYS_newfstatat, D, q("dangling.l"), &st, AT_SYMLINK_NOFOLLOW);
    /* a mask without the AT_* bits, so that only the flags argument can say "no follow" */
    syscall(SYS_statx, D, q("dangling.l"), AT_SYMLINK_NOFOLLOW, STATX_TYPE, &stx);
    syscall(SYS_openat, D, q("dangling.l"), O_RDONLY | O_NOFOLLOW);
    {
        int fd = open(p(d, "open.f"), O_RDONLY);
        syscall(SYS_faccessat2, fd, "", R_OK, AT_EMPTY_PATH);
        close(fd);
    }
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
    "dangling.l": [("symlink", "write", "ok"), ("stat", "stat", "ENOENT"), ("newfstatat", "stat", "ok"),
                   ("statx", "stat", "ok"), ("openat", "read", "ELOOP")],
}


@pytest.mark.parametrize("paths", ["absolute", "rel"], ids=["absolute", "relative-to-cwd-and-dirfd"])
@pytest.mark.parametrize("exact", [False, True], ids=["at-entry", "exact"])
def test_every_traced_syscall_is_decoded(tmp_path: Path, exact: bool, paths: str) -> None:
    program = static_program(tmp_path, PROGRAM)
    work = tmp_path / "work"
    work.mkdir()
    rec = record([str(program), str(work), paths], RecordOptions(exact=exact, passthrough=False))
    assert rec.run.exit_code == 0 and rec.run.stdout == "done\n", rec.run.stderr
    seen = {(path.rsplit("/", 1)[1], a.syscall, a.kind, a.result)
            for path, r in rec.trace.files.items() if path.startswith(str(work) + "/") for a in r.accesses}
    missing = [(name, *want) for name, wants in EXPECTED.items() for want in wants if (name, *want) not in seen]
    assert not missing, (missing, sorted(seen))
    covered = {syscall for wants in EXPECTED.values() for syscall, _, _ in wants}
    assert covered == set(seccomp.SYSCALLS), set(seccomp.SYSCALLS) ^ covered
    assert rec.trace.files[f"{work}/open.f"].created_by_run
