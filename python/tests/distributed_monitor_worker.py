"""One rank of test_distributed_monitor.py's torchrun job: two monitored runs on one node's one /metrics. Run
`ddp` (DDP: every matrix replicated) serves /metrics on LISTEN from local rank 0, whose embedded daemon takes rank
1's events on a Unix socket; run `tp` (tensor parallel: its matrices sharded) sends every rank's events to that
socket too. After training each rank writes OUT/ready.rank{R} and keeps its monitors open until the test, having
read Prometheus, writes OUT/release; OUT/die before that makes rank 1 exit at once, as a crashed rank."""

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(__file__))
import gainguard  # noqa: E402
from gainguard.monitor import _node_socket  # noqa: E402

STEPS, INTERVAL = 24, 4


class Deep(nn.Module):
    """Two hidden matrices (matrix-like), so that round-robin sampling gives one to each of two ranks."""

    def __init__(self, width):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.h1 = nn.Linear(width, width)
        self.h2 = nn.Linear(width, width)
        self.out = nn.Linear(width, 4)

    def forward(self, x):
        return self.out(torch.relu(self.h2(torch.relu(self.h1(torch.relu(self.inp(x)))))))


def train(model, opt, mon, rank, same_batch):
    for t in range(STEPS):
        g = torch.Generator().manual_seed(t if same_batch else 100 * t + rank)
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        mon.step(loss.item(), 16)


def main():
    out, listen = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    shapes = gainguard.base_shapes(Deep(16), Deep(32))

    torch.manual_seed(0)
    ddp = DDP(Deep(64))
    opt1 = gainguard.AdamW(ddp.named_parameters(), base_shapes=shapes, lr=3e-3, weight_decay=0.1)
    mon1 = gainguard.monitor(opt1, run="ddp", listen=listen, interval=INTERVAL, planned_steps=STEPS, budget_fraction=None)
    train(ddp, opt1, mon1, rank, same_batch=False)

    torch.manual_seed(1)
    mesh = init_device_mesh("cpu", (world,))
    tp = parallelize_module(Deep(64), mesh, {"h1": ColwiseParallel(), "h2": RowwiseParallel()})
    opt2 = gainguard.AdamW(tp.named_parameters(), base_shapes=shapes, lr=3e-3, weight_decay=0.1)
    mon2 = gainguard.monitor(opt2, run="tp", connect=f"unix:{_node_socket('ddp')}", interval=INTERVAL, planned_steps=STEPS,
                             budget_fraction=None)
    train(tp, opt2, mon2, rank, same_batch=True)
    # Drain the sharded estimates (every rank together) before reporting what this rank knows.
    mon2._sharded.close()
    mon2._emit_sharded()
    exact = {n: float(torch.linalg.svdvals(p.full_tensor().double())[0]) for n, p in tp.named_parameters() if n in ("h1.weight", "h2.weight")}
    ddp_exact = {n: float(torch.linalg.svdvals(p.detach().double())[0]) for n, p in ddp.module.named_parameters() if n in ("h1.weight", "h2.weight")}
    report = {
        "metrics_addr": mon1.metrics_addr, "rank": mon1.rank, "local_rank": mon1.local_rank, "world": mon1.world_size,
        "native_ddp": mon1._assignment.native, "sharded_tp": [d for d, _, _ in mon2._assignment.sharded],
        "sharded_estimates": mon2.sharded_estimates, "dropped_tp": mon2._sharded.dropped, "broken": mon2._sharded.broken,
        "exact_tp": exact, "exact_ddp": ddp_exact,
    }
    with open(os.path.join(out, f"ready.rank{rank}"), "w") as f:
        json.dump(report, f)
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(out, "release")) and time.monotonic() < deadline:
        if rank == 1 and os.path.exists(os.path.join(out, "die")):
            os._exit(0)  # dies as a crashed rank does: no Goodbye, its connection simply goes away
        time.sleep(0.2)
    mon2.close()
    mon1.close()
    # No collective after this point: rank 1 may be gone.
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
