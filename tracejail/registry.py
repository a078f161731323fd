"""Push images to a registry over the OCI distribution API, with no daemon.

One push, per reference (`registry/repository:tag`):

1. `GET /v2/` once per registry: decides the scheme (see Transport) and learns how the registry
   authenticates (`WWW-Authenticate`: none, `Basic`, or `Bearer` with a token service);
2. per blob (layers, then config): `HEAD /v2/<repo>/blobs/<digest>`; 200 means it is there.
   Otherwise a cross-repository mount (`POST .../blobs/uploads/?mount=<digest>&from=<repo>`) is
   tried when this push already sent the blob to another repository of the same registry, or
   when a small local record (registry-blobs.json in tracejail's cache directory) names one;
   201 means mounted, 202 starts an ordinary upload session. Else `POST .../blobs/uploads/`, then
   one `PUT <location>&digest=` streaming the blob, or with `chunk_size` a `PATCH` per chunk
   (`Content-Range`, following each returned `Location`) and a closing `PUT` with the digest;
3. `PUT /v2/<repo>/manifests/<tag>` with the manifest bytes; the `Docker-Content-Digest` the
   registry answers must be the manifest's digest.

Authentication: anonymous first. On 401 the challenge decides: `Basic` sends the credentials with
every request; `Bearer realm=..,service=..` gets a token from the realm for
`scope=repository:<repo>:pull,push` (plus `repository:<from>:pull` to mount), with the basic
credentials when there are any; a docker `identitytoken` is exchanged with the OAuth2 form
(`POST realm`, `grant_type=refresh_token`) as docker does, and, when the realm has no OAuth2
endpoint (404/405), sent as basic credentials `<token>:IDENTITYTOKEN`. Credentials are looked up,
in order: TRACEJAIL_REGISTRY_USERNAME + TRACEJAIL_REGISTRY_PASSWORD; REGISTRY_AUTH_FILE (podman's
auth.json); $DOCKER_CONFIG/config.json or ~/.docker/config.json (credHelpers, credsStore, auths).
Secrets never appear in a message, a repr or the record.

Transport: verified HTTPS (with /etc/docker/certs.d/HOST/*.crt as extra CAs and *.cert/*.key as
client certificates, as docker reads them). localhost, 127.0.0.0/8, ::1 and hosts given as
insecure registries are treated as docker treats an insecure registry: HTTPS without verification
first, plain HTTP when the server does not speak TLS; the scheme found is kept for the whole push.
Credentials go to a token realm over plain HTTP only when that realm's host is one of those.
"""
from __future__ import annotations

import base64
import functools
import glob
import hashlib
import http.client
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import tarfile
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, NamedTuple

from tracejail import __version__, cachedir, image
from tracejail.errors import TracejailError
from tracejail.text import shown

DOCKER_HUB_DOMAIN = "docker.io"
DOCKER_HUB_REGISTRY = "registry-1.docker.io"      # what docker talks to for docker.io names
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"  # how docker names docker.io in config.json
DOCKER_HUB_HOSTS = ("index.docker.io", "docker.io", "registry-1.docker.io")
CERTS_D = "/etc/docker/certs.d"                    # docker's per-registry certificate directories
BLOB_RECORD_FILE = "registry-blobs.json"
USER_AGENT = f"tracejail/{__version__}"

ENV_USERNAME = "TRACEJAIL_REGISTRY_USERNAME"
ENV_PASSWORD = "TRACEJAIL_REGISTRY_PASSWORD"

OCTET_STREAM = "application/octet-stream"
DOCKER_MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (image.MANIFEST_MEDIA_TYPE, DOCKER_MANIFEST_V2)
INDEX_TYPES = (image.INDEX_MEDIA_TYPE, DOCKER_MANIFEST_LIST)

_PROBE_TIMEOUT = 10.0        # the first TLS attempt on an insecure registry: a plain-HTTP server answers at once
_MAX_BODY = 1 << 20          # registry answers are small JSON; more than this is not read
_MAX_MOUNT_TRIES = 3         # repositories tried as a mount source per blob
_TOKEN_MARGIN = 10.0         # refresh a bearer token this many seconds before it expires
_HELPER_TIMEOUT = 60.0       # a credential helper may ask a keyring or a cloud CLI
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")


class RegistryError(TracejailError):
    """A push that failed: the message is one line that names the registry and says what to do.

    Exit code 1, as for any job that failed (tracejail/cli.py): a refused login, an unknown
    repository or an unreachable host is the job failing, not a usage error (2) or corrupt input (65).
    """

    exit_code = 1


class LayoutError(TracejailError):
    """An image archive or layout that is missing, corrupt or foreign: 65 (EX_DATAERR), as for a
    corrupt trace or ELF file."""

    exit_code = 65


@dataclass(frozen=True)
class PushOptions:
    insecure_registries: tuple[str, ...] = ()   # hosts (host or host:port, or a CIDR) allowed over plain HTTP / unverified TLS
    chunk_size: int | None = None               # None: monolithic PUT for blobs; else chunked PATCH uploads of this size
    environ: Mapping[str, str] | None = None     # DOCKER_CONFIG, REGISTRY_AUTH_FILE, credentials, HOME... (default os.environ)
    progress: Callable[[str, int, int], None] | None = None   # (label, bytes just sent, total)
    timeout: float = 60.0


@dataclass
class PushResult:
    reference: str           # full reference pushed (registry/repo:tag)
    manifest_digest: str
    uploaded: list[str] = field(default_factory=list)   # blob digests uploaded
    skipped: list[str] = field(default_factory=list)    # already in the repository
    mounted: list[str] = field(default_factory=list)    # cross-repository mounted
    bytes_uploaded: int = 0


# --------------------------------------------------------------------------------------------
# Names and hosts


def registry_host(domain: str) -> str:
    """The host[:port] to talk to for a reference's domain (docker.io is served elsewhere)."""
    return DOCKER_HUB_REGISTRY if domain == DOCKER_HUB_DOMAIN else domain


def _split_host(hostport: str) -> tuple[str, int | None]:
    """("[::1]:5000" -> ("::1", 5000)), ("example.com" -> ("example.com", None))."""
    if hostport.startswith("["):
        end = hostport.find("]")
        host, rest = hostport[1:end], hostport[end + 1:]
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    host, sep, port = hostport.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return hostport, None


def _is_loopback(hostname: str) -> bool:
    if hostname.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def _strip_scheme(entry: str) -> str:
    for prefix in ("https://", "http://"):
        if entry.lower().startswith(prefix):
            entry = entry[len(prefix):]
    return entry.rstrip("/")


def is_insecure(hostport: str, insecure_registries: Iterable[str] = ()) -> bool:
    """Whether `hostport` may be reached without TLS verification (and over plain HTTP): loopback
    names and addresses always, as docker does; else only when listed (host, host:port or CIDR)."""
    hostname, _ = _split_host(hostport)
    if _is_loopback(hostname):
        return True
    for entry in insecure_registries:
        entry = _strip_scheme(entry.strip())
        if entry.lower() in (hostport.lower(), hostname.lower()):
            return True
        if "/" in entry:
            try:
                if ipaddress.ip_address(hostname) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
    return False


def _login_command(domain: str) -> str:
    return "docker login" if domain == DOCKER_HUB_DOMAIN else f"docker login {domain}"


