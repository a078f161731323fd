"""Which host files go into the image, and why: the traced union, the ELF closure, companions.

`select(trace, options)` is pure apart from reading the host filesystem: it returns a FileSet
whose `wanted` maps each host path to the reasons it is there (`explain` shows them) and whose
`excluded` says what was left out by which rule (the build summary lists them).
"""
from __future__ import annotations

import fnmatch
import os
import re
import stat as stat_mod
from dataclasses import dataclass, field
from typing import Iterable

from tracejail import trace as tr

VIRTUAL_ROOTS = ("/proc", "/sys", "/dev", "/run")

# Never copied unless named with --include: credentials and private keys.
SENSITIVE_GLOBS = (
    "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers",
    "/etc/sudoers.d/*", "/etc/ssl/private/*", "/etc/ssh/ssh_host_*_key",
    "*/.ssh/*", "*/.aws/*", "*/.docker/config.json", "*/.netrc", "*/.git-credentials",
    "*/.pgpass", "*/.kube/config", "*/.config/gcloud/*", "*/.azure/*", "*/.gnupg/*",
    "*/.bash_history", "*/.zsh_history", "*/.sh_history", "*/.python_history",
    "*/.psql_history", "*/.mysql_history", "*/.sqlite_history", "*/.node_repl_history",
    "*/.lesshst", "*/.viminfo",
    "*/id_rsa", "*/id_dsa", "*/id_ecdsa", "*/id_ed25519", "*.key",
)
_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")


@dataclass(frozen=True)
class SelectOptions:
    include: tuple[str, ...] = ()         # host paths (files or whole trees) always kept
    exclude: tuple[str, ...] = ()         # globs dropped after everything else
    host_root: str = "/"
    extra_excluded_paths: tuple[str, ...] = ()   # e.g. the trace file itself
    use_closure: bool = True


@dataclass
class FileSet:
    wanted: dict[str, list[str]] = field(default_factory=dict)   # host path -> reasons
    dirs_only: set[str] = field(default_factory=set)            # only stat'ed/listed directories
    excluded: list[tuple[str, str]] = field(default_factory=list)   # (path, rule)
    vanished: list[str] = field(default_factory=list)           # traced, gone from the host now
    unresolved: list[tuple[str, str]] = field(default_factory=list)  # (library name, needed by)
    closure_errors: list[str] = field(default_factory=list)

    def want(self, path: str, reason: str) -> None:
        reasons = self.wanted.setdefault(path, [])
        if reason not in reasons:
            reasons.append(reason)


def is_sensitive(path: str) -> bool:
    name_hit = any(fnmatch.fnmatchcase(path, g) for g in SENSITIVE_GLOBS)
    if name_hit:
        return True
    if path.endswith((".pem", ".crt", ".der")) or "/private/" in path:
        try:
            with open(path, "rb") as f:
                return bool(_PRIVATE_KEY.search(f.read(65536)))
        except OSError:
            return False
    return False


def under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def host_normalize(path: str) -> tuple[str, list[str]]:
    """Resolve `.`, `..` and `//` the way the kernel would on the host.

    Returns the normalised path and the prefixes that were walked through before a `..`
    (their symlinks must be kept so the program's own spelling still works in the image).
    """
    parts = path.split("/")
    current = ""
    via: list[str] = []
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if current:
                via.append(current)
                real = os.path.realpath(current)
                current = os.path.dirname(real) if real != "/" else ""
                if current == "/":
                    current = ""
            continue
        current = f"{current}/{part}"
    return current or "/", via


def _matches_any(path: str, globs: Iterable[str]) -> str | None:
    for g in globs:
        if fnmatch.fnmatchcase(path, g) or fnmatch.fnmatchcase(path, g.rstrip("/") + "/*"):
            return g
    return None


def select(trace: tr.Trace, options: SelectOptions = SelectOptions()) -> FileSet:
    fs = FileSet()
    includes = [os.path.normpath(os.path.abspath(p)) for p in options.include]
    self_dir = os.path.dirname(os.path.abspath(__file__))
    extra_excluded = {os.path.abspath(p) for p in options.extra_excluded_paths}

    def included_by_name(path: str) -> bool:
        return any(under(path, inc) for inc in includes)

    def consider(path: str, reason: str, *, dir_only: bool = False) -> None:
        for top in VIRTUAL_ROOTS:
            if under(path, top):
                fs.excluded.append((path, f"{top} is provided by the container runtime"))
                return
        if under(path, self_dir) or path in extra_excluded:
            fs.excluded.append((path, "tracejail itself / the trace"))
            return
        if is_sensitive(path) and not included_by_name(path):
            fs.excluded.append((path, "sensitive file (credentials, keys, history); --include it to keep"))
            return
        if dir_only:
            fs.dirs_only.add(path)
        fs.want(path, reason)

    for rec in trace.files.values():
        if not rec.ok:
            continue
        path, via = host_normalize(rec.path)
        if rec.created_by_run:
            fs.excluded.append((path, "created by the recorded run"))
            continue
        if not os.path.lexists(path):
            if rec.removed_by_run:
                fs.excluded.append((path, "removed by the recorded run"))
            else:
                fs.vanished.append(path)
            continue
        kinds = rec.kinds
        if rec.added_by:
            reason = f"added by {rec.added_by}: {rec.reason or ''}".strip()
        else:
            reason = "traced:" + ",".join(sorted(kinds))
        try:
            is_dir = stat_mod.S_ISDIR(os.stat(path).st_mode)
        except OSError:
            is_dir = False
        consider(path, reason, dir_only=is_dir)
        for prefix in via:
            consider(prefix, f"on the way to {rec.path}", dir_only=True)

    for inc in includes:
        if not os.path.lexists(inc):
            fs.vanished.append(inc)
            continue
        if os.path.isdir(inc) and not os.path.islink(inc):
            for dirpath, dirnames, filenames in os.walk(inc):
                fs.want(dirpath, "--include")
                for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                    fs.want(os.path.join(dirpath, name), "--include")
        else:
            fs.want(inc, "--include")

    if options.use_closure:
        _add_closure(trace, fs)
    _add_python_companions(fs)

    if options.exclude:
        for path in list(fs.wanted):
            g = _matches_any(path, options.exclude)
            if g is not None and not any(path == inc for inc in includes):
                del fs.wanted[path]
                fs.dirs_only.discard(path)
                fs.excluded.append((path, f"--exclude {g}"))
    fs.excluded.sort()
    fs.vanished = sorted(set(fs.vanished))
    return fs


