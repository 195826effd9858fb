//! HTTP basic authentication against the bcrypt hashes of `basic_auth_users`.
//!
//! A bcrypt check costs tens of milliseconds at the usual cost of 10, more than a whole scrape, so a
//! successful one is remembered: by an HMAC of the user and password under a key drawn at start (the
//! passwords themselves are never kept), in a set of at most [`MAX_REMEMBERED`] entries. A failed one is not
//! remembered, runs off the HTTP thread, and at most [`CONCURRENT_CHECKS`] run at once, so that a client
//! guessing passwords takes at most that many cores. An unknown user is checked against a dummy hash of the
//! same cost, so that the answer's delay does not tell which users exist.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine;
use ring::hmac;
use tokio::sync::Semaphore;

use super::file::field_error;
use crate::error::DaemonError;

/// Successful checks remembered; the set is emptied when full. Only right passwords enter it, so it holds
/// about one entry per user.
pub(crate) const MAX_REMEMBERED: usize = 1024;
/// bcrypt checks that may run at once.
pub(crate) const CONCURRENT_CHECKS: usize = 2;

pub(crate) struct BasicAuth {
    /// User → bcrypt hash; empty: no authentication.
    users: BTreeMap<String, String>,
    dummy_hash: String,
    key: hmac::Key,
    remembered: Mutex<HashSet<[u8; 32]>>,
    checks: Arc<Semaphore>,
}

impl BasicAuth {
    /// Checks every hash; `path` is for the error, which names the user.
    pub fn new(path: &Path, users: BTreeMap<String, String>) -> Result<Self, DaemonError> {
        let mut max_cost = 4;
        for (user, hash) in &users {
            let field = format!("basic_auth_users.{user}");
            if user.is_empty() || user.contains(':') {
                return Err(field_error(path, &field, "a user name must be non-empty and hold no `:` (basic auth splits there)"));
            }
            let parts = bcrypt::HashParts::from_str(hash).map_err(|e| {
                field_error(path, &field, format!("not a bcrypt hash ({e}); expected $2y$, $2b$ or $2a$, a cost and 53 characters, as `htpasswd -nBC 10 \"\" | tr -d ':\\n'` prints"))
            })?;
            if !(4..=31).contains(&parts.get_cost()) {
                return Err(field_error(path, &field, format!("not a bcrypt hash: cost {} is outside 4..=31", parts.get_cost())));
            }
            max_cost = max_cost.max(parts.get_cost());
        }
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| field_error(path, "basic_auth_users", "the system's random number generator failed"))?;
        let dummy_hash = if users.is_empty() {
            String::new()
        } else {
            bcrypt::hash("gainguard: not a user", max_cost)
                .map_err(|e| field_error(path, "basic_auth_users", format!("cannot make the dummy hash: {e}")))?
        };
        Ok(BasicAuth {
            users,
            dummy_hash,
            key,
            remembered: Mutex::new(HashSet::new()),
            checks: Arc::new(Semaphore::new(CONCURRENT_CHECKS)),
        })
    }

    pub fn is_enabled(&self) -> bool {
        !self.users.is_empty()
    }

    /// Whether an `Authorization` header value names a listed user with the right password (always true
    /// when no user is listed).
    pub async fn allows(&self, authorization: Option<&[u8]>) -> bool {
        if !self.is_enabled() {
            return true;
        }
        let Some((user, password)) = authorization.and_then(credentials) else { return false };
        let tag = self.tag(&user, &password);
        if self.remembered().contains(&tag) {
            return true;
        }
        let (hash, known) = match self.users.get(&user) {
            Some(h) => (h.clone(), true),
            None => (self.dummy_hash.clone(), false),
        };
        let Ok(_permit) = Arc::clone(&self.checks).acquire_owned().await else { return false };
        let verified = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
            .await
            .unwrap_or(false);
        let ok = known && verified;
        if ok {
            let mut remembered = self.remembered();
            if remembered.len() >= MAX_REMEMBERED {
                remembered.clear();
            }
            remembered.insert(tag);
        }
        ok
    }

    fn tag(&self, user: &str, password: &str) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(user.as_bytes());
        // The user name holds no `:`, so `user:password` is unambiguous.
        ctx.update(b":");
        ctx.update(password.as_bytes());
        let mut tag = [0u8; 32];
        tag.copy_from_slice(ctx.sign().as_ref());
        tag
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.remembered.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn remembered_len(&self) -> usize {
        self.remembered().len()
    }
}

/// `Basic base64(user:password)` → (user, password) (RFC 7617); None when malformed.
fn credentials(header: &[u8]) -> Option<(String, String)> {
    let header = std::str::from_utf8(header).ok()?;
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made by libxcrypt's crypt(3), not by the bcrypt crate: `python3 -c "import crypt;
    /// print(crypt.crypt('correct horse', '$2y$05$gainguardsaltgainguardu'))"` (htpasswd -B writes the same
    /// `$2y$` form).
    const CORRECT_HORSE_2Y: &str = "$2y$05$gainguardsaltgainguarOfRAdQBPFp3cWH1T8XOk2YVvrx4Od9oK";

    fn header(user: &str, password: &str) -> Vec<u8> {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))).into_bytes()
    }

    fn auth() -> BasicAuth {
        BasicAuth::new(Path::new("w.yml"), [("alice".to_string(), CORRECT_HORSE_2Y.to_string())].into()).unwrap()
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    #[test]
    fn a_hash_made_by_crypt3_verifies_its_password_and_nothing_else() {
        let a = auth();
        run(async {
            assert!(a.allows(Some(&header("alice", "correct horse"))).await);
            assert!(!a.allows(Some(&header("alice", "correct horse "))).await);
            assert!(!a.allows(Some(&header("alice", "battery staple"))).await);
            assert!(!a.allows(Some(&header("bob", "correct horse"))).await, "an unknown user");
            assert!(!a.allows(None).await);
            assert!(!a.allows(Some(b"Bearer abc")).await);
            assert!(!a.allows(Some(b"Basic !!!")).await);
        });
    }

    #[test]
    fn only_successful_checks_are_remembered() {
        let a = auth();
        run(async {
            assert!(!a.allows(Some(&header("alice", "wrong"))).await);
            assert_eq!(a.remembered_len(), 0);
            assert!(a.allows(Some(&header("alice", "correct horse"))).await);
            assert!(a.allows(Some(&header("alice", "correct horse"))).await);
            assert_eq!(a.remembered_len(), 1);
            // A remembered pair does not let a different password through.
            assert!(!a.allows(Some(&header("alice", "correct horsf"))).await);
        });
    }

    #[test]
    fn a_bad_hash_is_refused_naming_the_user() {
        for bad in ["plaintext", "$2y$05$short", "$2y$99$gainguardsaltgainguarOfRAdQBPFp3cWH1T8XOk2YVvrx4Od9oK"] {
            let e = BasicAuth::new(Path::new("w.yml"), [("carol".to_string(), bad.to_string())].into()).err().unwrap();
            assert!(e.to_string().contains("basic_auth_users.carol") && e.to_string().contains("bcrypt"), "{bad}: {e}");
        }
        let e = BasicAuth::new(Path::new("w.yml"), [("a:b".to_string(), CORRECT_HORSE_2Y.to_string())].into()).err().unwrap();
        assert!(e.to_string().contains("`:`"), "{e}");
    }

    #[test]
    fn no_users_means_no_authentication() {
        let a = BasicAuth::new(Path::new("w.yml"), BTreeMap::new()).unwrap();
        assert!(!a.is_enabled());
        run(async { assert!(a.allows(None).await) });
    }
}
