"""What the package needs of torch.distributed: DTensor parameters (FSDP2's `fully_shard`, tensor parallel) seen
through their local shards, the one all-reduce that makes a step's non-finite skip and gradient clipping a
decision of the whole model, and the names wrappers give parameters.

Nothing here imports torch.distributed at module load: a build of torch without it still steps plain tensors."""

from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch

# Prefixes that wrappers put before the wrapped module's parameter names, in the order they are stripped:
# DDP and DataParallel (`module.`, at the front only), torch.compile (`_orig_mod.`), FSDP1
# (`_fsdp_wrapped_module.`) and activation checkpointing (`_checkpoint_wrapped_module.`), the last three at any
# depth (each wraps a submodule as well as the whole model).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_ANY_DEPTH = WRAPPER_PREFIXES[1:]


def dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    DTensor = dtensor_type()
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the same storage, no copy), or `t` itself."""
    if is_dtensor(t):
        return t._local_tensor
    return t


def strip_wrappers(name: str) -> str:
    """`name` without the wrapper prefixes of WRAPPER_PREFIXES."""
    parts = name.split(".")
    if parts and parts[0] == "module" and len(parts) > 1:
        parts = parts[1:]
    drop = {p.rstrip(".") for p in _ANY_DEPTH}
    return ".".join(p for p in parts if p not in drop)


def canonical_names(names: List[str], base: Mapping[str, object], tied_to: Mapping[str, str]) -> Dict[str, str]:
    """Each given name -> the base shapes' name for it: itself when the base has it, else the name with the
    wrapper prefixes stripped. A name found under neither (and not a tied alias, which takes its tensor's
    first name's shapes) is an error naming it and the prefixes tried."""
    out = {}
    for name in names:
        if name in base:
            out[name] = name
            continue
        stripped = strip_wrappers(name)
        if stripped in base or name in tied_to:
            out[name] = stripped if stripped in base else name
            continue
        tried = ", ".join(repr(p) for p in WRAPPER_PREFIXES)
        hint = f" (nor as {stripped!r})" if stripped != name else ""
        raise ValueError(
            f"parameter {name!r} is missing in the base shapes{hint}: the wrapper prefixes tried were {tried}; base "
            f"has {len(base)} parameters, e.g. {sorted(base)[:3]}. Take the base shapes from the same (unwrapped) "
            "model, or name the parameters as the base does"
        )
    seen: Dict[str, str] = {}
    for name, canon in out.items():
        if canon in seen and seen[canon] != name:
            raise ValueError(f"parameters {seen[canon]!r} and {name!r} both stand for the base's {canon!r}")
        seen[canon] = name
    return out


class GradReduction:
    """How a step's gradient norm and non-finite check span ranks.

    Plain tensors: nothing to reduce. Under DDP every rank holds the same, already all-reduced gradient, so a
    local decision is the global one (reducing it again would count every gradient `world_size` times).
    With DTensor parameters each rank holds a shard: one all-reduce (SUM, float64, on the default process
    group) of `[Σ g² weighted, one non-finite flag per parameter]`. A shard held identically by `r` ranks (a
    `Replicate` mesh dimension, or ranks outside the mesh such as a data-parallel dimension around tensor
    parallel) is weighted `1/r`, so that the sum counts each gradient entry once; plain tensors next to
    DTensors (parameters tensor parallel leaves alone) count as replicated on every rank."""

    def __init__(self, names: List[str], weights: Optional[List[float]]):
        self._index = {n: i for i, n in enumerate(names)}
        self._names = list(names)
        self._weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)

    @classmethod
    def of(cls, named: Iterable[Tuple[str, torch.Tensor]]) -> "GradReduction":
        named = list(named)
        names = [n for n, _ in named]
        if not any(is_dtensor(p) for _, p in named):
            return cls(names, None)
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("gainguard.AdamW got DTensor parameters but torch.distributed has no process group")
        world = dist.get_world_size()
        return cls(names, [_distinct_shards(n, p) / world for n, p in named])

    def distributed(self) -> bool:
        return self._weights is not None

    def norm_and_first_nonfinite(self, grads: List[torch.Tensor], names: List[str]) -> Tuple[float, Optional[str]]:
        """The whole model's gradient 2-norm and the first parameter (in the optimizer's order) whose gradient
        holds NaN or Inf on any rank; every rank gets the same. `grads` are the local tensors of the parameters
        named `names` that have a gradient here; the packed vector has a slot for every parameter, so ranks
        whose parameters differ in having a gradient still reduce the same length."""
        import torch.distributed as dist

        n = len(self._names)
        sq = torch.zeros(n, dtype=torch.float64)
        if grads:
            idx = torch.tensor([self._index[name] for name in names])
            sq[idx] = torch.stack([g.double() for g in torch._foreach_norm(grads)]) ** 2
        finite = torch.isfinite(sq)
        for name, g in zip(names, grads):
            # A float32 norm that overflowed is a large finite gradient, not a NaN or Inf in it.
            i = self._index[name]
            if not finite[i] and bool(torch.isfinite(g).all()):
                sq[i] = float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2
                finite[i] = True
        packed = torch.empty(1 + n, dtype=torch.float64)
        packed[0] = (torch.where(finite, sq, torch.zeros_like(sq)) * self._weights).sum()
        packed[1:] = (~finite).double()
        dist.all_reduce(packed)
        flags = packed[1:].tolist()
        bad = next((name for name, f in zip(self._names, flags) if f > 0), None)
        norm = float("nan") if bad is not None else float(packed[0].sqrt())
        return norm, bad


def _distinct_shards(name: str, p: torch.Tensor) -> int:
    """How many different shards of `p` the ranks hold: the product of the mesh dimensions it is sharded on."""
    if not is_dtensor(p):
        return 1
    n = 1
    for size, placement in zip(p.device_mesh.shape, p.placements):
        # A shard: Shard, or the strided shard of FSDP2 over a tensor-parallel shard of the same dimension
        # (`_StridedShard`, whose is_shard() is False).
        if placement.is_shard() or hasattr(placement, "split_factor"):
            n *= size
        elif not placement.is_replicate():
            raise ValueError(f"parameter {name!r} is a DTensor placed {p.placements}: gainguard.AdamW takes Shard and Replicate placements")
    return n
