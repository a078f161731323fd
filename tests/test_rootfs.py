"""rootfs.plan / rootfs.stage on fake host trees (host_root=) and on the real host."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tracejail import rootfs
from tracejail.errors import TracejailError
from tracejail.rootfs import Entry, Plan, StageOptions
from tracejail.root import is_runtime_path


def kinds(plan: Plan) -> dict[str, tuple[str, str | None]]:
    return {p: (e.kind, e.link_target) for p, e in plan.entries.items()}


def write(path: Path, text: str = "x", mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def snapshot(root: Path) -> dict[str, tuple[int, int, float]]:
    """Everything under `root` (not following symlinks), to prove nothing changed there."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_size, st.st_mtime)
    st = os.lstat(root)
    out[str(root)] = (st.st_mode, st.st_size, st.st_mtime)
    return out


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A small Debian-like tree: merged /usr, ld.so via /lib64, alternatives, a venv, traps."""
    h = tmp_path / "host"
    libdir = h / "usr/lib/x86_64-linux-gnu"
    write(libdir / "libc.so.6", "libc", 0o755)
    write(libdir / "ld-linux-x86-64.so.2", "ld.so", 0o755)
    (h / "usr/lib64").mkdir(parents=True)
    link(h / "lib", "usr/lib")
    link(h / "lib64", "usr/lib64")
    link(h / "usr/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    # /etc/alternatives chain: editor -> /etc/alternatives/editor -> /usr/bin/vim.basic
    write(h / "usr/bin/vim.basic", "vim", 0o755)
    link(h / "etc/alternatives/editor", "/usr/bin/vim.basic")
    link(h / "usr/bin/editor", "/etc/alternatives/editor")
    # venv: bin/python -> python3 -> /opt/py/bin/python3.11 (relative then absolute)
    write(h / "opt/py/bin/python3.11", "python", 0o755)
    link(h / "app/venv/bin/python3", "/opt/py/bin/python3.11")
    link(h / "app/venv/bin/python", "python3")
    # a relative target with .. that crosses the /lib symlink: /usr/bin/../../lib/... = /lib/...
    link(h / "usr/bin/libc-rel", "../../lib/x86_64-linux-gnu/libc.so.6")
    # traps
    link(h / "loop/a", "b")
    link(h / "loop/b", "a")
    link(h / "etc/resolv.conf", "/run/systemd/resolve/stub-resolv.conf")
    link(h / "etc/mtab", "../proc/self/mounts")
    link(h / "escape", "../../../../../../../usr/bin/vim.basic")  # .. past / stays at /
    return h


# ------------------------------------------------------------------------------------------
# Paths


@pytest.mark.parametrize("bad", ["usr/lib", "", "/a/../etc/passwd", "/a/./b", "/a//b", "/a/", "/..", "./x"])
def test_rejects_relative_and_unnormalised_paths(bad: str, host: Path) -> None:
    with pytest.raises(TracejailError) as err:
        rootfs.plan([bad], root=str(host))
    assert repr(bad) in str(err.value)
    with pytest.raises(TracejailError):
        rootfs.plan([], dirs_only=[bad], root=str(host))


# ------------------------------------------------------------------------------------------
# Symlink chains


def test_merged_usr_ld_so_chain_is_kept_component_by_component(host: Path) -> None:
    plan = rootfs.plan(["/lib64/ld-linux-x86-64.so.2"], root=str(host))
    assert kinds(plan) == {
        "/": ("dir", None),
        "/lib64": ("symlink", "usr/lib64"),
        "/usr": ("dir", None),
        "/usr/lib64": ("dir", None),
        "/usr/lib64/ld-linux-x86-64.so.2": ("symlink", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
        "/lib": ("symlink", "usr/lib"),
        "/usr/lib": ("dir", None),
        "/usr/lib/x86_64-linux-gnu": ("dir", None),
        "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2": ("file", None),
        "/tmp": ("dir", None),
    }
    assert plan.missing == [] and plan.skipped == []
    f = plan.entries["/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"]
    assert f.source == str(host / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2") and f.size == len("ld.so")


def test_alternatives_venv_and_relative_chains(host: Path) -> None:
    plan = rootfs.plan(["/usr/bin/editor", "/app/venv/bin/python", "/usr/bin/libc-rel"], root=str(host))
    k = kinds(plan)
    assert k["/usr/bin/editor"] == ("symlink", "/etc/alternatives/editor")
    assert k["/etc/alternatives/editor"] == ("symlink", "/usr/bin/vim.basic")
    assert k["/usr/bin/vim.basic"] == ("file", None)
    assert k["/app/venv/bin/python"] == ("symlink", "python3")
    assert k["/app/venv/bin/python3"] == ("symlink", "/opt/py/bin/python3.11")
    assert k["/opt/py/bin/python3.11"] == ("file", None)
    assert k["/usr/bin/libc-rel"] == ("symlink", "../../lib/x86_64-linux-gnu/libc.so.6")
    assert k["/lib"] == ("symlink", "usr/lib")
    assert k["/usr/lib/x86_64-linux-gnu/libc.so.6"] == ("file", None)
    # every parent of every entry is a real directory entry
    for path in plan.entries:
        for anc in rootfs._ancestors(path):
            assert plan.entries[anc].kind == "dir", (path, anc)


def test_dotdot_past_root_stays_inside_host_root(host: Path) -> None:
    plan = rootfs.plan(["/escape"], root=str(host))
    assert plan.entries["/usr/bin/vim.basic"].source == str(host / "usr/bin/vim.basic")
    assert all(e.source is None or e.source.startswith(str(host)) for e in plan.entries.values())


def test_loops_and_dangling_links_are_reported_missing_but_kept(host: Path) -> None:
    link(host / "dangling", "/nowhere/at/all")
    plan = rootfs.plan(["/loop/a", "/etc/resolv.conf", "/loop/a/deeper", "/dangling"], root=str(host))
    assert plan.missing == ["/dangling", "/loop/a", "/loop/a/deeper"]
    # /run is the runtime's: a link into it is kept, what it points to is not looked at
    assert plan.skipped == [("/etc/resolv.conf", "provided by the container runtime")]
    k = kinds(plan)
    assert k["/loop/a"] == ("symlink", "b") and k["/loop/b"] == ("symlink", "a")
    assert k["/dangling"] == ("symlink", "/nowhere/at/all")
    assert k["/etc/resolv.conf"] == ("symlink", "/run/systemd/resolve/stub-resolv.conf")
    assert "/run" not in plan.entries


def test_runtime_paths_never_break_the_plan(host: Path) -> None:
    plan = rootfs.plan(["/proc/self/exe", "/dev/null", "/sys/kernel/mm", "/etc/mtab", "/proc"],
                       root=str(host))
    assert {p for p, _ in plan.skipped} == {"/proc/self/exe", "/dev/null", "/sys/kernel/mm", "/etc/mtab", "/proc"}
    assert plan.entries["/etc/mtab"].link_target == "../proc/self/mounts"
    assert not any(is_runtime_path(p) for p in plan.entries)
    # and on the real host, where /proc/self is a magic symlink and /dev holds devices
    real = rootfs.plan(["/proc/self/exe", "/dev/null", "/proc/self/fd/0", "/etc/mtab"])
    assert not any(is_runtime_path(p) for p in real.entries)


def test_sockets_and_fifos_are_skipped(tmp_path: Path) -> None:
    h = tmp_path / "h"
    h.mkdir()
    os.mkfifo(h / "fifo")
    plan = rootfs.plan(["/fifo"], root=str(h))
    assert plan.skipped == [("/fifo", "a FIFO cannot be copied into an image")]
    assert "/fifo" not in plan.entries


def test_real_host_ld_so_round_trip(tmp_path: Path) -> None:
    """Stage the real /lib64/ld-linux-x86-64.so.2, then resolve it again *inside* the staged tree."""
    wanted = "/lib64/ld-linux-x86-64.so.2"
    if not os.path.exists(wanted):
        pytest.skip(f"{wanted} not on this host")
    plan = rootfs.plan([wanted])
    real = os.path.realpath(wanted)
    assert plan.entries[real].kind == "file"
    assert plan.entries["/lib64"].kind == ("symlink" if os.path.islink("/lib64") else "dir")
    dest = tmp_path / "rootfs"
    rootfs.stage(plan, str(dest))
    again = rootfs.plan([wanted], root=str(dest))
    assert again.missing == []
    assert kinds(again) == kinds(plan)
    assert (dest / real[1:]).read_bytes() == Path(real).read_bytes()


# ------------------------------------------------------------------------------------------
# Hard links, modes, setuid


def test_hard_links_stay_hard_links(tmp_path: Path) -> None:
    h = tmp_path / "h"
    a = write(h / "bin/a", "same inode", 0o755)
    os.link(a, h / "bin/b")
    (h / "sbin").mkdir()
    os.link(a, h / "sbin/c")
    write(h / "bin/d", "same inode", 0o755)  # same content, different inode: not a link
    plan = rootfs.plan(["/sbin/c", "/bin/b", "/bin/a", "/bin/d"], root=str(h))
    e = plan.entries
    assert (e["/bin/a"].kind, e["/bin/a"].size) == ("file", len("same inode"))
    assert (e["/bin/b"].kind, e["/bin/b"].link_target, e["/bin/b"].size) == ("hardlink", "/bin/a", 0)
    assert (e["/sbin/c"].kind, e["/sbin/c"].link_target) == ("hardlink", "/bin/a")
    assert e["/bin/d"].kind == "file"
    dest = tmp_path / "out"
    rootfs.stage(plan, str(dest))
    ino = {p: os.lstat(dest / p).st_ino for p in ("bin/a", "bin/b", "sbin/c", "bin/d")}
    assert ino["bin/a"] == ino["bin/b"] == ino["sbin/c"] != ino["bin/d"]
    assert os.lstat(dest / "bin/a").st_nlink == 3


def test_traversable_policy_on_private_dirs(tmp_path: Path) -> None:
    h = tmp_path / "h"
    write(h / "srv/private/data.txt", "secret", 0o600)
    write(h / "srv/private/tool", "#!", 0o700)
    (h / "srv/private").chmod(0o700)
    (h / "srv/listed").mkdir(mode=0o711)
    (h / "srv/listed").chmod(0o711)
    wanted = ["/srv/private/data.txt", "/srv/private/tool", "/srv/listed"]

    plan = rootfs.plan(wanted, root=str(h))
    modes = {p: e.mode for p, e in plan.entries.items()}
    assert modes["/srv/private"] == 0o701
    assert modes["/srv/private/data.txt"] == 0o604
    assert modes["/srv/private/tool"] == 0o705
    assert modes["/srv/listed"] == 0o715  # listed: r and x for others
    changes = {p: (old, new) for p, old, new, _ in plan.mode_changes}
    assert changes == {
        "/srv/listed": (0o711, 0o715),
        "/srv/private": (0o700, 0o701),
        "/srv/private/data.txt": (0o600, 0o604),
        "/srv/private/tool": (0o700, 0o705),
    }
    assert all("65532" in why for *_, why in plan.mode_changes)
    dest = tmp_path / "out"
    rootfs.stage(plan, str(dest))
    assert stat.S_IMODE(os.lstat(dest / "srv/private").st_mode) == 0o701
    assert stat.S_IMODE(os.lstat(dest / "srv/private/data.txt").st_mode) == 0o604

    kept = rootfs.plan(wanted, root=str(h), options=StageOptions(keep_modes=True))
    assert kept.mode_changes == [] and kept.entries["/srv/private"].mode == 0o700
    as_root = rootfs.plan(wanted, root=str(h), options=StageOptions(image_uid=0, image_gid=0))
    assert as_root.mode_changes == []
    # an image user in group 0 is served by the group bits, so those are what get widened
    group0 = rootfs.plan(wanted, root=str(h), options=StageOptions(image_uid=1000, image_gid=0))
    assert group0.entries["/srv/private"].mode == 0o710


def test_setuid_dropped_unless_kept(tmp_path: Path) -> None:
    h = tmp_path / "h"
    write(h / "bin/su", "su", 0o4755)
    write(h / "bin/wall", "wall", 0o2755)
    (h / "bin").chmod(0o755)
    plan = rootfs.plan(["/bin/su", "/bin/wall"], root=str(h))
    assert plan.entries["/bin/su"].mode == 0o755 and plan.entries["/bin/wall"].mode == 0o755
    assert plan.dropped_setuid == ["/bin/su", "/bin/wall"]
    kept = rootfs.plan(["/bin/su"], root=str(h), options=StageOptions(keep_setuid=True))
    assert kept.entries["/bin/su"].mode == 0o4755 and kept.dropped_setuid == []
    dest = tmp_path / "out"
    rootfs.stage(kept, str(dest))
    assert stat.S_IMODE(os.lstat(dest / "bin/su").st_mode) == 0o4755


def test_tmp_is_sticky_and_world_writable(tmp_path: Path, host: Path) -> None:
    plan = rootfs.plan(["/usr/bin/vim.basic"], root=str(host))
    assert plan.entries["/tmp"].mode == 0o1777
    dest = tmp_path / "out"
    rootfs.stage(plan, str(dest))
    assert stat.S_IMODE(os.lstat(dest / "tmp").st_mode) == 0o1777


def test_wanted_dirs_and_dirs_only_are_empty(tmp_path: Path, host: Path) -> None:
    write(host / "etc/ssl/certs/ca.pem", "pem")
    write(host / "etc/ssl/openssl.cnf", "cnf")
    plan = rootfs.plan(["/etc/ssl/openssl.cnf", "/etc/ssl"], dirs_only=["/etc/ssl/certs", "/nope"],
                       root=str(host))
    assert plan.entries["/etc/ssl/certs"].kind == "dir"
    assert "/etc/ssl/certs/ca.pem" not in plan.entries
    assert plan.missing == ["/nope"]
    dest = tmp_path / "out"
    rootfs.stage(plan, str(dest))
    assert sorted(os.listdir(dest / "etc/ssl")) == ["certs", "openssl.cnf"]
    assert os.listdir(dest / "etc/ssl/certs") == []


def test_missing_paths_are_reported(host: Path) -> None:
    plan = rootfs.plan(["/usr/bin/vim.basic", "/usr/bin/gone", "/usr/bin/vim.basic/notadir"], root=str(host))
    assert plan.missing == ["/usr/bin/gone", "/usr/bin/vim.basic/notadir"]
    assert "/usr/bin/gone" not in plan.entries


# ------------------------------------------------------------------------------------------
# Staging: content, progress, vanishing sources, rootfs round trip


def test_stage_copies_content_modes_mtimes_and_reports_progress(tmp_path: Path, host: Path) -> None:
    big = write(host / "data/big.bin", "", 0o640)
    big.write_bytes(os.urandom(3 << 20))
    os.utime(big, (1_600_000_000, 1_600_000_000))
    plan = rootfs.plan(["/data/big.bin", "/usr/bin/editor"], root=str(host))
    seen: list[int] = []
    dest = tmp_path / "out"
    rootfs.stage(plan, str(dest), progress=seen.append)
    assert sum(seen) == plan.files_size() == (3 << 20) + len("vim")
    assert (dest / "data/big.bin").read_bytes() == big.read_bytes()
    st = os.lstat(dest / "data/big.bin")
    assert (stat.S_IMODE(st.st_mode), st.st_mtime, st.st_uid) == (0o644, 1_600_000_000, 0)
    assert os.readlink(dest / "usr/bin/editor") == "/etc/alternatives/editor"


def test_plan_from_rootfs_round_trip(tmp_path: Path, host: Path) -> None:
    a = write(host / "bin/a", "hl", 0o755)
    os.link(a, host / "bin/b")
    plan = rootfs.plan(["/usr/bin/editor", "/lib64/ld-linux-x86-64.so.2", "/bin/a", "/bin/b"], root=str(host))
    dest = tmp_path / "out"
    rootfs.stage(plan, str(dest))
    back = rootfs.plan_from_rootfs(str(dest))

    def shape(p: Plan) -> dict[str, tuple[object, ...]]:
        return {k: (e.kind, e.mode, e.link_target, e.size, e.mtime, e.uid, e.gid)
                for k, e in p.entries.items() if k != "/"}

    assert shape(back) == shape(plan)


def test_vanished_source_fails_cleanly(tmp_path: Path, host: Path) -> None:
    plan = rootfs.plan(["/usr/bin/vim.basic", "/opt/py/bin/python3.11"], root=str(host))
    (host / "opt/py/bin/python3.11").unlink()
    dest = tmp_path / "out"
    with pytest.raises(TracejailError, match="python3.11 vanished"):
        rootfs.stage(plan, str(dest))
    assert not dest.exists()  # the partial tree is gone


def test_dest_must_be_empty_real_directory(tmp_path: Path, host: Path) -> None:
    plan = rootfs.plan(["/usr/bin/vim.basic"], root=str(host))
    full = tmp_path / "full"
    write(full / "keep", "precious")
    with pytest.raises(TracejailError, match="not empty"):
        rootfs.stage(plan, str(full))
    assert (full / "keep").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "dest-link").symlink_to(empty)
    with pytest.raises(TracejailError, match="symlink"):
        rootfs.stage(plan, str(tmp_path / "dest-link"))
    assert os.listdir(empty) == []


# ------------------------------------------------------------------------------------------
# Hostile plans: nothing outside dest may change


def entry(path: str, kind: str, *, source: str | None = None, target: str | None = None, mode: int = 0o644) -> Entry:
    size = os.path.getsize(source) if source and os.path.exists(source) else 0
    return Entry(path, kind, mode, source, target, size, 0, 0, 0)


@pytest.fixture
def arena(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(outside dir that must stay untouched, a payload file, dest)."""
    outside = tmp_path / "outside"
    write(outside / "etc/passwd", "root:x:0:0")
    payload = write(tmp_path / "payload", "pwned")
    (tmp_path / "work").mkdir()
    return outside, payload, tmp_path / "work" / "dest"


