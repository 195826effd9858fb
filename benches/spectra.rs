//! Spectra benchmarks: ratios against a baseline measured in the same run (see BENCHMARKS.md).
//!
//! 1. warm-started sigma_max (block Krylov, after a small update) vs a full SVD (singular values
//!    only) and vs its memory floor: the reads of W the estimate makes × W's bytes ÷ the bandwidth of
//!    a plain read of W, timed interleaved with it in the same cache state. Before each timed call a
//!    buffer four times the L3 size is read, so that W comes from DRAM, as a snapshot does when the
//!    sampler's worker gets to it; the same figures with W left in the cache follow ("hot"). The
//!    relative error is against a float64 SVD;
//! 2. the training-step overhead of the example LLaMA model with the sampler on (every 10 steps) vs
//!    off, interleaved, as the median ratio of block times (CPU only).
//!
//! `cargo bench --bench spectra` (add `-- --quick` for a short run, `-- --sigma-only` for part 1 only).
//! `GAINGUARD_BENCH_DEVICE=cuda` runs part 1 on the GPU (`scripts/device-check.sh` does);
//! `GAINGUARD_BENCH_THREADS=N` sets libtorch's threads (the SVD's) and so the estimate's (default: libtorch's);
//! `GAINGUARD_SPECTRA_KERNELS=avx2` (or `portable`) times a slower code path of the passes than this CPU's best.

use gainguard_examples::model;

use std::time::{Duration, Instant};

use gainguard::protocol::Sink;
use gainguard::data::MarkovCorpus;
use gainguard::spectra::{frobenius_norm, kernels, Estimator, EstimatorConfig};
use gainguard::{AdamWConfig, BaseShapes, Monitor, SamplerConfig, WidthScaledAdamW};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn time<T>(device: Device, f: impl FnOnce() -> T) -> (T, f64) {
    sync(device);
    let t = Instant::now();
    let r = f();
    sync(device);
    (r, t.elapsed().as_secs_f64())
}

/// The full SVD the estimate replaces, singular values only: LAPACK's on the CPU, cuSOLVER's Jacobi
/// driver (the fastest) on CUDA.
fn svd_sigma_max(a: &Tensor) -> f64 {
    if a.device() == Device::Cpu {
        a.svd(true, false).1.double_value(&[0])
    } else {
        Tensor::linalg_svdvals(a, "gesvdj").double_value(&[0])
    }
}

/// A plain read of every element of `w`, the fastest of two readers: our one-pass float64 sum of
/// squares (on the CPU) and libtorch's `sum`. `before` runs ahead of each reader: the flush that evicts
/// `w` (the second reader would otherwise find it in the cache the first left it in), or nothing.
fn read_once(w: &Tensor, device: Device, before: &dyn Fn()) -> f64 {
    before();
    let (_, torch) = time(device, || w.sum(Kind::Float).double_value(&[]));
    if device != Device::Cpu {
        return torch;
    }
    before();
    let (_, ours) = time(device, || frobenius_norm(w));
    ours.min(torch)
}

struct Row {
    shape: (i64, i64),
    kind: &'static str,
    svd: f64,
    cold: f64,
    cold_iters: u32,
    warm: f64,
    warm_iters: u32,
    read: f64,
    warm_hot: f64,
    read_hot: f64,
    rel_err: f64,
}

