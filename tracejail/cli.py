"""The command line: a thin click layer over the library modules.

Exit codes: the recorded command's own status for `record` (128+N for a signal); otherwise 0 on
success, 1 for a failure of the job (a check failed, an exercise failed), 2 for usage errors,
3 when ptrace is not permitted, 65 for a corrupt or foreign trace, 127 for an unknown command,
130 when interrupted.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
from typing import Any, Callable, NoReturn

import click

from tracejail import __version__
from tracejail.errors import Interrupted, TracejailError
from tracejail.text import shown

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(message: str, code: int) -> None:
    click.echo(f"tracejail: {shown(message)}", err=True)
    sys.exit(code)


def say(text: str) -> None:
    """Print a report (several lines) on stdout: paths, argv and program output in it come from
    traces and programs, so control characters are written out (see text.shown)."""
    click.echo(shown(text, block=True), nl=not text.endswith("\n"))


def tell(kind: str, message: str) -> None:
    """One line on stderr: `tracejail: KIND: message`."""
    click.echo(f"tracejail: {kind}{': ' if kind else ''}{shown(message)}", err=True)


def _raise_interrupted(signum: int, _frame: Any) -> NoReturn:
    raise Interrupted(signum)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line on stderr and a meaningful exit code, never a traceback;
    SIGTERM and SIGHUP end the command like Ctrl-C, cleaning up (exit 128+N)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _raise_interrupted)
        try:
            result = fn(*args, **kwargs)
            sys.stdout.flush()   # a reader that went away shows here, not in Python's flush at exit
            return result
        except TracejailError as exc:
            _fail(str(exc), exc.exit_code)
        except Interrupted as exc:
            _fail(f"stopped by {signal.Signals(exc.signum).name}", 128 + exc.signum)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except BrokenPipeError:
            # Nothing more reaches the reader: what is still buffered goes nowhere, quietly.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            _fail(f"{exc.strerror or exc}{where}", 1)

    return wrapper


def _interactive() -> bool:
    return sys.stderr.isatty()


def _note(message: str) -> None:
    if _interactive():
        tell("", message)


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            import importlib

            module, attr = LAZY_COMMANDS[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=_LazyGroup, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="tracejail")
def main() -> None:
    """Trace what a program really touches and ship it as a tiny FROM-scratch image.

    \b
      tracejail record -o trace.json -- python3 app.py
      tracejail record --exercise 'curl -s localhost:8000/' -- python3 server.py
      tracejail build trace.json -t app
      docker run --rm app
    """


# How a run is recorded and driven: record and minify take the same options.
_RUN_OPTIONS = (
    click.option("--exercise", "exercises", multiple=True, metavar="CMD",
                 help="Shell command run on the host once COMMAND is ready (repeatable, in order)."),
    click.option("--ready-port", type=click.IntRange(1, 65535), metavar="N",
                 help="Ready when the traced tree listens on this TCP port."),
    click.option("--ready-delay", type=click.FloatRange(0), metavar="S",
                 help="Ready after this many seconds instead of waiting for a port."),
    click.option("--ready-timeout", type=click.FloatRange(0), default=30.0, show_default=True,
                 metavar="S", help="Give up waiting for readiness after this long."),
    click.option("--stop-timeout", type=click.FloatRange(0), default=10.0, show_default=True,
                 metavar="S", help="After exercises: SIGTERM, then SIGKILL after this long."),
    click.option("--timeout", type=click.FloatRange(0), metavar="S",
                 help="Bound the whole run; the tree is stopped when it runs out."),
    click.option("--exact", is_flag=True,
                 help="Also stop at syscall exit and keep the kernel's result of every call (slower)."),
    click.option("--no-seccomp", is_flag=True, help="Trace every syscall (debugging; much slower)."),
    click.option("--pin-cpu", is_flag=True,
                 help="Run the tracer and the program on one CPU (the one the tracer starts on): stops "
                      "get cheaper, but a parallel program is serialized."),
    click.option("--keep-env", multiple=True, metavar="NAME",
                 help="Keep this secret-looking environment value unredacted (repeatable)."),
    click.option("--keep-argv", is_flag=True,
                 help="Keep a secret on the command line (--password=X) in the trace instead of redacting "
                         "it: images built from the trace then carry it in their Entrypoint."),
)


def run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_RUN_OPTIONS):
        fn = option(fn)
    return fn


def record_options(exercises: tuple[str, ...], ready_port: int | None, ready_delay: float | None,
                   ready_timeout: float, stop_timeout: float, timeout: float | None, exact: bool,
                   no_seccomp: bool, pin_cpu: bool, keep_env: tuple[str, ...], keep_argv: bool) -> Any:
    """The RecordOptions run_options set."""
    from tracejail.errors import UsageError
    from tracejail.record import RecordOptions

    if (ready_port or ready_delay is not None) and not exercises:
        raise UsageError("--ready-port and --ready-delay only apply with --exercise")
    return RecordOptions(exercises=list(exercises), ready_port=ready_port, ready_delay=ready_delay,
                         ready_timeout=ready_timeout, stop_timeout=stop_timeout, timeout=timeout,
                         use_seccomp=not no_seccomp, exact=exact, pin_cpu=pin_cpu, keep_env=keep_env,
                         keep_argv=keep_argv)


@main.command(context_settings={**CONTEXT, "allow_interspersed_args": False})
@click.option("-o", "--output", default="trace.json", show_default=True, metavar="FILE",
              help="Where to write the trace (written atomically).")
@click.option("--append", is_flag=True,
              help="Merge this run into an existing trace; its first run stays the default command.")
@run_options
@click.option("--image", metavar="IMAGE",
              help="Run IMAGE's Entrypoint and Cmd (COMMAND replaces Cmd) on the image's own files, in "
                   "tracejail's sandbox: a local engine image, a docker or OCI archive, or an OCI layout.")
@click.option("--user", "image_user", metavar="USER[:GROUP]",
              help="With --image: run as this user of the image instead of the image's USER.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- COMMAND [ARG...]")
@handle_errors
def record(output: str, append: bool, image: str | None, image_user: str | None, command: tuple[str, ...],
           **run_opts: Any) -> None:
    """Run COMMAND under the tracer and record every file its process tree touches.

    Without --exercise, waits for COMMAND (and everything it started) to exit, and exits with
    its status. With --exercise, waits until COMMAND listens on a TCP port, runs the exercises,
    stops COMMAND, and exits 0 only if every exercise exited 0.

    With --image, the run happens in the image instead of on this host, and the trace's paths
    are the image's: `tracejail build` then takes every file from that image.
    """
    from tracejail import trace as tr
    from tracejail.errors import UsageError
    from tracejail.record import record as do_record

    if not command and not image:
        raise UsageError("no command given: put it after `--`, e.g. tracejail record -- python3 app.py")
    if image_user is not None and not image:
        raise UsageError("--user only applies with --image (a host run is recorded as you)")
    opts = record_options(**run_opts)
    tr.check_writable(output)
    previous = tr.load(output) if append and os.path.exists(output) else None
    if image:
        from tracejail.record_image import ImageRunOptions, record_image

        rec = record_image(ImageRunOptions(image=image, command=list(command), user=image_user), opts,
                           progress=_note)
    else:
        rec = do_record(list(command), opts, progress=_note)
    for w in rec.warnings:
        tell("warning", w)
    result = rec.trace
    if previous is not None:
        previous.check_same_source(rec.trace)
        previous.merge(rec.trace)
        result = previous
    tr.save(result, output)
    run = rec.run
    tell("", record_summary(rec, output))
    for problem in tr.run_problems(run):
        tell("warning", problem + " (the trace records it as it ran)")
    exercises = opts.exercises
    if exercises:
        failed = [e for e in run.exercises if e.exit_code != 0]
        if len(run.exercises) < len(exercises):
            _fail(f"only {len(run.exercises)} of {len(exercises)} exercises ran "
                  f"({run.stop_reason}); trace written to {output}", 1)
        if failed:
            _fail(f"{len(failed)} exercise(s) failed, first: {failed[0].command!r} exited "
                  f"{failed[0].exit_code}; trace written to {output}", 1)
        sys.exit(0)
    sys.exit(run.status)


def record_summary(rec: Any, output: str) -> str:
    """The line record ends with: how the command ended, what it touched, how the exercises went."""
    run = rec.run
    n_ok = sum(1 for r in rec.trace.files.values() if r.ok)
    how = f"signal {run.exit_signal}" if run.exit_signal else f"exit {run.exit_code}"
    if run.stop_reason == "stopped":
        how = "stopped after the exercises"
    passed = sum(1 for e in run.exercises if e.exit_code == 0 and not e.timed_out)
    ex = f", {passed}/{len(run.exercises)} exercises passed" if run.exercises or run.tracing.get("ready_port") \
        or run.tracing.get("ready_delay") is not None else ""
    return (f"recorded: {how}, {len(run.processes)} processes, {n_ok} paths "
            f"({len(rec.trace.files) - n_ok} failed lookups){ex}, {run.duration:.2f}s -> {output}")


class _Progress:
    """A progress bar on stderr for a terminal; nothing when piped."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.label = ""
        self.done = 0

    def __call__(self, label: str, n: int, total: int) -> None:
        if not _interactive() or total <= 0:
            return
        if self.bar is None or label != self.label:
            self.close()
            self.label, self.done = label, 0
            self.bar = click.progressbar(length=total, label=label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


# What an image holds and who owns it: build, inspect and explain take the same options, so that
# inspect and explain describe the image build makes.
_IMAGE_CONTENT_OPTIONS = (
    click.option("--user", metavar="UID:GID|root",
                 help="User the image runs as [default: 65532:65532; for a trace recorded with --image, "
                      "that image's USER, whose names may be used here too]."),
    click.option("--include", multiple=True, metavar="PATH", help="Host file or tree to add (repeatable)."),
    click.option("--exclude", multiple=True, metavar="GLOB", help="Drop matching paths (repeatable)."),
    click.option("--keep-setuid", is_flag=True, help="Keep setuid/setgid bits."),
    click.option("--keep-modes", is_flag=True,
                 help="Keep host modes exactly (do not open kept paths up to the image user)."),
    click.option("--keep-owners", is_flag=True,
                 help="Keep host owners exactly (do not give the image user what the run wrote and its tree)."),
    click.option("--no-family", "families_off", multiple=True, metavar="NAME",
                 type=click.Choice(["python-encodings", "zoneinfo"]),
                 help="Do not keep this family of files looked up by name whole (repeatable)."),
    click.option("--no-import-closure", is_flag=True,
                 help="Do not add the Python modules kept modules import on paths the run did not take."),
    click.option("--exclude-module", "exclude_modules", multiple=True, metavar="NAME",
                 help="Python module (and its submodules) the import closure does not add (repeatable)."),
)


def image_content_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_IMAGE_CONTENT_OPTIONS):
        fn = option(fn)
    return fn


