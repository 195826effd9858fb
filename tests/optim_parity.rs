//! Our AdamW against libtorch's own (`tch::COptimizer::adamw`), given the same per-group lr and wd.

use gainguard_examples::{compare, model};

use gainguard::data::MarkovCorpus;
use gainguard::{AdamWConfig, BaseShapes, CpuKernel, DecayMode, Rule, Schedule, WidthScaledAdamW};
use tch::nn::{self, VarStore};
use tch::{COptimizer, Device, Tensor};

const BASE_D: i64 = 16;
const D: i64 = 64; // m = 4
const STEPS: u64 = 200;

fn build(seed: i64, d: i64) -> (VarStore, model::Llama) {
    tch::manual_seed(seed);
    let vs = VarStore::new(Device::Cpu);
    let cfg = model::Config::new(48, d, BASE_D, 2, 16);
    let m = model::llama(vs.root(), &cfg);
    (vs, m)
}

fn base_shapes() -> BaseShapes {
    let (vs, _) = build(0, BASE_D);
    BaseShapes::from_var_store(&vs)
}

fn batch(corpus: &MarkovCorpus, step: u64) -> Tensor {
    Tensor::from_slice(&corpus.batch(step, 4, 16)).view([4, 16])
}


fn parity(decay: DecayMode, fused: bool) {
    parity_with(decay, fused, CpuKernel::Exact, 1e-5);
}

/// Ours (with the given CPU kernel) vs libtorch's AdamW after 200 steps; fails above `bar`.
fn parity_with(decay: DecayMode, fused: bool, cpu_kernel: CpuKernel, bar: f64) {
    let corpus = MarkovCorpus::new(48, 4, 1);
    let (vs_ours, m_ours) = build(1, D);
    // Tests run on parallel threads that share libtorch's RNG, so copy the weights rather than re-seed.
    let (mut vs_ref, m_ref) = build(1, D);
    vs_ref.copy(&vs_ours).unwrap();
    let (mut vs_init, _) = build(1, D);
    vs_init.copy(&vs_ours).unwrap();
    assert_eq!(compare::max_rel_diff(&vs_ours, &vs_ref).0, 0.0, "both models start identical");

    // Independent decay shrinks by (1 − wd) per step, so it takes a wd of the size of lr·wd.
    let weight_decay = match decay {
        DecayMode::Coupled => 0.1,
        DecayMode::Independent => 3e-4,
    };
    let cfg = AdamWConfig { lr: 3e-3, weight_decay, decay, rule: Rule::default(), fused, cpu_kernel, ..Default::default() };
    let mut ours = WidthScaledAdamW::new(&vs_ours, &base_shapes(), cfg.clone()).unwrap();
    assert!(ours.groups().len() >= 2, "the model has matrix-like and vector-like groups");

    // libtorch's AdamW, one param group per (lr, wd) group of ours. Independent decay is coupled decay
    // with wd' = wd / lr.
    let mut reference = COptimizer::adamw(cfg.lr, cfg.beta1, cfg.beta2, 0.0, cfg.eps, false).unwrap();
    let ref_vars = vs_ref.variables();
    for (gi, g) in ours.groups().iter().enumerate() {
        for &si in &g.members {
            reference.add_parameters(&ref_vars[&ours.slots()[si].name], gi).unwrap();
        }
        let wd = match decay {
            DecayMode::Coupled => g.weight_decay,
            DecayMode::Independent => g.weight_decay / g.lr,
        };
        reference.set_learning_rate_group(gi, g.lr).unwrap();
        reference.set_weight_decay_group(gi, wd).unwrap();
    }

    for step in 0..STEPS {
        let x = batch(&corpus, step);
        ours.zero_grad();
        m_ours.loss(&x).backward();
        ours.step();
        reference.zero_grad().unwrap();
        m_ref.loss(&x).backward();
        reference.step().unwrap();
    }
    let (diff, name) = compare::max_rel_diff(&vs_ours, &vs_ref);
    eprintln!("{decay:?} fused={fused} {cpu_kernel:?}: max relative difference {diff:e} at `{name}`");
    assert!(diff <= bar, "{decay:?} fused={fused} {cpu_kernel:?}: max relative difference {diff:e} at `{name}` after {STEPS} steps");
    // The run must have moved the weights far more than the tolerance, or the comparison says nothing.
    let (moved, _) = compare::max_rel_diff(&vs_ours, &vs_init);
    assert!(moved > 1e-2, "training barely moved the weights ({moved:e})");
}

