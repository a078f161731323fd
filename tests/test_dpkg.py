"""Which Debian packages own an image's files (dpkg.py), read from dpkg's database in a tree.

Trees of the test's own hold a status file with packages in every state (installed, on hold,
config-files, not-installed, half-installed), two architectures of one Multi-Arch: same package
(`name:arch.list`), a binNMU whose Source names its version, and file lists in the old /lib spelling
of a merged-/usr image. The status.d stanzas written for scanners are checked byte for byte, and
this machine's own database against what dpkg-query says about it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tracejail.dpkg import (STATUS_D, DpkgDatabase, DpkgPackage, merged_usr_spellings, owners, parse_status,
                            read_database, status_d_files, status_d_name)
from tracejail.errors import TracejailError
from tracejail.root import Root

LIBC6_AMD64 = """\
Package: libc6
Status: install ok installed
Priority: optional
Section: libs
Installed-Size: 12987
Maintainer: GNU Libc Maintainers <debian-glibc@lists.debian.org>
Architecture: amd64
Multi-Arch: same
Source: glibc
Version: 2.36-9+deb12u4
Depends: libgcc-s1
Conffiles:
 /etc/ld.so.conf.d/x86_64-linux-gnu.conf d4e7a7b88a71b5ffd9e2644e71a0cfab
Description: GNU C Library: Shared libraries
 Contains the standard libraries that are used by nearly all programs on
 the system.
