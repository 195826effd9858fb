//! Parameter classes and width multipliers, by μP's infinite-shape test.
//!
//! Each parameter's shape is compared with the same-named parameter of a base (proxy) model. A dimension
//! whose size differs is a *width dimension*. Like microsoft/mup's `set_base_shapes(model, base, delta)`,
//! the base shapes may carry *delta* shapes (the same model at another width): a dimension that differs
//! between base and delta is a width dimension even where the target equals the base. That is what lets the
//! proxy run itself classify its hidden matrices as matrix-like (with `m = 1`) and decay them; without delta
//! shapes a model identical to its base has no width dimension at all, and [`crate::plan::ScalingPlan`]
//! refuses it rather than silently turning weight decay off.
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

use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub use gainguard_daemon::events::ParamClass;

#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error("parameter `{name}` (shape {shape:?}) is missing in the base shapes; base has {base_count} parameters")]
    MissingInBase { name: String, shape: Vec<i64>, base_count: usize },
    #[error("parameter `{name}`: shape {shape:?} has rank {rank} but the base shape {base:?} has rank {base_rank}")]
    RankMismatch { name: String, shape: Vec<i64>, rank: usize, base: Vec<i64>, base_rank: usize },
    #[error("parameter `{name}`: {which} shape {shape:?} has a zero-sized dimension {dim}")]
    ZeroDim { name: String, which: &'static str, shape: Vec<i64>, dim: usize },
    #[error("parameter `{name}`: override sets fan_in_dim = {dim} but the shape {shape:?} has rank {rank}")]
    FanInDimOutOfRange { name: String, dim: usize, shape: Vec<i64>, rank: usize },
    #[error("parameter `{name}`: width multiplier {m} must be finite and > 0")]
    BadWidthMultiplier { name: String, m: f64 },
    #[error("override pattern `{pattern}` is invalid: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("base shapes file `{path}`: {reason}")]
    BaseShapesFile { path: String, reason: String },
}

pub type ShapeMap = BTreeMap<String, Vec<i64>>;

/// The shapes of a base (proxy) model, and optionally of the same model at another width (delta).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BaseShapes {
    pub base: ShapeMap,
    pub delta: Option<ShapeMap>,
}

fn shapes_of(vs: &tch::nn::VarStore) -> ShapeMap {
    vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect()
}

impl BaseShapes {
    pub fn new(base: ShapeMap) -> BaseShapes {
        BaseShapes { base, delta: None }
    }

    pub fn from_var_store(vs: &tch::nn::VarStore) -> BaseShapes {
        BaseShapes::new(shapes_of(vs))
    }

    /// Base shapes with delta shapes: `delta` is the same model at another width, which declares the
    /// width dimensions (those whose size differs from `base`).
    pub fn from_var_stores(base: &tch::nn::VarStore, delta: &tch::nn::VarStore) -> BaseShapes {
        BaseShapes { base: shapes_of(base), delta: Some(shapes_of(delta)) }
    }