def image_content(user: str | None, include: tuple[str, ...], exclude: tuple[str, ...], keep_setuid: bool,
                  keep_modes: bool, keep_owners: bool, families_off: tuple[str, ...], no_import_closure: bool,
                  exclude_modules: tuple[str, ...]) -> dict[str, Any]:
    """The BuildOptions fields image_content_options set."""
    return {"user": user, "include": list(include), "exclude": list(exclude), "keep_setuid": keep_setuid,
            "keep_modes": keep_modes, "keep_owners": keep_owners, "families_off": list(families_off),
            "import_closure": not no_import_closure, "exclude_modules": list(exclude_modules)}


# What build makes of a trace and where it goes: build and minify take the same options.
_BUILD_OPTIONS = (
    click.option("-t", "--tag", "tags", multiple=True, metavar="NAME[:TAG]",
                 help="Name the image (repeatable): loaded into Docker when reachable, pushed with --push."),
    click.option("-o", "--output", metavar="FILE",
                 help="Image archive to write (default: none when -t loads or pushes it, else NAME.tar)."),
    click.option("--rootfs", "rootfs_dir", metavar="DIR",
                 help="Also stage the tree in DIR and write a Dockerfile beside it."),
    click.option("--oci-dir", metavar="DIR", help="Also write a plain OCI image layout directory."),
    click.option("--push", is_flag=True, help="Push every -t to its registry (OCI distribution API, no daemon)."),
    click.option("--insecure-registry", "insecure_registries", multiple=True, metavar="HOST[:PORT]",
                 help="Allow plain HTTP or an unverified certificate for this registry (loopback always is)."),
    click.option("--layers", default="1", show_default=True, metavar="N|auto",
                 help="Split the image into at most N layers by origin (libc, packages, interpreter, "
                         "distributions, app), most shared first; auto: up to 32."),
    click.option("--no-cache", is_flag=True, help="Compress every layer again instead of reusing unchanged ones."),
    click.option("--entrypoint", metavar="CMD", help="The program to run (shell words) instead of the recorded one."),
    click.option("--cmd", metavar="ARGS", help="Its default arguments (shell words) instead of the recorded ones."),
    click.option("--init", "use_init", is_flag=True,
                 help="Run a minimal init (tini from the host) as PID 1: signals and zombies are handled."),
    click.option("--env", "env", multiple=True, metavar="K=V", help="Extra environment (repeatable)."),
    click.option("--label", "labels", multiple=True, metavar="K=V", help="Image label (repeatable)."),
    click.option("--annotation", "annotations", multiple=True, metavar="K=V",
                 help="Manifest annotation (repeatable)."),
    click.option("--strip", is_flag=True,
                 help="Strip kept ELF files (symbols, debug sections; GNU strip --strip-unneeded) in the image."),
    click.option("--bytecode-only", is_flag=True,
                 help="Ship imported Python modules as .pyc only, without their .py (tracebacks lose source lines)."),
    click.option("--no-load", is_flag=True, help="Do not load the image into Docker."),
    click.option("--strict", is_flag=True, help="Fail when a traced file vanished or a library is missing."),
    click.option("--fast", is_flag=True, help="gzip level 1 instead of 6."),
    click.option("--no-compress", is_flag=True, help="Uncompressed layers."),
    click.option("--volume", "volumes", multiple=True, metavar="DIR",
                 help="Declare DIR a volume in the image (repeatable): writable under docker run --read-only."),
    click.option("--writable-volumes", is_flag=True,
                 help="Declare every directory the recorded run wrote in a volume."),
    click.option("--provenance", is_flag=True,
                 help="Write why each file is there into the image as /.tracejail/provenance.json."),
    click.option("--sbom", "sbom_file", metavar="FILE", help="Write a software bill of materials to FILE."),
    click.option("--sbom-format", type=click.Choice(["spdx", "cyclonedx"]), default="spdx", show_default=True,
                 help="SPDX 2.3 JSON or CycloneDX 1.5 JSON."),
    click.option("--no-package-metadata", is_flag=True,
                 help="Leave out dpkg status.d stanzas and /etc/os-release (kept by default for scanners)."),
    click.option("--max-file-size", default="4G", show_default=True, metavar="SIZE",
                 help="Refuse to stage a file bigger than this (e.g. 512M, 10G)."),
    click.option("--iidfile", metavar="FILE", help="Write the image ID to FILE."),
    click.option("--metadata-file", metavar="FILE", help="Write the build result's metadata (buildx keys) to FILE."),
)


