"""Base shapes: the proxy model's parameter shapes (and optionally the same model at a second width, the delta),
from which the Rust plan finds each parameter's width dimensions and width multiplier, as microsoft/mup's
`set_base_shapes(model, base, delta=delta)` does."""

import json
import os
from typing import Dict, List, Optional, Union

import torch

from . import _native
from .roles import module_roles

ShapeMap = Dict[str, List[int]]


class BaseShapes:
    """Shapes of the base (proxy) model, and of the delta model when given. Checked by the Rust side.

    Taken from modules, they also carry what the module tree says and the shapes cannot: `roles` (name ->
    `embedding` for `nn.Embedding` weights, `readout` for `gainguard.MuReadout` ones) and `aliases` (a tied
    name -> the name it shares its tensor with). A shapes file carries neither: declare roles by override."""

    def __init__(
        self,
        base: ShapeMap,
        delta: Optional[ShapeMap] = None,
        roles: Optional[Dict[str, str]] = None,
        aliases: Optional[Dict[str, str]] = None,
    ):
        self.base = {str(k): [int(d) for d in v] for k, v in base.items()}
        self.delta = None if delta is None else {str(k): [int(d) for d in v] for k, v in delta.items()}
        self.roles = dict(roles or {})
        self.aliases = dict(aliases or {})

    def to_json(self) -> str:
        """The JSON the Rust side reads and writes (`BaseShapes::to_json_string`)."""
        raw = self.base if self.delta is None else {"base": self.base, "delta": self.delta}
        return _native.parse_base_shapes(json.dumps(raw), "base_shapes")

    def for_params(self, names: List[str], tied_to: Dict[str, str]) -> "BaseShapes":
        """These shapes for an optimizer given parameters `names`, of which `tied_to` maps each tied alias to
        the name it shares its tensor with: an alias of the base model that is not given (`named_parameters()`
        drops it) is left out, and a given alias the shapes lack takes the shapes of its tensor's first name."""
        given = set(names)
        base = {k: v for k, v in self.base.items() if k in given or k not in self.aliases}
        delta = None if self.delta is None else {k: v for k, v in self.delta.items() if k in given or k not in self.aliases}
        for alias, first in tied_to.items():
            if alias not in base and first in base:
                base[alias] = base[first]
                if delta is not None and first in delta:
                    delta[alias] = delta[first]
        return BaseShapes(base, delta, self.roles, self.aliases)

    def save(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def from_json(cls, text: str) -> "BaseShapes":
        value = json.loads(text)
        if isinstance(value, dict) and isinstance(value.get("base"), dict):
            return cls(value["base"], value.get("delta"))
        return cls(value)

    def __repr__(self) -> str:
        return f"BaseShapes({len(self.base)} parameters, delta={'yes' if self.delta is not None else 'no'})"


def _shapes_of(model, which: str) -> ShapeMap:
    if isinstance(model, torch.nn.Module):
        # Tied names included: an optimizer given `named_parameters(remove_duplicate=False)` finds them.
        return {name: list(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    if isinstance(model, dict):
        return {str(k): list(v.shape) if isinstance(v, torch.Tensor) else [int(d) for d in v] for k, v in model.items()}
    raise TypeError(
        f"base_shapes: the {which} model must be a torch.nn.Module, a dict of name -> shape, or (base only) a path "
        f"to a shapes JSON file; got {type(model).__name__}"
    )


def base_shapes(base_model, delta_model=None) -> BaseShapes:
    """The base shapes of `base_model` (a torch.nn.Module, possibly on the meta device, or a dict of name ->
    shape), with `delta_model` (the same model at another width) declaring the width dimensions. A path (str or
    os.PathLike) instead reads the JSON file the Rust side writes (`{name: shape}` or `{"base": ..., "delta": ...}`).
    Modules also give the roles of their parameters (`nn.Embedding` weights are embeddings, `gainguard.MuReadout`
    weights readouts) and their tied names.
    """
    if isinstance(base_model, BaseShapes):
        return base_model
    if isinstance(base_model, (str, os.PathLike)):
        if delta_model is not None:
            raise TypeError("base_shapes: a shapes file carries its own delta shapes; give delta_model only with a model")
        return BaseShapes.from_json(_native.read_base_shapes(os.fspath(base_model)))
    base = _shapes_of(base_model, "base")
    delta = None if delta_model is None else _shapes_of(delta_model, "delta")
    roles, aliases = {}, {}
    for model in (delta_model, base_model):
        if isinstance(model, torch.nn.Module):
            r, a = module_roles(model)
            roles.update(r)
            aliases.update(a)
    shapes = BaseShapes(base, delta, roles, aliases)
    shapes.to_json()  # the Rust side's checks (a malformed shape) fail here, not at the optimizer
    return shapes
