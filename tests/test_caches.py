"""What `tracejail cache df` lists and `tracejail cache prune` removes (caches.py): whole entries by
kind and age, inside the user's own cache only, never through a symlink, read-only image trees
included, and never another command's unpack in progress."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tracejail import caches
from tracejail.caches import Kind
from tracejail.cli import main

IMAGE_ID = "sha256:" + "ab" * 32
OLD = time.time() - 10 * 86400


def write(path: Path, data: bytes | str = b"x", mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    images = root / "images"
    image = images / IMAGE_ID[7:]
    write(image / "rootfs/usr/bin/app", b"a" * 1000)
    write(image / "rootfs/etc/os-release", b"b" * 24)
    os.chmod(image / "rootfs/usr/bin", 0o555)          # as the image made it: not writable
    os.chmod(image / "rootfs/usr", 0o555)
    write(image / "image.json", json.dumps({"image": "app:1", "image_id": IMAGE_ID}), mtime=OLD)
    write(images / ".cdcdcdcdcdcd.unpack-old/rootfs/f", b"c" * 10)      # interrupted long ago
    os.utime(images / ".cdcdcdcdcdcd.unpack-old", (OLD, OLD))
    write(images / ".efefefefefef.unpack-now/rootfs/f", b"d" * 10)      # being unpacked right now
    outside = write(tmp_path / "outside/precious", b"keep me")
    os.symlink(outside.parent, images / "evil")                         # never followed
    write(root / "layers/blobs" / ("12" * 32), b"l" * 300, mtime=time.time())
    write(root / "layers/blobs" / ("34" * 32), b"m" * 200, mtime=OLD)
    write(root / "layers/keys" / ("56" * 32 + ".json"), "{}")
    write(root / "pyimports-0.1.0.json", "{}")                          # the one file of earlier versions
    write(root / "pyimports-0.1.0" / ("ab" * 12 + ".json"), "{}")       # a file of facts per directory
    write(root / "pyimports-0.1.0" / ("cd" * 12 + ".json"), '{"a":1}')
    write(root / ("dpkg-" + "78" * 16 + ".marshal"), b"d" * 7)
    write(root / "registry-blobs.json", "{}")
    monkeypatch.setenv("TRACEJAIL_CACHE_DIR", str(root))
    return root


def test_entries_by_kind_with_their_sizes(cache: Path) -> None:
    found = {(e.kind, e.name): e.size for e in caches.entries()}
    assert found == {
        (Kind.IMAGES, f"app:1 ({IMAGE_ID[:19]})"): 1000 + 24 + len(json.dumps({"image": "app:1", "image_id": IMAGE_ID})),
        (Kind.IMAGES, "an unfinished unpack"): 10,
        (Kind.LAYERS, "layer sha256:121212121212"): 300,
        (Kind.LAYERS, "layer sha256:343434343434"): 200,
        (Kind.IMPORTS, "pyimports-0.1.0.json"): 2,
        (Kind.IMPORTS, "pyimports-0.1.0"): 2 + 7,
        (Kind.DPKG, "dpkg-" + "78" * 16 + ".marshal"): 7,
        (Kind.REGISTRY, "registry-blobs.json"): 2,
    }


def test_prune_by_kind_and_age_leaves_the_rest(cache: Path, tmp_path: Path) -> None:
    removed = caches.prune({Kind.IMAGES, Kind.LAYERS}, older_than=86400)
    assert sorted(e.name for e in removed) == ["an unfinished unpack", f"app:1 ({IMAGE_ID[:19]})",
                                               "layer sha256:343434343434"]
    assert not (cache / "images" / IMAGE_ID[7:]).exists()              # read-only directories too
    assert (cache / "images/.efefefefefef.unpack-now/rootfs/f").exists()
    assert (cache / "layers/blobs" / ("12" * 32)).exists() and (cache / "layers/keys").exists()
    assert (cache / "pyimports-0.1.0.json").exists() and (cache / "registry-blobs.json").exists()
    assert len(os.listdir(cache / "pyimports-0.1.0")) == 2
    assert list(cache.glob("dpkg-*.marshal"))
    assert (tmp_path / "outside/precious").read_bytes() == b"keep me" and (cache / "images/evil").is_symlink()


def test_prune_everything_through_the_cli(cache: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    before = json.loads(runner.invoke(main, ["cache", "df", "--json"]).output)
    assert before["cache"] == str(cache) and len(before["entries"]) == 8
    result = runner.invoke(main, ["cache", "prune", "-f"])
    assert result.exit_code == 0 and result.output.startswith("removed 8 entries, ")
    after = json.loads(runner.invoke(main, ["cache", "df", "--json"]).output)
    assert after["entries"] == [] and os.listdir(cache / "layers/keys") == []
    assert (tmp_path / "outside/precious").exists()


def test_bad_duration_is_a_usage_error(cache: Path) -> None:
    result = CliRunner().invoke(main, ["cache", "prune", "-f", "--older-than", "soon"])
    assert result.exit_code == 2 and "--older-than: 'soon' is not a duration" in result.output


def test_a_cache_others_may_write_is_not_touched(cache: Path) -> None:
    os.chmod(cache, 0o777)
    assert caches.entries() == [] and caches.prune(set(Kind)) == []
    assert (cache / "registry-blobs.json").exists()


def test_no_cache_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACEJAIL_CACHE_DIR", "")
    result = CliRunner().invoke(main, ["cache", "df"])
    assert result.exit_code == 0 and "no cache (TRACEJAIL_CACHE_DIR is empty)" in result.output
