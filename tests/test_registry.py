"""Pushing to registries (tracejail.registry) against a real registry: Debian's docker-registry
(distribution 2.8) run by the tests on loopback, with no auth, with htpasswd basic auth, with the
bearer-token flow (a token server in the test signs RS256 JWTs with a self-signed key the
registry trusts), and with TLS on a non-loopback address. What was pushed is read back over
the API, with skopeo, and pulled and run by a private Docker engine. A small fake registry
(http.server) covers the answers a real one does not give on demand: relative Location headers,
5xx, a wrong manifest digest, silence."""
from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, cast

import pytest

from conftest import DockerEngine, static_program
from tracejail import image, registry, rootfs
from tracejail.registry import PushOptions, RegistryError

REGISTRY_BIN = "/usr/bin/docker-registry"
START_TIMEOUT = 20.0
USER, PASSWORD = "tjuser", "s3cret-" + uuid.uuid4().hex[:12]   # unique: a leak in a message is findable
TOKEN_SERVICE, TOKEN_ISSUER = "tracejail-test-registry", "tracejail-test-issuer"

HELLO_C = r"""
#include <stdio.h>
int main(int argc, char **argv) {
    char buf[256] = "";
    FILE *f = argc > 1 ? fopen(argv[1], "r") : NULL;
    if (f) { size_t n = fread(buf, 1, sizeof buf - 1, f); buf[n] = 0; fclose(f); }
    printf("hello from the registry: %s\n", buf);
    return 0;
}
"""


# ------------------------------------------------------------------------------------------
# Helpers: ports, certificates, processes


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def non_loopback_address() -> str | None:
    """A global IPv4 address of this machine (a registry there is not "localhost" to tracejail)."""
    if shutil.which("ip") is None:
        return None
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        words = line.split()
        if "inet" in words:
            return words[words.index("inet") + 1].split("/")[0]
    return None