def _one_line(text: str, limit: int = 200) -> str:
    """Text from a registry or a helper, made safe for a one-line message: control characters
    written out, whitespace runs folded, and cut to `limit` characters."""
    text = " ".join(shown(text.replace("\n", " ").replace("\r", " ")).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------
# WWW-Authenticate


@dataclass(frozen=True)
class Challenge:
    """One authentication challenge: its scheme in lower case ("basic", "bearer") and parameters
    (names in lower case)."""

    scheme: str
    params: Mapping[str, str]


_AUTH_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_www_authenticate(value: str) -> list[Challenge]:
    """Every challenge in a WWW-Authenticate value (RFC 7235): `Bearer realm="https://a/t",
    service="x",scope="repository:r:pull,push"` is one challenge with three parameters; commas
    inside quoted values, escaped quotes and several challenges in one header are handled."""
    challenges: list[Challenge] = []
    params: dict[str, str] = {}
    at, end = 0, len(value)
    while at < end:
        while at < end and value[at] in " \t,":
            at += 1
        name = _AUTH_TOKEN.match(value, at)
        if name is None:
            break   # not a token: nothing more can be read reliably
        after = name.end()
        probe = after
        while probe < end and value[probe] in " \t":
            probe += 1
        if probe < end and value[probe] == "=" and challenges:
            # name=value: a parameter of the current challenge
            probe += 1
            while probe < end and value[probe] in " \t":
                probe += 1
            if probe < end and value[probe] == '"':
                chars, probe = [], probe + 1
                while probe < end and value[probe] != '"':
                    if value[probe] == "\\" and probe + 1 < end:
                        probe += 1
                    chars.append(value[probe])
                    probe += 1
                param_value, at = "".join(chars), probe + 1
            else:
                stop = probe
                while stop < end and value[stop] not in ", \t":
                    stop += 1
                param_value, at = value[probe:stop], stop
            params[name.group().lower()] = param_value
        else:
            # a new auth scheme (a token68 after it, as in "Basic xyz==", is not used by registries)
            params = {}
            challenges.append(Challenge(name.group().lower(), params))
            at = after
    return challenges


def _pick_challenge(challenges: list[Challenge]) -> Challenge | None:
    """Bearer when offered (tokens are scoped), else Basic; others are not spoken."""
    for scheme in ("bearer", "basic"):
        for ch in challenges:
            if ch.scheme == scheme:
                return ch
    return None


# --------------------------------------------------------------------------------------------
# Credentials


@dataclass(frozen=True)
class Credentials:
    """What to authenticate with; `source` says where it came from (for messages), never the values."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    source: str = ""


def _environ(options: PushOptions) -> Mapping[str, str]:
    return os.environ if options.environ is None else options.environ


def _home(environ: Mapping[str, str]) -> str:
    return environ.get("HOME") or os.path.expanduser("~")


def _auth_key_hosts(domain: str) -> tuple[str, ...]:
    """The host names a config.json key may use for this registry."""
    return DOCKER_HUB_HOSTS if domain == DOCKER_HUB_DOMAIN else (domain.lower(),)


def _auth_key_specificity(key: str, hosts: tuple[str, ...], repository: str) -> int | None:
    """How well an `auths` key matches, as docker and podman match them: `host`, `https://host`,
    `http://host`, with or without a `/v1/` or `/v2/` suffix; podman's `host/namespace` keys
    match repositories below that namespace (longer is more specific). None: no match."""
    rest = _strip_scheme(key.strip())
    for suffix in ("/v1", "/v2"):
        if rest.lower().endswith(suffix):
            rest = rest[: -len(suffix)]
    host, _, path = rest.partition("/")
    if host.lower() not in hosts:
        return None
    if not path:
        return 0
    if repository == path or repository.startswith(path + "/"):
        return len(path) + 1
    return None


def _decode_auth_entry(entry: object, where: str, domain: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    token = entry.get("identitytoken") or entry.get("identityToken")
    username, password = entry.get("username") or "", entry.get("password") or ""
    encoded = entry.get("auth")
    if encoded:
        try:
            username, sep, password = base64.b64decode(str(encoded), validate=False).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            sep = ""
        if not sep:
            raise RegistryError(f"the `auth` entry for {domain} in {where} is not base64 of USER:PASSWORD; "
                                f"run `{_login_command(domain)}` again")
    if isinstance(token, str) and token:
        return Credentials(str(username), "", token, where)
    if username or password:
        return Credentials(str(username), str(password), "", where)
    return None


def _run_credential_helper(helper: str, domain: str, where: str, environ: Mapping[str, str],
                           required: bool) -> Credentials | None:
    """`docker-credential-HELPER get` with the server on stdin. A helper that is missing is an
    error when config.json names it for this registry (`required`), else it is passed over."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", helper):
        raise RegistryError(f"{where} names a credential helper {helper!r} that is not a plain name; fix the file")
    program = f"docker-credential-{helper}"
    path = shutil.which(program, path=environ.get("PATH", os.defpath))
    if path is None:
        if required:
            raise RegistryError(f"{where} says to get the credentials for {domain} from {program}, which is "
                                "not on PATH; install it, or remove it from credHelpers")
        return None
    server = DOCKER_HUB_AUTH_KEY if domain == DOCKER_HUB_DOMAIN else domain
    try:
        proc = subprocess.run([path, "get"], input=server, capture_output=True, text=True,
                              timeout=_HELPER_TIMEOUT, env=dict(environ))
    except subprocess.TimeoutExpired:
        raise RegistryError(f"{program} did not answer within {_HELPER_TIMEOUT:.0f} s for {domain}; "
                            "check the credential helper (is a keyring waiting for a password?)") from None
    except OSError as err:
        raise RegistryError(f"cannot run {program} for {domain}: {err.strerror}") from None
    if proc.returncode != 0:
        said = (proc.stdout + " " + proc.stderr).strip()
        if "credentials not found" in said.lower():
            return None
        # The helper's own words: they describe its failure (a locked keyring), never the secret.
        raise RegistryError(f"{program} failed for {domain}: {_one_line(said or f'exit {proc.returncode}')}; "
                            f"run `{_login_command(domain)}` again")
    try:
        answer = json.loads(proc.stdout)
        username, secret = str(answer.get("Username") or ""), str(answer.get("Secret") or "")
    except (ValueError, AttributeError):
        raise RegistryError(f"{program} gave an answer for {domain} that is not its JSON; "
                            "update or reconfigure the credential helper") from None
    if not secret:
        return None
    if username == "<token>":
        return Credentials("", "", secret, program)
    return Credentials(username, secret, "", program)


def _credentials_from_file(path: str, domain: str, repository: str, environ: Mapping[str, str]) -> Credentials | None:
    """Credentials for `domain` from a docker config.json or podman auth.json (same format)."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise RegistryError(f"cannot read {path}: {err.strerror}; fix its permissions or unset the variable naming it") from None
    except ValueError:
        raise RegistryError(f"{path} is not valid JSON; fix it or run `{_login_command(domain)}` again") from None
    if not isinstance(config, dict):
        return None
    hosts = _auth_key_hosts(domain)
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        for key, helper in helpers.items():
            if _auth_key_specificity(str(key), hosts, repository) is not None and isinstance(helper, str) and helper:
                return _run_credential_helper(helper, domain, path, environ, required=True)
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        found = _run_credential_helper(store, domain, path, environ, required=False)
        if found is not None:
            return found
    auths = config.get("auths")
    if not isinstance(auths, dict):
        return None
    best: tuple[int, object] | None = None
    for key, entry in auths.items():
        score = _auth_key_specificity(str(key), hosts, repository)
        if score is not None and (best is None or score > best[0]):
            best = (score, entry)
    return _decode_auth_entry(best[1], path, domain) if best else None


def find_credentials(domain: str, repository: str, environ: Mapping[str, str]) -> Credentials | None:
    """Credentials for pushing to `domain`/`repository`, in order: the environment
    (TRACEJAIL_REGISTRY_USERNAME + TRACEJAIL_REGISTRY_PASSWORD, for any registry), REGISTRY_AUTH_FILE,
    then docker's config.json. None: push anonymously."""
    username, password = environ.get(ENV_USERNAME), environ.get(ENV_PASSWORD)
    if username or password:
        if not (username and password):
            missing = ENV_PASSWORD if username else ENV_USERNAME
            raise RegistryError(f"{ENV_USERNAME} and {ENV_PASSWORD} go together; set {missing} too, or unset both",
                                exit_code=2)
        return Credentials(username, password, "", f"{ENV_USERNAME}/{ENV_PASSWORD}")
    files = []
    if environ.get("REGISTRY_AUTH_FILE"):
        files.append(environ["REGISTRY_AUTH_FILE"])
    docker_dir = environ.get("DOCKER_CONFIG") or os.path.join(_home(environ), ".docker")
    files.append(os.path.join(docker_dir, "config.json"))
    for path in files:
        found = _credentials_from_file(path, domain, repository, environ)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------------------------
