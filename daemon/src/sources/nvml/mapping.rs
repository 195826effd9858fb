//! NVML readings → series: units converted to base units (ratios, bytes, watts, hertz, joules), cumulative
//! driver totals followed by counters, and the memory of trainer processes announced in Hello events. A
//! reading the driver does not support is left out, never replaced by a sentinel.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use prometheus::Opts;

use super::backend::{GpuReading, THROTTLE_REASONS};
use crate::exposition::{CounterVec, GaugeVec, IntCounterVec, Registry};
use crate::sources::{lock, CumulativeTracker, RunKey};

/// The GPU families of one node and what is needed to keep them up to date.
pub struct GpuSeries {
    host: String,
    up: GaugeVec,
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
    ecc: IntCounterVec,
    xid: IntCounterVec,
    process_memory: GaugeVec,
    state: Mutex<NvmlState>,
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

impl GpuSeries {
    /// Builds the families and registers them; `gainguard_nvml_up` starts at 0.
    pub fn new(registry: &Registry, host: String) -> Result<Self, prometheus::Error> {
        let g = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &GPU_LABELS);
        let with = |extra: &'static str| {
            let mut l = GPU_LABELS.to_vec();
            l.push(extra);
            l
        };
        let mut process_labels = GPU_LABELS.to_vec();
        process_labels.extend(["pid", "run", "rank"]);
        let n = GpuSeries {
            up: GaugeVec::new(Opts::new("gainguard_nvml_up", "1 when NVML answered the latest poll, else 0."), &["host"])?,
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
            ecc: IntCounterVec::new(
                Opts::new("gainguard_gpu_ecc_errors_total", "ECC memory errors (volatile count, since driver load)."),
                &with("type"),
            )?,
            xid: IntCounterVec::new(
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
        };
        for v in [
            &n.up,
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
        n.up.with_label_values(&[&n.host]).set(0.0);
        Ok(n)
    }

    /// Exports one poll's readings (or its failure).
    pub fn apply(&self, readings: Result<Vec<GpuReading>, String>) {
        let readings = match readings {
            Ok(r) => r,
            Err(_) => {
                self.up.with_label_values(&[&self.host]).set(0.0);
                return;
            }
        };
        self.up.with_label_values(&[&self.host]).set(1.0);
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
                    self.ecc.with_label_values(&l).inc_by(d);
                }
            }
            if let Some(total) = r.xid_errors {
                let d = state.cumulative.delta(&["xid", &r.uuid], total);
                self.xid.with_label_values(&labels).inc_by(d);
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

    /// A trainer announced its pid in a Hello event: its GPU memory is exported with its run labels.
    pub fn announce(&self, pid: u32, run: &RunKey) {
        let mut state = lock(&self.state);
        state.pids.retain(|_, k| k != run);
        state.pids.insert(pid, run.clone());
    }

    pub fn forget_run(&self, run: &RunKey) {
        lock(&self.state).pids.retain(|_, k| k != run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the first sample of `name` (with `label` among its labels) in the registry's text body.
    fn family_value(reg: &Registry, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
        let mut body = Vec::new();
        reg.encode_families(&mut body);
        let body = String::from_utf8(body).unwrap();
        let wanted = label.map(|(k, v)| format!("{k}=\"{v}\""));
        body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            let labelled = wanted.as_ref().is_none_or(|w| series.contains(w.as_str()));
            (metric == name && labelled).then(|| value.parse().unwrap())
        })
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
        let n = GpuSeries::new(&reg, "node-a".into()).unwrap();
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
        let n = GpuSeries::new(&reg, "node-a".into()).unwrap();
        n.apply(Ok(vec![reading()]));
        let mut later = reading();
        later.energy_millijoules = Some(2_003_500);
        n.apply(Ok(vec![later]));
        assert_eq!(family_value(&reg, "gainguard_gpu_energy_joules_total", None), Some(2003.5));
    }

    #[test]
    fn process_memory_is_exported_only_for_announced_pids_and_vanishes_with_the_process() {
        let reg = Registry::new();
        let n = GpuSeries::new(&reg, "node-a".into()).unwrap();
        let key = RunKey { run: "target".into(), rank: "3".into(), host: "node-a".into() };
        n.announce(4242, &key);
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
        let n = GpuSeries::new(&reg, "node-a".into()).unwrap();
        n.apply(Ok(vec![reading()]));
        n.apply(Err("driver gone".into()));
        assert_eq!(family_value(&reg, "gainguard_nvml_up", None), Some(0.0));
    }
}
