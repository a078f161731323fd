"""Package metadata in the image (dpkg status.d, os-release, dist-info), `--provenance`, and the
SBOM (SPDX 2.3 validated against the vendored schema; CycloneDX 1.5 checked structurally)."""
from __future__ import annotations

import email.parser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

import workloads as wl
from tracejail import build as tjbuild
from tracejail import dpkg, sbom
from tracejail import provenance as prov

TJ = [sys.executable, "-m", "tracejail"]
SCHEMA = Path(__file__).parent / "data" / "spdx-2.3-schema.json"
HAS_DPKG = os.path.exists("/var/lib/dpkg/status") and shutil.which("dpkg-query") is not None
needs_dpkg = pytest.mark.skipif(not HAS_DPKG, reason="not a dpkg-based host")


def record(out: Path, w: wl.Workload) -> Path:
    proc = subprocess.run([*TJ, "record", "-o", str(out), "--", *w.command], cwd=w.dir,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def build(trace: Path, out: Path, **opts) -> tjbuild.BuildResult:
    return tjbuild.build(str(trace), tjbuild.BuildOptions(rootfs_dir=str(out / "rootfs"), load=False, **opts))


@pytest.fixture(scope="module")
def shell_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record(tmp_path_factory.mktemp("sh") / "trace.json", wl.get_workload("shell-pipeline"))


@pytest.fixture(scope="module")
def shell_build(shell_trace: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tjbuild.BuildResult]:
    out = tmp_path_factory.mktemp("sh-build")
    result = build(shell_trace, out, provenance=True, sbom=str(out / "sbom.spdx.json"))
    return out, result


def dpkg_query_owners(paths: list[str]) -> set[str]:
    """Independent check: what `dpkg-query -S` says owns these paths (both /usr spellings)."""
    spellings = sorted({s for p in paths for s in dpkg.merged_usr_spellings(p)})
    proc = subprocess.run(["dpkg-query", "-S", *spellings], capture_output=True, text=True)
    owners: set[str] = set()
    for line in proc.stdout.splitlines():
        if line.startswith("diversion by"):
            continue
        pkgs, _, path = line.partition(": ")
        if path in spellings:
            owners.update(p.strip().split(":")[0] for p in pkgs.split(","))
    return owners


# --- dpkg metadata --------------------------------------------------------------------------


@needs_dpkg
def test_status_d_names_the_right_packages_and_versions(shell_build: tuple[Path, tjbuild.BuildResult]) -> None:
    out, _ = shell_build
    root = out / "rootfs"
    status_d = root / "var/lib/dpkg/status.d"
    names = sorted(os.listdir(status_d))
    assert {"dash", "coreutils", "grep", "libc6"} <= set(names), names
    for name in names:
        stanza = dpkg.parse_status((status_d / name).read_text())
        assert len(stanza) == 1 and stanza[0]["Package"] == name
        want = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name], capture_output=True,
                              text=True, check=True).stdout
        assert stanza[0]["Version"] == want, name
        assert stanza[0]["Status"] == "install ok installed"
    # exactly the packages dpkg itself says own the image's host files
    host_files = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, n)
            image_path = "/" + os.path.relpath(full, root)
            if os.path.islink(full) and os.path.isdir(image_path):
                continue   # /lib -> usr/lib: every package "owns" a directory
            generated = ("/var/lib/dpkg/status.d/", "/.tracejail/", "/etc/os-release", "/etc/passwd", "/etc/group")
            if image_path.startswith(generated) or not os.path.lexists(image_path):
                continue
            host_files.append(image_path)
    assert set(names) == dpkg_query_owners(host_files)
    # scanners need the distribution too
    assert (root / "etc/os-release").read_bytes() == Path("/etc/os-release").read_bytes()


