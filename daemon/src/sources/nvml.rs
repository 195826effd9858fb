//! GPU statistics from NVML, polled on the daemon's own thread.
//!
//! NVML is reached through [`GpuBackend`] so that the mapping from readings to series can be tested with a
//! fake; the real backend is `nvml-wrapper`, which loads `libnvidia-ml.so` at run time (no link-time
//! dependency). A reading the driver does not support is left out, never replaced by a sentinel. Without a
//! driver or a GPU the daemon exports `gainguard_nvml_up 0`, logs one line, and carries on.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus::{CounterVec, GaugeVec, IntGaugeVec, Opts};

use super::{lock, CumulativeTracker, ParamLabels, RunKey, RunView, Source, SourceContext, SourceSpec};
use gainguard_protocol::events::{Envelope, Event};

use crate::config::NvmlMode;
use crate::error::DaemonError;

pub const SPEC: SourceSpec = SourceSpec { name: "nvml", default_enabled: true, build };

/// Throttle reasons as `reason` label values, in NVML's bit order.
pub const THROTTLE_REASONS: [&str; 9] = [
    "idle",
    "applications_clocks_setting",
    "sw_power_cap",
    "hw_slowdown",
    "sync_boost",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake",
    "display_clock_setting",
];

/// One reading of one GPU. `None` = not supported by this GPU or driver.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuReading {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// Percent, 0..=100, as NVML reports it.
    pub utilization_percent: Option<u32>,
    pub memory_utilization_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub power_milliwatts: Option<u32>,
    pub power_limit_milliwatts: Option<u32>,
    /// Energy since the driver was loaded.
    pub energy_millijoules: Option<u64>,
    pub temperature_celsius: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    /// Active flag per [`THROTTLE_REASONS`] entry.
    pub throttle: Option<[bool; 9]>,
    pub ecc_corrected: Option<u64>,
    pub ecc_uncorrected: Option<u64>,
    pub xid_errors: Option<u64>,
    /// (pid, used bytes) of compute and graphics processes.
    pub processes: Vec<(u32, u64)>,
}

/// Access to the GPUs of this node.
pub trait GpuBackend {
    fn read(&mut self) -> Result<Vec<GpuReading>, String>;
}

