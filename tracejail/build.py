"""`tracejail build`: trace -> file set -> staging plan -> FROM-scratch image (and rootfs).

    select (fileset.py) -> plan (rootfs.py) -> generated entries (/tmp, passwd, group, package
    metadata), all in plan_image, which inspect and explain share
      -> write_archive / write_oci_dir / stage + Dockerfile (image.py, rootfs.py) -> docker load
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from tracejail import __version__
from tracejail import fileset as fsel
from tracejail import image, rootfs, sensitive, shrink
from tracejail import layers as layers_mod
from tracejail import trace as tr
from tracejail.errors import TracejailError, UsageError
from tracejail.root import NodeKind, Root, SourceChanged

DEFAULT_USER = "65532:65532"
IMAGE_USER_NAME = "nonroot"

# Environment names carried from the recording into the image config.
ENV_ALLOW = re.compile(r"^(PATH|LANG|LANGUAGE|LC_[A-Z_]+|TZ|PYTHON[A-Z0-9_]*|VIRTUAL_ENV|CONDA_PREFIX|"
                       r"LD_LIBRARY_PATH|JAVA_HOME|JAVA_OPTS|NODE_[A-Z0-9_]+|GEM_HOME|GEM_PATH|"
                       r"PERL5LIB|RUBYLIB|SSL_CERT_FILE|SSL_CERT_DIR|REQUESTS_CA_BUNDLE|TERMINFO|"
                       r"MPLBACKEND|OPENBLAS_[A-Z_]+|OMP_NUM_THREADS)$")

NSSWITCH_FILES = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"

LABEL_VERSION = "io.tracejail.version"
LABEL_TRACE_DIGEST = "io.tracejail.trace.digest"
LABEL_CREATED = "org.opencontainers.image.created"
# The content options that rewrote files ("strip,bytecode-only"): verify --fix rebuilds with them.
LABEL_SHRINK = "io.tracejail.shrink"
# The init build put at PID 1 (--init): verify runs replays through it.
LABEL_INIT = "io.tracejail.init"
# --layers as given ("auto", "7"): a rebuild (verify --fix) splits the same way.
LABEL_LAYERS = "io.tracejail.layers"
# How the static import closure ran: "on", "off" (--no-import-closure) or "exclude=a,b" (verify
# --import-check recomputes what it added).
LABEL_IMPORTS = "io.tracejail.imports"


@dataclass
class BuildOptions:
    tags: list[str] = field(default_factory=list)   # -t: names to load (and push) the image as
    output: str | None = None             # archive path (-o); written only when asked, or when no
                                          # other output would hold the image
    rootfs_dir: str | None = None
    oci_dir: str | None = None
    user: str | None = None               # --user (default: DEFAULT_USER; an image trace: the image's USER)
    entrypoint: list[str] | None = None   # --entrypoint: the program (default: the recorded one)
    cmd: list[str] | None = None          # --cmd: its arguments (default: the recorded ones)
    init: bool = False                    # --init: a minimal init (tini) at PID 1
    labels: dict[str, str] = field(default_factory=dict)        # --label
    annotations: dict[str, str] = field(default_factory=dict)   # --annotation (manifest)
    layers: str = "1"                     # --layers N|auto (layers.py)
    layer_cache: bool = True              # reuse unchanged layers (with --layers); --no-cache
    push: bool = False                    # push every -t to its registry (registry.py)
    insecure_registries: list[str] = field(default_factory=list)
    iidfile: str | None = None            # write the image ID here
    metadata_file: str | None = None      # write buildx-style metadata JSON here
    env: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    load: bool = True
    strict: bool = False
    compress_level: int | None = 6
    keep_setuid: bool = False
    keep_modes: bool = False
    docker_env: dict[str, str] | None = None   # environment for the docker CLI (DOCKER_HOST)
    provenance: bool = False              # write /.tracejail/provenance.json into the image
    package_metadata: bool = True         # dpkg status.d stanzas and /etc/os-release
    sbom: str | None = None               # write an SBOM of the image to this file
    sbom_format: str = "spdx"             # "spdx" (2.3 JSON) or "cyclonedx" (1.5 JSON)
    max_file_size: int = rootfs.DEFAULT_MAX_FILE_SIZE
    root: str = "/"                       # the tree the trace's paths name (the host's / today)
    keep_owners: bool = False             # host owners as they are, instead of ownership.py's
    families_off: list[str] = field(default_factory=list)   # families.py names not to add
    import_closure: bool = True           # add what kept Python modules import (pyimports.py)
    exclude_modules: list[str] = field(default_factory=list)  # modules the import closure does not follow
    volumes: list[str] = field(default_factory=list)         # --volume DIR
    writable_volumes: bool = False        # declare every directory the run wrote in a volume
    strip: bool = False                   # strip kept ELF files (shrink.py)
    bytecode_only: bool = False           # Python modules as sourceless .pyc (shrink.py)


@dataclass
class BuildResult:
    files: fsel.FileSet
    plan: rootfs.Plan
    config: image.ImageConfig
    archive: str | None = None
    image: image.ImageResult | None = None
    loaded_id: str | None = None
    load_note: str | None = None
    rootfs_dir: str | None = None
    dockerfile: str | None = None
    warnings: list[str] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)   # said loudly: a secret in the config, a failed run
    metadata: Any = None                  # provenance.BuildMetadata: why each entry is there, packages
    sbom: str | None = None
    shrunk: Any = None                    # shrink.ShrinkResult when --strip or --bytecode-only
    layers: Any = None                    # layers.LayerSet: the layers made, and their groups
    pushed: list[Any] = field(default_factory=list)   # registry.PushResult per -t pushed

    def summary(self) -> dict[str, Any]:
        entries = self.plan.entries.values()
        files = [e for e in entries if e.kind in ("file", "hardlink")]
        by_dir: dict[str, int] = {}
        for e in entries:
            if e.kind == "file":
                d = os.path.dirname(e.path)
                by_dir[d] = by_dir.get(d, 0) + e.size
        biggest = sorted(by_dir.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        left_out: dict[str, list[str]] = {}
        for path, rule in self.files.excluded:
            left_out.setdefault(rule, []).append(path)
        for path, why in self.plan.skipped:
            left_out.setdefault(why, []).append(path)
        for path, _why in self.plan.changed:
            left_out.setdefault("changed while the image was written (build again)", []).append(path)
        return {
            "archive": self.archive,
            "image_id": self.image.image_id if self.image else None,
            "loaded_id": self.loaded_id,
            "tag": self.load_note,
            "rootfs": self.rootfs_dir,
            "files": len(files),
            "entries": len(self.plan.entries),
            "bytes": self.plan.files_size(),
            "image_size": self.image.compressed_size if self.image else None,
            "biggest_directories": [{"path": p, "bytes": b} for p, b in biggest],
            "left_out": {rule: {"count": len(paths), "examples": sorted(paths)[:5]}
                         for rule, paths in sorted(left_out.items())},
            "mode_changes": [{"path": p, "old": oct(o), "new": oct(n), "why": w}
                             for p, o, n, w in self.plan.mode_changes],
            "owned_by_image_user": [{"path": p, "why": w} for p, w in sorted(self.plan.ownership.items())],
            "families": {name: {"count": len(paths), "bytes": sum(self.plan.entries[p].size for p in paths
                                                                    if p in self.plan.entries)}
                         for name, paths in sorted(self.files.families.items())},
            "dropped_setuid": self.plan.dropped_setuid,
            "vanished": self.files.vanished,
            "unresolved_libraries": [{"name": n, "needed_by": b} for n, b in self.files.unresolved],
            "manifest_digest": self.image.manifest_digest if self.image else None,
            "layers": [{"name": g.name, "digest": la.blob.digest, "size": la.blob.size, "files": la.files,
                        "content_bytes": la.content_bytes, "cached": la.cached}
                       for g, la in zip(self.layers.groups, self.layers.layers)] if self.layers else [],
            "pushed": [{"reference": p.reference, "digest": p.manifest_digest, "uploaded": len(p.uploaded),
                        "skipped": len(p.skipped), "mounted": len(p.mounted), "bytes_uploaded": p.bytes_uploaded}
                       for p in self.pushed],
            "entrypoint": self.config.entrypoint,
            "cmd": self.config.cmd,
            "user": self.config.user,
            "exposed_ports": self.config.exposed_ports,
            "warnings": self.warnings,
            "alerts": self.alerts,
            "sbom": self.sbom,
            "packages": [{"ecosystem": p.ecosystem, "name": p.name, "version": p.version}
                         for p in (self.metadata.packages if self.metadata else [])],
            "shrink": self._shrink_summary(),
            "python_imports": self._imports_summary(),
        }

    def _imports_summary(self) -> dict[str, Any]:
        """What the static import closure added: per module, what imports it and where (with
        --bytecode-only, a module's source counts as the sourceless .pyc that replaced it)."""
        from tracejail.pyimports import sourceless_standin

        def in_image(f: str) -> str | None:
            if f in self.plan.entries:
                return f
            standin = sourceless_standin(f)
            return standin if standin in self.plan.entries else None

        added = [a for a in self.files.python_imports if any(in_image(f) for f in a.files)]
        files = [p for a in added for p in dict.fromkeys(in_image(f) for f in a.files) if p]
        return {
            "modules": len(added),
            "files": len(files),
            "bytes": sum(self.plan.entries[f].size for f in files),
            "added": [{"module": a.name, "imported_by": a.importer, "line": a.line, "via": a.via or None,
                       "files": list(a.files)} for a in added],
            "not_parsed": [{"path": p, "why": w} for p, w in self.files.imports_not_parsed],
            "excluded_modules": self.files.modules_excluded,
        }

    def _shrink_summary(self) -> dict[str, Any]:
        if self.shrunk is None:
            return {}
        kept: dict[str, dict[str, list[str]]] = {}
        for option, path, why in self.shrunk.kept:
            kept.setdefault(option, {}).setdefault(why, []).append(path)
        return {
            "savings": {s.option: s.to_json() for s in self.shrunk.savings},
            "kept_as_is": {option: {why: {"count": len(paths), "examples": sorted(paths)[:5]}
                                    for why, paths in sorted(reasons.items())}
                           for option, reasons in sorted(kept.items())},
        }


def parse_user(user: str) -> tuple[int, int]:
    if user == "root":
        return 0, 0
    m = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    if not m:
        raise UsageError(f"--user {user!r}: give UID:GID (numbers) or root")
    uid = int(m.group(1))
    return uid, int(m.group(2)) if m.group(2) is not None else uid


def build_user(trace: tr.Trace, root: Root, options: BuildOptions) -> tuple[int, int]:
    """Who the image runs as: --user; else, for a trace recorded in an image, that image's USER
    (names looked up in its own /etc/passwd); else DEFAULT_USER."""
    from tracejail import source

    if trace.source is not None:
        return source.image_user(root, options.user if options.user is not None else trace.source.config.user)
    return parse_user(options.user if options.user is not None else DEFAULT_USER)


def name_values(items: list[str] | tuple[str, ...], option: str | None = None, form: str = "NAME=VALUE",
              ) -> dict[str, str]:
    """NAME=VALUE items (--env, --label, --annotation) as a dict; an item without `=` or a name
    is a usage error of `option`."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"{option or 'environment'} {item!r}: give {form}")
        out[name] = value
    return out


def image_env(run: tr.Run, extra: list[str], src: tr.SourceConfig | None = None) -> list[str]:
    """The image's Env: allowed recorded variables whose values hold no secret (whatever the
    trace says: it may be old or foreign), then --env. A run recorded in an image keeps that
    image's own Env, any name, less secrets."""
    env: dict[str, str] = {}
    items = src.environment if src is not None else run.environment
    for name, value in items.items():
        if (src is not None or ENV_ALLOW.match(name)) and not _holds_secret(name, value):
            env[name] = value
    env.update(name_values(extra, "--env"))
    return [f"{k}={v}" for k, v in sorted(env.items())]


