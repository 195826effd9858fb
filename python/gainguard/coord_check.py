"""`gainguard.coord_check`: the steady-state coord check on your own model.

microsoft/mup's coord check trains a few steps at several widths and plots activations. This one trains each
(width, gamma) cell with `gainguard.AdamW` along the μP path (`rule="gamma=G"`: lr ∝ 1/m, wd ∝ m^gamma) until
every matrix-like parameter has reached the decay horizon `H = Σ_t lr_t·wd_t` (AdamW's steady state, H ≥ 5), then
reads each matrix's sigma_max, ‖W‖_F and stable rank ‖W‖_F²/sigma_max² (float64 SVD, mean over the last
timescale H − 1 < h ≤ H) and finds gamma*, the gamma at which sigma_max is flat in width.

gamma* is the fit `gainguard calibrate` makes (`plugin/src/fit/slope.rs`, `calibrate_gamma`): per gamma the
slope of ln sigma_max on ln width with one intercept per matrix, then the weighted line through (gamma, slope)
and its zero crossing, with a delta-method standard error and a 95% percentile-bootstrap interval (`bootstrap_gamma`
in `plugin/src/fit/bootstrap.rs`: seeds resampled within every (gamma, width) cell when `seeds >= 2`, each gamma's
residuals otherwise, the fit redone per resample). `result.measurements()` is calibrate's file format.

    result = gainguard.coord_check(build_model, widths=[64, 128, 256], loss_fn=loss_fn, batches=batches,
                                   base_width=64, lr=1e-2, weight_decay=0.5, out="coord_check.png")
    print(result.gamma_star, result.interval)
"""

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import _native
from .optim import AdamW
from .shapes import base_shapes as _base_shapes

#: Below this decay horizon sigma_max is still largely the decayed initialisation (as `gainguard calibrate`).
MIN_RELIABLE_HORIZON = 5.0
#: A steady state no longer drifts: the last timescale's mean within 3% of the one before.
MAX_DRIFT = 0.03


@dataclass
class CoordCheckResult:
    """gamma* with its 95% percentile-bootstrap interval (`interval_method`: "seeds" or "residuals"; "delta"
    means gamma* ± 1.96·se where no resample had a zero crossing), one row per matrix-like parameter per run, the
    slope of ln sigma_max on ln width per gamma, and whether every run was at steady state."""

    gamma_star: float
    interval: Tuple[float, float]
    gamma_se: float
    rows: List[dict]
    slopes: List[dict]
    gamma_star_by_type: Dict[str, Optional[float]]
    reliable: bool
    reason: Optional[str]
    horizon: float
    figure: Optional[str] = None
    base_lr: float = 0.0
    base_weight_decay: float = 0.0
    extrapolated: bool = field(default=False)
    interval_method: str = "seeds"

    def measurements(self) -> List[dict]:
        """The rows as a `gainguard calibrate MEASUREMENTS.json` file (json.dump it)."""
        return [
            {
                "width": float(r["width"]),
                "gamma": r["gamma"],
                "lr": self.base_lr,
                "wd": self.base_weight_decay,
                "param": r["param"],
                "sigma_max": r["sigma_max"],
                "decay_horizon": r["decay_horizon"],
                "steps": r["steps"],
                "seed": r["seed"],
                "checks": {"drift": r["checks"]["drift"]} if r["checks"]["drift"] is not None else {},
            }
            for r in self.rows
        ]


def matrix_type(name: str) -> str:
    """A parameter's name with its layer indices replaced by `*`: one panel per type (`blocks.*.attn.q.weight`)."""
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name)


def _positive(what: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"coord_check: {what} = {value!r} must be a number") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"coord_check: {what} = {value!r} must be finite and > 0")
    return v