Homepage: https://www.gnu.org/software/libc/libc.html
"""
LIBC6_I386 = """\
Package: libc6
Status: install ok installed
Architecture: i386
Multi-Arch: same
Source: glibc
Version: 2.36-9+deb12u4
Description: GNU C Library: Shared libraries
"""
ZLIB = """\
Package: zlib1g
Status: hold ok installed
Maintainer: Mark Brown <broonie@debian.org>
Architecture: amd64
Multi-Arch: same
Source: zlib (1:1.2.13.dfsg-1)
Version: 1:1.2.13.dfsg-1+b1
Description: compression library - runtime
"""
TZDATA = """\
Package: tzdata
Status: install ok installed
Architecture: all
Version: 2024a-0+deb12u1
Description: time zone and daylight-saving time data
"""
COREUTILS = """\
Package: coreutils
Essential: yes
Status: install ok installed
Architecture: amd64
Version: 9.1-1
Description: GNU core utilities
"""
# Not installed: their lists, when left behind, own nothing.
CONFIG_FILES = "Package: oldlib\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1.0-1\n"
NOT_INSTALLED = "Package: gone\nStatus: purge ok not-installed\nArchitecture: amd64\n"
HALF_INSTALLED = "Package: broken\nStatus: install reinstreq half-installed\nArchitecture: amd64\nVersion: 2.0-1\n"
NO_STATUS = "Package: nostatus\nArchitecture: amd64\nVersion: 1\n"

STATUS = "\n".join([LIBC6_AMD64, CONFIG_FILES, LIBC6_I386, ZLIB, NOT_INSTALLED, TZDATA, HALF_INSTALLED,
                    COREUTILS, NO_STATUS])

LISTS = {
    "libc6:amd64": ["/.", "/etc", "/etc/ld.so.conf.d", "/etc/ld.so.conf.d/x86_64-linux-gnu.conf", "/lib",
                    "/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64",
                    "/lib64/ld-linux-x86-64.so.2", "/usr", "/usr/share", "/usr/share/doc",
                    "/usr/share/doc/libc6", "/usr/share/doc/libc6/copyright"],
    "libc6:i386": ["/.", "/lib", "/lib/i386-linux-gnu", "/lib/i386-linux-gnu/libc.so.6", "/usr", "/usr/share",
                   "/usr/share/doc", "/usr/share/doc/libc6", "/usr/share/doc/libc6/copyright"],
    "libc6:arm64": ["/lib/aarch64-linux-gnu/libc.so.6"],                  # an architecture not installed
    "zlib1g:amd64": ["/.", "/usr", "/usr/lib", "/usr/lib/x86_64-linux-gnu",
                     "/usr/lib/x86_64-linux-gnu/libz.so.1.2.13", "/usr/lib/x86_64-linux-gnu/libz.so.1"],
    "tzdata": ["/.", "/usr", "/usr/share", "/usr/share/zoneinfo", "/usr/share/zoneinfo/Etc/UTC"],
    "coreutils": ["/.", "/bin", "/bin/ls", "/bin/cat", "/usr", "/usr/bin", "/usr/bin/env", "/usr/share",
                  "/usr/share/doc"],
    "oldlib": ["/.", "/usr/lib/oldlib.so.1"],
    "broken": ["/.", "/usr/bin/broken"],
}


def dpkg_tree(root: Path, status: str = STATUS, lists: dict[str, list[str]] | None = None) -> Path:
    """A tree with /var/lib/dpkg/status and info/NAME.list files (plus an md5sums, never read)."""
    info = root / "var/lib/dpkg/info"
    info.mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(status)
    for name, paths in (LISTS if lists is None else lists).items():
        (info / f"{name}.list").write_text("".join(p + "\n" for p in paths))
    (info / "libc6:amd64.md5sums").write_text("0123  lib/x86_64-linux-gnu/libc.so.6\n")
    return root


@pytest.fixture
def db(tmp_path: Path) -> DpkgDatabase:
    found = read_database(Root(str(dpkg_tree(tmp_path / "root"))))
    assert found is not None
    return found


def test_only_installed_packages_are_read(db: DpkgDatabase) -> None:
    assert sorted(db.packages) == ["coreutils:amd64", "libc6:amd64", "libc6:i386", "tzdata:all", "zlib1g:amd64"]


def test_each_package_keeps_its_fields_and_its_stanza_verbatim(db: DpkgDatabase) -> None:
    libc = db.packages["libc6:amd64"]
    assert (libc.name, libc.architecture, libc.version, libc.key) == ("libc6", "amd64", "2.36-9+deb12u4",
                                                                       "libc6:amd64")
    assert (libc.source, libc.source_version) == ("glibc", None)
    assert libc.homepage == "https://www.gnu.org/software/libc/libc.html"
    assert libc.maintainer == "GNU Libc Maintainers <debian-glibc@lists.debian.org>"
    assert libc.stanza == LIBC6_AMD64
    zlib = db.packages["zlib1g:amd64"]
    # a binNMU: the source package's version differs from the binary's
    assert (zlib.source, zlib.source_version, zlib.version) == ("zlib", "1:1.2.13.dfsg-1", "1:1.2.13.dfsg-1+b1")
    assert zlib.homepage is None and zlib.stanza == ZLIB
    tz = db.packages["tzdata:all"]
    assert (tz.source, tz.source_version, tz.maintainer) == (None, None, None)
    assert db.packages["libc6:i386"].stanza == LIBC6_I386


def test_parse_status_keeps_continuation_lines() -> None:
    text = "\n\n" + LIBC6_AMD64 + " \n\t\n" + TZDATA + "\n\n\n"   # blank lines may hold blanks
    paragraphs = parse_status(text)
    assert [p["Package"] for p in paragraphs] == ["libc6", "tzdata"]
    libc = paragraphs[0]
    assert libc["Description"] == ("GNU C Library: Shared libraries\n Contains the standard libraries that are "
                                   "used by nearly all programs on\n the system.")
    assert libc["Conffiles"] == "\n /etc/ld.so.conf.d/x86_64-linux-gnu.conf d4e7a7b88a71b5ffd9e2644e71a0cfab"
    assert libc["Installed-Size"] == "12987" and libc["_stanza"] == LIBC6_AMD64
    assert paragraphs[1]["_stanza"] == TZDATA
    assert parse_status("") == [] and parse_status("\n \n\n") == []


@pytest.mark.parametrize("path, spellings", [
    ("/usr/lib/x86_64-linux-gnu/libc.so.6", ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"]),
    ("/lib/x86_64-linux-gnu/libc.so.6", ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6"]),
    ("/usr/lib64/ld-linux-x86-64.so.2", ["/usr/lib64/ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.2"]),
    ("/bin/ls", ["/bin/ls", "/usr/bin/ls"]),
    ("/usr/sbin/ldconfig", ["/usr/sbin/ldconfig", "/sbin/ldconfig"]),
    ("/lib32/libc.so.6", ["/lib32/libc.so.6", "/usr/lib32/libc.so.6"]),
    ("/usr/libx32/libc.so.6", ["/usr/libx32/libc.so.6", "/libx32/libc.so.6"]),
    # look alike, but not merged into /usr
    ("/usr/libexec/foo", ["/usr/libexec/foo"]),
    ("/libexec/foo", ["/libexec/foo"]),
    ("/usr/share/doc/libc6/copyright", ["/usr/share/doc/libc6/copyright"]),
    ("/usr/local/lib/libx.so", ["/usr/local/lib/libx.so"]),
    ("/etc/lib/x", ["/etc/lib/x"]),
    ("/opt/usr/lib/x", ["/opt/usr/lib/x"]),
    # the merged directories themselves are not files: one spelling
    ("/usr/lib", ["/usr/lib"]),
    ("/lib", ["/lib"]),
])
def test_merged_usr_spellings(path: str, spellings: list[str]) -> None:
    assert merged_usr_spellings(path) == spellings


def test_files_are_owned_in_either_merged_usr_spelling(db: DpkgDatabase) -> None:
    assert db.owners_of("/usr/lib/x86_64-linux-gnu/libc.so.6") == ["libc6:amd64"]
    assert db.owners_of("/lib/x86_64-linux-gnu/libc.so.6") == ["libc6:amd64"]
    assert db.owners_of("/usr/lib64/ld-linux-x86-64.so.2") == ["libc6:amd64"]
    assert db.owners_of("/lib/x86_64-linux-gnu/libz.so.1") == ["zlib1g:amd64"]
    assert db.owners_of("/usr/bin/ls") == db.owners_of("/bin/ls") == ["coreutils:amd64"]
    assert db.owners_of("/usr/share/zoneinfo/Etc/UTC") == ["tzdata:all"]
    # a file both architectures ship, and the directories everyone lists
    assert db.owners_of("/usr/share/doc/libc6/copyright") == ["libc6:amd64", "libc6:i386"]
    assert sorted(db.shared["/usr"]) == ["coreutils:amd64", "libc6:amd64", "libc6:i386", "tzdata:all",
                                         "zlib1g:amd64"]
    assert "/." not in db.owner and "/." not in db.shared


def test_lists_of_packages_that_are_not_installed_own_nothing(db: DpkgDatabase) -> None:
    for path in ("/usr/lib/oldlib.so.1", "/usr/bin/broken", "/lib/aarch64-linux-gnu/libc.so.6",
                 "/usr/lib/aarch64-linux-gnu/libc.so.6", "/srv/app/main.py"):
        assert db.owners_of(path) == [], path
    assert set(db.owner.values()) | {k for keys in db.shared.values() for k in keys} == set(db.packages)


def test_owners_maps_image_paths_to_packages(db: DpkgDatabase) -> None:
    image = ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib64/ld-linux-x86-64.so.2", "/usr/bin/ls",
             "/usr/share/doc/libc6/copyright", "/usr/lib/x86_64-linux-gnu/libz.so.1", "/srv/app/main.py",
             "/usr/lib/oldlib.so.1", "/usr/bin/ls", "/etc/ld.so.conf.d/x86_64-linux-gnu.conf"]
    result = owners(db, image)
    assert result.files == {
        "coreutils:amd64": ["/usr/bin/ls"],
        "libc6:amd64": ["/etc/ld.so.conf.d/x86_64-linux-gnu.conf", "/usr/lib/x86_64-linux-gnu/libc.so.6",
                        "/usr/lib64/ld-linux-x86-64.so.2", "/usr/share/doc/libc6/copyright"],
        "libc6:i386": ["/usr/share/doc/libc6/copyright"],
        "zlib1g:amd64": ["/usr/lib/x86_64-linux-gnu/libz.so.1"],
    }
    assert result.unowned == ["/srv/app/main.py", "/usr/lib/oldlib.so.1"]
    empty = owners(db, [])
    assert (empty.files, empty.unowned) == ({}, [])


def test_status_d_files_hold_the_stanza_of_every_owning_package(db: DpkgDatabase) -> None:
    result = owners(db, ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/share/doc/libc6/copyright",
                         "/usr/lib/x86_64-linux-gnu/libz.so.1"])
    assert status_d_files(db, result) == {
        f"{STATUS_D}/libc6:amd64": LIBC6_AMD64,     # both architectures are in the image
        f"{STATUS_D}/libc6:i386": LIBC6_I386,
        f"{STATUS_D}/zlib1g": ZLIB,
    }
    # only one libc6 kept: named as distroless names it
    one = owners(db, ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/share/zoneinfo/Etc/UTC"])
    assert status_d_files(db, one) == {f"{STATUS_D}/libc6": LIBC6_AMD64, f"{STATUS_D}/tzdata": TZDATA}
    assert STATUS_D == "/var/lib/dpkg/status.d"


def test_status_d_name_qualifies_only_a_name_kept_twice() -> None:
    amd64 = DpkgPackage("libc6", "amd64", "2.36", "s")
    i386 = DpkgPackage("libc6", "i386", "2.36", "s")
    zlib = DpkgPackage("zlib1g", "amd64", "1.2", "s")
    assert status_d_name(amd64, [amd64, zlib]) == "libc6"
    assert status_d_name(amd64, [amd64, i386, zlib]) == "libc6:amd64"
    assert status_d_name(i386, [amd64, i386]) == "libc6:i386"
    assert status_d_name(zlib, [amd64, i386, zlib]) == "zlib1g"


@pytest.mark.parametrize("native, owner", [("amd64", "foo:amd64"), ("i386", "foo:i386")])
def test_an_unqualified_list_of_a_name_installed_twice_is_the_native_architectures(
        tmp_path: Path, native: str, owner: str) -> None:
    status = ("Package: foo\nStatus: install ok installed\nArchitecture: i386\nVersion: 1\n\n"
              "Package: foo\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1\n")
    tree = dpkg_tree(tmp_path / "root", status, {"foo": ["/usr/bin/foo"]})
    db = read_database(str(tree), native_arch=native)
    assert db is not None and db.owners_of("/usr/bin/foo") == [owner]


def test_a_tree_without_dpkg_has_no_database(tmp_path: Path) -> None:
    (tmp_path / "root/etc").mkdir(parents=True)
    assert read_database(str(tmp_path / "root")) is None
    assert read_database(Root(str(tmp_path / "root"))) is None


def test_the_database_is_read_inside_the_root_only(tmp_path: Path) -> None:
    """A status file or an info directory that links out of the tree reads as missing there, even
    where the link leads to a real database on the host."""
    host = dpkg_tree(tmp_path / "host")
    linked = tmp_path / "linked"
    (linked / "var/lib/dpkg").mkdir(parents=True)
    os.symlink(host / "var/lib/dpkg/status", linked / "var/lib/dpkg/status")
    assert (linked / "var/lib/dpkg/status").read_text() == STATUS    # on the host it leads out
    assert read_database(str(linked)) is None
    # its own status, but the file lists through an absolute link and a `..` past the root
    os.remove(linked / "var/lib/dpkg/status")
    (linked / "var/lib/dpkg/status").write_text(STATUS)
    os.symlink(host / "var/lib/dpkg/info", linked / "var/lib/dpkg/info")
    db = read_database(str(linked))
    assert db is not None and len(db.packages) == 5 and db.owner == {} and db.shared == {}
    os.remove(linked / "var/lib/dpkg/info")
    os.symlink("../../../../host/var/lib/dpkg/info", linked / "var/lib/dpkg/info")
    assert (linked / "var/lib/dpkg/info/tzdata.list").exists()
    db = read_database(str(linked))
    assert db is not None and db.owners_of("/usr/share/zoneinfo/Etc/UTC") == []


def test_a_status_file_that_is_not_utf8_is_still_read(tmp_path: Path) -> None:
    tree = dpkg_tree(tmp_path / "root", lists={"zlib1g:amd64": ["/usr/lib/x86_64-linux-gnu/libz.so.1"]})
    raw = ZLIB.replace("Mark Brown", "Mark Br\udcf6wn").encode("utf-8", "surrogateescape")
    (tree / "var/lib/dpkg/status").write_bytes(raw)
    db = read_database(str(tree))
    assert db is not None and list(db.packages) == ["zlib1g:amd64"]
    assert db.packages["zlib1g:amd64"].maintainer == "Mark Br\ufffdwn <broonie@debian.org>"
    assert db.owners_of("/usr/lib/x86_64-linux-gnu/libz.so.1") == ["zlib1g:amd64"]


@pytest.mark.parametrize("state", ["triggers-pending", "triggers-awaited"])
def test_a_package_whose_triggers_are_pending_owns_its_files(tmp_path: Path, state: str) -> None:
    status = f"Package: man-db\nStatus: install ok {state}\nArchitecture: amd64\nVersion: 2.11.2-2\n"
    tree = dpkg_tree(tmp_path / "root", status, {"man-db": ["/usr/bin/man"]})
    db = read_database(str(tree))
    assert db is not None and db.owners_of("/usr/bin/man") == ["man-db:amd64"]


@pytest.mark.skipif(shutil.which("dpkg-query") is None or not os.path.exists("/var/lib/dpkg/status"),
                    reason="needs dpkg on this machine")
def test_this_machines_database_agrees_with_dpkg_query() -> None:
    """Installed packages, their versions and their source packages as dpkg itself reports them."""
    out = subprocess.run(["dpkg-query", "-W", "-f",
                          "${db:Status-Abbrev}|${Package}|${Architecture}|${Version}|${source:Package}|"
                          "${source:Version}\n"], capture_output=True, text=True, timeout=60, check=True).stdout
    want = {}
    for line in out.splitlines():
        abbrev, name, arch, version, source, source_version = line.split("|")
        if abbrev[1:2] == "i":     # the second letter is the state: i = installed
            want[f"{name}:{arch}"] = (version, source, source_version)
    db = read_database("/")
    assert db is not None and want
    assert {key: (p.version, p.source or p.name, p.source_version or p.version)
            for key, p in db.packages.items()} == want


# --- the parsed database, cached by the version of its files ---------------------------------------

import marshal  # noqa: E402

from tracejail import dpkg  # noqa: E402


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRACEJAIL_CACHE_DIR", str(cache))
    return cache


def cached_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("dpkg-*.marshal"))


def test_a_database_is_parsed_once_per_version_of_its_files(tmp_path: Path, private_cache: Path) -> None:
    tree = Root(str(dpkg_tree(tmp_path / "root")))
    first = read_database(tree)
    (stored,) = cached_files(private_cache)
    # What the cache holds is what the next read returns: made visible by editing it.
    packages, shards, shared = marshal.loads(stored.read_bytes())
    stored.write_bytes(marshal.dumps((packages, {**shards, "/opt": marshal.dumps({"marker": "zlib1g:amd64"})},
                                      shared)))
    again = read_database(tree)
    assert again is not None and first is not None and again.packages == first.packages
    assert again.owners_of("/opt/marker") == ["zlib1g:amd64"]
    # A file list that changes is a new version: parsed again.
    with open(tmp_path / "root/var/lib/dpkg/info/zlib1g:amd64.list", "a") as f:
        f.write("/usr/lib/x86_64-linux-gnu/libz.so.9\n")
    changed = read_database(tree)
    assert changed is not None and changed.owners_of("/opt/marker") == []
    assert changed.owners_of("/usr/lib/x86_64-linux-gnu/libz.so.9") == ["zlib1g:amd64"]
    # So is a new list, and a status file rewritten.
    (tmp_path / "root/var/lib/dpkg/info/tzdata.list").write_text("/usr/share/zoneinfo/UTC\n")
    assert read_database(tree).owners_of("/usr/share/zoneinfo/UTC") == ["tzdata:all"]   # type: ignore[union-attr]
    (tmp_path / "root/var/lib/dpkg/status").write_text(TZDATA)
    assert sorted(read_database(tree).packages) == ["tzdata:all"]   # type: ignore[union-attr]


def test_a_corrupt_cached_database_is_parsed_again(tmp_path: Path, private_cache: Path) -> None:
    tree = Root(str(dpkg_tree(tmp_path / "root")))
    first = read_database(tree)
    (stored,) = cached_files(private_cache)
    stored.write_bytes(b"\x00not marshal")
    again = read_database(tree)
    assert again is not None and first is not None and again.owner == first.owner


def test_no_cache_when_caching_is_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACEJAIL_CACHE_DIR", "")
    assert read_database(Root(str(dpkg_tree(tmp_path / "root")))) is not None
    assert list(tmp_path.rglob("dpkg-*.marshal")) == []


def test_a_few_databases_are_kept(tmp_path: Path, private_cache: Path) -> None:
    for n in range(dpkg._CACHE_KEEP + 3):
        assert read_database(Root(str(dpkg_tree(tmp_path / f"root{n}")))) is not None
    assert len(cached_files(private_cache)) == dpkg._CACHE_KEEP


def test_a_cached_database_answers_as_the_parsed_one(tmp_path: Path, private_cache: Path) -> None:
    tree = Root(str(dpkg_tree(tmp_path / "root")))
    parsed = read_database(tree)
    cached = read_database(tree)
    assert parsed is not None and cached is not None
    assert isinstance(parsed.owner, dict) and isinstance(cached.owner, dpkg.ShardedOwners)
    assert dict(cached.owner) == parsed.owner and len(cached.owner) == len(parsed.owner)
    for path in [*parsed.owner, *parsed.shared, "/usr/bin/none", "/nowhere/x", "/", ""]:
        assert cached.owners_of(path) == parsed.owners_of(path), path
        assert (path in cached.owner) == (path in parsed.owner)


def test_a_damaged_directory_of_a_cached_database_is_one_line(tmp_path: Path, private_cache: Path) -> None:
    tree = Root(str(dpkg_tree(tmp_path / "root")))
    read_database(tree)
    (stored,) = cached_files(private_cache)
    packages, shards, shared = marshal.loads(stored.read_bytes())
    stored.write_bytes(marshal.dumps((packages, {**shards, "/usr/bin": b"\x00junk"}, shared)))
    db = read_database(tree)
    assert db is not None and db.owners_of("/usr/share/zoneinfo/Etc/UTC") == ["tzdata:all"]
    with pytest.raises(TracejailError, match=r"cached dpkg database .*dpkg-.*\.marshal is damaged; remove it"):
        db.owners_of("/usr/bin/ls")
