//! Standalone ingest: accepts trainer connections on Unix sockets and loopback TCP, checks who they are,
//! splits their byte streams into lines, decodes each line, and forwards the envelopes to the run table in
//! batches.
//!
//! - Unix peers are admitted by uid (`SO_PEERCRED`), TCP peers by the token in their first line.
//! - Admitted connections are answered with one greeting line (docs/protocol.md); the daemon writes nothing
//!   else.
//! - A connection that sends no byte for the idle timeout is closed; at a connection cap, the oldest one
//!   that never delivered an event makes room.
//! - A bad line is counted and skipped; the lines after it on the same connection still count. An over-long
//!   line is skipped up to its newline without being buffered; unfinished lines of all connections together
//!   are bounded in bytes.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use gainguard_protocol::events::Envelope;
use gainguard_protocol::wire::{AuthLine, Greeting, LineDecoder, RejectReason};

use crate::admission::{accept_loop, ConnectionTable, Peer, Refusal, Slot};
use crate::auth::{Token, UidPolicy};
use crate::queue::Queue;
use crate::runs::{ConnId, Control};
use crate::selfmetrics::SelfMetrics;

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 16 * 1024;
/// Decoded bytes after which a batch is handed to the run table even if the read chunk has more lines.
const BATCH_BYTES: usize = 256 * 1024;

pub(crate) struct Ingest {
    pub queue: Queue,
    pub control: Sender<Control>,
    pub metrics: SelfMetrics,
    pub connections: Arc<ConnectionTable>,
    pub next_conn: Arc<AtomicU64>,
    pub max_line_bytes: usize,
    pub idle_timeout: Duration,
    /// Bytes still free for unfinished lines, across connections.
    pub line_budget: AtomicUsize,
    pub uids: UidPolicy,
    pub token: Option<Token>,
}

// Admission happens in the accept loop, in arrival order, so that the oldest idle connection is the one
// that waited longest (a slot taken in a spawned task could go to a later arrival first).

pub(crate) async fn serve_unix(listener: tokio::net::UnixListener, ingest: Arc<Ingest>) {
    accept_loop(listener, "ingest socket", move |stream: tokio::net::UnixStream| {
        let admitted = ingest.admit_unix(&stream);
        tokio::spawn(Arc::clone(&ingest).serve(stream, admitted, false));
    })
    .await
}

pub(crate) async fn serve_tcp(listener: tokio::net::TcpListener, ingest: Arc<Ingest>) {
    accept_loop(listener, "ingest port", move |(stream, peer): (tokio::net::TcpStream, std::net::SocketAddr)| {
        // The listener is loopback-only; a connection is checked too.
        if peer.ip().is_loopback() {
            let _ = stream.set_nodelay(true);
            let admitted = ingest.admit(Peer::Addr(peer.ip()));
            // Greeted once the first line proves the token.
            tokio::spawn(Arc::clone(&ingest).serve(stream, admitted, true));
        }
    })
    .await
}

/// Tells a refused client why (best effort, it may not read) and counts it.
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, metrics: &SelfMetrics, reason: RejectReason) {
    metrics.reject(reason);
    let _ = tokio::time::timeout(Duration::from_millis(100), stream.write_all(&Greeting::refused(reason).line())).await;
}

impl Ingest {
    fn admit_unix(&self, stream: &tokio::net::UnixStream) -> Result<Slot, RejectReason> {
        let uid = stream.peer_cred().map(|c| c.uid()).map_err(|e| {
            tracing::warn!("ingest socket: no peer credentials ({e}); refusing");
            RejectReason::UidNotAllowed
        })?;
        if !self.uids.allows(uid) {
            return Err(RejectReason::UidNotAllowed);
        }
        self.admit(Peer::Uid(uid))
    }

    fn admit(&self, peer: Peer) -> Result<Slot, RejectReason> {
        self.connections.admit(peer).map_err(|(Refusal::Full | Refusal::PeerFull)| RejectReason::TooManyConnections)
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(self: Arc<Self>, mut stream: S, admitted: Result<Slot, RejectReason>, auth: bool) {
        match admitted {
            Err(reason) => refuse(&mut stream, &self.metrics, reason).await,
            Ok(slot) if auth => self.read_connection(stream, slot, true).await,
            Ok(slot) => {
                if greet(&mut stream).await {
                    self.read_connection(stream, slot, false).await;
                }
            }
        }
    }

    async fn read_connection<S: AsyncRead + AsyncWrite + Unpin>(self: Arc<Self>, mut stream: S, slot: Slot, auth: bool) {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let mut lines = LineReader {
            ingest: Arc::clone(&self),
            conn,
            line: Vec::new(),
            reserved: 0,
            skipping: false,
            awaiting_auth: auth,
            decoder: LineDecoder::default(),
        };
        let _open = OpenConnection::new(Arc::clone(&self), conn);
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            let read = tokio::select! {
                r = tokio::time::timeout(self.idle_timeout, stream.read(&mut chunk)) => r,
                () = slot.evicted() => {
                    self.metrics.closed("evicted");
                    break;
                }
            };
            let n = match read {
                Err(_elapsed) => {
                    self.metrics.closed("idle_timeout");
                    break;
                }
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(n)) => n,
            };
            match lines.feed(&chunk[..n], &mut stream, &slot).await {
                Flow::Continue => {}
                Flow::Close => break,
            }
        }
        lines.finish();
        if self.queue.disconnected(conn) {
            _open.reported();
        }
    }
}

/// Writes the `ok` greeting; false when the client is already gone.
async fn greet<S: AsyncWrite + Unpin>(stream: &mut S) -> bool {
    let ok = Greeting::Ok.line();
    matches!(tokio::time::timeout(Duration::from_secs(1), stream.write_all(&ok)).await, Ok(Ok(())))
}