pub struct Nvml {
    host: String,
    up: IntGaugeVec,
    utilization: GaugeVec,
    memory_utilization: GaugeVec,
    memory_used: GaugeVec,
    memory_total: GaugeVec,
    power: GaugeVec,
    power_limit: GaugeVec,
    energy: CounterVec,
    temperature: GaugeVec,
    sm_clock: GaugeVec,
    memory_clock: GaugeVec,
    throttle: GaugeVec,
    ecc: CounterVec,
    xid: CounterVec,
    process_memory: GaugeVec,
    state: Mutex<NvmlState>,
    stop: Arc<AtomicBool>,
    poller: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct NvmlState {
    /// Trainer pids announced in Hello events.
    pids: HashMap<u32, RunKey>,
    cumulative: CumulativeTracker,
    /// Label values of the process series exported by the previous poll.
    process_series: HashSet<Vec<String>>,
}

const GPU_LABELS: [&str; 4] = ["host", "gpu", "uuid", "name"];

impl Nvml {
    /// Builds the collector and registers its families, without a backend or poller.
    pub fn new(registry: &prometheus::Registry, host: String) -> Result<Self, prometheus::Error> {
        let g = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &GPU_LABELS);
        let with = |extra: &'static str| {
            let mut l = GPU_LABELS.to_vec();
            l.push(extra);
            l
        };
        let mut process_labels = GPU_LABELS.to_vec();
        process_labels.extend(["pid", "run", "rank"]);
        let n = Nvml {
            up: IntGaugeVec::new(Opts::new("gainguard_nvml_up", "1 when NVML answered the latest poll, else 0."), &["host"])?,
            utilization: g("gainguard_gpu_utilization_ratio", "Fraction of the sample period in which a kernel ran.")?,
            memory_utilization: g(
                "gainguard_gpu_memory_utilization_ratio",
                "Fraction of the sample period in which device memory was read or written.",
            )?,
            memory_used: g("gainguard_gpu_memory_used_bytes", "Allocated device memory.")?,
            memory_total: g("gainguard_gpu_memory_total_bytes", "Installed device memory.")?,
            power: g("gainguard_gpu_power_watts", "Power draw.")?,
            power_limit: g("gainguard_gpu_power_limit_watts", "Enforced power limit.")?,
            energy: CounterVec::new(
                Opts::new("gainguard_gpu_energy_joules_total", "Energy consumed since the driver was loaded."),
                &GPU_LABELS,
            )?,
            temperature: g("gainguard_gpu_temperature_celsius", "GPU die temperature.")?,
            sm_clock: g("gainguard_gpu_sm_clock_hertz", "Current SM clock.")?,
            memory_clock: g("gainguard_gpu_memory_clock_hertz", "Current memory clock.")?,
            throttle: GaugeVec::new(
                Opts::new("gainguard_gpu_throttle_active", "1 while the clocks are held down for this reason."),
                &with("reason"),
            )?,
            ecc: CounterVec::new(
                Opts::new("gainguard_gpu_ecc_errors_total", "ECC memory errors (volatile count, since driver load)."),
                &with("type"),
            )?,
            xid: CounterVec::new(
                Opts::new("gainguard_gpu_xid_errors_total", "Xid critical errors seen by the daemon."),
                &GPU_LABELS,
            )?,
            process_memory: GaugeVec::new(
                Opts::new(
                    "gainguard_gpu_process_memory_bytes",
                    "Device memory used by a trainer process announced in a Hello event.",
                ),
                &process_labels,
            )?,
            host,
            state: Mutex::new(NvmlState::default()),
            stop: Arc::new(AtomicBool::new(false)),
            poller: Mutex::new(None),
        };
        registry.register(Box::new(n.up.clone()))?;
        for v in [
            &n.utilization,
            &n.memory_utilization,
            &n.memory_used,
            &n.memory_total,
            &n.power,
            &n.power_limit,
            &n.temperature,
            &n.sm_clock,
            &n.memory_clock,
            &n.throttle,
            &n.process_memory,
        ] {
            registry.register(Box::new(v.clone()))?;
        }
        registry.register(Box::new(n.energy.clone()))?;
        registry.register(Box::new(n.ecc.clone()))?;
        registry.register(Box::new(n.xid.clone()))?;
        n.up.with_label_values(&[&n.host]).set(0);
        Ok(n)
    }

    /// Exports one poll's readings (or its failure).
    pub fn apply(&self, readings: Result<Vec<GpuReading>, String>) {
        let readings = match readings {
            Ok(r) => r,
            Err(_) => {
                self.up.with_label_values(&[&self.host]).set(0);
                return;
            }
        };
        self.up.with_label_values(&[&self.host]).set(1);
        let mut state = lock(&self.state);
        let mut process_series = HashSet::new();
        for r in &readings {
            let index = r.index.to_string();
            let labels = [self.host.as_str(), &index, &r.uuid, &r.name];
            let set = |vec: &GaugeVec, v: Option<f64>| {
                if let Some(v) = v {
                    vec.with_label_values(&labels).set(v);
                }
            };
            set(&self.utilization, r.utilization_percent.map(|p| p as f64 / 100.0));
            set(&self.memory_utilization, r.memory_utilization_percent.map(|p| p as f64 / 100.0));
            set(&self.memory_used, r.memory_used_bytes.map(|b| b as f64));
            set(&self.memory_total, r.memory_total_bytes.map(|b| b as f64));
            set(&self.power, r.power_milliwatts.map(|mw| mw as f64 / 1000.0));
            set(&self.power_limit, r.power_limit_milliwatts.map(|mw| mw as f64 / 1000.0));
            set(&self.temperature, r.temperature_celsius.map(|c| c as f64));
            set(&self.sm_clock, r.sm_clock_mhz.map(|m| m as f64 * 1e6));
            set(&self.memory_clock, r.memory_clock_mhz.map(|m| m as f64 * 1e6));
            if let Some(mj) = r.energy_millijoules {
                let d = state.cumulative.delta(&["energy", &r.uuid], mj);
                self.energy.with_label_values(&labels).inc_by(d as f64 / 1000.0);
            }
            if let Some(flags) = r.throttle {
                for (reason, active) in THROTTLE_REASONS.iter().zip(flags) {
                    let l = [labels[0], labels[1], labels[2], labels[3], reason];
                    self.throttle.with_label_values(&l).set(if active { 1.0 } else { 0.0 });
                }
            }
            for (kind, total) in [("corrected", r.ecc_corrected), ("uncorrected", r.ecc_uncorrected)] {
                if let Some(total) = total {
                    let d = state.cumulative.delta(&["ecc", kind, &r.uuid], total);
                    let l = [labels[0], labels[1], labels[2], labels[3], kind];
                    self.ecc.with_label_values(&l).inc_by(d as f64);
                }
            }
            if let Some(total) = r.xid_errors {
                let d = state.cumulative.delta(&["xid", &r.uuid], total);
                self.xid.with_label_values(&labels).inc_by(d as f64);
            }
            for (pid, bytes) in &r.processes {
                let Some(run) = state.pids.get(pid) else { continue };
                let l: Vec<String> = labels
                    .iter()
                    .map(|s| s.to_string())
                    .chain([pid.to_string(), run.run.clone(), run.rank.clone()])
                    .collect();
                let refs: Vec<&str> = l.iter().map(String::as_str).collect();
                self.process_memory.with_label_values(&refs).set(*bytes as f64);
                process_series.insert(l);
            }
        }
        for gone in state.process_series.difference(&process_series) {
            let refs: Vec<&str> = gone.iter().map(String::as_str).collect();
            let _ = self.process_memory.remove_label_values(&refs);
        }
        state.process_series = process_series;
    }

    /// Polls `backend` every `interval` until [`Source::stop`].
    fn poll_loop(&self, backend: &mut dyn GpuBackend, interval: Duration) {
        while !self.stop.load(Ordering::Relaxed) {
            self.apply(backend.read());
            // Sleep in slices so that shutdown is prompt.
            let mut slept = Duration::ZERO;
            while slept < interval && !self.stop.load(Ordering::Relaxed) {
                let step = Duration::from_millis(50).min(interval - slept);
                std::thread::sleep(step);
                slept += step;
            }
        }
    }

    /// Starts the poller thread, which opens NVML and keeps it (and the Xid event set that borrows it) on its
    /// own stack until it stops. Returns once NVML answered or failed to.
    fn start_nvml_poller(self: &Arc<Self>, interval: Duration) -> Result<(), String> {
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let me = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name("gainguard-nvml".into())
            .spawn(move || {
                let nvml = match open_nvml() {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut backend = RealNvml::new(&nvml);
                let _ = ready_tx.send(Ok(()));
                me.poll_loop(&mut backend, interval);
            })
            .map_err(|e| format!("cannot start the NVML poller thread: {e}"))?;
        let ready = ready_rx.recv().unwrap_or_else(|_| Err("the NVML poller thread ended during start-up".into()));
        match ready {
            Ok(()) => *lock(&self.poller) = Some(handle),
            Err(_) => {
                let _ = handle.join();
            }
        }
        ready
    }
}

