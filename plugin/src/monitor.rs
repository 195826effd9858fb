//! [`Monitor`]: telemetry (the training events), the spectra sampler ([`crate::sampler`]) and an optional
//! reference profile ([`crate::reference`]) attached to an optimizer in one call, reporting to an embedded
//! `gainguardd` or to a standalone one.
//!
//! ```no_run
//! # use gainguard::{AdamWConfig, BaseShapes, Monitor, WidthScaledAdamW};
//! # fn demo(vs: &tch::nn::VarStore, base: &BaseShapes, losses: &mut dyn Iterator<Item = tch::Tensor>) -> anyhow::Result<()> {
//! let mut opt = WidthScaledAdamW::new(vs, base, AdamWConfig::default())?;
//! let mut mon = Monitor::from_env("my-run")?.attach(&mut opt)?;
//! for loss in losses {
//!     opt.zero_grad();
//!     loss.backward();
//!     mon.step(&opt.step(), loss.double_value(&[]), 4096);
//! }
//! mon.finish()?;
//! # Ok(()) }
//! ```
//!
//! Where the events go:
//! - [`Monitor::embedded`]: a `gainguardd` inside the trainer serving `/metrics` on `$GAINGUARD_LISTEN`, else
//!   127.0.0.1:9464 (or [`MonitorBuilder::listen`]); needs the default-on `embedded-daemon` feature.
//! - [`Monitor::connect`]: a standalone `gainguardd` at `unix:/path` or `tcp:127.0.0.1:PORT` (TCP reads the
//!   daemon's token from `$GAINGUARD_INGEST_TOKEN_FILE` or [`MonitorBuilder::sink_options`]).
//! - [`Monitor::from_env`]: `connect($GAINGUARD_ADDR)` when that is set, else `embedded`: the same trainer
//!   runs alone on a workstation and beside a node's daemon under a scheduler that sets the variable.
//!
//! Nothing here blocks the training thread: [`Monitor::step`] queues one event (a full queue drops and
//! counts it), the sampler copies a few tensors on their device on sampling steps and does the rest on its
//! own thread. Only [`Monitor::finish`] (and Drop) waits, for [`MonitorBuilder::finish_timeout`] at most, so
//! that the last samples and the Goodbye reach the daemon.
//!
//! An optimizer that is not a [`WidthScaledAdamW`] (the Python package's) attaches with
//! [`Monitor::for_plan`] and calls [`Monitor::before_step`] / [`Monitor::after_step`] around its own update.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gainguard_protocol::events::{Event, SpectrumSample};
use gainguard_protocol::sink::{Sink, SinkError, SinkOptions};

use crate::sampler::{ParamRef, SamplerConfig, SamplerError, SamplerHandle, SpectrumSampler};
use crate::optim::{StepReport, WidthScaledAdamW};
use crate::plan::ScalingPlan;
use crate::reference::{GainReference, ProfileRecorder, ReferenceError, ReferenceProfile};
use crate::identity::RunIdentity;
use crate::telemetry::Telemetry;

/// The standalone daemon's ingest address, for [`Monitor::from_env`].
pub const ADDR_ENV: &str = "GAINGUARD_ADDR";
/// Where an embedded daemon serves `/metrics` when the builder is given no address (`HOST:PORT`).
pub const LISTEN_ENV: &str = "GAINGUARD_LISTEN";
/// Where an embedded daemon serves `/metrics` otherwise: Prometheus's conventional exporter port.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 9464));

/// Why monitoring could not start or finish. Each names what was wrong: the address, the file, the setting.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("gainguardd ingest address `{addr}` (from {origin})")]
    Connect {
        addr: String,
        origin: String,
        #[source]
        source: SinkError,
    },
    #[error("metrics listen address `{value}` (from $GAINGUARD_LISTEN): expected HOST:PORT, such as 127.0.0.1:9464")]
    Listen { value: String },
    #[cfg(feature = "embedded-daemon")]
    #[error("cannot start the embedded gainguardd serving /metrics on {listen} (if the port is taken: set $GAINGUARD_LISTEN or MonitorBuilder::listen; port 0 picks a free one)")]
    Daemon {
        listen: SocketAddr,
        #[source]
        source: gainguard_daemon::DaemonError,
    },
    #[error("no gainguardd to report to: $GAINGUARD_ADDR is not set and this build has no embedded daemon (the plugin's `embedded-daemon` feature is off)")]
    NoEmbeddedDaemon,
    /// An unreadable or invalid profile, one whose parameters are not the model's, or a profile that
    /// could not be written; the message names the file or the parameters.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Sampler(#[from] SamplerError),
    #[error("this Monitor is already attached (to an optimizer or a plan); build one Monitor per optimizer")]
    AlreadyAttached,
}