def _holds_secret(name: str, value: str) -> bool:
    """A variable the image's Env never carries: a secret, or the placeholder where one was."""
    return tr.REDACTED in value or sensitive.secret_in_variable(name, value)


def image_labels(source: Mapping[str, str], given: Mapping[str, str], image_name: str = "the source image",
                 ) -> tuple[dict[str, str], list[str]]:
    """The labels the image carries before tracejail's own: the source image's, less those that hold
    a secret (or the placeholder where the trace redacted one), then --label as given; and an alert
    for each secret left out or given."""
    secret = sorted(k for k, v in source.items() if tr.REDACTED in v or sensitive.secret_in_label(k, v))
    labels = {k: v for k, v in source.items() if k not in secret}
    alerts = [f"{image_name}'s labels hold secrets, left out of the image: {', '.join(secret)}"] if secret else []
    labels.update(given)
    return labels, alerts


def annotation_alerts(labels: Mapping[str, str], annotations: Mapping[str, str]) -> list[str]:
    """--label and --annotation values that hold a secret: they are kept as given, and anyone who
    can pull the image reads them."""
    return [f"{option} {name} holds a secret ({why}); anyone who can pull the image can read it"
            for option, items in (("--label", labels), ("--annotation", annotations))
            for name, value in items.items() if (why := sensitive.secret_in_label(name, value))]