# HTTP


class _Origin(NamedTuple):
    scheme: str
    host: str   # without brackets
    port: int

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass
class _Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str:
        return self.headers.get(name, "") or ""


Body = Callable[[], Iterable[bytes]]


def _split_url(url: str) -> tuple[_Origin, str]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(url)
    port = parts.port or (443 if scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Origin(scheme, parts.hostname, port), target


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy (HTTPS_PROXY / HTTP_PROXY) that requests to a registry go through."""

    host: str
    port: int
    authorization: str | None = None   # "Basic ..." from the URL's user:password

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        """What every request to the proxy carries (its credentials, when the URL has them)."""
        return {"Proxy-Authorization": self.authorization} if self.authorization else {}


def parse_proxy(url: str, variable: str) -> Proxy:
    """`http://[user:password@]host[:port]` (the scheme may be left out, as curl and Go allow)."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme.lower() != "http":
        raise RegistryError(f"{variable}={_one_line(url, 80)}: only http:// proxies are supported "
                            "(the registry's own TLS goes through them in a CONNECT tunnel)")
    try:
        port = parts.port or 80
    except ValueError:
        port = 0
    if not parts.hostname or not port:
        raise RegistryError(f"{variable}={_one_line(url, 80)} is not a proxy URL (http://host:port)")
    authorization = None
    if parts.username is not None:
        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode()
    return Proxy(parts.hostname, port, authorization)


def _no_proxy_matches(host: str, port: int, no_proxy: str) -> bool:
    """NO_PROXY as Go reads it: `*`; host names (`example.com` also matches its subdomains,
    `.example.com` only them); IP addresses and CIDRs; any of them with a `:port`."""
    host = host.lower().rstrip(".")
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        name, entry_port = _split_host(entry)
        if entry_port is not None and entry_port != port:
            continue
        try:
            if "/" in name:
                if ipaddress.ip_address(host) in ipaddress.ip_network(name, strict=False):
                    return True
                continue
            if ipaddress.ip_address(host) == ipaddress.ip_address(name):
                return True
            continue
        except ValueError:
            pass
        if name.startswith("."):
            if host.endswith(name):
                return True
        elif host == name or host.endswith("." + name):
            return True
    return False


def proxy_for(scheme: str, host: str, port: int, environ: Mapping[str, str]) -> Proxy | None:
    """The proxy a request to `scheme://host:port` goes through: HTTPS_PROXY for https, HTTP_PROXY
    for http (upper case first, then lower case), unless NO_PROXY names the host; loopback
    registries are never proxied (as docker and Go do)."""
    if _is_loopback(host):
        return None
    no_proxy = environ.get("NO_PROXY") or environ.get("no_proxy") or ""
    if _no_proxy_matches(host, port, no_proxy):
        return None
    for variable in (("HTTPS_PROXY", "https_proxy") if scheme == "https" else ("HTTP_PROXY", "http_proxy")):
        if environ.get(variable):
            return parse_proxy(environ[variable], variable)
    return None


def _with_query(url: str, **params: str) -> str:
    joiner = "&" if "?" in url else "?"
    return url + joiner + urllib.parse.urlencode(params)


def _tls_context(hostport: str, verify: bool) -> ssl.SSLContext:
    """Verified TLS with docker's per-registry CAs and client certificates, or no verification."""
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    certs_dir = os.path.join(CERTS_D, hostport)
    if os.path.isdir(certs_dir):
        for ca in sorted(glob.glob(os.path.join(certs_dir, "*.crt"))):
            try:
                ctx.load_verify_locations(cafile=ca)
            except (OSError, ssl.SSLError) as err:
                raise RegistryError(f"cannot load the CA certificate {ca} for {hostport}: "
                                    f"{getattr(err, 'strerror', None) or err}; fix or remove it") from None
        for cert in sorted(glob.glob(os.path.join(certs_dir, "*.cert"))):
            key = cert[: -len(".cert")] + ".key"
            try:
                ctx.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError):
                raise RegistryError(f"cannot load the client certificate {cert} with {key} for {hostport}; "
                                    "fix or remove them (each .cert needs its .key)") from None
    return ctx