@needs_dpkg
def test_no_package_metadata_flag(shell_trace: Path, tmp_path: Path) -> None:
    proc = subprocess.run([*TJ, "build", str(shell_trace), "--rootfs", str(tmp_path / "r"), "--no-load",
                           "--no-package-metadata", "-o", str(tmp_path / "i.tar")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "r/var/lib/dpkg").exists()
    assert not (tmp_path / "r/.tracejail").exists()          # provenance is off by default
    assert "package metadata" not in proc.stderr


def test_merged_usr_spellings() -> None:
    assert dpkg.merged_usr_spellings("/usr/lib/x86_64-linux-gnu/libc.so.6") == [
        "/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"]
    assert dpkg.merged_usr_spellings("/bin/sh") == ["/bin/sh", "/usr/bin/sh"]
    assert dpkg.merged_usr_spellings("/usr/share/doc/x") == ["/usr/share/doc/x"]
    assert dpkg.merged_usr_spellings("/usr/lib64") == ["/usr/lib64"]


def test_read_database_from_a_fake_root(tmp_path: Path) -> None:
    info = tmp_path / "var/lib/dpkg/info"
    info.mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/status").write_text(
        "Package: libfoo1\nStatus: install ok installed\nArchitecture: amd64\nMulti-Arch: same\n"
        "Source: foo (1.0-1)\nVersion: 1.0-1+b1\nDescription: foo\n long text\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nArchitecture: all\nVersion: 2\n\n"
        "Package: tool\nStatus: install ok installed\nArchitecture: amd64\nVersion: 3\n")
    (info / "libfoo1:amd64.list").write_text("/.\n/lib\n/lib/x86_64-linux-gnu/libfoo.so.1\n")
    (info / "tool.list").write_text("/usr/bin/tool\n")
    (info / "gone.list").write_text("/etc/gone.conf\n")
    db = dpkg.read_database(str(tmp_path))
    assert db is not None and sorted(db.packages) == ["libfoo1:amd64", "tool:amd64"]
    foo = db.packages["libfoo1:amd64"]
    assert (foo.source, foo.source_version, foo.version) == ("foo", "1.0-1", "1.0-1+b1")
    assert foo.stanza.endswith("long text\n")
    own = dpkg.owners(db, ["/usr/lib/x86_64-linux-gnu/libfoo.so.1", "/usr/bin/tool", "/etc/gone.conf"])
    assert own.files == {"libfoo1:amd64": ["/usr/lib/x86_64-linux-gnu/libfoo.so.1"], "tool:amd64": ["/usr/bin/tool"]}
    assert own.unowned == ["/etc/gone.conf"]
    files = dpkg.status_d_files(db, own)
    assert sorted(files) == ["/var/lib/dpkg/status.d/libfoo1", "/var/lib/dpkg/status.d/tool"]
    assert files["/var/lib/dpkg/status.d/tool"].startswith("Package: tool\n")
    (tmp_path / "nothing").mkdir()
    assert dpkg.read_database(str(tmp_path / "nothing")) is None


# --- provenance in the image ----------------------------------------------------------------


def test_provenance_file_in_image(shell_build: tuple[Path, tjbuild.BuildResult]) -> None:
    out, result = shell_build
    root = out / "rootfs"
    doc = json.loads((root / ".tracejail/provenance.json").read_text())
    assert doc["format"] == prov.FORMAT and doc["trace_digest"].startswith("sha256:")
    staged = {"/" + os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}
    missing = sorted(p for p in staged if p not in doc["entries"])
    assert not missing, missing
    grep = doc["entries"]["/usr/bin/grep"]
    traced = next(r for r in grep["reasons"] if r["kind"] == "traced")
    assert "exec" in traced["access"] and all(str(p) in doc["processes"] for p in traced["pids"])
    assert doc["entries"]["/etc/passwd"]["reasons"][-1]["kind"] == prov.GENERATED
    if HAS_DPKG:
        assert doc["entries"]["/var/lib/dpkg/status.d/dash"]["reasons"][0]["kind"] == prov.GENERATED
    # the build result carries the same provenance for every staged entry
    assert set(result.metadata.provenance.entries) >= staged


# --- Python metadata ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def numpy_build(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> tuple[Path, tjbuild.BuildResult]:
    w = wl.get_workload("numpy-venv")
    try:
        wl.prepare(w, cache_dir=Path(pytestconfig.cache.mkdir("tracejail-venvs")))
    except RuntimeError as exc:
        pytest.skip(f"numpy-venv could not be prepared: {str(exc).splitlines()[0]}")
    out = tmp_path_factory.mktemp("np")
    trace = record(out / "trace.json", w)
    return out, build(trace, out, sbom=str(out / "bom.cdx.json"), sbom_format="cyclonedx")