/// Settings of a [`Monitor`] before it starts. From [`Monitor::builder`]; ends with
/// [`embedded`](Self::embedded), [`connect`](Self::connect), [`from_env`](Self::from_env) or
/// [`to_sink`](Self::to_sink).
#[derive(Clone)]
pub struct MonitorBuilder {
    id: RunIdentity,
    listen: Option<SocketAddr>,
    /// A Unix socket on which an embedded daemon also takes other processes' events.
    ingest_unix: Option<PathBuf>,
    sink_options: SinkOptions,
    sampler: SamplerConfig,
    spectra: bool,
    planned_steps: Option<u64>,
    reference_path: Option<PathBuf>,
    reference: Option<Arc<dyn GainReference>>,
    record: Record,
    finish_timeout: Duration,
}

/// Whether a monitor records the run's sigma_max profile, and where it writes it.
#[derive(Clone, Debug, PartialEq)]
enum Record {
    Off,
    InMemory,
    ToFile(PathBuf),
}

impl MonitorBuilder {
    /// Rank (default `$RANK`, else 0) of this process in a multi-process run.
    pub fn rank(mut self, rank: u32) -> Self {
        self.id.rank = rank;
        self
    }

    /// The whole identity every event carries (run, rank, host).
    pub fn identity(mut self, id: RunIdentity) -> Self {
        self.id = id;
        self
    }

    /// Planned optimizer steps: the Hello's `planned_steps` (TrainerDown before the planned end) and the
    /// samples' `progress`, which a reference profile is indexed by.
    pub fn planned_steps(mut self, steps: u64) -> Self {
        self.planned_steps = Some(steps);
        self
    }

    /// Compares every sample with the proxy's profile at this path (a [`ReferenceProfile`] JSON written by
    /// [`record_profile`](Self::record_profile)): `gain_ratio`. Read when the monitor attaches; an
    /// unreadable file, or one whose matrix-like parameters are not the model's, is an error naming it.
    pub fn reference(mut self, path: impl Into<PathBuf>) -> Self {
        self.reference_path = Some(path.into());
        self.reference = None;
        self
    }

    /// Compares with a reference already in memory (a profile, or a [`crate::reference::SelfBaseline`]).
    pub fn reference_from(mut self, reference: Arc<dyn GainReference>) -> Self {
        self.reference = Some(reference);
        self.reference_path = None;
        self
    }

    /// Records this run's sigma_max profile (a proxy run) and writes it here at [`Monitor::finish`]; it is
    /// also [`Monitor::recorded_profile`].
    pub fn record_profile(mut self, path: impl Into<PathBuf>) -> Self {
        self.record = Record::ToFile(path.into());
        self
    }

    /// Records this run's sigma_max profile for [`Monitor::recorded_profile`] alone, writing no file.
    pub fn record_profile_in_memory(mut self) -> Self {
        self.record = Record::InMemory;
        self
    }

    /// The spectra sampler's settings (interval, budget, queue, estimator, `alpha`, worker thread).
    pub fn sampler(mut self, config: SamplerConfig) -> Self {
        self.sampler = config;
        self
    }

    /// Without spectra: telemetry only (no sampler thread, no `sigma_max`). On by default.
    pub fn spectra(mut self, on: bool) -> Self {
        self.spectra = on;
        self
    }

    /// Where an embedded daemon serves `/metrics` (port 0: any free port, see [`Monitor::metrics_addr`]).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// An embedded daemon also takes events on this Unix socket, from the node's other processes (the other
    /// ranks of a torchrun job send there); ignored by [`connect`](Self::connect).
    pub fn ingest_unix(mut self, path: impl Into<PathBuf>) -> Self {
        self.ingest_unix = Some(path.into());
        self
    }

    /// Options of the connection to a standalone daemon (buffer, backoff, the TCP token file).
    pub fn sink_options(mut self, options: SinkOptions) -> Self {
        self.sink_options = options;
        self
    }