class _HttpClient:
    """Kept-alive connections per origin; every answer is read whole (registry answers are small),
    so a connection can carry the next request. Bodies are factories, so a request can be sent
    again on a fresh connection when a kept-alive one turns out closed."""

    def __init__(self, timeout: float, insecure_registries: tuple[str, ...],
                 environ: Mapping[str, str] | None = None) -> None:
        self.timeout = timeout
        self.insecure_registries = insecure_registries
        self.environ: Mapping[str, str] = environ or {}
        self.connections: dict[_Origin, http.client.HTTPConnection] = {}
        self.contexts: dict[tuple[str, bool], ssl.SSLContext] = {}
        self.proxies: dict[_Origin, Proxy | None] = {}

    def proxy(self, origin: _Origin) -> Proxy | None:
        """The proxy requests to `origin` go through (the environment is read once per origin)."""
        if origin not in self.proxies:
            self.proxies[origin] = proxy_for(origin.scheme, origin.host, origin.port, self.environ)
        return self.proxies[origin]

    def verify(self, origin: _Origin) -> bool:
        return not is_insecure(origin.netloc, self.insecure_registries)

    def _connection(self, origin: _Origin, timeout: float | None = None) -> tuple[http.client.HTTPConnection, bool]:
        conn = self.connections.get(origin)
        if conn is not None:
            return conn, False
        proxy = self.proxy(origin)
        if origin.scheme == "https":
            verify = self.verify(origin)
            # docker's certs.d directory is named host:port, or host alone for 443
            certs_name = origin.netloc if origin.port != 443 else origin.netloc.rsplit(":", 1)[0]
            key = (certs_name, verify)
            if key not in self.contexts:
                self.contexts[key] = _tls_context(certs_name, verify)
            where = proxy or origin
            conn = http.client.HTTPSConnection(where.host, where.port, timeout=timeout or self.timeout,
                                               context=self.contexts[key])
            if proxy is not None:
                # A CONNECT tunnel through the proxy; TLS (and its name check) is the registry's.
                conn.set_tunnel(origin.host, origin.port, proxy.headers)
        else:
            where = proxy or origin
            conn = http.client.HTTPConnection(where.host, where.port, timeout=timeout or self.timeout)
        self.connections[origin] = conn
        return conn, True

    def drop(self, origin: _Origin) -> None:
        conn = self.connections.pop(origin, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for origin in list(self.connections):
            self.drop(origin)

    def send(self, origin: _Origin, method: str, target: str, headers: Mapping[str, str],
             body: Body | bytes | None = None, on_sent: Callable[[int], None] | None = None,
             timeout: float | None = None) -> _Response:
        """One request; OSError, ssl.SSLError and http.client.HTTPException go to the caller."""
        proxy = self.proxy(origin) if origin.scheme == "http" else None
        if proxy is not None:
            # Plain HTTP through a proxy: the request names the whole URL.
            target = f"http://{origin.netloc}{target}"
            headers = {**headers, **proxy.headers}
        for attempt in (1, 2):
            conn, fresh = self._connection(origin, timeout)
            try:
                conn.putrequest(method, target, skip_accept_encoding=True)
                for name, value in headers.items():
                    conn.putheader(name, value)
                conn.putheader("User-Agent", USER_AGENT)
                if isinstance(body, bytes) and "Content-Length" not in headers:
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders()
                if isinstance(body, bytes):
                    conn.send(body)
                elif body is not None:
                    for chunk in body():
                        conn.send(chunk)
                        if on_sent:
                            on_sent(len(chunk))
                raw = conn.getresponse()
                data = raw.read(_MAX_BODY)
                response = _Response(raw.status, raw.headers, data)
                if raw.will_close or not raw.isclosed():
                    self.drop(origin)   # the server closes it, or an answer too long to read whole
                return response
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.drop(origin)
                if fresh or attempt == 2:
                    raise
                # A kept-alive connection the server had closed meanwhile: once more on a new one.
            except BaseException:
                self.drop(origin)
                raise
        raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# One registry


class _Registry:
    """A registry for the whole push: its scheme, connection, challenge, credentials and tokens."""

    def __init__(self, domain: str, options: PushOptions) -> None:
        self.domain = domain                    # as written in references: for messages and credentials
        self.hostport = registry_host(domain)   # what is connected to
        self.hostname, self.port = _split_host(self.hostport)
        self.options = options
        self.environ = _environ(options)
        self.insecure = is_insecure(self.hostport, options.insecure_registries)
        self.http = _HttpClient(options.timeout, options.insecure_registries, self.environ)
        self.origin: _Origin | None = None
        self.challenge: Challenge | None = None
        self.credentials: dict[str, Credentials | None] = {}    # per repository (podman keys may differ)
        self.tokens: dict[tuple[str, ...], tuple[str, float]] = {}

    # -- connecting

    def _network_error(self, err: BaseException, doing: str, origin: _Origin | None = None) -> RegistryError:
        where = self.domain if origin is None or origin.host == self.hostname else origin.netloc
        host = origin.host if origin is not None else self.hostname
        port = origin.port if origin is not None else (self.port or 443)
        proxy = self.http.proxy(origin or _Origin("https" if not self.insecure else "http", host, port))
        if proxy is not None:
            variable = "HTTPS_PROXY" if (origin is None or origin.scheme == "https") else "HTTP_PROXY"
            if isinstance(err, OSError) and str(err).startswith("Tunnel connection failed"):
                return RegistryError(f"the proxy {proxy.netloc} refused to connect to {where} "
                                     f"({_one_line(str(err).split(':', 1)[1].strip(), 80)}) while {doing}; check "
                                     f"{variable} and its user:password, or list {host} in NO_PROXY")
            if isinstance(err, (socket.gaierror, ConnectionRefusedError)):
                why = "cannot resolve its name" if isinstance(err, socket.gaierror) else "connection refused"
                return RegistryError(f"cannot reach the proxy {proxy.netloc} ({why}) while {doing} with {where}; "
                                     f"check {variable}, or list {host} in NO_PROXY")
        if isinstance(err, socket.gaierror):
            return RegistryError(f"cannot resolve the registry host {host} ({err.strerror or err}) while {doing}; "
                                 "check the name in the image reference and your DNS")
        if isinstance(err, ssl.SSLCertVerificationError):
            reason = _one_line(err.verify_message or err.reason or str(err), 120)
            return RegistryError(f"{where}: TLS certificate verification failed ({reason}); install the registry's "
                                 f"CA as {CERTS_D}/{self.hostport}/ca.crt or in the system store, or, if you trust the "
                                 f"network, allow it with --insecure-registry {self.hostport}")
        if isinstance(err, ssl.SSLError):
            reason = _one_line(err.reason or str(err), 120)
            if "WRONG_VERSION_NUMBER" in str(err) or "record layer" in str(err).lower():
                return RegistryError(f"{where} does not speak TLS (HTTPS) on port {port} ({reason}); if it is a "
                                     f"plain-HTTP registry you trust, allow it with --insecure-registry {self.hostport}")
            return RegistryError(f"{where}: TLS failed ({reason}) while {doing}; check the registry's TLS set-up, "
                                 f"or allow it with --insecure-registry {self.hostport}")
        if isinstance(err, ConnectionRefusedError):
            return RegistryError(f"cannot connect to {where} on port {port}: connection refused; is the registry "
                                 "running and listening there?")
        if isinstance(err, (TimeoutError, socket.timeout)):
            return RegistryError(f"{where} did not answer within {self.options.timeout:g} s while {doing}; "
                                 "check the network and the registry, or try again")
        if isinstance(err, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
            return RegistryError(f"{where} closed the connection while {doing}; try again, and check the "
                                 "registry's logs if it keeps happening (an upload size limit in a proxy?)")
        if isinstance(err, http.client.HTTPException):
            return RegistryError(f"{where} sent an answer that is not HTTP while {doing} "
                                 f"({type(err).__name__}); check that {self.hostport} is a registry")
        if isinstance(err, OSError):
            return RegistryError(f"cannot reach {where} on port {port} while {doing}: "
                                 f"{err.strerror or type(err).__name__}")
        return RegistryError(f"{where}: {type(err).__name__} while {doing}")

    def connect(self) -> None:
        """`GET /v2/`: decide the scheme and learn the challenge. Insecure registries get HTTPS
        without verification first and plain HTTP when that server does not speak TLS."""
        if self.origin is not None:
            return
        doing = "checking the registry API (GET /v2/)"
        headers = {"Accept": "application/json"}
        https = _Origin("https", self.hostname, self.port or 443)
        try:
            if not self.insecure:
                response = self.http.send(https, "GET", "/v2/", headers)
                self.origin = https
            else:
                try:
                    # A short timeout for the TLS attempt only: a plain-HTTP server answers a
                    # ClientHello with an error at once; the connection is not kept.
                    response = self.http.send(https, "GET", "/v2/", headers,
                                              timeout=min(self.options.timeout, _PROBE_TIMEOUT))
                    self.http.drop(https)
                    self.origin = https
                except (ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected, http.client.BadStatusLine,
                        TimeoutError, socket.timeout, ConnectionRefusedError) as tls_err:
                    self.http.drop(https)
                    if isinstance(tls_err, ConnectionRefusedError) and self.port is not None:
                        raise   # the same port refuses plain HTTP too
                    plain = _Origin("http", self.hostname, self.port or 80)
                    response = self.http.send(plain, "GET", "/v2/", headers)
                    self.origin = plain
        except (OSError, http.client.HTTPException) as err:
            raise self._network_error(err, doing) from None
        if response.status == 401:
            self.challenge = _pick_challenge(parse_www_authenticate(response.header("WWW-Authenticate")))
        elif response.status == 404:
            raise RegistryError(f"{self.domain} does not serve the registry API (GET /v2/ answered 404); "
                                "check the host name and port in the image reference")
        elif response.status >= 400 and response.status != 403:
            raise self._status_error(response, doing, None)

    # -- authentication

    def _credentials(self, repository: str) -> Credentials | None:
        if repository not in self.credentials:
            self.credentials[repository] = find_credentials(self.domain, repository, self.environ)
        return self.credentials[repository]

    def _auth_error(self, repository: str, response: _Response | None, denied: bool = False) -> RegistryError:
        creds = self._credentials(repository)
        login = _login_command(self.domain)
        detail = _registry_error_detail(response.body) if response is not None else ""
        detail = f" ({detail})" if detail else ""
        if creds is None:
            return RegistryError(f"{self.domain}: authentication required to push to {repository}{detail}; run "
                                 f"`{login}` or set {ENV_USERNAME} and {ENV_PASSWORD}")
        if denied:
            return RegistryError(f"{self.domain}: the account from {creds.source} may not push to {repository}"
                                 f"{detail}; check the repository name and the account's permissions")
        return RegistryError(f"{self.domain}: the registry refused the credentials from {creds.source}{detail}; "
                             f"run `{login}` again or set {ENV_USERNAME} and {ENV_PASSWORD}")

    def _authorization(self, repository: str, scopes: tuple[str, ...]) -> str | None:
        if self.challenge is None:
            return None
        creds = self._credentials(repository)
        if self.challenge.scheme == "basic":
            if creds is None:
                return None
            if creds.identity_token:
                user, password = "<token>", creds.identity_token
            else:
                user, password = creds.username, creds.password
            return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        cached = self.tokens.get(scopes)
        if cached is None or cached[1] - _TOKEN_MARGIN < time.monotonic():
            cached = self._fetch_token(repository, scopes, creds)
            self.tokens[scopes] = cached
        return "Bearer " + cached[0]

    def _fetch_token(self, repository: str, scopes: tuple[str, ...], creds: Credentials | None) -> tuple[str, float]:
        """A bearer token for `scopes` from the challenge's realm."""
        assert self.challenge is not None
        realm = self.challenge.params.get("realm", "")
        doing = "getting a token"
        try:
            origin, target = _split_url(realm)
        except ValueError:
            raise RegistryError(f"{self.domain} names a token service that is not an http(s) URL "
                                f"({_one_line(realm, 80)!r}); the registry is misconfigured") from None
        if creds is not None and origin.scheme == "http" and not is_insecure(origin.netloc, self.options.insecure_registries):
            raise RegistryError(f"{self.domain} sends logins to a token service over plain HTTP ({origin.netloc}); "
                                f"refusing to send credentials there (allow it with --insecure-registry {origin.host})")
        service = self.challenge.params.get("service")
        query: list[tuple[str, str]] = [("service", service)] if service else []
        query += [("scope", s) for s in scopes]
        headers = {"Accept": "application/json"}
        response: _Response | None = None
        try:
            if creds is not None and creds.identity_token:
                # docker's OAuth2 exchange of an identity (refresh) token for an access token
                form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                        "client_id": "tracejail", "scope": " ".join(scopes)}
                if service:
                    form["service"] = service
                response = self.http.send(origin, "POST", target, {
                    **headers, "Content-Type": "application/x-www-form-urlencoded"},
                    urllib.parse.urlencode(form).encode())
                if response.status in (404, 405):
                    response = None   # no OAuth2 endpoint: the identity token as basic credentials
            if response is None:
                if creds is not None:
                    user = "<token>" if creds.identity_token else creds.username
                    password = creds.identity_token or creds.password
                    headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
                    if not creds.identity_token:
                        query.append(("account", creds.username))
                separator = "&" if "?" in target else "?"
                response = self.http.send(origin, "GET", target + (separator + urllib.parse.urlencode(query) if query else ""),
                                          headers)
        except (OSError, http.client.HTTPException) as err:
            raise self._network_error(err, doing, origin) from None
        if response.status == 401:
            raise self._auth_error(repository, None)
        if response.status == 403:
            raise self._auth_error(repository, None, denied=True)
        if response.status != 200:
            raise RegistryError(f"{self.domain}: the token service {origin.netloc} answered HTTP {response.status} "
                                f"while {doing}; try again later")
        try:
            answer = json.loads(response.body)
            token = answer.get("token") or answer.get("access_token")
            lifetime = float(answer.get("expires_in") or 60)   # the spec's default: 60 s
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{self.domain}: the token service {origin.netloc} answered without a token; "
                                "the registry is misconfigured")
        return token, time.monotonic() + max(lifetime, 2 * _TOKEN_MARGIN)

    # -- requests

    def url(self, path: str) -> str:
        assert self.origin is not None
        return f"{self.origin.scheme}://{self.origin.netloc}{path}"

    def resolve(self, location: str, base: str) -> str:
        """A Location header (relative or absolute) as an absolute URL. An absolute one naming this
        registry's host and port keeps the scheme in use: a registry behind a TLS proxy may write
        http:// there."""
        absolute = urllib.parse.urljoin(base, location)
        try:
            origin, target = _split_url(absolute)
        except ValueError:
            raise RegistryError(f"{self.domain} answered with an unusable Location ({_one_line(location, 80)!r})") from None
        assert self.origin is not None
        if origin.host.lower() == self.origin.host.lower() and origin.port == self.origin.port:
            return self.url(target)
        return absolute

    def request(self, method: str, url: str, *, repository: str, scopes: tuple[str, ...], doing: str,
                headers: Mapping[str, str] | None = None, body: Body | bytes | None = None,
                on_sent: Callable[[int], None] | None = None) -> _Response:
        """A request to the registry, authenticated for `scopes`; a 401 is answered once (a new
        challenge, an expired token), a second one is an error. Redirects of HEAD and GET are followed."""
        assert self.origin is not None
        for attempt in (1, 2):
            origin, target = _split_url(url)
            all_headers = dict(headers or {})
            # Credentials and tokens only ever go to the registry's own origin.
            authorization = self._authorization(repository, scopes) if origin == self.origin else None
            if authorization:
                all_headers["Authorization"] = authorization
            try:
                response = self.http.send(origin, method, target, all_headers, body, on_sent)
                hops, current = 0, url
                while method in ("GET", "HEAD") and response.status in (301, 302, 303, 307, 308) and hops < 5:
                    # e.g. blob storage behind the registry: no credentials go there
                    hops, current = hops + 1, urllib.parse.urljoin(current, response.header("Location"))
                    origin, target = _split_url(current)
                    response = self.http.send(origin, method, target, dict(headers or {}))
            except (OSError, http.client.HTTPException) as err:
                raise self._network_error(err, doing, origin) from None
            except ValueError:
                raise RegistryError(f"{self.domain} redirected to an unusable address while {doing}") from None
            if response.status != 401:
                return response
            challenge = _pick_challenge(parse_www_authenticate(response.header("WWW-Authenticate")))
            creds = self._credentials(repository)
            if challenge is not None:
                self.challenge = challenge
                self.tokens.pop(scopes, None)
            # Once more with what the 401 asked for: a first challenge (the registry let GET /v2/
            # through anonymously), or a new token (expired, or scoped too narrowly). Basic
            # credentials already sent, or none to send, will not do better.
            sent_basic = authorization is not None and authorization.startswith("Basic ")
            if attempt == 2 or challenge is None or (challenge.scheme == "basic" and (sent_basic or creds is None)):
                insufficient = challenge is not None and challenge.params.get("error") == "insufficient_scope"
                raise self._auth_error(repository, response, denied=insufficient and creds is not None)
        raise AssertionError("unreachable")

    def _status_error(self, response: _Response, doing: str, repository: str | None) -> RegistryError:
        status = response.status
        detail = _registry_error_detail(response.body)
        what = f"{repository}: " if repository else ""
        with_detail = f" ({detail})" if detail else ""
        if status == 401 and repository:
            return self._auth_error(repository, response)
        if status == 403:
            return RegistryError(f"{self.domain}: {what}denied (HTTP 403{', ' + detail if detail else ''}) while "
                                 f"{doing}; check that your account may push to this repository")
        if status == 404:
            return RegistryError(f"{self.domain}: {what}not found (HTTP 404{', ' + detail if detail else ''}) while "
                                 f"{doing}; check the repository name (some registries need it created first)")
        if status == 413:
            return RegistryError(f"{self.domain}: {what}the registry (or a proxy before it) refused an upload as too "
                                 "large (HTTP 413); try a smaller chunk size or raise the limit")
        if 400 <= status < 500:
            return RegistryError(f"{self.domain}: {what}HTTP {status}{with_detail} while {doing}")
        if status >= 500:
            return RegistryError(f"{self.domain}: {what}the registry failed with HTTP {status}{with_detail} while "
                                 f"{doing}; try again later, or check the registry's logs")
        return RegistryError(f"{self.domain}: {what}unexpected answer HTTP {status}{with_detail} while {doing}")

    def close(self) -> None:
        self.http.close()


