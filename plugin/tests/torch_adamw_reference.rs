//! gainguard's AdamW against PyTorch's own `torch.optim.AdamW` and the code each preset is named after, run by
//! `tests/python/adamw_reference.py` in the project's virtualenv.
//!
//! A small model with 3-D MoE expert tensors and biases (width 32 against a base of width 8 and a delta of
//! width 16, so m = 4) takes 100 steps of gradients drawn here and shared through a file. At random steps a
//! random subset of parameters gets no gradient (one of them none at step 0, one none until step 21), and
//! the global norm is clipped at some steps. Per preset, the reference side builds its parameter groups from
//! the namesake's rule (microsoft/mup's own `MuAdamW` for `mup-coupled`, plain
//! `torch.optim.AdamW(model.parameters(), …)` for `standard`, Megatron-LM's muP rule for `mup-fixed-wd`, the
//! paper's for `paper`), with classes from mup's `set_base_shapes(model, base, delta=delta)`; this side checks
//! both of gainguard's paths (fused and reference) against it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use gainguard::{AdamWConfig, BaseShapes, Override, ParamClass, Rule, Schedule, WidthScaledAdamW};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

const STEPS: usize = 100;
const LR: f64 = 1e-2;
const WD: f64 = 0.1;
const EPS: f64 = 1e-6;
const MAX_GRAD_NORM: f64 = 1.0;
const PRESETS: [&str; 4] = ["paper", "mup-coupled", "mup-fixed-wd", "standard"];
/// No gradient at step 0.
const NONE_AT_START: &str = "blocks.0.attn.q.bias";
/// No gradient before this step.
const LATE: (&str, usize) = ("blocks.0.moe.experts.w_out", 21);
/// A 2-D expert bias: vector-like for μP (one width dimension), a hidden matrix for Megatron (dim 2, not an
/// embedding). README: declare it `matrix_like` to match Megatron.
const EXPERT_BIAS: &str = "blocks.0.moe.experts.in.bias";

/// Parameter names and shapes at width `d` (vocabulary 11, 3 experts of hidden size 2d).
fn shapes(d: i64) -> Vec<(String, Vec<i64>)> {
    let (v, e) = (11, 3);
    [
        ("tok_emb.weight", vec![v, d]),
        ("blocks.0.attn_norm.weight", vec![d]),
        ("blocks.0.attn.q.weight", vec![d, d]),
        ("blocks.0.attn.q.bias", vec![d]),
        ("blocks.0.moe.experts.w_in", vec![e, 2 * d, d]),
        ("blocks.0.moe.experts.in.bias", vec![e, 2 * d]),
        ("blocks.0.moe.experts.w_out", vec![e, d, 2 * d]),
        ("norm.weight", vec![d]),
        ("lm_head.weight", vec![v, d]),
        ("lm_head.bias", vec![v]),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect()
}

fn shape_map(d: i64) -> Value {
    shapes(d).into_iter().map(|(n, s)| (n, json!(s))).collect::<serde_json::Map<_, _>>().into()
}

/// SplitMix64, so the inputs do not depend on libtorch's RNG (shared by the tests of this binary).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    fn values(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }
}

/// Initial values and each step's gradients (None: no gradient at that step), by parameter in `shapes` order.
struct Inputs {
    names: Vec<String>,
    shapes: Vec<Vec<i64>>,
    initial: Vec<Vec<f32>>,
    grads: Vec<Vec<Option<Vec<f32>>>>,
}

fn draw_inputs() -> Inputs {
    let mut rng = Rng(20261128);
    let (names, shapes): (Vec<String>, Vec<Vec<i64>>) = shapes(32).into_iter().unzip();
    let numel = |s: &[i64]| s.iter().product::<i64>() as usize;
    let initial = shapes.iter().map(|s| rng.values(numel(s), 0.1)).collect();
    let mut grads = Vec::with_capacity(STEPS);
    for step in 0..STEPS {
        // A step-wide scale around the clipping threshold: the global norm is clipped at some steps only.
        let scale = 0.004 + 0.012 * rng.uniform();
        let row = names
            .iter()
            .zip(&shapes)
            .map(|(name, shape)| {
                let missing = rng.uniform() < 0.25
                    || (step == 0 && name == NONE_AT_START)
                    || (name == LATE.0 && step < LATE.1);
                // q's gradients are as small as eps, so that Adam's eps (which Megatron's muP scales) matters.
                let std = if name == "blocks.0.attn.q.weight" { 1e-6 } else { scale };
                let values = rng.values(numel(shape), std);
                (!missing).then_some(values)
            })
            .collect();
        grads.push(row);
    }
    Inputs { names, shapes, initial, grads }
}

