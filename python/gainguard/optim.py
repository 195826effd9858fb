"""`gainguard.AdamW`: a `torch.optim.Optimizer` whose param groups carry the width-scaled (lr, wd) of the Rust
plan, and whose step is the Rust core's (the fused CPU loop on the CPU, ATen's fused AdamW on CUDA)."""

import json
import math
import warnings
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

import torch

from . import _distributed, _native
from ._distributed import canonical_names, local
from .plan import Plan
from .roles import module_roles, role_overrides
from .shapes import BaseShapes, base_shapes as _base_shapes


class AdamW(torch.optim.Optimizer):
    """Width-scaled AdamW over `params`: the model itself (an `nn.Module`, whose module tree also gives the
    roles of its parameters: `nn.Embedding` weights are embeddings, `gainguard.MuReadout` ones readouts), or its
    named parameters (pairs of name and tensor, as `model.named_parameters()`, with or without
    `remove_duplicate=False`: a tensor given under two names, a tied head, is planned and stepped once).

    Each parameter's lr, weight decay and Adam epsilon come from the rule (`paper`, `mup-coupled`,
    `mup-fixed-wd`, `standard`, or `gamma=G[,lr_exponent=E]`) applied to its width multiplier against
    `base_shapes`; parameters that share them form one param group, whose `lr` and `weight_decay` PyTorch's LR
    schedulers scale as for any optimizer. The update is PyTorch's AdamW with coupled decay
    (`theta <- theta * (1 - lr*wd)`; `decay="independent"`: `1 - wd`). As `torch.optim.AdamW`, a parameter
    whose `.grad` is None is skipped and each parameter counts its own steps (`state[p]["step"]`).

    `nonfinite_grad`: when a gradient holds NaN or Inf, `"skip"` (default) changes nothing and counts the step
    (`skipped_steps`), `"error"` raises FloatingPointError naming the parameter (nothing changed), `"step"`
    steps anyway, as torch does.

    The plan's warnings (`possible_readout`, ...) are raised as `gainguard.PlanWarning`s, one per parameter;
    `plan()` returns the plan's rows (`str(opt.plan())` is the table).
    """

    def __init__(
        self,
        params: Union[torch.nn.Module, Iterable[Tuple[str, torch.Tensor]]],
        base_shapes,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        rule: str = "paper",
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        decay: str = "coupled",
        overrides: Optional[List[dict]] = None,
        nonfinite_grad: str = "skip",
        fused: bool = True,
        max_grad_norm: Optional[float] = None,
    ):
        model = params if isinstance(params, torch.nn.Module) else None
        named = _named(params.named_parameters(remove_duplicate=False) if model is not None else params)
        if decay not in ("coupled", "independent"):
            raise ValueError(f'decay = {decay!r}: expected "coupled" or "independent"')
        _native.parse_nonfinite_grad(str(nonfinite_grad))
        beta1, beta2 = (float(b) for b in betas)
        for name, v, ok in (("beta1", beta1, 0 <= beta1 < 1), ("beta2", beta2, 0 <= beta2 < 1), ("eps", eps, eps >= 0)):
            if not ok:
                raise ValueError(f"{name} = {v} is out of range")
        if max_grad_norm is not None and not (float(max_grad_norm) > 0 and math.isfinite(float(max_grad_norm))):
            raise ValueError(f"max_grad_norm = {max_grad_norm}: expected a positive finite number (or None: no clipping)")
        shapes = base_shapes if isinstance(base_shapes, BaseShapes) else _base_shapes(base_shapes)
        tied_to = _tied(named)
        # Wrappers (DDP, torch.compile, FSDP1, activation checkpointing) add prefixes to the names the base
        # model's shapes were taken under: the plan sees the base model's names.
        plan_name = canonical_names([n for n, _ in named], shapes.base, tied_to)
        tied_to = {plan_name[a]: plan_name[f] for a, f in tied_to.items()}
        shapes = shapes.for_params([plan_name[n] for n, _ in named], tied_to)
        roles = dict(shapes.roles)
        if model is not None:
            roles.update({plan_name.get(n, n): r for n, r in module_roles(model)[0].items()})
        given = {plan_name[n] for n, _ in named}
        derived = role_overrides({n: r for n, r in roles.items() if n in given})
        all_overrides = derived + list(overrides or [])
        native_plan = _native.build_plan(
            [plan_name[n] for n, _ in named],
            [list(p.shape) for _, p in named],
            [_storage_id(p) for _, p in named],
            shapes.to_json(),
            str(rule),
            float(lr),
            float(weight_decay),
            float(eps),
            json.dumps(all_overrides) if all_overrides else None,
        )
        plan = Plan(native_plan)
        if model is not None:
            _set_readout_multipliers(model, plan, plan_name)
        for w in plan.warnings:
            warnings.warn(w, stacklevel=2)
        groups = {}
        self._decision_of = {}
        for index, ((name, p), (_, g_lr, g_wd, g_eps, cls, m, alias_of)) in enumerate(zip(named, native_plan.decisions())):
            if alias_of is not None:
                continue  # stepped once, under the name it is tied to
            key = (g_lr, g_wd, g_eps, cls)
            if key not in groups:
                groups[key] = {
                    "params": [],
                    "lr": g_lr,
                    "weight_decay": g_wd,
                    "eps": g_eps,
                    "betas": (beta1, beta2),
                    "width_scaled_lr": g_lr,
                    "width_scaled_weight_decay": g_wd,
                    "class": cls,
                }
            groups[key]["params"].append((name, p))
            self._decision_of[name] = index
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=(beta1, beta2), eps=eps)
        super().__init__(list(groups.values()), defaults)
        self._plan = native_plan
        self._rows = plan
        self.decay = decay
        self.nonfinite_grad = nonfinite_grad
        self.fused = bool(fused)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self._reduction = _distributed.GradReduction.of(
            (name, p) for group in self.param_groups for name, p in zip(group["param_names"], group["params"])
        )
        self.step_calls = 0
        self.skipped_steps = 0
        self._skip_warned = False
        self.last_step: Optional[StepOutcome] = None

    def plan(self) -> Plan:
        """The plan's rows: each parameter's class, width multiplier, lr, wd and warnings; `str()` is the table."""
        return self._rows

    def plan_json(self) -> str:
        return self._plan.json()

    def add_param_group(self, param_group):
        if getattr(self, "_plan", None) is not None:
            raise RuntimeError("gainguard.AdamW plans its groups from the model's shapes; build a new optimizer instead of add_param_group")
        super().add_param_group(param_group)

    def state_dict(self):
        sd = super().state_dict()
        sd["gainguard"] = {"step_calls": self.step_calls, "skipped_steps": self.skipped_steps}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("gainguard", {})
        # torch casts loaded moments to the parameter's dtype; bf16/f16 parameters keep f32 moments here.
        params = [p for group in self.param_groups for p in group["params"]]
        f32_moments = {
            index: {k: v for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")}
            for index, s in state_dict.get("state", {}).items()
            if isinstance(index, int) and index < len(params) and params[index].dtype in (torch.bfloat16, torch.float16)
        }
        super().load_state_dict(state_dict)
        for index, moments in f32_moments.items():
            p = params[index]
            for k, v in moments.items():
                self.state[p][k] = v.to(device=p.device, dtype=torch.float32, copy=True)
        self.step_calls = int(extra.get("step_calls", 0))
        self.skipped_steps = int(extra.get("skipped_steps", 0))

    def _slots(self):
        """(decision index, tensor, decay horizon) of every parameter, for the monitor: the horizon is this
        optimizer's H = sum of lr_t * wd_t over the steps applied to the parameter (0 before its first)."""
        return [
            (self._decision_of[name], p, float(self.state[p].get("decay_horizon", 0.0)) if p in self.state else 0.0)
            for group in self.param_groups
            for name, p in zip(group["param_names"], group["params"])
        ]

    def _multipliers(self):
        """What a scheduler did to the width-scaled values: the first group's lr and wd over its planned ones."""
        lr_m = wd_m = 1.0
        for group in self.param_groups:
            if group["width_scaled_lr"] > 0:
                lr_m = group["lr"] / group["width_scaled_lr"]
                break
        for group in self.param_groups:
            if group["width_scaled_weight_decay"] > 0:
                wd_m = group["weight_decay"] / group["width_scaled_weight_decay"]
                break
        return lr_m, wd_m

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches = []
        all_grads, all_names = [], []
        without_grad = 0
        for group in self.param_groups:
            owners, params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], [], []
            for name, p in zip(group["param_names"], group["params"]):
                g = p.grad
                if g is None:
                    without_grad += 1
                    continue
                g = _local_grad(name, p, g)
                state = self.state[p]
                if len(state) == 0:
                    moment_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    # A DTensor parameter's moments are DTensors placed as it is (what DCP saves and reshards).
                    state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
                # The Rust core steps this rank's shard: the local tensors of a DTensor share its storage.
                owners.append(p)
                params.append(local(p))
                grads.append(g)
                exp_avgs.append(local(state["exp_avg"]))
                exp_avg_sqs.append(local(state["exp_avg_sq"]))
                steps.append(state["step"])
                all_names.append(name)
            all_grads.extend(grads)
            if params:
                batches.append((group, owners, params, grads, exp_avgs, exp_avg_sqs, steps))

        t = self.step_calls + 1
        grad_norm, bad_name, skip, error = self._check(all_grads, all_names, t)
        if error is not None:
            raise FloatingPointError(error)
        self.step_calls = t
        lr_m, wd_m = self._multipliers()
        clipped = False
        if skip:
            self.skipped_steps += 1
            if not self._skip_warned:
                self._skip_warned = True
                warnings.warn(
                    f"gainguard: step {t}: the gradient of {bad_name!r} holds NaN or Inf; the step was skipped (no "
                    "parameter or moment changed). Later skips are only counted (AdamW.skipped_steps).",
                    RuntimeWarning,
                    stacklevel=2,
                )
        else:
            if self.max_grad_norm is not None and grad_norm is not None and math.isfinite(grad_norm):
                clipped = _clip(all_grads, grad_norm, self.max_grad_norm)
            for group, owners, params, grads, exp_avgs, exp_avg_sqs, steps in batches:
                beta1, beta2 = group["betas"]
                horizons = _native.adamw_step(
                    params, grads, exp_avgs, exp_avg_sqs, steps,
                    [float(self.state[p].get("decay_horizon", 0.0)) for p in owners],
                    float(group["lr"]), float(group["weight_decay"]), float(beta1), float(beta2), float(group["eps"]),
                    self.decay, self.fused,
                )
                for p, h in zip(owners, horizons):
                    self.state[p]["decay_horizon"] = h
        self.last_step = StepOutcome(t, lr_m, wd_m, grad_norm, bad_name, skip, self.skipped_steps, without_grad, clipped)
        return loss

    def _check(self, grads, names, t):
        """`(grad_norm, nonfinite, skip, error)` of step `t`: over this process's gradients by the native rule,
        or, when the parameters are sharded over ranks, over the whole model by one all-reduce, so that every
        rank takes the same decision."""
        mode = self.nonfinite_grad
        if mode == "step" and self.max_grad_norm is None:
            return None, None, False, None
        if self._reduction.distributed():
            norm, bad = self._reduction.norm_and_first_nonfinite(grads, names)
            return _native.decide_step(mode, bad, t, norm)
        # Clipping needs the norm even when a non-finite gradient is stepped anyway.
        norm, bad, skip, error = _native.check_step(grads, names, t, "skip" if mode == "step" else mode)
        if mode == "step":
            return norm, bad, False, None
        return norm, bad, skip, error

