"""Text for people: byte counts printed (`human`) and parsed (`parse_size`), and anything taken
from a trace or a program made safe to print on a terminal (`shown`)."""
from __future__ import annotations

import re

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def human(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def parse_size(text: str) -> int:
    """`4G`, `512M`, `100k`, `1000` (bytes; binary multiples, as `docker --memory` reads them)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 4G, 512M, 100k)")
    return int(m.group(1)) * _SUFFIXES[m.group(2).upper()]


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """`90s`, `30m`, `24h`, `7d`, `2w` (seconds), as `docker ... prune --filter until=` takes them."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 30m, 24h, 7d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


# C0 controls (ESC starts terminal escape sequences: colours, OSC titles and hyperlinks, cursor
# moves), DEL, C1 controls (0x9b is a one-byte CSI), bidi overrides that reorder what is shown,
# and lone surrogates (undecodable bytes of a path), which a UTF-8 terminal cannot even take.
_UNSAFE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNSAFE_BLOCK = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\x1b": "\\e"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def shown(text: str, *, block: bool = False) -> str:
    """`text` with control characters written out (`\\e`, `\\x9b`, `\\n`...): a path, argv word
    or program output from a trace can neither drive the terminal nor forge a line.
    `block` keeps newlines and tabs (multi-line program output)."""
    return (_UNSAFE_BLOCK if block else _UNSAFE_LINE).sub(_escape, text)
