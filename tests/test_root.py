"""The one resolver (tracejail.root), checked against the kernel itself.

The kernel's answer comes from openat2(RESOLVE_IN_ROOT), which resolves a path inside a directory
exactly as a chroot would: absolute symlinks restart at that directory, `..` never leaves it.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
from pathlib import Path

import pytest

from tracejail import root as rt
from tracejail.root import NodeKind, Root, SourceChanged, Status

_RESOLVE_IN_ROOT = 0x10
_KERNEL_STATUS = {errno.ENOENT: Status.MISSING, errno.ELOOP: Status.LOOP, errno.ENOTDIR: Status.NOT_A_DIRECTORY,
                  errno.EACCES: Status.DENIED}


class _How(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def kernel(tree: Path, path: str) -> tuple[Status, str | None]:
    """What the kernel reaches for `path` inside `tree`: (status, canonical path inside tree)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rootfd = os.open(tree, os.O_PATH | os.O_DIRECTORY)
    try:
        how = _How(os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT)
        fd = libc.syscall(ctypes.c_long(437), ctypes.c_int(rootfd), path.encode(), ctypes.byref(how),
                          ctypes.c_size_t(ctypes.sizeof(how)))
        if fd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOSYS, errno.EPERM):
                pytest.skip("openat2 is not available here (old kernel, or a seccomp profile without it)")
            return _KERNEL_STATUS.get(err, Status.DENIED), None
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    finally:
        os.close(rootfd)
    inside = real[len(str(tree)):] or "/"
    return Status.OK, inside


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Loops, `..` across links, absolute and dangling links, a merged /usr, a file in the way."""
    t = tmp_path / "tree"
    (t / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (t / "usr/lib/x86_64-linux-gnu/libc.so.6").write_text("libc")
    (t / "usr/bin").mkdir()
    (t / "usr/bin/python3.11").write_text("py")
    (t / "etc/alternatives").mkdir(parents=True)
    (t / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (t / "srv/app/data").mkdir(parents=True)
    os.symlink("usr/lib", t / "lib")
    os.symlink("usr/bin", t / "bin")
    os.symlink("python3.11", t / "usr/bin/python3")
    os.symlink("/usr/bin/python3", t / "etc/alternatives/python")
    os.symlink("/etc/alternatives/python", t / "usr/bin/python")
    os.symlink("../../lib/x86_64-linux-gnu", t / "usr/bin/libdir")     # `..` across a link
    os.symlink("/etc", t / "srv/app/links")                            # absolute: inside the tree
    os.symlink("../../../../../../etc/passwd", t / "srv/app/up")       # `..` past the root
    os.symlink("b", t / "srv/loop_a")
    os.symlink("loop_a", t / "srv/b")
    os.symlink("/nowhere", t / "srv/dangling")
    os.symlink("data/../../app/data", t / "srv/app/back")
    return t


PATHS = [
    "/", "/..", "/../..", "/lib/x86_64-linux-gnu/libc.so.6", "/bin/python", "/usr/bin/python",
    "/usr/bin/libdir/libc.so.6", "/usr/bin/libdir/../bin/python3", "/srv/app/links/passwd",
    "/srv/app/up", "/srv/loop_a", "/srv/loop_a/x", "/srv/dangling", "/srv/dangling/x",
    "/srv/app/back", "/srv/app/back/../links/alternatives/python", "/etc/passwd/", "/etc/passwd/.",
    "/etc/passwd/x", "/etc/missing/x", "/usr//lib/./x86_64-linux-gnu//libc.so.6", "/lib/",
    "/srv/app/data/", "/usr/bin/python3/..", "/srv/app/links/../usr/bin/python3.11",
]


@pytest.mark.parametrize("path", PATHS)
def test_resolution_agrees_with_the_kernel(tree: Path, path: str) -> None:
    res = Root(str(tree)).resolve(path)
    want_status, want_path = kernel(tree, path)
    assert res.status is want_status, (path, res)
    if want_status is Status.OK:
        assert res.path == want_path
        assert res.kind is (NodeKind.DIR if (tree / want_path.lstrip("/")).is_dir() else NodeKind.FILE)


def test_every_hop_is_recorded(tree: Path) -> None:
    res = Root(str(tree)).resolve("/bin/python")
    assert res.ok and res.path == "/usr/bin/python3.11"
    links = [(h.path, h.target) for h in res.symlinks]
    assert links == [("/bin", "usr/bin"), ("/usr/bin/python", "/etc/alternatives/python"),
                     ("/etc/alternatives/python", "/usr/bin/python3"), ("/usr/bin/python3", "python3.11")]
    dirs = [h.path for h in res.hops if h.kind is NodeKind.DIR]
    assert dirs == ["/usr", "/usr/bin", "/etc", "/etc/alternatives"]
    assert res.node is not None and res.node.kind is NodeKind.FILE and res.node.path == res.path


def test_missing_and_not_a_directory_say_where_the_walk_stopped(tree: Path) -> None:
    r = Root(str(tree))
    miss = r.resolve("/lib/nope/libz.so.1")
    assert (miss.status, miss.path, miss.rest) == (Status.MISSING, "/usr/lib/nope", ("libz.so.1",))
    assert miss.spelled_tail() == "/usr/lib/nope/libz.so.1"
    notdir = r.resolve("/etc/passwd/x")
    assert (notdir.status, notdir.path, notdir.rest) == (Status.NOT_A_DIRECTORY, "/etc/passwd", ("x",))
    dangling = r.resolve("/srv/dangling")
    assert dangling.status is Status.MISSING and dangling.symlinks[0].path == "/srv/dangling"


def test_runtime_directories_are_never_entered(tree: Path, tmp_path: Path) -> None:
    (tree / "run/secrets").mkdir(parents=True)
    (tree / "run/secrets/token").write_text("k8s")
    (tree / "var").mkdir()
    os.symlink("/run", tree / "var/run")
    os.symlink("../../run/secrets", tree / "srv/app/secrets")
    r = Root(str(tree))
    for spelled in ("/run/secrets/token", "/var/run/secrets/token", "/srv/app/secrets/token",
                    "/proc/self/exe", "/dev/null", "/sys/kernel"):
        res = r.resolve(spelled)
        assert res.status is Status.RUNTIME, spelled
        assert not any(rt.is_runtime_path(h.path) for h in res.hops)
    assert r.resolve("/srv/app/secrets/token").symlinks[0].target == "../../run/secrets"
    # /var/run is the runtime's even in a tree where it is a real directory
    other = tmp_path / "other"
    (other / "var/run/secrets").mkdir(parents=True)
    (other / "var/run/secrets/token").write_text("k8s")
    assert Root(str(other)).resolve("/var/run/secrets/token").status is Status.RUNTIME


def test_unreadable_directory_is_denied_like_the_kernel(tmp_path: Path) -> None:
    """As an ordinary user, a directory without search permission stops the walk (EACCES)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    import tempfile

    t = Path(tempfile.mkdtemp(prefix="tj-root-test-", dir="/tmp"))
    try:
        t.chmod(0o755)
        (t / "locked").mkdir(mode=0o700)
        (t / "locked/f").write_text("x")
        os.symlink("locked/f", t / "via")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                out = []
                for path in ("/locked/f", "/via"):
                    res = Root(str(t)).resolve(path)
                    out.append(f"{res.status.value}:{res.path}:{kernel(t, path)[0].value}")
                os.write(w, " ".join(out).encode())
            finally:
                os._exit(0)
        os.close(w)
        got = os.read(r, 4096).decode()
        os.close(r)
        os.waitpid(pid, 0)
        assert got == "denied:/locked/f:denied denied:/locked/f:denied"
    finally:
        import shutil

        shutil.rmtree(t)


