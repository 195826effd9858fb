//! Ingest addresses: `unix:/path/to.sock` or `tcp:127.0.0.1:PORT`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// Where trainers send their JSON lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IngestAddr {
    Unix(PathBuf),
    /// Loopback only; writers authenticate with a token (docs/protocol.md).
    Tcp(SocketAddr),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrError {
    #[error("ingest address `{0}`: expected `unix:/path/to.sock` or `tcp:127.0.0.1:PORT`")]
    Syntax(String),
    #[error("ingest address `{0}`: TCP ingest must be a loopback address (127.0.0.1 or [::1])")]
    NotLoopback(String),
}

impl FromStr for IngestAddr {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, AddrError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(AddrError::Syntax(s.to_string()));
            }
            return Ok(IngestAddr::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp:") {
            let sa: SocketAddr = rest.parse().map_err(|_| AddrError::Syntax(s.to_string()))?;
            if !sa.ip().is_loopback() {
                return Err(AddrError::NotLoopback(s.to_string()));
            }
            return Ok(IngestAddr::Tcp(sa));
        }
        Err(AddrError::Syntax(s.to_string()))
    }
}

impl fmt::Display for IngestAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IngestAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            IngestAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// The default ingest socket: `$XDG_RUNTIME_DIR/gainguardd.sock` when `XDG_RUNTIME_DIR` is set (a per-user
/// 0700 directory), else `/tmp/gainguardd-<uid>/gainguardd.sock`, in a directory the daemon creates with mode
/// 0700 and refuses to use unless it owns it (its name in /tmp is predictable). The plugin uses the same
/// default.
pub fn default_ingest_addr() -> IngestAddr {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => IngestAddr::Unix(PathBuf::from(dir).join("gainguardd.sock")),
        _ => IngestAddr::Unix(default_socket_dir().join("gainguardd.sock")),
    }
}

fn default_socket_dir() -> PathBuf {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/tmp/gainguardd-{uid}"))
}

/// True for the directory of the default socket path without `XDG_RUNTIME_DIR` (the daemon creates it).
pub fn is_default_socket_dir(dir: &std::path::Path) -> bool {
    dir == default_socket_dir()
}

/// This machine's host name, used as the `host` label of node-level series (NVML).
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for buf.len() bytes; gethostname NUL-terminates on success when it fits.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return "unknown".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_and_loopback_tcp_addresses_parse_and_print_back() {
        for s in ["unix:/run/user/1000/gainguardd.sock", "tcp:127.0.0.1:9999", "tcp:[::1]:9999"] {
            assert_eq!(s.parse::<IngestAddr>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn non_loopback_tcp_and_unknown_schemes_are_refused() {
        assert!(matches!("tcp:0.0.0.0:1".parse::<IngestAddr>(), Err(AddrError::NotLoopback(_))));
        assert!(matches!("http://x".parse::<IngestAddr>(), Err(AddrError::Syntax(_))));
        assert!(matches!("unix:".parse::<IngestAddr>(), Err(AddrError::Syntax(_))));
    }
}
