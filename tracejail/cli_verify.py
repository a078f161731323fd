"""`tracejail verify`: the click command (the work is in verify.py)."""
from __future__ import annotations

import json
import sys

import click

from tracejail.cli import CONTEXT, _note, handle_errors, say, tell


@click.command("verify", context_settings=CONTEXT)
@click.argument("trace_file", metavar="TRACE.json", type=click.Path(dir_okay=False))
@click.option("-t", "--tag", "image", metavar="IMAGE",
              help="Replay in this image with the Docker engine (DOCKER_HOST is honoured).")
@click.option("--rootfs", "rootfs_dir", metavar="DIR",
              help="Replay in this staged tree (build --rootfs DIR) in tracejail's sandbox.")
@click.option("--user", metavar="UID:GID|root", help="Run as this user instead of the image's.")
@click.option("--trace-inside/--no-trace-inside", default=None,
              help="Replay under tracejail's tracer in the jail and list misses (default: for "
                   "failing runs, when a jail can be made here).")
@click.option("--fix", is_flag=True,
              help="Add the misses to TRACE.json, rebuild the image or tree, verify again.")
@click.option("--max-rounds", type=click.IntRange(1, 50), default=3, show_default=True, metavar="N",
              help="With --fix: rebuild at most this many times.")
@click.option("--timeout", type=click.FloatRange(1), default=120.0, show_default=True, metavar="S",
              help="Bound each replay.")
@click.option("--ready-timeout", type=click.FloatRange(0), default=30.0, show_default=True, metavar="S",
              help="Give up waiting for a server to listen after this long.")
@click.option("--read-only", is_flag=True,
              help="Run with a read-only root (and a tmpfs /tmp), as docker run --read-only, and list "
                   "what must be writable.")
@click.option("--trust-trace", is_flag=True,
              help="Run the exercise commands of a trace that is not your own (they run on this host).")
@click.option("--no-user-namespace", "no_userns", is_flag=True,
              help="Jail without a user namespace, where the kernel refuses one (root only; weaker).")
@click.option("--import-check", is_flag=True,
              help="Also import, in the image, every Python module the static import closure added.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def verify(trace_file: str, image: str | None, rootfs_dir: str | None, user: str | None,
           trace_inside: bool | None, fix: bool, max_rounds: int, timeout: float, ready_timeout: float,
           read_only: bool, trust_trace: bool, no_userns: bool, import_check: bool, as_json: bool) -> None:
    """Replay every run of TRACE.json in the image (-t) or a staged tree (--rootfs) and compare.

    \b
    Plain runs: exit status and stdout must match the recording. Runs with exercises: the
    server is started (a container publishing its recorded ports on 127.0.0.1, or a jail with
    a network of its own), the same exercises run on the host (in the jail's network), and each
    one's exit code and stdout must match. Failing runs are replayed once more in a jail under
    the tracer to list misses: paths the program looked for there and did not find, that exist
    on the host (noise that also failed in the recording is left out).

    \b
    The jail is a sandbox: user, mount, PID, IPC, UTS and network namespaces, no new privileges,
    nosuid/nodev mounts, a read-only /proc; it runs as an ordinary user too. The exercise
    commands of a trace run on this host: only a trace of your own (owned by you, writable by no
    one else) runs them without --trust-trace, and they are printed before they run.

    \b
    With --fix the misses are added to TRACE.json (added_by "verify --fix"), the image is rebuilt
    under the same name (or DIR in place) and verified again. The rebuild knows the image's user,
    environment and entrypoint, not the original --exclude/--include options.

    \b
    With --import-check the recorded interpreter also imports, in the image, every module the
    static import closure added (paths nobody exercised): one that fails names a missing
    library or data file before production does, and fails verify.

    \b
    Exit status: 0 when every run passes, 1 when one fails (or verify cannot run: no engine,
    no image, no namespaces, a foreign trace with exercises), 2 for usage errors, 65 for a
    malformed trace, or when the trace and the image do not belong together (the image's
    io.tracejail.trace.digest label is another trace's).
    """
    from tracejail.verify import VerifyOptions, format_report
    from tracejail.verify import verify as do_verify

    # handle_errors makes SIGTERM end verify like Ctrl-C does: replays are stopped and containers
    # removed on the way out (a plain SIGTERM death would leave a running container behind).
    opts = VerifyOptions(image=image, rootfs=rootfs_dir, user=user, fix=fix, max_rounds=max_rounds,
                         trace_inside=trace_inside, timeout=timeout, ready_timeout=ready_timeout,
                         trust_trace=trust_trace, userns=not no_userns, read_only=read_only,
                         import_check=import_check)
    report = do_verify(trace_file, opts, progress=_note, announce=lambda m: tell("", m))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        say(format_report(report))
    sys.exit(0 if report.passed else 1)

