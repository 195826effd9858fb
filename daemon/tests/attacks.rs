//! Hostile and idle clients against a running `gainguardd`, one test per attack (docs/protocol.md lists the
//! limits each one meets). Each attack
//! is bounded in time; afterwards (or while it goes on) a well-behaved trainer must connect within 1 s and
//! arrive with exact values, `/metrics` must answer within 1 s, and the daemon's memory must stay under the
//! bound the test states.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::procfs::{cpu_seconds, peak_rss_mib, rss_mib};
use common::{free_port, greeting, http_get, metrics, sample, token_file, wait_until, ChildGuard, TOKEN};
use gainguard_protocol::events::*;
use gainguard_protocol::wire::encode_line;

/// Memory a daemon may use after an attack (it starts near 10 MiB; the largest byte budget is 64 MiB).
const RSS_BOUND_MIB: f64 = 160.0;

struct Gd {
    child: ChildGuard,
    metrics: SocketAddr,
    sock: PathBuf,
    tcp: SocketAddr,
    dir: tempfile::TempDir,
}

impl Gd {
    /// Starts gainguardd with a Unix and a token-protected TCP ingest; `nofile` caps its descriptors.
    fn start(extra: &[&str], nofile: Option<u64>) -> Gd {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let tcp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gainguardd"));
        cmd.arg(format!("--listen={metrics}"))
            .arg(format!("--ingest=unix:{}", sock.display()))
            .arg(format!("--ingest=tcp:{tcp}"))
            .arg(format!("--ingest-token-file={}", token_file(dir.path()).display()))
            .args(["--nvml", "off", "--metrics-max-age", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = ChildGuard(cmd.spawn().expect("starting gainguardd"));
        wait_until(Duration::from_secs(10), "gainguardd /healthz", || {
            http_get(metrics, "/healthz").ok().filter(|(s, _)| *s == 200)
        });
        Gd { child, metrics, sock, tcp, dir }
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    fn unix(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sample(&metrics(self.metrics), name, labels).unwrap_or(0.0)
    }

    /// The checks after every attack: a trainer connects within 1 s and its values arrive exactly,
    /// `/metrics` answers within 1 s, and RSS is under `rss_bound` MiB.
    fn assert_recovers(&self, run: &str, rss_bound: f64) {
        let t = Instant::now();
        let mut s = self.unix();
        assert_eq!(greeting(&mut s), r#"{"status":"ok"}"#, "the trainer was refused");
        assert!(t.elapsed() < Duration::from_secs(1), "the trainer waited {:?} to be admitted", t.elapsed());
        s.write_all(&trainer_lines(run)).unwrap();
        wait_until(Duration::from_secs(10), &format!("run {run} to arrive exactly"), || {
            let body = metrics(self.metrics);
            let r = [("run", run)];
            let exact = sample(&body, "gainguard_step", &r) == Some(TRAINER_STEPS as f64)
                && sample(&body, "gainguard_tokens_total", &r) == Some((TRAINER_STEPS * 1000) as f64)
                && sample(&body, "gainguard_loss", &r) == Some(loss(TRAINER_STEPS))
                && sample(&body, "gainguard_sigma_max", &[("run", run), ("param", "w")]) == Some(SIGMA)
                && sample(&body, "gainguard_trainer_up", &r) == Some(1.0);
            exact.then_some(())
        });
        let t = Instant::now();
        let (status, _) = http_get(self.metrics, "/metrics").unwrap();
        assert_eq!(status, 200);
        assert!(t.elapsed() < Duration::from_secs(1), "/metrics took {:?}", t.elapsed());
        let rss = rss_mib(self.pid());
        assert!(rss < rss_bound, "RSS {rss:.0} MiB, bound {rss_bound} MiB");
        drop(s);
    }
}

const TRAINER_STEPS: u64 = 20;
const SIGMA: f64 = 3.0625;

fn loss(step: u64) -> f64 {
    2.0 + 1.0 / step as f64
}

fn line(run: &str, step: u64, event: Event) -> Vec<u8> {
    encode_line(&Envelope::new(run, 0, "h", step, event)).unwrap()
}

fn hello() -> Event {
    Event::Hello(Hello { pid: 1, planned_steps: None, rule: "paper".into(), gamma: Some(0.5), alpha: None, reference: None })
}

fn params(name: &str) -> Event {
    Event::Params(ParamsTable {
        params: vec![ParamInfo {
            name: name.into(),
            layer: Some(0),
            class: ParamClass::MatrixLike,
            shape: vec![8, 8],
            width_multiplier: 2.0,
            lr: 0.01,
            weight_decay: 0.1,
        }],
    })
}

fn trainer_lines(run: &str) -> Vec<u8> {
    let mut out = line(run, 0, hello());
    out.extend(line(run, 0, params("w")));
    for i in 1..=TRAINER_STEPS {
        let step = StepEvent { loss: Some(loss(i)), tokens: 1000, timestamp_seconds: 1.0, ..Default::default() };
        out.extend(line(run, i, Event::Step(step)));
    }
    let s = SpectrumSample { sigma_max: Some(SIGMA), iterations: 2, ..SpectrumSample::empty("w", Some(0), ParamClass::MatrixLike) };
    out.extend(line(run, TRAINER_STEPS, Event::Spectrum(s)));
    out
}

#[test]
fn runs_that_never_say_hello_expire_after_the_ttl_and_never_lock_a_trainer_out() {
    let gd = Gd::start(&["--ttl", "2"], None);
    let mut attacker = gd.unix();
    assert_eq!(greeting(&mut attacker), r#"{"status":"ok"}"#);
    let mut flood = Vec::new();
    for r in 0..300 {
        flood.extend(line(&format!("attack{r}"), 0, params("p")));
    }
    attacker.write_all(&flood).unwrap();
    wait_until(Duration::from_secs(10), "the run cap to fill", || {
        (gd.counter("gainguard_ingest_rejected_total", &[("reason", "too_many_runs")]) == 44.0).then_some(())
    });
    // The attacker's connection is still open: its runs are fed, but none said hello, so a trainer's hello
    // evicts one of them.
    gd.assert_recovers("trainer", RSS_BOUND_MIB);
    assert_eq!(gd.counter("gainguard_runs_evicted_total", &[]), 1.0);
    // Once nothing feeds them (the trainer's connection closed too), every run expires after the TTL.
    drop(attacker);
    wait_until(Duration::from_secs(15), "the attack runs to expire", || {
        (gd.counter("gainguard_runs", &[]) == 0.0).then_some(())
    });
}

#[test]
fn idle_connections_time_out_make_room_for_trainers_and_senders_lose_nothing_uncounted() {
    let gd = Gd::start(&["--ingest-idle-timeout", "2"], None);
    let idle: Vec<UnixStream> = (0..300).map(|_| UnixStream::connect(&gd.sock).unwrap()).collect();
    let idle_tcp: Vec<TcpStream> = (0..50).map(|_| TcpStream::connect(gd.tcp).unwrap()).collect();
    gd.assert_recovers("trainer", RSS_BOUND_MIB);
    // Senders through `Sink::connect` over both transports, while the idle connections are held.
    let send = |addr: String, run: &str| {
        Command::new(env!("CARGO_BIN_EXE_gainguard-send"))
            .args(["--addr", &addr, "--run", run, "--steps", "2000", "--params", "0", "--tokens-per-step", "3"])
            .env("GAINGUARD_INGEST_TOKEN_FILE", gd.dir.path().join("ingest.token"))
            .stderr(Stdio::inherit())
            .output()
            .unwrap()
    };
    for (addr, run) in [(format!("unix:{}", gd.sock.display()), "via-unix"), (format!("tcp:{}", gd.tcp), "via-tcp")] {
        let out = send(addr, run);
        assert!(out.status.success(), "{run}: the sender failed");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["dropped"], 0, "{run}: {report}");
        wait_until(Duration::from_secs(10), &format!("{run} in full"), || {
            (gd.counter("gainguard_tokens_total", &[("run", run)]) == 6000.0).then_some(())
        });
    }
    wait_until(Duration::from_secs(10), "the idle connections to time out", || {
        (gd.counter("gainguard_ingest_connections", &[]) == 0.0).then_some(())
    });
    let closed = gd.counter("gainguard_ingest_connections_closed_total", &[("reason", "idle_timeout")])
        + gd.counter("gainguard_ingest_connections_closed_total", &[("reason", "evicted")]);
    assert!(closed >= 300.0, "{closed} idle connections closed");
    drop((idle, idle_tcp));
}

#[test]
fn half_sent_http_requests_are_timed_out_and_capped_and_never_starve_scrapes_or_trainers() {
    let gd = Gd::start(&["--header-read-timeout", "2"], Some(1024));
    let mut half: Vec<TcpStream> = Vec::new();
    for _ in 0..1100 {
        if let Ok(mut s) = TcpStream::connect(gd.metrics) {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
            half.push(s);
        }
    }
    // The accept loops must not spin while the attack holds on.
    let (cpu, t) = (cpu_seconds(gd.pid()), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let used = (cpu_seconds(gd.pid()) - cpu) / t.elapsed().as_secs_f64();
    assert!(used < 0.5, "the daemon used {:.0}% of a core while idle under attack", used * 100.0);
    gd.assert_recovers("trainer", RSS_BOUND_MIB);
    assert!(gd.counter("gainguard_http_refused_total", &[("reason", "evicted")]) > 0.0);
    drop(half);
}

#[test]
fn sixteen_concurrent_scrapes_at_200k_series_share_one_body_under_300_mib() {
    let gd = Gd::start(&[], None);
    let mut s = gd.unix();
    assert_eq!(greeting(&mut s), r#"{"status":"ok"}"#);
    let (runs, params_per_run) = (3, 4096);
    for r in 0..runs {
        let run = format!("big{r}");
        let table = (0..params_per_run)
            .map(|j| ParamInfo {
                name: format!("blocks.{j}.mlp.up.weight"),
                layer: Some(j as u32),
                class: ParamClass::MatrixLike,
                shape: vec![1024, 1024],
                width_multiplier: 4.0,
                lr: 1e-3,
                weight_decay: 0.1,
            })
            .collect();
        let mut out = line(&run, 0, hello());
        out.extend(line(&run, 0, Event::Params(ParamsTable { params: table })));
        for j in 0..params_per_run {
            out.extend(line(&run, 1, Event::Spectrum(full_sample(&format!("blocks.{j}.mlp.up.weight"), j as u32))));
        }
        s.write_all(&out).unwrap();
    }
    let series = wait_until(Duration::from_secs(30), "200k series", || {
        let body = metrics(gd.metrics);
        let n = sample(&body, "gainguard_exported_series", &[]).unwrap_or(0.0);
        (sample(&body, "gainguard_spectrum_samples_total", &[("run", "big2")]) == Some(params_per_run as f64))
            .then_some(n)
    });
    assert!(series > 200_000.0, "{series} series");
    let scrapers: Vec<_> = (0..16)
        .map(|_| {
            let addr = gd.metrics;
            std::thread::spawn(move || http_get(addr, "/metrics").map(|(status, body)| (status, body.len())))
        })
        .collect();
    for s in scrapers {
        let (status, len) = s.join().unwrap().unwrap();
        assert_eq!(status, 200);
        assert!(len > 20 << 20, "a whole body, {len} bytes");
    }
    let peak = peak_rss_mib(gd.pid());
    assert!(peak <= 300.0, "peak RSS {peak:.0} MiB with 16 concurrent scrapes of {series} series");
    gd.assert_recovers("trainer", 300.0);
}

fn full_sample(param: &str, layer: u32) -> SpectrumSample {
    SpectrumSample {
        sigma_max: Some(2.5),
        iterations: 2,
        sigma_max_normalized: Some(1.0),
        reference_sigma_max: Some(2.5),
        gain_ratio: Some(1.0),
        stable_rank: Some(10.0),
        frobenius_norm: Some(8.0),
        effective_rank: Some(90.0),
        quantiles: Some(SpectrumQuantiles { p10: 0.1, p50: 0.5, p90: 0.9, p99: 2.0 }),
        update_ratio: Some(1e-3),
        duration_seconds: 0.01,
        ..SpectrumSample::empty(param, Some(layer), ParamClass::MatrixLike)
    }
}

/// Connects to the daemon's Unix socket from a forked child running as `uid`, sends one step line, and
/// returns the greeting it read (empty when the connection failed).
fn greeting_as_uid(sock: &Path, uid: u32) -> String {
    use std::os::unix::ffi::OsStrExt;
    let path = sock.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    let request = line("intruder", 1, Event::Step(StepEvent { timestamp_seconds: 1.0, ..Default::default() }));
    let mut fds = [0i32; 2];
    // SAFETY: a pipe for the child's answer.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: after fork the child only makes async-signal-safe system calls on memory prepared before it,
    // then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        unsafe {
            libc::close(fds[0]);
            if libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
                libc::_exit(3);
            }
            let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(s, &addr as *const _ as *const libc::sockaddr, len) != 0 {
                libc::_exit(4);
            }
            libc::write(s, request.as_ptr() as *const libc::c_void, request.len());
            let mut buf = [0u8; 256];
            let n = libc::read(s, buf.as_mut_ptr() as *mut libc::c_void, buf.len());
            if n > 0 {
                libc::write(fds[1], buf.as_ptr() as *const libc::c_void, n as usize);
            }
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end; waiting for our own child.
    unsafe { libc::close(fds[1]) };
    let mut answer = String::new();
    // SAFETY: fds[0] is a pipe we own; File takes it over.
    let mut pipe = unsafe { <std::fs::File as std::os::unix::io::FromRawFd>::from_raw_fd(fds[0]) };
    let _ = pipe.read_to_string(&mut answer);
    let mut status = 0;
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child failed: status {status}");
    answer.trim_end().to_string()
}

#[test]
fn writes_without_the_token_are_refused_and_counted() {
    let gd = Gd::start(&[], None);
    let step = line("intruder", 1, Event::Step(StepEvent { timestamp_seconds: 1.0, ..Default::default() }));
    // No token: the first line is an event.
    let mut s = TcpStream::connect(gd.tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&step).unwrap();
    assert_eq!(greeting(&mut s), r#"{"status":"refused","reason":"unauthenticated"}"#);
    // A wrong token.
    let mut s = TcpStream::connect(gd.tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{{\"auth\":\"{TOKEN}x\"}}\n").as_bytes()).unwrap();
    s.write_all(&step).unwrap();
    assert_eq!(greeting(&mut s), r#"{"status":"refused","reason":"unauthenticated"}"#);
    assert_eq!(gd.counter("gainguard_ingest_rejected_total", &[("reason", "unauthenticated")]), 2.0);

    assert_eq!(sample(&metrics(gd.metrics), "gainguard_step", &[("run", "intruder")]), None);
    gd.assert_recovers("trainer", RSS_BOUND_MIB);
}

/// Fails, rather than passing unchecked, where the test cannot run.
fn require_root() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test forks a child that drops to uid 65534, which needs root (running as uid {euid})");
}

#[test]
fn writes_from_another_uid_are_refused_and_counted() {
    require_root();
    let gd = Gd::start(&[], None);
    use std::os::unix::fs::PermissionsExt;
    // Opened up on purpose, so that the uid check, not the file mode, is what refuses.
    std::fs::set_permissions(gd.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&gd.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let answer = greeting_as_uid(&gd.sock, 65534);
    assert_eq!(answer, r#"{"status":"refused","reason":"uid_not_allowed"}"#);
    assert_eq!(gd.counter("gainguard_ingest_rejected_total", &[("reason", "uid_not_allowed")]), 1.0);
    assert_eq!(sample(&metrics(gd.metrics), "gainguard_step", &[("run", "intruder")]), None);
    gd.assert_recovers("trainer", RSS_BOUND_MIB);
}

#[test]
fn an_allowed_uid_may_write_over_the_unix_socket() {
    require_root();
    let gd = Gd::start(&["--ingest-allow-uid", "65534"], None);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(gd.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&gd.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(greeting_as_uid(&gd.sock, 65534), r#"{"status":"ok"}"#);
    wait_until(Duration::from_secs(5), "the allowed uid's step", || {
        sample(&metrics(gd.metrics), "gainguard_step", &[("run", "intruder")])
    });
}

/// Runs gainguardd on a free port and a private socket with `args` until it exits.
fn run_with(args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("--listen=127.0.0.1:{}", free_port());
    let sock = format!("--ingest=unix:{}", dir.path().join("d.sock").display());
    let mut all = vec![listen.as_str(), sock.as_str(), "--nvml=off"];
    all.extend_from_slice(args);
    common::run_to_exit(&all)
}

#[test]
fn an_out_of_range_duration_exits_2_naming_the_flag() {
    for (flag, value) in [("--ttl", "1e19"), ("--ttl", "1e30"), ("--ingest-idle-timeout=-1", ""), ("--nvml-interval", "inf")] {
        let args: Vec<&str> = [flag, value].into_iter().filter(|a| !a.is_empty()).collect();
        let (code, stderr) = run_with(&args);
        let flag = flag.split('=').next().unwrap();
        assert_eq!(code, 2, "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: the message must name the flag: {stderr}");
    }
}

#[test]
fn a_failed_run_table_turns_healthz_503_and_gainguardd_exits_non_zero() {
    let daemon = gainguard_daemon::Daemon::spawn(gainguard_daemon::DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        sources: gainguard_daemon::SourceSettings { nvml: gainguard_daemon::NvmlSettings::off() },
        ..Default::default()
    })
    .unwrap();
    assert_eq!(http_get(daemon.metrics_addr(), "/healthz").unwrap().0, 200);
    daemon.inject_run_table_fault();
    wait_until(Duration::from_secs(5), "/healthz 503", || {
        (http_get(daemon.metrics_addr(), "/healthz").unwrap().0 == 503).then_some(())
    });
    assert!(!daemon.is_healthy());

    let (code, stderr) = run_with(&["--inject-run-table-fault-after", "0.3"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("run table stopped"), "{stderr}");
}

#[test]
fn unfinished_megabyte_lines_on_256_connections_stay_within_the_line_budget() {
    let gd = Gd::start(&[], None);
    let mut partial = vec![b'x'; 1_000_000];
    partial[..14].copy_from_slice(b"{\"v\":1,\"run\":\"");
    let writers: Vec<_> = (0..256)
        .map(|_| {
            let sock = gd.sock.clone();
            let partial = partial.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(sock).ok()?;
                s.set_write_timeout(Some(Duration::from_secs(20))).ok()?;
                s.write_all(&partial).ok()?;
                Some(s)
            })
        })
        .collect();
    let held: Vec<UnixStream> = writers.into_iter().filter_map(|w| w.join().unwrap()).collect();
    wait_until(Duration::from_secs(30), "the unfinished lines to be read or refused", || {
        let refused = gd.counter("gainguard_ingest_rejected_total", &[("reason", "buffer_full")])
            + gd.counter("gainguard_ingest_connections_closed_total", &[("reason", "evicted")]);
        (refused > 0.0).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let peak = peak_rss_mib(gd.pid());
    assert!(peak < RSS_BOUND_MIB, "peak RSS {peak:.0} MiB (the line budget is 32 MiB)");
    gd.assert_recovers("trainer", RSS_BOUND_MIB);
    drop(held);
}