class _Batches:
    """Batch `t` of every run is the same: a sequence is indexed, a one-shot iterable is cached as it is read;
    both cycle when the runs need more steps than they hold."""

    def __init__(self, batches):
        if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
            raise ValueError(f"coord_check: batches must be an iterable of the inputs loss_fn takes, got {type(batches).__name__}")
        self._seq = batches if isinstance(batches, Sequence) else None
        self._it = None if self._seq is not None else iter(batches)
        self._cache: list = []

    def __getitem__(self, t: int):
        if self._seq is not None:
            if len(self._seq) == 0:
                raise ValueError("coord_check: batches is empty")
            return self._seq[t % len(self._seq)]
        while self._it is not None and len(self._cache) <= t:
            try:
                self._cache.append(next(self._it))
            except StopIteration:
                self._it = None
        if not self._cache:
            raise ValueError("coord_check: batches is empty")
        return self._cache[t % len(self._cache)]


def _spectrum(p: torch.Tensor) -> Tuple[float, float, float]:
    w = p.detach().to(torch.float64)
    if w.dim() > 2:
        w = w.flatten(0, -2)
    s = torch.linalg.svdvals(w)
    sigma = float(s.max())
    frob = float(s.square().sum().sqrt())
    return sigma, frob, (frob / sigma) ** 2


def _calibrate(rows: List[dict]):
    """gamma* by `calibrate_gamma` (plugin/src/fit/slope.rs), through the extension: the fit `gainguard
    calibrate` makes. Returns (gamma*, its standard error, the per-gamma slopes); gamma* and its error are None
    where the slope does not move with gamma."""
    points = [(r["param"], float(r["gamma"]), float(r["width"]), float(r["sigma_max"])) for r in rows]
    try:
        gamma, se, slopes = _native.calibrate_gamma(points)
    except ValueError as e:
        raise ValueError(f"coord_check: {e}") from None
    per = [{"gamma": g, "slope": s, "slope_se": e, "implied_alpha": a} for g, s, e, a in slopes]
    return gamma, se, per


#: The bootstrap's generator seed (as the Rust counterpart's): the same rows give the same interval.
BOOTSTRAP_SEED = 2510


def _interval(rows: List[dict], gamma_star: float, se: float) -> Tuple[Tuple[float, float], str]:
    """The 95% percentile-bootstrap interval on gamma* (`bootstrap_gamma`, plugin/src/fit/bootstrap.rs) and how it
    resampled; gamma* ± 1.96·se, method "delta", where no resample has a zero crossing."""
    points = [(r["param"], float(r["gamma"]), float(r["width"]), float(r["sigma_max"])) for r in rows]
    try:
        lo, hi, method, _failed = _native.bootstrap_gamma(points, [int(r["seed"]) for r in rows], 2000, 0.95, BOOTSTRAP_SEED)
    except ValueError as e:
        if "none of the" not in str(e):
            raise ValueError(f"coord_check: {e}") from None
        return (gamma_star - 1.96 * se, gamma_star + 1.96 * se), "delta"
    return (lo, hi), method


