//! `gainguard::Monitor`: bad input is an error naming the culprit; an optimizer that steps by itself drives the
//! sampler through `for_plan` and `before_step`/`after_step` and gets the values of an independent float64 SVD;
//! a recorded profile read back as the reference gives a gain ratio of 1 (to the estimator's 1e-3) for the same weights; the Goodbye
//! says how the run ended.

use std::path::PathBuf;
use std::time::Duration;

use gainguard::{ParamRef, SamplerConfig};
use gainguard::protocol::events::{Envelope, Event, SpectrumSample};
use gainguard::protocol::{Sink, SinkOptions};
use gainguard::{AdamWConfig, BaseShapes, Monitor, MonitorError, ParamClass, ScalingPlan, StepReport, WidthScaledAdamW};
use gainguard_examples::model;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn model_and_plan() -> (VarStore, ScalingPlan) {
    tch::manual_seed(3);
    let config = |d| model::Config::new(40, d, 16, 1, 12);
    let base = VarStore::new(Device::Cpu);
    let _ = model::llama(base.root(), &config(16));
    let vs = VarStore::new(Device::Cpu);
    let _ = model::llama(vs.root(), &config(32));
    let opt = WidthScaledAdamW::new(&vs, &BaseShapes::from_var_store(&base), AdamWConfig { lr: 1e-2, ..Default::default() }).unwrap();
    let plan = opt.plan().clone();
    (vs, plan)
}

fn capture() -> (Sink, crossbeam_channel::Receiver<Envelope>) {
    let (tx, rx) = crossbeam_channel::bounded(100_000);
    (Sink::from_sender(tx), rx)
}

/// Every step sampled, at normal priority, every round kept: these tests check values, not scheduling.
fn every_step() -> SamplerConfig {
    SamplerConfig { interval: 1, budget_fraction: None, queue_capacity: 64, worker_nice: 0, max_params_per_sample: 64, ..Default::default() }
}

fn spectra(events: &[Envelope]) -> Vec<(u64, SpectrumSample)> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Event::Spectrum(s) => Some((e.step, s.clone())),
            _ => None,
        })
        .collect()
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("gainguard-monitor-{}-{name}", std::process::id()))
}

/// The "external optimizer": plain SGD-like updates by hand on the model's tensors, monitored through the
/// plan hooks, with the same noise on every call. Returns the weights after every step, by name.
fn drive(mon: &mut Monitor, vs: &VarStore, steps: u64) -> Vec<Vec<(String, Tensor)>> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    // A fixed pseudo-random update, not torch's generator: that one is global, and other tests draw from it.
    let noise = |t: &Tensor, step: u64| (Tensor::arange(t.numel() as i64, (Kind::Float, Device::Cpu)) * (0.37 + step as f64)).sin().view(t.size().as_slice()) * 0.01;
    let mut history = Vec::new();
    for step in 1..=steps {
        // The optimizer's own count of each parameter's decay horizon, as a stand-in lr·wd of 0.5 per step.
        let h = Some(0.5 * step as f64);
        let params: Vec<ParamRef> = vars.iter().map(|(n, t)| ParamRef { name: n, tensor: t, decay_horizon: h }).collect();
        mon.before_step(step, &params);
        tch::no_grad(|| {
            for (_, t) in &vars {
                let _ = t.shallow_clone().f_add_(&noise(t, step)).unwrap();
            }
        });
        let report = StepReport { step, lr_multiplier: 1.0, wd_multiplier: 1.0, ..Default::default() };
        mon.after_step(&report, &params);
        mon.step(&report, 3.0 / step as f64, 480);
        history.push(vars.iter().map(|(n, t)| (n.clone(), t.copy())).collect());
    }
    history
}