def _registry_error_detail(body: bytes) -> str:
    """`CODE: message` of the first error in a registry's JSON error body, or ""."""
    try:
        errors = json.loads(body).get("errors")
        first = errors[0]
        code, message = str(first.get("code") or ""), str(first.get("message") or "")
    except (ValueError, AttributeError, IndexError, TypeError, KeyError):
        return ""
    return _one_line(": ".join(p for p in (code, message) if p), 160)


# --------------------------------------------------------------------------------------------
# Which repositories of a registry hold which blobs, between pushes


class BlobRecord:
    """A small record of (registry, digest, repository): where a mount can come from next time.

    Only names and digests, never credentials. Bounded (the LIMIT most recent rows), in a
    directory of the user's own, replaced atomically; anything wrong with it means no record:
    it only saves uploads, and a wrong row costs one refused mount."""

    LIMIT = 4000
    MAX_BYTES = 2 << 20

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.directory = cachedir.cache_root(environ)
        self.path = os.path.join(self.directory, BLOB_RECORD_FILE) if self.directory else None
        self.rows: dict[tuple[str, str, str], float] = {}
        self.dirty = False
        if self.path and self._safe_dir(create=False):
            self._load()

    def _safe_dir(self, create: bool) -> bool:
        assert self.directory is not None
        return cachedir.safe_dir(self.directory, create)

    def _load(self) -> None:
        assert self.path is not None
        raw = cachedir.read_private(self.path, self.MAX_BYTES)
        if raw is None:
            return
        try:
            for host, digest, repository, seen in json.loads(raw).get("blobs", []):
                if isinstance(host, str) and isinstance(repository, str) and _DIGEST.match(str(digest)):
                    self.rows[(host, digest, repository)] = float(seen)
        except (ValueError, AttributeError, TypeError):
            self.rows = {}

    def repositories(self, registry: str, digest: str) -> list[str]:
        """Repositories of `registry` recorded with `digest`, most recently seen first."""
        found = [(seen, repo) for (host, dig, repo), seen in self.rows.items() if host == registry and dig == digest]
        return [repo for _, repo in sorted(found, reverse=True)]

    def add(self, registry: str, digest: str, repository: str) -> None:
        self.rows[(registry, digest, repository)] = time.time()
        self.dirty = True

    def save(self) -> None:
        if not (self.dirty and self.path and self._safe_dir(create=True)):
            return
        newest = sorted(self.rows.items(), key=lambda item: item[1])[-self.LIMIT:]
        data = json.dumps({"version": 1, "blobs": [[h, d, r, round(t, 3)] for (h, d, r), t in newest]},
                          separators=(",", ":")).encode()
        if cachedir.write_private(self.path, data):
            self.dirty = False


