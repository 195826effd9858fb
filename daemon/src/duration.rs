//! Duration settings: the longest any may be, and the parse of a number of seconds that names its flag.

use std::time::Duration;

use crate::error::DaemonError;

/// The longest any duration setting may be: one year. Longer ones overflow `Instant` arithmetic on some
/// platforms and are never what an operator meant.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses a number of seconds given for `setting`, in (0, [`MAX_DURATION`]]. Used by the binaries so that
/// `--ttl 1e19` is refused with the flag's name rather than a panic.
pub fn seconds(setting: &str, value: f64) -> Result<Duration, DaemonError> {
    if !(value.is_finite() && value > 0.0 && value <= MAX_DURATION.as_secs_f64()) {
        return Err(DaemonError::Setting {
            setting: setting.to_string(),
            detail: format!("{value:?} seconds, expected a number in (0, {}]", MAX_DURATION.as_secs()),
        });
    }
    Ok(Duration::from_secs_f64(value))
}
