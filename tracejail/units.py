"""Byte counts for people: printed (`human`) and parsed from options (`parse_size`)."""
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
