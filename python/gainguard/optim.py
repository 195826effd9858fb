"""`gainguard.AdamW`: a `torch.optim.Optimizer` whose param groups carry the width-scaled (lr, wd) of the Rust
plan, and whose step is the Rust core's (the fused CPU loop on the CPU, ATen's fused AdamW on CUDA)."""

import json
import warnings
from typing import Iterable, List, Optional, Tuple

import torch

from . import _native
from .shapes import BaseShapes, base_shapes as _base_shapes

_NONFINITE = ("skip", "step", "error")


class AdamW(torch.optim.Optimizer):
    """Width-scaled AdamW over `named_parameters` (pairs of name and tensor, as `model.named_parameters()`).

    Each parameter's lr, weight decay and Adam epsilon come from the rule (`paper`, `mup-coupled`,
    `mup-fixed-wd`, `standard`, or `gamma=G[,lr_exponent=E]`) applied to its width multiplier against
    `base_shapes`; parameters that share them form one param group, whose `lr` and `weight_decay` PyTorch's LR
    schedulers scale as for any optimizer. The update is PyTorch's AdamW with coupled decay
    (`theta <- theta * (1 - lr*wd)`; `decay="independent"`: `1 - wd`). As `torch.optim.AdamW`, a parameter
    whose `.grad` is None is skipped and each parameter counts its own steps (`state[p]["step"]`).

    `nonfinite_grad`: when a gradient holds NaN or Inf, `"skip"` (default) changes nothing and counts the step
    (`skipped_steps`), `"error"` raises FloatingPointError naming the parameter (nothing changed), `"step"`
    steps anyway, as torch does.
    """

    def __init__(
        self,
        named_parameters: Iterable[Tuple[str, torch.Tensor]],
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
    ):
        named = _named(named_parameters)
        if decay not in ("coupled", "independent"):
            raise ValueError(f'decay = {decay!r}: expected "coupled" or "independent"')
        if nonfinite_grad not in _NONFINITE:
            raise ValueError(f"nonfinite_grad = {nonfinite_grad!r}: expected one of {', '.join(_NONFINITE)}")
        beta1, beta2 = (float(b) for b in betas)
        for name, v, ok in (("beta1", beta1, 0 <= beta1 < 1), ("beta2", beta2, 0 <= beta2 < 1), ("eps", eps, eps >= 0)):
            if not ok:
                raise ValueError(f"{name} = {v} is out of range")
        shapes = base_shapes if isinstance(base_shapes, BaseShapes) else _base_shapes(base_shapes)
        plan = _native.build_plan(
            [n for n, _ in named],
            [list(p.shape) for _, p in named],
            [_storage_id(p) for _, p in named],
            shapes.to_json(),
            str(rule),
            float(lr),
            float(weight_decay),
            float(eps),
            None if overrides is None else json.dumps(overrides),
        )
        groups = {}
        self._decision_of = {}
        for index, ((name, p), (_, g_lr, g_wd, g_eps, cls, m, tied_to)) in enumerate(zip(named, plan.decisions())):
            if tied_to is not None:
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
        self._plan = plan
        self.decay = decay
        self.nonfinite_grad = nonfinite_grad
        self.fused = bool(fused)
        self.step_calls = 0
        self.skipped_steps = 0
        self._skip_warned = False
        self._observers = []

    def plan(self) -> str:
        """The rule table: each parameter's class, width multiplier, lr and wd."""
        return self._plan.table()

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
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for name, p in zip(group["param_names"], group["params"]):
                g = p.grad
                if g is None:
                    without_grad += 1
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"gainguard.AdamW does not take sparse gradients (parameter {name!r})")
                state = self.state[p]
                if len(state) == 0:
                    moment_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(g)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
                all_names.append(name)
            all_grads.extend(grads)
            if params:
                batches.append((group, params, grads, exp_avgs, exp_avg_sqs, steps))

        t = self.step_calls + 1
        grad_norm, bad = None, None
        if self.nonfinite_grad != "step":
            grad_norm, bad = _native.check_gradients(all_grads)
        bad_name = None if bad is None else all_names[bad]
        if bad_name is not None and self.nonfinite_grad == "error":
            raise FloatingPointError(
                f"step {t}: the gradient of {bad_name!r} holds NaN or Inf (global gradient norm {grad_norm}); "
                "nothing was changed (nonfinite_grad='error')"
            )
        skip = bad_name is not None
        self.step_calls = t
        lr_m, wd_m = self._multipliers()
        slots = self._slots() if self._observers else None
        for o in self._observers:
            o.before_step(t, slots)
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
            for group, params, grads, exp_avgs, exp_avg_sqs, steps in batches:
                beta1, beta2 = group["betas"]
                horizon = _native.adamw_step(
                    params, grads, exp_avgs, exp_avg_sqs, steps,
                    float(group["lr"]), float(group["weight_decay"]), float(beta1), float(beta2), float(group["eps"]),
                    self.decay, self.fused,
                )
                # What this step's decay adds to each stepped parameter's decay horizon (lr*wd, coupled; wd, independent).
                for p in params:
                    self.state[p]["decay_horizon"] = self.state[p].get("decay_horizon", 0.0) + horizon
        if self._observers:
            slots = self._slots()
        for o in self._observers:
            o.after_step(t, slots, lr_m, wd_m, grad_norm, bad_name, skip, self.skipped_steps, without_grad)
        return loss


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
    # data_ptr() is 0 for meta and empty tensors, which share nothing.
    return p.data_ptr() or id(p)
