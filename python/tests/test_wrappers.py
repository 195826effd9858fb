"""Base shapes are taken from the plain model; wrappers rename its parameters (DDP `module.`, torch.compile
`_orig_mod.`, FSDP1 `_fsdp_wrapped_module.`, activation checkpointing `_checkpoint_wrapped_module.`). The
optimizer plans each wrapped name as the base's name, and a name that matches under no prefix is an error naming
it and the prefixes tried."""

import pytest
import torch
import torch.distributed as dist

import gainguard
from conftest import BASE, DELTA, MLP, TARGET


@pytest.fixture
def one_rank_group():
    assert dist.is_available() and dist.is_gloo_available(), "this torch has no gloo backend"
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def plan_of(named):
    opt = gainguard.AdamW(named, base_shapes=gainguard.base_shapes(MLP(BASE), MLP(DELTA)), lr=3e-3, weight_decay=0.1)
    return {row.name: (row.lr, row.weight_decay) for row in opt.plan()}, opt


def plain_plan():
    return plan_of(MLP(TARGET).named_parameters())[0]


def checkpointed(model):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model.hidden = checkpoint_wrapper(model.hidden)
    return model


def test_torch_compile_and_activation_checkpoint_names_plan_as_the_base_names():
    want = plain_plan()
    compiled = torch.compile(checkpointed(MLP(TARGET)))
    names = [n for n, _ in compiled.named_parameters()]
    assert "_orig_mod.hidden._checkpoint_wrapped_module.weight" in names, names
    got, opt = plan_of(compiled.named_parameters())
    assert got == want
    # The groups keep the names the model gives (what its state_dict and DCP use).
    assert "_orig_mod.hidden._checkpoint_wrapped_module.weight" in [n for g in opt.param_groups for n in g["param_names"]]


def test_ddp_and_fsdp1_names_plan_as_the_base_names(one_rank_group):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    want = plain_plan()
    ddp = DistributedDataParallel(MLP(TARGET))
    assert next(iter(ddp.named_parameters()))[0].startswith("module.")
    assert plan_of(ddp.named_parameters())[0] == want
    # FSDP1 needs device_id on the CPU; on one rank it keeps whole tensors (NO_SHARD).
    fsdp = FullyShardedDataParallel(MLP(TARGET), use_orig_params=True, device_id=torch.device("cpu"))
    names = [n for n, _ in fsdp.named_parameters()]
    assert all(n.startswith("_fsdp_wrapped_module.") for n in names), names
    assert plan_of(fsdp.named_parameters())[0] == want


def test_a_name_no_prefix_explains_is_an_error_naming_it_and_the_prefixes_tried():
    model = torch.nn.ModuleDict({"block": MLP(TARGET)})
    with pytest.raises(ValueError, match=r"parameter 'block\.inp\.weight' is missing in the base shapes.*'module\.'.*'_orig_mod\.'.*'_fsdp_wrapped_module\.'.*'_checkpoint_wrapped_module\.'"):
        plan_of(model.named_parameters())
    with pytest.raises(ValueError, match=r"'module\.blk\.inp\.weight' is missing in the base shapes \(nor as 'blk\.inp\.weight'\)"):
        plan_of([("module.blk.inp.weight", torch.nn.Parameter(torch.zeros(TARGET, 8)))])