def secret_alerts(command: list[str], extra_env: list[str]) -> list[str]:
    """What in the image's config (`command`: Entrypoint then Cmd) holds a secret, or stands where
    the recorded one held one."""
    alerts = []
    placeholders = [i for i, w in enumerate(command) if tr.REDACTED in w]
    where = "the image's command (Entrypoint and Cmd) holds"
    if placeholders:
        alerts.append(f"{where} {tr.REDACTED} (argument {', '.join(map(str, placeholders))}) where the recorded "
                      "command had a secret, so the image cannot run it as recorded: give the command with "
                      "--entrypoint/--cmd, or have the program read the secret from its environment at run "
                      "time (docker run -e)")
    _, held = sensitive.redact_argv(command)
    held = [i for i in held if i not in placeholders]
    if held:
        alerts.append(f"{where} a secret (argument {', '.join(map(str, held))}): anyone who can pull the image "
                      "can read it; pass it at run time instead (docker run -e)")
    for item in extra_env:
        name, _, value = item.partition("=")
        if sensitive.secret_in_variable(name, value):
            alerts.append(f"--env {name} holds a secret and is in the image's config, readable by anyone who "
                          "can pull the image; pass it at run time instead (docker run -e)")
    return alerts


def content_labels(options: BuildOptions, init_path: str | None = None) -> dict[str, str]:
    """The labels that record how build options shaped the image, so a rebuild (verify --fix)
    and verify --import-check can do as the build did; read back by content_options."""
    labels = {LABEL_IMPORTS: "off" if not options.import_closure else
              "exclude=" + ",".join(options.exclude_modules) if options.exclude_modules else "on"}
    shrunk = [name for name, on in (("strip", options.strip), ("bytecode-only", options.bytecode_only)) if on]
    if shrunk:
        labels[LABEL_SHRINK] = ",".join(shrunk)
    if init_path:
        labels[LABEL_INIT] = init_path
    if options.layers != "1":
        labels[LABEL_LAYERS] = options.layers
    return labels


