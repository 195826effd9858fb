"""The monitor's side of torch.distributed: which rank samples which matrix, and the thread that estimates the
spectra of sharded matrices together with the other ranks.

- A matrix every rank holds whole (a plain tensor under DDP, a replicated DTensor) is sampled by exactly one
  rank, round-robin over the ranks in the optimizer's order, by the native sampler.
- A matrix sharded over the ranks (a DTensor `Shard(0)` or `Shard(1)` on a 1-D mesh) is estimated by every rank
  together (`sharded_spectra.estimate`), on a gloo process group of its own, on a Python thread (torch's
  products and gloo's waits release the GIL); the rank it is assigned to (the same round-robin) exports it.

Rounds: on a sampling step the training thread copies this rank's shards (a copy of its local tensors, nothing
communicated) and queues them; it never waits. The thread agrees with the other ranks on which queued round to
estimate with one all-reduce of `[-newest step, oldest step]` (MAX) on the sampler's group: the newest round
every rank has queued, unless one rank's queue no longer holds it, in which case everyone drops what is older
than the oldest round still held anywhere. Rounds not estimated are dropped and counted. Every collective has a
deadline; one missed (a rank gone or stuck) stops the sampler on this rank for good (counted), since a gloo
group that lost a member cannot be used again."""

import collections
import threading
import time
from typing import Dict, List, Optional, Tuple

import torch

from . import sharded_spectra
from ._distributed import is_dtensor, local


class Assignment:
    """Which slots this rank gives the native sampler, and which sharded matrices it estimates with the others."""

    def __init__(self, slots: List[Tuple[int, torch.Tensor, float]], sampled: set, rank: int, world: int):
        """`sampled`: the decision indices the sampler estimates (the matrix-like parameters); every other slot
        goes to the native side on every rank (it samples none of them, and its update ratios need none)."""
        self.native: List[int] = []  # decision indices given to the native sampler here
        self.sharded: List[Tuple[int, int, int]] = []  # (decision index, shard dim, exporting rank)
        self.replicas: Dict[int, int] = {}  # ranks holding each sharded matrix's same shard
        self.unsupported: Dict[int, str] = {}
        turn = 0
        for decision, p, _ in slots:
            if decision not in sampled or p.dim() != 2:
                if not is_dtensor(p):
                    self.native.append(decision)
                continue
            owner = turn % world
            turn += 1
            dim, why = sharded_spectra.shard_dim_of(p)
            if why is not None:
                self.unsupported[decision] = why
            elif dim is None:
                if owner == rank:
                    self.native.append(decision)
            else:
                self.sharded.append((decision, dim, owner))
                shards = 1
                for size, pl in zip(p.device_mesh.shape, p.placements):
                    if not pl.is_replicate():
                        shards *= size
                self.replicas[decision] = world // shards
        self._native = set(self.native)

    def native_slots(self, slots):
        """The slots the native sampler takes on this rank, replicated DTensors seen as their local tensor."""
        return [(d, local(p), h) for d, p, h in slots if d in self._native]


class ShardedSampler:
    """The thread estimating the sharded matrices of each queued round with the other ranks."""

    def __init__(self, assignment: Assignment, rank: int, k: int = 4, timeout: float = 30.0, max_queued: int = 4):
        import torch.distributed as dist

        self._a = assignment
        self._rank = rank
        self._k = k
        self._timeout = timeout
        self._max_queued = max_queued
        # Collective: every rank creates it, in the same order (gainguard.monitor is called on every rank).
        self._group = dist.new_group(backend="gloo")
        self._queue: "collections.OrderedDict[int, list]" = collections.OrderedDict()
        self._cv = threading.Condition()
        self._results: List[tuple] = []
        self.dropped = 0
        self.estimated = 0
        self.broken: Optional[str] = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="gainguard-sharded-spectra", daemon=True)
        self._thread.start()

    def submit(self, step: int, slots) -> None:
        """Queues this rank's shards at `step` (a copy; the trainer goes on)."""
        if not self._a.sharded or self.broken is not None:
            return
        by_decision = {d: (p, h) for d, p, h in slots}
        shards = []
        for decision, dim, owner in self._a.sharded:
            p, h = by_decision[decision]
            shards.append((decision, dim, owner, local(p).detach().clone(), h))
        with self._cv:
            self._queue[step] = shards
            while len(self._queue) > self._max_queued:
                self._queue.popitem(last=False)
                self.dropped += len(shards)
            self._cv.notify()

    def take_results(self) -> List[tuple]:
        with self._cv:
            out, self._results = self._results, []
        return out

    def _agree(self) -> Optional[int]:
        """The step every rank estimates next, or None (this rank holds nothing the others do: wait)."""
        import torch.distributed as dist

        with self._cv:
            steps = list(self._queue)
        t = torch.tensor([-float(steps[-1]), float(steps[0])], dtype=torch.float64)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        if not work.wait(timeout=_td(self._timeout)):
            raise sharded_spectra.RoundDropped("agreeing on a round")
        # Every rank queues the same sampling steps and drops only its oldest, so each queue holds a contiguous
        # run of them: `newest` (the least of the ranks' newest) is held everywhere when it is not older than
        # `oldest` (the greatest of the ranks' oldest). Older rounds are skipped to stay current.
        newest, oldest = -int(t[0]), int(t[1])
        keep_from = newest if newest >= oldest else oldest
        with self._cv:
            for s in [s for s in self._queue if s < keep_from]:
                self.dropped += len(self._queue.pop(s))
            return newest if newest >= oldest and newest in self._queue else None

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop and not self._queue:
                    return
            try:
                step = self._agree()
                if step is None:
                    continue
                with self._cv:
                    shards = self._queue.pop(step)
                for decision, dim, owner, t, h in shards:
                    start = time.perf_counter()
                    r = self._a.replicas[decision]
                    fro2 = torch.tensor([float(t.double().pow(2).sum()) / r], dtype=torch.float64)
                    e = sharded_spectra.estimate(t, dim, self._group, k=self._k, timeout=self._timeout, replicas=r)
                    import torch.distributed as dist

                    work = dist.all_reduce(fro2, group=self._group, async_op=True)
                    if not work.wait(timeout=_td(self._timeout)):
                        raise sharded_spectra.RoundDropped("the Frobenius norm")
                    if owner == self._rank:
                        fro = float(fro2.sqrt())
                        finite = all(map(_finite, e.top_k)) and _finite(fro)
                        with self._cv:
                            self._results.append((step, decision, e.sigma_max if finite else None, e.top_k if finite else [],
                                                  e.iterations, fro if finite else None, time.perf_counter() - start, h))
                    self.estimated += 1
            except Exception as exc:  # a missed deadline or a broken group: stop for good, counted
                with self._cv:
                    self.broken = f"{type(exc).__name__}: {exc}"
                    self.dropped += sum(len(v) for v in self._queue.values()) + 1
                    self._queue.clear()
                return

    def close(self, timeout: float = 30.0) -> None:
        """Estimates what is queued (with the other ranks, which close too), then stops the thread."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def _td(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)
