//! Checks of the CUDA paths against independent CPU references, for a machine with a GPU. Not a test:
//! CI has no GPU. `scripts/device-check.sh` runs it (with the optimizer benchmark, the example trainer
//! on CUDA and gainguardd's NVML metrics); results go to BENCHMARKS.md.
//!
//! ```text
//! cargo run --release --example device_check            # on a machine with CUDA; exits 1 without it
//! cargo run --release --example device_check -- --cpu   # the same checks on the CPU (a dry run)
//! ```
//! Prints one line per check, `PASS`/`FAIL`, and exits 1 if any failed. Checked:
//! 1. top-k singular values estimated on CUDA (fp32, bf16) against a float64 SVD on the CPU;
//! 2. the full spectrum on CUDA (`linalg_svdvals`) against the same float64 SVD;
//! 3. the sampler (through a `Monitor`) attached to a CUDA training run: its samples, taken off the
//!    training thread from device-side snapshots, against a float64 CPU SVD of the same weights;
//! 4. the fused step on CUDA (ATen's `_fused_adamw_`) against the reference path on CUDA, with fixed
//!    gradients and over 200 training steps with a schedule and clipping, both decay conventions;
//! 5. the reference path on CUDA against the reference path on CPU, given the same gradients.

use gainguard_examples::{compare, model};

use std::sync::{Arc, Mutex};
use std::time::Instant;

use gainguard::data::MarkovCorpus;
use gainguard::spectra::{full_spectrum, Estimator, EstimatorConfig, FullPrecision};
use gainguard::{AdamWConfig, BaseShapes, DecayMode, Monitor, SamplerConfig, Schedule, WidthScaledAdamW};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

struct Checks {
    failed: usize,
}