def build_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """build's options (image_content_options included)."""
    fn = image_content_options(fn)
    for option in reversed(_BUILD_OPTIONS):
        fn = option(fn)
    return fn


def build_options_from(tags: tuple[str, ...], output: str | None, rootfs_dir: str | None,
                       oci_dir: str | None, push: bool, insecure_registries: tuple[str, ...], layers: str,
                       no_cache: bool, user: str | None, entrypoint: str | None, cmd: str | None, use_init: bool,
                       env: tuple[str, ...], labels: tuple[str, ...], annotations: tuple[str, ...],
                       include: tuple[str, ...], exclude: tuple[str, ...], strip: bool, bytecode_only: bool,
                       no_load: bool, strict: bool, fast: bool, no_compress: bool, keep_setuid: bool,
                       keep_modes: bool, families_off: tuple[str, ...], no_import_closure: bool,
                       exclude_modules: tuple[str, ...], volumes: tuple[str, ...], writable_volumes: bool,
                       keep_owners: bool, provenance: bool, sbom_file: str | None, sbom_format: str,
                       no_package_metadata: bool, max_file_size: str, iidfile: str | None,
                       metadata_file: str | None) -> Any:
    """The BuildOptions that build_options set."""
    import shlex

    from tracejail.build import BuildOptions, name_values
    from tracejail.errors import UsageError
    from tracejail.text import parse_size

    try:
        size_limit = parse_size(max_file_size)
    except ValueError as err:
        raise UsageError(f"--max-file-size: {err}") from None
    return BuildOptions(
        tags=list(tags), output=output, rootfs_dir=rootfs_dir, oci_dir=oci_dir,
        entrypoint=shlex.split(entrypoint) if entrypoint else None, cmd=shlex.split(cmd) if cmd is not None else None,
        init=use_init, env=list(env), labels=name_values(labels, "--label", "KEY=VALUE"),
        annotations=name_values(annotations, "--annotation", "KEY=VALUE"), layers=layers, layer_cache=not no_cache,
        push=push, insecure_registries=list(insecure_registries), iidfile=iidfile, metadata_file=metadata_file,
        load=not no_load, strict=strict, compress_level=None if no_compress else (1 if fast else 6),
        provenance=provenance, volumes=list(volumes), writable_volumes=writable_volumes,
        package_metadata=not no_package_metadata, sbom=sbom_file, sbom_format=sbom_format,
        max_file_size=size_limit, strip=strip, bytecode_only=bytecode_only,
        **image_content(user, include, exclude, keep_setuid, keep_modes, keep_owners, families_off,
                        no_import_closure, exclude_modules))


