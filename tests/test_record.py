"""`tracejail record` on real processes under real ptrace: no mocks."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tracejail import trace as tr
from tracejail.record import RecordOptions, record

TJ = [sys.executable, "-m", "tracejail"]


def run_tj(*args: str, cwd: str | Path | None = None, timeout: float = 120,
           **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*TJ, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, **kw)


def load(path: Path) -> tr.Trace:
    return tr.load(str(path))


def ok_paths(trace: tr.Trace, kind: str | None = None) -> set[str]:
    return {p for p, r in trace.files.items() if r.ok and (kind is None or kind in r.kinds)}


def gcc(tmp: Path, name: str, source: str, *flags: str) -> Path:
    src = tmp / f"{name}.c"
    src.write_text(textwrap.dedent(source))
    out = tmp / name
    subprocess.run(["gcc", "-O1", "-o", str(out), str(src), *flags], check=True)
    return out


def no_leftovers(marker: str) -> list[psutil.Process]:
    """Processes still alive whose command line holds `marker` (make it unique to the test)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_python_imports_extension_modules_and_dlopen(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text("import ssl, sqlite3, ctypes, json\n"
                      "ctypes.CDLL('libz.so.1')\n"
                      "print(sqlite3.connect(':memory:').execute('select 6*7').fetchone()[0])\n")
    out = tmp_path / "trace.json"
    proc = run_tj("record", "-o", str(out), "--", "python3", str(script))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "42\n"           # passes through unchanged
    trace = load(out)
    run = trace.runs[0]
    assert run.stdout == "42\n" and run.exit_code == 0
    assert run.tracing["mode"] == "seccomp"
    paths = ok_paths(trace)
    names = {os.path.basename(p) for p in paths}
    # extension modules and the libraries they pull in at import time
    assert any(n.startswith("_ssl.cpython") for n in names)
    assert any(n.startswith("_sqlite3.cpython") for n in names)
    assert any(n.startswith("_ctypes.cpython") for n in names)
    assert any(n.startswith("libssl.so") for n in names)
    assert any(n.startswith("libsqlite3.so") for n in names)
    # ctypes.CDLL by name: the dlopen'd library, seen through the loader's own search
    assert any(n == "libz.so.1" for n in names)
    # .py sources that Python only stat'ed (their .pyc was opened)
    ssl_py = [p for p in paths if p.endswith("/ssl.py")]
    assert ssl_py, "ssl.py missing"
    assert "stat" in trace.files[ssl_py[0]].kinds
    assert any(p.endswith("ssl.cpython-311.pyc") or "__pycache__/ssl." in p for p in paths)
    # failed probes are kept with their errno
    failed = [r for r in trace.files.values() if r.failed]
    assert failed and all(a.result != "ok" for r in failed for a in r.accesses)
    assert any(a.result == "ENOENT" for r in failed for a in r.accesses)
    # the dynamic loader is named by PT_INTERP, opened by the kernel
    assert "/lib64/ld-linux-x86-64.so.2" in paths


def test_c_program_dlopens_plugin_chosen_at_run_time(tmp_path: Path) -> None:
    plugdir = tmp_path / "plugins"
    plugdir.mkdir()
    for name, text in (("alpha", "alpha"), ("beta", "beta")):
        src = plugdir / f"{name}.c"
        src.write_text(f'const char *hello(void) {{ return "{text}"; }}\n')
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(plugdir / f"lib{name}.so"), str(src)],
                       check=True)
    main = gcc(tmp_path, "main", r"""
        #include <dlfcn.h>
        #include <stdio.h>
        int main(int argc, char **argv) {
            char path[512];
            snprintf(path, sizeof path, "%s/lib%s.so", argv[1], argv[2]);
            void *h = dlopen(path, RTLD_NOW);
            if (!h) { fprintf(stderr, "%s\n", dlerror()); return 2; }
            const char *(*hello)(void) = (const char *(*)(void))dlsym(h, "hello");
            puts(hello());
            return 0;
        }""", "-ldl")
    out = tmp_path / "t.json"
    proc = run_tj("record", "-o", str(out), "--", str(main), str(plugdir), "beta")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "beta\n"
    paths = ok_paths(load(out))
    assert str(plugdir / "libbeta.so") in paths
    assert str(plugdir / "libalpha.so") not in paths
    assert str(main) in ok_paths(load(out), "exec")


