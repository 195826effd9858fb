"""gainguard under Hugging Face's `Trainer`: a `LlamaForCausalLM` built from a `LlamaConfig` (no hub), hidden 128
against a hidden-64 base, trained 20 steps with `gainguard.hf.optimizers` and `GainguardCallback`, against the
same Trainer run with `torch.optim.AdamW` on the paper rule's groups; the loss and sigma_max scraped from the
embedded daemon's /metrics."""

import copy
import math
import os
import time
import urllib.request

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers reads it: nothing may reach a hub

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import gainguard
import gainguard.hf

VOCAB, SEQ, STEPS = 64, 32, 20
LR, WD = 3e-3, 0.1


def llama(hidden: int, device=None) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=SEQ, tie_word_embeddings=False,
    )
    with torch.device(device or "cpu"):
        return LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    """Sequences of a fixed random order-1 Markov chain: learnable, no download."""

    def __init__(self, n: int = 400):
        g = torch.Generator().manual_seed(0)
        table = torch.softmax(3.0 * torch.randn(VOCAB, VOCAB, generator=g), dim=-1)
        self.rows = torch.empty(n, SEQ, dtype=torch.long)
        self.rows[:, 0] = torch.randint(VOCAB, (n,), generator=g)
        for i in range(1, SEQ):
            self.rows[:, i] = torch.multinomial(table[self.rows[:, i - 1]], 1, generator=g)[:, 0]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def training_args(tmp_path, name):
    return TrainingArguments(
        output_dir=str(tmp_path / name), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=LR,
        weight_decay=WD, warmup_steps=4, lr_scheduler_type="cosine", logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )


def paper_groups(model, base):
    """The paper rule from its formulas (arXiv 2510.15262): a parameter whose two dimensions both grow with the
    width (target shape differs from the base in each) is matrix-like and gets lr / m and wd · m^0.5 with
    m = 128/64; every other parameter gets lr and no weight decay."""
    m = 128 / 64
    groups = []
    for name, p in model.named_parameters():
        b = base[name]
        matrix = p.dim() == 2 and all(t != s for t, s in zip(p.shape, b))
        groups.append({"params": [p], "lr": LR / m if matrix else LR, "weight_decay": WD * m**0.5 if matrix else 0.0})
    return groups


class ScrapeAtTheEnd(TrainerCallback):
    """Records the float64 sigma_max of one matrix after every step; before the monitor closes (this callback is
    listed first) flushes it and reads /metrics until the daemon has applied every sample the sampler emitted
    and shows the last logged loss (the body is cached up to 1 s), and keeps what it shows."""

    def __init__(self, watched: gainguard.hf.GainguardCallback, param: str):
        self.watched, self.param, self.found = watched, param, None
        self.svd_after_step = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        w = model.get_parameter(self.param).detach().double()
        self.svd_after_step[state.global_step] = torch.linalg.matrix_norm(w, ord=2).item()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        last_loss = [h["loss"] for h in state.log_history if "loss" in h][-1]
        monitor = self.watched.monitor
        assert monitor.flush(timeout=30), "the sampler did not drain within 30 s"
        emitted, addr = monitor.emitted_samples, monitor.metrics_addr
        deadline = time.monotonic() + 10
        values = {}
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
                body = r.read().decode()
            values = {}
            for line in body.splitlines():
                if 'run="hf"' not in line:
                    continue
                for name, key in (("gainguard_loss{", "loss"), ("gainguard_spectrum_samples_total{", "samples"), ("gainguard_spectrum_samples_dropped_total{", "dropped")):
                    if line.startswith(name):
                        values[key] = float(line.rsplit(" ", 1)[1])
                if line.startswith("gainguard_sigma_max{") and f'param="{self.param}"' in line:
                    values["sigma_max"] = float(line.rsplit(" ", 1)[1])
            if values.get("loss") == pytest.approx(last_loss, rel=1e-6) and values.get("samples") == emitted and "sigma_max" in values:
                self.found = dict(values, emitted=emitted, dropped_here=monitor.dropped_samples)
                return
            time.sleep(0.1)
        pytest.fail(f"/metrics at {addr} never showed the last loss {last_loss}, all {emitted} samples and a sigma_max of {self.param}: {values}")


