"""The multi-stage `docker build` recipe of sample_workloads/docker-build: record and build inside a
RUN step of the builder stage, `COPY --from=builder /out/rootfs /` into a FROM-scratch stage.

Real builds on the private engine, with no network: the builder's base is Debian's own minbase
with python3 (tests/images.py), and tracejail goes into the build context as `tj/` — this
checkout's package and its dependencies as the running interpreter has them installed, the layout
`pip install --target tj` makes. The engine's BuildKit is used through a client that has it
(`docker buildx`, or a docker CLI older than 23 with BuildKit built in); without one that case
skips. Images the tests make are removed at the end (BuildKit's cache stays in the engine).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

import images

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_workloads" / "docker-build"
DEPENDENCIES = ("python-ptrace", "pyelftools", "click", "psutil")   # pyproject's, by name
IMAGE_USER = "65532:65532"
TAG = f"tj-recipe-{os.getpid()}"
BUILD_TIMEOUT = 900


def _tracejail_dir(dest: Path) -> None:
    """`pip install --target dest REPO`, without pip or a network: the checkout's package, and
    each dependency's files as this interpreter has them installed."""
    shutil.copytree(REPO / "tracejail", dest / "tracejail", ignore=shutil.ignore_patterns("__pycache__"))
    for name in DEPENDENCIES:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{name} is not installed for {sys.executable} (tests/run installs it)")
        base = Path(dist.locate_file("")).resolve()
        for item in dist.files or ():
            src = Path(dist.locate_file(item)).resolve()
            if "__pycache__" in src.parts or not src.is_file() or not src.is_relative_to(base):
                continue   # bin/ scripts point at this interpreter; caches are made again
            target = dest / src.relative_to(base)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


@dataclass
class Recipe:
    engine: object          # conftest.DockerEngine
    context: Path
    base: str


def _docker_build(engine, context: Path, *args: str, env: dict[str, str] | None = None,
                  docker: tuple[str, ...] = ("docker", "build")) -> subprocess.CompletedProcess[str]:
    env = env or {**engine.env, "DOCKER_BUILDKIT": "0"}
    return subprocess.run([*docker, "--network", "none", "--build-arg", f"BASE={images.BASE_TAG}", *args,
                           str(context)], env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT)


def _image_ids(engine) -> set[str]:
    return set(engine.run("images", "-aq", "--no-trunc").stdout.split())


@pytest.fixture(scope="module")
def recipe(docker_engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recipe]:
    base = images.import_python3_base(docker_engine)
    base_id = docker_engine.run("image", "inspect", "-f", "{{.Id}}", base).stdout.strip()
    context = tmp_path_factory.mktemp("recipe") / "docker-build"
    shutil.copytree(SAMPLE, context, ignore=shutil.ignore_patterns("tj", "__pycache__"))
    _tracejail_dir(context / "tj")
    before = _image_ids(docker_engine)
    try:
        yield Recipe(docker_engine, context, base)
    finally:
        # The tags, and the classic builder's intermediate images (children before parents).
        left = _image_ids(docker_engine) - before - {base_id}
        for _ in range(len(left) + 1):
            for image in sorted(left):
                if docker_engine.run("rmi", "-f", image, check=False).returncode == 0 or \
                        docker_engine.run("image", "inspect", image, check=False).returncode != 0:
                    left.discard(image)
            if not left:
                break
        assert not left, f"images the recipe tests made and could not remove: {sorted(left)}"


def _buildkit_client(engine) -> tuple[tuple[str, ...], dict[str, str]] | None:
    """A docker build command that uses the engine's BuildKit, with its environment, or None."""
    env = {**engine.env, "DOCKER_BUILDKIT": "1"}
    if subprocess.run(["docker", "buildx", "version"], env=env, capture_output=True).returncode == 0:
        return ("docker", "buildx", "build", "--load"), env
    for client in dict.fromkeys(filter(None, [shutil.which("docker"), "/usr/bin/docker"])):
        if not os.access(client, os.X_OK):
            continue
        proc = subprocess.run([client, "version", "--format", "{{.Client.Version}}"], env=env,
                              capture_output=True, text=True)
        major = proc.stdout.strip().split(".")[0]
        if major.isdigit() and int(major) < 23:   # Debian bookworm's docker.io 20.10: BuildKit built in
            return (client, "build"), env
    return None


