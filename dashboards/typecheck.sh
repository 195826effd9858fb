#!/usr/bin/env bash
# Type-checks the Grafana dashboards against Grafana's own types (@grafana/schema, with TypeScript's compiler)
# and checks every unit (@grafana/data's unit registry) and data source reference; see typecheck/check.mjs.
#   dashboards/typecheck.sh [DASHBOARD_DIR]     (default: dashboards/grafana)
# The npm packages are pinned by typecheck/package-lock.json and installed with `npm ci` into a throw-away
# folder, target/grafana-schema-check/ (GAINGUARD_SCHEMA_CHECK_DIR overrides it); the install is redone only
# when the lock file changes. Exits 1 listing every problem as `<file>: panel <id> "<title>" (<type>): <field>: …`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
dashboards=$(cd "${1:-$here/grafana}" && pwd)
work=${GAINGUARD_SCHEMA_CHECK_DIR:-$root/target/grafana-schema-check}
for tool in node npm flock; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "typecheck.sh: \`$tool\` not found (Node.js 20 or newer with npm, and util-linux's flock)" >&2
        exit 127
    fi
done
mkdir -p "$work"
(
    # Concurrent runs (parallel tests) share one install.
    flock 9
    if ! cmp -s "$here/typecheck/package-lock.json" "$work/package-lock.json" || [ ! -d "$work/node_modules" ]; then
        rm -rf "$work/node_modules"
        cp "$here/typecheck/package.json" "$here/typecheck/package-lock.json" "$work/"
        npm ci --prefix "$work" --no-audit --no-fund --loglevel=error >&2
    fi
    cp "$here/typecheck/check.mjs" "$here/typecheck/grafana.ts" "$work/"
) 9>"$work/.lock"
out=$(mktemp -d "$work/run.XXXXXX")
trap 'rm -rf "$out"' EXIT
node "$work/check.mjs" "$dashboards" "$out"