def hostile_plans(outside: Path, payload: Path) -> dict[str, Plan]:
    p = str(payload)
    return {
        "file below symlink to /": Plan({"/evil": entry("/evil", "symlink", target="/"),
                                         "/evil/etc/x": entry("/evil/etc/x", "file", source=p)}),
        "file below symlink to outside": Plan({"/evil": entry("/evil", "symlink", target=str(outside)),
                                               "/evil/etc/passwd": entry("/evil/etc/passwd", "file", source=p)}),
        "relative symlink upwards": Plan({"/up": entry("/up", "symlink", target="../.."),
                                          "/up/x": entry("/up/x", "file", source=p)}),
        "dotdot path": Plan({"/../x": entry("/../x", "file", source=p)}),
        "dotdot in the middle": Plan({"/a/../../x": entry("/a/../../x", "file", source=p)}),
        "relative path": Plan({"x": entry("x", "file", source=p)}),
        "key differs from path": Plan({"/ok": entry("/../../ok", "file", source=p)}),
        "hard link through symlink": Plan({"/evil": entry("/evil", "symlink", target=str(outside)),
                                          "/h": entry("/h", "hardlink", target="/evil/etc/passwd")}),
        "hard link to symlink": Plan({"/a": entry("/a", "symlink", target=str(outside / "etc/passwd")),
                                     "/h": entry("/h", "hardlink", target="/a")}),
        "file below file": Plan({"/f": entry("/f", "file", source=p), "/f/x": entry("/f/x", "file", source=p)}),
    }