def test_host_root_agrees_with_realpath() -> None:
    host = Root("/")
    for path in ("/lib64/ld-linux-x86-64.so.2", "/usr/bin/python3", "/etc/alternatives/awk",
                 "/bin/sh", "/usr/lib/os-release", "/etc/os-release", "/usr/bin/../lib/../bin/env"):
        if not os.path.exists(path):
            continue
        res = host.resolve(path)
        assert res.ok and res.path == os.path.realpath(path), path


def test_normalize_applies_dotdot_physically_and_keeps_later_spelling(tree: Path) -> None:
    r = Root(str(tree))
    # /usr/bin/libdir -> ../../lib/x86_64-linux-gnu: its `..` is taken from where the link leads
    assert r.normalize("/usr/bin/libdir/../x86_64-linux-gnu/libc.so.6") == \
        ("/usr/lib/x86_64-linux-gnu/libc.so.6", ["/usr/bin/libdir"])
    assert r.normalize("/bin/python") == ("/bin/python", [])
    assert r.normalize("//usr/./bin//python") == ("/usr/bin/python", [])
    assert r.normalize("/srv/app/links/../srv") == ("/srv", ["/srv/app/links"])


def test_hostile_spellings_are_bounded(tree: Path) -> None:
    r = Root(str(tree))
    deep = "/srv/app" + "/data/.." * 3000
    assert r.resolve(deep).path == "/srv/app"
    long_name = "/" + "a/" * 3000 + "x"
    assert r.resolve(long_name).status is Status.MISSING
    with pytest.raises(Exception):
        r.resolve("relative/path")


