#!/usr/bin/env bash
# Install everything the project needs on this machine.
#   scripts/install.sh          app host: Mosquitto (apt, when possible) + requirements.txt
#   scripts/install.sh --dev    ... plus Chromium, the test tools and a real LLM runtime (requirements-dev.txt:
#                               llama-cpp-python, built once by pip with cmake + build-essential, ~15 minutes)
#   scripts/install.sh --agent  an agent machine: agent/requirements.txt only
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
mode="${1:-app}"; mode="${mode#--}"

log() { printf '[install] %s\n' "$*" >&2; }

# ---- system packages (Debian/Ubuntu): Mosquitto, and Chromium for the browser tests
apt_packages=()
if [ "$mode" != agent ]; then
  command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || apt_packages+=(mosquitto mosquitto-clients)
fi
if [ "$mode" = dev ]; then
  [ -x /usr/bin/chromium ] || apt_packages+=(chromium)
  # llama-cpp-python (the real runtime of tests/test_real_runtime.py) is built from source by pip
  command -v cmake >/dev/null || apt_packages+=(cmake)
  { command -v gcc && command -v g++ && command -v make; } >/dev/null || apt_packages+=(build-essential)
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else SUDO="none"; fi
    if [ "$SUDO" != none ]; then
      log "apt: installing ${apt_packages[*]}"
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_packages[@]}" >/dev/null
    else
      log "cannot install ${apt_packages[*]} without root; the embedded Python broker will be used"
    fi
  else
    log "no apt-get here: install Mosquitto yourself (brew install mosquitto) or use the embedded broker"
  fi
  # Debian starts a system-wide mosquitto on :1883 on install; our scripts run their own.
  if command -v systemctl >/dev/null && systemctl is-active --quiet mosquitto 2>/dev/null; then
    log "note: the system mosquitto service is running on :1883; run_all.py will use it as the broker"
  fi
fi

# ---- Python packages
if [ "$PY" = "${PYTHON:-python3}" ] && "$PY" - <<'PYEOF'
import sys, sysconfig, pathlib
in_venv = sys.prefix != sys.base_prefix
managed = (pathlib.Path(sysconfig.get_paths()["stdlib"]) / "EXTERNALLY-MANAGED").exists()
sys.exit(0 if (managed and not in_venv) else 1)
PYEOF
then
  log "this Python is externally managed; creating .venv"
  "$PY" -m venv "$ROOT/.venv"
  PY="$ROOT/.venv/bin/python"
fi
case "$mode" in
  agent) req=agent/requirements.txt ;;
  dev) req=requirements-dev.txt ;;
  *) req=requirements.txt ;;
esac
stamp_dir="$ROOT/data"; mkdir -p "$stamp_dir"
stamp="$stamp_dir/.install-$mode"
digest="$(cat "$req" requirements.txt agent/requirements.txt 2>/dev/null | sha256sum | cut -c1-16)-$("$PY" -c 'import sys; print(sys.executable)' | sha256sum | cut -c1-8)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
  log "Python packages already installed for $req"
else
  log "pip: installing $req (torch is pinned to the CPU build 2.13.0)"
  if [ "$mode" = dev ] && ! "$PY" -c 'import llama_cpp' 2>/dev/null; then
    log "pip: building llama-cpp-python for the real-runtime tests; the first build takes ~15 minutes (the wheel is cached after that)"
  fi
  "$PY" -m pip install --disable-pip-version-check -q -r "$req"
  echo "$digest" > "$stamp"
fi