def _add_closure(trace: tr.Trace, fs: FileSet) -> None:
    from tracejail import closure

    env = trace.runs[0].environment if trace.runs else {}
    loader_env = closure.LoaderEnv(ld_library_path=env.get("LD_LIBRARY_PATH"), path=env.get("PATH"),
                                   ld_preload=env.get("LD_PRELOAD"),
                                   cwd=trace.runs[0].cwd if trace.runs else None)
    # Scripts count only when executed: Python's stdlib has executable files with a `#!` line
    # (base64.py, cgi.py ...) that a program merely imports.
    executed = {host_normalize(p)[0] for p, r in trace.files.items() if "exec" in r.kinds}
    roots = []
    for path in fs.wanted:
        if path in fs.dirs_only:
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not stat_mod.S_ISREG(st.st_mode):
            continue
        if closure.is_elf(path) or (path in executed and _has_shebang(path)):
            roots.append(path)
    triggers = [p for p, r in trace.files.items() if r.ok]
    result = closure.resolve(sorted(roots), loader_env, strict=False, runtime_triggers=triggers)
    fs.closure_errors.extend(result.errors)
    for dep in result.deps:
        rule = dep.rule + (" via $ORIGIN" if getattr(dep, "via_origin", False) else "")
        why = f"needed by {dep.needed_by} ({dep.name}, {rule})"
        if dep.reason:
            why += f": {dep.reason}"
        # $ORIGIN/../lib spellings: keep what ld.so walks through, store the normal form
        path, via = host_normalize(dep.path)
        fs.want(path, why)
        fs.dirs_only.discard(path)
        for prefix in via:
            if prefix not in fs.wanted:
                fs.want(prefix, f"on the way to {dep.path}")
                fs.dirs_only.add(prefix)
    for u in result.unresolved:
        fs.unresolved.append((u.name, u.needed_by))


def _has_shebang(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


def _add_python_companions(fs: FileSet) -> None:
    """Python validates a cached .pyc against its .py, and reads .pth and dist-info metadata."""
    site_dirs: set[str] = set()
    for path in list(fs.wanted):
        directory, name = os.path.split(path)
        if os.path.basename(directory) == "__pycache__" and name.endswith(".pyc"):
            module = name.split(".", 1)[0]
            source = os.path.join(os.path.dirname(directory), module + ".py")
            if os.path.exists(source) and source not in fs.wanted:
                fs.want(source, f"source of the kept {path} (Python stats it to validate the cache)")
        m = re.match(r"(.*/(?:site|dist)-packages)(/|$)", path)
        if m:
            site_dirs.add(m.group(1))
    for site in sorted(site_dirs):
        try:
            names = os.listdir(site)
        except OSError:
            continue
        kept_tops = {_top_name(p[len(site) + 1:]) for p in fs.wanted if p.startswith(site + "/")}
        for name in sorted(names):
            full = os.path.join(site, name)
            if name.endswith(".pth"):
                fs.want(full, "a .pth file of a kept site-packages (run at interpreter start)")
            elif name.endswith(".dist-info") and os.path.isdir(full):
                tops = _distribution_tops(full)
                if tops & kept_tops:
                    fs.want(full, "dist-info of a kept distribution")
                    fs.dirs_only.discard(full)
                    for f in sorted(os.listdir(full)):
                        sub = os.path.join(full, f)
                        if os.path.isfile(sub):
                            fs.want(sub, "dist-info of a kept distribution")
                        elif os.path.isdir(sub):
                            for dp, _dn, fns in os.walk(sub):
                                for fn in fns:
                                    fs.want(os.path.join(dp, fn), "dist-info of a kept distribution")


def _top_name(rel: str) -> str:
    """The importable name a site-packages path belongs to: `six` for six.py, __pycache__/six.*.pyc
    and six/...; `_cffi_backend` for _cffi_backend.cpython-311-x86_64-linux-gnu.so."""
    parts = rel.split("/")
    first = parts[1] if parts[0] == "__pycache__" and len(parts) > 1 else parts[0]
    if len(parts) == 1 or parts[0] == "__pycache__":
        first = first.split(".", 1)[0]
    return first


def _distribution_tops(dist_info: str) -> set[str]:
    """Top-level names (packages, modules, .libs folders) a distribution installed."""
    tops: set[str] = set()
    try:
        with open(os.path.join(dist_info, "RECORD"), encoding="utf-8", errors="replace") as f:
            for line in f:
                rel = line.split(",", 1)[0]
                if rel and not rel.startswith("..") and ".dist-info" not in rel.split("/", 1)[0]:
                    tops.add(_top_name(rel))
    except OSError:
        pass
    return tops
