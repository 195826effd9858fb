//! The steady-state protocol: how long to train before a top singular value means something, how to read
//! it once there, and how sure to be of what is read.
//!
//! Under coupled AdamW a weight is multiplied by `(1 − lr_t·wd_t)` at every step, so one timescale of
//! weight decay is `1/(lr·wd)` steps and the timescales a parameter has seen are its **decay horizon**
//!
//! ```text
//! H = Σ_t lr_t · wd_t          (coupled; independent decay: Σ_t wd_t)
//! ```
//!
//! with the width-scaled values and the schedule included. The initialisation's share of the weights is
//! `Π_t (1 − lr_t·wd_t) ≈ e^(−H)`: below a few units sigma_max is mostly the decayed initialisation,
//! whatever the rule; the law `sigma_max ≈ c·sqrt(lr/wd)·d^alpha` (arXiv 2510.15262) is about the steady
//! state after it. Under `lr ∝ 1/m, wd ∝ m^gamma` a matrix's `lr·wd ∝ m^(gamma − 1)`, so a wider model
//! needs proportionally more steps: a fixed step count compares widths at different horizons.
//!
//! - [`HorizonRate`]: H after a number of steps under a schedule, and the steps that reach a target H.
//! - [`SteadyStateTrace`]: sigma_max samples against H; the mean over the last timescale and the drift
//!   between the last two.
//! - [`bootstrap_interval`]: a percentile interval by resampling the seeds of every cell.

use crate::data::SplitMix64;
use crate::optim::DecayMode;
use crate::schedule::Schedule;

/// How one parameter's decay horizon grows per step: `per_step · multiplier^power`, where `multiplier` is
/// the schedule's at that step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HorizonRate {
    /// `lr·wd` (coupled) or `wd` (independent) at schedule multiplier 1: the width-scaled values.
    pub per_step: f64,
    /// 0, 1 or 2: how many of lr and wd the schedule multiplies in the decay factor.
    pub multiplier_power: i32,
}

impl HorizonRate {
    /// The rate of a parameter with width-scaled `lr` and `weight_decay` under the optimizer's settings.
    pub fn new(lr: f64, weight_decay: f64, decay: DecayMode, schedule_weight_decay: bool) -> HorizonRate {
        let scheduled_wd = i32::from(schedule_weight_decay);
        match decay {
            DecayMode::Coupled => HorizonRate { per_step: lr * weight_decay, multiplier_power: 1 + scheduled_wd },
            DecayMode::Independent => HorizonRate { per_step: weight_decay, multiplier_power: scheduled_wd },
        }
    }

    /// Decay horizon added by the step with zero-based index `step`.
    pub fn at(&self, schedule: &Schedule, step: u64) -> f64 {
        self.per_step * schedule.multiplier(step).powi(self.multiplier_power)
    }

    /// H after the first `steps` steps.
    pub fn after(&self, schedule: &Schedule, steps: u64) -> f64 {
        (0..steps).map(|t| self.at(schedule, t)).sum()
    }

    /// The fewest steps whose horizon reaches `target`, or None if `limit` steps do not.
    pub fn steps_to_reach(&self, schedule: &Schedule, target: f64, limit: u64) -> Option<u64> {
        if target <= 0.0 {
            return Some(0);
        }
        let mut h = 0.0;
        for t in 0..limit {
            h += self.at(schedule, t);
            if h >= target {
                return Some(t + 1);
            }
        }
        None
    }

    /// Steps per timescale at schedule multiplier 1: `1/(lr·wd)`.
    pub fn timescale_steps(&self) -> f64 {
        1.0 / self.per_step
    }
}

/// Constant lr after a linear warmup of `warmup` steps: the schedule of the steady-state protocol (a decay
/// at the end would move sigma_max off its steady state just before it is read).
pub fn warmup_then_constant(warmup: u64) -> Schedule {
    Schedule::Wsd { warmup, decay: 0, total: u64::MAX, floor: 1.0 }
}

