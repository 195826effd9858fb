//! The fits: a slope shared by groups of points (one intercept per matrix), alpha in
//! `sigma_max ∝ sqrt(lr/wd)·d^alpha`, and gamma*, the gamma that makes sigma_max flat along the μP path.

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FitError {
    #[error("{what}: {value} must be finite and > 0")]
    NotPositive { what: String, value: f64 },
    #[error("{what}: {found} distinct widths, need at least {need}")]
    TooFewWidths { what: String, found: usize, need: usize },
    #[error("{found} distinct gamma values, need at least 2 to locate the gamma where the slope is zero")]
    TooFewGammas { found: usize },
    #[error("{what}: {n} points in {groups} groups leave no degrees of freedom for an error estimate")]
    NoDegreesOfFreedom { what: String, n: usize, groups: usize },
    #[error("the slope of ln sigma_max vs ln d does not change with gamma (d slope / d gamma = {0:.3e}); no zero crossing")]
    FlatInGamma(f64),
    #[error("bootstrap: {0}")]
    Bootstrap(String),
}

/// A slope shared by all groups, with its standard error.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SlopeFit {
    pub slope: f64,
    /// Standard error from the residuals: `sqrt(RSS / (n − groups − 1) / Σ (x − x̄_group)²)`.
    pub slope_se: f64,
    pub n: usize,
    pub groups: usize,
    pub distinct_x: usize,
    pub residual_sd: f64,
}

/// Least-squares slope of `y` on `x` with one intercept per group (`points`: group, x, y).
pub fn pooled_slope(what: &str, points: &[(String, f64, f64)]) -> Result<SlopeFit, FitError> {
    let mut by_group: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for (g, x, y) in points {
        by_group.entry(g.as_str()).or_default().push((*x, *y));
    }
    let mut xs: Vec<f64> = points.iter().map(|p| p.1).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup_by(|a, b| (*a - *b).abs() <= 1e-12 * b.abs().max(1.0));
    if xs.len() < 3 {
        return Err(FitError::TooFewWidths { what: what.into(), found: xs.len(), need: 3 });
    }
    let (mut sxx, mut sxy) = (0.0, 0.0);
    let mut centred = Vec::with_capacity(points.len());
    for pts in by_group.values() {
        let k = pts.len() as f64;
        let mx = pts.iter().map(|p| p.0).sum::<f64>() / k;
        let my = pts.iter().map(|p| p.1).sum::<f64>() / k;
        for (x, y) in pts {
            sxx += (x - mx) * (x - mx);
            sxy += (x - mx) * (y - my);
            centred.push((x - mx, y - my));
        }
    }
    let n = points.len();
    let groups = by_group.len();
    let dof = n as i64 - groups as i64 - 1;
    if dof < 1 || sxx <= 0.0 {
        return Err(FitError::NoDegreesOfFreedom { what: what.into(), n, groups });
    }
    let slope = sxy / sxx;
    let rss: f64 = centred.iter().map(|(x, y)| (y - slope * x).powi(2)).sum();
    let residual_var = rss / dof as f64;
    Ok(SlopeFit {
        slope,
        slope_se: (residual_var / sxx).sqrt(),
        n,
        groups,
        distinct_x: xs.len(),
        residual_sd: residual_var.sqrt(),
    })
}

fn positive(what: impl Fn() -> String, value: f64) -> Result<f64, FitError> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(FitError::NotPositive { what: what(), value })
    }
}

