//! The wire protocol: one JSON-encoded [`Envelope`] per line (see `docs/protocol.md`).
//!
//! Decoding is strict. A line is rejected, with a [`RejectReason`] that the daemon counts in
//! `gainguard_ingest_rejected_total{reason}`, when it is not JSON, does not match the schema, carries a
//! protocol version this daemon does not speak, or carries values that cannot be true (negative durations,
//! a negative singular value, a non-finite float from an in-process sender, ...).

use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde::Deserialize;

use crate::events::{Envelope, Event, Goodbye, Hello, ParamsTable, SpectrumSample, StepEvent, PROTOCOL_VERSION};

mod scan;

/// Default maximum length of one line, newline excluded.
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;
/// Longest accepted `run`, `host` or parameter name.
pub const MAX_NAME_BYTES: usize = 256;

/// Why an input line or event was refused. The string form is the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not JSON, or truncated (including a connection that closed mid-line).
    Malformed,
    /// Valid JSON, but missing fields, unknown fields or wrong types.
    Schema,
    /// `v` is not a version this daemon speaks.
    UnknownVersion,
    /// Longer than the maximum line length; skipped up to the next newline without buffering it.
    LineTooLong,
    /// Finite-but-impossible or non-finite numbers, empty or over-long names.
    InvalidValue,
    TooManyRuns,
    TooManyParams,
    TooManySeries,
    TooManyConnections,
    /// A TCP connection whose first line was not the right token (see docs/protocol.md, "Authentication").
    Unauthenticated,
    /// A Unix peer whose uid is neither the daemon's nor in `--ingest-allow-uid`.
    UidNotAllowed,
    /// The line would have pushed the unfinished lines of all connections past `--ingest-buffer-bytes`.
    BufferFull,
}

impl RejectReason {
    pub const ALL: [RejectReason; 12] = [
        RejectReason::Malformed,
        RejectReason::Schema,
        RejectReason::UnknownVersion,
        RejectReason::LineTooLong,
        RejectReason::InvalidValue,
        RejectReason::TooManyRuns,
        RejectReason::TooManyParams,
        RejectReason::TooManySeries,
        RejectReason::TooManyConnections,
        RejectReason::Unauthenticated,
        RejectReason::UidNotAllowed,
        RejectReason::BufferFull,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::Schema => "schema",
            RejectReason::UnknownVersion => "unknown_version",
            RejectReason::LineTooLong => "line_too_long",
            RejectReason::InvalidValue => "invalid_value",
            RejectReason::TooManyRuns => "too_many_runs",
            RejectReason::TooManyParams => "too_many_params",
            RejectReason::TooManySeries => "too_many_series",
            RejectReason::TooManyConnections => "too_many_connections",
            RejectReason::Unauthenticated => "unauthenticated",
            RejectReason::UidNotAllowed => "uid_not_allowed",
            RejectReason::BufferFull => "buffer_full",
        }
    }
}

/// A refused line or event, with a message naming what was wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason:?}: {detail}")]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection { reason, detail: detail.into() }
    }
}

/// Event type names, the `type` label of `gainguard_ingest_events_total`.
pub fn event_type(event: &Event) -> &'static str {
    match event {
        Event::Hello(_) => "hello",
        Event::Params(_) => "params",
        Event::Step(_) => "step",
        Event::Spectrum(_) => "spectrum",
        Event::Goodbye(_) => "goodbye",
    }
}

pub const EVENT_TYPES: [&str; 5] = ["hello", "params", "step", "spectrum", "goodbye"];

/// Serializes one envelope as a line, newline included.
pub fn encode_line(envelope: &Envelope) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = serde_json::to_vec(envelope)?;
    line.push(b'\n');
    Ok(line)
}

/// The `type` of an event object.
#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum EventType {
    Hello,
    Params,
    Step,
    Spectrum,
    Goodbye,
}

impl EventType {
    fn payload<'de, D: Deserializer<'de>>(self, d: D) -> Result<Event, D::Error> {
        Ok(match self {
            EventType::Hello => Event::Hello(Hello::deserialize(d)?),
            EventType::Params => Event::Params(ParamsTable::deserialize(d)?),
            EventType::Step => Event::Step(StepEvent::deserialize(d)?),
            EventType::Spectrum => Event::Spectrum(SpectrumSample::deserialize(d)?),
            EventType::Goodbye => Event::Goodbye(Goodbye::deserialize(d)?),
        })
    }
}

