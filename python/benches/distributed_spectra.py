"""Spectra over ranks (gloo, CPU, loopback): bytes communicated per sigma_max estimate of a row-sharded matrix
against its size (and against gathering it), and sampling time per rank at world sizes 1, 2 and 4, for
  - sharded matrices (FSDP2 / tensor parallel): every rank estimates each matrix together
    (gainguard.sharded_spectra.estimate), on its rows only;
  - replicated matrices (DDP): each rank estimates its round-robin share of them, whole.

    .venv/bin/python python/benches/distributed_spectra.py            # runs torchrun for 1, 2 and 4 ranks

Each world size is one `torchrun --nproc_per_node W` job; the parent prints one table with the ratios. On a
machine with fewer cores than ranks the per-rank times include the ranks' competition for them (say so when
recording)."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

SIZES = [(256, 256), (512, 512), (1024, 1024), (2048, 1024)]
REPLICATED = 8  # matrices of 512 x 512 shared round-robin
REPEATS = 3


def worker(out):
    import torch
    import torch.distributed as dist

    from gainguard import sharded_spectra

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    found = {"sharded": {}, "replicated": None}
    for m, n in SIZES:
        w = torch.randn(m, n, generator=torch.Generator().manual_seed(m * 7 + n))
        shard = w.chunk(world, dim=0)[rank].contiguous()
        best, est = float("inf"), None
        for _ in range(REPEATS):
            dist.barrier()
            t = time.perf_counter()
            est = sharded_spectra.estimate(shard, 0 if world > 1 else None, k=4, tol=1e-4)
            best = min(best, time.perf_counter() - t)
        found["sharded"][f"{m}x{n}"] = {"seconds": best, "bytes": est.bytes_reduced, "iters": est.iterations, "sigma": est.sigma_max}
    mats = [torch.randn(512, 512, generator=torch.Generator().manual_seed(i)) for i in range(REPLICATED)]
    mine = [w for i, w in enumerate(mats) if i % world == rank]
    best = float("inf")
    for _ in range(REPEATS):
        dist.barrier()
        t = time.perf_counter()
        for w in mine:
            sharded_spectra.estimate(w, None, k=4, tol=1e-4)
        best = min(best, time.perf_counter() - t)
    found["replicated"] = {"seconds": best, "matrices": len(mine)}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(found, f)
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world):
    out = tempfile.mkdtemp(prefix=f"gg-bench-w{world}-")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "--local_addr=127.0.0.1", os.path.abspath(__file__), "--worker", out]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


def main():
    worlds = [1, 2, 4]
    results = {w: run(w) for w in worlds}
    print("sharded matrices (rows split over the ranks): per estimate, k = 4, block 8, float64 reductions")
    print(f"{'matrix':>10} {'W':>2} {'iters':>5} {'bytes reduced':>14} {'gather bytes':>13} {'ratio':>7} {'s/rank (max)':>12} {'vs W=1':>7}")
    for m, n in SIZES:
        key = f"{m}x{n}"
        base = max(r["sharded"][key]["seconds"] for r in results[1])
        for w in worlds:
            rs = results[w]
            e = rs[0]["sharded"][key]
            gather = (w - 1) * m * n * 4 // w if w > 1 else 0  # float32 rows every other rank would send to one
            secs = max(r["sharded"][key]["seconds"] for r in rs)
            ratio = f"{e['bytes'] / gather:.4f}" if gather else "-"
            print(f"{key:>10} {w:>2} {e['iters']:>5} {e['bytes']:>14} {gather:>13} {ratio:>7} {secs:>12.4f} {secs / base:>7.2f}")
    print(f"\nreplicated matrices ({REPLICATED} of 512x512, round-robin): sampling time per rank")
    base = max(r["replicated"]["seconds"] for r in results[1])
    for w in worlds:
        rs = results[w]
        secs = max(r["replicated"]["seconds"] for r in rs)
        print(f"  W={w}: {max(r['replicated']['matrices'] for r in rs)} matrices per rank, {secs:.4f} s per rank (max), {secs / base:.2f} of W=1")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