@pytest.mark.parametrize("builder", ["classic", "buildkit"])
def test_recipe_builds_a_small_image_that_runs_as_the_image_user(recipe: Recipe, builder: str) -> None:
    engine = recipe.engine
    tag = f"{TAG}-{builder}:final"
    if builder == "classic":
        proc = _docker_build(engine, recipe.context, "--no-cache", "--force-rm", "-t", tag)
    else:
        found = _buildkit_client(engine)
        if found is None:
            pytest.skip("no BuildKit client: the docker buildx plugin is not installed and the docker CLI "
                        "has no BuildKit built in")
        command, env = found
        proc = _docker_build(engine, recipe.context, "--no-cache", "--progress", "plain", "-t", tag, env=env,
                             docker=command)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    # The app was recorded in a RUN step of this build (--no-cache: an engine named by
    # TRACEJAIL_DOCKER_HOST may hold a cache from another session).
    assert "tracejail: recorded: exit 0" in proc.stdout + proc.stderr

    run = engine.run("run", "--rm", tag, check=False, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == (SAMPLE / "expected_output.txt").read_text()

    config = json.loads(engine.run("image", "inspect", "-f", "{{json .Config}}", tag).stdout)
    assert config["User"] == IMAGE_USER
    assert config["Entrypoint"] == ["/usr/bin/python3"] and config["Cmd"] == ["app.py"]
    # As that user, owning its own tree (COPY --from keeps the owners tracejail staged); and
    # nothing of the builder came along: no tracejail, no /out, no shell the run never used.
    probe = engine.run("run", "--rm", "--entrypoint", "/usr/bin/python3", tag, "-c",
                       "import os; print(os.getuid(), os.getgid(), os.stat('/app').st_uid, "
                       "*(os.path.lexists(p) for p in ('/opt/tracejail', '/out', '/bin/sh', '/usr/bin/dash')))",
                       check=False, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["65532", "65532", "65532", "False", "False", "False", "False"]

    size = int(engine.run("image", "inspect", "-f", "{{.Size}}", tag).stdout)
    base_size = int(engine.run("image", "inspect", "-f", "{{.Size}}", recipe.base).stdout)
    print(f"recipe ({builder}): final image {size / 1e6:.1f} MB, builder base {base_size / 1e6:.1f} MB")
    assert size * 4 < base_size, (size, base_size)


def test_a_final_stage_that_does_not_repeat_the_config_fails_the_build(recipe: Recipe, tmp_path: Path) -> None:
    context = tmp_path / "docker-build"
    shutil.copytree(recipe.context, context)
    dockerfile = (context / "Dockerfile").read_text()
    line = 'ENV PATH="/usr/bin"\n'
    assert dockerfile.split("FROM scratch", 1)[1].count(line) == 1
    (context / "Dockerfile").write_text(dockerfile.replace(line, ""))
    proc = _docker_build(recipe.engine, context, "--force-rm", "-t", f"{TAG}-drift:final")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "+" + line in out and "the final stage must say exactly" in out, out[-2000:]
    assert recipe.engine.run("image", "inspect", f"{TAG}-drift:final", check=False).returncode != 0


def test_record_in_a_container_whose_seccomp_profile_refuses_ptrace(recipe: Recipe, tmp_path: Path) -> None:
    """What a build step meets where the seccomp profile refuses ptrace (kernels before 4.8 under
    Docker's default profile, or a stricter profile): exit 3 and one line. The same container
    with the engine's default profile records (a control: the difference is the profile)."""
    builder = f"{TAG}-builder:test"
    proc = _docker_build(recipe.engine, recipe.context, "--force-rm", "--target", "builder", "-t", builder)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    profile = tmp_path / "no-ptrace.json"
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["ptrace"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}))
    record = ["tracejail", "record", "-o", "/tmp/trace.json", "--", "python3", "app.py"]
    refused = recipe.engine.run("run", "--rm", "--security-opt", f"seccomp={profile}", builder, *record,
                                check=False, timeout=120)
    assert refused.returncode == 3, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tracejail: ") and "ptrace" in lines[0], refused.stderr
    assert "a seccomp filter refuses it" in lines[0] and "record in a container instead" in lines[0], lines[0]
    allowed = recipe.engine.run("run", "--rm", builder, *record, check=False, timeout=120)
    assert allowed.returncode == 0, allowed.stderr
