"""`tracejail cache df` and `tracejail cache prune`: what the cache holds, and emptying it."""
from __future__ import annotations

import json
import sys

import click

from tracejail.cli import CONTEXT, handle_errors, say
from tracejail.errors import UsageError
from tracejail.text import human, parse_duration

KIND_NAMES = ("images", "layers", "imports", "dpkg", "registry")


@click.group(context_settings=CONTEXT)
def cache() -> None:
    """What tracejail keeps between runs ($TRACEJAIL_CACHE_DIR, else ~/.cache/tracejail): unpacked
    images, compressed layers, per-file facts (Python imports, private-key scans), parsed dpkg
    databases, registry blob locations. Everything there only saves time; removing it is always
    safe."""


@cache.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print every entry as JSON.")
@handle_errors
def df(as_json: bool) -> None:
    """Show what the cache holds and how much disk it takes, by kind (and each image)."""
    from tracejail import cachedir, caches

    found = caches.entries()
    if as_json:
        click.echo(json.dumps({"cache": cachedir.cache_root(), "entries": [e.to_json() for e in found]},
                              indent=2, sort_keys=True))
        return
    lines = [f"{'KIND':<10} {'ENTRIES':>7} {'SIZE':>9}"]
    for kind in caches.Kind:
        mine = [e for e in found if e.kind is kind]
        lines.append(f"{kind.value:<10} {len(mine):>7} {human(sum(e.size for e in mine)):>9}")
        if kind is caches.Kind.IMAGES:
            lines += [f"  {human(e.size):>9}  {e.name}" for e in mine]
    where = cachedir.cache_root() or "no cache (TRACEJAIL_CACHE_DIR is empty)"
    lines.append(f"total {human(sum(e.size for e in found))} in {where}")
    say("\n".join(lines))


@cache.command(context_settings=CONTEXT)
@click.option("--kind", "kinds", multiple=True, type=click.Choice(KIND_NAMES), metavar="KIND",
              help=f"Only this kind ({', '.join(KIND_NAMES)}; repeatable). Default: all of them.")
@click.option("--older-than", metavar="DURATION",
              help="Only entries unused for this long (30m, 24h, 7d).")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation on a terminal.")
@handle_errors
def prune(kinds: tuple[str, ...], older_than: str | None, force: bool) -> None:
    """Remove what the cache holds (of --kind, unused for --older-than): later commands unpack,
    compress and parse again."""
    from tracejail import caches

    try:
        age = parse_duration(older_than) if older_than is not None else None
    except ValueError as exc:
        raise UsageError(f"--older-than: {exc}") from None
    chosen = {caches.Kind(k) for k in kinds} or set(caches.Kind)
    if not force and sys.stdin.isatty():
        what = ", ".join(sorted(k.value for k in chosen))
        click.confirm(f"Remove the cached {what}{f' unused for {older_than}' if older_than else ''}?",
                      abort=True, err=True)
    removed = caches.prune(chosen, age)
    say(f"removed {len(removed)} entries, {human(sum(e.size for e in removed))}"
        + "".join(f"\n  {e.kind.value}: {e.name}" for e in removed if e.kind is caches.Kind.IMAGES))


CACHE = cache