fn build(ctx: &SourceContext<'_>) -> Result<Arc<dyn Source>, DaemonError> {
    let nvml = Arc::new(Nvml::new(ctx.registry.prometheus(), ctx.host.clone())?);
    if ctx.config.nvml == NvmlMode::Off {
        return Ok(nvml);
    }
    if let Err(err) = nvml.start_nvml_poller(ctx.config.nvml_interval) {
        if ctx.config.nvml == NvmlMode::On {
            return Err(DaemonError::Nvml(err));
        }
        tracing::warn!("NVML unavailable ({err}); GPU metrics disabled, gainguard_nvml_up 0");
    }
    Ok(nvml)
}

impl Source for Nvml {
    fn name(&self) -> &'static str {
        SPEC.name
    }

    fn observe(&self, run: &mut RunView<'_>, envelope: &Envelope) {
        if let Event::Hello(h) = &envelope.event {
            let mut state = lock(&self.state);
            state.pids.retain(|_, k| k != run.key);
            state.pids.insert(h.pid, run.key.clone());
        }
    }

    fn forget_run(&self, run: &RunKey, _params: &[ParamLabels]) {
        lock(&self.state).pids.retain(|_, k| k != run);
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = lock(&self.poller).take() {
            let _ = h.join();
        }
    }
}

