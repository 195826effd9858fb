//! Percentile-bootstrap intervals on gamma*: resample the measurements, refit [`calibrate_gamma`], and read
//! the interval off the refitted values' quantiles.
//!
//! Two resampling schemes, chosen by what the points carry:
//! - [`BootstrapMethod::Seeds`], when every (gamma, width) cell holds two or more seeds: each resample draws,
//!   in every cell independently, as many seeds as the cell has, with replacement, and keeps every matrix of
//!   a drawn seed (the matrices of one run are not independent of each other, so they are drawn together).
//! - [`BootstrapMethod::Residuals`], when some cell has a single seed: within each gamma, the pooled fit's
//!   residuals (one intercept per matrix), inflated by `sqrt(n / (n − groups − 1))` for the degrees of freedom
//!   the fit used, are drawn with replacement and added back to the fitted values.
//!
//! The delta-method `gamma_se` of [`calibrate_gamma`] takes every point's residual as independent and the zero
//! crossing `−a/b` as close to normal. The matrices of one run share that run's noise, which the seed resampling
//! keeps (the tests measure the delta method short by a third where they share half of it), and a shallow slope
//! line skews the crossing's distribution, which the percentile interval shows.

use std::collections::BTreeMap;

use super::slope::{calibrate_gamma, line_zero, pooled_slope, FitError, MupPoint};
use crate::data::SplitMix64;

/// Resamples the bootstrap draws unless told otherwise.
pub const DEFAULT_RESAMPLES: usize = 2000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BootstrapMethod {
    /// Seeds drawn with replacement within every (gamma, width) cell.
    Seeds,
    /// Residuals of each gamma's pooled fit drawn with replacement (a cell with one seed has nothing to draw).
    Residuals,
}

impl BootstrapMethod {
    pub fn describe(self) -> &'static str {
        match self {
            BootstrapMethod::Seeds => "seeds resampled within every (gamma, width) cell",
            BootstrapMethod::Residuals => "residuals of each gamma's fit resampled (one seed per cell)",
        }
    }
}

/// A percentile-bootstrap interval on gamma*.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GammaBootstrap {
    pub method: BootstrapMethod,
    /// Coverage the interval is for (0.95: the 2.5% and 97.5% quantiles).
    pub level: f64,
    pub interval: (f64, f64),
    /// Resamples drawn.
    pub resamples: usize,
    /// Resamples whose line through the per-gamma slopes is flat (rate 0: no zero crossing), left out of the
    /// quantiles. A line that is sloped but not significantly so is kept: its far crossing is part of the spread.
    pub failed: usize,
    /// The kept resamples' gamma*, ascending.
    #[serde(skip)]
    pub draws: Vec<f64>,
}

fn gamma_key(g: f64) -> i64 {
    (g * 1e9).round() as i64
}

fn check_options(resamples: usize, level: f64) -> Result<(), FitError> {
    if resamples == 0 {
        return Err(FitError::Bootstrap("resamples = 0: need at least 1".into()));
    }
    if !(level > 0.0 && level < 1.0) {
        return Err(FitError::Bootstrap(format!("level = {level}: must lie strictly between 0 and 1")));
    }
    Ok(())
}

/// The points of every (gamma, width) cell, by seed: `cells[(gamma, width)][seed]` = point indices.
fn cells(points: &[MupPoint], seeds: &[u64]) -> Result<BTreeMap<(i64, u64), BTreeMap<u64, Vec<usize>>>, FitError> {
    if seeds.len() != points.len() {
        return Err(FitError::Bootstrap(format!("{} seeds for {} points: give one seed per point", seeds.len(), points.len())));
    }
    let mut out: BTreeMap<(i64, u64), BTreeMap<u64, Vec<usize>>> = BTreeMap::new();
    for (i, (p, &s)) in points.iter().zip(seeds).enumerate() {
        out.entry((gamma_key(p.gamma), p.width.to_bits())).or_default().entry(s).or_default().push(i);
    }
    Ok(out)
}

