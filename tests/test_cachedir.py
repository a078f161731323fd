"""The cache directory: where it is, and that nothing in it is trusted unless it is the user's own."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tracejail import cachedir
from tracejail.errors import Interrupted


def test_cache_root_follows_the_environment(tmp_path: Path) -> None:
    assert cachedir.cache_root({"TRACEJAIL_CACHE_DIR": str(tmp_path)}) == str(tmp_path)
    assert cachedir.cache_root({"TRACEJAIL_CACHE_DIR": ""}) is None
    assert cachedir.cache_root({"XDG_CACHE_HOME": "/x/cache", "HOME": "/home/u"}) == "/x/cache/tracejail"
    assert cachedir.cache_root({"HOME": "/home/u"}) == "/home/u/.cache/tracejail"
    assert cachedir.cache_root({"XDG_CACHE_HOME": "relative", "HOME": "/home/u"}) is None


def test_only_a_private_directory_of_the_users_own_is_used(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    assert cachedir.safe_dir(str(mine), create=True) and (mine.stat().st_mode & 0o777) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert not cachedir.safe_dir(str(shared), create=True)
    link = tmp_path / "link"
    link.symlink_to(mine)
    assert not cachedir.safe_dir(str(link), create=False)
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        assert not cachedir.safe_dir(str(theirs), create=False)


def test_read_private_refuses_links_big_and_foreign_files(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_bytes(b"data")
    assert cachedir.read_private(str(good), 100) == b"data"
    assert cachedir.read_private(str(good), 3) is None
    (tmp_path / "link").symlink_to(good)
    assert cachedir.read_private(str(tmp_path / "link"), 100) is None
    assert cachedir.read_private(str(tmp_path / "missing"), 100) is None
    if os.geteuid() == 0:
        os.chown(good, 65534, 65534)
        assert cachedir.read_private(str(good), 100) is None


def test_write_private_is_atomic_and_leaves_nothing_when_interrupted(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f"
    assert cachedir.write_private(str(target), b"one")
    assert target.read_bytes() == b"one" and (target.stat().st_mode & 0o777) == 0o600

    def interrupted(*_a: object) -> None:
        raise Interrupted(15)

    monkeypatch.setattr(cachedir.os, "replace", interrupted)
    with pytest.raises(Interrupted):
        cachedir.write_private(str(target), b"two")
    assert sorted(os.listdir(tmp_path)) == ["f"] and target.read_bytes() == b"one"
    monkeypatch.undo()
    os.chmod(tmp_path, 0o500)
    try:
        if os.geteuid() != 0:
            assert not cachedir.write_private(str(tmp_path / "g"), b"x")
    finally:
        os.chmod(tmp_path, 0o700)
