"""Parameters the Rust core cannot step are refused when the optimizer is built, with the parameter's name and
type, instead of reaching native code: a sparse tensor, a tensor subclass. A DTensor (FSDP2, tensor parallel) is stepped through its local shard."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, distribute_tensor

import gainguard

BASE = {"w": [4, 4], "b": [4]}


@pytest.fixture
def one_rank_group():
    """A 1-rank gloo process group on the CPU, in this process."""
    assert dist.is_available() and dist.is_gloo_available(), "this torch has no gloo backend"
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_a_dtensor_parameter_is_planned_by_its_global_shape_and_stepped_as_torch_steps_it(one_rank_group):
    torch.manual_seed(0)
    w0, b0 = torch.randn(8, 8), torch.zeros(8)
    w = torch.nn.Parameter(distribute_tensor(w0.clone(), one_rank_group, [Replicate()]))
    assert type(w).__name__ == "DTensor"
    b = torch.nn.Parameter(b0.clone())
    opt = gainguard.AdamW([("w", w), ("b", b)], base_shapes={"w": [4, 4], "b": [4]}, lr=1e-2, weight_decay=0.1)
    assert opt.plan()["w"].shape == (8, 8) and opt.plan()["w"].cls == "matrix_like"
    ref_w, ref_b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    ref = torch.optim.AdamW(
        [{"params": [ref_w], "lr": opt.plan()["w"].lr, "weight_decay": opt.plan()["w"].weight_decay},
         {"params": [ref_b], "lr": opt.plan()["b"].lr, "weight_decay": opt.plan()["b"].weight_decay}]
    )
    for t in range(5):
        g = torch.randn(8, 8, generator=torch.Generator().manual_seed(t))
        w.grad = distribute_tensor(g.clone(), one_rank_group, [Replicate()])
        b.grad, ref_w.grad, ref_b.grad = g[0].clone(), g.clone(), g[0].clone()
        opt.step()
        ref.step()
    assert type(opt.state[w]["exp_avg"]).__name__ == "DTensor"
    assert torch.allclose(w.full_tensor(), ref_w.detach(), rtol=1e-6, atol=0)
    assert torch.allclose(b.detach(), ref_b.detach(), rtol=1e-6, atol=0)


def test_a_sparse_parameter_is_refused_naming_it():
    w = torch.nn.Parameter(torch.eye(8).to_sparse())
    with pytest.raises(ValueError, match=r"parameter 'w' is a sparse_coo tensor"):
        gainguard.AdamW([("w", w), ("b", torch.nn.Parameter(torch.zeros(8)))], base_shapes=BASE)


def test_a_tensor_subclass_parameter_is_refused_naming_its_type():
    class Tagged(torch.Tensor):
        pass

    w = torch.nn.Parameter(torch.randn(8, 8).as_subclass(Tagged))
    with pytest.raises(ValueError, match=r"parameter 'w' is a .*Tagged.*tensor subclass"):
        gainguard.AdamW([("w", w), ("b", torch.nn.Parameter(torch.zeros(8)))], base_shapes=BASE)


def test_a_lazy_modules_uninitialized_parameter_is_refused_naming_it():
    lazy = torch.nn.LazyLinear(8)
    with pytest.raises(ValueError, match=r"parameter 'weight' is a .*UninitializedParameter"):
        gainguard.AdamW(lazy.named_parameters(), base_shapes={"weight": [8, 4], "bias": [8]})


def test_a_partial_dtensor_parameter_is_refused_naming_it(one_rank_group):
    from torch.distributed.tensor import DTensor, Partial

    w = torch.nn.Parameter(DTensor.from_local(torch.randn(8, 8), one_rank_group, [Partial()], run_check=False))
    with pytest.raises(ValueError, match=r"parameter 'w' is a DTensor placed .*Partial.*Shard and Replicate"):
        gainguard.AdamW([("w", w), ("b", torch.nn.Parameter(torch.zeros(8)))], base_shapes=BASE)


def test_fsdp2_on_one_rank_steps_and_is_monitored_without_reaching_native_code_as_a_dtensor(one_rank_group):
    """What crashed the process before (a segfault in the native check, step and sampler): FSDP2's DTensor
    parameters, stepped and sampled through their local tensors."""
    import time

    from torch.distributed.fsdp import fully_shard

    from conftest import DELTA, MLP, TARGET, batch
    from conftest import BASE as WIDTH

    model = MLP(TARGET)
    fully_shard(model, mesh=one_rank_group)
    assert type(model.hidden.weight).__name__ == "DTensor"
    opt = gainguard.AdamW(model.named_parameters(), base_shapes=gainguard.base_shapes(MLP(WIDTH), MLP(DELTA)), max_grad_norm=1.0)
    mon = gainguard.monitor(opt, run="fsdp2-one-rank", listen="127.0.0.1:0", interval=2, budget_fraction=None)
    try:
        for t in range(6):
            x, y = batch(t)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            mon.step(loss.item(), 32)
        deadline = time.monotonic() + 10
        while mon.emitted_samples == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mon.emitted_samples > 0
        assert int(opt.state[model.hidden.weight]["step"]) == 6
    finally:
        mon.close()