def content_options(labels: Mapping[str, str]) -> dict[str, Any]:
    """The BuildOptions fields an image's content_labels record (an image without them: defaults)."""
    shrunk = set(labels.get(LABEL_SHRINK, "").split(","))
    imports = labels.get(LABEL_IMPORTS, "on")
    excluded = imports.removeprefix("exclude=").split(",") if imports.startswith("exclude=") else []
    layers = labels.get(LABEL_LAYERS, "1")
    return {"strip": "strip" in shrunk, "bytecode_only": "bytecode-only" in shrunk,
            "import_closure": imports != "off", "exclude_modules": [m for m in excluded if m],
            "init": LABEL_INIT in labels, "layers": layers if layers_mod.parse_layers(layers) else "1"}


# Inits --init looks for on the host, best first: a static tini needs nothing else in the image.
INIT_CANDIDATES = ("/usr/bin/tini-static", "/usr/bin/tini", "/usr/sbin/tini", "/usr/bin/catatonit",
                   "/usr/libexec/podman/catatonit")


def find_init(root: Root) -> str:
    """The init --init puts at PID 1: tini or catatonit from the root's packages."""
    for path in INIT_CANDIDATES:
        res = root.resolve(path)
        if res.ok and res.kind is NodeKind.FILE:
            return path
    where = "on the host (apt-get install tini)" if root.is_host else \
        f"in the image the trace was recorded in ({root.path}; add it to that image)"
    raise UsageError(f"--init needs tini or catatonit {where}; none found in " + ", ".join(INIT_CANDIDATES))


def created_time(run: tr.Run) -> str:
    """The image's Created: SOURCE_DATE_EPOCH when set, else when the recording started (so the
    same trace always gives the same image, and `docker images` shows a real age)."""
    epoch = image.source_date_epoch()
    if epoch is not None:
        return image.rfc3339(epoch)
    try:
        when = datetime.fromisoformat(run.started.replace("Z", "+00:00"))
    except ValueError:
        return image.rfc3339(0)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return image.rfc3339(max(0, int(when.timestamp())))


def in_image(plan: rootfs.Plan, root: Root, path: str, want_dir: bool = False) -> bool:
    """Whether `path` reaches a node of the image: the root's one resolver walks it, and the plan
    must hold every hop (each directory and symlink on the way, and the node reached)."""
    res = root.resolve(path)
    if not res.ok or (want_dir and res.kind is not NodeKind.DIR):
        return False
    return all(h.path in plan.entries for h in res.hops) and (res.path == "/" or res.path in plan.entries)


# Variables whose value names files or directories (a list of them, for the *PATH ones): in the
# image they keep only what the image holds.
PATH_VARIABLES = re.compile(r"^(PATH|LD_LIBRARY_PATH|PYTHONPATH|PYTHONHOME|PYTHONSTARTUP|VIRTUAL_ENV|"
                            r"CONDA_PREFIX|JAVA_HOME|GEM_HOME|GEM_PATH|PERL5LIB|RUBYLIB|SSL_CERT_FILE|"
                            r"SSL_CERT_DIR|REQUESTS_CA_BUNDLE|TERMINFO|NODE_PATH)$")


def filter_env(env: list[str], plan: rootfs.Plan, root: Root) -> tuple[list[str], list[str]]:
    """Keep only values that make sense in the image: directories of PATH-like lists that exist
    there, files that were kept. Returns (env, what was dropped)."""
    out, dropped = [], []
    for item in env:
        name, _, value = item.partition("=")
        if not PATH_VARIABLES.match(name) or not value.startswith("/"):
            out.append(item)
            continue
        is_list = name.endswith("PATH") or name in ("PERL5LIB", "RUBYLIB", "SSL_CERT_DIR")
        parts = value.split(":") if is_list else [value]
        kept = [p for p in parts if p.startswith("/") and in_image(plan, root, p, want_dir=name == "PATH")]
        if kept:
            out.append(f"{name}={':'.join(kept)}")
            if kept != parts:
                dropped.append(f"{name}: {', '.join(p for p in parts if p not in kept)}")
        else:
            dropped.append(f"{name} (not in the image: {value})")
    return out, dropped


def trace_digest(path: str) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()


def _default_archive(tag: str | None) -> str:
    if not tag:
        return "image.tar"
    name = tag.rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]", "_", name.split("@")[0].replace(":", "_")) + ".tar"


