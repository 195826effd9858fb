"""Shared models for the package's tests: an MLP whose hidden width is the μP width, at the base (proxy) width,
the delta width and the target width."""

import pytest
import torch
from torch import nn

BASE, DELTA, TARGET = 16, 32, 64


class MLP(nn.Module):
    def __init__(self, width: int, d_in: int = 8, d_out: int = 4):
        super().__init__()
        self.inp = nn.Linear(d_in, width)  # weight [width, d_in]: one width dim, vector-like
        self.hidden = nn.Linear(width, width)  # weight [width, width]: matrix-like, m = width / BASE
        self.out = nn.Linear(width, d_out)  # weight [d_out, width]: one width dim (the readout), vector-like

    def forward(self, x):
        return self.out(torch.relu(self.hidden(torch.relu(self.inp(x)))))


def paper_groups(model: nn.Module, lr: float, wd: float):
    """The paper rule's param groups, from its formulas (arXiv 2510.15262): a matrix-like parameter (two width
    dimensions) gets lr / m and wd · m^0.5 with m = its fan-in over the base's; every other parameter gets lr
    and no weight decay."""
    m = TARGET / BASE
    groups = []
    for name, p in model.named_parameters():
        matrix_like = name == "hidden.weight"
        groups.append({"params": [p], "lr": lr / m if matrix_like else lr, "weight_decay": wd * m**0.5 if matrix_like else 0.0})
    return groups


@pytest.fixture
def shapes():
    import gainguard

    return gainguard.base_shapes(MLP(BASE), MLP(DELTA))


def batch(step: int, n: int = 32):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 8, generator=g)
    y = torch.randn(n, 4, generator=g)
    return x, y


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def train(model, opt, steps, sched=None, start=0, skip_grad=None, device="cpu"):
    """Steps `model` on the batches `start`..`start + steps` with MSE; `skip_grad(t)` drops hidden.bias's
    gradient at step t (a parameter that gets none, as an unrouted expert)."""
    for t in range(start, start + steps):
        x, y = (v.to(device) for v in batch(t))
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        if skip_grad is not None and skip_grad(t):
            model.hidden.bias.grad = None
        opt.step()
        if sched is not None:
            sched.step()
