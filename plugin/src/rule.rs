//! The width-scaling rule: how a parameter's learning rate, weight decay and Adam epsilon follow its width.
//!
//! Fan, Liu, Zhao, Yuan, Gu, "Robust Layerwise Scaling Rules by Proper Weight Decay Tuning",
//! arXiv 2510.15262 (2025). Under AdamW the top singular value of a hidden matrix settles at
//! `sigma_max ≈ c · sqrt(eta/lambda) · d^alpha` with `alpha ≈ 0.75`. μP already takes `eta ∝ 1/m`;
//! taking `lambda ∝ m^gamma` with `gamma = 2·alpha − 1 = 0.5` keeps `sigma_max` width-invariant, so the
//! proxy's tuned `(eta, lambda)` transfer.
//!
//! Each preset reproduces the parameter groups of the code it is named after (README, "The rule"):
//!
//! | preset         | matrix-like                      | vector-like                                           |
//! |----------------|----------------------------------|-------------------------------------------------------|
//! | `paper`        | `eta/m`, `lambda·m^0.5`          | `eta`, `0`                                            |
//! | `mup-coupled`  | `eta/m`, `lambda·m`              | `eta`, `lambda` (microsoft/mup `MuAdam`)              |
//! | `mup-fixed-wd` | `eta/m`, `lambda`, eps `eps/m`   | `eta`, `lambda`; `0` for rank ≤ 1 or `*.bias` (Megatron-LM) |
//! | `standard`     | `eta`, `lambda`                  | `eta`, `lambda` (plain `torch.optim.AdamW`)           |
//! | custom         | `eta·m^(−lr_exponent)`, `lambda·m^gamma` | `eta`, `0` (as `paper`)                       |

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::classify::ParamClass;

/// A named choice of exponents. `Custom` carries its own.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// arXiv 2510.15262: matrix-like lr ∝ 1/m, wd ∝ m^0.5; vector-like base lr, no decay (the paper's choice).
    Paper,
    /// microsoft/mup `MuAdamW` (`mup/optim.py`, `MuAdam`): matrix-like lr ∝ 1/m, wd ∝ m (eta·lambda constant);
    /// vector-like base lr and base wd (MuAdam only rescales the matrix-like groups).
    MupCoupled,
    /// NVIDIA Megatron-LM's muP for Adam (`megatron/core/optimizer/__init__.py`, `get_mup_config_overrides`
    /// with `get_standard_config_overrides`): matrix-like lr and eps ∝ 1/m, wd unchanged; vector-like base lr
    /// and eps, base wd except rank ≤ 1 and `*.bias` parameters, which get none.
    MupFixedWd,
    /// Standard parameterization, plain `torch.optim.AdamW(model.parameters(), lr, weight_decay)`: every
    /// parameter gets the base lr and the base wd.
    Standard,
    /// User-chosen `gamma` and `lr_exponent`.
    Custom,
}

impl Preset {
    pub const ALL: [Preset; 4] = [Preset::Paper, Preset::MupCoupled, Preset::MupFixedWd, Preset::Standard];

    /// This preset's row of [`PRESETS`].
    fn row(self) -> &'static PresetRow {
        PRESETS.iter().find(|r| r.preset == self).expect("every preset has a row in PRESETS")
    }

    pub fn name(&self) -> &'static str {
        self.row().name
    }
}

/// How one of a parameter's settings follows the width multiplier `m`, from its base value `x`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Scale {
    /// `x`.
    Base,
    /// `0`.
    Zero,
    /// By the rule's exponent: `eta · m^(−lr_exponent)` for the learning rate, `lambda · m^gamma` for weight decay.
    Exponent,
    /// `x / m`.
    InverseWidth,
}

/// What a preset gives one class of parameters.
#[derive(Clone, Copy, Debug)]
struct ClassRow {
    lr: Scale,
    weight_decay: Scale,
    eps: Scale,
}

/// One preset: its name, its default exponents, what each class gets, and whether rank ≤ 1 and `*.bias`
/// parameters go undecayed whatever their class (Megatron-LM's `get_standard_config_overrides`:
/// `wd_mult = 0` for `len(param.shape) == 1` or `fnmatch(name, "*.bias")`).
#[derive(Clone, Copy, Debug)]
struct PresetRow {
    preset: Preset,
    name: &'static str,
    gamma: f64,
    lr_exponent: f64,
    matrix: ClassRow,
    vector: ClassRow,
    no_decay_for_rank1_and_bias: bool,
}

