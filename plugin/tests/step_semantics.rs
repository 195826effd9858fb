//! What a step does besides the update formula (which tests/torch_adamw_reference.rs checks against torch):
//! - non-finite gradients: by default the step is skipped with nothing changed and counted, and training goes
//!   on; the error setting names the parameter; the step setting steps as torch does; the gradient norm every
//!   step reports; the sampler's immediate check of the weights after such a step;
//! - the per-parameter state (step counts, decay horizons) through save, load and regroup, and checkpoints of
//!   the first format (one global step count).

use std::time::Duration;

use gainguard::daemon::events::{Envelope, Event};
use gainguard::daemon::Sink;
use gainguard::{AdamWConfig, BaseShapes, Monitor, NonFiniteGrad, OptimError, Rule, SamplerConfig, Schedule, WidthScaledAdamW};
use tch::{Device, Kind, Tensor};

const NAN_PARAM: &str = "blocks.0.mlp.down.weight";

/// A tiny model at width 32 (base 8): two hidden matrices, a norm gain and an embedding.
fn shapes() -> Vec<(&'static str, Vec<i64>)> {
    vec![
        ("tok_emb.weight", vec![10, 32]),
        ("blocks.0.mlp.up.weight", vec![64, 32]),
        ("blocks.0.mlp.down.weight", vec![32, 64]),
        ("norm.weight", vec![32]),
    ]
}

fn base() -> BaseShapes {
    BaseShapes::from_json_str(
        r#"{"tok_emb.weight": [10, 8], "blocks.0.mlp.up.weight": [16, 8], "blocks.0.mlp.down.weight": [8, 16], "norm.weight": [8]}"#,
        "test",
    )
    .unwrap()
}

/// Deterministic values (not libtorch's RNG, which the tests of this binary share).
fn values(shape: &[i64], seed: u64, scale: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n as u64).map(|i| (((i * 2654435761 + seed * 40503) % 1000) as f64 / 500.0 - 1.0) as f32 * scale as f32).collect();
    Tensor::from_slice(&v).reshape(shape)
}

struct Run {
    params: Vec<(String, Tensor)>,
    opt: WidthScaledAdamW,
}

impl Run {
    fn new(cfg: AdamWConfig) -> Run {
        let params: Vec<(String, Tensor)> =
            shapes().into_iter().enumerate().map(|(i, (n, s))| (n.to_string(), values(&s, i as u64, 0.1).set_requires_grad(true))).collect();
        let opt = WidthScaledAdamW::from_named(params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(), &base(), cfg).unwrap();
        Run { params, opt }
    }

    /// Sets the gradients of step `t` (a NaN at one element of `NAN_PARAM` when `nan`).
    fn gradients(&mut self, t: u64, nan: bool) {
        self.opt.zero_grad();
        for (i, (name, p)) in self.params.iter().enumerate() {
            let g = values(&p.size(), 100 + 7 * t + i as u64, 1e-2);
            if nan && name == NAN_PARAM {
                let _ = g.get(3).get(5).fill_(f64::NAN);
            }
            (p * g).sum(Kind::Float).backward();
        }
    }

    /// Every parameter, moment, per-parameter step count and decay horizon.
    fn state(&self) -> Vec<(Tensor, Tensor, Tensor, u64, f64)> {
        self.opt.slots().iter().map(|s| (s.tensor.copy(), s.first_moment.copy(), s.second_moment.copy(), s.step, s.decay_horizon)).collect()
    }
}

fn assert_same_state(a: &[(Tensor, Tensor, Tensor, u64, f64)], b: &[(Tensor, Tensor, Tensor, u64, f64)], what: &str) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(x.0.equal(&y.0) && x.1.equal(&y.1) && x.2.equal(&y.2) && x.3 == y.3 && x.4 == y.4, "{what}: slot {i} differs");
    }
}