fn schedule() -> Schedule {
    Schedule::WarmupCosine { warmup: 10, total: STEPS as u64, floor: 0.1 }
}

/// Writes the manifest and the inputs for the Python side.
fn write_inputs(dir: &Path, inputs: &Inputs) {
    let mut data: Vec<f32> = Vec::new();
    let mut push = |values: &[f32]| {
        let at = data.len();
        data.extend_from_slice(values);
        at
    };
    let initial: Vec<usize> = inputs.initial.iter().map(|v| push(v)).collect();
    let grads: Vec<Vec<Option<usize>>> = inputs.grads.iter().map(|row| row.iter().map(|g| g.as_deref().map(&mut push)).collect()).collect();
    let manifest = json!({
        "names": inputs.names,
        "shapes": inputs.shapes,
        "base": shape_map(8),
        "delta": shape_map(16),
        "presets": PRESETS,
        "lr": LR, "weight_decay": WD, "eps": EPS, "beta1": 0.9, "beta2": 0.999, "max_grad_norm": MAX_GRAD_NORM,
        "lr_multipliers": (0..STEPS as u64).map(|t| schedule().multiplier(t)).collect::<Vec<f64>>(),
        "initial": initial,
        "grads": grads,
        // Megatron's mup_width_mult (hidden_size / base_hidden_size) and the parameters its LanguageModule marks
        // as embedding-class (word embedding, output layer weight).
        "megatron_width_mult": 4.0,
        "megatron_embedding_class": ["tok_emb.weight", "lm_head.weight"],
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.join("inputs.bin"), bytes).unwrap();
}

/// The project's virtualenv Python (`.venv/bin/python` at the workspace root, else next to LIBTORCH's torch).
fn python() -> PathBuf {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    if local.exists() {
        return local;
    }
    let libtorch = std::env::var_os("LIBTORCH").map(PathBuf::from);
    libtorch
        .as_deref()
        .and_then(|p| p.ancestors().nth(4))
        .map(|venv| venv.join("bin/python"))
        .filter(|p| p.exists())
        .expect("no Python with torch and mup: run `make setup` (scripts/setup-libtorch.sh) first")
}

/// One run of the reference side: its final values, per-parameter step counts and per-parameter groups.
struct Reference {
    final_values: HashMap<String, Vec<f32>>,
    steps: HashMap<String, u64>,
    groups: HashMap<String, (f64, f64, f64)>,
}

fn run_python(dir: &Path) -> HashMap<String, Reference> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/adamw_reference.py");
    let out = Command::new(python()).arg(&script).arg(dir).env("OMP_NUM_THREADS", "1").output().expect("running the Python reference");
    assert!(out.status.success(), "{} failed:\n{}", script.display(), String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let blob: Vec<f32> =
        std::fs::read(dir.join("reference.bin")).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    eprintln!("reference: torch {}, mup {}", meta["torch"], meta["mup"]);
    let numel: HashMap<String, usize> = shapes(32).into_iter().map(|(n, s)| (n, s.iter().product::<i64>() as usize)).collect();
    meta["runs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(key, run)| {
            let final_values = run["final"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(n, at)| {
                    let at = at.as_u64().unwrap() as usize;
                    (n.clone(), blob[at..at + numel[n]].to_vec())
                })
                .collect();
            let steps = run["steps"].as_object().unwrap().iter().map(|(n, s)| (n.clone(), s.as_u64().unwrap())).collect();
            let groups = run["groups"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(n, g)| (n.clone(), (g[0].as_f64().unwrap(), g[1].as_f64().unwrap(), g[2].as_f64().unwrap())))
                .collect();
            (key.clone(), Reference { final_values, steps, groups })
        })
        .collect()
}

/// One of gainguard's runs over the inputs.
struct Ours {
    final_values: HashMap<String, Vec<f32>>,
    steps: HashMap<String, u64>,
    groups: HashMap<String, (f64, f64, f64)>,
    decay_horizon: HashMap<String, f64>,
    /// (step, parameter) pairs at which a parameter without a gradient was checked unchanged.
    untouched: usize,
}

