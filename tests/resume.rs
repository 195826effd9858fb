//! A run interrupted at step 50, saved, and continued in a fresh process to step 100 must be identical,
//! bit for bit, to an uninterrupted 100-step run. One parameter gets its first gradient at step 21, so its own
//! step count (and bias corrections) at the checkpoint is 29, not 50.

use gainguard_examples::model;

use gainguard::data::MarkovCorpus;
use gainguard::{AdamWConfig, BaseShapes, Schedule, WidthScaledAdamW};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::nn::VarStore;
use tch::{Device, Tensor};

const PHASE_ENV: &str = "GAINGUARD_RESUME_PHASE";
const DIR_ENV: &str = "GAINGUARD_RESUME_DIR";
const LATE_PARAM: &str = "blocks.1.attn.q.weight";
const LATE_STEP: u64 = 21;

fn setup(fused: bool) -> (VarStore, model::Llama, WidthScaledAdamW, MarkovCorpus) {
    tch::manual_seed(42);
    let base_vs = VarStore::new(Device::Cpu);
    let _ = model::llama(base_vs.root(), &model::Config::new(40, 16, 16, 2, 12));
    let base = BaseShapes::from_var_store(&base_vs);
    tch::manual_seed(7);
    let vs = VarStore::new(Device::Cpu);
    let m = model::llama(vs.root(), &model::Config::new(40, 48, 16, 2, 12));
    let cfg = AdamWConfig {
        lr: 3e-3,
        weight_decay: 0.1,
        max_grad_norm: Some(1.0),
        schedule: Schedule::WarmupCosine { warmup: 10, total: 100, floor: 0.1 },
        fused,
        ..Default::default()
    };
    let opt = WidthScaledAdamW::new(&vs, &base, cfg).unwrap();
    (vs, m, opt, MarkovCorpus::new(40, 3, 5))
}

fn train(m: &model::Llama, opt: &mut WidthScaledAdamW, corpus: &MarkovCorpus, steps: std::ops::Range<u64>) {
    // No gradient for `LATE_PARAM` before step `LATE_STEP` (frozen, as an unrouted expert would be).
    let late = opt.slots().iter().find(|s| s.name == LATE_PARAM).unwrap().tensor.shallow_clone();
    for s in steps {
        let _ = late.set_requires_grad(s >= LATE_STEP);
        let x = Tensor::from_slice(&corpus.batch(s, 4, 12)).view([4, 12]);
        opt.zero_grad();
        m.loss(&x).backward();
        opt.step();
    }
}

/// Runs in the child processes: phase `first` trains 0..50 and saves; phase `second` loads and trains
/// 50..100; phase `whole` trains 0..100. Each writes its final weights.
fn child(phase: &str, dir: &Path, fused: bool) {
    tch::set_num_threads(1);
    let (mut vs, m, mut opt, corpus) = setup(fused);
    match phase {
        "first" => {
            train(&m, &mut opt, &corpus, 0..50);
            vs.save(dir.join("model50.safetensors")).unwrap();
            opt.save(&dir.join("opt50.gg")).unwrap();
        }
        "second" => {
            vs.load(dir.join("model50.safetensors")).unwrap();
            opt.load(&dir.join("opt50.gg")).unwrap();
            assert_eq!(opt.step_count(), 50);
            assert_eq!(opt.param_step_count(LATE_PARAM), Some(50 - LATE_STEP), "its own count survives the checkpoint");
            train(&m, &mut opt, &corpus, 50..100);
            vs.save(dir.join("resumed.safetensors")).unwrap();
        }
        "whole" => {
            train(&m, &mut opt, &corpus, 0..100);
            vs.save(dir.join("whole.safetensors")).unwrap();
        }
        other => panic!("unknown phase {other}"),
    }
}

fn run_phase(test: &str, phase: &str, dir: &Path) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(PHASE_ENV, phase)
        .env(DIR_ENV, dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "phase {phase} failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

fn resume_is_bit_exact(test: &str, fused: bool) {
    if let Ok(phase) = std::env::var(PHASE_ENV) {
        return child(&phase, &PathBuf::from(std::env::var(DIR_ENV).unwrap()), fused);
    }
    let dir = std::env::temp_dir().join(format!("gainguard-resume-{}-{fused}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for phase in ["first", "second", "whole"] {
        run_phase(test, phase, &dir);
    }
    let resumed: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("resumed.safetensors")).unwrap().into_iter().collect();
    let whole = Tensor::read_safetensors(dir.join("whole.safetensors")).unwrap();
    assert!(!whole.is_empty());
    for (name, w) in whole {
        let r = &resumed[&name];
        let diff = (r - &w).abs().max().double_value(&[]);
        assert_eq!(diff, 0.0, "`{name}` differs by {diff:e} after resume");
    }
    // The comparison must be able to fail: the 50-step checkpoint is far from the final weights.
    let mid: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("model50.safetensors")).unwrap().into_iter().collect();
    let moved = (&mid["blocks.0.mlp.up.weight"] - &resumed["blocks.0.mlp.up.weight"]).abs().max().double_value(&[]);
    assert!(moved > 1e-4, "steps 50..100 barely moved the weights ({moved:e})");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resume_from_a_checkpoint_in_a_fresh_process_is_bit_exact_reference_path() {
    resume_is_bit_exact("resume_from_a_checkpoint_in_a_fresh_process_is_bit_exact_reference_path", false);
}

#[test]
fn resume_from_a_checkpoint_in_a_fresh_process_is_bit_exact_fused_path() {
    resume_is_bit_exact("resume_from_a_checkpoint_in_a_fresh_process_is_bit_exact_fused_path", true);
}

#[test]
fn loading_a_checkpoint_with_a_different_rule_table_names_the_parameters() {
    if std::env::var(PHASE_ENV).is_ok() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("gainguard-resume-mismatch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_vs, _m, opt, _) = setup(false);
    opt.save(&dir.join("opt.gg")).unwrap();
    let (_vs2, _m2, mut other, _) = setup(false);
    other.regroup(gainguard::Rule::parse("mup-coupled").unwrap(), vec![], &{
        let vs = VarStore::new(Device::Cpu);
        let _ = model::llama(vs.root(), &model::Config::new(40, 16, 16, 2, 12));
        BaseShapes::from_var_store(&vs)
    })
    .unwrap();
    let e = other.load(&dir.join("opt.gg")).unwrap_err().to_string();
    assert!(e.contains("opt.gg") && e.contains("rule table differs") && e.contains("blocks.0.attn.q.weight"), "{e}");
    let e = other.load(&dir.join("missing.gg")).unwrap_err().to_string();
    assert!(e.contains("missing.gg"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