def test_shebang_script_with_pipeline(tmp_path: Path) -> None:
    script = tmp_path / "report.sh"
    script.write_text("#!/bin/sh\nprintf 'b\\na\\nb\\n' | sort | uniq -c | awk '{print $2\"=\"$1}'\n")
    script.chmod(0o755)
    out = tmp_path / "t.json"
    proc = run_tj("record", "-o", str(out), "--", str(script))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "a=1\nb=2\n"
    trace = load(out)
    execs = ok_paths(trace, "exec")
    assert str(script) in execs
    assert "/bin/sh" in execs                               # the #! line, opened by the kernel
    assert any(p.endswith("/sort") for p in execs)
    assert any(p.endswith("/uniq") for p in execs)
    assert any(p.endswith("awk") for p in execs)
    assert len(trace.runs[0].processes) >= 4                 # sh + three pipeline members
    pids = {p.pid for p in trace.runs[0].processes}
    root = trace.runs[0].processes[0]
    assert all(p.ppid in pids for p in trace.runs[0].processes if p.pid != root.pid)


def test_openat_relative_to_directory_fd_and_empty_path(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "inside.txt").write_text("x")
    prog = gcc(tmp_path, "dirfd", r"""
        #define _GNU_SOURCE
        #include <fcntl.h>
        #include <stdio.h>
        #include <sys/stat.h>
        #include <unistd.h>
        int main(int argc, char **argv) {
            int d = open(argv[1], O_RDONLY | O_DIRECTORY);
            int f = openat(d, "inside.txt", O_RDONLY);
            int g = openat(d, "missing.txt", O_RDONLY);
            struct stat st;
            fstatat(d, "inside.txt", &st, 0);
            int p = openat(d, "inside.txt", O_PATH);
            faccessat(d, "inside.txt", R_OK, 0);
            chdir(argv[1]);
            int r = open("inside.txt", O_RDONLY);
            printf("%d %d %d %d\n", f >= 0, g < 0, p >= 0, r >= 0);
            return 0;
        }""")
    out = tmp_path / "t.json"
    proc = run_tj("record", "-o", str(out), "--", str(prog), str(data))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "1 1 1 1\n"
    trace = load(out)
    inside = trace.files[str(data / "inside.txt")]
    assert {"read", "stat"} <= inside.kinds
    counts = {(a.kind, a.syscall): a.count for a in inside.accesses if a.ok}
    assert counts[("read", "openat")] == 2            # via dirfd and via the new cwd
    missing = trace.files[str(data / "missing.txt")]
    assert missing.failed and missing.accesses[0].result == "ENOENT"
    assert "list" in trace.files[str(data)].kinds


def test_threads_open_files_and_spawn_processes(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"in{i}.txt").write_text(f"{i}\n")
    script = tmp_path / "threads.py"
    script.write_text(textwrap.dedent(f"""
        import subprocess, threading
        out = {{}}
        def work(i):
            with open(r"{tmp_path}/in%d.txt" % i) as f:
                data = f.read().strip()
            res = subprocess.run(["/bin/echo", "t%d" % i], capture_output=True, text=True)
            out[i] = data + res.stdout.strip()
        ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print(" ".join(out[i] for i in range(4)))
    """))
    out = tmp_path / "t.json"
    proc = run_tj("record", "-o", str(out), "--", "python3", str(script))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "0t0 1t1 2t2 3t3\n"
    trace = load(out)
    paths = ok_paths(trace)
    assert all(str(tmp_path / f"in{i}.txt") in paths for i in range(4))
    echoes = [p for p in trace.runs[0].processes if p.argv[:1] == ["/bin/echo"]]
    assert len(echoes) == 4
    root_pid = trace.runs[0].processes[0].pid
    # spawned from threads, attributed to the Python process (tgid), not to a thread id
    assert {p.ppid for p in echoes} == {root_pid}


