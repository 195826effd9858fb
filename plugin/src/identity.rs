//! Who is sending: the run, rank and host every event carries ([`RunIdentity`]), and this host's name.

use gainguard_protocol::events::{Envelope, Event};

/// Who is sending: every event carries these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunIdentity {
    pub run: String,
    pub rank: u32,
    pub host: String,
}

impl RunIdentity {
    /// A run on this host; rank from `RANK` (torchrun's convention) or 0.
    pub fn local(run: &str) -> RunIdentity {
        let rank = std::env::var("RANK").ok().and_then(|r| r.parse().ok()).unwrap_or(0);
        RunIdentity { run: run.to_string(), rank, host: hostname() }
    }

    pub fn envelope(&self, step: u64, event: Event) -> Envelope {
        Envelope::new(self.run.clone(), self.rank, self.host.clone(), step, event)
    }
}

/// This host's name (`gethostname`), or `unknown` when the call fails.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
