//! The run and parameter series, kept in the form they are served in.
//!
//! The `prometheus` crate's vectors keep a descriptor and protobuf label pairs per child, and its `gather()`
//! copies every family into protobuf messages before the text encoder runs: at 200k series that is most of a
//! scrape's time and memory. The families here keep, per series, its escaped label text once and its value in
//! an atomic, and encode straight into the body. The API mirrors the crate's (`with_label_values`, `set`,
//! `inc_by`, `observe`, `remove_label_values`), takes its `Opts`/`HistogramOpts`, and reports its errors,
//! so that a source reads the same either way. Every source's families live here; only the daemon's own
//! (`selfmetrics`) stay on the crate's types, in [`Registry::prometheus`].

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::io::Write;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use prometheus::{HistogramOpts, Opts};

mod cells;
pub use cells::{CounterCell, GaugeCell, HistogramCell, IntCounterCell};

/// The `# TYPE` of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
    Histogram,
    /// Quantile samples only, without `_sum` and `_count` (the text format allows that); a `quantile` label
    /// is legal only on summaries.
    Summary,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
            Kind::Histogram => "histogram",
            Kind::Summary => "summary",
        }
    }
}

/// A family's name, help, type and label names.
pub struct Desc {
    name: String,
    help: String,
    kind: Kind,
    label_names: Vec<String>,
    /// Label indices in name order: series print their labels sorted by name, as the `prometheus` crate does.
    print_order: Vec<usize>,
    /// Histogram bounds as `le` values, printed as the `prometheus` crate prints them (`1`, not `1.0`), so
    /// that dashboards matching `le="1"` keep working.
    le: Vec<String>,
}

/// A value cell of one series.
pub trait Value: Default + Send + Sync + 'static {
    /// Lines this series contributes to the body.
    fn samples(desc_buckets: usize) -> usize;
    fn encode(&self, desc: &Desc, buckets: &[f64], labels: &str, out: &mut Vec<u8>);
}

/// One series: its labels' escaped text (also what tells hash collisions apart) and its value.
pub struct Series<V> {
    labels: Box<str>,
    buckets: Arc<[f64]>,
    value: V,
}

impl<V> std::ops::Deref for Series<V> {
    type Target = V;
    fn deref(&self) -> &V {
        &self.value
    }
}

/// Series by the hash of their label values; a collision shares a bucket. The hasher is seeded at random per
/// process (foldhash), so clients cannot choose names that collide.
type Shard<V> = HashMap<u64, Vec<Arc<Series<V>>>, foldhash::fast::RandomState>;

/// A family of series with the same label names.
pub struct MetricVec<V: Value> {
    desc: Arc<Desc>,
    buckets: Arc<[f64]>,
    series: Arc<RwLock<Shard<V>>>,
    hasher: foldhash::fast::RandomState,
}

impl<V: Value> Clone for MetricVec<V> {
    fn clone(&self) -> Self {
        MetricVec {
            desc: Arc::clone(&self.desc),
            buckets: Arc::clone(&self.buckets),
            series: Arc::clone(&self.series),
            hasher: self.hasher.clone(),
        }
    }
}

fn valid_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

