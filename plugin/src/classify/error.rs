//! Why a parameter could not be classified, or a shapes or overrides file read: [`ClassifyError`], each
//! variant naming the parameter, the file or the pattern.

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
