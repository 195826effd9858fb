//! The history as JSON, for the live page (docs/monitoring.md, "The live page"):
//!
//! - `GET /api/v1/overview`: the history's bound and use, GainDrift's band, the runs, the GPUs and the alerts
//!   that would be pending or firing.
//! - `GET /api/v1/run?run=R&rank=K&host=H[&points=N]`: one run's series and, per parameter, its gain ratio,
//!   sigma_max and decay horizon with the status the page marks it with.
//! - `GET /api/v1/gpus[?points=N]`: per GPU, utilisation, memory used and total, power.
//!
//! A series is `[[unix_seconds, value], ...]`, oldest first, `null` for a non-finite value; `points` (default
//! 600, at most 20000) thins it to at most that many points, keeping the latest of each stretch.

use serde_json::{json, Value};

use super::alerts::{self, median};
use super::rules::{Band, Rules};
use super::store::Ring;
use super::{points_per_series, History, ParamHist, DECAY_HORIZON, GAIN_RATIO, GPU_SERIES, PARAM_SERIES, RUN_SERIES, SIGMA_MAX};
use crate::sources::{lock, RunKey};

const DEFAULT_POINTS: usize = 600;
const MAX_POINTS: usize = 20_000;

/// Why a request was refused: the status and a message naming the culprit.
#[derive(Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

fn bad(message: String) -> ApiError {
    ApiError { status: 400, message }
}

