"""One rank of test_distributed.py's torchrun job (gloo, CPU): gainguard.AdamW against torch.optim.AdamW on the same
parallel model under DDP, FSDP2 (`fully_shard`) and tensor parallel, a DCP checkpoint saved, resumed and compared,
and the sharded spectra estimator against a float64 SVD of the gathered matrix. Each scenario writes its findings
to OUT/NAME.rank{R}.json for the test to check (the test asserts, this script only measures)."""

import copy
import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(__file__))
import gainguard  # noqa: E402
from conftest import BASE, DELTA, MLP, TARGET, batch, paper_groups  # noqa: E402
from gainguard import sharded_spectra  # noqa: E402

LR, WD = 3e-3, 0.1
STEPS = int(os.environ.get("GG_STEPS", "100"))
NAN_STEP = 37
CLIP = float(os.environ.get("GG_CLIP", "0.3"))


NORMS = []


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / 20)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def write(out, name, rank, value):
    with open(os.path.join(out, f"{name}.rank{rank}.json"), "w") as f:
        json.dump(value, f)


def rel(a, b):
    a, b = full(a).detach().double(), full(b).detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def data_index(kind, t, rank, world):
    """Which batch a rank trains on: its own under data parallelism, the same on ranks of one TP group."""
    if kind == "tp":
        return t
    if kind == "fsdp2_tp":
        return t * (world // 2) + rank // 2
    return t * world + rank


def inject_nan(model, kind, rank):
    """A NaN in rank 1's gradient only: in its local shard (FSDP2, TP) or, under DDP, where gradients are
    all-reduced, in its input (the all-reduce then carries it to every rank)."""
    if rank != 1:
        return
    g = model.hidden.weight.grad
    (g.to_local() if isinstance(g, DTensor) else g)[0, 0] = float("nan")


def run_steps(model, opt, sched, kind, rank, world, steps, start=0, torch_ref=False):
    """Steps on batches per rank (data parallel: each rank its own; TP: the same on every rank); clipping at
    CLIP; a NaN at NAN_STEP. torch's reference clips with clip_grad_norm_ and skips a non-finite step."""
    clipped = skipped = 0
    for t in range(start, start + steps):
        x, y = batch(data_index(kind, t, rank, world))
        if kind == "ddp" and t == NAN_STEP and rank == 1:
            x = x.clone()
            x[0, 0] = float("nan")
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        if kind != "ddp" and t == NAN_STEP:
            inject_nan(model, kind, rank)
        if torch_ref:
            total = torch_clip(model)
            if torch.isfinite(total):
                clipped += int(total > CLIP)
                opt.step()
            else:
                skipped += 1
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step()
            clipped += int(opt.last_step.clipped)
            if opt.last_step.grad_norm == opt.last_step.grad_norm:
                NORMS.append(opt.last_step.grad_norm)
        sched.step()
    return clipped, skipped


def torch_clip(model):
    """torch.nn.utils.clip_grad_norm_ at CLIP; its total norm. Where parameters live on different meshes (tensor
    parallel leaves `out` plain tensors beside the DTensors; FSDP2 over TP puts `out` on the data-parallel mesh
    alone), clip_grad_norm_ cannot mix them ("got mixed torch.Tensor and DTensor", "must have the same mesh"):
    there torch's own parts, get_total_norm per mesh and clip_grads_with_norm_ per mesh with the combined norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    groups = {}
    for p in params:
        groups.setdefault(id(p.device_mesh) if isinstance(p, DTensor) else None, []).append(p)
    if len(groups) == 1:
        return full(torch.nn.utils.clip_grad_norm_(params, CLIP))
    norms = [full(torch.nn.utils.get_total_norm([p.grad for p in g])) for g in groups.values()]
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(CLIP / (total + 1e-6), max=1.0)
    for g in groups.values():
        # clip_grads_with_norm_'s scaling, by the combined norm (a plain tensor; DTensor grads by their shards).
        for p in g:
            (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(coef)
    return total


def parallel(kind, model, mesh):
    if kind == "ddp":
        return DDP(model)
    if kind == "fsdp2":
        fully_shard(model.inp, mesh=mesh)
        fully_shard(model.hidden, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if kind == "tp":
        return parallelize_module(model, mesh, {"inp": ColwiseParallel(), "hidden": RowwiseParallel()})
    if kind == "fsdp2_tp":
        # A 2-D mesh: tensor parallel inside, FSDP2 across.
        parallelize_module(model, mesh["tp"], {"inp": ColwiseParallel(), "hidden": RowwiseParallel()})
        for m in (model.inp, model.hidden, model):
            fully_shard(m, mesh=mesh["dp"])
        return model
    raise ValueError(kind)


def scenario(kind, out, rank, world, mesh, shapes):
    torch.manual_seed(0)
    ours_model = parallel(kind, MLP(TARGET), mesh)
    torch.manual_seed(0)
    ref_model = parallel(kind, MLP(TARGET), mesh)
    inner = ref_model.module if kind == "ddp" else ref_model
    ours = gainguard.AdamW(ours_model.named_parameters(), base_shapes=shapes, lr=LR, weight_decay=WD, max_grad_norm=CLIP)
    ref = torch.optim.AdamW(paper_groups(inner, LR, WD), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    NORMS.clear()
    init = {n: full(p).detach().clone() for n, p in ours_model.named_parameters()}
    c_ours, _ = run_steps(ours_model, ours, torch.optim.lr_scheduler.LambdaLR(ours, warmup), kind, rank, world, STEPS)
    c_ref, s_ref = run_steps(ref_model, ref, torch.optim.lr_scheduler.LambdaLR(ref, warmup), kind, rank, world, STEPS, torch_ref=True)
    diffs = {n: rel(p, q) for (n, p), q in zip(ours_model.named_parameters(), ref_model.parameters())}
    moved = max(rel(p, init[n]) for n, p in ours_model.named_parameters())
    types = {n: type(p).__name__ + ("" if not isinstance(p, DTensor) else f" {p.placements} local {list(p.to_local().shape)}")
             for n, p in ours_model.named_parameters()}
    write(out, kind, rank, {
        "diffs": diffs, "moved": moved, "clipped_ours": c_ours, "clipped_ref": c_ref, "skipped_ours": ours.skipped_steps,
        "skipped_ref": s_ref, "steps": STEPS, "types": types,
        "grad_norm_range": [min(NORMS), max(NORMS)],
        "hidden_step": int(ours.state[dict(ours_model.named_parameters())[[n for n in diffs if n.endswith("hidden.weight")][0]]]["step"]),
    })
    return ours_model


def checkpoint(out, rank, world, mesh, shapes):
    """FSDP2: save at step 60 with DCP, go on to 100; a fresh model and optimizer loaded from the checkpoint
    go on to 100 too: the two must agree bit for bit. Rank 0 also writes the gathered state at the save, for
    the test's load into one rank."""
    def build(seed):
        torch.manual_seed(seed)
        model = parallel("fsdp2", MLP(TARGET), mesh)
        opt = gainguard.AdamW(model.named_parameters(), base_shapes=shapes, lr=LR, weight_decay=WD, max_grad_norm=CLIP)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup)

    save_at = (STEPS * 3) // 5
    ckpt = os.path.join(out, "ckpt")
    model, opt, sched = build(0)
    run_steps(model, opt, sched, "fsdp2", rank, world, save_at)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
              "sched": sched.state_dict()}, checkpoint_id=ckpt)
    gathered = {
        "params": {n: full(p).detach().clone() for n, p in model.named_parameters()},
        "exp_avg": {n: full(opt.state[p]["exp_avg"]).clone() for n, p in model.named_parameters()},
        "exp_avg_sq": {n: full(opt.state[p]["exp_avg_sq"]).clone() for n, p in model.named_parameters()},
        "step": {n: float(opt.state[p]["step"]) for n, p in model.named_parameters()},
        "lr": {n: g["lr"] for g in opt.param_groups for n in g["param_names"]},
    }
    if rank == 0:
        torch.save(gathered, os.path.join(out, "ckpt_gathered.pt"))
    run_steps(model, opt, sched, "fsdp2", rank, world, STEPS - save_at, start=save_at)
    first = {n: full(p).detach().clone() for n, p in model.named_parameters()}

    model2, opt2, sched2 = build(1)
    state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2), "sched": sched2.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model2, state["model"])
    set_optimizer_state_dict(model2, opt2, state["optim"])
    sched2.load_state_dict(state["sched"])
    loaded_equal = all(torch.equal(full(p), gathered["params"][n]) for n, p in model2.named_parameters()) and all(
        torch.equal(full(opt2.state[p]["exp_avg_sq"]), gathered["exp_avg_sq"][n]) for n, p in model2.named_parameters())
    run_steps(model2, opt2, sched2, "fsdp2", rank, world, STEPS - save_at, start=save_at)
    second = {n: full(p).detach() for n, p in model2.named_parameters()}
    write(out, "dcp", rank, {
        "loaded_equal": loaded_equal,
        "bit_equal": {n: bool(torch.equal(first[n], second[n])) for n in first},
        "max_abs": {n: float((first[n] - second[n]).abs().max()) for n in first},
    })


