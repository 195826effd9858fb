"""gainguard.monitor under `torchrun --nproc_per_node 2` (gloo, CPU, loopback): one /metrics on the node, served by
local rank 0's embedded daemon, which takes rank 1's events on a Unix socket; scraped by a real Prometheus. Each
matrix's sigma_max series is there exactly once (replicated DDP matrices sampled round-robin, tensor-parallel
shards estimated by both ranks together and exported by one), with rank labels."""

import json
import os
import subprocess
import sys
import time

import pytest

from test_monitor import free_port, prometheus, query, wait_for  # noqa: F401 (prometheus: the fixture)

HERE = os.path.dirname(os.path.abspath(__file__))
MATRICES = ("h1.weight", "h2.weight")


def test_one_metrics_endpoint_per_node_with_each_matrix_once_and_rank_labels(tmp_path, prometheus):
    prom, listen = prometheus
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::gainguard.PlanWarning")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "--local_addr=127.0.0.1", os.path.join(HERE, "distributed_monitor_worker.py"),
           str(out), listen]
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not all((out / f"ready.rank{r}").exists() for r in (0, 1)):
            if job.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the torchrun job ended or hung before training finished:\n{job.communicate(timeout=30)[0][-6000:]}")
            time.sleep(0.5)
        ready = [json.loads((out / f"ready.rank{r}").read_text()) for r in (0, 1)]
        # Local rank 0 serves; rank 1 only sends (no port bound twice).
        assert ready[0]["metrics_addr"] == listen and ready[1]["metrics_addr"] is None
        assert [r["rank"] for r in ready] == [0, 1] and all(r["world"] == 2 for r in ready)
        for r in ready:
            assert r["broken"] is None and r["sharded_estimates"] > 0, r
        # Both ranks' steps, for both runs, on the one endpoint.
        for run in ("ddp", "tp"):
            for rank in (0, 1):
                wait_for(prom, f'gainguard_loss{{run="{run}",rank="{rank}"}}')
        for run, exact in (("ddp", ready[0]["exact_ddp"]), ("tp", ready[0]["exact_tp"])):
            for param in MATRICES:
                wait_for(prom, f'gainguard_sigma_max{{run="{run}",param="{param}"}}',
                         lambda v, e=exact[param]: v == pytest.approx(e, rel=1e-3), timeout=30)
                series = query(prom, f'gainguard_sigma_max{{run="{run}",param="{param}"}}')
                assert len(series) == 1, (run, param, series)
            # Round-robin: the two matrices are exported by different ranks.
            ranks = {query(prom, f'gainguard_sigma_max{{run="{run}",param="{p}"}}')[0]["metric"]["rank"] for p in MATRICES}
            assert ranks == {"0", "1"}, (run, ranks)
        # Rank 1 dies (no Goodbye): that rank shows as down, rank 0 stays up and its endpoint keeps serving.
        wait_for(prom, 'gainguard_trainer_up{run="ddp",rank="1"}', lambda v: v == 1)
        (out / "die").write_text("")
        wait_for(prom, 'gainguard_trainer_up{run="ddp",rank="1"}', lambda v: v == 0, timeout=30)
        assert wait_for(prom, 'gainguard_trainer_up{run="ddp",rank="0"}') == 1
    finally:
        (out / "release").write_text("")
        try:
            job.wait(timeout=60)
        except subprocess.TimeoutExpired:
            job.kill()
    assert job.returncode == 0, job.communicate()[0][-6000:] if job.stdout else ""
