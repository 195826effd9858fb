//! The fused step (on CPU our own loop, or ATen's `_fused_adamw_`) against the reference path (libtorch
//! tensor ops), checkpoints crossing between them, and explicit regrouping.

use gainguard_examples::{compare, model};

use std::path::PathBuf;

use gainguard::data::MarkovCorpus;
use gainguard::{AdamWConfig, BaseShapes, CpuKernel, DecayMode, Override, Schedule, WidthScaledAdamW};
use tch::nn::VarStore;
use tch::{Device, Tensor};

const BASE_D: i64 = 16;
const D: i64 = 64; // m = 4
const STEPS: u64 = 200;

fn build(d: i64) -> (VarStore, model::Llama) {
    let vs = VarStore::new(Device::Cpu);
    let cfg = model::Config::new(48, d, BASE_D, 2, 16);
    let m = model::llama(vs.root(), &cfg);
    (vs, m)
}

fn base_shapes() -> BaseShapes {
    BaseShapes::from_var_store(&build(BASE_D).0)
}

fn batch(corpus: &MarkovCorpus, step: u64) -> Tensor {
    Tensor::from_slice(&corpus.batch(step, 4, 16)).view([4, 16])
}


fn config(decay: DecayMode, fused: bool) -> AdamWConfig {
    // Independent decay shrinks by (1 − wd) per step, so it takes a wd of the size of lr·wd.
    let weight_decay = match decay {
        DecayMode::Coupled => 0.1,
        DecayMode::Independent => 3e-4,
    };
    AdamWConfig {
        lr: 3e-3,
        weight_decay,
        decay,
        fused,
        // The cosine ends at lr = 0 on the last step, where independent decay still decays.
        schedule: Schedule::WarmupCosine { warmup: 20, total: STEPS - 1, floor: 0.0 },
        schedule_weight_decay: true,
        max_grad_norm: Some(1.0),
        ..Default::default()
    }
}

/// A model, its optimizer and the data, stepped from `from` to `to`.
struct Run {
    vs: VarStore,
    model: model::Llama,
    opt: WidthScaledAdamW,
}

impl Run {
    fn new(init: &VarStore, cfg: AdamWConfig) -> Run {
        let (mut vs, model) = build(D);
        vs.copy(init).unwrap();
        let opt = WidthScaledAdamW::new(&vs, &base_shapes(), cfg).unwrap();
        Run { vs, model, opt }
    }

    fn train(&mut self, corpus: &MarkovCorpus, steps: std::ops::Range<u64>) {
        for step in steps {
            self.opt.zero_grad();
            self.model.loss(&batch(corpus, step)).backward();
            self.opt.step();
        }
    }

    /// `n` steps that each take the same gradients, `grads` by parameter name (no forward/backward).
    fn step_with(&mut self, grads: &[(String, Tensor)], n: usize) {
        let vars = self.vs.variables();
        for _ in 0..n {
            self.opt.zero_grad();
            for (name, g) in grads {
                (&vars[name] * g).sum(tch::Kind::Float).backward();
            }
            self.opt.step();
        }
    }

    fn save(&self, dir: &PathBuf) {
        self.vs.save(dir.join("model.ot")).unwrap();
        self.opt.save(&dir.join("optim.ot")).unwrap();
    }

