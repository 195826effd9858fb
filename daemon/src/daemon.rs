//! The daemon: the run table on its own thread, the HTTP exporter and socket ingest on a small tokio
//! runtime, and the metric sources. Used embedded (inside a trainer) and by the `gainguardd` binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use prometheus::Registry;

use crate::addr::{host_name, IngestAddr};
use crate::http::{self, Exporter};
use crate::ingest::{self, IngestShared};
use crate::protocol::DEFAULT_MAX_LINE_BYTES;
use crate::runs::{Control, IngestMsg, RunTable};
use crate::selfmetrics::SelfMetrics;
use crate::sink::Sink;
use crate::sources::{Source, SourceContext, SOURCES};

/// Whether to read GPU statistics through NVML.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NvmlMode {
    /// Use NVML when a driver and a GPU are present; otherwise export `gainguard_nvml_up 0`.
    Auto,
    /// Require NVML; [`Daemon::spawn`] fails without it.
    On,
    Off,
}

/// Caps that keep memory and cardinality bounded whatever the trainers send.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_runs: usize,
    pub max_params_per_run: usize,
    /// Upper bound of exported series (each histogram bucket counts).
    pub max_series: usize,
    pub max_line_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_runs: 256,
            max_params_per_run: 4096,
            max_series: 250_000,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
        }
    }
}

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Where `/metrics` and `/healthz` are served. Port 0 picks a free port; see [`Daemon::metrics_addr`].
    pub listen: SocketAddr,
    /// Sockets on which trainers in other processes send JSON lines. Empty in embedded mode.
    pub ingest: Vec<IngestAddr>,
    pub nvml: NvmlMode,
    pub nvml_interval: Duration,
    /// How long a finished or vanished run keeps its series before they are all removed.
    pub ttl: Duration,
    pub limits: Limits,
    /// Names of sources (see [`crate::sources::SOURCES`]) not to run.
    pub disabled_sources: Vec<String>,
    /// Events buffered between the sinks/connections and the run table.
    pub queue_capacity: usize,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            ingest: Vec::new(),
            nvml: NvmlMode::Auto,
            nvml_interval: Duration::from_secs(5),
            ttl: Duration::from_secs(300),
            limits: Limits::default(),
            disabled_sources: Vec::new(),
            queue_capacity: 65_536,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("ingest socket {path}: a live gainguardd is already listening there")]
    SocketInUse { path: PathBuf },
    #[error("NVML was required (--nvml on) but is unavailable: {0}")]
    Nvml(String),
    #[error("unknown source `{0}` in the disabled list; known sources: training, optimizer, spectra, liveness, nvml")]
    UnknownSource(String),
    #[error("metric registration failed: {0}")]
    Registry(#[from] prometheus::Error),
    #[error("cannot start the daemon's threads: {0}")]
    Runtime(std::io::Error),
}

impl DaemonError {
    /// True when the error is an address already taken by another process.
    pub fn is_addr_in_use(&self) -> bool {
        match self {
            DaemonError::Bind { source, .. } => source.kind() == std::io::ErrorKind::AddrInUse,
            DaemonError::SocketInUse { .. } => true,
            _ => false,
        }
    }
}

/// A running exporter. Stops on [`Daemon::shutdown`] or when dropped.
pub struct Daemon {
    metrics_addr: SocketAddr,
    ingest_addrs: Vec<IngestAddr>,
    socket_paths: Vec<PathBuf>,
    runtime: Option<tokio::runtime::Runtime>,
    core: Option<JoinHandle<()>>,
    data: Sender<IngestMsg>,
    control: Sender<Control>,
    metrics: SelfMetrics,
    sources: Vec<Arc<dyn Source>>,
    next_conn: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
}

