#!/usr/bin/env bash
# Install everything the project needs on this machine.
#   scripts/install.sh          app host: Mosquitto (apt, when possible) + requirements.txt
#   scripts/install.sh --dev    ... plus Chromium, the test tools and a real LLM runtime (requirements-dev.txt:
#                               llama-cpp-python, built once by pip with cmake + build-essential, ~15 minutes)
#   scripts/install.sh --agent  an agent machine: agent/requirements.txt only
#   ... --dry-run               say what it would install (apt, venv, pip command) and change nothing
# torch: the CPU-only build unless SLB_TORCH=cuda (or SLB_TORCH=auto with a working nvidia-smi); see
# scripts/torch_choice.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
mode=app; dry_run=no
for argument in "$@"; do
  case "$argument" in
    --dry-run) dry_run=yes ;;
    app|--app|dev|--dev|agent|--agent) mode="${argument#--}" ;;
    *) printf '[install] unknown argument %s (use app, --dev, --agent, --dry-run)\n' "$argument" >&2; exit 2 ;;
  esac
done

log() { printf '[install] %s\n' "$*" >&2; }
# run a command, or only say it under --dry-run
run() {
  if [ "$dry_run" = yes ]; then log "dry run, would run: $*"; else "$@"; fi
}

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
  [ "$dry_run" = yes ] && { log "dry run, would run: apt-get install $*"; return 0; }
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# ---- system packages (Debian/Ubuntu): Mosquitto, and Chromium for the browser tests
apt_packages=()
installing_mosquitto=no
installing_rabbitmq=no
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
  # RabbitMQ's MQTT plugin, the second broker the tests run (tests/test_rabbitmq.py starts its own nodes)
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || { apt_packages+=(rabbitmq-server); installing_rabbitmq=yes; }
  # PostgreSQL, the shared store of several front ends (tests start servers of their own: app/store/postgres_local.py)
  compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || apt_packages+=(postgresql)
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  apt_install "${apt_packages[@]}" \
    || log "without Mosquitto run_all.py uses its embedded Python broker (or: brew install mosquitto)"
fi
# Debian/Ubuntu start a system-wide mosquitto service on :1883 when the package is installed. run_all.py finds
# that port taken and runs its own broker on a free port instead (it says which); say so here too.
if [ "$installing_mosquitto" = yes ] && [ "$dry_run" = no ] && command -v systemctl >/dev/null \
    && systemctl is-active --quiet mosquitto 2>/dev/null; then
  log "NOTE: installing Mosquitto started the system service mosquitto.service on :1883. run_all.py leaves it" \
      "alone and starts its own broker on a free port (its log says which). To give :1883 to run_all.py:" \
      "'sudo systemctl disable --now mosquitto'; to use the system broker: 'run_all.py --broker-url mqtt://127.0.0.1:1883'."
fi

# The tests start RabbitMQ nodes of their own; a system service apt may have started only costs memory and CPU.
if [ "$installing_rabbitmq" = yes ] && [ "$dry_run" = no ] && command -v systemctl >/dev/null \
    && systemctl is-enabled --quiet rabbitmq-server 2>/dev/null; then
  log "disabling the system service rabbitmq-server that apt set up (the tests run nodes of their own)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo systemctl disable rabbitmq-server >/dev/null 2>&1 || log "could not disable rabbitmq-server.service"
  if systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
    $sudo systemctl stop rabbitmq-server || log "could not stop rabbitmq-server.service"
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
  # minimal Debian/Ubuntu images ship python3 without venv/ensurepip (the python3-venv package)
  if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
    apt_install python3-venv \
      || { log "python3 -m venv needs the python3-venv package; install it and run this again"; exit 1; }
  fi
  run "$PY" -m venv "$ROOT/.venv"
  [ "$dry_run" = yes ] || PY="$ROOT/.venv/bin/python"
fi
case "$mode" in
  agent) req=agent/requirements.txt ;;
  dev) req=requirements-dev.txt ;;
  *) req=requirements.txt ;;
esac
stamp_dir="$ROOT/data"; mkdir -p "$stamp_dir"
stamp="$stamp_dir/.install-$mode"
digest="$(cat "$req" requirements.txt agent/requirements.txt 2>/dev/null | sha256sum | cut -c1-16)-$("$PY" -c 'import sys; print(sys.executable)' | sha256sum | cut -c1-8)-torch-${SLB_TORCH:-cpu}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] && [ "$dry_run" = no ]; then
  log "Python packages already installed for $req"
else
  torch_args=()
  if [ "$mode" != agent ]; then
    # the CPU-only torch unless SLB_TORCH asks for a GPU build (one argument a line; it says why on stderr)
    choice="$("$PY" "$ROOT/scripts/torch_choice.py" --requirements "$req")"
    [ -n "$choice" ] && mapfile -t torch_args <<<"$choice"
  fi
  log "pip: installing $req"
  if [ "$mode" = dev ] && ! "$PY" -c 'import llama_cpp' 2>/dev/null; then
    log "pip: building llama-cpp-python for the real-runtime tests; the first build takes ~15 minutes (the wheel is cached after that)"
  fi
  run "$PY" -m pip install --disable-pip-version-check -q -r "$req" "${torch_args[@]}"
  [ "$dry_run" = yes ] || echo "$digest" > "$stamp"
fi
