//! The measurements file `gainguard calibrate` reads: one entry per hidden matrix per run, how a file of
//! another kind is named, and the checks that the entries can be fitted.

use std::collections::BTreeMap;

/// The steady-state protocol's checks of one run, as relative differences (`gainguard::steady_state`): each
/// absent when it was not run.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteadyStateChecks {
    /// sigma_max's mean over the last timescale (`H − 1 < h ≤ H`) over its mean over the one before, minus 1.
    /// Steady when `|drift| <` [`MAX_DRIFT`](super::MAX_DRIFT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<f64>,
    /// The same run from a 10× smaller init of the hidden matrices: its sigma_max over this run's, minus 1.
    /// The initialisation is forgotten when `|small_init| <` [`MAX_INIT_DIFFERENCE`](super::MAX_INIT_DIFFERENCE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub small_init: Option<f64>,
    /// The hidden matrices' lr and wd both doubled, run to the same H: its sigma_max over this run's, minus 1.
    /// Within 5% when only `lr/wd` sets the scale, as the law says; reported, not a reliability criterion (a
    /// steady state may depend on `lr·wd` too, which is what gamma* then measures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doubled_lr_wd: Option<f64>,
}

/// One entry of a calibration measurements file: the final sigma_max of one hidden matrix in one run on
/// the μP path.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measurement {
    /// The model width d of the run.
    pub width: f64,
    /// The weight-decay exponent the run used (`wd ∝ m^gamma`, with `lr ∝ 1/m`).
    pub gamma: f64,
    /// The base (proxy) learning rate given to the optimizer, before width scaling.
    pub lr: f64,
    /// The base (proxy) weight decay, before width scaling.
    pub wd: f64,
    /// The matrix's name.
    pub param: String,
    pub sigma_max: f64,
    /// The matrix's decay horizon `H = Σ_t lr_t·wd_t` when sigma_max was read (width-scaled values, schedule
    /// included; `gainguard::steady_state`). Below [`super::MIN_RELIABLE_HORIZON`], or absent, the fit is unreliable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decay_horizon: Option<f64>,
    /// Optimizer steps of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// The run's lr schedule, as text (e.g. `linear warmup 20 steps, then constant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The steady-state protocol's checks of this run, where they were made: a failed drift or init check makes
    /// the calibration unreliable ([`super::reliability`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<SteadyStateChecks>,
}

impl Measurement {
    /// An entry with the required fields only.
    pub fn new(width: f64, gamma: f64, lr: f64, wd: f64, param: impl Into<String>, sigma_max: f64) -> Measurement {
        Measurement { width, gamma, lr, wd, param: param.into(), sigma_max, decay_horizon: None, steps: None, schedule: None, seed: None, checks: None }
    }
}


/// What a measurements file looks like, for messages about a file that is something else.
pub const MEASUREMENTS_EXAMPLE: &str =
    r#"[{"width": 256, "gamma": 0.5, "lr": 0.003, "wd": 0.1, "param": "blocks.0.mlp.up.weight", "sigma_max": 4.21}, ...]"#;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("measurements file `{origin}`: {reason}")]
pub struct MeasurementsError {
    pub origin: String,
    pub reason: String,
}

/// A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON object.
fn looks_like_safetensors(bytes: &[u8]) -> bool {
    let Some(len) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))) else {
        return false;
    };
    len > 1 && len.checked_add(8).is_some_and(|end| end <= bytes.len() as u64) && bytes.get(8) == Some(&b'{')
}

/// Reads a measurements file's bytes: a JSON array of [`Measurement`] objects. A file of another kind (a
/// safetensors file, a shapes file, a single object) is named as such, with what was expected; every bad
/// entry is reported (the first 10 of them), not just the first.
pub fn parse_measurements(bytes: &[u8], origin: &str) -> Result<Vec<Measurement>, MeasurementsError> {
    let err = |what: String| MeasurementsError {
        origin: origin.to_string(),
        reason: format!("{what}; calibrate expects a JSON array with one object per hidden matrix per run: {MEASUREMENTS_EXAMPLE}"),
    };
    if looks_like_safetensors(bytes) {
        return Err(err("this is a safetensors file (tensors), not measurements (`gainguard inspect` reads safetensors files)".into()));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| err("not a text file (not UTF-8)".into()))?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| err(format!("not valid JSON ({e})")))?;
    let entries = match value {
        serde_json::Value::Array(entries) => entries,
        serde_json::Value::Object(obj) => {
            let is_shapes = crate::classify::BaseShapes::from_json_str(text, origin).is_ok_and(|b| !b.is_empty());
            let what = if is_shapes {
                "this is a shapes file (parameter names mapped to shapes, as `gainguard rules` reads), not measurements".to_string()
            } else if obj.contains_key("sigma_max") || obj.contains_key("width") {
                "this is a single measurement object; wrap the measurements in a JSON array".to_string()
            } else {
                let keys: Vec<&String> = obj.keys().take(5).collect();
                format!("this is a JSON object (keys {}), not an array", crate::classify::quoted_list(&keys))
            };
            return Err(err(what));
        }
        other => return Err(err(format!("this is a JSON {}, not an array", json_kind(&other)))),
    };
    if entries.is_empty() {
        return Err(MeasurementsError { origin: origin.to_string(), reason: "empty array, no measurements".into() });
    }
    let mut problems = Vec::new();
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        match serde_json::from_value::<Measurement>(entry) {
            Ok(m) => out.push(m),
            Err(e) => problems.push(format!("entry {i}: {e}")),
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        let mut shown: Vec<String> = problems.into_iter().take(10).collect();
        if n > 10 {
            shown.push(format!("and {} more", n - 10));
        }
        return Err(MeasurementsError {
            origin: origin.to_string(),
            reason: format!("{}; each entry looks like {MEASUREMENTS_EXAMPLE}", shown.join("; ")),
        });
    }
    Ok(out)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// Checks that the measurements can be fitted, naming the entries that cannot: finite positive values,
