//! Binding every address before anything runs, so that an address in use is reported at start.
//!
//! A Unix socket is created with mode 0600 without a window in which others could connect: it is bound inside
//! a fresh 0700 directory next to its final path, given its mode there, and renamed into place. (Changing the
//! process umask around `bind` would do the same for `gainguardd`, but an embedded daemon shares its process
//! with a trainer whose other threads may be creating files at that moment.)

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use gainguard_protocol::addr::IngestAddr;

use crate::config::DaemonConfig;
use crate::error::DaemonError;

pub(crate) enum BoundIngest {
    Unix(UnixListener),
    Tcp(std::net::TcpListener),
}

pub(crate) struct Listeners {
    pub http: std::net::TcpListener,
    pub metrics_addr: SocketAddr,
    pub ingest: Vec<BoundIngest>,
    /// The addresses actually bound (TCP port 0 resolved).
    pub ingest_addrs: Vec<IngestAddr>,
    /// Socket files to remove at shutdown.
    pub socket_paths: Vec<PathBuf>,
}

impl Listeners {
    pub fn bind(config: &DaemonConfig) -> Result<Listeners, DaemonError> {
        let http = std::net::TcpListener::bind(config.listen)
            .map_err(|source| DaemonError::Bind { addr: config.listen.to_string(), source })?;
        let metrics_addr = http.local_addr().map_err(DaemonError::Runtime)?;
        http.set_nonblocking(true).map_err(DaemonError::Runtime)?;
        let mut l = Listeners { http, metrics_addr, ingest: Vec::new(), ingest_addrs: Vec::new(), socket_paths: Vec::new() };
        for addr in &config.ingest {
            match addr {
                IngestAddr::Unix(path) => {
                    let u = bind_unix(path)?;
                    u.set_nonblocking(true).map_err(DaemonError::Runtime)?;
                    l.socket_paths.push(path.clone());
                    l.ingest_addrs.push(addr.clone());
                    l.ingest.push(BoundIngest::Unix(u));
                }
                IngestAddr::Tcp(sa) => {
                    let t = std::net::TcpListener::bind(sa)
                        .map_err(|source| DaemonError::Bind { addr: addr.to_string(), source })?;
                    l.ingest_addrs.push(IngestAddr::Tcp(t.local_addr().map_err(DaemonError::Runtime)?));
                    t.set_nonblocking(true).map_err(DaemonError::Runtime)?;
                    l.ingest.push(BoundIngest::Tcp(t));
                }
            }
        }
        Ok(l)
    }
}

/// Makes sure the socket's directory exists. One this function creates is 0700; the default directory
/// (see [`gainguard_protocol::addr::default_ingest_addr`]) must also, if it already exists, be ours and closed to others,
/// since its path in /tmp is predictable.
fn prepare_dir(path: &Path) -> Result<(), DaemonError> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else { return Ok(()) };
    let err = |detail: String| DaemonError::SocketDir { path: dir.to_path_buf(), detail };
    let created = match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(err(e.to_string())),
    };
    if !created && !gainguard_protocol::addr::is_default_socket_dir(dir) {
        return Ok(());
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| err(e.to_string()))?;
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != euid || meta.permissions().mode() & 0o077 != 0 {
        return Err(err(format!(
            "expected a directory owned by uid {euid} with mode 0700 (found uid {}, mode {:04o}); remove it",
            meta.uid(),
            meta.permissions().mode() & 0o7777
        )));
    }
    Ok(())
}

/// Binds a Unix socket readable and writable by this user only. A stale socket file (nothing listening) is
/// replaced; a live one is an error.
fn bind_unix(path: &Path) -> Result<UnixListener, DaemonError> {
    let bind_err = |source| DaemonError::Bind { addr: format!("unix:{}", path.display()), source };
    prepare_dir(path)?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(bind_err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; refusing to replace it",
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::SocketInUse { path: path.to_path_buf() });
        }
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let private = dir.join(format!(".gainguardd-bind-{}-{}", std::process::id(), unique()));
    std::fs::DirBuilder::new().mode(0o700).create(&private).map_err(bind_err)?;
    let staged = private.join("s");
    let result = UnixListener::bind(&staged)
        .and_then(|l| std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600)).map(|_| l))
        .and_then(|l| std::fs::rename(&staged, path).map(|_| l));
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    result.map_err(bind_err)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_is_bound_with_mode_0600_and_its_missing_directory_is_created_0700() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("d.sock");
        let _l = bind_unix(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "no staging directory left behind");
    }
}
