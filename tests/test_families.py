"""Families of files looked up by a name from input (families.py): which trace paths trigger the
Python `encodings` package and a zoneinfo tree, exactly which members are then kept, and that
`off` turns a family off.

The trees are the test's own, each with links that leave it (absolute, and `..` past the root) and
really do reach files on the host: members are judged inside the root, so those are never
returned. One test reads the running interpreter's own encodings package through Root("/").
"""
from __future__ import annotations

import encodings
import os
import sys
from pathlib import Path

import pytest

from tracejail.families import FAMILIES, NAMES, members
from tracejail.root import Root

PY = "/usr/lib/python3.11"
ENC = f"{PY}/encodings"
DYN = f"{PY}/lib-dynload"
TAG = "cpython-311"
ZONEINFO = "/usr/share/zoneinfo"


def touch(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A root with a Python 3.11 encodings package and a zoneinfo tree, and links out of the root."""
    t = tmp_path / "root"
    outside = tmp_path / "outside"
    for name in ("evil.py", "_codecs_evil.so", "_codecs_up.so", "Secret"):
        touch(outside / name, "host file")
    enc = t / ENC.lstrip("/")
    for name in ("__init__.py", "aliases.py", "cp1252.py", "utf_8.py", "README", "__pycache__/junk.txt"):
        touch(enc / name)
    for name in ("__init__", "cp1252", "utf_8"):    # aliases was never compiled
        touch(enc / f"__pycache__/{name}.{TAG}.pyc")
    touch(enc / f"__pycache__/utf_8.{TAG}.opt-1.pyc")
    (enc / "subpkg").mkdir()
    os.symlink(outside / "evil.py", enc / "evil.py")                     # absolute: restarts at the root
    os.symlink("cp1252.py", enc / "latin_9.py")                          # a link to a member: kept
    dyn = t / DYN.lstrip("/")
    for name in (f"_codecs_jp.{TAG}-x86_64-linux-gnu.so", f"_multibytecodec.{TAG}-x86_64-linux-gnu.so",
                 f"_ssl.{TAG}-x86_64-linux-gnu.so", "_codecs_notes.txt"):
        touch(dyn / name)
    os.symlink(outside / "_codecs_evil.so", dyn / "_codecs_evil.so")
    os.symlink("../../../../../outside/_codecs_up.so", dyn / "_codecs_up.so")   # `..` past the root
    zi = t / ZONEINFO.lstrip("/")
    for name in ("Europe/Paris", "Europe/Berlin", "America/New_York", "Etc/UTC", "UTC", "zone.tab", "tzdata.zi"):
        touch(zi / name, "TZif")
    (zi / "Empty").mkdir()
    os.symlink("America/New_York", zi / "posixrules")
    os.symlink("/etc/localtime", zi / "localtime")                       # dangling in this root
    os.symlink(outside / "Secret", zi / "Evil")
    os.symlink("../../../../outside/Secret", zi / "Up")
    # the links out do reach host files: a resolver that followed them would return them
    for link in (enc / "evil.py", dyn / "_codecs_evil.so", dyn / "_codecs_up.so", zi / "Evil", zi / "Up"):
        assert link.read_text() == "host file", link
    return t


ENCODINGS_MEMBERS = [
    f"{ENC}/__init__.py", f"{ENC}/__pycache__/__init__.{TAG}.pyc", f"{ENC}/aliases.py",
    f"{ENC}/cp1252.py", f"{ENC}/__pycache__/cp1252.{TAG}.pyc", f"{ENC}/latin_9.py",
    f"{ENC}/utf_8.py", f"{ENC}/__pycache__/utf_8.{TAG}.pyc",
    f"{DYN}/_codecs_jp.{TAG}-x86_64-linux-gnu.so", f"{DYN}/_multibytecodec.{TAG}-x86_64-linux-gnu.so",
]
ZONEINFO_MEMBERS = [f"{ZONEINFO}/{n}" for n in (
    "America/New_York", "Etc/UTC", "Europe/Berlin", "Europe/Paris", "UTC", "posixrules", "tzdata.zi", "zone.tab")]


def kept(found: list[str], root: Root, off: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Family name -> its members: the encodings package in members()'s order (each .py, then its
    pyc), a zoneinfo tree sorted (walk order is the resolver's business). No member twice."""
    out: dict[str, list[str]] = {}
    for family, path in members(found, root, off):
        out.setdefault(family.name, []).append(path)
    for name, paths in out.items():
        assert len(set(paths)) == len(paths), paths
        if name == "zoneinfo":
            paths.sort()
    return out


def test_the_families_and_their_names() -> None:
    assert NAMES == ("python-encodings", "zoneinfo") == tuple(f.name for f in FAMILIES)
    assert all(f.why for f in FAMILIES)


@pytest.mark.parametrize("trigger", [f"{ENC}/cp1252.py", f"{ENC}/__pycache__/cp1252.{TAG}.pyc", f"{ENC}/utf_8.py",
                                     f"{ENC}/mac_roman.py", f"{ENC}/utf_8.pyc"])
def test_one_codec_keeps_the_whole_encodings_package(tree: Path, trigger: str) -> None:
    """Every .py of the package with its pyc of this interpreter, and the CJK codec extensions;
    not README, nor other extensions, nor the optimised pyc, nor what is missing (aliases' pyc),
    nor links that leave the root."""
    assert kept([trigger], Root(str(tree))) == {"python-encodings": ENCODINGS_MEMBERS}


def test_a_run_under_python_o_keeps_the_optimised_pyc(tree: Path) -> None:
    """`python -O` reads NAME.TAG.opt-1.pyc: what the run loaded says which flavour to keep, and
    an optimised pyc alone triggers the family."""
    enc = tree / ENC.lstrip("/")
    touch(enc / f"__pycache__/cp1252.{TAG}.opt-1.pyc")
    opt = [m.replace(f".{TAG}.pyc", f".{TAG}.opt-1.pyc") for m in ENCODINGS_MEMBERS
           if not m.endswith(f"__init__.{TAG}.pyc")]   # __init__ has no opt-1 pyc here
    for trigger in ([f"{ENC}/__pycache__/utf_8.{TAG}.opt-1.pyc"],
                    [f"{ENC}/cp1252.py", f"{ENC}/__pycache__/cp1252.{TAG}.opt-1.pyc"]):
        assert kept(trigger, Root(str(tree))) == {"python-encodings": opt}, trigger
    # Both flavours read (two interpreters, or -O for one command): both kept.
    both = kept([f"{ENC}/__pycache__/utf_8.{TAG}.opt-1.pyc", f"{ENC}/__pycache__/utf_8.{TAG}.pyc"], Root(str(tree)))
    assert set(both["python-encodings"]) == set(ENCODINGS_MEMBERS) | set(opt)


def test_a_zone_file_keeps_its_whole_zoneinfo_tree(tree: Path) -> None:
    """Files and links to files; not directories, not a dangling link, not links out of the root."""
    assert kept([f"{ZONEINFO}/Europe/Paris"], Root(str(tree))) == {"zoneinfo": ZONEINFO_MEMBERS}
    assert kept([f"{ZONEINFO}/Europe"], Root(str(tree))) == {"zoneinfo": ZONEINFO_MEMBERS}


@pytest.mark.parametrize("copy", ["posix", "right"])
def test_a_zone_read_from_the_posix_or_right_copy_keeps_the_tree_too(tree: Path, copy: str) -> None:
    # TZ=posix/Europe/Paris names a zone just as TZ=Europe/Paris does.
    assert kept([f"{ZONEINFO}/{copy}/Europe/Paris"], Root(str(tree))) == {"zoneinfo": ZONEINFO_MEMBERS}
    assert kept([f"{ZONEINFO}/{copy}/zone.tab"], Root(str(tree))) == {}


def test_several_triggers_keep_each_member_once(tree: Path) -> None:
    found = [f"{ENC}/cp1252.py", f"{ENC}/__pycache__/utf_8.{TAG}.pyc", f"{ZONEINFO}/UTC", f"{ZONEINFO}/Etc/UTC"]
    assert kept(found, Root(str(tree))) == {"python-encodings": ENCODINGS_MEMBERS, "zoneinfo": ZONEINFO_MEMBERS}


@pytest.mark.parametrize("path", [
    f"{ENC}/__init__.py", f"{ENC}/aliases.py", f"{ENC}/__pycache__/__init__.{TAG}.pyc",
    f"{ENC}/__pycache__/aliases.{TAG}.pyc", ENC, f"{ENC}/README", f"{ENC}/subpkg/x.py", f"{ENC}/utf_8.py.bak",
    f"{PY}/encodings.py", f"{PY}/site-packages/encodings/utf_8.py", "/usr/lib/python3/dist-packages/encodings/x.py",
    "/python3.11/encodings/utf_8.py", "/srv/app/encodings/utf_8.py", f"{PY}/json/encoder.py",
    f"{DYN}/_codecs_jp.{TAG}-x86_64-linux-gnu.so",
    ZONEINFO, f"{ZONEINFO}/zone.tab", f"{ZONEINFO}/tzdata.zi", "/usr/share/zoneinfo-extra/Europe/Paris",
    "/usr/share/myzoneinfo/Europe/Paris", f"{PY}/zoneinfo/_common.py", f"{PY}/zoneinfo/__init__.py",
    "/etc/localtime", "/etc/timezone",
])
def test_paths_that_only_look_like_a_member_trigger_nothing(tree: Path, path: str) -> None:
    assert kept([path], Root(str(tree))) == {}


def test_a_tzdata_python_package_keeps_its_own_tree_only(tree: Path) -> None:
    pkg = "/usr/lib/python3/dist-packages/tzdata/zoneinfo"
    for name in ("Europe/Paris", "UTC", "__init__.py"):
        touch(tree / pkg.lstrip("/") / name)
    assert kept([f"{pkg}/Europe/Paris"], Root(str(tree))) == {
        "zoneinfo": [f"{pkg}/Europe/Paris", f"{pkg}/UTC", f"{pkg}/__init__.py"]}


def test_members_keep_the_spelling_the_trace_used(tree: Path) -> None:
    """Through a merged-/usr link the package is listed as spelled; Root resolves each member."""
    os.symlink("usr/lib", tree / "lib")
    got = kept(["/lib/python3.11/encodings/cp1252.py"], Root(str(tree)))
    assert got == {"python-encodings": [p.replace("/usr/lib/", "/lib/", 1) for p in ENCODINGS_MEMBERS]}


def test_a_trace_of_files_the_tree_does_not_hold_keeps_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    root = Root(str(tmp_path / "empty"))
    assert kept([f"{ENC}/cp1252.py", f"{ZONEINFO}/Europe/Paris", "/opt/tz/zoneinfo/UTC"], root) == {}


def test_a_package_whose_tree_is_a_link_out_of_the_root_keeps_nothing(tmp_path: Path) -> None:
    host = tmp_path / "host/usr/share/zoneinfo"
    touch(host / "Europe/Paris", "TZif")
    (tmp_path / "root/usr/share").mkdir(parents=True)
    os.symlink(host, tmp_path / "root/usr/share/zoneinfo")
    assert (tmp_path / "root/usr/share/zoneinfo/Europe/Paris").exists()
    assert kept([f"{ZONEINFO}/Europe/Paris"], Root(str(tmp_path / "root"))) == {}


@pytest.mark.parametrize("off, families", [
    ((), ["python-encodings", "zoneinfo"]),
    (("zoneinfo",), ["python-encodings"]),
    (("python-encodings",), ["zoneinfo"]),
    (NAMES, []),
    (("no-such-family", "Zoneinfo"), ["python-encodings", "zoneinfo"]),
])
def test_off_turns_families_off(tree: Path, off: tuple[str, ...], families: list[str]) -> None:
    found = [f"{ENC}/cp1252.py", f"{ZONEINFO}/Europe/Paris"]
    assert list(kept(found, Root(str(tree)), off)) == families


def test_found_may_be_a_one_shot_iterator(tree: Path) -> None:
    found = iter([f"{ENC}/cp1252.py", f"{ZONEINFO}/Europe/Paris"])
    got: dict[str, list[str]] = {}
    for family, path in members(found, Root(str(tree))):
        got.setdefault(family.name, []).append(path)
    assert got["python-encodings"] == ENCODINGS_MEMBERS and sorted(got["zoneinfo"]) == ZONEINFO_MEMBERS


def test_off_may_be_a_one_shot_iterator(tree: Path) -> None:
    found = [f"{ENC}/cp1252.py", f"{ZONEINFO}/Europe/Paris"]
    names = {family.name for family, _ in members(found, Root(str(tree)), iter(["zoneinfo"]))}
    assert names == {"python-encodings"}


def test_the_running_interpreters_encodings_package(tmp_path: Path) -> None:
    """Read through Root("/"): the members are the package's .py files, the plain pyc of each that
    exists, and the CJK codec modules beside the standard library, as listed by os.listdir."""
    pkg = os.path.dirname(encodings.__file__)
    if not os.path.isdir(os.path.join(pkg, "__pycache__")) or "/python3." not in pkg:
        pytest.skip(f"{pkg} is not a stdlib encodings package with a __pycache__")
    tag = sys.implementation.cache_tag
    want = []
    for name in sorted(os.listdir(pkg)):
        if name.endswith(".py"):
            want.append(f"{pkg}/{name}")
            pyc = f"{pkg}/__pycache__/{name[:-3]}.{tag}.pyc"
            if os.path.isfile(pyc):
                want.append(pyc)
    dynload = os.path.join(os.path.dirname(pkg), "lib-dynload")
    want += [f"{dynload}/{n}" for n in sorted(os.listdir(dynload)) if n.startswith(("_codecs_", "_multibytecodec"))
             and n.endswith(".so")] if os.path.isdir(dynload) else []
    assert len(want) > 100
    assert kept([f"{pkg}/utf_8.py"], Root("/")) == {"python-encodings": want}