/// Whether every (gamma, width) cell holds two or more seeds, so that [`BootstrapMethod::Seeds`] applies.
pub fn has_replicate_seeds(points: &[MupPoint], seeds: &[u64]) -> Result<bool, FitError> {
    Ok(cells(points, seeds)?.values().all(|by_seed| by_seed.len() >= 2))
}

/// The draws of [`BootstrapMethod::Seeds`]: each resample lists the indices of the points it holds, every
/// (gamma, width) cell drawing as many seeds as it has, with replacement, all of a drawn seed's points
/// together. Deterministic for `rng_seed`; a caller computes other statistics on the same draws.
pub fn seed_resamples(points: &[MupPoint], seeds: &[u64], resamples: usize, rng_seed: u64) -> Result<Vec<Vec<usize>>, FitError> {
    let cells = cells(points, seeds)?;
    let cells: Vec<Vec<&Vec<usize>>> = cells.values().map(|by_seed| by_seed.values().collect()).collect();
    let mut rng = SplitMix64::new(rng_seed);
    Ok((0..resamples)
        .map(|_| {
            let mut drawn = Vec::with_capacity(points.len());
            for cell in &cells {
                for _ in 0..cell.len() {
                    drawn.extend_from_slice(cell[rng.below(cell.len() as u64) as usize]);
                }
            }
            drawn
        })
        .collect())
}

/// The `(1 − level)/2` and `(1 + level)/2` quantiles of ascending `sorted` values (nearest rank), None when empty.
pub fn percentile_interval(sorted: &[f64], level: f64) -> Option<(f64, f64)> {
    if sorted.is_empty() {
        return None;
    }
    let q = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    Some((q((1.0 - level) / 2.0), q((1.0 + level) / 2.0)))
}

/// Per point: its gamma's pooled fitted value of `ln sigma_max` and the pool of that gamma's inflated residuals.
fn residual_model(points: &[MupPoint]) -> Result<(Vec<f64>, BTreeMap<i64, Vec<f64>>), FitError> {
    let mut by_gamma: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, p) in points.iter().enumerate() {
        by_gamma.entry(gamma_key(p.gamma)).or_default().push(i);
    }
    let mut fitted = vec![0.0; points.len()];
    let mut pools = BTreeMap::new();
    for (g, idx) in &by_gamma {
        let xy: Vec<(String, f64, f64)> = idx.iter().map(|&i| (points[i].group.clone(), points[i].width.ln(), points[i].sigma_max.ln())).collect();
        let fit = pooled_slope(&format!("gamma {}", points[idx[0]].gamma), &xy)?;
        let mut means: BTreeMap<&str, (f64, f64, f64)> = BTreeMap::new();
        for (group, x, y) in &xy {
            let e = means.entry(group.as_str()).or_insert((0.0, 0.0, 0.0));
            *e = (e.0 + x, e.1 + y, e.2 + 1.0);
        }
        let inflate = (fit.n as f64 / (fit.n - fit.groups - 1) as f64).sqrt();
        let mut pool = Vec::with_capacity(idx.len());
        for (&i, (group, x, y)) in idx.iter().zip(&xy) {
            let (sx, sy, k) = means[group.as_str()];
            fitted[i] = sy / k + fit.slope * (x - sx / k);
            pool.push(inflate * (y - fitted[i]));
        }
        pools.insert(*g, pool);
    }
    Ok((fitted, pools))
}