fn config(preset: &str, fused: bool) -> AdamWConfig {
    // Megatron decides by rank, not by width dimensions: the 2-D expert bias is a hidden matrix there.
    let overrides = match preset {
        "mup-fixed-wd" => vec![Override { class: Some(ParamClass::MatrixLike), ..Override::new(EXPERT_BIAS) }],
        _ => Vec::new(),
    };
    AdamWConfig {
        lr: LR,
        weight_decay: WD,
        eps: EPS,
        max_grad_norm: Some(MAX_GRAD_NORM),
        rule: Rule::parse(preset).unwrap(),
        overrides,
        schedule: schedule(),
        fused,
        ..Default::default()
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.detach().reshape([-1])).unwrap()
}

fn run_ours(preset: &str, fused: bool, inputs: &Inputs) -> Ours {
    let params: Vec<Tensor> = inputs
        .initial
        .iter()
        .zip(&inputs.shapes)
        .map(|(v, s)| Tensor::from_slice(v).reshape(s.as_slice()).set_requires_grad(true))
        .collect();
    let named: Vec<(String, Tensor)> = inputs.names.iter().cloned().zip(params.iter().map(|p| p.shallow_clone())).collect();
    let base = BaseShapes::from_json_str(&json!({"base": shape_map(8), "delta": shape_map(16)}).to_string(), "test").unwrap();
    let mut opt = WidthScaledAdamW::from_named(named, &base, config(preset, fused)).unwrap();
    let slot_of: HashMap<String, usize> = opt.slots().iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
    let mut untouched = 0;
    for row in &inputs.grads {
        opt.zero_grad();
        for ((p, g), shape) in params.iter().zip(row).zip(&inputs.shapes) {
            if let Some(g) = g {
                (p * Tensor::from_slice(g).reshape(shape.as_slice())).sum(Kind::Float).backward();
            }
        }
        let without: Vec<(usize, Tensor, Tensor, Tensor, u64)> = row
            .iter()
            .enumerate()
            .filter(|(_, g)| g.is_none())
            .map(|(i, _)| {
                let s = &opt.slots()[slot_of[&inputs.names[i]]];
                (i, s.tensor.copy(), s.first_moment.copy(), s.second_moment.copy(), s.step)
            })
            .collect();
        let report = opt.step();
        assert_eq!(report.skipped_without_grad, without.len());
        for (i, theta, m, v, count) in without {
            let s = &opt.slots()[slot_of[&inputs.names[i]]];
            assert!(
                s.tensor.equal(&theta) && s.first_moment.equal(&m) && s.second_moment.equal(&v) && s.step == count,
                "{preset} fused={fused}: `{}` had no gradient at step {} but changed",
                s.name,
                report.step
            );
            untouched += 1;
        }
    }
    let group = |s: &gainguard::optim::ParamSlot| {
        let g = &opt.groups()[s.group];
        (g.lr, g.weight_decay, g.eps)
    };
    Ours {
        final_values: opt.slots().iter().map(|s| (s.name.clone(), values(&s.tensor))).collect(),
        steps: opt.slots().iter().map(|s| (s.name.clone(), s.step)).collect(),
        groups: opt.slots().iter().map(|s| (s.name.clone(), group(s))).collect(),
        decay_horizon: inputs.names.iter().map(|n| (n.clone(), opt.decay_horizon(n).unwrap())).collect(),
        untouched,
    }
}

/// Max over parameters of ‖a − b‖_∞ / ‖b‖_∞, with the worst parameter.
fn max_rel_diff(a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>) -> (f64, String) {
    let mut worst = (0.0, String::new());
    for (name, x) in a {
        let y = &b[name];
        assert_eq!(x.len(), y.len(), "`{name}`");
        let diff = x.iter().zip(y).map(|(p, q)| (*p as f64 - *q as f64).abs()).fold(0.0, f64::max);
        let size = y.iter().map(|q| (*q as f64).abs()).fold(0.0, f64::max).max(1e-30);
        if diff / size > worst.0 {
            worst = (diff / size, name.clone());
        }
    }
    worst
}