def self_signed(directory: Path, name: str, san: str) -> tuple[Path, Path]:
    """A key and a self-signed certificate (openssl CLI)."""
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}"],
                   check=True, capture_output=True)
    return key, cert


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def ask(host: str, port: int, method: str, path: str, headers: dict[str, str] | None = None,
        tls: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One plain request to a test server (not through tracejail)."""
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, timeout=10, context=ctx)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@dataclass
class RunningRegistry:
    """A docker-registry process of the tests' own."""

    address: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: str
    tls: bool = False
    basic: tuple[str, str] | None = None

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"

    def ref(self, repo: str, tag: str = "1") -> image.Reference:
        return image.parse_reference(f"{self.host}/{repo}:{tag}")

    def get(self, path: str, accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
        headers = {"Accept": accept} if accept else {}
        if self.basic:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(self.basic).encode()).decode()
        return ask(self.address, self.port, "GET", path, headers, tls=self.tls)

    def log_tail(self) -> str:
        try:
            return " | ".join(Path(self.workdir, "registry.log").read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextmanager
def docker_registry(*, address: str = "127.0.0.1", auth: dict[str, object] | None = None,
                    tls: tuple[Path, Path] | None = None, basic: tuple[str, str] | None = None
                    ) -> Iterator[RunningRegistry]:
    """Run docker-registry on a free port of `address` with a private storage directory; skip
    the test when it is not installed or cannot start; stop it and remove its files afterwards."""
    if not os.access(REGISTRY_BIN, os.X_OK):
        pytest.skip(f"{REGISTRY_BIN} is not installed (apt-get install docker-registry; tests/run does)")
    workdir = tempfile.mkdtemp(prefix="tj-registry-")
    port = free_port(address)
    http_conf: dict[str, object] = {"addr": f"{address}:{port}", "secret": uuid.uuid4().hex}
    if tls:
        http_conf["tls"] = {"key": str(tls[0]), "certificate": str(tls[1])}
    conf: dict[str, object] = {
        "version": "0.1",
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": os.path.join(workdir, "data")}, "delete": {"enabled": True}},
        "http": http_conf,
    }
    if auth:
        conf["auth"] = auth
    config_path = os.path.join(workdir, "config.yml")
    with open(config_path, "w") as f:
        json.dump(conf, f)   # JSON is YAML: no quoting rules to get wrong
    with open(os.path.join(workdir, "registry.log"), "wb") as log:
        proc = subprocess.Popen([REGISTRY_BIN, "serve", config_path], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    running = RunningRegistry(address, port, proc, workdir, tls=tls is not None, basic=basic)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                status, _, _ = ask(address, port, "GET", "/v2/", tls=tls is not None)
                if status in (200, 401):
                    break
            except (OSError, http.client.HTTPException):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"docker-registry did not start: {running.log_tail()}")
            time.sleep(0.1)
        yield running
    finally:
        running.stop()


# ------------------------------------------------------------------------------------------
# A token server for the bearer flow


@dataclass
class TokenServer:
    """Issues registry tokens (RS256 JWT, x5c header) to USER:PASSWORD, or for an OAuth2 refresh
    token; refuses everything else with 401. Records what it was asked."""

    key: Path
    cert: Path
    identity_token: str = "tj-identity-" + uuid.uuid4().hex
    requests: list[dict[str, object]] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None
    thread: threading.Thread | None = None

    @property
    def realm(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def issue(self, scopes: list[str], subject: str) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        der = ssl.PEM_cert_to_DER_cert(self.cert.read_text())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {"iss": TOKEN_ISSUER, "sub": subject, "aud": TOKEN_SERVICE, "exp": now + 300, "nbf": now - 5,
                  "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing_input.encode(),
                                   capture_output=True, check=True).stdout
        return signing_input + "." + b64url(signature)

    def start(self) -> None:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def answer(self, status: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                auth = self.headers.get("Authorization", "")
                user = password = None
                if auth.startswith("Basic "):
                    user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                owner.requests.append({"method": "GET", "scopes": query.get("scope", []), "user": user,
                                       "service": query.get("service", [None])[0]})
                if (user, password) != (USER, PASSWORD):
                    self.answer(401, {"details": "bad credentials"})
                    return
                self.answer(200, {"token": owner.issue(query.get("scope", []), USER), "expires_in": 300})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                scopes = (form.get("scope") or [""])[0].split()
                owner.requests.append({"method": "POST", "scopes": scopes, "grant": form.get("grant_type")})
                if form.get("grant_type") != ["refresh_token"] or form.get("refresh_token") != [owner.identity_token]:
                    self.answer(401, {"error": "invalid_grant"})
                    return
                self.answer(200, {"access_token": owner.issue(scopes, USER), "expires_in": 300})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="tj-token-server", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.thread is not None:
            self.thread.join(timeout=10)


# ------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def plain_registry() -> Iterator[RunningRegistry]:
    with docker_registry() as reg:
        yield reg


@pytest.fixture(scope="module")
def basic_registry() -> Iterator[RunningRegistry]:
    if shutil.which("htpasswd") is None:
        pytest.skip("htpasswd is not installed (apt-get install apache2-utils; tests/run does)")
    with tempfile.TemporaryDirectory(prefix="tj-htpasswd-") as d:
        path = os.path.join(d, "htpasswd")
        line = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True).stdout
        Path(path).write_text(line.strip() + "\n")
        with docker_registry(auth={"htpasswd": {"realm": "tracejail-test", "path": path}},
                             basic=(USER, PASSWORD)) as reg:
            yield reg


@pytest.fixture(scope="module")
def token_setup() -> Iterator[tuple[RunningRegistry, TokenServer]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    with tempfile.TemporaryDirectory(prefix="tj-token-") as d:
        key, cert = self_signed(Path(d), "token-signer", "DNS:token-signer")
        tokens = TokenServer(key, cert)
        tokens.start()
        try:
            auth: dict[str, object] = {"token": {"realm": tokens.realm, "service": TOKEN_SERVICE,
                                                 "issuer": TOKEN_ISSUER, "rootcertbundle": str(cert)}}
            with docker_registry(auth=auth) as reg:
                yield reg, tokens
        finally:
            tokens.stop()


@pytest.fixture(scope="module")
def remote_address() -> str:
    """A global IPv4 address of this machine: a registry there is not loopback to tracejail, so it
    gets verified TLS only. Without one (a container run with --network none) 127.0.0.1, and the
    tests use `as_remote` to make tracejail treat loopback like any other host."""
    return non_loopback_address() or "127.0.0.1"


@pytest.fixture
def as_remote(remote_address: str, monkeypatch: pytest.MonkeyPatch) -> str:
    if remote_address == "127.0.0.1":
        # The seam: loopback is then as strict as a remote host (verified HTTPS only).
        monkeypatch.setattr(registry, "_is_loopback", lambda hostname: False)
    return remote_address


@pytest.fixture(scope="module")
def tls_registry(remote_address: str) -> Iterator[tuple[RunningRegistry, Path]]:
    """A TLS registry on a non-loopback address with a self-signed certificate nobody trusts."""
    with tempfile.TemporaryDirectory(prefix="tj-tls-") as d:
        key, cert = self_signed(Path(d), "registry", f"IP:{remote_address}")
        with docker_registry(address=remote_address, tls=(key, cert)) as reg:
            yield reg, cert


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment with no credentials and a record of its own (no config.json is found)."""
    cache = tmp_path / "cache"
    return {"HOME": str(tmp_path / "home"), "TRACEJAIL_CACHE_DIR": str(cache), "PATH": os.environ.get("PATH", "")}


@pytest.fixture
def creds_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, registry.ENV_USERNAME: USER, registry.ENV_PASSWORD: PASSWORD}


@pytest.fixture(scope="module")
def hello_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return static_program(tmp_path_factory.mktemp("hello"), HELLO_C)


@dataclass
class Built:
    img: image.Image
    token: str
    host: Path


def make_image(tmp_path: Path, binary: Path | None = None, noise: int = 200_000) -> Built:
    """A two-layer image with unique content: /app/msg (and the hello binary), then random noise
    (incompressible, so chunked uploads take several requests)."""
    token = "tj-" + uuid.uuid4().hex
    host = tmp_path / f"host-{token}"
    (host / "app").mkdir(parents=True)
    (host / "app/msg").write_text(token)
    (host / "data").mkdir()
    (host / "data/noise").write_bytes(token.encode() + os.urandom(noise))
    wanted = ["/app/msg"]
    if binary is not None:
        shutil.copy2(binary, host / "app/hello")
        wanted.append("/app/hello")
    blob_dir = tmp_path / f"blobs-{token}"
    blob_dir.mkdir()
    layers = []
    for name, paths in (("app", wanted), ("data", ["/data/noise"])):
        entries = rootfs.ordered_entries(rootfs.plan(paths, root=str(host)))
        _, mtime_of = image.mtime_policy(entries, None, False)
        layers.append(image.make_layer(entries, str(blob_dir), mtime_of=mtime_of, name=name))
    config = image.ImageConfig(entrypoint=["/app/hello", "/app/msg"], created="1970-01-01T00:00:00Z",
                               labels={"org.opencontainers.image.title": token})
    return Built(image.assemble(layers, config), token, host)


def blob_bytes(blob: image.Blob) -> bytes:
    return b"".join(blob.chunks())


def assert_served(reg: RunningRegistry, repo: str, tag: str, img: image.Image) -> None:
    """The registry serves the manifest (same bytes and digest) and every blob (same digest)."""
    status, headers, body = reg.get(f"/v2/{repo}/manifests/{tag}", accept=img.manifest.media_type)
    assert status == 200, body
    assert body == img.manifest.data
    assert headers["docker-content-digest"] == img.manifest.digest
    for blob in img.blobs():
        status, _, data = reg.get(f"/v2/{repo}/blobs/{blob.digest}")
        assert status == 200
        assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest and len(data) == blob.size


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and text.strip() == text and 0 < len(text) < 500, text
    return text


def all_digests(img: image.Image) -> list[str]:
    return [b.digest for b in img.blobs()]


# ------------------------------------------------------------------------------------------
# Parsing and matching (no registry)


def test_parse_www_authenticate() -> None:
    (bearer,) = registry.parse_www_authenticate(
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:team/app:pull,push",error="insufficient_scope"')
    assert bearer.scheme == "bearer"
    assert bearer.params == {"realm": "https://auth.example.com/token", "service": "registry.example.com",
                             "scope": "repository:team/app:pull,push", "error": "insufficient_scope"}
    basic, other = registry.parse_www_authenticate('Basic realm="a \\"quoted\\", realm" , Negotiate')
    assert (basic.scheme, basic.params, other.scheme) == ("basic", {"realm": 'a "quoted", realm'}, "negotiate")
    assert registry.parse_www_authenticate("BEARER Realm=http://x/t, Service = svc")[0].params == {
        "realm": "http://x/t", "service": "svc"}
    assert registry.parse_www_authenticate("") == []


def test_hosts_and_insecure_registries() -> None:
    assert registry.registry_host("docker.io") == "registry-1.docker.io"
    assert registry.registry_host("ghcr.io") == "ghcr.io"
    assert image.parse_reference("app").domain == "docker.io"
    for loopback in ("localhost:5000", "127.0.0.1:5000", "127.9.8.7", "[::1]:5000", "localhost"):
        assert registry.is_insecure(loopback), loopback
    assert not registry.is_insecure("registry.example.com:5000")
    assert registry.is_insecure("registry.example.com:5000", ["registry.example.com:5000"])
    assert registry.is_insecure("registry.example.com:5000", ["registry.example.com"])
    assert not registry.is_insecure("registry.example.com:5000", ["registry.example.com:6000"])
    assert registry.is_insecure("10.1.2.3:5000", ["10.0.0.0/8"])
    assert registry.is_insecure("example.com", ["http://example.com/"])


def test_credentials_lookup(tmp_path: Path) -> None:
    """Environment first, then REGISTRY_AUTH_FILE, then docker's config.json, keys matched as
    docker matches them; docker.io uses https://index.docker.io/v1/."""
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    b64 = base64.b64encode(b"hub-user:hub-pass").decode()
    (docker_dir / "config.json").write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": b64},
        "https://reg.example.com:5000/v2/": {"username": "u1", "password": "p1"},
        "other.example.com": {"identitytoken": "idtok"},
    }}))
    env = {"HOME": str(tmp_path), "DOCKER_CONFIG": str(docker_dir)}
    hub = registry.find_credentials("docker.io", "library/app", env)
    assert hub is not None and (hub.username, hub.password) == ("hub-user", "hub-pass")
    assert "hub-pass" not in repr(hub)
    reg = registry.find_credentials("reg.example.com:5000", "x", env)
    assert reg is not None and (reg.username, reg.password) == ("u1", "p1")
    assert registry.find_credentials("reg.example.com", "x", env) is None   # another port, another registry
    other = registry.find_credentials("other.example.com", "x", env)
    assert other is not None and other.identity_token == "idtok" and not other.password
    # podman's auth.json comes first, and may hold per-namespace keys
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"auths": {
        "reg.example.com:5000": {"auth": base64.b64encode(b"pod:all").decode()},
        "reg.example.com:5000/team": {"auth": base64.b64encode(b"pod:team").decode()}}}))
    env["REGISTRY_AUTH_FILE"] = str(auth_file)
    assert registry.find_credentials("reg.example.com:5000", "team/app", env).password == "team"  # type: ignore[union-attr]
    assert registry.find_credentials("reg.example.com:5000", "teamx/app", env).password == "all"  # type: ignore[union-attr]
    assert registry.find_credentials("docker.io", "library/app", env).username == "hub-user"  # type: ignore[union-attr]
    # the environment wins; one without the other is a usage error
    env.update({registry.ENV_USERNAME: "e", registry.ENV_PASSWORD: "f"})
    assert registry.find_credentials("docker.io", "x", env).source.startswith(registry.ENV_USERNAME)  # type: ignore[union-attr]
    del env[registry.ENV_PASSWORD]
    with pytest.raises(RegistryError, match=registry.ENV_PASSWORD) as info:
        registry.find_credentials("docker.io", "x", env)
    assert info.value.exit_code == 2


