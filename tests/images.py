"""Fat images for the tests that start from an existing image (no registry is reachable here).

The base is Debian's own: `debootstrap --variant=minbase --include=python3` of the host's suite,
cached as a tarball in TRACEJAIL_CI_CACHE (default /var/cache/tracejail-ci, beside the CI's own
minbase), and `docker import`ed into the engine a test uses. Tests add their app on top with a
real `docker build`.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

SUITE = os.environ.get("TRACEJAIL_CI_SUITE", "bookworm")
CACHE = Path(os.environ.get("TRACEJAIL_CI_CACHE", "/var/cache/tracejail-ci"))
TARBALL = CACHE / f"{SUITE}-python3.tar"
BASE_TAG = f"tracejail-base-python3:{SUITE}"


def _mirror() -> str:
    """The first plain Debian mirror in the host's apt sources (as .ci/test-in-container picks it)."""
    if os.environ.get("TRACEJAIL_CI_MIRROR"):
        return os.environ["TRACEJAIL_CI_MIRROR"]
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            texts.append(p.read_text())
        except OSError:
            pass
    for line in "\n".join(texts).splitlines():
        if line.lstrip().startswith("#") or "security" in line:
            continue
        m = re.search(r"(https?|file)://\S*/debian/?(?=\s|$)", line)
        if m:
            return m.group(0)
    return "http://deb.debian.org/debian"


def _unmount_below(root: str) -> None:
    # debootstrap mounts /proc and more inside its target; a failed run can leave them behind.
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p == root or p.startswith(root + "/")), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def python3_base_tarball() -> Path:
    """The cached tarball of a minbase Debian with python3; made (as root) on first use."""
    if TARBALL.is_file() and TARBALL.stat().st_size > 0:
        return TARBALL
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("the python3 base image needs root and debootstrap (apt-get install debootstrap)")
    CACHE.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="python3-base.", dir=CACHE)
    try:
        target = os.path.join(work, "root")
        proc = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3", SUITE, target, _mirror()],
                              capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            pytest.skip(f"debootstrap failed: {proc.stdout.strip().splitlines()[-1:] or proc.stderr.strip()}")
        for junk in ("var/lib/apt/lists", "var/cache/apt/archives", "debootstrap"):
            shutil.rmtree(os.path.join(target, junk), ignore_errors=True)
        tmp = os.path.join(work, "base.tar")
        subprocess.run(["tar", "--numeric-owner", "-C", target, "-cf", tmp, "."], check=True, timeout=600)
        os.replace(tmp, TARBALL)
    finally:
        _unmount_below(work)
        shutil.rmtree(work, ignore_errors=True)
    return TARBALL


def import_python3_base(docker: object) -> str:
    """BASE_TAG in the engine `docker` (a conftest.DockerEngine), imported once."""
    run = docker.run   # type: ignore[attr-defined]
    if run("image", "inspect", BASE_TAG, check=False).returncode != 0:
        run("import", "-m", f"debootstrap --variant=minbase --include=python3 {SUITE}", str(python3_base_tarball()),
            BASE_TAG, timeout=600)
    return BASE_TAG


def docker_build(docker: object, context: Path, tag: str, dockerfile: str) -> None:
    """`docker build` of `dockerfile` (its text) in `context`, with the classic builder (no buildx
    plugin needed) and no network (the RUN steps of these tests need none)."""
    (context / "Dockerfile").write_text(dockerfile)
    env = {**docker.env, "DOCKER_BUILDKIT": "0"}   # type: ignore[attr-defined]
    proc = subprocess.run(["docker", "build", "--network", "none", "-t", tag, str(context)], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"docker build of {tag} failed: {(proc.stdout + proc.stderr)[-2000:]}")


# --- small images written by hand (no engine): layers as tar bytes ------------------------------

def _sha(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_config(layers: list[bytes], **run: object) -> dict:
    """An image config whose diff_ids are those of the (uncompressed) `layers`."""
    return {"architecture": "amd64", "os": "linux", "config": dict(run),
            "rootfs": {"type": "layers", "diff_ids": [_sha(layer) for layer in layers]}}


def write_docker_archive(path: Path, layers: list[bytes], config: dict, tags: list[str] | None = None) -> str:
    """A docker-archive as docker < 25 saves one (manifest.json, config, plain layer tars);
    returns the image ID."""
    import io
    import json
    import tarfile

    config_bytes = json.dumps(config).encode()
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        names = []
        for n, data in enumerate(layers):
            names.append(f"{n}/layer.tar")
            add(names[-1], data)
        add("config.json", config_bytes)
        add("manifest.json", json.dumps([{"Config": "config.json", "RepoTags": tags or [], "Layers": names}]).encode())
    return _sha(config_bytes)


def write_oci_layout(path: Path, layers: list[bytes], config: dict) -> str:
    """An OCI layout directory with gzip layers; returns the image ID (the config's digest)."""
    import gzip
    import json

    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, media_type: str) -> dict:
        digest = _sha(data)
        (blobs / digest.split(":")[1]).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}
    layer_descs = [blob(gzip.compress(data, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip") for data in layers]
    config_desc = blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = blob(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                "config": config_desc, "layers": layer_descs}).encode(),
                    "application/vnd.oci.image.manifest.v1+json")
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest]}))
    return config_desc["digest"]


def tar_of(entries: dict[str, bytes | str | None], modes: dict[str, int] | None = None) -> bytes:
    """A layer: name -> file content (bytes), symlink target (str, prefixed "->"), or None for a
    directory."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in entries.items():
            info = tarfile.TarInfo(name)
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
            else:
                info.size, info.mode = len(content), (modes or {}).get(name, 0o644)
            tar.addfile(info, io.BytesIO(content) if isinstance(content, bytes) else None)
    return buf.getvalue()
