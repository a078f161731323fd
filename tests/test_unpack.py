"""Unpacking an image's file system that someone else made: nothing escapes, nothing privileged."""
from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from tracejail.unpack import unpack_tar


def hostile_tar(outside: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644, **kw) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.size = kind, mode, len(data)
            for k, v in kw.items():
                setattr(info, k, v)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("etc", tarfile.DIRTYPE, mode=0o755)
        add("etc/hostname", data=b"box\n")
        add("usr/bin/sudo", data=b"\x7fELF", mode=0o4755)              # setuid root
        add("usr/bin/wall", data=b"\x7fELF", mode=0o2755)              # setgid
        add("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o666)
        add("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1)
        add("run/fifo", tarfile.FIFOTYPE)
        add("escape", tarfile.SYMTYPE, linkname=str(outside))         # a link out...
        add("escape/owned", data=b"written through a symlink\n")      # ...then a file through it
        add("../../../tmp/dotdot", data=b"x")
        add("/abs/ok", data=b"absolute names are made relative\n")
        add("hard", tarfile.LNKTYPE, linkname="../../etc/shadow")
        add("hard2", tarfile.LNKTYPE, linkname="etc/hostname")
        add("tmp", tarfile.DIRTYPE, mode=0o1777)
        add("locked", tarfile.DIRTYPE, mode=0o555)
        add("locked/inside", data=b"kept\n")
    return buf.getvalue()


@pytest.mark.parametrize("gzip", [False, True])
def test_a_hostile_image_unpacks_safely(tmp_path: Path, gzip: bool) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    data = hostile_tar(outside)
    if gzip:
        import gzip as gz

        data = gz.compress(data)
    result = unpack_tar(io.BytesIO(data), str(dest))
    assert os.listdir(outside) == []
    assert not Path("/tmp/dotdot").exists()
    assert (dest / "etc/hostname").read_text() == "box\n"
    assert stat.S_IMODE((dest / "usr/bin/sudo").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "usr/bin/wall").stat().st_mode) == 0o755
    assert sorted(result.setuid_dropped) == ["usr/bin/sudo", "usr/bin/wall"]
    assert not (dest / "dev/sda").exists() and not (dest / "dev/mem").exists() and not (dest / "run/fifo").exists()
    assert (dest / "escape").is_symlink() and os.readlink(dest / "escape") == str(outside)
    assert (dest / "abs/ok").read_text().startswith("absolute")
    assert not (dest / "hard").exists()
    assert os.stat(dest / "hard2").st_ino == os.stat(dest / "etc/hostname").st_ino
    assert stat.S_IMODE((dest / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((dest / "locked").stat().st_mode) == 0o555 and (dest / "locked/inside").read_text() == "kept\n"
    why = dict(result.skipped)
    assert why["escape/owned"] == "a parent directory is a symlink or a file"
    assert why["dev/sda"] == "a device node or FIFO is not created"
    assert why["../../../tmp/dotdot"] == "its name leaves the tree"
    assert why["hard"] == "a hard link out of the tree"
