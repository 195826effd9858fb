"""The CUDA path (ATen's fused AdamW through the Rust core): runs only where torch sees a GPU; skipped elsewhere.
On a GPU machine without pytest: `python3 python/tests/test_cuda.py`."""

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import gainguard  # noqa: E402
from conftest import BASE, DELTA, MLP, TARGET, assert_a_nonfinite_gradient_skips_the_step, paper_groups, rel_diff, train  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
LR, WD = 3e-3, 0.1


def test_on_cuda_the_step_matches_torch_fused_adamw_over_200_steps_of_warmup():
    torch.manual_seed(0)
    ours_model = MLP(TARGET).cuda()
    ref_model = copy.deepcopy(ours_model)
    ours = gainguard.AdamW(ours_model.named_parameters(), base_shapes=gainguard.base_shapes(MLP(BASE), MLP(DELTA)), lr=LR, weight_decay=WD)
    ref = torch.optim.AdamW(paper_groups(ref_model, LR, WD), lr=LR, fused=True)
    warm = lambda s: min(1.0, (s + 1) / 20)  # noqa: E731
    no_grad_on_odd = lambda t: t % 2 == 1 and t < 50  # noqa: E731
    train(ours_model, ours, 200, torch.optim.lr_scheduler.LambdaLR(ours, warm), skip_grad=no_grad_on_odd, device="cuda")
    train(ref_model, ref, 200, torch.optim.lr_scheduler.LambdaLR(ref, warm), skip_grad=no_grad_on_odd, device="cuda")
    worst = max((rel_diff(p, q), n) for (n, p), q in zip(ours_model.named_parameters(), ref_model.parameters()))
    print(f"CUDA: max relative difference to torch fused AdamW after 200 steps: {worst[0]:e} at {worst[1]}")
    assert worst[0] <= 1e-6, worst
    assert int(ours.state[ours_model.hidden.bias]["step"]) == int(ref.state[ref_model.hidden.bias]["step"]) == 175
    assert ours.state[ours_model.hidden.weight]["exp_avg"].is_cuda


def test_on_cuda_a_nonfinite_gradient_skips_the_step():
    assert_a_nonfinite_gradient_skips_the_step("cuda")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    test_on_cuda_the_step_matches_torch_fused_adamw_over_200_steps_of_warmup()
    test_on_cuda_a_nonfinite_gradient_skips_the_step()
    print("CUDA checks passed")
