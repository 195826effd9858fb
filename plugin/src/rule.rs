//! The width-scaling rule: how a parameter's learning rate and weight decay follow its width.
//!
//! Fan, Liu, Zhao, Yuan, Gu, "Robust Layerwise Scaling Rules by Proper Weight Decay Tuning",
//! arXiv 2510.15262 (2025). Under AdamW the top singular value of a hidden matrix settles at
//! `sigma_max ≈ c · sqrt(eta/lambda) · d^alpha` with `alpha ≈ 0.75`. μP already takes `eta ∝ 1/m`;
//! taking `lambda ∝ m^gamma` with `gamma = 2·alpha − 1 = 0.5` keeps `sigma_max` width-invariant, so the
//! proxy's tuned `(eta, lambda)` transfer.
//!
//! | class        | lr                     | weight decay           |
//! |--------------|------------------------|------------------------|
//! | matrix-like  | `eta · m^(−lr_exponent)` | `lambda · m^gamma`     |
//! | vector-like  | `eta`                  | `0`                    |

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::classify::ParamClass;

/// A named choice of exponents. `Custom` carries its own.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// arXiv 2510.15262: lr ∝ 1/m, wd ∝ m^0.5.
    Paper,
    /// microsoft/mup MuAdamW, OLMo-core, CompleteP: lr ∝ 1/m, wd ∝ m (eta·lambda constant).
    MupCoupled,
    /// Megatron-LM muP: lr ∝ 1/m, wd unchanged.
    MupFixedWd,
    /// Standard parameterization: no width scaling at all.
    Standard,
    /// User-chosen `gamma` and `lr_exponent`.
    Custom,
}

impl Preset {
    pub const ALL: [Preset; 4] = [Preset::Paper, Preset::MupCoupled, Preset::MupFixedWd, Preset::Standard];

    pub fn name(&self) -> &'static str {
        match self {
            Preset::Paper => "paper",
            Preset::MupCoupled => "mup-coupled",
            Preset::MupFixedWd => "mup-fixed-wd",
            Preset::Standard => "standard",
            Preset::Custom => "custom",
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RuleError {
    #[error("unknown rule `{0}`: expected one of paper, mup-coupled, mup-fixed-wd, standard")]
    UnknownPreset(String),
    #[error("rule exponent `{name}` = {value} is not finite")]
    NonFinite { name: &'static str, value: f64 },
}

impl FromStr for Preset {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "paper" => Ok(Preset::Paper),
            "mup-coupled" => Ok(Preset::MupCoupled),
            "mup-fixed-wd" => Ok(Preset::MupFixedWd),
            "standard" => Ok(Preset::Standard),
            "custom" => Ok(Preset::Custom),
            other => Err(RuleError::UnknownPreset(other.to_string())),
        }
    }
}

/// The width-scaling rule applied to matrix-like parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub preset: Preset,
    /// Weight decay exponent: `lambda(m) = lambda · m^gamma`.
    pub gamma: f64,
    /// Learning-rate exponent: `eta(m) = eta · m^(−lr_exponent)`. μP's Adam rule is 1.
    pub lr_exponent: f64,
}

impl Default for Rule {
    fn default() -> Self {
        Rule::preset(Preset::Paper)
    }
}

impl Rule {
    pub fn preset(preset: Preset) -> Rule {
        let (gamma, lr_exponent) = match preset {
            Preset::Paper => (0.5, 1.0),
            Preset::MupCoupled => (1.0, 1.0),
            Preset::MupFixedWd => (0.0, 1.0),
            Preset::Standard => (0.0, 0.0),
            Preset::Custom => (0.5, 1.0),
        };
        Rule { preset, gamma, lr_exponent }
    }

    /// A rule with a user-chosen weight-decay exponent and learning-rate exponent.
    pub fn custom(gamma: f64, lr_exponent: f64) -> Result<Rule, RuleError> {
        if !gamma.is_finite() {
            return Err(RuleError::NonFinite { name: "gamma", value: gamma });
        }
        if !lr_exponent.is_finite() {
            return Err(RuleError::NonFinite { name: "lr_exponent", value: lr_exponent });
        }
        Ok(Rule { preset: Preset::Custom, gamma, lr_exponent })
    }

    /// Parses `paper`, `mup-coupled`, `mup-fixed-wd`, `standard`, or `gamma=G[,lr_exponent=E]`.
    pub fn parse(s: &str) -> Result<Rule, RuleError> {
        if let Some(rest) = s.strip_prefix("gamma=") {
            let mut parts = rest.split(',');
            let gamma = parse_number("gamma", parts.next().unwrap_or(""))?;
            let mut lr_exponent = 1.0;
            for part in parts {
                match part.split_once('=') {
                    Some(("lr_exponent", v)) => lr_exponent = parse_number("lr_exponent", v)?,
                    _ => return Err(RuleError::UnknownPreset(s.to_string())),
                }
            }
            return Rule::custom(gamma, lr_exponent);
        }
        Ok(Rule::preset(s.parse()?))
    }

    /// `gamma` as reported to people: `None` where the rule does no width scaling.
    pub fn reported_gamma(&self) -> Option<f64> {
        (self.preset != Preset::Standard).then_some(self.gamma)
    }

