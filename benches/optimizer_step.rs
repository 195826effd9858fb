//! Optimizer step time on the example LLaMA at ~23M parameters on CPU: our fused step, our reference
//! (non-fused) step, libtorch's C++ AdamW and PyTorch's `torch.optim.AdamW(fused=True)`, with the same
//! shapes, (lr, wd) groups and thread count, against the memory-traffic floor measured in the same run.
//!
//! `cargo bench --bench optimizer_step` (results in BENCHMARKS.md). Settings by environment:
//! `GAINGUARD_BENCH_STEPS` (timed steps per variant, default 30), `GAINGUARD_PYTHON` (the interpreter
//! with torch; default: the project's venv).

#[path = "../examples/llama/model.rs"]
mod model;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use gainguard::{AdamWConfig, BaseShapes, WidthScaledAdamW};
use tch::nn::VarStore;
use tch::{COptimizer, Device, Kind, Tensor};

const VOCAB: i64 = 4096;
const D: i64 = 512;
const BASE_D: i64 = 128;
const LAYERS: i64 = 6;
const WARMUP: usize = 5;
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

fn build(d: i64) -> VarStore {
    let vs = VarStore::new(Device::Cpu);
    let _ = model::llama(vs.root(), &model::Config::new(VOCAB, d, BASE_D, LAYERS, 64));
    vs
}

/// Copy bandwidth in bytes/s: a 256 MiB fp32 `copy_`, counting 2× its size (read + write).
fn copy_bandwidth() -> f64 {
    let n = 64 << 20;
    let src = Tensor::rand([n], (Kind::Float, Device::Cpu));
    let mut dst = Tensor::zeros([n], (Kind::Float, Device::Cpu));
    let mut samples = Vec::new();
    for i in 0..12 {
        let t = Instant::now();
        dst.copy_(&src);
        let s = t.elapsed().as_secs_f64();
        if i >= 2 {
            samples.push(s);
        }
    }
    (2 * 4 * n) as f64 / median(&samples)
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
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_torch_adamw.py");
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
    let steps: usize = std::env::var("GAINGUARD_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let threads = tch::get_num_threads();
    println!("load average before: {}", load_average());
    println!("threads: {threads} (libtorch's default here; PyTorch is set to the same)");

    let base = BaseShapes::from_var_store(&build(BASE_D));
    let vs = build(D);
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let numel: usize = named.iter().map(|(_, t)| t.numel()).sum();
    println!("model: LLaMA d_model {D}, {LAYERS} layers, vocab {VOCAB}: {numel} parameters in {} tensors", named.len());

    // Gradients filled once with random values: d/dp Σ p·r = r.
    tch::manual_seed(0);
    for (_, p) in &named {
        let r = Tensor::randn(p.size(), (Kind::Float, Device::Cpu)) * 1e-3;
        (p * r).sum(Kind::Float).backward();
    }

    let cfg = AdamWConfig { lr: 1e-3, weight_decay: 0.1, ..Default::default() };
    let mut fused = WidthScaledAdamW::new(&vs, &base, AdamWConfig { fused: true, ..cfg.clone() }).unwrap();
    let mut reference = WidthScaledAdamW::new(&vs, &base, AdamWConfig { fused: false, ..cfg.clone() }).unwrap();
    assert!(gainguard::fused::available(), "built without the fused AdamW shim");
    let mut libtorch = COptimizer::adamw(cfg.lr, cfg.beta1, cfg.beta2, 0.0, cfg.eps, false).unwrap();
    let mut groups_json = Vec::new();
    for (gi, g) in fused.groups().iter().enumerate() {
        let members: Vec<usize> = g.members.iter().map(|&si| fused.slots()[si].decision).collect();
        for &si in &g.members {
            libtorch.add_parameters(&fused.slots()[si].tensor, gi).unwrap();
        }
        libtorch.set_learning_rate_group(gi, g.lr).unwrap();
        libtorch.set_weight_decay_group(gi, g.weight_decay).unwrap();
        groups_json.push(serde_json::json!({"lr": g.lr, "weight_decay": g.weight_decay, "members": members}));
    }
    println!("{} (lr, wd) groups", fused.groups().len());
    let shapes: Vec<Vec<i64>> = named.iter().map(|(_, t)| t.size()).collect();
    let spec = serde_json::json!({
        "shapes": shapes, "groups": groups_json, "warmup": WARMUP, "steps": steps, "threads": threads,
        "variants": ["fused", "for-loop"],
    });

    let bandwidth = copy_bandwidth();
    let floor_ms = (BYTES_PER_ELEMENT * numel) as f64 / bandwidth * 1e3;

    // PyTorch before and after ours, to see drift from other load; ours interleaved step by step.
    let mut py = pytorch_samples(&spec);
    let names = ["ours fused", "ours reference (non-fused)", "libtorch AdamW (tch::COptimizer)"];
    let mut ours: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 0..WARMUP + steps {
        for k in 0..names.len() {
            let v = (k + round) % names.len();
            let t = Instant::now();
            match v {
                0 => {
                    fused.step();
                }
                1 => {
                    reference.step();
                }
                _ => libtorch.step().unwrap(),
            }
            if round >= WARMUP {
                ours[v].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    for (name, samples) in pytorch_samples(&spec) {
        match py.iter_mut().find(|(n, _)| *n == name) {
            Some((_, s)) => s.extend(samples),
            None => py.push((name, samples)),
        }
    }

    let mut rows: Vec<(String, f64, usize)> =
        names.iter().zip(&ours).map(|(n, s)| (n.to_string(), median(s), s.len())).collect();
    rows.extend(py.iter().map(|(n, s)| (n.clone(), median(s), s.len())));
    let pytorch_fused = rows.iter().find(|r| r.0.contains("fused (torch")).map(|r| r.1);
    let libtorch_ms = rows[2].1;

    println!();
    println!(
        "memory-traffic floor: {BYTES_PER_ELEMENT} B/param × {numel} = {:.0} MB per step at {:.1} GB/s copy bandwidth = {floor_ms:.2} ms",
        (BYTES_PER_ELEMENT * numel) as f64 / 1e6,
        bandwidth / 1e9
    );
    println!("{:<50} {:>10} {:>8} {:>12} {:>12} {:>9}", "variant", "median ms", "steps", "÷ PT fused", "÷ libtorch", "÷ floor");
    for (name, ms, n) in &rows {
        let vs_py = pytorch_fused.map_or("-".to_string(), |p| format!("{:.2}×", ms / p));
        println!("{name:<50} {ms:>10.2} {n:>8} {vs_py:>12} {:>11.2}× {:>8.2}×", ms / libtorch_ms, ms / floor_ms);
    }
    println!("load average after: {}", load_average());
}
