#!/bin/sh
# Create .venv next to this script and install requirements.txt into it.
# Idempotent: does nothing when .venv is already set up for the current
# requirements.txt. Override the base interpreter with PYTHON=/path/to/python3.
set -eu
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
stamp=".venv/.workload-ready"
want="$(cksum < requirements.txt)"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "matplotlib-venv: .venv already set up"
    exit 0
fi
rm -rf .venv
"$PYTHON" -m venv .venv
.venv/bin/pip install --quiet --only-binary=:all: -r requirements.txt
printf '%s\n' "$want" > "$stamp"
echo "matplotlib-venv: .venv ready"