# --------------------------------------------------------------------------------------------
# Pushing


@dataclass
class _PushState:
    """What this push learnt: which repositories of each registry hold which blobs."""

    present: dict[tuple[str, str], set[str]] = field(default_factory=dict)   # (host, repo) -> digests
    record: BlobRecord | None = None

    def holds(self, host: str, repository: str, digest: str) -> None:
        self.present.setdefault((host, repository), set()).add(digest)
        if self.record is not None:
            self.record.add(host, digest, repository)

    def mount_sources(self, host: str, repository: str, digest: str) -> list[str]:
        sources = [repo for (h, repo), digests in self.present.items()
                   if h == host and repo != repository and digest in digests]
        if self.record is not None:
            sources += self.record.repositories(host, digest)
        unique = [repo for i, repo in enumerate(sources) if repo != repository and repo not in sources[:i]]
        return unique[:_MAX_MOUNT_TRIES]


class _Pusher:
    def __init__(self, registry: _Registry, repository: str, options: PushOptions, state: _PushState) -> None:
        self.registry = registry
        self.repository = repository
        self.options = options
        self.state = state
        self.scopes = (f"repository:{repository}:pull,push",)

    def call(self, method: str, url: str, doing: str, *, scopes: tuple[str, ...] | None = None,
             headers: Mapping[str, str] | None = None, body: Body | bytes | None = None,
             on_sent: Callable[[int], None] | None = None) -> _Response:
        return self.registry.request(method, url, repository=self.repository, scopes=scopes or self.scopes,
                                     doing=doing, headers=headers, body=body, on_sent=on_sent)

    def fail(self, response: _Response, doing: str) -> RegistryError:
        return self.registry._status_error(response, doing, self.repository)

    def blob_url(self, digest: str) -> str:
        return self.registry.url(f"/v2/{self.repository}/blobs/{digest}")

    def push_blob(self, blob: image.Blob, result: PushResult) -> None:
        host = self.registry.hostport
        if blob.digest in self.state.present.get((host, self.repository), set()):
            result.skipped.append(blob.digest)
            return
        short = blob.digest[:19]
        doing = f"checking for blob {short}"
        head = self.call("HEAD", self.blob_url(blob.digest), doing)
        if head.status == 200:
            result.skipped.append(blob.digest)
            self.state.holds(host, self.repository, blob.digest)
            return
        if head.status != 404:
            raise self.fail(head, doing)
        location = None
        for source in self.state.mount_sources(host, self.repository, blob.digest):
            location = self.try_mount(blob, source)
            if location == "mounted":
                result.mounted.append(blob.digest)
                self.state.holds(host, self.repository, blob.digest)
                return
            if location:
                break   # the registry opened an ordinary upload session instead: use it
        if not location:
            doing = f"starting the upload of blob {short}"
            uploads = self.registry.url(f"/v2/{self.repository}/blobs/uploads/")
            started = self.call("POST", uploads, doing, body=b"")
            if started.status != 202 or not started.header("Location"):
                raise self.fail(started, doing)
            location = self.registry.resolve(started.header("Location"), uploads)
        self.upload(blob, location)
        result.uploaded.append(blob.digest)
        result.bytes_uploaded += blob.size
        self.state.holds(host, self.repository, blob.digest)

    def try_mount(self, blob: image.Blob, source: str) -> str | None:
        """"mounted", an upload session's URL (202), or None when the mount cannot be done."""
        url = self.registry.url(f"/v2/{self.repository}/blobs/uploads/?"
                                + urllib.parse.urlencode({"mount": blob.digest, "from": source}))
        try:
            response = self.call("POST", url, f"mounting blob {blob.digest[:19]} from {source}",
                                 scopes=(*self.scopes, f"repository:{source}:pull"), body=b"")
        except RegistryError:
            return None   # no token for the source, or a refused mount: upload instead
        if response.status == 201:
            return "mounted"
        if response.status == 202 and response.header("Location"):
            return self.registry.resolve(response.header("Location"), url)
        return None

    def upload(self, blob: image.Blob, location: str) -> None:
        short = blob.digest[:19]
        label = f"{blob.digest[:19]} -> {self.registry.domain}/{self.repository}"
        progress = self.options.progress

        def sent(n: int) -> None:
            if progress:
                progress(label, n, blob.size)

        chunk = self.options.chunk_size
        if chunk:
            offset = 0
            while offset < blob.size:
                length = min(chunk, blob.size - offset)
                doing = f"uploading blob {short} (bytes {offset}-{offset + length - 1})"
                response = self.call("PATCH", location, doing, headers={
                    "Content-Type": OCTET_STREAM, "Content-Range": f"{offset}-{offset + length - 1}",
                    "Content-Length": str(length)},
                    body=functools.partial(blob.chunks, offset, length), on_sent=sent)
                if response.status != 202 or not response.header("Location"):
                    raise self.fail(response, doing)
                location = self.registry.resolve(response.header("Location"), location)
                offset += length
            doing = f"completing the upload of blob {short}"
            response = self.call("PUT", _with_query(location, digest=blob.digest), doing,
                                 headers={"Content-Type": OCTET_STREAM, "Content-Length": "0"}, body=b"")
        else:
            doing = f"uploading blob {short}"
            response = self.call("PUT", _with_query(location, digest=blob.digest), doing, headers={
                "Content-Type": OCTET_STREAM, "Content-Length": str(blob.size)},
                body=blob.chunks, on_sent=sent)
        if response.status not in (201, 204):
            raise self.fail(response, doing)
        answered = response.header("Docker-Content-Digest")
        if answered and answered != blob.digest:
            raise RegistryError(f"{self.registry.domain}: {self.repository}: the registry stored blob {short} as "
                                f"{answered[:19]}; the upload was corrupted, push again")

    def push_manifest(self, img: image.Image, tag: str) -> None:
        doing = f"putting the manifest for tag {tag}"
        assert img.manifest.data is not None
        url = self.registry.url(f"/v2/{self.repository}/manifests/{tag}")
        response = self.call("PUT", url, doing, headers={"Content-Type": img.manifest.media_type},
                             body=img.manifest.data)
        if response.status not in (200, 201, 202):
            raise self.fail(response, doing)
        answered = response.header("Docker-Content-Digest")
        if answered and answered != img.manifest.digest:
            raise RegistryError(f"{self.registry.domain}: {self.repository}:{tag}: the registry stored the manifest as "
                                f"{answered[:19]}, not {img.manifest.digest[:19]}; it may have converted it, check "
                                "what it serves before using the tag")


