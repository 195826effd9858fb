"""`gainguard.coord_check` on a tiny model: every cell reaches the horizon, gamma* is the zero crossing of the
fitted slope of ln sigma_max on ln width over gamma (recomputed here with numpy from the returned rows), the PNG
is written, and bad input is a ValueError naming it."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import gainguard

WIDTHS = (8, 16, 32)


class Tiny(nn.Module):
    """x → W_in → RMSNorm → ReLU → W_hidden → RMSNorm → ReLU → readout / m: a scale-invariant hidden matrix."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.inp = nn.Linear(6, width, bias=False)
        self.hidden = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, 3, bias=False)

    def forward(self, x):
        h = torch.relu(nn.functional.rms_norm(self.inp(x), (self.width,)))
        h = torch.relu(nn.functional.rms_norm(self.hidden(h), (self.width,)))
        return self.out(h) * (8 / self.width)


def batches(n=64):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 3, generator=g)
    for _ in range(n):
        x = torch.randn(32, 6, generator=g)
        yield x, torch.tanh(x @ teacher)


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


READOUT = [{"pattern": "out.weight", "role": "readout"}]


def run(tmp_path=None, **kw):
    args = dict(widths=WIDTHS, loss_fn=mse, batches=batches(), base_width=8, lr=0.05, weight_decay=1.0, gammas=(0.0, 0.5, 1.0), horizon=3.0, warmup=5, overrides=READOUT)
    args.update(kw)
    return gainguard.coord_check(Tiny, **args)


def independent_gamma_star(rows):
    """Per gamma: the slope of ln sigma_max on ln width with one intercept per parameter and its standard error;
    then the weighted (1/se²) least-squares line through (gamma, slope) and its root."""
    gammas, slopes, ses = [], [], []
    for g in sorted({r["gamma"] for r in rows}):
        at = [r for r in rows if r["gamma"] == g]
        x = np.array([math.log(r["width"]) for r in at])
        y = np.array([math.log(r["sigma_max"]) for r in at])
        names = np.array([r["param"] for r in at])
        for n in set(names):
            x[names == n] -= x[names == n].mean()
            y[names == n] -= y[names == n].mean()
        slope, rss, *_ = np.linalg.lstsq(x[:, None], y, rcond=None)
        dof = len(x) - len(set(names)) - 1
        gammas.append(g)
        slopes.append(slope[0])
        ses.append(math.sqrt(float(rss[0]) / dof / float(x @ x)))
    # A noiseless slope has se 0; the plugin floors the errors at 1e-9 of the largest |slope| (at least 1e-3).
    floor = 1e-9 * max([1e-3] + [abs(x) for x in slopes])
    b, a = np.polyfit(gammas, slopes, 1, w=1 / np.maximum(np.array(ses), floor))
    return -a / b


def independent_residual_interval(rows, resamples=2000, level=0.95):
    """Residual bootstrap of independent_gamma_star: per gamma, the one-intercept-per-parameter fit's residuals,
    inflated by sqrt(n / (n - groups - 1)), drawn with replacement and added back to the fitted values; the
    2.5% and 97.5% quantiles of the refitted gamma*."""
    rng = np.random.default_rng(1)
    fitted, pools = {}, {}
    for g in sorted({r["gamma"] for r in rows}):
        at = [i for i, r in enumerate(rows) if r["gamma"] == g]
        x = np.array([math.log(rows[i]["width"]) for i in at])
        y = np.array([math.log(rows[i]["sigma_max"]) for i in at])
        names = np.array([rows[i]["param"] for i in at])
        xc, yc = x.copy(), y.copy()
        for n in set(names):
            xc[names == n] -= x[names == n].mean()
            yc[names == n] -= y[names == n].mean()
        slope = float(xc @ yc / (xc @ xc))
        fit = y - yc + slope * xc
        inflate = math.sqrt(len(at) / (len(at) - len(set(names)) - 1))
        pools[g] = inflate * (y - fit)
        for i, f in zip(at, fit):
            fitted[i] = f
    draws = []
    for _ in range(resamples):
        drawn = [dict(r, sigma_max=math.exp(fitted[i] + rng.choice(pools[r["gamma"]]))) for i, r in enumerate(rows)]
        draws.append(independent_gamma_star(drawn))
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def test_coord_check_reaches_the_horizon_and_its_gamma_star_is_the_zero_crossing_of_its_own_rows(tmp_path):
    png = tmp_path / "coord_check.png"
    result = run(out=str(png))
    assert {(r["width"], r["gamma"], r["param"]) for r in result.rows} == {(w, g, "hidden.weight") for w in WIDTHS for g in (0.0, 0.5, 1.0)}
    for r in result.rows:
        assert 3.0 <= r["decay_horizon"] < 3.2, r
        assert set(r) >= {"width", "gamma", "param", "sigma_max", "frobenius", "stable_rank", "decay_horizon", "checks"}
        # Means over the last timescale: sigma² · stable rank = ‖W‖_F² up to the separate averaging.
        assert r["sigma_max"] ** 2 * r["stable_rank"] == pytest.approx(r["frobenius"] ** 2, rel=0.05)
        assert r["sigma_max"] <= r["frobenius"] and 1.0 <= r["stable_rank"] <= r["width"]
        assert r["checks"]["horizon_ok"] is False  # H = 3 is a transient and the result says so
    assert result.gamma_star == pytest.approx(independent_gamma_star(result.rows), abs=1e-9)
    lo, hi = result.interval
    # One seed per cell: the plugin resamples each gamma's residuals. An independent residual bootstrap here
    # (numpy's generator, other draws) lands on the same percentiles up to Monte Carlo error.
    assert result.interval_method == "residuals"
    ilo, ihi = independent_residual_interval(result.rows)
    assert lo <= hi and abs(lo - ilo) <= 0.25 * (ihi - ilo) + 1e-9 and abs(hi - ihi) <= 0.25 * (ihi - ilo) + 1e-9, (result.interval, (ilo, ihi))
    assert not result.reliable and "below decay horizon 5" in result.reason
    assert png.exists() and png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.figure == str(png)
    assert {m["param"] for m in result.measurements()} == {"hidden.weight"}


def test_one_width_is_a_value_error_naming_the_widths():
    with pytest.raises(ValueError, match=r"widths \[16, 16, 16\] hold 1 distinct"):
        run(widths=(16, 16, 16))


@pytest.mark.parametrize("gammas", [(0.5,), (0.5, 0.5), ()])
def test_a_gamma_list_without_two_values_is_a_value_error_naming_it(gammas):
    with pytest.raises(ValueError, match=r"gammas .* need at least 2"):
        run(gammas=gammas)


def test_a_model_without_a_matrix_like_parameter_is_a_value_error_naming_it():
    def vector_only(width):
        return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))

    with pytest.raises(ValueError, match=r"build_model\(8\) has no matrix-like parameter") as e:
        gainguard.coord_check(vector_only, WIDTHS, mse, batches(), base_width=8, lr=0.05, weight_decay=1.0)
    assert "0.weight" in str(e.value)


@pytest.mark.parametrize("field,value", [("lr", 0.0), ("weight_decay", float("nan")), ("horizon", -1.0)])
def test_a_non_positive_rate_or_horizon_is_a_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        run(**{field: value})