def test_walk_tree_lists_links_without_following_them(tree: Path) -> None:
    got = list(Root(str(tree)).walk_tree("/srv/app"))
    assert got[0] == ""
    assert {"/links", "/up", "/back", "/data"} <= set(got)
    assert not any(p.startswith("/links/") for p in got)


def test_walk_files_is_every_node_of_the_walk_that_reaches_a_regular_file(tree: Path) -> None:
    (tree / "srv/app/data/f").write_text("x")
    os.mkfifo(tree / "srv/app/data/fifo")
    os.symlink("f", tree / "srv/app/data/to_f")
    r = Root(str(tree))
    for top in ("/", "/srv", "/srv/app", "/usr", "/lib", "/etc/passwd", "/nowhere"):
        prefix = top.rstrip("/")
        want = [prefix + rel for rel in r.walk_tree(top) if rel and r.resolve(prefix + rel).kind is NodeKind.FILE]
        assert list(r.walk_files(top)) == want, top
    got = set(r.walk_files("/srv/app"))
    # regular files and links that reach one inside the root (`up` climbs past the root to
    # /etc/passwd); never a fifo, a directory, or what a link to a directory holds
    assert {"/srv/app/data/f", "/srv/app/data/to_f", "/srv/app/up"} <= got
    assert not got & {"/srv/app/data/fifo", "/srv/app/data", "/srv/app/links", "/srv/app/links/passwd"}


def test_reading_never_blocks_on_a_fifo_or_follows_a_link(tree: Path) -> None:
    os.mkfifo(tree / "srv/key.pem")
    r = Root(str(tree))
    assert r.resolve("/srv/key.pem").status is Status.SPECIAL
    assert r.read_text("/srv/key.pem") is None          # would block forever with open()
    assert r.listdir("/srv/app/links") == r.listdir("/etc")
    with pytest.raises(SourceChanged):
        r.open_node("/srv/app/links/passwd")             # a canonical path has no symlink in it


@pytest.mark.parametrize("walk", [False, True], ids=["openat2", "nofollow-walk"])
def test_open_no_symlinks_refuses_a_link_in_any_component(tmp_path: Path, walk: bool) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_text("x")
    os.symlink("d", tmp_path / "l")
    os.symlink("f", tmp_path / "d/lf")
    fd = rt.open_no_symlinks(str(tmp_path / "d/f"), os.O_RDONLY | os.O_CLOEXEC, walk=walk)
    assert os.read(fd, 1) == b"x"
    os.close(fd)
    for bad in ("l/f", "d/lf"):
        with pytest.raises(OSError) as err:
            rt.open_no_symlinks(str(tmp_path / bad), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, walk=walk)
        assert err.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_open_node_checks_the_planned_identity(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("one")
    r = Root(str(tmp_path))
    res = r.resolve("/f")
    assert res.node is not None
    ident = res.node.identity
    os.close(r.open_node("/f", ident))
    os.rename(tmp_path / "f", tmp_path / "old")
    (tmp_path / "f").write_text("one")                    # another file at the same name
    with pytest.raises(SourceChanged, match="replaced"):
        r.open_node("/f", ident)


def test_a_directory_flipped_to_a_link_never_lets_a_read_through(tmp_path: Path) -> None:
    """The race of CVE-2018-15664: a directory on a planned path swapped for a symlink while
    files are opened. open_node either reads the planned file or refuses; never /etc/shadow."""
    (tmp_path / "app/d").mkdir(parents=True)
    (tmp_path / "app/d/shadow").write_text("harmless")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret/shadow").write_text("SECRET")
    r = Root(str(tmp_path))
    ident = r.resolve("/app/d/shadow").node.identity  # type: ignore[union-attr]
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            os.rename(tmp_path / "app/d", tmp_path / "app/d.real")
            os.symlink(tmp_path / "secret", tmp_path / "app/d")
            os.unlink(tmp_path / "app/d")
            os.rename(tmp_path / "app/d.real", tmp_path / "app/d")

    t = threading.Thread(target=flip)
    t.start()
    reads = refused = 0
    try:
        for _ in range(3000):
            try:
                fd = r.open_node("/app/d/shadow", ident)
            except (SourceChanged, FileNotFoundError):
                refused += 1
                continue
            try:
                assert os.read(fd, 100) == b"harmless"
                reads += 1
            finally:
                os.close(fd)
    finally:
        stop.set()
        t.join()
    assert reads > 0 and refused > 0


def test_identity_notices_rewrites(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("abc")
    ident = rt.Identity.of(os.lstat(f))
    assert ident.mismatch(os.lstat(f)) is None
    f.write_text("abcd")
    assert ident.mismatch(os.lstat(f)) == "its content changed"
    assert stat.S_ISREG(ident.fmt)
