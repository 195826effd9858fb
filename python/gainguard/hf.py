"""gainguard for Hugging Face's `transformers.Trainer` (`pip install gainguard[hf]`):

    base = gainguard.base_shapes(proxy_model, delta_model)            # the same config at two small widths
    trainer = Trainer(
        model=model, args=args, train_dataset=data,
        optimizers=gainguard.hf.optimizers(model, args, base),        # (gainguard.AdamW, scheduler)
        callbacks=[gainguard.hf.GainguardCallback(run="wide", listen="127.0.0.1:9464")],
    )

`optimizers` reads the base lr, weight decay, Adam's betas and eps, the warmup and the scheduler type from the
`TrainingArguments`, as the Trainer's own optimizer would; the rule scales them per parameter. The callback
attaches `gainguard.monitor` when training begins, reports each logged loss (set `logging_steps=1` for a loss
per step), adds the learning rates each class stepped with to the logs and closes the monitor when training ends."""

import logging
from typing import Dict, Optional, Tuple

import torch

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("gainguard.hf needs Hugging Face transformers: pip install 'gainguard[hf]'") from e

from .monitor import Monitor, monitor
from .optim import AdamW

logger = logging.getLogger("gainguard.hf")


def optimizers(
    model: torch.nn.Module,
    args: "transformers.TrainingArguments",
    base_shapes,
    num_training_steps: Optional[int] = None,
    **adamw_kwargs,
) -> Tuple[AdamW, torch.optim.lr_scheduler.LRScheduler]:
    """`(gainguard.AdamW, scheduler)` for `Trainer(optimizers=...)`: the optimizer over `model` against
    `base_shapes` with `args.learning_rate`, `args.weight_decay`, `(args.adam_beta1, args.adam_beta2)` and
    `args.adam_epsilon` as the proxy's values, and the Trainer's scheduler (`args.lr_scheduler_type`,
    `args.get_warmup_steps`, `args.lr_scheduler_kwargs`) over `num_training_steps` (default `args.max_steps`).
    The scheduler multiplies each group's width-scaled lr. `adamw_kwargs` go to `gainguard.AdamW` (`rule`,
    `overrides`, `nonfinite_grad`, ...). Logs each class's learning rates and their parameters."""
    steps = args.max_steps if num_training_steps is None else int(num_training_steps)
    if steps is None or steps <= 0:
        raise ValueError(
            "gainguard.hf.optimizers: the scheduler needs the number of training steps: set TrainingArguments(max_steps=N) "
            "or give num_training_steps= (len(dataloader) * epochs / gradient_accumulation_steps)"
        )
    opt = AdamW(
        model,
        base_shapes=base_shapes,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        **adamw_kwargs,
    )
    scheduler = transformers.get_scheduler(
        args.lr_scheduler_type,
        optimizer=opt,
        num_warmup_steps=args.get_warmup_steps(steps),
        num_training_steps=steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    for group in opt.param_groups:
        names = group["param_names"]
        shown = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
        logger.info("gainguard: %s lr %.4e wd %.4e: %s", group["class"], group["width_scaled_lr"], group["width_scaled_weight_decay"], shown)
    return opt, scheduler


def class_learning_rates(opt: AdamW) -> Dict[str, float]:
    """The learning rates of the groups now, by class: `learning_rate/matrix_like` and `learning_rate/vector_like` where a
    class has one, else `learning_rate/CLASS/FIRST_PARAMETER` per group (the Trainer's own `learning_rate`
    is the first group's alone)."""
    by_class: Dict[str, list] = {}
    for group in opt.param_groups:
        by_class.setdefault(group["class"], []).append(group)
    out = {}
    for cls, groups in by_class.items():
        if len({g["lr"] for g in groups}) == 1:
            out[f"learning_rate/{cls}"] = float(groups[0]["lr"])
        else:
            for g in groups:
                out[f"learning_rate/{cls}/{g['param_names'][0]}"] = float(g["lr"])
    return out


def _gainguard_optimizer(optimizer) -> AdamW:
    # accelerate wraps the Trainer's optimizer (AcceleratedOptimizer.optimizer is the one given).
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, AdamW):
        raise TypeError(
            f"GainguardCallback monitors a gainguard.AdamW, but the Trainer's optimizer is a {type(inner).__name__}: "
            "pass optimizers=gainguard.hf.optimizers(model, args, base_shapes) to the Trainer"
        )
    return inner


class GainguardCallback(TrainerCallback):
    """Monitors the Trainer's `gainguard.AdamW`: `gainguard.monitor(opt, run, **monitor_kwargs)` on train begin
    (planned steps from the Trainer's state), `.step(loss, tokens)` on each log holding a loss (every
    `logging_steps`; tokens counted when `include_num_input_tokens_seen` is set), `.close()` on train end.
    `monitor_kwargs` are `gainguard.monitor`'s (`listen=`, `connect=`, `interval=`, `reference=`, ...)."""

    def __init__(self, run: str = "run", **monitor_kwargs):
        self.run = run
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Optional[Monitor] = None
        self._opt: Optional[AdamW] = None
        self._tokens_seen = 0
        self._rates: Dict[str, float] = {}

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._opt = _gainguard_optimizer(optimizer)
        kwargs = dict(self.monitor_kwargs)
        kwargs.setdefault("planned_steps", state.max_steps or None)
        self.monitor = monitor(self._opt, run=self.run, **kwargs)
        self._tokens_seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)

    def on_optimizer_step(self, args, state, control, **kwargs):
        # The rates this step used, before the scheduler moves them (the Trainer logs its `learning_rate` so).
        if self._opt is not None:
            self._rates = class_learning_rates(self._opt)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.monitor is None or not logs or "loss" not in logs:
            return
        seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        self.monitor.step(float(logs["loss"]), max(0, seen - self._tokens_seen))
        self._tokens_seen = seen
        rates = self._rates or class_learning_rates(self._opt)
        logs.update(rates)
        # The Trainer appended this log to its history before calling back.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(rates)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