    fn load(&mut self, dir: &PathBuf) {
        self.vs.load(dir.join("model.ot")).unwrap();
        self.opt.load(&dir.join("optim.ot")).unwrap();
    }
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gainguard-fused-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Random gradients for every parameter of `init`, drawn once (tests share libtorch's RNG).
fn fixed_grads(init: &VarStore) -> Vec<(String, Tensor)> {
    init.variables().into_iter().map(|(n, t)| (n, Tensor::randn(t.size(), (tch::Kind::Float, Device::Cpu)))).collect()
}

/// Weights that every run of one test starts from (copied, since tests share libtorch's RNG).
fn initial_weights() -> VarStore {
    build(D).0
}

fn fused_matches_reference(decay: DecayMode) {
    assert!(gainguard::fused::available(), "this build has no fused AdamW shim");
    let corpus = MarkovCorpus::new(48, 4, 1);
    let init = initial_weights();
    let mut fused = Run::new(&init, config(decay, true));
    let mut reference = Run::new(&init, config(decay, false));
    fused.train(&corpus, 0..STEPS);
    reference.train(&corpus, 0..STEPS);
    assert_eq!(fused.opt.step_count(), STEPS);
    let (diff, name) = compare::max_rel_diff(&fused.vs, &reference.vs);
    eprintln!("{decay:?}: fused vs reference after {STEPS} steps: max relative difference {diff:e} at `{name}`");
    assert!(diff <= 1e-6, "{decay:?}: fused vs reference: max relative difference {diff:e} at `{name}` after {STEPS} steps");
    for (a, b) in fused.opt.slots().iter().zip(reference.opt.slots()) {
        for (x, y, what) in [(&a.first_moment, &b.first_moment, "first"), (&a.second_moment, &b.second_moment, "second")] {
            let d = compare::rel_diff(x, y);
            assert!(d <= 1e-5, "{decay:?}: {what} moment of `{}` differs by {d:e}", a.name);
        }
    }
    let (moved, _) = compare::max_rel_diff(&fused.vs, &init);
    assert!(moved > 1e-2, "training barely moved the weights ({moved:e})");
}

#[test]
fn fused_path_matches_the_reference_path_for_coupled_decay_under_warmup_cosine() {
    fused_matches_reference(DecayMode::Coupled);
}

#[test]
fn fused_path_matches_the_reference_path_for_independent_decay_under_warmup_cosine() {
    fused_matches_reference(DecayMode::Independent);
}

#[test]
fn resuming_a_fused_run_from_its_checkpoint_is_bit_identical_to_an_uninterrupted_one() {
    let corpus = MarkovCorpus::new(48, 4, 1);
    let init = initial_weights();
    let half = STEPS / 2;
    let mut whole = Run::new(&init, config(DecayMode::Coupled, true));
    whole.train(&corpus, 0..half);
    let dir = scratch_dir("fused-resume");
    whole.save(&dir);
    whole.train(&corpus, half..STEPS);

    // A fresh process would start from other weights and zero moments: start from others here too.
    let (other, _) = build(D);
    let mut resumed = Run::new(&other, config(DecayMode::Coupled, true));
    resumed.load(&dir);
    assert_eq!(resumed.opt.step_count(), half);
    resumed.train(&corpus, half..STEPS);
    let (diff, name) = compare::max_rel_diff(&resumed.vs, &whole.vs);
    assert_eq!(diff, 0.0, "resumed fused run differs at `{name}` by {diff:e}");
    for (a, b) in resumed.opt.slots().iter().zip(whole.opt.slots()) {
        assert!(a.first_moment.equal(&b.first_moment) && a.second_moment.equal(&b.second_moment), "moments of `{}`", a.name);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A checkpoint of one path loads into the other, and the run continues as if uninterrupted.
fn cross_resume(saved_by_fused: bool) {
    let corpus = MarkovCorpus::new(48, 4, 1);
    let init = initial_weights();
    let half = STEPS / 2;
    let mut whole = Run::new(&init, config(DecayMode::Independent, saved_by_fused));
    whole.train(&corpus, 0..half);
    let dir = scratch_dir(if saved_by_fused { "fused-to-reference" } else { "reference-to-fused" });
    whole.save(&dir);
    whole.train(&corpus, half..STEPS);

    let (other, _) = build(D);
    let mut resumed = Run::new(&other, config(DecayMode::Independent, !saved_by_fused));
    resumed.load(&dir);
    resumed.train(&corpus, half..STEPS);
    let (diff, name) = compare::max_rel_diff(&resumed.vs, &whole.vs);
    eprintln!("checkpoint saved by fused={saved_by_fused}, resumed by the other path: max relative difference {diff:e} at `{name}`");
    assert!(diff <= 1e-6, "cross-resume (saved by fused={saved_by_fused}): {diff:e} at `{name}`");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_fused_checkpoint_resumes_on_the_reference_path() {
    cross_resume(true);
}

#[test]
fn a_reference_checkpoint_resumes_on_the_fused_path() {
    cross_resume(false);
}

#[test]
fn the_fused_path_skips_parameters_without_gradients() {
    let init = initial_weights();
    let mut run = Run::new(&init, config(DecayMode::Coupled, true));
    let emb = run.vs.variables()["tok_emb.weight"].shallow_clone();
    let before = emb.copy();
    let _ = emb.set_requires_grad(false);
    let corpus = MarkovCorpus::new(48, 4, 1);
    run.opt.zero_grad();
    run.model.loss(&batch(&corpus, 0)).backward();
    let report = run.opt.step();
    assert_eq!(report.skipped_without_grad, 1);
    assert!(emb.equal(&before));
}

/// Starting weights and fixed gradients for `shapes`, drawn once per test and copied into every run
/// (tests run on parallel threads that share libtorch's RNG, so re-seeding per run would not reproduce them).
fn draw_inputs(shapes: &[&[i64]], kind: tch::Kind) -> (Vec<Tensor>, Vec<Tensor>) {
    let params = shapes.iter().map(|s| (Tensor::randn(*s, (tch::Kind::Float, Device::Cpu)) * 0.02).to_kind(kind)).collect();
    let grads = shapes.iter().map(|s| (Tensor::randn(*s, (tch::Kind::Float, Device::Cpu)) * 1e-3).to_kind(kind)).collect();
    (params, grads)
}

/// Copies of `initial` stepped `steps` times by an optimizer with `cfg`, with the fixed gradients `grads`;
/// returns the parameters.
fn stepped(initial: &[Tensor], grads: &[Tensor], base: &str, cfg: AdamWConfig, steps: usize) -> Vec<Tensor> {
    let params: Vec<Tensor> = initial.iter().map(|p| p.copy().set_requires_grad(true)).collect();
    let named: Vec<(String, Tensor)> = params.iter().enumerate().map(|(i, p)| (format!("p{i}.weight"), p.shallow_clone())).collect();
    let base = BaseShapes::from_json_str(base, "test").unwrap();
    let mut opt = WidthScaledAdamW::from_named(named, &base, cfg).unwrap();
    for s in opt.slots() {
        assert_eq!(s.first_moment.kind(), tch::Kind::Float, "f32 moments, also for bf16/f16 parameters");
    }
    for _ in 0..steps {
        opt.zero_grad();
        for (p, g) in params.iter().zip(grads) {
            (p * g).sum(tch::Kind::Float).backward();
        }
        let report = opt.step();
        assert_eq!(report.skipped_without_grad, 0);
    }
    params.iter().map(|p| p.detach().copy()).collect()
}

#[test]
fn mixed_precision_parameters_take_the_fused_cpu_loop_and_round_as_the_reference_path() {
    // (dtype, spacing of its values relative to their size: 2^-7 for bf16, 2^-10 for f16)
    for (kind, spacing) in [(tch::Kind::BFloat16, 2f64.powi(-7)), (tch::Kind::Half, 2f64.powi(-10))] {
        // Large enough to be split over threads (64 Ki elements per task), with a split inside a tensor.
        let (initial, grads) = draw_inputs(&[&[700, 300], &[70_001], &[5]], kind);
        let base = r#"{"p0.weight": [175, 75], "p1.weight": [70001], "p2.weight": [5]}"#;
        let cfg = AdamWConfig { lr: 1e-2, weight_decay: 0.1, ..Default::default() };
        let fused = stepped(&initial, &grads, base, AdamWConfig { fused: true, ..cfg.clone() }, 5);
        let reference = stepped(&initial, &grads, base, AdamWConfig { fused: false, ..cfg }, 5);
        let (mut elements, mut equal, mut worst_ulps) = (0i64, 0i64, 0f64);
        for (f, r) in fused.iter().zip(&reference) {
            let (f, r) = (f.to_kind(tch::Kind::Double), r.to_kind(tch::Kind::Double));
            elements += r.numel() as i64;
            equal += f.eq_tensor(&r).sum(tch::Kind::Int64).int64_value(&[]);
            // Differences in units of the value's spacing (at least that of the smallest normal size).
            let ulps = (&f - &r).abs() / (r.abs().clamp_min(1e-4) * spacing);
            worst_ulps = worst_ulps.max(ulps.max().double_value(&[]));
        }
        let moved = (&fused[0].to_kind(tch::Kind::Double) - initial[0].to_kind(tch::Kind::Double)).abs().max().double_value(&[]);
        eprintln!("{kind:?}: {equal} of {elements} elements identical, worst {worst_ulps:.2} spacings apart; weights moved {moved:e}");
        // The loop widens, steps in f32, and rounds θ back to nearest even, as the reference path does: every
        // element is identical. (Rounding by truncation would change about half of them, a wrong formula all of
        // them; when the two paths' f32 square roots differed, 2 (bf16) and 6 (f16) moved by up to 3.1 spacings.)
        assert_eq!(equal, elements, "{kind:?}: fused and reference differ by up to {worst_ulps} spacings after 5 steps");
        assert!(moved > 1e-2, "{kind:?}: the steps barely moved the weights ({moved:e})");
    }
}

#[test]
fn on_cpu_the_fused_step_is_bit_identical_to_the_reference_step_given_the_same_gradients() {
    // With fixed gradients (no forward/backward whose reductions could differ), the two optimizer paths must be
    // bit-identical: the CPU loop follows the reference path's order of roundings, and both take the correctly
    // rounded sqrt (with libtorch's MKL sqrt in the reference path they differed by ~1e-8).
    for decay in [DecayMode::Coupled, DecayMode::Independent] {
        let init = initial_weights();
        let mut fused = Run::new(&init, AdamWConfig { max_grad_norm: None, ..config(decay, true) });
        let mut reference = Run::new(&init, AdamWConfig { max_grad_norm: None, ..config(decay, false) });
        let grads = fixed_grads(&init);
        for run in [&mut fused, &mut reference] {
            run.step_with(&grads, 5);
        }
        let (diff, name) = compare::max_rel_diff(&fused.vs, &reference.vs);
        eprintln!("{decay:?}: fixed gradients, 5 steps: max relative difference {diff:e} at `{name}`");
        assert!(diff == 0.0, "{decay:?}: `{name}` differs by {diff:e}");
    }
}

fn max_rel(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| compare::rel_diff(x, y))
        .fold(0.0, f64::max)
}

#[test]
fn tensors_split_over_threads_step_as_on_the_reference_path_with_either_cpu_kernel() {
    let threads = tch::get_num_threads();
    tch::set_num_threads(threads.max(2));
    // p2 keeps its base shape beside wider matrices: declared fixed-size, as the plan requires (vector-like).
    let fixed = Override { fixed_size: Some(true), ..Override::new("p2.weight") };
    let cfg = AdamWConfig { lr: 1e-2, weight_decay: 0.1, overrides: vec![fixed], ..Default::default() };
    // Large tensors whose elements the CPU loop splits over several threads (64 Ki elements per task, split
    // points inside tensors), stepped by the reference path and by the fused path with either CPU kernel.
    let (initial, grads) = draw_inputs(&[&[1000, 700], &[300_001], &[65_537, 3], &[5]], tch::Kind::Float);
    let base = r#"{"p0.weight": [250, 175], "p1.weight": [300001], "p2.weight": [65537, 3], "p3.weight": [5]}"#;
    let run = |fused: bool, cpu_kernel: CpuKernel| stepped(&initial, &grads, base, AdamWConfig { fused, cpu_kernel, ..cfg.clone() }, 3);
    let reference = run(false, CpuKernel::Exact);
    let exact = run(true, CpuKernel::Exact);
    let aten = run(true, CpuKernel::Aten);
    tch::set_num_threads(threads);
    let (d_exact, d_aten) = (max_rel(&exact, &reference), max_rel(&aten, &reference));
    eprintln!("3 steps over {} threads: exact kernel vs reference {d_exact:e}, ATen kernel vs reference {d_aten:e}", threads.max(2));
    // A segment skipped or stepped twice would differ by ~1e-1; the exact kernel is bit-identical, and ATen's
    // (lerp and FMA) differs by roundings.
    assert!(d_exact == 0.0, "the exact CPU kernel differs from the reference path by {d_exact:e}");
    assert!(d_aten <= 1e-5, "ATen's CPU kernel differs from the reference path by {d_aten:e}");
    let moved = (&reference[0] - &initial[0]).abs().max().double_value(&[]);
    assert!(moved > 1e-3, "the steps barely moved the weights ({moved:e})");
}

#[test]
fn the_stream_probe_moves_every_element_and_changes_none() {
    let init = initial_weights();
    let mut run = Run::new(&init, config(DecayMode::Coupled, true));
    let corpus = MarkovCorpus::new(48, 4, 1);
    run.train(&corpus, 0..2);
    let before: Vec<Tensor> = run.opt.slots().iter().flat_map(|s| [s.tensor.copy(), s.first_moment.copy(), s.second_moment.copy()]).collect();
    let moved = run.opt.stream_probe().unwrap();
    let total: usize = run.opt.slots().iter().map(|s| s.tensor.numel()).sum();
    assert_eq!(moved, total);
    let after: Vec<Tensor> = run.opt.slots().iter().flat_map(|s| [s.tensor.copy(), s.first_moment.copy(), s.second_moment.copy()]).collect();
    for (a, b) in before.iter().zip(&after) {
        assert!(a.equal(b), "the probe changed a value");
    }
}

#[test]
fn the_reference_paths_square_root_is_the_correctly_rounded_one() {
    // Rust's sqrt is correctly rounded (IEEE 754). libtorch's CPU sqrt may not be (MKL's, on x86 below
    // AVX-512): print how often it differs, for the record.
    let x = Tensor::rand([300_007], (tch::Kind::Double, Device::Cpu)) * 1e-3;
    for kind in [tch::Kind::Float, tch::Kind::Double] {
        let x = x.to_kind(kind);
        let ours = gainguard::fused::correctly_rounded_sqrt(&x).expect("a contiguous CPU tensor is taken");
        let values = Vec::<f64>::try_from(&x.to_kind(tch::Kind::Double)).unwrap();
        let exact: Vec<f64> = match kind {
            tch::Kind::Float => values.iter().map(|v| (*v as f32).sqrt() as f64).collect(),
            _ => values.iter().map(|v| v.sqrt()).collect(),
        };
        let ours = Vec::<f64>::try_from(&ours.to_kind(tch::Kind::Double)).unwrap();
        let libtorch = Vec::<f64>::try_from(&x.sqrt().to_kind(tch::Kind::Double)).unwrap();
        let differ = |a: &[f64]| a.iter().zip(&exact).filter(|(x, y)| x != y).count();
        eprintln!("{kind:?}: libtorch's sqrt differs from the correctly rounded one at {} of {} values", differ(&libtorch), exact.len());
        assert_eq!(differ(&ours), 0, "{kind:?}");
    }
    // What it does not take, the caller gives to libtorch.
    assert!(gainguard::fused::correctly_rounded_sqrt(&Tensor::ones([4], (tch::Kind::BFloat16, Device::Cpu))).is_none());
    assert!(gainguard::fused::correctly_rounded_sqrt(&Tensor::ones([4, 4], (tch::Kind::Float, Device::Cpu)).tr()).is_none());
}

/// The width-scaled lr of parameter `name`'s group.
fn group_lr(opt: &WidthScaledAdamW, name: &str) -> f64 {
    let slot = opt.slots().iter().find(|s| s.name == name).expect("the model has the parameter");
    opt.groups()[slot.group].lr
}

#[test]
fn regrouping_mid_run_keeps_the_state_and_steps_as_an_optimizer_built_with_the_new_overrides() {
    let q = "blocks.0.attn.q.weight";
    let boosted = vec![Override { lr_multiplier: Some(2.0), ..Override::new(q) }];
    let init = initial_weights();
    let grads = fixed_grads(&init);
    let cfg = |fused| AdamWConfig { max_grad_norm: None, ..config(DecayMode::Coupled, fused) };

    // Reference: built with the override and stepped 3 + 3 times.
    let mut built = Run::new(&init, AdamWConfig { overrides: boosted.clone(), ..cfg(true) });
    built.step_with(&grads, 6);
    let plain = Run::new(&init, cfg(true));
    let groups_before = plain.opt.groups().len();
    assert!((group_lr(&built.opt, q) - 2.0 * group_lr(&plain.opt, q)).abs() <= 1e-12 * group_lr(&built.opt, q));

    // Built without it, stepped 3 times, regrouped, stepped 3 more, on either path. The override leaves the
    // first moments alone, so the two runs differ only in the lr of the first three steps of `q`.
    for fused in [true, false] {
        let mut run = Run::new(&init, cfg(fused));
        run.step_with(&grads, 3);
        let moments: Vec<(Tensor, Tensor)> =
            run.opt.slots().iter().map(|s| (s.first_moment.copy(), s.second_moment.copy())).collect();
        let q_before = run.vs.variables()[q].copy();
        run.opt.regroup(run.opt.config().rule, boosted.clone(), &base_shapes()).unwrap();
        assert_eq!(run.opt.groups().len(), groups_before + 1, "`{q}` gets a group of its own");
        assert_eq!(group_lr(&run.opt, q), group_lr(&built.opt, q), "the regrouped lr is the one built with it");
        assert_eq!(run.opt.step_count(), 3, "regrouping keeps the step count");
        for (s, (m, v)) in run.opt.slots().iter().zip(&moments) {
            assert!(s.first_moment.equal(m) && s.second_moment.equal(v), "regrouping kept the moments of `{}`", s.name);
        }
        assert!(run.vs.variables()[q].equal(&q_before), "regrouping does not step");
        run.step_with(&grads, 3);

        // Every other parameter is where the run built with the override left it; `q` took a different path
        // for three steps, and the boosted lr moved it further than the plain run.
        let vars = run.vs.variables();
        for (name, t) in built.vs.variables() {
            if name != q {
                assert!(t.equal(&vars[&name]), "fused={fused}: `{name}` does not depend on `{q}`'s override");
            }
        }
        let moved = |a: &Tensor| (a - &init.variables()[q]).norm().double_value(&[]);
        let (d_built, d_run) = (moved(&built.vs.variables()[q]), moved(&vars[q]));
        assert!(d_run < d_built, "fused={fused}: three steps at the plain lr moved `{q}` less ({d_run} vs {d_built})");
        let mut plain = Run::new(&init, cfg(fused));
        plain.step_with(&grads, 6);
        let d_plain = moved(&plain.vs.variables()[q]);
        assert!(d_plain < d_run, "fused={fused}: the boosted lr of the last three steps took effect ({d_plain} vs {d_run})");
    }
}