# ------------------------------------------------------------------------------------------
# No authentication


def test_push_skip_mount_and_tags(plain_registry: RunningRegistry, tmp_path: Path, env: dict[str, str]) -> None:
    built = make_image(tmp_path)
    img = built.img
    seen: list[tuple[str, int, int]] = []
    options = PushOptions(environ=env, progress=lambda label, n, total: seen.append((label, n, total)))
    first, second_tag, other_repo = plain_registry.ref("tj/one", "1"), plain_registry.ref("tj/one", "2"), \
        plain_registry.ref("tj/two", "1")
    results = registry.push(img, [first, second_tag, other_repo], options)
    assert [r.reference for r in results] == [first.full, second_tag.full, other_repo.full]
    assert all(r.manifest_digest == img.manifest.digest for r in results)
    assert results[0].uploaded == all_digests(img) and not results[0].skipped and not results[0].mounted
    assert results[0].bytes_uploaded == sum(b.size for b in img.blobs())
    assert results[1].skipped == all_digests(img) and not results[1].uploaded   # same repository: nothing to send
    assert results[2].mounted == all_digests(img) and not results[2].uploaded   # same registry: mounted
    for repo, tag in (("tj/one", "1"), ("tj/one", "2"), ("tj/two", "1")):
        assert_served(plain_registry, repo, tag, img)
    # progress: every uploaded byte reported once, per blob
    per_label: dict[str, int] = {}
    for label, n, total in seen:
        per_label[label] = per_label.get(label, 0) + n
    assert sorted(per_label.values()) == sorted(b.size for b in img.blobs())

    # A second push of the same image skips every blob (HEAD says they are there).
    (again,) = registry.push(img, first, options)
    assert again.skipped == all_digests(img) and not again.uploaded and not again.mounted

    # Another push to a third repository: the local record says where the blobs are -> mounted.
    (third,) = registry.push(img, plain_registry.ref("tj/three"), options)
    assert third.mounted == all_digests(img) and not third.uploaded
    assert_served(plain_registry, "tj/three", "1", img)
    record = json.loads((Path(env["TRACEJAIL_CACHE_DIR"]) / registry.BLOB_RECORD_FILE).read_text())
    assert {(h, d, r) for h, d, r, _ in record["blobs"]} >= {(plain_registry.host, d, "tj/one") for d in all_digests(img)}
    # Without the record (a fresh cache), the blobs are uploaded again.
    fresh = {**env, "TRACEJAIL_CACHE_DIR": str(tmp_path / "fresh-cache")}
    (fourth,) = registry.push(img, plain_registry.ref("tj/four"), PushOptions(environ=fresh))
    assert fourth.uploaded == all_digests(img)


def test_record_is_bounded_and_atomic(tmp_path: Path) -> None:
    env = {"TRACEJAIL_CACHE_DIR": str(tmp_path / "c"), "HOME": str(tmp_path)}
    record = registry.BlobRecord(env)
    record.LIMIT = 10
    for i in range(25):
        record.add("reg:5000", "sha256:" + f"{i:064x}", f"repo{i}")
    record.save()
    saved = json.loads((tmp_path / "c" / registry.BLOB_RECORD_FILE).read_text())
    assert len(saved["blobs"]) == 10 and {r for _, _, r, _ in saved["blobs"]} == {f"repo{i}" for i in range(15, 25)}
    assert os.listdir(tmp_path / "c") == [registry.BLOB_RECORD_FILE]   # no temporary file left
    assert registry.BlobRecord(env).repositories("reg:5000", "sha256:" + f"{24:064x}") == ["repo24"]
    (tmp_path / "c" / registry.BLOB_RECORD_FILE).write_text("{not json")
    assert registry.BlobRecord(env).rows == {}   # a broken record is no record
    assert registry.BlobRecord({"TRACEJAIL_CACHE_DIR": ""}).path is None   # empty: no record at all


def test_chunked_upload(plain_registry: RunningRegistry, tmp_path: Path, env: dict[str, str]) -> None:
    built = make_image(tmp_path, noise=300_000)
    seen: list[int] = []
    options = PushOptions(environ=env, chunk_size=64 * 1024, progress=lambda label, n, total: seen.append(n))
    (result,) = registry.push(built.img, plain_registry.ref("tj/chunked"), options)
    assert result.uploaded == all_digests(built.img)
    assert sum(seen) == sum(b.size for b in built.img.blobs())
    assert_served(plain_registry, "tj/chunked", "1", built.img)