def push(img: image.Image, refs: list[image.Reference] | image.Reference,
         options: PushOptions = PushOptions()) -> list[PushResult]:
    """Push `img` to every reference (tags of one or several repositories and registries); one
    PushResult per reference, in order. Raises RegistryError (one line) on the first failure."""
    references = [refs] if isinstance(refs, image.Reference) else list(refs)
    if not references:
        raise RegistryError("no image reference to push to; give at least one REGISTRY/REPOSITORY:TAG", exit_code=2)
    if img.manifest.data is None or img.config.data is None:
        raise RegistryError("the image has no manifest or config bytes to push")
    if options.chunk_size is not None and options.chunk_size <= 0:
        raise RegistryError(f"chunk size {options.chunk_size} must be a positive number of bytes", exit_code=2)
    state = _PushState(record=BlobRecord(_environ(options)))
    registries: dict[str, _Registry] = {}
    results: list[PushResult] = []
    try:
        for ref in references:
            registry = registries.get(ref.domain)
            if registry is None:
                registry = registries[ref.domain] = _Registry(ref.domain, options)
            registry.connect()
            pusher = _Pusher(registry, ref.path, options, state)
            result = PushResult(reference=ref.full, manifest_digest=img.manifest.digest)
            for blob in img.blobs():
                pusher.push_blob(blob, result)
            pusher.push_manifest(img, ref.tag)
            results.append(result)
    finally:
        for registry in registries.values():
            registry.close()
        if state.record is not None:
            state.record.save()
    return results


# --------------------------------------------------------------------------------------------
# Reading an image back: an OCI layout directory, or a tar holding one


class _LayoutFiles:
    """The files of an OCI layout, in a directory or as members of an uncompressed tar."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.is_dir = os.path.isdir(path)
        self.members: dict[str, tarfile.TarInfo] = {}
        if self.is_dir:
            return
        try:
            with open(path, "rb") as f:
                magic = f.read(6)
        except FileNotFoundError:
            raise LayoutError(f"{path} does not exist; give an image archive or OCI layout directory") from None
        except OSError as err:
            raise LayoutError(f"cannot read {path}: {err.strerror}") from None
        if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic[:6] == b"\xfd7zXZ\x00" or magic[:4] == b"\x28\xb5\x2f\xfd":
            raise LayoutError(f"{path} is a compressed file; decompress it first (the blobs are read in place "
                              "from an uncompressed tar)")
        try:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    name = member.name[2:] if member.name.startswith("./") else member.name
                    self.members[name] = member
        except (tarfile.TarError, OSError) as err:
            raise LayoutError(f"{path} is neither an OCI layout directory nor a readable tar archive "
                              f"({_one_line(str(err), 80)})") from None

    def has(self, name: str) -> bool:
        if self.is_dir:
            return os.path.isfile(os.path.join(self.path, name))
        return name in self.members

    def locate(self, name: str) -> tuple[str, int, int]:
        """(file, offset, size) of a regular file of the layout."""
        if self.is_dir:
            full = os.path.join(self.path, name)
            try:
                st = os.stat(full)
            except OSError:
                raise LayoutError(f"{self.path} lacks {name}; the layout is incomplete") from None
            if not stat.S_ISREG(st.st_mode):
                raise LayoutError(f"{full} is not a regular file; the layout is corrupt")
            return full, 0, st.st_size
        member = self.members.get(name)
        if member is None:
            raise LayoutError(f"{self.path} lacks {name}; the archive is incomplete")
        if not member.isreg():
            raise LayoutError(f"{name} in {self.path} is not a regular file; blobs must be stored as files")
        return self.path, member.offset_data, member.size

    def read(self, name: str, limit: int = 16 << 20) -> bytes:
        where, offset, size = self.locate(name)
        if size > limit:
            raise LayoutError(f"{name} in {self.path} is {size} bytes, too large for a JSON document")
        with open(where, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise LayoutError(f"{name} in {self.path} is truncated")
        return data


def _blob_name(digest: object, where: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise LayoutError(f"{where} refers to a blob {str(digest)[:80]!r} that is not a sha256 digest; "
                          "only sha256 layouts are read")
    return "blobs/sha256/" + digest.split(":", 1)[1]


def _json_of(files: _LayoutFiles, name: str, what: str) -> dict[str, object]:
    try:
        value = json.loads(files.read(name))
    except ValueError:
        raise LayoutError(f"{what} ({name}) in {files.path} is not valid JSON; the image is corrupt") from None
    if not isinstance(value, dict):
        raise LayoutError(f"{what} ({name}) in {files.path} is not a JSON object; the image is corrupt")
    return value


def _json_object(data: bytes) -> dict[str, object] | None:
    """`data` as a JSON object; None when it is not valid JSON or not an object."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _verified_blob(files: _LayoutFiles, desc: dict[str, object], what: str) -> bytes:
    """A small blob (manifest, config, index): read and checked against its digest and size."""
    name = _blob_name(desc.get("digest"), f"the {what} descriptor in {files.path}")
    data = files.read(name)
    if "sha256:" + hashlib.sha256(data).hexdigest() != desc["digest"] or (
            isinstance(desc.get("size"), int) and desc["size"] != len(data)):
        raise LayoutError(f"the {what} {str(desc['digest'])[:19]} in {files.path} does not match its digest or size; "
                          "the image is corrupt")
    return data


def _manifest_candidates(files: _LayoutFiles, index: dict[str, object], depth: int = 0) -> list[dict[str, object]]:
    """Manifest descriptors of an index, nested indexes opened (as docker 25's save writes them)."""
    found: list[dict[str, object]] = []
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise LayoutError(f"index.json in {files.path} has no manifests list; the image is corrupt")
    for desc in manifests:
        if not isinstance(desc, dict):
            continue
        media_type = desc.get("mediaType")
        if media_type in INDEX_TYPES and depth < 3:
            nested = _json_object(_verified_blob(files, desc, "image index"))
            if nested is None:
                raise LayoutError(f"the image index {str(desc.get('digest'))[:19]} in {files.path} is not a JSON "
                                  "object; the image is corrupt")
            for inner in _manifest_candidates(files, nested, depth + 1):
                # the outer descriptor names the image; the inner one says the platform
                notes = {**(desc.get("annotations") or {}), **(inner.get("annotations") or {})}  # type: ignore[dict-item]
                found.append({**inner, "annotations": notes})
        elif media_type in MANIFEST_TYPES or media_type is None:
            found.append(desc)
    return found


