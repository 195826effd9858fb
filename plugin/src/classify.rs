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

use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub use gainguard_protocol::events::ParamClass;

/// `` `a`, `b`, `c` ``: names quoted for a message.
pub(crate) fn quoted_list<S: AsRef<str>>(names: &[S]) -> String {
    names.iter().map(|n| format!("`{}`", n.as_ref())).collect::<Vec<_>>().join(", ")
}

fn non_width_dims_message(shape: &[i64], base: &[i64], dims: &[usize]) -> String {
    let each: Vec<String> = dims.iter().map(|&d| format!("dimension {d} is {} in the base and the delta shapes alike (so not a width) but {} in the target", base[d], shape[d])).collect();
    format!(
        "{} (target shape {shape:?}, base {base:?}): a different vocabulary or a typo? If it grows with width, give delta shapes that differ there; if it may differ without being a width, declare the width dimensions with an override (`width_dims`, or `fixed_size`)",
        each.join("; ")
    )
}

#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error("parameter `{name}` (shape {shape:?}) is missing in the base shapes; base has {base_count} parameters")]
    MissingInBase { name: String, shape: Vec<i64>, base_count: usize },
    #[error("parameter `{name}` (shape {shape:?}) is missing in the delta shapes; delta has {delta_count} parameters (delta shapes must name every parameter the base names)")]
    MissingInDelta { name: String, shape: Vec<i64>, delta_count: usize },
    #[error("parameter `{name}`: shape {shape:?} has rank {rank} but the base shape {base:?} has rank {base_rank}")]
    RankMismatch { name: String, shape: Vec<i64>, rank: usize, base: Vec<i64>, base_rank: usize },
    #[error("parameter `{name}`: delta shape {delta:?} has rank {} but the base shape {base:?} has rank {}", .delta.len(), .base.len())]
    DeltaRankMismatch { name: String, delta: Vec<i64>, base: Vec<i64> },
    #[error("parameter `{name}`: {which} shape {shape:?} has a zero-sized dimension {dim}")]
    ZeroDim { name: String, which: &'static str, shape: Vec<i64>, dim: usize },
    #[error("parameter `{name}`: {}", non_width_dims_message(.shape, .base, .dims))]
    NonWidthDimDiffers { name: String, shape: Vec<i64>, base: Vec<i64>, dims: Vec<usize> },
    #[error("parameter `{name}`: override sets fan_in_dim = {dim} but the shape {shape:?} has rank {rank}")]
    FanInDimOutOfRange { name: String, dim: usize, shape: Vec<i64>, rank: usize },
    #[error("parameter `{name}`: override declares width_dims {dims:?} but the shape {shape:?} has rank {}", .shape.len())]
    WidthDimsOutOfRange { name: String, dims: Vec<usize>, shape: Vec<i64> },
    #[error("parameter `{name}`: overrides declare it fixed_size and also width_dims {dims:?}; a fixed-size parameter has no width dimension")]
    FixedSizeWithWidthDims { name: String, dims: Vec<usize> },
    #[error("parameter `{name}`: width multiplier {m} must be finite and > 0")]
    BadWidthMultiplier { name: String, m: f64 },
    #[error("override pattern `{pattern}` is invalid: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("{which} shapes file `{path}`: {reason}")]
    ShapesFile { which: &'static str, path: String, reason: String },
    #[error("the {which} shapes name {} parameter(s) that the model does not have: {} (a typo, or the shapes of another model?)", .names.len(), quoted_list(.names))]
    UnusedShapes { which: &'static str, names: Vec<String> },
    #[error("override pattern(s) that match no parameter: {} (a typo? an override that may match nothing on purpose says \"may_match_nothing\": true)", quoted_list(.patterns))]
    UnmatchedPatterns { patterns: Vec<String> },
    #[error("overrides from {origin}: {}", .problems.join("; "))]
    Overrides { origin: String, problems: Vec<String> },
    #[error(
        "{} parameter(s) of rank >= 2 have no width dimension although other parameters have one: {}. They would be \
         vector-like, with the base lr and no weight decay (a base that differs from the target only in its vocabulary \
         or position table does this). Fix it either way: (1) give delta shapes, the same model at a second width \
         (`BaseShapes::from_var_stores(base, delta)`, or a {{\"base\": ..., \"delta\": ...}} shapes file), so the width \
         dimensions are known; or (2) declare each with an override, {{\"pattern\": \"{}\", \"class\": \"matrix_like\"}}, \
         or {{\"pattern\": \"{}\", \"fixed_size\": true}} if it does not grow with width on purpose",
        .params.len(),
        .params.iter().map(|(n, s)| format!("`{n}` {s:?}")).collect::<Vec<_>>().join(", "),
        .params[0].0,
        .params[0].0
    )]
    HiddenWithoutWidth { params: Vec<(String, Vec<i64>)> },
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

    /// Parses base shapes: either a JSON object mapping each parameter name to its shape (an array of
    /// integers), or `{"base": {...}, "delta": {...}}` with two such objects (what
    /// [`write_json`](Self::write_json) writes when delta shapes are known). Errors name `origin`.
    pub fn from_json_str(text: &str, origin: &str) -> Result<BaseShapes, ClassifyError> {
        Self::parse_json(text, origin, "base")
    }

    /// As [`from_json_str`](Self::from_json_str), with `which` (`base`, `target`) naming the file's part in
    /// error messages.
    pub fn parse_json(text: &str, origin: &str, which: &'static str) -> Result<BaseShapes, ClassifyError> {
        let err = |reason: String| ClassifyError::ShapesFile { which, path: origin.to_string(), reason };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| err("expected a JSON object mapping parameter names to shapes, or {\"base\": {...}, \"delta\": {...}}".into()))?;
        // A shape is an array, so an object under `base` or `delta` can only mean the two-part form.
        let two_part = ["base", "delta"].iter().any(|k| obj.get(*k).is_some_and(|v| v.is_object()));
        if !two_part {
            return Ok(BaseShapes::new(Self::shape_map(&value, origin, which, None)?));
        }
        let extra: Vec<&String> = obj.keys().filter(|k| *k != "base" && *k != "delta").collect();
        if !extra.is_empty() {
            return Err(err(format!("a {{\"base\": ..., \"delta\": ...}} file has no other keys, but this one also has {}", quoted_list(&extra))));
        }
        let part = |key: &'static str| {
            obj.get(key)
                .ok_or_else(|| err(format!("has no `{key}`: a {{\"base\": ..., \"delta\": ...}} file needs both, each mapping parameter names to shapes")))
                .and_then(|v| Self::shape_map(v, origin, which, Some(key)))
        };
        Ok(BaseShapes { base: part("base")?, delta: Some(part("delta")?) })
    }

    fn shape_map(value: &serde_json::Value, origin: &str, which: &'static str, part: Option<&str>) -> Result<ShapeMap, ClassifyError> {
        let prefix = part.map(|p| format!("{p}: ")).unwrap_or_default();
        let err = |reason: String| ClassifyError::ShapesFile { which, path: origin.to_string(), reason: format!("{prefix}{reason}") };
        let obj = value
            .as_object()
            .ok_or_else(|| err(format!("expected a JSON object mapping parameter names to shapes, got {value}")))?;
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
        Self::read_json_file(path, "base")
    }

    /// Reads a shapes file; `which` (`base`, `target`) names the file's part in error messages.
    pub fn read_json_file(path: &Path, which: &'static str) -> Result<BaseShapes, ClassifyError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| ClassifyError::ShapesFile { which, path: shown.clone(), reason: e.to_string() })?;
        let text = String::from_utf8(bytes).map_err(|_| ClassifyError::ShapesFile {
            which,
            path: shown.clone(),
            reason: "not a text file (not UTF-8); expected JSON mapping parameter names to shapes".into(),
        })?;
        BaseShapes::parse_json(&text, &shown, which)
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

/// What a parameter is in μP's terms, where its shape cannot tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamRole {
    /// The output layer `[vocab, d]` (μP: vector-like, its output divided by `m`, as `MuReadout` does).
    Readout,
    /// The input embedding `[vocab, d]` (μP: vector-like, nothing divided).
    Embedding,
}

