"""Who owns what in the image: the image user gets what the recorded run wrote, and its own tree.

Images run as a non-root user, but the recording usually ran as root (or as someone else), and a
program that writes a database, a log or a cache then fails in the image with EACCES. The trace
says what the run did, so the image can give the image user exactly that:

* every file the run opened for writing;
* every directory in which it created, renamed or removed entries (a SQLite journal, a log,
  a cache directory made on first use): the entries the run created are still left out, but
  the directory that held them is there and the image user may write in it;
* the run's own tree, as `COPY --chown` would make it: the recorded working directory and
  everything kept below it, and the directory of each script or program it ran from outside
  the system's locations (a git repository under the working directory then belongs to the
  user who runs git in it, as git's safe.directory check wants);
* what belonged to the recording user, when that was not root;
* HOME: when the run used files under its HOME, the image user's home is that directory (its
  passwd entry and HOME in the image's Env), and it belongs to the image user.

System files stay root-owned and not writable whatever the run did: files a dpkg package
owns, and everything under /usr, /lib*, /bin, /sbin, /etc and the interpreter's installation.
A directory anyone may write in (/tmp) is left alone. Paths a tool recorded as needing the
image user (`verify --fix`: PathRecord.owner) always do.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Iterable

from tracejail import trace as tr
from tracejail.root import NodeKind, Root, Status, parent_of, under

# Where the system lives: never given to the image user.
SYSTEM_DIRS = ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc", "/boot",
               "/var/lib/dpkg")

_CREATE_OR_REMOVE = ("rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir", "mkdir", "mkdirat",
                     "symlink", "symlinkat", "link", "linkat")
_OPEN = ("open", "openat", "openat2", "creat")


@dataclass
class Ownership:
    owned: dict[str, str] = field(default_factory=dict)   # canonical path -> why the image user owns it
    home: str | None = None                               # the image user's home, when the run used HOME
    system: list[str] = field(default_factory=list)       # written by the run, but system files: kept root's
    written_dirs: list[str] = field(default_factory=list)  # directories the run wrote in (--writable-volumes)
    trees: list[str] = field(default_factory=list)        # the runs' own trees (canonical directories)
    prefixes: list[str] = field(default_factory=list)     # interpreter installations (interpreter_prefixes)


def interpreter_prefixes(trace: tr.Trace, root: Root) -> list[str]:
    """Installations of the interpreters the runs executed (a prefix whose bin/ holds the program
    and whose lib/ holds pythonX.Y, perl, ruby, node...: a system install, a venv), and the
    version managers that hold them (pyenv, rbenv, nvm: what comes before /versions/): system,
    wherever they are."""
    out: list[str] = []
    for run in trace.runs:
        for exe in {p.exe for p in run.processes if p.exe} | {run.executable}:
            res = root.resolve(exe)
            if not res.ok:
                continue
            bindir = parent_of(res.path)
            if os.path.basename(bindir) != "bin":
                continue
            prefix = parent_of(bindir)
            if prefix in ("/", "/usr") or prefix in out:
                continue
            if any(name.startswith(("python", "perl", "ruby", "node")) for name in root.listdir(prefix + "/lib")):
                out.append(prefix)
                manager = prefix.split("/versions/")[0]
                if manager != prefix and manager not in out:
                    out.append(manager)
    return out


def compute(trace: tr.Trace, root: Root, kept: Iterable[str], *, package_owned=None) -> Ownership:
    """Which kept paths (canonical) the image user owns, and why. `kept` are the canonical paths
    the plan holds; `package_owned(path) -> bool` says whether a dpkg package lists a file."""
    kept = set(kept)
    prefixes = interpreter_prefixes(trace, root)
    own = Ownership(prefixes=prefixes)

    def system(path: str) -> bool:
        return any(under(path, d) for d in (*SYSTEM_DIRS, *prefixes))

    def give(path: str, why: str, *, force: bool = False) -> None:
        if path not in kept or path in own.owned or path == "/":
            return
        st = root.lstat(path)
        if isinstance(st, OSError) or stat.S_ISLNK(st.st_mode):
            return
        if not force:
            if system(path):
                own.system.append(path)
                return
            if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o002:
                return   # anyone may write there already (/tmp)
            if stat.S_ISREG(st.st_mode) and package_owned is not None and package_owned(path):
                own.system.append(path)
                return
        own.owned[path] = why

    def canonical(path: str) -> str | None:
        res = root.resolve(path)
        return res.path if res.status in (Status.OK, Status.SPECIAL) else None

    def canonical_parent(path: str) -> str | None:
        res = root.resolve(parent_of(root.normalize(path)[0]))
        return res.path if res.ok and res.kind is NodeKind.DIR else None

    for rec in trace.files.values():
        if rec.owner == tr.IMAGE_USER:
            target = canonical(rec.path)
            if target:
                give(target, f"recorded as needing the image user ({rec.reason or 'verify --fix'})", force=True)
        ok_writes = [a for a in rec.accesses if a.kind == "write" and a.result == tr.OK]
        if rec.created_by_run or rec.removed_by_run or any(a.syscall in _CREATE_OR_REMOVE for a in ok_writes):
            parent = canonical_parent(rec.path)
            if parent:
                verb = "created" if rec.created_by_run else "removed or renamed"
                give(parent, f"the run {verb} {rec.path} in it")
                if parent in own.owned and _volume_worthy(parent, own.written_dirs, system):
                    own.written_dirs.append(parent)
        if not rec.created_by_run and any(a.syscall in _OPEN for a in ok_writes):
            target = canonical(rec.path)
            if target:
                give(target, "the run opened it for writing")
                parent = parent_of(target)
                if target in own.owned and _volume_worthy(parent, own.written_dirs, system):
                    own.written_dirs.append(parent)

    for run in trace.runs:
        for top, why in _own_trees(run, root, system):
            if top not in own.trees:
                own.trees.append(top)
            for path in sorted(kept):
                if under(path, top):
                    give(path, why)
        if run.uid != 0:
            for path in sorted(kept):
                st = root.lstat(path)
                if not isinstance(st, OSError) and st.st_uid == run.uid:
                    give(path, f"it belonged to the recording user (uid {run.uid})")

    home = trace.runs[0].environment.get("HOME") if trace.runs else None
    if home and home.startswith("/") and home != tr.REDACTED:
        res = root.resolve(home)
        if res.ok and res.kind is NodeKind.DIR and res.path != "/" and not system(res.path) \
                and any(under(p, res.path) for p in kept if p != res.path):
            own.home = home
            give(res.path, "the image user's home: the run used files under its HOME")
    return own


def _volume_worthy(directory: str, already: list[str], system) -> bool:
    """A directory the run wrote in that --writable-volumes makes a volume: not one the runtime
    provides or mounts a tmpfs on, not a system directory, not the root."""
    return directory not in already and directory not in ("/", "/tmp", "/var/tmp") and not system(directory) \
        and not any(under(directory, d) for d in ("/dev", "/proc", "/sys", "/run"))


def _own_trees(run: tr.Run, root: Root, system) -> list[tuple[str, str]]:
    """The run's own tree: its working directory, the directory of the script it ran
    (`python3 /srv/app/main.py`) and of the program itself (`/opt/app/server`), outside the
    system's locations."""
    trees: list[tuple[str, str]] = []
    cwd = root.resolve(run.cwd)
    if cwd.ok and cwd.path != "/" and not system(cwd.path):
        trees.append((cwd.path, f"the run's own tree (its working directory {run.cwd})"))
    candidates = [run.executable] + [w for w in run.argv[1:] if "/" in w or "." in w]
    for word in candidates:
        path = word if word.startswith("/") else os.path.join(run.cwd, word)
        res = root.resolve(path)
        if not res.ok or res.kind is not NodeKind.FILE or system(res.path):
            continue
        where = parent_of(res.path)
        if where != "/" and not system(where):
            trees.append((where, f"the run's own tree (the directory of {word}, which it ran)"))
    return trees