def test_exec_from_non_leader_thread_and_vfork_and_daemon(tmp_path: Path) -> None:
    marker = tmp_path / "daemon-was-here"
    prog = gcc(tmp_path, "threxec", r"""
        #include <pthread.h>
        #include <spawn.h>
        #include <stdio.h>
        #include <stdlib.h>
        #include <string.h>
        #include <sys/wait.h>
        #include <unistd.h>
        extern char **environ;
        static char *marker;
        static void *run(void *arg) {
            char *argv[] = {"/bin/sh", "-c", "cat /etc/hostname >/dev/null; echo execd", NULL};
            execv("/bin/sh", argv);
            return NULL;
        }
        int main(int argc, char **argv) {
            marker = argv[1];
            pid_t pid;   /* posix_spawn uses clone(CLONE_VFORK) */
            char *a[] = {"/bin/true", NULL};
            posix_spawn(&pid, "/bin/true", NULL, NULL, a, environ);
            waitpid(pid, NULL, 0);
            if (fork() == 0) {            /* a daemonizing double fork */
                setsid();
                if (fork() == 0) {
                    usleep(200000);
                    char cmd[600];
                    snprintf(cmd, sizeof cmd, "touch %s", marker);
                    execl("/bin/sh", "sh", "-c", cmd, NULL);
                }
                _exit(0);
            }
            pthread_t t;
            pthread_create(&t, NULL, run, NULL);
            pthread_join(t, NULL);
            return 1;
        }""", "-pthread")
    out = tmp_path / "t.json"
    proc = run_tj("record", "-o", str(out), "--", str(prog), str(marker))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "execd\n"
    trace = load(out)
    paths = ok_paths(trace)
    assert "/etc/hostname" in paths                 # read after exec from a non-leader thread
    assert "/bin/true" in ok_paths(trace, "exec")   # vfork'd child
    # the grandchild outlived its parent and the root; the trace waited for it
    assert marker.exists()
    assert str(marker) in trace.files and trace.files[str(marker)].created_by_run


