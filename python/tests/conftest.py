"""Shared models for the package's tests: an MLP whose hidden width is the μP width, at the base (proxy) width,
the delta width and the target width."""

import copy

import pytest
import torch
from torch import nn

BASE, DELTA, TARGET = 16, 32, 64


def pytest_configure(config):
    # MLP's `out` is a plain Linear readout, rightly warned about in every test that builds an optimizer on it;
    # test_models checks the warnings themselves under its own filters.
    config.addinivalue_line("filterwarnings", "ignore::gainguard.PlanWarning")


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


def assert_a_nonfinite_gradient_skips_the_step(device: str):
    """A NaN in one gradient: the step changes no parameter and no step count, warns naming the parameter,
    and is counted in `skipped_steps`."""
    import gainguard

    torch.manual_seed(0)
    model = MLP(TARGET).to(device)
    opt = gainguard.AdamW(model.named_parameters(), base_shapes=gainguard.base_shapes(MLP(BASE), MLP(DELTA)), lr=3e-3, weight_decay=0.1)
    train(model, opt, 2, device=device)
    before = copy.deepcopy(model.state_dict())
    x, y = (v.to(device) for v in batch(2))
    torch.nn.functional.mse_loss(model(x), y).backward()
    model.hidden.weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="hidden.weight"):
        opt.step()
    assert opt.skipped_steps == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert int(opt.state[model.hidden.weight]["step"]) == 2
