//! The optimizer's per-parameter state (step counts, decay horizons) through save, load and regroup, and
//! checkpoints of the first format (one global step count).

use gainguard::{AdamWConfig, BaseShapes, Rule, Schedule, WidthScaledAdamW};
use tch::{Device, Kind, Tensor};

fn named() -> Vec<(String, Tensor)> {
    [("w.weight", vec![32, 16]), ("v.weight", vec![16, 32]), ("g.weight", vec![32])]
        .into_iter()
        .map(|(n, s)| (n.to_string(), Tensor::ones(s.as_slice(), (Kind::Float, Device::Cpu)).set_requires_grad(true)))
        .collect()
}

fn base() -> BaseShapes {
    BaseShapes::from_json_str(r#"{"w.weight": [8, 4], "v.weight": [4, 8], "g.weight": [8]}"#, "test").unwrap()
}

fn config() -> AdamWConfig {
    AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        schedule: Schedule::WarmupCosine { warmup: 3, total: 20, floor: 0.1 },
        schedule_weight_decay: true,
        ..Default::default()
    }
}

fn optimizer(named: &[(String, Tensor)]) -> WidthScaledAdamW {
    WidthScaledAdamW::from_named(named.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(), &base(), config()).unwrap()
}

/// Steps with a gradient for every parameter except `v.weight` at odd steps.
fn train(named: &[(String, Tensor)], opt: &mut WidthScaledAdamW, steps: std::ops::Range<u64>) {
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
    let params = named();
    let mut opt = optimizer(&params);
    train(&params, &mut opt, 0..9);
    assert_eq!((opt.param_step_count("w.weight"), opt.param_step_count("v.weight")), (Some(9), Some(5)));
    // H of a stepped parameter: its group's lr·wd times the schedule squared (both scheduled), summed.
    let group = |name: &str| &opt.groups()[opt.slots().iter().find(|s| s.name == name).unwrap().group];
    let m = |t: u64| config().schedule.multiplier(t);
    let h_w: f64 = (0..9).map(|t| group("w.weight").lr * group("w.weight").weight_decay * m(t) * m(t)).sum();
    let h_v: f64 = (0..9).filter(|t| t % 2 == 0).map(|t| group("v.weight").lr * group("v.weight").weight_decay * m(t) * m(t)).sum();
    assert!((opt.decay_horizon("w.weight").unwrap() - h_w).abs() <= 1e-15 * h_w);
    assert!((opt.decay_horizon("v.weight").unwrap() - h_v).abs() <= 1e-15 * h_v);
    assert_eq!(opt.decay_horizon("g.weight"), Some(0.0), "vector-like under the paper rule: no decay");

    let dir = scratch("roundtrip");
    opt.save(&dir.join("opt.gg")).unwrap();
    let fresh_params = named();
    let mut fresh = optimizer(&fresh_params);
    fresh.load(&dir.join("opt.gg")).unwrap();
    for (a, b) in opt.slots().iter().zip(fresh.slots()) {
        assert_eq!((a.step, a.decay_horizon.to_bits()), (b.step, b.decay_horizon.to_bits()), "`{}`", a.name);
    }
    assert_eq!(fresh.step_count(), 9);

    fresh.regroup(Rule::parse("mup-coupled").unwrap(), Vec::new(), &base()).unwrap();
    for (a, b) in opt.slots().iter().zip(fresh.slots()) {
        assert_eq!((a.step, a.decay_horizon.to_bits()), (b.step, b.decay_horizon.to_bits()), "regroup kept `{}`", a.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_first_format_checkpoint_loads_with_every_parameter_at_the_global_step() {
    let params = named();
    let mut opt = optimizer(&params);
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
    let m = |t: u64| config().schedule.multiplier(t);
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