def test_exit_code_and_signal_propagation(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    assert run_tj("record", "-o", str(out), "--", "sh", "-c", "exit 7").returncode == 7
    assert load(out).runs[0].exit_code == 7
    assert run_tj("record", "-o", str(out), "--", "sh", "-c", "kill -USR1 $$").returncode == 128 + 10
    assert load(out).runs[0].exit_signal == signal.SIGUSR1
    # a signal the program handles is delivered to it as if untraced, SIGTRAP included
    script = tmp_path / "sig.py"
    script.write_text("import os, signal\n"
                      "got = []\n"
                      "for s in (signal.SIGUSR2, signal.SIGTRAP, signal.SIGCHLD):\n"
                      "    signal.signal(s, lambda n, f: got.append(n))\n"
                      "    os.kill(os.getpid(), s)\n"
                      "print(sorted(got))\n")
    proc = run_tj("record", "-o", str(out), "--", "python3", str(script))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{sorted([signal.SIGUSR2.value, signal.SIGTRAP.value, signal.SIGCHLD.value])}\n"
    # kill -STOP / -CONT really stops and resumes the program (group-stop with PTRACE_LISTEN)
    script.write_text("import os, signal\n"
                      "pid = os.fork()\n"
                      "if pid == 0:\n"
                      "    os.kill(os.getpid(), signal.SIGSTOP); os._exit(5)\n"
                      "_, st = os.waitpid(pid, os.WUNTRACED)\n"
                      "print('stopped', os.WIFSTOPPED(st))\n"
                      "os.kill(pid, signal.SIGCONT)\n"
                      "_, st = os.waitpid(pid, 0)\n"
                      "print('exit', os.WEXITSTATUS(st))\n")
    proc = run_tj("record", "-o", str(out), "--", "python3", str(script), timeout=30)
    assert proc.stdout == "stopped True\nexit 5\n", proc.stderr


SERVER = textwrap.dedent("""
    import http.server, os, signal, sys
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            with open(os.path.join(os.path.dirname(__file__), "data.txt"), "rb") as f:
                body = f.read()
            self.send_response(200); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_with_exercises(tmp_path: Path) -> None:
    app = tmp_path / "srv_exercise_marker.py"
    app.write_text(SERVER)
    (tmp_path / "data.txt").write_text("served\n")
    port = _free_port()
    out = tmp_path / "t.json"
    proc = run_tj("record", "-o", str(out), "--exercise", f"curl -sf http://127.0.0.1:{port}/",
                  "--exercise", "echo second; exit 3", "--", "python3", str(app), str(port))
    assert proc.returncode == 1                   # one exercise failed
    assert "exercise" in proc.stderr
    trace = load(out)
    run = trace.runs[0]
    assert [e.exit_code for e in run.exercises] == [0, 3]
    assert run.exercises[0].stdout == "served\n"
    assert run.exercises[1].stdout == "second\n"
    assert port in run.listening_ports
    assert run.stop_reason == "stopped" and run.exit_code == 0    # SIGTERM handler ran
    assert str(tmp_path / "data.txt") in ok_paths(trace)          # read only during the exercise
    assert no_leftovers("srv_exercise_marker") == []


def test_ready_timeout_and_ready_delay(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    proc = run_tj("record", "-o", str(out), "--ready-timeout", "1", "--exercise", "true",
                  "--", "sleep", "30.0417")
    assert proc.returncode == 1
    assert "did not listen" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    assert no_leftovers("sleep 30.0417") == []
    proc = run_tj("record", "-o", str(out), "--ready-delay", "0.2", "--exercise", "echo hi",
                  "--", "sleep", "31.0417")
    assert proc.returncode == 0, proc.stderr
    assert load(out).runs[0].exercises[0].stdout == "hi\n"
    assert no_leftovers("sleep 31.0417") == []


def test_append_merges_runs(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    assert run_tj("record", "-o", str(out), "--", "cat", "/etc/hostname").returncode == 0
    assert run_tj("record", "--append", "-o", str(out), "--", "cat", "/etc/os-release").returncode == 0
    trace = load(out)
    assert [r.argv for r in trace.runs] == [["cat", "/etc/hostname"], ["cat", "/etc/os-release"]]
    assert trace.files["/etc/hostname"].runs == [0]
    assert trace.files["/etc/os-release"].runs == [1]
    cat = [p for p in trace.files if p.endswith("/cat")][0]
    assert trace.files[cat].runs == [0, 1]
    assert all(p.run == 1 for p in trace.runs[1].processes)


def test_ctrl_c_mid_record_writes_trace_and_leaves_nothing(tmp_path: Path) -> None:
    script = tmp_path / "ctrlc_marker.py"
    script.write_text("import subprocess, sys, time\n"
                      "open('/etc/hostname').read()\n"
                      "child = subprocess.Popen(['sleep', '40.0417'])\n"
                      "try:\n    print('ready', flush=True)\n    time.sleep(60)\n"
                      "except KeyboardInterrupt:\n    print('interrupted', flush=True); sys.exit(130)\n")
    out = tmp_path / "t.json"
    proc = subprocess.Popen([*TJ, "record", "-o", str(out), "--", "python3", str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert "Traceback" not in stderr
    assert "interrupted" in stdout
    assert proc.returncode == 130
    trace = load(out)
    assert trace.runs[0].stop_reason == "interrupted"
    assert "/etc/hostname" in ok_paths(trace)
    time.sleep(0.2)
    # the sleep child shares the process group and got the SIGINT too, like from a terminal
    assert no_leftovers("ctrlc_marker") == [] and no_leftovers("sleep 40.0417") == []


def test_bad_inputs(tmp_path: Path) -> None:
    proc = run_tj("record", "-o", str(tmp_path / "t.json"), "--", "no-such-command-xyz")
    assert proc.returncode == 127
    assert proc.stderr.strip() == "tracejail: command not found: no-such-command-xyz"
    proc = run_tj("record")
    assert proc.returncode == 2 and "no command given" in proc.stderr
    # unwritable -o: the error comes before the target starts
    marker = tmp_path / "ran"
    proc = run_tj("record", "-o", "/nonexistent-dir/t.json", "--", "touch", str(marker))
    assert proc.returncode != 0 and "cannot write" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
    # corrupt or foreign trace for --append
    bad = tmp_path / "bad.json"
    bad.write_text("{\"hello\": 1}")
    proc = run_tj("record", "--append", "-o", str(bad), "--", "true")
    assert proc.returncode == 65 and "not a tracejail trace" in proc.stderr
    bad.write_text("{not json")
    proc = run_tj("record", "--append", "-o", str(bad), "--", "true")
    assert proc.returncode == 65 and "not valid JSON" in proc.stderr


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_ptrace_not_permitted_is_one_clear_line(tmp_path: Path) -> None:
    # Under strace -f the command already has a tracer, so our PTRACE_SEIZE is refused: the same
    # EPERM a container without SYS_PTRACE gives.
    proc = subprocess.run(["strace", "-f", "-o", "/dev/null", *TJ, "record", "-o",
                           str(tmp_path / "t.json"), "--", "true"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ptrace is not permitted" in lines[0] and "SYS_PTRACE" in lines[0]


def test_secrets_redacted_and_library_api(tmp_path: Path) -> None:
    env = dict(os.environ, API_TOKEN="hunter2", MY_PASSWORD="pw", HARMLESS="visible")
    rec = record(["sh", "-c", "cat /etc/hostname >/dev/null"],
                 RecordOptions(env=env, passthrough=False))
    envs = rec.run.environment
    assert envs["API_TOKEN"] == tr.REDACTED and envs["MY_PASSWORD"] == tr.REDACTED
    assert envs["HARMLESS"] == "visible"
    assert "/etc/hostname" in ok_paths(rec.trace)
    # the JSON holds the same model, and round-trips
    out = tmp_path / "t.json"
    tr.save(rec.trace, str(out))
    text = out.read_text()
    assert "hunter2" not in text
    data = json.loads(text)
    assert data["format"] == "tracejail-trace/1"
    again = tr.Trace.from_json(data)
    assert again.to_json() == rec.trace.to_json()
    assert set(data["host"]) >= {"arch", "kernel", "libc", "os_release"}


GH_TOKEN_VALUE = "ghp_" + "Q9w8" * 9


def test_secret_values_never_reach_the_trace_or_the_image(tmp_path: Path) -> None:
    """Scanned by value, not only by name: environment, command line, output. Then built: the
    image's Env, Entrypoint and provenance hold none of them, and the build says so loudly."""
    key = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----"
    env = dict(os.environ, DATABASE_URL="postgres://app:hunter2@db/app",
               SENTRY_DSN="https://deadbeefcafe@o1.ingest.sentry.io/7", GREETING=key,
               JAVA_OPTS="-Ddb.password=hunter3", NODE_GREETING=GH_TOKEN_VALUE, LANG="C.UTF-8")
    out = tmp_path / "t.json"
    proc = run_tj("record", "-o", str(out), "--", "sh", "-c", 'echo "token: $NODE_GREETING"; cat /etc/hostname',
                  "prog", "--db-password=hunter4", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "the command line holds a secret (argument 4)" in proc.stderr
    assert "environment: 5 secret value(s) stored as <redacted>" in proc.stderr
    text = out.read_text()
    for secret in ("hunter2", "deadbeefcafe", "MIIEvQIBADAN", "hunter3", GH_TOKEN_VALUE, "hunter4"):
        assert secret not in text, secret
    run = tr.load(str(out)).runs[0]
    assert run.environment["LANG"] == "C.UTF-8" and run.environment["DATABASE_URL"] == tr.REDACTED
    assert run.stdout.startswith(f"token: {tr.REDACTED}\n")
    assert run.argv[-1] == f"--db-password={tr.REDACTED}"

    from tracejail import build as tjbuild

    img = tmp_path / "i.tar"
    built = run_tj("build", str(out), "-o", str(img), "--provenance", "--no-compress", "--env", "EXTRA_TOKEN=zzz")
    assert built.returncode == 0, built.stderr
    assert "WARNING: the image's command (Entrypoint and Cmd) holds <redacted> (argument 4)" in built.stderr
    assert "WARNING: --env EXTRA_TOKEN holds a secret" in built.stderr
    data = img.read_bytes()
    for secret in ("hunter2", "deadbeefcafe", "MIIEvQIBADAN", "hunter3", GH_TOKEN_VALUE, "hunter4"):
        assert secret.encode() not in data, secret
    result = tjbuild.build(str(out), tjbuild.BuildOptions(output=str(tmp_path / "j.tar"), load=False,
                                                          entrypoint=["/bin/sh", "-c", "x", "--token", "abc"]))
    assert any("(Entrypoint and Cmd) holds a secret (argument 4)" in a for a in result.alerts)
    assert not any(e.startswith(("DATABASE_URL", "SENTRY_DSN", "JAVA_OPTS", "NODE_GREETING"))
                   for e in result.config.env)


def test_keep_argv_keeps_the_command_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    proc = run_tj("record", "-o", str(out), "--keep-argv", "--", "sh", "-c", "true", "prog", "--token=t0k3n")
    assert proc.returncode == 0 and "--keep-argv keeps it" in proc.stderr
    assert tr.load(str(out)).runs[0].argv[-1] == "--token=t0k3n"


def test_exact_mode_and_plain_ptrace_fallback_agree(tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text("import os\n"
                      "os.path.exists('/etc/hostname'); os.path.exists('/nonexistent/x')\n"
                      "open('/etc/os-release').read()\n")
    traces = []
    for opts in (RecordOptions(passthrough=False), RecordOptions(exact=True, passthrough=False),
                 RecordOptions(use_seccomp=False, passthrough=False)):
        traces.append(record(["python3", str(script)], opts).trace)
    for t in traces:
        assert {"/etc/hostname", "/etc/os-release"} <= ok_paths(t)
        assert t.files["/nonexistent/x"].failed
    assert traces[2].runs[0].tracing["mode"] == "ptrace"
    assert ok_paths(traces[0]) == ok_paths(traces[1])


def test_timeout_bounds_the_run(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    t0 = time.monotonic()
    proc = run_tj("record", "-o", str(out), "--timeout", "1", "--stop-timeout", "1", "--",
                  "sh", "-c", "cat /etc/hostname >/dev/null; sleep 33.0417")
    assert time.monotonic() - t0 < 20
    run = load(out).runs[0]
    assert run.stop_reason == "timeout"
    assert proc.returncode == 128 + signal.SIGTERM and run.exit_signal == signal.SIGTERM
    assert "/etc/hostname" in ok_paths(load(out))
    assert no_leftovers("sleep 33.0417") == []


def test_seccomp_filter_stops_only_on_file_syscalls() -> None:
    argv = ["python3", "-c", "import os\nfor i in range(300): os.getpid(); os.path.exists('/nonexistent')"]
    filtered = record(argv, RecordOptions(passthrough=False)).run.tracing["stops"]
    plain = record(argv, RecordOptions(use_seccomp=False, passthrough=False)).run.tracing["stops"]
    # every syscall stops twice without the filter; with it, only the traced ones, once
    assert filtered * 3 < plain


def test_dev_tty_without_a_terminal_is_a_failed_open(tmp_path: Path) -> None:
    # bash opens /dev/tty; with no controlling terminal the kernel says ENXIO though the node
    # exists on the host. Both precisions must agree.
    out = tmp_path / "t.json"
    for extra in ([], ["--exact"]):
        proc = subprocess.run([*TJ, "record", "-o", str(out), *extra, "--", "sh", "-c",
                               "cat /dev/tty 2>/dev/null || echo no-tty"], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, start_new_session=True, timeout=60)
        assert "no-tty" in proc.stdout, proc.stderr
        results = {a.result for a in load(out).files["/dev/tty"].accesses}
        assert results == {"ENXIO"}, (extra, results)


def test_pin_cpu_runs_tracer_and_program_on_one_cpu(tmp_path: Path) -> None:
    rec = record(["sh", "-c", "grep Cpus_allowed_list /proc/self/status"],
                 RecordOptions(pin_cpu=True, passthrough=False))
    allowed = rec.run.stdout.split(":")[1].strip()
    assert allowed.isdigit() and int(allowed) in os.sched_getaffinity(0)
    assert "/proc/self/status" in ok_paths(rec.trace)


def test_making_a_name_that_exists_fails_in_both_precisions(tmp_path: Path) -> None:
    # mkdir, symlink and link never replace a name: an existing one is EEXIST, and a directory
    # that only had `os.makedirs(exist_ok=True)` called on it was not written by the run.
    script = tmp_path / "probe.py"
    script.write_text("import os, sys\n"
                      "d = sys.argv[1]\n"
                      "os.makedirs(d + '/there', exist_ok=True); os.makedirs(d + '/new', exist_ok=True)\n"
                      "try: os.symlink('x', d + '/there')\n"
                      "except FileExistsError: pass\n")
    for n, opts in enumerate((RecordOptions(passthrough=False), RecordOptions(exact=True, passthrough=False))):
        place = tmp_path / str(n)
        (place / "there").mkdir(parents=True)
        trace = record(["python3", str(script), str(place)], opts).trace
        there, new = trace.files[str(place / "there")], trace.files[str(place / "new")]
        assert {a.result for a in there.accesses if a.kind == "write"} == {"EEXIST"}, opts
        assert not there.created_by_run
        assert new.created_by_run and {a.result for a in new.accesses if a.kind == "write"} == {"ok"}


def test_a_failed_recording_says_so_in_one_line_and_a_warning(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    failed = run_tj("record", "-o", str(out), "--", "python3", "nope.py", cwd=tmp_path)
    assert failed.returncode == 2
    assert re.search(r"^tracejail: recorded: exit 2, \d+ processes, ", failed.stderr, re.M), failed.stderr
    assert "warning: the recorded command failed with exit 2 (" in failed.stderr
    assert "can't open file" in failed.stderr.split("warning:")[1]
    assert load(out).runs[0].exit_code == 2       # the trace is written all the same
    exercised = run_tj("record", "-o", str(out), "--ready-delay", "0.2", "--exercise", "false",
                       "--exercise", "true", "--", "sleep", "30.0913")
    assert exercised.returncode == 1
    assert "1/2 exercises passed" in exercised.stderr and "warning: exercise 'false' exited 1" in exercised.stderr
    assert no_leftovers("sleep 30.0913") == []
    fine = run_tj("record", "-o", str(out), "--", "true")
    assert fine.returncode == 0 and "recorded: exit 0, 1 processes" in fine.stderr and "warning" not in fine.stderr


def test_pythons_own_locale_coercion_does_not_reach_the_command(tmp_path: Path) -> None:
    """Started in the C locale, Python sets LC_CTYPE=C.UTF-8 for itself (PEP 538): the recorded
    program never had it, so neither its trace nor an image built from it gets it."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
           "TRACEJAIL_CACHE_DIR": ""}
    out = subprocess.run([sys.executable, "-m", "tracejail", "record", "-o", str(tmp_path / "t.json"), "--",
                          "sh", "-c", "echo ctype=${LC_CTYPE-unset}"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ctype=unset\n"
    assert "LC_CTYPE" not in tr.load(str(tmp_path / "t.json")).runs[0].environment
    given = subprocess.run([sys.executable, "-m", "tracejail", "record", "-o", str(tmp_path / "t2.json"), "--",
                            "sh", "-c", "echo ctype=${LC_CTYPE-unset}"], capture_output=True, text=True,
                           env={**env, "LC_CTYPE": "C.UTF-8"}, timeout=60)
    assert given.stdout == "ctype=C.UTF-8\n"


def test_a_command_that_is_never_ready_says_why_in_one_line(tmp_path: Path) -> None:
    """Readiness failures are typed (record.ReadyError): record prints the long form, verify's
    report the short one."""
    from tracejail.record import NotReady, ReadyError

    out = subprocess.run([sys.executable, "-m", "tracejail", "record", "-o", str(tmp_path / "t.json"),
                          "--exercise", "true", "--", "true"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == \
        "tracejail: the command exited before it was ready for the exercises (see its output above)"
    assert not (tmp_path / "t.json").exists()
    rec = record(["sleep", "5"], RecordOptions(exercises=["true"], ready_timeout=0.3, keep_unready=True,
                                               stop_timeout=1, passthrough=False))
    assert rec.ready_error == ReadyError(NotReady.TIMEOUT, None, 0.3)
    assert rec.ready_error.short() == "the command did not listen on any TCP port within 0.3s"
    assert ReadyError(NotReady.TIMEOUT, 8000, 2).message().endswith("use --ready-port / --ready-delay")
