"""Unpacking an image's file system that someone else made: nothing escapes, nothing privileged."""
from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from tracejail.errors import TracejailError
from tracejail.unpack import LayerTree, unpack_tar


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


def layer(*entries: tuple) -> bytes:
    """A layer tar from (name, kind, data, extra attributes) entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, data, *extra in entries:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            for k, v in (extra[0] if extra else {}).items():
                setattr(info, k, v)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


D, F, L, H = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE


def test_layers_stack_like_an_engine_stacks_them(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    lower = layer(("a", D, b""), ("a/x", F, b"x"), ("a/y", F, b"y"), ("b", F, b"b"), ("c", D, b""),
                  ("c/old", F, b"old"), ("d", D, b""), ("d/deep", D, b""), ("d/deep/f", F, b"f"),
                  ("e", F, b"e-file"), ("keep", F, b"1"), ("link", L, b"", {"linkname": "keep"}),
                  ("evil", L, b"", {"linkname": str(outside)}))
    upper = layer(("a/.wh.x", F, b""),                       # one file goes
                  (".wh.b", F, b""),
                  ("c/new", F, b"new"), ("c/.wh..wh..opq", F, b""),   # opaque after this layer's own entry
                  ("d", F, b"a file where a directory was"),         # a directory replaced, whole
                  ("e", D, b""), ("e/inside", F, b"dir now"),        # a file replaced by a directory
                  ("keep", F, b"2"),                                  # a later version wins
                  ("hard", H, b"", {"linkname": "keep"}),             # a hard link to this layer's file
                  ("evil/owned", F, b"through a symlink"),            # never written through it
                  ("evil/.wh.victim", F, b""),                        # nor removed through it
                  ("a/.wh..", F, b""),                                # nonsense whiteout: ignored
                  ("ghost/sub/.wh.x", F, b""),                        # nothing below to remove: no dir made
                  ("fresh/.wh..wh..opq", F, b""))                     # an opaque dir is this layer's own
    (outside / "victim").write_text("stays")
    with LayerTree(str(dest)) as tree:
        tree.apply(io.BytesIO(lower))
        tree.apply(io.BytesIO(gzip.compress(upper)))
        result = tree.finish()
    assert sorted(os.listdir(dest / "a")) == ["y"]
    assert not (dest / "b").exists()
    assert sorted(os.listdir(dest / "c")) == ["new"]
    assert (dest / "d").read_text() == "a file where a directory was"
    assert (dest / "e/inside").read_text() == "dir now"
    assert (dest / "keep").read_text() == "2" and (dest / "link").is_symlink()
    assert os.stat(dest / "hard").st_ino == os.stat(dest / "keep").st_ino
    assert os.listdir(outside) == ["victim"]
    assert not (dest / "ghost").exists() and (dest / "fresh").is_dir() and os.listdir(dest / "fresh") == []
    why = dict(result.skipped)
    assert why["evil/owned"] == "a parent directory is a symlink or a file"
    assert why["evil/.wh.victim"] == "a whiteout below a symlink or a file"


def test_a_layer_that_is_not_a_tar_is_one_error(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with LayerTree(str(dest)) as tree, pytest.raises(TracejailError, match="layer 2 of the image is not a readable tar"):
        tree.apply(io.BytesIO(b"\x1f\x8b" + b"garbage" * 100), "layer 2")