def _platform_of(desc: dict[str, object]) -> tuple[str, str] | None:
    platform = desc.get("platform")
    if isinstance(platform, dict):
        return str(platform.get("os", "")), str(platform.get("architecture", ""))
    return None


def read_image(path: str) -> tuple[image.Image, list[str]]:
    """An image stored in `path`: an OCI layout (directory or tar, read_layout), or a
    docker-archive as docker before 25 and `skopeo copy ... docker-archive:` write it (a
    manifest.json naming a config file and layer tars)."""
    files = _LayoutFiles(path)   # a tar's member list is read once, for either kind
    if files.has("index.json") or not files.has("manifest.json"):
        return _read_layout(files)
    return _read_docker_archive(files)


def _read_docker_archive(files: _LayoutFiles) -> tuple[image.Image, list[str]]:
    path = files.path
    try:
        entries = json.loads(files.read("manifest.json"))
    except ValueError:
        raise LayoutError(f"manifest.json in {path} is not valid JSON; the archive is corrupt") from None
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        raise LayoutError(f"manifest.json in {path} names no image; the archive is corrupt")
    if len(entries) > 1:
        raise LayoutError(f"{path} holds {len(entries)} images; save the one you mean on its own")
    entry = entries[0]
    config_name, layer_names = entry.get("Config"), entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list) or \
            not all(isinstance(n, str) for n in layer_names):
        raise LayoutError(f"manifest.json in {path} lacks Config or Layers; the archive is corrupt")
    config_bytes = files.read(config_name)
    config = _json_object(config_bytes)
    rootfs_section = config.get("rootfs") if config is not None else None
    diff_ids = rootfs_section.get("diff_ids") if isinstance(rootfs_section, dict) else None
    if config is None or not isinstance(diff_ids, list) or len(diff_ids) != len(layer_names):
        raise LayoutError(f"the config {config_name} in {path} does not list one diff_id per layer; "
                          "the archive is corrupt")
    layers = []
    for number, (name, diff_id) in enumerate(zip(layer_names, diff_ids), 1):
        where, offset, size = files.locate(name)
        # A docker-archive stores layers as plain tars: the blob is the diff itself.
        blob = image.Blob(image.LAYER_MEDIA_TYPE_TAR, str(diff_id), size, path=where, offset=offset)
        layers.append(image.Layer(blob, str(diff_id), size, name=f"layer {number}"))
    config_blob = image.Blob.of(image.CONFIG_MEDIA_TYPE, config_bytes)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": image.MANIFEST_MEDIA_TYPE,
                           "config": config_blob.descriptor(),
                           "layers": [layer.blob.descriptor() for layer in layers]}).encode()
    img = image.Image(tuple(layers), config_blob, image.Blob.of(image.MANIFEST_MEDIA_TYPE, manifest),
                      str(config.get("architecture", "")), str(config.get("os", "")))
    tags = [t for t in entry.get("RepoTags") or [] if isinstance(t, str)]
    return img, tags


def read_layout(path: str) -> tuple[image.Image, list[str]]:
    """Open an image written as an OCI layout directory or a tar holding one (as `tracejail build`
    writes it, or `skopeo copy ... oci-archive:`) without extracting anything: layer blobs are
    referenced in place. Returns the image and the names in the index's annotations
    (io.containerd.image.name, else org.opencontainers.image.ref.name).

    The manifest and config are checked against their digests; every layer's stored size must
    be its descriptor's (its digest is checked by the registry as it is pushed)."""
    return _read_layout(_LayoutFiles(path))


def _read_layout(files: _LayoutFiles) -> tuple[image.Image, list[str]]:
    path = files.path
    if not files.has("index.json"):
        kind = "directory" if files.is_dir else "archive"
        hint = " (a `docker save` archive from docker < 25 has none: save it with skopeo as oci-archive:)" \
            if files.has("manifest.json") else ""
        raise LayoutError(f"{path}: this {kind} holds no index.json, so it is not an OCI image layout{hint}")
    index = _json_of(files, "index.json", "the image index")
    candidates = _manifest_candidates(files, index)
    by_digest: dict[str, list[dict[str, object]]] = {}
    for desc in candidates:
        by_digest.setdefault(str(desc.get("digest")), []).append(desc)
    if not by_digest:
        raise LayoutError(f"{path}: index.json names no image manifest")
    if len(by_digest) == 1:
        chosen = next(iter(by_digest))
    else:
        amd64 = [d for d, descs in by_digest.items() if any(_platform_of(x) == ("linux", "amd64") for x in descs)]
        if len(amd64) != 1:
            raise LayoutError(f"{path} holds {len(by_digest)} images and not exactly one for linux/amd64; "
                              "copy the one to push into a layout of its own (skopeo copy)")
        chosen = amd64[0]
    descriptor = by_digest[chosen][0]
    names: list[str] = []
    for desc in by_digest[chosen]:
        notes = desc.get("annotations")
        if isinstance(notes, dict):
            name = notes.get("io.containerd.image.name") or notes.get("org.opencontainers.image.ref.name")
            if isinstance(name, str) and name and name not in names:
                names.append(name)

    manifest_bytes = _verified_blob(files, descriptor, "manifest")
    manifest = _json_object(manifest_bytes)
    config_desc = manifest.get("config") if manifest is not None else None
    layer_descs = manifest.get("layers") if manifest is not None else None
    if manifest is None or not isinstance(config_desc, dict) or not isinstance(layer_descs, list):
        raise LayoutError(f"the manifest {chosen[:19]} in {path} is not an image manifest; the image is corrupt")
    manifest_type = str(manifest.get("mediaType") or descriptor.get("mediaType") or image.MANIFEST_MEDIA_TYPE)
    config_bytes = _verified_blob(files, config_desc, "config")
    config = _json_object(config_bytes)
    rootfs_section = config.get("rootfs") if config is not None else None
    diff_ids = rootfs_section.get("diff_ids") if isinstance(rootfs_section, dict) else None
    if config is None or not isinstance(diff_ids, list):
        raise LayoutError(f"the config {str(config_desc['digest'])[:19]} in {path} has no rootfs.diff_ids; "
                          "the image is corrupt")
    if len(diff_ids) != len(layer_descs):
        raise LayoutError(f"the image in {path} has {len(layer_descs)} layers but its config lists {len(diff_ids)} "
                          "diff_ids; the image is corrupt")
    layers = []
    for number, (desc, diff_id) in enumerate(zip(layer_descs, diff_ids), 1):
        if not isinstance(desc, dict):
            raise LayoutError(f"layer {number} of the manifest in {path} is not a descriptor; the image is corrupt")
        name = _blob_name(desc.get("digest"), f"layer {number} of the manifest in {path}")
        where, offset, size = files.locate(name)
        if size != desc.get("size"):
            raise LayoutError(f"layer {number} ({str(desc['digest'])[:19]}) in {path} is {size} bytes, its descriptor "
                              f"says {desc.get('size')}; the image is corrupt")
        blob = image.Blob(str(desc.get("mediaType") or image.LAYER_MEDIA_TYPE_GZIP), str(desc["digest"]), size,
                          path=where, offset=offset)
        # The uncompressed size is not known without reading the layer; pushing does not need it.
        layers.append(image.Layer(blob, str(diff_id), None, name=f"layer {number}"))
    config_blob = image.Blob(str(config_desc.get("mediaType") or image.CONFIG_MEDIA_TYPE), str(config_desc["digest"]),
                             len(config_bytes), data=config_bytes)
    manifest_blob = image.Blob(manifest_type, chosen, len(manifest_bytes), data=manifest_bytes)
    img = image.Image(tuple(layers), config_blob, manifest_blob, str(config.get("architecture", "")),
                      str(config.get("os", "")))
    return img, names
