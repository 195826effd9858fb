"""gainguard for PyTorch: width-scaled AdamW (arXiv 2510.15262) and live singular-value spectra, over the same
Rust core as the `gainguard` crate.

    import gainguard
    base = gainguard.base_shapes(proxy_model, delta_model)        # or a path to the JSON the Rust side writes
    opt = gainguard.AdamW(model, base_shapes=base, lr=3e-3, weight_decay=0.1)   # or model.named_parameters()
    with gainguard.monitor(opt, run="wide", listen="127.0.0.1:9464") as mon:
        for batch in data:
            ...; loss.backward(); opt.step(); opt.zero_grad()
            mon.step(loss.item(), tokens)

The optimizer keeps its state in torch's own tensors (`state_dict()` and LR schedulers work as for
`torch.optim.AdamW`); its `step()` hands them to the Rust core, which steps them in place.
"""

import torch  # noqa: F401  (loads libtorch before the extension, which links against it)

from . import _native
from .monitor import Monitor, monitor
from .coord_check import CoordCheckResult, coord_check
from .mup import MuReadout, MuSharedReadout, mup_readout
from .optim import AdamW, StepOutcome
from .plan import Plan, PlanRow, PlanWarning
from .shapes import BaseShapes, base_shapes

__all__ = [
    "AdamW",
    "BaseShapes",
    "CoordCheckResult",
    "Monitor",
    "MuReadout",
    "MuSharedReadout",
    "Plan",
    "PlanRow",
    "PlanWarning",
    "StepOutcome",
    "base_shapes",
    "coord_check",
    "monitor",
    "mup_readout",
    "_native",
]