def test_a_llama_trains_under_trainer_with_gainguard_as_torch_adamw_on_the_same_groups_and_is_monitored(tmp_path):
    torch.manual_seed(0)
    model = llama(128)
    gainguard.mup_readout(model, "lm_head")
    base = gainguard.base_shapes(llama(64, "meta"))

    watched = gainguard.hf.GainguardCallback(run="hf", listen="127.0.0.1:0", interval=2, budget_fraction=None)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    scrape = ScrapeAtTheEnd(watched, q_proj)
    args = training_args(tmp_path, "gainguard")
    opt, sched = gainguard.hf.optimizers(model, args, base)
    assert opt.plan().warnings == [], "embed_tokens is an embedding, lm_head a MuReadout: nothing to warn about"
    assert model.lm_head.width_mult == 2.0, "the optimizer set the readout's m from its plan"
    reference = copy.deepcopy(model)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched), callbacks=[scrape, watched])
    trainer.train()

    ref_opt = torch.optim.AdamW(paper_groups(reference, base.base), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    ref_sched = transformers.get_scheduler("cosine", ref_opt, num_warmup_steps=4, num_training_steps=STEPS)
    ref_trainer = Trainer(model=reference, args=training_args(tmp_path, "torch"), train_dataset=Tokens(), optimizers=(ref_opt, ref_sched))
    ref_trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ref_losses = [h["loss"] for h in ref_trainer.state.log_history if "loss" in h]
    assert len(losses) == len(ref_losses) == STEPS
    assert losses[-1] < 0.9 * losses[0], f"the model did not learn: {losses}"
    for t, (a, b) in enumerate(zip(losses[:5], ref_losses[:5])):
        assert a == pytest.approx(b, rel=1e-5), f"step {t + 1}: loss {a} against torch.optim.AdamW's {b}"
    worst = max(
        (float((p - q).detach().double().norm() / q.detach().double().norm()), n)
        for (n, p), q in zip(model.named_parameters(), reference.parameters())
    )
    print(f"after {STEPS} Trainer steps: max relative difference to torch.optim.AdamW {worst[0]:.2e} at {worst[1]}")
    assert worst[0] <= 1e-6, worst

    # The Trainer's own learning_rate is the first group's (embed_tokens, vector-like); the callback logs each
    # class's. Logged step s stepped with the cosine schedule's multiplier after s - 1 scheduler steps, 4 of
    # warmup: 0.5 (1 + cos(pi (s - 1 - 4) / 16)).
    at10 = next(h for h in trainer.state.log_history if h.get("step") == 10)
    multiplier = 0.5 * (1 + math.cos(math.pi * (10 - 1 - 4) / (STEPS - 4)))
    assert at10["learning_rate/vector_like"] == pytest.approx(LR * multiplier, rel=1e-9) == at10["learning_rate"]
    assert at10["learning_rate/matrix_like"] == pytest.approx(LR / 2 * multiplier, rel=1e-9)

    assert watched.monitor is None, "the callback closes the monitor when training ends"
    # Every 2nd step is a sampling round of the 14 matrices (2 layers x q, k, v, o, gate, up, down), 10 rounds. The
    # niced sampler runs behind a Trainer that keeps both cores busy and drops the rounds it cannot queue,
    # counted: each of the 140 samples was emitted or dropped, and /metrics exports the drops.
    found = scrape.found
    assert found["emitted"] + found["dropped_here"] == 10 * 14, found
    assert found["dropped"] == found["dropped_here"], f"/metrics exports the sampler's drop count: {found}"
    # What /metrics shows is the spectrum of the weights after one of the sampled steps (float64 SVD, 1e-3); with
    # nothing dropped, after the last step.
    sampled = {t: v for t, v in scrape.svd_after_step.items() if t % 2 == 0}
    step, svd = min(sampled.items(), key=lambda tv: abs(tv[1] - found["sigma_max"]))
    assert found["sigma_max"] == pytest.approx(svd, rel=1e-3), f"/metrics {found['sigma_max']} is no sampled step's sigma_max: {sampled}"
    if found["dropped_here"] == 0:
        assert step == STEPS, f"nothing dropped, yet /metrics shows step {step}'s sigma_max, not step {STEPS}'s"
    print(f"sigma_max on /metrics is step {step}'s ({found['sigma_max']:.4f}, SVD {svd:.4f}); {found['dropped_here']} of 140 samples dropped")
