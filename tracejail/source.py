"""Where a trace's files come from: the host's `/`, or an existing image's file system.

`record --image IMAGE` starts from an image: a local engine image (saved through the engine), a
docker-archive or OCI archive, or an OCI layout directory. Its layers are unpacked, in order and
safely (unpack.LayerTree: whiteouts, no setuid bits, no device nodes, nothing written through a
symlink), into the cache (`<cache>/images/<config digest>/rootfs`), so that record, build and
verify share one unpack. Without a cache the tree lives in a temporary directory for the one
command that needs it.

`root_of(trace)` is the one place a later stage learns its root: "/" for a host trace, the
unpacked tree for an image trace (unpacked again when it is gone, or when the trace names a
directory that is not tracejail's own unpack of that image: a trace may come from someone else).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping

from tracejail import cachedir, image as img_mod, trace as tr
from tracejail.errors import TraceFormatError, TracejailError, UsageError
from tracejail.root import Root
from tracejail.unpack import LayerTree

IMAGES_DIR = "images"
MARKER = "image.json"          # written last: an unpack without it is incomplete
SAVE_TIMEOUT = 1800.0
_READ_CHUNK = 1 << 20


class ImageError(TracejailError):
    """An image that cannot be found or read (exit 1), or that is corrupt (65)."""


@dataclass
class OpenedImage:
    """An image ready to unpack: its config and where its layer blobs are stored."""

    name: str
    image_id: str
    config: tr.SourceConfig
    image: img_mod.Image
    compressed_size: int


@dataclass
class UnpackedImage:
    name: str
    image_id: str
    rootfs: str
    config: tr.SourceConfig
    compressed_size: int
    content_size: int
    cached: bool          # in the cache (kept), or a temporary tree removed after use

    def source(self) -> tr.ImageSource:
        return tr.ImageSource(image=self.name, image_id=self.image_id, rootfs=self.rootfs if self.cached else None,
                              config=dataclasses.replace(self.config), compressed_size=self.compressed_size,
                              content_size=self.content_size)


# --- the image's config ------------------------------------------------------------------------

def _strings(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageError(f"the image config's {what} is not a list of strings; the image is corrupt", 65)
    return list(value)


def _keys(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, dict):
        raise ImageError(f"the image config's {what} is not an object; the image is corrupt", 65)
    return sorted(str(k) for k in value)


def source_config(config: Mapping[str, Any]) -> tr.SourceConfig:
    """The parts of an OCI/Docker image config that say how the image runs."""
    c = config.get("config") or {}
    if not isinstance(c, dict):
        raise ImageError("the image config's config section is not an object; the image is corrupt", 65)
    labels = c.get("Labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise ImageError("the image config's Labels are not strings; the image is corrupt", 65)
    text = {k: c.get(k) or "" for k in ("WorkingDir", "User", "StopSignal")}
    if not all(isinstance(v, str) for v in text.values()):
        raise ImageError("the image config's WorkingDir, User or StopSignal is not a string; the image is corrupt", 65)
    return tr.SourceConfig(
        entrypoint=_strings(c.get("Entrypoint"), "Entrypoint"), cmd=_strings(c.get("Cmd"), "Cmd"),
        env=_strings(c.get("Env"), "Env"), working_dir=text["WorkingDir"], user=text["User"],
        exposed_ports=_keys(c.get("ExposedPorts"), "ExposedPorts"), labels=dict(labels),
        volumes=_keys(c.get("Volumes"), "Volumes"), stop_signal=text["StopSignal"])


# --- opening ------------------------------------------------------------------------------------

def _open_stored(path: str, name: str) -> OpenedImage:
    # Here, not at the top: registry brings http, ssl and email, which a build from a host
    # trace never needs.
    from tracejail.registry import LayoutError, read_image

    try:
        image, _names = read_image(path)
    except LayoutError as err:
        raise ImageError(str(err), 65) from None
    config = json.loads(image.config.data or b"{}")
    if image.os and image.os != "linux" or image.architecture not in ("", "amd64"):
        raise ImageError(f"{name} is a {image.os}/{image.architecture} image; tracejail runs linux/amd64 images")
    return OpenedImage(name=name, image_id=image.config.digest, config=source_config(config), image=image,
                       compressed_size=sum(layer.blob.size for layer in image.layers))


def engine_image_id(ref: str, env: Mapping[str, str] | None) -> str:
    """The engine's ID of image `ref`, with one line saying why there is none."""
    from tracejail import docker_engine

    problem = docker_engine.engine_problem(env)
    if problem is not None:
        raise ImageError(f"{ref} is neither a file nor a directory, and {problem}")
    try:
        return docker_engine.image_id(ref, env)
    except TracejailError:
        raise ImageError(f"no image {ref} in the Docker engine (nor a file or directory of that name); "
                         "docker pull it, or give an archive or OCI layout") from None


