//! Spectra benchmarks: ratios against a baseline measured in the same run (see BENCHMARKS.md).
//!
//! 1. warm-started sigma_max (block Krylov, after a small update) vs a full SVD (singular values
//!    only), with the relative error beside the speed ratio;
//! 2. the training-step overhead of the example LLaMA model with the sampler on (every 10 steps) vs
//!    off, interleaved, as the median ratio of block times.
//!
//! `cargo bench --bench spectra` (add `-- --quick` for a short run).

use gainguard_examples::model;

use std::time::{Duration, Instant};

use gainguard::daemon::Sink;
use gainguard::data::MarkovCorpus;
use gainguard::monitor::{SamplerConfig, SpectrumSampler};
use gainguard::spectra::{Estimator, EstimatorConfig};
use gainguard::{AdamWConfig, BaseShapes, WidthScaledAdamW};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64())
}

fn svd_sigma_max(a: &Tensor) -> f64 {
    let (_, s, _) = a.svd(true, false);
    s.double_value(&[0])
}

fn sigma_max_vs_svd(quick: bool) {
    println!("## warm-started sigma_max vs full SVD (fp32, CPU, {} threads)", tch::get_num_threads());
    println!("| matrix | kind | full SVD ms | cold ms (iters) | warm ms (iters) | warm speedup | warm rel. error |");
    println!("|---|---|---|---|---|---|---|");
    let shapes: &[(i64, i64)] = if quick { &[(1024, 1024)] } else { &[(1024, 1024), (2048, 2048), (4096, 1024)] };
    for &(m, n) in shapes {
        for kind in ["gaussian", "trained-like"] {
            let g = Tensor::randn([m, n], (Kind::Float, Device::Cpu));
            // Trained-like: a power-law spectrum on top of the Gaussian bulk (a clear top gap).
            let a = if kind == "gaussian" {
                g / (n as f64).sqrt()
            } else {
                let r = 32;
                let u = Tensor::linalg_qr(&Tensor::randn([m, r], (Kind::Float, Device::Cpu)), "reduced").0;
                let v = Tensor::linalg_qr(&Tensor::randn([n, r], (Kind::Float, Device::Cpu)), "reduced").0;
                let s = Tensor::arange(r, (Kind::Float, Device::Cpu)).g_add_scalar(1.0).pow_tensor_scalar(-0.5) * 6.0;
                (u * s.unsqueeze(0)).matmul(&v.tr()) + g / (n as f64).sqrt()
            };
            let mut est = Estimator::new(EstimatorConfig::default());
            let (cold, t_cold) = time(|| est.estimate(&a).unwrap());
            // One small update (relative size ~1e-3), as between two samples of a training run.
            let a2 = &a + Tensor::randn([m, n], (Kind::Float, Device::Cpu)) * (1e-3 / (n as f64).sqrt());
            let (sigma_svd, t_svd) = time(|| svd_sigma_max(&a2));
            let (warm, t_warm) = time(|| est.estimate(&a2).unwrap());
            let err = (warm.sigma_max - sigma_svd).abs() / sigma_svd;
            println!(
                "| {m}×{n} | {kind} | {:.1} | {:.1} ({}) | {:.1} ({}) | {:.1}× | {:.1e} |",
                t_svd * 1e3,
                t_cold * 1e3,
                cold.iterations,
                t_warm * 1e3,
                warm.iterations,
                t_svd / t_warm,
                err
            );
        }
    }
}

const BASE_D: i64 = 64;

fn step_overhead(quick: bool, budget: Option<f64>, interval: u64) {
    let (d, layers, vocab, seq, batch) = (320, 4, 512, 64, 8);
    let cfg = model::Config::new(vocab, d, BASE_D, layers, seq);
    let base_vs = VarStore::new(Device::Cpu);
    let _ = model::llama(base_vs.root(), &model::Config::new(vocab, BASE_D, BASE_D, layers, seq));
    let base = BaseShapes::from_var_store(&base_vs);
    let vs = VarStore::new(Device::Cpu);
    let m = model::llama(vs.root(), &cfg);
    let params: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
    let adamw = AdamWConfig { lr: 3e-3, weight_decay: 0.1, ..Default::default() };
    let mut off = WidthScaledAdamW::new(&vs, &base, adamw.clone()).unwrap();
    let mut on = WidthScaledAdamW::new(&vs, &base, adamw).unwrap();
    let (tx, rx) = crossbeam_channel::bounded(1 << 20);
    let config = SamplerConfig { interval, budget_fraction: budget, ..Default::default() };
    let sampler = SpectrumSampler::new(config, on.plan(), Sink::from_sender(tx)).unwrap();
    let handle = sampler.handle();
    let matrices = sampler.sampled_params().len();
    on.add_observer(Box::new(sampler));
    let corpus = MarkovCorpus::new(vocab as usize, 4, 1);
    let mut step = 0u64;
    let mut block = |opt: &mut WidthScaledAdamW, steps: u64| {
        let t = Instant::now();
        for _ in 0..steps {
            let ids = Tensor::from_slice(&corpus.batch(step, batch as usize, seq as usize)).view([batch, seq]);
            opt.zero_grad();
            m.loss(&ids).backward();
            opt.step();
            step += 1;
        }
        t.elapsed().as_secs_f64()
    };
    // Warm-up both paths (first steps allocate; the first samples are cold starts).
    block(&mut off, 5);
    block(&mut on, 20);
    let (pairs, steps) = if quick { (3, 20) } else { (8, 30) };
    let mut ratios = Vec::new();
    let (mut t_on, mut t_off) = (0.0, 0.0);
    for i in 0..pairs {
        // Alternate which goes first so that drift hits both alike.
        let (a, b) = if i % 2 == 0 {
            let a = block(&mut on, steps);
            (a, block(&mut off, steps))
        } else {
            let b = block(&mut off, steps);
            (block(&mut on, steps), b)
        };
        t_on += a;
        t_off += b;
        ratios.push(a / b);
    }
    handle.finish(Duration::from_secs(30));
    let emitted = rx.try_iter().count();
    let budget_s = match budget {
        Some(b) => format!("{:.0}% of step time", b * 100.0),
        None if interval > 1_000_000 => "control: attached, never samples".to_string(),
        None => "none (fixed interval)".to_string(),
    };
    println!(
        "| d_model {d}, {layers} layers, {:.1}M params, {matrices} matrices | {budget_s} | {:.1} | {:.1} | {:+.2}% | {} | {} | {} |",
        params as f64 / 1e6,
        t_off / (pairs * steps) as f64 * 1e3,
        t_on / (pairs * steps) as f64 * 1e3,
        (median(ratios) - 1.0) * 100.0,
        emitted,
        handle.dropped_total(),
        handle.current_interval(),
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    sigma_max_vs_svd(quick);
    println!();
    println!("## training-step overhead, sampling every 10 steps vs off (median of interleaved block ratios)");
    println!("| model | budget | off ms/step | on ms/step | overhead (median) | samples emitted | dropped | final interval |");
    println!("|---|---|---|---|---|---|---|---|");
    step_overhead(quick, Some(0.01), 10);
    step_overhead(quick, None, 10);
    // Control: the sampler attached with an interval no run reaches, to see the noise floor of the method.
    step_overhead(quick, None, u64::MAX / 2);
}
