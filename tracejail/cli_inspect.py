"""`tracejail inspect` and `tracejail explain`: know what is inside an image before building it.

Both take the same --include/--exclude as `build`, and start from the same plan (build.plan_image,
the files build writes itself included), so they describe the image that build makes.
"""
from __future__ import annotations

import json
import os
from typing import Any

import click

from tracejail.cli import CONTEXT, handle_errors, image_content, image_content_options, say


@click.command(context_settings=CONTEXT)
@click.argument("trace_file", metavar="TRACE.json", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--misses", is_flag=True,
              help="Also list failed lookups (noise such as loader hwcaps probes only counted).")
@click.option("--top", type=click.IntRange(1), default=10, show_default=True, metavar="N",
              help="How many of the largest files and directories to list.")
@image_content_options
@handle_errors
def inspect(trace_file: str, as_json: bool, misses: bool, top: int, **content: Any) -> None:
    """Summarise TRACE.json: runs, processes, exercises, and the image's files by kind and size.

    Takes build's options that decide what the image holds, and describes that image."""
    from tracejail import inspection as ins
    from tracejail import provenance as prov
    from tracejail.build import BuildOptions

    with prov.selected(trace_file, BuildOptions(**image_content(**content))) as sel:
        report = ins.report(trace_file, sel.trace, sel.files, sel.plan, top=top, misses=misses, root=sel.root)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        say(ins.format_report(report))


@click.command(context_settings=CONTEXT)
@click.argument("trace_file", metavar="TRACE.json", type=click.Path(dir_okay=False))
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--json", "as_json", is_flag=True, help="Print the explanations as JSON.")
@image_content_options
@handle_errors
def explain(trace_file: str, paths: tuple[str, ...], as_json: bool, **content: Any) -> None:
    """Say why each PATH is (or is not) in the image built from TRACE.json.

    \b
      traced (how, by which process), needed by which ELF through which search rule,
      a symlink on the way, a Python companion, a known run-time load, a family
      looked up by name, a module a kept one imports on a path the run did not take
      (the static import closure), --include; who owns it in the image and why; or left out,
      and by which rule. A relative PATH is taken relative to the recorded run's
      working directory. Takes build's options that decide what the image holds.
    """
    from tracejail import provenance as prov
    from tracejail.build import BuildOptions

    with prov.selected(trace_file, BuildOptions(**image_content(**content))) as sel:
        pv = prov.compute(sel.trace, sel.files, sel.plan, sel.root)
        db = sel.db
        cwd = sel.trace.runs[0].cwd if sel.trace.runs else os.getcwd()
        results = []
        for path in paths:
            # A relative PATH means what it meant to the recorded program: relative to its cwd.
            ex = prov.explain(os.path.join(cwd, path), pv, sel.files, sel.plan)
            if db is not None and ex.in_image:
                keys = db.owners_of(ex.image_path or ex.path) or db.owners_of(ex.path)
                if keys:
                    ex.package = ", ".join(f"{db.packages[k].name} {db.packages[k].version}" for k in keys)
            results.append(ex)
    if as_json:
        click.echo(json.dumps([ex.to_json() for ex in results], indent=2, sort_keys=True))
    else:
        say("\n".join(prov.format_explanation(ex) for ex in results))


# Typed names for cli.py, which imports this module while it is itself being imported.
INSPECT: click.Command = inspect
EXPLAIN: click.Command = explain
