//! Learning-rate (and optionally weight-decay) schedules.
//!
//! A schedule returns a *multiplier* in [0, 1] for a step. The optimizer multiplies each parameter's
//! width-scaled base lr by it; it never overwrites the per-parameter value. (Overwriting a
//! width-scaled lr with one global value is the pitfall that mup's README warns about, and what tch's
//! `set_lr` does.)

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Schedule {
    Constant,
    /// Linear warmup from 0 over `warmup` steps, then cosine from 1 down to `floor` at `total` steps.
    WarmupCosine { warmup: u64, total: u64, floor: f64 },
    /// Warmup–stable–decay: linear warmup, constant, then a linear decay to `floor` over the last
    /// `decay` steps of `total`.
    Wsd { warmup: u64, decay: u64, total: u64, floor: f64 },
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::Constant
    }
}

impl Schedule {
    /// The multiplier for the optimizer step with zero-based index `step` (the first step is 0).
    pub fn multiplier(&self, step: u64) -> f64 {
        match *self {
            Schedule::Constant => 1.0,
            Schedule::WarmupCosine { warmup, total, floor } => {
                if step < warmup {
                    return (step + 1) as f64 / warmup as f64;
                }
                let span = total.saturating_sub(warmup).max(1);
                let t = ((step - warmup) as f64 / span as f64).min(1.0);
                floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
            Schedule::Wsd { warmup, decay, total, floor } => {
                if step < warmup {
                    return (step + 1) as f64 / warmup as f64;
                }
                let decay_start = total.saturating_sub(decay);
                if step < decay_start {
                    return 1.0;
                }
                let t = ((step - decay_start) as f64 / decay.max(1) as f64).min(1.0);
                1.0 - (1.0 - floor) * t
            }
        }
    }

    /// Parses `constant`, `cosine:WARMUP:TOTAL[:FLOOR]` or `wsd:WARMUP:DECAY:TOTAL[:FLOOR]`.
    pub fn parse(s: &str) -> Result<Schedule, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let int = |i: usize| -> Result<u64, String> {
            parts.get(i).ok_or_else(|| format!("schedule `{s}`: missing field {i}"))?.parse().map_err(|e| format!("schedule `{s}`: {e}"))
        };
        let floor = |i: usize| -> Result<f64, String> {
            parts.get(i).map_or(Ok(0.0), |v| v.parse().map_err(|e| format!("schedule `{s}`: {e}")))
        };
        match parts[0] {
            "constant" => Ok(Schedule::Constant),
            "cosine" => Ok(Schedule::WarmupCosine { warmup: int(1)?, total: int(2)?, floor: floor(3)? }),
            "wsd" => Ok(Schedule::Wsd { warmup: int(1)?, decay: int(2)?, total: int(3)?, floor: floor(4)? }),
            other => Err(format!("unknown schedule `{other}`: expected constant, cosine:W:T[:F] or wsd:W:D:T[:F]")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_rises_linearly_then_cosine_reaches_the_floor_at_total() {
        let s = Schedule::WarmupCosine { warmup: 10, total: 110, floor: 0.1 };
        assert!((s.multiplier(0) - 0.1).abs() < 1e-12);
        assert!((s.multiplier(9) - 1.0).abs() < 1e-12);
        assert!((s.multiplier(10) - 1.0).abs() < 1e-12);
        // Halfway through the cosine: floor + (1 - floor)/2.
        assert!((s.multiplier(60) - 0.55).abs() < 1e-12);
        assert!((s.multiplier(110) - 0.1).abs() < 1e-12);
        assert!((s.multiplier(500) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn wsd_is_flat_between_warmup_and_decay() {
        let s = Schedule::Wsd { warmup: 5, decay: 20, total: 100, floor: 0.0 };
        assert_eq!(s.multiplier(50), 1.0);
        assert_eq!(s.multiplier(79), 1.0);
        assert!((s.multiplier(90) - 0.5).abs() < 1e-12);
        assert_eq!(s.multiplier(100), 0.0);
    }

    #[test]
    fn schedules_parse_from_the_command_line_form() {
        assert_eq!(Schedule::parse("cosine:10:100").unwrap(), Schedule::WarmupCosine { warmup: 10, total: 100, floor: 0.0 });
        assert_eq!(Schedule::parse("wsd:1:2:3:0.5").unwrap(), Schedule::Wsd { warmup: 1, decay: 2, total: 3, floor: 0.5 });
        assert!(Schedule::parse("linear").unwrap_err().contains("unknown schedule"));
    }
}
