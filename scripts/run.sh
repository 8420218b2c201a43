#!/usr/bin/env bash
# Install what is missing, then start the whole local cluster (broker + web app + local agent).
# Any run_all.py flag works here too, e.g.  scripts/run.sh --demo
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$ROOT/scripts/install.sh" app
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec "$PY" run_all.py "$@"
