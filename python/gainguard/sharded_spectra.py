"""Top singular values of a matrix sharded over ranks, without gathering it: block Krylov iteration (Lanczos on
the Gram matrix with Rayleigh–Ritz, as the Rust estimator `spectra::krylov`) where each pass multiplies the local
shard and all-reduces only the `(m or n) × b` block.

A row-sharded `W` (`Shard(0)`: rank i holds rows `W_i`) has `WᵀW = Σ_i W_iᵀ W_i`: a pass computes
`W_iᵀ (W_i Q)` locally and sums the `n × b` results. A column-sharded `W` (`Shard(1)`) is the row-sharded `Wᵀ`,
whose singular values are the same: the pass sums `m × b`. Communication per estimate is
`iterations · (side · b + 1)` float64 values, `O((m + n)·k)`, never `O(m·n)`; no rank holds the whole matrix.

Every rank runs the same arithmetic on the same reduced blocks from the same seeded start block, so every rank
takes the same decisions (another iteration, or stop) and issues the same collectives in the same order: no
rank can wait on a collective another rank skipped. A rank that dies mid-round leaves the others' all-reduce
unfinished: each wait has a deadline, after which the round is dropped (`RoundDropped`) and the caller stops
using the process group (gloo cannot recover a group with a dead member)."""

import time
from dataclasses import dataclass
from typing import Optional, Tuple

import torch


class RoundDropped(RuntimeError):
    """An all-reduce of the estimate did not complete before its deadline (a rank is slow or gone)."""


@dataclass
class ShardedEstimate:
    sigma_max: float
    top_k: list
    iterations: int
    converged: bool
    bytes_reduced: int
    seconds: float


def operand_of(local: torch.Tensor, shard_dim: Optional[int]) -> torch.Tensor:
    """The local operand whose rows are sharded: the shard itself for `Shard(0)` (or a replicated matrix,
    `shard_dim=None`), its transpose for `Shard(1)`."""
    if local.dim() != 2:
        raise ValueError(f"sharded spectra take matrices; got a local shard of shape {tuple(local.shape)}")
    return local.t() if shard_dim == 1 else local


def estimate(
    local: torch.Tensor,
    shard_dim: Optional[int],
    group=None,
    k: int = 4,
    oversample: int = 4,
    tol: float = 1e-5,
    max_iters: int = 40,
    seed: int = 0x5EED,
    timeout: Optional[float] = None,
    replicas: int = 1,
) -> ShardedEstimate:
    """Top-`k` singular values of the matrix whose shard this rank holds (`local`, sharded on `shard_dim`,
    0 or 1; None: the whole matrix is here and nothing is reduced), over process group `group`. `replicas`:
    how many ranks of `group` hold this same shard (a mesh smaller than the group, or a replicated mesh
    dimension); each contributes `1/replicas` of its product, so the sum counts every shard once. Every rank of
    `group` must call this with its shard of the same matrix, in the same order as the others."""
    import torch.distributed as dist

    start = time.perf_counter()
    a = operand_of(local.detach(), shard_dim).to(torch.float64)
    n = a.shape[1]
    reduce = shard_dim is not None and dist.is_initialized() and dist.get_world_size(group) > 1
    bytes_reduced = 0

    def all_reduce(t: torch.Tensor) -> None:
        nonlocal bytes_reduced
        if not reduce:
            return
        bytes_reduced += t.numel() * t.element_size()
        work = dist.all_reduce(t, group=group, async_op=True)
        if timeout is None:
            work.wait()
            return
        try:
            done = work.wait(timeout=_timedelta(timeout))
        except RuntimeError as e:  # gloo raises "Operation timed out!"
            raise RoundDropped(f"an all-reduce of the sharded estimate did not complete in {timeout} s: {e}") from e
        if not done:
            raise RoundDropped(f"an all-reduce of the sharded estimate did not complete in {timeout} s")

    # Every rank needs the side of the other sharded dimension, which the shards share: n is the same.
    b = min(k + oversample, n)
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, b, generator=gen, dtype=torch.float64))[0]
    basis, products = [], []
    prev = None
    sigmas = torch.zeros(1, dtype=torch.float64)
    converged = False
    it = 0
    max_blocks = max(1, min(max_iters, -(-n // b)))
    for it in range(1, max_blocks + 1):
        w = a.t() @ (a @ q)  # this rank's part of (WᵀW)·Q
        if replicas != 1:
            w = w / replicas
        all_reduce(w)
        basis.append(q)
        products.append(w)
        qs = torch.cat(basis, dim=1)
        h = qs.t() @ torch.cat(products, dim=1)
        h = (h + h.t()) / 2
        theta = torch.linalg.eigvalsh(h).flip(0)
        sigmas = theta.clamp_min(0).sqrt()
        if prev is not None and abs(float(sigmas[0] - prev)) <= tol * max(float(sigmas[0]), 1e-300):
            converged = True
            break
        if qs.shape[1] >= n:
            converged = True
            break
        prev = float(sigmas[0])
        # Next block: (WᵀW)·Q_j orthogonalised against the basis (twice, for rounding), normalised, and once more
        # after normalising: a direction that was rounding noise (W of low rank) is only orthogonal to the basis
        # once it is unit length. Such a direction is a valid extension of the basis (Ritz values stay below
        # the singular values); when every new direction is noise the Krylov space is invariant and exact.
        nxt = w
        for _ in range(2):
            nxt = nxt - qs @ (qs.t() @ nxt)
        nxt = nxt[:, : min(b, n - qs.shape[1])]
        q, r = torch.linalg.qr(nxt)
        if float(r.diagonal().abs().max()) <= 1e-12 * max(float(sigmas[0]) ** 2, 1e-300):
            converged = True
            break
        q = torch.linalg.qr(q - qs @ (qs.t() @ q))[0]
    top = [float(s) for s in sigmas[:k]]
    return ShardedEstimate(top[0], top, it, converged, bytes_reduced, time.perf_counter() - start)


def shard_dim_of(p) -> Tuple[Optional[int], Optional[str]]:
    """`(tensor dimension, None)` for a DTensor matrix sharded on one mesh dimension (the others replicated),
    `(None, None)` for a replicated or plain one, `(None, reason)` for a placement this estimator does not take."""
    from ._distributed import is_dtensor

    if not is_dtensor(p):
        return None, None
    from torch.distributed.tensor import Replicate, Shard

    dims = [pl.dim for pl in p.placements if isinstance(pl, Shard)]
    if any(not isinstance(pl, (Shard, Replicate)) for pl in p.placements):
        return None, f"placements {p.placements}"
    if not dims:
        return None, None
    if len(dims) > 1:
        return None, f"sharded on {len(dims)} mesh dimensions ({p.placements})"
    return dims[0], None


def _timedelta(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)