/// The wire form of [`Event`]: an object whose `type` field names the payload, the payload's fields beside
/// it. When `type` comes first (as every encoder here writes it), the rest of the object is read straight
/// into the payload; otherwise the object is collected first and then read.
impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Event, D::Error> {
        struct EventVisitor;
        impl<'de> Visitor<'de> for EventVisitor {
            type Value = Event;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an event object with a \"type\" field")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Event, A::Error> {
                let Some(first) = map.next_key::<std::borrow::Cow<'de, str>>()? else {
                    return Err(A::Error::missing_field("type"));
                };
                if first == "type" {
                    let t: EventType = map.next_value()?;
                    return t.payload(serde::de::value::MapAccessDeserializer::new(map));
                }
                let mut object = serde_json::Map::new();
                object.insert(first.into_owned(), map.next_value()?);
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    object.insert(k, v);
                }
                let t = object.remove("type").ok_or_else(|| A::Error::missing_field("type"))?;
                let t = EventType::deserialize(t).map_err(A::Error::custom)?;
                t.payload(serde_json::Value::Object(object)).map_err(A::Error::custom)
            }
        }
        d.deserialize_map(EventVisitor)
    }
}

#[derive(serde::Deserialize)]
struct VersionOnly {
    v: u32,
}

/// Decodes and validates one line (without its newline). Step and spectrum events in the encoders' form take
/// a hand-written path (`wire/scan.rs`); every other line, and every line that path is unsure of, goes
/// through serde, which alone decides what is refused and why.
pub fn decode_line(line: &[u8]) -> Result<Envelope, Rejection> {
    LineDecoder::default().decode(line)
}

/// [`decode_line`] for the lines of one sender: consecutive lines that carry the same run or host name share
/// one allocation of it.
#[derive(Default)]
pub struct LineDecoder {
    names: scan::Names,
}

impl LineDecoder {
    pub fn decode(&mut self, line: &[u8]) -> Result<Envelope, Rejection> {
        match scan::decode(line, &mut self.names) {
            Some(envelope) => check(envelope),
            None => decode_line_serde(line),
        }
    }
}

/// [`decode_line`] through serde alone: the reference the hand-written path is tested and benchmarked against.
pub fn decode_line_serde(line: &[u8]) -> Result<Envelope, Rejection> {
    let envelope: Envelope = match serde_json::from_slice(line) {
        Ok(e) => e,
        Err(err) => {
            use serde_json::error::Category;
            return Err(match err.classify() {
                Category::Data => match serde_json::from_slice::<VersionOnly>(line) {
                    Ok(VersionOnly { v }) if v != PROTOCOL_VERSION => {
                        Rejection::new(RejectReason::UnknownVersion, format!("protocol version {v}, expected {PROTOCOL_VERSION}"))
                    }
                    _ => Rejection::new(RejectReason::Schema, err.to_string()),
                },
                // Python's json.dumps writes NaN/Infinity tokens that JSON does not have.
                _ if contains_nonfinite_token(line) => {
                    Rejection::new(RejectReason::InvalidValue, format!("non-finite number token: {err}"))
                }
                _ => Rejection::new(RejectReason::Malformed, err.to_string()),
            });
        }
    };
    check(envelope)
}

/// The version and value checks every decoded line passes.
fn check(envelope: Envelope) -> Result<Envelope, Rejection> {
    if envelope.v != PROTOCOL_VERSION {
        return Err(Rejection::new(
            RejectReason::UnknownVersion,
            format!("protocol version {}, expected {PROTOCOL_VERSION}", envelope.v),
        ));
    }
    validate(&envelope)?;
    Ok(envelope)
}

/// True when the line has a `NaN` or `Infinity` token outside a string (Python's `json.dumps` writes them);
/// the same letters inside a string, such as a run named "NaN-probe", do not count.
fn contains_nonfinite_token(line: &[u8]) -> bool {
    let mut in_string = false;
    let mut escaped = false;
    for (i, &b) in line.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else if line[i..].starts_with(b"NaN") || line[i..].starts_with(b"Infinity") {
            return true;
        }
    }
    false
}

/// The first line a TCP sender writes: `{"auth":"TOKEN"}`.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthLine {
    pub auth: String,
}

