//! Optimizer step time on the example LLaMA at ~23M parameters: our fused step (both CPU kernels), our
//! reference (non-fused) step, libtorch's C++ AdamW and PyTorch's `torch.optim.AdamW(fused=True)`, with the
//! same shapes, (lr, wd) groups and thread count, against the memory-traffic floor measured in the same run.
//! Our steps include the gradient check every step makes first (norm and NaN/Inf, one read of the gradients);
//! that check is also timed alone.
//!
//! `cargo bench --bench optimizer_step` (results in BENCHMARKS.md). Settings by environment:
//! `GAINGUARD_BENCH_STEPS` (timed steps per variant, default 30), `GAINGUARD_PYTHON` (the interpreter
//! with torch; default: the project's venv), `GAINGUARD_BENCH_DEVICE` (`cpu`, default, or `cuda`),
//! `GAINGUARD_BENCH_D_MODEL` (default 512; the base width stays 128).

use gainguard_examples::model;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use gainguard::{AdamWConfig, BaseShapes, CpuKernel, NonFiniteGrad, WidthScaledAdamW};
use tch::nn::VarStore;
use tch::{COptimizer, Device, Kind, Tensor};

const VOCAB: i64 = 4096;
const BASE_D: i64 = 128;
const LAYERS: i64 = 6;
const WARMUP: usize = 5;
/// Blocks of our interleaved steps, with a PyTorch run before each and after the last.
const ROUNDS: usize = 3;
const PROBE: &str = "stream probe: the step's traffic, no math (floor)";
const CHECK: &str = "gradient check alone (fused Σg² pass, in every step)";
const UNCHECKED: &str = "ours fused, nonfinite_grad: Step (no check, as torch)";
const BYTES_PER_ELEMENT: usize = 28; // fp32: param r+w 8, grad r 4, first moment r+w 8, second moment r+w 8

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn build(d: i64, device: Device) -> VarStore {
    let vs = VarStore::new(device);
    let _ = model::llama(vs.root(), &model::Config::new(VOCAB, d, BASE_D, LAYERS, 64));
    vs
}

/// Waits for the device's queued work (a no-op on CPU), so wall time covers the kernels.
fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Streaming bandwidth in bytes/s, measured two ways on 256 MiB fp32 buffers with libtorch's own
/// multi-threaded kernels, returning (copy, in-place add). Context on CPU, where the floor is the stream
/// probe (the step's own traffic); on CUDA the higher of the two sets the floor.
/// - `dst.copy_(src)`, counted as 2 × size. On CPU the write also reads `dst` first (write-allocate), so
///   this undercounts the traffic by up to a third;
/// - `a.add_(b)`, counted as 3 × size (read a, read b, write a). It reads every line it writes, as the
///   AdamW step does (θ, m, v are read, then written in place).
fn bandwidths(device: Device) -> (f64, f64) {
    let n = 64 << 20;
    let src = Tensor::rand([n], (Kind::Float, device));
    let mut dst = Tensor::zeros([n], (Kind::Float, device));
    let time = |f: &mut dyn FnMut()| {
        let mut samples = Vec::new();
        for i in 0..12 {
            sync(device);
            let t = Instant::now();
            f();
            sync(device);
            if i >= 2 {
                samples.push(t.elapsed().as_secs_f64());
            }
        }
        median(&samples)
    };
    let copy = (2 * 4 * n) as f64 / time(&mut || {
        dst.copy_(&src);
    });
    let add = (3 * 4 * n) as f64 / time(&mut || {
        let _ = dst.g_add_(&src);
    });
    (copy, add)
}

fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GAINGUARD_PYTHON") {
        return Some(p.into());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let local = root.join(".venv/bin/python");
    if local.exists() {
        return Some(local);
    }
    // LIBTORCH = <venv>/lib/python3.X/site-packages/torch (set by .cargo/config.toml).
    let libtorch = PathBuf::from(std::env::var_os("LIBTORCH")?);
    let venv = libtorch.ancestors().nth(4)?;
    let p = venv.join("bin/python");
    p.exists().then_some(p)
}

