//! Overrides: per-parameter adjustments selected by glob patterns over the names, parsed from JSON with every
//! problem reported at once, compiled once per model, and folded per parameter in order.

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::error::{quoted_list, ClassifyError};
use gainguard_protocol::events::ParamClass;

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

/// Every override matching a parameter, folded in order: a later override's field replaces an earlier one's.
pub(super) struct MergedOverride {
    pub(super) class: Option<ParamClass>,
    pub(super) fan_in_dim: Option<usize>,
    pub(super) width_multiplier: Option<f64>,
    pub(super) lr_multiplier: f64,
    pub(super) wd_multiplier: f64,
    pub(super) weight_decay: Option<f64>,
    pub(super) width_dims: Option<Vec<usize>>,
    pub(super) fixed_size: Option<bool>,
    pub(super) role: Option<ParamRole>,
}

impl MergedOverride {
    pub(super) fn of(name: &str, shape: &[i64], overrides: &Overrides) -> Result<MergedOverride, ClassifyError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
