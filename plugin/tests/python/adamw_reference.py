"""The reference side of plugin/tests/torch_adamw_reference.rs: PyTorch's own `torch.optim.AdamW`, and the peers
the presets are named after, stepped with the gradients the Rust test wrote.

Usage: adamw_reference.py DIR. Reads DIR/manifest.json and DIR/inputs.bin (little-endian f32: every parameter's
initial values, then each step's gradients in the order the manifest gives); writes DIR/reference.json and
DIR/reference.bin (the final parameters of every run, f32).

Each preset's parameter groups are computed here from what the preset's namesake does, independently of
gainguard's code:
- classes and width multipliers from microsoft/mup's own `set_base_shapes(model, base, delta=delta)`
  (`p.infshape.ninf() == 2` is matrix-like, `p.infshape.width_mult()` its m);
- `paper` (arXiv 2510.15262): matrix-like lr/m, wd·m^0.5; vector-like lr, wd 0;
- `mup-coupled`: microsoft/mup's `MuAdamW` itself, and the same groups written out per parameter;
- `mup-fixed-wd`: Megatron-LM's muP for Adam as `megatron/core/optimizer/__init__.py` builds it:
  `get_mup_config_overrides` (hidden = not an embedding-class parameter and of dim ≥ 2: lr and eps divided by
  `mup_width_mult`; embedding-class and dim ≤ 1 parameters keep the base lr and eps) merged with
  `get_standard_config_overrides` (`wd_mult = 0` for `len(shape) == 1` or a name matching `*.bias`), where
  `LanguageModule` marks the word embedding and the output layer's weight as embedding-class;
- `standard`: plain `torch.optim.AdamW(model.parameters(), lr, weight_decay)`.
"""

import fnmatch
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import mup


def build_model(names, shapes):
    """A module whose `named_parameters()` are exactly `names` with `shapes` (dots make submodules)."""
    root = torch.nn.Module()
    for name, shape in zip(names, shapes):
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape, dtype=torch.float32)))
    return root


def classes(model):
    """name -> (matrix_like, m) from mup's infshapes."""
    out = {}
    for name, p in model.named_parameters():
        matrix = p.infshape.ninf() == 2
        out[name] = (matrix, float(p.infshape.width_mult()) if matrix else 1.0)
    return out


def groups_for(preset, man, model):
    """name -> (lr, weight_decay, eps) of `preset`, per parameter."""
    lr, wd, eps = man["lr"], man["weight_decay"], man["eps"]
    cls = classes(model)
    out = {}
    for name, p in model.named_parameters():
        matrix, m = cls[name]
        if preset == "paper":
            out[name] = (lr / m, wd * math.sqrt(m), eps) if matrix else (lr, 0.0, eps)
        elif preset == "mup-coupled":
            out[name] = (lr / m, wd * m, eps) if matrix else (lr, wd, eps)
        elif preset == "mup-fixed-wd":
            # Megatron classifies by rank and by its embedding-class marker, not by infshape.
            mult = man["megatron_width_mult"]
            embedding_class = name in man["megatron_embedding_class"]
            vector_like = embedding_class or p.dim() <= 1
            no_decay = len(p.shape) == 1 or fnmatch.fnmatch(name, "*.bias")
            out[name] = (
                lr if vector_like else lr / mult,
                0.0 if no_decay else wd,
                eps if vector_like else eps / mult,
            )
        elif preset == "standard":
            out[name] = (lr, wd, eps)
        else:
            raise ValueError(preset)
    return out


def run(man, data, model, optimizer_groups):
    """Steps `model`'s parameters with the file's gradients; returns (final tensors, per-parameter step counts,
    the groups' (lr, wd) per parameter as the optimizer holds them)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, off in zip(man["names"], man["initial"]):
            params[name].copy_(torch.from_numpy(data[off : off + params[name].numel()]).view(params[name].shape))
    opt = optimizer_groups(model)
    held = {}
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
        for p in g["params"]:
            name = next(n for n, q in params.items() if q is p)
            held[name] = (g["lr"], g["weight_decay"], g["eps"])
    for step, grads in enumerate(man["grads"]):
        opt.zero_grad(set_to_none=True)
        for name, off in zip(man["names"], grads):
            if off is not None:
                params[name].grad = torch.from_numpy(data[off : off + params[name].numel()].copy()).view(params[name].shape)
        torch.nn.utils.clip_grad_norm_(model.parameters(), man["max_grad_norm"])
        # A schedule multiplies each group's own lr (as torch.optim.lr_scheduler.LambdaLR does).
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * man["lr_multipliers"][step]
        opt.step()
    steps = {name: int(opt.state[params[name]]["step"].item()) if params[name] in opt.state else 0 for name in man["names"]}
    final = {name: params[name].detach().clone() for name in man["names"]}
    return final, steps, held


def main():
    root = Path(sys.argv[1])
    man = json.loads((root / "manifest.json").read_text())
    data = np.fromfile(root / "inputs.bin", dtype="<f4")
    betas = (man["beta1"], man["beta2"])

    def fresh():
        model = build_model(man["names"], man["shapes"])
        mup.set_base_shapes(model, man["base"], delta=man["delta"], rescale_params=False)
        return model

    out = {"torch": torch.__version__, "mup": getattr(mup, "__version__", "1.0.0"), "runs": {}}
    blobs = []
    offset = 0

    def record(key, final, steps, held):
        nonlocal offset
        entry = {"steps": steps, "groups": {n: list(v) for n, v in held.items()}, "final": {}}
        for name in man["names"]:
            values = final[name].numpy().astype("<f4").ravel()
            entry["final"][name] = offset
            blobs.append(values)
            offset += values.size
        out["runs"][key] = entry

    for preset in man["presets"]:
        model = fresh()
        table = groups_for(preset, man, model)

        def per_parameter(model, table=table):
            groups = [
                {"params": [p], "lr": table[n][0], "weight_decay": table[n][1], "eps": table[n][2]}
                for n, p in model.named_parameters()
            ]
            return torch.optim.AdamW(groups, lr=man["lr"], betas=betas, eps=man["eps"], weight_decay=man["weight_decay"])

        record(f"{preset}/torch-adamw", *run(man, data, model, per_parameter))

    # The peers themselves.
    def mu_adamw(model):
        return mup.MuAdamW(model.parameters(), lr=man["lr"], betas=betas, eps=man["eps"], weight_decay=man["weight_decay"])

    def plain_adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=man["lr"], betas=betas, eps=man["eps"], weight_decay=man["weight_decay"])

    record("mup-coupled/mup.MuAdamW", *run(man, data, fresh(), mu_adamw))
    record("standard/torch-adamw-model-parameters", *run(man, data, fresh(), plain_adamw))

    np.concatenate(blobs).astype("<f4").tofile(root / "reference.bin")
    (root / "reference.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
