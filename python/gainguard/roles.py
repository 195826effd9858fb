"""Parameter roles read from the module tree, where the shape cannot tell: PyTorch stores an `nn.Embedding`
`[num, dim]` as a readout `[vocab, d]` is stored, so by shape alone both look like an output layer. The roles go
to the Rust plan as overrides (`{"pattern": name, "role": ...}`), which it already takes."""

from typing import Dict, List, Tuple

import torch
from torch import nn

EMBEDDING, READOUT = "embedding", "readout"

# Characters the plan's override patterns read as globs: a name holding one cannot be matched exactly.
_GLOB = ("*", "?")


def module_roles(model: nn.Module) -> Tuple[Dict[str, str], Dict[str, str]]:
    """`(roles, aliases)` of `model`'s parameters, every name included (`remove_duplicate=False`).

    roles: name -> `embedding` for the weight of an `nn.Embedding` / `nn.EmbeddingBag`, `readout` for the weight
    of a `gainguard.MuReadout`; every name of a tensor gets its role, and a tensor that is both (a head tied to
    its embedding) is an embedding, which is how the lookup reads it. aliases: name -> the first name of the same
    tensor (a head tied to an embedding), as `named_parameters()` would drop it."""
    from .mup import MuReadout

    role_of: Dict[int, str] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            role_of[id(weight)] = EMBEDDING
        elif isinstance(module, MuReadout):
            role_of.setdefault(id(weight), READOUT)
    roles: Dict[str, str] = {}
    aliases: Dict[str, str] = {}
    first_name: Dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in role_of:
            roles[name] = role_of[id(p)]
        if id(p) in first_name:
            aliases[name] = first_name[id(p)]
        else:
            first_name[id(p)] = name
    return roles, aliases


def role_overrides(roles: Dict[str, str]) -> List[dict]:
    """The roles as plan overrides. They may name parameters not given to the optimizer (a base model's alias),
    and go before the user's overrides, which win field by field."""
    return [
        {"pattern": name, "role": role, "may_match_nothing": True}
        for name, role in sorted(roles.items())
        if not any(c in name for c in _GLOB)
    ]