fn sigma_max_vs_svd(quick: bool, device: Device) {
    // Four times a 32 MiB L3 (the development machine's); reading it evicts W.
    let flush_buf = Tensor::ones([32 << 20], (Kind::Float, device));
    let flush = || {
        let _ = flush_buf.sum(Kind::Float).double_value(&[]);
    };
    let shapes: &[(i64, i64)] = if quick { &[(1024, 1024)] } else { &[(1024, 1024), (2048, 2048), (4096, 1024), (1024, 4096)] };
    let calls = if quick { 11 } else { 15 };
    let mut rows = Vec::new();
    for &(m, n) in shapes {
        for kind in ["gaussian", "trained-like"] {
            let opts = (Kind::Float, device);
            let g = Tensor::randn([m, n], opts);
            // Trained-like: a power-law spectrum on top of the Gaussian bulk (a clear top gap).
            let a = if kind == "gaussian" {
                g / (n as f64).sqrt()
            } else {
                let r = 32;
                let u = Tensor::linalg_qr(&Tensor::randn([m, r], opts), "reduced").0;
                let v = Tensor::linalg_qr(&Tensor::randn([n, r], opts), "reduced").0;
                let s = Tensor::arange(r, opts).g_add_scalar(1.0).pow_tensor_scalar(-0.5) * 6.0;
                (u * s.unsqueeze(0)).matmul(&v.tr()) + g / (n as f64).sqrt()
            };
            // Two small updates (relative size ~1e-3, as between two samples of a training run); the
            // timed calls alternate between them, each warm-started from the other's answer.
            let step = |a: &Tensor| a + Tensor::randn([m, n], opts) * (1e-3 / (n as f64).sqrt());
            let updated = [step(&a), step(&a)];
            let mut est = Estimator::new(EstimatorConfig::default());
            flush();
            let (cold, t_cold) = time(device, || est.estimate(&a).unwrap());
            let svd = median((0..if m * n > 2 << 20 { 3 } else { 5 }).map(|_| time(device, || svd_sigma_max(&updated[0])).1).collect());
            let truth = updated[0].to_device(Device::Cpu).to_kind(Kind::Double).svd(true, false).1.double_value(&[0]);
            let (mut warm, mut reads, mut warm_hot, mut reads_hot) = (vec![], vec![], vec![], vec![]);
            let mut warm_iters = 0;
            let mut rel_err = 0f64;
            est.estimate(&updated[1]).unwrap();
            for i in 0..calls {
                let w = &updated[i % 2];
                flush();
                let (e, t) = time(device, || est.estimate(w).unwrap());
                warm.push(t);
                warm_iters = warm_iters.max(e.iterations);
                if i % 2 == 0 {
                    rel_err = rel_err.max((e.sigma_max - truth).abs() / truth);
                }
                reads.push(read_once(w, device, &flush));
                // The same W again, left in the cache by the read just before (the warm start is then
                // from W's own answer: still two iterations).
                warm_hot.push(time(device, || est.estimate(w).unwrap()).1);
                reads_hot.push(read_once(w, device, &|| ()));
            }
            rows.push(Row {
                shape: (m, n),
                kind,
                svd,
                cold: t_cold,
                cold_iters: cold.iterations,
                warm: median(warm),
                warm_iters,
                read: median(reads),
                warm_hot: median(warm_hot),
                read_hot: median(reads_hot),
                rel_err,
            });
        }
    }
    print_sigma_max_tables(&rows, calls, device);
}