def coord_check(
    build_model: Callable[[int], torch.nn.Module],
    widths: Sequence[int],
    loss_fn: Callable,
    batches: Iterable,
    base_width: int,
    lr: float,
    weight_decay: float,
    gammas: Sequence[float] = (0.5, 0.75, 1.0),
    horizon: float = 6.0,
    seeds: int = 1,
    out: Optional[str] = None,
    warmup: int = 20,
    betas: Tuple[float, float] = (0.9, 0.95),
    overrides: Optional[List[dict]] = None,
    samples_per_timescale: float = 8.0,
    max_steps: int = 1_000_000,
    device=None,
) -> CoordCheckResult:
    """Trains `build_model(width)` at every width × gamma × seed with `gainguard.AdamW` along the μP path until
    every matrix-like parameter reaches decay horizon `horizon`, with `loss_fn(model, batch)` on `batches` (the
    same batch t in every run), and returns gamma* with its rows. `out`: a PNG path for the plot.

    Base shapes: `build_model(base_width)` and, as the delta, `build_model(2 * base_width)` (mup's
    `set_base_shapes(model, base, delta=delta)`). Adam's beta2 defaults to 0.95: the second moment must forget
    faster than one timescale 1/(lr·wd)."""
    width_list = [int(w) for w in widths]
    if len(set(width_list)) < 3:
        raise ValueError(f"coord_check: widths {width_list} hold {len(set(width_list))} distinct value(s); need at least 3 to fit the slope of ln sigma_max on ln width")
    gamma_list = [float(g) for g in gammas]
    if len(set(gamma_list)) < 2:
        raise ValueError(f"coord_check: gammas {gamma_list} hold {len(set(gamma_list))} distinct value(s); need at least 2 to find where the slope crosses zero")
    base_width = int(_positive("base_width", base_width))
    lr = _positive("lr", lr)
    weight_decay = _positive("weight_decay", weight_decay)
    horizon = _positive("horizon", horizon)
    if horizon < 2:
        raise ValueError(f"coord_check: horizon = {horizon} must be at least 2 (the drift check compares the last two timescales)")
    if int(seeds) < 1:
        raise ValueError(f"coord_check: seeds = {seeds!r} must be at least 1")
    data = _Batches(batches)
    shapes = _base_shapes(build_model(base_width), build_model(2 * base_width))
    rows: List[dict] = []
    for gamma in gamma_list:
        for width in width_list:
            for seed in range(int(seeds)):
                rows.extend(_run(build_model, width, gamma, seed, shapes, loss_fn, data, lr, weight_decay, horizon, warmup, betas, overrides, samples_per_timescale, max_steps, device))
    gamma_star, se, per = _calibrate(rows)
    by_type: Dict[str, Optional[float]] = {}
    for t in sorted({matrix_type(r["param"]) for r in rows}):
        try:
            by_type[t] = _calibrate([r for r in rows if matrix_type(r["param"]) == t])[0]
        except ValueError:
            by_type[t] = None
    problems = []
    short = [r for r in rows if r["decay_horizon"] < MIN_RELIABLE_HORIZON]
    if short:
        problems.append(f"{len(short)} of {len(rows)} rows below decay horizon {MIN_RELIABLE_HORIZON} (a transient; pass horizon >= 5)")
    drifting = [r for r in rows if not r["checks"]["drift_ok"]]
    if drifting:
        named = ", ".join(f"{r['param']} at width {r['width']}, gamma {r['gamma']} ({r['checks']['drift']:+.1%})" if r["checks"]["drift"] is not None else f"{r['param']} at width {r['width']}, gamma {r['gamma']} (no samples)" for r in drifting[:10])
        problems.append(f"drift check failed in {len(drifting)} of {len(rows)} rows (bar {MAX_DRIFT:.0%}): {named}")
    if gamma_star is None:
        problems.append("the slope of ln sigma_max on ln width does not change with gamma: no zero crossing")
    interval, method = ((float("nan"), float("nan")), "none") if gamma_star is None else _interval(rows, gamma_star, se)
    result = CoordCheckResult(
        gamma_star=float("nan") if gamma_star is None else gamma_star,
        interval=interval,
        interval_method=method,
        gamma_se=float("nan") if se is None else se,
        rows=rows,
        slopes=per,
        gamma_star_by_type=by_type,
        reliable=not problems,
        reason="; ".join(problems) or None,
        horizon=horizon,
        base_lr=lr,
        base_weight_decay=weight_decay,
        extrapolated=gamma_star is not None and not (min(gamma_list) <= gamma_star <= max(gamma_list)),
    )
    if out is not None:
        plot(result, str(out))
        result.figure = str(out)
    return result