const fn class(lr: Scale, weight_decay: Scale, eps: Scale) -> ClassRow {
    ClassRow { lr, weight_decay, eps }
}

/// The presets, as the module docs' table lays them out: every function of [`Rule`] reads this.
const PRESETS: [PresetRow; 5] = {
    use Scale::{Base, Exponent, InverseWidth, Zero};
    [
        PresetRow {
            preset: Preset::Paper,
            name: "paper",
            gamma: 0.5,
            lr_exponent: 1.0,
            matrix: class(Exponent, Exponent, Base),
            vector: class(Base, Zero, Base),
            no_decay_for_rank1_and_bias: false,
        },
        PresetRow {
            preset: Preset::MupCoupled,
            name: "mup-coupled",
            gamma: 1.0,
            lr_exponent: 1.0,
            matrix: class(Exponent, Exponent, Base),
            vector: class(Base, Base, Base),
            no_decay_for_rank1_and_bias: false,
        },
        PresetRow {
            preset: Preset::MupFixedWd,
            name: "mup-fixed-wd",
            gamma: 0.0,
            lr_exponent: 1.0,
            // Megatron-LM's get_mup_config_overrides scales the hidden layers' adam_eps by 1/mup_width_mult
            // ("MuP Appendix B.3").
            matrix: class(Exponent, Exponent, InverseWidth),
            vector: class(Base, Base, Base),
            no_decay_for_rank1_and_bias: true,
        },
        PresetRow {
            preset: Preset::Standard,
            name: "standard",
            gamma: 0.0,
            lr_exponent: 0.0,
            matrix: class(Exponent, Exponent, Base),
            vector: class(Base, Base, Base),
            no_decay_for_rank1_and_bias: false,
        },
        PresetRow {
            preset: Preset::Custom,
            name: "custom",
            gamma: 0.5,
            lr_exponent: 1.0,
            matrix: class(Exponent, Exponent, Base),
            vector: class(Base, Zero, Base),
            no_decay_for_rank1_and_bias: false,
        },
    ]
};

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RuleError {
    #[error("unknown rule `{0}`: expected one of paper, mup-coupled, mup-fixed-wd, standard, or gamma=G[,lr_exponent=E]")]
    UnknownPreset(String),
    #[error("rule exponent `{name}` = {value} is not finite")]
    NonFinite { name: &'static str, value: f64 },
}

impl FromStr for Preset {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PRESETS.iter().find(|r| r.name == s).map(|r| r.preset).ok_or_else(|| RuleError::UnknownPreset(s.to_string()))
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
    /// A preset with its exponents (a custom rule's default ones: the paper's).
    pub fn preset(preset: Preset) -> Rule {
        let row = preset.row();
        Rule { preset, gamma: row.gamma, lr_exponent: row.lr_exponent }
    }

    /// The row of [`PRESETS`] for parameters of `class`.
    fn class_row(&self, class: ParamClass) -> ClassRow {
        let row = self.preset.row();
        match class {
            ParamClass::MatrixLike => row.matrix,
            ParamClass::VectorLike => row.vector,
        }
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
        self.class_row(class).lr.apply(eta, m, -self.lr_exponent)
    }

    /// Weight decay of parameter `name` of shape `shape` and `class`, with width multiplier `m`, from the base
    /// `lambda`.
    ///
    /// Matrix-like: `lambda · m^gamma` (arXiv 2510.15262: gamma = 0.5). Vector-like: `0` under `paper` and
    /// custom rules, `lambda` under `mup-coupled` and `standard`. `mup-fixed-wd` follows Megatron-LM, which
    /// takes no decay for any parameter of rank 1 or named `*.bias` (`get_standard_config_overrides`:
    /// `wd_mult = 0` for `len(param.shape) == 1` or `fnmatch(name, "*.bias")`) and `lambda` for the rest.
    pub fn weight_decay_for(&self, name: &str, shape: &[i64], class: ParamClass, lambda: f64, m: f64) -> f64 {
        if self.preset.row().no_decay_for_rank1_and_bias && (shape.len() <= 1 || name.ends_with(".bias")) {
            return 0.0;
        }
        self.weight_decay(class, lambda, m)
    }

    /// The weight decay the rule gives the class `class` with width multiplier `m`, from the base `lambda`:
    /// [`weight_decay_for`](Self::weight_decay_for) without the exception by name and rank, for callers that
    /// reason about classes rather than parameters.
    pub fn weight_decay(&self, class: ParamClass, lambda: f64, m: f64) -> f64 {
        self.class_row(class).weight_decay.apply(lambda, m, self.gamma)
    }

    /// Adam's epsilon of a parameter of `class` with width multiplier `m`, from the base `eps`: `eps / m` for
    /// matrix-like parameters under `mup-fixed-wd` (Megatron-LM's `get_mup_config_overrides` scales the hidden
    /// layers' `adam_eps` by `1 / mup_width_mult`, "MuP Appendix B.3"), `eps` everywhere else.
    pub fn eps(&self, class: ParamClass, eps: f64, m: f64) -> f64 {
        self.class_row(class).eps.apply(eps, m, 0.0)
    }
}

impl Scale {
    /// The setting of base value `x` at width multiplier `m`; `exponent` is the one [`Scale::Exponent`] takes.
    fn apply(self, x: f64, m: f64, exponent: f64) -> f64 {
        match self {
            Scale::Base => x,
            Scale::Zero => 0.0,
            Scale::Exponent => x * m.powf(exponent),
            Scale::InverseWidth => x / m,
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
    fn vector_like_params_get_the_base_lr_under_every_rule_and_the_decay_of_their_presets_namesake() {
        let vector = |p: Preset, name: &str, shape: &[i64]| {
            let r = Rule::preset(p);
            (r.learning_rate(ParamClass::VectorLike, ETA, 8.0), r.weight_decay_for(name, shape, ParamClass::VectorLike, LAMBDA, 8.0))
        };
        // The paper: no decay. MuAdam rescales only the matrix-like groups, so vector-like ones keep the base
        // wd; plain AdamW decays everything.
        assert_eq!(vector(Preset::Paper, "tok_emb.weight", &[100, 64]), (ETA, 0.0));
        assert_eq!(vector(Preset::Paper, "norm.weight", &[64]), (ETA, 0.0));
        for p in [Preset::MupCoupled, Preset::Standard] {
            assert_eq!(vector(p, "tok_emb.weight", &[100, 64]), (ETA, LAMBDA), "{p}");
            assert_eq!(vector(p, "norm.weight", &[64]), (ETA, LAMBDA), "{p}");
            assert_eq!(vector(p, "out.bias", &[100]), (ETA, LAMBDA), "{p}");
        }
        // Megatron-LM: embedding and output layer decay, rank-1 parameters and biases do not.
        assert_eq!(vector(Preset::MupFixedWd, "tok_emb.weight", &[100, 64]), (ETA, LAMBDA));
        assert_eq!(vector(Preset::MupFixedWd, "norm.weight", &[64]), (ETA, 0.0));
        assert_eq!(vector(Preset::MupFixedWd, "proj.bias", &[4, 64]), (ETA, 0.0));
    }

    #[test]
    fn only_megatrons_mup_scales_adams_epsilon_and_only_for_matrix_like_parameters() {
        for p in Preset::ALL {
            let r = Rule::preset(p);
            let expected = if p == Preset::MupFixedWd { 1e-8 / 4.0 } else { 1e-8 };
            assert_eq!(r.eps(ParamClass::MatrixLike, 1e-8, 4.0), expected, "{p}");
            assert_eq!(r.eps(ParamClass::VectorLike, 1e-8, 4.0), 1e-8, "{p}");
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
    fn every_preset_has_one_row_whose_name_parses_back_to_it() {
        for p in Preset::ALL.into_iter().chain([Preset::Custom]) {
            assert_eq!(PRESETS.iter().filter(|r| r.preset == p).count(), 1, "{p:?}");
            assert_eq!(p.name().parse::<Preset>(), Ok(p));
        }
    }

    #[test]
    fn an_unknown_rule_name_is_an_error_that_lists_the_presets() {
        let e = Rule::parse("mup").unwrap_err();
        assert!(e.to_string().contains("`mup`") && e.to_string().contains("mup-coupled"), "{e}");
        assert!(Rule::parse("gamma=nan").is_err());
    }
}
