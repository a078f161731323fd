"""What must never reach an image: credentials by name, and private keys by content.

Names are judged on canonical paths (every hop a path takes, and the file it reaches: see
root.Resolution), so a symlink or a `..` spelling cannot smuggle `/etc/shadow` in. Content is
judged on the first bytes of every kept regular file, whatever its name: PEM private-key
blocks (PKCS#1, PKCS#8, SEC1, OpenSSH, encrypted), PGP private key blocks, SSH2 and PuTTY key
files, DER PKCS#8 / PKCS#1 / SEC1 / encrypted PKCS#8 keys, PKCS#12 files holding a key bag, and
Java keystores holding a private-key entry. A format constant in a binary (ssh carries the
OpenSSH marker) or in a parser's source is not a key: a PEM marker counts only when a base64 body
follows it.
"""
from __future__ import annotations

import fnmatch
import functools
import re
import struct
from typing import Callable, Iterable

# Never copied unless their real path is named with --include: credentials, keys, histories.
SENSITIVE_GLOBS = (
    "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers",
    "/etc/sudoers.d/*", "/etc/ssl/private/*", "/etc/ssh/ssh_host_*_key",
    "*/.ssh/*", "*/.aws/*", "*/.docker/config.json", "*/.netrc", "*/.git-credentials",
    "*/.pgpass", "*/.kube/config", "*/.config/gcloud/*", "*/.azure/*", "*/.gnupg/*",
    "*/.bash_history", "*/.zsh_history", "*/.sh_history", "*/.python_history",
    "*/.psql_history", "*/.mysql_history", "*/.sqlite_history", "*/.node_repl_history",
    "*/.lesshst", "*/.viminfo",
    "*/id_rsa", "*/id_dsa", "*/id_ecdsa", "*/id_ed25519", "*.key",
)

# How much of each file the content check reads.
HEAD_BYTES = 1 << 20

_PEM_BEGIN = re.compile(rb"-----BEGIN ((?:[A-Z0-9]+ ){0,3})PRIVATE KEY( BLOCK)?-----")
_SSH2_BEGIN = re.compile(rb"---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----")
_PUTTY = re.compile(rb"\APuTTY-User-Key-File-[0-9]+: [^\r\n]+\r?\n.*?Private-Lines: [0-9]+", re.S)
# Between the BEGIN line and the body: header lines (Proc-Type, DEK-Info, Version, Comment),
# line breaks, or the escapes and quotes of a key pasted into source code.
_PEM_GAP = re.compile(rb'(?:\\[rn]|[\r\n \t"\'+]|[A-Za-z][A-Za-z0-9-]*: [^\r\n]*)*')
_BASE64_RUN = re.compile(rb'(?:[A-Za-z0-9+/=]|\\[rn]|[\r\n \t"\'+])*')
_MIN_BODY = 64   # base64 characters after the marker: a key has hundreds, a format constant none

# DER object identifiers (content bytes) that mark encrypted keys and PKCS#12 key bags.
_OID_PBES2 = bytes.fromhex("2a864886f70d01050d")
_OID_PKCS12_PBE = bytes.fromhex("2a864886f70d010c01")      # 1.2.840.113549.1.12.1.x
_OID_PKCS7_DATA = bytes.fromhex("2a864886f70d010701")
_OID_KEY_BAGS = (bytes.fromhex("2a864886f70d010c0a0101"),   # keyBag
                 bytes.fromhex("2a864886f70d010c0a0102"))   # pkcs8ShroudedKeyBag


def _matcher(glob: str) -> Callable[[str], bool]:
    """A plain string test for the usual glob shapes (fnmatch costs ~6 µs a call, and every hop
    of every candidate path is judged); fnmatch for the rest."""
    inner = glob.strip("*")
    if not any(c in inner for c in "*?["):
        if glob.startswith("*/") and glob.endswith("/*"):
            return lambda p: inner in p                       # */.ssh/*
        if glob.startswith("*"):
            return lambda p: p.endswith(inner)                # */.netrc, *.key
        if glob.endswith("/*"):
            return lambda p: p.startswith(inner)              # /etc/sudoers.d/*
        if "*" not in glob:
            return lambda p: p == glob
    return lambda p: fnmatch.fnmatchcase(p, glob)


_MATCHERS = tuple((g, _matcher(g)) for g in SENSITIVE_GLOBS)


@functools.lru_cache(maxsize=1 << 16)
def sensitive_name(path: str) -> str | None:
    """The glob that marks a canonical path as a credential, or None."""
    return next((g for g, matches in _MATCHERS if matches(path)), None)


