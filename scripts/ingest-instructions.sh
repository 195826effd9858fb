#!/usr/bin/env bash
# Instructions gainguardd executes per ingested event, counted by valgrind's callgrind: a figure that, unlike
# CPU time, does not depend on what else the machine is running. One `gainguard-send` writes N steps of
# 3 spectrum samples and a step over the Unix socket; the count is taken at N and 4N steps and the difference
# divided by the extra events, so that start-up and shutdown cancel out. Loopback only.
#
#   scripts/ingest-instructions.sh [GAINGUARDD] [STEPS]
#
# GAINGUARDD defaults to target/release/gainguardd (cargo build --release -p gainguard-daemon --bins); pass
# another build's binary to compare. KEEP=PREFIX keeps each run's callgrind output as PREFIX.STEPS, for
# callgrind_annotate. Needs valgrind (Debian: apt-get install valgrind).
set -euo pipefail
cd "$(dirname "$0")/.."
daemon=${1:-target/release/gainguardd}
steps=${2:-20000}
sender=target/release/gainguard-send
command -v valgrind >/dev/null || { echo "valgrind not found: apt-get install valgrind" >&2; exit 2; }
[[ -x $daemon && -x $sender ]] || { echo "build first: cargo build --release -p gainguard-daemon --bins" >&2; exit 2; }

# Prints "EVENTS INSTRUCTIONS" for one daemon run fed STEPS steps.
count() {
  local dir port vg want seen
  dir=$(mktemp -d)
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  valgrind --tool=callgrind --callgrind-out-file="$dir/out" "$daemon" --listen "127.0.0.1:$port" --nvml off \
    --ingest "unix:$dir/s.sock" 2>"$dir/valgrind.log" &
  vg=$!
  for _ in $(seq 600); do [[ -S $dir/s.sock ]] && break; sleep 0.2; done
  "$sender" --addr "unix:$dir/s.sock" --steps "$1" --params 3 --capacity 1000000 --goodbye false >"$dir/sent.json"
  want=$(python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(d["sent"] - d["dropped"])' "$dir/sent.json")
  for _ in $(seq 1200); do
    seen=$(python3 - "$port" <<'PY'
import sys, urllib.request
body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode()
print(int(sum(float(l.rsplit(" ", 1)[1]) for l in body.splitlines() if l.startswith("gainguard_ingest_events_total"))))
PY
)
    [[ $seen -ge $want ]] && break
    sleep 1
  done
  kill -TERM "$vg"
  wait "$vg" || true
  echo "$seen $(awk '/^(summary|totals):/ {print $2; exit}' "$dir/out")"
  if [[ -n ${KEEP:-} ]]; then cp "$dir/out" "$KEEP.$1"; fi
  rm -rf "$dir"
}

read -r e1 i1 < <(count "$steps")
read -r e4 i4 < <(count "$((4 * steps))")
awk -v e1="$e1" -v i1="$i1" -v e4="$e4" -v i4="$i4" -v d="$daemon" \
  'BEGIN { printf "%s: %.0f instructions per event (%.0f events: %.0f; %.0f events: %.0f)\n", d, (i4 - i1) / (e4 - e1), e1, i1, e4, i4 }'