/// Splits and percent-decodes a query string (`+` is a space).
pub fn query_pairs(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    let decode = |s: &str| -> Result<String, ApiError> {
        let mut out = Vec::with_capacity(s.len());
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
                    out.push(hex.ok_or_else(|| bad(format!("query: bad percent escape in `{s}`")))?);
                    i += 2;
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8(out).map_err(|_| bad(format!("query: `{s}` is not UTF-8 once decoded")))
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn points_param(pairs: &[(String, String)]) -> Result<usize, ApiError> {
    match param(pairs, "points") {
        None => Ok(DEFAULT_POINTS),
        Some(p) => match p.parse::<usize>() {
            Ok(n) if (2..=MAX_POINTS).contains(&n) => Ok(n),
            _ => Err(bad(format!("query parameter `points`: `{p}`, expected an integer in [2, {MAX_POINTS}]"))),
        },
    }
}

fn number(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

/// A ring as `[[t, v], ...]`, at most `max` points (the latest of each stretch, and always the latest one).
fn series(history: &History, ring: Option<&Ring>, max: usize) -> Value {
    let Some(ring) = ring else { return json!([]) };
    let points = ring.points();
    let stride = points.len().div_ceil(max).max(1);
    let n = points.len();
    let out: Vec<Value> = points
        .iter()
        .enumerate()
        .filter(|(i, _)| (n - 1 - i) % stride == 0)
        .map(|(_, p)| json!([(history.budget.unix(p.t) * 10.0).round() / 10.0, number(p.v as f64)]))
        .collect();
    Value::Array(out)
}

fn latest(ring: Option<&Ring>) -> Value {
    ring.and_then(|r| r.last()).map_or(Value::Null, |p| number(p.v as f64))
}

/// How the page marks a parameter, by the rule's own steps at its latest sample: `not_judged` (not a hidden
/// matrix), `no_ratio` (no reference profile, so no gain ratio), `gated` (decay horizon below the gate),
/// then by its 5-minute average gain ratio `severe`, `outside` or `in_band`.
pub fn status(p: &ParamHist, band: &Band) -> (&'static str, Option<f64>) {
    if p.labels.class != "matrix_like" {
        return ("not_judged", None);
    }
    let Some(gain) = p.series[GAIN_RATIO].ring() else { return ("no_ratio", None) };
    let Some(last) = gain.last() else { return ("no_ratio", None) };
    let window = (alerts::GAIN_AVG_WINDOW.0 * 10.0) as u32;
    let values: Vec<f64> = gain.window(last.t.saturating_sub(window), last.t).map(|p| p.v as f64).collect();
    let avg = values.iter().sum::<f64>() / values.len() as f64;
    if p.series[DECAY_HORIZON].ring().and_then(|r| r.at(last.t)).is_some_and(|h| (h.v as f64) < band.min_decay_horizon) {
        return ("gated", Some(avg));
    }
    let s = if avg < band.severe_lower || avg > band.severe_upper {
        "severe"
    } else if avg < band.lower || avg > band.upper {
        "outside"
    } else {
        "in_band"
    };
    (s, Some(avg))
}

pub fn overview(history: &History, rules: &Rules) -> Value {
    let s = &history.settings;
    let runs: Vec<Value> = history
        .runs()
        .into_iter()
        .map(|(key, h)| {
            let h = lock(&h);
            let statuses: Vec<&str> = h.params().map(|p| status(p, &rules.band).0).collect();
            let count = |s: &str| statuses.iter().filter(|x| **x == s).count();
            json!({
                "run": key.run, "rank": key.rank, "host": key.host,
                "up": h.up, "step": h.step, "planned_steps": h.planned_steps, "progress": h.progress().map_or(Value::Null, number),
                "exit_reason": h.exit_reason,
                "last_step_timestamp": h.last_step_timestamp.map_or(Value::Null, number),
                "loss": latest(h.series[0].ring()),
                "params": statuses.len(),
                "outside_band": count("outside") + count("severe"),
                "gated": count("gated"),
            })
        })
        .collect();
    let gpus = history.with_gpus(|gpus, up| {
        let list: Vec<Value> = gpus.values().map(|g| json!({"gpu": g.gpu, "uuid": g.uuid, "name": g.name})).collect();
        json!({"enabled": history.nvml_enabled, "up": latest(up).as_f64().map(|v| v == 1.0), "gpus": list})
    });
    json!({
        "history": {
            "bytes": history.budget.used_bytes(),
            "max_bytes": s.max_bytes,
            "series": history.budget.series(),
            "series_refused": history.budget.refused(),
            "interval_seconds": s.interval.as_secs_f64(),
            "retention_seconds": s.retention.as_secs_f64(),
            "points_per_series": points_per_series(s),
        },
        "band": rules.band,
        "runs": runs,
        "nvml": gpus,
        "alerts": alerts::evaluate(history, rules),
    })
}

pub fn run(history: &History, rules: &Rules, query: &str) -> Result<Value, ApiError> {
    let pairs = query_pairs(query)?;
    let max = points_param(&pairs)?;
    let get = |name: &str| param(&pairs, name).ok_or_else(|| bad(format!("query parameter `{name}` is missing (run, rank and host name a run)")));
    let key = RunKey { run: get("run")?.to_string(), rank: get("rank")?.to_string(), host: get("host")?.to_string() };
    let Some(h) = history.run(&key) else {
        return Err(ApiError {
            status: 404,
            message: format!("no run `{}` rank `{}` host `{}` in the history (see /api/v1/overview)", key.run, key.rank, key.host),
        });
    };
    let h = lock(&h);
    let mut run_series = serde_json::Map::new();
    for (name, slot) in RUN_SERIES.iter().zip(&h.series) {
        run_series.insert(name.to_string(), series(history, slot.ring(), max));
    }
    let params: Vec<Value> = h
        .params()
        .map(|p| {
            let (state, avg) = status(p, &rules.band);
            let mut v = json!({
                "param": p.labels.param, "layer": p.labels.layer, "class": p.labels.class,
                "status": state, "gain_ratio_avg5m": avg.map_or(Value::Null, number), "nonfinite": p.nonfinite,
                "latest": {
                    "gain_ratio": latest(p.series[GAIN_RATIO].ring()),
                    "sigma_max": latest(p.series[SIGMA_MAX].ring()),
                    "decay_horizon": latest(p.series[DECAY_HORIZON].ring()),
                },
            });
            for (name, slot) in PARAM_SERIES.iter().zip(&p.series) {
                v[*name] = series(history, slot.ring(), max);
            }
            v
        })
        .collect();
    let loss: Vec<f64> = h.series[0].ring().map(|r| r.points().iter().map(|p| p.v as f64).filter(|v| v.is_finite()).collect()).unwrap_or_default();
    Ok(json!({
        "run": key.run, "rank": key.rank, "host": key.host,
        "up": h.up, "step": h.step, "planned_steps": h.planned_steps, "exit_reason": h.exit_reason,
        "loss_median": median(loss).map_or(Value::Null, number),
        "band": rules.band,
        "series": run_series,
        "params": params,
    }))
}

pub fn gpus(history: &History, query: &str) -> Result<Value, ApiError> {
    let max = points_param(&query_pairs(query)?)?;
    Ok(history.with_gpus(|gpus, up| {
        let list: Vec<Value> = gpus
            .values()
            .map(|g| {
                let mut v = json!({"gpu": g.gpu, "uuid": g.uuid, "name": g.name});
                for (name, slot) in GPU_SERIES.iter().zip(&g.series) {
                    v[*name] = series(history, slot.ring(), max);
                }
                v
            })
            .collect();
        json!({"enabled": history.nvml_enabled, "up": series(history, up, max), "gpus": list})
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_decoded_and_a_bad_one_is_refused_naming_the_culprit() {
        let q = query_pairs("run=my%20run&rank=0&host=a+b&x").unwrap();
        assert_eq!(param(&q, "run"), Some("my run"));
        assert_eq!(param(&q, "host"), Some("a b"));
        assert_eq!(param(&q, "x"), Some(""));
        assert!(query_pairs("run=%zz").unwrap_err().message.contains("%zz"));
        let e = points_param(&query_pairs("points=1").unwrap()).unwrap_err();
        assert!(e.message.contains("`points`"), "{}", e.message);
    }
}
