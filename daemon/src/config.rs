//! What a daemon is told at start: where to listen, how to authenticate writers, and the limits that keep its
//! memory and its file descriptors bounded whatever its clients do. Every setting is checked by
//! [`DaemonConfig::validate`] before anything binds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use gainguard_protocol::addr::IngestAddr;
use gainguard_protocol::wire::DEFAULT_MAX_LINE_BYTES;

use crate::error::DaemonError;
use crate::sources::SourceSettings;
pub use crate::history::HistorySettings;
pub use crate::web::WebSettings;

/// Caps that keep memory, file descriptors and cardinality bounded whatever the clients send. The defaults
/// are listed in docs/protocol.md.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Open ingest connections in all. At the cap, a new connection closes the oldest one that has not yet
    /// delivered an event; when there is none, the new one is refused (`too_many_connections`).
    pub max_connections: usize,
    /// Open ingest connections of one peer: a Unix peer's uid, or a TCP peer's address.
    pub max_connections_per_peer: usize,
    pub max_runs: usize,
    pub max_params_per_run: usize,
    /// Upper bound of exported series (each histogram bucket counts).
    pub max_series: usize,
    pub max_line_bytes: usize,
    /// Bytes of unfinished lines buffered across all ingest connections; a line that would exceed it is
    /// skipped (`buffer_full`).
    pub ingest_buffer_bytes: usize,
    /// Bytes of decoded events waiting for the run table; a full queue makes connections wait (back-pressure)
    /// and embedded sinks drop.
    pub queue_bytes: usize,
    /// An ingest connection that sends no byte for this long is closed (senders send a blank line when idle).
    pub idle_timeout: Duration,
    /// Open HTTP connections; at the cap the oldest one without a request in progress is closed.
    pub max_http_connections: usize,
    /// A client that has not sent a whole request head within this long is disconnected.
    pub header_read_timeout: Duration,
    /// `/metrics` requests served at once; more are answered 503 (like node_exporter's `--web.max-requests`).
    pub max_concurrent_scrapes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_connections_per_peer: 128,
            max_runs: 256,
            max_params_per_run: 4096,
            max_series: 250_000,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            ingest_buffer_bytes: 32 << 20,
            queue_bytes: 64 << 20,
            idle_timeout: Duration::from_secs(60),
            max_http_connections: 64,
            header_read_timeout: Duration::from_secs(10),
            max_concurrent_scrapes: 40,
        }
    }
}

/// Who may write to the ingest sockets.
#[derive(Clone, Debug, Default)]
pub struct IngestAuth {
    /// Unix peers whose uid may write besides the daemon's own uid (checked with `SO_PEERCRED`).
    pub allow_uids: Vec<u32>,
    /// A file (mode 0600, owned by the daemon's user) holding the token that TCP writers send in their first
    /// line. Required when any TCP ingest address is configured.
    pub token_file: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Where `/metrics` and `/healthz` are served. Port 0 picks a free port; see [`crate::Daemon::metrics_addr`].
    /// An address off loopback needs TLS in [`Self::web`], or `web.listen_unprotected`.
    pub listen: SocketAddr,
    /// TLS and basic auth of the HTTP endpoint.
    pub web: WebSettings,
    /// Sockets on which trainers in other processes send JSON lines. Empty in embedded mode.
    pub ingest: Vec<IngestAddr>,
    pub auth: IngestAuth,
    /// The sources' own settings (NVML's mode and poll interval), defined in their files.
    pub sources: SourceSettings,
    /// How long a run keeps its series after its last event once nothing feeds it (a Goodbye, or its
    /// connection or embedded sink gone), before they are all removed.
    pub ttl: Duration,
    /// A `/metrics` body younger than this is served again instead of being rendered anew.
    pub metrics_max_age: Duration,
    pub limits: Limits,
    /// Names of sources (see [`crate::sources::SOURCES`]) not to run.
    pub disabled_sources: Vec<String>,
    /// How much history the live page at `/` keeps ([`crate::history`]).
    pub history: HistorySettings,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            web: WebSettings::default(),
            ingest: Vec::new(),
            auth: IngestAuth::default(),
            sources: SourceSettings::default(),
            ttl: Duration::from_secs(300),
            metrics_max_age: Duration::from_secs(1),
            limits: Limits::default(),
            disabled_sources: Vec::new(),
            history: HistorySettings::default(),
        }
    }
}

pub use crate::duration::{seconds, MAX_DURATION};

impl DaemonConfig {
    /// Checks every setting; the error names the first one out of range. (Source names are checked by
    /// [`crate::sources::check_disabled`].)
    pub fn validate(&self) -> Result<(), DaemonError> {
        let l = &self.limits;
        let durations = [
            ("ttl", self.ttl),
            ("ingest-idle-timeout", l.idle_timeout),
            ("header-read-timeout", l.header_read_timeout),
        ];
        for (name, d) in durations {
            if d.is_zero() || d > MAX_DURATION {
                return Err(setting(name, format!("{d:?}, expected more than 0 and at most one year")));
            }
        }
        if self.metrics_max_age > MAX_DURATION {
            return Err(setting("metrics-max-age", format!("{:?}, expected at most one year", self.metrics_max_age)));
        }
        let counts = [
            ("max-connections", l.max_connections),
            ("max-connections-per-peer", l.max_connections_per_peer),
            ("max-runs", l.max_runs),
            ("max-params-per-run", l.max_params_per_run),
            ("max-series", l.max_series),
            ("max-line-bytes", l.max_line_bytes),
            ("max-http-connections", l.max_http_connections),
            ("max-concurrent-scrapes", l.max_concurrent_scrapes),
        ];
        for (name, n) in counts {
            if n == 0 {
                return Err(setting(name, "0, expected at least 1".into()));
            }
        }
        // A semaphore holds at most usize::MAX >> 3 permits; a line must fit in both byte budgets.
        for (name, n) in [("ingest-buffer-bytes", l.ingest_buffer_bytes), ("queue-bytes", l.queue_bytes)] {
            if n < l.max_line_bytes || n > usize::MAX >> 4 {
                return Err(setting(name, format!("{n}, expected at least --max-line-bytes ({})", l.max_line_bytes)));
            }
        }
        self.sources.validate()?;
        self.history.validate()?;
        let tcp = self.ingest.iter().any(|a| matches!(a, IngestAddr::Tcp(_)));
        if tcp && self.auth.token_file.is_none() {
            return Err(setting(
                "ingest-token-file",
                "TCP ingest needs a token file: any local process can reach a loopback port".into(),
            ));
        }
        Ok(())
    }
}

fn setting(name: &str, detail: String) -> DaemonError {
    DaemonError::Setting { setting: name.to_string(), detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_out_of_range_duration_is_refused_with_the_setting_name() {
        for v in [1e19, 1e30, f64::INFINITY, f64::NAN, 0.0, -1.0] {
            let err = seconds("ttl", v).unwrap_err();
            assert!(err.to_string().contains("--ttl"), "{err}");
        }
        assert_eq!(seconds("ttl", 2.5).unwrap(), Duration::from_millis(2500));
    }

    #[test]
    fn tcp_ingest_without_a_token_file_is_refused() {
        let c = DaemonConfig { ingest: vec!["tcp:127.0.0.1:0".parse().unwrap()], ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("--ingest-token-file"));
    }
}
