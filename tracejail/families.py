"""Families of files chosen by a name that comes from input: one run shows one member.

A codec, a time zone, a character set is looked up by a name the program reads from its input
or its environment, so the recording shows the members that input named and the next input
needs another. Like the NSS and gconv rules of the ELF closure (runtime_loads.py), each family
here has a trigger in the trace and, once triggered, keeps every member:

* `python-encodings`: a Python run that imported any codec from a stdlib `encodings` package
  keeps the whole package (its .py files and the cached .pyc the run's interpreter reads: the
  plain ones, or `.opt-1` under `python -O`), and the
  CJK codec extension modules those import (`_codecs_*`, `_multibytecodec`);
* `zoneinfo`: a run that read one time zone file keeps the whole zoneinfo tree it came from
  (/usr/share/zoneinfo, or a `tzdata` Python package's).

`build --no-family NAME` turns one off. Everything added is listed in the build summary.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from tracejail.root import NodeKind, Root

_ENCODINGS = re.compile(r"^(?P<pkg>/.+/python3\.\d+/encodings)/(?:__pycache__/)?(?!__init__|aliases)[A-Za-z0-9_]+"
                        r"(?:\.[A-Za-z0-9_-]+)?(?:\.opt-[12])?\.pyc?$")
# A cached module of the package: NAME.TAG.pyc, or NAME.TAG.opt-1.pyc under `python -O` (opt-2: -OO).
_CACHED = re.compile(r"^(?P<pkg>/.+)/__pycache__/[A-Za-z0-9_]+\.(?P<flavour>[A-Za-z0-9_-]+(?:\.opt-[12])?)\.pyc$")
# A zone is named from a capital ("Europe/Paris", "UTC"), also in the posix/ and right/ copies.
_ZONEINFO = re.compile(r"^(?P<top>/.*/zoneinfo)/(?:posix/|right/)?[A-Z][^/]*(?:/[^/]+)*$")


@dataclass(frozen=True)
class Family:
    name: str
    why: str
    # (trace paths that were found) -> [(directory to keep, filter on names below it)]
    members: Callable[[Iterable[str], Root], list[str]]


def _encodings(paths: Iterable[str], root: Root) -> list[str]:
    out: list[str] = []
    paths = list(paths)
    for pkg in sorted({m.group("pkg") for p in paths if (m := _ENCODINGS.match(p))}):
        names = root.listdir(pkg)
        # The cached modules the run itself loaded say which flavour its interpreter reads (plain,
        # or .opt-1 under `python -O`); without any, the plain ones the package has.
        flavours = {m.group("flavour") for p in paths if (m := _CACHED.match(p)) and m.group("pkg") == pkg}
        if not flavours:
            flavours = {n.split(".")[1] for n in root.listdir(pkg + "/__pycache__") if n.count(".") == 2}
        for name in names:
            if name.endswith(".py"):
                out.append(f"{pkg}/{name}")
                for flavour in sorted(flavours):
                    out.append(f"{pkg}/__pycache__/{name[:-3]}.{flavour}.pyc")
        dynload = pkg.rsplit("/", 1)[0] + "/lib-dynload"
        out += [f"{dynload}/{n}" for n in root.listdir(dynload)
                if n.startswith(("_codecs_", "_multibytecodec")) and n.endswith(".so")]
    return [p for p in out if root.resolve(p).kind is NodeKind.FILE]


def _zoneinfo(paths: Iterable[str], root: Root) -> list[str]:
    out: list[str] = []
    for top in sorted({m.group("top") for p in paths if (m := _ZONEINFO.match(p))}):
        out += root.walk_files(top)
    return out


FAMILIES = (
    Family("python-encodings",
           "Python looks codecs up by name (str.decode, open(encoding=...)), from the input: it "
           "imported one from this encodings package, other input may name another",
           _encodings),
    Family("zoneinfo",
           "time zones are chosen by name (TZ, zoneinfo.ZoneInfo): the run read one, other input "
           "may name another",
           _zoneinfo),
)
NAMES = tuple(f.name for f in FAMILIES)


def members(found: Iterable[str], root: Root, off: Iterable[str] = ()) -> Iterator[tuple[Family, str]]:
    """(family, path) for every member of every family that `found` (the paths the trace found)
    triggers, except the families in `off`."""
    found = list(found)
    off = frozenset(off)
    for family in FAMILIES:
        if family.name in off:
            continue
        for path in family.members(found, root):
            yield family, path
