"""`gainguard.monitor(opt, ...)`: telemetry, the spectra sampler and the reference profile for a
`gainguard.AdamW`, in one call, served by an embedded daemon (`listen=`) or sent to a standalone gainguardd
(`connect=`). The sampler runs on its own thread and never makes the trainer wait: when it falls behind it
drops samples and counts them (`gainguard_spectrum_samples_dropped_total`)."""

import atexit
import hashlib
import os
import tempfile
from typing import Optional, Union

from . import _native
from ._distributed import local
from .optim import AdamW

PathLike = Union[str, os.PathLike]


class Monitor:
    """Attached to an optimizer by `gainguard.monitor`; call `.step(loss, tokens)` after each `opt.step()` and
    `.close()` at the end (or use it as a context manager)."""

    def __init__(self, opt: AdamW, native, dist_info=None, interval: int = 10, spectra: bool = True):
        self._opt = opt
        self._native = native
        self._interval = max(1, int(interval))
        self.rank, self.local_rank, self.world_size = dist_info or (0, 0, 1)
        self._assignment = None
        self._sharded = None
        self._sharded_dropped_reported = 0
        if self.world_size > 1 and spectra:
            from ._dist_sampler import Assignment, ShardedSampler

            sampled = {i for i, d in enumerate(opt._plan.decisions()) if d[4] == "matrix_like"}
            self._assignment = Assignment(opt._slots(), sampled, self.rank, self.world_size)
            if self._assignment.sharded:
                self._sharded = ShardedSampler(self._assignment, self.rank)
        # torch's step hooks: the pre-hook sees the parameters before the update, the post-hook the update and
        # what the step decided (`opt.last_step`). A step that raises runs no post-hook.
        self._hooks = [opt.register_step_pre_hook(self._before_step), opt.register_step_post_hook(self._after_step)]
        # A script that never calls close() still says goodbye and flushes its last events.
        atexit.register(self.close)

    def _slots(self, opt: AdamW):
        """The slots the native sampler takes here: all of them alone; under torchrun this rank's share of the
        replicated matrices (and every non-matrix, which it does not sample), never a sharded DTensor."""
        slots = opt._slots()
        if self._assignment is None:
            # One process: a DTensor (a one-rank mesh, or spectra off) is its local tensor; the native side
            # takes plain tensors only.
            return [(d, local(p), h) for d, p, h in slots]
        return self._assignment.native_slots(slots)

    def _before_step(self, opt: AdamW, args, kwargs) -> None:
        self._native.before_step(opt.step_calls + 1, self._slots(opt))

    def _after_step(self, opt: AdamW, args, kwargs) -> None:
        s = opt.last_step
        self._native.after_step(
            s.step, self._slots(opt), s.lr_multiplier, s.wd_multiplier, s.grad_norm, s.nonfinite_grad, s.skipped,
            s.skipped_steps_total, s.skipped_without_grad, s.clipped,
        )
        if self._sharded is not None:
            if s.step % self._interval == 0:
                self._sharded.submit(s.step, opt._slots())
            self._emit_sharded()

    def _emit_sharded(self) -> None:
        for step, decision, sigma, top_k, iters, fro, seconds, horizon in self._sharded.take_results():
            self._native.emit_spectrum(step, decision, sigma, top_k, iters, fro, seconds, horizon)
        # Rounds of sharded matrices not estimated join the native sampler's drop count, which the step
        # telemetry exports (`gainguard_spectrum_samples_dropped_total`).
        dropped = self._sharded.dropped
        if dropped > self._sharded_dropped_reported:
            self._native.count_dropped(dropped - self._sharded_dropped_reported)
            self._sharded_dropped_reported = dropped

    @property
    def metrics_addr(self) -> Optional[str]:
        """The embedded daemon's address (`http://ADDR/metrics`); None when connected to a gainguardd."""
        return self._native.metrics_addr()

    @property
    def dropped_samples(self) -> int:
        """Samples dropped by the native sampler, and rounds of sharded matrices not estimated."""
        return self._native.dropped_samples() + self._sharded_dropped_unreported()

    def _sharded_dropped_unreported(self) -> int:
        return 0 if self._sharded is None else self._sharded.dropped - self._sharded_dropped_reported

    @property
    def emitted_samples(self) -> int:
        return self._native.emitted_samples()

    @property
    def sharded_estimates(self) -> int:
        """Estimates of sharded matrices this rank took part in."""
        return self._sharded.estimated if self._sharded is not None else 0

    def flush(self, timeout: float = 10.0) -> bool:
        """Waits at most `timeout` seconds until the sampler has processed every round queued so far and its
        events were delivered, without ending the run: afterwards `/metrics` shows the last sampled step's
        spectra. The sampler runs behind the trainer on its own niced thread, so on a busy machine it can be
        several rounds behind; call this before reading the final values (a scrape, a checkpoint's report).
        Returns False on timeout or once closed."""
        return self._native.flush(float(timeout))

    def step(self, loss, tokens: int = 0) -> None:
        """Reports the step the optimizer just took: its loss (a float or a 0-d tensor) and tokens."""
        self._native.step(float(loss), int(tokens))

    def close(self, reason: str = "finished", linger: float = 0.0) -> None:
        """Drains the sampler, says goodbye, writes `record_profile` and stops an embedded daemon, after
        `linger` seconds in which Prometheus can still scrape the last values. Idempotent."""
        atexit.unregister(self.close)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._sharded is not None:
            self._sharded.close()
            self._emit_sharded()
            self._sharded = None
        self._native.close(reason, float(linger))

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("finished" if exc_type is None else f"error: {exc_type.__name__}")