#[test]
fn a_nan_gradient_skips_the_step_with_nothing_changed_counts_it_and_training_goes_on() {
    const K: u64 = 5;
    const N: u64 = 12;
    for fused in [true, false] {
        let cfg = AdamWConfig { lr: 1e-2, weight_decay: 0.1, max_grad_norm: Some(1.0), fused, ..Default::default() };
        // The run with a NaN at step K, and one that never saw step K's batch: the same from there on.
        let mut run = Run::new(cfg.clone());
        let mut clean = Run::new(cfg);
        for t in 0..N {
            run.gradients(t, t == K);
            let before = run.state();
            let report = run.opt.step();
            if t == K {
                assert!(report.skipped, "fused={fused}: {report:?}");
                assert_eq!(report.nonfinite_grad.as_deref(), Some(NAN_PARAM));
                assert!(report.grad_norm.is_some_and(f64::is_nan), "the norm is reported: {:?}", report.grad_norm);
                assert!(!report.clipped);
                assert_same_state(&run.state(), &before, &format!("fused={fused}: the skipped step"));
            } else {
                assert!(!report.skipped && report.nonfinite_grad.is_none() && report.grad_norm.is_some_and(f64::is_finite));
                clean.gradients(t, false);
                clean.opt.step();
            }
            assert_eq!(report.skipped_steps_total, u64::from(t >= K), "the counter");
            assert_eq!(report.step, t + 1, "the schedule's clock counts every call");
        }
        assert_eq!(run.opt.skipped_steps(), 1);
        // Training went on: every step after K was applied, as in the run that never saw step K.
        assert_same_state(&run.state(), &clean.state(), &format!("fused={fused}: after the skip"));
        assert_eq!(run.opt.param_step_count(NAN_PARAM), Some(N - 1));
        for (name, p) in &run.params {
            assert!(bool::try_from(p.isfinite().all()).unwrap(), "fused={fused}: `{name}` is not finite");
        }
    }
}

#[test]
fn with_the_error_setting_try_step_names_the_parameter_and_changes_nothing() {
    let mut run = Run::new(AdamWConfig { nonfinite_grad: NonFiniteGrad::Error, ..Default::default() });
    run.gradients(0, false);
    run.opt.try_step().unwrap();
    run.gradients(1, true);
    let before = run.state();
    let e = run.opt.try_step().unwrap_err();
    assert!(matches!(&e, OptimError::NonFiniteGradient { param, step: 2, .. } if param == NAN_PARAM), "{e:?}");
    let message = e.to_string();
    assert!(message.contains(NAN_PARAM) && message.contains("NaN") && message.contains("nothing was changed"), "{message}");
    assert_same_state(&run.state(), &before, "the refused step");
    assert_eq!((run.opt.step_count(), run.opt.skipped_steps()), (1, 0), "not even the step count moved");
    // step() cannot return the error: it skips (and logs it), and the next good batch trains.
    let report = run.opt.step();
    assert!(report.skipped && report.nonfinite_grad.as_deref() == Some(NAN_PARAM));
    run.gradients(2, false);
    let report = run.opt.try_step().unwrap();
    assert!(!report.skipped && report.step == 3 && report.skipped_steps_total == 1);
}

#[test]
fn with_the_step_setting_the_nan_reaches_the_weights_as_in_torch_and_is_reported_when_clipping() {
    // Without clipping there is no check at all (torch's behaviour and cost): nothing is reported.
    let mut run = Run::new(AdamWConfig { nonfinite_grad: NonFiniteGrad::Step, ..Default::default() });
    run.gradients(0, true);
    let report = run.opt.step();
    assert!(!report.skipped && report.nonfinite_grad.is_none() && report.grad_norm.is_none() && report.skipped_steps_total == 0);
    let w = &run.params.iter().find(|(n, _)| n == NAN_PARAM).unwrap().1;
    assert!(w.get(3).get(5).double_value(&[]).is_nan());
    // Clipping computes the norm, and with it says which gradient was not finite.
    let mut run = Run::new(AdamWConfig { nonfinite_grad: NonFiniteGrad::Step, max_grad_norm: Some(1.0), ..Default::default() });
    run.gradients(0, true);
    let report = run.opt.step();
    assert!(!report.skipped && report.nonfinite_grad.as_deref() == Some(NAN_PARAM) && report.grad_norm.is_some_and(f64::is_nan));
}

