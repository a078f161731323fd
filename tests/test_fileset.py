"""fileset: every candidate is judged by what it reaches. Crafted traces against real trees.

Each attack route of a hostile trace is tried against a tree of real files and symlinks (a root
of the test's own, and the real host where the test runs as root), then built: the secret's bytes
must appear in no output, and its mode must not be opened up.
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from tracejail import build as tjbuild
from tracejail import fileset
from tracejail import trace as tr
from tracejail.fileset import SENSITIVE_RULE
from tracejail.root import Root

SECRET = b"root:$6$SECRET-HASH-DO-NOT-SHIP:19000:0:99999:7:::\n"


def crafted(*paths: str, kind: str = "read") -> tr.Trace:
    """A trace someone else made: one run of /bin/true that claims to have read `paths`."""
    run = tr.Run(argv=["/bin/true"], executable="/bin/true", cwd="/", uid=0, gid=0, environment={},
                 started="2026-11-29T00:00:00Z", exit_code=0)
    trace = tr.Trace(runs=[run])
    for p in paths:
        trace.record(p).add(kind, "openat", "ok", 1)
    return trace


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """An image-like root with a shadow file, an app whose links lead to it, and /var/run."""
    t = tmp_path / "root"
    (t / "etc").mkdir(parents=True)
    (t / "etc/shadow").write_bytes(SECRET)
    (t / "etc/shadow").chmod(0o600)
    (t / "etc/hostname").write_text("box\n")
    (t / "srv/app/links").mkdir(parents=True)
    os.symlink("/etc", t / "srv/app/links/etc")
    os.symlink("/etc/shadow", t / "srv/app/sh")
    os.symlink("../../etc/shadow", t / "srv/app/rel")
    (t / "srv/app/main.py").write_text("print('hi')\n")
    (t / "run/secrets/kubernetes.io").mkdir(parents=True)
    (t / "run/secrets/kubernetes.io/token").write_text("eyJ-token")
    (t / "var").mkdir()
    os.symlink("/run", t / "var/run")
    return t


def build_in(tree: Path, trace: tr.Trace, out: Path, **opts) -> tjbuild.BuildResult:
    path = out / "trace.json"
    out.mkdir(exist_ok=True)
    tr.save(trace, str(path))
    return tjbuild.build(str(path), tjbuild.BuildOptions(
        output=str(out / "image.tar"), rootfs_dir=str(out / "rootfs"), root=str(tree), load=False,
        compress_level=None, **opts))


def assert_no_secret(out: Path, secret: bytes) -> None:
    assert secret not in (out / "image.tar").read_bytes()
    for dirpath, _dirs, files in os.walk(out / "rootfs"):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                with open(p, "rb") as f:
                    assert secret not in f.read(), p


@pytest.mark.parametrize("spelled", ["/srv/app/links/etc/shadow", "/srv/app/sh", "/srv/app/rel",
                                     "/srv/app/links/etc/../etc/shadow", "/srv/app/../../etc/shadow"])
def test_a_credential_reached_through_any_spelling_is_left_out(tree: Path, tmp_path: Path, spelled: str) -> None:
    trace = crafted(spelled, "/srv/app/main.py")
    root = Root(str(tree))
    fs = fileset.select(trace, root=root)
    assert not any(root.resolve(p).path == "/etc/shadow" for p in fs.wanted)
    assert (root.normalize(spelled)[0], SENSITIVE_RULE) in fs.excluded
    result = build_in(tree, trace, tmp_path / "out")
    assert "/etc/shadow" not in result.plan.entries
    assert not any(m[0] == "/etc/shadow" for m in result.plan.mode_changes)
    assert_no_secret(tmp_path / "out", SECRET)
    assert (tree / "etc/shadow").stat().st_mode & 0o777 == 0o600


def test_only_an_include_of_the_real_path_keeps_a_credential(tree: Path, tmp_path: Path) -> None:
    trace = crafted("/srv/app/sh")
    root = Root(str(tree))
    assert "/srv/app/sh" not in fileset.select(trace, fileset.SelectOptions(include=("/srv/app/sh",)), root).wanted
    assert "/srv/app/sh" not in fileset.select(trace, fileset.SelectOptions(include=("/etc",)), root).wanted
    kept = fileset.select(trace, fileset.SelectOptions(include=("/etc/shadow",)), root)
    assert "/srv/app/sh" in kept.wanted and "/etc/shadow" in kept.wanted
    result = build_in(tree, trace, tmp_path / "out", include=["/etc/shadow"])
    # kept as asked, but never opened up to the image user
    assert result.plan.entries["/etc/shadow"].mode == 0o600
    assert not any(m[0] == "/etc/shadow" for m in result.plan.mode_changes)


def test_a_key_written_into_a_file_kept_before_is_found_again(tree: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The key scan is remembered between builds by the file's identity: a file that held no key
    and now holds one (same size, same mtime: ctime still moves) is scanned again."""
    monkeypatch.setenv("TRACEJAIL_CACHE_DIR", str(tmp_path / "cache"))
    notes = tree / "srv/app/notes.txt"
    key = (b"-----BEGIN OPENSSH PRIVATE KEY-----\n" + base64.encodebytes(os.urandom(400))
           + b"-----END OPENSSH PRIVATE KEY-----\n")
    notes.write_bytes(b"x" * len(key))
    before = os.stat(notes)
    trace = crafted("/srv/app/notes.txt", "/srv/app/main.py")
    assert "/srv/app/notes.txt" in build_in(tree, trace, tmp_path / "out").plan.entries
    cached = {slot: v for shard in (tmp_path / "cache").glob("pyimports-*/*.json")
              for slot, v in json.loads(shard.read_text()).items()}
    assert cached["notes.txt\0private-key"][1] == []   # (identity, no key found)
    notes.write_bytes(key)
    os.utime(notes, ns=(before.st_atime_ns, before.st_mtime_ns))
    result = build_in(tree, trace, tmp_path / "out2")
    assert dict(result.files.excluded)["/srv/app/notes.txt"].startswith("holds a PEM OPENSSH PRIVATE KEY")
    assert "/srv/app/notes.txt" not in result.plan.entries


