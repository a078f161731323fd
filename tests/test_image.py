"""The image writer: archive layout, reproducibility, atomicity, and real consumers
(docker load + run in a private engine, skopeo with both transports, docker build of --rootfs)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import uuid
import zlib
from pathlib import Path
from typing import Iterator

import pytest

from conftest import private_podman, static_program
from tracejail import docker_engine as engine_cli
from tracejail import image, rootfs
from tracejail.errors import TracejailError
from tracejail.image import ImageConfig

HELLO_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char buf[256] = "";
    FILE *f = argc > 1 ? fopen(argv[1], "r") : NULL;
    if (f) { size_t n = fread(buf, 1, sizeof buf - 1, f); buf[n] = 0; fclose(f); }
    else if (argc > 1) { perror(argv[1]); return 3; }
    const char *env = getenv("TJ_VALUE");
    printf("uid=%d gid=%d env=%s msg=%s\n", (int)getuid(), (int)getgid(), env ? env : "-", buf);
    return 0;
}
"""


@pytest.fixture(scope="session")
def hello_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A static program (no libc in the image needed) that prints its ids, $TJ_VALUE and a file."""
    return static_program(tmp_path_factory.mktemp("hello"), HELLO_C)


def make_host(root: Path, binary: Path, token: str) -> Path:
    """A host tree: the binary under a symlink and a hard link, and a message in a 0700 directory
    (the image runs as 65532, so this only works if the traversable/readable policy did its job)."""
    (root / "app/bin").mkdir(parents=True)
    shutil.copy2(binary, root / "app/bin/hello")
    os.link(root / "app/bin/hello", root / "app/bin/hello-again")
    (root / "app/current").symlink_to("bin/hello")
    secret = root / "app/data/secret"
    secret.mkdir(parents=True)
    (secret / "msg").write_text(token)
    (secret / "msg").chmod(0o600)
    secret.chmod(0o700)
    name = "a-rather-long-directory-name-to-force-gnu-long-names-in-the-layer-tar-" + "x" * 60
    (root / "app" / name).mkdir()
    (root / "app" / name / "file.txt").write_text("long name\n")
    return root


WANTED = ["/app/current", "/app/bin/hello-again", "/app/data/secret/msg"]


@pytest.fixture
def token() -> str:
    # Unique content per test: docker skips layers it already has, which could hide a broken archive.
    return "tj-" + uuid.uuid4().hex


@pytest.fixture
def host(tmp_path: Path, hello_binary: Path, token: str) -> Path:
    return make_host(tmp_path / "host", hello_binary, token)


@pytest.fixture
def plan(host: Path) -> rootfs.Plan:
    long_dir = next(p.name for p in (host / "app").iterdir() if p.name.startswith("a-rather"))
    return rootfs.plan(WANTED + [f"/app/{long_dir}/file.txt"], root=str(host))


def config(**kw: object) -> ImageConfig:
    base: dict[str, object] = dict(entrypoint=["/app/current", "/app/data/secret/msg"], created="1970-01-01T00:00:00Z",
                                   labels={"org.opencontainers.image.title": "hello"}, exposed_ports=["8000"],
                                   env=["PATH=/usr/bin:/bin", "TJ_VALUE=plain"])
    base.update(kw)
    return ImageConfig(**base)  # type: ignore[arg-type]


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}  # type: ignore[union-attr]


def blob(files: dict[str, bytes], digest: str) -> bytes:
    data = files["blobs/sha256/" + digest.split(":", 1)[1]]
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    return data


# ------------------------------------------------------------------------------------------
# Layout and digests (no daemon needed)


def test_archive_is_oci_layout_plus_docker_manifest(tmp_path: Path, plan: rootfs.Plan) -> None:
    out = tmp_path / "img.tar"
    res = image.write_archive(plan, str(out), config(), name="tjtest/hello:1.0")
    files = members(out)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    (desc,) = index["manifests"]
    assert desc["digest"] == res.manifest_digest
    assert desc["annotations"] == {"io.containerd.image.name": "docker.io/tjtest/hello:1.0",
                                   "org.opencontainers.image.ref.name": "1.0"}
    manifest = json.loads(blob(files, desc["digest"]))
    assert manifest["annotations"] == {"org.opencontainers.image.title": "hello"}
    cfg_bytes = blob(files, manifest["config"]["digest"])
    assert "sha256:" + hashlib.sha256(cfg_bytes).hexdigest() == res.image_id
    cfg = json.loads(cfg_bytes)
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [res.diff_id]}
    assert cfg["config"]["User"] == "65532:65532" and cfg["config"]["ExposedPorts"] == {"8000/tcp": {}}
    assert cfg["architecture"] == image.host_architecture() and cfg["os"] == "linux"
    (layer_desc,) = manifest["layers"]
    assert layer_desc["mediaType"] == image.LAYER_MEDIA_TYPE_GZIP
    layer = blob(files, layer_desc["digest"])
    assert layer_desc["size"] == len(layer) == res.compressed_size
    # gzip header as GzipFile(filename='', mtime=0) writes it: no name, mtime 0, OS 255
    assert layer[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    tar_bytes = gzip.decompress(layer)
    assert "sha256:" + hashlib.sha256(tar_bytes).hexdigest() == res.diff_id
    assert len(tar_bytes) == res.uncompressed_size and len(tar_bytes) % 10240 == 0
    docker = json.loads(files["manifest.json"])
    assert docker == [{"Config": "blobs/sha256/" + res.image_id[7:], "RepoTags": ["tjtest/hello:1.0"],
                       "Layers": ["blobs/sha256/" + res.layer_digest[7:]]}]

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as t:
        infos = {m.name: m for m in t.getmembers()}
    names = list(infos)
    assert names == sorted(names, key=lambda n: n.rstrip("/").split("/"))
    assert not any(n.startswith(("/", "./")) for n in names)
    assert all(m.uname == "" and m.gname == "" and m.uid == 0 and m.gid == 0 and m.mtime == 0 for m in infos.values())
    assert not any(m.pax_headers for m in infos.values())
    assert infos["app/current"].issym() and infos["app/current"].linkname == "bin/hello"
    assert infos["app/bin/hello-again"].islnk() and infos["app/bin/hello-again"].linkname == "app/bin/hello"
    assert infos["app/data/secret"].mode == 0o701 and infos["app/data/secret/msg"].mode == 0o604
    assert infos["tmp"].isdir() and infos["tmp"].mode == 0o1777
    assert any(len(n) > 100 for n in names)  # GNU long name round-trips


def test_reproducible_bytes_and_ids(tmp_path: Path, plan: rootfs.Plan, monkeypatch: pytest.MonkeyPatch) -> None:
    a = image.write_archive(plan, str(tmp_path / "a.tar"), config(), name="x:1")
    b = image.write_archive(plan, str(tmp_path / "b.tar"), config(), name="x:1", workers=1)
    c = image.write_archive(plan, str(tmp_path / "c.tar"), config(), name="x:1", workers=3)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes() == (tmp_path / "c.tar").read_bytes()
    assert a == b.__class__(**{**b.__dict__, "archive": a.archive}) and a.image_id == c.image_id
    # SOURCE_DATE_EPOCH sets `created` and clamps mtimes; it changes the image, deterministically
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    cfg = ImageConfig(entrypoint=["/app/current"])
    assert cfg.created == "2023-11-14T22:13:20Z"
    d = image.write_archive(plan, str(tmp_path / "d.tar"), cfg)
    e = image.write_archive(plan, str(tmp_path / "e.tar"), cfg)
    assert (tmp_path / "d.tar").read_bytes() == (tmp_path / "e.tar").read_bytes() and d == e.__class__(
        **{**e.__dict__, "archive": d.archive})
    assert d.diff_id != a.diff_id
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob(members(tmp_path / "d.tar"), d.layer_digest)))) as t:
        # host files are newer than 2023 -> clamped; /tmp (synthesised) stays at 0
        assert {m.mtime for m in t.getmembers()} == {0, 1700000000}
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(TracejailError, match="SOURCE_DATE_EPOCH"):
        ImageConfig(entrypoint=["/x"])


def layer_mtimes(archive: Path, res: image.ImageResult) -> dict[str, int]:
    data = blob(members(archive), res.layer_digest)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as t:
        return {m.name: m.mtime for m in t.getmembers()}


def test_py_sources_of_kept_pyc_keep_their_mtime(tmp_path: Path) -> None:
    """Otherwise CPython finds every .pyc stale (mtime mismatch) and recompiles on each start."""
    h = tmp_path / "h"
    pkg = h / "app/pkg"
    (pkg / "__pycache__").mkdir(parents=True)
    for name in ("mod.py", "__pycache__/mod.cpython-311.pyc", "nopyc.py", "data.txt"):
        (pkg / name).write_text(name)
        os.utime(pkg / name, (1_650_000_000, 1_650_000_000))
    plan = rootfs.plan([f"/app/pkg/{n}" for n in ("mod.py", "__pycache__/mod.cpython-311.pyc", "nopyc.py", "data.txt")],
                       root=str(h))
    res = image.write_archive(plan, str(tmp_path / "img.tar"), config())
    mtimes = layer_mtimes(tmp_path / "img.tar", res)
    assert mtimes["app/pkg/mod.py"] == 1_650_000_000
    assert mtimes["app/pkg/nopyc.py"] == mtimes["app/pkg/data.txt"] == mtimes["app/pkg/__pycache__/mod.cpython-311.pyc"] == 0
    kept = image.write_archive(plan, str(tmp_path / "kept.tar"), config(), preserve_mtimes=True)
    assert set(layer_mtimes(tmp_path / "kept.tar", kept).values()) >= {1_650_000_000}
    assert layer_mtimes(tmp_path / "kept.tar", kept)["app/pkg/data.txt"] == 1_650_000_000


def test_plan_and_staged_rootfs_give_the_same_layer(tmp_path: Path, plan: rootfs.Plan) -> None:
    staged = tmp_path / "rootfs"
    rootfs.stage(plan, str(staged))
    from_plan = image.write_archive(plan, str(tmp_path / "p.tar"), config())
    from_dir = image.write_archive(str(staged), str(tmp_path / "d.tar"), config())
    assert from_plan.diff_id == from_dir.diff_id and from_plan.image_id == from_dir.image_id


def test_uncompressed_and_multiblock_gzip(tmp_path: Path, host: Path) -> None:
    big = host / "app/big.bin"
    # ~5 MB, half random (incompressible) half text: several 1 MiB gzip blocks
    big.write_bytes(os.urandom(2 << 20) + b"hello tracejail\n" * 200_000)
    plan = rootfs.plan(WANTED + ["/app/big.bin"], root=str(host))
    plain = image.write_archive(plan, str(tmp_path / "plain.tar"), config(), compress_level=None)
    assert plain.layer_digest == plain.diff_id and plain.compressed_size == plain.uncompressed_size
    files = members(tmp_path / "plain.tar")
    manifest = json.loads(blob(files, json.loads(files["index.json"])["manifests"][0]["digest"]))
    assert manifest["layers"][0]["mediaType"] == image.LAYER_MEDIA_TYPE_TAR
    seen: list[int] = []
    gz = image.write_archive(plan, str(tmp_path / "gz.tar"), config(), compress_level=1, progress=seen.append)
    assert sum(seen) == plan.files_size()
    assert gz.diff_id == plain.diff_id and gz.compressed_size < gz.uncompressed_size
    layer = blob(members(tmp_path / "gz.tar"), gz.layer_digest)
    assert layer[8] == 4  # XFL for level 1, as GzipFile writes
    assert gzip.decompress(layer) == blob(files, plain.layer_digest)
    (tmp_path / "layer.gz").write_bytes(layer)
    assert subprocess.run(["gzip", "-t", str(tmp_path / "layer.gz")]).returncode == 0


def test_oci_dir(tmp_path: Path, plan: rootfs.Plan) -> None:
    out = tmp_path / "layout"
    res = image.write_oci_dir(plan, str(out), config(), name="localhost:5000/tj/hello")
    arch = image.write_archive(plan, str(tmp_path / "same.tar"), config(), name="localhost:5000/tj/hello")
    assert (res.image_id, res.manifest_digest) == (arch.image_id, arch.manifest_digest)
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == "localhost:5000/tj/hello:latest"
    assert sorted(os.listdir(out)) == ["blobs", "index.json", "manifest.json", "oci-layout"]
    assert len(os.listdir(out / "blobs/sha256")) == 3
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with pytest.raises(TracejailError, match="not an empty directory"):
        image.write_oci_dir(plan, str(out), config())


@pytest.mark.parametrize("name,full,familiar", [
    ("app", "docker.io/library/app:latest", "app:latest"),
    ("app:1.2", "docker.io/library/app:1.2", "app:1.2"),
    ("me/app", "docker.io/me/app:latest", "me/app:latest"),
    ("ghcr.io/me/app:v1", "ghcr.io/me/app:v1", "ghcr.io/me/app:v1"),
    ("localhost:5000/app", "localhost:5000/app:latest", "localhost:5000/app:latest"),
])
def test_parse_reference(name: str, full: str, familiar: str) -> None:
    ref = image.parse_reference(name)
    assert (ref.full, ref.familiar) == (full, familiar)


@pytest.mark.parametrize("bad", ["App", "app@sha256:abc", "app:", "-app", "a b", "app:t@g", ""])
def test_parse_reference_rejects(bad: str) -> None:
    with pytest.raises(TracejailError, match="invalid image name"):
        image.parse_reference(bad)


# ------------------------------------------------------------------------------------------
# Atomicity


def leftovers(d: Path) -> list[str]:
    return sorted(p for p in os.listdir(d) if p.endswith(".tmp"))


def test_failure_mid_write_leaves_old_archive_and_no_temp(tmp_path: Path, plan: rootfs.Plan, host: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "img.tar").write_bytes(b"previous archive")
    (host / "app/data/secret/msg").unlink()  # vanishes between plan and write
    with pytest.raises(TracejailError, match="msg vanished"):
        image.write_archive(plan, str(out / "img.tar"), config())
    assert (out / "img.tar").read_bytes() == b"previous archive"
    assert os.listdir(out) == ["img.tar"]


def test_missing_or_unwritable_destination(tmp_path: Path, plan: rootfs.Plan) -> None:
    with pytest.raises(TracejailError, match="does not exist"):
        image.write_archive(plan, str(tmp_path / "nope/img.tar"), config())
    with pytest.raises(TracejailError, match="is a directory"):
        image.write_archive(plan, str(tmp_path), config())


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: real ENOSPC and EROFS, no simulation."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_is_reported_and_cleaned_up(small_tmpfs: Path, host: Path) -> None:
    (host / "app/big.bin").write_bytes(os.urandom(3 << 20))
    plan = rootfs.plan(WANTED + ["/app/big.bin"], root=str(host))
    with pytest.raises(TracejailError, match="disk full"):
        image.write_archive(plan, str(small_tmpfs / "img.tar"), config())
    assert os.listdir(small_tmpfs) == []
    with pytest.raises(TracejailError, match="disk full"):
        rootfs.stage(plan, str(small_tmpfs / "rootfs"))
    assert os.listdir(small_tmpfs) == []
    with pytest.raises(TracejailError, match="disk full"):
        image.write_oci_dir(plan, str(small_tmpfs / "layout"), config())
    assert os.listdir(small_tmpfs) == []


def test_read_only_destination(small_tmpfs: Path, plan: rootfs.Plan) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(TracejailError, match="read-only"):
        image.write_archive(plan, str(small_tmpfs / "img.tar"), config())


# ------------------------------------------------------------------------------------------
# Dockerfile text


def test_dockerfile_escapes_values(tmp_path: Path) -> None:
    cfg = config(env=["TJ_VALUE=cost $5 \"quoted\" back\\slash"], labels={"a b": "c$d"}, working_dir="/app dir",
                 cmd=["--flag", "$HOME"])
    (tmp_path / "my rootfs").mkdir()
    path = image.write_dockerfile(str(tmp_path / "my rootfs"), cfg)
    text = Path(path).read_text()
    assert path == str(tmp_path / "Dockerfile")
    assert 'COPY ["my rootfs", "/"]' in text
    assert 'ENV TJ_VALUE="cost \\$5 \\"quoted\\" back\\\\slash"' in text
    assert 'LABEL "a b"="c\\$d"' in text
    assert 'ENTRYPOINT ["/app/current", "/app/data/secret/msg"]' in text and 'CMD ["--flag", "$HOME"]' in text
    with pytest.raises(TracejailError, match="line break"):
        image.write_dockerfile(str(tmp_path / "my rootfs"), config(env=["A=x\ny"]))


# ------------------------------------------------------------------------------------------
# Real consumers


@pytest.fixture(scope="session")
def skopeo() -> str:
    path = shutil.which("skopeo")
    if path is None:
        pytest.skip("skopeo not installed")
    return path


def test_skopeo_reads_both_transports(tmp_path: Path, plan: rootfs.Plan, skopeo: str) -> None:
    out = tmp_path / "img.tar"
    res = image.write_archive(plan, str(out), config(), name="tjtest/skopeo:2")

    def inspect(ref: str, *extra: str) -> dict[str, object]:
        proc = subprocess.run([skopeo, "inspect", *extra, ref], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    oci = inspect(f"oci-archive:{out}")
    assert oci["Digest"] == res.manifest_digest and oci["Layers"] == [res.layer_digest]
    assert oci["Labels"] == {"org.opencontainers.image.title": "hello"}
    assert inspect(f"oci-archive:{out}:2")["Digest"] == res.manifest_digest  # by ref.name
    docker = inspect(f"docker-archive:{out}")
    assert docker["Layers"] == [res.diff_id]  # docker-archive names layers by diff_id
    assert docker["Architecture"] == image.host_architecture()
    raw_cfg = subprocess.run([skopeo, "inspect", "--raw", "--config", f"docker-archive:{out}"],
                             capture_output=True, timeout=120).stdout
    assert "sha256:" + hashlib.sha256(raw_cfg).hexdigest() == res.image_id
    layout = tmp_path / "layout"
    image.write_oci_dir(plan, str(layout), config())
    assert inspect(f"oci:{layout}")["Digest"] == res.manifest_digest  # the name lives in index.json only


def test_podman_loads_and_names_it(tmp_path: Path, plan: rootfs.Plan, token: str) -> None:
    out = tmp_path / "img.tar"
    name = f"tjtest/podman-{token}:1"
    res = image.write_archive(plan, str(out), config(), name=name)
    with private_podman(tmp_path) as base:
        proc = subprocess.run([*base, "load", "-i", str(out)], capture_output=True, text=True, timeout=180)
        if proc.returncode != 0 and "permission" in proc.stderr.lower():
            pytest.skip(f"podman cannot run here: {proc.stderr.strip().splitlines()[-1]}")
        assert proc.returncode == 0, proc.stderr
        assert f"docker.io/{name}" in proc.stdout
        ident = subprocess.run([*base, "image", "inspect", "--format", "{{.Id}}", f"docker.io/{name}"],
                               capture_output=True, text=True, timeout=60)
        assert ident.returncode == 0, ident.stderr
        assert "sha256:" + ident.stdout.strip() == res.image_id


@pytest.mark.docker
@pytest.mark.parametrize("level", [6, None])
def test_docker_loads_and_runs_as_image_user(tmp_path: Path, plan: rootfs.Plan, token: str,
                                             docker_engine, level: int | None) -> None:  # noqa: ANN001
    tag = f"tjtest/hello:{token}"
    res = image.write_archive(plan, str(tmp_path / "img.tar"), config(), name=tag, compress_level=level)
    loaded = engine_cli.load(res.archive, tag, env=docker_engine.env)
    assert loaded == res.image_id  # docker's image ID is the config digest
    out = docker_engine.run("run", "--rm", tag).stdout
    assert out == f"uid=65532 gid=65532 env=plain msg={token}\n"
    inspected = json.loads(docker_engine.run("image", "inspect", tag).stdout)[0]
    assert inspected["Config"]["User"] == "65532:65532"
    assert inspected["Config"]["ExposedPorts"] == {"8000/tcp": {}}
    assert inspected["RootFS"]["Layers"] == [res.diff_id]
    docker_engine.run("rmi", tag)


@pytest.mark.docker
def test_docker_load_retags_and_reports_errors(tmp_path: Path, plan: rootfs.Plan, token: str, docker_engine) -> None:  # noqa: ANN001
    res = image.write_archive(plan, str(tmp_path / "img.tar"), config())  # no name: untagged
    tag = f"tjtest/retag:{token}"
    assert engine_cli.load(res.archive, tag, env=docker_engine.env) == res.image_id
    assert docker_engine.run("run", "--rm", tag).stdout.endswith(f"msg={token}\n")
    docker_engine.run("rmi", tag)
    (tmp_path / "junk.tar").write_bytes(b"not an archive" * 100)
    with pytest.raises(TracejailError, match="docker load refused"):
        engine_cli.load(str(tmp_path / "junk.tar"), "x:y", env=docker_engine.env)
    assert engine_cli.engine_available(docker_engine.env)
    dead = dict(docker_engine.env, DOCKER_HOST=f"unix://{tmp_path}/no.sock")
    assert not engine_cli.engine_available(dead)
    with pytest.raises(TracejailError, match="no Docker engine reachable"):
        engine_cli.load(res.archive, tag, env=dead)


@pytest.mark.docker
def test_dockerfile_for_rootfs_builds_and_runs(tmp_path: Path, plan: rootfs.Plan, token: str, docker_engine) -> None:  # noqa: ANN001
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    rootfs.stage(plan, str(ctx / "rootfs"))
    cfg = config(env=["PATH=/bin", "TJ_VALUE=$HOME \"q\""], working_dir="/app")
    image.write_dockerfile(str(ctx / "rootfs"), cfg)
    tag = f"tjtest/built:{token}"
    env = dict(docker_engine.env, DOCKER_BUILDKIT="0")  # the classic builder ships with dockerd 20.10
    proc = subprocess.run(["docker", "build", "-q", "-t", tag, str(ctx)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = docker_engine.run("run", "--rm", tag).stdout
    assert out == f"uid=65532 gid=65532 env=$HOME \"q\" msg={token}\n"
    inspected = json.loads(docker_engine.run("image", "inspect", tag).stdout)[0]
    assert inspected["Config"]["WorkingDir"] == "/app"
    assert inspected["Config"]["Labels"] == {"org.opencontainers.image.title": "hello"}
    docker_engine.run("rmi", tag)


def test_containerd_imports_by_annotation_name(tmp_path: Path, plan: rootfs.Plan, containerd_address: str) -> None:
    res = image.write_archive(plan, str(tmp_path / "img.tar"), config(), name="tjtest/ctr:7")
    proc = subprocess.run(["ctr", "--address", containerd_address, "-n", "tjtest", "images", "import",
                           str(tmp_path / "img.tar")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = subprocess.run(["ctr", "--address", containerd_address, "-n", "tjtest", "images", "ls"],
                            capture_output=True, text=True).stdout
    assert "docker.io/tjtest/ctr:7" in listed and res.manifest_digest in listed


@pytest.mark.parametrize("workers", [1, 3])
def test_parallel_gzip_cuts_the_same_blocks_however_the_data_arrives(workers: int) -> None:
    block, window = image._GZIP_BLOCK, image._GZIP_WINDOW
    rnd = random.Random(7)
    # Compressible but not trivial, a little over three blocks.
    data = bytes(rnd.choices(b"abcdefgh \n", k=3 * block + 12_345))
    # What the blocks must be: fixed-size cuts of the whole stream, each primed with the 32 KiB
    # before it, the last one final.
    cuts = range(0, len(data), block)
    expected = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"".join(
        image._deflate_block(data[i:i + block], data[max(0, i - window):i], 6, i + block >= len(data))
        for i in cuts) + zlib.crc32(data).to_bytes(4, "little") + len(data).to_bytes(4, "little")
    sizes = [1, 511, 512, 4096, block - 1, block, block + 3, 70_000]
    for how in ("whole", "odd chunks"):
        out = bytearray()
        gz = image._GzipWriter(out.extend, 6, workers)
        pos = 0
        while pos < len(data):
            n = len(data) if how == "whole" else rnd.choice(sizes)
            gz.write(data[pos:pos + n])
            pos += n
        gz.close()
        assert bytes(out) == expected, how
        assert gzip.decompress(bytes(out)) == data