#[test]
fn the_gradient_norm_counts_only_defined_gradients_and_stays_in_float64_for_float64_parameters() {
    // f64 gradients 1 + i·1e-12: in f32 every one would round to 1 and the norm lose them.
    let named: Vec<(String, Tensor)> = vec![
        ("a.weight".into(), Tensor::zeros([64, 32], (Kind::Double, Device::Cpu)).set_requires_grad(true)),
        ("b.weight".into(), Tensor::zeros([64, 32], (Kind::Double, Device::Cpu)).set_requires_grad(true)),
    ];
    let base = BaseShapes::from_json_str(r#"{"a.weight": [16, 8], "b.weight": [16, 8]}"#, "test").unwrap();
    for fused in [true, false] {
        let mut opt = WidthScaledAdamW::from_named(
            named.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
            &base,
            AdamWConfig { max_grad_norm: Some(1e6), fused, ..Default::default() },
        )
        .unwrap();
        opt.zero_grad();
        let g: Vec<f64> = (0..64 * 32).map(|i| 1.0 + i as f64 * 1e-12).collect();
        (&named[0].1 * Tensor::from_slice(&g).reshape([64, 32])).sum(Kind::Double).backward();
        // b gets no gradient: it must not count (nor be stepped).
        let report = opt.step();
        let expected = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        let got = report.grad_norm.unwrap();
        assert!((got - expected).abs() <= 1e-15 * expected, "fused={fused}: {got} vs {expected}");
        assert!((got - expected).abs() < ((64.0f64 * 32.0).sqrt() - expected).abs(), "better than the norm of f32-rounded values");
        assert_eq!(report.skipped_without_grad, 1);
        assert!(!report.clipped);
    }
}

#[test]
fn after_a_nan_gradient_the_sampler_reports_nonfinite_weights_in_that_same_step() {
    let mut run = Run::new(AdamWConfig::default());
    let (tx, rx) = crossbeam_channel::bounded::<Envelope>(1000);
    // A sampling interval far away: only the check after the non-finite gradient can find the NaN.
    let config = SamplerConfig { interval: 1_000_000, budget_fraction: None, ..Default::default() };
    let _mon = Monitor::builder("nan").sampler(config).to_sink(Sink::from_sender(tx)).attach(&mut run.opt).unwrap();
    let handle = _mon.sampler().unwrap().clone();
    run.gradients(0, false);
    run.opt.step();
    assert_eq!(handle.nonfinite_parameters(), None, "no check has run yet");

    // A NaN in a weight makes its gradient (d/dW of Σ W²) NaN.
    let w = run.params.iter().find(|(n, _)| n == NAN_PARAM).unwrap().1.shallow_clone();
    tch::no_grad(|| {
        let _ = w.get(1).get(2).fill_(f64::NAN);
    });
    run.opt.zero_grad();
    run.params.iter().map(|(_, p)| p.square().sum(Kind::Float)).fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b).backward();
    let report = run.opt.step();
    assert!(report.skipped && report.nonfinite_grad.as_deref() == Some(NAN_PARAM));
    assert_eq!(handle.nonfinite_parameters(), Some(1), "counted in the same step, for telemetry's step event");
    let samples: Vec<_> = rx
        .try_iter()
        .filter_map(|e| match e.event {
            Event::Spectrum(s) => Some((e.step, s)),
            _ => None,
        })
        .collect();
    assert_eq!(samples.len(), 1, "{samples:?}");
    assert_eq!(samples[0].0, 2);
    assert!(samples[0].1.param == NAN_PARAM && samples[0].1.nonfinite && samples[0].1.sigma_max.is_none());

    // Repaired weights: the next step with finite gradients checks again.
    tch::no_grad(|| {
        let _ = w.get(1).get(2).fill_(0.0);
    });
    run.gradients(2, false);
    assert!(!run.opt.step().skipped);
    assert_eq!(handle.nonfinite_parameters(), Some(0));
    assert!(handle.finish(Duration::from_secs(10)));
}

// The per-parameter state, on a model of its own: two hidden matrices and a norm gain, with a schedule.

fn state_params() -> Vec<(String, Tensor)> {
    [("w.weight", vec![32, 16]), ("v.weight", vec![16, 32]), ("g.weight", vec![32])]
        .into_iter()
        .map(|(n, s)| (n.to_string(), Tensor::ones(s.as_slice(), (Kind::Float, Device::Cpu)).set_requires_grad(true)))
        .collect()
}

fn state_base() -> BaseShapes {
    BaseShapes::from_json_str(r#"{"w.weight": [8, 4], "v.weight": [4, 8], "g.weight": [8]}"#, "test").unwrap()
}

fn state_config() -> AdamWConfig {
    AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        schedule: Schedule::WarmupCosine { warmup: 3, total: 20, floor: 0.1 },
        schedule_weight_decay: true,
        ..Default::default()
    }
}

fn state_optimizer(named: &[(String, Tensor)]) -> WidthScaledAdamW {
    WidthScaledAdamW::from_named(named.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(), &state_base(), state_config()).unwrap()
}

