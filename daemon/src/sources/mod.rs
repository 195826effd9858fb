//! Metric sources, one per file, in the style of node_exporter's collectors.
//!
//! A source registers its metric families with the registry when it is built and updates them from the
//! events it observes (or from its own poller, like NVML). The HTTP layer only gathers the registry and
//! knows none of them. Adding a source means adding a file with a `SPEC` and listing it in [`SOURCES`]; a
//! source with settings defines them, and its `gainguardd` flags, in its own file, and lists them in
//! [`SourceSettings`] and [`SourceArgs`].

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use gainguard_protocol::events::Envelope;

use crate::error::DaemonError;
use crate::exposition::{MetricVec, Registry, Value};
use crate::history::History;

pub mod liveness;
pub mod nvml;
pub mod optimizer;
pub mod spectra;
pub mod training;

/// The settings of every source that has some, each defined in its source's file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceSettings {
    pub nvml: nvml::NvmlSettings,
}

impl SourceSettings {
    pub fn validate(&self) -> Result<(), DaemonError> {
        self.nvml.validate()
    }
}

/// `gainguardd`'s flags of every source that has some.
#[derive(clap::Args, Debug, Clone)]
pub struct SourceArgs {
    #[command(flatten)]
    pub nvml: nvml::NvmlArgs,
}

impl SourceArgs {
    pub fn settings(&self) -> Result<SourceSettings, DaemonError> {
        Ok(SourceSettings { nvml: self.nvml.settings()? })
    }
}

/// Every known source, with its name and whether it runs unless disabled.
pub const SOURCES: &[SourceSpec] =
    &[training::SPEC, optimizer::SPEC, spectra::SPEC, liveness::SPEC, nvml::SPEC, crate::history::SPEC];

/// The names of every known source, comma-separated (for messages and `--help`).
pub fn source_names() -> String {
    SOURCES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
}

/// Fails on a disabled-source name that no source has.
pub fn check_disabled(disabled: &[String]) -> Result<(), DaemonError> {
    match disabled.iter().find(|d| !SOURCES.iter().any(|s| s.name == d.as_str())) {
        Some(name) => Err(DaemonError::UnknownSource { name: name.clone(), known: source_names() }),
        None => Ok(()),
    }
}

/// Builds every enabled source, in [`SOURCES`] order; stops those already built when one fails.
pub fn build_sources(
    disabled: &[String],
    settings: &SourceSettings,
    registry: &Registry,
    host: String,
    history: &Arc<History>,
) -> Result<Vec<Arc<dyn Source>>, DaemonError> {
    let ctx = SourceContext { registry, host, settings, history };
    let mut sources: Vec<Arc<dyn Source>> = Vec::new();
    for spec in SOURCES {
        if !spec.default_enabled || disabled.iter().any(|d| d == spec.name) {
            continue;
        }
        match (spec.build)(&ctx) {
            Ok(s) => sources.push(s),
            Err(e) => {
                sources.iter().for_each(|s| s.stop());
                return Err(e);
            }
        }
    }
    Ok(sources)
}

/// How to build one source.
pub struct SourceSpec {
    pub name: &'static str,
    pub default_enabled: bool,
    pub build: fn(&SourceContext<'_>) -> Result<Arc<dyn Source>, DaemonError>,
}

/// What a source may use while it is being built.
pub struct SourceContext<'a> {
    /// Every source's families go here.
    pub registry: &'a Registry,
    /// This machine's host name (for node-level series such as NVML's).
    pub host: String,
    /// The sources' own settings (`--nvml`, ...).
    pub settings: &'a SourceSettings,
    /// The live page's history, which the `history` source and NVML's poller write.
    pub history: &'a Arc<History>,
}

/// The identity of one trainer process: the run labels `run, rank, host`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunKey {
    pub run: String,
    pub rank: String,
    pub host: String,
}

impl RunKey {
    pub fn of(envelope: &Envelope) -> Self {
        RunKey { run: envelope.run.to_string(), rank: envelope.rank.to_string(), host: envelope.host.to_string() }
    }

    pub fn labels(&self) -> [&str; 3] {
        [&self.run, &self.rank, &self.host]
    }
}

/// The per-parameter labels `param, layer, class`, fixed when the parameter is first seen so that its series
/// never split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLabels {
    pub param: String,
    pub layer: String,
    pub class: &'static str,
    /// The parameter's index among its run's admitted parameters, in admission order (0, 1, 2, ...): where
    /// a source keeps its per-parameter state in the run's [`RunMemo`].
    pub slot: usize,
}

/// Label names of run-level series.
pub const RUN_LABELS: [&str; 3] = ["run", "rank", "host"];
/// Label names of parameter-level series.
pub const PARAM_LABELS: [&str; 6] = ["run", "rank", "host", "param", "layer", "class"];

pub fn param_label_values<'a>(run: &'a RunKey, p: &'a ParamLabels) -> [&'a str; 6] {
    [&run.run, &run.rank, &run.host, &p.param, &p.layer, p.class]
}

/// The admitted parameters of a run, by name.
pub type ParamMap = HashMap<String, ParamLabels, foldhash::fast::RandomState>;

