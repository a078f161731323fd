#!/usr/bin/env python3
"""python-web: a tiny stdlib-only HTTP/JSON service.

    python3 server.py [--port N]      (default 8000, binds 0.0.0.0)

Endpoints:
    /               JSON greeting
    /hash?text=...  sha256 of the text (through OpenSSL's libcrypto)
    /items          the contents of data/items.json, read at request time
    /healthz        "ok"

Logs go to stderr only; stdout stays silent. SIGTERM stops it with exit 0.
"""

import argparse
import hashlib
import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

# Resolved against the script's folder, not the working directory, and only
# opened when /items is requested: a trace of a run that never asks for
# /items does not see this file.
DATA_FILE = Path(__file__).resolve().parent / "data" / "items.json"


def log(message: str) -> None:
    sys.stderr.write(f"python-web: {message}\n")
    sys.stderr.flush()


class Handler(BaseHTTPRequestHandler):
    server_version = "python-web/1.0"

    def _send_json(self, status: int, payload: object) -> None:
        body = json.dumps(payload, sort_keys=True).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        url = urlsplit(self.path)
        if url.path == "/":
            self._send_json(200, {"message": "hello from python-web", "endpoints": ["/", "/hash", "/items"]})
        elif url.path == "/hash":
            text = parse_qs(url.query).get("text", [""])[0]
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            self._send_json(200, {"algorithm": "sha256", "text": text, "hexdigest": digest})
        elif url.path == "/items":
            with DATA_FILE.open(encoding="utf-8") as fh:
                items = json.load(fh)
            total = sum(item["price_cents"] * item["qty"] for item in items)
            self._send_json(200, {"count": len(items), "items": items, "total_cents": total})
        elif url.path == "/healthz":
            self._send_json(200, "ok")
        else:
            self._send_json(404, {"error": "not found", "path": url.path})

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log(f"{self.address_string()} {format % args}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args()

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    httpd = ThreadingHTTPServer((args.host, args.port), Handler)
    httpd.daemon_threads = True
    log(f"listening on {args.host}:{args.port}")
    try:
        httpd.serve_forever()
    except (SystemExit, KeyboardInterrupt):
        log("stopping")
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
