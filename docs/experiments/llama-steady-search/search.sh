#!/bin/sh
# The search for a configuration of the LLaMA example whose own checks accept a steady state (drift < 3% and a
# 10x-smaller init within 5% for every hidden matrix at 3 widths). Each try runs gamma = 1 only (every width the
# same steps), one seed unless told otherwise, the init and drift checks (no (2lr, 2wd) run): the cheapest run that shows whether the
# checks pass. Run from the repository root after `cargo build --release --example width_transfer`.
set -e
OUT=${OUT:-docs/experiments/llama-steady-search}
BIN=./target/release/examples/width_transfer
try() {
  name=$1; shift
  nice -n 5 /usr/bin/time -f "$name cpu_user_s=%U cpu_sys_s=%S wall_s=%e" \
    $BIN --gamma-sweep --preset cpu --gammas 1 --no-doubled-check --out "$OUT/$name" "$@" \
    > "$OUT/$name.log" 2>&1 || true
  tail -1 "$OUT/$name.log"
}
for t in "$@"; do
  case $t in
    h12)        try h12        --widths 16,32,64 --horizon 12 --seeds 1 ;;
    h12-b64)    try h12-b64    --widths 16,32,64 --horizon 12 --batch 64 --seeds 2 ;;
    w32-h12)    try w32-h12    --widths 32,64,128 --horizon 12 --seeds 1 ;;
    order1-h12) try order1-h12 --widths 16,32,64 --horizon 12 --markov 64,1,4 --seeds 2 ;;
    h24)        try h24        --widths 16,32,64 --horizon 24 --seeds 1 ;;
  esac
done