/// sigma_max samples of one matrix against its decay horizon.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SteadyStateTrace {
    /// (H, sigma_max), in the order taken (H non-decreasing).
    pub points: Vec<(f64, f64)>,
}

impl SteadyStateTrace {
    pub fn push(&mut self, horizon: f64, sigma_max: f64) {
        self.points.push((horizon, sigma_max));
    }

    /// Mean of the samples with `from < H ≤ to`; None when there are none.
    pub fn mean_between(&self, from: f64, to: f64) -> Option<f64> {
        let v: Vec<f64> = self.points.iter().filter(|(h, _)| *h > from && *h <= to).map(|p| p.1).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }

    /// The steady-state reading at horizon `h`: the mean over the last timescale, `(h − 1, h]`.
    pub fn last_timescale_mean(&self, h: f64) -> Option<f64> {
        self.mean_between(h - 1.0, h)
    }

    /// Relative drift over the last two timescales: mean over `(h − 1, h]` divided by the mean over
    /// `(h − 2, h − 1]`, minus 1. Near 0 at steady state; a decaying initialisation gives `e^(−1) − 1`.
    pub fn drift(&self, h: f64) -> Option<f64> {
        Some(self.mean_between(h - 1.0, h)? / self.mean_between(h - 2.0, h - 1.0)? - 1.0)
    }
}

/// Percentile bootstrap interval of `statistic` over `cells` (e.g. one cell per width, holding that
/// width's per-seed values): each resample draws every cell's values with replacement, independently.
/// Returns the `(1 − level)/2` and `(1 + level)/2` quantiles of `resamples` draws; non-finite
/// statistics (a resample where the statistic is undefined) are left out. Deterministic for a `seed`.
pub fn bootstrap_interval<F>(cells: &[Vec<f64>], statistic: F, resamples: usize, level: f64, seed: u64) -> Option<(f64, f64)>
where
    F: Fn(&[Vec<f64>]) -> f64,
{
    if cells.iter().any(|c| c.is_empty()) || resamples == 0 {
        return None;
    }
    let mut rng = SplitMix64::new(seed);
    let mut stats: Vec<f64> = (0..resamples)
        .map(|_| {
            let drawn: Vec<Vec<f64>> =
                cells.iter().map(|c| (0..c.len()).map(|_| c[rng.below(c.len() as u64) as usize]).collect()).collect();
            statistic(&drawn)
        })
        .filter(|s| s.is_finite())
        .collect();
    if stats.is_empty() {
        return None;
    }
    stats.sort_by(f64::total_cmp);
    let q = |p: f64| stats[((stats.len() - 1) as f64 * p).round() as usize];
    Some((q((1.0 - level) / 2.0), q((1.0 + level) / 2.0)))
}