/// A `level` percentile-bootstrap interval on [`calibrate_gamma`]'s gamma* over `resamples` draws, `seeds[i]`
/// being the seed of `points[i]`'s run. Seeds are resampled when every (gamma, width) cell has two or more,
/// residuals otherwise (see the module). Each resample's gamma* is [`line_zero`] (the same line, without
/// [`calibrate_gamma`]'s test that it is significantly sloped); resamples with a flat line are counted and left
/// out. Errors of the fit on the points themselves are returned as they are.
pub fn bootstrap_gamma(points: &[MupPoint], seeds: &[u64], resamples: usize, level: f64, rng_seed: u64) -> Result<GammaBootstrap, FitError> {
    check_options(resamples, level)?;
    calibrate_gamma(points)?;
    let method = if has_replicate_seeds(points, seeds)? { BootstrapMethod::Seeds } else { BootstrapMethod::Residuals };
    let mut draws = Vec::with_capacity(resamples);
    let mut failed = 0;
    let mut keep = |fit: Result<Option<f64>, FitError>| -> Result<(), FitError> {
        match fit? {
            Some(g) => draws.push(g),
            None => failed += 1,
        }
        Ok(())
    };
    match method {
        BootstrapMethod::Seeds => {
            for drawn in seed_resamples(points, seeds, resamples, rng_seed)? {
                let pts: Vec<MupPoint> = drawn.iter().map(|&i| points[i].clone()).collect();
                keep(line_zero(&pts))?;
            }
        }
        BootstrapMethod::Residuals => {
            let (fitted, pools) = residual_model(points)?;
            let mut rng = SplitMix64::new(rng_seed);
            for _ in 0..resamples {
                let pts: Vec<MupPoint> = points
                    .iter()
                    .zip(&fitted)
                    .map(|(p, f)| {
                        let pool = &pools[&gamma_key(p.gamma)];
                        MupPoint { sigma_max: (f + pool[rng.below(pool.len() as u64) as usize]).exp(), ..p.clone() }
                    })
                    .collect();
                keep(line_zero(&pts))?;
            }
        }
    }
    draws.sort_by(f64::total_cmp);
    let interval = percentile_interval(&draws, level)
        .ok_or_else(|| FitError::Bootstrap(format!("none of the {resamples} resamples has a zero crossing: the slope does not move with gamma")))?;
    Ok(GammaBootstrap { method, level, interval, resamples, failed, draws })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WIDTHS: [f64; 4] = [64.0, 128.0, 256.0, 512.0];
    const MATRICES: [(&str, f64); 3] = [("q", 0.7), ("up", 1.9), ("down", 3.1)];

    /// The μP path through `sigma = c·sqrt(lr/wd)·d^alpha`, one run per seed: every matrix of a run shares
    /// the fraction `shared` of its noise variance (the run's), so the matrices of one seed are correlated.
    fn runs_with(alpha: f64, gammas: &[f64], seeds: u64, noise: f64, shared_var: f64, rng_seed: u64) -> (Vec<MupPoint>, Vec<u64>) {
        runs_at(&WIDTHS, alpha, gammas, seeds, noise, shared_var, rng_seed)
    }

    fn runs_at(widths: &[f64], alpha: f64, gammas: &[f64], seeds: u64, noise: f64, shared_var: f64, rng_seed: u64) -> (Vec<MupPoint>, Vec<u64>) {
        let mut rng = SplitMix64::new(rng_seed);
        let (mut pts, mut ss) = (Vec::new(), Vec::new());
        for &gamma in gammas {
            for &d in widths {
                for seed in 0..seeds {
                    let shared = rng.next_normal();
                    for (name, c) in MATRICES {
                        let m = d / 64.0;
                        let (lr, wd) = (3e-3 / m, 0.1 * m.powf(gamma));
                        let e = noise * (shared_var.sqrt() * shared + (1.0 - shared_var).sqrt() * rng.next_normal());
                        pts.push(MupPoint { group: name.into(), gamma, width: d, sigma_max: c * (lr / wd).sqrt() * d.powf(alpha) * e.exp() });
                        ss.push(seed);
                    }
                }
            }
        }
        (pts, ss)
    }

    fn runs(alpha: f64, gammas: &[f64], seeds: u64, noise: f64, rng_seed: u64) -> (Vec<MupPoint>, Vec<u64>) {
        runs_with(alpha, gammas, seeds, noise, 0.5, rng_seed)
    }

    #[test]
    fn noiseless_points_give_an_interval_of_one_value_by_either_method() {
        for seeds in [1, 3] {
            let (pts, ss) = runs(0.8, &[0.0, 0.5, 1.0], seeds, 0.0, 1);
            let b = bootstrap_gamma(&pts, &ss, 200, 0.95, 5).unwrap();
            assert!((b.interval.0 - 0.6).abs() < 1e-9 && (b.interval.1 - 0.6).abs() < 1e-9, "{seeds} seeds: {b:?}");
            assert_eq!(b.method, if seeds == 1 { BootstrapMethod::Residuals } else { BootstrapMethod::Seeds });
            assert_eq!((b.draws.len(), b.failed), (200, 0));
        }
    }

    #[test]
    fn a_seed_resample_draws_whole_seeds_within_each_cell() {
        let (pts, ss) = runs(0.75, &[0.0, 1.0], 3, 0.1, 2);
        for drawn in seed_resamples(&pts, &ss, 50, 9).unwrap() {
            assert_eq!(drawn.len(), pts.len());
            // Every (gamma, width) cell keeps its size, and a drawn seed brings all three matrices.
            let mut per_cell: BTreeMap<(i64, u64), BTreeMap<u64, usize>> = BTreeMap::new();
            for &i in &drawn {
                *per_cell.entry((gamma_key(pts[i].gamma), pts[i].width.to_bits())).or_default().entry(ss[i]).or_default() += 1;
            }
            assert_eq!(per_cell.len(), 2 * WIDTHS.len());
            for by_seed in per_cell.values() {
                assert_eq!(by_seed.values().sum::<usize>(), 3 * MATRICES.len());
                assert!(by_seed.values().all(|n| n % MATRICES.len() == 0), "{by_seed:?}");
            }
        }
        assert_eq!(seed_resamples(&pts, &ss, 20, 9).unwrap(), seed_resamples(&pts, &ss, 20, 9).unwrap());
    }

    #[test]
    fn the_interval_is_the_percentiles_of_calibrate_gamma_refitted_on_each_drawn_set() {
        // A direct computation on the same draws: refit every resample by hand and take the nearest-rank quantiles.
        let (pts, ss) = runs(0.75, &[0.0, 0.5, 1.0], 3, 0.1, 3);
        let b = bootstrap_gamma(&pts, &ss, 300, 0.9, 11).unwrap();
        let mut direct: Vec<f64> = seed_resamples(&pts, &ss, 300, 11)
            .unwrap()
            .iter()
            .map(|d| line_zero(&d.iter().map(|&i| pts[i].clone()).collect::<Vec<_>>()).unwrap().unwrap())
            .collect();
        direct.sort_by(f64::total_cmp);
        assert_eq!(b.draws, direct);
        let (lo, hi) = (direct[(299.0f64 * 0.05).round() as usize], direct[(299.0f64 * 0.95).round() as usize]);
        assert_eq!(b.interval, (lo, hi));
    }

    #[test]
    fn with_many_seeds_the_bootstrap_spread_matches_the_sampling_spread_which_the_delta_method_misses() {
        // The reference: the standard deviation of gamma* over 300 independent data sets from the same law. A
        // run's matrices share half of their noise, which the delta method's pooled residuals take as independent.
        let estimates: Vec<f64> = (0..300).map(|t| calibrate_gamma(&runs(0.75, &[0.0, 0.5, 1.0], 16, 0.1, 2000 + t).0).unwrap().gamma).collect();
        let m = estimates.iter().sum::<f64>() / 300.0;
        let sampling_sd = (estimates.iter().map(|g| (g - m).powi(2)).sum::<f64>() / 299.0).sqrt();
        let (pts, ss) = runs(0.75, &[0.0, 0.5, 1.0], 16, 0.1, 4);
        let b = bootstrap_gamma(&pts, &ss, 2000, 0.95, 12).unwrap();
        let half = (b.interval.1 - b.interval.0) / (2.0 * 1.96);
        let se = calibrate_gamma(&pts).unwrap().gamma_se;
        assert!((0.8..1.25).contains(&(half / sampling_sd)), "bootstrap half-width / 1.96 = {half:.4}, sampling sd = {sampling_sd:.4}");
        assert!(se / sampling_sd < 0.85, "delta-method se {se:.4} vs sampling sd {sampling_sd:.4}");
        // With independent errors the two estimates agree.
        let (pts, ss) = runs_with(0.75, &[0.0, 0.5, 1.0], 16, 0.1, 0.0, 5);
        let b = bootstrap_gamma(&pts, &ss, 2000, 0.95, 13).unwrap();
        let ratio = (b.interval.1 - b.interval.0) / (2.0 * 1.96) / calibrate_gamma(&pts).unwrap().gamma_se;
        assert!((0.8..1.25).contains(&ratio), "independent errors: bootstrap / delta = {ratio:.3}");
    }

    #[test]
    fn the_seed_bootstrap_covers_the_true_gamma_at_close_to_its_level() {
        // With n = 3 seeds per cell a seed resample's variance is (n − 1)/n = 2/3 of the sampling variance, so
        // the 95% percentile interval spans about ±1.6 standard errors: expected coverage about 89%.
        let trials = 200;
        let hits = (0..trials)
            .filter(|t| {
                let (pts, ss) = runs(0.75, &[0.0, 0.5, 1.0], 3, 0.1, 100 + t);
                let b = bootstrap_gamma(&pts, &ss, 400, 0.95, 7).unwrap();
                b.interval.0 <= 0.5 && 0.5 <= b.interval.1
            })
            .count();
        let rate = hits as f64 / trials as f64;
        assert!((0.80..=0.97).contains(&rate), "coverage {rate}");
    }

    #[test]
    fn the_residual_bootstrap_covers_the_true_gamma_with_one_seed_per_cell() {
        // Independent errors: with one run per cell, noise shared by a run's matrices cannot be told from the
        // signal, by this bootstrap or by the delta method.
        let trials = 200;
        let hits = (0..trials)
            .filter(|t| {
                let (pts, ss) = runs_at(&WIDTHS[..3], 0.75, &[0.0, 0.5, 1.0], 1, 0.1, 0.0, 500 + t);
                let b = bootstrap_gamma(&pts, &ss, 400, 0.95, 8).unwrap();
                assert_eq!(b.method, BootstrapMethod::Residuals);
                // A resample's line is flat only by accident: every resample has a crossing (the coord check's
                // one-matrix case, where a ninth of a gamma's resamples are exactly straight, is tested in Python).
                assert_eq!(b.failed, 0, "{b:?}");
                b.interval.0 <= 0.5 && 0.5 <= b.interval.1
            })
            .count();
        let rate = hits as f64 / trials as f64;
        assert!((0.85..=0.99).contains(&rate), "coverage {rate}");
    }

    #[test]
    fn bad_input_is_an_error_that_names_it() {
        let (pts, ss) = runs(0.75, &[0.0, 1.0], 2, 0.1, 5);
        let e = bootstrap_gamma(&pts, &ss[1..], 100, 0.95, 1).unwrap_err().to_string();
        assert!(e.contains(&format!("{} seeds for {} points", ss.len() - 1, pts.len())), "{e}");
        assert!(bootstrap_gamma(&pts, &ss, 0, 0.95, 1).unwrap_err().to_string().contains("resamples = 0"));
        assert!(bootstrap_gamma(&pts, &ss, 10, 1.0, 1).unwrap_err().to_string().contains("level = 1"));
        let one_gamma: Vec<MupPoint> = pts.iter().filter(|p| p.gamma == 0.0).cloned().collect();
        assert_eq!(bootstrap_gamma(&one_gamma, &ss[..one_gamma.len()], 10, 0.95, 1).unwrap_err(), FitError::TooFewGammas { found: 1 });
    }
}
