//! Who may write to the daemon. Unix peers are checked by uid (`SO_PEERCRED`): the daemon's own uid and an
//! allow list. TCP peers on loopback have no uid we can trust, so they must send a shared token, read from a
//! file only its owner can read, in their first line (see docs/protocol.md, "Authentication").

pub use gainguard_protocol::auth::{Token, MAX_TOKEN_BYTES, TOKEN_FILE_ENV};

/// The uids allowed to write over a Unix socket: the daemon's own and the configured extra ones.
#[derive(Clone, Debug)]
pub(crate) struct UidPolicy {
    allowed: Vec<u32>,
}

impl UidPolicy {
    pub fn new(extra: &[u32]) -> Self {
        // SAFETY: geteuid cannot fail.
        let mut allowed = vec![unsafe { libc::geteuid() }];
        allowed.extend_from_slice(extra);
        UidPolicy { allowed }
    }

    pub fn allows(&self, uid: u32) -> bool {
        self.allowed.contains(&uid)
    }
}