/// The two tables of part 1: W evicted before each call, then W left in the cache.
fn print_sigma_max_tables(rows: &[Row], calls: usize, device: Device) {
    let bytes_of = |m: i64, n: i64| (m * n * 4) as f64;
    let threads = if device == Device::Cpu { format!("{} threads, {} kernels", tch::get_num_threads(), kernels()) } else { format!("{device:?}") };
    println!("## warm-started sigma_max vs full SVD and vs its memory floor (fp32, {threads}, median of {calls} warm calls)");
    println!();
    println!("W evicted from the caches before each timed call. floor = reads × W bytes ÷ bandwidth, where reads = passes over W the");
    println!("warm estimate made (one per iteration on the CPU) and the bandwidth is a plain read of the same W, the faster of two");
    println!("readers, each after its own eviction, timed interleaved with the estimates. The last ratio counts the reads of two block-Krylov iterations one by one");
    println!("(the norm, A·Q, Aᵀ·B, A·Q: 4), where the CPU pass here fuses them into 2 reads from memory.");
    println!();
    println!("| matrix | kind | full SVD ms | cold ms (iters) | cold ÷ SVD | warm ms (iters) | **SVD ÷ warm** | read of W ms (GB/s) | floor ms (reads) | **warm ÷ floor** | warm rel. error vs f64 SVD | warm ÷ 4-read floor |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    // On CUDA the products are libtorch's: A·Q and Bᵀ·A read W twice per full iteration, A·Q once on
    // the last, and the float64 norm once more.
    let reads_of = |iters: u32| if device == Device::Cpu { iters as f64 } else { 2.0 * iters as f64 };
    for r in rows {
        let (m, n) = r.shape;
        let floor = reads_of(r.warm_iters) * r.read;
        println!(
            "| {m}×{n} | {} | {:.1} | {:.1} ({}) | {:.2} | {:.3} ({}) | **{:.0}×** | {:.3} ({:.1}) | {:.3} ({}) | **{:.2}×** | {:.1e} | {:.2}× |",
            r.kind,
            r.svd * 1e3,
            r.cold * 1e3,
            r.cold_iters,
            r.cold / r.svd,
            r.warm * 1e3,
            r.warm_iters,
            r.svd / r.warm,
            r.read * 1e3,
            bytes_of(m, n) / r.read / 1e9,
            floor * 1e3,
            reads_of(r.warm_iters),
            r.warm / floor,
            r.rel_err,
            r.warm / (4.0 * r.read),
        );
    }
    println!();
    println!("W left in the cache (back-to-back calls; the floor's bandwidth is then the cache's):");
    println!();
    println!("| matrix | kind | warm ms | SVD ÷ warm | read of W ms (GB/s) | floor ms | warm ÷ floor |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let (m, n) = r.shape;
        let floor = reads_of(r.warm_iters) * r.read_hot;
        println!(
            "| {m}×{n} | {} | {:.3} | {:.0}× | {:.3} ({:.1}) | {:.3} | {:.2}× |",
            r.kind,
            r.warm_hot * 1e3,
            r.svd / r.warm_hot,
            r.read_hot * 1e3,
            bytes_of(m, n) / r.read_hot / 1e9,
            floor * 1e3,
            r.warm_hot / floor
        );
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
    let _mon = Monitor::builder("bench").sampler(config).to_sink(Sink::from_sender(tx)).attach(&mut on).unwrap();
    let handle = _mon.sampler().unwrap().clone();
    let matrices = handle.sampled_params().len();
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
    // Spectra only: the monitor also sent its Hello and rule table.
    let emitted = rx.try_iter().filter(|e: &gainguard::protocol::events::Envelope| matches!(e.event, gainguard::protocol::events::Event::Spectrum(_))).count();
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
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let sigma_only = args.iter().any(|a| a == "--sigma-only");
    let device = match std::env::var("GAINGUARD_BENCH_DEVICE").ok().as_deref() {
        None | Some("") | Some("cpu") => Device::Cpu,
        Some(other) => gainguard::device::parse_device(other).unwrap_or_else(|e| panic!("GAINGUARD_BENCH_DEVICE: {e}")),
    };
    if let Some(n) = std::env::var("GAINGUARD_BENCH_THREADS").ok().and_then(|v| v.parse().ok()) {
        tch::set_num_threads(n);
    }
    println!("load average at start: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    tch::no_grad(|| sigma_max_vs_svd(quick, device));
    if sigma_only || device != Device::Cpu {
        return;
    }
    println!();
    println!("## training-step overhead, sampling every 10 steps vs off (median of interleaved block ratios)");
    println!("| model | budget | off ms/step | on ms/step | overhead (median) | samples emitted | dropped | final interval |");
    println!("|---|---|---|---|---|---|---|---|");
    step_overhead(quick, Some(0.01), 10);
    step_overhead(quick, None, 10);
    // Control: the sampler attached with an interval no run reaches, to see the noise floor of the method.
    step_overhead(quick, None, u64::MAX / 2);
    println!("load average at end: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
}
