//! Differential tests: the hand-written path against serde on the same bytes.

use super::Names;
use crate::events::*;
use crate::wire::{decode_line, decode_line_serde, encode_line, LineDecoder};

/// xorshift64*: a fixed, dependency-free sequence, so that a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    /// Any finite f64: random bits (every magnitude, subnormals, -0.0) or a plain value.
    fn float(&mut self) -> f64 {
        loop {
            let v = match self.below(4) {
                0 => f64::from_bits(self.next()),
                1 => self.below(1000) as f64,
                2 => self.below(1_000_000) as f64 / 1000.0,
                _ => -(self.below(100) as f64) / 7.0,
            };
            if v.is_finite() {
                return v;
            }
        }
    }
    fn opt_float(&mut self) -> Option<f64> {
        self.chance(60).then(|| self.float())
    }
    fn name(&mut self) -> String {
        const PARTS: [&str; 10] =
            ["blocks.0.mlp.up.weight", "run-1", "NaN", "Infinity", "é漢", "a\"b", "back\\slash", "tab\there", "\u{1}", " "];
        (0..1 + self.below(3)).map(|_| *self.pick(&PARTS)).collect()
    }
    fn int(&mut self) -> u64 {
        match self.below(3) {
            0 => self.next(),
            1 => self.next() % 100,
            _ => u64::from(u32::MAX) + self.next() % 3 - 1,
        }
    }
}

fn step(r: &mut Rng) -> Event {
    Event::Step(StepEvent {
        loss: r.opt_float(),
        loss_nonfinite: r.chance(20),
        tokens: r.int(),
        duration_seconds: r.opt_float(),
        timestamp_seconds: r.float(),
        lr_multiplier: r.float(),
        wd_multiplier: r.float(),
        spectrum_samples_dropped_total: r.int(),
        events_dropped_total: r.int(),
        nonfinite_parameters: r.chance(50).then(|| r.int()),
        skipped_steps_total: r.int(),
    })
}

fn spectrum(r: &mut Rng) -> Event {
    Event::Spectrum(SpectrumSample {
        sigma_max: r.opt_float(),
        top_k: (0..r.below(4)).map(|_| r.float()).collect(),
        iterations: r.next() as u32,
        sigma_max_normalized: r.opt_float(),
        reference_sigma_max: r.opt_float(),
        gain_ratio: r.opt_float(),
        stable_rank: r.opt_float(),
        frobenius_norm: r.opt_float(),
        effective_rank: r.opt_float(),
        quantiles: r.chance(50).then(|| SpectrumQuantiles { p10: r.float(), p50: r.float(), p90: r.float(), p99: r.float() }),
        update_ratio: r.opt_float(),
        nonfinite: r.chance(20),
        duration_seconds: r.float(),
        progress: r.opt_float(),
        ..SpectrumSample::empty(r.name(), r.chance(70).then(|| r.next() as u32), *r.pick(&[ParamClass::MatrixLike, ParamClass::VectorLike]))
    })
}

fn envelope(r: &mut Rng) -> Envelope {
    let event = match r.below(10) {
        0 => Event::Goodbye(Goodbye { reason: r.name() }),
        1..=5 => step(r),
        _ => spectrum(r),
    };
    Envelope::new(r.name(), r.next() as u32, r.name(), r.int(), event)
}

fn line(e: &Envelope) -> Vec<u8> {
    let mut l = encode_line(e).unwrap();
    l.pop();
    l
}

/// Floats compare by their bits (Debug prints -0.0 and every distinct finite value distinctly).
fn same(a: &Envelope, b: &Envelope) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// The claim itself, for one line: what the hand-written path accepts, serde accepts with the same values;
/// and the full decoder answers exactly what serde alone answers.
fn agree(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line);
    let fast = super::decode(line, &mut Names::default());
    if let Some(f) = &fast {
        match serde_json::from_slice::<Envelope>(line) {
            Ok(s) => assert!(same(f, &s), "{text}\n fast:  {f:?}\n serde: {s:?}"),
            Err(e) => panic!("{text}: the fast path accepted what serde refuses ({e}): {f:?}"),
        }
    }
    match (decode_line(line), decode_line_serde(line)) {
        (Ok(a), Ok(b)) => assert!(same(&a, &b), "{text}\n {a:?}\n {b:?}"),
        (Err(a), Err(b)) => assert_eq!(a, b, "{text}"),
        (a, b) => panic!("{text}: decode_line {a:?} but serde alone {b:?}"),
    }
    fast.is_some()
}

fn splice(template: &str, value: &str) -> Vec<u8> {
    template.replace("@", value).into_bytes()
}