impl<V: Value> MetricVec<V> {
    fn with_desc(opts: &Opts, kind: Kind, labels: &[&str], buckets: Vec<f64>) -> Result<Self, prometheus::Error> {
        let name = opts.fq_name();
        if !valid_name(&name, true) {
            return Err(prometheus::Error::Msg(format!("`{name}` is not a valid metric name")));
        }
        if let Some(bad) = labels.iter().find(|l| !valid_name(l, false) || l.starts_with("__")) {
            return Err(prometheus::Error::Msg(format!("{name}: `{bad}` is not a valid label name")));
        }
        let mut print_order: Vec<usize> = (0..labels.len()).collect();
        print_order.sort_by_key(|&i| labels[i]);
        let desc = Desc {
            name,
            help: opts.help.clone(),
            kind,
            label_names: labels.iter().map(|l| l.to_string()).collect(),
            print_order,
            le: buckets.iter().map(|b| b.to_string()).collect(),
        };
        Ok(MetricVec {
            desc: Arc::new(desc),
            buckets: buckets.into(),
            series: Arc::new(RwLock::new(HashMap::default())),
            hasher: Default::default(),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Shard<V>> {
        self.series.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Shard<V>> {
        self.series.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn key(&self, values: &[&str]) -> u64 {
        let mut h = self.hasher.build_hasher();
        for v in values {
            v.hash(&mut h);
        }
        h.finish()
    }

    fn check_arity(&self, values: &[&str]) -> Result<(), prometheus::Error> {
        if values.len() != self.desc.label_names.len() {
            return Err(prometheus::Error::InconsistentCardinality {
                expect: self.desc.label_names.len(),
                got: values.len(),
            });
        }
        Ok(())
    }

    /// The series with these label values, created (at zero) if absent.
    pub fn get_metric_with_label_values(&self, values: &[&str]) -> Result<Arc<Series<V>>, prometheus::Error> {
        self.check_arity(values)?;
        let key = self.key(values);
        let same = |s: &Arc<Series<V>>| labels_match(&self.desc, &s.labels, values);
        if let Some(s) = self.read().get(&key).and_then(|bucket| bucket.iter().find(|s| same(s))) {
            return Ok(Arc::clone(s));
        }
        let mut map = self.write();
        let bucket = map.entry(key).or_default();
        if let Some(s) = bucket.iter().find(|s| same(s)) {
            return Ok(Arc::clone(s));
        }
        let s = Arc::new(Series {
            labels: label_text(&self.desc, values).into_boxed_str(),
            buckets: Arc::clone(&self.buckets),
            value: V::default(),
        });
        bucket.push(Arc::clone(&s));
        Ok(s)
    }

    /// The series in `handle`, looked up (and created) with these label values only the first time. The
    /// handle must not outlive the series in the family: sources keep handles in a run's memo
    /// (`sources::RunMemo`), which goes with the run, and remove the run's series only then.
    pub fn cached<'h>(&self, handle: &'h mut Option<Arc<Series<V>>>, values: &[&str]) -> &'h Series<V> {
        handle.get_or_insert_with(|| self.with_label_values(values))
    }

    /// Like [`Self::get_metric_with_label_values`]; a wrong number of values is a bug in the caller (every
    /// call site passes a fixed-size array matching the family's label names).
    pub fn with_label_values(&self, values: &[&str]) -> Arc<Series<V>> {
        match self.get_metric_with_label_values(values) {
            Ok(s) => s,
            Err(e) => panic!("{}: {e}", self.desc.name),
        }
    }

    /// Removes one series; an absent one is an error, as in the `prometheus` crate.
    pub fn remove_label_values(&self, values: &[&str]) -> Result<(), prometheus::Error> {
        self.check_arity(values)?;
        let key = self.key(values);
        let mut map = self.write();
        let Some(bucket) = map.get_mut(&key) else {
            return Err(prometheus::Error::Msg(format!("{}: no series {values:?}", self.desc.name)));
        };
        bucket.retain(|s| !labels_match(&self.desc, &s.labels, values));
        if bucket.is_empty() {
            map.remove(&key);
        }
        Ok(())
    }

    /// Number of series.
    pub fn len(&self) -> usize {
        self.read().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }
}

/// Whether `text` is exactly what [`label_text`] makes of `values`, without building it.
fn labels_match(desc: &Desc, text: &str, values: &[&str]) -> bool {
    let mut rest = text.as_bytes();
    let mut take = |expected: &[u8]| match rest.strip_prefix(expected) {
        Some(r) => {
            rest = r;
            true
        }
        None => false,
    };
    for (i, &j) in desc.print_order.iter().enumerate() {
        if (i > 0 && !take(b",")) || !take(desc.label_names[j].as_bytes()) || !take(b"=\"") {
            return false;
        }
        let value = values[j].as_bytes();
        if memchr::memchr3(b'\\', b'"', b'\n', value).is_none() {
            if !take(value) {
                return false;
            }
        } else if !escaped_match(value, &mut take) {
            return false;
        }
        if !take(b"\"") {
            return false;
        }
    }
    rest.is_empty()
}

/// Matches one value that needs escapes, character by character.
fn escaped_match(value: &[u8], take: &mut impl FnMut(&[u8]) -> bool) -> bool {
    value.iter().all(|&c| match c {
        b'\\' => take(b"\\\\"),
        b'"' => take(b"\\\""),
        b'\n' => take(b"\\n"),
        c => take(&[c]),
    })
}

/// `k1="v1",k2="v2"` in name order, with the text format's escapes (`\\`, `\"`, `\n`).
fn label_text(desc: &Desc, values: &[&str]) -> String {
    let names = &desc.label_names;
    let mut s = String::with_capacity(names.iter().zip(values).map(|(n, v)| n.len() + v.len() + 4).sum());
    for (i, (n, v)) in desc.print_order.iter().map(|&j| (&names[j], values[j])).enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(n);
        s.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '"' => s.push_str("\\\""),
                '\n' => s.push_str("\\n"),
                c => s.push(c),
            }
        }
        s.push('"');
    }
    s
}