impl ParamRole {
    pub fn as_str(&self) -> &'static str {
        match self {
            ParamRole::Readout => "readout",
            ParamRole::Embedding => "embedding",
        }
    }
}

/// A per-parameter adjustment selected by a name pattern.
///
/// Patterns are globs over the full parameter name: `*` matches any run of characters (dots included),
/// `?` one character. Every matching override applies, in order; a later one wins field by field. A pattern
/// that matches no parameter is an error unless `may_match_nothing` is set; an unknown field is an error.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// Declares exactly which dimensions are widths, in place of the base/delta shape test; the others may
    /// differ between base and target without being widths (a vocabulary). `[]` means no width dimension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width_dims: Option<Vec<usize>>,
    /// Declares a parameter that does not grow with width, on purpose: no width dimension, vector-like
    /// unless `class` says otherwise, and not refused as a rank ≥ 2 parameter without a width dimension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_size: Option<bool>,
    /// Declares the parameter's role (`readout`, `embedding`): vector-like unless `class` says otherwise, and
    /// no possible-readout warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<ParamRole>,
    /// Set on an override that may match no parameter; otherwise a pattern matching nothing is an error.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub may_match_nothing: bool,
}

impl Override {
    /// Every field an override object may have, as named in JSON.
    pub const FIELDS: [&'static str; 11] = [
        "pattern",
        "class",
        "width_multiplier",
        "fan_in_dim",
        "lr_multiplier",
        "wd_multiplier",
        "weight_decay",
        "width_dims",
        "fixed_size",
        "role",
        "may_match_nothing",
    ];

