//! A remote sink's settings ([`SinkOptions`]) and why a sink could not be made ([`SinkError`]).

use std::path::PathBuf;
use std::time::Duration;

use crate::addr::AddrError;

/// Settings of a remote sink.
#[derive(Clone, Debug)]
pub struct SinkOptions {
    /// Events buffered while the writer is busy or the daemon is away; beyond it, events are dropped.
    pub capacity: usize,
    /// First reconnect delay; doubles after each failure up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// A write (or the daemon's greeting) that takes longer counts as a lost connection (a stuck daemon must
    /// not pin the writer).
    pub write_timeout: Duration,
    /// How long dropping the last clone waits for buffered events (a final Goodbye) to be written.
    pub flush_on_drop: Duration,
    /// After this long without an event, a blank line is sent so that the daemon's idle timeout (default
    /// 60 s) does not close a trainer between slow steps.
    pub keepalive: Duration,
    /// For TCP ingest: the file (mode 0600) holding the daemon's token. When `None`, the path in
    /// `$GAINGUARD_INGEST_TOKEN_FILE` is used. Unix sockets need no token (the daemon checks the uid).
    pub token_file: Option<PathBuf>,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            capacity: 8192,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            write_timeout: Duration::from_secs(1),
            flush_on_drop: Duration::from_secs(2),
            keepalive: Duration::from_secs(20),
            token_file: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Address(#[from] AddrError),
    #[error("sink option {0}")]
    Options(String),
    #[error("TCP ingest token: {0}")]
    Token(String),
    #[error("cannot start the sink's writer thread: {0}")]
    Thread(std::io::Error),
}
