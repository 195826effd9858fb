"""The Python package's optimizer step vs `torch.optim.AdamW(fused=True)`, in one process, on the example LLaMA's
parameter shapes at d_model 512 (23.1M parameters; base width 128), with the same (lr, wd) groups and gradients.

    .venv/bin/python python/benches/optimizer_step.py [--steps 90] [--d-model 512] [--device cpu|cuda]

Prints each variant's median step time and its ratio to PyTorch's fused step, measured in the same run,
interleaved step by step so that a change in the machine's load hits every variant alike. Variants: gainguard's default
step (which first checks the gradients for NaN/Inf, one extra read of them), the same without the check
(`nonfinite_grad="step"`, as torch), and PyTorch's fused step. Results: BENCHMARKS.md.
"""

import argparse
import statistics
import time
import warnings

import torch

import gainguard

VOCAB, BASE_D, LAYERS = 4096, 128, 6

# The shapes are the Rust example's, whose plan warnings (the head, d_ff's uneven ratio) are known; this times the step.
warnings.filterwarnings("ignore", category=gainguard.PlanWarning)


def shapes(d: int):
    """The parameter shapes of examples/common's LLaMA (`model::llama`) at width d."""
    d_ff = ((8 * d // 3) + 7) // 8 * 8
    out = {"tok_emb.weight": [VOCAB, d]}
    for i in range(LAYERS):
        p = f"blocks.{i}."
        out[p + "attn_norm.weight"] = [d]
        for w in "qkvo":
            out[p + f"attn.{w}.weight"] = [d, d]
        out[p + "mlp_norm.weight"] = [d]
        out[p + "mlp.gate.weight"] = [d_ff, d]
        out[p + "mlp.up.weight"] = [d_ff, d]
        out[p + "mlp.down.weight"] = [d, d_ff]
    out["norm.weight"] = [d]
    out["lm_head.weight"] = [VOCAB, d]
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, device, n):
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=90, help="timed steps per variant")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    target = shapes(args.d_model)
    base = gainguard.BaseShapes(shapes(BASE_D), shapes(BASE_D * 2))
    def params():
        return {n: torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for n, s in target.items()}
    grads = {n: torch.randn(s, device=device) * 1e-3 for n, s in target.items()}

    variants = {}
    for name, kwargs in (("gainguard (default: NaN/Inf check)", {}), ('gainguard nonfinite_grad="step" (no check, as torch)', {"nonfinite_grad": "step"})):
        ps = params()
        opt = gainguard.AdamW(ps.items(), base_shapes=base, lr=3e-3, weight_decay=0.1, **kwargs)
        for n, p in ps.items():
            p.grad = grads[n]
        variants[name] = opt
    ps = params()
    ours = next(iter(variants.values()))
    index = {n: i for i, n in enumerate(target)}
    groups = [{"params": [ps[n] for n in g["param_names"]], "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in ours.param_groups]
    for n, p in ps.items():
        p.grad = grads[n]
    torch_name = "torch.optim.AdamW(fused=True)"
    variants[torch_name] = torch.optim.AdamW(groups, lr=3e-3, fused=True)
    assert sum(len(g["params"]) for g in groups) == len(index)

    numel = sum(p.numel() for p in ps.values())
    print(f"model: LLaMA d_model {args.d_model}, {LAYERS} layers, vocab {VOCAB}: {numel} parameters in {len(target)} tensors, "
          f"{len(groups)} (lr, wd) groups; device {device}, torch threads {torch.get_num_threads()}")
    samples = {name: [] for name in variants}
    for opt in variants.values():
        timed(opt.step, device, 5)  # warm-up: state allocation, caches
    # Interleaved step by step, so that a change in the machine's load reaches every variant alike.
    for _ in range(args.steps):
        for name, opt in variants.items():
            samples[name] += timed(opt.step, device, 1)
    ref = statistics.median(samples[torch_name])
    for name, times in samples.items():
        med = statistics.median(times)
        print(f"{name:55s} median {med * 1e3:8.2f} ms   {med / ref:5.2f}x torch fused")


if __name__ == "__main__":
    main()
