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

# apt-get install as root or through sudo; returns 1 (and says why) when it cannot
apt_install() {
  if ! command -v apt-get >/dev/null; then
    log "no apt-get here: cannot install $*"; return 1
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then sudo="sudo"; else log "cannot install $* without root"; return 1; fi
  fi
  log "apt: installing $*"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# ---- system packages (Debian/Ubuntu): Mosquitto, and Chromium for the browser tests
apt_packages=()
installing_mosquitto=no
if [ "$mode" != agent ]; then
  if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    apt_packages+=(mosquitto mosquitto-clients); installing_mosquitto=yes
  fi
fi
if [ "$mode" = dev ]; then
  [ -x /usr/bin/chromium ] || apt_packages+=(chromium)
  # llama-cpp-python (the real runtime of tests/test_real_runtime.py) is built from source by pip
  command -v cmake >/dev/null || apt_packages+=(cmake)
  { command -v gcc && command -v g++ && command -v make; } >/dev/null || apt_packages+=(build-essential)
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  apt_install "${apt_packages[@]}" \
    || log "without Mosquitto run_all.py uses its embedded Python broker (or: brew install mosquitto)"
fi
# Debian/Ubuntu start a system-wide mosquitto service on :1883 when the package is installed. run_all.py would
# find that port taken and use that broker (not its own config), so say so plainly.
if [ "$installing_mosquitto" = yes ] && command -v systemctl >/dev/null \
    && systemctl is-active --quiet mosquitto 2>/dev/null; then
  log "NOTE: installing Mosquitto started the system service mosquitto.service on :1883. run_all.py will use" \
      "that broker (with the system's config), not one of its own. To have run_all.py start its own:" \
      "'sudo systemctl disable --now mosquitto', or run it with another port, e.g. 'run_all.py --mqtt-port 1884'."
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
  # minimal Debian/Ubuntu images ship python3 without venv/ensurepip (the python3-venv package)
  if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
    apt_install python3-venv \
      || { log "python3 -m venv needs the python3-venv package; install it and run this again"; exit 1; }
  fi
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
