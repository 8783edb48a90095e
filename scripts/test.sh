#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine (pinned by constraints.txt), then runs ruff, the
# install check (a non-editable install used from the repository root) and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -c constraints.txt torch==2.13.0
.venv/bin/pip install -q -c constraints.txt -e ".[test,diffusers]"
# k-diffusion's own samplers for the integration tests: its release pins dctorch, which needs numpy < 2, and its
# package __init__ imports its training stack; the tests load k_diffusion.sampling/external alone (tests/kdiffusion_lib.py),
# which need only torchsde and torchdiffeq from the test extra
.venv/bin/pip install -q --no-deps k-diffusion==0.1.1.post1

# PostgreSQL for the storage tests: a private server on loopback (the Debian package is installed if
# missing), reused while it runs; stopped again at the end only if this script started it.
# STEPTUNE_TEST_PG_URL, if already set, is used as is.
if [ -z "${STEPTUNE_TEST_PG_URL:-}" ]; then
    pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
    if [ -z "$(pg_bin)" ] && [ "$(id -u)" = 0 ]; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    PGBIN="$(pg_bin)"
    if [ -n "$PGBIN" ]; then
        PGDIR="${STEPTUNE_PG_DIR:-/tmp/steptune-pg-$(id -u)}"
        as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
        if [ ! -s "$PGDIR/PG_VERSION" ]; then
            mkdir -p "$PGDIR" && chmod 700 "$PGDIR"
            if [ "$(id -u)" = 0 ]; then chown postgres: "$PGDIR"; fi
            as_pg "$PGBIN/initdb" -D "$PGDIR" -U steptune --auth=trust -E UTF8 >/dev/null
        fi
        if ! as_pg "$PGBIN/pg_ctl" -D "$PGDIR" status >/dev/null 2>&1; then
            PGPORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
            echo "$PGPORT" > "$PGDIR/steptune.port"
            as_pg "$PGBIN/pg_ctl" -D "$PGDIR" -l "$PGDIR/server.log" -w -s \
                -o "-p $PGPORT -c listen_addresses=127.0.0.1 -k $PGDIR -c fsync=off" start
            trap 'cd / && as_pg "$PGBIN/pg_ctl" -D "$PGDIR" -m fast -w -s stop' EXIT  # postgres may not enter the cwd
        fi
        PGPORT="$(cat "$PGDIR/steptune.port")"
        if ! as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$PGPORT" -U steptune -d postgres -tAq \
                -c "SELECT 1 FROM pg_database WHERE datname = 'steptune_test'" | grep -q 1; then
            as_pg "$PGBIN/createdb" -h 127.0.0.1 -p "$PGPORT" -U steptune steptune_test
        fi
        export STEPTUNE_TEST_PG_URL="postgresql+psycopg://steptune@127.0.0.1:$PGPORT/steptune_test"
    fi
fi

# Chromium for the dashboard's browser tests (Playwright drives Debian's chromium; its own browser
# download is not used). STEPTUNE_CHROMIUM, if already set, is used as is.
if [ -z "${STEPTUNE_CHROMIUM:-}" ]; then
    chromium_bin() { command -v chromium || command -v chromium-browser || true; }
    if [ -z "$(chromium_bin)" ] && [ "$(id -u)" = 0 ]; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
    if [ -n "$(chromium_bin)" ]; then
        export STEPTUNE_CHROMIUM="$(chromium_bin)"
    fi
fi

.venv/bin/ruff check .
bash scripts/check_install.sh
.venv/bin/python -m pytest "$@"
