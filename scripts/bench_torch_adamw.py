#!/usr/bin/env python3
"""PyTorch's AdamW step time on given shapes and (lr, wd) groups, for benches/optimizer_step.rs.

Reads a JSON spec from the file named by argv[1]:
  {"shapes": [[4096, 512], ...], "groups": [{"lr": 1e-3, "weight_decay": 0.1, "members": [0, 3, ...]}, ...],
   "warmup": 5, "steps": 30, "threads": 2, "device": "cpu",
   "variants": ["fused", "fused+check", "foreach", "for-loop"]}
and prints one JSON line per variant: {"variant": ..., "samples_ms": [...], "median_ms": ..., "threads": ...}.
Gradients are filled once with random values; only `optimizer.step()` is timed (on CUDA, between two
`torch.cuda.synchronize()`). `fused+check` is the fused step behind PyTorch's own skip of a step with
non-finite gradients, as `torch.amp.GradScaler.step` does it: `_amp_foreach_non_finite_check_and_unscale_`
(here with scale 1), then the step only when `found_inf` is 0.
"""
import json
import statistics
import sys
import time

import torch


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec.get("device", "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in spec["shapes"]]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for variant in spec["variants"]:
        kwargs = {
            "fused": {"fused": True},
            "fused+check": {"fused": True},
            "foreach": {"foreach": True},
            "for-loop": {"foreach": False},
        }[variant]
        grads = [p.grad for p in params]
        found_inf = torch.zeros(1, device=device)
        inv_scale = torch.ones(1, device=device)
        groups = [
            {"params": [params[i] for i in g["members"]], "lr": g["lr"], "weight_decay": g["weight_decay"]}
            for g in spec["groups"]
        ]
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, **kwargs)
        samples = []
        for i in range(spec["warmup"] + spec["steps"]):
            sync()
            start = time.perf_counter()
            if variant == "fused+check":
                found_inf.zero_()
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
                if found_inf.item() == 0:
                    opt.step()
            else:
                opt.step()
            sync()
            elapsed = (time.perf_counter() - start) * 1e3
            if i >= spec["warmup"]:
                samples.append(elapsed)
        print(json.dumps({
            "variant": variant,
            "samples_ms": samples,
            "median_ms": statistics.median(samples),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": str(device),
        }), flush=True)


if __name__ == "__main__":
    main()