def monitor(
    opt: AdamW,
    run: str = "run",
    listen: Optional[str] = None,
    connect: Optional[str] = None,
    interval: int = 10,
    planned_steps: Optional[int] = None,
    alpha: float = 0.75,
    reference: Optional[PathLike] = None,
    record_profile: Optional[PathLike] = None,
    budget_fraction: Optional[float] = 0.01,
    spectra: bool = True,
    rank: Optional[int] = None,
    local_rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> Monitor:
    """Monitors `opt` (a `gainguard.AdamW`) as run `run`: `listen="127.0.0.1:9464"` serves `/metrics` from an
    embedded daemon; `connect="unix:/path"` or `"tcp:127.0.0.1:PORT"` sends to a standalone gainguardd. With
    neither, `GAINGUARD_ADDR` is taken as `connect`. The sampler estimates sigma_max of the matrix-like
    parameters every `interval` steps; `reference` (a proxy's profile JSON) adds `reference_sigma_max` and
    `gain_ratio`; `record_profile` writes this run's profile on close, to serve as a later run's reference.

    `budget_fraction`: the sampler stretches its interval to cost at most this fraction of the step time (None:
    a fixed interval). With `reference` or `record_profile` the interval is fixed, so that a proxy's profile and
    its targets are sampled at the same progress points. `spectra=False`: telemetry only.

    Under torchrun (torch.distributed initialised) `rank`, `local_rank` and `world_size` default to the process
    group's (`LOCAL_RANK` for the local rank); every rank calls `monitor` (it creates the sampler's own gloo
    group, a collective). On each node local rank 0 serves `listen=` (its embedded daemon also takes the
    node's other ranks' events on a Unix socket) or connects to `connect=`; the other ranks send to that
    socket, or to `connect=`, and never listen: no port is bound twice. Each replicated matrix is sampled by
    one rank (round-robin), each sharded one by all ranks together and exported by one: every matrix's
    series appears once, labelled with the rank that exported it."""
    if not isinstance(opt, AdamW):
        raise TypeError(f"gainguard.monitor takes a gainguard.AdamW, got {type(opt).__name__}")
    if listen is None and connect is None:
        connect = os.environ.get("GAINGUARD_ADDR")
    rank, local_rank, world_size = _ranks(rank, local_rank, world_size)
    ingest_unix = None
    if world_size > 1 and listen is not None:
        path = _node_socket(run)
        if local_rank == 0:
            if os.path.exists(path):
                os.unlink(path)  # a socket left by an earlier run on this node
            ingest_unix = path
        else:
            listen, connect = None, f"unix:{path}"
    native = _native.NativeMonitor(
        opt._plan,
        str(run),
        listen,
        connect,
        int(interval),
        None if planned_steps is None else int(planned_steps),
        float(alpha),
        None if reference is None else os.fspath(reference),
        None if record_profile is None else os.fspath(record_profile),
        None if reference is not None or record_profile is not None or budget_fraction is None else float(budget_fraction),
        rank,
        bool(spectra),
        ingest_unix,
    )
    return Monitor(opt, native, (rank, local_rank, world_size), int(interval), bool(spectra))


def _ranks(rank, local_rank, world_size):
    """This process's (rank, local rank, world size): given, else the process group's, else torchrun's
    environment, else one process."""
    try:
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
    except ImportError:
        initialized = False
    if rank is None:
        rank = dist.get_rank() if initialized else int(os.environ.get("RANK", 0))
    if world_size is None:
        world_size = dist.get_world_size() if initialized else int(os.environ.get("WORLD_SIZE", 1))
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    for name, v in (("rank", rank), ("local_rank", local_rank), ("world_size", world_size)):
        if int(v) < 0 or (name == "world_size" and int(v) < 1):
            raise ValueError(f"monitor: {name} = {v} is out of range")
    if int(rank) >= int(world_size):
        raise ValueError(f"monitor: rank {rank} is not below world_size {world_size}")
    if world_size > 1 and not initialized:
        raise RuntimeError("monitor: world_size > 1 needs torch.distributed initialised (dist.init_process_group) first")
    return int(rank), int(local_rank), int(world_size)


def _node_socket(run: str) -> str:
    """The Unix socket the node's local rank 0 takes the other ranks' events on: one per job (torchrun's
    rendezvous address and port) and run, short enough for a socket path."""
    job = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}:{os.environ.get('GROUP_RANK', '0')}:{run}"
    digest = hashlib.sha256(job.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"gainguard-{os.getuid()}-{digest}.sock")