/// 3+ widths, 2+ gammas, and, for each matrix and gamma, 3+ widths for every base `(lr, wd)` it was run with
/// (the fit gives each matrix and base `(lr, wd)` its own constant, so a base `(lr, wd)` at one or two widths
/// only leaves the fit without degrees of freedom).
pub fn check_measurements(ms: &[Measurement], origin: &str) -> Result<(), MeasurementsError> {
    let err = |reason: String| MeasurementsError { origin: origin.to_string(), reason };
    for (i, m) in ms.iter().enumerate() {
        for (field, v) in [("width", m.width), ("lr", m.lr), ("wd", m.wd), ("sigma_max", m.sigma_max)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(err(format!("entry {i} (`{}`, width {}): {field} = {v} must be finite and > 0", m.param, m.width)));
            }
        }
        if !m.gamma.is_finite() {
            return Err(err(format!("entry {i} (`{}`): gamma = {} must be finite", m.param, m.gamma)));
        }
    }
    let widths: std::collections::BTreeSet<u64> = ms.iter().map(|m| m.width.to_bits()).collect();
    if widths.len() < 3 {
        return Err(err(format!("{} distinct widths, need at least 3", widths.len())));
    }
    let gamma_key = |g: f64| (g * 1e9).round() as i64;
    let gammas: std::collections::BTreeSet<i64> = ms.iter().map(|m| gamma_key(m.gamma)).collect();
    if gammas.len() < 2 {
        return Err(err(format!("{} distinct gamma values, need at least 2", gammas.len())));
    }
    // (param, gamma) → (lr, wd) → entry indices
    let mut runs: BTreeMap<(&str, i64), BTreeMap<(u64, u64), Vec<usize>>> = BTreeMap::new();
    for (i, m) in ms.iter().enumerate() {
        runs.entry((m.param.as_str(), gamma_key(m.gamma))).or_default().entry((m.lr.to_bits(), m.wd.to_bits())).or_default().push(i);
    }
    let mut problems = Vec::new();
    for ((param, _), bases) in &runs {
        let distinct_widths = |entries: &[usize]| {
            let mut w: Vec<f64> = entries.iter().map(|&i| ms[i].width).collect();
            w.sort_by(f64::total_cmp);
            w.dedup();
            w
        };
        if bases.len() < 2 || bases.values().all(|e| distinct_widths(e).len() >= 3) {
            continue;
        }
        let gamma = ms[bases.values().next().expect("a group has entries")[0]].gamma;
        let each: Vec<String> = bases
            .iter()
            .map(|((lr, wd), entries)| {
                let list = entries.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
                format!("lr {} wd {} at widths {:?} (entries {list})", f64::from_bits(*lr), f64::from_bits(*wd), distinct_widths(entries))
            })
            .collect();
        problems.push(format!("`{param}` at gamma {gamma}: {}", each.join(" vs ")));
    }
    if !problems.is_empty() {
        return Err(err(format!(
            "entries disagree on the base (lr, wd): {}. Give every run of a matrix and gamma the same base lr and wd (the \
             proxy's, which the rule scales), or run each base (lr, wd) at 3 or more widths",
            problems.join("; ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measurement(param: &str, gamma: f64, width: f64, wd: f64) -> Measurement {
        Measurement::new(width, gamma, 0.003, wd, param, 1.0 + width / 1000.0)
    }

    #[test]
    fn a_safetensors_or_binary_file_is_named_as_such_with_what_was_expected() {
        let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0, 0, 0x80, 0xff, 0, 0, 0x80, 0x3f]);
        let e = parse_measurements(&bytes, "model.safetensors").unwrap_err().to_string();
        assert!(e.contains("`model.safetensors`") && e.contains("safetensors file") && e.contains("JSON array") && e.contains("sigma_max"), "{e}");
        // Zero data bytes are valid UTF-8: the framing, not the encoding, tells a safetensors file.
        let mut zeros = (header.len() as u64).to_le_bytes().to_vec();
        zeros.extend_from_slice(header);
        zeros.extend_from_slice(&[0; 8]);
        assert!(parse_measurements(&zeros, "z").unwrap_err().to_string().contains("safetensors file"));
        let e = parse_measurements(&[0xff, 0xfe, 0x00], "blob").unwrap_err().to_string();
        assert!(e.contains("not a text file") && e.contains("JSON array"), "{e}");
    }

    #[test]
    fn a_shapes_file_or_a_single_object_is_named_as_such() {
        let e = parse_measurements(br#"{"blocks.0.w": [64, 64], "norm": [64]}"#, "shapes.json").unwrap_err().to_string();
        assert!(e.contains("shapes file") && e.contains("JSON array"), "{e}");
        let e = parse_measurements(br#"{"base": {"w": [4]}, "delta": {"w": [8]}}"#, "shapes.json").unwrap_err().to_string();
        assert!(e.contains("shapes file"), "{e}");
        let e = parse_measurements(br#"{"width": 64, "gamma": 0.5, "lr": 0.01, "wd": 0.1, "param": "w", "sigma_max": 2}"#, "m").unwrap_err();
        assert!(e.to_string().contains("single measurement object") && e.to_string().contains("array"), "{e}");
    }

    #[test]
    fn every_bad_entry_is_named_by_its_index() {
        let text = br#"[{"width": 64, "gamma": 0.5, "lr": 0.01, "wd": 0.1, "param": "w", "sigma_max": 2},
                        {"width": 64, "gamma": 0.5, "lr": 0.01, "wd": 0.1, "param": "w"},
                        {"width": 64, "gamma": 0.5, "lr": 0.01, "wd": 0.1, "param": "w", "sigma_max": 2, "sigma": 1}]"#;
        let e = parse_measurements(text, "m.json").unwrap_err().to_string();
        assert!(e.contains("entry 1: missing field `sigma_max`") && e.contains("entry 2: unknown field `sigma`") && !e.contains("entry 0"), "{e}");
    }

    #[test]
    fn entries_that_disagree_on_the_base_lr_and_wd_are_named_with_their_widths() {
        let mut ms: Vec<Measurement> = [0.0, 1.0].iter().flat_map(|&g| [64.0, 128.0, 256.0].map(|w| measurement("w", g, w, 0.1))).collect();
        assert_eq!(check_measurements(&ms, "m.json"), Ok(()));
        ms[4].wd = 0.2; // gamma 1, width 128
        let e = check_measurements(&ms, "m.json").unwrap_err().to_string();
        assert!(e.contains("disagree on the base (lr, wd)") && e.contains("`w` at gamma 1"), "{e}");
        assert!(e.contains("wd 0.1 at widths [64.0, 256.0] (entries 3, 5)") && e.contains("wd 0.2 at widths [128.0] (entries 4)"), "{e}");
        // A second base (lr, wd) run at 3 widths of its own is a fixed effect the fit handles.
        ms[4].wd = 0.1;
        ms.extend([64.0, 128.0, 256.0].map(|w| measurement("w", 1.0, w, 0.2)));
        assert_eq!(check_measurements(&ms, "m.json"), Ok(()));
    }

    #[test]
    fn a_measurement_with_its_horizon_steps_schedule_and_seed_parses_and_an_unknown_field_does_not() {
        let text = br#"[{"width": 64, "gamma": 0.5, "lr": 0.01, "wd": 0.1, "param": "w", "sigma_max": 2,
                         "decay_horizon": 6.5, "steps": 400, "schedule": "constant", "seed": 2}]"#;
        let ms = parse_measurements(text, "m.json").unwrap();
        assert_eq!((ms[0].decay_horizon, ms[0].steps, ms[0].seed), (Some(6.5), Some(400), Some(2)));
        let checked = br#"[{"width": 64, "gamma": 0.5, "lr": 0.01, "wd": 0.1, "param": "w", "sigma_max": 2,
                            "checks": {"drift": -0.076, "small_init": 0.01, "doubled_lr_wd": 0.3}}]"#;
        let c = parse_measurements(checked, "m.json").unwrap()[0].checks.clone().unwrap();
        assert_eq!((c.drift, c.small_init, c.doubled_lr_wd), (Some(-0.076), Some(0.01), Some(0.3)));
        let typo = br#"[{"width": 64, "gamma": 0.5, "lr": 0.01, "wd": 0.1, "param": "w", "sigma_max": 2, "checks": {"drfit": 0.1}}]"#;
        assert!(parse_measurements(typo, "m.json").unwrap_err().to_string().contains("unknown field `drfit`"));
        let bad = br#"[{"width": 64, "gamma": 0.5, "lr": 0.01, "wd": 0.1, "param": "w", "sigma_max": 2, "horizon": 6.5}]"#;
        assert!(parse_measurements(bad, "m.json").unwrap_err().to_string().contains("unknown field `horizon`"));
    }

}
