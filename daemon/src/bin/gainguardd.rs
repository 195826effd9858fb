//! `gainguardd`: one per node. Ingests gainguard events from trainer processes and serves them, with NVML
//! GPU statistics, as Prometheus metrics.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use gainguard_daemon::config::{seconds, HistorySettings, WebSettings};
use gainguard_daemon::sources::{source_names, SourceArgs};
use gainguard_daemon::{default_ingest_addr, Daemon, DaemonConfig, DaemonError, IngestAddr, IngestAuth, Limits};

/// Exports gainguard training, spectrum and NVML GPU metrics to Prometheus.
///
/// Trainers send versioned JSON lines (docs/protocol.md) to the ingest sockets; Prometheus scrapes
/// http://LISTEN/metrics. Everything binds to loopback by default. Exit status: 0 after SIGTERM/SIGINT,
/// 2 when a setting is out of range, an address is in use, a requirement (--nvml on, a token file) is not
/// met or the web config file is wrong (the message names its field), 1 on other errors, including the run table failing while running.
#[derive(Parser, Debug)]
#[command(name = "gainguardd", version)]
struct Args {
    /// HOST:PORT serving /metrics and /healthz. An address off loopback needs TLS (--web.config.file) or
    /// --web.listen-unprotected.
    #[arg(long, default_value = "127.0.0.1:9464")]
    listen: SocketAddr,

    /// TLS and basic auth of the HTTP endpoint, in exporter-toolkit's web config format
    /// (tls_server_config, basic_auth_users with bcrypt hashes; docs/monitoring.md). Default:
    /// $GAINGUARD_WEB_CONFIG_FILE.
    #[arg(long = "web.config.file", value_name = "PATH")]
    web_config_file: Option<PathBuf>,

    /// Serve an address off loopback in plain HTTP, without TLS (the metrics carry run and parameter names).
    #[arg(long = "web.listen-unprotected")]
    web_listen_unprotected: bool,

    /// Where trainers connect: `unix:/path/to.sock` (created with mode 0600; a stale file is replaced, a
    /// live daemon is an error) or `tcp:127.0.0.1:PORT` (loopback only; needs --ingest-token-file).
    /// Repeatable. Default: unix:$XDG_RUNTIME_DIR/gainguardd.sock, or
    /// unix:/tmp/gainguardd-<uid>/gainguardd.sock (directory created 0700) without XDG_RUNTIME_DIR.
    #[arg(long, value_name = "ADDR")]
    ingest: Vec<IngestAddr>,

    /// A uid, besides the daemon's own, allowed to write over the Unix sockets (checked with SO_PEERCRED).
    /// Repeatable.
    #[arg(long, value_name = "UID")]
    ingest_allow_uid: Vec<u32>,

    /// File (mode 0600, owned by the daemon's user) holding the token TCP writers send in their first line.
    /// Required with a tcp: ingest address. Senders read it from $GAINGUARD_INGEST_TOKEN_FILE.
    #[arg(long, value_name = "PATH")]
    ingest_token_file: Option<PathBuf>,

    #[command(flatten)]
    sources: SourceArgs,

    /// Seconds a run keeps its series after its last event once nothing feeds it (it said Goodbye, or its
    /// connection dropped), before all of them are removed.
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS")]
    ttl: f64,

    /// Seconds an ingest connection may stay silent before it is closed (senders send a blank line when idle).
    #[arg(long, default_value_t = Limits::default().idle_timeout.as_secs_f64(), value_name = "SECONDS")]
    ingest_idle_timeout: f64,

    /// Concurrent trainer connections; at the cap, the oldest one that never delivered an event is closed,
    /// and without one the newcomer is refused (too_many_connections).
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: usize,

    /// Concurrent trainer connections of one peer (a Unix uid, or a TCP address).
    #[arg(long, default_value_t = Limits::default().max_connections_per_peer)]
    max_connections_per_peer: usize,

    /// Distinct (run, rank, host) combinations tracked; a new trainer's hello evicts an idle run at the cap,
    /// other events of further runs are counted as too_many_runs.
    #[arg(long, default_value_t = Limits::default().max_runs)]
    max_runs: usize,

    /// Distinct parameters per run; further ones are counted as too_many_params.
    #[arg(long, default_value_t = Limits::default().max_params_per_run)]
    max_params_per_run: usize,

    /// Upper bound of exported series (each histogram bucket counts); growth beyond it is refused and
    /// counted as too_many_series.
    #[arg(long, default_value_t = Limits::default().max_series)]
    max_series: usize,

    /// Longest accepted input line in bytes; longer lines are skipped and counted as line_too_long.
    #[arg(long, default_value_t = Limits::default().max_line_bytes)]
    max_line_bytes: usize,

    /// Bytes of unfinished lines buffered across all connections; beyond it a line is skipped (buffer_full).
    #[arg(long, default_value_t = Limits::default().ingest_buffer_bytes)]
    ingest_buffer_bytes: usize,

    /// Bytes of decoded events queued for the run table; beyond it connections wait.
    #[arg(long, default_value_t = Limits::default().queue_bytes)]
    queue_bytes: usize,

    /// Open HTTP connections; at the cap the oldest one without a request in progress is closed.
    #[arg(long, default_value_t = Limits::default().max_http_connections)]
    max_http_connections: usize,

    /// Seconds a client has to send a whole HTTP request head.
    #[arg(long, default_value_t = Limits::default().header_read_timeout.as_secs_f64(), value_name = "SECONDS")]
    header_read_timeout: f64,