    /// Learning rate of a parameter of `class` with width multiplier `m`, from the base `eta`.
    ///
    /// Matrix-like: `eta · m^(−lr_exponent)` (μP, Adam). Vector-like: `eta`.
    pub fn learning_rate(&self, class: ParamClass, eta: f64, m: f64) -> f64 {
        match class {
            ParamClass::MatrixLike => eta * m.powf(-self.lr_exponent),
            ParamClass::VectorLike => eta,
        }
    }

    /// Weight decay of a parameter of `class` with width multiplier `m`, from the base `lambda`.
    ///
    /// Matrix-like: `lambda · m^gamma` (arXiv 2510.15262, gamma = 0.5). Vector-like: no decay.
    pub fn weight_decay(&self, class: ParamClass, lambda: f64, m: f64) -> f64 {
        match class {
            ParamClass::MatrixLike => lambda * m.powf(self.gamma),
            ParamClass::VectorLike => 0.0,
        }
    }
}

fn parse_number(name: &'static str, v: &str) -> Result<f64, RuleError> {
    let value: f64 = v.trim().parse().map_err(|_| RuleError::UnknownPreset(format!("{name}={v}")))?;
    if !value.is_finite() {
        return Err(RuleError::NonFinite { name, value });
    }
    Ok(value)
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.preset {
            Preset::Standard => write!(f, "standard (no width scaling)"),
            _ => write!(f, "{} (lr ∝ m^-{}, wd ∝ m^{})", self.preset, self.lr_exponent, self.gamma),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ETA: f64 = 3e-3;
    const LAMBDA: f64 = 0.1;

    #[test]
    fn paper_rule_scales_matrix_lr_as_one_over_m_and_wd_as_sqrt_m() {
        let r = Rule::default();
        for m in [0.5, 1.0, 2.0, 4.0, 8.0, 16.0] {
            assert!((r.learning_rate(ParamClass::MatrixLike, ETA, m) - ETA / m).abs() < 1e-18);
            assert!((r.weight_decay(ParamClass::MatrixLike, LAMBDA, m) - LAMBDA * m.sqrt()).abs() < 1e-15);
        }
    }

    #[test]
    fn paper_rule_keeps_sqrt_lr_over_wd_times_m_to_three_quarters_constant() {
        // sigma_max ∝ sqrt(eta/lambda)·d^0.75 must not depend on m under the paper's rule.
        let r = Rule::default();
        let gain = |m: f64| {
            (r.learning_rate(ParamClass::MatrixLike, ETA, m) / r.weight_decay(ParamClass::MatrixLike, LAMBDA, m)).sqrt()
                * m.powf(0.75)
        };
        for m in [2.0, 4.0, 8.0] {
            assert!((gain(m) / gain(1.0) - 1.0).abs() < 1e-12, "m={m}");
        }
    }

    #[test]
    fn mup_coupled_keeps_lr_times_wd_constant() {
        let r = Rule::preset(Preset::MupCoupled);
        for m in [2.0, 8.0] {
            let p = r.learning_rate(ParamClass::MatrixLike, ETA, m) * r.weight_decay(ParamClass::MatrixLike, LAMBDA, m);
            assert!((p - ETA * LAMBDA).abs() < 1e-18);
        }
    }

    #[test]
    fn mup_fixed_wd_leaves_weight_decay_unchanged() {
        let r = Rule::preset(Preset::MupFixedWd);
        assert_eq!(r.weight_decay(ParamClass::MatrixLike, LAMBDA, 8.0), LAMBDA);
        assert_eq!(r.learning_rate(ParamClass::MatrixLike, ETA, 8.0), ETA / 8.0);
    }

    #[test]
    fn standard_rule_does_no_width_scaling() {
        let r = Rule::preset(Preset::Standard);
        assert_eq!(r.learning_rate(ParamClass::MatrixLike, ETA, 8.0), ETA);
        assert_eq!(r.weight_decay(ParamClass::MatrixLike, LAMBDA, 8.0), LAMBDA);
        assert_eq!(r.reported_gamma(), None);
    }

    #[test]
    fn vector_like_params_get_base_lr_and_no_decay_under_every_rule() {
        for p in Preset::ALL {
            let r = Rule::preset(p);
            assert_eq!(r.learning_rate(ParamClass::VectorLike, ETA, 8.0), ETA, "{p}");
            assert_eq!(r.weight_decay(ParamClass::VectorLike, LAMBDA, 8.0), 0.0, "{p}");
        }
    }

    #[test]
    fn custom_exponents_parse_and_apply() {
        let r = Rule::parse("gamma=0.6,lr_exponent=0.5").unwrap();
        assert_eq!(r.preset, Preset::Custom);
        assert!((r.weight_decay(ParamClass::MatrixLike, 1.0, 4.0) - 4f64.powf(0.6)).abs() < 1e-12);
        assert!((r.learning_rate(ParamClass::MatrixLike, 1.0, 4.0) - 0.5).abs() < 1e-12);
        assert_eq!(Rule::parse("paper").unwrap(), Rule::default());
    }

    #[test]
    fn an_unknown_rule_name_is_an_error_that_lists_the_presets() {
        let e = Rule::parse("mup").unwrap_err();
        assert!(e.to_string().contains("`mup`") && e.to_string().contains("mup-coupled"), "{e}");
        assert!(Rule::parse("gamma=nan").is_err());
    }
}
