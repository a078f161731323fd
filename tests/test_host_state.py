"""The session's leave-no-trace check sees a change when there is one (so its silence means something)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import _host_state


def test_a_new_interface_is_seen() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    before = _host_state()
    name = f"tjprobe{os.getpid() % 10000}"
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    try:
        changed = _host_state()
    finally:
        subprocess.run(["ip", "link", "del", name], check=True)
    assert name in changed["interfaces"] - before["interfaces"]
    assert _host_state()["interfaces"] == before["interfaces"]