#[test]
fn reference_path_matches_libtorch_adamw_for_coupled_decay_under_the_paper_rule_at_m4() {
    parity(DecayMode::Coupled, false);
}

#[test]
fn reference_path_matches_libtorch_adamw_for_independent_decay() {
    parity(DecayMode::Independent, false);
}

#[test]
fn fused_path_matches_libtorch_adamw_for_coupled_decay() {
    parity(DecayMode::Coupled, true);
}

#[test]
fn atens_cpu_kernel_matches_libtorch_adamw_for_coupled_decay() {
    // ATen's `_fused_adamw_` computes the same update with lerp and FMA: other roundings, same bar.
    parity_with(DecayMode::Coupled, true, CpuKernel::Aten, 1e-5);
}

#[test]
fn atens_cpu_kernel_matches_libtorch_adamw_for_independent_decay() {
    // Independent decay reaches ATen's kernel as wd' = wd / lr.
    parity_with(DecayMode::Independent, true, CpuKernel::Aten, 1e-5);
}

#[test]
fn a_schedule_multiplies_each_width_scaled_lr_instead_of_overwriting_it() {
    let (vs, _) = build(2, D);
    let cfg = AdamWConfig { lr: 1e-2, schedule: Schedule::WarmupCosine { warmup: 10, total: 100, floor: 0.0 }, ..Default::default() };
    let opt = WidthScaledAdamW::new(&vs, &base_shapes(), cfg).unwrap();
    let q = opt.effective_lr("blocks.0.attn.q.weight").unwrap();
    let g = opt.effective_lr("norm.weight").unwrap();
    // Step 0 of a 10-step warmup: multiplier 0.1. Matrix-like at m = 4: 1e-2 / 4 · 0.1.
    assert!((q - 1e-2 / 4.0 * 0.1).abs() < 1e-15, "{q}");
    assert!((g - 1e-2 * 0.1).abs() < 1e-15, "{g}");
}

#[test]
fn parameters_without_gradients_are_skipped_and_left_unchanged() {
    let (vs, m) = build(3, D);
    let mut opt = WidthScaledAdamW::new(&vs, &base_shapes(), AdamWConfig { weight_decay: 0.5, ..Default::default() }).unwrap();
    // Freeze the embedding: its grad stays undefined.
    let emb = vs.variables()["tok_emb.weight"].shallow_clone();
    let before = emb.copy();
    let _ = emb.set_requires_grad(false);
    let corpus = MarkovCorpus::new(48, 4, 1);
    opt.zero_grad();
    m.loss(&batch(&corpus, 0)).backward();
    let report = opt.step();
    assert_eq!(report.skipped_without_grad, 1);
    assert_eq!((&emb - &before).abs().max().double_value(&[]), 0.0);
}

#[test]
fn gradient_clipping_bounds_the_global_norm_like_pytorch() {
    let (vs, m) = build(4, D);
    let corpus = MarkovCorpus::new(48, 4, 1);
    let mut opt = WidthScaledAdamW::new(&vs, &base_shapes(), AdamWConfig { max_grad_norm: Some(0.01), ..Default::default() }).unwrap();
    opt.zero_grad();
    m.loss(&batch(&corpus, 0)).backward();
    // Independent norm: concatenate every gradient and take its 2-norm.
    let flat: Vec<Tensor> = vs.trainable_variables().iter().map(|t| t.grad().reshape([-1])).collect();
    let before = Tensor::cat(&flat, 0).norm().double_value(&[]);
    let report = opt.step();
    assert!((report.grad_norm.unwrap() - before).abs() / before < 1e-5);
    assert!(report.clipped);
    let flat: Vec<Tensor> = vs.trainable_variables().iter().map(|t| t.grad().reshape([-1])).collect();
    let after = Tensor::cat(&flat, 0).norm().double_value(&[]);
    assert!((after - 0.01).abs() < 1e-6, "clipped norm {after}");
    let _ = nn::VarStore::new(Device::Cpu);
}