#[test]
fn the_fast_path_takes_every_encoded_step_and_spectrum_line_without_escapes_and_decodes_it_as_serde_does() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut plain, mut taken) = (0, 0);
    // One sender's decoder over all the lines: a name shared from an earlier line must be the line's own.
    let mut sender = LineDecoder::default();
    for _ in 0..20_000 {
        let e = envelope(&mut r);
        let l = line(&e);
        let fast = agree(&l);
        match (sender.decode(&l), decode_line_serde(&l)) {
            (Ok(a), Ok(b)) => assert!(same(&a, &b) && same(&a, &e), "{}", String::from_utf8_lossy(&l)),
            (Err(a), Err(b)) => assert_eq!(a, b),
            (a, b) => panic!("{}: {a:?} but serde alone {b:?}", String::from_utf8_lossy(&l)),
        }
        let hot = matches!(e.event, Event::Step(_) | Event::Spectrum(_));
        if hot && !l.contains(&b'\\') {
            plain += 1;
            assert!(fast, "the encoders' form must take the fast path: {}", String::from_utf8_lossy(&l));
        }
        taken += usize::from(fast);
        assert!(!fast || hot, "only step and spectrum take the fast path");
    }
    assert!(plain > 1500 && taken == plain, "{plain} plain hot lines, {taken} taken");
}

#[test]
fn a_field_name_matches_only_itself_followed_by_its_closing_quote() {
    let long = super::Name::new(b"spectrum_samples_dropped_total");
    let short = super::Name::new(b"loss");
    for (name, rest, expected) in [
        (short, &b"loss\":1.5,\"tokens\":3}"[..], true),
        (short, b"loss\"", true),
        (short, b"loss_nonfinite\":true}", false),
        (short, b"los\":1}", false),
        (short, b"loss", false),
        (short, b"Loss\":1.5,\"tokens\":3}", false),
        (long, b"spectrum_samples_dropped_total\":0,\"x\":1}", true),
        (long, b"spectrum_samples_dropped_total\"", true),
        (long, b"spectrum_samples_dropped_totaL\":0,\"x\":1}", false),
        (long, b"spectrum_samples_dropped_tota\":0,\"x\":1}", false),
        (long, b"spectrum_samples_dropped_total", false),
    ] {
        assert_eq!(name.starts(rest), expected, "{}", String::from_utf8_lossy(rest));
    }
}