def test_kept_distribution_keeps_its_dist_info(numpy_build: tuple[Path, tjbuild.BuildResult]) -> None:
    out, result = numpy_build
    site = wl.get_workload("numpy-venv").dir / ".venv"
    [dist_info] = sorted(site.glob("lib/python3*/site-packages/numpy-*.dist-info"))
    staged = out / "rootfs" / str(dist_info).lstrip("/")
    for name in ("METADATA", "RECORD", "WHEEL"):
        assert (staged / name).read_bytes() == (dist_info / name).read_bytes()
    if (dist_info / "entry_points.txt").exists():
        assert (staged / "entry_points.txt").exists()
    meta = email.parser.Parser().parse(open(dist_info / "METADATA"), headersonly=True)
    pkgs = [p for p in result.metadata.packages if p.ecosystem == "pypi" and p.name == "numpy"]
    assert pkgs and pkgs[0].version == meta["Version"]
    assert pkgs[0].purl == f"pkg:pypi/numpy@{meta['Version']}"
    assert any(f.endswith("_multiarray_umath.cpython-311-x86_64-linux-gnu.so") or "_multiarray_umath" in f
               for f in pkgs[0].files)
    if meta.get("License-Expression"):
        assert pkgs[0].license == sbom.check_expression(meta["License-Expression"])


def test_cyclonedx_document(numpy_build: tuple[Path, tjbuild.BuildResult]) -> None:
    out, result = numpy_build
    doc = json.loads((out / "bom.cdx.json").read_text())
    assert (doc["bomFormat"], doc["specVersion"], doc["version"]) == ("CycloneDX", "1.5", 1)
    assert re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", doc["serialNumber"])
    libs = [c for c in doc["components"] if c["type"] == "library"]
    files = [c for c in doc["components"] if c["type"] == "file"]
    refs = [c["bom-ref"] for c in doc["components"]]
    assert len(refs) == len(set(refs))
    assert any(c["purl"].startswith("pkg:pypi/numpy@") for c in libs)
    if HAS_DPKG:
        assert any(c["purl"].startswith("pkg:deb/") and c["name"] == "libc6" for c in libs)
    one = next(f for f in files if f["name"].endswith("/METADATA"))
    content = (out / "rootfs" / one["name"].lstrip("/")).read_bytes()
    assert {"alg": "SHA-256", "content": hashlib.sha256(content).hexdigest()} in one["hashes"]
    assert doc["dependencies"][0]["ref"] == "image"
    assert set(doc["dependencies"][0]["dependsOn"]) == {c["bom-ref"] for c in libs}


# --- SPDX -----------------------------------------------------------------------------------


def test_spdx_document_validates_against_the_schema(shell_build: tuple[Path, tjbuild.BuildResult]) -> None:
    out, _ = shell_build
    doc = json.loads((out / "sbom.spdx.json").read_text())
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.validators.validator_for(schema)(schema).validate(doc)
    # what the 2.3 schema leaves to the spec's prose
    assert doc["spdxVersion"] == "SPDX-2.3" and doc["dataLicense"] == "CC0-1.0"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["creationInfo"]["created"])
    assert doc["documentNamespace"].startswith("https://") and "#" not in doc["documentNamespace"]
    ids = [e["SPDXID"] for e in doc["packages"] + doc["files"]]
    assert len(ids) == len(set(ids)) and all(re.fullmatch(r"SPDXRef-[A-Za-z0-9.-]+", i) for i in ids)
    known = set(ids) | {"SPDXRef-DOCUMENT"}
    for rel in doc["relationships"]:
        assert rel["spdxElementId"] in known and rel["relatedSpdxElement"] in known
    for f in doc["files"]:
        algos = {c["algorithm"] for c in f["checksums"]}
        assert {"SHA1", "SHA256"} <= algos
        content = (out / "rootfs" / f["fileName"][2:]).read_bytes()   # "./usr/..."
        assert {"algorithm": "SHA256", "checksumValue": hashlib.sha256(content).hexdigest()} in f["checksums"]
    for p in doc["packages"]:
        assert p["licenseDeclared"] == "NOASSERTION" or sbom.check_expression(p["licenseDeclared"])
    if HAS_DPKG:
        by_name = {p["name"]: p for p in doc["packages"]}
        dash = by_name["dash"]
        want = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "dash"], capture_output=True,
                              text=True, check=True).stdout
        assert dash["versionInfo"] == want
        assert dash["externalRefs"][0]["referenceLocator"].startswith("pkg:deb/")
        # dash's files are CONTAINed by dash, and /usr/bin/dash is one of them
        dash_files = {r["relatedSpdxElement"] for r in doc["relationships"]
                      if r["spdxElementId"] == dash["SPDXID"] and r["relationshipType"] == "CONTAINS"}
        names = {f["SPDXID"]: f["fileName"] for f in doc["files"]}
        assert "./usr/bin/dash" in {names[i] for i in dash_files}


