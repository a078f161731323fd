"""Private keys found by content, whatever the file is called; format constants are not keys."""
from __future__ import annotations

import base64
import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tracejail.sensitive import HEAD_BYTES, private_key_in, sensitive_name


def pem(label: str, body: bytes, headers: str = "") -> bytes:
    b64 = base64.encodebytes(body).decode()
    return f"-----BEGIN {label}-----\n{headers}{b64}-----END {label}-----\n".encode()


def check(data: bytes) -> str | None:
    return private_key_in(data[:HEAD_BYTES], len(data))


@pytest.mark.parametrize("label", ["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "DSA PRIVATE KEY",
                                   "OPENSSH PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "PGP PRIVATE KEY BLOCK"])
def test_pem_private_key_blocks(label: str) -> None:
    assert check(pem(label, os.urandom(600))) == f"a PEM {label}"


def test_key_buried_in_a_file_with_an_innocent_name_and_other_text() -> None:
    data = b"# deployment notes\nhost=db1\n\n" + pem("RSA PRIVATE KEY", os.urandom(900),
                                                     "Proc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\n")
    assert check(data) == "a PEM RSA PRIVATE KEY"


def test_key_pasted_into_source_code() -> None:
    body = base64.b64encode(os.urandom(300)).decode()
    src = f'KEY = ("-----BEGIN PRIVATE KEY-----\\n"\n       "{body[:64]}\\n" + "{body[64:]}")\n'
    assert check(src.encode()) == "a PEM PRIVATE KEY"


@pytest.mark.parametrize("data", [
    b'MARK_BEGIN = "-----BEGIN OPENSSH PRIVATE KEY-----\\n"\x00-----END OPENSSH PRIVATE KEY-----\x00',
    b'if line.startswith("-----BEGIN RSA PRIVATE KEY-----"):\n    parse(line)\n',
    b"-----BEGIN PRIVATE KEY-----\n...\n-----END PRIVATE KEY-----\n",
    pem("CERTIFICATE", os.urandom(600)),
    pem("PUBLIC KEY", os.urandom(300)),
], ids=["binary-constant", "parser", "doc-example", "certificate", "public-key"])
def test_format_constants_and_certificates_are_not_keys(data: bytes) -> None:
    assert check(data) is None


def _der(inner: bytes) -> bytes:
    n = len(inner)
    return b"\x30\x82" + n.to_bytes(2, "big") + inner


def test_der_keys_span_the_whole_file() -> None:
    pkcs8 = _der(b"\x02\x01\x00\x30\x0d\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01\x05\x00\x04\x82\x01\x00"
                 + os.urandom(256))
    assert check(pkcs8) == "a DER PKCS#8 private key"
    assert check(pkcs8 + b"trailing") is None            # not one DER structure: not judged a key
    sec1 = bytes([0x30, 0x77, 0x02, 0x01, 0x01, 0x04, 0x20]) + os.urandom(0x77 - 5)
    assert check(sec1) == "a DER SEC1 (EC) private key"


def test_sensitive_names() -> None:
    assert sensitive_name("/etc/shadow") == "/etc/shadow"
    assert sensitive_name("/home/u/.ssh/id_ed25519") == "*/.ssh/*"
    assert sensitive_name("/root/.docker/config.json") == "*/.docker/config.json"
    assert sensitive_name("/etc/shadowfax") is None
    assert sensitive_name("/usr/lib/python3/dist-packages/ssh/client.py") is None


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_real_keys_made_by_openssl(tmp_path: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "k.pem")
    run("pkey", "-in", "k.pem", "-outform", "DER", "-out", "k.der")
    run("pkcs8", "-topk8", "-in", "k.pem", "-v2", "aes-256-cbc", "-passout", "pass:x", "-outform", "DER",
        "-out", "enc.der")
    run("req", "-x509", "-key", "k.pem", "-subj", "/CN=x", "-out", "cert.pem")
    run("x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der")
    run("pkcs12", "-export", "-inkey", "k.pem", "-in", "cert.pem", "-passout", "pass:x", "-out", "both.p12")
    run("pkcs12", "-export", "-nokeys", "-in", "cert.pem", "-passout", "pass:x", "-out", "trust.p12")
    found = {f: check((tmp_path / f).read_bytes()) for f in
             ("k.pem", "k.der", "enc.der", "cert.pem", "cert.der", "both.p12", "trust.p12")}
    assert found["k.pem"] and found["k.der"] and found["enc.der"] and found["both.p12"]
    assert found["cert.pem"] is None and found["cert.der"] is None and found["trust.p12"] is None


def test_no_false_positive_on_this_machines_binaries_and_trust_stores() -> None:
    """ssh carries the OpenSSH key marker, libcrypto every PEM label, Java trust stores are
    keystores: none holds a key."""
    candidates = ["/usr/bin/ssh", "/usr/bin/ssh-keygen", "/usr/bin/openssl", "/etc/ssl/certs/ca-certificates.crt",
                  "/etc/ssl/certs/java/cacerts", *glob.glob("/usr/lib/x86_64-linux-gnu/libcrypto.so.*"),
                  *glob.glob("/usr/lib/x86_64-linux-gnu/libssl.so.*"), *glob.glob("/usr/lib/python3*/ssl.py")]
    checked = 0
    for path in candidates:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                head = f.read(HEAD_BYTES)
            assert private_key_in(head, os.path.getsize(path)) is None, path
            checked += 1
    assert checked >= 2


# --- secrets in values -------------------------------------------------------------------------

from tracejail.sensitive import REDACTED, redact_argv, redact_environment, redact_text, secret_in_variable  # noqa: E402

GH = "ghp_" + "A1b2" * 9
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLXNpZw"


@pytest.mark.parametrize("name,value", [
    ("DATABASE_URL", "postgres://app:hunter2@db:5432/app"),
    ("SENTRY_DSN", "https://0123456789abcdef@o1.ingest.sentry.io/42"),
    ("GREETING_TEXT", "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0B\n-----END PRIVATE KEY-----\n"),
    ("JAVA_OPTS", "-Xmx1g -Dspring.datasource.password=hunter2"),
    ("APP_CONFIG", "mode=prod;secret=abc"),
    ("NODE_EXTRA", GH),
    ("PYTHONSTARTUP_HINT", JWT),
    ("CI_VAR", "glpat-" + "x" * 20),
    ("HOOK", "xoxb-1234567890-abcdefghij"),
    ("AWS_REGION_AND_ID", "AKIAIOSFODNN7EXAMPLE"),
    ("BILLING", "sk_live_" + "a" * 24),
    ("API_TOKEN", "anything"),
])
def test_secret_values_are_found_whatever_the_name(name: str, value: str) -> None:
    assert secret_in_variable(name, value)
    env, names = redact_environment({name: value, "PATH": "/usr/bin:/bin"})
    assert env == {name: REDACTED, "PATH": "/usr/bin:/bin"} and names == [name]
    assert redact_environment({name: value}, keep=[name])[0] == {name: value}


@pytest.mark.parametrize("name,value", [("PATH", "/usr/local/bin:/usr/bin"), ("LANG", "C.UTF-8"),
                                        ("JAVA_OPTS", "-Xmx1g -Dfile.encoding=UTF-8"),
                                        ("PIP_INDEX_URL", "https://pypi.org/simple"),
                                        ("NODE_OPTIONS", "--max-old-space-size=4096")])
def test_ordinary_values_are_kept(name: str, value: str) -> None:
    assert secret_in_variable(name, value) is None


def test_command_lines_lose_secrets_not_their_shape() -> None:
    argv = ["/srv/app", "--db-password=hunter2", "--token", "t0k", "--port", "80", "--author=bob",
            "--keyfile", "k.pem", "postgres://u:pw@h/db", f"--header=Authorization: {JWT}"]
    out, changed = redact_argv(argv)
    assert out == ["/srv/app", f"--db-password={REDACTED}", "--token", REDACTED, "--port", "80", "--author=bob",
                   "--keyfile", "k.pem", f"postgres://u:{REDACTED}@h/db", f"--header=Authorization: {REDACTED}"]
    assert changed == [1, 3, 9, 10]


def test_output_keeps_its_text_and_loses_its_tokens() -> None:
    text, found = redact_text(f"login ok\ntoken={GH}\nurl=https://me:pw@example.com/x\n")
    assert text == f"login ok\ntoken={REDACTED}\nurl=https://me:{REDACTED}@example.com/x\n"
    assert found == ["a password in a URL", "a GitHub token"]


# --- labels and annotations ----------------------------------------------------------------------

from tracejail.build import annotation_alerts, image_labels  # noqa: E402
from tracejail.sensitive import secret_in_label  # noqa: E402


@pytest.mark.parametrize("name,value", [
    ("db.password", "hunter2"), ("com.example.api-key", "k"), ("vault_token", "s.abc"),
    ("io.app.auth", "basic"), ("org.example.private.key", "x"),
    ("org.opencontainers.image.description", f"built with {GH}"),      # a value shaped like a secret
    ("notes", "postgres://app:hunter2@db/app"),
])
def test_labels_that_hold_a_secret(name: str, value: str) -> None:
    assert secret_in_label(name, value)


@pytest.mark.parametrize("name,value", [
    ("org.opencontainers.image.authors", "Jane <jane@example.com>"),   # AUTH in AUTHORS is no secret
    ("org.opencontainers.image.source", "https://github.com/example/app"),
    ("com.example.keyboard-layout", "fr"), ("maintainer", "ops"), ("io.app.token", ""),
])
def test_ordinary_labels_are_kept(name: str, value: str) -> None:
    assert secret_in_label(name, value) is None


def test_an_images_secret_labels_are_left_out_and_given_ones_are_alerted() -> None:
    source = {"org.opencontainers.image.authors": "Jane", "db.password": "hunter2", "vault.token": REDACTED}
    labels, alerts = image_labels(source, {"team": "core"}, "app:1")
    assert labels == {"org.opencontainers.image.authors": "Jane", "team": "core"}
    assert alerts == ["app:1's labels hold secrets, left out of the image: db.password, vault.token"]
    said = annotation_alerts({"api.token": "t0k"}, {"org.opencontainers.image.description": GH})
    assert [a.split(" holds")[0] for a in said] == ["--label api.token", "--annotation org.opencontainers.image.description"]
