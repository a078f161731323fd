"""The compilers, loaders and tools the ELF tests compare against, and how they build fixtures."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

GCC = shutil.which("gcc")
MUSL_GCC = shutil.which("musl-gcc")
LDD = shutil.which("ldd")
LDCONFIG = shutil.which("ldconfig") or ("/sbin/ldconfig" if os.path.exists("/sbin/ldconfig") else None)
IS_X86_64 = os.uname().machine == "x86_64"
RTLD = "/lib64/ld-linux-x86-64.so.2"
RTLD32 = "/lib/ld-linux.so.2"


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:   # noqa: ANN003 - subprocess.run's own
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def compile_c(out: Path, source: str, *args: str, compiler: str | None = GCC) -> Path:
    """Compile C `source` to `out` with `compiler` (a shared object if "-shared" is among args)."""
    assert compiler is not None, "no C compiler"
    src = out.with_name(out.name + ".c")
    src.write_text(source)
    extra = ["-fPIC"] if "-shared" in args else []
    run(compiler, *extra, "-o", str(out), str(src), *args)
    return out