/// Opens NVML; an error when there is no driver or no GPU.
fn open_nvml() -> Result<nvml_wrapper::Nvml, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("cannot initialise NVML: {e}"))?;
    let count = nvml.device_count().map_err(|e| format!("NVML device count: {e}"))?;
    if count == 0 {
        return Err("NVML reports no GPU".to_string());
    }
    Ok(nvml)
}

/// The real backend: `nvml-wrapper` over the driver's `libnvidia-ml.so`, borrowing the NVML handle that the
/// poller thread owns.
pub struct RealNvml<'a> {
    nvml: &'a nvml_wrapper::Nvml,
    /// Subscription to Xid critical errors on every GPU that supports them (Linux only); None when NVML
    /// refused it (logged once), in which case `gainguard_gpu_xid_errors_total` is absent.
    xid_events: Option<nvml_wrapper::event::EventSet<'a>>,
    /// Xid errors seen since the daemon started, by GPU UUID, for the GPUs subscribed.
    xid_counts: HashMap<String, u64>,
}

impl<'a> RealNvml<'a> {
    fn new(nvml: &'a nvml_wrapper::Nvml) -> Self {
        let count = nvml.device_count().unwrap_or(0);
        let (xid_events, xid_counts) = match subscribe_xid(nvml, count) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("no Xid error events from NVML ({e}); gainguard_gpu_xid_errors_total is not exported");
                (None, HashMap::new())
            }
        };
        RealNvml { nvml, xid_events, xid_counts }
    }

    /// Whether this machine has a working NVML (opened and closed again).
    pub fn available() -> Result<(), String> {
        open_nvml().map(drop)
    }

    /// Counts the Xid events queued since the last poll, without waiting.
    fn drain_xid_events(&mut self) {
        use nvml_wrapper::bitmasks::event::EventTypes;
        let Some(set) = &self.xid_events else { return };
        // Bounded, in case a broken driver never reports an empty queue.
        for _ in 0..10_000 {
            let Ok(event) = set.wait(0) else { break };
            if !event.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
                continue;
            }
            let uuid = event.device.uuid().unwrap_or_default();
            tracing::error!("GPU {uuid}: Xid error {:?}", event.event_data);
            if let Some(n) = self.xid_counts.get_mut(&uuid) {
                *n += 1;
            }
        }
    }
}

/// An event set with every GPU that supports Xid critical-error events registered, and a zero count per
/// registered GPU (so that the counter exists, at 0, before the first error).
type XidSubscription<'a> = (Option<nvml_wrapper::event::EventSet<'a>>, HashMap<String, u64>);

#[cfg(target_os = "linux")]
fn subscribe_xid(nvml: &nvml_wrapper::Nvml, count: u32) -> Result<XidSubscription<'_>, String> {
    use nvml_wrapper::bitmasks::event::EventTypes;
    let mut set = nvml.create_event_set().map_err(|e| e.to_string())?;
    let mut counts = HashMap::new();
    for index in 0..count {
        let Ok(device) = nvml.device_by_index(index) else { continue };
        if !device.supported_event_types().is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR)) {
            continue;
        }
        // A failed registration frees the whole set (NVML's rule), so it ends the subscription.
        set = device.register_events(EventTypes::CRITICAL_XID_ERROR, set).map_err(|e| format!("GPU {index}: {e}"))?;
        counts.insert(device.uuid().map_err(|e| e.to_string())?, 0);
    }
    if counts.is_empty() {
        return Err("no GPU supports Xid critical-error events".into());
    }
    Ok((Some(set), counts))
}