#[test]
fn hostile_lines_get_the_same_answer_and_values_from_both_paths() {
    let step = r#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":@}}"#;
    let loss = r#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1.0,"loss":@}}"#;
    let int = r#"{"v":1,"run":"r","rank":0,"host":"h","step":@,"event":{"type":"step","timestamp_seconds":1.0}}"#;
    let rank = r#"{"v":1,"run":"r","rank":@,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1.0}}"#;
    let spec = r#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"spectrum","param":"p","class":"matrix_like"@}}"#;
    let numbers = [
        "0", "-0", "-0.0", "0.0", "1", "1.0", "01", "-01", "1.", ".5", "+1", "1e", "1e+", "1E5", "1e-5", "-", "--1",
        "0e999999999999", "1e400", "-1e400", "1e-400", "-1e-400", "1.7976931348623157e308",
        "1.7976931348623158e308", "1.7976931348623159e308", "2.4703282292062327e-324", "2.4703282292062328e-324",
        "4.9406564584124654e-324", "9007199254740993", "18446744073709551615", "18446744073709551616",
        "-9223372036854775808", "-9223372036854775809", "-18446744073709551616",
        "123456789012345678901234567890", "0.1000000000000000055511151231257827021181583404541015625",
        "4294967295", "4294967296", "NaN", "-NaN", "Infinity", "-Infinity", "null", "true", "\"1\"", "[1]", "{}",
        "1 ", " 1", "1x", "0x10", "1_000",
    ];
    let mut lines: Vec<Vec<u8>> = Vec::new();
    for n in numbers {
        for t in [step, loss, int, rank] {
            lines.push(splice(t, n));
        }
        for field in ["sigma_max", "iterations", "layer", "duration_seconds", "top_k", "quantiles"] {
            lines.push(splice(spec, &format!(",\"{field}\":{n}")));
            lines.push(splice(spec, &format!(",\"{field}\":[{n}]")));
        }
    }
    for extra in [
        "", ",\"top_k\":[]", ",\"top_k\":[1,2.5]", ",\"top_k\":[1,]", ",\"top_k\":[,1]", ",\"top_k\":[null]",
        ",\"quantiles\":{\"p10\":1,\"p50\":2,\"p90\":3,\"p99\":4}", ",\"quantiles\":{\"p10\":1,\"p50\":2,\"p90\":3}",
        ",\"quantiles\":{\"p10\":1,\"p10\":1,\"p50\":2,\"p90\":3,\"p99\":4}",
        ",\"quantiles\":{\"p10\":1,\"p50\":2,\"p90\":3,\"p99\":4,\"p1\":0}", ",\"quantiles\":null",
        ",\"layer\":null", ",\"layer\":3", ",\"nonfinite\":true", ",\"nonfinite\":truex", ",\"nonfinite\":nul",
        ",\"sigma_max\":1,\"sigma_max\":2", ",\"class\":\"vector_like\"", ",\"unknown\":1", ",\"unknown\":{\"a\":[1,{}]}",
        ",\"sigma_max\":-1", ",\"progress\":1.5", ",\"sigma_max\":\"NaN\"",
    ] {
        lines.push(splice(spec, extra));
    }
    let raw: &[&[u8]] = &[
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
        br#" { "v" : 1 , "run" : "r" , "rank" : 0 , "host" : "h" , "step" : 1 , "event" : { "type" : "step" , "timestamp_seconds" : 1 } } "#,
        b"{\"v\":1,\"run\":\"r\",\"rank\":0,\"host\":\"h\",\"step\":1,\"event\":{\"type\":\"step\",\"timestamp_seconds\":1}}\t\r",
        br#"{"event":{"type":"step","timestamp_seconds":1},"step":1,"host":"h","rank":0,"run":"r","v":1}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"timestamp_seconds":1,"type":"step"}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}x"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}},"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1},}"#,
        br#"{"v":1,"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
        br#"{"v":1,"run":"r","run":"s","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1,"loss":1,"loss":2}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1},"event":{"type":"step","timestamp_seconds":2}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"extra":0,"event":{"type":"step","timestamp_seconds":1}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1,"tokens_x":5}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step"}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","event":{"type":"step","timestamp_seconds":1}}"#,
        br#"{"v":2,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
        br#"{"v":1,"run":"","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":-1}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1,"loss":NaN}}"#,
        br#"{"v":1,"run":"NaN","rank":0,"host":"Infinity","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
        br#"{"v":1,"run":"a \"NaN\" b","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
        br#"{"v":1,"run":"r\u0073","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
        br#"{"v":1,"r\u0075n":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"st\u0065p","timestamp_seconds":1}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timest\u0061mp_seconds":1}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"hello","pid":1,"rule":"paper"}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"goodbye","reason":"finished"}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"params","params":[]}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"teleport"}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1,"class":"x"}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":null}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":[]}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"spectrum","param":"p","class":"matrix_like","class":"vector_like"}}"#,
        br#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"spectrum","param":"p"}}"#,
        br#"{"v":1,"run":null,"rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1}}"#,
        b"{\"v\":1,\"run\":\"r\xff\",\"rank\":0,\"host\":\"h\",\"step\":1,\"event\":{\"type\":\"step\",\"timestamp_seconds\":1}}",
        b"{\"v\":1,\"run\":\"r\x01\",\"rank\":0,\"host\":\"h\",\"step\":1,\"event\":{\"type\":\"step\",\"timestamp_seconds\":1}}",
        b"{\"v\":1,\"run\":\"r\tx\",\"rank\":0,\"host\":\"h\",\"step\":1,\"event\":{\"type\":\"step\",\"timestamp_seconds\":1}}",
        b"{\"v\":1,\"run\":\"\xc3\xa9\",\"rank\":0,\"host\":\"h\",\"step\":1,\"event\":{\"type\":\"step\",\"timestamp_seconds\":1}}",
        b"{\"v\":1,\"run\":\"r\",\"rank\":0,\"host\":\"h\",\"step\":1,\"event\":{\"type\":\"step\",\"timestamp_seconds\":1}\x0b}",
        b"",
        b"{",
        b"{}",
        b"null",
    ];
    lines.extend(raw.iter().map(|l| l.to_vec()));
    let mut taken = 0;
    for l in &lines {
        taken += usize::from(agree(l));
    }
    assert!(taken > 40, "the corpus exercises the fast path ({taken} of {} lines)", lines.len());
}

#[test]
fn random_json_numbers_read_as_serde_reads_them() {
    let mut r = Rng(0x2545_f491_4f6c_dd1d);
    let template = r#"{"v":1,"run":"r","rank":0,"host":"h","step":1,"event":{"type":"step","timestamp_seconds":1,"loss":@}}"#;
    for _ in 0..20_000 {
        let digits = |r: &mut Rng, n: usize| (0..n).map(|_| char::from(b'0' + r.below(10) as u8)).collect::<String>();
        let mut n = String::new();
        if r.chance(30) {
            n.push('-');
        }
        let int_len = 1 + r.below(25);
        n.push_str(&digits(&mut r, int_len));
        if r.chance(60) {
            n.push('.');
            let frac_len = 1 + r.below(30);
            n.push_str(&digits(&mut r, frac_len));
        }
        if r.chance(50) {
            n.push(*r.pick(&['e', 'E']));
            n.push_str(*r.pick(&["", "+", "-"]));
            n.push_str(&(r.below(700)).to_string());
        }
        agree(&splice(template, &n));
    }
}

#[test]
fn mutated_lines_get_the_same_answer_from_both_paths() {
    let mut r = Rng(0xdead_beef_cafe_f00d);
    const BYTES: &[u8] = b"\"\\{}[],:-+.eE0159 nNaItfu\t\xff";
    for _ in 0..20_000 {
        let mut l = line(&envelope(&mut r));
        for _ in 0..1 + r.below(3) {
            if l.is_empty() {
                break;
            }
            let at = r.below(l.len());
            match r.below(4) {
                0 => {
                    l.remove(at);
                }
                1 => l.insert(at, *r.pick(BYTES)),
                2 => l[at] = *r.pick(BYTES),
                _ => {
                    let b = l[at];
                    l.insert(at, b);
                }
            }
        }
        agree(&l);
    }
}