def private_key_in(head: bytes, size: int) -> str | None:
    """What kind of private key the first bytes of a file (of `size` bytes in all) hold, or None."""
    for m in _PEM_BEGIN.finditer(head):
        if _has_body(head, m.end()):
            label = (m.group(1) + b"PRIVATE KEY" + (m.group(2) or b"")).decode()
            return f"a PEM {label}"
    m = _SSH2_BEGIN.search(head)
    if m and _has_body(head, m.end()):
        return "an SSH2 private key"
    if _PUTTY.match(head):
        return "a PuTTY private key"
    return _der_key(head, size) or _java_keystore_key(head)


def _has_body(head: bytes, at: int) -> bool:
    gap = _PEM_GAP.match(head, at)
    start = gap.end() if gap else at
    run = _BASE64_RUN.match(head, start)
    body = run.group() if run else b""
    chars = len(re.sub(rb'\\[rn]|[^A-Za-z0-9+/=]', b"", body))
    return chars >= _MIN_BODY


def _der_header(data: bytes, at: int) -> tuple[int, int, int] | None:
    """(tag, offset of the content, content length) of the DER element at `at`."""
    if at + 2 > len(data):
        return None
    tag, first = data[at], data[at + 1]
    if first < 0x80:
        return tag, at + 2, first
    n = first & 0x7F
    if n == 0 or n > 4 or at + 2 + n > len(data):
        return None
    return tag, at + 2 + n, int.from_bytes(data[at + 2:at + 2 + n], "big")


def _der_key(head: bytes, size: int) -> str | None:
    """A whole-file DER private key (the outer SEQUENCE spans exactly the file)."""
    outer = _der_header(head, 0)
    if outer is None or outer[0] != 0x30 or outer[1] + outer[2] != size:
        return None
    body = head[outer[1]:outer[1] + 64]
    if body.startswith(b"\x02\x01\x00\x02"):
        return "a DER PKCS#1 (RSA/DSA) private key"
    if body.startswith((b"\x02\x01\x00\x30", b"\x02\x01\x01\x30")):
        return "a DER PKCS#8 private key"
    if body.startswith(b"\x02\x01\x01\x04"):
        return "a DER SEC1 (EC) private key"
    inner = _der_header(head, outer[1])
    if inner is not None and inner[0] == 0x30:
        oid = _der_header(head, inner[1])
        if oid is not None and oid[0] == 0x06:
            value = head[oid[1]:oid[1] + oid[2]]
            if value == _OID_PBES2 or value.startswith(_OID_PKCS12_PBE):
                return "a DER encrypted PKCS#8 private key"
    if body.startswith(b"\x02\x01\x03\x30") and _OID_PKCS7_DATA in head[:256]:
        # A PKCS#12 file: a trust store holds only certificate bags; a key bag is a key.
        if any(bag in head for bag in _OID_KEY_BAGS):
            return "a PKCS#12 file holding a private key"
    return None


def _java_keystore_key(head: bytes) -> str | None:
    """A JKS/JCEKS keystore with a private-key entry (tag 1); trust stores hold tag 2 only."""
    if len(head) < 12 or head[:4] not in (b"\xfe\xed\xfe\xed", b"\xce\xce\xce\xce"):
        return None
    version, count = struct.unpack_from(">II", head, 4)
    at = 12
    try:
        for _ in range(min(count, 10000)):
            (tag,) = struct.unpack_from(">I", head, at)
            if tag in (1, 3):       # PrivateKeyEntry (3: a JCEKS secret key)
                return "a Java keystore holding a private key"
            if tag != 2:
                return None
            (alias_len,) = struct.unpack_from(">H", head, at + 4)
            at += 4 + 2 + alias_len + 8
            if version == 2:
                (type_len,) = struct.unpack_from(">H", head, at)
                at += 2 + type_len
            (cert_len,) = struct.unpack_from(">I", head, at)
            at += 4 + cert_len
    except struct.error:
        return None   # ran past the bytes read: no key entry among those
    return None


# --------------------------------------------------------------------------------------------
# Secrets in values: environment, command lines, captured output

REDACTED = "<redacted>"

# Variable names whose values are never kept (asked for by name: --keep-env NAME keeps one).
SECRET_NAME_PARTS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "AUTH",
                     "COOKIE", "SESSION")

