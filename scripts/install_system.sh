#!/usr/bin/env bash
# System packages Tandem needs on Debian/Ubuntu: real English text for calibration and evaluation
# (python3.11-doc), the Mosquitto MQTT broker, PostgreSQL and Chromium. Installs only what is missing; uses sudo when not root.
set -euo pipefail
need=()
[ -d /usr/share/doc/python3.11/html/_sources ] || need+=(python3.11-doc)
# The hub's managed MQTT broker (and mosquitto_passwd); the package does not start a service by itself.
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
# PostgreSQL for the multi-replica registry tests (the tests run their own throwaway cluster).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
# Headless Chromium for the fleet page's browser tests (Playwright drives it by executable_path: browsers
# cannot be downloaded here).
command -v chromium >/dev/null || need+=(chromium)
# OpenSSH server for the flash tests (`tandem agent flash --target ssh://`): the tests start their own sshd on a
# loopback port with keys they make; the package's own service is not used.
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "install_system: missing ${need[*]} and no apt-get here; install them by hand" >&2
  exit 1
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install_system: installing ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
