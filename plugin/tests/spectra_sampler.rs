//! The spectra sampler inside a real optimizer: never blocks, counts drops exactly, and emits events
//! whose values agree with an independent float64 SVD of the weights.

use gainguard_examples::model;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gainguard::protocol::events::{Envelope, Event, SpectrumSample};
use gainguard::protocol::Sink;
use gainguard::data::MarkovCorpus;
use gainguard::reference::GainReference;
use gainguard::{AdamWConfig, BaseShapes, Monitor, ParamClass, RunIdentity, SamplerConfig, SamplerHandle, WidthScaledAdamW};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const BASE_D: i64 = 16;

fn build(d: i64) -> (VarStore, model::Llama) {
    let vs = VarStore::new(Device::Cpu);
    let m = model::llama(vs.root(), &model::Config::new(48, d, BASE_D, 2, 16));
    (vs, m)
}

fn optimizer(vs: &VarStore) -> WidthScaledAdamW {
    let (base, _) = build(BASE_D);
    let cfg = AdamWConfig { lr: 3e-3, weight_decay: 0.1, ..Default::default() };
    WidthScaledAdamW::new(vs, &BaseShapes::from_var_store(&base), cfg).unwrap()
}

fn batch(corpus: &MarkovCorpus, step: u64) -> Tensor {
    Tensor::from_slice(&corpus.batch(step, 4, 16)).view([4, 16])
}

/// The sampler as a trainer gets it: a monitor attached to the optimizer, reporting into `sink`, and the
/// monitor's handle on its sampler.
fn monitor(opt: &mut WidthScaledAdamW, config: SamplerConfig, sink: Sink) -> (Monitor, SamplerHandle) {
    let mon = Monitor::builder("sampler-test").sampler(config).to_sink(sink).attach(opt).unwrap();
    let handle = mon.sampler().expect("spectra are on").clone();
    (mon, handle)
}

fn capture() -> (Sink, crossbeam_channel::Receiver<Envelope>) {
    let (tx, rx) = crossbeam_channel::bounded(100_000);
    (Sink::from_sender(tx), rx)
}

