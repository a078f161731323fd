"""Failed lookups (tracejail.misses): one Miss per path whose every access failed, naming the call
seen most often and the process that asked, for `verify` and `inspect --misses` alike."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from tracejail import inspection as ins
from tracejail import trace as tr
from tracejail.misses import LISTING, Miss, miss_of, recorded_misses, short_command, who
from tracejail.record import RecordOptions, record
from tracejail.root import Root


def test_a_real_recording_lists_what_the_program_did_not_find(tmp_path: Path) -> None:
    # A program that probes three absent files (one three times) and reads one that exists.
    present = tmp_path / "present.txt"
    present.write_text("here\n")
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(f"""\
        import os
        for _ in range(3):
            os.path.exists({str(tmp_path / 'absent-a')!r})
        try:
            open({str(tmp_path / 'absent-b')!r})
        except FileNotFoundError:
            pass
        os.access({str(tmp_path / 'absent-c')!r}, os.R_OK)
        open({str(present)!r}).read()
        """))
    result = record([sys.executable, str(script)], RecordOptions(passthrough=False))
    assert result.run.status == 0, result.run.stderr
    misses = {m.path: m for m in recorded_misses(result.trace)}
    absent = {str(tmp_path / n) for n in ("absent-a", "absent-b", "absent-c")}
    assert absent <= set(misses) and str(present) not in misses
    a = misses[str(tmp_path / "absent-a")]
    assert (a.result, a.count) == ("ENOENT", 3) and a.syscall in ("newfstatat", "stat", "statx")
    assert misses[str(tmp_path / "absent-b")].syscall in ("openat", "open")
    assert misses[str(tmp_path / "absent-c")].syscall in ("faccessat", "faccessat2", "access")
    main = result.trace.runs[0].processes[0]
    main_pid = main.pid
    assert a.pids == (main_pid,) and a.run == 0
    assert main.argv[1:] == [str(script)] and a.process == who(main.argv) and a.process.startswith("python")
    # Nothing appeared since: not on the host now.
    assert not any(misses[p].exists_on_host for p in absent)
    # One run only: asking for run 0 changes nothing, another run has none.
    assert recorded_misses(result.trace, run=0) == recorded_misses(result.trace)
    assert recorded_misses(result.trace, run=5) == []
    # The JSON form is plain data (pids as a list).
    assert json.loads(json.dumps(a.to_json()))["pids"] == [main_pid]


def test_the_call_seen_most_often_names_the_miss_and_execve_wins_a_tie() -> None:
    accesses = [tr.Access("read", "openat", "ENOENT", 2, [11]), tr.Access("stat", "newfstatat", "ENOENT", 5, [12])]
    m = miss_of("/x", accesses, {}, run=0, exists_on_host=False)
    assert (m.syscall, m.count, m.pids, m.process) == ("newfstatat", 7, (11, 12), "?")
    tie = [tr.Access("stat", "newfstatat", "ENOENT", 1, [3]), tr.Access("exec", "execve", "ENOENT", 1, [3])]
    assert miss_of("/y", tie, {}, run=0, exists_on_host=False).syscall == "execve"


def test_the_first_known_asker_is_named_by_program_and_arguments() -> None:
    procs = {20: tr.ProcessInfo(pid=20, ppid=1, argv=["/usr/bin/python3", "app.py", "--port", "8000"],
                                  exe="/usr/bin/python3")}
    m = miss_of("/etc/app.conf", [tr.Access("read", "openat", "ENOENT", 1, [19, 20])], procs, run=1,
                exists_on_host=True, in_trace=True)
    assert m.process == "python3 app.py --port 8000" and m.run == 1 and m.in_trace and m.exists_on_host
    assert who([]) == "?" and short_command(["x" * 100]).endswith("...") and len(short_command(["x" * 100])) == 60


def test_only_paths_whose_every_access_failed_are_misses(tmp_path: Path) -> None:
    t = tr.Trace()
    t.record("/opt/gone").add("read", "openat", "ENOENT", pid=7)
    ok = t.record("/opt/there")
    ok.add("stat", "newfstatat", "ENOENT", pid=7)   # failed once, then found: not a miss
    ok.add("read", "openat", "ok", pid=7)
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt" / "gone").write_text("appeared later")
    misses = recorded_misses(t, root=Root(str(tmp_path)))
    # exists_on_host is judged in the tree the trace's files come from.
    assert [(m.path, m.exists_on_host) for m in misses] == [("/opt/gone", True)]


def test_describe_says_what_failed_and_what_the_image_user_needs() -> None:
    base = Miss(path="/data/out", syscall="openat", result="EACCES", count=2, pids=(5,), process="app",
                run=0, exists_on_host=True)
    assert base.describe() == "/data/out  (openat EACCES x2, by app)"
    owned = Miss(**{**base.__dict__, "needs": "/data"})
    assert owned.describe().endswith("; /data must belong to the image user")
    readonly = Miss(**{**base.__dict__, "result": "EROFS", "needs": "/data"})
    assert readonly.describe().endswith("; /data must be writable")
    listed = Miss(**{**base.__dict__, "syscall": LISTING})
    assert listed.describe() == "/data/out  (not in the listing of its directory, by app)"


def test_inspect_groups_the_same_misses_verify_reports() -> None:
    t = tr.Trace()
    t.record("/usr/lib/libfoo.so.1").add("read", "openat", "ok", pid=7)
    t.record("/opt/lib/libfoo.so.1").add("read", "openat", "ENOENT", pid=7)
    t.record("/etc/app.conf").add("read", "openat", "ENOENT", pid=7)
    grouped = ins.grouped_misses(t)
    assert [g.miss for g in grouped] == recorded_misses(t)
    assert {g.miss.path: g.group for g in grouped} == {"/opt/lib/libfoo.so.1": ins.MissGroup.SEARCH_PROBE,
                                                        "/etc/app.conf": ins.MissGroup.CONFIG}
    summary = ins.misses_summary(grouped)
    assert summary["hidden"] == {"search-probe": 1} and summary["groups"]["config"][0]["error"] == "ENOENT"
