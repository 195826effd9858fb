"""Parameters the Rust core cannot step are refused when the optimizer is built, with the parameter's name and
type, instead of reaching native code: a DTensor (FSDP2, tensor parallel), a sparse tensor, a tensor subclass."""

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


def test_a_dtensor_parameter_is_refused_naming_it_and_saying_dtensor_is_not_supported_yet(one_rank_group):
    w = torch.nn.Parameter(distribute_tensor(torch.randn(8, 8), one_rank_group, [Replicate()]))
    assert type(w).__name__ == "DTensor"
    with pytest.raises(ValueError, match=r"parameter 'w' is a torch\.distributed\.tensor.*DTensor.*not support DTensor"):
        gainguard.AdamW([("w", w), ("b", torch.nn.Parameter(torch.zeros(8)))], base_shapes=BASE)


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