def test_var_run_is_the_runtimes_whatever_the_spelling(tree: Path, tmp_path: Path) -> None:
    os.symlink("/var/run/secrets", tree / "srv/app/k8s")
    trace = crafted("/var/run/secrets/kubernetes.io/token", "/run/secrets/kubernetes.io/token",
                    "/srv/app/k8s/kubernetes.io/token")
    result = build_in(tree, trace, tmp_path / "out")
    assert not any(p == "/run" or p.startswith("/run/") for p in result.plan.entries)
    assert_no_secret(tmp_path / "out", b"eyJ-token")
    # the link itself is kept: in Kubernetes the runtime mounts what it points to
    assert result.plan.entries["/srv/app/k8s"].kind == "symlink"


def test_private_key_in_a_file_with_any_name_is_left_out(tree: Path, tmp_path: Path) -> None:
    key = (b"-----BEGIN OPENSSH PRIVATE KEY-----\n" + base64.encodebytes(os.urandom(400))
           + b"-----END OPENSSH PRIVATE KEY-----\n")
    (tree / "srv/app/deploy_key_backup.txt").write_bytes(b"backup of the deploy key:\n" + key)
    os.symlink("deploy_key_backup.txt", tree / "srv/app/notes")
    trace = crafted("/srv/app/deploy_key_backup.txt", "/srv/app/notes", "/srv/app/main.py")
    result = build_in(tree, trace, tmp_path / "out")
    rules = dict(result.files.excluded)
    assert rules["/srv/app/deploy_key_backup.txt"].startswith("holds a PEM OPENSSH PRIVATE KEY")
    assert "/srv/app/notes" in rules
    assert "/srv/app/deploy_key_backup.txt" not in result.plan.entries
    assert_no_secret(tmp_path / "out", key[40:80])
    assert "/srv/app/main.py" in result.plan.entries
    summary = result.summary()
    assert any(r.startswith("holds a PEM OPENSSH PRIVATE KEY") for r in summary["left_out"])
    # --include of its real path keeps it, with its mode untouched (0600: root only)
    (tree / "srv/app/deploy_key_backup.txt").chmod(0o600)
    kept = build_in(tree, trace, tmp_path / "out2", include=["/srv/app/deploy_key_backup.txt"])
    assert kept.plan.entries["/srv/app/deploy_key_backup.txt"].mode == 0o600
    assert "/srv/app/deploy_key_backup.txt" not in [m[0] for m in kept.plan.mode_changes]