def test_spdx_schema_catches_a_broken_document() -> None:
    """The vendored schema really is the checker: a document missing required fields fails."""
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    good = sbom.spdx_document("x", [], [sbom.FileDigest("/a", "0" * 40, "0" * 64, 1)], "2024-01-01T00:00:00Z")
    jsonschema.validators.validator_for(schema)(schema).validate(good)
    bad = dict(good)
    del bad["documentNamespace"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validators.validator_for(schema)(schema).validate(bad)
    bad = json.loads(json.dumps(good))
    bad["files"][0]["checksums"] = []
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validators.validator_for(schema)(schema).validate(bad)


def test_sbom_cli_flags(shell_trace: Path, tmp_path: Path) -> None:
    proc = subprocess.run([*TJ, "build", str(shell_trace), "-o", str(tmp_path / "i.tar"), "--no-load",
                           "--sbom", str(tmp_path / "s.json"), "--sbom-format", "cyclonedx"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "s.json").read_text())["bomFormat"] == "CycloneDX"
    assert "SBOM (cyclonedx)" in proc.stdout
    bad = subprocess.run([*TJ, "build", str(shell_trace), "--sbom-format", "xml"], capture_output=True, text=True)
    assert bad.returncode == 2


# --- licenses -------------------------------------------------------------------------------


def test_license_parsing() -> None:
    dep5 = ("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
            "Files: *\nCopyright: someone\nLicense: GPL-2+ or Artistic\n\n"
            "Files: lib/*\nLicense: BSD-3-clause\n")
    assert sbom.debian_license(dep5) == ("GPL-2.0-or-later OR Artistic-1.0", "GPL-2+ or Artistic")
    assert sbom.debian_license("This is free software, see GPL.\n") == (None, None)
    odd = dep5.replace("GPL-2+ or Artistic", "GPL-3+ with GCC-Runtime exception")
    assert sbom.debian_license(odd)[0] is None
    assert sbom.check_expression("BSD-3-Clause AND (MIT OR Apache-2.0)") == "BSD-3-Clause AND (MIT OR Apache-2.0)"
    assert sbom.check_expression("GPL-3.0-or-later WITH GCC-exception-3.1") is not None
    assert sbom.check_expression("MIT AND") is None
    assert sbom.check_expression("LicenseRef-foo") is None
    meta = email.parser.Parser().parsestr(
        "Name: x\nVersion: 1\nClassifier: License :: OSI Approved :: MIT License\n", headersonly=True)
    assert sbom.python_license(meta) == ("MIT", "MIT License")
    meta = email.parser.Parser().parsestr(
        "Name: x\nVersion: 1\nClassifier: License :: OSI Approved :: BSD License\n", headersonly=True)
    assert sbom.python_license(meta) == (None, "BSD License")
    assert sbom.purl_deb("debian", "libc6", "2.36-9+deb12u4", "amd64", "12") == \
        "pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=amd64&distro=debian-12"
    assert sbom.purl_pypi("Flask_Login", "0.6.3") == "pkg:pypi/flask-login@0.6.3"
