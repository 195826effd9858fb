//! Parameter classes and width multipliers, by μP's infinite-shape test.
//!
//! Each parameter's shape is compared with the same-named parameter of a base (proxy) model to find its
//! *width dimensions*, the ones that grow with the model:
//! - **With delta shapes** (the same model at a second width), as microsoft/mup's
//!   `set_base_shapes(model, base, delta)` (`mup/shape.py`, `zip_infshape` in `mup/infshape.py`): a dimension
//!   is a width iff base and delta differ there, whatever the target. That is what lets the proxy run itself
//!   classify its hidden matrices as matrix-like (with `m = 1`) and decay them. A target dimension where base
//!   and delta agree must equal the base: where it does not (a different vocabulary, a typo) mup silently calls
//!   it finite; here it is an error naming the parameter and the dimension, unless an override declares the
//!   dimensions (`width_dims`, `fixed_size`).
//! - **Without delta shapes**: a dimension is a width iff the target differs from the base there. A model
//!   identical to its base thus has no width dimension, and [`crate::plan::ScalingPlan`] refuses it rather than
//!   silently turning weight decay off. A width ratio that is no clean multiple or fraction (`32/33`) is more
//!   likely a non-width dimension off by one, and gets a warning.
//!
//! - Two or more width dimensions: **matrix-like** (attention q/k/v/o, MLP up/gate/down).
//! - One or none: **vector-like** (norm gains, biases, token embedding, readout).
//!
//! The width multiplier is `m = fan_in / base_fan_in`. The fan-in dimension is the *last width
//! dimension* (μP's `InfShape.main`). In PyTorch/tch layouts this is the input dimension: a `Linear`
//! weight is `[out, in]`, a conv kernel `[out, in, k…]` (kernel dims never scale, so `in` is the last
//! width dim), and a stacked-expert weight stored `[E, out, in]` has `in` last. For layouts whose last
//! width dimension is the output (e.g. experts stored `[E, in, out]`), set `fan_in_dim` in an override.
//! A vector-like parameter with one width dimension (the readout `[vocab, d]`, the embedding) reports
//! that dimension's ratio as its `m`, which μP's readout multiplier needs; it still gets base lr.
//!
//! A vector-like parameter of rank ≥ 2 whose only width dimension is its fan-in (the last one) has a fixed
//! fan-out and a growing fan-in: under μP that is an output layer (a readout, a router), whose output must be
//! divided by `m` (mup's `assert_hidden_size_inf` refuses a plain `Linear` so shaped). tch stores an embedding
//! `[vocab, d]` the same way. Unless an override declares its `role` (`readout` or `embedding`), such a
//! parameter carries a [`WarningKind::PossibleReadout`] warning.
//!
//! The files: this one classifies (the infinite-shape test, the warnings); `shapes` holds the base and delta
//! shapes and their JSON, `overrides` the per-parameter overrides and their globs, `error` the errors.

mod error;
mod overrides;
mod shapes;

use serde::{Deserialize, Serialize};

pub use error::ClassifyError;
pub(crate) use error::quoted_list;
pub use gainguard_protocol::events::ParamClass;
pub use overrides::{Override, Overrides, ParamRole};
pub use shapes::{BaseShapes, ShapeMap};

use overrides::MergedOverride;

/// Something about one parameter that the plan accepts but a person should look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarningKind {
    /// Vector-like, rank ≥ 2, its only width dimension its fan-in, and no declared role: maybe a readout
    /// without `MuReadout`, which trains m× too hot.
    PossibleReadout,
    /// A width dimension whose ratio target/base is no clean multiple or fraction (e.g. 32/33).
    UnevenWidthRatio,
}

impl WarningKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            WarningKind::PossibleReadout => "possible_readout",
            WarningKind::UnevenWidthRatio => "uneven_width_ratio",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamWarning {
    pub param: String,
    pub kind: WarningKind,
    pub message: String,
}

