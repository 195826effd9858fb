//! Standalone ingest: accepts trainer connections on Unix sockets and loopback TCP, splits their byte
//! streams into lines, decodes each line, and forwards the envelopes to the run table.
//!
//! A bad line is counted and skipped; the lines after it on the same connection still count. An over-long
//! line is skipped up to its newline without being buffered.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::protocol::{decode_line, RejectReason};
use crate::runs::{ConnId, Control, IngestMsg};
use crate::selfmetrics::SelfMetrics;

pub(crate) struct IngestShared {
    pub data: Sender<IngestMsg>,
    pub control: Sender<Control>,
    pub metrics: SelfMetrics,
    pub max_line_bytes: usize,
    pub max_connections: usize,
    pub active: AtomicUsize,
    pub next_conn: Arc<AtomicU64>,
}

/// Counts a connection while it lives. Its end is reported to the run table after its last line (see
/// [`read_connection`]); if the task is cancelled instead, the control channel carries it.
struct ConnectionSlot {
    shared: Arc<IngestShared>,
    conn: ConnId,
    reported: bool,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.shared.active.fetch_sub(1, Ordering::SeqCst);
        self.shared.metrics.connections.dec();
        if !self.reported {
            let _ = self.shared.control.send(Control::Disconnected { conn: self.conn });
        }
    }
}

impl IngestShared {
    fn open_slot(self: &Arc<Self>) -> Option<ConnectionSlot> {
        if self.active.fetch_add(1, Ordering::SeqCst) >= self.max_connections {
            self.active.fetch_sub(1, Ordering::SeqCst);
            self.metrics.reject(RejectReason::TooManyConnections);
            return None;
        }
        self.metrics.connections.inc();
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        Some(ConnectionSlot { shared: Arc::clone(self), conn, reported: false })
    }

    /// Hands one envelope to the run table. When it is busy the connection waits, which pushes back on the
    /// sender's socket; the sender's own bounded buffer then drops and counts.
    async fn forward(&self, mut msg: IngestMsg) {
        loop {
            match self.data.try_send(msg) {
                Ok(()) => return,
                Err(TrySendError::Full(m)) => {
                    msg = m;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }

    async fn line(&self, conn: ConnId, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        match decode_line(line) {
            Ok(envelope) => self.forward(IngestMsg::Event { conn, envelope, validated: true }).await,
            Err(r) => self.metrics.reject(r.reason),
        }
    }
}

pub(crate) async fn serve_unix(listener: tokio::net::UnixListener, shared: Arc<IngestShared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let Some(slot) = shared.open_slot() else { continue };
        tokio::spawn(read_connection(stream, slot));
    }
}

pub(crate) async fn serve_tcp(listener: tokio::net::TcpListener, shared: Arc<IngestShared>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        // The listener is loopback-only, but a connection is checked too: the protocol has no authentication.
        if !peer.ip().is_loopback() {
            continue;
        }
        let Some(slot) = shared.open_slot() else { continue };
        let _ = stream.set_nodelay(true);
        tokio::spawn(read_connection(stream, slot));
    }
}

async fn read_connection<R: AsyncRead + Unpin>(mut stream: R, mut slot: ConnectionSlot) {
    let shared = Arc::clone(&slot.shared);
    let max = shared.max_line_bytes;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut line: Vec<u8> = Vec::new();
    let mut skipping = false;
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut rest = &chunk[..n];
        while !rest.is_empty() {
            let newline = memchr(b'\n', rest);
            let (segment, next) = match newline {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            rest = next;
            if skipping {
                if newline.is_some() {
                    skipping = false;
                }
                continue;
            }
            if line.len() + segment.len() > max {
                shared.metrics.reject(RejectReason::LineTooLong);
                line.clear();
                skipping = newline.is_none();
                continue;
            }
            if newline.is_some() {
                if line.is_empty() {
                    shared.line(slot.conn, segment).await;
                } else {
                    line.extend_from_slice(segment);
                    shared.line(slot.conn, &line).await;
                    line.clear();
                }
            } else {
                line.extend_from_slice(segment);
            }
        }
        // Keep at most one line's worth of memory per idle connection.
        if line.capacity() > 64 * 1024 && line.is_empty() {
            line = Vec::new();
        }
    }
    // A connection that ends mid-line sent a truncated event.
    if !line.is_empty() && !skipping {
        shared.metrics.reject(RejectReason::Malformed);
    }
    shared.forward(IngestMsg::Disconnected { conn: slot.conn }).await;
    slot.reported = true;
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}
