"""`record --image`: run an image's command on the image's own files, in tracejail's sandbox, under
the tracer, and keep a trace whose paths are the image's.

The image is someone else's: its program runs only in the jail (jail.py: user, mount, PID and
network namespaces, no new privileges, nosuid/nodev), as the image's user with the image's
environment and working directory, as `docker run IMAGE [COMMAND]` would run it. The tracer sees
the jail from the host: the launcher, its holder and the jail's init are tracejail's own and are
left out of the trace; paths that the host's /proc spelled with the jail's mount point in front
are made image paths again (jail.strip_root). The tracer stops at syscall exit too (exact
results), so no host file is ever consulted for what the jailed program saw.

Exercises run on this host, in the jail's network namespace: `curl localhost:8000` reaches the
server, and nothing is published on the host's own ports.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Mapping

from tracejail import jail, source, trace as tr
from tracejail.errors import CommandNotFound, TracejailError, UsageError
from tracejail.record import Recording, RecordOptions, record
from tracejail.root import NodeKind, Root


@dataclass
class ImageRunOptions:
    image: str
    command: list[str] = dataclasses.field(default_factory=list)   # replaces Cmd, as `docker run IMAGE ARGS`
    user: str | None = None                # --user (default: the image's)
    docker_env: Mapping[str, str] | None = None
    userns: bool = True


# --- users, commands and paths inside the image ---------------------------------------------------

def find_executable(root: Root, name: str, path_var: str, cwd: str) -> str | None:
    """Where `name` runs from in the image: as spelled when it holds a slash, else the first
    executable regular file along PATH (runc's lookup)."""
    if "/" in name:
        candidates = [name if name.startswith("/") else os.path.join(cwd, name)]
    else:
        candidates = [os.path.join(d or ".", name) for d in path_var.split(":") if d.startswith("/")]
    for candidate in candidates:
        res = root.resolve(os.path.normpath(candidate))
        if res.kind is NodeKind.FILE and res.node is not None and res.node.st.st_mode & 0o111:
            return os.path.normpath(candidate)
    return None


# --- the jailed program's part of a traced jail ----------------------------------------------------

def program_pids(processes: list[tr.ProcessInfo], with_init: bool = False) -> set[int]:
    """The jailed program's processes: below the launcher come its holder and the jail's init
    (tracejail's own), and below init the target and whatever it starts. `with_init` counts init
    in (it reads the image's /etc/passwd for HOME, as the runtime does)."""
    children: dict[int | None, list[int]] = {}
    for p in processes:
        children.setdefault(p.ppid, []).append(p.pid)
    holders = [c for launcher in children.get(None, []) for c in children.get(launcher, [])]
    inits = [c for h in holders for c in children.get(h, [])]
    todo = list(inits) if with_init else [c for i in inits for c in children.get(i, [])]
    out: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, []))
    return out


def jailed_records(jtrace: tr.Trace, root: str, pids: set[int]) -> dict[str, tr.PathRecord]:
    """The path records of `pids` only, keyed by the path the jailed program saw."""
    out: dict[str, tr.PathRecord] = {}
    for rec in jtrace.files.values():
        mine = [tr.Access(a.kind, a.syscall, a.result, a.count, [p for p in a.pids if p in pids])
                for a in rec.accesses if any(p in pids for p in a.pids)]
        if not mine:
            continue
        path = jail.strip_root(rec.path, root)
        new = out.get(path)
        if new is None:
            new = out[path] = tr.PathRecord(path, runs=list(rec.runs), created_by_run=rec.created_by_run,
                                            removed_by_run=rec.removed_by_run)
        for a in mine:
            new.merge_access(a)
    return out


def image_recording(rec: Recording, spec: jail.JailSpec, executable: str,
                    unpacked: source.UnpackedImage, opts: RecordOptions) -> Recording:
    """The recording of the launcher, made the recording of the program in the image."""
    got = rec.run
    pids = program_pids(got.processes)
    # The program's first process is the one whose parent (the jail's init) is not the program's.
    processes = [dataclasses.replace(p, ppid=p.ppid if p.ppid in pids else None,
                                     exe=jail.strip_root(p.exe, spec.root) if p.exe else None)
                 for p in got.processes if p.pid in pids]
    run = dataclasses.replace(got, argv=list(spec.argv), executable=executable, cwd=spec.cwd, uid=spec.uid,
                              gid=spec.gid, environment=dict(spec.env), processes=processes)
    said = tr.scrub_run(run, opts.keep_env, opts.keep_argv)
    src = unpacked.source()
    said += tr.scrub_source(src.config, opts.keep_env)
    trace = tr.Trace(runs=[run], files=jailed_records(rec.trace, spec.root, pids), host=rec.trace.host,
                     source=src)
    return dataclasses.replace(rec, trace=trace, run=run, warnings=rec.warnings + said)


# --- the run ---------------------------------------------------------------------------------------

def record_image(iopts: ImageRunOptions, ropts: RecordOptions,
                 progress: Callable[[str], None] | None = None) -> Recording:
    """Record IMAGE's command (or COMMAND) in the sandbox; the trace's paths are the image's."""
    problem = jail.check_available(iopts.userns)
    if problem:
        raise TracejailError(f"record --image runs the image in tracejail's sandbox, which cannot run here: "
                             f"{problem}")
    say = progress or (lambda _m: None)
    with source.image_tree(iopts.image, iopts.docker_env, say) as unpacked:
        cfg = unpacked.config
        argv = cfg.entrypoint + (iopts.command or cfg.cmd)
        if not argv:
            raise UsageError(f"{iopts.image} has no Entrypoint or Cmd: give the command after --")
        env = cfg.environment
        env.setdefault("PATH", jail.DEFAULT_PATH)
        tree = Root(unpacked.rootfs)
        cwd = os.path.normpath(cfg.working_dir) if cfg.working_dir.startswith("/") else "/"
        uid, gid = source.image_user(tree, iopts.user if iopts.user is not None else cfg.user)
        env.setdefault("HOME", source.home_of(tree, uid))   # as the runtime (and the jail) sets it
        executable = find_executable(tree, argv[0], env["PATH"], cwd)
        if executable is None:
            raise CommandNotFound(f"command not found in {iopts.image}: {argv[0]}")
        spec = jail.JailSpec(rootfs=unpacked.rootfs, workdir=jail.make_workdir(), argv=argv, env=env, cwd=cwd,
                             uid=uid, gid=gid, userns=iopts.userns, volumes=list(cfg.volumes))
        jailed = dataclasses.replace(ropts, exact=True, env=jail.launcher_env(), cwd="/", exercise_netns=True,
                                     exercise_cwd=ropts.exercise_cwd or os.getcwd())
        try:
            say(f"running {' '.join(argv)} in {iopts.image} as {uid}:{gid}")
            rec = record(jail.launcher_argv(spec), jailed, progress=progress)
        finally:
            jail.remove_workdir(spec.workdir)
        setup = jail.setup_error(rec.run.status, rec.run.stderr)
        if setup:
            raise TracejailError(f"the sandbox could not be set up: {setup}")
        return image_recording(rec, spec, executable, unpacked, ropts)