def _generated_entries(p: rootfs.Plan, uid: int, gid: int, workdir: str, home: str | None = None,
                       account: tuple[str, str] | None = None) -> list[str]:
    """/tmp, and passwd/group that know root and the image user (whose home is `home`, the
    recorded HOME when the run used it), so getpwuid works. `account`: the image user's own
    passwd and group lines (a trace recorded in an image that knows the user), kept as they are."""
    notes = []
    p.entries["/tmp"] = rootfs.Entry("/tmp", "dir", 0o1777, None, None, 0, 0, 0)
    p.generated["/tmp"] = "created by `tracejail build`: programs expect a world-writable /tmp (mode 1777)"

    def add_file(path: str, content: str, why: str) -> None:
        src = os.path.join(workdir, path.strip("/").replace("/", "_"))
        with open(src, "w", encoding="utf-8") as f:
            f.write(content)
        if "/etc" not in p.entries:
            p.entries["/etc"] = rootfs.Entry("/etc", "dir", 0o755, None, None, 0, 0, 0)
        p.entries[path] = rootfs.Entry(path, "file", 0o644, src, None, len(content.encode()), 0, 0)
        p.generated[path] = why

    if account is not None:
        home = account[0].split(":")[5] or "/"
    home = home or ("/home/nonroot" if uid != 0 else "/root")
    passwd_line = account[0] if account else f"{IMAGE_USER_NAME}:x:{uid}:{gid}:{IMAGE_USER_NAME}:{home}:/sbin/nologin\n"
    group_line = account[1] if account and account[1] else f"{IMAGE_USER_NAME}:x:{gid}:\n"
    for path, name_line, user_line, what in (
        ("/etc/passwd", "root:x:0:0:root:/root:/sbin/nologin\n", passwd_line, "the image user, so getpwuid() works"),
        ("/etc/group", "root:x:0:\n", group_line, "the image user's group"),
    ):
        entry = p.entries.get(path)
        if entry is not None and entry.kind != "file":
            continue   # a symlink to somewhere: leave the host's arrangement alone
        # (read from the very node the plan judged)
        host_text = rootfs.read_entry(entry).decode("utf-8", "replace") if entry is not None and entry.source else ""
        ident = uid if path == "/etc/passwd" else gid
        known = {line.split(":")[2] for line in host_text.splitlines() if line.count(":") >= 2}
        text = host_text or name_line
        if str(ident) not in known and ident != 0:
            text = (text if text.endswith("\n") or not text else text + "\n") + user_line
        if text != host_text:
            add_file(path, text, f"written by `tracejail build`: the tree's own {path} plus {what}" if host_text
                     else f"written by `tracejail build`: root and {what}")
            notes.append(f"{path}: {'host file plus' if host_text else 'generated with'} root and uid/gid {ident}")
    if "/etc/nsswitch.conf" not in p.entries:
        # Non-root programs look themselves up (bash does, as any uid but 0), and glibc reads
        # nsswitch.conf first: say "files", which the passwd/group above answer, rather than
        # leave a lookup that fails in the image but never happened in a root recording.
        add_file("/etc/nsswitch.conf", NSSWITCH_FILES, "written by `tracejail build`: passwd and group "
                 "from files, so lookups of the image user work (no recorded run read one)")
        notes.append("/etc/nsswitch.conf: generated (passwd, group: files; hosts: files dns)")
    if uid != 0 and home not in p.entries:
        parts = home.strip("/").split("/")
        for n in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:n])
            if d not in p.entries:
                mine = d == home
                p.entries[d] = rootfs.Entry(d, "dir", 0o755, None, None, 0, uid if mine else 0, gid if mine else 0)
                p.generated[d] = "created by `tracejail build`: " + (
                    "the image user's home directory" if mine else "a parent of the image user's home")
    return notes


@dataclass
class ImagePlan:
    """What the image holds, before anything is written: the files chosen, who owns what, and
    the nodes (build, inspect and explain all start from this one computation)."""

    files: fsel.FileSet
    ownership: Any            # ownership.Ownership
    plan: rootfs.Plan
    db: Any                   # dpkg.Database | None: the root's package database, read once
    init: str | None = None   # the init --init added (find_init), to put before the program
    notes: list[str] = field(default_factory=list)   # what build writes itself, said once


def plan_image(trace: tr.Trace, root: Root, options: BuildOptions, workdir: str,
               extra_excluded: tuple[str, ...] = ()) -> ImagePlan:
    """Choose the files (trace, ELF closure, families, --include/--exclude), decide who owns
    them (ownership.py), plan every node, and add what build writes itself (passwd, group,
    nsswitch.conf, /tmp, the user's home, package metadata; content in `workdir`), as `options`
    say. build, inspect and explain all start from this one plan."""
    from tracejail import dpkg, ownership, provenance, source

    uid, gid = build_user(trace, root, options)
    init = find_init(root) if options.init else None
    include = [*options.include, init] if init else options.include
    files = fsel.select(trace, fsel.SelectOptions(
        include=tuple(include), exclude=tuple(options.exclude), families_off=tuple(options.families_off),
        import_closure=options.import_closure, exclude_modules=tuple(options.exclude_modules),
        extra_excluded_paths=extra_excluded), root)
    db = dpkg.read_database(root)
    kept: set[str] = set()     # every node the plan will hold: every hop of every kept path
    for path in [*files.wanted, *files.dirs_only]:
        kept.update(h.path for h in root.resolve(path).hops if h.kind is not NodeKind.SYMLINK)
    own = ownership.compute(trace, root, kept,
                            package_owned=(lambda p: bool(db.owners_of(p))) if db is not None else None)
    stage_opts = rootfs.StageOptions(keep_setuid=options.keep_setuid, keep_modes=options.keep_modes,
                                     image_uid=uid, image_gid=gid, max_file_size=options.max_file_size,
                                     secrets=frozenset(files.secrets),
                                     owned={} if uid == 0 else own.owned, keep_owners=options.keep_owners)
    plan = rootfs.plan(sorted(files.wanted), root=root, options=stage_opts, dirs_only=sorted(files.dirs_only))
    account = source.account_lines(root, uid, gid) if trace.source is not None and uid != 0 else None
    notes = _generated_entries(plan, uid, gid, workdir, own.home if uid != 0 else None, account)
    if options.package_metadata and db is not None:
        notes += provenance.add_package_metadata(plan, workdir, root, db)
    return ImagePlan(files, own, plan, db, init, notes)