    /// Parses either a JSON object mapping each parameter name to its shape (an array of integers), or
    /// `{"base": {...}, "delta": {...}}` with two such objects (what [`write_json`](Self::write_json) writes
    /// when delta shapes are known).
    pub fn from_json_str(text: &str, origin: &str) -> Result<BaseShapes, ClassifyError> {
        let err = |reason: String| ClassifyError::BaseShapesFile { path: origin.to_string(), reason };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| err("expected a JSON object mapping parameter names to shapes".into()))?;
        if let (Some(base), Some(delta)) = (obj.get("base").filter(|b| b.is_object()), obj.get("delta").filter(|d| d.is_object())) {
            return Ok(BaseShapes {
                base: Self::shape_map(base, origin)?,
                delta: Some(Self::shape_map(delta, origin)?),
            });
        }
        Ok(BaseShapes::new(Self::shape_map(&value, origin)?))
    }

    fn shape_map(value: &serde_json::Value, origin: &str) -> Result<ShapeMap, ClassifyError> {
        let err = |reason: String| ClassifyError::BaseShapesFile { path: origin.to_string(), reason };
        let obj = value
            .as_object()
            .ok_or_else(|| err("expected a JSON object mapping parameter names to shapes".into()))?;
        let mut shapes = BTreeMap::new();
        for (name, shape) in obj {
            let dims = shape
                .as_array()
                .ok_or_else(|| err(format!("`{name}`: expected an array of integers, got {shape}")))?;
            let mut out = Vec::with_capacity(dims.len());
            for d in dims {
                match d.as_i64() {
                    Some(v) if v >= 0 => out.push(v),
                    _ => return Err(err(format!("`{name}`: dimension {d} is not a non-negative integer"))),
                }
            }
            shapes.insert(name.clone(), out);
        }
        Ok(shapes)
    }

    pub fn from_json_file(path: &Path) -> Result<BaseShapes, ClassifyError> {
        let text = std::fs::read_to_string(path).map_err(|e| ClassifyError::BaseShapesFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        BaseShapes::from_json_str(&text, &path.display().to_string())
    }

    pub fn to_json_string(&self) -> String {
        let value = match &self.delta {
            None => serde_json::to_value(&self.base),
            Some(delta) => serde_json::to_value(serde_json::json!({ "base": self.base, "delta": delta })),
        };
        serde_json::to_string_pretty(&value.expect("shape maps serialize")).expect("JSON values serialize")
    }

    /// Writes the shapes as JSON, so that a proxy run leaves the base shapes for its targets.
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_json_string() + "\n")
    }

    pub fn get(&self, name: &str) -> Option<&Vec<i64>> {
        self.base.get(name)
    }

    pub fn len(&self) -> usize {
        self.base.len()
    }

    pub fn is_empty(&self) -> bool {
        self.base.is_empty()
    }
}

/// A per-parameter adjustment selected by a name pattern.
///
/// Patterns are globs over the full parameter name: `*` matches any run of characters (dots included),
/// `?` one character. Every matching override applies, in order; a later one wins field by field.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Override {
    pub pattern: String,
    #[serde(default)]
    pub class: Option<ParamClass>,
    #[serde(default)]
    pub width_multiplier: Option<f64>,
    #[serde(default)]
    pub fan_in_dim: Option<usize>,
    /// Multiplies the rule's learning rate.
    #[serde(default)]
    pub lr_multiplier: Option<f64>,
    /// Multiplies the rule's weight decay (a vector-like param with wd 0 stays at 0: set `weight_decay`).
    #[serde(default)]
    pub wd_multiplier: Option<f64>,
    /// Replaces the base weight decay `lambda` for this parameter before the rule scales it; lets a
    /// vector-like parameter decay.
    #[serde(default)]
    pub weight_decay: Option<f64>,
}

impl Override {
    pub fn new(pattern: &str) -> Override {
        Override { pattern: pattern.to_string(), ..Default::default() }
    }

    pub fn matcher(&self) -> Result<Regex, ClassifyError> {
        glob_regex(&self.pattern)
    }
}

fn glob_regex(pattern: &str) -> Result<Regex, ClassifyError> {
    let mut re = String::from("^");
    for c in pattern.chars() {
        match c {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    Regex::new(&re).map_err(|e| ClassifyError::BadPattern { pattern: pattern.to_string(), reason: e.to_string() })
}

/// How one parameter is classified before any rule is applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Classification {
    pub name: String,
    pub shape: Vec<i64>,
    pub base_shape: Vec<i64>,
    pub class: ParamClass,
    /// Dimensions whose size differs from the base.
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
}

/// The first all-digit component of a dotted name, as the block index.
pub fn layer_of(name: &str) -> Option<u32> {
    name.split('.').find(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())).and_then(|p| p.parse().ok())
}

/// Compiled overrides, so a model's parameters are matched without recompiling patterns.
pub struct Overrides {
    rules: Vec<(Regex, Override)>,
}

