//! What the page judges by, read from the alert rules themselves (dashboards/prometheus/gainguard.rules.yml,
//! built into the binary): the gain-drift bands and the horizon gate from the `gainguard-config` group, and
//! each evaluated alert's `for:`, severity and runbook link. The thresholds written inside the expressions
//! (1.5, 0.1, 600 s, ...) are constants in [`super::alerts`]; a test checks each one against the rule's
//! text, so that an edit to the rules that the page does not follow fails `cargo test`.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

/// The rules file, as Prometheus loads it.
pub const RULES_YAML: &str = include_str!("../../../dashboards/prometheus/gainguard.rules.yml");

/// GainDrift's band and gate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Band {
    pub lower: f64,
    pub upper: f64,
    pub severe_lower: f64,
    pub severe_upper: f64,
    /// Decay horizon below which a matrix is not judged.
    pub min_decay_horizon: f64,
}

/// An alert as the rules file defines it.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertRule {
    pub expr: String,
    pub for_: Duration,
    pub severity: String,
    pub runbook_url: String,
}

#[derive(Clone, Debug)]
pub struct Rules {
    pub band: Band,
    pub alerts: HashMap<String, AlertRule>,
}

#[derive(serde::Deserialize)]
struct File {
    groups: Vec<Group>,
}

#[derive(serde::Deserialize)]
struct Group {
    rules: Vec<Rule>,
}

#[derive(serde::Deserialize)]
struct Rule {
    record: Option<String>,
    alert: Option<String>,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    labels: HashMap<String, String>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

/// A Prometheus duration as the rules use them: `90s`, `10m`, `1h`.
fn duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| format!("`{s}` has no unit"))?);
    let n: u64 = n.parse().map_err(|_| format!("`{s}` is not a duration"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("`{s}`: unit `{unit}` not understood")),
    };
    Ok(Duration::from_secs(secs))
}

impl Rules {
    /// The rules built into the binary.
    pub fn builtin() -> &'static Rules {
        static RULES: std::sync::OnceLock<Rules> = std::sync::OnceLock::new();
        RULES.get_or_init(|| Rules::parse(RULES_YAML).expect("the built-in rules file parses (a unit test checks it)"))
    }

    pub fn parse(yaml: &str) -> Result<Rules, String> {
        let file: File = serde_yaml_ng::from_str(yaml).map_err(|e| format!("rules file: {e}"))?;
        let mut constants = HashMap::new();
        let mut alerts = HashMap::new();
        for rule in file.groups.into_iter().flat_map(|g| g.rules) {
            if let Some(record) = rule.record {
                let e = rule.expr.trim();
                if let Some(v) = e.strip_prefix("vector(").and_then(|r| r.strip_suffix(')')) {
                    let v: f64 = v.trim().parse().map_err(|_| format!("rule {record}: `{e}` is not vector(<number>)"))?;
                    constants.insert(record, v);
                }
            } else if let Some(name) = rule.alert {
                let for_ = rule.for_.as_deref().map(duration).transpose().map_err(|e| format!("alert {name}: for: {e}"))?;
                alerts.insert(
                    name,
                    AlertRule {
                        expr: rule.expr,
                        for_: for_.unwrap_or_default(),
                        severity: rule.labels.get("severity").cloned().unwrap_or_default(),
                        runbook_url: rule.annotations.get("runbook_url").cloned().unwrap_or_default(),
                    },
                );
            }
        }
        let c = |name: &str| constants.get(name).copied().ok_or_else(|| format!("rules file: no constant rule `{name}`"));
        let band = Band {
            lower: c("gainguard:gain_drift_band_lower")?,
            upper: c("gainguard:gain_drift_band_upper")?,
            severe_lower: c("gainguard:gain_drift_severe_band_lower")?,
            severe_upper: c("gainguard:gain_drift_severe_band_upper")?,
            min_decay_horizon: c("gainguard:gain_drift_min_decay_horizon")?,
        };
        Ok(Rules { band, alerts })
    }

    pub fn alert(&self, name: &str) -> Option<&AlertRule> {
        self.alerts.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_rules_give_gain_drifts_band_and_gate() {
        let r = Rules::parse(RULES_YAML).unwrap();
        assert_eq!(r.band, Band { lower: 0.8, upper: 1.25, severe_lower: 0.5, severe_upper: 2.0, min_decay_horizon: 3.0 });
        assert_eq!(r.alert("GainDrift").unwrap().for_, Duration::from_secs(600));
        assert_eq!(r.alert("GainDriftSevere").unwrap().severity, "critical");
    }

    #[test]
    fn a_rules_file_without_a_band_constant_is_refused_naming_it() {
        let yaml = RULES_YAML.replace("gainguard:gain_drift_band_upper", "gainguard:renamed");
        let err = Rules::parse(&yaml).unwrap_err();
        assert!(err.contains("gainguard:gain_drift_band_upper"), "{err}");
        assert!(duration("5x").unwrap_err().contains("`x`"));
    }
}
