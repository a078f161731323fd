"""flask-venv: a Flask app served from a virtualenv.

    .venv/bin/python app.py [--port N]    (default 8001, binds 0.0.0.0)

Endpoints:
    /               HTML page rendered from templates/index.html (Jinja2)
    /api/books      JSON list of books
    /api/books/<n>  one book, 404 when out of range

The template is located and compiled on the first request to /, so a trace
that never requests / does not see templates/index.html. Logs go to stderr
(werkzeug's logger); SIGTERM stops the server with exit 0.
"""

import argparse
import logging
import signal
import sys

from flask import Flask, abort, jsonify, render_template
from werkzeug.serving import run_simple

app = Flask(__name__)

BOOKS = [
    {"title": "The C Programming Language", "year": 1978, "tags": ["c", "classic"]},
    {"title": "Structure and Interpretation of Computer Programs", "year": 1985, "tags": ["lisp"]},
    {"title": "The Linux Programming Interface", "year": 2010, "tags": []},
]


@app.route("/")
def index():
    return render_template("index.html", title="Bookshelf", books=BOOKS, escaped="<b>escaped</b> & safe")


@app.route("/api/books")
def books():
    return jsonify({"count": len(BOOKS), "books": BOOKS})


@app.route("/api/books/<int:number>")
def book(number: int):
    if not 0 <= number < len(BOOKS):
        abort(404)
    return jsonify(BOOKS[number])


def main() -> int:
    parser = argparse.ArgumentParser(description="flask-venv sample workload")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args()

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="flask-venv: %(message)s")

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        run_simple(args.host, args.port, app, threaded=True, use_reloader=False, use_debugger=False)
    except KeyboardInterrupt:
        pass
    sys.stderr.write("flask-venv: stopped\n")
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
