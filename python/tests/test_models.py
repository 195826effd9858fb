"""PyTorch models as people write them: a GPT with `nn.Embedding` token and position tables and a `Linear` head,
tied or not, and the μP readout that removes the head's warning."""

import copy
import warnings

import mup
import pytest
import torch
from torch import nn

import gainguard

VOCAB, BLOCK = 40, 12
LR, WD = 3e-3, 0.1


class GPT(nn.Module):
    def __init__(self, d: int, tied: bool = False):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, d)
        self.wpe = nn.Embedding(BLOCK, d)
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Linear(d, d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        x = x + torch.relu(self.mlp(self.ln(x)))
        return self.head(x)


def shapes_of(tied=False):
    return gainguard.base_shapes(GPT(16, tied), GPT(32, tied))


def plan_warnings(params, base, **kwargs):
    """The PlanWarnings raised while building the optimizer, and the optimizer."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = gainguard.AdamW(params, base_shapes=base, lr=LR, weight_decay=WD, **kwargs)
    return [w.message for w in caught if issubclass(w.category, gainguard.PlanWarning)], opt


def lm_batch(step: int):
    g = torch.Generator().manual_seed(500 + step)
    idx = torch.randint(VOCAB, (4, BLOCK), generator=g)
    return idx, torch.randint(VOCAB, (4, BLOCK), generator=g)


def train(model, opt, steps):
    for t in range(steps):
        idx, y = lm_batch(t)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(idx).flatten(0, 1), y.flatten()).backward()
        opt.step()


def test_a_gpt_with_embedding_tables_warns_once_on_its_linear_head_with_modules_or_named_parameters():
    for params in (lambda m: m, lambda m: m.named_parameters()):
        model = GPT(64)
        caught, opt = plan_warnings(params(model), shapes_of())
        assert [(w.param, w.kind) for w in caught] == [("head.weight", "possible_readout")]
        assert "MuReadout" in caught[0].message
        assert opt.plan()["wte.weight"].role == "embedding" and opt.plan()["wpe.weight"].role == "embedding"
    # Base shapes without modules (a dict) know no roles: the target module tree gives them.
    dict_base = gainguard.BaseShapes({n: list(p.shape) for n, p in GPT(16).named_parameters()},
                                     {n: list(p.shape) for n, p in GPT(32).named_parameters()})
    caught, _ = plan_warnings(GPT(64), dict_base)
    assert [w.param for w in caught] == ["head.weight"]
    caught, _ = plan_warnings(GPT(64).named_parameters(), dict_base)
    assert sorted(w.param for w in caught) == ["head.weight", "wpe.weight", "wte.weight"], "no modules, no roles"


def test_a_linear_whose_fan_in_is_the_only_width_is_flagged_until_its_role_is_declared():
    caught, _ = plan_warnings(GPT(64), shapes_of(), overrides=[{"pattern": "head.weight", "role": "readout"}])
    assert caught == []


def test_plan_warnings_are_filterable_as_python_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", gainguard.PlanWarning)
        with pytest.raises(gainguard.PlanWarning, match="head.weight"):
            gainguard.AdamW(GPT(64), base_shapes=shapes_of())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=gainguard.PlanWarning)
        gainguard.AdamW(GPT(64), base_shapes=shapes_of())
    assert not [w for w in caught if issubclass(w.category, gainguard.PlanWarning)]


def test_no_warning_after_mup_readout_and_its_m_comes_from_the_plan():
    model = GPT(64)
    head = model.head.weight
    readout = gainguard.mup_readout(model, "head")
    assert isinstance(model.head, gainguard.MuReadout) and model.head.weight is head, "the same parameter, converted in place"
    with pytest.raises(RuntimeError, match="base_in_features"):
        model(lm_batch(0)[0])
    caught, opt = plan_warnings(model, shapes_of())
    assert caught == []
    assert readout.width_mult == pytest.approx(64 / 16)
    assert opt.plan()["head.weight"].role == "readout"
    # Base and delta models converted too: their module trees say the same to named_parameters().
    bases = [GPT(16), GPT(32)]
    for b in bases:
        gainguard.mup_readout(b, "head", base_in_features=16)
    caught, _ = plan_warnings(model.named_parameters(), gainguard.base_shapes(*bases))
    assert caught == []


def test_a_readout_multiplier_that_disagrees_with_the_plan_raises_naming_the_module():
    model = GPT(64)
    gainguard.mup_readout(model, "head", base_in_features=32)
    with pytest.raises(ValueError, match=r"'head'.*2\.0.*4\.0"):
        gainguard.AdamW(model, base_shapes=shapes_of())


def tied_reference_groups(model):
    """The paper rule's groups from its formulas (arXiv 2510.15262), the tied tensor once: `mlp.weight` is the
    only matrix-like parameter (m = 64/16: lr / m, wd · m^0.5); every other one gets lr and no decay."""
    m = 64 / 16
    groups = []
    for name, p in model.named_parameters():  # drops the tied head
        matrix = name == "mlp.weight"
        groups.append({"params": [p], "lr": LR / m if matrix else LR, "weight_decay": WD * m**0.5 if matrix else 0.0})
    return groups


def test_a_head_tied_to_its_embedding_is_planned_and_stepped_once_whether_named_parameters_dedups_or_not():
    torch.manual_seed(0)
    init = GPT(64, tied=True)
    ref_model = copy.deepcopy(init)
    ref = torch.optim.AdamW(tied_reference_groups(ref_model), lr=LR)
    train(ref_model, ref, 5)
    for params in (lambda m: m.named_parameters(), lambda m: m.named_parameters(remove_duplicate=False), lambda m: m):
        model = copy.deepcopy(init)
        assert model.head.weight is model.wte.weight
        caught, opt = plan_warnings(params(model), shapes_of(tied=True))
        assert caught == [], [str(w) for w in caught]
        stepped = [p for g in opt.param_groups for p in g["params"]]
        assert sum(p is model.wte.weight for p in stepped) == 1
        if "head.weight" in opt.plan():
            assert opt.plan()["head.weight"].tied_to == "wte.weight"
        train(model, opt, 5)
        assert int(opt.state[model.wte.weight]["step"]) == 5
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            diff = float((p - q).detach().double().norm() / q.detach().double().norm())
            assert diff <= 1e-6, f"{name}: {diff:e} from torch.optim.AdamW"


def test_mu_readout_matches_mups_forward_and_gradients_on_the_same_weights():
    torch.manual_seed(0)

    class Head(nn.Module):
        def __init__(self, d, cls):
            super().__init__()
            self.body = nn.Linear(8, d)
            self.head = cls(d, VOCAB)

    theirs = Head(64, lambda d, v: mup.MuReadout(d, v, output_mult=2.0))
    mup.set_base_shapes(theirs, Head(16, lambda d, v: mup.MuReadout(d, v)), delta=Head(32, lambda d, v: mup.MuReadout(d, v)))
    ours = gainguard.MuReadout(64, VOCAB, base_in_features=16, output_mult=2.0)
    with torch.no_grad():
        ours.weight.copy_(theirs.head.weight)
        ours.bias.copy_(theirs.head.bias)
    assert ours.width_mult == theirs.head.width_mult() == 4.0
    x = torch.randn(5, 64)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs.head(x_theirs)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-6, atol=1e-7)
    g = torch.randn_like(y_ours)
    y_ours.backward(g)
    y_theirs.backward(g)
    for a, b, what in ((x_ours.grad, x_theirs.grad, "input"), (ours.weight.grad, theirs.head.weight.grad, "weight"),
                       (ours.bias.grad, theirs.head.bias.grad, "bias")):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=what)
    # The bias is not divided by m: the output at x = 0 is the bias.
    torch.testing.assert_close(ours(torch.zeros(1, 64))[0], ours.bias.detach())


def test_mu_shared_readout_matches_mups_on_a_tied_embedding():
    torch.manual_seed(1)

    class Tied(nn.Module):
        def __init__(self, d, shared):
            super().__init__()
            self.wte = nn.Embedding(VOCAB, d)
            self.head = shared(self.wte.weight)

    theirs = Tied(64, lambda w: mup.MuSharedReadout(w, bias=False))
    mup.set_base_shapes(theirs, Tied(16, lambda w: mup.MuSharedReadout(w, bias=False)),
                        delta=Tied(32, lambda w: mup.MuSharedReadout(w, bias=False)))
    model = GPT(64, tied=True)
    readout = gainguard.mup_readout(model, "head")
    assert isinstance(readout, gainguard.MuSharedReadout) and readout.weight is model.wte.weight
    caught, _ = plan_warnings(model, shapes_of(tied=True))
    assert caught == [] and readout.width_mult == theirs.head.width_mult() == 4.0
    with torch.no_grad():
        model.wte.weight.copy_(theirs.wte.weight)
    x = torch.randn(3, 64)
    y_ours, y_theirs = readout(x), theirs.head(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-6, atol=1e-7)
    y_ours.sum().backward()
    y_theirs.sum().backward()
    torch.testing.assert_close(model.wte.weight.grad, theirs.wte.weight.grad, rtol=1e-6, atol=1e-7)


def test_mup_readout_of_something_else_raises_naming_it():
    with pytest.raises(ValueError, match="'nope'"):
        gainguard.mup_readout(GPT(64), "nope")
    with pytest.raises(TypeError, match="'ln'.*LayerNorm"):
        gainguard.mup_readout(GPT(64), "ln")


def test_plan_rows_carry_each_parameters_class_m_lr_and_wd_and_print_as_the_table():
    _, opt = plan_warnings(GPT(64), shapes_of())
    plan = opt.plan()
    row = plan["mlp.weight"]
    assert (row.cls, row.shape, row.base_shape) == ("matrix_like", (64, 64), (16, 16))
    assert row.m == 4.0 and row.lr == pytest.approx(LR / 4) and row.weight_decay == pytest.approx(WD * 2)
    assert row.eps == 1e-8 and row.width_dims == (0, 1) and row.tied_to is None
    assert plan["ln.weight"].cls == "vector_like" and plan["ln.weight"].weight_decay == 0.0
    assert [r.name for r in plan] == [n for n, _ in GPT(64).named_parameters()]
    assert [w.param for w in plan.warnings] == ["head.weight"]
    table = str(plan)
    assert table.splitlines()[1].split()[:6] == ["parameter", "shape", "class", "m", "lr", "wd"]
    assert "mlp.weight" in table and "possible_readout" in table
    assert '"mlp.weight"' in opt.plan_json()


def test_mu_shared_readout_on_something_else_than_an_embeddings_weight_raises():
    with pytest.raises(ValueError, match=r"\[vocab, d\] weight, got a tensor of shape \[40\]"):
        gainguard.MuSharedReadout(nn.Parameter(torch.zeros(VOCAB)))


def test_a_parameter_with_several_findings_gets_one_plan_warning():
    # Without delta shapes a 33/32 width ratio is suspicious (uneven_width_ratio, per dimension), and the head's
    # only width dimension is its fan-in (possible_readout).
    named = [("mlp.weight", nn.Parameter(torch.zeros(33, 33))), ("head.weight", nn.Parameter(torch.zeros(4, 33)))]
    caught, _ = plan_warnings(named, gainguard.BaseShapes({"mlp.weight": [32, 32], "head.weight": [4, 32]}))
    assert [(w.param, w.kind) for w in caught] == [
        ("mlp.weight", "uneven_width_ratio"),
        ("head.weight", "uneven_width_ratio, possible_readout"),
    ]
