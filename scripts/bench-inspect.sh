#!/usr/bin/env bash
# `gainguard inspect` against torch.linalg.svdvals and WeightWatcher analyze() on the same 84-matrix
# LLaMA-shaped fp32 checkpoint (d_model 768, 51.3M parameters, written by scripts/bench_inspect.py).
# Ratios are taken within each round; rounds interleave the three so that drift in the machine's load
# reaches all of them. Run from a clone after `make test` (it needs .venv and a release build):
#
#   scripts/bench-inspect.sh [ROUNDS]        # default 3
#   THREADS=1 scripts/bench-inspect.sh       # every contender on one core (less hurt by a loaded machine)
#
# WeightWatcher is installed into a throwaway virtualenv under target/ (never into .venv); it reuses
# .venv's torch and numpy through a .pth file instead of downloading torch a second time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
THREADS=${THREADS:-$(nproc)}
# The peers' thread pools (torch, and the BLAS under WeightWatcher's SciPy) sized like ours.
export BENCH_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS
PY=${GAINGUARD_PYTHON:-.venv/bin/python}
DIR=target/bench-inspect
FILE=$DIR/llama-d768.safetensors
WW=$DIR/ww-venv
mkdir -p "$DIR"

cargo build --release -p gainguard-cli --bin gainguard
BIN=target/release/gainguard
[[ -f $FILE ]] || "$PY" scripts/bench_inspect.py make "$FILE"

if ! "$WW/bin/python" -c 'import weightwatcher' 2>/dev/null; then
  rm -rf "$WW"
  "$PY" -m venv "$WW"
  project_site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  ww_site=$("$WW/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  realpath "$project_site" > "$ww_site/gainguard-project-venv.pth"
  "$WW/bin/python" -m pip install --quiet weightwatcher
fi

# The file is read from the page cache by every contender.
cat "$FILE" > /dev/null
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

echo "machine: $(nproc --all) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); every contender on $THREADS thread(s)"
echo "load average at start: $(cat /proc/loadavg)"
"$BIN" inspect "$FILE" --format json > "$DIR/inspect.json"
"$PY" scripts/bench_inspect.py check "$FILE" "$DIR/inspect.json" | tee "$DIR/check.json"

printf '\n| round | gainguard inspect s (process, 3 runs: median) | svdvals s (loop) | WeightWatcher analyze() s | svdvals ÷ inspect | WeightWatcher ÷ inspect | load avg |\n'
printf '|---|---:|---:|---:|---:|---:|---|\n'
for round in $(seq 1 "$ROUNDS"); do
  runs=()
  for _ in 1 2 3; do
    t0=$(now)
    "$BIN" inspect "$FILE" --format json --threads "$THREADS" > /dev/null
    runs+=("$(elapsed "$t0" "$(now)")")
  done
  ours=$(printf '%s\n' "${runs[@]}" | sort -n | sed -n 2p)
  svd=$("$PY" scripts/bench_inspect.py svdvals "$FILE" | "$PY" -c 'import json, sys; print("%.3f" % json.load(sys.stdin)["seconds"])')
  ww_json=$("$WW/bin/python" scripts/bench_inspect.py ww "$FILE" 2>/dev/null | tail -1)
  ww=$(echo "$ww_json" | "$PY" -c 'import json, sys; print("%.3f" % json.load(sys.stdin)["seconds"])')
  printf '| %d | %s | %s | %s | **%.1f×** | **%.1f×** | %s |\n' "$round" "$ours" "$svd" "$ww" \
    "$(awk -v a="$svd" -v b="$ours" 'BEGIN { print a / b }')" "$(awk -v a="$ww" -v b="$ours" 'BEGIN { print a / b }')" \
    "$(cut -d' ' -f1-3 /proc/loadavg)"
done
echo
echo "peers: $("$PY" -c 'import torch; print("torch", torch.__version__, "threads", torch.get_num_threads())'), $(echo "$ww_json" | "$PY" -c 'import json, sys; d = json.load(sys.stdin); print("weightwatcher", d["weightwatcher"], "on", d["layers"], "layers")')"
