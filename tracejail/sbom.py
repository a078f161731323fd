"""Software bill of materials for an image: SPDX 2.3 JSON or CycloneDX 1.5 JSON.

Packages come from two places: dpkg packages that own at least one kept file (dpkg.py) and
Python distributions whose ``*.dist-info`` the image keeps (fileset.py keeps the whole folder
of every kept distribution). Files are every regular file of the plan, with SHA-1 (SPDX 2.3
still asks for it) and SHA-256. Licenses are given as SPDX expressions only when every part
is a known SPDX identifier; otherwise the declared text goes into a comment and the expression
is NOASSERTION, which is what a validator accepts and what a reader can trust.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable
from urllib.parse import quote

from tracejail import __version__
from tracejail import dpkg as dpkg_mod
from tracejail import rootfs
from tracejail.errors import TracejailError
from tracejail.root import NodeKind, Root

if TYPE_CHECKING:
    import email.message
    import uuid

FORMATS = ("spdx", "cyclonedx")

# SPDX license identifiers that packages here commonly declare (a subset of the SPDX list).
KNOWN_SPDX_IDS = frozenset("""
0BSD AFL-2.1 AGPL-3.0-only AGPL-3.0-or-later Apache-1.1 Apache-2.0 APSL-2.0 Artistic-1.0
Artistic-1.0-Perl Artistic-2.0 Beerware BSD-1-Clause BSD-2-Clause BSD-2-Clause-Patent
BSD-3-Clause BSD-3-Clause-Clear BSD-4-Clause BSD-4-Clause-UC BSL-1.0 bzip2-1.0.6 CC-BY-3.0
CC-BY-4.0 CC-BY-SA-3.0 CC-BY-SA-4.0 CC0-1.0 CDDL-1.0 CECILL-2.1 curl ECL-2.0 EPL-1.0 EPL-2.0
EUPL-1.2 FSFAP FSFUL FSFULLR FTL GFDL-1.2-or-later GFDL-1.3-only GFDL-1.3-or-later GPL-1.0-only
GPL-1.0-or-later GPL-2.0-only GPL-2.0-or-later GPL-3.0-only GPL-3.0-or-later HPND ICU IJG
Info-ZIP ISC LGPL-2.0-only LGPL-2.0-or-later LGPL-2.1-only LGPL-2.1-or-later LGPL-3.0-only
LGPL-3.0-or-later libpng-2.0 Libpng LPPL-1.3c MIT MIT-0 MIT-CMU MPL-1.1 MPL-2.0 NCSA OFL-1.1
OpenSSL PHP-3.01 PostgreSQL PSF-2.0 Python-2.0 Ruby Sleepycat Unicode-3.0 Unicode-DFS-2016
Unlicense UPL-1.0 W3C WTFPL X11 Zlib ZPL-2.1
""".split())
KNOWN_EXCEPTIONS = frozenset({"GCC-exception-3.1", "GCC-exception-2.0", "Classpath-exception-2.0",
                              "LLVM-exception", "Autoconf-exception-3.0", "Bison-exception-2.2",
                              "OpenSSL-exception", "Font-exception-2.0"})
_KNOWN_LOWER = {i.lower(): i for i in KNOWN_SPDX_IDS}

# Debian copyright-format short names (DEP-5) -> SPDX identifiers.
DEBIAN_LICENSES = {
    "gpl-1": "GPL-1.0-only", "gpl-1+": "GPL-1.0-or-later", "gpl-2": "GPL-2.0-only",
    "gpl-2+": "GPL-2.0-or-later", "gpl-3": "GPL-3.0-only", "gpl-3+": "GPL-3.0-or-later",
    "lgpl-2": "LGPL-2.0-only", "lgpl-2+": "LGPL-2.0-or-later", "lgpl-2.1": "LGPL-2.1-only",
    "lgpl-2.1+": "LGPL-2.1-or-later", "lgpl-3": "LGPL-3.0-only", "lgpl-3+": "LGPL-3.0-or-later",
    "agpl-3": "AGPL-3.0-only", "agpl-3+": "AGPL-3.0-or-later", "gfdl-1.3+": "GFDL-1.3-or-later",
    "apache-2": "Apache-2.0", "apache-2.0": "Apache-2.0", "artistic": "Artistic-1.0",
    "artistic-2.0": "Artistic-2.0", "bsd-2-clause": "BSD-2-Clause", "bsd-3-clause": "BSD-3-Clause",
    "bsd-4-clause": "BSD-4-Clause", "expat": "MIT", "mit": "MIT", "isc": "ISC", "zlib": "Zlib",
    "mpl-1.1": "MPL-1.1", "mpl-2.0": "MPL-2.0", "psf-2": "PSF-2.0", "cc0-1.0": "CC0-1.0",
    "cc0": "CC0-1.0", "bsl-1.0": "BSL-1.0", "openssl": "OpenSSL", "curl": "curl", "x11": "X11",
    "ftl": "FTL", "ijg": "IJG", "sleepycat": "Sleepycat", "unicode-dfs-2016": "Unicode-DFS-2016",
}

# Trove classifiers -> SPDX identifiers (only those naming one exact license and version).
CLASSIFIER_LICENSES = {
    "MIT License": "MIT", "MIT No Attribution License (MIT-0)": "MIT-0", "ISC License (ISCL)": "ISC",
    "Apache Software License 2.0": "Apache-2.0", "Python Software Foundation License": "PSF-2.0",
    "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0", "The Unlicense (Unlicense)": "Unlicense",
    "zlib/libpng License": "Zlib", "Boost Software License 1.0 (BSL-1.0)": "BSL-1.0",
    "GNU General Public License v2 (GPLv2)": "GPL-2.0-only",
    "GNU General Public License v2 or later (GPLv2+)": "GPL-2.0-or-later",
    "GNU General Public License v3 (GPLv3)": "GPL-3.0-only",
    "GNU General Public License v3 or later (GPLv3+)": "GPL-3.0-or-later",
    "GNU Lesser General Public License v2 (LGPLv2)": "LGPL-2.0-only",
    "GNU Lesser General Public License v2 or later (LGPLv2+)": "LGPL-2.0-or-later",
    "GNU Lesser General Public License v3 (LGPLv3)": "LGPL-3.0-only",
    "GNU Lesser General Public License v3 or later (LGPLv3+)": "LGPL-3.0-or-later",
    "GNU Affero General Public License v3": "AGPL-3.0-only",
    "GNU Affero General Public License v3 or later (AGPLv3+)": "AGPL-3.0-or-later",
}


@dataclass
class Package:
    ecosystem: str                 # "deb" | "pypi"
    name: str
    version: str
    purl: str
    files: list[str] = field(default_factory=list)   # image paths of kept files it owns
    license: str | None = None     # a valid SPDX expression, or None (NOASSERTION)
    license_declared: str | None = None   # the declaration as written, when known
    architecture: str | None = None
    source: str | None = None      # source package (deb)
    homepage: str | None = None
    metadata_path: str | None = None   # where a scanner finds it in the image

    @property
    def key(self) -> str:
        return f"{self.ecosystem}:{self.name}:{self.architecture or ''}"


# --------------------------------------------------------------------------------------------
# Licenses


def spdx_expression(terms: list[str], operators: list[str]) -> str | None:
    """Join known ids with AND/OR; None when any term is not a known SPDX id."""
    if not terms or any(t not in KNOWN_SPDX_IDS for t in terms):
        return None
    out = terms[0]
    for op, t in zip(operators, terms[1:]):
        out += f" {op} {t}"
    return out


def check_expression(text: str) -> str | None:
    """`text` if it is an SPDX expression of known ids (AND/OR/WITH, parentheses), else None."""
    tokens = re.findall(r"\(|\)|[^\s()]+", text)
    if not tokens:
        return None
    expect_id = True
    previous = ""
    for tok in tokens:
        if tok in ("(", ")"):
            continue
        if tok in ("AND", "OR", "WITH"):
            if expect_id:
                return None
            expect_id = True
        elif expect_id:
            ok = tok in KNOWN_EXCEPTIONS if previous == "WITH" else (
                tok.rstrip("+") in KNOWN_SPDX_IDS or tok.startswith("LicenseRef-"))
            if not ok or tok.startswith("LicenseRef-"):
                return None   # a LicenseRef needs its text in the document; we have none
            expect_id = False
        else:
            return None
        previous = tok
    return None if expect_id else " ".join(tokens).replace("( ", "(").replace(" )", ")")


def debian_license(copyright_text: str) -> tuple[str | None, str | None]:
    """(SPDX expression, declared text) of the `Files: *` paragraph of a DEP-5 copyright file."""
    if not copyright_text.startswith("Format:"):
        return None, None   # not machine-readable: nothing reliable to say
    for para in dpkg_mod.parse_status(copyright_text):
        files = para.get("Files", "").split()
        if files[:1] == ["*"] and para.get("License"):
            declared = para["License"].split("\n", 1)[0].strip()
            parts = re.split(r"\s+(or|and)\s+", declared, flags=re.I)
            terms = [DEBIAN_LICENSES.get(t.strip().lower(), t.strip()) for t in parts[0::2]]
            ops = [o.upper() for o in parts[1::2]]
            return spdx_expression(terms, ops), declared
    return None, None


def python_license(meta: email.message.Message) -> tuple[str | None, str | None]:
    expr = meta.get("License-Expression")
    if expr:
        return check_expression(expr.strip()), expr.strip()
    declared = (meta.get("License") or "").strip()
    first = declared.split("\n", 1)[0].strip()
    if first and len(first) < 80:
        known = _KNOWN_LOWER.get(first.lower()) or check_expression(first)
        if known:
            return known, first
    classified = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or []
                  if c.startswith("License ::")]
    ids = [CLASSIFIER_LICENSES.get(c) for c in classified]
    if classified and all(ids):
        unique = list(dict.fromkeys(i for i in ids if i))
        return spdx_expression(unique, ["OR"] * (len(unique) - 1)), "; ".join(classified)
    return None, (first[:200] if first else "; ".join(classified) or None)


# --------------------------------------------------------------------------------------------
# Packages


def purl_deb(distro: str, name: str, version: str, arch: str, distro_version: str | None) -> str:
    qualifiers = f"arch={arch}" + (f"&distro={distro}-{distro_version}" if distro_version else "")
    return f"pkg:deb/{distro}/{quote(name.lower(), safe='.-_+')}@{quote(version, safe='.-_~')}?{qualifiers}"


def purl_pypi(name: str, version: str) -> str:
    normal = re.sub(r"[-_.]+", "-", name).lower()
    return f"pkg:pypi/{quote(normal, safe='.-_')}@{quote(version, safe='.-_~+')}"


def owned_candidates(plan: rootfs.Plan, root: Root) -> list[str]:
    """Plan paths that a package can own: files and symlinks of `root`, not directories (every
    package lists its directories), not generated files, not symlinks to directories (/lib)."""
    out = []
    for path, e in plan.entries.items():
        if e.kind not in ("file", "hardlink", "symlink") or e.source != root.host(path):
            continue
        if e.kind == "symlink" and root.resolve(path).kind is NodeKind.DIR:
            continue
        out.append(path)
    return out


def debian_packages(db: dpkg_mod.DpkgDatabase, ownership: dpkg_mod.Ownership,
                    os_release: dict[str, str], root: Root) -> list[Package]:
    distro = (os_release.get("ID") or "debian").lower()
    kept = [db.packages[k] for k in sorted(ownership.files) if k in db.packages]
    out = []
    for pkg in kept:
        license_expr = declared = None
        text = root.read_text(f"/usr/share/doc/{pkg.name}/copyright", errors="replace")
        if text is not None:
            license_expr, declared = debian_license(text)
        out.append(Package(
            ecosystem="deb", name=pkg.name, version=pkg.version,
            purl=purl_deb(distro, pkg.name, pkg.version, pkg.architecture, os_release.get("VERSION_ID")),
            files=list(ownership.files[pkg.key]), license=license_expr, license_declared=declared,
            architecture=pkg.architecture, source=pkg.source, homepage=pkg.homepage,
            metadata_path=f"{dpkg_mod.STATUS_D}/{dpkg_mod.status_d_name(pkg, kept)}"))
    return out


def python_packages(plan: rootfs.Plan) -> list[Package]:
    """Every distribution whose dist-info METADATA is in the image, with the kept files its
    RECORD lists."""
    out = []
    entries = plan.entries
    for path in sorted(entries):
        if not (path.endswith(".dist-info/METADATA") and entries[path].kind == "file"):
            continue
        text = _entry_text(entries[path])
        if text is None:
            continue
        from email.parser import Parser   # here: 18 ms to import, and many images hold no distribution

        meta = Parser().parsestr(text, headersonly=True)
        name, version = meta.get("Name"), meta.get("Version")
        if not name or not version:
            continue
        dist_info = os.path.dirname(path)
        site = os.path.dirname(dist_info)
        files = [path]
        record = entries.get(dist_info + "/RECORD")
        for line in (_entry_text(record) or "").splitlines() if record and record.kind == "file" else []:
            rel = line.split(",", 1)[0].strip()
            full = os.path.normpath(os.path.join(site, rel)) if rel else ""
            if full and full in entries and entries[full].kind in ("file", "hardlink") and full not in files:
                files.append(full)
        license_expr, declared = python_license(meta)
        out.append(Package(ecosystem="pypi", name=name, version=version, purl=purl_pypi(name, version),
                           files=sorted(files), license=license_expr, license_declared=declared,
                           homepage=meta.get("Home-page"), metadata_path=path))
    return out


def _entry_text(e: rootfs.Entry) -> str | None:
    """A kept file's text, read from the very file the plan holds (None if unreadable)."""
    try:
        return rootfs.read_entry(e).decode("utf-8", "replace")
    except (TracejailError, OSError):
        return None


