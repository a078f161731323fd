"""Images as the root of a trace: reading archives and layouts, unpacking into the cache, and
finding a trace's tree again (source.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from images import image_config, tar_of, write_docker_archive, write_oci_layout
from tracejail import source, trace as tr
from tracejail.errors import TraceFormatError
from tracejail.root import Root

BASE = tar_of({"etc": None, "etc/marker": b"from the image\n", "etc/passwd": b"root:x:0:0::/root:/bin/sh\n"
               b"app:x:1000:1000::/home/app:/bin/sh\n", "etc/group": b"root:x:0:\nstaff:x:50:\n",
               "usr": None, "usr/bin": None, "usr/bin/tool": b"#!/bin/sh\n", "bin": "usr/bin"},
              modes={"usr/bin/tool": 0o755})
APP = tar_of({"app": None, "app/main.py": b"print('hi')\n", "etc/.wh.marker": b""})
RUN = {"Entrypoint": ["/usr/bin/tool"], "Cmd": ["--serve"], "Env": ["PATH=/usr/bin", "MODE=prod"],
       "WorkingDir": "/app", "User": "app:staff", "ExposedPorts": {"8000/tcp": {}}, "Labels": {"a": "b"},
       "Volumes": {"/data": {}}, "StopSignal": "SIGINT"}


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "image.tar"
    return path, write_docker_archive(path, [BASE, APP], image_config([BASE, APP], **RUN), ["app:1"])


def test_a_docker_archive_and_an_oci_layout_read_the_same(tmp_path: Path, archive: tuple[Path, str]) -> None:
    layout = tmp_path / "layout"
    layout_id = write_oci_layout(layout, [BASE, APP], image_config([BASE, APP], **RUN))
    path, image_id = archive
    with source.open_image(str(path)) as a, source.open_image(str(layout)) as b:
        assert (a.image_id, b.image_id) == (image_id, layout_id)
        assert a.config == b.config == tr.SourceConfig(
            entrypoint=["/usr/bin/tool"], cmd=["--serve"], env=["PATH=/usr/bin", "MODE=prod"], working_dir="/app",
            user="app:staff", exposed_ports=["8000/tcp"], labels={"a": "b"}, volumes=["/data"], stop_signal="SIGINT")
        assert len(a.image.layers) == len(b.image.layers) == 2


def test_the_unpack_is_cached_and_only_tracejails_own_counts(archive: tuple[Path, str]) -> None:
    path, image_id = archive
    with source.open_image(str(path)) as opened, source.unpacked(opened) as first:
        assert first.cached and first.rootfs.endswith(image_id.split(":")[1] + "/rootfs")
        assert (Path(first.rootfs) / "app/main.py").read_text() == "print('hi')\n"
        assert not (Path(first.rootfs) / "etc/marker").exists()      # the upper layer's whiteout
        assert first.content_size > 0
    os.utime(Path(first.rootfs) / "app/main.py", (1, 1))              # a marker of mine: reused as it is
    os.utime(Path(first.rootfs).parent / source.MARKER, (1, 1))
    with source.open_image(str(path)) as opened, source.unpacked(opened) as again:
        assert again.rootfs == first.rootfs and os.stat(Path(again.rootfs) / "app/main.py").st_mtime == 1
    # Taking it from the cache marks it used (what `cache prune --older-than` goes by).
    assert os.stat(Path(first.rootfs).parent / source.MARKER).st_mtime > 1
    # A marker that names another tree is no marker: the image is unpacked again, in its place.
    marker = Path(first.rootfs).parent / source.MARKER
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "rootfs": "/etc"}))
    with source.open_image(str(path)) as opened, source.unpacked(opened) as other:
        assert other.rootfs == first.rootfs and other.cached
        assert os.stat(Path(other.rootfs) / "app/main.py").st_mtime != 1
    # A place in the cache that is not tracejail's own directory is left alone: a temporary tree.
    top = Path(first.rootfs).parent
    (top / source.MARKER).unlink()
    os.chmod(top, 0o777)
    with source.open_image(str(path)) as opened, source.unpacked(opened) as temporary:
        assert not temporary.cached and temporary.rootfs != first.rootfs
    assert not Path(temporary.rootfs).exists() and top.exists()
    os.chmod(top, 0o700)


def test_no_cache_means_a_temporary_tree(monkeypatch: pytest.MonkeyPatch, archive: tuple[Path, str]) -> None:
    monkeypatch.setenv("TRACEJAIL_CACHE_DIR", "")
    path, _ = archive
    with source.open_image(str(path)) as opened, source.unpacked(opened) as tree:
        assert not tree.cached and tree.source().rootfs is None
        assert (Path(tree.rootfs) / "usr/bin/tool").exists()
    assert not Path(tree.rootfs).exists()


def test_a_layer_that_does_not_match_its_digest_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bad.tar"
    config = image_config([BASE, APP], **RUN)
    config["rootfs"]["diff_ids"][1] = "sha256:" + "0" * 64
    write_docker_archive(path, [BASE, APP], config)
    images = Path(os.environ["TRACEJAIL_CACHE_DIR"]) / source.IMAGES_DIR
    before = set(os.listdir(images)) if images.exists() else set()
    with source.open_image(str(path)) as opened, pytest.raises(source.ImageError, match="layer 2 .* does not match") as err:
        with source.unpacked(opened):
            pass
    assert err.value.exit_code == 65
    assert set(os.listdir(images)) == before


def test_a_trace_finds_its_tree_again(tmp_path: Path, archive: tuple[Path, str]) -> None:
    path, image_id = archive
    with source.open_image(str(path)) as opened, source.unpacked(opened) as tree:
        src = tree.source()
    with source.root_of(tr.Trace()) as host:
        assert host == "/"
    with source.root_of(tr.Trace(source=src)) as found:
        assert found == src.rootfs
    # A trace from elsewhere names a tree that is not ours: the image is read again instead.
    foreign = tr.Trace(source=tr.ImageSource(image=str(path), image_id=image_id, rootfs="/etc"))
    with source.root_of(foreign) as found:
        assert found != "/etc" and (Path(found) / "app/main.py").exists()
    # The image at that name is now another one: said in one line.
    write_docker_archive(path, [BASE], image_config([BASE], **RUN))
    gone = tr.Trace(source=tr.ImageSource(image=str(path), image_id="sha256:" + "1" * 64, rootfs=None))
    with pytest.raises(TraceFormatError, match="record it again"):
        with source.root_of(gone):
            pass


def test_the_source_survives_a_round_trip_through_the_trace(tmp_path: Path, archive: tuple[Path, str]) -> None:
    path, _ = archive
    with source.open_image(str(path)) as opened, source.unpacked(opened) as tree:
        t = tr.Trace(source=tree.source())
    tr.save(t, str(tmp_path / "t.json"))
    assert tr.load(str(tmp_path / "t.json")).source == t.source
    bad = json.loads((tmp_path / "t.json").read_text())
    bad["source"]["image_id"] = "md5:x"
    (tmp_path / "t.json").write_text(json.dumps(bad))
    with pytest.raises(TraceFormatError, match="source.image_id"):
        tr.load(str(tmp_path / "t.json"))


def test_users_are_the_images_own(archive: tuple[Path, str]) -> None:
    path, _ = archive
    with source.open_image(str(path)) as opened, source.unpacked(opened) as tree:
        root = Root(tree.rootfs)
        assert source.image_user(root, "") == (0, 0)
        assert source.image_user(root, "app") == (1000, 1000)
        assert source.image_user(root, "app:staff") == (1000, 50)
        assert source.image_user(root, "1000:7") == (1000, 7)
        assert source.image_user(root, "4242") == (4242, 4242)
        with pytest.raises(source.UsageError, match="not in the image's /etc/passwd"):
            source.image_user(root, "nobody-here")


@pytest.mark.parametrize("name, message", [
    ("missing.tar", "neither a file nor a directory"),
    ("notatar", "neither an OCI layout directory nor a readable tar"),
])
def test_bad_images_get_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, message: str) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no.sock")
    if name == "notatar":
        (tmp_path / name).write_bytes(b"hello" * 200)
    with pytest.raises(source.TracejailError, match=message):
        with source.open_image(str(tmp_path / name) if name == "notatar" else name):
            pass


def test_a_config_with_wrong_types_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "image.tar"
    write_docker_archive(path, [BASE], image_config([BASE], Cmd="not a list"))
    with pytest.raises(source.ImageError, match="Cmd is not a list of strings") as err:
        with source.open_image(str(path)):
            pass
    assert err.value.exit_code == 65