    pub fn new(pattern: &str) -> Override {
        Override { pattern: pattern.to_string(), ..Default::default() }
    }

    pub fn matcher(&self) -> Result<Regex, ClassifyError> {
        glob_regex(&self.pattern)
    }

    /// Parses overrides from JSON: an array of override objects, or a single one. Every problem of every
    /// entry (unknown fields, wrong types, a missing pattern) is reported at once, unknown fields with the
    /// list of valid ones. `origin` names the source in the message (`` `o.json` ``, `the --overrides argument`).
    pub fn parse_list(text: &str, origin: &str) -> Result<Vec<Override>, ClassifyError> {
        let err = |problems: Vec<String>| ClassifyError::Overrides { origin: origin.to_string(), problems };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| err(vec![format!("not valid JSON: {e}")]))?;
        let entries = match value {
            serde_json::Value::Array(a) => a,
            o @ serde_json::Value::Object(_) => vec![o],
            other => return Err(err(vec![format!("expected a JSON array of override objects, got {other}")])),
        };
        let (mut problems, mut unknown_seen, mut overrides) = (Vec::new(), false, Vec::with_capacity(entries.len()));
        for (i, entry) in entries.into_iter().enumerate() {
            let label = match entry.get("pattern").and_then(|p| p.as_str()) {
                Some(p) => format!("entry {i} (`{p}`)"),
                None => format!("entry {i}"),
            };
            let Some(obj) = entry.as_object() else {
                problems.push(format!("{label}: expected an object, got {entry}"));
                continue;
            };
            let unknown: Vec<&String> = obj.keys().filter(|k| !Override::FIELDS.contains(&k.as_str())).collect();
            if !unknown.is_empty() {
                unknown_seen = true;
                problems.push(format!("{label}: unknown field(s) {}", quoted_list(&unknown)));
                continue;
            }
            match serde_json::from_value::<Override>(entry) {
                Ok(o) => overrides.push(o),
                Err(e) => problems.push(format!("{label}: {e}")),
            }
        }
        if unknown_seen {
            problems.push(format!("valid fields: {}", Override::FIELDS.join(", ")));
        }
        if problems.is_empty() {
            Ok(overrides)
        } else {
            Err(err(problems))
        }
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

    /// Patterns that match none of `names` and do not say `may_match_nothing`.
    pub fn unmatched<'a>(&'a self, names: &[&str]) -> Vec<&'a str> {
        self.rules
            .iter()
            .filter(|(re, o)| !o.may_match_nothing && !names.iter().any(|n| re.is_match(n)))
            .map(|(_, o)| o.pattern.as_str())
            .collect()
    }
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

/// Every override matching a parameter, folded in order: a later override's field replaces an earlier one's.
struct MergedOverride {
    class: Option<ParamClass>,
    fan_in_dim: Option<usize>,
    width_multiplier: Option<f64>,
    lr_multiplier: f64,
    wd_multiplier: f64,
    weight_decay: Option<f64>,
    width_dims: Option<Vec<usize>>,
    fixed_size: Option<bool>,
    role: Option<ParamRole>,
}