impl Overrides {
    pub fn new(overrides: &[Override]) -> Result<Overrides, ClassifyError> {
        let rules = overrides.iter().map(|o| Ok((o.matcher()?, o.clone()))).collect::<Result<_, ClassifyError>>()?;
        Ok(Overrides { rules })
    }

    fn matching<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Override> + 'a {
        self.rules.iter().filter(move |(re, _)| re.is_match(name)).map(|(_, o)| o)
    }
}

/// Classifies one parameter against its base shape (μP's infshape test), then applies overrides.
pub fn classify(name: &str, shape: &[i64], base: &BaseShapes, overrides: &Overrides) -> Result<Classification, ClassifyError> {
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
    for (which, s) in [("target", shape), ("base", base_shape.as_slice())] {
        if let Some(dim) = s.iter().position(|&d| d <= 0) {
            return Err(ClassifyError::ZeroDim { name: name.to_string(), which, shape: s.to_vec(), dim });
        }
    }
    // Width dims: where the target differs from the base, or where the delta declares one.
    let delta_shape = base.delta.as_ref().and_then(|d| d.get(name)).filter(|d| d.len() == base_shape.len());
    let width_dims: Vec<usize> = (0..shape.len())
        .filter(|&i| shape[i] != base_shape[i] || delta_shape.is_some_and(|d| d[i] != base_shape[i]))
        .collect();
    let mut class = if width_dims.len() >= 2 { ParamClass::MatrixLike } else { ParamClass::VectorLike };
    let mut fan_in_dim = width_dims.last().copied();
    let mut m_override = None;
    let (mut lr_multiplier, mut wd_multiplier, mut weight_decay_override) = (1.0, 1.0, None);
    for o in overrides.matching(name) {
        if let Some(c) = o.class {
            class = c;
        }
        if let Some(d) = o.fan_in_dim {
            if d >= shape.len() {
                return Err(ClassifyError::FanInDimOutOfRange { name: name.to_string(), dim: d, shape: shape.to_vec(), rank: shape.len() });
            }
            fan_in_dim = Some(d);
        }
        if let Some(m) = o.width_multiplier {
            m_override = Some(m);
        }
        if let Some(x) = o.lr_multiplier {
            lr_multiplier = x;
        }
        if let Some(x) = o.wd_multiplier {
            wd_multiplier = x;
        }
        if let Some(x) = o.weight_decay {
            weight_decay_override = Some(x);
        }
    }
    let width_multiplier = match (m_override, fan_in_dim) {
        (Some(m), _) => m,
        (None, Some(d)) => shape[d] as f64 / base_shape[d] as f64,
        (None, None) => 1.0,
    };
    if !(width_multiplier.is_finite() && width_multiplier > 0.0) {
        return Err(ClassifyError::BadWidthMultiplier { name: name.to_string(), m: width_multiplier });
    }
    Ok(Classification {
        name: name.to_string(),
        shape: shape.to_vec(),
        base_shape: base_shape.clone(),
        class,
        width_dims,
        fan_in_dim,
        width_multiplier,
        lr_multiplier,
        wd_multiplier,
        weight_decay_override,
        layer: layer_of(name),
    })
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
    fn base_shapes_json_round_trips_and_bad_json_names_the_culprit() {
        let b = BaseShapes::from_json_str(r#"{"a.weight": [4, 8], "b": [3]}"#, "base.json").unwrap();
        assert_eq!(b.get("a.weight"), Some(&vec![4, 8]));
        let again = BaseShapes::from_json_str(&b.to_json_string(), "x").unwrap();
        assert_eq!(again, b);
        let e = BaseShapes::from_json_str(r#"{"a.weight": [4, "x"]}"#, "base.json").unwrap_err().to_string();
        assert!(e.contains("base.json") && e.contains("`a.weight`"), "{e}");
        assert!(BaseShapes::from_json_str("[1,2]", "f").unwrap_err().to_string().contains("JSON object"));
    }

    #[test]
    fn layer_is_the_first_numeric_path_component() {
        assert_eq!(layer_of("blocks.12.attn.o.weight"), Some(12));
        assert_eq!(layer_of("lm_head.weight"), None);
    }
}