def _run(build_model, width, gamma, seed, shapes, loss_fn, data, lr, wd, horizon, warmup, betas, overrides, samples_per_timescale, max_steps, device):
    torch.manual_seed(1000 * seed + width)
    model = build_model(width)
    if device is not None:
        model = model.to(device)
    opt = AdamW(model.named_parameters(), base_shapes=shapes, lr=lr, weight_decay=wd, rule=f"gamma={gamma}", betas=betas, overrides=overrides)
    matrices = [(name, p, g["lr"] * g["weight_decay"]) for g in opt.param_groups if g["class"] == "matrix_like" for name, p in zip(g["param_names"], g["params"])]
    if not matrices:
        raise ValueError(
            f"coord_check: build_model({width}) has no matrix-like parameter (a parameter with two width dimensions, "
            f"such as a hidden Linear's weight); its plan:\n{opt.plan()}"
        )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / max(warmup, 1)))
    every = max(1, int(1.0 / min(m[2] for m in matrices) / samples_per_timescale))
    samples: Dict[str, list] = {name: [] for name, _, _ in matrices}

    def h_of(p):
        return float(opt.state[p].get("decay_horizon", 0.0)) if p in opt.state else 0.0

    t = 0
    while min(h_of(p) for _, p, _ in matrices) < horizon:
        if t >= max_steps:
            raise ValueError(f"coord_check: width {width}, gamma {gamma}: decay horizon {horizon} not reached in {max_steps} steps (raise lr·weight_decay or max_steps)")
        opt.zero_grad(set_to_none=True)
        loss_fn(model, data[t]).backward()
        opt.step()
        sched.step()
        t += 1
        if t % every == 0:
            for name, p, _ in matrices:
                h = h_of(p)
                if h > horizon - 2.0:
                    samples[name].append((h,) + _spectrum(p))
    rows = []
    for name, p, _ in matrices:
        h = h_of(p)
        last = [s for s in samples[name] if h - 1.0 < s[0] <= h]
        before = [s for s in samples[name] if h - 2.0 < s[0] <= h - 1.0]
        if last:
            sigma, frob, sr = (sum(s[i] for s in last) / len(last) for i in (1, 2, 3))
        else:
            sigma, frob, sr = _spectrum(p)
        drift = sum(s[1] for s in last) / len(last) / (sum(s[1] for s in before) / len(before)) - 1.0 if last and before else None
        rows.append(
            {
                "width": width,
                "gamma": gamma,
                "seed": seed,
                "param": name,
                "sigma_max": sigma,
                "frobenius": frob,
                "stable_rank": sr,
                "decay_horizon": h,
                "steps": t,
                "checks": {
                    "drift": drift,
                    "drift_ok": drift is not None and abs(drift) < MAX_DRIFT,
                    "horizon_ok": h >= MIN_RELIABLE_HORIZON,
                },
            }
        )
    return rows


def plot(result: CoordCheckResult, path: str) -> None:
    """The figure, as mup's coord check: sigma_max against width on log axes, one line per gamma, one panel per
    matrix type (matplotlib, drawn off-screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted({matrix_type(r["param"]) for r in result.rows})
    gammas = sorted({r["gamma"] for r in result.rows})
    cols = min(len(types), 3)
    nrows = math.ceil(len(types) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.8 * nrows), squeeze=False)
    for ax, t in zip(axes.flat, types):
        for g in gammas:
            widths = sorted({r["width"] for r in result.rows if r["gamma"] == g})
            # Geometric mean over the matrices of this type and the seeds.
            ys = []
            for w in widths:
                vals = [math.log(r["sigma_max"]) for r in result.rows if r["gamma"] == g and r["width"] == w and matrix_type(r["param"]) == t]
                ys.append(math.exp(sum(vals) / len(vals)))
            ax.plot(widths, ys, marker="o", label=f"gamma = {g}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width")
        ax.set_ylabel(f"sigma_max (mean over H in ({result.horizon - 1:g}, {result.horizon:g}])")
        gt = result.gamma_star_by_type.get(t)
        ax.set_title(f"{t}" + (f"\ngamma* = {gt:.2f}" if gt is not None else ""), fontsize=9)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(types):]:
        ax.set_visible(False)
    lo, hi = result.interval
    verdict = "" if result.reliable else "  [UNRELIABLE: see result.reason]"
    fig.suptitle(
        f"steady-state coord check at decay horizon H = {result.horizon:g}: gamma* = {result.gamma_star:.3f} [{lo:.3f}, {hi:.3f}]{verdict}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
