//! The trainer's side of the channel: a [`Sink`] whose `send` never blocks.
//!
//! - embedded: straight into the in-process daemon's queue ([`crate::Daemon::sink`]);
//! - remote: a background thread writes JSON lines to a standalone `gainguardd` ([`Sink::connect`]),
//!   reconnecting with capped exponential backoff and replaying the last Hello and Params on reconnect;
//! - capture: into any crossbeam channel ([`Sink::from_sender`]), for tests;
//! - disabled: drops everything silently ([`Sink::disabled`]).
//!
//! A full buffer or an absent daemon never stalls the trainer: the event is dropped and counted in
//! [`Sink::dropped_total`], which the plugin reports as `events_dropped_total` in its Step events.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use prometheus::IntGauge;

use crate::addr::{AddrError, IngestAddr};
use crate::events::{Envelope, Event};
use crate::protocol::encode_line;
use crate::runs::{ConnId, Control, IngestMsg};

/// Settings of a remote sink.
#[derive(Clone, Debug)]
pub struct SinkOptions {
    /// Events buffered while the writer is busy or the daemon is away; beyond it, events are dropped.
    pub capacity: usize,
    /// First reconnect delay; doubles after each failure up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// A write that takes longer counts as a lost connection (a stuck daemon must not pin the writer).
    pub write_timeout: Duration,
    /// How long dropping the last clone waits for buffered events (a final Goodbye) to be written.
    pub flush_on_drop: Duration,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            capacity: 8192,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            write_timeout: Duration::from_secs(1),
            flush_on_drop: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Address(#[from] AddrError),
    #[error("sink option {0}")]
    Options(String),
    #[error("cannot start the sink's writer thread: {0}")]
    Thread(std::io::Error),
}

/// Where a trainer sends its events. Cheap to clone; clones share one buffer and one drop counter.
#[derive(Clone)]
pub struct Sink {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    dropped: AtomicU64,
}

enum Target {
    Disabled,
    Capture(Sender<Envelope>),
    Embedded { data: Sender<IngestMsg>, control: Sender<Control>, conn: ConnId, connections: IntGauge },
    Remote {
        tx: Option<Sender<Envelope>>,
        closed: Arc<AtomicBool>,
        done: Arc<AtomicBool>,
        flush_on_drop: Duration,
        /// Events queued but not yet written or dropped by the writer.
        pending: Arc<AtomicU64>,
    },
}

impl Sink {
    /// Drops every event without counting it (monitoring switched off).
    pub fn disabled() -> Sink {
        Sink::with_target(Target::Disabled)
    }

    /// Sends into a caller-owned channel; a full or closed channel counts a drop.
    pub fn from_sender(sender: Sender<Envelope>) -> Sink {
        Sink::with_target(Target::Capture(sender))
    }

    pub(crate) fn embedded(data: Sender<IngestMsg>, control: Sender<Control>, conn: ConnId, connections: IntGauge) -> Sink {
        connections.inc();
        Sink::with_target(Target::Embedded { data, control, conn, connections })
    }

    /// Connects to a standalone daemon at `unix:/path` or `tcp:127.0.0.1:PORT`. Succeeds even when the
    /// daemon is not up yet: a background thread connects, and reconnects whenever the daemon restarts.
    pub fn connect(addr: &str, options: SinkOptions) -> Result<Sink, SinkError> {
        let addr: IngestAddr = addr.parse()?;
        if options.capacity == 0 {
            return Err(SinkError::Options("capacity is 0, expected at least 1".into()));
        }
        if options.backoff_min.is_zero() || options.backoff_max < options.backoff_min {
            return Err(SinkError::Options(format!(
                "backoff {:?}..{:?}: expected 0 < backoff_min <= backoff_max",
                options.backoff_min, options.backoff_max
            )));
        }
        let (tx, rx) = crossbeam_channel::bounded(options.capacity);
        let closed = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let pending = Arc::new(AtomicU64::new(0));
        let sink = Sink::with_target(Target::Remote {
            tx: Some(tx),
            closed: Arc::clone(&closed),
            done: Arc::clone(&done),
            flush_on_drop: options.flush_on_drop,
            pending: Arc::clone(&pending),
        });
        let writer = Writer {
            addr,
            options,
            rx,
            closed,
            dropped: Arc::downgrade(&sink.inner),
            pending,
            last_hello: None,
            last_params: None,
        };
        std::thread::Builder::new()
            .name("gainguard-sink".into())
            .spawn(move || {
                writer.run();
                done.store(true, Ordering::SeqCst);
            })
            .map_err(SinkError::Thread)?;
        Ok(sink)
    }