/// An admitted run as the sources see it: only parameters within the caps are listed.
pub struct RunView<'a> {
    pub key: &'a RunKey,
    pub params: &'a ParamMap,
    /// What this source keeps for this run between events.
    pub memo: &'a mut RunMemo,
    /// Unix time at which the daemon received the event (its batch).
    pub received: f64,
}

/// What one source keeps for one run between its events: above all the handles of the series it updates on
/// every event, so that the hot path looks up no label set. The run table owns it and drops it with the run,
/// in the same step as it asks the sources to remove the run's series, so that no handle outlives its series.
#[derive(Default)]
pub struct RunMemo(Option<Box<dyn Any + Send>>);

impl RunMemo {
    /// The memo as a `T`, created with `T::default()` on first use.
    pub fn get<T: Default + Send + 'static>(&mut self) -> &mut T {
        let memo = self.0.get_or_insert_with(|| Box::new(T::default()));
        if !memo.is::<T>() {
            *memo = Box::new(T::default());
        }
        memo.downcast_mut().expect("the memo holds a T")
    }
}

/// One metric source.
pub trait Source: Send + Sync {
    fn name(&self) -> &'static str;

    /// Upper bound of the series this source creates for one run, excluding per-parameter ones.
    fn series_per_run(&self) -> usize {
        0
    }

    /// Upper bound of the series this source creates for one parameter of one run.
    fn series_per_param(&self) -> usize {
        0
    }

    /// Applies one accepted event. Events whose parameters were not admitted never reach here.
    fn observe(&self, _run: &mut RunView<'_>, _envelope: &Envelope) {}

    /// The trainer's connection dropped without a Goodbye, or its embedded sink was dropped.
    fn trainer_down(&self, _run: &RunKey, _memo: &mut RunMemo) {}

    /// The run's TTL expired: remove every series it created.
    fn forget_run(&self, _run: &RunKey, _params: &[ParamLabels]) {}

    /// The daemon is shutting down: stop any thread the source started.
    fn stop(&self) {}
}

/// What to add to a counter that follows a cumulative total reported by someone else, whose previous report
/// was `last` (0 before the first): the increase, or after a decrease (the reporter restarted) the whole new
/// total. Updates `last`.
pub fn cumulative_delta(last: &mut u64, total: u64) -> u64 {
    let previous = std::mem::replace(last, total);
    if total >= previous {
        total - previous
    } else {
        total
    }
}

/// Keeps a Prometheus counter equal to a cumulative total reported by someone else (a trainer or NVML):
/// increases are applied; a decrease means the reporter restarted, and the new total counts from zero.
#[derive(Default)]
pub struct CumulativeTracker {
    /// Last totals by the hash of their labels; a collision shares a bucket. Looking up allocates nothing.
    last: HashMap<u64, Vec<(Vec<String>, u64)>, foldhash::fast::RandomState>,
    hasher: foldhash::fast::RandomState,
}

impl CumulativeTracker {
    fn hash(&self, key: &[&str]) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key)
    }

    /// Returns the amount to add to the counter.
    pub fn delta(&mut self, key: &[&str], total: u64) -> u64 {
        let bucket = self.last.entry(self.hash(key)).or_default();
        match bucket.iter_mut().find(|(k, _)| k.iter().map(String::as_str).eq(key.iter().copied())) {
            Some((_, last)) => cumulative_delta(last, total),
            None => {
                bucket.push((key.iter().map(|s| s.to_string()).collect(), total));
                total
            }
        }
    }

    pub fn forget(&mut self, key: &[&str]) {
        let h = self.hash(key);
        if let Some(bucket) = self.last.get_mut(&h) {
            bucket.retain(|(k, _)| !k.iter().map(String::as_str).eq(key.iter().copied()));
            if bucket.is_empty() {
                self.last.remove(&h);
            }
        }
    }

    pub fn forget_matching(&mut self, prefix: &[&str]) {
        for bucket in self.last.values_mut() {
            bucket.retain(|(k, _)| !(k.len() >= prefix.len() && k.iter().zip(prefix).all(|(a, b)| a == b)));
        }
        self.last.retain(|_, b| !b.is_empty());
    }
}

/// Removes a label set from a metric vec; absent series are fine (the value was never carried).
pub fn remove<V: Value>(vec: &MetricVec<V>, labels: &[&str]) {
    let _ = vec.remove_label_values(labels);
}

/// Locks a source's state. A panic elsewhere while it was held leaves plain maps, still consistent enough to
/// export and to forget runs from, so poisoning is ignored rather than spread.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_disabled_source_names_every_known_one() {
        let msg = check_disabled(&["nvml".into(), "gpu".into()]).unwrap_err().to_string();
        assert!(msg.contains("`gpu`") && msg.contains(&source_names()), "{msg}");
        assert!(check_disabled(&["nvml".into()]).is_ok());
    }

    #[test]
    fn a_cumulative_total_adds_only_its_increases_and_restarts_from_zero_after_a_decrease() {
        let mut t = CumulativeTracker::default();
        assert_eq!(t.delta(&["a"], 5), 5);
        assert_eq!(t.delta(&["a"], 5), 0);
        assert_eq!(t.delta(&["a"], 8), 3);
        assert_eq!(t.delta(&["a"], 2), 2);
        assert_eq!(t.delta(&["b"], 1), 1);
    }
}
