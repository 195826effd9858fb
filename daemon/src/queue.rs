//! The queue between the senders (ingest connections, embedded sinks) and the run table, bounded in bytes.
//!
//! The channel itself is unbounded; what bounds it is a semaphore of bytes: a sender takes permits for what it
//! queues, the run table gives them back once it has applied the events. An ingest connection waits for
//! permits asynchronously (back-pressure on its socket); an embedded sink never waits and drops instead.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::Semaphore;

use gainguard_protocol::events::{Envelope, Event};
use gainguard_protocol::sink::LocalReceiver;
use prometheus::IntGauge;

use crate::runs::{ConnId, Control};

/// Data-path messages, in arrival order per connection: a connection's end queues behind its last lines.
pub(crate) enum IngestMsg {
    /// Events of one connection in order; `bytes` is what they hold of the queue's budget.
    Events { conn: ConnId, events: Vec<Envelope>, validated: bool, bytes: usize },
    Disconnected { conn: ConnId },
}

#[derive(Clone)]
pub(crate) struct Queue {
    tx: Sender<IngestMsg>,
    budget: Arc<Semaphore>,
    capacity: usize,
}

/// The run table's end.
pub(crate) struct QueueReceiver {
    pub rx: Receiver<IngestMsg>,
    budget: Arc<Semaphore>,
}

pub(crate) fn queue(capacity_bytes: usize) -> (Queue, QueueReceiver) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let budget = Arc::new(Semaphore::new(capacity_bytes));
    (Queue { tx, budget: Arc::clone(&budget), capacity: capacity_bytes }, QueueReceiver { rx, budget })
}

/// Approximate bytes an envelope holds in memory once decoded.
pub(crate) fn envelope_bytes(e: &Envelope) -> usize {
    let payload = match &e.event {
        Event::Params(t) => {
            t.params.iter().map(|p| std::mem::size_of_val(p) + p.name.len() + p.shape.len() * 8).sum::<usize>()
        }
        Event::Spectrum(s) => s.param.len() + s.top_k.len() * 8,
        Event::Hello(h) => h.rule.len() + h.reference.as_ref().map_or(0, String::len),
        Event::Goodbye(g) => g.reason.len(),
        Event::Step(_) => 0,
    };
    std::mem::size_of::<Envelope>() + e.run.len() + e.host.len() + payload
}

impl Queue {
    /// What `bytes` costs of the budget: never more than all of it, so that one large batch cannot wait forever.
    fn cost(&self, bytes: usize) -> u32 {
        bytes.min(self.capacity).min(u32::MAX as usize) as u32
    }

    /// Queues a batch, waiting while the run table is `capacity` bytes behind. False when the run table is gone.
    pub async fn send(&self, conn: ConnId, events: Vec<Envelope>, bytes: usize) -> bool {
        let cost = self.cost(bytes);
        let Ok(permit) = self.budget.acquire_many(cost).await else { return false };
        permit.forget();
        self.put(IngestMsg::Events { conn, events, validated: true, bytes: cost as usize }, cost)
    }

    /// Queues one event if the budget has room now; never waits.
    pub fn try_send(&self, conn: ConnId, envelope: Envelope) -> bool {
        let cost = self.cost(envelope_bytes(&envelope));
        let Ok(permit) = self.budget.try_acquire_many(cost) else { return false };
        permit.forget();
        self.put(IngestMsg::Events { conn, events: vec![envelope], validated: false, bytes: cost as usize }, cost)
    }

    /// Queues the end of a connection behind its events; costs nothing of the budget.
    pub fn disconnected(&self, conn: ConnId) -> bool {
        self.tx.send(IngestMsg::Disconnected { conn }).is_ok()
    }

    fn put(&self, msg: IngestMsg, cost: u32) -> bool {
        if self.tx.send(msg).is_err() {
            self.budget.add_permits(cost as usize);
            return false;
        }
        true
    }
}

impl QueueReceiver {
    /// Gives back the budget of a batch the run table has applied.
    pub fn release(&self, bytes: usize) {
        self.budget.add_permits(bytes);
    }
}

/// An embedded sink's end of the queue: one connection of the run table for the trainer process, which ends
/// when the last clone of the sink is dropped.
pub(crate) struct EmbeddedSender {
    queue: Queue,
    control: Sender<Control>,
    conn: ConnId,
    connections: IntGauge,
}

impl EmbeddedSender {
    pub fn new(queue: Queue, control: Sender<Control>, conn: ConnId, connections: IntGauge) -> Self {
        connections.inc();
        EmbeddedSender { queue, control, conn, connections }
    }
}

impl LocalReceiver for EmbeddedSender {
    fn try_send(&self, envelope: Envelope) -> bool {
        self.queue.try_send(self.conn, envelope)
    }
}

impl Drop for EmbeddedSender {
    fn drop(&mut self) {
        self.connections.dec();
        // Queued behind this sink's last events so that a late Step cannot revive the run.
        if !self.queue.disconnected(self.conn) {
            let _ = self.control.send(Control::Disconnected { conn: self.conn });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gainguard_protocol::events::StepEvent;

    fn step() -> Envelope {
        Envelope::new("r", 0, "h", 1, Event::Step(StepEvent::default()))
    }

    #[test]
    fn an_embedded_send_beyond_the_byte_budget_is_refused_until_the_run_table_releases() {
        let one = envelope_bytes(&step());
        let (q, rx) = queue(one * 2);
        assert!(q.try_send(1, step()));
        assert!(q.try_send(1, step()));
        assert!(!q.try_send(1, step()));
        let Ok(IngestMsg::Events { bytes, .. }) = rx.rx.try_recv() else { panic!("a batch") };
        rx.release(bytes);
        assert!(q.try_send(1, step()));
    }

    #[tokio::test]
    async fn an_async_send_waits_for_budget_and_a_batch_larger_than_the_budget_still_passes() {
        let (q, rx) = queue(100);
        assert!(q.send(1, vec![step()], 10_000).await);
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.send(1, vec![step()], 50).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        let Ok(IngestMsg::Events { bytes, .. }) = rx.rx.try_recv() else { panic!("a batch") };
        assert_eq!(bytes, 100);
        rx.release(bytes);
        assert!(waiting.await.unwrap());
    }
}