    /// How long [`Monitor::finish`] (or Drop) waits in all for the sampler to drain and the events to be
    /// written. Default 10 s.
    pub fn finish_timeout(mut self, timeout: Duration) -> Self {
        self.finish_timeout = timeout;
        self
    }

    /// Starts a daemon inside this process and reports to it.
    #[cfg(feature = "embedded-daemon")]
    pub fn embedded(self) -> Result<Monitor, MonitorError> {
        let listen = match self.listen {
            Some(addr) => addr,
            None => match std::env::var(LISTEN_ENV) {
                Ok(value) if !value.trim().is_empty() => {
                    value.trim().parse().map_err(|_| MonitorError::Listen { value: value.clone() })?
                }
                _ => DEFAULT_LISTEN,
            },
        };
        let ingest = self.ingest_unix.iter().map(|p| gainguard_daemon::IngestAddr::Unix(p.clone())).collect();
        let config = gainguard_daemon::DaemonConfig { listen, ingest, ..Default::default() };
        let daemon = gainguard_daemon::Daemon::spawn(config).map_err(|source| MonitorError::Daemon { listen, source })?;
        let sink = daemon.sink();
        let mut monitor = self.to_sink(sink);
        monitor.daemon = Some(daemon);
        Ok(monitor)
    }

    /// Reports to a standalone `gainguardd` at `unix:/path` or `tcp:127.0.0.1:PORT`. Succeeds while the
    /// daemon is down (events are buffered, then dropped and counted, and sent once it is up).
    pub fn connect(self, addr: &str) -> Result<Monitor, MonitorError> {
        self.connect_from(addr, "Monitor::connect")
    }

    fn connect_from(self, addr: &str, origin: &str) -> Result<Monitor, MonitorError> {
        let sink = Sink::connect(addr, self.sink_options.clone()).map_err(|source| MonitorError::Connect {
            addr: addr.to_string(),
            origin: origin.to_string(),
            source,
        })?;
        Ok(self.to_sink(sink))
    }

    /// `connect($GAINGUARD_ADDR)` when the variable is set (and not empty), else [`embedded`](Self::embedded)
    /// (an error without the `embedded-daemon` feature).
    pub fn from_env(self) -> Result<Monitor, MonitorError> {
        match std::env::var(ADDR_ENV) {
            Ok(addr) if !addr.trim().is_empty() => self.connect_from(addr.trim(), &format!("${ADDR_ENV}")),
            _ => {
                #[cfg(feature = "embedded-daemon")]
                return self.embedded();
                #[cfg(not(feature = "embedded-daemon"))]
                return Err(MonitorError::NoEmbeddedDaemon);
            }
        }
    }

    /// Reports into a sink the caller made (a capture channel in tests, [`Sink::disabled`]).
    pub fn to_sink(self, sink: Sink) -> Monitor {
        Monitor {
            telemetry: Telemetry::new(sink, self.id),
            sampler_config: self.sampler,
            planned_steps: self.planned_steps,
            spectra: self.spectra,
            reference_path: self.reference_path,
            reference: self.reference,
            record: self.record,
            finish_timeout: self.finish_timeout,
            attached: None,
            last_step: 0,
            finished: false,
            #[cfg(feature = "embedded-daemon")]
            daemon: None,
        }
    }
}

/// What a monitor holds once attached.
struct Attached {
    /// The plan it was attached with: the recorder's profile needs it at the end, and the external hooks
    /// every step.
    plan: ScalingPlan,
    sampler: Option<SamplerHandle>,
    recorder: Option<ProfileRecorder>,
    /// The sampler itself when the caller drives it ([`Monitor::for_plan`]); the optimizer owns it otherwise.
    driven: Option<SpectrumSampler>,
}

/// Monitoring of one training run. See the module docs.
pub struct Monitor {
    telemetry: Telemetry,
    sampler_config: SamplerConfig,
    planned_steps: Option<u64>,
    spectra: bool,
    reference_path: Option<PathBuf>,
    reference: Option<Arc<dyn GainReference>>,
    record: Record,
    finish_timeout: Duration,
    attached: Option<Attached>,
    last_step: u64,
    finished: bool,
    /// Last, so that it stops after everything that sends to it has been dropped.
    #[cfg(feature = "embedded-daemon")]
    daemon: Option<gainguard_daemon::Daemon>,
}