/// How one parameter is classified before any rule is applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Classification {
    pub name: String,
    pub shape: Vec<i64>,
    pub base_shape: Vec<i64>,
    pub class: ParamClass,
    /// The width dimensions (see the module doc).
    pub width_dims: Vec<usize>,
    /// The dimension taken as fan-in, if any dimension is a width dimension.
    pub fan_in_dim: Option<usize>,
    pub width_multiplier: f64,
    pub lr_multiplier: f64,
    pub wd_multiplier: f64,
    /// Replacement base weight decay from an override.
    pub weight_decay_override: Option<f64>,
    /// Block index parsed from the name (`blocks.3.attn.q.weight` → 3).
    pub layer: Option<u32>,
    pub role: Option<ParamRole>,
    /// An override set `class`, `width_dims`, `fixed_size` or `role`: the user said what this parameter is.
    pub declared: bool,
    pub warnings: Vec<ParamWarning>,
}

/// The first all-digit component of a dotted name, as the block index.
pub fn layer_of(name: &str) -> Option<u32> {
    name.split('.').find(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())).and_then(|p| p.parse().ok())
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `target/base` reduced to `p/q` when it is no clean multiple or fraction: both `p` and `q` above 8.
/// ×4, ÷2, ×1.5, ×4/3, ×8/3 are clean; 32/33 (a dimension off by one) and 176/43 are not.
fn uneven_ratio(target: i64, base: i64) -> Option<(i64, i64)> {
    let g = gcd(target, base);
    let (p, q) = (target / g, base / g);
    (p.min(q) > 8).then_some((p, q))
}

/// Classifies one parameter against its base (and delta) shape, then applies overrides.
pub fn classify(name: &str, shape: &[i64], base: &BaseShapes, overrides: &Overrides) -> Result<Classification, ClassifyError> {
    let (base_shape, delta_shape) = checked_shapes(name, shape, base)?;
    let merged = MergedOverride::of(name, shape, overrides)?;
    let fixed_size = merged.fixed_size == Some(true);
    let dims_declared = fixed_size || merged.width_dims.is_some();
    let width_dims = width_dims_of(name, shape, base_shape, delta_shape, merged.width_dims.as_deref(), fixed_size)?;

    let class = match merged.class {
        Some(c) => c,
        None if merged.role.is_some() || fixed_size || width_dims.len() < 2 => ParamClass::VectorLike,
        None => ParamClass::MatrixLike,
    };
    let fan_in_dim = merged.fan_in_dim.or(width_dims.last().copied());
    let width_multiplier = match (merged.width_multiplier, fan_in_dim) {
        (Some(m), _) => m,
        (None, Some(d)) => shape[d] as f64 / base_shape[d] as f64,
        (None, None) => 1.0,
    };
    if !(width_multiplier.is_finite() && width_multiplier > 0.0) {
        return Err(ClassifyError::BadWidthMultiplier { name: name.to_string(), m: width_multiplier });
    }

    let mut warnings = Vec::new();
    if !dims_declared {
        warnings.extend(uneven_width_warnings(name, shape, base_shape, &width_dims));
    }
    let last = shape.len().wrapping_sub(1);
    if merged.role.is_none() && class == ParamClass::VectorLike && shape.len() >= 2 && width_dims == [last] && fan_in_dim == Some(last) {
        warnings.push(ParamWarning {
            param: name.to_string(),
            kind: WarningKind::PossibleReadout,
            message: format!(
                "`{name}` {shape:?}: its only width dimension is its fan-in (the last) and its fan-out is fixed, so under μP it is an output layer (a readout, a router) whose output must be divided by m = {width_multiplier} (gainguard::mup::MuReadout), or it trains m× too hot; if that is done, or it is an embedding, declare its role with an override: {{\"pattern\": \"{name}\", \"role\": \"readout\"}} (or \"embedding\")"
            ),
        });
    }

    Ok(Classification {
        name: name.to_string(),
        shape: shape.to_vec(),
        base_shape: base_shape.clone(),
        class,
        width_dims,
        fan_in_dim,
        width_multiplier,
        lr_multiplier: merged.lr_multiplier,
        wd_multiplier: merged.wd_multiplier,
        weight_decay_override: merged.weight_decay,
        layer: layer_of(name),
        role: merged.role,
        declared: merged.class.is_some() || dims_declared || merged.role.is_some(),
        warnings,
    })
}

