#!/usr/bin/env python3
"""python-cli: a stdlib-only script whose run-time needs are invisible to ldd.

Every section pulls in something that is only found at run time: extension
modules from lib-dynload (and the shared libraries *they* link), a library
opened by name through ctypes/dlopen, time-zone data files, the OpenSSL
configuration. The report it prints is deterministic (no versions, paths,
timestamps or pids).
"""

import ctypes
import datetime
import hashlib
import json
import sqlite3
import ssl
import zlib
from zoneinfo import ZoneInfo


def section_sqlite() -> list[str]:
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE fruit (name TEXT PRIMARY KEY, colour TEXT, qty INTEGER)")
    con.executemany(
        "INSERT INTO fruit VALUES (?, ?, ?)",
        [("apple", "red", 3), ("banana", "yellow", 12), ("cherry", "red", 40), ("lime", "green", 7)],
    )
    rows = con.execute(
        "SELECT colour, COUNT(*), SUM(qty) FROM fruit GROUP BY colour ORDER BY SUM(qty) DESC, colour"
    ).fetchall()
    con.close()
    return [f"sqlite3: {colour} count={n} qty={qty}" for colour, n, qty in rows]


def section_hashlib() -> list[str]:
    text = "tracejail"
    return [
        f"hashlib: sha256({text!r}) = {hashlib.sha256(text.encode()).hexdigest()}",
        f"hashlib: md5({text!r}) = {hashlib.md5(text.encode()).hexdigest()}",
    ]


def section_ssl() -> list[str]:
    # Creating a context makes OpenSSL read its configuration file and the
    # default CA locations; none of that shows up in ldd output.
    ctx = ssl.create_default_context()
    return [
        "ssl: default context created",
        f"ssl: protocol={ctx.protocol.name} verify_mode={ctx.verify_mode.name} "
        f"check_hostname={ctx.check_hostname}",
        f"ssl: has TLSv1.3={ssl.HAS_TLSv1_3}",
    ]


def section_zoneinfo() -> list[str]:
    out = []
    for stamp in ("2024-01-15T12:00:00", "2024-07-01T12:00:00"):
        utc = datetime.datetime.fromisoformat(stamp).replace(tzinfo=datetime.timezone.utc)
        for zone in ("Europe/Paris", "America/New_York", "Asia/Kolkata"):
            local = utc.astimezone(ZoneInfo(zone))
            out.append(f"zoneinfo: {stamp}Z -> {zone} {local:%Y-%m-%d %H:%M} {local.tzname()}")
    return out


def section_ctypes() -> list[str]:
    # Opened by soname at run time: the dynamic loader searches for them
    # (ld.so.cache, then the default directories). No ldconfig, no gcc needed.
    libm = ctypes.CDLL("libm.so.6")
    libm.cos.restype = ctypes.c_double
    libm.cos.argtypes = [ctypes.c_double]
    libm.sqrt.restype = ctypes.c_double
    libm.sqrt.argtypes = [ctypes.c_double]

    libz = ctypes.CDLL("libz.so.1")
    libz.crc32.restype = ctypes.c_ulong
    libz.crc32.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_uint]
    data = b"tracejail"
    crc = libz.crc32(0, data, len(data))
    return [
        f"ctypes: libm cos(0.0) = {libm.cos(0.0):.1f}",
        f"ctypes: libm sqrt(2.0) = {libm.sqrt(2.0):.6f}",
        f"ctypes: libz crc32({data.decode()!r}) = {crc:08x} (matches zlib module: {crc == zlib.crc32(data)})",
    ]


def main() -> None:
    lines = ["python-cli report"]
    lines += section_sqlite()
    lines += section_hashlib()
    lines += section_ssl()
    lines += section_zoneinfo()
    lines += section_ctypes()
    summary = {"sections": 5, "lines": len(lines) + 1, "ok": True}
    lines.append("json: " + json.dumps(summary, sort_keys=True))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