/// Runs scripts/bench_torch_adamw.py; returns variant → samples (ms).
fn pytorch_samples(spec: &serde_json::Value) -> Vec<(String, Vec<f64>)> {
    let Some(py) = python() else {
        eprintln!("no Python with torch found (set GAINGUARD_PYTHON); skipping PyTorch");
        return Vec::new();
    };
    let spec_path = std::env::temp_dir().join(format!("gainguard-bench-spec-{}.json", std::process::id()));
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    // The checkout it was built in, else the working directory (a binary carried to another machine).
    let script = [Path::new(env!("CARGO_MANIFEST_DIR")), Path::new(".")]
        .iter()
        .map(|root| root.join("scripts/bench_torch_adamw.py"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("scripts/bench_torch_adamw.py"));
    let out = Command::new(&py).arg(&script).arg(&spec_path).output().expect("running the PyTorch bench");
    let _ = std::fs::remove_file(&spec_path);
    if !out.status.success() {
        eprintln!("{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr));
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            let samples = v["samples_ms"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            (format!("PyTorch AdamW {} (torch {}, {} threads)", v["variant"].as_str().unwrap(), v["torch"], v["threads"]), samples)
        })
        .collect()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn main() {
    let env = |k: &str| std::env::var(k).ok();
    let steps: usize = env("GAINGUARD_BENCH_STEPS").and_then(|s| s.parse().ok()).unwrap_or(30);
    let d_model: i64 = env("GAINGUARD_BENCH_D_MODEL").and_then(|s| s.parse().ok()).unwrap_or(512);
    let device = match env("GAINGUARD_BENCH_DEVICE").as_deref() {
        None | Some("cpu") => Device::Cpu,
        Some(other) => gainguard::device::parse_device(other).unwrap_or_else(|e| panic!("GAINGUARD_BENCH_DEVICE: {e}")),
    };
    let threads = tch::get_num_threads();
    println!("load average before: {}", load_average());
    println!("device: {device:?}; threads: {threads} (libtorch's default here; PyTorch is set to the same)");
    if let Device::Cuda(_) = device {
        let smi = Command::new("nvidia-smi").args(["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]).output();
        if let Ok(o) = smi {
            println!("card: {}", String::from_utf8_lossy(&o.stdout).trim());
        }
    }

    let base = BaseShapes::from_var_store(&build(BASE_D, Device::Cpu));
    let vs = build(d_model, device);
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let numel: usize = named.iter().map(|(_, t)| t.numel()).sum();
    println!("model: LLaMA d_model {d_model}, {LAYERS} layers, vocab {VOCAB}: {numel} parameters in {} tensors", named.len());

    // Gradients filled once with random values: d/dp Σ p·r = r.
    tch::manual_seed(0);
    for (_, p) in &named {
        let r = Tensor::randn(p.size(), (Kind::Float, device)) * 1e-3;
        (p * r).sum(Kind::Float).backward();
    }

    let mut variants = Variants::new(&vs, &base, device, named.iter().map(|(_, p)| p.grad()).collect());
    let shapes: Vec<Vec<i64>> = named.iter().map(|(_, t)| t.size()).collect();
    let spec = serde_json::json!({
        "shapes": shapes, "groups": variants.groups_json(), "warmup": WARMUP, "steps": steps, "threads": threads,
        "device": if device == Device::Cpu { "cpu".to_string() } else { format!("cuda:{}", match device { Device::Cuda(i) => i, _ => 0 }) },
        "variants": if device == Device::Cpu { vec!["fused", "fused+check", "for-loop"] } else { vec!["fused", "fused+check", "foreach", "for-loop"] },
    });

    let (copy_bw, add_bw) = bandwidths(device);
    if device == Device::Cpu {
        assert_eq!(variants.fused.stream_probe().unwrap(), numel, "the probe must cover every parameter");
    }
    let (ours, py) = time_rounds(&mut variants, &spec, steps, device);
    let mut rows: Vec<(String, f64, usize)> =
        variants.names.iter().zip(&ours).map(|(n, s)| (n.to_string(), median(s), s.len())).collect();
    rows.extend(py.iter().map(|(n, s)| (n.clone(), median(s), s.len())));
    print_rows(&rows, numel, copy_bw, add_bw);
    if device == Device::Cpu {
        drop(variants);
        mixed_precision(&base, d_model, steps.min(10));
    }
    println!("load average after: {}", load_average());
}

/// Every step timed in this process, in the order of `names`.
struct Variants {
    names: Vec<&'static str>,
    fused: WidthScaledAdamW,
    reference: WidthScaledAdamW,
    libtorch: COptimizer,
    /// On CPU, the fused step with ATen's kernel (the one PyTorch's fused=True runs) called from this
    /// process: it separates "our loop vs ATen's loop" from "this process vs the Python one".
    aten: Option<WidthScaledAdamW>,
    /// The default step without its gradient check: what the check costs, and our loop against PyTorch's alone.
    unchecked: Option<WidthScaledAdamW>,
    /// What every step now reads first: the gradients' norm and finiteness (one read of g).
    grads: Vec<Tensor>,
}

impl Variants {
    fn new(vs: &VarStore, base: &BaseShapes, device: Device, grads: Vec<Tensor>) -> Variants {
        let cfg = AdamWConfig { lr: 1e-3, weight_decay: 0.1, ..Default::default() };
        let fused = WidthScaledAdamW::new(vs, base, AdamWConfig { fused: true, ..cfg.clone() }).unwrap();
        let reference = WidthScaledAdamW::new(vs, base, AdamWConfig { fused: false, ..cfg.clone() }).unwrap();
        let on_cpu = device == Device::Cpu;
        let aten = on_cpu.then(|| WidthScaledAdamW::new(vs, base, AdamWConfig { cpu_kernel: CpuKernel::Aten, ..cfg.clone() }).unwrap());
        let unchecked =
            on_cpu.then(|| WidthScaledAdamW::new(vs, base, AdamWConfig { nonfinite_grad: NonFiniteGrad::Step, ..cfg.clone() }).unwrap());
        assert!(gainguard::fused::available(), "built without the fused AdamW shim");
        let mut libtorch = COptimizer::adamw(cfg.lr, cfg.beta1, cfg.beta2, 0.0, cfg.eps, false).unwrap();
        for (gi, g) in fused.groups().iter().enumerate() {
            for &si in &g.members {
                libtorch.add_parameters(&fused.slots()[si].tensor, gi).unwrap();
            }
            libtorch.set_learning_rate_group(gi, g.lr).unwrap();
            libtorch.set_weight_decay_group(gi, g.weight_decay).unwrap();
        }
        println!("{} (lr, wd) groups", fused.groups().len());
        let mut names = vec!["ours fused (default)", "ours reference (non-fused)", "libtorch AdamW (tch::COptimizer)"];
        if on_cpu {
            names.extend(["ours fused, cpu_kernel: Aten", PROBE, CHECK, UNCHECKED]);
        }
        Variants { names, fused, reference, libtorch, aten, unchecked, grads }
    }

    /// The (lr, wd) groups with their members' plan indices, for the PyTorch side.
    fn groups_json(&self) -> Vec<serde_json::Value> {
        let f = &self.fused;
        f.groups()
            .iter()
            .map(|g| {
                let members: Vec<usize> = g.members.iter().map(|&si| f.slots()[si].decision).collect();
                serde_json::json!({"lr": g.lr, "weight_decay": g.weight_decay, "members": members})
            })
            .collect()
    }

    fn run(&mut self, v: usize) {
        match v {
            0 => drop(self.fused.step()),
            1 => drop(self.reference.step()),
            2 => self.libtorch.step().unwrap(),
            3 => drop(self.aten.as_mut().unwrap().step()),
            4 => drop(self.fused.stream_probe().unwrap()),
            5 => drop(gainguard::fused::sum_squares(&self.grads.iter().collect::<Vec<_>>()).unwrap()),
            _ => drop(self.unchecked.as_mut().unwrap().step()),
        }
    }
}

/// Ours interleaved step by step, with the stream probe (the floor, CPU only) as one more variant; PyTorch
/// in its own process between ROUNDS blocks of ours (and after the last), so that slow drift in the
/// machine's load reaches both sides alike. Returns our samples per variant and PyTorch's by name (ms).
fn time_rounds(variants: &mut Variants, spec: &serde_json::Value, steps: usize, device: Device) -> (Vec<Vec<f64>>, Vec<(String, Vec<f64>)>) {
    let mut py: Vec<(String, Vec<f64>)> = Vec::new();
    let add_python = |py: &mut Vec<(String, Vec<f64>)>| {
        for (name, samples) in pytorch_samples(spec) {
            match py.iter_mut().find(|(n, _)| *n == name) {
                Some((_, s)) => s.extend(samples),
                None => py.push((name, samples)),
            }
        }
    };
    let count = variants.names.len();
    let mut ours: Vec<Vec<f64>> = vec![Vec::new(); count];
    let per_round = steps.div_ceil(ROUNDS);
    for block in 0..ROUNDS {
        add_python(&mut py);
        let warmup = if block == 0 { WARMUP } else { 0 };
        for round in 0..warmup + per_round {
            for k in 0..count {
                let v = (k + round) % count;
                sync(device);
                let t = Instant::now();
                variants.run(v);
                sync(device);
                if round >= warmup {
                    ours[v].push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
    }
    add_python(&mut py);
    (ours, py)
}

/// The table: each variant's median against PyTorch's fused step, libtorch's AdamW (row 2) and the floor
/// (on CPU the probe with the step's own traffic; on CUDA the better of the two streams).
fn print_rows(rows: &[(String, f64, usize)], numel: usize, copy_bw: f64, add_bw: f64) {
    let traffic = (BYTES_PER_ELEMENT * numel) as f64;
    let pytorch_fused = rows.iter().find(|r| r.0.contains("fused (torch")).map(|r| r.1);
    let libtorch_ms = rows[2].1;
    let probe_ms = rows.iter().find(|r| r.0 == PROBE).map(|r| r.1);
    let floor_ms = probe_ms.unwrap_or_else(|| traffic / copy_bw.max(add_bw) * 1e3);

    println!();
    println!(
        "bandwidth: copy_ {:.1} GB/s (2 × size), in-place add_ {:.1} GB/s (3 × size) (the floor: on CPU the probe below, on CUDA the higher of these)",
        copy_bw / 1e9,
        add_bw / 1e9
    );
    match probe_ms {
        Some(ms) => println!(
            "memory-traffic floor: {BYTES_PER_ELEMENT} B/param × {numel} = {:.0} MB per step; the stream probe moving exactly that (reads p, g, m, v, writes p, m, v, no math) takes {ms:.2} ms = {:.1} GB/s",
            traffic / 1e6,
            traffic / ms / 1e6
        ),
        None => println!(
            "memory-traffic floor: {BYTES_PER_ELEMENT} B/param × {numel} = {:.0} MB per step at {:.1} GB/s = {floor_ms:.2} ms",
            traffic / 1e6,
            copy_bw.max(add_bw) / 1e9
        ),
    }
    println!("{:<50} {:>10} {:>8} {:>12} {:>12} {:>9}", "variant", "median ms", "steps", "÷ PT fused", "÷ libtorch", "÷ floor");
    for (name, ms, n) in rows {
        let vs_py = pytorch_fused.map_or("-".to_string(), |p| format!("{:.2}×", ms / p));
        println!("{name:<50} {ms:>10.2} {n:>8} {vs_py:>12} {:>11.2}× {:>8.2}×", ms / libtorch_ms, ms / floor_ms);
    }
    // Like with like: our default step (with its gradient check) against PyTorch's fused step behind its own
    // non-finite check; ours without the check against PyTorch's fused step alone.
    let find = |name: &str| rows.iter().find(|r| r.0.starts_with(name)).map(|r| r.1);
    if let (Some(ours), Some(theirs)) = (find("ours fused (default)"), find("PyTorch AdamW fused+check")) {
        println!("ours fused (default, checked) ÷ PyTorch fused+check: {:.2}×", ours / theirs);
    }
    if let (Some(ours), Some(theirs)) = (find(UNCHECKED), pytorch_fused) {
        println!("ours fused, no check ÷ PyTorch fused: {:.2}×", ours / theirs);
    }
}

/// Mixed precision on CPU (bf16 parameters and gradients, f32 moments): our fused loop against our
/// reference path, same shapes, interleaved. PyTorch's fused step keeps bf16 moments for bf16 parameters,
/// so it is not the same computation and is not compared here.
fn mixed_precision(base: &BaseShapes, d_model: i64, steps: usize) {
    let mut vs = build(d_model, Device::Cpu);
    vs.bfloat16();
    tch::manual_seed(1);
    for (_, p) in vs.variables() {
        let r = (Tensor::randn(p.size(), (Kind::Float, Device::Cpu)) * 1e-3).to_kind(Kind::BFloat16);
        (&p * r).sum(Kind::Float).backward();
    }
    let cfg = AdamWConfig { lr: 1e-3, weight_decay: 0.1, ..Default::default() };
    let mut fused = WidthScaledAdamW::new(&vs, base, AdamWConfig { fused: true, ..cfg.clone() }).unwrap();
    let mut reference = WidthScaledAdamW::new(&vs, base, AdamWConfig { fused: false, ..cfg }).unwrap();
    let mut samples = [Vec::new(), Vec::new()];
    for round in 0..2 + steps {
        for k in 0..2 {
            let v = (k + round) % 2;
            let t = Instant::now();
            if v == 0 {
                fused.step();
            } else {
                reference.step();
            }
            if round >= 2 {
                samples[v].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let (f, r) = (median(&samples[0]), median(&samples[1]));
    println!();
    println!("mixed precision (bf16 parameters and gradients, f32 moments), {steps} steps each:");
    println!("{:<50} {:>10}", "variant", "median ms");
    println!("{:<50} {f:>10.2}", "ours fused (bf16 loop)");
    println!("{:<50} {r:>10.2}", "ours reference (non-fused)");
    println!("fused ÷ reference: {:.2}×", f / r);
}
