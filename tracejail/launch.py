"""The `tracejail` command's entry point: what happens before and after the click CLI.

Before: `tracejail record` starts its tracer process (tracer_process.prestart), so that the
tracer's imports run beside the CLI's. After: the process exits as the interpreter would
(threading's exit hooks, other threads joined, atexit handlers, standard streams flushed)
without first tearing down every module it imported, which took 15-20 ms of a short `record`. Commands close what they write
(`with` blocks), so nothing waits on that teardown.
"""
from __future__ import annotations

import os
import sys
from typing import NoReturn

from tracejail import tracer_process   # light: os, signal and marshal only


def run() -> NoReturn:
    """The console script (and `python -m tracejail`)."""
    if sys.argv[1:2] == ["record"]:
        tracer_process.prestart()
    try:
        from tracejail.cli import main

        main()   # click's standalone mode: always ends in SystemExit
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        tracer_process.discard_prestarted()
    exit_now(code)


def exit_now(code: object) -> NoReturn:
    """End the process with `code` (a SystemExit's), as interpreter shutdown would but faster."""
    import atexit
    import threading

    # What the interpreter's own shutdown does first, in its order: threading's exit hooks (an
    # executor never shut down tells its idle workers to stop there; joining them without it
    # waits forever), then joining the other threads, then the atexit handlers.
    threading._shutdown()   # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code & 0xFF
    else:   # sys.exit("message"), as Python prints it
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            # The reader went away (or the stream was closed): what was buffered goes nowhere.
            status = status or 1
    os._exit(status)