def test_closure_and_companions_are_judged_too(tree: Path, tmp_path: Path) -> None:
    """A kept .pyc brings its .py along; a .py that is a link to a credential stays out."""
    (tree / "srv/app/__pycache__").mkdir()
    (tree / "srv/app/__pycache__/mod.cpython-311.pyc").write_bytes(b"\x00" * 16)
    os.symlink("/etc/shadow", tree / "srv/app/mod.py")
    fs = fileset.select(crafted("/srv/app/__pycache__/mod.cpython-311.pyc"), root=Root(str(tree)))
    assert "/srv/app/mod.py" not in fs.wanted
    assert ("/srv/app/mod.py", SENSITIVE_RULE) in fs.excluded


@pytest.mark.skipif(os.geteuid() != 0 or not os.access("/etc/shadow", os.R_OK),
                    reason="needs root: the host's real /etc/shadow is the secret here")
def test_the_hosts_shadow_through_a_symlinked_directory(tmp_path: Path) -> None:
    app = tmp_path / "srv/app"
    (app / "links").mkdir(parents=True)
    os.symlink("/etc", app / "links/etc")
    os.symlink("/etc/shadow", app / "sh")
    trace = crafted(f"{app}/links/etc/shadow", f"{app}/sh", "/etc/hostname")
    result = build_in(Path("/"), trace, tmp_path / "out")
    assert "/etc/shadow" not in result.plan.entries
    with open("/etc/shadow", "rb") as f:
        assert_no_secret(tmp_path / "out", f.read())


def test_what_the_run_created_is_left_out_but_the_directory_it_was_made_in_is_kept(tmp_path: Path) -> None:
    t = tmp_path / "root"
    (t / "srv/app/site/css").mkdir(parents=True)       # as the host holds it after the run
    (t / "srv/app/site/css/a.css").write_text("x")
    (t / "srv/app/old").mkdir()
    trace = crafted()
    for path in ("/srv/app/site", "/srv/app/site/css", "/srv/app/site/css/a.css"):
        rec = trace.record(path)
        rec.add("write", "mkdir" if not path.endswith(".css") else "openat", "ok", 1)
        rec.created_by_run = True
    gone = trace.record("/srv/app/old/x.tmp")
    gone.add("write", "unlinkat", "ok", 1)
    gone.removed_by_run = True
    files = fileset.select(trace, fileset.SelectOptions(), Root(str(t)))
    assert not any(p.startswith("/srv/app/site") for p in files.wanted)
    # the nearest directory the run did not make itself, and the one it removed a file from
    made = fileset.Reason(fileset.Kind.RUN_DIRECTORY, path="/srv/app/site")
    assert made in files.wanted["/srv/app"]
    assert "/srv/app" in files.dirs_only
    assert files.wanted["/srv/app/old"] == [fileset.Reason(fileset.Kind.RUN_DIRECTORY, path="/srv/app/old/x.tmp",
                                                           removed=True)]


def test_dist_info_follows_its_record_and_a_changed_record_is_read_again(tmp_path: Path) -> None:
    """A distribution's metadata is kept when its RECORD names a kept module; the RECORD's top
    names are remembered by the file's identity, so an edited RECORD is read again."""
    t = tmp_path / "root"
    site = t / "opt/app/lib/python3.11/site-packages"
    (site / "foo").mkdir(parents=True)
    (site / "foo/__init__.py").write_text("X = 1\n")
    dist = site / "foo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: foo\nVersion: 1.0\n")
    (dist / "RECORD").write_text("foo/__init__.py,,\nfoo-1.0.dist-info/METADATA,,\n")
    trace = crafted("/opt/app/lib/python3.11/site-packages/foo/__init__.py")
    meta = "/opt/app/lib/python3.11/site-packages/foo-1.0.dist-info/METADATA"
    options = fileset.SelectOptions(import_closure=False)
    for _ in range(2):   # the second time from the cache
        assert meta in fileset.select(trace, options, Root(str(t))).wanted
    from tracejail import pyimports

    if pyimports.default_cache_dir():
        record = "/opt/app/lib/python3.11/site-packages/foo-1.0.dist-info/RECORD"
        key = pyimports.ParseCache.key(str(t), record, os.stat(t / record.lstrip("/")), "record-tops")
        assert pyimports.ParseCache(pyimports.default_cache_dir()).get_names(key) == ["foo"]
    (dist / "RECORD").write_text("bar/__init__.py,,\nfoo-1.0.dist-info/METADATA,,\n")
    assert meta not in fileset.select(trace, options, Root(str(t))).wanted