# --------------------------------------------------------------------------------------------
# Files


@dataclass(frozen=True)
class FileDigest:
    path: str
    sha1: str
    sha256: str
    size: int


def digest_files(plan: rootfs.Plan) -> list[FileDigest]:
    """SHA-1 and SHA-256 of every file of the plan (a hard link has its target's content)."""
    out: list[FileDigest] = []
    done: dict[str, FileDigest] = {}
    for path in sorted(plan.entries, key=rootfs.sort_key):
        e = plan.entries[path]
        if e.kind == "hardlink":
            first = done.get(e.link_target or "")
            if first is not None:
                out.append(FileDigest(path, first.sha1, first.sha256, first.size))
            continue
        if e.kind != "file":
            continue
        h1, h256, size = hashlib.sha1(), hashlib.sha256(), 0
        try:
            with os.fdopen(rootfs.open_entry(e), "rb") as f:
                while chunk := f.read(1 << 20):
                    h1.update(chunk)
                    h256.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise TracejailError(f"cannot read {e.source} for the SBOM: {exc.strerror}") from None
        done[path] = FileDigest(path, h1.hexdigest(), h256.hexdigest(), size)
        out.append(done[path])
    return out


def _file_type(path: str) -> str:
    if path.endswith((".py", ".c", ".h", ".sh")):
        return "SOURCE"
    if path.endswith((".txt", ".md", ".conf", ".cfg", ".json", ".ini", ".toml")) or path.startswith("/etc/"):
        return "TEXT"
    if re.search(r"\.so(\.[0-9.]+)?$", path) or path.endswith(".pyc") or "/bin/" in path:
        return "BINARY"
    return "OTHER"


