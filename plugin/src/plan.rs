//! The per-parameter decision: class, width multiplier, learning rate and weight decay.
//!
//! A [`ScalingPlan`] is built once, before training, from the model's parameter shapes, the base
//! shapes, the overrides and the [`Rule`]. It is printable as a table and as JSON, so that nobody has
//! to guess what was applied.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::classify::{classify, BaseShapes, ClassifyError, Override, Overrides, ParamClass};
use crate::rule::Rule;

/// One parameter to plan for. `storage` identifies the underlying tensor storage: parameters that share
/// one (tied weights) are scaled and stepped once, under the first name.
#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub storage: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamDecision {
    pub name: String,
    pub shape: Vec<i64>,
    pub base_shape: Vec<i64>,
    pub class: ParamClass,
    pub layer: Option<u32>,
    pub fan_in_dim: Option<usize>,
    pub width_multiplier: f64,
    /// Width-scaled base learning rate (before any schedule).
    pub lr: f64,
    /// Width-scaled base weight decay (before any schedule).
    pub weight_decay: f64,
    /// The name this parameter is tied to; a tied alias is not stepped on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tied_to: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Params(Vec<ClassifyError>),
    #[error(transparent)]
    Pattern(ClassifyError),
    #[error("base {name} = {value} must be finite and >= 0")]
    BadHyper { name: &'static str, value: f64 },
    #[error("all {0} parameters have exactly their base shapes, so no dimension is a width dimension: nothing would be matrix-like and nothing would decay. Give delta shapes (the same model at another width: `BaseShapes::from_var_stores(base, delta)`, or a `{{\"base\": ..., \"delta\": ...}}` file) so the width dimensions are known")]
    NoWidthDims(usize),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScalingPlan {
    pub rule: Rule,
    /// The proxy's tuned learning rate `eta`.
    pub base_lr: f64,
    /// The proxy's tuned weight decay `lambda`.
    pub base_weight_decay: f64,
    pub decisions: Vec<ParamDecision>,
}

impl ScalingPlan {
    /// Classifies every parameter and applies the rule. Every parameter's error is reported, not just
    /// the first, so a user fixes a base-shapes file in one go.
    pub fn build(
        params: &[ParamSpec],
        base: &BaseShapes,
        overrides: &[Override],
        rule: Rule,
        base_lr: f64,
        base_weight_decay: f64,
    ) -> Result<ScalingPlan, PlanError> {
        for (name, value) in [("lr", base_lr), ("weight decay", base_weight_decay)] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(PlanError::BadHyper { name, value });
            }
        }
        let overrides = Overrides::new(overrides).map_err(PlanError::Pattern)?;
        let mut first_of_storage: BTreeMap<usize, String> = BTreeMap::new();
        let mut errors = Vec::new();
        let mut decisions = Vec::with_capacity(params.len());
        for p in params {
            let c = match classify(&p.name, &p.shape, base, &overrides) {
                Ok(c) => c,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let tied_to = p.storage.and_then(|s| match first_of_storage.get(&s) {
                Some(first) => Some(first.clone()),
                None => {
                    first_of_storage.insert(s, p.name.clone());
                    None
                }
            });
            let lambda = c.weight_decay_override.unwrap_or(base_weight_decay);
            let weight_decay = match (c.class, c.weight_decay_override) {
                // An explicit per-parameter decay on a vector-like param is taken as given.
                (ParamClass::VectorLike, Some(wd)) => wd,
                _ => rule.weight_decay_for(&c.name, &c.shape, c.class, lambda, c.width_multiplier),
            } * c.wd_multiplier;
            decisions.push(ParamDecision {
                lr: rule.learning_rate(c.class, base_lr, c.width_multiplier) * c.lr_multiplier,
                weight_decay,
                name: c.name,
                shape: c.shape,
                base_shape: c.base_shape,
                class: c.class,
                layer: c.layer,
                fan_in_dim: c.fan_in_dim,
                width_multiplier: c.width_multiplier,
                tied_to,
            });
        }
        if !errors.is_empty() {
            return Err(PlanError::Params(errors));
        }
        let no_width_dims = decisions.iter().all(|d| d.shape == d.base_shape);
        let none_matrix_like = decisions.iter().all(|d| d.class != ParamClass::MatrixLike);
        if base.delta.is_none() && !decisions.is_empty() && no_width_dims && none_matrix_like {
            return Err(PlanError::NoWidthDims(decisions.len()));
        }
        Ok(ScalingPlan { rule, base_lr, base_weight_decay, decisions })
    }

    pub fn get(&self, name: &str) -> Option<&ParamDecision> {
        self.decisions.iter().find(|d| d.name == name)
    }

    /// The decisions as a JSON array (one object per parameter).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.decisions).expect("decisions serialize")
    }

    /// The decisions as a table for people: parameter, shape, class, m, lr, wd.
    pub fn to_table(&self) -> String {
        let shape = |s: &[i64]| format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "));
        let rows: Vec<[String; 6]> = self
            .decisions
            .iter()
            .map(|d| {
                let class = match &d.tied_to {
                    Some(t) => format!("tied to {t}"),
                    None => d.class.as_str().to_string(),
                };
                [d.name.clone(), shape(&d.shape), class, format!("{:.4}", d.width_multiplier), format!("{:.4e}", d.lr), format!("{:.4e}", d.weight_decay)]
            })
            .collect();
        let header = ["parameter", "shape", "class", "m", "lr", "wd"];
        let mut widths = header.map(|h| h.len());
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let _ = writeln!(out, "rule: {}   base lr: {:e}   base wd: {:e}", self.rule, self.base_lr, self.base_weight_decay);
        let line = |cells: &[String]| {
            cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string()
        };
        let _ = writeln!(out, "{}", line(&header.map(String::from)));
        let _ = writeln!(out, "{}", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
        for r in &rows {
            let _ = writeln!(out, "{}", line(r));
        }
        let matrix = self.decisions.iter().filter(|d| d.class == ParamClass::MatrixLike && d.tied_to.is_none()).count();
        let _ = writeln!(out, "{} parameters: {} matrix-like, {} vector-like", self.decisions.len(), matrix, self.decisions.len() - matrix);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::Preset;

    fn spec(name: &str, shape: &[i64]) -> ParamSpec {
        ParamSpec { name: name.into(), shape: shape.to_vec(), storage: None }
    }

    fn base() -> BaseShapes {
        BaseShapes::from_json_str(r#"{"emb": [100, 64], "blocks.0.w": [256, 64], "norm": [64], "head": [100, 64]}"#, "t").unwrap()
    }

    #[test]
    fn plan_applies_the_rule_per_class() {
        let p = ScalingPlan::build(
            &[spec("emb", &[100, 256]), spec("blocks.0.w", &[1024, 256]), spec("norm", &[256])],
            &base(),
            &[],
            Rule::preset(Preset::Paper),
            1e-2,
            0.1,
        )
        .unwrap();
        let w = p.get("blocks.0.w").unwrap();
        assert_eq!(w.class, ParamClass::MatrixLike);
        assert!((w.lr - 1e-2 / 4.0).abs() < 1e-15 && (w.weight_decay - 0.1 * 2.0).abs() < 1e-15);
        let e = p.get("emb").unwrap();
        assert_eq!((e.lr, e.weight_decay), (1e-2, 0.0));
        assert!(p.to_table().contains("blocks.0.w"));
        let json: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
        assert_eq!(json[1]["class"], "matrix_like");
        assert_eq!(json[1]["width_multiplier"], 4.0);
    }

    #[test]
    fn every_bad_param_is_reported_not_just_the_first() {
        let e = ScalingPlan::build(&[spec("x", &[1]), spec("y", &[2])], &base(), &[], Rule::default(), 1e-3, 0.0).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("`x`") && s.contains("`y`"), "{s}");
    }

    #[test]
    fn tied_params_are_scaled_once_under_the_first_name() {
        let params = [
            ParamSpec { name: "emb".into(), shape: vec![100, 256], storage: Some(7) },
            ParamSpec { name: "head".into(), shape: vec![100, 256], storage: Some(7) },
        ];
        let p = ScalingPlan::build(&params, &base(), &[], Rule::default(), 1e-3, 0.1).unwrap();
        assert_eq!(p.get("emb").unwrap().tied_to, None);
        assert_eq!(p.get("head").unwrap().tied_to.as_deref(), Some("emb"));
        assert!(p.to_table().contains("tied to emb"));
    }

    #[test]
    fn an_override_can_give_a_vector_like_param_decay() {
        let o = Override { weight_decay: Some(0.01), ..Override::new("norm") };
        let p = ScalingPlan::build(&[spec("norm", &[256])], &base(), &[o], Rule::default(), 1e-3, 0.1).unwrap();
        assert_eq!(p.get("norm").unwrap().weight_decay, 0.01);
    }

    #[test]
    fn a_model_identical_to_its_base_without_delta_shapes_is_refused_not_silently_undecayed() {
        let e = ScalingPlan::build(&[spec("blocks.0.w", &[256, 64])], &base(), &[], Rule::default(), 1e-3, 0.1).unwrap_err();
        assert!(e.to_string().contains("delta shapes"), "{e}");
    }

    #[test]
    fn a_negative_or_nan_base_hyperparameter_is_rejected() {
        assert!(ScalingPlan::build(&[], &base(), &[], Rule::default(), f64::NAN, 0.1).is_err());
        assert!(ScalingPlan::build(&[], &base(), &[], Rule::default(), 1e-3, -1.0).is_err());
    }
}