pub type GaugeVec = MetricVec<GaugeCell>;
pub type IntCounterVec = MetricVec<IntCounterCell>;
pub type CounterVec = MetricVec<CounterCell>;
pub type HistogramVec = MetricVec<HistogramCell>;

impl MetricVec<GaugeCell> {
    pub fn new(opts: Opts, labels: &[&str]) -> Result<Self, prometheus::Error> {
        Self::with_desc(&opts, Kind::Gauge, labels, Vec::new())
    }

    /// Gauges served as a summary's quantiles (their last label must be `quantile`).
    pub fn new_quantiles(opts: Opts, labels: &[&str]) -> Result<Self, prometheus::Error> {
        if labels.last() != Some(&"quantile") {
            return Err(prometheus::Error::Msg(format!("{}: the last label must be `quantile`", opts.name)));
        }
        Self::with_desc(&opts, Kind::Summary, labels, Vec::new())
    }
}

impl MetricVec<IntCounterCell> {
    pub fn new(opts: Opts, labels: &[&str]) -> Result<Self, prometheus::Error> {
        Self::with_desc(&opts, Kind::Counter, labels, Vec::new())
    }
}

impl MetricVec<CounterCell> {
    pub fn new(opts: Opts, labels: &[&str]) -> Result<Self, prometheus::Error> {
        Self::with_desc(&opts, Kind::Counter, labels, Vec::new())
    }
}

impl MetricVec<HistogramCell> {
    pub fn new(opts: HistogramOpts, labels: &[&str]) -> Result<Self, prometheus::Error> {
        let b = opts.buckets.clone();
        if b.is_empty() || b.windows(2).any(|w| w[0] >= w[1]) || b.iter().any(|x| !x.is_finite()) {
            return Err(prometheus::Error::Msg(format!("{}: buckets must be finite and increasing", opts.common_opts.name)));
        }
        Self::with_desc(&opts.common_opts, Kind::Histogram, labels, b)
    }
}

/// What the registry needs of a family.
pub trait Family: Send + Sync {
    fn name(&self) -> &str;
    /// Appends the family (HELP, TYPE, samples) to `out`; returns the number of sample lines, 0 when it has
    /// no series (then nothing is written, as the `prometheus` crate does).
    fn encode(&self, out: &mut Vec<u8>) -> usize;
}

impl<V: Value> Family for MetricVec<V> {
    fn name(&self) -> &str {
        &self.desc.name
    }

    fn encode(&self, out: &mut Vec<u8>) -> usize {
        let map = self.read();
        if map.is_empty() {
            return 0;
        }
        let d = &self.desc;
        let _ = writeln!(out, "# HELP {} {}", d.name, d.help.replace('\\', "\\\\").replace('\n', "\\n"));
        let _ = writeln!(out, "# TYPE {} {}", d.name, d.kind.as_str());
        let mut n = 0;
        for s in map.values().flatten() {
            s.value.encode(d, &self.buckets, &s.labels, out);
            n += V::samples(self.buckets.len());
        }
        n
    }
}