# Shapes of secrets wherever they appear. Each pattern's group 1 (or the whole match) is what is
# replaced, so `postgres://app:pw@db/x` keeps its user and host and loses only the password.
_TOKEN_SHAPES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("a password in a URL", re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]{1,20}://[^\s/?#@:'\"]*:([^\s/?#@'\"]+)@")),
    ("a private key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----"
                                 r"(?:.|\n){0,8192}?-----END (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----")),
    ("a GitHub token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b")),
    ("a GitLab token", re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}\b")),
    ("a Slack token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b")),
    ("an AWS access key", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("a Stripe key", re.compile(r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}\b")),
    ("a JSON web token", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")),
)
# Command-line options that carry a secret, by the words of their name: `--password=X`,
# `--db-token X`, `--api-key X`, `--basic-auth X` (not `--author`, not `--keyfile`).
_SECRET_WORDS = frozenset({"password", "passwd", "pwd", "pass", "passphrase", "secret", "token", "apikey",
                           "credential", "credentials", "auth"})
_SECRET_PAIRS = frozenset({("api", "key"), ("private", "key"), ("access", "key"), ("secret", "key")})


def _name_says_secret(name: str, separators: str) -> bool:
    """Whether the words of `name` (split at `separators`) say it holds a secret."""
    words = [w for w in re.split(separators, name.lower()) if w]
    return any(w in _SECRET_WORDS for w in words) or any(p in _SECRET_PAIRS for p in zip(words, words[1:]))


def _secret_option(name: str) -> bool:
    if not name.startswith("-") or len(name) < 3:
        return False
    return _name_says_secret(name.lstrip("-"), r"[-_.]+")
# Free-form option strings (JAVA_OPTS, *CONFIG*, *DSN*) that set a password.
_SECRET_SETTING = re.compile(r"(?:passw(?:or)?d|pass|pwd|secret)\s*[=:]", re.I)


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(part in upper for part in SECRET_NAME_PARTS)


def find_secret(text: str) -> str | None:
    """What kind of secret `text` holds (the first found), or None."""
    for what, pattern in _TOKEN_SHAPES:
        if pattern.search(text):
            return what
    return None


def redact_text(text: str) -> tuple[str, list[str]]:
    """`text` with every secret shape replaced by <redacted>, and the kinds found."""
    found: list[str] = []
    for what, pattern in _TOKEN_SHAPES:
        def repl(m: re.Match[str]) -> str:
            if m.lastindex:
                return m.group(0)[:m.start(1) - m.start(0)] + REDACTED + m.group(0)[m.end(1) - m.start(0):]
            return REDACTED
        text, n = pattern.subn(repl, text)
        if n and what not in found:
            found.append(what)
    return text, found


def secret_in_variable(name: str, value: str) -> str | None:
    """Why an environment variable's value must not be kept, or None."""
    if is_secret_name(name):
        return f"its name ({name}) says it holds a secret"
    upper = name.upper()
    if (upper.endswith("_OPTS") or "CONFIG" in upper or "DSN" in upper) and _SECRET_SETTING.search(value):
        return f"{name} sets a password"
    if "DSN" in upper and re.search(r"://[^\s/@]+@", value):
        return f"{name} holds a key in its URL"
    return find_secret(value)


def secret_in_label(name: str, value: str) -> str | None:
    """Why a label or annotation (readable by anyone who can pull the image) must not carry its
    value, or None: a name whose words say it holds a secret (`db.password`, `api-key`; not
    `org.opencontainers.image.authors`), or a value shaped like one."""
    if value and _name_says_secret(name, r"[-_./]+"):
        return f"its name ({name}) says it holds a secret"
    return find_secret(value)


def redact_environment(env: dict[str, str], keep: Iterable[str] = ()) -> tuple[dict[str, str], list[str]]:
    """Environment values that may be kept: secrets (by name or by value) become <redacted>,
    unless their name is in `keep`. Returns the environment and the names redacted."""
    kept = set(keep)
    out, redacted = {}, []
    for k, v in sorted(env.items()):
        if k not in kept and secret_in_variable(k, v):
            out[k] = REDACTED
            redacted.append(k)
        else:
            out[k] = v
    return out, redacted


def redact_argv(argv: list[str]) -> tuple[list[str], list[int]]:
    """A command line with secret values replaced: `--password=X`, `--token X` (the next word)
    and any word holding a secret shape. Returns the new argv and the indices changed."""
    out, changed = list(argv), []
    for i, word in enumerate(argv):
        if i == 0:
            continue
        name, eq, value = word.partition("=")
        if _secret_option(name):
            if eq and value:
                out[i] = f"{name}={REDACTED}"
                changed.append(i)
                continue
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                out[i + 1] = REDACTED
                changed.append(i + 1)
                continue
        if i in changed:
            continue
        new, found = redact_text(word)
        if found:
            out[i] = new
            changed.append(i)
    return out, sorted(set(changed))