/// `name`'s base shape and (with a delta model) delta shape, after checking that both exist, that their
/// ranks agree with `shape`'s and that no dimension is zero or negative.
fn checked_shapes<'a>(name: &str, shape: &[i64], base: &'a BaseShapes) -> Result<(&'a Vec<i64>, Option<&'a Vec<i64>>), ClassifyError> {
    let base_shape = base.get(name).ok_or_else(|| ClassifyError::MissingInBase {
        name: name.to_string(),
        shape: shape.to_vec(),
        base_count: base.len(),
    })?;
    if shape.len() != base_shape.len() {
        return Err(ClassifyError::RankMismatch {
            name: name.to_string(),
            shape: shape.to_vec(),
            rank: shape.len(),
            base: base_shape.clone(),
            base_rank: base_shape.len(),
        });
    }
    let delta_shape = match &base.delta {
        None => None,
        Some(delta) => {
            let d = delta.get(name).ok_or_else(|| ClassifyError::MissingInDelta {
                name: name.to_string(),
                shape: shape.to_vec(),
                delta_count: delta.len(),
            })?;
            if d.len() != base_shape.len() {
                return Err(ClassifyError::DeltaRankMismatch { name: name.to_string(), delta: d.clone(), base: base_shape.clone() });
            }
            Some(d)
        }
    };
    for (which, s) in [("target", Some(shape)), ("base", Some(base_shape.as_slice())), ("delta", delta_shape.map(|d| d.as_slice()))] {
        if let Some(dim) = s.and_then(|s| s.iter().position(|&d| d <= 0)) {
            return Err(ClassifyError::ZeroDim { name: name.to_string(), which, shape: s.unwrap_or_default().to_vec(), dim });
        }
    }
    Ok((base_shape, delta_shape))
}

/// The dimensions along which `name` grows with width: none when it is declared fixed-size, the declared
/// ones, else those where base and delta differ (mup's `zip_infshape(base, delta)`), else (no delta model)
/// those where the target differs from the base.
fn width_dims_of(
    name: &str,
    shape: &[i64],
    base_shape: &[i64],
    delta_shape: Option<&Vec<i64>>,
    declared: Option<&[usize]>,
    fixed_size: bool,
) -> Result<Vec<usize>, ClassifyError> {
    match (declared, fixed_size) {
        (Some(dims), true) if !dims.is_empty() => Err(ClassifyError::FixedSizeWithWidthDims { name: name.to_string(), dims: dims.to_vec() }),
        (_, true) => Ok(Vec::new()),
        (Some(dims), false) => {
            if dims.iter().any(|&d| d >= shape.len()) {
                return Err(ClassifyError::WidthDimsOutOfRange { name: name.to_string(), dims: dims.to_vec(), shape: shape.to_vec() });
            }
            let mut dims = dims.to_vec();
            dims.sort_unstable();
            dims.dedup();
            Ok(dims)
        }
        (None, false) => match delta_shape {
            Some(delta) => {
                let changed: Vec<usize> = (0..shape.len()).filter(|&i| delta[i] == base_shape[i] && shape[i] != base_shape[i]).collect();
                if !changed.is_empty() {
                    return Err(ClassifyError::NonWidthDimDiffers {
                        name: name.to_string(),
                        shape: shape.to_vec(),
                        base: base_shape.to_vec(),
                        dims: changed,
                    });
                }
                Ok((0..shape.len()).filter(|&i| delta[i] != base_shape[i]).collect())
            }
            None => Ok((0..shape.len()).filter(|&i| shape[i] != base_shape[i]).collect()),
        },
    }
}