fn spectra(rx: &crossbeam_channel::Receiver<Envelope>) -> Vec<(Envelope, SpectrumSample)> {
    rx.try_iter()
        .filter_map(|e| match &e.event {
            Event::Spectrum(s) => Some((e.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

fn sigma_max_f64(t: &Tensor) -> f64 {
    let (_, s, _) = t.to_kind(Kind::Double).svd(true, false);
    s.double_value(&[0])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times `steps` training steps, one by one.
fn train(opt: &mut WidthScaledAdamW, m: &model::Llama, corpus: &MarkovCorpus, steps: u64) -> Vec<f64> {
    (0..steps)
        .map(|i| {
            opt.zero_grad();
            m.loss(&batch(corpus, i)).backward();
            let t = Instant::now();
            opt.step();
            t.elapsed().as_secs_f64()
        })
        .collect()
}

#[test]
fn a_stalled_worker_never_blocks_the_step_and_every_drop_is_counted_exactly() {
    let corpus = MarkovCorpus::new(48, 4, 1);
    let (vs_off, m_off) = build(64);
    let mut off = optimizer(&vs_off);
    let (vs, m) = build(64);
    let mut on = optimizer(&vs);
    let (sink, rx) = capture();
    let (per_round, capacity, steps) = (4u64, 3u64, 40u64);
    let config = SamplerConfig {
        interval: 1,
        budget_fraction: None,
        max_params_per_sample: per_round as usize,
        queue_capacity: capacity as usize,
        ..Default::default()
    };
    let (_mon, handle) = monitor(&mut on, config, sink);
    assert!(handle.pause(Duration::from_secs(10)), "the worker parks");

    // Interleave sampling-on and sampling-off steps so that machine noise hits both alike.
    let (mut t_on, mut t_off) = (Vec::new(), Vec::new());
    for _ in 0..steps / 10 {
        t_off.extend(train(&mut off, &m_off, &corpus, 10));
        t_on.extend(train(&mut on, &m, &corpus, 10));
    }
    let (med_on, med_off) = (median(t_on.clone()), median(t_off));
    eprintln!("median step: {:.3} ms with a stalled sampler, {:.3} ms without", med_on * 1e3, med_off * 1e3);
    assert!(med_on <= 3.0 * med_off + 2e-3, "stalled sampler slowed the step: {med_on} vs {med_off}");
    let worst = t_on.iter().cloned().fold(0.0, f64::max);
    assert!(worst < 2.0, "a step waited on the worker ({worst} s)");

    // Every step was a sampling attempt; `capacity` rounds fit in the queue, the rest were dropped.
    assert_eq!(handle.dropped_total(), (steps - capacity) * per_round);
    assert_eq!(handle.dropped_counter().load(Ordering::Relaxed), (steps - capacity) * per_round);
    assert_eq!(spectra(&rx).len(), 0, "nothing emitted while paused");

    handle.resume();
    assert!(handle.finish(Duration::from_secs(60)), "the worker drains and stops");
    let events = spectra(&rx);
    assert_eq!(events.len() as u64, capacity * per_round);
    assert_eq!(handle.emitted_total(), capacity * per_round);
    let mut steps_seen: Vec<u64> = events.iter().map(|(e, _)| e.step).collect();
    steps_seen.dedup();
    assert_eq!(steps_seen, vec![1, 2, 3], "the queued rounds are the first three steps");
    assert_eq!(handle.dropped_total(), (steps - capacity) * per_round, "draining drops nothing more");
}

struct Fixed(f64);
impl GainReference for Fixed {
    fn reference_sigma_max(&self, _: &SpectrumSample) -> Option<f64> {
        Some(self.0)
    }
}

#[test]
fn events_carry_identity_sigma_max_normalization_update_ratio_and_full_spectrum_fields() {
    let corpus = MarkovCorpus::new(48, 4, 1);
    let (vs, m) = build(64);
    let mut opt = optimizer(&vs);
    let (sink, rx) = capture();
    let config = SamplerConfig {
        interval: 2,
        budget_fraction: None,
        max_params_per_sample: 100,
        full_spectrum_every: 2,
        queue_capacity: 8,
        ..Default::default()
    };
    let _mon = Monitor::builder("unused")
        .identity(RunIdentity { run: "target-w64".into(), rank: 3, host: "node-a".into() })
        .planned_steps(20)
        .sampler(config)
        .reference_from(Arc::new(Fixed(0.5)))
        .to_sink(sink)
        .attach(&mut opt)
        .unwrap();
    let handle = _mon.sampler().unwrap().clone();
    let heard = Arc::new(AtomicU64::new(0));
    let h2 = Arc::clone(&heard);
    handle.add_listener(Box::new(move |_, step| {
        assert_eq!(step % 2, 0);
        h2.fetch_add(1, Ordering::Relaxed);
    }));
    let names = handle.sampled_params();
    assert_eq!(names.len(), 14, "7 hidden matrices per block, 2 blocks: {names:?}");

    train(&mut opt, &m, &corpus, 7);
    let before: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
    train(&mut opt, &m, &corpus, 1); // step 8, the last sampled one
    assert!(handle.finish(Duration::from_secs(60)));
    assert_eq!(handle.dropped_total(), 0);
    assert_eq!(handle.nonfinite_parameters(), Some(0));

    let events = spectra(&rx);
    assert_eq!(events.len(), 4 * 14, "steps 2, 4, 6, 8 × 14 matrices");
    assert_eq!(heard.load(Ordering::Relaxed), 56);
    let vars = vs.variables();
    for (env, s) in &events {
        assert_eq!((&*env.run, env.rank, &*env.host), ("target-w64", 3, "node-a"));
        assert_eq!(s.class, ParamClass::MatrixLike);
        assert!(s.param.starts_with("blocks.") && s.layer == s.param.split('.').nth(1).unwrap().parse().ok());
        assert_eq!(s.progress, Some(env.step as f64 / 20.0));
        assert!(!s.nonfinite && s.iterations >= 1 && s.duration_seconds > 0.0);
        let sigma = s.sigma_max.unwrap();
        assert_eq!(s.top_k.len(), 4);
        assert_eq!(s.top_k[0], sigma);
        assert_eq!(s.reference_sigma_max, Some(0.5));
        assert!((s.gain_ratio.unwrap() - sigma / 0.5).abs() < 1e-12);
        // After k steps of a constant schedule under coupled decay: H = k·lr·wd, the plan's width-scaled values.
        let planned = opt.plan().get(&s.param).unwrap();
        let h = env.step as f64 * planned.lr * planned.weight_decay;
        assert!((s.decay_horizon.unwrap() - h).abs() <= 1e-12 * h, "{} at step {}: H {:?}, expected {h}", s.param, env.step, s.decay_horizon);
        // Full-spectrum fields on a parameter's 1st and 3rd samples (steps 2 and 6).
        let full = env.step == 2 || env.step == 6;
        assert_eq!(s.quantiles.is_some(), full, "step {}", env.step);
        assert_eq!(s.effective_rank.is_some(), full);
        assert!(s.frobenius_norm.is_some() && s.stable_rank.is_some() && s.update_ratio.is_some());
        if env.step == 8 {
            let w = &vars[&s.param];
            let truth = sigma_max_f64(w);
            assert!((sigma - truth).abs() / truth <= 1e-3, "{}: {sigma} vs {truth}", s.param);
            let d = opt.plan().get(&s.param).unwrap();
            // sigma / (sqrt(lr/wd) · m^0.75) with the plan's lr and wd (constant schedule).
            let expected = truth / ((d.lr / d.weight_decay).sqrt() * d.width_multiplier.powf(0.75));
            assert!((s.sigma_max_normalized.unwrap() - expected).abs() / expected <= 1e-3);
            let fro = w.to_kind(Kind::Double).square().sum(Kind::Double).sqrt().double_value(&[]);
            assert!((s.frobenius_norm.unwrap() - fro).abs() / fro <= 1e-9);
            let old = &before.iter().find(|(n, _)| n == &s.param).unwrap().1;
            let ratio = (w.to_kind(Kind::Double) - old.to_kind(Kind::Double)).square().sum(Kind::Double).sqrt().double_value(&[])
                / old.to_kind(Kind::Double).square().sum(Kind::Double).sqrt().double_value(&[]);
            assert!((s.update_ratio.unwrap() - ratio).abs() / ratio <= 1e-9, "{} vs {ratio}", s.update_ratio.unwrap());
        }
        if let Some(q) = &s.quantiles {
            assert!(q.p10 <= q.p50 && q.p50 <= q.p90 && q.p90 <= q.p99 && q.p99 <= sigma * (1.0 + 1e-3));
        }
    }
    // The JSON line the daemon would read has the fields by name.
    let line = serde_json::to_string(&events[0].0).unwrap();
    for field in ["\"type\":\"spectrum\"", "\"sigma_max\"", "\"top_k\"", "\"iterations\"", "\"sigma_max_normalized\"", "\"gain_ratio\"", "\"update_ratio\""] {
        assert!(line.contains(field), "{field} in {line}");
    }
}

/// An optimizer over hand-made tensors: two hidden matrices, a 3-D kernel and a readout.
fn hand_made() -> (Vec<(String, Tensor)>, WidthScaledAdamW) {
    let named: Vec<(String, Tensor)> = vec![
        ("a.weight".into(), Tensor::randn([64, 64], (Kind::Float, Device::Cpu)).set_requires_grad(true)),
        ("b.weight".into(), Tensor::randn([64, 64], (Kind::Float, Device::Cpu)).set_requires_grad(true)),
        ("conv.weight".into(), Tensor::randn([32, 16, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true)),
        ("head.weight".into(), Tensor::randn([100, 64], (Kind::Float, Device::Cpu)).set_requires_grad(true)),
    ];
    let base = BaseShapes::from_json_str(r#"{"a.weight": [16, 16], "b.weight": [16, 16], "conv.weight": [8, 4, 3], "head.weight": [100, 16]}"#, "test").unwrap();
    let opt = WidthScaledAdamW::from_named(named.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(), &base, AdamWConfig::default()).unwrap();
    (named, opt)
}

fn step_with_unit_grads(opt: &mut WidthScaledAdamW, named: &[(String, Tensor)]) {
    opt.zero_grad();
    let loss = named.iter().map(|(_, t)| t.sum(Kind::Float)).fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
    loss.backward();
    opt.step();
}

#[test]
fn nan_weights_give_a_nonfinite_sample_and_count_for_telemetry_without_a_panic() {
    let (named, mut opt) = hand_made();
    let (sink, rx) = capture();
    let config = SamplerConfig { interval: 1, budget_fraction: None, include_all_matrices: true, ..Default::default() };
    let (_mon, handle) = monitor(&mut opt, config, sink);
    assert_eq!(handle.sampled_params().to_vec(), vec!["a.weight", "b.weight", "conv.weight", "head.weight"]);
    tch::no_grad(|| {
        let _ = named[1].1.get(5).get(7).fill_(f64::NAN);
    });
    step_with_unit_grads(&mut opt, &named);
    assert!(handle.finish(Duration::from_secs(60)));
    let events = spectra(&rx);
    assert_eq!(events.len(), 4);
    let get = |n: &str| events.iter().find(|(_, s)| s.param == n).unwrap().1.clone();
    let b = get("b.weight");
    assert!(b.nonfinite && b.sigma_max.is_none() && b.top_k.is_empty());
    assert!(!get("a.weight").nonfinite);
    assert_eq!(handle.nonfinite_parameters(), Some(1));
    // The 3-D kernel [32, 16, 3] (width dims 0 and 1, kernel dim 2) is read as [32, 16·3].
    let conv = get("conv.weight");
    let truth = sigma_max_f64(&named[2].1.reshape([32, 48]));
    assert!((conv.sigma_max.unwrap() - truth).abs() / truth <= 1e-3, "{:?} vs {truth}", conv.sigma_max);
    // The readout is vector-like; sampled here only because all matrices were asked for.
    assert_eq!(get("head.weight").class, ParamClass::VectorLike);
}

#[test]
fn a_round_over_the_byte_budget_is_dropped_before_anything_is_copied() {
    let (named, mut opt) = hand_made();
    let (sink, rx) = capture();
    let config = SamplerConfig { interval: 1, budget_fraction: None, max_in_flight_bytes: 1000, ..Default::default() };
    let (_mon, handle) = monitor(&mut opt, config, sink);
    let per_round = handle.sampled_params().len() as u64;
    assert_eq!(per_round, 3, "matrix-like only by default");
    for _ in 0..5 {
        step_with_unit_grads(&mut opt, &named);
    }
    assert!(handle.finish(Duration::from_secs(60)));
    assert_eq!(handle.dropped_total(), 5 * per_round);
    assert!(spectra(&rx).is_empty());
}

#[test]
fn round_robin_covers_every_matrix_when_a_round_holds_fewer() {
    let (named, mut opt) = hand_made();
    let (sink, rx) = capture();
    let config = SamplerConfig { interval: 1, budget_fraction: None, max_params_per_sample: 2, queue_capacity: 16, ..Default::default() };
    let (_mon, handle) = monitor(&mut opt, config, sink);
    for _ in 0..3 {
        step_with_unit_grads(&mut opt, &named);
    }
    assert!(handle.finish(Duration::from_secs(60)));
    let seen: Vec<(u64, String)> = spectra(&rx).into_iter().map(|(e, s)| (e.step, s.param)).collect();
    let expect = [(1, "a.weight"), (1, "b.weight"), (2, "conv.weight"), (2, "a.weight"), (3, "b.weight"), (3, "conv.weight")];
    assert_eq!(seen, expect.map(|(s, n)| (s, n.to_string())).to_vec());
}

#[test]
fn the_budget_stretches_the_interval_when_the_worker_costs_more_than_its_share() {
    let (named, mut opt) = hand_made();
    let (sink, rx) = capture();
    let config = SamplerConfig { interval: 1, budget_fraction: Some(1e-4), ..Default::default() };
    let (_mon, handle) = monitor(&mut opt, config, sink);
    for _ in 0..30 {
        step_with_unit_grads(&mut opt, &named);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(handle.finish(Duration::from_secs(60)));
    let rounds = {
        let mut s: Vec<u64> = spectra(&rx).into_iter().map(|(e, _)| e.step).collect();
        s.dedup();
        s.len()
    };
    assert!(handle.current_interval() > 1, "interval {}", handle.current_interval());
    assert!(rounds < 30, "{rounds} rounds in 30 steps");
}

#[test]
fn finish_returns_within_its_timeout_even_when_the_worker_is_stuck() {
    let (named, mut opt) = hand_made();
    let (sink, _rx) = capture();
    let config = SamplerConfig { interval: 1, budget_fraction: None, shutdown_timeout: Duration::from_millis(100), ..Default::default() };
    let (mon, handle) = monitor(&mut opt, config, sink);
    handle.add_listener(Box::new(|_, _| std::thread::sleep(Duration::from_secs(3))));
    step_with_unit_grads(&mut opt, &named);
    std::thread::sleep(Duration::from_millis(100)); // the worker is now inside the slow listener
    let t = Instant::now();
    assert!(!handle.finish(Duration::from_millis(200)));
    drop(opt); // Drop of the sampler must not wait either
    drop(mon); // nor the monitor's
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn limiting_the_worker_threads_leaves_the_trainer_threads_and_the_default_alone() {
    let trainer_before = tch::get_num_threads();
    let in_worker = std::thread::spawn(|| {
        let before = tch::get_num_threads();
        assert!(gainguard::fused::limit_this_thread(1), "this build has the shim");
        // An op that runs ATen's parallel code after the limit must not undo it.
        let _ = Tensor::randn([256, 256], (Kind::Float, Device::Cpu)).matmul(&Tensor::randn([256, 256], (Kind::Float, Device::Cpu)));
        (before, tch::get_num_threads())
    })
    .join()
    .unwrap();
    let a_later_thread = std::thread::spawn(tch::get_num_threads).join().unwrap();
    assert_eq!(in_worker.1, 1, "the limited thread");
    assert_eq!(tch::get_num_threads(), trainer_before, "the calling (trainer) thread");
    assert_eq!(a_later_thread, in_worker.0, "a thread started later still gets the default");
}