@pytest.mark.parametrize("case", list(hostile_plans(Path("/o"), Path("/p")).keys()))
def test_hostile_plans_cannot_write_outside(case: str, arena: tuple[Path, Path, Path], tmp_path: Path) -> None:
    outside, payload, dest = arena
    plan = hostile_plans(outside, payload)[case]
    before = snapshot(tmp_path)
    with pytest.raises(TracejailError):
        rootfs.stage(plan, str(dest))
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(str(dest.parent))} == \
        {k: v for k, v in before.items() if not k.startswith(str(dest.parent))}
    assert (outside / "etc/passwd").read_text() == "root:x:0:0"
    assert not dest.exists()


def test_hostile_host_tree_is_staged_inside(tmp_path: Path) -> None:
    """A host tree with /evil -> / : plan() resolves it to real paths, stage() stays in dest."""
    h = tmp_path / "h"
    write(h / "etc/hostname", "box")
    link(h / "evil", "/")
    link(h / "up", "../../../..")
    plan = rootfs.plan(["/evil/etc/hostname", "/up/etc/hostname"], root=str(h))
    assert kinds(plan)["/evil"] == ("symlink", "/") and kinds(plan)["/etc/hostname"] == ("file", None)
    dest = tmp_path / "dest"
    before = snapshot(h)
    rootfs.stage(plan, str(dest))
    assert snapshot(h) == before
    assert (dest / "etc/hostname").read_text() == "box"
    assert os.readlink(dest / "evil") == "/"