#[test]
fn an_optimizer_that_steps_by_itself_gets_sigma_max_and_update_ratio_of_an_independent_float64_svd() {
    let (vs, plan) = model_and_plan();
    let (sink, rx) = capture();
    let mut mon = Monitor::builder("external").planned_steps(4).sampler(every_step()).to_sink(sink).for_plan(&plan).unwrap();
    let history = drive(&mut mon, &vs, 4);
    mon.finish().unwrap();
    let events: Vec<Envelope> = rx.try_iter().collect();
    let samples = spectra(&events);
    let matrices = plan.decisions.iter().filter(|d| d.class == ParamClass::MatrixLike).count();
    assert_eq!(samples.len(), 4 * matrices, "every matrix-like parameter at every step");
    for (step, s) in &samples {
        let after = &history[*step as usize - 1].iter().find(|(n, _)| *n == s.param).unwrap().1;
        let w = after.to_kind(Kind::Double);
        let truth = w.reshape([w.size()[0], -1]).svd(true, false).1.double_value(&[0]);
        let sigma = s.sigma_max.unwrap();
        assert!((sigma - truth).abs() / truth <= 1e-3, "{} at {step}: {sigma} vs {truth}", s.param);
        assert_eq!(s.progress, Some(*step as f64 / 4.0));
        assert_eq!(s.decay_horizon, Some(0.5 * *step as f64), "{}: the optimizer's horizon, passed through", s.param);
        if *step > 1 {
            let before = history[*step as usize - 2].iter().find(|(n, _)| *n == s.param).unwrap().1.to_kind(Kind::Double);
            let ratio = (&w - &before).norm().double_value(&[]) / before.norm().double_value(&[]);
            assert!((s.update_ratio.unwrap() - ratio).abs() / ratio <= 1e-6, "{}: {:?} vs {ratio}", s.param, s.update_ratio);
        }
    }
    // One identity, given once, on every event.
    assert!(events.iter().all(|e| &*e.run == "external"));
    let losses: Vec<f64> = events.iter().filter_map(|e| if let Event::Step(s) = &e.event { s.loss } else { None }).collect();
    assert_eq!(losses, vec![3.0, 1.5, 1.0, 0.75]);
    let hello = events.iter().find_map(|e| if let Event::Hello(h) = &e.event { Some(h.clone()) } else { None }).unwrap();
    assert_eq!(hello.planned_steps, Some(4));
}

