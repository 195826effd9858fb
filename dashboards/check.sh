#!/usr/bin/env sh
# Validate the Prometheus rules and run their unit tests.
#   dashboards/check.sh            (from anywhere; PROMTOOL overrides the promtool binary)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
promtool=${PROMTOOL:-promtool}
if ! command -v "$promtool" >/dev/null 2>&1; then
    echo "check.sh: promtool not found (install the Debian package 'prometheus' or set PROMTOOL)" >&2
    exit 127
fi
"$promtool" check rules "$here/prometheus/gainguard.rules.yml"
"$promtool" test rules "$here/prometheus/gainguard.rules.test.yml"
