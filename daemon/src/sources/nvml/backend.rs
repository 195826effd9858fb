//! The real backend: `nvml-wrapper`, which loads the driver's `libnvidia-ml.so` at run time (no link-time
//! dependency), behind [`GpuBackend`] so that the mapping can be tested with a fake.

use std::collections::HashMap;

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

/// Opens NVML; an error when there is no driver or no GPU.
pub(super) fn open_nvml() -> Result<nvml_wrapper::Nvml, String> {
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
    pub(super) fn new(nvml: &'a nvml_wrapper::Nvml) -> Self {
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

    #[test]
    fn the_real_backend_opens_nvml_exactly_where_a_driver_is_present() {
        if std::path::Path::new("/dev/nvidiactl").exists() {
            RealNvml::available().expect("a driver is present, so NVML must open");
        } else {
            assert!(RealNvml::available().is_err());
        }
    }
}
