"""`gainguard.monitor(opt, ...)`: telemetry, the spectra sampler and the reference profile for a
`gainguard.AdamW`, in one call, served by an embedded daemon (`listen=`) or sent to a standalone gainguardd
(`connect=`). The sampler runs on its own thread and never makes the trainer wait: when it falls behind it
drops samples and counts them (`gainguard_spectrum_samples_dropped_total`)."""

import atexit
import os
from typing import Optional, Union

from . import _native
from .optim import AdamW

PathLike = Union[str, os.PathLike]


class Monitor:
    """Attached to an optimizer by `gainguard.monitor`; call `.step(loss, tokens)` after each `opt.step()` and
    `.close()` at the end (or use it as a context manager)."""

    def __init__(self, opt: AdamW, native):
        self._opt = opt
        self._native = native
        # torch's step hooks: the pre-hook sees the parameters before the update, the post-hook the update and
        # what the step decided (`opt.last_step`). A step that raises runs no post-hook.
        self._hooks = [opt.register_step_pre_hook(self._before_step), opt.register_step_post_hook(self._after_step)]
        # A script that never calls close() still says goodbye and flushes its last events.
        atexit.register(self.close)

    def _before_step(self, opt: AdamW, args, kwargs) -> None:
        self._native.before_step(opt.step_calls + 1, opt._slots())

    def _after_step(self, opt: AdamW, args, kwargs) -> None:
        s = opt.last_step
        self._native.after_step(
            s.step, opt._slots(), s.lr_multiplier, s.wd_multiplier, s.grad_norm, s.nonfinite_grad, s.skipped,
            s.skipped_steps_total, s.skipped_without_grad,
        )

    @property
    def metrics_addr(self) -> Optional[str]:
        """The embedded daemon's address (`http://ADDR/metrics`); None when connected to a gainguardd."""
        return self._native.metrics_addr()

    @property
    def dropped_samples(self) -> int:
        return self._native.dropped_samples()

    @property
    def emitted_samples(self) -> int:
        return self._native.emitted_samples()

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
) -> Monitor:
    """Monitors `opt` (a `gainguard.AdamW`) as run `run`: `listen="127.0.0.1:9464"` serves `/metrics` from an
    embedded daemon; `connect="unix:/path"` or `"tcp:127.0.0.1:PORT"` sends to a standalone gainguardd. With
    neither, `GAINGUARD_ADDR` is taken as `connect`. The sampler estimates sigma_max of the matrix-like
    parameters every `interval` steps; `reference` (a proxy's profile JSON) adds `reference_sigma_max` and
    `gain_ratio`; `record_profile` writes this run's profile on close, to serve as a later run's reference.

    `budget_fraction`: the sampler stretches its interval to cost at most this fraction of the step time (None:
    a fixed interval). With `reference` or `record_profile` the interval is fixed, so that a proxy's profile and
    its targets are sampled at the same progress points."""
    if not isinstance(opt, AdamW):
        raise TypeError(f"gainguard.monitor takes a gainguard.AdamW, got {type(opt).__name__}")
    if listen is None and connect is None:
        connect = os.environ.get("GAINGUARD_ADDR")
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
    )
    return Monitor(opt, native)
