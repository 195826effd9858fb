//! The per-parameter decision: class, width multiplier, learning rate and weight decay.
//!
//! A [`ScalingPlan`] is built once, before training, from the model's parameter shapes, the base
//! shapes, the overrides and the [`Rule`]. It is printable as a table and as JSON, so that nobody has
//! to guess what was applied.
//!
//! Nothing named is ignored: a name in the base or delta shapes that is no parameter, an override pattern
//! that matches nothing (unless it says `may_match_nothing`), and every parameter that cannot be classified
//! are reported together in one [`PlanError::Params`]. Two traps that would silently switch weight decay off
//! are refused: a model with no width dimension at all ([`PlanError::NoWidthDims`]), and hidden matrices
//! without one in a model where other parameters have one ([`ClassifyError::HiddenWithoutWidth`]).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::classify::{classify, BaseShapes, ClassifyError, Override, Overrides, ParamClass, ParamRole, ParamWarning};
use crate::rule::{Preset, Rule};

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
    /// The width dimensions found by the shape test or declared by an override.
    #[serde(default)]
    pub width_dims: Vec<usize>,
    /// The role an override declared (`readout`, `embedding`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<ParamRole>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Params(Vec<ClassifyError>),
    #[error(transparent)]
    Pattern(ClassifyError),
    #[error("base {name} = {value} must be finite and >= 0")]
    BadHyper { name: &'static str, value: f64 },
    #[error("none of the {0} parameters has a width dimension ({1}): nothing would be matrix-like and nothing would decay. Give delta shapes (the same model at another width: `BaseShapes::from_var_stores(base, delta)`, or a `{{\"base\": ..., \"delta\": ...}}` file) so the width dimensions are known, or declare the hidden matrices with overrides (\"class\": \"matrix_like\")")]
    NoWidthDims(usize, &'static str),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScalingPlan {
    pub rule: Rule,
    /// The proxy's tuned learning rate `eta`.
    pub base_lr: f64,
    /// The proxy's tuned weight decay `lambda`.
    pub base_weight_decay: f64,
    pub decisions: Vec<ParamDecision>,
    /// What the plan accepts but a person should look at (possible undeclared readouts, uneven width
    /// ratios); shown in the table and in [`to_json`](Self::to_json). Not part of the decisions, so an
    /// optimizer checkpoint compares only what is applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<ParamWarning>,
}

impl ScalingPlan {
    /// Classifies every parameter and applies the rule. Every problem is reported, not just the first, so
    /// a user fixes a base-shapes file and the overrides in one go.
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
        let mut warnings = Vec::new();
        let mut declared = Vec::with_capacity(params.len());
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
            if tied_to.is_none() {
                warnings.extend(c.warnings);
            }
            declared.push(c.declared);
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
                width_dims: c.width_dims,
                role: c.role,
            });
        }
        errors.extend(names_used_nowhere(params, base, &overrides));
        if !errors.is_empty() {
            return Err(PlanError::Params(errors));
        }
        refuse_width_traps(&decisions, &declared, base)?;
        Ok(ScalingPlan { rule, base_lr, base_weight_decay, decisions, warnings })
    }

    pub fn get(&self, name: &str) -> Option<&ParamDecision> {
        self.decisions.iter().find(|d| d.name == name)
    }

    /// The warnings about the parameter `name`.
    pub fn warnings_for<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a ParamWarning> + 'a {
        self.warnings.iter().filter(move |w| w.param == name)
    }

    /// The decisions as a JSON array, one object per parameter: the [`ParamDecision`] fields and
    /// `warnings`, a list of `{"kind", "message"}` objects (empty when there is nothing to look at).
    pub fn to_json(&self) -> String {
        let rows: Vec<serde_json::Value> = self
            .decisions
            .iter()
            .map(|d| {
                let mut row = serde_json::to_value(d).expect("decisions serialize");
                let warnings: Vec<serde_json::Value> =
                    self.warnings_for(&d.name).map(|w| serde_json::json!({ "kind": w.kind, "message": w.message })).collect();
                row["warnings"] = serde_json::Value::Array(warnings);
                row
            })
            .collect();
        serde_json::to_string_pretty(&rows).expect("JSON values serialize")
    }

    /// The decisions as a table for people: parameter, shape, class, m, lr, wd, and a warning column
    /// (with the warnings in full below the table) when a parameter has one.
    pub fn to_table(&self) -> String {
        let shape = |s: &[i64]| format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "));
        let rows: Vec<[String; 7]> = self
            .decisions
            .iter()
            .map(|d| {
                let class = match (&d.tied_to, d.role) {
                    (Some(t), _) => format!("tied to {t}"),
                    (None, Some(role)) => format!("{} ({})", d.class.as_str(), role.as_str()),
                    (None, None) => d.class.as_str().to_string(),
                };
                let warning = self.warnings_for(&d.name).map(|w| w.kind.as_str()).collect::<Vec<_>>().join(", ");
                [
                    d.name.clone(),
                    shape(&d.shape),
                    class,
                    format!("{:.4}", d.width_multiplier),
                    format!("{:.4e}", d.lr),
                    format!("{:.4e}", d.weight_decay),
                    warning,
                ]
            })
            .collect();
        let columns = if self.warnings.is_empty() { 6 } else { 7 };
        let header = ["parameter", "shape", "class", "m", "lr", "wd", "warning"];
        let mut widths = header.map(|h| h.len());
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let _ = writeln!(out, "rule: {}   base lr: {:e}   base wd: {:e}", self.rule, self.base_lr, self.base_weight_decay);
        let line = |cells: &[String]| {
            cells[..columns]
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        let _ = writeln!(out, "{}", line(&header.map(String::from)));
        let _ = writeln!(out, "{}", widths[..columns].iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
        for r in &rows {
            let _ = writeln!(out, "{}", line(r));
        }
        let matrix = self.decisions.iter().filter(|d| d.class == ParamClass::MatrixLike && d.tied_to.is_none()).count();
        let _ = writeln!(out, "{} parameters: {} matrix-like, {} vector-like", self.decisions.len(), matrix, self.decisions.len() - matrix);
        if self.rule.preset == Preset::MupFixedWd {
            let _ = writeln!(out, "Adam's eps: the base eps / m on matrix-like parameters (Megatron-LM's mup), the base eps elsewhere");
        }
        for w in &self.warnings {
            let _ = writeln!(out, "warning ({}): {}", w.kind.as_str(), w.message);
        }
        out
    }
}

/// The errors for names given but used by no parameter: base or delta shapes of parameters the model does not
/// have, and override patterns that match nothing (unless they say they may).
fn names_used_nowhere(params: &[ParamSpec], base: &BaseShapes, overrides: &Overrides) -> Vec<ClassifyError> {
    let mut errors = Vec::new();
    let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
    let known: std::collections::BTreeSet<&str> = names.iter().copied().collect();
    let shape_maps = [("base", Some(&base.base)), ("delta", base.delta.as_ref())];
    for (which, map) in shape_maps {
        let unused: Vec<String> = map.into_iter().flat_map(|m| m.keys()).filter(|n| !known.contains(n.as_str())).cloned().collect();
        if !unused.is_empty() {
            errors.push(ClassifyError::UnusedShapes { which, names: unused });
        }
    }
    let unmatched = overrides.unmatched(&names);
    if !unmatched.is_empty() {
        errors.push(ClassifyError::UnmatchedPatterns { patterns: unmatched.into_iter().map(String::from).collect() });
    }
    errors
}

/// Refuses the two ways a plan would silently give hidden matrices base lr and no decay: some parameters
/// have width dimensions but an undeclared matrix has none (the partial-width trap), or nothing has any.
fn refuse_width_traps(decisions: &[ParamDecision], declared: &[bool], base: &BaseShapes) -> Result<(), PlanError> {
    // With some width dims found, a matrix without one is more likely a shape test that could not see its
    // widths (base = target there) than a fixed-size matrix.
    let stepped = || decisions.iter().zip(declared).filter(|(d, _)| d.tied_to.is_none());
    let any_width = stepped().any(|(d, _)| !d.width_dims.is_empty());
    let hidden: Vec<(String, Vec<i64>)> = stepped()
        .filter(|(d, declared)| !**declared && d.shape.len() >= 2 && d.width_dims.is_empty())
        .map(|(d, _)| (d.name.clone(), d.shape.clone()))
        .collect();
    if any_width && !hidden.is_empty() {
        return Err(PlanError::Params(vec![ClassifyError::HiddenWithoutWidth { params: hidden }]));
    }
    let none_matrix_like = decisions.iter().all(|d| d.class != ParamClass::MatrixLike);
    if !decisions.is_empty() && !any_width && none_matrix_like && !declared.iter().all(|d| *d) {
        let why = if base.delta.is_some() { "the base and delta shapes are equal" } else { "every shape equals its base shape" };
        return Err(PlanError::NoWidthDims(decisions.len(), why));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::WarningKind;
    use crate::rule::Preset;

    fn spec(name: &str, shape: &[i64]) -> ParamSpec {
        ParamSpec { name: name.into(), shape: shape.to_vec(), storage: None }
    }

    /// Base shapes of `names`, out of one small model's.
    fn base(names: &[&str]) -> BaseShapes {
        let all = BaseShapes::from_json_str(r#"{"emb": [100, 64], "blocks.0.w": [256, 64], "norm": [64], "head": [100, 64]}"#, "t").unwrap();
        BaseShapes::new(all.base.into_iter().filter(|(n, _)| names.contains(&n.as_str())).collect())
    }

    fn build(params: &[ParamSpec], base: &BaseShapes, overrides: &[Override]) -> Result<ScalingPlan, PlanError> {
        ScalingPlan::build(params, base, overrides, Rule::default(), 1e-3, 0.1)
    }

    #[test]
    fn plan_applies_the_rule_per_class() {
        let p = ScalingPlan::build(
            &[spec("emb", &[100, 256]), spec("blocks.0.w", &[1024, 256]), spec("norm", &[256])],
            &base(&["emb", "blocks.0.w", "norm"]),
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
        assert_eq!(json[1]["width_dims"], serde_json::json!([0, 1]));
    }

    #[test]
    fn every_bad_param_and_every_unused_base_name_is_reported_at_once() {
        let e = build(&[spec("x", &[1]), spec("y", &[2])], &base(&["emb", "norm"]), &[]).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("`x`") && s.contains("`y`"), "{s}");
        assert!(s.contains("base shapes name 2 parameter(s) that the model does not have: `emb`, `norm`"), "{s}");
    }

    #[test]
    fn a_typo_in_the_delta_names_both_the_parameter_it_misses_and_the_name_nothing_has() {
        // Before: `w` silently had no width dimension at the proxy width, so it was vector-like and undecayed.
        let b = BaseShapes::from_json_str(r#"{"base": {"w": [64, 64], "g": [64]}, "delta": {"wq": [128, 128], "g": [128]}}"#, "t").unwrap();
        let s = build(&[spec("w", &[64, 64]), spec("g", &[64])], &b, &[]).unwrap_err().to_string();
        assert!(s.contains("`w`") && s.contains("missing in the delta"), "{s}");
        assert!(s.contains("delta shapes name 1 parameter(s) that the model does not have: `wq`"), "{s}");
    }

    #[test]
    fn override_patterns_that_match_nothing_are_errors_unless_they_say_so() {
        let b = base(&["norm"]);
        let typos = [Override { lr_multiplier: Some(2.0), ..Override::new("nrom") }, Override::new("blocks.*"), Override::new("norm")];
        let s = build(&[spec("norm", &[256])], &b, &typos).unwrap_err().to_string();
        assert!(s.contains("match no parameter: `nrom`, `blocks.*`") && s.contains("may_match_nothing"), "{s}");
        let optional = [Override { may_match_nothing: true, ..Override::new("blocks.*") }];
        assert!(build(&[spec("norm", &[256])], &b, &optional).is_ok());
    }

    #[test]
    fn tied_params_are_scaled_once_under_the_first_name() {
        let params = [
            ParamSpec { name: "emb".into(), shape: vec![100, 256], storage: Some(7) },
            ParamSpec { name: "head".into(), shape: vec![100, 256], storage: Some(7) },
        ];
        let p = build(&params, &base(&["emb", "head"]), &[]).unwrap();
        assert_eq!(p.get("emb").unwrap().tied_to, None);
        assert_eq!(p.get("head").unwrap().tied_to.as_deref(), Some("emb"));
        assert!(p.to_table().contains("tied to emb"));
        // One tensor, one warning, under the name that is stepped.
        assert_eq!(p.warnings.iter().map(|w| w.param.as_str()).collect::<Vec<_>>(), vec!["emb"]);
    }

    #[test]
    fn an_override_can_give_a_vector_like_param_decay() {
        let o = Override { weight_decay: Some(0.01), ..Override::new("norm") };
        let p = build(&[spec("norm", &[256])], &base(&["norm"]), &[o]).unwrap();
        assert_eq!(p.get("norm").unwrap().weight_decay, 0.01);
    }

    #[test]
    fn a_model_identical_to_its_base_without_delta_shapes_is_refused_not_silently_undecayed() {
        let e = build(&[spec("blocks.0.w", &[256, 64])], &base(&["blocks.0.w"]), &[]).unwrap_err();
        assert!(e.to_string().contains("delta shapes") && e.to_string().contains("every shape equals its base"), "{e}");
        let same = BaseShapes::from_json_str(r#"{"base": {"w": [64, 64]}, "delta": {"w": [64, 64]}}"#, "t").unwrap();
        let e = build(&[spec("w", &[64, 64])], &same, &[]).unwrap_err();
        assert!(e.to_string().contains("base and delta shapes are equal"), "{e}");
    }

    /// A model whose base differs from it only in the vocabulary (8 → 10 tokens), at d = 64.
    fn vocabulary_only() -> (Vec<ParamSpec>, BaseShapes) {
        let params = vec![
            spec("tok_emb.weight", &[10, 64]),
            spec("blocks.0.attn.q.weight", &[64, 64]),
            spec("blocks.0.mlp.up.weight", &[256, 64]),
            spec("norm.weight", &[64]),
            spec("lm_head.weight", &[10, 64]),
        ];
        let base = BaseShapes::from_json_str(
            r#"{"tok_emb.weight": [8, 64], "blocks.0.attn.q.weight": [64, 64], "blocks.0.mlp.up.weight": [256, 64], "norm.weight": [64], "lm_head.weight": [8, 64]}"#,
            "t",
        )
        .unwrap();
        (params, base)
    }

    #[test]
    fn a_base_that_differs_only_in_vocabulary_is_refused_naming_every_hidden_matrix_and_both_fixes() {
        let (params, base) = vocabulary_only();
        let s = build(&params, &base, &[]).unwrap_err().to_string();
        assert!(s.contains("2 parameter(s) of rank >= 2 have no width dimension"), "{s}");
        assert!(s.contains("`blocks.0.attn.q.weight` [64, 64]") && s.contains("`blocks.0.mlp.up.weight` [256, 64]"), "{s}");
        assert!(!s.contains("`tok_emb.weight`") && !s.contains("`lm_head.weight`") && !s.contains("`norm.weight`"), "{s}");
        assert!(s.contains("no weight decay"), "{s}");
        assert!(s.contains("delta shapes") && s.contains("\"class\": \"matrix_like\"") && s.contains("\"fixed_size\": true"), "{s}");
    }

    #[test]
    fn a_hidden_matrix_marked_fixed_size_on_purpose_is_accepted_and_the_other_still_refused() {
        let (params, base) = vocabulary_only();
        let fixed = Override { fixed_size: Some(true), ..Override::new("blocks.0.attn.q.weight") };
        let s = build(&params, &base, &[fixed.clone()]).unwrap_err().to_string();
        assert!(s.contains("1 parameter(s)") && s.contains("`blocks.0.mlp.up.weight`") && !s.contains("`blocks.0.attn.q.weight`"), "{s}");
        let declared = Override { class: Some(ParamClass::MatrixLike), ..Override::new("blocks.0.mlp.up.weight") };
        let p = build(&params, &base, &[fixed, declared]).unwrap();
        let q = p.get("blocks.0.attn.q.weight").unwrap();
        assert_eq!((q.class, q.lr, q.weight_decay), (ParamClass::VectorLike, 1e-3, 0.0));
        let up = p.get("blocks.0.mlp.up.weight").unwrap();
        assert_eq!((up.class, up.width_multiplier, up.lr, up.weight_decay), (ParamClass::MatrixLike, 1.0, 1e-3, 0.1));
        // Both marked fixed-size on purpose by one pattern: the plan builds, and says what they get.
        let p = build(&params, &base, &[Override { fixed_size: Some(true), ..Override::new("blocks.*") }]).unwrap();
        for name in ["blocks.0.attn.q.weight", "blocks.0.mlp.up.weight"] {
            let d = p.get(name).unwrap();
            assert_eq!((d.class, d.width_dims.as_slice(), d.lr, d.weight_decay), (ParamClass::VectorLike, &[][..], 1e-3, 0.0), "{name}");
        }
    }

    #[test]
    fn only_the_mup_fixed_wd_table_says_that_adams_eps_is_divided_by_m() {
        let params = [spec("blocks.0.w", &[1024, 256]), spec("norm", &[256])];
        let b = base(&["blocks.0.w", "norm"]);
        for preset in [Preset::Paper, Preset::MupCoupled, Preset::MupFixedWd, Preset::Standard] {
            let table = ScalingPlan::build(&params, &b, &[], Rule::preset(preset), 1e-3, 0.1).unwrap().to_table();
            assert_eq!(table.contains("eps / m"), preset == Preset::MupFixedWd, "{preset}: {table}");
        }
    }

    #[test]
    fn an_undeclared_readout_is_flagged_in_the_table_and_the_json_and_a_declared_one_is_not() {
        let b = base(&["blocks.0.w", "head"]);
        let params = [spec("blocks.0.w", &[1024, 256]), spec("head", &[100, 256])];
        let p = build(&params, &b, &[]).unwrap();
        assert_eq!(p.warnings.len(), 1);
        assert_eq!((p.warnings[0].param.as_str(), p.warnings[0].kind), ("head", WarningKind::PossibleReadout));
        let table = p.to_table();
        let head_row = table.lines().find(|l| l.starts_with("head")).unwrap();
        assert!(table.lines().nth(1).unwrap().ends_with("warning") && head_row.ends_with("possible_readout"), "{table}");
        assert!(table.contains("warning (possible_readout): `head`"), "{table}");
        let json: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
        assert_eq!(json[1]["warnings"][0]["kind"], "possible_readout");
        assert_eq!(json[0]["warnings"], serde_json::json!([]));
        let declared = Override { role: Some(ParamRole::Readout), ..Override::new("head") };
        let p = build(&params, &b, &[declared]).unwrap();
        assert!(p.warnings.is_empty() && !p.to_table().contains("warning"));
        assert!(p.to_table().contains("vector_like (readout)"));
    }

    #[test]
    fn a_plan_with_the_new_fields_round_trips_through_json_as_a_checkpoint_stores_it() {
        let b = base(&["blocks.0.w", "head", "emb"]);
        let params = [spec("blocks.0.w", &[1024, 256]), spec("head", &[100, 256]), spec("emb", &[100, 256])];
        let p = build(&params, &b, &[Override { role: Some(ParamRole::Embedding), ..Override::new("emb") }]).unwrap();
        assert!(!p.warnings.is_empty() && p.get("emb").unwrap().role.is_some());
        let again: ScalingPlan = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(again, p);
        // A plan stored before these fields existed still reads (with none of them).
        let mut old = serde_json::to_value(&p).unwrap();
        old.as_object_mut().unwrap().remove("warnings");
        for d in old["decisions"].as_array_mut().unwrap() {
            d.as_object_mut().unwrap().retain(|k, _| k != "width_dims" && k != "role");
        }
        let read: ScalingPlan = serde_json::from_value(old).unwrap();
        assert_eq!(read.decisions.len(), 3);
    }

    #[test]
    fn a_negative_or_nan_base_hyperparameter_is_rejected() {
        assert!(ScalingPlan::build(&[], &base(&[]), &[], Rule::default(), f64::NAN, 0.1).is_err());
        assert!(ScalingPlan::build(&[], &base(&[]), &[], Rule::default(), 1e-3, -1.0).is_err());
    }
}
