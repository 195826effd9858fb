#!/usr/bin/env bash
# The GPU checks, in one script for a machine with an NVIDIA GPU, PyTorch 2.11 in its `python3`, and no
# cargo: build here with `scripts/device-check.sh --build` (copies stripped binaries and a compressed
# promtool to target/devcheck/), carry target/devcheck/ to the GPU machine, and run
# `scripts/device-check.sh` from the repository root there. Results are written to $OUT (default
# ./out/devcheck). What it checks:
#   1. examples/device_check: CUDA spectra and the sampler vs float64 CPU SVDs, the fused step on CUDA vs the
#      reference path;
#   2. the optimizer benchmark on CUDA (d_model 512 and 2048) and on the machine's CPUs;
#   3. gainguardd --nvml on fed by the example trainer on CUDA: GPU metrics scraped under load, promtool
#      check metrics on the body;
#   4. the spectra benchmark (warm sigma_max vs a full SVD and vs its memory floor) on CUDA, with the card's name;
#   5. the Python package on CUDA: its CUDA tests (ATen's fused AdamW through the Rust core vs torch's fused
#      AdamW over 200 steps, the NaN skip) and its step benchmark against torch.optim.AdamW(fused=True).
# The most telling checks run first, so that a run cut short by its time limit still returns them.
set -uo pipefail
cd "$(dirname "$0")/.."
B=target/devcheck

if [[ "${1:-}" == "--build" ]]; then
  set -e
  cargo build --release -p gainguard-suite --example device_check --example llama --bench optimizer_step --bench spectra
  cargo build --release -p gainguard-daemon --bin gainguardd
  mkdir -p "$B"
  bench=$(ls -t target/release/deps/optimizer_step-* | grep -v '\.d$' | head -1)
  # spectra-<hash> only: the spectra_* test binaries share the prefix.
  spectra=$(ls -t target/release/deps/spectra-* | grep -E '/spectra-[0-9a-f]+$' | head -1)
  for f in target/release/examples/device_check target/release/examples/llama "$bench" "$spectra" target/release/gainguardd; do
    strip -o "$B/$(basename "$f" | sed 's/-[0-9a-f]*$//')" "$f"
  done
  gzip -c "$(command -v promtool)" > "$B/promtool.gz"
  # The Python package's wheel (make setup-python builds it) and pytest's wheels: the GPU machine has no network.
  rm -rf "$B/wheels" && mkdir -p "$B/wheels"
  cp target/wheels/gainguard-*.whl "$B/wheels/"
  .venv/bin/python -m pip download -q -d "$B/wheels" pytest
  du -sh "$B"
  exit 0
fi

OUT=${OUT:-out/devcheck}
mkdir -p "$OUT"
TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
gunzip -c "$B/promtool.gz" > "$B/promtool" && chmod +x "$B/promtool"
failed=0
step() { echo; echo "=== $1 ==="; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' | tee -a "$OUT/gpu.txt"
nproc | sed 's/^/cpus: /' | tee -a "$OUT/gpu.txt"

step "1. CUDA spectra, sampler and fused step vs CPU references"
timeout 120 "$B/device_check" 2>&1 | tee "$OUT/device_check.txt" || failed=1

step "5. the Python package on CUDA"
python3 -m pip install -q --no-index --find-links "$B/wheels" pytest 2>&1 | tail -2
python3 -m pip install -q --no-index --no-deps --force-reinstall "$B"/wheels/gainguard-*.whl 2>&1 | tail -2
timeout 120 python3 -m pytest -q -s python/tests/test_cuda.py 2>&1 | tee "$OUT/python_cuda_tests.txt" || failed=1
timeout 100 python3 python/benches/optimizer_step.py --device cuda 2>&1 | tee "$OUT/python_bench_cuda.txt" || failed=1

step "4. spectra benchmark on CUDA: warm sigma_max vs full SVD (gesvdj) and vs the memory floor"
echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" | tee "$OUT/bench_spectra_cuda.txt"
GAINGUARD_BENCH_DEVICE=cuda timeout 150 "$B/spectra" --sigma-only 2>&1 | tee -a "$OUT/bench_spectra_cuda.txt" || failed=1

step "2. optimizer step on CUDA, d_model 512 (23.1M params)"
GAINGUARD_BENCH_DEVICE=cuda GAINGUARD_PYTHON=python3 GAINGUARD_BENCH_STEPS=50 timeout 100 "$B/optimizer_step" 2>&1 | tee "$OUT/bench_cuda_512.txt" || failed=1

step "3. gainguardd --nvml on, fed by the example trainer on CUDA"
rm -f /tmp/gainguard-devcheck.sock
"$B/gainguardd" --listen 127.0.0.1:19464 --ingest unix:/tmp/gainguard-devcheck.sock --nvml on --nvml-interval 1 > "$OUT/gainguardd.log" 2>&1 &
daemon=$!
for _ in $(seq 50); do [[ -S /tmp/gainguard-devcheck.sock ]] && break; sleep 0.1; done
timeout 150 "$B/llama" --device cuda --d-model 1024 --base-d-model 128 --layers 4 --steps 400 --gainguardd unix:/tmp/gainguard-devcheck.sock --run devcheck > "$OUT/llama_cuda.txt" 2>&1 &
trainer=$!
python3 - "$OUT" <<'EOF'
import sys, time, urllib.request
out = sys.argv[1]
def scrape():
    return urllib.request.urlopen("http://127.0.0.1:19464/metrics", timeout=5).read().decode()
best = ""
for _ in range(60):  # up to ~60 s: wait until the trainer's spectra and the GPU's load show up
    time.sleep(1)
    try:
        body = scrape()
    except Exception as e:
        print("scrape failed:", e)
        continue
    best = body
    util = [l for l in body.splitlines() if l.startswith("gainguard_gpu_utilization_ratio")]
    if any(float(l.split()[-1]) > 0 for l in util) and "gainguard_sigma_max{" in body:
        break
open(f"{out}/metrics_under_load.txt", "w").write(best)
for l in best.splitlines():
    if l.startswith(("gainguard_gpu_", "gainguard_nvml_", "gainguard_process_gpu", "gainguard_samples_dropped", "gainguard_spectrum_samples_dropped")):
        print(l)
print("sigma_max series:", sum(1 for l in best.splitlines() if l.startswith("gainguard_sigma_max{")))
EOF
"$B/promtool" check metrics < "$OUT/metrics_under_load.txt" && echo "promtool check metrics: clean" || { echo "promtool check metrics: problems"; failed=1; }
wait $trainer || { echo "trainer failed"; failed=1; }
tail -5 "$OUT/llama_cuda.txt"
kill -TERM $daemon; wait $daemon; echo "gainguardd exit status $?"
tail -5 "$OUT/gainguardd.log"

step "6. optimizer step on CUDA, d_model 2048 (if time is left)"
GAINGUARD_BENCH_DEVICE=cuda GAINGUARD_PYTHON=python3 GAINGUARD_BENCH_STEPS=30 GAINGUARD_BENCH_D_MODEL=2048 timeout 120 "$B/optimizer_step" 2>&1 | tee "$OUT/bench_cuda_2048.txt" || failed=1

echo; echo "device-check: $([[ $failed == 0 ]] && echo OK || echo FAILED)"
exit $failed
