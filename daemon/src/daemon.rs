//! The daemon: the run table on its own thread, the HTTP exporter and socket ingest on two small tokio
//! runtimes (so that rendering and sending `/metrics` never runs on the threads that read trainers), and the
//! metric sources. Used embedded (inside a trainer) and by the `gainguardd` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use tokio::sync::Semaphore;

use gainguard_protocol::addr::{host_name, IngestAddr};
use gainguard_protocol::sink::Sink;

use crate::admission::ConnectionTable;
use crate::auth::{Token, UidPolicy};
use crate::config::DaemonConfig;
use crate::error::DaemonError;
use crate::exposition::Registry;
use crate::history::History;
use crate::http::{self, Http};
use crate::ingest::{self, Ingest};
use crate::listeners::{BoundIngest, Listeners};
use crate::queue::{queue, EmbeddedSender, IngestMsg, Queue, QueueReceiver};
use crate::runs::{Control, RunTable};
use crate::scrape::{Exposition, ScrapeCache};
use crate::selfmetrics::SelfMetrics;
use crate::sources::{build_sources, Source};
use crate::web::{check_exposure, Web};

/// A running exporter. Stops on [`Daemon::shutdown`] or when dropped.
pub struct Daemon {
    metrics_addr: SocketAddr,
    tls: bool,
    ingest_addrs: Vec<IngestAddr>,
    socket_paths: Vec<PathBuf>,
    runtimes: Vec<tokio::runtime::Runtime>,
    core: Option<JoinHandle<()>>,
    queue: Queue,
    control: Sender<Control>,
    metrics: SelfMetrics,
    sources: Vec<Arc<dyn Source>>,
    next_conn: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
}

impl Daemon {
    /// Checks the settings, binds every address, builds the enabled sources and starts the threads. All
    /// binding happens here, so that an address in use is reported before anything runs.
    pub fn spawn(config: DaemonConfig) -> Result<Daemon, DaemonError> {
        config.validate()?;
        crate::sources::check_disabled(&config.disabled_sources)?;
        let token = read_token(&config)?;
        let web = Web::load(&config.web)?;
        check_exposure(config.listen, web.tls.is_some(), config.web.listen_unprotected)?;
        let listeners = Listeners::bind(&config)?;
        let registry = Arc::new(Registry::new());
        let metrics = SelfMetrics::new(registry.prometheus())?;
        let nvml_enabled = config.sources.nvml.mode != crate::NvmlMode::Off
            && !config.disabled_sources.iter().any(|s| s == crate::sources::nvml::SPEC.name);
        let history = History::new(config.history.clone(), nvml_enabled, host_name(), registry.prometheus())?;
        let sources = build_sources(&config.disabled_sources, &config.sources, &registry, host_name(), &history)?;
        let (queue, receiver) = queue(config.limits.queue_bytes);
        let (control, control_rx) = crossbeam_channel::unbounded();
        let healthy = Arc::new(AtomicBool::new(true));
        let table = RunTable::new(sources.clone(), metrics.clone(), config.limits.clone(), config.ttl);
        let core = start_run_table(table, receiver, control_rx, Arc::clone(&healthy))
            .inspect_err(|_| sources.iter().for_each(|s| s.stop()))?;
        let mut daemon = Daemon {
            metrics_addr: listeners.metrics_addr,
            tls: web.tls.is_some(),
            ingest_addrs: listeners.ingest_addrs.clone(),
            socket_paths: listeners.socket_paths.clone(),
            runtimes: Vec::new(),
            core: Some(core),
            queue,
            control,
            metrics,
            sources,
            next_conn: Arc::new(AtomicU64::new(1)),
            healthy,
        };
        // From here on, dropping `daemon` on an error stops what was started.
        daemon.start_http(&config, listeners.http, registry, web, history)?;
        daemon.start_ingest(&config, listeners.ingest, token)?;
        Ok(daemon)
    }

    fn start_http(
        &mut self,
        config: &DaemonConfig,
        listener: std::net::TcpListener,
        registry: Arc<Registry>,
        web: Web,
        history: Arc<History>,
    ) -> Result<(), DaemonError> {
        let limits = &config.limits;
        let exposition = Exposition { registry, metrics: self.metrics.clone() };
        let http = Arc::new(Http {
            cache: ScrapeCache::new(exposition, config.metrics_max_age),
            healthy: Arc::clone(&self.healthy),
            metrics: self.metrics.clone(),
            scrapes: Arc::new(Semaphore::new(limits.max_concurrent_scrapes)),
            // Scrapers all come from loopback here, so the per-peer share is the whole table.
            connections: ConnectionTable::new(limits.max_http_connections, limits.max_http_connections),
            header_read_timeout: limits.header_read_timeout,
            web,
            history,
        });
        let rt = runtime("gainguard-http", 1, HTTP_NICE)?;
        {
            let _guard = rt.enter();
            let listener = tokio::net::TcpListener::from_std(listener).map_err(DaemonError::Runtime)?;
            rt.spawn(http::serve(listener, http));
        }
        self.runtimes.push(rt);
        Ok(())
    }

