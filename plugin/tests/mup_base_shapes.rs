//! The width dimensions of a base + delta pair are microsoft/mup's: for the same shapes, mup's own
//! `set_base_shapes(model, base, delta=delta)` (run in the project's virtualenv by
//! `peers/mup_infshapes.py`) and gainguard's plan must agree, per parameter, on the infinite dimensions,
//! their count, the fan-in (`InfShape.main_idx`) and the width multiplier. Where mup silently calls a changed
//! dimension finite (a vocabulary change), gainguard refuses until an override declares the dimensions, and
//! then agrees with mup.

use gainguard::classify::{BaseShapes, Override, ShapeMap};
use gainguard::plan::{ParamSpec, ScalingPlan};
use gainguard::{ParamClass, Rule};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("GAINGUARD_PYTHON") {
        return p.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(venv.exists(), "{} is missing: run `make setup` (scripts/setup-libtorch.sh installs torch and mup there)", venv.display());
    venv
}

/// A LLaMA-like model with MoE experts at width `d` and vocabulary `vocab`: embedding, attention with a
/// fused `[3, d, d]` qkv, a 3-D expert tensor `[E, 4d, d]` and its router `[E, d]`, a conv kernel, a fixed
/// position table's projection, norms, biases and a readout.
fn model(d: i64, vocab: i64) -> ShapeMap {
    let e = 4;
    [
        ("tok_emb.weight", vec![vocab, d]),
        ("blocks.0.attn_norm.weight", vec![d]),
        ("blocks.0.attn.qkv.weight", vec![3, d, d]),
        ("blocks.0.attn.o.weight", vec![d, d]),
        ("blocks.0.attn.o.bias", vec![d]),
        ("blocks.0.moe.router.weight", vec![e, d]),
        ("blocks.0.moe.experts.up", vec![e, 4 * d, d]),
        ("blocks.0.moe.experts.down", vec![e, d, 4 * d]),
        ("blocks.0.conv.weight", vec![2 * d, d, 3]),
        ("pos.weight", vec![16, d]),
        ("norm.weight", vec![d]),
        ("lm_head.weight", vec![vocab, d]),
        ("lm_head.bias", vec![vocab]),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect()
}

fn mup_verdicts(cases: &[(ShapeMap, ShapeMap, ShapeMap)]) -> Vec<Value> {
    let dir = std::env::temp_dir().join(format!("gainguard-mup-shapes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, output) = (dir.join("cases.json"), dir.join("verdicts.json"));
    let cases: Vec<Value> = cases.iter().map(|(b, d, t)| json!({ "base": b, "delta": d, "target": t })).collect();
    std::fs::write(&input, serde_json::to_string(&cases).unwrap()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/mup_infshapes.py");
    let out = Command::new(python()).arg(&script).arg(&input).arg(&output).output().unwrap();
    assert!(out.status.success(), "mup_infshapes.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let verdicts: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    verdicts
}

fn plan(base: &ShapeMap, delta: &ShapeMap, target: &ShapeMap, overrides: &[Override]) -> Result<ScalingPlan, String> {
    let shapes = BaseShapes { base: base.clone(), delta: Some(delta.clone()) };
    let specs: Vec<ParamSpec> = target.iter().map(|(n, s)| ParamSpec { name: n.clone(), shape: s.clone(), storage: None }).collect();
    ScalingPlan::build(&specs, &shapes, overrides, Rule::default(), 1e-3, 0.1).map_err(|e| e.to_string())
}

fn assert_agrees(case: &str, plan: &ScalingPlan, mup: &Value) {
    let mup = mup.as_object().unwrap();
    assert_eq!(mup.len(), plan.decisions.len(), "{case}");
    for d in &plan.decisions {
        let m = &mup[&d.name];
        let inf_dims: Vec<usize> = serde_json::from_value(m["inf_dims"].clone()).unwrap();
        let ninf = m["ninf"].as_u64().unwrap() as usize;
        assert_eq!(d.width_dims, inf_dims, "{case}: `{}` width dims", d.name);
        assert_eq!(d.width_dims.len(), ninf, "{case}: `{}` ninf", d.name);
        // MuAdamW's matrix-like groups are ninf == 2 (it refuses more).
        assert_eq!(d.class == ParamClass::MatrixLike, ninf == 2, "{case}: `{}` class {:?} vs ninf {ninf}", d.name, d.class);
        let main: Option<usize> = serde_json::from_value(m["main_idx"].clone()).unwrap();
        assert_eq!(d.fan_in_dim, main, "{case}: `{}` fan-in dim vs InfShape.main_idx", d.name);
        assert_eq!(d.width_multiplier, m["width_mult"].as_f64().unwrap(), "{case}: `{}` width multiplier", d.name);
    }
}

#[test]
fn width_dims_of_a_base_and_delta_pair_are_those_of_mups_set_base_shapes() {
    let (base, delta) = (model(32, 8), model(64, 8));
    let wide = model(128, 8);
    let vocab_changed = model(128, 10);
    let verdicts = mup_verdicts(&[
        (base.clone(), delta.clone(), wide.clone()),
        (base.clone(), delta.clone(), base.clone()),
        (base.clone(), delta.clone(), vocab_changed.clone()),
    ]);

    // Hidden matrices, the 3-D experts, the fused qkv and the conv kernel are matrix-like at m = 4; the
    // readout, embedding, router and position table have one width dim, norms and biases one or none.
    let p = plan(&base, &delta, &wide, &[]).unwrap();
    assert_agrees("4x target", &p, &verdicts[0]);
    let up = p.get("blocks.0.moe.experts.up").unwrap();
    assert_eq!((up.width_dims.clone(), up.fan_in_dim, up.width_multiplier), (vec![1, 2], Some(2), 4.0));

    // The proxy itself: the same width dims, with m = 1.
    let p = plan(&base, &delta, &base, &[]).unwrap();
    assert_agrees("proxy", &p, &verdicts[1]);
    assert_eq!(p.get("blocks.0.attn.o.weight").unwrap().class, ParamClass::MatrixLike);

    // A vocabulary change (8 → 10) where base and delta agree: mup calls dim 0 finite without a word;
    // gainguard names both parameters and the dimension.
    let e = plan(&base, &delta, &vocab_changed, &[]).unwrap_err();
    for name in ["tok_emb.weight", "lm_head.weight", "lm_head.bias"] {
        assert!(e.contains(&format!("parameter `{name}`: dimension 0 is 8 in the base and the delta")), "{e}");
    }
    // Declared, it is what mup made of it.
    let declared = [
        Override { width_dims: Some(vec![1]), ..Override::new("tok_emb.weight") },
        Override { width_dims: Some(vec![1]), ..Override::new("lm_head.weight") },
        Override { width_dims: Some(vec![]), ..Override::new("lm_head.bias") },
    ];
    let p = plan(&base, &delta, &vocab_changed, &declared).unwrap();
    assert_agrees("vocabulary change, declared", &p, &verdicts[2]);
}