impl MergedOverride {
    fn of(name: &str, shape: &[i64], overrides: &Overrides) -> Result<MergedOverride, ClassifyError> {
        let mut m = MergedOverride {
            class: None,
            fan_in_dim: None,
            width_multiplier: None,
            lr_multiplier: 1.0,
            wd_multiplier: 1.0,
            weight_decay: None,
            width_dims: None,
            fixed_size: None,
            role: None,
        };
        for o in overrides.matching(name) {
            if let Some(d) = o.fan_in_dim {
                if d >= shape.len() {
                    return Err(ClassifyError::FanInDimOutOfRange { name: name.to_string(), dim: d, shape: shape.to_vec(), rank: shape.len() });
                }
                m.fan_in_dim = Some(d);
            }
            m.class = o.class.or(m.class);
            m.width_multiplier = o.width_multiplier.or(m.width_multiplier);
            m.lr_multiplier = o.lr_multiplier.unwrap_or(m.lr_multiplier);
            m.wd_multiplier = o.wd_multiplier.unwrap_or(m.wd_multiplier);
            m.weight_decay = o.weight_decay.or(m.weight_decay);
            m.width_dims = o.width_dims.clone().or(m.width_dims);
            m.fixed_size = o.fixed_size.or(m.fixed_size);
            m.role = o.role.or(m.role);
        }
        Ok(m)
    }
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

    #[test]
    fn override_lists_report_every_unknown_field_of_every_entry_with_the_valid_fields() {
        let text = r#"[{"pattern": "a.*", "clas": "vector_like"}, {"pattern": "b", "lr_multiplier": 2}, {"pattern": "c", "wd_mult": 1, "rol": "readout"}]"#;
        let e = Override::parse_list(text, "o.json").unwrap_err().to_string();
        assert!(e.contains("o.json") && e.contains("entry 0 (`a.*`)") && e.contains("`clas`"), "{e}");
        assert!(e.contains("entry 2 (`c`)") && e.contains("`wd_mult`") && e.contains("`rol`") && !e.contains("entry 1"), "{e}");
        assert!(e.contains("valid fields: pattern, class,") && e.contains("may_match_nothing"), "{e}");
        let e = Override::parse_list(r#"[{"pattern": "a", "class": "hidden"}, {"lr_multiplier": 1}]"#, "x").unwrap_err().to_string();
        assert!(e.contains("entry 0 (`a`)") && e.contains("hidden") && e.contains("entry 1") && e.contains("pattern"), "{e}");
        let one = Override::parse_list(r#"{"pattern": "a", "fixed_size": true}"#, "inline").unwrap();
        assert_eq!(one, vec![Override { fixed_size: Some(true), ..Override::new("a") }]);
    }

    #[test]
    fn the_list_of_valid_override_fields_is_every_field_of_the_struct() {
        let full = Override {
            pattern: "p".into(),
            class: Some(ParamClass::MatrixLike),
            width_multiplier: Some(1.0),
            fan_in_dim: Some(0),
            lr_multiplier: Some(1.0),
            wd_multiplier: Some(1.0),
            weight_decay: Some(0.0),
            width_dims: Some(vec![]),
            fixed_size: Some(false),
            role: Some(ParamRole::Readout),
            may_match_nothing: true,
        };
        let value = serde_json::to_value(&full).unwrap();
        let mut keys: Vec<&str> = value.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut fields = Override::FIELDS.to_vec();
        keys.sort_unstable();
        fields.sort_unstable();
        assert_eq!(keys, fields);
        assert_eq!(Override::parse_list(&value.to_string(), "x").unwrap(), vec![full]);
    }

    #[test]
    fn a_two_part_shapes_file_must_have_exactly_base_and_delta() {
        let e = BaseShapes::parse_json(r#"{"base": {"w": [4]}}"#, "s.json", "target").unwrap_err().to_string();
        assert!(e.starts_with("target shapes file `s.json`") && e.contains("no `delta`"), "{e}");
        let e = BaseShapes::from_json_str(r#"{"base": {"w": [4]}, "delta": {"w": [8]}, "extra": {}}"#, "s.json").unwrap_err().to_string();
        assert!(e.starts_with("base shapes file `s.json`") && e.contains("`extra`"), "{e}");
        let e = BaseShapes::from_json_str(r#"{"base": {"w": [4]}, "delta": {"w": ["x"]}}"#, "s.json").unwrap_err().to_string();
        assert!(e.contains("delta: `w`"), "{e}");
    }
}