    fn start_ingest(&mut self, config: &DaemonConfig, bound: Vec<BoundIngest>, token: Option<Token>) -> Result<(), DaemonError> {
        if bound.is_empty() {
            return Ok(());
        }
        let limits = &config.limits;
        let ingest = Arc::new(Ingest {
            queue: self.queue.clone(),
            control: self.control.clone(),
            metrics: self.metrics.clone(),
            connections: ConnectionTable::new(limits.max_connections, limits.max_connections_per_peer),
            next_conn: Arc::clone(&self.next_conn),
            max_line_bytes: limits.max_line_bytes,
            idle_timeout: limits.idle_timeout,
            line_budget: AtomicUsize::new(limits.ingest_buffer_bytes),
            uids: UidPolicy::new(&config.auth.allow_uids),
            token,
        });
        let rt = runtime("gainguard-ingest", 2, 0)?;
        {
            let _guard = rt.enter();
            for b in bound {
                match b {
                    BoundIngest::Unix(l) => {
                        let l = tokio::net::UnixListener::from_std(l).map_err(DaemonError::Runtime)?;
                        rt.spawn(ingest::serve_unix(l, Arc::clone(&ingest)));
                    }
                    BoundIngest::Tcp(l) => {
                        let l = tokio::net::TcpListener::from_std(l).map_err(DaemonError::Runtime)?;
                        rt.spawn(ingest::serve_tcp(l, Arc::clone(&ingest)));
                    }
                }
            }
        }
        self.runtimes.push(rt);
        Ok(())
    }

    /// A sink for this trainer process. Clones share one identity: the run/rank it reports is up while any
    /// clone is alive, and goes down (then expires after the TTL) when the last clone is dropped.
    pub fn sink(&self) -> Sink {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        Sink::local(EmbeddedSender::new(self.queue.clone(), self.control.clone(), conn, self.metrics.connections.clone()))
    }

    /// The address `/metrics` is actually served on (useful with port 0).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Whether the HTTP endpoint speaks TLS (a web config file with `tls_server_config`).
    pub fn serves_tls(&self) -> bool {
        self.tls
    }

    /// The ingest addresses actually bound (TCP port 0 resolved).
    pub fn ingest_addrs(&self) -> &[IngestAddr] {
        &self.ingest_addrs
    }

    /// False once the run table has stopped (it failed): `/healthz` answers 503 and events are lost.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Test hook: makes the run-table thread fail as a bug would, so that tests can check what follows.
    #[doc(hidden)]
    pub fn inject_run_table_fault(&self) {
        let _ = self.control.send(Control::Fault);
    }

    /// Stops serving, joins the threads and removes the Unix socket files.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for rt in self.runtimes.drain(..) {
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

fn read_token(config: &DaemonConfig) -> Result<Option<Token>, DaemonError> {
    let Some(path) = &config.auth.token_file else { return Ok(None) };
    Token::from_file(path).map(Some).map_err(|detail| DaemonError::TokenFile { path: path.clone(), detail })
}

/// Niceness of the HTTP threads (serving and rendering `/metrics`): when scrapes and ingest compete for the
/// cores, the trainers' events go first, and Prometheus waits a little longer for its body.
const HTTP_NICE: i32 = 10;

fn runtime(name: &str, threads: usize, nice: i32) -> Result<tokio::runtime::Runtime, DaemonError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .on_thread_start(move || {
            if nice != 0 {
                // SAFETY: on Linux, who = 0 with PRIO_PROCESS names the calling thread only. Failure (a
                // platform where it would name the process) just leaves the priority as it was.
                #[cfg(target_os = "linux")]
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                }
            }
        })
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)
}

fn start_run_table(
    table: RunTable,
    receiver: QueueReceiver,
    control: Receiver<Control>,
    healthy: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, DaemonError> {
    std::thread::Builder::new()
        .name("gainguard-runs".into())
        .spawn(move || run_core(table, receiver, control, healthy))
        .map_err(DaemonError::Runtime)
}

/// Marks the daemon unhealthy when the run-table thread ends, on purpose or not (a panic included).
struct HealthGuard {
    healthy: Arc<AtomicBool>,
    stopping: bool,
}

impl Drop for HealthGuard {
    fn drop(&mut self) {
        self.healthy.store(false, Ordering::Relaxed);
        if !self.stopping {
            tracing::error!("the run table stopped unexpectedly; /healthz now answers 503 and events are lost");
        }
    }
}

fn run_core(mut table: RunTable, data: QueueReceiver, control: Receiver<Control>, healthy: Arc<AtomicBool>) {
    let mut guard = HealthGuard { healthy, stopping: false };
    const TICK: Duration = Duration::from_millis(200);
    let mut next_expiry = Instant::now() + TICK;
    loop {
        select! {
            recv(control) -> msg => match msg {
                Ok(Control::Disconnected { conn }) => table.disconnected(conn, Instant::now()),
                Ok(Control::Fault) => panic!("run table: fault injected by a test"),
                Ok(Control::Shutdown) | Err(_) => {
                    guard.stopping = true;
                    return;
                }
            },
            recv(data.rx) -> msg => match msg {
                Ok(IngestMsg::Events { conn, events, validated, bytes }) => {
                    let (now, received) = (Instant::now(), gainguard_protocol::events::unix_now());
                    for e in &events {
                        table.handle(conn, e, validated, now, received);
                    }
                    data.release(bytes);
                }
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
