# Sourced by the other scripts: picks the Python interpreter the project uses.
# A .venv in the project wins; otherwise python3 (made into a .venv by install.sh when
# the system Python refuses pip installs, as Debian's does).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="${PYTHON:-python3}"
fi
export GRADIO_ANALYTICS_ENABLED=False
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
