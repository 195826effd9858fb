"""microsoft/mup's verdict on base/delta/target shapes, for plugin/tests/mup_base_shapes.rs.

Reads a JSON list of cases {"base": {name: shape}, "delta": {...}, "target": {...}} from argv[1]; for each,
builds a torch module whose parameters have the target's names and shapes, calls mup's own
`set_base_shapes(model, base, delta=delta)` and writes, per parameter, what mup made of it: the infinite
(width) dimensions, ninf, InfShape.main_idx and width_mult(). Writes a JSON list of {name: ...} to argv[2].
"""
import json
import sys

import torch
from torch import nn
from mup import set_base_shapes


def module_with(shapes):
    root = nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))
    return root


def verdict(case):
    model = module_with(case["target"])
    assert {n for n, _ in model.named_parameters()} == set(case["target"]), "module names differ from the case's"
    set_base_shapes(model, case["base"], rescale_params=False, delta=case["delta"], do_assert=False)
    out = {}
    for name, p in model.named_parameters():
        s = p.infshape
        out[name] = {
            "inf_dims": [i for i, d in enumerate(s) if d.isinf()],
            "ninf": s.ninf(),
            "main_idx": s.main_idx,
            "width_mult": float(s.width_mult()),
        }
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    with open(sys.argv[2], "w") as f:
        json.dump([verdict(c) for c in cases], f)
