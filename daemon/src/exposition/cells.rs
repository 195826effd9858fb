//! The value cells of a series and how each writes its samples in the text format.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Desc, Series, Value};

fn write_float(out: &mut Vec<u8>, v: f64) {
    if v.is_nan() {
        out.extend_from_slice(b"NaN");
    } else if v.is_infinite() {
        out.extend_from_slice(if v > 0.0 { b"+Inf" } else { b"-Inf" });
    } else {
        out.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes());
    }
}

fn write_sample(out: &mut Vec<u8>, name: &str, suffix: &str, labels: &str, extra: Option<(&str, &str)>) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(suffix.as_bytes());
    if !labels.is_empty() || extra.is_some() {
        out.push(b'{');
        out.extend_from_slice(labels.as_bytes());
        if let Some((k, v)) = extra {
            if !labels.is_empty() {
                out.push(b',');
            }
            let _ = write!(out, "{k}=\"{v}\"");
        }
        out.push(b'}');
    }
    out.push(b' ');
}

/// An `f64` gauge cell.
#[derive(Default)]
pub struct GaugeCell(AtomicU64);

impl GaugeCell {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

impl Value for GaugeCell {
    fn samples(_: usize) -> usize {
        1
    }
    fn encode(&self, desc: &Desc, _: &[f64], labels: &str, out: &mut Vec<u8>) {
        write_sample(out, &desc.name, "", labels, None);
        write_float(out, self.get());
        out.push(b'\n');
    }
}

/// A `u64` counter cell that saturates at `u64::MAX` instead of wrapping.
#[derive(Default)]
pub struct IntCounterCell(AtomicU64);

impl IntCounterCell {
    pub fn inc(&self) {
        self.inc_by(1);
    }
    pub fn inc_by(&self, n: u64) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_add(n)));
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Value for IntCounterCell {
    fn samples(_: usize) -> usize {
        1
    }
    fn encode(&self, desc: &Desc, _: &[f64], labels: &str, out: &mut Vec<u8>) {
        write_sample(out, &desc.name, "", labels, None);
        out.extend_from_slice(itoa::Buffer::new().format(self.get()).as_bytes());
        out.push(b'\n');
    }
}

/// An `f64` counter cell, for totals in fractional units (joules); increases by a negative or NaN amount
/// are ignored, so that it never goes down.
#[derive(Default)]
pub struct CounterCell(GaugeCell);

impl CounterCell {
    pub fn inc_by(&self, v: f64) {
        if v > 0.0 {
            let _ = (self.0).0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| Some((f64::from_bits(bits) + v).to_bits()));
        }
    }
    pub fn get(&self) -> f64 {
        self.0.get()
    }
}

impl Value for CounterCell {
    fn samples(_: usize) -> usize {
        1
    }
    fn encode(&self, desc: &Desc, buckets: &[f64], labels: &str, out: &mut Vec<u8>) {
        self.0.encode(desc, buckets, labels, out)
    }
}

/// A histogram cell: per-bucket counts (not cumulative; summed when encoded), the sum and the count.
#[derive(Default)]
pub struct HistogramCell {
    /// One per bound, plus +Inf; sized on the first observation.
    counts: std::sync::OnceLock<Box<[AtomicU64]>>,
    sum: GaugeCell,
    count: IntCounterCell,
}

impl Series<HistogramCell> {
    pub fn observe(&self, v: f64) {
        let counts = self.value.counts.get_or_init(|| (0..=self.buckets.len()).map(|_| AtomicU64::new(0)).collect());
        let i = self.buckets.iter().position(|b| v <= *b).unwrap_or(self.buckets.len());
        counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self.value.sum.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            Some((f64::from_bits(bits) + v).to_bits())
        });
        self.value.count.inc();
    }

    pub fn get_sample_count(&self) -> u64 {
        self.value.count.get()
    }

    pub fn get_sample_sum(&self) -> f64 {
        self.value.sum.get()
    }
}

impl Value for HistogramCell {
    fn samples(buckets: usize) -> usize {
        buckets + 3
    }
    fn encode(&self, desc: &Desc, buckets: &[f64], labels: &str, out: &mut Vec<u8>) {
        let mut cumulative = 0u64;
        let counts = self.counts.get();
        for (i, le) in desc.le.iter().enumerate() {
            cumulative += counts.map_or(0, |c| c[i].load(Ordering::Relaxed));
            write_sample(out, &desc.name, "_bucket", labels, Some(("le", le)));
            out.extend_from_slice(itoa::Buffer::new().format(cumulative).as_bytes());
            out.push(b'\n');
        }
        cumulative += counts.map_or(0, |c| c[buckets.len()].load(Ordering::Relaxed));
        write_sample(out, &desc.name, "_bucket", labels, Some(("le", "+Inf")));
        out.extend_from_slice(itoa::Buffer::new().format(cumulative).as_bytes());
        out.push(b'\n');
        write_sample(out, &desc.name, "_sum", labels, None);
        write_float(out, self.sum.get());
        out.push(b'\n');
        write_sample(out, &desc.name, "_count", labels, None);
        out.extend_from_slice(itoa::Buffer::new().format(self.count.get()).as_bytes());
        out.push(b'\n');
    }
}