/// One `uneven_width_ratio` warning per width dimension whose target/base ratio is no clean multiple or
/// fraction (an off-by-one non-width dimension taken for a width).
fn uneven_width_warnings(name: &str, shape: &[i64], base_shape: &[i64], width_dims: &[usize]) -> Vec<ParamWarning> {
    width_dims
        .iter()
        .filter_map(|&d| {
            let (p, q) = uneven_ratio(shape[d], base_shape[d])?;
            Some(ParamWarning {
                param: name.to_string(),
                kind: WarningKind::UnevenWidthRatio,
                message: format!(
                    "`{name}`: width dimension {d} is {} in the base and {} in the target, a ratio of {:.4} ({p}/{q}) that is no clean multiple or fraction: a non-width dimension off by one? If so, fix the shapes or declare the width dimensions with an override (`width_dims`)",
                    base_shape[d],
                    shape[d],
                    shape[d] as f64 / base_shape[d] as f64
                ),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(entries: &[(&str, &[i64])]) -> BaseShapes {
        BaseShapes::new(entries.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect())
    }

    #[test]
    fn delta_shapes_declare_width_dims_so_the_proxy_itself_is_matrix_like_with_m_one() {
        let b = BaseShapes::from_json_str(
            r#"{"base": {"w": [256, 64], "g": [64]}, "delta": {"w": [512, 128], "g": [128]}}"#,
            "t",
        )
        .unwrap();
        let w = classify("w", &[256, 64], &b, &none()).unwrap();
        assert_eq!((w.class, w.width_multiplier, w.width_dims.clone()), (ParamClass::MatrixLike, 1.0, vec![0, 1]));
        let wide = classify("w", &[1024, 256], &b, &none()).unwrap();
        assert_eq!((wide.class, wide.width_multiplier), (ParamClass::MatrixLike, 4.0));
        assert_eq!(classify("g", &[64], &b, &none()).unwrap().class, ParamClass::VectorLike);
        let again = BaseShapes::from_json_str(&b.to_json_string(), "x").unwrap();
        assert_eq!(again, b);
    }

    fn none() -> Overrides {
        Overrides::new(&[]).unwrap()
    }

    #[test]
    fn a_matrix_with_both_dims_wider_is_matrix_like_with_m_from_fan_in() {
        let b = base(&[("blocks.0.mlp.up.weight", &[512, 128])]);
        let c = classify("blocks.0.mlp.up.weight", &[2048, 512], &b, &none()).unwrap();
        assert_eq!(c.class, ParamClass::MatrixLike);
        assert_eq!(c.fan_in_dim, Some(1));
        assert_eq!(c.width_multiplier, 512.0 / 128.0);
        assert_eq!(c.layer, Some(0));
    }

    #[test]
    fn readout_and_embedding_with_one_width_dim_are_vector_like() {
        let b = base(&[("lm_head.weight", &[256, 128]), ("tok_emb.weight", &[256, 128]), ("norm.weight", &[128])]);
        for (n, s) in [("lm_head.weight", [256i64, 512]), ("tok_emb.weight", [256, 512])] {
            let c = classify(n, &s, &b, &none()).unwrap();
            assert_eq!(c.class, ParamClass::VectorLike, "{n}");
            assert_eq!(c.width_multiplier, 4.0, "{n}");
        }
        assert_eq!(classify("norm.weight", &[512], &b, &none()).unwrap().class, ParamClass::VectorLike);
    }

    #[test]
    fn a_param_with_no_width_dim_has_m_one() {
        let b = base(&[("pos", &[64, 8])]);
        let c = classify("pos", &[64, 8], &b, &none()).unwrap();
        assert_eq!((c.class, c.width_multiplier, c.fan_in_dim), (ParamClass::VectorLike, 1.0, None));
    }

    #[test]
    fn conv_kernels_and_stacked_experts_use_the_last_width_dim_as_fan_in() {
        let b = base(&[("conv.weight", &[64, 32, 3, 3]), ("experts.w", &[8, 256, 64])]);
        let conv = classify("conv.weight", &[256, 128, 3, 3], &b, &none()).unwrap();
        assert_eq!((conv.class, conv.fan_in_dim, conv.width_multiplier), (ParamClass::MatrixLike, Some(1), 4.0));
        // [E, out, in] with out ×4 and in ×2: fan-in is the last width dim.
        let ex = classify("experts.w", &[8, 1024, 128], &b, &none()).unwrap();
        assert_eq!((ex.class, ex.fan_in_dim, ex.width_multiplier), (ParamClass::MatrixLike, Some(2), 2.0));
        let o = Overrides::new(&[Override { fan_in_dim: Some(1), ..Override::new("experts.*") }]).unwrap();
        assert_eq!(classify("experts.w", &[8, 1024, 128], &b, &o).unwrap().width_multiplier, 4.0);
    }

    #[test]
    fn overrides_match_globs_and_later_ones_win() {
        let b = base(&[("blocks.0.attn.q.weight", &[128, 128]), ("blocks.1.attn.q.weight", &[128, 128])]);
        let o = Overrides::new(&[
            Override { lr_multiplier: Some(0.5), width_multiplier: Some(3.0), ..Override::new("blocks.*.attn.*") },
            Override { lr_multiplier: Some(2.0), class: Some(ParamClass::VectorLike), ..Override::new("blocks.1.*") },
        ])
        .unwrap();
        let c0 = classify("blocks.0.attn.q.weight", &[512, 512], &b, &o).unwrap();
        assert_eq!((c0.class, c0.width_multiplier, c0.lr_multiplier), (ParamClass::MatrixLike, 3.0, 0.5));
        let c1 = classify("blocks.1.attn.q.weight", &[512, 512], &b, &o).unwrap();
        assert_eq!((c1.class, c1.width_multiplier, c1.lr_multiplier), (ParamClass::VectorLike, 3.0, 2.0));
    }

    #[test]
    fn a_param_missing_in_base_is_an_error_naming_it() {
        let e = classify("blocks.9.mlp.up.weight", &[4, 4], &base(&[]), &none()).unwrap_err();
        assert!(e.to_string().contains("`blocks.9.mlp.up.weight`") && e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn a_rank_mismatch_is_an_error_naming_both_shapes() {
        let b = base(&[("blocks.3.mlp.up.weight", &[128])]);
        let e = classify("blocks.3.mlp.up.weight", &[512, 2048], &b, &none()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "parameter `blocks.3.mlp.up.weight`: shape [512, 2048] has rank 2 but the base shape [128] has rank 1"
        );
    }

    #[test]
    fn a_zero_dim_in_target_or_base_is_an_error() {
        let b = base(&[("w", &[0, 4]), ("v", &[4, 4])]);
        assert!(classify("w", &[4, 4], &b, &none()).unwrap_err().to_string().contains("base shape [0, 4]"));
        assert!(classify("v", &[4, 0], &b, &none()).unwrap_err().to_string().contains("target shape [4, 0]"));
    }

    #[test]
    fn layer_is_the_first_numeric_path_component() {
        assert_eq!(layer_of("blocks.12.attn.o.weight"), Some(12));
        assert_eq!(layer_of("lm_head.weight"), None);
    }

    fn with_delta(text: &str) -> BaseShapes {
        BaseShapes::from_json_str(text, "t").unwrap()
    }

    #[test]
    fn with_delta_shapes_a_dim_is_a_width_iff_base_and_delta_differ_whatever_the_target() {
        // out.weight [vocab, d]: the delta says only d is a width.
        let b = with_delta(r#"{"base": {"out.weight": [8, 64]}, "delta": {"out.weight": [8, 128]}}"#);
        let c = classify("out.weight", &[8, 256], &b, &none()).unwrap();
        assert_eq!((c.class, c.width_dims.clone(), c.width_multiplier), (ParamClass::VectorLike, vec![1], 4.0));
        // At the proxy width the same dim is still a width, with m = 1.
        let c = classify("out.weight", &[8, 64], &b, &none()).unwrap();
        assert_eq!((c.width_dims.clone(), c.width_multiplier), (vec![1], 1.0));
    }

    #[test]
    fn a_target_dim_that_differs_where_base_and_delta_agree_is_an_error_naming_the_param_and_dim() {
        let b = with_delta(r#"{"base": {"out.weight": [8, 64]}, "delta": {"out.weight": [8, 128]}}"#);
        let e = classify("out.weight", &[10, 256], &b, &none()).unwrap_err().to_string();
        assert!(e.contains("`out.weight`") && e.contains("dimension 0 is 8 in the base and the delta") && e.contains("10 in the target"), "{e}");
        assert!(e.contains("vocabulary") && e.contains("width_dims"), "{e}");
        // Declared: dim 0 may differ, dim 1 is the width.
        let declared = Overrides::new(&[Override { width_dims: Some(vec![1]), ..Override::new("out.weight") }]).unwrap();
        let c = classify("out.weight", &[10, 256], &b, &declared).unwrap();
        assert_eq!((c.width_dims.clone(), c.width_multiplier, c.declared), (vec![1], 4.0, true));
    }

    #[test]
    fn a_param_missing_in_the_delta_or_of_another_rank_there_is_an_error() {
        let b = with_delta(r#"{"base": {"w": [64, 64], "v": [64, 64]}, "delta": {"w": [128, 128], "v": [128]}}"#);
        let e = classify("x", &[64, 64], &with_delta(r#"{"base": {"x": [64, 64]}, "delta": {"y": [128, 128]}}"#), &none()).unwrap_err();
        assert!(e.to_string().contains("`x`") && e.to_string().contains("missing in the delta"), "{e}");
        let e = classify("v", &[64, 64], &b, &none()).unwrap_err().to_string();
        assert!(e.contains("`v`") && e.contains("delta shape [128]") && e.contains("rank 1"), "{e}");
    }

    #[test]
    fn without_delta_an_off_by_one_width_ratio_is_warned_and_clean_ratios_are_not() {
        let b = base(&[("w", &[64, 33]), ("u", &[64, 64]), ("e", &[8, 4, 4])]);
        let c = classify("w", &[256, 32], &b, &none()).unwrap();
        assert_eq!(c.class, ParamClass::MatrixLike);
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert_eq!(c.warnings[0].kind, WarningKind::UnevenWidthRatio);
        assert!(c.warnings[0].message.contains("dimension 1") && c.warnings[0].message.contains("32/33"), "{}", c.warnings[0].message);
        for (name, target) in [("u", vec![96i64, 96]), ("u", vec![256, 16]), ("e", vec![8, 12, 16])] {
            assert!(classify(name, &target, &b, &none()).unwrap().warnings.is_empty(), "{name} {target:?}");
        }
    }

    #[test]
    fn a_vector_like_matrix_whose_only_width_is_its_fan_in_is_flagged_unless_its_role_is_declared() {
        let b = base(&[("head.weight", &[100, 64]), ("proj.weight", &[64, 100]), ("norm.weight", &[64])]);
        let head = classify("head.weight", &[100, 256], &b, &none()).unwrap();
        assert_eq!(head.class, ParamClass::VectorLike);
        assert_eq!(head.warnings.iter().map(|w| w.kind).collect::<Vec<_>>(), vec![WarningKind::PossibleReadout]);
        assert!(head.warnings[0].message.contains("MuReadout") && head.warnings[0].message.contains("\"role\""));
        // Fan-out is the width (an input layer), or rank 1: nothing to flag.
        assert!(classify("proj.weight", &[256, 100], &b, &none()).unwrap().warnings.is_empty());
        assert!(classify("norm.weight", &[256], &b, &none()).unwrap().warnings.is_empty());
        for role in [ParamRole::Readout, ParamRole::Embedding] {
            let o = Overrides::new(&[Override { role: Some(role), ..Override::new("head.weight") }]).unwrap();
            let c = classify("head.weight", &[100, 256], &b, &o).unwrap();
            assert!(c.warnings.is_empty() && c.role == Some(role), "{role:?}");
        }
    }

    #[test]
    fn a_declared_role_or_fixed_size_makes_a_parameter_vector_like_unless_class_says_otherwise() {
        let b = base(&[("head.weight", &[100, 64]), ("table", &[16, 16])]);
        // Without delta shapes a vocabulary change makes both dims of the readout widths.
        assert_eq!(classify("head.weight", &[120, 256], &b, &none()).unwrap().class, ParamClass::MatrixLike);
        let o = Overrides::new(&[Override { role: Some(ParamRole::Readout), ..Override::new("head.weight") }]).unwrap();
        assert_eq!(classify("head.weight", &[120, 256], &b, &o).unwrap().class, ParamClass::VectorLike);
        let o = Overrides::new(&[Override { fixed_size: Some(true), ..Override::new("table") }]).unwrap();
        let c = classify("table", &[32, 32], &b, &o).unwrap();
        assert_eq!((c.class, c.width_dims.clone(), c.width_multiplier, c.declared), (ParamClass::VectorLike, vec![], 1.0, true));
        let o = Overrides::new(&[Override { fixed_size: Some(true), class: Some(ParamClass::MatrixLike), ..Override::new("table") }]).unwrap();
        assert_eq!(classify("table", &[16, 16], &b, &o).unwrap().class, ParamClass::MatrixLike);
    }

    #[test]
    fn contradictory_or_out_of_range_dimension_declarations_are_errors() {
        let b = base(&[("w", &[16, 16])]);
        let o = Overrides::new(&[Override { fixed_size: Some(true), width_dims: Some(vec![1]), ..Override::new("w") }]).unwrap();
        assert!(classify("w", &[16, 16], &b, &o).unwrap_err().to_string().contains("fixed_size"));
        let o = Overrides::new(&[Override { width_dims: Some(vec![0, 2]), ..Override::new("w") }]).unwrap();
        let e = classify("w", &[16, 16], &b, &o).unwrap_err().to_string();
        assert!(e.contains("`w`") && e.contains("width_dims [0, 2]") && e.contains("rank 2"), "{e}");
    }
}
