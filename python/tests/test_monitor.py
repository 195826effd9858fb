"""gainguard.monitor against a real Prometheus (Debian's /usr/bin/prometheus, or $PROMETHEUS), on loopback."""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import torch

import gainguard
from conftest import BASE, DELTA, MLP, TARGET, batch

STEPS, INTERVAL = 60, 5


def prometheus_binary():
    path = os.environ.get("PROMETHEUS") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else shutil.which("prometheus"))
    if not path:
        pytest.fail("prometheus is not installed (make setup installs it: scripts/setup-services.sh)")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(addr, promql):
    url = f"http://{addr}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)["data"]["result"]


def wait_for(addr, promql, until=lambda value: True, timeout=30.0):
    """The value of `promql` once Prometheus has scraped one for which `until` holds (scrapes lag the run)."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        try:
            result = query(addr, promql)
            if result:
                seen = float(result[0]["value"][1])
                if until(seen):
                    return seen
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"Prometheus did not return the expected {promql} within {timeout}s (last value: {seen})")


def run(mon_kwargs, opt_seed=0):
    torch.manual_seed(opt_seed)
    model = MLP(TARGET)
    opt = gainguard.AdamW(model.named_parameters(), base_shapes=gainguard.base_shapes(MLP(BASE), MLP(DELTA)), lr=3e-3, weight_decay=0.1)
    mon = gainguard.monitor(opt, interval=INTERVAL, planned_steps=STEPS, **mon_kwargs)
    loss = None
    for t in range(STEPS):
        x, y = batch(t)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        mon.step(loss.item(), 32)
    return model, mon, loss.item()


@pytest.fixture
def prometheus(tmp_path):
    target_port = free_port()
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 250ms\n  scrape_timeout: 200ms\n"
        f"scrape_configs:\n  - job_name: gainguard\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
    )
    proc = subprocess.Popen(
        [prometheus_binary(), f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield f"127.0.0.1:{prom_port}", f"127.0.0.1:{target_port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_prometheus_scrapes_the_loss_sigma_max_and_gain_ratio_of_a_monitored_run(tmp_path, prometheus):
    prom, listen = prometheus
    # The proxy run records its sigma_max profile; the target run, here the same model and seed, is
    # compared with it, so its gain ratio is 1.
    profile = tmp_path / "proxy_profile.json"
    _, proxy_mon, _ = run({"run": "proxy", "listen": "127.0.0.1:0", "record_profile": profile})
    proxy_mon.close()
    assert profile.exists()

    model, mon, last_loss = run({"run": "py-target", "listen": listen, "reference": profile})
    try:
        assert mon.metrics_addr == listen
        loss = wait_for(prom, 'gainguard_loss{run="py-target"}', lambda v: v == pytest.approx(last_loss, rel=1e-6))
        # The last sample is at most INTERVAL steps old; late in training the weights move little.
        svd = torch.linalg.matrix_norm(model.hidden.weight.detach().double(), ord=2).item()
        sigma = wait_for(prom, 'gainguard_sigma_max{run="py-target",param="hidden.weight"}', lambda v: v == pytest.approx(svd, rel=0.05))
        ratio = wait_for(prom, 'gainguard_gain_ratio{run="py-target",param="hidden.weight"}', lambda v: v == pytest.approx(1.0, rel=0.02))
        # The decay horizon of the latest sample (the sampler's budget may have stretched its interval): the
        # optimizer's H after k steps of the paper rule's lr/m * wd*m^0.5 at m = TARGET/BASE, for some step k, so
        # that the alerts' horizon gate can act for this optimizer too (test_adamw checks the sum itself).
        m = TARGET / BASE
        per_step = 3e-3 / m * 0.1 * m**0.5
        horizon = wait_for(prom, 'gainguard_decay_horizon{run="py-target",param="hidden.weight"}',
                           lambda v: any(v == pytest.approx(k * per_step, rel=1e-9) for k in range(1, STEPS + 1)))
        print(f"scraped: loss {loss} (last {last_loss}), sigma_max {sigma} (float64 SVD {svd}), gain_ratio {ratio}, H {horizon}")
    finally:
        mon.close()


def test_monitor_without_an_address_raises_a_value_error(shapes, monkeypatch):
    monkeypatch.delenv("GAINGUARD_ADDR", raising=False)
    opt = gainguard.AdamW(MLP(TARGET).named_parameters(), base_shapes=shapes)
    with pytest.raises(ValueError, match="listen="):
        gainguard.monitor(opt, run="x")


def gainguardd_binary():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.environ.get("GAINGUARDD") or os.path.join(root, "target", "release", "gainguardd")
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: build it first (cargo build --release -p gainguard-daemon; make test does)")
    return path


def test_a_run_sent_to_a_standalone_gainguardd_through_gainguard_addr_reaches_its_metrics(tmp_path, monkeypatch):
    sock = tmp_path / "gainguardd.sock"
    port = free_port()
    proc = subprocess.Popen(
        [gainguardd_binary(), f"--listen=127.0.0.1:{port}", f"--ingest=unix:{sock}", "--nvml=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, f"gainguardd exited: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "gainguardd did not create its socket"
            time.sleep(0.1)
        monkeypatch.setenv("GAINGUARD_ADDR", f"unix:{sock}")
        _, mon, last_loss = run({"run": "py-connected"})
        assert mon.metrics_addr is None
        mon.close()
        deadline = time.monotonic() + 20
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                body = r.read().decode()
            lines = [line for line in body.splitlines() if line.startswith("gainguard_loss{") and 'run="py-connected"' in line]
            if lines or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert lines, "gainguardd never exported the run's loss"
        assert float(lines[0].rsplit(" ", 1)[1]) == pytest.approx(last_loss, rel=1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