/// What the daemon answers a new connection, one line, before it reads any event: `{"status":"ok"}`, or
/// `{"status":"refused","reason":"..."}` (a `gainguard_ingest_rejected_total` reason) just before it closes.
/// The daemon writes nothing else, so a sender that reads the greeting knows its events will be read.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Greeting {
    Ok,
    Refused { reason: String },
}

impl Greeting {
    pub fn refused(reason: RejectReason) -> Greeting {
        Greeting::Refused { reason: reason.as_str().to_string() }
    }

    /// The greeting as a line, newline included.
    pub fn line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

/// Checks the values a well-behaved plugin can produce. Also applied to in-process (embedded) events,
/// where a non-finite float can arrive without passing through JSON.
pub fn validate(envelope: &Envelope) -> Result<(), Rejection> {
    name("run", &envelope.run)?;
    name("host", &envelope.host)?;
    match &envelope.event {
        Event::Hello(h) => {
            if h.rule.len() > MAX_NAME_BYTES {
                return invalid("hello.rule is longer than 256 bytes");
            }
            opt_finite("hello.gamma", h.gamma)?;
            opt_finite("hello.alpha", h.alpha)?;
            if let Some(r) = &h.reference {
                if r.len() > 4096 {
                    return invalid("hello.reference is longer than 4096 bytes");
                }
            }
            if h.planned_steps == Some(0) {
                return invalid("hello.planned_steps is 0; omit it when unknown");
            }
        }
        Event::Params(t) => {
            for p in &t.params {
                name("params[].name", &p.name)?;
                positive("params[].width_multiplier", p.width_multiplier)?;
                non_negative("params[].lr", p.lr)?;
                non_negative("params[].weight_decay", p.weight_decay)?;
            }
        }
        Event::Step(s) => {
            if let Some(loss) = s.loss {
                finite("step.loss", loss)?;
            }
            opt_non_negative("step.duration_seconds", s.duration_seconds)?;
            non_negative("step.timestamp_seconds", s.timestamp_seconds)?;
            non_negative("step.lr_multiplier", s.lr_multiplier)?;
            non_negative("step.wd_multiplier", s.wd_multiplier)?;
        }
        Event::Spectrum(s) => {
            name("spectrum.param", &s.param)?;
            opt_non_negative("spectrum.sigma_max", s.sigma_max)?;
            for v in &s.top_k {
                non_negative("spectrum.top_k[]", *v)?;
            }
            opt_non_negative("spectrum.sigma_max_normalized", s.sigma_max_normalized)?;
            opt_non_negative("spectrum.reference_sigma_max", s.reference_sigma_max)?;
            opt_non_negative("spectrum.gain_ratio", s.gain_ratio)?;
            opt_non_negative("spectrum.stable_rank", s.stable_rank)?;
            opt_non_negative("spectrum.frobenius_norm", s.frobenius_norm)?;
            opt_non_negative("spectrum.effective_rank", s.effective_rank)?;
            opt_non_negative("spectrum.update_ratio", s.update_ratio)?;
            opt_non_negative("spectrum.decay_horizon", s.decay_horizon)?;
            non_negative("spectrum.duration_seconds", s.duration_seconds)?;
            if let Some(q) = &s.quantiles {
                for (n, v) in [("p10", q.p10), ("p50", q.p50), ("p90", q.p90), ("p99", q.p99)] {
                    non_negative(&format!("spectrum.quantiles.{n}"), v)?;
                }
            }
            if let Some(p) = s.progress {
                finite("spectrum.progress", p)?;
                if !(0.0..=1.0).contains(&p) {
                    return invalid(format!("spectrum.progress = {p}, expected a value in [0, 1]"));
                }
            }
        }
        Event::Goodbye(g) => {
            if g.reason.len() > MAX_NAME_BYTES {
                return invalid("goodbye.reason is longer than 256 bytes");
            }
        }
    }
    Ok(())
}

fn invalid<T>(detail: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection::new(RejectReason::InvalidValue, detail))
}

fn name(field: &str, value: &str) -> Result<(), Rejection> {
    if value.is_empty() {
        return invalid(format!("{field} is empty"));
    }
    if value.len() > MAX_NAME_BYTES {
        return invalid(format!("{field} is {} bytes long, expected at most {MAX_NAME_BYTES}", value.len()));
    }
    Ok(())
}