#[test]
fn a_recorded_profile_read_back_as_the_reference_gives_a_gain_ratio_of_one_for_the_same_weights() {
    let path = temp_path("profile.json");
    let (vs, plan) = model_and_plan();
    let start: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
    let mut proxy = Monitor::builder("proxy").planned_steps(3).sampler(every_step()).record_profile(&path).to_sink(Sink::disabled()).for_plan(&plan).unwrap();
    drive(&mut proxy, &vs, 3);
    proxy.finish().unwrap();
    assert_eq!(proxy.recorded_profile(), Some(gainguard::reference::ReferenceProfile::read_json(&path).unwrap()), "the profile written is the one recorded");

    // The same trajectory again (same start, same noise), compared with the profile on disk.
    tch::no_grad(|| {
        let vars = vs.variables();
        for (n, t) in &start {
            vars[n].shallow_clone().copy_(t);
        }
    });
    let (sink, rx) = capture();
    let mut target = Monitor::builder("target").planned_steps(3).sampler(every_step()).reference(&path).to_sink(sink).for_plan(&plan).unwrap();
    drive(&mut target, &vs, 3);
    target.finish().unwrap();
    let samples = spectra(&rx.try_iter().collect::<Vec<_>>());
    assert!(!samples.is_empty());
    for (step, s) in samples {
        let g = s.gain_ratio.unwrap_or_else(|| panic!("{} at {step}: no gain ratio", s.param));
        // Each run's estimate is within 1e-3 of the float64 truth (the test above), so their ratio within 2e-3.
        assert!((g - 1.0).abs() <= 2e-3, "{} at {step}: gain ratio {g}", s.param);
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn an_unreadable_or_mismatched_reference_is_an_error_naming_the_file_or_the_parameters() {
    let (_vs, plan) = model_and_plan();
    let missing = temp_path("no-such-profile.json");
    let err = Monitor::builder("r").reference(&missing).to_sink(Sink::disabled()).for_plan(&plan).err().unwrap();
    assert!(matches!(err, MonitorError::Reference(_)) && err.to_string().contains(&missing.display().to_string()), "{err}");

    // A profile of another model: its names are listed.
    let other = temp_path("other-profile.json");
    let recording = Monitor::builder("proxy").planned_steps(1).record_profile_in_memory().to_sink(Sink::disabled()).for_plan(&plan).unwrap();
    let mut profile = recording.recorded_profile().unwrap();
    profile.params.insert("decoder.w".into(), gainguard::reference::ParamProfile { shape: vec![2, 2], width_multiplier: 1.0, lr: 1e-3, weight_decay: 0.1, points: vec![(0.0, 1.0)], decay_horizon: vec![] });
    profile.write_json(&other).unwrap();
    let err = Monitor::builder("r").reference(&other).to_sink(Sink::disabled()).for_plan(&plan).err().unwrap();
    assert!(err.to_string().contains("decoder.w"), "{err}");
    let _ = std::fs::remove_file(&other);
}

#[test]
fn bad_addresses_are_errors_naming_the_address_and_where_it_came_from() {
    let err = Monitor::connect("http://127.0.0.1:9", "r").err().unwrap();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains("http://127.0.0.1:9") && chain.contains("Monitor::connect") && chain.contains("unix:"), "{chain}");

    let token = temp_path("no-token");
    let options = SinkOptions { token_file: Some(token.clone()), ..Default::default() };
    let err = Monitor::builder("r").sink_options(options).connect("tcp:127.0.0.1:9").err().unwrap();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains(&token.display().to_string()), "{chain}");

    // A port another process holds: the embedded daemon's error names it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = Monitor::builder("r").listen(addr).embedded().err().unwrap();
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

#[test]
fn finish_says_goodbye_once_and_an_unfinished_monitor_says_interrupted_when_dropped() {
    let (_vs, plan) = model_and_plan();
    let (sink, rx) = capture();
    let mut mon = Monitor::builder("r").to_sink(sink).for_plan(&plan).unwrap();
    mon.finish().unwrap();
    mon.finish().unwrap();
    drop(mon);
    let goodbyes: Vec<String> = rx.try_iter().filter_map(|e| if let Event::Goodbye(g) = e.event { Some(g.reason) } else { None }).collect();
    assert_eq!(goodbyes, vec!["finished".to_string()]);

    let (sink, rx) = capture();
    drop(Monitor::builder("r").finish_timeout(Duration::from_secs(1)).to_sink(sink).for_plan(&plan).unwrap());
    let goodbyes: Vec<String> = rx.try_iter().filter_map(|e| if let Event::Goodbye(g) = e.event { Some(g.reason) } else { None }).collect();
    assert_eq!(goodbyes, vec!["interrupted".to_string()]);
}

#[test]
fn a_monitor_that_could_not_start_sends_nothing_when_dropped() {
    let (_vs, plan) = model_and_plan();
    let (sink, rx) = capture();
    let missing = temp_path("no-such-profile.json");
    assert!(Monitor::builder("r").reference(&missing).to_sink(sink).for_plan(&plan).is_err());
    // No Hello was sent, so no Goodbye either: the daemon never hears of the run.
    let events: Vec<Envelope> = rx.try_iter().collect();
    assert!(events.is_empty(), "{} events, first {:?}", events.len(), events.first().map(|e| &e.event));
}

#[test]
fn a_second_attach_is_refused() {
    let (_vs, plan) = model_and_plan();
    let mon = Monitor::builder("r").spectra(false).to_sink(Sink::disabled()).for_plan(&plan).unwrap();
    assert!(matches!(mon.for_plan(&plan), Err(MonitorError::AlreadyAttached)));
}

/// A Python optimizer holds its Monitor across calls from any thread: this file does not compile unless a
/// Monitor is `Send` (a check at compile time, not a test that cannot fail when it runs).
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Monitor>();
};

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    c.read_to_string(&mut body).unwrap();
    body
}

