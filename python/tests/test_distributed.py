"""gainguard under torch.distributed, on the CPU with gloo: one `torchrun --nproc_per_node 2` job (loopback only)
runs distributed_worker.py, whose ranks train the same parallel model with gainguard.AdamW and with
torch.optim.AdamW (the same per-parameter groups, clip_grad_norm_, a step skipped for a NaN in one rank's shard)
under DDP, FSDP2's fully_shard and tensor parallel, save and resume a DCP checkpoint, and estimate the spectra of
the sharded matrices; the tests here check what each rank wrote."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import gainguard
from conftest import BASE, DELTA, MLP, TARGET

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out, world, **env):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::gainguard.PlanWarning", **env)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", "--local_addr=127.0.0.1", os.path.join(HERE, "distributed_worker.py"), str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("dist"), WORLD)


def found(out, name, world=WORLD):
    return [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("kind", ["ddp", "fsdp2", "tp"])
def test_gainguard_adamw_equals_torch_adamw_on_the_same_parallel_model_with_clipping_and_a_nan_on_one_rank(job, kind):
    for rank, r in enumerate(found(job, kind)):
        worst = max((d, n) for n, d in r["diffs"].items())
        assert worst[0] <= 1e-6, f"rank {rank}: max relative difference {worst[0]:e} at {worst[1]} ({r['types']})"
        assert r["moved"] > 1e-2, f"rank {rank}: training barely moved the weights ({r['moved']:e})"
        # The NaN was in rank 1's gradient only: every rank skipped that one step, as torch's reference did.
        assert r["skipped_ours"] == r["skipped_ref"] == 1, r
        assert r["hidden_step"] == r["steps"] - 1
        # Clipping acted, on the same steps as clip_grad_norm_'s (the count, and the weights above).
        assert 0 < r["clipped_ours"] == r["clipped_ref"], r
    if kind == "fsdp2":
        assert "DTensor" in r["types"]["hidden.weight"] and "local [32, 64]" in r["types"]["hidden.weight"]
    if kind == "tp":
        assert "Shard(dim=1)" in r["types"]["hidden.weight"] and r["types"]["out.weight"] == "Parameter"


def test_on_a_2d_mesh_fsdp2_over_tensor_parallel_on_4_ranks_equals_torch_adamw(tmp_path):
    """FSDP2 across a data-parallel mesh dimension, tensor parallel inside: parameters sharded on both (strided
    shards included), `out` on the data-parallel mesh alone. 50 steps, not 100: four ranks on this machine's two
    cores take most of the test's time."""
    out = torchrun(tmp_path, 4, GG_MESH="2d", GG_STEPS="50")
    for rank, r in enumerate(found(out, "fsdp2_tp", 4)):
        worst = max((d, n) for n, d in r["diffs"].items())
        assert worst[0] <= 1e-6, f"rank {rank}: max relative difference {worst[0]:e} at {worst[1]} ({r['types']})"
        assert r["skipped_ours"] == r["skipped_ref"] == 1, r
        assert 0 < r["clipped_ours"] == r["clipped_ref"], r
        assert "Shard(dim=0), Shard(dim=1)" in r["types"]["hidden.weight"], r["types"]
    # A matrix on a mesh smaller than the world (each shard on two ranks) is estimated over the world once.
    for e in found(out, "spectra2d", 4):
        assert abs(e["est"] - e["exact"]) <= 1e-3 * e["exact"], e


def test_a_dcp_checkpoint_resumes_bit_for_bit_on_two_ranks(job):
    for r in found(job, "dcp"):
        assert r["loaded_equal"]
        assert all(r["bit_equal"].values()), r["max_abs"]


def test_a_dcp_checkpoint_of_two_fsdp2_ranks_loads_into_one_process(job):
    """DCP reshards the two ranks' DTensor moments into one process's plain tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    want = torch.load(job / "ckpt_gathered.pt")
    torch.manual_seed(5)
    model = MLP(TARGET)
    opt = gainguard.AdamW(model.named_parameters(), base_shapes=gainguard.base_shapes(MLP(BASE), MLP(DELTA)), lr=3e-3, weight_decay=0.1)
    state = {"optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(job / "ckpt"), no_dist=True)
    set_optimizer_state_dict(model, opt, state["optim"])
    for name, p in model.named_parameters():
        assert torch.equal(opt.state[p]["exp_avg"], want["exp_avg"][name]), name
        assert torch.equal(opt.state[p]["exp_avg_sq"], want["exp_avg_sq"][name]), name
        assert float(opt.state[p]["step"]) == want["step"][name]


def test_sigma_max_of_every_sharded_matrix_matches_a_float64_svd_of_the_gathered_matrix(job):
    results = found(job, "spectra")
    names = set(results[0])
    assert {"fsdp2:hidden.weight", "fsdp2:inp.weight", "tp:inp.weight", "tp:hidden.weight"} <= names, names
    for r in results:
        for name, e in r.items():
            assert abs(e["est"] - e["exact"]) <= 1e-3 * e["exact"], (name, e)
            # Only (side × block) floats moved per pass, never the matrix.
            m, n = e["global"]
            side = n if e["dim"] == 0 else m
            assert e["bytes"] <= e["iters"] * side * 8 * 8, (name, e)
            assert e["local"] != e["global"]
    # Every rank computed the same estimate (the same decisions, the same collectives).
    for name in names:
        assert results[0][name]["est"] == results[1][name]["est"], name


def test_a_round_a_rank_cannot_finish_in_time_is_dropped_on_every_rank(job):
    for r in found(job, "late"):
        assert r["dropped"], r
        assert r["seconds"] < 10, r