def test_skopeo_reads_what_was_pushed(plain_registry: RunningRegistry, tmp_path: Path, env: dict[str, str]) -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo not installed (tests/run installs it)")
    built = make_image(tmp_path)
    ref = plain_registry.ref("tj/skopeo", "v1")
    registry.push(built.img, ref, PushOptions(environ=env))
    url = f"docker://{plain_registry.host}/tj/skopeo:v1"
    inspect = subprocess.run(["skopeo", "inspect", "--tls-verify=false", url], capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    info = json.loads(inspect.stdout)
    assert info["Digest"] == built.img.manifest.digest
    assert info["Layers"] == [layer.blob.digest for layer in built.img.layers]
    assert info["Labels"] == {"org.opencontainers.image.title": built.token}
    out = tmp_path / "copied"
    copy = subprocess.run(["skopeo", "copy", "--src-tls-verify=false", url, f"oci:{out}:v1"],
                          capture_output=True, text=True, timeout=120)
    assert copy.returncode == 0, copy.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == built.img.manifest.digest
    for blob in built.img.blobs():
        assert (out / "blobs/sha256" / blob.digest[7:]).read_bytes() == blob_bytes(blob)


@pytest.mark.docker
def test_docker_pulls_and_runs_it(plain_registry: RunningRegistry, docker_engine: DockerEngine, hello_binary: Path,
                                  tmp_path: Path, env: dict[str, str]) -> None:
    """The private engine (host network namespace) pulls from 127.0.0.1:PORT, which docker treats
    as an insecure registry by default, and runs the static program from the pushed layers."""
    built = make_image(tmp_path, binary=hello_binary)
    tag = f"run-{built.token[3:15]}"
    registry.push(built.img, plain_registry.ref("tj/hello", tag), PushOptions(environ=env))
    name = f"{plain_registry.host}/tj/hello:{tag}"
    pulled = docker_engine.run("pull", name, check=False)
    try:
        assert pulled.returncode == 0, pulled.stderr
        assert built.img.manifest.digest in pulled.stdout
        ran = docker_engine.run("run", "--rm", name)
        assert ran.stdout.strip() == f"hello from the registry: {built.token}"
    finally:
        docker_engine.run("rmi", "-f", name, check=False)


# ------------------------------------------------------------------------------------------
# Basic authentication (htpasswd)


def test_basic_auth_push(basic_registry: RunningRegistry, tmp_path: Path, creds_env: dict[str, str]) -> None:
    built = make_image(tmp_path)
    results = registry.push(built.img, [basic_registry.ref("tj/basic-a"), basic_registry.ref("tj/basic-b")],
                            PushOptions(environ=creds_env))
    assert results[0].uploaded == all_digests(built.img)
    assert results[1].mounted == all_digests(built.img)
    assert_served(basic_registry, "tj/basic-a", "1", built.img)
    assert_served(basic_registry, "tj/basic-b", "1", built.img)


def test_basic_auth_from_config_files(basic_registry: RunningRegistry, tmp_path: Path, env: dict[str, str]) -> None:
    """docker's config.json (auth key spelt https://HOST/v2/), REGISTRY_AUTH_FILE before it, and a
    credential helper named in credHelpers."""
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    good = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    bad = base64.b64encode(f"{USER}:wrong-one".encode()).decode()
    (docker_dir / "config.json").write_text(json.dumps({"auths": {f"https://{basic_registry.host}/v2/": {"auth": good}}}))
    with_docker = {**env, "DOCKER_CONFIG": str(docker_dir)}
    (r1,) = registry.push(make_image(tmp_path).img, basic_registry.ref("tj/cfg"), PushOptions(environ=with_docker))
    assert r1.uploaded

    auth_file = tmp_path / "auth.json"
    auth_file.write_text(json.dumps({"auths": {basic_registry.host: {"auth": bad}}}))
    with pytest.raises(RegistryError) as info:   # the auth file comes first, and is wrong here
        registry.push(make_image(tmp_path).img, basic_registry.ref("tj/cfg"),
                      PushOptions(environ={**with_docker, "REGISTRY_AUTH_FILE": str(auth_file)}))
    assert str(auth_file) in one_line(info.value) and "wrong-one" not in str(info.value)

    # a credential helper (a script on PATH) that checks it is asked for the right server
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-tjtest"
    helper.write_text("#!/bin/sh\nread server\n"
                      f'[ "$1" = get ] && [ "$server" = "{basic_registry.host}" ] || '
                      "{ echo 'credentials not found in native keychain'; exit 1; }\n"
                      f"echo '{{\"ServerURL\":\"'$server'\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}'\n")
    helper.chmod(0o755)
    (docker_dir / "config.json").write_text(json.dumps({"credHelpers": {basic_registry.host: "tjtest"}, "auths": {
        basic_registry.host: {"auth": bad}}}))
    helper_env = {**with_docker, "PATH": f"{bin_dir}:{env['PATH']}"}
    (r2,) = registry.push(make_image(tmp_path).img, basic_registry.ref("tj/helper"), PushOptions(environ=helper_env))
    assert r2.uploaded
    # a helper named but missing: one line saying so
    (docker_dir / "config.json").write_text(json.dumps({"credHelpers": {basic_registry.host: "tjmissing"}}))
    with pytest.raises(RegistryError, match="docker-credential-tjmissing"):
        registry.push(make_image(tmp_path).img, basic_registry.ref("tj/helper"), PushOptions(environ=with_docker))


def test_basic_auth_wrong_password(basic_registry: RunningRegistry, tmp_path: Path, env: dict[str, str]) -> None:
    wrong = "not-" + PASSWORD
    with pytest.raises(RegistryError) as info:
        registry.push(make_image(tmp_path).img, basic_registry.ref("tj/wrong"),
                      PushOptions(environ={**env, registry.ENV_USERNAME: USER, registry.ENV_PASSWORD: wrong}))
    message = one_line(info.value)
    assert "refused the credentials" in message and basic_registry.host in message
    assert wrong not in message and PASSWORD not in message and info.value.exit_code == 1


def test_basic_auth_anonymous(basic_registry: RunningRegistry, tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(RegistryError) as info:
        registry.push(make_image(tmp_path).img, basic_registry.ref("tj/anon"), PushOptions(environ=env))
    message = one_line(info.value)
    assert "authentication required" in message and f"docker login {basic_registry.host}" in message
    assert registry.ENV_USERNAME in message


# ------------------------------------------------------------------------------------------
# Bearer tokens


def test_token_auth_push_and_mount(token_setup: tuple[RunningRegistry, TokenServer], tmp_path: Path,
                                   creds_env: dict[str, str]) -> None:
    reg, tokens = token_setup
    built = make_image(tmp_path)
    before = len(tokens.requests)
    results = registry.push(built.img, [reg.ref("tj/tok-a"), reg.ref("tj/tok-b")],
                            PushOptions(environ=creds_env, chunk_size=100_000))
    assert results[0].uploaded == all_digests(built.img)
    assert results[1].mounted == all_digests(built.img)
    asked = tokens.requests[before:]
    assert all(r["user"] == USER and r["service"] == TOKEN_SERVICE for r in asked)
    scopes = [sorted(cast("list[str]", r["scopes"])) for r in asked]
    assert ["repository:tj/tok-a:pull,push"] in scopes
    assert ["repository:tj/tok-a:pull", "repository:tj/tok-b:pull,push"] in scopes   # the mount's token
    assert len(asked) <= 4   # tokens are reused within the push
    # read back with a pull token
    token = tokens.issue(["repository:tj/tok-b:pull"], USER)
    status, headers, body = ask(reg.address, reg.port, "GET", "/v2/tj/tok-b/manifests/1",
                                {"Authorization": f"Bearer {token}", "Accept": built.img.manifest.media_type})
    assert status == 200 and body == built.img.manifest.data
    assert headers["docker-content-digest"] == built.img.manifest.digest


def test_token_auth_identity_token(token_setup: tuple[RunningRegistry, TokenServer], tmp_path: Path,
                                   env: dict[str, str]) -> None:
    """An identitytoken in config.json is exchanged with the OAuth2 refresh_token POST."""
    reg, tokens = token_setup
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    (docker_dir / "config.json").write_text(json.dumps({"auths": {reg.host: {"identitytoken": tokens.identity_token}}}))
    before = len(tokens.requests)
    (result,) = registry.push(make_image(tmp_path).img, reg.ref("tj/tok-id"),
                              PushOptions(environ={**env, "DOCKER_CONFIG": str(docker_dir)}))
    assert result.uploaded
    assert {r["method"] for r in tokens.requests[before:]} == {"POST"}


def test_token_auth_refusals(token_setup: tuple[RunningRegistry, TokenServer], tmp_path: Path,
                             env: dict[str, str]) -> None:
    reg, _ = token_setup
    img = make_image(tmp_path).img
    with pytest.raises(RegistryError) as info:
        registry.push(img, reg.ref("tj/tok-anon"), PushOptions(environ=env))
    assert "authentication required" in one_line(info.value) and f"docker login {reg.host}" in str(info.value)
    wrong = "bad-" + PASSWORD
    with pytest.raises(RegistryError) as info:
        registry.push(img, reg.ref("tj/tok-wrong"),
                      PushOptions(environ={**env, registry.ENV_USERNAME: USER, registry.ENV_PASSWORD: wrong}))
    message = one_line(info.value)
    assert "refused the credentials" in message and wrong not in message and PASSWORD not in message


# ------------------------------------------------------------------------------------------
# TLS, names, connections


def test_tls_registry_not_trusted(tls_registry: tuple[RunningRegistry, Path], as_remote: str, tmp_path: Path,
                                  env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A self-signed registry on a non-loopback address: verification fails with advice; allowed
    as an insecure registry it works (unverified TLS); with its CA in certs.d it works verified."""
    reg, cert = tls_registry
    built = make_image(tmp_path)
    with pytest.raises(RegistryError) as info:
        registry.push(built.img, reg.ref("tj/tls"), PushOptions(environ=env))
    message = one_line(info.value)
    assert "certificate verification failed" in message and f"--insecure-registry {reg.host}" in message

    (insecure,) = registry.push(built.img, reg.ref("tj/tls"), PushOptions(environ=env, insecure_registries=(reg.host,)))
    assert insecure.uploaded == all_digests(built.img)
    assert_served(reg, "tj/tls", "1", built.img)

    certs_d = tmp_path / "certs.d"
    (certs_d / reg.host).mkdir(parents=True)
    shutil.copy(cert, certs_d / reg.host / "ca.crt")
    monkeypatch.setattr(registry, "CERTS_D", str(certs_d))
    (verified,) = registry.push(built.img, reg.ref("tj/tls", "2"), PushOptions(environ=env))
    assert verified.skipped == all_digests(built.img)
    assert_served(reg, "tj/tls", "2", built.img)


def test_plain_http_registry_not_loopback(as_remote: str, tmp_path: Path, env: dict[str, str]) -> None:
    """A plain-HTTP registry that is not loopback: refused unless listed as insecure, then used over HTTP."""
    with docker_registry(address=as_remote) as reg:
        built = make_image(tmp_path)
        with pytest.raises(RegistryError) as info:
            registry.push(built.img, reg.ref("tj/http"), PushOptions(environ=env))
        message = one_line(info.value)
        assert "does not speak TLS" in message and f"--insecure-registry {reg.host}" in message
        (result,) = registry.push(built.img, reg.ref("tj/http"), PushOptions(environ=env, insecure_registries=(reg.host,)))
        assert result.uploaded == all_digests(built.img)
        assert_served(reg, "tj/http", "1", built.img)


def test_unresolvable_and_refused(tmp_path: Path, env: dict[str, str]) -> None:
    img = make_image(tmp_path, noise=10).img
    with pytest.raises(RegistryError) as info:
        registry.push(img, image.parse_reference("nonexistent.invalid:5000/x:1"), PushOptions(environ=env, timeout=10))
    assert "cannot resolve the registry host nonexistent.invalid" in one_line(info.value)
    port = free_port()
    with pytest.raises(RegistryError) as info:
        registry.push(img, image.parse_reference(f"127.0.0.1:{port}/x:1"), PushOptions(environ=env, timeout=10))
    assert "connection refused" in one_line(info.value) and f"127.0.0.1:{port}" in str(info.value)


# ------------------------------------------------------------------------------------------
# Through an HTTP proxy (HTTPS_PROXY, HTTP_PROXY, NO_PROXY)


class ForwardProxy:
    """A small HTTP proxy on loopback that sends every connection to one registry, whatever host
    the request names (so names that do not resolve can be used): CONNECT opens a tunnel, and a
    request in absolute form is passed on as it is. It records each first request line, and with
    `password` set it wants `Proxy-Authorization: Basic user:password`."""

    def __init__(self, backend: tuple[str, int], password: str | None = None) -> None:
        self.backend, self.password = backend, password
        self.lines: list[str] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, auth: str = "") -> str:
        return f"http://{auth}127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            first = head.split(b"\r\n", 1)[0].decode()
            self.lines.append(first)
            if self.password is not None:
                wanted = "Proxy-Authorization: Basic " + base64.b64encode(f"u:{self.password}".encode()).decode()
                if wanted.encode() not in head:
                    client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                    return
            with socket.create_connection(self.backend) as upstream:
                if first.startswith("CONNECT "):
                    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                else:
                    upstream.sendall(head)
                pipe = threading.Thread(target=self._pipe, args=(upstream, client), daemon=True)
                pipe.start()
                self._pipe(client, upstream)
                pipe.join(timeout=30)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.server.close()


def test_proxy_settings_are_read_as_docker_and_go_read_them() -> None:
    env = {"HTTPS_PROXY": "http://u:p%40ss@proxy:3128", "http_proxy": "proxy2", "NO_PROXY": "internal.example,.corp,10.0.0.0/8,reg:5000"}
    https = registry.proxy_for("https", "registry.example", 443, env)
    assert https == registry.Proxy("proxy", 3128, "Basic " + base64.b64encode(b"u:p@ss").decode())
    assert registry.proxy_for("http", "registry.example", 80, env) == registry.Proxy("proxy2", 80)
    for host, port in (("internal.example", 443), ("a.internal.example", 443), ("x.corp", 443), ("10.1.2.3", 443),
                       ("reg", 5000), ("localhost", 5000), ("127.0.0.1", 5000), ("::1", 5000)):
        assert registry.proxy_for("https", host, port, env) is None, host
    for host, port in (("corp", 443), ("reg", 5001), ("notinternal.example", 443), ("11.0.0.1", 443)):
        assert registry.proxy_for("https", host, port, env) is not None, host
    assert registry.proxy_for("https", "anything", 443, {**env, "NO_PROXY": "*"}) is None
    assert registry.proxy_for("https", "anything", 443, {}) is None
    for bad, says in (("https://proxy:3128", "only http:// proxies"), ("http://:3128", "is not a proxy URL")):
        with pytest.raises(RegistryError, match=says):
            registry.proxy_for("https", "registry.example", 443, {"HTTPS_PROXY": bad})


def test_push_over_plain_http_through_a_proxy(plain_registry: RunningRegistry, tmp_path: Path,
                                             env: dict[str, str]) -> None:
    """An insecure registry named by a host only the proxy can reach: the TLS attempt goes through a
    CONNECT tunnel (and finds plain HTTP), then every request through the proxy in absolute form."""
    proxy = ForwardProxy((plain_registry.address, plain_registry.port))
    try:
        built = make_image(tmp_path, noise=1000)
        name = f"registry.invalid:{plain_registry.port}"
        options = PushOptions(environ={**env, "HTTPS_PROXY": proxy.url(), "HTTP_PROXY": proxy.url()},
                              insecure_registries=(name,))
        (result,) = registry.push(built.img, image.parse_reference(f"{name}/tj/proxied:1"), options)
        assert result.uploaded == all_digests(built.img)
        assert_served(plain_registry, "tj/proxied", "1", built.img)
        assert f"CONNECT {name} HTTP/1.0" in proxy.lines
        assert f"GET http://{name}/v2/ HTTP/1.1" in proxy.lines
        # NO_PROXY names it: no proxy, and the name resolves nowhere.
        with pytest.raises(RegistryError) as info:
            registry.push(built.img, image.parse_reference(f"{name}/tj/proxied:2"),
                          PushOptions(environ={**options.environ, "NO_PROXY": ".invalid"},   # type: ignore[dict-item]
                                      insecure_registries=(name,), timeout=10))
        assert "cannot resolve the registry host registry.invalid" in one_line(info.value)
        # Loopback is never proxied: a dead proxy changes nothing there.
        dead = f"http://127.0.0.1:{free_port()}"
        (direct,) = registry.push(built.img, plain_registry.ref("tj/proxied", "3"),
                                  PushOptions(environ={**env, "HTTPS_PROXY": dead, "HTTP_PROXY": dead}))
        assert direct.skipped == all_digests(built.img)
    finally:
        proxy.close()


def test_push_over_tls_through_an_authenticating_proxy(tls_registry: tuple[RunningRegistry, Path], as_remote: str,
                                                      tmp_path: Path, env: dict[str, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """TLS inside a CONNECT tunnel, verified against the registry's own name; the proxy's password
    from HTTPS_PROXY; a refusal by the proxy is one line naming it."""
    reg, cert = tls_registry
    certs_d = tmp_path / "certs.d"
    (certs_d / reg.host).mkdir(parents=True)
    shutil.copy(cert, certs_d / reg.host / "ca.crt")
    monkeypatch.setattr(registry, "CERTS_D", str(certs_d))
    proxy = ForwardProxy((reg.address, reg.port), password="s3cret")
    try:
        built = make_image(tmp_path, noise=1000)
        with pytest.raises(RegistryError) as info:
            registry.push(built.img, reg.ref("tj/tunnel"), PushOptions(environ={**env, "HTTPS_PROXY": proxy.url()}))
        message = one_line(info.value)
        assert f"the proxy 127.0.0.1:{proxy.port} refused to connect to {reg.host}" in message
        assert "407 Proxy Authentication Required" in message and "NO_PROXY" in message
        (result,) = registry.push(built.img, reg.ref("tj/tunnel"),
                                  PushOptions(environ={**env, "HTTPS_PROXY": proxy.url("u:s3cret@")}))
        assert result.uploaded == all_digests(built.img)
        assert_served(reg, "tj/tunnel", "1", built.img)
        assert proxy.lines and all(line == f"CONNECT {reg.host} HTTP/1.0" for line in proxy.lines)
    finally:
        proxy.close()


# ------------------------------------------------------------------------------------------
# A fake registry for answers a real one does not give on demand


class FakeRegistry:
    """A minimal registry in a thread. `mode`: "ok" (relative Location headers), "fail500",
    "denied" (403), "unknown" (404 NAME_UNKNOWN), "no-v2", "bad-digest", "silent" (never answers)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.blobs: dict[str, bytes] = {}
        self.uploads: dict[str, bytearray] = {}
        self.manifests: dict[str, bytes] = {}
        self.release = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle(self) -> None:
                # A TLS ClientHello (tracejail tries HTTPS first on loopback): close at once, as a
                # Go server's error answer would end it, instead of waiting for a request line.
                try:
                    first = self.connection.recv(1, socket.MSG_PEEK)
                except OSError:
                    return
                if first == b"\x16":
                    return
                super().handle()

            def reply(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def route(self) -> None:
                if owner.mode == "silent":
                    owner.release.wait(30)
                    return
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                parts = url.path.split("/")
                if url.path == "/v2/":
                    self.reply(404 if owner.mode == "no-v2" else 200, body=b"{}")
                elif "/blobs/uploads/" in url.path and self.command == "POST":
                    refusal = {"fail500": (500, "UNKNOWN", "disk on fire\nsecond line"),
                               "denied": (403, "DENIED", "requested access to the resource is denied"),
                               "unknown": (404, "NAME_UNKNOWN", "repository name not known to registry")}
                    if owner.mode in refusal:
                        status, code, message = refusal[owner.mode]
                        self.reply(status, {"Content-Type": "application/json"}, json.dumps({"errors": [
                            {"code": code, "message": message, "detail": {}}]}).encode())
                        return
                    self.body()
                    upload = uuid.uuid4().hex
                    owner.uploads[upload] = bytearray()
                    self.reply(202, {"Location": f"{url.path}{upload}?_state=x"})   # relative
                elif "/blobs/uploads/" in url.path:
                    upload = parts[-1]
                    owner.uploads[upload] += self.body()
                    if self.command == "PATCH":
                        self.reply(202, {"Location": f"{upload}?_state=y", "Range": f"0-{len(owner.uploads[upload]) - 1}"})
                        return
                    data = bytes(owner.uploads.pop(upload))
                    digest = "sha256:" + hashlib.sha256(data).hexdigest()
                    if query.get("digest") != [digest]:
                        self.reply(400, body=json.dumps({"errors": [{"code": "DIGEST_INVALID",
                                                                     "message": "digest mismatch"}]}).encode())
                        return
                    owner.blobs[digest] = data
                    self.reply(201, {"Docker-Content-Digest": digest, "Location": "/v2/x/blobs/" + digest})
                elif "/blobs/" in url.path:
                    self.reply(200 if parts[-1] in owner.blobs else 404)
                elif "/manifests/" in url.path and self.command == "PUT":
                    data = self.body()
                    digest = "sha256:" + hashlib.sha256(data).hexdigest()
                    owner.manifests[parts[-1]] = data
                    shown = "sha256:" + "0" * 64 if owner.mode == "bad-digest" else digest
                    self.reply(201, {"Docker-Content-Digest": shown})
                else:
                    self.reply(404)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = route

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="tj-fake-registry", daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@contextmanager
def fake_registry(mode: str) -> Iterator[FakeRegistry]:
    fake = FakeRegistry(mode)
    try:
        yield fake
    finally:
        fake.stop()


@pytest.mark.parametrize("chunk_size", [None, 50_000])
def test_relative_locations(tmp_path: Path, env: dict[str, str], chunk_size: int | None) -> None:
    built = make_image(tmp_path, noise=120_000)
    with fake_registry("ok") as fake:
        (result,) = registry.push(built.img, image.parse_reference(f"{fake.host}/tj/rel:1"),
                                  PushOptions(environ=env, chunk_size=chunk_size))
        assert result.uploaded == all_digests(built.img)
        assert {d: hashlib.sha256(b).hexdigest() for d, b in fake.blobs.items()} == {
            d: d[7:] for d in all_digests(built.img)}
        assert fake.manifests["1"] == built.img.manifest.data


@pytest.mark.parametrize("mode, expected", [
    ("fail500", "the registry failed with HTTP 500 (UNKNOWN: disk on fire second line)"),
    ("denied", "tj/fail: denied (HTTP 403, DENIED: requested access to the resource is denied)"),
    ("unknown", "tj/fail: not found (HTTP 404, NAME_UNKNOWN: repository name not known to registry)"),
    ("no-v2", "does not serve the registry API"),
    ("bad-digest", "stored the manifest as sha256:000000000000"),
])
def test_registry_failures(tmp_path: Path, env: dict[str, str], mode: str, expected: str) -> None:
    img = make_image(tmp_path, noise=10).img
    with fake_registry(mode) as fake:
        with pytest.raises(RegistryError) as info:
            registry.push(img, image.parse_reference(f"{fake.host}/tj/fail:1"), PushOptions(environ=env))
    message = one_line(info.value)
    assert expected in message and "127.0.0.1" in message


def test_timeout(tmp_path: Path, env: dict[str, str]) -> None:
    img = make_image(tmp_path, noise=10).img
    with fake_registry("silent") as fake:
        started = time.monotonic()
        with pytest.raises(RegistryError) as info:
            registry.push(img, image.parse_reference(f"{fake.host}/tj/slow:1"), PushOptions(environ=env, timeout=1))
        assert time.monotonic() - started < 10
    assert "did not answer within 1 s" in one_line(info.value)


# ------------------------------------------------------------------------------------------
# Reading an archive or layout back, and pushing it


def test_read_layout_archive_and_dir_then_push(plain_registry: RunningRegistry, tmp_path: Path,
                                               env: dict[str, str]) -> None:
    host = tmp_path / "host"
    (host / "app").mkdir(parents=True)
    token = uuid.uuid4().hex
    (host / "app/msg").write_text(token)
    plan = rootfs.plan(["/app/msg"], root=str(host))
    config = image.ImageConfig(entrypoint=["/app/msg"], created="1970-01-01T00:00:00Z",
                               labels={"org.opencontainers.image.title": token})
    archive = tmp_path / "img.tar"
    written = image.write_archive(plan, str(archive), config, name="tjtest/layout:1")
    img, names = registry.read_layout(str(archive))
    assert names == ["docker.io/tjtest/layout:1"]
    assert img.manifest.digest == written.manifest_digest and img.image_id == written.image_id
    (layer,) = img.layers
    assert layer.diff_id == written.diff_id and layer.blob.path == str(archive) and layer.blob.offset > 0
    assert layer.uncompressed_size is None   # not known without reading the layer; never a made-up 0
    with tarfile.open(archive) as t:
        member = t.getmember("blobs/sha256/" + written.layer_digest[7:])
        assert blob_bytes(layer.blob) == t.extractfile(member).read()  # type: ignore[union-attr]
    (result,) = registry.push(img, plain_registry.ref("tj/from-archive"), PushOptions(environ=env))
    assert result.uploaded == all_digests(img)
    assert_served(plain_registry, "tj/from-archive", "1", img)

    layout = tmp_path / "layout"
    image.write_oci_dir(plan, str(layout), config)   # no name: no annotations
    img2, names2 = registry.read_layout(str(layout))
    assert names2 == [] and img2.manifest.digest == written.manifest_digest
    (result2,) = registry.push(img2, plain_registry.ref("tj/from-dir"), PushOptions(environ=env))
    assert result2.mounted == all_digests(img2)   # this push's record: tj/from-archive has them
    assert_served(plain_registry, "tj/from-dir", "1", img2)


def test_read_layout_refuses_broken_input(tmp_path: Path) -> None:
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as t:
        t.add(__file__, arcname="manifest.json")
    with pytest.raises(registry.LayoutError) as info:
        registry.read_layout(str(plain))
    assert "holds no index.json" in one_line(info.value) and info.value.exit_code == 65
    with pytest.raises(registry.LayoutError, match="does not exist"):
        registry.read_layout(str(tmp_path / "missing.tar"))
    gz = tmp_path / "img.tar.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00" + b"\0" * 20)
    with pytest.raises(registry.LayoutError, match="compressed"):
        registry.read_layout(str(gz))

    host = tmp_path / "host"
    (host / "app").mkdir(parents=True)
    (host / "app/msg").write_text("x")
    layout = tmp_path / "layout"
    res = image.write_oci_dir(rootfs.plan(["/app/msg"], root=str(host)), str(layout),
                              image.ImageConfig(entrypoint=["/x"], created="1970-01-01T00:00:00Z"))
    layer_file = layout / "blobs/sha256" / res.layer_digest[7:]
    layer_file.write_bytes(layer_file.read_bytes()[:-1])
    with pytest.raises(registry.LayoutError, match="its descriptor says"):
        registry.read_layout(str(layout))
    config_file = layout / "blobs/sha256" / res.image_id[7:]
    config_file.write_bytes(config_file.read_bytes() + b" ")
    with pytest.raises(registry.LayoutError, match="does not match its digest"):
        registry.read_layout(str(layout))


def test_read_layout_picks_linux_amd64(tmp_path: Path) -> None:
    """An index with several images: the linux/amd64 one, with its names; none or two: an error."""
    host = tmp_path / "host"
    (host / "app").mkdir(parents=True)
    (host / "app/msg").write_text("x")
    layout = tmp_path / "layout"
    res = image.write_oci_dir(rootfs.plan(["/app/msg"], root=str(host)), str(layout),
                              image.ImageConfig(entrypoint=["/x"], created="1970-01-01T00:00:00Z", architecture="amd64"),
                              name="tjtest/multi:amd64")
    index = json.loads((layout / "index.json").read_text())
    (amd64,) = index["manifests"]
    # another image (same layers, another manifest) for arm64
    manifest = json.loads((layout / "blobs/sha256" / res.manifest_digest[7:]).read_bytes())
    manifest["annotations"] = {"variant": "arm64"}
    other = image.canonical_json(manifest)
    other_digest = "sha256:" + hashlib.sha256(other).hexdigest()
    (layout / "blobs/sha256" / other_digest[7:]).write_bytes(other)
    arm64 = {**amd64, "digest": other_digest, "size": len(other), "platform": {"architecture": "arm64", "os": "linux"},
             "annotations": {"io.containerd.image.name": "docker.io/tjtest/multi:arm64"}}
    (layout / "index.json").write_text(json.dumps({**index, "manifests": [arm64, amd64]}))
    img, names = registry.read_layout(str(layout))
    assert img.manifest.digest == res.manifest_digest and names == ["docker.io/tjtest/multi:amd64"]
    amd64["platform"] = {"architecture": "s390x", "os": "linux"}
    (layout / "index.json").write_text(json.dumps({**index, "manifests": [arm64, amd64]}))
    with pytest.raises(registry.LayoutError, match="not exactly one for linux/amd64"):
        registry.read_layout(str(layout))


# ------------------------------------------------------------------------------------------
# `tracejail build --push --layers auto` and `tracejail push`, end to end


def _stored_blob_bytes(reg: RunningRegistry) -> int:
    """What the registry holds on disk in blobs (each digest once, whichever repositories name it)."""
    total = 0
    for top, _dirs, files in os.walk(os.path.join(reg.workdir, "data", "docker", "registry", "v2", "blobs")):
        total += sum(os.path.getsize(os.path.join(top, f)) for f in files if f == "data")
    return total


def _tj(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracejail", *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=cwd)


@pytest.mark.docker
def test_build_push_layers_auto_two_apps_share_half_their_bytes(docker_engine: DockerEngine, tmp_path: Path) -> None:
    """The issue's end-to-end: two Python apps built with --push --layers auto into one registry
    share at least half of their bytes there; each is pulled back by docker and skopeo and runs."""
    from test_layers import APP_CSV, APP_JSON, record_app

    env = {**docker_engine.env, "TRACEJAIL_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path / "home")}
    traces = {"json": record_app(tmp_path / "json-app", APP_JSON, "x"),
              "csv": record_app(tmp_path / "csv-app", APP_CSV, "y")}
    with docker_registry() as layered, docker_registry() as single:
        pushed: dict[str, dict[str, object]] = {}
        for name, trace in traces.items():
            ref = f"{layered.host}/apps/{name}:1"
            proc = _tj("build", str(trace), "-t", ref, "--push", "--layers", "auto", "--no-load", "--json",
                       env=env, cwd=tmp_path)
            assert proc.returncode == 0, proc.stderr
            summary = json.loads(proc.stdout)
            assert summary["pushed"][0]["reference"] == ref and summary["pushed"][0]["digest"]
            assert not list(tmp_path.glob("*.tar"))   # -t + --push: nothing written but the push
            pushed[name] = summary
            one = _tj("build", str(trace), "-t", f"{single.host}/apps/{name}:1", "--push", "--no-load", "--json",
                      env=env, cwd=tmp_path)
            assert one.returncode == 0, one.stderr
        sizes = {n: {la["digest"]: la["size"] for la in s["layers"]} for n, s in pushed.items()}
        shared = sum(size for digest, size in sizes["json"].items() if digest in sizes["csv"])
        for n in sizes:
            assert shared >= 0.5 * sum(sizes[n].values()), (n, shared, pushed[n]["layers"])
        # The registry's own storage shows it: the shared layers are stored once.
        assert _stored_blob_bytes(layered) < 0.8 * _stored_blob_bytes(single)
        # The second app's push found the shared layers there (mounted from the first repository).
        assert pushed["csv"]["pushed"][0]["mounted"] > 0

        ref = f"{layered.host}/apps/json:1"
        pulled = docker_engine.run("pull", ref, check=False)
        try:
            assert pulled.returncode == 0, pulled.stderr
            ran = docker_engine.run("run", "--rm", ref)
            assert json.loads(ran.stdout) == {"args": ["x"]}
            ran = docker_engine.run("run", "--rm", ref, "app.py", "other", "args")   # CMD replaced
            assert json.loads(ran.stdout) == {"args": ["other", "args"]}
        finally:
            docker_engine.run("rmi", "-f", ref, check=False)
        if shutil.which("skopeo"):
            seen = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"],
                                  capture_output=True, text=True, timeout=60)
            assert seen.returncode == 0, seen.stderr
            assert json.loads(seen.stdout)["Digest"] == pushed["json"]["pushed"][0]["digest"]


def test_push_command_pushes_an_archive(plain_registry: RunningRegistry, tmp_path: Path, env: dict[str, str]) -> None:
    built = make_image(tmp_path)
    archive = tmp_path / "img.tar"
    image.write_image_archive(built.img, str(archive))
    full_env = {**os.environ, **env}
    ref = f"{plain_registry.host}/tj/cli:{built.token[3:15]}"
    proc = _tj("push", str(archive), ref, "--json", env=full_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(proc.stdout)
    assert result["digest"] == built.img.manifest.digest and result["uploaded"]
    assert_served(plain_registry, "tj/cli", built.token[3:15], built.img)
    again = _tj("push", str(archive), ref, "-q", env=full_env, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.strip() == built.img.manifest.digest
    for bad_args, code in (([str(archive), "app:bad tag!"], 2), ([str(tmp_path / "app.py"), ref], 2),
                           ([str(tmp_path), ref], 65)):
        bad = _tj("push", *bad_args, env=full_env, cwd=tmp_path)
        assert bad.returncode == code, (bad_args, bad.stderr)
        assert "Traceback" not in bad.stderr
        assert bad.stderr.strip().splitlines()[-1].startswith(("tracejail: ", "Error: "))


def test_build_push_without_an_engine_pushes_and_leaves_no_archive(plain_registry: RunningRegistry,
                                                                   tmp_path: Path) -> None:
    from test_layers import APP_JSON, record_app

    trace = record_app(tmp_path / "app", APP_JSON, "z")
    env = {**os.environ, "TRACEJAIL_CACHE_DIR": str(tmp_path / "cache"), "DOCKER_HOST": f"unix://{tmp_path}/no.sock"}
    ref = f"{plain_registry.host}/tj/no-engine:1"
    proc = _tj("build", str(trace), "-t", ref, "--push", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "not loaded into Docker" in proc.stderr and f"pushed {ref}@" in proc.stdout
    assert not list(tmp_path.glob("*.tar"))
    status, _, _ = plain_registry.get("/v2/tj/no-engine/manifests/1", accept=image.MANIFEST_MEDIA_TYPE)
    assert status == 200
