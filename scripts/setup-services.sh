#!/usr/bin/env bash
# Installs the real Prometheus (with promtool) and Alertmanager that the tests run against, and the headless
# Chromium that tests gainguardd's live page (tests/live_page.rs), from Debian's packages. The packages do
# not start services; tests start their own instances on loopback ports.
# Idempotent: does nothing when the binaries are already there.
set -euo pipefail
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || need+=(prometheus-alertmanager)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
pkgs="$(printf '%s\n' "${need[@]}" | sort -u | tr '\n' ' ')"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "gainguard setup: need root to install: $pkgs(apt-get install -y $pkgs)" >&2; exit 1; }
  sudo="sudo"
fi
command -v apt-get >/dev/null 2>&1 || { echo "gainguard setup: install these yourself (no apt-get here): $pkgs" >&2; exit 1; }
echo "gainguard setup: installing $pkgs from Debian's packages"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
