//! The shapes of the base (proxy) model, and of the same model at a second width (delta): from var stores,
//! or to and from a JSON file.

use std::collections::BTreeMap;
use std::path::Path;

use super::error::{quoted_list, ClassifyError};

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
        Self::parse(text, origin, "base")
    }

    /// [`from_json_str`](Self::from_json_str) with `which` (`base`, `target`) naming the file's part in error
    /// messages.
    fn parse(text: &str, origin: &str, which: &'static str) -> Result<BaseShapes, ClassifyError> {
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
        BaseShapes::parse(&text, &shown, which)
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_two_part_shapes_file_must_have_exactly_base_and_delta() {
        let e = BaseShapes::parse(r#"{"base": {"w": [4]}}"#, "s.json", "target").unwrap_err().to_string();
        assert!(e.starts_with("target shapes file `s.json`") && e.contains("no `delta`"), "{e}");
        let e = BaseShapes::from_json_str(r#"{"base": {"w": [4]}, "delta": {"w": [8]}, "extra": {}}"#, "s.json").unwrap_err().to_string();
        assert!(e.starts_with("base shapes file `s.json`") && e.contains("`extra`"), "{e}");
        let e = BaseShapes::from_json_str(r#"{"base": {"w": [4]}, "delta": {"w": ["x"]}}"#, "s.json").unwrap_err().to_string();
        assert!(e.contains("delta: `w`"), "{e}");
    }
}