impl Monitor {
    /// Settings first: `Monitor::builder(run).planned_steps(n).reference(path).from_env()?`.
    pub fn builder(run: &str) -> MonitorBuilder {
        MonitorBuilder {
            id: RunIdentity::local(run),
            listen: None,
            ingest_unix: None,
            sink_options: SinkOptions::default(),
            sampler: SamplerConfig::default(),
            spectra: true,
            planned_steps: None,
            reference_path: None,
            reference: None,
            record: Record::Off,
            finish_timeout: Duration::from_secs(10),
        }
    }

    /// An embedded daemon; see [`MonitorBuilder::embedded`].
    #[cfg(feature = "embedded-daemon")]
    pub fn embedded(run: &str) -> Result<Monitor, MonitorError> {
        Monitor::builder(run).embedded()
    }

    /// A standalone daemon; see [`MonitorBuilder::connect`].
    pub fn connect(addr: &str, run: &str) -> Result<Monitor, MonitorError> {
        Monitor::builder(run).connect(addr)
    }

    /// `$GAINGUARD_ADDR`, else embedded; see [`MonitorBuilder::from_env`].
    pub fn from_env(run: &str) -> Result<Monitor, MonitorError> {
        Monitor::builder(run).from_env()
    }

    /// Announces the run and its rule table, and adds the spectra sampler to the optimizer as an observer.
    pub fn attach(mut self, opt: &mut WidthScaledAdamW) -> Result<Monitor, MonitorError> {
        if let Some(sampler) = self.start(opt.plan())? {
            opt.add_observer(Box::new(sampler));
        }
        Ok(self)
    }

    /// Attaches to a plan for an optimizer that steps by itself: the caller then calls
    /// [`before_step`](Self::before_step) and [`after_step`](Self::after_step) around every update.
    pub fn for_plan(mut self, plan: &ScalingPlan) -> Result<Monitor, MonitorError> {
        let sampler = self.start(plan)?;
        if let Some(a) = self.attached.as_mut() {
            a.driven = sampler;
        }
        Ok(self)
    }

    fn start(&mut self, plan: &ScalingPlan) -> Result<Option<SpectrumSampler>, MonitorError> {
        if self.attached.is_some() {
            return Err(MonitorError::AlreadyAttached);
        }
        let started = self.start_unattached(plan);
        if started.is_err() {
            // It never said Hello: dropping it sends no Goodbye, and does not wait for a daemon that is down.
            self.finished = true;
        }
        started
    }

    fn start_unattached(&mut self, plan: &ScalingPlan) -> Result<Option<SpectrumSampler>, MonitorError> {
        let reference = match &self.reference_path {
            Some(path) => {
                let profile = ReferenceProfile::read_json(path)?;
                profile.check_names(plan)?;
                Some(Arc::new(profile) as Arc<dyn GainReference>)
            }
            None => self.reference.clone(),
        };
        let recorder = (self.record != Record::Off).then(ProfileRecorder::new);
        let sampler = if self.spectra || recorder.is_some() {
            let id = self.telemetry.identity().clone();
            let s = SpectrumSampler::start(self.sampler_config.clone(), self.planned_steps, id, plan, self.telemetry.sink().clone(), reference)?;
            if let Some(rec) = &recorder {
                s.handle().add_listener(rec.listener());
            }
            self.telemetry.attach_sampler(s.handle());
            Some(s)
        } else {
            None
        };
        let reference_label = self.reference_path.as_ref().map(|p| p.display().to_string());
        self.telemetry.start(plan, self.planned_steps, self.sampler_config.alpha, reference_label);
        self.attached = Some(Attached { plan: plan.clone(), sampler: sampler.as_ref().map(|s| s.handle()), recorder, driven: None });
        Ok(sampler)
    }

    /// Reports one finished step: its loss and the tokens it consumed. Never blocks.
    pub fn step(&mut self, report: &StepReport, loss: f64, tokens: u64) {
        self.last_step = report.step;
        self.telemetry.step(report, loss, tokens);
    }