    fn with_target(target: Target) -> Sink {
        Sink { inner: Arc::new(Inner { target, dropped: AtomicU64::new(0) }) }
    }

    /// Queues one event. Never blocks. Returns false when the event was not queued: counted as a drop when
    /// the buffer was full or the daemon is gone; not counted for a disabled sink.
    pub fn send(&self, envelope: Envelope) -> bool {
        let ok = match &self.inner.target {
            Target::Disabled => return false,
            Target::Capture(tx) => tx.try_send(envelope).is_ok(),
            Target::Embedded { data, conn, .. } => {
                data.try_send(IngestMsg::Event { conn: *conn, envelope, validated: false }).is_ok()
            }
            Target::Remote { tx, pending, .. } => {
                pending.fetch_add(1, Ordering::SeqCst);
                let ok = tx.as_ref().is_some_and(|tx| tx.try_send(envelope).is_ok());
                if !ok {
                    pending.fetch_sub(1, Ordering::SeqCst);
                }
                ok
            }
        };
        if !ok {
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Waits until every event queued so far has been written to the daemon's socket (or counted as
    /// dropped), at most `timeout`. Returns true when nothing is left. Only a remote sink ever waits; call it
    /// at the end of training, never on the step path.
    pub fn flush(&self, timeout: Duration) -> bool {
        let Target::Remote { pending, .. } = &self.inner.target else { return true };
        let deadline = Instant::now() + timeout;
        while pending.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Events this sink (all clones together) failed to deliver.
    pub fn dropped_total(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        match &mut self.target {
            Target::Embedded { data, control, conn, connections } => {
                connections.dec();
                // Queue the end behind this sink's last events so that a late Step cannot revive the run.
                let msg = IngestMsg::Disconnected { conn: *conn };
                if let Err(TrySendError::Full(msg)) = data.try_send(msg) {
                    if data.send_timeout(msg, Duration::from_millis(500)).is_err() {
                        let _ = control.send(Control::Disconnected { conn: *conn });
                    }
                }
            }
            Target::Remote { tx, closed, done, flush_on_drop, .. } => {
                drop(tx.take());
                let deadline = Instant::now() + *flush_on_drop;
                while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                }
                closed.store(true, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn open(addr: &IngestAddr, timeout: Duration) -> std::io::Result<Stream> {
        let s = match addr {
            IngestAddr::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
            IngestAddr::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, timeout)?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        };
        match &s {
            Stream::Unix(u) => u.set_write_timeout(Some(timeout))?,
            Stream::Tcp(t) => t.set_write_timeout(Some(timeout))?,
        }
        Ok(s)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.write_all(buf),
            Stream::Tcp(s) => s.write_all(buf),
        }
    }

    /// The daemon never writes, so a readable end-of-stream means it closed the connection.
    fn peer_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        let result = match self {
            Stream::Unix(s) => s.set_nonblocking(true).and_then(|_| s.read(&mut byte)),
            Stream::Tcp(s) => s.set_nonblocking(true).and_then(|_| s.read(&mut byte)),
        };
        let closed = match result {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        };
        let _ = match self {
            Stream::Unix(s) => s.set_nonblocking(false),
            Stream::Tcp(s) => s.set_nonblocking(false),
        };
        closed
    }
}

struct Writer {
    addr: IngestAddr,
    options: SinkOptions,
    rx: Receiver<Envelope>,
    closed: Arc<AtomicBool>,
    dropped: std::sync::Weak<Inner>,
    pending: Arc<AtomicU64>,
    /// Encoded lines replayed after every reconnect so that a restarted daemon relearns the run.
    last_hello: Option<Vec<u8>>,
    last_params: Option<Vec<u8>>,
}

const BATCH: usize = 256;

impl Writer {
    fn count_dropped(&self, n: usize) {
        if let Some(inner) = self.dropped.upgrade() {
            inner.dropped.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// `n` events left the buffer (written or dropped).
    fn settled(&self, n: usize) {
        self.pending.fetch_sub(n as u64, Ordering::SeqCst);
    }

    fn run(mut self) {
        let mut stream: Option<Stream> = None;
        let mut backoff = self.options.backoff_min;
        let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
        loop {
            if stream.is_none() {
                match Stream::open(&self.addr, self.options.write_timeout) {
                    Ok(mut s) => {
                        backoff = self.options.backoff_min;
                        let replay: Vec<u8> =
                            self.last_hello.iter().chain(self.last_params.iter()).flatten().copied().collect();
                        if replay.is_empty() || s.write_all(&replay).is_ok() {
                            stream = Some(s);
                        }
                    }
                    Err(_) => {
                        // Wait, but notice promptly when the trainer dropped the sink meanwhile.
                        let deadline = Instant::now() + backoff;
                        while Instant::now() < deadline {
                            if self.closed.load(Ordering::SeqCst) || self.disconnected_and_empty() {
                                let left = self.rx.len();
                                self.count_dropped(left);
                                self.settled(left);
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(10).min(backoff));
                        }
                        backoff = (backoff * 2).min(self.options.backoff_max);
                        continue;
                    }
                }
            }
            let first = match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(e) => e,
                Err(RecvTimeoutError::Timeout) => {
                    if stream.as_mut().is_some_and(Stream::peer_closed) {
                        stream = None;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            batch.clear();
            let mut count = 0;
            let mut taken = 0;
            for envelope in std::iter::once(first).chain(self.rx.try_iter().take(BATCH - 1)) {
                taken += 1;
                let Ok(line) = encode_line(&envelope) else {
                    self.count_dropped(1);
                    continue;
                };
                match envelope.event {
                    Event::Hello(_) => self.last_hello = Some(line.clone()),
                    Event::Params(_) => self.last_params = Some(line.clone()),
                    _ => {}
                }
                batch.extend_from_slice(&line);
                count += 1;
            }
            let s = stream.as_mut().expect("connected above");
            if s.write_all(&batch).is_err() {
                self.count_dropped(count);
                stream = None;
            }
            self.settled(taken);
        }
    }

    fn disconnected_and_empty(&self) -> bool {
        self.dropped.strong_count() == 0 && self.rx.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Goodbye, StepEvent};

    fn step(n: u64) -> Envelope {
        Envelope::new("r", 0, "h", n, Event::Step(StepEvent { timestamp_seconds: 1.0, ..Default::default() }))
    }

    #[test]
    fn a_capture_sink_delivers_in_order_and_counts_what_a_full_channel_refuses() {
        let (tx, rx) = crossbeam_channel::bounded(2);
        let sink = Sink::from_sender(tx);
        assert!(sink.send(step(1)));
        assert!(sink.clone().send(step(2)));
        assert!(!sink.send(step(3)));
        assert_eq!(sink.dropped_total(), 1);
        assert_eq!(rx.try_iter().map(|e| e.step).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn a_disabled_sink_drops_without_counting() {
        let sink = Sink::disabled();
        assert!(!sink.send(step(1)));
        assert_eq!(sink.dropped_total(), 0);
    }

    #[test]
    fn connect_succeeds_without_a_daemon_and_send_stays_non_blocking_when_the_buffer_fills() {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("unix:{}", dir.path().join("absent.sock").display());
        let sink = Sink::connect(&addr, SinkOptions { capacity: 16, ..Default::default() }).unwrap();
        let start = Instant::now();
        let accepted = (0..1000).filter(|&i| sink.send(step(i))).count();
        assert!(start.elapsed() < Duration::from_millis(200), "1000 sends took {:?}", start.elapsed());
        assert_eq!(accepted, 16);
        assert_eq!(sink.dropped_total(), 1000 - 16);
        let _ = sink.send(Envelope::new("r", 0, "h", 9, Event::Goodbye(Goodbye { reason: "finished".into() })));
    }

    #[test]
    fn a_remote_sink_writes_one_json_line_per_event_and_replays_hello_after_a_reconnect() {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let sink = Sink::connect(&format!("unix:{}", path.display()), SinkOptions::default()).unwrap();
        let hello = Envelope::new(
            "r",
            0,
            "h",
            0,
            Event::Hello(crate::events::Hello {
                pid: 1,
                planned_steps: None,
                rule: "paper".into(),
                gamma: Some(0.5),
                alpha: None,
                reference: None,
            }),
        );
        assert!(sink.send(hello.clone()));
        assert!(sink.send(step(1)));
        let (first, _) = listener.accept().unwrap();
        let mut lines = std::io::BufReader::new(first).lines();
        let got: Vec<Envelope> =
            (0..2).map(|_| serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap()).collect();
        assert_eq!(got, vec![hello.clone(), step(1)]);
        drop(lines); // the daemon goes away
        let (second, _) = listener.accept().unwrap();
        let mut lines = std::io::BufReader::new(second).lines();
        let replayed: Envelope = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(replayed, hello);
        assert!(sink.send(step(2)));
        let next: Envelope = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(next, step(2));
    }
}