/// Steps with a gradient for every parameter except `v.weight` at odd steps.
fn state_train(named: &[(String, Tensor)], opt: &mut WidthScaledAdamW, steps: std::ops::Range<u64>) {
    for t in steps {
        opt.zero_grad();
        for (name, p) in named {
            if name != "v.weight" || t % 2 == 0 {
                (p * (t as f64 + 1.0) * 1e-2).sum(Kind::Float).backward();
            }
        }
        opt.step();
    }
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gainguard-state-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn per_parameter_step_counts_and_decay_horizons_survive_save_load_and_regroup() {
    let params = state_params();
    let mut opt = state_optimizer(&params);
    state_train(&params, &mut opt, 0..9);
    assert_eq!((opt.param_step_count("w.weight"), opt.param_step_count("v.weight")), (Some(9), Some(5)));
    // H of a stepped parameter: its group's lr·wd times the schedule squared (both scheduled), summed.
    let group = |name: &str| &opt.groups()[opt.slots().iter().find(|s| s.name == name).unwrap().group];
    let m = |t: u64| state_config().schedule.multiplier(t);
    let h_w: f64 = (0..9).map(|t| group("w.weight").lr * group("w.weight").weight_decay * m(t) * m(t)).sum();
    let h_v: f64 = (0..9).filter(|t| t % 2 == 0).map(|t| group("v.weight").lr * group("v.weight").weight_decay * m(t) * m(t)).sum();
    assert!((opt.decay_horizon("w.weight").unwrap() - h_w).abs() <= 1e-15 * h_w);
    assert!((opt.decay_horizon("v.weight").unwrap() - h_v).abs() <= 1e-15 * h_v);
    assert_eq!(opt.decay_horizon("g.weight"), Some(0.0), "vector-like under the paper rule: no decay");

    let dir = scratch("roundtrip");
    opt.save(&dir.join("opt.gg")).unwrap();
    let fresh_params = state_params();
    let mut fresh = state_optimizer(&fresh_params);
    fresh.load(&dir.join("opt.gg")).unwrap();
    for (a, b) in opt.slots().iter().zip(fresh.slots()) {
        assert_eq!((a.step, a.decay_horizon.to_bits()), (b.step, b.decay_horizon.to_bits()), "`{}`", a.name);
    }
    assert_eq!(fresh.step_count(), 9);

    fresh.regroup(Rule::parse("mup-coupled").unwrap(), Vec::new(), &state_base()).unwrap();
    for (a, b) in opt.slots().iter().zip(fresh.slots()) {
        assert_eq!((a.step, a.decay_horizon.to_bits()), (b.step, b.decay_horizon.to_bits()), "regroup kept `{}`", a.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_first_format_checkpoint_loads_with_every_parameter_at_the_global_step() {
    let params = state_params();
    let mut opt = state_optimizer(&params);
    // Format 1: metadata with one global step, and the moments.
    let meta = serde_json::json!({"format": "gainguard-adamw", "version": 1, "step": 7, "plan": opt.plan()}).to_string();
    let mut entries: Vec<(String, Tensor)> = vec![("__meta__".into(), Tensor::from_slice(meta.as_bytes()))];
    for s in opt.slots() {
        entries.push((format!("first_moment.{}", s.name), s.first_moment.ones_like() * 0.5));
        entries.push((format!("second_moment.{}", s.name), s.second_moment.ones_like() * 0.25));
    }
    let dir = scratch("v1");
    Tensor::save_multi(&entries, dir.join("v1.gg")).unwrap();
    opt.load(&dir.join("v1.gg")).unwrap();
    assert_eq!(opt.step_count(), 7);
    let m = |t: u64| state_config().schedule.multiplier(t);
    for s in opt.slots() {
        assert_eq!(s.step, 7, "`{}`: format 1 stepped every parameter at every step", s.name);
        let g = &opt.groups()[s.group];
        let h: f64 = (0..7).map(|t| g.lr * g.weight_decay * m(t) * m(t)).sum();
        assert!((s.decay_horizon - h).abs() <= 1e-15 * h.max(1e-300), "`{}`: {} vs {h}", s.name, s.decay_horizon);
        assert!(s.first_moment.equal(&(s.first_moment.ones_like() * 0.5)));
    }
    // A checkpoint of a later format is refused with its version named.
    let meta = serde_json::json!({"format": "gainguard-adamw", "version": 3, "step": 7, "plan": opt.plan()}).to_string();
    entries[0] = ("__meta__".into(), Tensor::from_slice(meta.as_bytes()));
    Tensor::save_multi(&entries, dir.join("v3.gg")).unwrap();
    let e = opt.load(&dir.join("v3.gg")).unwrap_err().to_string();
    assert!(e.contains("v3.gg") && e.contains("version 3"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
