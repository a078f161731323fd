"""`tracejail minify IMAGE -t NEW`: record the image's command in the image (record_image), build
the minified image from that trace, and verify it by replaying the run, in one step.

The trace is written to `--trace FILE` when asked (to rebuild, explain or verify later), else to
a private temporary directory that goes when minify ends.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tracejail import build as tjbuild
from tracejail import docker_engine
from tracejail import trace as tr
from tracejail.errors import TracejailError, UsageError
from tracejail.record import Recording, RecordOptions
from tracejail.record_image import ImageRunOptions, record_image


@dataclass
class MinifyOptions:
    image: str
    run: ImageRunOptions
    record: RecordOptions
    build: tjbuild.BuildOptions
    trace_path: str | None = None      # keep the trace here (default: a temporary file)
    verify: bool = True


@dataclass
class MinifyResult:
    image: str
    tags: list[str]
    trace_path: str | None             # None: the trace was temporary
    recording: Recording
    built: tjbuild.BuildResult
    verified: Any = None               # verify.VerifyReport, when verify ran
    not_verified: str | None = None    # why verify did not run
    seconds: dict[str, float] = field(default_factory=dict)   # record, build, verify

    @property
    def source(self) -> tr.ImageSource:
        assert self.recording.trace.source is not None
        return self.recording.trace.source

    @property
    def passed(self) -> bool:
        return self.verified is None or self.verified.passed

    def summary(self) -> dict[str, Any]:
        built = self.built.summary()
        src = self.source
        after_content, after_compressed = built["bytes"], built["image_size"]
        return {
            "image": self.image, "image_id": src.image_id, "tags": self.tags, "new_image_id": built["image_id"],
            "trace": self.trace_path,
            "before": {"compressed": src.compressed_size, "content": src.content_size},
            "after": {"compressed": after_compressed, "content": after_content, "files": built["files"]},
            "ratio": {"compressed": _ratio(after_compressed, src.compressed_size),
                      "content": _ratio(after_content, src.content_size)},
            "verified": self.verified.to_json() if self.verified is not None else None,
            "not_verified": self.not_verified, "passed": self.passed, "seconds": self.seconds, "build": built,
        }


def _ratio(after: int | None, before: int) -> float | None:
    return round(after / before, 4) if after is not None and before else None


def minify(opts: MinifyOptions, progress: Callable[[str], None] | None = None,
           bar: Callable[[str, int, int], None] | None = None) -> MinifyResult:
    from tracejail import verify as tjverify

    say = progress or (lambda _m: None)
    if not opts.build.tags:
        raise UsageError("minify needs -t NAME[:TAG] for the new image")
    if opts.trace_path:
        tr.check_writable(opts.trace_path)
    with tempfile.TemporaryDirectory(prefix="tracejail-minify-") as tmp:
        trace_path = opts.trace_path or os.path.join(tmp, "trace.json")
        say(f"recording {opts.image} in tracejail's sandbox")
        # The program's output is kept in the trace and compared by verify, not printed: minify's
        # own stdout is its report (or --json).
        started = time.monotonic()
        rec = record_image(dataclasses.replace(opts.run, image=opts.image),
                           dataclasses.replace(opts.record, passthrough=False), progress=say)
        recorded = time.monotonic()
        tr.save(rec.trace, trace_path)
        problems = tr.run_problems(rec.run)
        failed = [e for e in rec.run.exercises if e.exit_code != 0]
        if problems or failed or len(rec.run.exercises) < len(opts.record.exercises):
            what = problems[0] if problems else (f"exercise {failed[0].command!r} exited {failed[0].exit_code}"
                                                 if failed else "not every exercise ran")
            kept = f"; the trace is in {opts.trace_path}" if opts.trace_path else ""
            raise TracejailError(f"the run in {opts.image} did not succeed ({what}): nothing was built{kept}")
        bopts = opts.build
        engine = bopts.load and docker_engine.engine_problem(bopts.docker_env) is None
        if opts.verify and not engine and not bopts.rootfs_dir:
            # No engine to run the new image in: verify its tree in the sandbox the run was recorded in.
            bopts = dataclasses.replace(bopts, rootfs_dir=os.path.join(tmp, "rootfs"))
        say("building the minified image")
        built = tjbuild.build(trace_path, bopts, progress=bar, say=progress)
        result = MinifyResult(opts.image, list(bopts.tags), opts.trace_path, rec, built)
        finished = time.monotonic()
        result.seconds = {"record": round(recorded - started, 2), "build": round(finished - recorded, 2)}
        check = tjverify.VerifyOptions(docker_env=bopts.docker_env, trust_trace=True,
                                       ready_timeout=opts.record.ready_timeout, stop_timeout=opts.record.stop_timeout)
        if not opts.verify:
            result.not_verified = "--no-verify"
        elif built.loaded_id:
            say(f"verifying {bopts.tags[0]}: replaying the run in it")
            result.verified = tjverify.verify(trace_path, dataclasses.replace(check, image=bopts.tags[0]),
                                              progress=progress)
        elif built.rootfs_dir:
            say(f"verifying the image's tree in tracejail's sandbox (no engine: {built.load_note or 'not loaded'})")
            result.verified = tjverify.verify(trace_path, dataclasses.replace(check, rootfs=built.rootfs_dir),
                                              progress=progress)
        else:
            result.not_verified = built.load_note or "the image was not loaded into an engine"
        if result.verified is not None:
            result.seconds["verify"] = round(time.monotonic() - finished, 2)
    return result
