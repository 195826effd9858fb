//! The trainer's side of the channel: a [`Sink`] whose `send` never blocks.
//!
//! - local: handed to a receiver in the same process ([`Sink::local`]; an embedded daemon's `sink()`);
//! - remote: a background thread writes JSON lines to a standalone `gainguardd` ([`Sink::connect`]),
//!   reconnecting with capped exponential backoff and replaying the last Hello and Params on reconnect;
//! - capture: into any crossbeam channel ([`Sink::from_sender`]), for tests;
//! - disabled: drops everything silently ([`Sink::disabled`]).
//!
//! A full buffer or an absent daemon never stalls the trainer: the event is dropped and counted in
//! [`Sink::dropped_total`], which the plugin reports as `events_dropped_total` in its Step events.

mod options;
mod remote;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::addr::IngestAddr;
use crate::auth::Token;
use crate::events::Envelope;

pub use options::{SinkError, SinkOptions};
use remote::{token_for, Connector, Writer};

#[derive(Clone)]
pub struct Sink {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    dropped: Arc<AtomicU64>,
}

/// A receiver in the trainer's own process, such as an embedded daemon's queue. It is dropped with the last
/// clone of its [`Sink`], which is how it learns that the trainer went away.
pub trait LocalReceiver: Send + Sync + 'static {
    /// Takes one event without blocking; false when it refused it (full), which the sink counts as a drop.
    fn try_send(&self, envelope: Envelope) -> bool;
}

enum Target {
    Disabled,
    Capture(Sender<Envelope>),
    Local(Box<dyn LocalReceiver>),
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

    /// Hands events to a receiver in this process; a refused event counts as a drop.
    pub fn local(receiver: impl LocalReceiver) -> Sink {
        Sink::with_target(Target::Local(Box::new(receiver)))
    }

    /// Connects to a standalone daemon at `unix:/path` or `tcp:127.0.0.1:PORT`. Succeeds even when the
    /// daemon is not up yet: a background thread connects, and reconnects whenever the daemon restarts.
    /// A TCP address needs the daemon's token ([`SinkOptions::token_file`] or `$GAINGUARD_INGEST_TOKEN_FILE`).
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
        if options.write_timeout.is_zero() || options.keepalive.is_zero() {
            return Err(SinkError::Options("write_timeout and keepalive must be more than 0".into()));
        }
        let token = token_for(&addr, &options)?;
        Sink::start(Connector::Address(addr), token, options)
    }

    /// A remote sink whose writer thread reaches the daemon through `connector`.
    fn start(connector: Connector, token: Option<Token>, options: SinkOptions) -> Result<Sink, SinkError> {
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
        let writer = Writer::new(connector, token, options, rx, closed, Arc::clone(&sink.inner.dropped), pending);
        writer.spawn(done).map_err(SinkError::Thread)?;
        Ok(sink)
    }

    fn with_target(target: Target) -> Sink {
        Sink { inner: Arc::new(Inner { target, dropped: Arc::new(AtomicU64::new(0)) }) }
    }

    /// Queues one event. Never blocks. Returns false when the event was not queued: counted as a drop when
    /// the buffer was full or the daemon is gone; not counted for a disabled sink.
    pub fn send(&self, envelope: Envelope) -> bool {
        let ok = match &self.inner.target {
            Target::Disabled => return false,
            Target::Capture(tx) => tx.try_send(envelope).is_ok(),
            Target::Local(receiver) => receiver.try_send(envelope),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Event, StepEvent};

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
}
