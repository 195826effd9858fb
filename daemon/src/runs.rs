//! The run table: which trainers are known, which parameters each has, when they expire. It enforces the
//! caps on runs, parameters and series, and feeds admitted events to every source.
//!
//! Expiry: a run that nothing feeds any more (it said Goodbye, or the connection or embedded sink that sent
//! its latest event is gone) keeps its series for the TTL after the later of its last event and that end,
//! then loses all of them; this holds for every run, whether it ever said Hello or not. At the run cap, a new
//! trainer's Hello makes room by evicting the run idle the longest: first runs nothing feeds, then runs that
//! never said Hello.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gainguard_protocol::events::{Envelope, Event, ParamClass};
use gainguard_protocol::wire::{self, RejectReason};

use crate::config::Limits;
use crate::selfmetrics::SelfMetrics;
use crate::sources::{ParamLabels, ParamMap, RunKey, RunMemo, RunView, Source};

/// Identifies one trainer connection (socket) or one embedded sink.
pub(crate) type ConnId = u64;

/// Messages outside the data path.
pub(crate) enum Control {
    /// A connection ended without its end being queued behind its events (its task was cancelled).
    Disconnected { conn: ConnId },
    Shutdown,
    /// Makes the run-table thread fail, to test that its death is reported (`/healthz` 503).
    Fault,
}

struct RunState {
    conn: ConnId,
    up: bool,
    said_hello: bool,
    last_event: Instant,
    /// Set when nothing feeds the run any more: its Goodbye, or the end of its connection.
    unfed_since: Option<Instant>,
    params: ParamMap,
    /// One per source, in source order; dropped with the run.
    memos: Vec<RunMemo>,
}

impl RunState {
    /// When the run's series go, if nothing feeds it; `None` while something does (or the TTL overflows).
    fn expires_at(&self, ttl: Duration) -> Option<Instant> {
        self.unfed_since.and_then(|t| t.max(self.last_event).checked_add(ttl))
    }
}

pub(crate) struct RunTable {
    sources: Vec<Arc<dyn Source>>,
    metrics: SelfMetrics,
    limits: Limits,
    ttl: Duration,
    runs: HashMap<RunKey, RunState, foldhash::fast::RandomState>,
    /// Upper bound of the series all runs hold, from the sources' per-run and per-param costs.
    series: usize,
    run_cost: usize,
    param_cost: usize,
    /// The key of the latest event's run, with its numeric rank: consecutive events of one run (most of a
    /// connection's batch) reuse it instead of allocating its three strings again.
    last_key: Option<(u32, RunKey)>,
}

fn labels_of(name: &str, layer: Option<u32>, class: ParamClass, slot: usize) -> ParamLabels {
    ParamLabels {
        param: name.to_string(),
        layer: layer.map(|l| l.to_string()).unwrap_or_default(),
        class: class.as_str(),
        slot,
    }
}

impl RunTable {
    pub fn new(sources: Vec<Arc<dyn Source>>, metrics: SelfMetrics, limits: Limits, ttl: Duration) -> Self {
        let run_cost = sources.iter().map(|s| s.series_per_run()).sum();
        let param_cost = sources.iter().map(|s| s.series_per_param()).sum();
        RunTable {
            sources,
            metrics,
            limits,
            ttl,
            runs: HashMap::default(),
            series: 0,
            run_cost,
            param_cost,
            last_key: None,
        }
    }

    /// Applies one event received at `now` (Unix time `received`).
    pub fn handle(&mut self, conn: ConnId, envelope: &Envelope, validated: bool, now: Instant, received: f64) {
        if !validated {
            if let Err(r) = wire::validate(envelope) {
                self.metrics.reject(r.reason);
                return;
            }
        }
        let rank = envelope.rank;
        let key = match self.last_key.take() {
            Some((rank, k)) if rank == envelope.rank && *k.run == *envelope.run && *k.host == *envelope.host => k,
            _ => RunKey::of(envelope),
        };
        self.apply(conn, &key, envelope, now, received);
        self.last_key = Some((rank, key));
    }

