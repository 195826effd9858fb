//! `gainguard-protocol`: what a trainer and `gainguardd` agree on.
//!
//! - [`events`]: the event types (plain serde structs);
//! - [`wire`]: their wire format, one JSON line per event, with the daemon's strict decoder, the connection's
//!   authentication line and greeting, and the reasons a line is refused (docs/protocol.md);
//! - [`sink`]: the trainer's end, a [`Sink`] whose `send` never blocks, writing to a standalone daemon or
//!   handing events to a receiver in the same process (an embedded daemon);
//! - [`addr`] and [`auth`]: ingest addresses (`unix:`, `tcp:`) and the TCP token.
//!
//! It links no libtorch and runs no async runtime, so the plugin depends on it without pulling in the daemon,
//! and the daemon depends on it without pulling in libtorch (docs/design.md §3).

pub mod addr;
pub mod auth;
pub mod events;
pub mod sink;
pub mod wire;

pub use addr::{default_ingest_addr, AddrError, IngestAddr};
pub use events::{Envelope, Event, PROTOCOL_VERSION};
pub use sink::{LocalReceiver, Sink, SinkError, SinkOptions};