class StepOutcome(NamedTuple):
    """What the last `step()` did, for step hooks (the monitor's post-hook reads it): `nonfinite_grad` names the
    first parameter whose gradient held NaN or Inf, `skipped_without_grad` counts parameters without `.grad`."""

    step: int
    lr_multiplier: float
    wd_multiplier: float
    grad_norm: Optional[float]
    nonfinite_grad: Optional[str]
    skipped: bool
    skipped_steps_total: int
    skipped_without_grad: int
    clipped: bool = False


def _local_grad(name: str, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The gradient's local tensor, checked dense; a DTensor parameter's gradient must be placed as it is."""
    if _distributed.is_dtensor(p):
        if not _distributed.is_dtensor(g) or tuple(g.placements) != tuple(p.placements):
            where = g.placements if _distributed.is_dtensor(g) else "a plain tensor"
            raise RuntimeError(f"the gradient of DTensor parameter {name!r} is placed {where}, the parameter {p.placements}")
        g = g.to_local()
    if type(g) is not torch.Tensor or g.layout != torch.strided:
        raise RuntimeError(f"gainguard.AdamW takes dense gradients; the gradient of {name!r} is a {_kind(g)}")
    return g


def _clip(grads: List[torch.Tensor], norm: float, max_norm: float) -> bool:
    """`torch.nn.utils.clip_grad_norm_`'s scaling by `max / (norm + 1e-6)` when below 1, in place."""
    coef = max_norm / (norm + 1e-6)
    if coef >= 1.0:
        return False
    torch._foreach_mul_(grads, coef)
    return True


def _kind(p: torch.Tensor) -> str:
    if _distributed.is_dtensor(p):
        inner = _kind(p._local_tensor)
        return "DTensor" if inner == "tensor" else f"DTensor whose local shard is a {inner}"
    if type(p) not in (torch.Tensor, torch.nn.Parameter):
        return f"{type(p).__module__}.{type(p).__qualname__} (a tensor subclass)"
    if p.is_nested:
        return "nested tensor"
    if p.layout != torch.strided:
        return f"{str(p.layout).replace('torch.', '')} tensor"
    if p.is_quantized:
        return "quantized tensor"
    return "tensor"


def _check_dense(name: str, p: torch.Tensor) -> None:
    """The Rust core steps plain dense strided tensors; anything else is refused before it can reach it."""
    kind = _kind(p)
    if kind in ("tensor", "DTensor"):
        return
    raise ValueError(
        f"parameter {name!r} is a {kind}: gainguard.AdamW steps dense (strided) tensors only (torch.Tensor, "
        "nn.Parameter, or a DTensor of FSDP2 / tensor parallel whose local shard is one; not sparse, nested, "
        "quantized or another tensor subclass)"
    )


def _tied(named: List[Tuple[str, torch.Tensor]]) -> Dict[str, str]:
    """Each name whose tensor an earlier name already gave -> that earlier name."""
    first: Dict[int, str] = {}
    tied = {}
    for name, p in named:
        key = _storage_id(p)
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return tied


def _set_readout_multipliers(model: torch.nn.Module, plan: Plan, plan_name: Dict[str, str]) -> None:
    """Sets each `gainguard.MuReadout`'s m from the plan (its weight's width multiplier), or checks the one it
    was given against it."""
    from .mup import MuReadout

    names = {id(p): plan_name.get(n, n) for n, p in model.named_parameters(remove_duplicate=False)}
    for module_name, module in model.named_modules():
        if not isinstance(module, MuReadout) or id(module.weight) not in names:
            continue
        m = plan[names[id(module.weight)]].m
        if module.width_mult is None:
            module.width_mult = m
        elif abs(module.width_mult - m) > 1e-9 * m:
            raise ValueError(
                f"MuReadout {module_name!r}: its width multiplier {module.width_mult} (from base_in_features) differs from "
                f"the plan's {m} for {names[id(module.weight)]!r}; give the base model's width, or leave base_in_features "
                "unset for gainguard.AdamW to set it"
            )


def _named(named_parameters) -> List[Tuple[str, torch.Tensor]]:
    if isinstance(named_parameters, torch.Tensor):
        raise TypeError("gainguard.AdamW takes named parameters (model.named_parameters()), not a tensor")
    named = list(named_parameters)
    if not named:
        raise ValueError("gainguard.AdamW got no parameters")
    seen = set()
    for i, item in enumerate(named):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                f"gainguard.AdamW takes (name, tensor) pairs such as model.named_parameters(); item {i} is {type(item).__name__}"
            )
        name, p = item
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameter {name!r} is a {type(p).__name__}, expected a torch.Tensor")
        _check_dense(name, p)
        if not p.is_leaf:
            raise ValueError(
                f"parameter {name!r} is not a leaf tensor (it was computed from other tensors); an optimizer steps "
                "leaf tensors such as nn.Parameter (use .detach().requires_grad_())"
            )
        if name in seen:
            raise ValueError(f"parameter {name!r} appears twice")
        seen.add(name)
    return named


def _storage_id(p: torch.Tensor) -> int:
    """Tied parameters share one storage (and the same view of it); they are planned and stepped once."""
    # data_ptr() is 0 for meta and empty tensors, which share nothing; a DTensor's is its local shard's.
    t = local(p)
    return t.data_ptr() or id(p)
