//! Who gets a connection slot, for both servers (ingest and HTTP), and the accept loop they share.
//!
//! A table caps open connections in all and per peer. At a cap, the oldest connection that is *idle* (an
//! ingest connection that never delivered an event, an HTTP connection with no request in progress) is
//! closed to make room; only when none is idle is the newcomer refused. So clients that connect and sit
//! cannot lock out a trainer or a scraper, and the caps keep file descriptors bounded.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

/// Whom a connection counts against for the per-peer cap.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Peer {
    Uid(u32),
    Addr(IpAddr),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Every slot is held by a connection that is not idle.
    Full,
    /// The peer holds its share and none of its connections is idle.
    PeerFull,
}

struct Entry {
    peer: Peer,
    busy: Arc<AtomicBool>,
    evict: Arc<Notify>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Ordered by id, that is by age.
    open: BTreeMap<u64, Entry>,
    per_peer: HashMap<Peer, usize>,
}

pub(crate) struct ConnectionTable {
    max_total: usize,
    max_per_peer: usize,
    state: Mutex<State>,
}

/// One admitted connection. Dropping it frees the slot.
pub(crate) struct Slot {
    table: Arc<ConnectionTable>,
    id: u64,
    busy: Arc<AtomicBool>,
    evict: Arc<Notify>,
}

/// Marks a slot busy while it lives (an HTTP request and its response body).
pub(crate) struct BusyGuard(Arc<AtomicBool>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

impl ConnectionTable {
    pub fn new(max_total: usize, max_per_peer: usize) -> Arc<Self> {
        Arc::new(ConnectionTable { max_total, max_per_peer, state: Mutex::new(State::default()) })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a connection from `peer`, closing an idle one when a cap is reached.
    pub fn admit(self: &Arc<Self>, peer: Peer) -> Result<Slot, Refusal> {
        let mut st = self.state();
        if st.per_peer.get(&peer).copied().unwrap_or(0) >= self.max_per_peer && !evict_idle(&mut st, Some(&peer)) {
            return Err(Refusal::PeerFull);
        }
        if st.open.len() >= self.max_total && !evict_idle(&mut st, None) {
            return Err(Refusal::Full);
        }
        let id = st.next_id;
        st.next_id += 1;
        let busy = Arc::new(AtomicBool::new(false));
        let evict = Arc::new(Notify::new());
        *st.per_peer.entry(peer.clone()).or_insert(0) += 1;
        st.open.insert(id, Entry { peer, busy: Arc::clone(&busy), evict: Arc::clone(&evict) });
        Ok(Slot { table: Arc::clone(self), id, busy, evict })
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.state().open.len()
    }
}

/// Closes the oldest idle connection (of `peer`, if given); false when there is none.
fn evict_idle(st: &mut State, peer: Option<&Peer>) -> bool {
    let victim = st
        .open
        .iter()
        .find(|(_, e)| !e.busy.load(Ordering::Relaxed) && peer.is_none_or(|p| *p == e.peer))
        .map(|(id, _)| *id);
    let Some(entry) = victim.and_then(|id| st.open.remove(&id)) else { return false };
    release_peer(st, &entry.peer);
    entry.evict.notify_one();
    true
}

fn release_peer(st: &mut State, peer: &Peer) {
    if let Some(n) = st.per_peer.get_mut(peer) {
        *n -= 1;
        if *n == 0 {
            st.per_peer.remove(peer);
        }
    }
}

impl Slot {
    /// From now on this connection is never closed to make room (an ingest connection that delivered an event).
    pub fn set_busy(&self) {
        self.busy.store(true, Ordering::Relaxed);
    }

    /// Busy until the guard is dropped.
    pub fn busy_guard(&self) -> BusyGuard {
        self.busy.store(true, Ordering::Relaxed);
        BusyGuard(Arc::clone(&self.busy))
    }

    /// Resolves when this connection was chosen to make room for a newer one.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.table.state();
        if let Some(entry) = st.open.remove(&self.id) {
            release_peer(&mut st, &entry.peer);
        }
    }
}

/// Something that accepts connections (a TCP or Unix listener).
pub(crate) trait Accept: Send + 'static {
    type Conn: Send + 'static;
    fn accept(&self) -> impl std::future::Future<Output = std::io::Result<Self::Conn>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Conn = (tokio::net::TcpStream, std::net::SocketAddr);
    async fn accept(&self) -> std::io::Result<Self::Conn> {
        tokio::net::TcpListener::accept(self).await
    }
}

impl Accept for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Conn> {
        tokio::net::UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

/// First and last wait after a failed accept (EMFILE, ENFILE, ENOBUFS, ...), doubling in between: the values
/// of Go's `http.Server`. Without a wait, a listener whose accept keeps failing spins a core.
pub(crate) const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

/// Accepts forever, handing each connection to `handle`; backs off on errors and logs the first of a streak.
pub(crate) async fn accept_loop<L: Accept>(listener: L, what: &'static str, mut handle: impl FnMut(L::Conn) + Send) {
    let mut backoff = None::<Duration>;
    loop {
        match listener.accept().await {
            Ok(conn) => {
                backoff = None;
                handle(conn);
            }
            Err(err) => {
                let wait = backoff.map_or(ACCEPT_BACKOFF.0, |b| (b * 2).min(ACCEPT_BACKOFF.1));
                if backoff.is_none() {
                    tracing::warn!("{what}: accept failed ({err}); retrying with backoff up to {:?}", ACCEPT_BACKOFF.1);
                }
                backoff = Some(wait);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(n: u32) -> Peer {
        Peer::Uid(n)
    }

    #[test]
    fn at_the_total_cap_the_oldest_idle_connection_makes_room_and_busy_ones_never_do() {
        let t = ConnectionTable::new(2, 10);
        let a = t.admit(uid(1)).unwrap();
        let b = t.admit(uid(1)).unwrap();
        a.set_busy();
        let c = t.admit(uid(2)).unwrap(); // evicts b, the only idle one
        assert_eq!(t.len(), 2);
        c.set_busy();
        assert_eq!(t.admit(uid(3)).err(), Some(Refusal::Full));
        drop(b); // the evicted slot's own drop must not free a second slot
        assert_eq!(t.len(), 2);
        drop(a);
        assert!(t.admit(uid(3)).is_ok());
    }

    #[test]
    fn a_peer_at_its_share_evicts_only_its_own_idle_connections() {
        let t = ConnectionTable::new(10, 2);
        let _other = t.admit(uid(2)).unwrap();
        let _a = t.admit(uid(1)).unwrap();
        let b = t.admit(uid(1)).unwrap();
        b.set_busy();
        let c = t.admit(uid(1)).unwrap(); // evicts a (uid 1's idle one), not the older idle `other`
        assert_eq!(t.len(), 3);
        c.set_busy();
        assert_eq!(t.admit(uid(1)).err(), Some(Refusal::PeerFull));
        assert!(t.admit(uid(3)).is_ok());
    }

    #[tokio::test]
    async fn an_evicted_slot_is_told() {
        let t = ConnectionTable::new(1, 1);
        let a = t.admit(uid(1)).unwrap();
        let _b = t.admit(uid(1)).unwrap();
        tokio::time::timeout(Duration::from_secs(1), a.evicted()).await.expect("eviction notice");
    }
}
