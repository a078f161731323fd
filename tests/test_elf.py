"""ELF facts (elf.py): the readers of what the kernel opens by itself at exec, PT_INTERP and `#!`,
which the tracer calls at every exec and verify for a failed one. (ElfCache's parse of the dynamic
section is exercised by test_closure.py against ldd; the ptrace loop by test_record.py.)"""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tracejail.elf import interpreter_of, shebang_of


def synthetic_elf(path: Path, elf_class: int, order: str, interp: bytes) -> None:
    """A minimal ELF header with one PT_INTERP program header (class 1: 32-bit, 2: 64-bit)."""
    ident = b"\x7fELF" + bytes([elf_class, 1 if order == "<" else 2, 1]) + bytes(9)
    if elf_class == 2:
        header = ident + struct.pack(order + "HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
        ph = struct.pack(order + "IIQQQQQQ", 3, 4, 120, 0, 0, len(interp), len(interp), 1)
    else:
        header = ident + struct.pack(order + "HHIIIIIHHHHHH", 2, 3, 1, 0, 52, 0, 0, 52, 32, 1, 0, 0, 0)
        ph = struct.pack(order + "IIIIIIII", 3, 84, 0, 0, len(interp), len(interp), 4, 1)
    path.write_bytes(header + ph + interp)


@pytest.mark.parametrize("elf_class, order", [(2, "<"), (2, ">"), (1, "<"), (1, ">")])
def test_pt_interp_of_either_class_and_byte_order(tmp_path: Path, elf_class: int, order: str) -> None:
    path = tmp_path / "prog"
    synthetic_elf(path, elf_class, order, b"/lib/ld-test.so.1\0")
    assert interpreter_of(str(path)) == "/lib/ld-test.so.1"


def test_pt_interp_of_real_programs(tmp_path: Path) -> None:
    assert interpreter_of(shutil.which("ls") or "/bin/ls") == "/lib64/ld-linux-x86-64.so.2"
    if shutil.which("gcc"):
        (tmp_path / "m.c").write_text("int main(void) { return 0; }\n")
        built = subprocess.run(["gcc", "-m32", "-o", str(tmp_path / "m32"), str(tmp_path / "m.c")],
                               capture_output=True)
        if built.returncode == 0:
            assert interpreter_of(str(tmp_path / "m32")) == "/lib/ld-linux.so.2"


@pytest.mark.parametrize("content", [b"", b"\x7fELF", b"\x7fELF\x02\x01" + b"\xff" * 58, b"#!/bin/sh\n",
                                     b"\x7fELF\x03\x01" + bytes(60)])
def test_pt_interp_of_what_is_not_a_dynamic_elf_is_none(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "f"
    path.write_bytes(content)
    assert interpreter_of(str(path)) is None
    assert interpreter_of(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("content, expected", [
    (b"#!/bin/sh\necho\n", "/bin/sh"), (b"#! /usr/bin/env python3 -u\n", "/usr/bin/env"),
    (b"#!\n", None), (b"echo\n", None), (b"", None)])
def test_shebang_of(tmp_path: Path, content: bytes, expected: str | None) -> None:
    path = tmp_path / "s"
    path.write_bytes(content)
    assert shebang_of(str(path)) == expected