    /// /metrics requests served at once; more are answered 503 (like node_exporter's --web.max-requests).
    #[arg(long, default_value_t = Limits::default().max_concurrent_scrapes)]
    max_concurrent_scrapes: usize,

    /// Seconds a rendered /metrics body is served again to later scrapes (0: render for every scrape;
    /// concurrent scrapes always share one render).
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    metrics_max_age: f64,

    /// Seconds between the points the live page's history keeps per series (the latest sample of each
    /// interval is kept).
    #[arg(long, default_value_t = HistorySettings::default().interval.as_secs_f64(), value_name = "SECONDS")]
    history_interval: f64,

    /// Seconds of history a series keeps when it is sampled every interval (retention / interval points).
    #[arg(long, default_value_t = HistorySettings::default().retention.as_secs_f64(), value_name = "SECONDS")]
    history_retention: f64,

    /// Bytes the live page's history may hold in all; a series that would pass it is not kept (counted in
    /// gainguard_daemon_history_series_refused_total). The default holds a day of one run with up to 480
    /// tracked parameters at the default interval.
    #[arg(long, default_value_t = HistorySettings::default().max_bytes, value_name = "BYTES")]
    history_max_bytes: usize,

    /// Source not to run. Repeatable.
    #[arg(long, value_name = "NAME", help = format!("Source not to run ({}). Repeatable.", source_names()))]
    disable_source: Vec<String>,

    /// Test hook: make the run table fail this many seconds after start.
    #[arg(long, hide = true, value_name = "SECONDS")]
    inject_run_table_fault_after: Option<f64>,
}

/// glibc raises its mmap threshold after each large free, after which every `/metrics` body (megabytes)
/// comes from the heap of whichever thread rendered it and stays there; with a fixed threshold, bodies are
/// mapped and unmapped, and RSS stays flat over days.
#[cfg(target_env = "gnu")]
fn fix_mmap_threshold() {
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
}

#[cfg(not(target_env = "gnu"))]
fn fix_mmap_threshold() {}

fn main() -> ExitCode {
    fix_mmap_threshold();
    gainguard_daemon::logging::init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            let usage = err.downcast_ref::<DaemonError>().is_some_and(DaemonError::is_usage);
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

fn config(args: Args) -> Result<DaemonConfig, DaemonError> {
    let ingest = if args.ingest.is_empty() { vec![default_ingest_addr()] } else { args.ingest };
    let metrics_max_age =
        if args.metrics_max_age == 0.0 { Duration::ZERO } else { seconds("metrics-max-age", args.metrics_max_age)? };
    let web = WebSettings::default();
    Ok(DaemonConfig {
        listen: args.listen,
        web: WebSettings {
            config_file: args.web_config_file.or(web.config_file),
            listen_unprotected: args.web_listen_unprotected || web.listen_unprotected,
        },
        ingest,
        auth: IngestAuth { allow_uids: args.ingest_allow_uid, token_file: args.ingest_token_file },
        sources: args.sources.settings()?,
        ttl: seconds("ttl", args.ttl)?,
        metrics_max_age,
        limits: Limits {
            max_connections: args.max_connections,
            max_connections_per_peer: args.max_connections_per_peer,
            max_runs: args.max_runs,
            max_params_per_run: args.max_params_per_run,
            max_series: args.max_series,
            max_line_bytes: args.max_line_bytes,
            ingest_buffer_bytes: args.ingest_buffer_bytes,
            queue_bytes: args.queue_bytes,
            idle_timeout: seconds("ingest-idle-timeout", args.ingest_idle_timeout)?,
            max_http_connections: args.max_http_connections,
            header_read_timeout: seconds("header-read-timeout", args.header_read_timeout)?,
            max_concurrent_scrapes: args.max_concurrent_scrapes,
        },
        disabled_sources: args.disable_source,
        history: HistorySettings {
            interval: seconds("history-interval", args.history_interval)?,
            retention: seconds("history-retention", args.history_retention)?,
            max_bytes: args.history_max_bytes,
        },
    })
}

fn run(args: Args) -> anyhow::Result<()> {
    let fault_after = args.inject_run_table_fault_after.map(|s| seconds("inject-run-table-fault-after", s)).transpose()?;
    let daemon = Daemon::spawn(config(args)?)?;
    let ingest: Vec<String> = daemon.ingest_addrs().iter().map(ToString::to_string).collect();
    let scheme = if daemon.serves_tls() { "https" } else { "http" };
    tracing::info!(
        "serving {scheme}://{}/metrics and the live page at {scheme}://{}/; ingest on {}",
        daemon.metrics_addr(),
        daemon.metrics_addr(),
        ingest.join(", ")
    );

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("signal runtime")?;
    let failed = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let started = tokio::time::Instant::now();
        let mut health = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = term.recv() => return anyhow::Ok(false),
                _ = int.recv() => return anyhow::Ok(false),
                _ = health.tick() => {
                    if fault_after.is_some_and(|d| started.elapsed() >= d) {
                        daemon.inject_run_table_fault();
                    }
                    if !daemon.is_healthy() {
                        return anyhow::Ok(true);
                    }
                }
            }
        }
    })?;
    daemon.shutdown();
    anyhow::ensure!(!failed, "the run table stopped; exiting so that a supervisor restarts the daemon");
    tracing::info!("shut down");
    Ok(())
}