/// One final sigma_max at one width. `lr` and `wd` are the *effective* values this matrix was
/// trained with (after the width-scaling rule).
#[derive(Clone, Debug, PartialEq)]
pub struct WidthPoint {
    /// Which matrix (a fixed-effect group): e.g. `blocks.0.mlp.up.weight`.
    pub group: String,
    pub width: f64,
    pub lr: f64,
    pub wd: f64,
    pub sigma_max: f64,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AlphaFit {
    pub alpha: f64,
    pub alpha_se: f64,
    /// `2·alpha − 1`: the weight-decay exponent that would flatten sigma_max if alpha held everywhere.
    pub implied_gamma: f64,
    pub implied_gamma_se: f64,
    pub fit: SlopeFit,
}

/// Fits alpha in `sigma_max = c_group · sqrt(lr/wd) · d^alpha` by regressing
/// `ln(sigma_max / sqrt(lr/wd))` on `ln d`, one intercept per group.
pub fn fit_alpha(points: &[WidthPoint]) -> Result<AlphaFit, FitError> {
    let mut xy = Vec::with_capacity(points.len());
    for p in points {
        let at = || format!("`{}` at width {}", p.group, p.width);
        let d = positive(|| format!("{}: width", at()), p.width)?;
        let lr = positive(|| format!("{}: lr", at()), p.lr)?;
        let wd = positive(|| format!("{}: wd", at()), p.wd)?;
        let s = positive(|| format!("{}: sigma_max", at()), p.sigma_max)?;
        xy.push((p.group.clone(), d.ln(), s.ln() - 0.5 * (lr / wd).ln()));
    }
    let fit = pooled_slope("alpha fit", &xy)?;
    Ok(AlphaFit {
        alpha: fit.slope,
        alpha_se: fit.slope_se,
        implied_gamma: 2.0 * fit.slope - 1.0,
        implied_gamma_se: 2.0 * fit.slope_se,
        fit,
    })
}

/// One final sigma_max of a run on the μP path with weight-decay exponent `gamma`.
#[derive(Clone, Debug, PartialEq)]
pub struct MupPoint {
    /// Fixed-effect group: the matrix, and the base `(lr, wd)` if several were run.
    pub group: String,
    pub gamma: f64,
    pub width: f64,
    pub sigma_max: f64,
}

/// The slope of `ln sigma_max` vs `ln d` at one gamma.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SlopeAtGamma {
    pub gamma: f64,
    pub slope: f64,
    pub slope_se: f64,
    pub widths: usize,
    pub n: usize,
    /// `slope + (1 + gamma)/2`: the alpha this slope implies under `lr ∝ 1/m, wd ∝ m^gamma`.
    pub implied_alpha: f64,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GammaCalibration {
    pub per_gamma: Vec<SlopeAtGamma>,
    /// The gamma where the fitted line through `(gamma, slope)` crosses zero.
    pub gamma: f64,
    pub gamma_se: f64,
    /// Fitted line `slope(gamma) = intercept + rate · gamma`; the law predicts `rate = −1/2`.
    pub intercept: f64,
    pub rate: f64,
    pub rate_se: f64,
    /// The zero crossing lies outside the measured gamma range (an extrapolation).
    pub extrapolated: bool,
    /// `(1 + gamma)/2`: the alpha consistent with the recommended gamma.
    pub alpha: f64,
    pub alpha_se: f64,
}

/// Finds the gamma that makes sigma_max width-invariant along the μP path.
///
/// Method:
/// 1. For each gamma (≥ 2 distinct values), [`pooled_slope`] of `ln sigma_max` on `ln d` over ≥ 3
///    widths, one intercept per group: slope `s_i` with standard error `e_i`.
/// 2. Weighted least squares line `s = a + b·gamma` with weights `1/e_i²`; its covariance is
///    `(Xᵀ W X)⁻¹`, inflated by the reduced chi-square `χ²/(k − 2)` when there are `k > 2` gammas and the
///    points scatter more than their errors allow (never deflated). With two gammas the line goes
///    through both points and the covariance is the propagated slope errors alone.
/// 3. `gamma* = −a/b`, and by the delta method
///    `Var(gamma*) = (Var(a) + gamma*²·Var(b) + 2·gamma*·Cov(a, b)) / b²`.
pub fn calibrate_gamma(points: &[MupPoint]) -> Result<GammaCalibration, FitError> {
    gamma_from_slopes(slopes_at_gammas(points)?)
}

/// Step 1 of [`calibrate_gamma`]: the [`pooled_slope`] of `ln sigma_max` on `ln d` at each gamma (≥ 2
/// distinct gammas, ascending). Kept apart so that a caller can report these slopes when step 2 finds no
/// zero crossing ([`FitError::FlatInGamma`]).
pub fn slopes_at_gammas(points: &[MupPoint]) -> Result<Vec<SlopeAtGamma>, FitError> {
    let mut by_gamma: BTreeMap<i64, (f64, Vec<(String, f64, f64)>)> = BTreeMap::new();
    for p in points {
        if !p.gamma.is_finite() {
            return Err(FitError::NotPositive { what: format!("`{}`: gamma (finite)", p.group), value: p.gamma });
        }
        let d = positive(|| format!("`{}` at gamma {} width {}: width", p.group, p.gamma, p.width), p.width)?;
        let s = positive(|| format!("`{}` at gamma {} width {}: sigma_max", p.group, p.gamma, p.width), p.sigma_max)?;
        // Key gammas to 1e-9 so 0.5 and 0.5000000001 from a JSON round trip are one value.
        let key = (p.gamma * 1e9).round() as i64;
        by_gamma.entry(key).or_insert_with(|| (p.gamma, Vec::new())).1.push((p.group.clone(), d.ln(), s.ln()));
    }
    if by_gamma.len() < 2 {
        return Err(FitError::TooFewGammas { found: by_gamma.len() });
    }
    let mut per_gamma = Vec::with_capacity(by_gamma.len());
    for (gamma, xy) in by_gamma.values() {
        let f = pooled_slope(&format!("gamma {gamma}"), xy)?;
        per_gamma.push(SlopeAtGamma {
            gamma: *gamma,
            slope: f.slope,
            slope_se: f.slope_se,
            widths: f.distinct_x,
            n: f.n,
            implied_alpha: f.slope + 0.5 * (1.0 + gamma),
        });
    }
    Ok(per_gamma)
}

/// Steps 2 and 3 of [`calibrate_gamma`]: the weighted line through the per-gamma slopes and its zero
/// crossing, from [`slopes_at_gammas`]'s output.
pub fn gamma_from_slopes(per_gamma: Vec<SlopeAtGamma>) -> Result<GammaCalibration, FitError> {
    if per_gamma.len() < 2 {
        return Err(FitError::TooFewGammas { found: per_gamma.len() });
    }
    let WeightedLine { w, sw, mean_gamma, sxx, intercept, rate } = weighted_line(&per_gamma);
    let k = per_gamma.len();
    let chi2: f64 = per_gamma.iter().zip(&w).map(|(s, w)| w * (s.slope - intercept - rate * s.gamma).powi(2)).sum();
    let inflate = if k > 2 { (chi2 / (k - 2) as f64).max(1.0) } else { 1.0 };
    let var_a = inflate * (1.0 / sw + mean_gamma * mean_gamma / sxx);
    let var_b = inflate / sxx;
    let cov_ab = -inflate * mean_gamma / sxx;
    let rate_se = var_b.sqrt();
    if rate.abs() < 1e-12 || rate.abs() < 0.5 * rate_se {
        return Err(FitError::FlatInGamma(rate));
    }
    let gamma = -intercept / rate;
    let gamma_var = (var_a + gamma * gamma * var_b + 2.0 * gamma * cov_ab) / (rate * rate);
    let gamma_se = gamma_var.max(0.0).sqrt();
    let (lo, hi) = (per_gamma[0].gamma, per_gamma[k - 1].gamma);
    Ok(GammaCalibration {
        extrapolated: gamma < lo || gamma > hi,
        alpha: 0.5 * (1.0 + gamma),
        alpha_se: 0.5 * gamma_se,
        per_gamma,
        gamma,
        gamma_se,
        intercept,
        rate,
        rate_se,
    })
}

/// The weighted least-squares line `slope = intercept + rate·gamma` through the per-gamma slopes (weights
/// `1/se²`), from sums centred on the weighted mean gamma: a floored (noiseless) error gives its slope a weight
/// many orders above the others', and the uncentred `Σw·Σwg² − (Σwg)²` would cancel to rounding noise.
struct WeightedLine {
    w: Vec<f64>,
    sw: f64,
    mean_gamma: f64,
    /// `Σ w (gamma − mean_gamma)²`.
    sxx: f64,
    intercept: f64,
    rate: f64,
}

fn weighted_line(per_gamma: &[SlopeAtGamma]) -> WeightedLine {
    // A noiseless slope has se 0; floor the errors so the weights stay finite (equal weights then).
    let floor = 1e-9 * per_gamma.iter().map(|s| s.slope.abs()).fold(1e-3, f64::max);
    let w: Vec<f64> = per_gamma.iter().map(|s| 1.0 / s.slope_se.max(floor).powi(2)).collect();
    let sw: f64 = w.iter().sum();
    let mean_gamma = per_gamma.iter().zip(&w).map(|(s, w)| w * s.gamma).sum::<f64>() / sw;
    let mean_slope = per_gamma.iter().zip(&w).map(|(s, w)| w * s.slope).sum::<f64>() / sw;
    let sxx: f64 = per_gamma.iter().zip(&w).map(|(s, w)| w * (s.gamma - mean_gamma).powi(2)).sum();
    let sxy: f64 = per_gamma.iter().zip(&w).map(|(s, w)| w * (s.gamma - mean_gamma) * (s.slope - mean_slope)).sum();
    let rate = sxy / sxx;
    WeightedLine { w, sw, mean_gamma, sxx, intercept: mean_slope - rate * mean_gamma, rate }
}

/// gamma* of [`calibrate_gamma`]'s line without its significance test: `−intercept/rate` whenever the rate is
/// not zero, None otherwise. A bootstrap refits with this: leaving out the resamples whose line is not
/// significantly sloped would cut the tails of gamma*'s distribution off and narrow the interval.
pub fn line_zero(points: &[MupPoint]) -> Result<Option<f64>, FitError> {
    let per_gamma = slopes_at_gammas(points)?;
    let l = weighted_line(&per_gamma);
    let g = -l.intercept / l.rate;
    Ok((l.rate.abs() >= 1e-12 && g.is_finite()).then_some(g))
}

/// Where the piecewise-linear curve through `(x_i, y_i)` (sorted by x) first reaches zero: the gamma where the
/// slope of ln sigma_max on ln d crosses zero, read off measured slopes without assuming a straight line
/// (what [`calibrate_gamma`] fits). None when the curve stays on one side.
pub fn zero_crossing(xs: &[f64], ys: &[f64]) -> Option<f64> {
    for i in 1..xs.len().min(ys.len()) {
        let (y0, y1) = (ys[i - 1], ys[i]);
        if y0 == 0.0 {
            return Some(xs[i - 1]);
        }
        if y0.signum() != y1.signum() && y0.is_finite() && y1.is_finite() {
            return Some(xs[i - 1] + (xs[i] - xs[i - 1]) * y0 / (y0 - y1));
        }
    }
    (ys.last() == Some(&0.0)).then(|| xs[ys.len() - 1])
}

/// `max / min` of positive values: the spread of sigma_max across widths (1 = perfectly flat).
pub fn spread(values: &[f64]) -> f64 {
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    max / min
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SplitMix64;

    const WIDTHS: [f64; 4] = [64.0, 128.0, 256.0, 512.0];
    const MATRICES: [(&str, f64); 3] = [("blocks.0.attn.q.weight", 0.7), ("blocks.0.mlp.up.weight", 1.9), ("blocks.1.mlp.down.weight", 3.1)];

    /// `sigma = c · sqrt(lr/wd) · d^alpha · exp(noise · N(0,1))` at several (lr, wd).
    fn law_points(alpha: f64, noise: f64, seed: u64) -> Vec<WidthPoint> {
        let mut rng = SplitMix64::new(seed);
        let mut out = Vec::new();
        for (name, c) in MATRICES {
            for (lr, wd) in [(1e-3, 0.05), (4e-3, 0.1), (2e-3, 0.4)] {
                for d in WIDTHS {
                    let sigma = c * (lr / wd as f64).sqrt() * d.powf(alpha) * (noise * rng.next_normal()).exp();
                    out.push(WidthPoint { group: name.into(), width: d, lr, wd, sigma_max: sigma });
                }
            }
        }
        out
    }

    /// The μP path: `lr = lr0/m`, `wd = wd0·m^gamma`, `m = d/64`, through the same law.
    fn mup_points(alpha: f64, gammas: &[f64], noise: f64, seed: u64) -> Vec<MupPoint> {
        let mut rng = SplitMix64::new(seed);
        let mut out = Vec::new();
        for &gamma in gammas {
            for (name, c) in MATRICES {
                for d in WIDTHS {
                    let m = d / 64.0;
                    let (lr, wd) = (3e-3 / m, 0.1 * m.powf(gamma));
                    let sigma = c * (lr / wd).sqrt() * d.powf(alpha) * (noise * rng.next_normal()).exp();
                    out.push(MupPoint { group: name.into(), gamma, width: d, sigma_max: sigma });
                }
            }
        }
        out
    }

    #[test]
    fn pooled_slope_is_exact_on_noiseless_lines_with_different_intercepts() {
        let pts: Vec<(String, f64, f64)> =
            [("a", 1.0), ("b", -4.0)].iter().flat_map(|(g, c)| (0..5).map(move |i| (g.to_string(), i as f64, c + 0.3 * i as f64))).collect();
        let f = pooled_slope("t", &pts).unwrap();
        assert!((f.slope - 0.3).abs() < 1e-12, "{f:?}");
        assert!(f.slope_se < 1e-10 && f.groups == 2 && f.distinct_x == 5);
    }

    #[test]
    fn fit_alpha_recovers_three_quarters_from_noisy_law_data() {
        let f = fit_alpha(&law_points(0.75, 0.05, 1)).unwrap();
        assert!(f.alpha_se > 0.0 && f.alpha_se < 0.05, "{f:?}");
        assert!((f.alpha - 0.75).abs() < 3.0 * f.alpha_se, "alpha {} ± {}", f.alpha, f.alpha_se);
        assert!((f.implied_gamma - 0.5).abs() < 3.0 * f.implied_gamma_se);
    }

    #[test]
    fn fit_alpha_tells_different_exponents_apart() {
        let a = fit_alpha(&law_points(0.6, 0.03, 2)).unwrap();
        let b = fit_alpha(&law_points(0.9, 0.03, 3)).unwrap();
        assert!((a.alpha - 0.6).abs() < 3.0 * a.alpha_se && (b.alpha - 0.9).abs() < 3.0 * b.alpha_se, "{a:?} {b:?}");
        assert!(b.alpha - a.alpha > 0.2);
    }

    #[test]
    fn the_alpha_standard_error_covers_the_truth_about_95_percent_of_the_time() {
        // If the se were too small (or too large) the 1.96·se interval would miss more (or less) often.
        let trials = 400;
        let hits = (0..trials)
            .filter(|s| {
                let f = fit_alpha(&law_points(0.75, 0.1, 100 + s)).unwrap();
                (f.alpha - 0.75).abs() < 1.96 * f.alpha_se
            })
            .count();
        let rate = hits as f64 / trials as f64;
        assert!((0.91..=0.985).contains(&rate), "coverage {rate}");
    }

    #[test]
    fn calibrate_gamma_finds_two_alpha_minus_one_from_three_gammas() {
        // alpha 0.8 ⇒ along the μP path slope = 0.8 − (1+gamma)/2, zero at gamma = 0.6.
        let c = calibrate_gamma(&mup_points(0.8, &[0.0, 0.5, 1.0], 0.05, 7)).unwrap();
        assert!((c.gamma - 0.6).abs() < 3.0 * c.gamma_se && c.gamma_se > 0.0 && c.gamma_se < 0.1, "{c:?}");
        assert!((c.rate + 0.5).abs() < 3.0 * c.rate_se, "rate {} ± {}", c.rate, c.rate_se);
        assert!(!c.extrapolated);
        assert_eq!(c.per_gamma.len(), 3);
        for s in &c.per_gamma {
            assert!((s.slope - (0.8 - 0.5 * (1.0 + s.gamma))).abs() < 3.0 * s.slope_se, "{s:?}");
            assert_eq!(s.widths, 4);
        }
    }

    #[test]
    fn calibrate_gamma_with_two_gammas_is_exact_without_noise() {
        let c = calibrate_gamma(&mup_points(0.7, &[0.0, 1.0], 0.0, 9)).unwrap();
        assert!((c.gamma - 0.4).abs() < 1e-9, "{c:?}");
        assert!((c.alpha - 0.7).abs() < 1e-9);
    }

    #[test]
    fn the_gamma_standard_error_covers_the_truth_about_95_percent_of_the_time() {
        let trials = 300;
        let hits = (0..trials)
            .filter(|s| {
                let c = calibrate_gamma(&mup_points(0.75, &[0.0, 0.5, 1.0], 0.1, 1000 + s)).unwrap();
                (c.gamma - 0.5).abs() < 1.96 * c.gamma_se
            })
            .count();
        let rate = hits as f64 / trials as f64;
        // The chi-square inflation only widens intervals, so allow a little over-coverage.
        assert!((0.90..=0.995).contains(&rate), "coverage {rate}");
    }

    #[test]
    fn a_zero_crossing_outside_the_measured_gammas_is_flagged() {
        let c = calibrate_gamma(&mup_points(0.95, &[0.0, 0.5], 0.01, 4)).unwrap();
        assert!((c.gamma - 0.9).abs() < 0.05 && c.extrapolated, "{c:?}");
    }

    #[test]
    fn bad_input_is_an_error_that_names_the_problem() {
        let one_gamma = mup_points(0.75, &[0.5], 0.05, 1);
        assert_eq!(calibrate_gamma(&one_gamma).unwrap_err(), FitError::TooFewGammas { found: 1 });
        let two_widths: Vec<MupPoint> = mup_points(0.75, &[0.0, 1.0], 0.05, 1).into_iter().filter(|p| p.width < 200.0).collect();
        let e = calibrate_gamma(&two_widths).unwrap_err();
        assert!(matches!(e, FitError::TooFewWidths { found: 2, need: 3, .. }), "{e}");
        let mut neg = mup_points(0.75, &[0.0, 1.0], 0.05, 1);
        neg[5].sigma_max = -1.0;
        let e = calibrate_gamma(&neg).unwrap_err().to_string();
        assert!(e.contains("sigma_max") && e.contains(&neg[5].group), "{e}");
        let mut zero_wd = law_points(0.75, 0.05, 1);
        zero_wd[0].wd = 0.0;
        assert!(fit_alpha(&zero_wd).unwrap_err().to_string().contains("wd"));
    }

    #[test]
    fn no_gamma_dependence_is_reported_not_divided_by() {
        // sigma independent of gamma: the slope line is flat and there is no crossing to report.
        let mut pts = mup_points(0.75, &[0.0], 0.0, 1);
        let copy: Vec<MupPoint> = pts.iter().map(|p| MupPoint { gamma: 1.0, ..p.clone() }).collect();
        pts.extend(copy);
        assert!(matches!(calibrate_gamma(&pts), Err(FitError::FlatInGamma(_))));
    }


    #[test]
    fn the_zero_crossing_is_interpolated_between_the_measured_points_and_absent_when_there_is_none() {
        assert_eq!(zero_crossing(&[0.0, 0.5, 1.0], &[0.3, 0.1, -0.1]), Some(0.75));
        assert_eq!(zero_crossing(&[0.0, 1.0], &[0.0, 2.0]), Some(0.0));
        assert_eq!(zero_crossing(&[0.0, 1.0], &[0.2, 0.1]), None);
        assert_eq!(zero_crossing(&[0.0, 1.0], &[0.2, 0.0]), Some(1.0));
    }

    #[test]
    fn spread_is_max_over_min() {
        assert_eq!(spread(&[2.0, 1.0, 4.0]), 4.0);
    }
}
