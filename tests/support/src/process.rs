//! Child processes that are killed with the test, free loopback ports, polling, and finding the
//! installed servers.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

/// Kills and reaps a child process when dropped, whatever the test outcome.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl ChildGuard {
    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.pid(), sig) };
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `f` every 50 ms until it returns a value; panics naming `what` after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An installed program: `$env` when set, else `default` (an absolute path) when it exists, else the
/// first `default`'s file name found on `PATH`.
pub fn installed(env: &str, default: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    let default = PathBuf::from(default);
    if default.exists() {
        return Some(default);
    }
    let name = default.file_name()?;
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(name)).find(|p| p.exists())
}

/// Like [`installed`], but a missing program fails the test with what to install.
pub fn required(env: &str, default: &str, package: &str) -> PathBuf {
    installed(env, default).unwrap_or_else(|| {
        let looked_for = std::env::var(env).unwrap_or_else(|_| default.to_string());
        panic!("{looked_for} not found: `make test` installs it (Debian package `{package}`), or set ${env}")
    })
}
