"""The peers of `gainguard inspect` in scripts/bench-inspect.sh (see BENCHMARKS.md).

    bench_inspect.py make FILE             write the 84-matrix LLaMA-shaped fp32 checkpoint
    bench_inspect.py svdvals FILE          time torch.linalg.svdvals over its matrices (prints JSON)
    bench_inspect.py ww FILE               time WeightWatcher analyze() on them (prints JSON)
    bench_inspect.py check FILE OUT.json   compare gainguard's JSON with a float64 SVD of every matrix

The checkpoint: d_model 768, 12 blocks of q, k, v, o [768, 768] and a SwiGLU MLP gate, up [832, 768],
down [768, 832] (d_ff 832 makes 51.3M parameters in 84 matrices), Gaussian weights of std 0.02 as at
initialisation: no gap at the top of any spectrum, the hardest case for an iterative estimator.
The file is written with the safetensors framing by hand (the format is an 8-byte header length, a JSON
header and the raw little-endian bytes), so that no safetensors package is needed.
"""

import json
import struct
import sys
import time

import os

import numpy as np
import torch

if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))

D, D_FF, LAYERS = 768, 832, 12


def shapes():
    for i in range(LAYERS):
        for p in "qkvo":
            yield f"blocks.{i}.attn.{p}.weight", (D, D)
        yield f"blocks.{i}.mlp.gate.weight", (D_FF, D)
        yield f"blocks.{i}.mlp.up.weight", (D_FF, D)
        yield f"blocks.{i}.mlp.down.weight", (D, D_FF)


def make(path):
    gen = torch.Generator().manual_seed(18)
    header, chunks, offset = {}, [], 0
    for name, shape in shapes():
        w = (torch.randn(shape, generator=gen) * 0.02).numpy().astype("<f4")
        b = w.tobytes()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(b)]}
        chunks.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in chunks:
            f.write(b)
    params = sum(a * b for _, (a, b) in shapes())
    print(f"wrote {path}: {len(header)} matrices, {params / 1e6:.1f}M fp32 parameters")


def load(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        s, t = e["data_offsets"]
        out[name] = torch.from_numpy(np.frombuffer(data[s:t], dtype="<f4").reshape(e["shape"]).copy())
    return out


def svdvals(path):
    mats = load(path)
    start = time.perf_counter()
    top = {name: torch.linalg.svdvals(w)[0].item() for name, w in mats.items()}
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads(), "torch": torch.__version__, "sigma_max": top}))


def ww(path):
    import weightwatcher

    mats = load(path)
    model = torch.nn.Sequential()
    for i, (name, w) in enumerate(mats.items()):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        model.add_module(f"m{i}", lin)
    watcher = weightwatcher.WeightWatcher(model=model)
    start = time.perf_counter()
    details = watcher.analyze()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "layers": len(details), "weightwatcher": weightwatcher.__version__, "threads": torch.get_num_threads()}))


def check(path, out_json):
    mats = load(path)
    rows = {r["name"]: r for r in json.load(open(out_json))}
    worst = {"sigma_max": 0.0, "top_k": 0.0, "stable_rank": 0.0, "frobenius_norm": 0.0}
    for name, w in mats.items():
        s = torch.linalg.svdvals(w.double()).tolist()
        fro2 = sum(x * x for x in s)
        r = rows[name]
        want = {"sigma_max": s[0], "stable_rank": fro2 / s[0] ** 2, "frobenius_norm": fro2**0.5}
        for key, v in want.items():
            worst[key] = max(worst[key], abs(r[key] - v) / v)
        for got, v in zip(r["top_k"], s):
            worst["top_k"] = max(worst["top_k"], abs(got - v) / v)
    print(json.dumps({"matrices": len(mats), "max_rel_err_vs_float64_svd": worst}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"make": make, "svdvals": svdvals, "ww": ww, "check": check}[cmd](*args)
