"""μP readouts for PyTorch: the output layer `y = W·(x/m) + b`, with `m = d / base_d` the readout's width
multiplier, as microsoft/mup's `MuReadout` computes it (the input is divided, so the bias is not). Under μP's
learning rates a plain `Linear` head trains m× too hot; these are the opt-in remedy, and the plan reads them as
readouts (no `possible_readout` warning).

    model.lm_head = gainguard.MuReadout(d, vocab, base_in_features=base_d)    # a new head
    gainguard.mup_readout(model, "lm_head")                                   # or convert the one there

With `base_in_features` not given, `gainguard.AdamW(model, base_shapes=...)` sets m from its plan (the width
multiplier of the head's weight), as mup's `set_base_shapes` does."""

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F


class MuReadout(nn.Linear):
    """`nn.Linear(in_features, out_features)` whose forward is `W·(output_mult · x / m) + b`, with
    `m = in_features / base_in_features`. `readout_zero_init` starts W and b at zero (mup's option)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        base_in_features: Optional[int] = None,
        output_mult: float = 1.0,
        readout_zero_init: bool = False,
        device=None,
        dtype=None,
    ):
        self.readout_zero_init = bool(readout_zero_init)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.output_mult = float(output_mult)
        self.width_mult: Optional[float] = None
        if base_in_features is not None:
            self.set_base_in_features(base_in_features)

    def set_base_in_features(self, base_in_features: int) -> None:
        if not (isinstance(base_in_features, int) and base_in_features > 0):
            raise ValueError(f"MuReadout: base_in_features = {base_in_features!r}, expected a positive int (the base model's width)")
        self.width_mult = self.in_features / base_in_features

    def reset_parameters(self) -> None:
        if getattr(self, "readout_zero_init", False):
            with torch.no_grad():
                self.weight.zero_()
                if self.bias is not None:
                    self.bias.zero_()
        else:
            super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width_mult is None:
            raise RuntimeError(
                "MuReadout: its width multiplier m is not known: give base_in_features= (the base model's width), "
                "or build gainguard.AdamW(model, base_shapes=...) on the model, which sets it from the plan"
            )
        return F.linear(self.output_mult * x / self.width_mult, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, width_mult={self.width_mult}"


class MuSharedReadout(MuReadout):
    """A `MuReadout` on the weight `[vocab, d]` of an `nn.Embedding` (a tied head): the same tensor, so the
    optimizer plans and steps it once, as the embedding; only this output path is divided by m. A bias, when
    asked for, is a new `[vocab]` parameter starting at zero."""

    def __init__(self, weight: nn.Parameter, bias: bool = True, *, base_in_features: Optional[int] = None, output_mult: float = 1.0):
        if not (isinstance(weight, torch.Tensor) and weight.dim() == 2):
            raise ValueError(f"MuSharedReadout takes an embedding's [vocab, d] weight, got {_described(weight)}")
        vocab, d = weight.shape
        super().__init__(d, vocab, bias=False, base_in_features=base_in_features, output_mult=output_mult, device="meta", dtype=weight.dtype)
        self.weight = weight
        if bias:
            self.bias = nn.Parameter(torch.zeros(vocab, device=weight.device, dtype=weight.dtype))


def _described(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def mup_readout(model: nn.Module, name: str, base_in_features: Optional[int] = None) -> MuReadout:
    """Replaces the `nn.Linear` at `model.<name>` (a dotted path such as `"lm_head"`) in place by a `MuReadout`
    with the same weight and bias tensors (not copies: a tie, a checkpoint or an optimizer built later sees the
    same parameters), and returns it. A head whose weight is an `nn.Embedding`'s in `model` becomes a
    `MuSharedReadout`."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        head = getattr(parent, child)
    except AttributeError:
        raise ValueError(f"mup_readout: the model has no submodule {name!r}") from None
    if isinstance(head, MuReadout):
        if base_in_features is not None:
            head.set_base_in_features(base_in_features)
        return head
    if not isinstance(head, nn.Linear):
        raise TypeError(f"mup_readout: {name!r} is a {type(head).__name__}, expected an nn.Linear (the output layer)")
    shared = any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.weight is head.weight for m in model.modules())
    if shared:
        readout = MuSharedReadout(head.weight, bias=False, base_in_features=base_in_features)
        readout.bias = head.bias
    else:
        readout = MuReadout(
            head.in_features, head.out_features, bias=False, base_in_features=base_in_features, device="meta", dtype=head.weight.dtype
        )
        readout.weight = head.weight
        readout.bias = head.bias
    readout.train(head.training)
    setattr(parent, child, readout)
    return readout
