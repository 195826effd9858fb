"""A nanoGPT-style training loop (model and loop after karpathy/nanoGPT's model.py and train.py, condensed) that
adopts gainguard by changing five lines, each marked `# gainguard (n/5)`: the import, the base shapes, the
optimizer, the monitor, and one call per step. Everything else is the plain PyTorch loop, with one habit to
keep: set the learning-rate schedule through a multiplier (here `LambdaLR`), not by assigning every group's
`lr = get_lr(it)` as nanoGPT's train.py does, which would overwrite the width-scaled values of the groups.

    .venv/bin/python examples/python/nanogpt_train.py --steps 300

Trains a character-level GPT on a synthetic corpus while an embedded daemon serves
http://127.0.0.1:9464/metrics (loss, sigma_max per matrix, ...; `GAINGUARD_LISTEN` picks another address,
port 0 any free one) for Prometheus to scrape. The monitor closes itself at exit.
"""

import argparse
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn import functional as F

import gainguard  # gainguard (1/5)


@dataclass
class GPTConfig:
    block_size: int = 32
    vocab_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.n_head, self.n_embd = config.n_head, config.n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(config.n_embd), CausalSelfAttention(config)
        self.ln_2, self.mlp = nn.LayerNorm(config.n_embd), MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def corpus(n_chars: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """A synthetic text: a random order-2 Markov chain over `vocab` symbols (learnable structure, no download)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.softmax(4.0 * torch.randn(vocab, vocab, vocab, generator=g), dim=-1)
    out = torch.empty(n_chars, dtype=torch.long)
    out[0], out[1] = 0, 1
    u = torch.rand(n_chars, generator=g)
    for i in range(2, n_chars):
        out[i] = min(int(torch.searchsorted(table[out[i - 2], out[i - 1]].cumsum(0), u[i])), vocab - 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n-embd", type=int, default=64, help="the width (the proxy's is 16)")
    ap.add_argument("--lr", type=float, default=3e-3, help="tuned on the proxy")
    ap.add_argument("--weight-decay", type=float, default=0.1, help="tuned on the proxy")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    config = GPTConfig(n_embd=args.n_embd)
    data = corpus(20_000, config.vocab_size)
    model = GPT(config)
    warmup_iters, learning_rate, min_lr = args.steps // 10, args.lr, args.lr / 10

    def get_lr(it):  # nanoGPT's warmup then cosine decay, as a multiplier of each group's lr
        if it < warmup_iters:
            return (it + 1) / (warmup_iters + 1)
        ratio = (it - warmup_iters) / max(1, args.steps - warmup_iters)
        return (min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)) / learning_rate

    base = gainguard.base_shapes(GPT(replace(config, n_embd=16)), GPT(replace(config, n_embd=32)))  # gainguard (2/5)
    optimizer = gainguard.AdamW(model.named_parameters(), base_shapes=base, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))  # gainguard (3/5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, get_lr)
    mon = gainguard.monitor(optimizer, run="nanogpt", listen=os.environ.get("GAINGUARD_LISTEN", "127.0.0.1:9464"), planned_steps=args.steps)  # gainguard (4/5)

    tokens_per_iter = args.batch_size * config.block_size
    for it in range(args.steps):
        ix = torch.randint(len(data) - config.block_size - 1, (args.batch_size,))
        x = torch.stack([data[i : i + config.block_size] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + config.block_size] for i in ix])
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        mon.step(loss.item(), tokens_per_iter)  # gainguard (5/5)
        if it % 50 == 0 or it == args.steps - 1:
            print(f"iter {it}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