@contextlib.contextmanager
def open_image(ref: str, env: Mapping[str, str] | None = None) -> Iterator[OpenedImage]:
    """IMAGE as record --image names it: a path (archive or layout directory) when one exists,
    else a local engine image, saved to a private temporary archive (removed afterwards)."""
    if os.path.lexists(ref):
        yield _open_stored(ref, ref)
        return
    engine_image_id(ref, env)
    with _saved(ref, env) as opened:
        yield opened


@contextlib.contextmanager
def _saved(ref: str, env: Mapping[str, str] | None) -> Iterator[OpenedImage]:
    """The engine image `ref` (known to be there), through `docker save` to a temporary archive."""
    from tracejail import docker_engine

    with tempfile.TemporaryDirectory(prefix="tracejail-save-") as tmp:
        archive = os.path.join(tmp, "image.tar")
        try:
            saved = docker_engine.run(["save", "--output", archive, ref], env, SAVE_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise ImageError(f"docker save {ref} took longer than {SAVE_TIMEOUT:g}s") from None
        if saved.returncode != 0:
            raise ImageError(f"docker save {ref} failed: {(saved.stderr.strip().splitlines() or ['?'])[-1]}")
        yield _open_stored(archive, ref)


# --- unpacking ----------------------------------------------------------------------------------

class _DigestReader:
    """The bytes of a stored blob, hashed as they are read (a layer is checked as it unpacks)."""

    def __init__(self, blob: img_mod.Blob) -> None:
        self.chunks = blob.chunks()
        self.buf = b""
        self.pos = 0
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        # A refill copies what is left plus one chunk, once per chunk; a read copies only its own
        # bytes (tarfile reads in small pieces).
        while n < 0 or len(self.buf) - self.pos < n:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.hash.update(chunk)
            self.buf, self.pos = self.buf[self.pos:] + chunk, 0
        end = len(self.buf) if n < 0 else self.pos + n
        out = self.buf[self.pos:end]
        self.pos += len(out)
        return out

    def drain(self) -> str:
        while self.read(_READ_CHUNK):
            pass
        return "sha256:" + self.hash.hexdigest()


def _unpack_layers(opened: OpenedImage, dest: str) -> int:
    """Apply every layer to `dest`; returns the unpacked files' bytes. A layer that is not what
    its digest says is an error: nothing unpacked from this image is used."""
    with LayerTree(dest) as tree:
        for number, layer in enumerate(opened.image.layers, 1):
            reader = _DigestReader(layer.blob)
            tree.apply(reader, f"layer {number}")   # type: ignore[arg-type]
            if reader.drain() != layer.blob.digest:
                raise ImageError(f"layer {number} of {opened.name} does not match its digest "
                                 f"{layer.blob.digest[:19]}; the image is corrupt", 65)
        tree.finish()
    return cachedir.tree_size(dest)


def _images_dir() -> str | None:
    root = cachedir.cache_root()
    if root is None or not cachedir.safe_dir(root, create=True):
        return None
    where = os.path.join(root, IMAGES_DIR)
    return where if cachedir.safe_dir(where, create=True) else None


def _hex(image_id: str) -> str:
    if not tr.IMAGE_ID.match(image_id):
        raise ImageError(f"image ID {image_id[:80]!r} is not a sha256 digest", 65)
    return image_id.split(":", 1)[1]


def _cached(images: str, image_id: str) -> UnpackedImage | None:
    """The cache's complete unpack of `image_id`, or None. Only a marker of our own, naming that
    very image, makes a directory count."""
    top = os.path.join(images, _hex(image_id))
    data = cachedir.read_private(os.path.join(top, MARKER), 1 << 20)
    if data is None or not cachedir.safe_dir(top, create=False):
        return None
    try:
        source = tr.source_from_json(json.loads(data))
    except (ValueError, TraceFormatError):
        return None
    if source.image_id != image_id or source.rootfs != os.path.join(top, "rootfs"):
        return None
    try:
        os.utime(os.path.join(top, MARKER))   # used now: `tracejail cache prune --older-than` keeps it
    except OSError:
        pass
    return UnpackedImage(name=source.image, image_id=image_id, rootfs=source.rootfs, config=source.config,
                         compressed_size=source.compressed_size, content_size=source.content_size, cached=True)


def _install(work: str, final: str) -> bool:
    """Move a finished unpack into its place in the cache; an incomplete or tampered one of our
    own that is there is replaced. False when the place is taken by something else."""
    for _ in range(2):
        try:
            os.rename(work, final)
            return True
        except OSError:
            if _cached(os.path.dirname(final), "sha256:" + os.path.basename(final)) is not None \
                    or not cachedir.safe_dir(final, create=False):
                return False
            stale = f"{final}.stale-{os.getpid()}"
            try:
                os.rename(final, stale)
            except OSError:
                return False
            with contextlib.suppress(OSError):
                cachedir.remove_tree(stale)
    return False


@contextlib.contextmanager
def unpacked(opened: OpenedImage, say: Any = None) -> Iterator[UnpackedImage]:
    """The image's tree: from the cache, unpacked into it, or (no cache) into a temporary
    directory that is removed when the block ends."""
    images = _images_dir()
    if images is not None:
        hit = _cached(images, opened.image_id)
        if hit is not None:
            hit.name = opened.name
            yield hit
            return
    parent = images or tempfile.gettempdir()
    work = tempfile.mkdtemp(prefix=f".{_hex(opened.image_id)[:12]}.unpack-", dir=parent)
    try:
        os.chmod(work, 0o711)   # the jail's unprivileged ids pass through it to the tree
        tree = os.path.join(work, "rootfs")
        os.mkdir(tree, 0o755)
        if say:
            say(f"unpacking {opened.name} ({len(opened.image.layers)} layers, "
                f"{opened.compressed_size / 1e6:.1f} MB)")
        content = _unpack_layers(opened, tree)
        if images is None:
            yield UnpackedImage(opened.name, opened.image_id, tree, opened.config, opened.compressed_size,
                                content, cached=False)
            return
        final = os.path.join(images, _hex(opened.image_id))
        got = UnpackedImage(opened.name, opened.image_id, os.path.join(final, "rootfs"), opened.config,
                            opened.compressed_size, content, cached=True)
        if not cachedir.write_private(os.path.join(work, MARKER), json.dumps(asdict(got.source())).encode()):
            raise ImageError(f"cannot write into the cache directory {images}")
        if _install(work, final):
            work = ""
        else:
            hit = _cached(images, opened.image_id)   # another tracejail unpacked it meanwhile
            got = hit or UnpackedImage(opened.name, opened.image_id, tree, opened.config, opened.compressed_size,
                                       content, cached=False)
        got.name = opened.name
        yield got
    finally:
        if work:
            with contextlib.suppress(OSError):
                cachedir.remove_tree(work)


@contextlib.contextmanager
def image_tree(ref: str, env: Mapping[str, str] | None = None, say: Any = None,
               expect: str | None = None) -> Iterator[UnpackedImage]:
    """IMAGE's unpacked tree, read through the engine only when the cache lacks it: a local
    engine image whose ID is in the cache is not saved again. `expect`: the image ID the caller
    needs (a trace's); another image at that name is an error."""
    if os.path.lexists(ref):
        opener = open_image(ref, env)
    else:
        image_id = engine_image_id(ref, env)
        images = _images_dir()
        hit = _cached(images, image_id) if images is not None and tr.IMAGE_ID.match(image_id) else None
        if hit is not None and expect in (None, image_id):
            hit.name = ref
            yield hit
            return
        opener = _saved(ref, env)
    with opener as opened:
        if expect is not None and opened.image_id != expect:
            raise TraceFormatError(f"{ref} is now image {opened.image_id[:19]}, but the trace was recorded "
                                   f"in {expect[:19]}; record it again, or give that image back")
        with unpacked(opened, say) as tree:
            yield tree


# --- users of the image ------------------------------------------------------------------------

def _table(root: Root, path: str) -> list[list[str]]:
    text = root.read_text(path, 1 << 22) or ""
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def image_user(root: Root, user: str) -> tuple[int, int]:
    """USER as an image config says it ("", "root", "app", "1000", "app:staff", "1000:1000"), as
    numbers, names looked up in the image's own /etc/passwd and /etc/group (as Docker does)."""
    if not user:
        return 0, 0
    name, _, group = user.partition(":")
    passwd = _table(root, "/etc/passwd")
    if name.isdigit():
        uid = int(name)
        gid = next((int(e[3]) for e in passwd if len(e) > 3 and e[2] == name and e[3].isdigit()), uid)
    else:
        entry = next((e for e in passwd if len(e) > 3 and e[0] == name), None)
        if entry is None or not entry[2].isdigit() or not entry[3].isdigit():
            raise UsageError(f"user {name!r} is not in the image's /etc/passwd; give UID[:GID]")
        uid, gid = int(entry[2]), int(entry[3])
    if group.isdigit():
        gid = int(group)
    elif group:
        found = next((e for e in _table(root, "/etc/group") if len(e) > 2 and e[0] == group), None)
        if found is None or not found[2].isdigit():
            raise UsageError(f"group {group!r} is not in the image's /etc/group; give UID:GID")
        gid = int(found[2])
    return uid, gid


def account_lines(root: Root, uid: int, gid: int) -> tuple[str, str] | None:
    """The image's own /etc/passwd line for `uid` and /etc/group line for `gid` (the group line
    may be empty), or None when the image does not know the user."""
    user = next((e for e in _table(root, "/etc/passwd") if len(e) >= 7 and e[2] == str(uid)), None)
    if user is None:
        return None
    group = next((e for e in _table(root, "/etc/group") if len(e) >= 3 and e[2] == str(gid)), None)
    # Never a password hash, wherever the image kept one (its /etc/shadow is not kept either).
    user[1] = "x"
    if group:
        group[1] = "x"
    return ":".join(user) + "\n", ":".join(group) + "\n" if group else ""


def home_of(root: Root, uid: int) -> str:
    """HOME as the runtime sets it: the user's home in the image's /etc/passwd, else "/"."""
    lines = account_lines(root, uid, uid)
    return (lines[0].split(":")[5] or "/") if lines else "/"


# --- the root of a trace ------------------------------------------------------------------------

@contextlib.contextmanager
def root_of(trace: tr.Trace, env: Mapping[str, str] | None = None, say: Any = None) -> Iterator[str]:
    """The directory a trace's paths name: "/" for a host trace; for an image trace the image's
    unpacked tree (the cached one, or the image unpacked again from where it was recorded)."""
    src = trace.source
    if src is None:
        yield "/"
        return
    images = _images_dir()
    if images is not None:
        hit = _cached(images, src.image_id)
        if hit is not None:
            yield hit.rootfs
            return
    if say:
        say(f"the unpacked image is gone: reading {src.image} again")
    with image_tree(src.image, env, say, expect=src.image_id) as tree:
        yield tree.rootfs