#[cfg(not(target_os = "linux"))]
fn subscribe_xid(_: &nvml_wrapper::Nvml, _: u32) -> Result<XidSubscription<'_>, String> {
    Err("NVML events exist on Linux only".into())
}

impl GpuBackend for RealNvml<'_> {
    fn read(&mut self) -> Result<Vec<GpuReading>, String> {
        self.drain_xid_events();
        let count = self.nvml.device_count().map_err(|e| e.to_string())?;
        (0..count).map(|index| self.read_device(index)).collect()
    }
}

impl RealNvml<'_> {
    /// One GPU's reading; a value the device does not support is `None`.
    #[allow(deprecated)]
    fn read_device(&self, index: u32) -> Result<GpuReading, String> {
        use nvml_wrapper::bitmasks::device::ThrottleReasons as T;
        use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor};
        use nvml_wrapper::enums::device::UsedGpuMemory;
        let d = self.nvml.device_by_index(index).map_err(|e| e.to_string())?;
        let util = d.utilization_rates().ok();
        let mem = d.memory_info().ok();
        let throttle = d.current_throttle_reasons().ok().map(|t| {
            [
                T::GPU_IDLE,
                T::APPLICATIONS_CLOCKS_SETTING,
                T::SW_POWER_CAP,
                T::HW_SLOWDOWN,
                T::SYNC_BOOST,
                T::SW_THERMAL_SLOWDOWN,
                T::HW_THERMAL_SLOWDOWN,
                T::HW_POWER_BRAKE_SLOWDOWN,
                T::DISPLAY_CLOCK_SETTING,
            ]
            .map(|flag| t.contains(flag))
        });
        let mut processes = Vec::new();
        for p in d.running_compute_processes().unwrap_or_default().into_iter().chain(d.running_graphics_processes().unwrap_or_default()) {
            if let UsedGpuMemory::Used(bytes) = p.used_gpu_memory {
                processes.push((p.pid, bytes));
            }
        }
        let uuid = d.uuid().unwrap_or_default();
        Ok(GpuReading {
            index,
            xid_errors: self.xid_counts.get(&uuid).copied(),
            uuid,
            name: d.name().unwrap_or_default(),
            utilization_percent: util.as_ref().map(|u| u.gpu),
            memory_utilization_percent: util.as_ref().map(|u| u.memory),
            memory_used_bytes: mem.as_ref().map(|m| m.used),
            memory_total_bytes: mem.as_ref().map(|m| m.total),
            power_milliwatts: d.power_usage().ok(),
            power_limit_milliwatts: d.enforced_power_limit().ok(),
            energy_millijoules: d.total_energy_consumption().ok(),
            temperature_celsius: d.temperature(TemperatureSensor::Gpu).ok(),
            sm_clock_mhz: d.clock_info(Clock::SM).ok(),
            memory_clock_mhz: d.clock_info(Clock::Memory).ok(),
            throttle,
            ecc_corrected: d.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile).ok(),
            ecc_uncorrected: d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile).ok(),
            processes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Registry;

    fn family_value(reg: &Registry, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
        for f in reg.gather() {
            if f.name() != name {
                continue;
            }
            for m in f.get_metric() {
                if let Some((k, v)) = label {
                    if !m.get_label().iter().any(|l| l.name() == k && l.value() == v) {
                        continue;
                    }
                }
                return Some(match f.get_field_type() {
                    prometheus::proto::MetricType::COUNTER => m.get_counter().get_value(),
                    _ => m.get_gauge().get_value(),
                });
            }
        }
        None
    }

    fn reading() -> GpuReading {
        GpuReading {
            index: 0,
            uuid: "GPU-1234".into(),
            name: "Fake H100".into(),
            utilization_percent: Some(57),
            memory_used_bytes: Some(3 << 30),
            power_milliwatts: Some(312_500),
            energy_millijoules: Some(2_000_500),
            sm_clock_mhz: Some(1980),
            throttle: Some([false, false, true, false, false, false, false, false, false]),
            ecc_uncorrected: Some(2),
            processes: vec![(4242, 1 << 30), (999, 5)],
            ..Default::default()
        }
    }

    #[test]
    fn readings_map_to_base_units_and_unsupported_fields_stay_absent() {
        let reg = Registry::new();
        let n = Nvml::new(&reg, "node-a".into()).unwrap();
        n.apply(Ok(vec![reading()]));
        assert_eq!(family_value(&reg, "gainguard_nvml_up", None), Some(1.0));
        assert_eq!(family_value(&reg, "gainguard_gpu_utilization_ratio", None), Some(0.57));
        assert_eq!(family_value(&reg, "gainguard_gpu_memory_used_bytes", None), Some(3.0 * 1024.0 * 1024.0 * 1024.0));
        assert_eq!(family_value(&reg, "gainguard_gpu_power_watts", None), Some(312.5));
        assert_eq!(family_value(&reg, "gainguard_gpu_energy_joules_total", None), Some(2000.5));
        assert_eq!(family_value(&reg, "gainguard_gpu_sm_clock_hertz", None), Some(1.98e9));
        assert_eq!(family_value(&reg, "gainguard_gpu_throttle_active", Some(("reason", "sw_power_cap"))), Some(1.0));
        assert_eq!(family_value(&reg, "gainguard_gpu_throttle_active", Some(("reason", "idle"))), Some(0.0));
        assert_eq!(family_value(&reg, "gainguard_gpu_ecc_errors_total", Some(("type", "uncorrected"))), Some(2.0));
        // Not reported by the fake: no series at all, not a zero or -1.
        for absent in [
            "gainguard_gpu_memory_total_bytes",
            "gainguard_gpu_temperature_celsius",
            "gainguard_gpu_memory_utilization_ratio",
            "gainguard_gpu_xid_errors_total",
        ] {
            assert_eq!(family_value(&reg, absent, None), None, "{absent}");
        }
        // No Hello announced these pids.
        assert_eq!(family_value(&reg, "gainguard_gpu_process_memory_bytes", None), None);
    }

    #[test]
    fn cumulative_nvml_totals_add_only_their_increase_between_polls() {
        let reg = Registry::new();
        let n = Nvml::new(&reg, "node-a".into()).unwrap();
        n.apply(Ok(vec![reading()]));
        let mut later = reading();
        later.energy_millijoules = Some(2_003_500);
        n.apply(Ok(vec![later]));
        assert_eq!(family_value(&reg, "gainguard_gpu_energy_joules_total", None), Some(2003.5));
    }

    #[test]
    fn process_memory_is_exported_only_for_announced_pids_and_vanishes_with_the_process() {
        let reg = Registry::new();
        let n = Nvml::new(&reg, "node-a".into()).unwrap();
        let key = RunKey { run: "target".into(), rank: "3".into(), host: "node-a".into() };
        n.state.lock().unwrap().pids.insert(4242, key);
        n.apply(Ok(vec![reading()]));
        assert_eq!(family_value(&reg, "gainguard_gpu_process_memory_bytes", Some(("pid", "4242"))), Some(1073741824.0));
        assert_eq!(family_value(&reg, "gainguard_gpu_process_memory_bytes", Some(("pid", "999"))), None);
        let mut later = reading();
        later.processes.clear();
        n.apply(Ok(vec![later]));
        assert_eq!(family_value(&reg, "gainguard_gpu_process_memory_bytes", None), None);
    }

    #[test]
    fn a_failed_poll_sets_nvml_up_to_zero() {
        let reg = Registry::new();
        let n = Nvml::new(&reg, "node-a".into()).unwrap();
        n.apply(Ok(vec![reading()]));
        n.apply(Err("driver gone".into()));
        assert_eq!(family_value(&reg, "gainguard_nvml_up", None), Some(0.0));
    }

    #[test]
    fn the_real_backend_fails_cleanly_on_a_machine_without_a_driver() {
        // On a GPU machine this test has nothing to check.
        if std::path::Path::new("/dev/nvidiactl").exists() {
            return;
        }
        assert!(RealNvml::available().is_err());
    }
}