# --------------------------------------------------------------------------------------------
# Documents


def _spdx_id(prefix: str, text: str, used: set[str]) -> str:
    base = f"SPDXRef-{prefix}-" + re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-")
    ident, n = base, 1
    while ident in used:
        n += 1
        ident = f"{base}-{n}"
    used.add(ident)
    return ident


def _verification_code(sha1s: Iterable[str]) -> str:
    # SPDX 2.3 clause 7.9: SHA-1 of the sorted, concatenated SHA-1s of the package's files.
    return hashlib.sha1("".join(sorted(sha1s)).encode()).hexdigest()


def _document_uuid(name: str, digests: list[FileDigest], packages: list[Package]) -> uuid.UUID:
    # Same content, same id: a rebuild of the same image yields the same document identity.
    h = hashlib.sha256(name.encode())
    for d in digests:
        h.update(f"{d.path}\0{d.sha256}\n".encode())
    for p in packages:
        h.update(f"{p.purl}\n".encode())
    import uuid   # here: only an SBOM document needs it

    return uuid.uuid5(uuid.NAMESPACE_URL, "tracejail:" + h.hexdigest())


def spdx_document(name: str, packages: list[Package], digests: list[FileDigest], created: str) -> dict[str, Any]:
    used: set[str] = set()
    image_id = _spdx_id("Image", name, used)
    doc_uuid = _document_uuid(name, digests, packages)
    file_ids: dict[str, str] = {}
    files_json = []
    for d in digests:
        fid = file_ids[d.path] = _spdx_id("File", d.path.strip("/"), used)
        files_json.append({
            "fileName": "." + d.path, "SPDXID": fid,
            "checksums": [{"algorithm": "SHA1", "checksumValue": d.sha1},
                          {"algorithm": "SHA256", "checksumValue": d.sha256}],
            "fileTypes": [_file_type(d.path)],
            "licenseConcluded": "NOASSERTION", "copyrightText": "NOASSERTION",
        })
    sha1_of = {d.path: d.sha1 for d in digests}
    packages_json: list[dict[str, Any]] = [{
        "name": name, "SPDXID": image_id, "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
        "primaryPackagePurpose": "CONTAINER", "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION", "copyrightText": "NOASSERTION",
        "comment": "FROM-scratch image built by tracejail from a recorded trace",
    }]
    relationships = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                      "relatedSpdxElement": image_id}]
    owned: set[str] = set()
    for p in packages:
        pid = _spdx_id(f"Package-{p.ecosystem}", f"{p.name}-{p.architecture or ''}", used)
        pkg_files = [f for f in p.files if f in file_ids]
        entry: dict[str, Any] = {
            "name": p.name, "SPDXID": pid, "versionInfo": p.version, "downloadLocation": "NOASSERTION",
            "filesAnalyzed": bool(pkg_files), "licenseConcluded": "NOASSERTION",
            "licenseDeclared": p.license or "NOASSERTION", "copyrightText": "NOASSERTION",
            "primaryPackagePurpose": "LIBRARY",
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": p.purl}],
        }
        if pkg_files:
            entry["packageVerificationCode"] = {
                "packageVerificationCodeValue": _verification_code(sha1_of[f] for f in pkg_files)}
        if p.license_declared and not p.license:
            entry["licenseComments"] = f"declared as: {p.license_declared}"
        if p.homepage:
            entry["homepage"] = p.homepage
        if p.source and p.source != p.name:
            entry["sourceInfo"] = f"built from the {p.ecosystem} source package {p.source}"
        packages_json.append(entry)
        relationships.append({"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": pid})
        for f in pkg_files:
            relationships.append({"spdxElementId": pid, "relationshipType": "CONTAINS",
                                  "relatedSpdxElement": file_ids[f]})
            owned.add(f)
    for d in digests:
        if d.path not in owned:
            relationships.append({"spdxElementId": image_id, "relationshipType": "CONTAINS",
                                  "relatedSpdxElement": file_ids[d.path]})
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": name,
        "documentNamespace": f"https://spdx.org/spdxdocs/tracejail/{re.sub(r'[^A-Za-z0-9._-]+', '-', name)}-{doc_uuid}",
        "creationInfo": {"created": created, "creators": [f"Tool: tracejail-{__version__}"]},
        "packages": packages_json,
        "files": files_json,
        "relationships": relationships,
    }


