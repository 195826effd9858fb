//! Benchmark (not a test): decoding the lines `gainguard-send` writes (3 spectrum samples and a step per
//! training step, as in daemon_bench's ingest section), through serde alone and through one sender's
//! `LineDecoder` (the hand-written path, as gainguardd decodes a connection), interleaved in rounds, on one
//! thread. Prints ns per line and the ratio.
//!
//! Run: cargo bench -p gainguard-protocol --bench decode

use std::time::Instant;

use gainguard_protocol::events::*;
use gainguard_protocol::wire::{decode_line_serde, encode_line, LineDecoder, Rejection};

fn lines() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for step in 1..=1000u64 {
        for j in 0..3u32 {
            let s = SpectrumSample {
                sigma_max: Some(1.0 + j as f64),
                iterations: 2,
                duration_seconds: 0.001,
                ..SpectrumSample::empty(format!("blocks.{j}.mlp.up.weight"), Some(j), ParamClass::MatrixLike)
            };
            out.push(Envelope::new("ingest-0", 0, "localhost", step, Event::Spectrum(s)));
        }
        let st = StepEvent {
            loss: Some(2.0 + 1.0 / step as f64),
            tokens: 1000,
            duration_seconds: Some(0.01),
            timestamp_seconds: 1.7e9,
            ..Default::default()
        };
        out.push(Envelope::new("ingest-0", 0, "localhost", step, Event::Step(st)));
    }
    out.iter()
        .map(|e| {
            let mut l = encode_line(e).unwrap();
            l.pop();
            l
        })
        .collect()
}

fn time(lines: &[Vec<u8>], mut decode: impl FnMut(&[u8]) -> Result<Envelope, Rejection>) -> f64 {
    let start = Instant::now();
    let mut ok = 0;
    for l in lines {
        ok += usize::from(std::hint::black_box(decode(std::hint::black_box(l))).is_ok());
    }
    assert_eq!(ok, lines.len());
    start.elapsed().as_secs_f64() * 1e9 / lines.len() as f64
}

fn main() {
    let lines = lines();
    let bytes: usize = lines.iter().map(Vec::len).sum();
    let (mut serde, mut fast) = (Vec::new(), Vec::new());
    let mut sender = LineDecoder::default();
    for _ in 0..3 {
        time(&lines, decode_line_serde);
        time(&lines, |l| sender.decode(l));
    }
    if std::env::var_os("ONLY_FAST").is_some() { for _ in 0..300 { time(&lines, |l| sender.decode(l)); } return; }
    for _ in 0..15 {
        serde.push(time(&lines, decode_line_serde));
        fast.push(time(&lines, |l| sender.decode(l)));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (s, f) = (median(&mut serde), median(&mut fast));
    println!("{} lines, {:.0} bytes each on average; median of 15 interleaved rounds", lines.len(), bytes as f64 / lines.len() as f64);
    println!("serde alone:  {s:.0} ns per line");
    println!("LineDecoder:  {f:.0} ns per line ({:.2}x of serde, {:.1}x faster)", f / s, s / f);
}