impl Checks {
    fn check(&mut self, ok: bool, what: String) {
        println!("{} {what}", if ok { "PASS" } else { "FAIL" });
        if !ok {
            self.failed += 1;
        }
    }
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Singular values of `a` in float64 on the CPU (LAPACK), descending.
fn svd64(a: &Tensor) -> Vec<f64> {
    let (_, s, _) = a.to_device(Device::Cpu).to_kind(Kind::Double).svd(true, false);
    Vec::<f64>::try_from(&s).unwrap()
}

/// A matrix with a decaying spectrum on top of Gaussian noise, as trained weights look.
fn trained_like(rows: i64, cols: i64, device: Device) -> Tensor {
    let n = rows.min(cols);
    let noise = Tensor::randn([rows, cols], (Kind::Float, device)) / (cols as f64).sqrt();
    let r = 32.min(n);
    let u = Tensor::linalg_qr(&Tensor::randn([rows, r], (Kind::Float, device)), "reduced").0;
    let v = Tensor::linalg_qr(&Tensor::randn([cols, r], (Kind::Float, device)), "reduced").0;
    let s = Tensor::arange(r, (Kind::Float, device)).g_add_scalar(1.0).pow_tensor_scalar(-0.5) * 6.0;
    noise + u.matmul(&s.diag(0)).matmul(&v.tr())
}

fn spectra(c: &mut Checks, device: Device) {
    println!("\n== spectra on {device:?} vs float64 SVD on the CPU ==");
    for (rows, cols, kind) in [(1024, 1024, Kind::Float), (4096, 1024, Kind::Float), (1024, 4096, Kind::Float), (2048, 2048, Kind::BFloat16)] {
        tch::manual_seed(3);
        let a = trained_like(rows, cols, device).to_kind(kind);
        let exact = svd64(&a);
        let mut est = Estimator::new(EstimatorConfig::default());
        let e = est.estimate(&a).unwrap();
        let top_err = e.top_k.iter().zip(&exact).map(|(x, y)| (x - y).abs() / exact[0]).fold(0.0, f64::max);
        // Warm start after a small update, as between two samples.
        let b = (&a.to_kind(Kind::Float) + Tensor::randn([rows, cols], (Kind::Float, device)) * 1e-3 / (cols as f64).sqrt()).to_kind(kind);
        let exact_b = svd64(&b);
        let t = Instant::now();
        let w = est.estimate(&b).unwrap();
        sync(device);
        let warm_s = t.elapsed().as_secs_f64();
        let warm_err = (w.sigma_max - exact_b[0]).abs() / exact_b[0];
        let _ = full_spectrum(&a, FullPrecision::Device).unwrap(); // solver set-up out of the timing
        sync(device);
        let t = Instant::now();
        let full = full_spectrum(&b, FullPrecision::Device).unwrap();
        sync(device);
        let full_s = t.elapsed().as_secs_f64();
        let full_err = full.singular_values.iter().zip(&exact_b).map(|(x, y)| (x - y).abs() / exact_b[0]).fold(0.0, f64::max);
        let bar = if kind == Kind::BFloat16 { 1e-2 } else { 1e-3 };
        c.check(
            top_err <= bar && warm_err <= bar,
            format!(
                "{rows}x{cols} {kind:?}: top-{} cold rel. err {top_err:.2e} ({} iters), warm {warm_err:.2e} ({} iters) (bar {bar:e})",
                e.top_k.len(),
                e.iterations,
                w.iterations
            ),
        );
        c.check(
            full_err <= bar && full.singular_values.len() == exact_b.len(),
            format!(
                "{rows}x{cols} {kind:?}: full spectrum ({} values) max |err|/sigma_max {full_err:.2e}; warm top-k {:.2} ms vs full svdvals {:.2} ms on the device ({:.1}x)",
                full.singular_values.len(),
                warm_s * 1e3,
                full_s * 1e3,
                full_s / warm_s
            ),
        );
    }
}

fn llama(d: i64, device: Device) -> (VarStore, model::Llama) {
    let vs = VarStore::new(device);
    let m = model::llama(vs.root(), &model::Config::new(48, d, 16, 2, 16));
    (vs, m)
}

fn base_shapes() -> BaseShapes {
    BaseShapes::from_var_store(&llama(16, Device::Cpu).0)
}

fn batch(corpus: &MarkovCorpus, step: u64, device: Device) -> Tensor {
    Tensor::from_slice(&corpus.batch(step, 4, 16)).view([4, 16]).to_device(device)
}

fn config(decay: DecayMode, fused: bool, steps: u64) -> AdamWConfig {
    AdamWConfig {
        lr: 3e-3,
        weight_decay: if decay == DecayMode::Coupled { 0.1 } else { 3e-4 },
        decay,
        fused,
        schedule: Schedule::WarmupCosine { warmup: 20, total: steps, floor: 0.1 },
        max_grad_norm: Some(1.0),
        ..Default::default()
    }
}

fn sampler(c: &mut Checks, device: Device) {
    println!("\n== the sampler on a {device:?} training run vs float64 SVD ==");
    tch::manual_seed(5);
    let (vs, m) = llama(64, device);
    let mut opt = WidthScaledAdamW::new(&vs, &base_shapes(), config(DecayMode::Coupled, true, 100)).unwrap();
    let samples: Arc<Mutex<Vec<(u64, String, f64)>>> = Arc::default();
    // Every round must arrive (the last is compared with the final weights): room for all four rounds in
    // the queue, a worker at normal priority, and time to drain at the end on a busy machine, since this
    // checks values, not scheduling.
    let cfg = SamplerConfig {
        interval: 25,
        budget_fraction: None,
        full_spectrum_every: 2,
        queue_capacity: 8,
        worker_nice: 0,
        shutdown_timeout: std::time::Duration::from_secs(60),
        ..Default::default()
    };
    let mon = Monitor::builder("device-check").sampler(cfg).to_sink(gainguard::protocol::Sink::disabled()).attach(&mut opt).unwrap();
    let handle = mon.sampler().unwrap().clone();
    let seen = samples.clone();
    handle.add_listener(Box::new(move |sample, step| {
        if let Some(sigma) = sample.sigma_max {
            seen.lock().unwrap().push((step, sample.param.clone(), sigma));
        }
    }));
    let corpus = MarkovCorpus::new(48, 4, 1);
    for step in 0..100 {
        opt.zero_grad();
        m.loss(&batch(&corpus, step, device)).backward();
        opt.step();
    }
    let drained = handle.finish(std::time::Duration::from_secs(90));
    let got = samples.lock().unwrap().clone();
    let last_step = got.iter().map(|x| x.0).max().unwrap_or(0);
    let vars = vs.variables();
    let mut worst = 0.0f64;
    let mut n = 0;
    for (step, name, sigma) in got.iter().filter(|x| x.0 == last_step) {
        // The last sampled step is the final step (100 = 4 × 25), so the weights are those it saw.
        let exact = svd64(&vars[name])[0];
        worst = worst.max((sigma - exact).abs() / exact);
        n += 1;
        let _ = step;
    }
    c.check(
        drained && last_step == 100 && n > 0 && worst <= 1e-3 && handle.dropped_total() == 0,
        format!(
            "{} samples, {} params at the final step {last_step}, max rel. err of sigma_max vs float64 SVD {worst:.2e}, dropped {}",
            got.len(),
            n,
            handle.dropped_total()
        ),
    );
}

fn fused(c: &mut Checks, device: Device) {
    println!("\n== fused step on {device:?} (ATen _fused_adamw_) vs reference path ==");
    for decay in [DecayMode::Coupled, DecayMode::Independent] {
        // Fixed gradients: the optimizers alone.
        tch::manual_seed(7);
        let (init, _) = llama(64, device);
        let mut runs = Vec::new();
        for (dev, fused) in [(device, true), (device, false), (Device::Cpu, false)] {
            let (mut vs, _) = llama(64, dev);
            vs.copy(&init).unwrap();
            let opt = WidthScaledAdamW::new(&vs, &base_shapes(), AdamWConfig { max_grad_norm: None, ..config(decay, fused, 200) }).unwrap();
            runs.push((vs, opt));
        }
        let grads: Vec<(String, Tensor)> =
            init.variables().into_iter().map(|(n, t)| (n, Tensor::randn(t.size(), (Kind::Float, Device::Cpu)))).collect();
        for (vs, opt) in runs.iter_mut() {
            let vars = vs.variables();
            for _ in 0..5 {
                opt.zero_grad();
                for (name, g) in &grads {
                    let v = &vars[name];
                    (v * g.to_device(v.device())).sum(Kind::Float).backward();
                }
                opt.step();
            }
        }
        let (d, at) = compare::max_rel_diff(&runs[0].0, &runs[1].0);
        c.check(d <= 1e-6, format!("{decay:?}, fixed gradients, 5 steps: fused vs reference on {device:?}: {d:.2e} at `{at}` (bar 1e-6)"));
        let (d, at) = compare::max_rel_diff(&runs[1].0, &runs[2].0);
        c.check(d <= 1e-6, format!("{decay:?}, fixed gradients, 5 steps: reference on {device:?} vs reference on CPU: {d:.2e} at `{at}` (bar 1e-6)"));

        // 200 training steps with warmup-cosine and clipping (forward/backward on the device too).
        let corpus = MarkovCorpus::new(48, 4, 1);
        let mut trained = Vec::new();
        for fused in [true, false] {
            let (mut vs, m) = llama(64, device);
            vs.copy(&init).unwrap();
            let mut opt = WidthScaledAdamW::new(&vs, &base_shapes(), config(decay, fused, 200)).unwrap();
            for step in 0..200 {
                opt.zero_grad();
                m.loss(&batch(&corpus, step, device)).backward();
                opt.step();
            }
            trained.push(vs);
        }
        let (d, at) = compare::max_rel_diff(&trained[0], &trained[1]);
        let (moved, _) = compare::max_rel_diff(&trained[1], &init);
        c.check(
            d <= 1e-6 && moved > 1e-2,
            format!("{decay:?}, 200 training steps: fused vs reference on {device:?}: {d:.2e} at `{at}` (bar 1e-6; weights moved {moved:.2e})"),
        );
    }
}

fn main() {
    let device = if std::env::args().any(|a| a == "--cpu") {
        Device::Cpu
    } else {
        let backend = gainguard::device::load_cuda_backend();
        println!("CUDA backend: {backend:?}");
        if !tch::Cuda::is_available() {
            eprintln!("device_check: CUDA is not available here (backend: {backend:?}); nothing to check (--cpu runs the checks on the CPU)");
            std::process::exit(1);
        }
        println!("CUDA devices: {}; cuDNN: {}", tch::Cuda::device_count(), tch::Cuda::cudnn_is_available());
        Device::Cuda(0)
    };
    let mut c = Checks { failed: 0 };
    spectra(&mut c, device);
    sampler(&mut c, device);
    fused(&mut c, device);
    println!("\n{} check(s) failed", c.failed);
    std::process::exit(if c.failed == 0 { 0 } else { 1 });
}