def _cdx_licenses(p: Package) -> list[dict[str, Any]]:
    if p.license and " " not in p.license:
        return [{"license": {"id": p.license}}]
    if p.license:
        return [{"expression": p.license}]
    if p.license_declared:
        return [{"license": {"name": p.license_declared[:200]}}]
    return []


def cyclonedx_document(name: str, packages: list[Package], digests: list[FileDigest], created: str) -> dict[str, Any]:
    doc_uuid = _document_uuid(name, digests, packages)
    owner: dict[str, str] = {}
    components: list[dict[str, Any]] = []
    refs: set[str] = set()
    for p in packages:
        ref = p.purl if p.purl not in refs else f"{p.purl}#{len(refs)}"
        refs.add(ref)
        comp: dict[str, Any] = {"type": "library", "bom-ref": ref, "name": p.name, "version": p.version,
                                "purl": p.purl}
        lic = _cdx_licenses(p)
        if lic:
            comp["licenses"] = lic
        props = [{"name": "tracejail:ecosystem", "value": p.ecosystem}]
        if p.architecture:
            props.append({"name": "tracejail:architecture", "value": p.architecture})
        if p.metadata_path:
            props.append({"name": "tracejail:metadata", "value": p.metadata_path})
        comp["properties"] = props
        components.append(comp)
        for f in p.files:
            owner.setdefault(f, ref)
    for d in digests:
        comp = {"type": "file", "bom-ref": f"file:{d.path}", "name": d.path,
                "hashes": [{"alg": "SHA-1", "content": d.sha1}, {"alg": "SHA-256", "content": d.sha256}]}
        if d.path in owner:
            comp["properties"] = [{"name": "tracejail:package", "value": owner[d.path]}]
        components.append(comp)
    package_refs = [c["bom-ref"] for c in components if c["type"] == "library"]
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{doc_uuid}",
        "version": 1,
        "metadata": {
            "timestamp": created,
            "tools": {"components": [{"type": "application", "name": "tracejail", "version": __version__}]},
            "component": {"type": "container", "bom-ref": "image", "name": name},
        },
        "components": components,
        "dependencies": [{"ref": "image", "dependsOn": package_refs}] + [{"ref": r, "dependsOn": []} for r in package_refs],
    }


def document(fmt: str, name: str, packages: list[Package], digests: list[FileDigest], created: str) -> dict[str, Any]:
    if fmt == "spdx":
        return spdx_document(name, packages, digests, created)
    if fmt == "cyclonedx":
        return cyclonedx_document(name, packages, digests, created)
    raise TracejailError(f"unknown SBOM format {fmt!r}; choose one of {', '.join(FORMATS)}", 2)


def write(path: str, fmt: str, name: str, packages: list[Package], plan: rootfs.Plan, created: str) -> dict[str, Any]:
    """Hash the plan's files and write the SBOM to `path` (atomically); return the document."""
    from tracejail import trace as tr

    doc = document(fmt, name, packages, digest_files(plan), created)
    tr.write_atomic(path, json.dumps(doc, indent=1, sort_keys=False).encode() + b"\n")
    return doc
