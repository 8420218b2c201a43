#!/usr/bin/env bash
# Add (or reset) a broker user for an agent or the coordinator.
#   mosquitto/add-user.sh NAME [--password-file FILE]
#   mosquitto/add-user.sh coordinator --coordinator [--password-file FILE] [--coordinator-password-file FILE]
# Prints the generated password once; give it to that machine as SLB_MQTT_PASSWORD.
#
# FILE (default mosquitto/passwd) is the LAN listener's; the coordinator is also
# written to the coordinator listener's own file (default: coordinator.passwd next
# to FILE), which no other user is ever in. See docs/security.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
name="${1:-}"; shift || true
file="$here/passwd"; coordinator_file=""; coordinator=0
while [ $# -gt 0 ]; do
  case "$1" in
    --coordinator) coordinator=1 ;;
    --password-file) file="$2"; shift ;;
    --coordinator-password-file) coordinator_file="$2"; shift ;;
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
if [ "$name" = coordinator ] && [ "$coordinator" = 0 ]; then
  echo "'coordinator' has full access to the cluster (it reads every prompt and answer)." >&2
  echo "To create it or reset its password, say so: $0 coordinator --coordinator" >&2
  exit 2
fi
if [[ "$name" == coordinator-* ]]; then
  # On the LAN listener a username is also the client id; coordinator-* ids are the coordinator's own.
  echo "names starting with 'coordinator-' are reserved for the coordinator's client ids; pick another" >&2
  exit 2
fi
command -v mosquitto_passwd >/dev/null || { echo "mosquitto_passwd not found (apt-get install mosquitto)" >&2; exit 1; }
password="${SLB_NEW_PASSWORD:-$(head -c 18 /dev/urandom | base64 | tr -d '/+=' )}"

write_user() {  # FILE: add or reset $name in it, and say which
  local target="$1" action="created user"
  [ -f "$target" ] || { (umask 077; touch "$target"); chmod 600 "$target"; }
  if cut -d: -f1 "$target" | grep -qxF -- "$name"; then action="reset the password of user"; fi
  mosquitto_passwd -b "$target" "$name" "$password"
  echo "$action '$name' in $target"
}

write_user "$file"
if [ "$coordinator" = 1 ]; then
  write_user "${coordinator_file:-$(dirname "$file")/coordinator.passwd}"
fi
echo "password: $password"
echo "Mosquitto reads password files at start: restart it or send it SIGHUP."