fn assert_same_groups(what: &str, ours: &HashMap<String, (f64, f64, f64)>, theirs: &HashMap<String, (f64, f64, f64)>, with_eps: bool) {
    assert_eq!(ours.len(), theirs.len(), "{what}: parameter count");
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * a.abs().max(b.abs());
    for (name, o) in ours {
        let t = theirs[name];
        assert!(close(o.0, t.0) && close(o.1, t.1) && (!with_eps || close(o.2, t.2)), "{what}: `{name}` has (lr, wd, eps) {o:?} here, {t:?} there");
    }
}

#[test]
fn every_preset_follows_torch_adamw_and_its_namesake_with_missing_gradients_on_both_paths() {
    assert!(gainguard::fused::available(), "this build has no fused AdamW shim");
    let inputs = draw_inputs();
    let dir = std::env::temp_dir().join(format!("gainguard-torch-adamw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_inputs(&dir, &inputs);
    let reference = run_python(&dir);
    let initial: HashMap<String, Vec<f32>> = inputs.names.iter().cloned().zip(inputs.initial.iter().cloned()).collect();
    let multipliers: Vec<f64> = (0..STEPS as u64).map(|t| schedule().multiplier(t)).collect();

    let mut finals: HashMap<&str, HashMap<String, Vec<f32>>> = HashMap::new();
    for preset in PRESETS {
        let torch = &reference[&format!("{preset}/torch-adamw")];
        for fused in [true, false] {
            let ours = run_ours(preset, fused, &inputs);
            let what = format!("{preset} fused={fused}");
            assert!(ours.untouched > 100, "{what}: only {} parameter-steps without a gradient", ours.untouched);
            assert_same_groups(&format!("{what} vs its rule in torch.optim.AdamW groups"), &ours.groups, &torch.groups, true);
            assert_eq!(ours.steps, torch.steps, "{what}: per-parameter step counts (torch's state['step'])");
            let late = inputs.names.iter().position(|n| n == LATE.0).unwrap();
            assert_eq!(ours.steps[LATE.0], (LATE.1..STEPS).filter(|&t| inputs.grads[t][late].is_some()).count() as u64);
            let (diff, name) = max_rel_diff(&ours.final_values, &torch.final_values);
            eprintln!("{what}: vs torch.optim.AdamW after {STEPS} steps: max relative difference {diff:e} at `{name}`");
            assert!(diff <= 1e-6, "{what}: {diff:e} from torch.optim.AdamW at `{name}`");
            let peer = match preset {
                "mup-coupled" => Some("mup-coupled/mup.MuAdamW"),
                "standard" => Some("standard/torch-adamw-model-parameters"),
                _ => None,
            };
            if let Some(peer) = peer {
                let theirs = &reference[peer];
                // MuAdamW and plain AdamW take one eps for every group, which is ours under these presets.
                assert_same_groups(&format!("{what} vs {peer}"), &ours.groups, &theirs.groups, true);
                let (diff, name) = max_rel_diff(&ours.final_values, &theirs.final_values);
                eprintln!("{what}: vs {peer}: max relative difference {diff:e} at `{name}`");
                assert!(diff <= 1e-6, "{what}: {diff:e} from {peer} at `{name}`");
            }
            // The decay horizon, from the reference's groups and the steps each parameter was given.
            for (i, name) in inputs.names.iter().enumerate() {
                let (lr, wd, _) = torch.groups[name];
                let expected: f64 = (0..STEPS).filter(|&t| inputs.grads[t][i].is_some()).map(|t| lr * multipliers[t] * wd).sum();
                let h = ours.decay_horizon[name];
                assert!((h - expected).abs() <= 1e-12 * expected.max(1e-300), "{what}: `{name}` has decay horizon {h}, expected {expected}");
            }
            finals.insert(preset, ours.final_values.clone());
        }
        // The comparison can fail: the run moved far from where it started.
        let (moved, _) = max_rel_diff(&finals[preset], &initial);
        assert!(moved > 1e-2, "{preset}: the run barely moved the weights ({moved:e})");
    }
    // ...and the presets are told apart: each differs from the others far beyond the bar.
    for a in PRESETS {
        for b in PRESETS.iter().filter(|b| **b != a) {
            let (diff, name) = max_rel_diff(&finals[a], &reference[&format!("{b}/torch-adamw")].final_values);
            assert!(diff > 1e-4, "{a} is within {diff:e} of {b}'s reference (at `{name}`): the comparison cannot tell them apart");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