def _outputs(options: BuildOptions) -> tuple[list[image.Reference], str | None, bool]:
    """(-t names, the archive to keep, whether to load), decided before any work. An archive is
    written only with -o, or when nothing else would hold the image (no -t to load or push, no
    --rootfs or --oci-dir): `-t app` alone loads the image and leaves no file behind."""
    refs = [image.parse_reference(t) for t in options.tags]   # a bad name fails before any work
    if options.push and not refs:
        raise UsageError("--push needs -t REGISTRY/REPO:TAG")
    load = bool(refs) and options.load
    archive = options.output
    if archive is None and not (load or options.push or options.rootfs_dir or options.oci_dir):
        archive = _default_archive(options.tags[0] if options.tags else None)
    return refs, archive, load


def build(trace_path: str, options: BuildOptions,
          progress: Callable[[str, int, int], None] | None = None,
          say: Callable[[str], None] | None = None) -> BuildResult:
    """Build the image described by `options` from the trace at `trace_path`.

    The layers are made once, then written to every output asked for (archive, --oci-dir,
    the engine, registries). `say` gets one line per step (--progress plain)."""
    from tracejail import source

    trace = tr.load(trace_path)
    if not trace.runs:
        raise TracejailError(f"{trace_path} holds no runs; record one with `tracejail record`")
    # Bad options fail before any work (an image trace's tree may have to be unpacked again).
    if options.user is not None and trace.source is None:
        parse_user(options.user)
    max_layers = layers_mod.parse_layers(options.layers)
    if max_layers is None:
        raise UsageError(f"--layers {options.layers!r}: give a number from 1 to {layers_mod.MAX_LAYERS}, or auto")
    name_values(options.env, "--env")
    refs, archive, load = _outputs(options)
    for out in (archive, options.sbom, options.iidfile, options.metadata_file):
        if out:
            tr.check_writable(out)
    if options.rootfs_dir:
        image.check_dockerfile_slot(options.rootfs_dir)
    if options.strip:
        shrink.strip_tool()      # missing binutils fails before any work
    # The one place every stage takes its tree from: the host's / (or options.root), or the
    # image the trace was recorded in.
    with source.root_of(trace, options.docker_env, say) as image_root, \
            tempfile.TemporaryDirectory(prefix="tracejail-build-") as workdir:
        root = Root(image_root if trace.source is not None else options.root)
        return _build(trace, trace_path, options, root, workdir, max_layers, refs, archive, load, progress, say)