@main.command(context_settings=CONTEXT)
@click.argument("trace_file", metavar="TRACE.json", type=click.Path(dir_okay=False))
@build_options
@click.option("-q", "--quiet", is_flag=True, help="Print only the image ID.")
@click.option("--progress", type=click.Choice(["auto", "plain", "quiet"]), default="auto", show_default=True,
              help="auto: a bar on a terminal; plain: one line per step on stderr; quiet: none.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@handle_errors
def build(trace_file: str, quiet: bool, progress: str, as_json: bool, **options: Any) -> None:
    """Stage what TRACE.json touched (plus its ELF closure) into a FROM-scratch image.

    \b
      tracejail build trace.json -t app                      # load into Docker
      tracejail build trace.json -t 127.0.0.1:5000/app:1 --push --layers auto
      tracejail build trace.json -o app.tar                  # an archive for docker/podman load
    """
    from tracejail.build import build as do_build

    opts = build_options_from(**options)
    if quiet:
        progress = "quiet"
    bar = _Progress() if progress == "auto" else None
    plain = (lambda line: tell("", line)) if progress == "plain" else None
    try:
        result = do_build(trace_file, opts, progress=bar, say=plain)
    finally:
        if bar is not None:
            bar.close()
    summary = result.summary()
    for alert in result.alerts:
        tell("WARNING", alert)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    if quiet:
        click.echo(summary["image_id"] or "")
        return
    for w in result.warnings:
        tell("note", w)
    say(build_report(summary, result, opts.oci_dir, opts.sbom_format))


@main.command(context_settings=CONTEXT)
@click.argument("image", metavar="IMAGE")
@click.option("--trace", "trace_path", metavar="FILE",
              help="Keep the trace in FILE (to rebuild, explain or verify later); default: not kept.")
@click.option("--no-verify", is_flag=True, help="Do not replay the run in the new image.")
@run_options
@build_options
@click.option("--progress", type=click.Choice(["auto", "plain", "quiet"]), default="auto", show_default=True,
              help="auto: steps and a bar on a terminal; plain: one line per step on stderr; quiet: none.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[-- COMMAND [ARG...]]")
@handle_errors
def minify(image: str, trace_path: str | None, no_verify: bool, progress: str, as_json: bool,
           command: tuple[str, ...], **options: Any) -> None:
    """Make IMAGE small: record its command in it, build a FROM-scratch image of what the run
    used, and verify the new image by replaying the run.

    IMAGE is a local engine image, a docker or OCI archive, or an OCI layout directory. COMMAND
    replaces its Cmd, as with docker run; --user picks the user to run and build as.

    \b
      tracejail minify my/app:1 -t my/app:1-min
      tracejail minify my/server -t my/server:min --exercise 'curl -fs localhost:8000/'
    """
    import inspect

    from tracejail.minify import MinifyOptions
    from tracejail.minify import minify as do_minify
    from tracejail.record_image import ImageRunOptions

    run_keys = set(inspect.signature(record_options).parameters)
    ropts = record_options(**{k: v for k, v in options.items() if k in run_keys})
    bopts = build_options_from(**{k: v for k, v in options.items() if k not in run_keys})
    opts = MinifyOptions(image=image, run=ImageRunOptions(image=image, command=list(command), user=bopts.user),
                         record=ropts, build=bopts, trace_path=trace_path, verify=not no_verify)
    bar = _Progress() if progress == "auto" else None
    steps = (lambda line: tell("", line)) if progress == "plain" or (progress == "auto" and _interactive()) else None
    try:
        result = do_minify(opts, progress=steps, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    summary = result.summary()
    for alert in result.built.alerts:
        tell("WARNING", alert)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        for w in result.built.warnings:
            tell("note", w)
        say(minify_report(summary, result))
    sys.exit(0 if result.passed else 1)


def minify_report(summary: dict[str, Any], result: Any) -> str:
    """Sizes before and after, and what verify replayed."""
    from tracejail.text import human

    before, after, ratio = summary["before"], summary["after"], summary["ratio"]
    lines = [f"minified {shown(summary['image'])} -> {', '.join(shown(t) for t in summary['tags'])}"]
    lines.append(f"  before: {human(before['content'])} of files, {human(before['compressed'])} compressed")
    pct = (lambda r: f" ({r * 100:.1f}%)" if r is not None else "")
    after_c = f", {human(after['compressed'])} compressed{pct(ratio['compressed'])}" \
        if after["compressed"] is not None else ""
    lines.append(f"  after:  {human(after['content'])} of files{pct(ratio['content'])}{after_c}, "
                 f"{after['files']} files")
    if result.verified is not None:
        report = result.verified
        runs = report.rounds[-1].runs if report.rounds else []
        exercises = [e for c in runs for e in c.exercises]
        passed = sum(1 for e in exercises if e.passed)
        lines.append(f"  verified: {'PASS' if report.passed else 'FAIL'}: the run replayed in {shown(report.target)}, "
                     f"exit status and stdout compared"
                     + (f", {passed}/{len(exercises)} exercises passed" if exercises else ""))
        if not report.passed:
            from tracejail.verify import format_report

            lines.append(format_report(report))
    else:
        lines.append(f"  not verified: {result.not_verified}")
    if summary["trace"]:
        lines.append(f"  trace: {shown(summary['trace'])}")
    return "\n".join(lines)


def build_report(summary: dict[str, Any], result: Any, oci_dir: str | None, sbom_format: str) -> str:
    """The lines build ends with: sizes, where the image went, what was added and changed."""
    from tracejail.text import human

    lines = [f"{summary['files']} files, {human(summary['bytes'])} on disk"]
    if summary["image_size"] is not None:
        where = summary["archive"] or oci_dir
        layers = summary["layers"]
        lines.append(f"image {summary['image_id'][:19]}, {human(summary['image_size'])} compressed"
                     + (f" in {len(layers)} layers" if len(layers) > 1 else "") + (f" -> {where}" if where else ""))
        if len(layers) > 1:
            cached = sum(1 for la in layers if la["cached"])
            lines += [f"  {human(la['size']):>9}  {shown(la['name'])}" + ("  (cached)" if la["cached"] else "")
                      for la in layers]
            if cached:
                lines.append(f"  {cached} of {len(layers)} layers taken from the layer cache (--no-cache: make all)")
    if result.loaded_id:
        lines.append(f"loaded into Docker as {summary['tag']} ({result.loaded_id[:19]})")
    for pushed in summary["pushed"]:
        lines.append(f"pushed {pushed['reference']}@{pushed['digest'][:19]}: {pushed['uploaded']} blobs uploaded "
                     f"({human(pushed['bytes_uploaded'])}), {pushed['skipped']} already there, "
                     f"{pushed['mounted']} mounted")
    if result.rootfs_dir:
        lines.append(f"rootfs staged in {result.rootfs_dir}, Dockerfile {result.dockerfile}")
    if result.sbom:
        lines.append(f"SBOM ({sbom_format}) -> {result.sbom}")
    lines.append("biggest directories:")
    lines += [f"  {human(d['bytes']):>9}  {shown(d['path'])}" for d in summary["biggest_directories"]]
    if summary["left_out"]:
        lines.append("left out:")
        lines += [f"  {v['count']:>5}  {shown(rule)}" for rule, v in summary["left_out"].items()]
    shrunk = summary["shrink"]
    for option, saving in shrunk.get("savings", {}).items():
        kept = sum(v["count"] for v in shrunk["kept_as_is"].get(option, {}).values())
        lines.append(f"{option}: {saving['files']} files, {human(saving['bytes_before'])} -> "
                     f"{human(saving['bytes_after'])}, saved {human(saving['bytes_saved'])} "
                     f"in {saving['seconds']:.1f}s" + (f"; {kept} left as they are (--json lists why)" if kept else ""))
    imports = summary["python_imports"]
    if imports["modules"]:
        names = [a["module"] for a in imports["added"]]
        lines.append(f"python imports not exercised, added (--no-import-closure, --exclude-module NAME): "
                     f"{imports['modules']} modules, {human(imports['bytes'])}, e.g. " + ", ".join(names[:6]))
    if summary["families"]:
        lines.append("families kept whole (looked up by name; --no-family NAME): " + ", ".join(
            f"{name} {v['count']} files {human(v['bytes'])}" for name, v in summary["families"].items()))
    if summary["owned_by_image_user"]:
        given = summary["owned_by_image_user"]
        lines.append(f"given to the image user ({summary['user']}): {len(given)} path(s), e.g. "
                     + ", ".join(f"{shown(g['path'])} ({shown(g['why'])})" for g in given[:3]))
    if summary["mode_changes"]:
        lines.append(f"opened up for uid {summary['user']}: {len(summary['mode_changes'])} path(s), e.g. "
                     + ", ".join(f"{shown(m['path'])} {m['old']}->{m['new']}" for m in summary["mode_changes"][:3]))
    return "\n".join(lines)


@main.command(context_settings=CONTEXT)
@click.argument("source", metavar="ARCHIVE|DIR", type=click.Path(exists=True))
@click.argument("refs", nargs=-1, required=True, metavar="REGISTRY/REPO:TAG...")
@click.option("--insecure-registry", "insecure_registries", multiple=True, metavar="HOST[:PORT]",
              help="Allow plain HTTP or an unverified certificate for this registry (loopback always is).")
@click.option("--json", "as_json", is_flag=True, help="Print what was pushed as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the manifest digest.")
@handle_errors
def push(source: str, refs: tuple[str, ...], insecure_registries: tuple[str, ...], as_json: bool,
         quiet: bool) -> None:
    """Push an image archive (tracejail build -o) or OCI layout directory to registries.

    Speaks the OCI distribution API itself (no daemon): blobs the registry has are skipped or
    mounted from another repository; credentials come from docker's config.json (credential
    helpers included), podman's REGISTRY_AUTH_FILE, or TRACEJAIL_REGISTRY_USERNAME/PASSWORD.

    \b
      tracejail push app.tar 127.0.0.1:5000/app:1
    """
    from tracejail import image, registry
    from tracejail.text import human

    references = [image.parse_reference(r) for r in refs]
    img, _names = registry.read_layout(source)
    bar = _Progress()
    try:
        results = registry.push(img, references, registry.PushOptions(
            insecure_registries=insecure_registries, progress=None if quiet else bar))
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps([{"reference": r.reference, "digest": r.manifest_digest, "uploaded": r.uploaded,
                                "skipped": r.skipped, "mounted": r.mounted, "bytes_uploaded": r.bytes_uploaded}
                               for r in results], indent=2, sort_keys=True))
        return
    if quiet:
        click.echo(img.manifest.digest)
        return
    say("\n".join(f"pushed {r.reference}@{r.manifest_digest}: {len(r.uploaded)} blobs uploaded "
                   f"({human(r.bytes_uploaded)}), {len(r.skipped)} already there, {len(r.mounted)} mounted"
                   for r in results))


@main.command(context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the closure as JSON.")
@click.option("--ld-library-path", metavar="PATH", default=None,
              help="LD_LIBRARY_PATH to search (default: none, as in a clean environment).")
@handle_errors
def deps(files: tuple[str, ...], as_json: bool, ld_library_path: str | None) -> None:
    """Print the shared-library closure of FILES like lddtree, without running them."""
    from tracejail import closure

    for f in files:
        if not os.path.exists(f):
            raise TracejailError(f"no such file: {f}", 1)
    env = closure.LoaderEnv(ld_library_path=ld_library_path, path=os.environ.get("PATH"))
    result = closure.resolve([os.path.abspath(f) for f in files], env)
    for f in files:
        if os.path.abspath(f) not in result.roots:
            click.echo(f"tracejail: {f}: neither an ELF file nor a #! script: it has no closure",
                       err=True)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, sort_keys=True))
    else:
        say(closure.format_tree(result))
    if result.unresolved:
        sys.exit(1)


# Commands that live in their own modules, imported only when asked for (start-up matters to
# `record`, whose time the benchmark counts).
LAZY_COMMANDS = {
    "verify": ("tracejail.cli_verify", "verify"),
    "inspect": ("tracejail.cli_inspect", "INSPECT"),
    "explain": ("tracejail.cli_inspect", "EXPLAIN"),
    "cache": ("tracejail.cli_cache", "CACHE"),
}


if __name__ == "__main__":
    main()
