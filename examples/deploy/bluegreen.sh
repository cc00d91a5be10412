#!/usr/bin/env bash
# The blue-green deploy, start to finish: run from this directory (examples/deploy).
# Starts gunicorn on a copy of this app, changes the code AND the gunicorn config (4 workers -> 2,
# which no worker reload can carry), deploys with a second master, waits through a short
# switch-back window, shows the new master alone serving, and stops.
set -euo pipefail
PYTHON=${PYTHON:-python}
work=$(mktemp -d)
cleanup() {
    for f in "$work/gunicorn.pid" "$work/gunicorn.pid.2"; do
        kill "$(cat "$f" 2>/dev/null)" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
cp app.py gunicorn.conf.py "$work/"
cd "$work"
PORT=${PORT:-8000}
"$PYTHON" -m gunicorn -c gunicorn.conf.py -b "127.0.0.1:$PORT" -p gunicorn.pid \
    --log-level error app:app &
get() { "$PYTHON" -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$PORT/').read().decode().strip())"; }
for _ in $(seq 100); do get >/dev/null 2>&1 && break; sleep 0.1; done
echo "before (master $(cat gunicorn.pid)):"; for _ in 1 2 3 4; do get; done

sed -i 's/VERSION = "1"/VERSION = "2"/' app.py
sed -i 's/^workers = 4/workers = 2/' gunicorn.conf.py      # the new master reads its config again
"$PYTHON" -m hotpatch deploy --pidfile gunicorn.pid --strategy blue-green --keep-old 3
echo "after (master $(cat gunicorn.pid)):"; for _ in 1 2 3 4; do get; done
"$PYTHON" -m hotpatch status --pidfile gunicorn.pid