def test_writer_never_follows_a_symlink_inside_the_tree(tmp_path: Path) -> None:
    """Defence in depth: even if a symlink appears in the tree (a race), the fd walk refuses it."""
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "a").symlink_to(outside)
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(TracejailError, match="symlink"):
            rootfs.open_dir_nofollow(fd, "/a")
        (dest / "b").mkdir()
        (dest / "b" / "c").symlink_to("/")
        with pytest.raises(TracejailError):
            rootfs.open_dir_nofollow(fd, "/b/c")
    finally:
        os.close(fd)
    assert os.listdir(outside) == []


@pytest.mark.parametrize("case", ["file below symlink to /", "file below symlink to outside",
                                  "relative symlink upwards", "hard link through symlink"])
def test_writer_alone_refuses_hostile_plans(case: str, arena: tuple[Path, Path, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch off the plan checks: the O_NOFOLLOW fd walk by itself must still stay inside dest."""
    outside, payload, dest = arena
    plan = hostile_plans(outside, payload)[case]
    unchecked = lambda p: sorted(p.entries.values(), key=lambda e: rootfs.sort_key(e.path))  # noqa: E731
    monkeypatch.setattr(rootfs, "ordered_entries", unchecked)
    before = snapshot(tmp_path)
    with pytest.raises(TracejailError, match="symlink"):
        rootfs.stage(plan, str(dest))
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(str(dest.parent))} == \
        {k: v for k, v in before.items() if not k.startswith(str(dest.parent))}
    assert not dest.exists()


# ------------------------------------------------------------------------------------------
# Copying what was planned, and nothing else


def _swap_dir_for_link(d: Path, target: Path) -> None:
    os.rename(d, d.with_name(d.name + ".real"))
    os.symlink(target, d)


@pytest.mark.parametrize("writer", ["stage", "archive"])
def test_a_directory_swapped_for_a_link_after_planning_is_never_read_through(tmp_path: Path, writer: str) -> None:
    """CVE-2018-15664's race, frozen at its worst moment: planned as a directory, a symlink to
    the secrets when copied. The file is left out (or the write fails); its bytes never appear."""
    h = tmp_path / "h"
    write(h / "srv/app/d/shadow", "harmless")
    write(h / "srv/app/ok.txt", "fine")
    write(tmp_path / "secrets/shadow", "SECRET-BYTES")
    plan = rootfs.plan(["/srv/app/d/shadow", "/srv/app/ok.txt"], root=str(h))
    _swap_dir_for_link(h / "srv/app/d", tmp_path / "secrets")
    changed: list[tuple[str, str]] = []
    out = tmp_path / "out"
    if writer == "stage":
        rootfs.stage(plan, str(out), on_changed=lambda e, err: changed.append((e.path, str(err))))
        data = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.is_symlink())
    else:
        from tracejail import image

        image.write_archive(plan, str(out), image.ImageConfig(entrypoint=["/x"]), compress_level=None,
                            on_changed=lambda e, err: changed.append((e.path, str(err))))
        data = out.read_bytes()
    assert b"SECRET-BYTES" not in data and b"fine" in data
    assert [p for p, _ in changed] == ["/srv/app/d/shadow"]
    assert "symlink" in changed[0][1]
    # without a handler the write fails as a whole, and leaves nothing behind
    with pytest.raises(TracejailError, match="changed since it was planned"):
        rootfs.stage(plan, str(tmp_path / "out2"))
    assert not (tmp_path / "out2").exists()


def test_a_file_replaced_or_rewritten_after_planning_is_left_out(tmp_path: Path) -> None:
    h = tmp_path / "h"
    write(h / "a.txt", "planned")
    write(h / "b.txt", "planned")
    os.link(h / "b.txt", h / "c.txt")
    plan = rootfs.plan(["/a.txt", "/b.txt", "/c.txt"], root=str(h))
    os.rename(h / "a.txt", h / "a.old")
    write(h / "a.txt", "a new file")            # another inode at the planned name
    with open(h / "b.txt", "a") as f:
        f.write(" and then rewritten")          # same inode, other content
    changed: list[str] = []
    rootfs.stage(plan, str(tmp_path / "out"), on_changed=lambda e, err: changed.append(f"{e.path}: {err}"))
    assert sorted(c.split(":")[0] for c in changed) == ["/a.txt", "/b.txt"]
    assert "replaced" in changed[0] and "content changed" in changed[1]
    assert sorted(os.listdir(tmp_path / "out")) == ["tmp"]   # c.txt, b's hard link, went with it


def test_a_fifo_in_place_of_a_planned_file_never_blocks(tmp_path: Path) -> None:
    h = tmp_path / "h"
    write(h / "cert.pem", "planned")
    plan = rootfs.plan(["/cert.pem"], root=str(h))
    (h / "cert.pem").unlink()
    os.mkfifo(h / "cert.pem")                  # no writer: a blocking open() would wait forever
    changed: list[str] = []
    rootfs.stage(plan, str(tmp_path / "out"), on_changed=lambda e, err: changed.append(str(err)))
    assert len(changed) == 1 and "is no longer a regular file" in changed[0]


def test_size_limits_refuse_huge_and_sparse_files(tmp_path: Path) -> None:
    h = tmp_path / "h"
    write(h / "big.bin", "")
    with open(h / "big.bin", "wb") as f:
        f.write(os.urandom(2 << 20))
    with pytest.raises(TracejailError, match=r"refusing .*big.bin: .* over the .* limit"):
        rootfs.plan(["/big.bin"], root=str(h), options=StageOptions(max_file_size=1 << 20))
    assert rootfs.plan(["/big.bin"], root=str(h)).files_size() == 2 << 20
    with open(h / "sparse.img", "wb") as f:
        f.truncate(1 << 40)                    # 1 TiB, nothing allocated
    with pytest.raises(TracejailError, match="sparse file"):
        rootfs.plan(["/sparse.img"], root=str(h), options=StageOptions(max_file_size=1 << 50))
    with pytest.raises(TracejailError, match="over the"):
        rootfs.plan(["/sparse.img"], root=str(h))


def test_stage_creates_missing_parents(tmp_path: Path, host: Path) -> None:
    plan = rootfs.plan(["/usr/bin/vim.basic"], root=str(host))
    rootfs.stage(plan, str(tmp_path / "a/b/rootfs"))
    assert (tmp_path / "a/b/rootfs/usr/bin/vim.basic").read_text() == "vim"
