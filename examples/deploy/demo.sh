#!/usr/bin/env bash
# The in-place deploy, start to finish: run from this directory (examples/deploy).
# Starts gunicorn on a copy of this app, changes a function, deploys it in place, shows that
# every worker answers the new code with the same pids, then shows a refused change, and stops.
set -euo pipefail
PYTHON=${PYTHON:-python}
work=$(mktemp -d)
trap 'kill "$(cat "$work/gunicorn.pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$work"' EXIT
cp app.py gunicorn.conf.py "$work/"
cd "$work"
PORT=${PORT:-8000}
"$PYTHON" -m gunicorn -c gunicorn.conf.py -b "127.0.0.1:$PORT" -p gunicorn.pid \
    --log-level error app:app &
get() { "$PYTHON" -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$PORT/').read().decode().strip())"; }
for _ in $(seq 100); do get >/dev/null 2>&1 && break; sleep 0.1; done
# wait until the master says every worker is ready
for _ in $(seq 100); do
    "$PYTHON" -m hotpatch status --pidfile gunicorn.pid 2>/dev/null | grep -c " ready " | grep -q 4 && break
    sleep 0.1
done
echo "before:"; for _ in 1 2 3 4; do get; done

sed -i 's/hello from version/hi from version/; s/VERSION = "1"/VERSION = "2"/' app.py
"$PYTHON" -m hotpatch deploy --pidfile gunicorn.pid --strategy in-place
echo "after:"; for _ in 1 2 3 4; do get; done

echo 'def broken(:' >> app.py        # a syntax error: refused in phase 1, nothing changes
"$PYTHON" -m hotpatch deploy --pidfile gunicorn.pid --strategy in-place || echo "exit code $?"
"$PYTHON" -m hotpatch status --pidfile gunicorn.pid
