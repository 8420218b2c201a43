#!/usr/bin/env bash
# Install test needs (Mosquitto, Chromium, Python packages), then run the whole suite.
# Extra arguments go to pytest, e.g.  scripts/test.sh -k mqtt
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$ROOT/scripts/install.sh" dev
source "$ROOT/scripts/env.sh"
cd "$ROOT"
"$PY" -m ruff check . || { echo "ruff found problems (above)" >&2; exit 1; }
exec "$PY" -m pytest "$@"