#[test]
fn from_env_sends_to_the_standalone_daemon_at_gainguard_addr_and_names_a_bad_value() {
    // The only test in this binary that reads or sets the environment.
    std::env::set_var(gainguard::monitor::ADDR_ENV, "gainguardd.sock");
    let err = Monitor::from_env("r").err().unwrap();
    assert!(err.to_string().contains("`gainguardd.sock`") && err.to_string().contains("$GAINGUARD_ADDR"), "{err}");
    std::env::remove_var(gainguard::monitor::ADDR_ENV);
    std::env::set_var(gainguard::monitor::LISTEN_ENV, "localhost");
    let err = Monitor::from_env("r").err().unwrap();
    assert!(matches!(err, MonitorError::Listen { .. }) && err.to_string().contains("`localhost`"), "{err}");
    std::env::remove_var(gainguard::monitor::LISTEN_ENV);

    // A standalone daemon (in this process, but reached only through its Unix ingest socket).
    let dir = temp_path("ingest");
    let socket = gainguard::protocol::IngestAddr::Unix(dir.join("gainguardd.sock"));
    let daemon = gainguard::daemon::Daemon::spawn(gainguard::daemon::DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ingest: vec![socket.clone()],
        sources: gainguard::daemon::SourceSettings { nvml: gainguard::daemon::NvmlSettings::off() },
        ..Default::default()
    })
    .unwrap();
    std::env::set_var(gainguard::monitor::ADDR_ENV, socket.to_string());
    let mon = Monitor::builder("connected").planned_steps(3).sampler(every_step()).from_env();
    std::env::remove_var(gainguard::monitor::ADDR_ENV);
    let mon = mon.unwrap();
    assert!(mon.metrics_addr().is_none(), "no embedded daemon when GAINGUARD_ADDR is set");
    let (vs, plan) = model_and_plan();
    let mut mon = mon.for_plan(&plan).unwrap();
    drive(&mut mon, &vs, 3);
    mon.finish().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let body = http_get(daemon.metrics_addr(), "/metrics");
        if body.contains("gainguard_sigma_max{") || std::time::Instant::now() > deadline {
            break body;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(body.lines().any(|l| l.starts_with("gainguard_loss{") && l.contains(r#"run="connected""#) && l.rsplit(' ').next() == Some("1.0")), "the last loss, 3/3:\n{body}");
    assert!(body.lines().any(|l| l.starts_with("gainguard_sigma_max{") && l.contains(r#"run="connected""#)), "{body}");
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_full_sink_drops_and_counts_steps_instead_of_waiting() {
    let (_vs, plan) = model_and_plan();
    // Room for Hello, Params and one Step; nobody reads until the end.
    let (tx, rx) = crossbeam_channel::bounded(3);
    let mut mon = Monitor::builder("full").spectra(false).to_sink(Sink::from_sender(tx)).for_plan(&plan).unwrap();
    for step in 1..=5 {
        mon.step(&StepReport { step, lr_multiplier: 1.0, wd_multiplier: 1.0, ..Default::default() }, 1.0, 1);
    }
    assert_eq!(mon.sink().dropped_total(), 4, "steps 2 to 5 dropped");
    let events: Vec<Envelope> = rx.try_iter().collect();
    assert_eq!(events.len(), 3);
    assert!(matches!(events[2].event, Event::Step(_)) && events[2].step == 1);
    // The next Step that gets through carries the count.
    mon.step(&StepReport { step: 6, lr_multiplier: 1.0, wd_multiplier: 1.0, ..Default::default() }, 1.0, 1);
    let Event::Step(s) = &rx.try_recv().unwrap().event else { panic!("a Step") };
    assert_eq!(s.events_dropped_total, 4);
}

#[test]
fn flush_waits_for_the_rounds_a_stalled_sampler_holds_and_the_run_goes_on() {
    let (vs, plan) = model_and_plan();
    let (sink, rx) = capture();
    let mut mon = Monitor::builder("flush").planned_steps(6).sampler(every_step()).to_sink(sink).for_plan(&plan).unwrap();
    let handle = mon.sampler().expect("spectra are on").clone();
    let per_round = handle_rounds(&plan);
    assert!(handle.pause(Duration::from_secs(10)), "the worker parks");
    drive(&mut mon, &vs, 3);
    assert_eq!(handle.emitted_total(), 0, "a parked worker emits nothing");
    assert!(!mon.flush(Duration::from_millis(200)), "a parked worker cannot drain: flush says so when its time is up");
    handle.resume();
    assert!(mon.flush(Duration::from_secs(60)), "the resumed worker drains the three queued rounds");
    assert_eq!(handle.emitted_total(), 3 * per_round, "every queued round processed, at flush's return");
    let events: Vec<Envelope> = rx.try_iter().collect();
    let mut steps: Vec<u64> = spectra(&events).iter().map(|(s, _)| *s).collect();
    steps.dedup();
    assert_eq!(steps, vec![1, 2, 3]);
    assert!(!events.iter().any(|e| matches!(e.event, Event::Goodbye(_))), "flush does not end the run");
    // The run goes on: the worker still samples, and finish still drains.
    let vars = vs.variables();
    let params: Vec<ParamRef> = vars.iter().map(|(n, t)| ParamRef { name: n, tensor: t, decay_horizon: Some(2.0) }).collect();
    mon.before_step(4, &params);
    mon.after_step(&StepReport { step: 4, lr_multiplier: 1.0, wd_multiplier: 1.0, ..Default::default() }, &params);
    mon.finish().unwrap();
    assert_eq!(handle.dropped_total(), 0);
    assert_eq!(handle.emitted_total(), 4 * per_round);
}

/// Matrix-like parameters of the plan: one sample each per round under [`every_step`].
fn handle_rounds(plan: &ScalingPlan) -> u64 {
    plan.decisions.iter().filter(|d| d.class == ParamClass::MatrixLike && d.tied_to.is_none()).count() as u64
}
