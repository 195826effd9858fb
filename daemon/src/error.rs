//! Why a daemon could not start.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The OS error is the source, so that a chain printer (`{:#}`) shows it once.
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ingest socket {path}: a live gainguardd is already listening there")]
    SocketInUse { path: PathBuf },
    #[error("ingest socket directory {path}: {detail}")]
    SocketDir { path: PathBuf, detail: String },
    #[error("--{setting} {detail}")]
    Setting { setting: String, detail: String },
    /// `field` is the file's key path (`tls_server_config.cert_file`), or `the file` itself.
    #[error("web config file {path}: {field}: {detail}")]
    WebConfig { path: PathBuf, field: String, detail: String },
    #[error("ingest token file {path}: {detail}")]
    TokenFile { path: PathBuf, detail: String },
    /// A source the settings require could not start (NVML with `--nvml on` and no driver).
    #[error("source {source_name}: {detail}")]
    SourceUnavailable { source_name: &'static str, detail: String },
    #[error("unknown source `{name}` in the disabled list; known sources: {known}")]
    UnknownSource { name: String, known: String },
    #[error("metric registration failed: {0}")]
    Registry(#[from] prometheus::Error),
    #[error("cannot start the daemon's threads")]
    Runtime(#[source] std::io::Error),
}

impl DaemonError {
    /// True when the error is an address already taken by another process.
    pub fn is_addr_in_use(&self) -> bool {
        match self {
            DaemonError::Bind { source, .. } => source.kind() == std::io::ErrorKind::AddrInUse,
            DaemonError::SocketInUse { .. } => true,
            _ => false,
        }
    }

    /// True when the operator asked for something that cannot be (a setting out of range, an address in use,
    /// a required source (NVML) absent, an unusable token or web config file): `gainguardd` exits with status 2 for these.
    pub fn is_usage(&self) -> bool {
        self.is_addr_in_use()
            || matches!(
                self,
                DaemonError::Setting { .. }
                    | DaemonError::TokenFile { .. }
                    | DaemonError::WebConfig { .. }
                    | DaemonError::SocketDir { .. }
                    | DaemonError::SourceUnavailable { .. }
                    | DaemonError::UnknownSource { .. }
            )
    }
}
