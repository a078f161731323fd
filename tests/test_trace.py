"""The trace is data from anywhere: every malformed shape is one line and exit 65, never a traceback."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tracejail import trace as tr
from tracejail.errors import TraceFormatError

TJ = [sys.executable, "-m", "tracejail"]


def good() -> dict[str, Any]:
    run = tr.Run(argv=["/bin/echo", "hi"], executable="/bin/echo", cwd="/", uid=0, gid=0,
                 environment={"LANG": "C"}, started="2026-11-29T00:00:00Z", exit_code=0, stdout="hi\n",
                 exercises=[tr.ExerciseResult("curl -s localhost:8000/", 0, "ok", "")],
                 listening_ports=[8000], processes=[tr.ProcessInfo(7, None, ["/bin/echo", "hi"], "/bin/echo")],
                 tracing={"mode": "seccomp", "exact": False, "stops": 12, "warnings": []})
    trace = tr.Trace(runs=[run], host=tr.host_info())
    trace.record("/bin/echo").add("exec", "execve", "ok", 7)
    trace.record("/etc/ld.so.preload").add("read", "openat", "ENOENT", 7)
    return trace.to_json()


def mutate(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(good())
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is DELETE:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return data


DELETE = object()

BAD = [
    ("runs.0.argv", 5, "field runs[0].argv must be a list, not the number 5"),
    ("runs.0.argv", [], "field runs[0].argv must be a non-empty list of strings"),
    ("runs.0.argv", ["/bin/echo", 3], "field runs[0].argv[1] must be a string"),
    ("runs.0.environment", ["A=1"], "field runs[0].environment must be an object, not a list"),
    ("runs.0.environment", {"A": 1}, "field runs[0].environment.A must be a string"),
    ("runs.0.cwd", "relative/dir", "field runs[0].cwd must be an absolute path"),
    ("runs.0.uid", -1, "field runs[0].uid must be an integer"),
    ("runs.0.exit_code", "0", "field runs[0].exit_code must be an integer"),
    ("runs.0.stop_reason", "exploded", "field runs[0].stop_reason must be one of"),
    ("runs.0.listening_ports", [70000], "field runs[0].listening_ports[0] must be an integer from 1"),
    ("runs.0.exercises.0.command", ["sh"], "field runs[0].exercises[0].command must be a string"),
    ("runs.0.processes.0.pid", "7", "field runs[0].processes[0].pid must be an integer"),
    ("runs.0.tracing", {"nested": {"x": 1}}, "field runs[0].tracing.nested must be a string, number"),
    ("runs.0.started", DELETE, "field runs[0].started must be present"),
    ("files.0.path", "etc/passwd", "field files[0].path must be an absolute path"),
    ("files.0.path", "/etc/pa\0sswd", "field files[0].path must be an absolute path"),
    ("files.0.accesses", {"kind": "read"}, "field files[0].accesses must be a list"),
    ("files.0.accesses.0.kind", "teleport", "field files[0].accesses[0].kind must be one of exec, read"),
    ("files.0.accesses.0.kind", ["read"], "field files[0].accesses[0].kind must be one of"),
    ("files.0.accesses.0.result", "fine", 'field files[0].accesses[0].result must be "ok" or an errno name'),
    ("files.0.accesses.0.count", True, "field files[0].accesses[0].count must be a non-negative integer"),
    ("files.0.accesses.0.pids", [-1], "field files[0].accesses[0].pids must be a list of process ids"),
    ("files.0.runs", [3], "field files[0].runs must be a list of run indices below 1"),
    ("files.0.created_by_run", "yes", "field files[0].created_by_run must be true or false"),
    ("host.os_release", ["x"], "field host.os_release must be an object"),
    ("runs", {"0": {}}, "field runs must be a list, not an object"),
    ("files", DELETE, "field files must be present"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[f"{p}={v!r}"[:40] for p, v, _ in BAD])
def test_each_bad_field_is_named(path: str, value: Any, message: str) -> None:
    with pytest.raises(TraceFormatError) as err:
        tr.Trace.from_json(mutate(path, value), source="t.json")
    assert message in str(err.value)
    assert err.value.exit_code == 65


@pytest.mark.parametrize("path,value,message", BAD[:3] + BAD[14:17], ids=[p for p, _, _ in BAD[:3] + BAD[14:17]])
def test_the_streaming_reader_says_the_same(tmp_path: Path, path: str, value: Any, message: str) -> None:
    f = tmp_path / "t.json"
    f.write_text(json.dumps(mutate(path, value)))
    with pytest.raises(TraceFormatError, match=re.escape("is not a valid trace: " + message.split(" must")[0])):
        tr.load(str(f))


def test_a_good_trace_round_trips_by_both_readers(tmp_path: Path) -> None:
    data = good()
    f = tmp_path / "t.json"
    f.write_text(json.dumps(data))
    streamed = tr.load(str(f))
    reordered = {"files": data["files"], **{k: v for k, v in data.items() if k != "files"}}
    f.write_text(json.dumps(reordered))
    whole = tr.load(str(f))        # "files" first: read whole, same result
    assert streamed.to_json() == whole.to_json() == tr.Trace.from_json(data).to_json()


def test_bounds_on_nesting_size_and_counts(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text('{"format": "tracejail-trace/1", "runs": ' + "[" * 200_000 + "]" * 200_000 + ', "files": []}')
    with pytest.raises(TraceFormatError, match="nested too deeply"):
        tr.load(str(deep))
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(tr.MAX_TRACE_BYTES + 1)       # sparse: never read
    with pytest.raises(TraceFormatError, match="a trace is at most"):
        tr.load(str(huge))
    many = good()
    many["runs"] = many["runs"] * (tr.MAX_RUNS + 1)
    with pytest.raises(TraceFormatError, match="field runs must be a list of at most"):
        tr.Trace.from_json(many)


@pytest.mark.parametrize("text", ["", "[]", "null", '{"format": 3}', '{"format": "tracejail-trace/9"}',
                                  "\xff\xfe", '{"format": "tracejail-trace/1", "runs": [], "files": [] } x'])
def test_not_a_trace_at_all(tmp_path: Path, text: str) -> None:
    f = tmp_path / "t.json"
    f.write_bytes(text.encode("latin-1"))
    with pytest.raises(TraceFormatError):
        tr.load(str(f))


def test_cli_gives_one_line_and_65_for_every_command(tmp_path: Path) -> None:
    f = tmp_path / "t.json"
    f.write_text(json.dumps(mutate("runs.0.environment", ["A=1"])))
    for args in (["build", str(f), "-o", str(tmp_path / "i.tar")], ["inspect", str(f)],
                 ["explain", str(f), "/bin/echo"], ["verify", str(f), "--rootfs", str(tmp_path)]):
        proc = subprocess.run([*TJ, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 65, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert "field runs[0].environment must be an object" in proc.stderr


def test_a_source_images_secrets_are_scrubbed_before_the_trace_stores_them() -> None:
    config = tr.SourceConfig(entrypoint=["/app", "--token=t0k"], cmd=["--port", "80"],
                             env=["PATH=/usr/bin", "DB_PASSWORD=hunter2"],
                             labels={"org.opencontainers.image.authors": "Jane", "db.password": "hunter2"})
    said = tr.scrub_source(config)
    assert sorted(config.env) == [f"DB_PASSWORD={tr.REDACTED}", "PATH=/usr/bin"]
    assert config.entrypoint == ["/app", f"--token={tr.REDACTED}"] and config.cmd == ["--port", "80"]
    # Labels are judged by the words of their name: "authors" is not "auth".
    assert config.labels == {"org.opencontainers.image.authors": "Jane", "db.password": tr.REDACTED}
    assert said and "label db.password" in said[0] and "authors" not in said[0]
