import copy
import io

import pytest
import torch

import gainguard
from conftest import BASE, DELTA, MLP, TARGET, assert_a_nonfinite_gradient_skips_the_step, batch, paper_groups, rel_diff, train

LR, WD = 3e-3, 0.1


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / 20)


def test_param_groups_carry_the_paper_rules_width_scaled_lr_and_wd():
    torch.manual_seed(0)
    model = MLP(TARGET)
    opt = gainguard.AdamW(model.named_parameters(), base_shapes=gainguard.base_shapes(MLP(BASE), MLP(DELTA)), lr=LR, weight_decay=WD)
    want = {id(g["params"][0]): (g["lr"], g["weight_decay"]) for g in paper_groups(model, LR, WD)}
    for group in opt.param_groups:
        for p in group["params"]:
            assert group["lr"] == pytest.approx(want[id(p)][0], rel=1e-12)
            assert group["weight_decay"] == pytest.approx(want[id(p)][1], rel=1e-12)
    assert "matrix_like" in str(opt.plan()) and "hidden.weight" in str(opt.plan())


def test_matches_torch_adamw_with_the_paper_groups_over_200_steps_of_lambdalr_warmup():
    torch.manual_seed(0)
    ours_model = MLP(TARGET)
    ref_model = copy.deepcopy(ours_model)
    init = copy.deepcopy(ours_model)
    ours = gainguard.AdamW(ours_model.named_parameters(), base_shapes=gainguard.base_shapes(MLP(BASE), MLP(DELTA)), lr=LR, weight_decay=WD)
    ref = torch.optim.AdamW(paper_groups(ref_model, LR, WD), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    train(ours_model, ours, 200, torch.optim.lr_scheduler.LambdaLR(ours, warmup))
    train(ref_model, ref, 200, torch.optim.lr_scheduler.LambdaLR(ref, warmup))
    worst = max((rel_diff(p, q), n) for (n, p), q in zip(ours_model.named_parameters(), ref_model.parameters()))
    assert worst[0] <= 1e-6, f"max relative difference {worst[0]:e} at {worst[1]}"
    moved = max(rel_diff(p, q) for p, q in zip(ours_model.parameters(), init.parameters()))
    assert moved > 1e-2, f"training barely moved the weights ({moved:e})"


def test_a_parameter_without_gradient_on_some_steps_is_skipped_as_torch_does():
    torch.manual_seed(0)
    ours_model = MLP(TARGET)
    ref_model = copy.deepcopy(ours_model)
    ours = gainguard.AdamW(ours_model.named_parameters(), base_shapes=gainguard.base_shapes(MLP(BASE), MLP(DELTA)), lr=LR, weight_decay=WD)
    ref = torch.optim.AdamW(paper_groups(ref_model, LR, WD), lr=LR)
    no_grad_on_odd = lambda t: t % 2 == 1  # noqa: E731
    train(ours_model, ours, 10, skip_grad=no_grad_on_odd)
    train(ref_model, ref, 10, skip_grad=no_grad_on_odd)
    ours_state, ref_state = ours.state[ours_model.hidden.bias], ref.state[ref_model.hidden.bias]
    assert int(ours_state["step"]) == int(ref_state["step"]) == 5
    assert int(ours.state[ours_model.hidden.weight]["step"]) == 10
    assert rel_diff(ours_model.hidden.bias, ref_model.hidden.bias) <= 1e-6
    before = ours_model.hidden.bias.detach().clone()
    train(ours_model, ours, 1, start=11, skip_grad=lambda t: True)
    assert torch.equal(ours_model.hidden.bias, before), "a parameter without gradient must not change (no decay either)"


def test_each_parameters_decay_horizon_is_the_sum_of_its_width_scaled_lr_times_wd_over_the_steps_it_took():
    torch.manual_seed(0)
    model = MLP(TARGET)
    opt = gainguard.AdamW(model.named_parameters(), base_shapes=gainguard.base_shapes(MLP(BASE), MLP(DELTA)), lr=LR, weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    no_grad_on_odd = lambda t: t % 2 == 1 and t < 30  # noqa: E731
    train(model, opt, 40, sched, skip_grad=no_grad_on_odd)
    # From the paper's formulas and the schedule, not from the optimizer: lr_t = lr_group * warmup(t), wd fixed.
    m = TARGET / BASE
    want_weight = sum((LR / m) * warmup(t) * (WD * m**0.5) for t in range(40))
    assert opt.state[model.hidden.weight]["decay_horizon"] == pytest.approx(want_weight, rel=1e-12)
    # Vector-like parameters get no decay under the paper rule: H stays 0 (hidden.bias, stepped on 25 of 40 steps).
    assert opt.state[model.hidden.bias]["decay_horizon"] == 0.0
    model2 = MLP(TARGET)
    standard = gainguard.AdamW(model2.named_parameters(), base_shapes=gainguard.base_shapes(MLP(BASE), MLP(DELTA)),
                               lr=LR, weight_decay=WD, rule="standard")
    train(model2, standard, 40, skip_grad=no_grad_on_odd)
    # standard decays every parameter with the base (lr, wd); hidden.bias took 25 steps (odd steps < 30 had no gradient).
    assert standard.state[model2.hidden.bias]["decay_horizon"] == pytest.approx(25 * LR * WD, rel=1e-12)
    assert standard.state[model2.hidden.weight]["decay_horizon"] == pytest.approx(40 * LR * WD, rel=1e-12)


def test_state_dict_round_trip_resumes_bit_for_bit():
    def fresh():
        torch.manual_seed(0)
        model = MLP(TARGET)
        opt = gainguard.AdamW(model.named_parameters(), base_shapes=gainguard.base_shapes(MLP(BASE), MLP(DELTA)), lr=LR, weight_decay=WD)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup)

    model_a, opt_a, sched_a = fresh()
    train(model_a, opt_a, 30, sched_a, skip_grad=lambda t: t == 3)
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sched": sched_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    model_b, opt_b, sched_b = fresh()
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    sched_b.load_state_dict(saved["sched"])
    train(model_b, opt_b, 30, sched_b, start=30)

    model_c, opt_c, sched_c = fresh()  # the uninterrupted run with the same missing gradient at step 3
    train(model_c, opt_c, 60, sched_c, skip_grad=lambda t: t == 3)
    for (n, p), q in zip(model_b.named_parameters(), model_c.parameters()):
        assert torch.equal(p, q), f"{n} differs after resuming"
    for p, q in zip(model_b.parameters(), model_c.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_b.state[p][key], opt_c.state[q][key]), key
    assert opt_b.step_calls == opt_c.step_calls == 60


def test_a_nonfinite_gradient_skips_the_step_and_changes_nothing():
    assert_a_nonfinite_gradient_skips_the_step("cpu")


def test_nonfinite_grad_error_raises_naming_the_parameter():
    torch.manual_seed(0)
    model = MLP(TARGET)
    opt = gainguard.AdamW(model.named_parameters(), base_shapes=gainguard.base_shapes(MLP(BASE), MLP(DELTA)), nonfinite_grad="error")
    x, y = batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    model.out.bias.grad[1] = float("inf")
    with pytest.raises(FloatingPointError, match="out.bias"):
        opt.step()


def test_base_shapes_from_the_json_file_equal_those_from_the_models(tmp_path, shapes):
    path = tmp_path / "shapes.json"
    shapes.save(path)
    again = gainguard.base_shapes(path)
    assert again.base == shapes.base and again.delta == shapes.delta
    # The plain {name: shape} form, as the Rust side writes without delta shapes.
    path.write_text('{"hidden.weight": [16, 16]}')
    assert gainguard.base_shapes(str(path)).base == {"hidden.weight": [16, 16]}


def test_the_plan_classifies_and_scales_as_mups_set_base_shapes():
    import mup  # installed by scripts/setup-libtorch.sh: a missing peer fails the test
    torch.manual_seed(0)
    model = MLP(TARGET)
    mup.set_base_shapes(model, MLP(BASE), delta=MLP(DELTA), do_assert=False)  # the readout is a plain Linear here
    opt = gainguard.AdamW(model.named_parameters(), base_shapes=gainguard.base_shapes(MLP(BASE), MLP(DELTA)), rule="mup-coupled", lr=LR, weight_decay=WD)
    for (name, p), (_, lr, wd, _, cls, m, _) in zip(model.named_parameters(), opt._plan.decisions()):
        matrix_like = p.infshape.ninf() == 2
        assert (cls == "matrix_like") == matrix_like, name
        if matrix_like:
            assert m == pytest.approx(p.infshape.width_mult()), name
            assert lr == pytest.approx(LR / p.infshape.width_mult()), name  # MuAdamW: lr / fan-in multiplier


# Bad input: a Python exception that names the culprit.


def test_wrong_base_shapes_raise_naming_the_parameter():
    bad = gainguard.BaseShapes({"inp.weight": [16, 8], "inp.bias": [16], "hidden.weight": [16, 16, 1], "hidden.bias": [16], "out.weight": [4, 16], "out.bias": [4]})
    with pytest.raises(ValueError, match=r"hidden\.weight.*rank"):
        gainguard.AdamW(MLP(TARGET).named_parameters(), base_shapes=bad)


def test_base_shapes_missing_a_parameter_raise_naming_it():
    with pytest.raises(ValueError, match=r"out\.bias"):
        gainguard.AdamW(MLP(TARGET).named_parameters(), base_shapes={k: v for k, v in MLP(BASE).state_dict().items() if k != "out.bias"})


def test_an_unreadable_shapes_file_raises_naming_the_path(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ValueError, match="nope.json"):
        gainguard.base_shapes(path)
    path.write_text("[1, 2")
    with pytest.raises(ValueError, match="nope.json.*JSON"):
        gainguard.base_shapes(path)


def test_an_unknown_rule_raises_naming_it(shapes):
    with pytest.raises(ValueError, match="unknown rule `papr`"):
        gainguard.AdamW(MLP(TARGET).named_parameters(), base_shapes=shapes, rule="papr")


def test_a_non_leaf_tensor_raises_naming_it(shapes):
    model = MLP(TARGET)
    named = list(model.named_parameters())
    named[2] = ("hidden.weight", model.hidden.weight * 1.0)
    with pytest.raises(ValueError, match=r"hidden\.weight.*not a leaf"):
        gainguard.AdamW(named, base_shapes=shapes)


def test_plain_parameters_without_names_raise_a_type_error(shapes):
    with pytest.raises(TypeError, match="named_parameters"):
        gainguard.AdamW(MLP(TARGET).parameters(), base_shapes=shapes)


def test_an_override_with_an_unknown_field_raises_naming_it(shapes):
    with pytest.raises(ValueError, match="clas"):
        gainguard.AdamW(MLP(TARGET).named_parameters(), base_shapes=shapes, overrides=[{"pattern": "hidden.*", "clas": "matrix_like"}])


def test_bf16_parameters_keep_f32_moments_through_a_state_dict_round_trip():
    torch.manual_seed(0)
    model = MLP(TARGET).to(torch.bfloat16)
    opt = gainguard.AdamW(model.named_parameters(), base_shapes=gainguard.base_shapes(MLP(BASE), MLP(DELTA)), lr=LR, weight_decay=WD)
    before = model.hidden.weight.detach().clone()
    for t in range(3):
        x, y = batch(t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x.bfloat16()), y.bfloat16()).backward()
        opt.step()
    assert not torch.equal(model.hidden.weight, before)
    moments = opt.state[model.hidden.weight]["exp_avg_sq"]
    assert moments.dtype == torch.float32
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    other = gainguard.AdamW(model.named_parameters(), base_shapes=gainguard.base_shapes(MLP(BASE), MLP(DELTA)), lr=LR, weight_decay=WD)
    other.load_state_dict(torch.load(buf))
    loaded = other.state[model.hidden.weight]["exp_avg_sq"]
    assert loaded.dtype == torch.float32 and torch.equal(loaded, moments), "torch would have cast the moments to bf16"
