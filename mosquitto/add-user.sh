#!/usr/bin/env bash
# Add (or reset) a broker user for an agent or the coordinator.
#   mosquitto/add-user.sh NAME [--coordinator] [--password-file FILE]
# Prints the generated password once; give it to that machine as SLB_MQTT_PASSWORD.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
name="${1:-}"; shift || true
file="$here/passwd"; coordinator=0
while [ $# -gt 0 ]; do
  case "$1" in
    --coordinator) coordinator=1 ;;
    --password-file) file="$2"; shift ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
  shift
done
if ! [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]]; then
  echo "usage: $0 NAME [--coordinator]   (NAME: letters, digits, . _ - ; no + # / or spaces)" >&2
  exit 2
fi
if [ "$coordinator" = 1 ] && [ "$name" != coordinator ]; then
  echo "the ACL grants full access to the user named 'coordinator'; use that name" >&2
  exit 2
fi
command -v mosquitto_passwd >/dev/null || { echo "mosquitto_passwd not found (apt-get install mosquitto)" >&2; exit 1; }
password="${SLB_NEW_PASSWORD:-$(head -c 18 /dev/urandom | base64 | tr -d '/+=' )}"
[ -f "$file" ] || { touch "$file"; chmod 600 "$file"; }
mosquitto_passwd -b "$file" "$name" "$password"
echo "user '$name' added to $file"
echo "password: $password"