    fn apply(&mut self, conn: ConnId, key: &RunKey, envelope: &Envelope, now: Instant, received: f64) {
        // One lookup for a known run (nearly every event).
        let state = match self.runs.get_mut(key) {
            Some(state) => state,
            None => {
                if let Err(r) = self.admit_run(key, conn, matches!(envelope.event, Event::Hello(_)), now) {
                    self.metrics.reject(r);
                    return;
                }
                let Some(state) = self.runs.get_mut(key) else { return };
                state
            }
        };
        state.conn = conn;
        state.last_event = now;
        let mut admit = |name: &str, layer: Option<u32>, class: ParamClass| -> Result<(), RejectReason> {
            if state.params.contains_key(name) {
                return Ok(());
            }
            if state.params.len() >= self.limits.max_params_per_run {
                return Err(RejectReason::TooManyParams);
            }
            if self.series + self.param_cost > self.limits.max_series {
                return Err(RejectReason::TooManySeries);
            }
            self.series += self.param_cost;
            state.params.insert(name.to_string(), labels_of(name, layer, class, state.params.len()));
            Ok(())
        };
        let refused = match &envelope.event {
            // Admit what fits; the event still updates the admitted part. One rejection per event.
            Event::Params(table) => {
                let mut first = None;
                for p in &table.params {
                    if let Err(r) = admit(&p.name, p.layer, p.class) {
                        first.get_or_insert(r);
                    }
                }
                first
            }
            Event::Spectrum(s) => match admit(&s.param, s.layer, s.class) {
                Ok(()) => None,
                Err(r) => {
                    self.metrics.reject(r);
                    return;
                }
            },
            _ => None,
        };
        if let Some(r) = refused {
            self.metrics.reject(r);
        }
        match &envelope.event {
            Event::Goodbye(_) => {
                state.up = false;
                state.unfed_since = Some(now);
            }
            Event::Hello(_) | Event::Step(_) => {
                state.said_hello |= matches!(envelope.event, Event::Hello(_));
                state.up = true;
                state.unfed_since = None;
            }
            Event::Params(_) | Event::Spectrum(_) => state.unfed_since = None,
        }
        self.metrics.count_event(&envelope.event);
        for (source, memo) in self.sources.iter().zip(&mut state.memos) {
            source.observe(&mut RunView { key, params: &state.params, memo, received }, envelope);
        }
    }

    /// Makes room for a new run, or says why there is none.
    fn admit_run(&mut self, key: &RunKey, conn: ConnId, hello: bool, now: Instant) -> Result<(), RejectReason> {
        if self.runs.len() >= self.limits.max_runs {
            let victim = if hello { self.idlest_run() } else { None };
            let Some(victim) = victim else { return Err(RejectReason::TooManyRuns) };
            self.forget(&victim);
            self.metrics.runs_evicted.inc();
        }
        if self.series + self.run_cost > self.limits.max_series {
            return Err(RejectReason::TooManySeries);
        }
        self.series += self.run_cost;
        let state = RunState {
            conn,
            up: false,
            said_hello: false,
            last_event: now,
            unfed_since: None,
            params: ParamMap::default(),
            memos: self.sources.iter().map(|_| RunMemo::default()).collect(),
        };
        self.runs.insert(key.clone(), state);
        self.metrics.runs.set(self.runs.len() as i64);
        Ok(())
    }

    /// The run to evict for a new trainer: the one nothing feeds whose last sign of life is oldest, else the
    /// hello-less one whose last event is oldest.
    fn idlest_run(&self) -> Option<RunKey> {
        let unfed = self
            .runs
            .iter()
            .filter_map(|(k, s)| s.unfed_since.map(|t| (t.max(s.last_event), k)))
            .min_by_key(|(t, _)| *t);
        let hello_less = || self.runs.iter().filter(|(_, s)| !s.said_hello).min_by_key(|(_, s)| s.last_event);
        unfed.map(|(_, k)| k.clone()).or_else(|| hello_less().map(|(k, _)| k.clone()))
    }

    /// A connection or embedded sink went away: the runs it fed last are down and start their TTL.
    pub fn disconnected(&mut self, conn: ConnId, now: Instant) {
        for (key, state) in self.runs.iter_mut() {
            if state.conn != conn || state.unfed_since.is_some() {
                continue;
            }
            state.unfed_since = Some(now);
            if state.up {
                state.up = false;
                for (source, memo) in self.sources.iter().zip(&mut state.memos) {
                    source.trainer_down(key, memo);
                }
            }
        }
    }

    /// Removes every series of runs whose TTL ran out.
    pub fn expire(&mut self, now: Instant) {
        let ttl = self.ttl;
        let expired: Vec<RunKey> = self
            .runs
            .iter()
            .filter(|(_, s)| s.expires_at(ttl).is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            self.forget(&key);
        }
    }

    fn forget(&mut self, key: &RunKey) {
        let Some(state) = self.runs.remove(key) else { return };
        let params: Vec<ParamLabels> = state.params.into_values().collect();
        self.series = self.series.saturating_sub(self.run_cost + params.len() * self.param_cost);
        for s in &self.sources {
            s.forget_run(key, &params);
        }
        self.metrics.runs.set(self.runs.len() as i64);
    }
}