    /// For [`for_plan`](Self::for_plan): before the parameters change, with the step about to be taken
    /// (1-based) and the plan's parameters by name. Copies a few tensors on their device on sampling steps;
    /// nothing otherwise. Does nothing for a monitor attached to a [`WidthScaledAdamW`] (its observer runs).
    pub fn before_step(&mut self, step: u64, params: &[ParamRef<'_>]) {
        if let Some(s) = self.attached.as_mut().and_then(|a| a.driven.as_mut()) {
            s.before_step_of(step, params);
        }
    }

    /// For [`for_plan`](Self::for_plan): after the update, with the step's report (`step`, `lr_multiplier`,
    /// `wd_multiplier`; `grad_norm`, `nonfinite_grad` and `skipped_steps_total` when the optimizer knows
    /// them) and the same parameters. Queues the sampled round for the worker; never waits for it.
    pub fn after_step(&mut self, report: &StepReport, params: &[ParamRef<'_>]) {
        if let Some(a) = self.attached.as_mut() {
            if let Some(s) = a.driven.as_mut() {
                s.after_step_of(report, params, &a.plan);
            }
        }
    }

    /// Lets the sampler drain, writes the recorded profile, says Goodbye (`finished`) and flushes, within
    /// the finish timeout in all. An embedded daemon keeps serving `/metrics` until the monitor is dropped.
    /// Idempotent; Drop calls it (with reason `error` while panicking, `interrupted` otherwise) when the trainer
    /// did not.
    pub fn finish(&mut self) -> Result<(), MonitorError> {
        self.finish_with("finished")
    }

    /// [`finish`](Self::finish) with the Goodbye's reason given (`error: ...` when the training loop
    /// failed): the Python package's context manager says why the run ended.
    pub fn finish_with(&mut self, reason: &str) -> Result<(), MonitorError> {
        if std::mem::replace(&mut self.finished, true) {
            return Ok(());
        }
        let deadline = Instant::now() + self.finish_timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        let mut written = Ok(());
        if let Some(a) = self.attached.as_mut() {
            // The sampler the caller drives stops when dropped; the handle stops either kind.
            if let Some(h) = &a.sampler {
                h.finish(left());
            }
            a.driven = None;
        }
        if let (Record::ToFile(path), Some(profile)) = (&self.record, self.recorded_profile()) {
            written = profile.write_json(path);
        }
        self.telemetry.finish(self.last_step, reason);
        self.telemetry.sink().flush(left());
        Ok(written?)
    }

    /// The sigma_max profile recorded so far (with [`MonitorBuilder::record_profile`] or
    /// [`MonitorBuilder::record_profile_in_memory`]); after
    /// [`finish`](Self::finish), the one written to the file.
    pub fn recorded_profile(&self) -> Option<ReferenceProfile> {
        let a = self.attached.as_ref()?;
        let rec = a.recorder.as_ref()?;
        Some(rec.finish(&self.telemetry.identity().run, &a.plan, self.sampler_config.alpha, self.planned_steps))
    }

    pub fn identity(&self) -> &RunIdentity {
        self.telemetry.identity()
    }

    /// The sink the events go through (its `dropped_total` counts events lost).
    pub fn sink(&self) -> &Sink {
        self.telemetry.sink()
    }

    /// Waits at most `timeout` until the sampler has processed every round queued so far and the sink has
    /// delivered what was sent, without ending the run: afterwards `/metrics` shows the last sampled step's
    /// spectra (the sampler runs behind the trainer, niced, and can be several rounds behind on a busy
    /// machine). Returns false when either did not finish in time. The trainer never needs to call it.
    pub fn flush(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let drained = match self.attached.as_ref().and_then(|a| a.sampler.as_ref()) {
            Some(h) => h.drain(timeout),
            None => true,
        };
        let flushed = self.telemetry.sink().flush(deadline.saturating_duration_since(Instant::now()));
        drained && flushed
    }

    /// Sends a spectrum sample estimated outside the sampler (a matrix sharded over ranks, estimated by every
    /// rank together and exported by this one) as this run's, at `step`. False when the sink dropped it.
    pub fn send_spectrum(&self, step: u64, sample: SpectrumSample) -> bool {
        self.telemetry.sink().send(self.telemetry.identity().envelope(step, Event::Spectrum(sample)))
    }

    /// The sampler's counters, pause/resume and listeners, once attached with spectra on.
    pub fn sampler(&self) -> Option<&SamplerHandle> {
        self.attached.as_ref().and_then(|a| a.sampler.as_ref())
    }

    /// The embedded daemon's `/metrics` address (port 0 resolved); None when reporting elsewhere.
    #[cfg(feature = "embedded-daemon")]
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.daemon.as_ref().map(|d| d.metrics_addr())
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let reason = if std::thread::panicking() { "error" } else { "interrupted" };
        if let Err(e) = self.finish_with(reason) {
            eprintln!("gainguard: {e}");
        }
    }
}