enum Flow {
    Continue,
    Close,
}

/// Counts an open connection, and reports its end to the run table if the task is cancelled before it could
/// queue the end behind its last events.
struct OpenConnection {
    ingest: Arc<Ingest>,
    conn: ConnId,
    reported: std::cell::Cell<bool>,
}

impl OpenConnection {
    fn new(ingest: Arc<Ingest>, conn: ConnId) -> Self {
        ingest.metrics.connections.inc();
        OpenConnection { ingest, conn, reported: std::cell::Cell::new(false) }
    }

    fn reported(&self) {
        self.reported.set(true);
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.ingest.metrics.connections.dec();
        if !self.reported.get() {
            let _ = self.ingest.control.send(Control::Disconnected { conn: self.conn });
        }
    }
}

/// Splits one connection's bytes into lines and batches their envelopes.
struct LineReader {
    ingest: Arc<Ingest>,
    conn: ConnId,
    /// The unfinished line.
    line: Vec<u8>,
    /// Bytes of [`Ingest::line_budget`] this connection holds for its unfinished line.
    reserved: usize,
    skipping: bool,
    /// A TCP connection whose first line (the token) has not arrived yet.
    awaiting_auth: bool,
    decoder: LineDecoder,
}

impl LineReader {
    async fn feed<S: AsyncWrite + Unpin>(&mut self, mut rest: &[u8], stream: &mut S, slot: &Slot) -> Flow {
        let max = self.ingest.max_line_bytes;
        // Sized for the chunk's lines (an encoded step or spectrum line is 150-300 bytes), so that it seldom grows.
        let mut batch = Batch { events: Vec::with_capacity(rest.len() / 160 + 1), bytes: 0 };
        while !rest.is_empty() {
            let newline = memchr::memchr(b'\n', rest);
            let (segment, next) = match newline {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            rest = next;
            if self.skipping {
                self.skipping = newline.is_none();
                continue;
            }
            if self.line.len() + segment.len() > max {
                self.ingest.metrics.reject(RejectReason::LineTooLong);
                self.clear_line();
                self.skipping = newline.is_none();
                continue;
            }
            if newline.is_none() {
                if !self.reserve(segment.len()) {
                    self.ingest.metrics.reject(RejectReason::BufferFull);
                    self.clear_line();
                    self.skipping = true;
                    continue;
                }
                self.line.extend_from_slice(segment);
                continue;
            }
            let line = if self.line.is_empty() {
                segment
            } else {
                self.line.extend_from_slice(segment);
                &self.line[..]
            };
            if self.awaiting_auth {
                let first = line.to_vec();
                if !self.authenticate(&first, stream).await {
                    return Flow::Close;
                }
            } else {
                decode(&mut self.decoder, &self.ingest.metrics, line, &mut batch);
            }
            self.clear_line();
            if batch.bytes >= BATCH_BYTES && !self.flush(&mut batch, slot).await {
                return Flow::Close;
            }
        }
        if self.flush(&mut batch, slot).await {
            Flow::Continue
        } else {
            Flow::Close
        }
    }

    /// Checks the first line of a TCP connection; greets or refuses.
    async fn authenticate<S: AsyncWrite + Unpin>(&mut self, line: &[u8], stream: &mut S) -> bool {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let presented = serde_json::from_slice::<AuthLine>(line).ok();
        let ok = match (&self.ingest.token, presented) {
            (Some(token), Some(a)) => token.matches(a.auth.as_bytes()),
            _ => false,
        };
        if !ok {
            refuse(stream, &self.ingest.metrics, RejectReason::Unauthenticated).await;
            return false;
        }
        self.awaiting_auth = false;
        greet(stream).await
    }

    /// Hands the batch to the run table (waiting for queue budget); false when the run table is gone.
    async fn flush(&self, batch: &mut Batch, slot: &Slot) -> bool {
        if batch.events.is_empty() {
            return true;
        }
        slot.set_busy();
        let events = std::mem::take(&mut batch.events);
        let bytes = std::mem::take(&mut batch.bytes);
        self.ingest.queue.send(self.conn, events, bytes).await
    }

    fn reserve(&mut self, n: usize) -> bool {
        let budget = &self.ingest.line_budget;
        let ok = budget.fetch_update(Ordering::AcqRel, Ordering::Acquire, |free| free.checked_sub(n)).is_ok();
        if ok {
            self.reserved += n;
        }
        ok
    }

    fn clear_line(&mut self) {
        self.ingest.line_budget.fetch_add(std::mem::take(&mut self.reserved), Ordering::AcqRel);
        self.line.clear();
        // An unfinished line's memory goes back with its reservation once it is large.
        if self.line.capacity() > READ_CHUNK {
            self.line = Vec::new();
        }
    }

    /// The connection ended: a line cut short is a truncated event.
    fn finish(&mut self) {
        if !self.line.is_empty() && !self.skipping {
            self.ingest.metrics.reject(RejectReason::Malformed);
        }
        self.clear_line();
    }
}

impl Drop for LineReader {
    fn drop(&mut self) {
        self.ingest.line_budget.fetch_add(std::mem::take(&mut self.reserved), Ordering::AcqRel);
    }
}

/// Decodes one line into the batch, or counts why it was refused.
fn decode(decoder: &mut LineDecoder, metrics: &SelfMetrics, line: &[u8], batch: &mut Batch) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    match decoder.decode(line) {
        Ok(envelope) => {
            batch.bytes += line.len() + std::mem::size_of::<Envelope>();
            batch.events.push(envelope);
        }
        Err(r) => metrics.reject(r.reason),
    }
}

#[derive(Default)]
struct Batch {
    events: Vec<Envelope>,
    bytes: usize,
}