def _build(trace: tr.Trace, trace_path: str, options: BuildOptions, root: Root, workdir: str, max_layers: int,
           refs: list[image.Reference], archive: str | None, load: bool,
           progress: Callable[[str, int, int], None] | None,
           say: Callable[[str], None] | None) -> BuildResult:

    run = trace.runs[0]
    uid, gid = build_user(trace, root, options)
    extra_env = name_values(options.env, "--env")
    result_warnings: list[str] = []
    if load:
        from tracejail import docker_engine

        problem = docker_engine.engine_problem(options.docker_env)
        if problem is not None:
            load = False
            if options.push or archive or options.oci_dir:
                result_warnings.append(f"not loaded into Docker: {problem}")
            else:
                # Nothing is lost: the image goes to an archive instead, and the note says how to load it.
                archive = _default_archive(options.tags[0])
                result_warnings.append(f"{problem}: the image is in {archive} (docker load -i {archive})")
                tr.check_writable(archive)

    def step(line: str) -> None:
        if say is not None:
            say(line)

    if trace.source is not None and uid == 0 and options.user is None:
        result_warnings.append(f"the image runs as root, as {trace.source.image} does; --user UID:GID (or a user "
                               f"of the image, e.g. --user {DEFAULT_USER}) makes it run as an ordinary user")
    step("planning: trace, ELF closure, imports, ownership")
    chosen = plan_image(trace, root, options, workdir,
                        (os.path.abspath(trace_path),) + ((os.path.abspath(archive),) if archive else ()))
    files, own, plan, db, init_path = chosen.files, chosen.ownership, chosen.plan, chosen.db, chosen.init

    def warn_or_fail(msg: str) -> None:
        if options.strict:
            raise TracejailError(msg + " (--strict)")
        result_warnings.append(msg)

    if files.vanished:
        warn_or_fail(f"{len(files.vanished)} traced file(s) no longer exist on the host, "
                     f"first: {files.vanished[0]}")
    if files.unresolved:
        name, needer = files.unresolved[0]
        warn_or_fail(f"{len(files.unresolved)} library name(s) could not be resolved, first: "
                     f"{name} needed by {needer}")
    for err in files.closure_errors:
        result_warnings.append(err)

    if plan.missing:
        warn_or_fail(f"{len(plan.missing)} file(s) vanished while planning, first: {plan.missing[0]}")

    # ENTRYPOINT is the program, CMD its arguments, so `docker run IMAGE OTHER ARGS` works; an
    # image's own default command keeps its Entrypoint/Cmd split, so it is run the same way.
    src = trace.source.config if trace.source is not None else None
    own_default = src is not None and (src.entrypoint or src.cmd) and run.argv == src.entrypoint + src.cmd
    if own_default and options.entrypoint is None and options.cmd is None:
        entrypoint, cmd = list(src.entrypoint), list(src.cmd)   # type: ignore[union-attr]
    else:
        entrypoint = options.entrypoint or [run.executable]
        cmd = options.cmd if options.cmd is not None else ([] if options.entrypoint else run.argv[1:])
    alerts = secret_alerts([*entrypoint, *cmd], options.env)
    if init_path:
        entrypoint = [init_path, "--", *entrypoint]
    if not entrypoint and not cmd:
        entrypoint = [run.executable]
    alerts += [f"{problem}: the image reproduces the run as recorded, failure included"
               for problem in tr.run_problems(run)]
    ports = [f"{p}/tcp" for p in sorted({p for r in trace.runs for p in r.listening_ports})]
    ports = list(dict.fromkeys([*(src.exposed_ports if src else []), *ports]))
    # The source image's labels, then --label; tracejail's own labels are what verify reads back,
    # so nothing replaces them.
    labels, said = image_labels(src.labels if src else {}, options.labels,
                                trace.source.image if trace.source else "the source image")
    alerts += said + annotation_alerts(options.labels, options.annotations)
    labels.update({LABEL_VERSION: __version__, LABEL_TRACE_DIGEST: trace_digest(trace_path)})
    labels.update(content_labels(options, init_path))
    volumes = list(dict.fromkeys([*(src.volumes if src else []), *(os.path.normpath(v) for v in options.volumes),
                                  *(own.written_dirs if options.writable_volumes else [])]))
    for v in volumes:
        if not v.startswith("/"):
            raise UsageError(f"--volume {v!r}: give an absolute path in the image")
    created = created_time(run)
    labels[LABEL_CREATED] = created

    notes = list(chosen.notes)
    shrunk = None
    if options.strip or options.bytecode_only:
        step("shrinking: " + ", ".join(o for o, on in (("--strip", options.strip),
                                                      ("--bytecode-only", options.bytecode_only)) if on))
        shrunk = shrink.shrink(plan, workdir, strip=options.strip, bytecode_only=options.bytecode_only,
                               read=shrink.read_paths(trace, root) if options.bytecode_only else set(),
                               owned=plan.ownership)
    from tracejail import provenance

    metadata = provenance.add_build_metadata(
        trace, files, plan, workdir, write_provenance=options.provenance, trace_digest=labels[LABEL_TRACE_DIGEST],
        root=root, db=db, derived=shrunk.derived if shrunk else {})
    notes += metadata.notes
    # The recorded environment, less what points outside the image; --env exactly as given.
    recorded, dropped = filter_env(image_env(run, [], src), plan, root)
    env_items = [f"{k}={v}" for k, v in sorted({**name_values(recorded), **extra_env}.items())]
    if dropped:
        notes.append("environment not carried into the image (it names what the image does not hold): "
                     + "; ".join(dropped))
    if src is not None:
        secret = sorted(k for k, v in src.environment.items() if _holds_secret(k, v))
        if secret:
            alerts.append(f"{trace.source.image}'s Env holds secrets, left out of the image: {', '.join(secret)} "   # type: ignore[union-attr]
                          "(pass them at run time: docker run -e)")
    if own.home and uid != 0 and not any(e.startswith("HOME=") for e in env_items):
        env_items = sorted(env_items + [f"HOME={own.home}"])
    cfg = image.ImageConfig(
        entrypoint=entrypoint, cmd=cmd, env=env_items, working_dir=run.cwd, volumes=volumes,
        user=f"{uid}:{gid}", exposed_ports=ports, labels=labels, created=created,
        stop_signal=src.stop_signal if src else "")
    result = BuildResult(files=files, plan=plan, config=cfg, archive=archive, warnings=result_warnings,
                         alerts=alerts, metadata=metadata, shrunk=shrunk)
    total = plan.files_size()

    def bar(name: str) -> Callable[[int], None] | None:
        if progress is None:
            return None
        return lambda n: progress(name, n, total)

    def changed(entry: rootfs.Entry, err: SourceChanged) -> None:
        # A file swapped or rewritten between planning and copying is never read: it is
        # left out of this output (and named), or the build fails with --strict.
        if options.strict:
            raise TracejailError(f"{err} (--strict)")
        if (entry.path, str(err)) not in plan.changed:
            plan.changed.append((entry.path, str(err)))

    if options.rootfs_dir:
        step(f"staging the tree in {options.rootfs_dir}")
        rootfs.stage(plan, options.rootfs_dir, progress=bar("staging"), on_changed=changed)
        result.rootfs_dir = options.rootfs_dir
        result.dockerfile = image.write_dockerfile(options.rootfs_dir, cfg)
    if archive or options.oci_dir or load or options.push:
        near = os.path.dirname(os.path.abspath(archive or options.oci_dir or "."))
        with image.blob_workdir(near) as blob_dir:
            img = _make_image(plan, cfg, options, max_layers, blob_dir, workdir, files, own, metadata,
                              bar("compressing"), changed, step, result)
            _write_outputs(img, refs, archive, load, options, blob_dir, step, result, progress)
    for path, why in plan.changed:
        result_warnings.append(f"left out {path}: {why}")
        plan.entries.pop(path, None)
    if options.sbom:
        from tracejail import sbom

        sbom.write(options.sbom, options.sbom_format, options.tags[0] if options.tags else "image",
                   metadata.packages, plan, image.rfc3339(image.source_date_epoch() or int(time.time())))
        result.sbom = options.sbom
    result.warnings.extend(notes)
    return result


