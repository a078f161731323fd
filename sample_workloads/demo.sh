#!/usr/bin/env bash
# The README's first command: install tracejail, then record, build and run the python-web
# workload as a FROM-scratch image, and print its size. Needs root (or sudo) on Debian/Ubuntu.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

need=()
for p in python3 python3-venv python3-pip curl docker.io; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
    echo "demo: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

VENV="${TRACEJAIL_VENV:-/opt/tracejail}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$REPO"
TJ="$VENV/bin/tracejail"
echo "demo: installed $("$TJ" --version)"

if ! docker info >/dev/null 2>&1; then
    echo "demo: starting dockerd" >&2
    (dockerd >/var/log/tracejail-demo-dockerd.log 2>&1 &)
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { echo "demo: dockerd did not start (see /var/log/tracejail-demo-dockerd.log)" >&2; exit 1; }
fi

WORK=$(mktemp -d)
cp -r "$REPO/sample_workloads/python-web" "$WORK/"
cd "$WORK/python-web"
PORT=${DEMO_PORT:-8000}
echo "demo: 1/3 recording python3 server.py with three curl exercises"
"$TJ" record -o trace.json \
    --exercise "curl -s localhost:$PORT/" \
    --exercise "curl -s 'localhost:$PORT/hash?text=abc'" \
    --exercise "curl -s localhost:$PORT/items" \
    -- python3 server.py --port "$PORT"
echo "demo: 2/3 building the image tracejail-demo"
"$TJ" build trace.json -t tracejail-demo
echo "demo: 3/3 running it as a non-root user and asking it for /items"
# --network host rather than -p: it works on hosts whose engine has no bridge network too
cid=$(docker run -d --rm --network host tracejail-demo)
trap 'docker rm -f "$cid" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do curl -s "localhost:$PORT/" >/dev/null 2>&1 && break; sleep 0.1; done
curl -s "localhost:$PORT/items"; echo
echo "demo: image size $(docker image inspect tracejail-demo --format '{{.Size}}' | awk '{printf "%.1f MB", $1/1e6}') (uncompressed, as docker reports it); container ran as user $(docker inspect "$cid" --format '{{.Config.User}}')"