/// Every family a daemon serves: the run and parameter series here, the rest in a `prometheus::Registry`.
#[derive(Default)]
pub struct Registry {
    families: RwLock<Vec<Box<dyn Family>>>,
    prometheus: prometheus::Registry,
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
    }

    pub fn register(&self, family: Box<dyn Family>) -> Result<(), prometheus::Error> {
        let mut families = self.families.write().unwrap_or_else(PoisonError::into_inner);
        if families.iter().any(|f| f.name() == family.name()) {
            return Err(prometheus::Error::AlreadyReg);
        }
        families.push(family);
        Ok(())
    }

    /// The registry for low-cardinality families built on the `prometheus` crate's own types.
    pub fn prometheus(&self) -> &prometheus::Registry {
        &self.prometheus
    }

    /// Appends every family of this registry's own to `out`; returns the number of sample lines.
    pub fn encode_families(&self, out: &mut Vec<u8>) -> usize {
        let families = self.families.read().unwrap_or_else(PoisonError::into_inner);
        families.iter().map(|f| f.encode(out)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(f: &dyn Family) -> String {
        let mut out = Vec::new();
        f.encode(&mut out);
        String::from_utf8(out).unwrap()
    }

    /// The `prometheus` crate's own encoder is the reference for the text format.
    fn reference(families: &[prometheus::proto::MetricFamily]) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        prometheus::TextEncoder::new().encode(families, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn sorted_lines(s: &str) -> Vec<String> {
        let mut v: Vec<String> = s.lines().map(str::to_string).collect();
        v.sort();
        v
    }

    #[test]
    fn gauges_counters_and_histograms_encode_as_the_prometheus_crate_does() {
        let labels = ["run", "param"];
        let ours_g = GaugeVec::new(Opts::new("g", "a \"gauge\"\nhelp"), &labels).unwrap();
        let theirs_g = prometheus::GaugeVec::new(Opts::new("g", "a \"gauge\"\nhelp"), &labels).unwrap();
        let ours_c = IntCounterVec::new(Opts::new("c_total", "c"), &labels).unwrap();
        let theirs_c = prometheus::IntCounterVec::new(Opts::new("c_total", "c"), &labels).unwrap();
        let hopts = || HistogramOpts::new("h_seconds", "h").buckets(vec![0.005, 0.25, 1.0]);
        let ours_h = HistogramVec::new(hopts(), &labels).unwrap();
        let theirs_h = prometheus::HistogramVec::new(hopts(), &labels).unwrap();
        for (run, param, v) in [("a", "w\\1", 0.1), ("b\"x", "line\nbreak", 1e-7), ("a", "", 3.0e21)] {
            let l = [run, param];
            ours_g.with_label_values(&l).set(v);
            theirs_g.with_label_values(&l).set(v);
            ours_c.with_label_values(&l).inc_by(7);
            theirs_c.with_label_values(&l).inc_by(7);
            for x in [v, 0.3, 5.0] {
                ours_h.with_label_values(&l).observe(x);
                theirs_h.with_label_values(&l).observe(x);
            }
        }
        // Values must parse to the same floats; the crate prints 1e-7 as 0.0000001, ryu as 1e-7.
        let normalise = |s: &str| -> Vec<String> {
            sorted_lines(s)
                .into_iter()
                .map(|l| match l.rsplit_once(' ') {
                    Some((k, v)) if !l.starts_with('#') => format!("{k} {:?}", v.parse::<f64>().unwrap()),
                    _ => l,
                })
                .collect()
        };
        use prometheus::core::Collector;
        for (ours, theirs) in [
            (body(&ours_g), reference(&theirs_g.collect())),
            (body(&ours_c), reference(&theirs_c.collect())),
            (body(&ours_h), reference(&theirs_h.collect())),
        ] {
            assert_eq!(normalise(&ours), normalise(&theirs), "ours:\n{ours}\ntheirs:\n{theirs}");
        }
    }

    #[test]
    fn a_removed_series_is_gone_and_an_empty_family_writes_nothing() {
        let g = GaugeVec::new(Opts::new("g", "g"), &["a"]).unwrap();
        g.with_label_values(&["x"]).set(1.0);
        assert!(g.remove_label_values(&["y"]).is_err());
        g.remove_label_values(&["x"]).unwrap();
        assert_eq!(body(&g), "");
        assert!(g.get_metric_with_label_values(&["x", "y"]).is_err());
    }

    #[test]
    fn series_are_told_apart_by_their_exact_label_values() {
        let g = GaugeVec::new(Opts::new("g", "g"), &["b", "a"]).unwrap();
        let cases = [["x", "y"], ["x\"", "y"], ["x", "\"y"], ["x\\", "y"], ["x\n", "y"], ["", ""], ["x,a=\"", "y"]];
        for (i, l) in cases.iter().enumerate() {
            g.with_label_values(l).set(i as f64);
        }
        assert_eq!(g.len(), cases.len());
        for (i, l) in cases.iter().enumerate() {
            assert_eq!(g.with_label_values(l).get(), i as f64, "{l:?}");
        }
    }

    #[test]
    fn a_counter_saturates_instead_of_wrapping() {
        let c = IntCounterVec::new(Opts::new("c_total", "c"), &[]).unwrap();
        c.with_label_values(&[]).inc_by(u64::MAX - 1);
        c.with_label_values(&[]).inc_by(5);
        assert_eq!(c.with_label_values(&[]).get(), u64::MAX);
    }

    #[test]
    fn quantile_gauges_are_typed_summary() {
        let q = GaugeVec::new_quantiles(Opts::new("q", "q"), &["run", "quantile"]).unwrap();
        q.with_label_values(&["r", "0.5"]).set(2.0);
        assert!(body(&q).contains("# TYPE q summary\nq{quantile=\"0.5\",run=\"r\"} 2.0\n"), "{}", body(&q));
        assert!(GaugeVec::new_quantiles(Opts::new("q", "q"), &["run"]).is_err());
    }
}