enum BoundIngest {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

/// Binds a Unix socket readable and writable by this user only. A stale socket file (nothing listening) is
/// removed; a live one is an error.
fn bind_unix(path: &Path) -> Result<std::os::unix::net::UnixListener, DaemonError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let bind_err = |source| DaemonError::Bind { addr: format!("unix:{}", path.display()), source };
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
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

impl Daemon {
    /// Binds every address, builds the enabled sources and starts the threads. All binding happens here, so
    /// an address in use is reported before anything runs.
    pub fn spawn(config: DaemonConfig) -> Result<Daemon, DaemonError> {
        for name in &config.disabled_sources {
            if !SOURCES.iter().any(|s| s.name == name) {
                return Err(DaemonError::UnknownSource(name.clone()));
            }
        }
        let http_listener = std::net::TcpListener::bind(config.listen)
            .map_err(|source| DaemonError::Bind { addr: config.listen.to_string(), source })?;
        let metrics_addr = http_listener.local_addr().map_err(DaemonError::Runtime)?;
        http_listener.set_nonblocking(true).map_err(DaemonError::Runtime)?;

        let mut bound = Vec::new();
        let mut ingest_addrs = Vec::new();
        let mut socket_paths = Vec::new();
        for addr in &config.ingest {
            match addr {
                IngestAddr::Unix(path) => {
                    let l = bind_unix(path)?;
                    l.set_nonblocking(true).map_err(DaemonError::Runtime)?;
                    socket_paths.push(path.clone());
                    ingest_addrs.push(addr.clone());
                    bound.push(BoundIngest::Unix(l));
                }
                IngestAddr::Tcp(sa) => {
                    let l = std::net::TcpListener::bind(sa)
                        .map_err(|source| DaemonError::Bind { addr: addr.to_string(), source })?;
                    ingest_addrs.push(IngestAddr::Tcp(l.local_addr().map_err(DaemonError::Runtime)?));
                    l.set_nonblocking(true).map_err(DaemonError::Runtime)?;
                    bound.push(BoundIngest::Tcp(l));
                }
            }
        }

        let registry = Registry::new();
        let meta = Registry::new();
        let metrics = SelfMetrics::new(&registry, &meta)?;
        let ctx = SourceContext { registry: &registry, host: host_name(), config: &config };
        let mut sources: Vec<Arc<dyn Source>> = Vec::new();
        for spec in SOURCES {
            if spec.default_enabled && !config.disabled_sources.iter().any(|d| d == spec.name) {
                match (spec.build)(&ctx) {
                    Ok(s) => sources.push(s),
                    Err(e) => {
                        sources.iter().for_each(|s| s.stop());
                        return Err(e);
                    }
                }
            }
        }

        let (data_tx, data_rx) = crossbeam_channel::bounded(config.queue_capacity);
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        let healthy = Arc::new(AtomicBool::new(true));
        let table = RunTable::new(sources.clone(), metrics.clone(), config.limits.clone(), config.ttl);
        let core_healthy = Arc::clone(&healthy);
        let core = std::thread::Builder::new()
            .name("gainguard-runs".into())
            .spawn(move || run_core(table, data_rx, control_rx, core_healthy))
            .map_err(DaemonError::Runtime)?;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("gainguard-io")
            .enable_all()
            .build()
            .map_err(DaemonError::Runtime)?;
        let next_conn = Arc::new(AtomicU64::new(1));
        let exporter = Arc::new(Exporter { registry, meta, metrics: metrics.clone(), healthy: Arc::clone(&healthy) });
        let shared = Arc::new(IngestShared {
            data: data_tx.clone(),
            control: control_tx.clone(),
            metrics: metrics.clone(),
            max_line_bytes: config.limits.max_line_bytes,
            max_connections: config.limits.max_connections,
            active: AtomicUsize::new(0),
            next_conn: Arc::clone(&next_conn),
        });
        {
            let _guard = runtime.enter();
            let http = tokio::net::TcpListener::from_std(http_listener).map_err(DaemonError::Runtime)?;
            runtime.spawn(http::serve(http, exporter));
            for b in bound {
                match b {
                    BoundIngest::Unix(l) => {
                        let l = tokio::net::UnixListener::from_std(l).map_err(DaemonError::Runtime)?;
                        runtime.spawn(ingest::serve_unix(l, Arc::clone(&shared)));
                    }
                    BoundIngest::Tcp(l) => {
                        let l = tokio::net::TcpListener::from_std(l).map_err(DaemonError::Runtime)?;
                        runtime.spawn(ingest::serve_tcp(l, Arc::clone(&shared)));
                    }
                }
            }
        }
        Ok(Daemon {
            metrics_addr,
            ingest_addrs,
            socket_paths,
            runtime: Some(runtime),
            core: Some(core),
            data: data_tx,
            control: control_tx,
            metrics,
            sources,
            next_conn,
            healthy,
        })
    }

    /// A sink for this trainer process. Clones share one identity: the run/rank it reports is up while any
    /// clone is alive, and goes down (then expires after the TTL) when the last clone is dropped.
    pub fn sink(&self) -> Sink {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        Sink::embedded(self.data.clone(), self.control.clone(), conn, self.metrics.connections.clone())
    }

    /// The address `/metrics` is actually served on (useful with port 0).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The ingest addresses actually bound (TCP port 0 resolved).
    pub fn ingest_addrs(&self) -> &[IngestAddr] {
        &self.ingest_addrs
    }

    /// Stops serving, joins the threads and removes the Unix socket files.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.healthy.store(false, Ordering::Relaxed);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
        for p in self.socket_paths.drain(..) {
            let _ = std::fs::remove_file(p);
        }
        let _ = self.control.send(Control::Shutdown);
        if let Some(core) = self.core.take() {
            let _ = core.join();
        }
        for s in &self.sources {
            s.stop();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Marks the daemon unhealthy if the run-table thread ever ends unexpectedly (a panic included).
struct HealthGuard(Arc<AtomicBool>);

impl Drop for HealthGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

fn run_core(mut table: RunTable, data: Receiver<IngestMsg>, control: Receiver<Control>, healthy: Arc<AtomicBool>) {
    let _guard = HealthGuard(healthy);
    const TICK: Duration = Duration::from_millis(200);
    let mut next_expiry = Instant::now() + TICK;
    loop {
        select! {
            recv(control) -> msg => match msg {
                Ok(Control::Disconnected { conn }) => table.disconnected(conn, Instant::now()),
                Ok(Control::Shutdown) | Err(_) => return,
            },
            recv(data) -> msg => match msg {
                Ok(IngestMsg::Event { conn, envelope, validated }) => table.handle(conn, envelope, validated, Instant::now()),
                Ok(IngestMsg::Disconnected { conn }) => table.disconnected(conn, Instant::now()),
                Err(_) => return,
            },
            default(TICK) => {}
        }
        let now = Instant::now();
        if now >= next_expiry {
            table.expire(now);
            next_expiry = now + TICK;
        }
    }
}
