#!/usr/bin/env bash
# Install test needs (Mosquitto, Chromium, Python packages), then run the whole suite.
# Extra arguments go to pytest, e.g.  scripts/test.sh -k mqtt
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$ROOT/scripts/install.sh" dev
source "$ROOT/scripts/env.sh"
cd "$ROOT"
"$PY" -m ruff check . || { echo "ruff found problems (above)" >&2; exit 1; }
# Two workers, one test file each at a time: most tests wait on real processes (brokers, agents, runtimes, a
# browser), so two files in parallel take ~60 % of the serial time on 2 cores. SLB_TEST_WORKERS=0 runs serially.
workers="${SLB_TEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
    exec "$PY" -m pytest "$@"
fi
# --no-loadscope-reorder: xdist would otherwise hand out files by their number of tests, not in the order
# tests/conftest.py puts them (longest first), and a long file with few tests ran alone at the end.
exec "$PY" -m pytest -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
