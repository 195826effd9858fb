//! `gainguardd`: one per node. Ingests gainguard events from trainer processes and serves them, with NVML
//! GPU statistics, as Prometheus metrics.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use gainguard_daemon::{default_ingest_addr, Daemon, DaemonConfig, IngestAddr, Limits, NvmlMode};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Nvml {
    /// Use NVML when a driver and GPU are present; otherwise export gainguard_nvml_up 0.
    Auto,
    /// Require NVML: exit with status 2 when it is unavailable.
    On,
    /// Never touch NVML.
    Off,
}

/// Exports gainguard training, spectrum and NVML GPU metrics to Prometheus.
///
/// Trainers send versioned JSON lines (docs/protocol.md) to the ingest sockets; Prometheus scrapes
/// http://LISTEN/metrics. Everything binds to loopback by default. Exit status: 0 after SIGTERM/SIGINT,
/// 2 when an address is in use or a requirement (--nvml on) is not met, 1 on other errors.
#[derive(Parser, Debug)]
#[command(name = "gainguardd", version)]
struct Args {
    /// HOST:PORT serving /metrics and /healthz.
    #[arg(long, default_value = "127.0.0.1:9464")]
    listen: SocketAddr,

    /// Where trainers connect: `unix:/path/to.sock` (created with mode 0600; a stale file is replaced, a
    /// live daemon is an error) or `tcp:127.0.0.1:PORT` (loopback only). Repeatable. Default:
    /// unix:$XDG_RUNTIME_DIR/gainguardd.sock, or unix:/tmp/gainguardd-<uid>.sock without XDG_RUNTIME_DIR.
    #[arg(long, value_name = "ADDR")]
    ingest: Vec<IngestAddr>,

    /// GPU statistics through NVML.
    #[arg(long, value_enum, default_value = "auto")]
    nvml: Nvml,

    /// Seconds between NVML polls.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    nvml_interval: f64,

    /// Seconds a finished (Goodbye) or vanished (connection dropped) run keeps its series before all of them
    /// are removed.
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS")]
    ttl: f64,

    /// Concurrent trainer connections; more are closed at once and counted as too_many_connections.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: usize,

    /// Distinct (run, rank, host) combinations tracked; events of further ones are counted as too_many_runs.
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

    /// Source not to run (training, optimizer, spectra, liveness, nvml). Repeatable.
    #[arg(long, value_name = "NAME")]
    disable_source: Vec<String>,
}

fn seconds(name: &str, v: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!(v.is_finite() && v > 0.0, "--{name} {v}: expected a positive number of seconds");
    Ok(Duration::from_secs_f64(v))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("gainguardd: error: {err:#}");
            let startup = err.downcast_ref::<gainguard_daemon::DaemonError>().is_some_and(|e| {
                e.is_addr_in_use() || matches!(e, gainguard_daemon::DaemonError::Nvml(_))
            });
            ExitCode::from(if startup { 2 } else { 1 })
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let ingest = if args.ingest.is_empty() { vec![default_ingest_addr()] } else { args.ingest };
    let config = DaemonConfig {
        listen: args.listen,
        ingest,
        nvml: match args.nvml {
            Nvml::Auto => NvmlMode::Auto,
            Nvml::On => NvmlMode::On,
            Nvml::Off => NvmlMode::Off,
        },
        nvml_interval: seconds("nvml-interval", args.nvml_interval)?,
        ttl: seconds("ttl", args.ttl)?,
        limits: Limits {
            max_connections: args.max_connections,
            max_runs: args.max_runs,
            max_params_per_run: args.max_params_per_run,
            max_series: args.max_series,
            max_line_bytes: args.max_line_bytes,
        },
        disabled_sources: args.disable_source,
        ..DaemonConfig::default()
    };
    let daemon = Daemon::spawn(config)?;
    let ingest: Vec<String> = daemon.ingest_addrs().iter().map(ToString::to_string).collect();
    eprintln!("gainguardd: serving http://{}/metrics; ingest on {}", daemon.metrics_addr(), ingest.join(", "));

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("signal runtime")?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        anyhow::Ok(())
    })?;
    eprintln!("gainguardd: shutting down");
    daemon.shutdown();
    Ok(())
}