fn finite(field: &str, v: f64) -> Result<(), Rejection> {
    if v.is_finite() {
        Ok(())
    } else {
        invalid(format!("{field} = {v}, expected a finite number"))
    }
}

fn opt_finite(field: &str, v: Option<f64>) -> Result<(), Rejection> {
    v.map_or(Ok(()), |v| finite(field, v))
}

fn non_negative(field: &str, v: f64) -> Result<(), Rejection> {
    finite(field, v)?;
    if v < 0.0 {
        return invalid(format!("{field} = {v}, expected a value >= 0"));
    }
    Ok(())
}

fn opt_non_negative(field: &str, v: Option<f64>) -> Result<(), Rejection> {
    v.map_or(Ok(()), |v| non_negative(field, v))
}

fn positive(field: &str, v: f64) -> Result<(), Rejection> {
    finite(field, v)?;
    if v <= 0.0 {
        return invalid(format!("{field} = {v}, expected a value > 0"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::StepEvent;

    fn step_line(v: u32, extra: &str) -> String {
        format!(r#"{{"v":{v},"run":"r","rank":0,"host":"h","step":1,"event":{{"type":"step","timestamp_seconds":5.0{extra}}}}}"#)
    }

    #[test]
    fn a_well_formed_line_decodes() {
        assert!(decode_line(step_line(1, "").as_bytes()).is_ok());
    }

    #[test]
    fn each_kind_of_bad_line_gets_its_own_reason() {
        let cases: &[(&str, RejectReason)] = &[
            (r#"{"v":1,"run":"r","rank":0,"#, RejectReason::Malformed),
            ("not json at all", RejectReason::Malformed),
            (&step_line(2, ""), RejectReason::UnknownVersion),
            (r#"{"v":7,"whatever":true}"#, RejectReason::UnknownVersion),
            (&step_line(1, r#","tokens":"many""#), RejectReason::Schema),
            (&step_line(1, r#","loss":NaN"#), RejectReason::InvalidValue),
            (&step_line(1, r#","loss":-Infinity"#), RejectReason::InvalidValue),
            (r#"{"v":1,"run":"NaN-probe","rank":0,"#, RejectReason::Malformed),
            (r#"{"v":1,"run":"a \"Infinity\" run","#, RejectReason::Malformed),
            (&step_line(1, r#","duration_seconds":-1.0"#), RejectReason::InvalidValue),
            (r#"{"v":1,"run":"","rank":0,"host":"h","step":1,"event":{"type":"goodbye","reason":"x"}}"#, RejectReason::InvalidValue),
            (
                r#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"spectrum","param":"w","class":"matrix_like","decay_horizon":-0.5}}"#,
                RejectReason::InvalidValue,
            ),
        ];
        for (line, want) in cases {
            let got = decode_line(line.as_bytes()).expect_err(line);
            assert_eq!(got.reason, *want, "{line}: {got}");
        }
    }

    #[test]
    fn an_event_decodes_the_same_whatever_the_position_of_its_type() {
        let first = step_line(1, r#","tokens":7"#);
        let last = r#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"timestamp_seconds":5.0,"tokens":7,"type":"step"}}"#;
        assert_eq!(decode_line(first.as_bytes()).unwrap(), decode_line(last.as_bytes()).unwrap());
        for bad in [r#"{"timestamp_seconds":5.0}"#, r#"{"type":"teleport"}"#, r#"{"tokens":1,"type":"nope"}"#, "{}"] {
            let line = format!(r#"{{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{bad}}}"#);
            assert_eq!(decode_line(line.as_bytes()).unwrap_err().reason, RejectReason::Schema, "{bad}");
        }
    }

    #[test]
    fn an_in_process_non_finite_float_is_invalid() {
        let e = Envelope::new("r", 0, "h", 1, Event::Step(StepEvent { loss: Some(f64::NAN), ..Default::default() }));
        assert_eq!(validate(&e).unwrap_err().reason, RejectReason::InvalidValue);
    }

    #[test]
    fn encode_then_decode_is_the_identity() {
        let e = Envelope::new("r", 2, "h", 9, Event::Step(StepEvent { loss: Some(0.25), tokens: 7, ..Default::default() }));
        let line = encode_line(&e).unwrap();
        assert_eq!(*line.last().unwrap(), b'\n');
        assert_eq!(decode_line(&line[..line.len() - 1]).unwrap(), e);
    }
}