/// Mean of a non-empty slice.
pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_horizon_under_a_linear_warmup_is_the_arithmetic_series_then_grows_linearly() {
        let rate = HorizonRate::new(0.02, 1.0, DecayMode::Coupled, false);
        let s = warmup_then_constant(10);
        // Warmup multipliers 1/10 … 10/10 sum to 5.5 steps' worth.
        assert!((rate.after(&s, 10) - 0.02 * 5.5).abs() < 1e-12);
        assert!((rate.after(&s, 110) - 0.02 * 105.5).abs() < 1e-12);
        // H = 6 needs 6/0.02 = 300 full steps, plus 4.5 lost in the warmup.
        assert_eq!(rate.steps_to_reach(&s, 6.0, 10_000), Some(305));
        assert_eq!(rate.steps_to_reach(&s, 6.0, 100), None);
    }

    #[test]
    fn a_scheduled_weight_decay_enters_the_coupled_horizon_squared_and_independent_decay_ignores_lr() {
        let s = Schedule::WarmupCosine { warmup: 0, total: 100, floor: 0.5 };
        let both = HorizonRate::new(0.1, 0.2, DecayMode::Coupled, true);
        let manual: f64 = (0..100).map(|t| 0.1 * s.multiplier(t) * 0.2 * s.multiplier(t)).sum();
        assert!((both.after(&s, 100) - manual).abs() < 1e-12);
        let independent = HorizonRate::new(123.0, 0.01, DecayMode::Independent, false);
        assert!((independent.after(&s, 100) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn the_optimizers_own_decay_horizon_is_the_planned_one_under_a_warmup_and_a_scheduled_weight_decay() {
        use crate::classify::BaseShapes;
        use crate::optim::{AdamWConfig, WidthScaledAdamW};
        use tch::{nn, Device, Kind};
        for (schedule, scheduled_wd, decay) in [
            (warmup_then_constant(7), false, DecayMode::Coupled),
            (Schedule::WarmupCosine { warmup: 5, total: 40, floor: 0.1 }, true, DecayMode::Coupled),
            (Schedule::WarmupCosine { warmup: 5, total: 40, floor: 0.1 }, true, DecayMode::Independent),
        ] {
            let build = |d: i64| {
                let vs = nn::VarStore::new(Device::Cpu);
                let _ = vs.root().randn("w", &[d, d], 0.0, 0.1);
                vs
            };
            let (base, delta, vs) = (build(4), build(8), build(16));
            let shapes = BaseShapes::from_var_stores(&base, &delta);
            let config = AdamWConfig { lr: 0.03, weight_decay: 0.2, schedule: schedule.clone(), schedule_weight_decay: scheduled_wd, decay, ..Default::default() };
            let mut opt = WidthScaledAdamW::new(&vs, &shapes, config).unwrap();
            let w = vs.variables()["w"].shallow_clone();
            for _ in 0..40 {
                opt.zero_grad();
                (&w * &w).sum(Kind::Float).backward();
                opt.step();
            }
            let d = opt.plan().get("w").unwrap();
            let planned = HorizonRate::new(d.lr, d.weight_decay, decay, scheduled_wd).after(&schedule, 40);
            let counted = opt.decay_horizon("w").unwrap();
            assert!((counted - planned).abs() <= 1e-12 * planned, "{schedule:?} {decay:?}: optimizer {counted} vs planned {planned}");
        }
    }

    #[test]
    fn a_decaying_initialisation_drifts_by_e_to_the_minus_one_and_a_steady_state_does_not() {
        let mut decaying = SteadyStateTrace::default();
        let mut steady = SteadyStateTrace::default();
        for i in 0..=600 {
            let h = i as f64 / 100.0;
            decaying.push(h, (-h).exp());
            steady.push(h, 2.0);
        }
        let d = decaying.drift(6.0).unwrap();
        // Means of e^(−h) over consecutive unit intervals are in the ratio e^(−1) (up to the sampling grid).
        assert!((d - ((-1f64).exp() - 1.0)).abs() < 0.01, "{d}");
        assert_eq!(steady.drift(6.0), Some(0.0));
        assert_eq!(steady.last_timescale_mean(6.0), Some(2.0));
        assert_eq!(SteadyStateTrace::default().drift(6.0), None);
    }

    #[test]
    fn the_bootstrap_interval_covers_the_statistic_and_collapses_without_seed_variation() {
        let cells = vec![vec![1.0, 1.1, 0.9], vec![2.0, 2.2, 1.8]];
        let ratio = |c: &[Vec<f64>]| mean(&c[1]) / mean(&c[0]);
        let (lo, hi) = bootstrap_interval(&cells, ratio, 2000, 0.95, 7).unwrap();
        assert!(lo < 2.0 && 2.0 < hi && lo > 1.5 && hi < 2.7, "[{lo}, {hi}]");
        let same = vec![vec![1.0, 1.0], vec![3.0, 3.0]];
        assert_eq!(bootstrap_interval(&same, ratio, 100, 0.95, 7), Some((3.0, 3.0)));
        assert_eq!(bootstrap_interval(&[vec![]], ratio, 100, 0.95, 7), None);
    }
}