def spectra(out, rank, world, mesh):
    """sigma_max of every sharded matrix, FSDP2 rows and TP columns and rows, against float64 SVD."""
    torch.manual_seed(3)
    found = {}
    for kind in ("fsdp2", "tp"):
        model = parallel(kind, MLP(TARGET), mesh)
        with torch.no_grad():
            for name, p in model.named_parameters():
                dim, why = sharded_spectra.shard_dim_of(p)
                if p.dim() != 2 or dim is None:
                    continue
                est = sharded_spectra.estimate(p.to_local(), dim, k=4, timeout=60)
                exact = float(torch.linalg.svdvals(full(p).double())[0])
                found[f"{kind}:{name}"] = {
                    "est": est.sigma_max, "exact": exact, "bytes": est.bytes_reduced, "iters": est.iterations,
                    "local": list(p.to_local().shape), "global": list(p.shape), "dim": dim,
                }
    write(out, "spectra", rank, found)

    # A rank late beyond the deadline (stuck, or gone): the round is dropped on every rank, with RoundDropped,
    # on the sampler's own group; the default group goes on.
    group = dist.new_group(backend="gloo")
    if rank == 1:
        time.sleep(3)
    start = time.perf_counter()
    try:
        sharded_spectra.estimate(torch.randn(32, 16), 0, group, timeout=1.0)
        late = {"dropped": False}
    except sharded_spectra.RoundDropped as e:
        late = {"dropped": True, "seconds": time.perf_counter() - start, "why": str(e)}
    dist.barrier()
    write(out, "late", rank, late)


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    shapes = gainguard.base_shapes(MLP(BASE), MLP(DELTA))
    if os.environ.get("GG_MESH") == "2d":
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        model = scenario("fsdp2_tp", out, rank, world, mesh, shapes)
        # `out` lives on the data-parallel mesh alone: each of its shards is held by the 2 ranks of a TP group.
        w = model.out.weight
        est = sharded_spectra.estimate(w.to_local(), 0, k=4, timeout=60, replicas=world // w.device_mesh.size())
        write(out, "spectra2d", rank, {"est": est.sigma_max, "exact": float(torch.linalg.svdvals(w.full_tensor().double())[0])})
        dist.barrier()
        dist.destroy_process_group()
        return
    mesh = init_device_mesh("cpu", (world,))
    for kind in ("ddp", "fsdp2", "tp"):
        scenario(kind, out, rank, world, mesh, shapes)
    checkpoint(out, rank, world, mesh, shapes)
    spectra(out, rank, world, mesh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
