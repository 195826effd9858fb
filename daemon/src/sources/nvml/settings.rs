//! What NVML is told at start, and the `gainguardd` flags that set it.

use std::time::Duration;

use crate::duration::{seconds, MAX_DURATION};
use crate::error::DaemonError;

/// Whether to read GPU statistics through NVML.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NvmlMode {
    /// Use NVML when a driver and a GPU are present; otherwise export gainguard_nvml_up 0.
    Auto,
    /// Require NVML: the daemon does not start without it (gainguardd exits with status 2).
    On,
    /// Never touch NVML.
    Off,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmlSettings {
    pub mode: NvmlMode,
    /// Time between polls.
    pub interval: Duration,
}

impl Default for NvmlSettings {
    fn default() -> Self {
        NvmlSettings { mode: NvmlMode::Auto, interval: Duration::from_secs(5) }
    }
}

impl NvmlSettings {
    /// The settings with NVML off (what tests and machines without GPUs ask for).
    pub fn off() -> Self {
        NvmlSettings { mode: NvmlMode::Off, ..Default::default() }
    }

    pub fn validate(&self) -> Result<(), DaemonError> {
        if self.interval.is_zero() || self.interval > MAX_DURATION {
            return Err(DaemonError::Setting {
                setting: "nvml-interval".into(),
                detail: format!("{:?}, expected more than 0 and at most one year", self.interval),
            });
        }
        Ok(())
    }
}

/// `gainguardd`'s NVML flags.
#[derive(clap::Args, Debug, Clone)]
pub struct NvmlArgs {
    /// GPU statistics through NVML.
    #[arg(long, value_enum, default_value = "auto")]
    pub nvml: NvmlMode,

    /// Seconds between NVML polls.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub nvml_interval: f64,
}

impl NvmlArgs {
    pub fn settings(&self) -> Result<NvmlSettings, DaemonError> {
        Ok(NvmlSettings { mode: self.nvml, interval: seconds("nvml-interval", self.nvml_interval)? })
    }
}