def _make_image(plan: rootfs.Plan, cfg: image.ImageConfig, options: BuildOptions, max_layers: int,
                blob_dir: str, workdir: str, files: fsel.FileSet, own: Any, metadata: Any,
                progress: Callable[[int], None] | None, changed: rootfs.OnChanged,
                step: Callable[[str], None], result: BuildResult) -> image.Image:
    """Group the plan into layers (layers.py), make each once (or take it from the cache), and
    assemble config and manifest."""
    written_by_build = frozenset(p for p, e in plan.entries.items()
                                 if e.source is not None and e.source.startswith(workdir + os.sep))
    if max_layers == 1:
        groups = [layers_mod.LayerGroup("rootfs", layers_mod.Tier.OTHER, [p for p in plan.entries if p != "/"])]
    else:
        deb = {f: p.name for p in metadata.packages if p.ecosystem == "deb" for f in p.files}
        pypi = {f: p.name for p in metadata.packages if p.ecosystem == "pypi" for f in p.files}
        derived = set(result.shrunk.derived) if result.shrunk else set()
        origins = layers_mod.Origins(deb=deb, pypi=pypi, interpreter_prefixes=tuple(own.prefixes),
                                     app_trees=tuple(own.trees),
                                     generated=frozenset(p for p in written_by_build if p not in derived)
                                     | frozenset(p for p, e in plan.entries.items() if e.kind == "dir"
                                                 and e.source is None))
        groups = layers_mod.limit(layers_mod.group(plan, origins), max_layers)
    cache = None
    cache_dir = layers_mod.cache_dir()
    if max_layers > 1 and options.layer_cache and options.compress_level is not None and cache_dir:
        try:
            cache = layers_mod.LayerCache(cache_dir)
        except OSError as err:
            result.warnings.append(f"layer cache not used ({err.strerror}: {cache_dir})")
    made = layers_mod.make_layers(plan, groups, blob_dir, compress_level=options.compress_level, cache=cache,
                                  generated=written_by_build, progress=progress, on_changed=changed)
    for n, layer in enumerate(made.layers, 1):
        how = "from the cache" if layer.cached else "made"
        step(f"layer {n}/{len(made.layers)} {layer.name}: {layer.files} files, "
             f"{layer.uncompressed_size} bytes -> {layer.blob.size} ({how})")
    if cache is not None:
        cache.prune()
    img = image.assemble(made.layers, cfg, options.annotations)
    result.layers = made
    return img


def _write_outputs(img: image.Image, refs: list[image.Reference], archive: str | None, load: bool,
                   options: BuildOptions, blob_dir: str, step: Callable[[str], None], result: BuildResult,
                   progress: Callable[[str, int, int], None] | None) -> None:
    """Write the one image to every output asked for."""
    if options.oci_dir:
        step(f"writing the OCI layout {options.oci_dir}")
        image.image_result(image.write_image_dir(img, options.oci_dir, refs), img, refs)
    if archive:
        step(f"writing {archive}")
        image.write_image_archive(img, archive, refs)
    result.image = image.image_result(archive or options.oci_dir or "", img, refs)
    if load:
        from tracejail import docker_engine

        # An archive only for the engine, in the private blob directory: gone with it.
        to_load = archive or image.write_image_archive(img, os.path.join(blob_dir, "load.tar"), refs)
        step("loading into the Docker engine")
        result.loaded_id = docker_engine.load(to_load, [r.familiar for r in refs], options.docker_env)
        result.load_note = ", ".join(options.tags)
    if options.push:
        from tracejail import registry

        for ref in refs:
            step(f"pushing {ref.full}")
        result.pushed = registry.push(img, refs, registry.PushOptions(
            insecure_registries=tuple(options.insecure_registries), progress=progress,
            environ=options.docker_env))
    if options.iidfile:
        _write_small(options.iidfile, img.image_id)
    if options.metadata_file:
        import json

        meta = {"containerimage.config.digest": img.image_id, "containerimage.digest": img.manifest.digest,
                "containerimage.descriptor": img.manifest.descriptor(),
                "image.name": ",".join(r.full for r in refs)}
        _write_small(options.metadata_file, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _write_small(path: str, text: str) -> None:
    with image.atomic_file(path) as f:
        f.write(text.encode())
