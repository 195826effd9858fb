//! `gainguard rules` against shapes files, checked with formulas written here independently and against
//! microsoft/mup's own `set_base_shapes`.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

type ShapeMap = BTreeMap<String, Vec<i64>>;

fn tmp(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gainguard-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn rules(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gainguard")).arg("rules").args(args).output().unwrap()
}

#[test]
fn json_output_lists_every_param_with_class_m_lr_and_wd_from_the_paper_rule() {
    let base = tmp("base.json", r#"{"blocks.0.attn.q.weight": [64, 64], "norm.weight": [64], "lm_head.weight": [100, 64]}"#);
    let target = tmp("target.json", r#"{"blocks.0.attn.q.weight": [512, 512], "norm.weight": [512], "lm_head.weight": [100, 512]}"#);
    let out = rules(&["--base-shapes", base.to_str().unwrap(), "--shapes", target.to_str().unwrap(), "--lr", "0.01", "--wd", "0.1", "--format", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 3);
    let get = |n: &str| arr.iter().find(|o| o["name"] == n).unwrap().clone();
    let q = get("blocks.0.attn.q.weight");
    let m = 512.0 / 64.0;
    assert_eq!(q["class"], "matrix_like");
    assert_eq!(q["width_multiplier"].as_f64().unwrap(), m);
    assert!((q["lr"].as_f64().unwrap() - 0.01 / m).abs() < 1e-15);
    assert!((q["weight_decay"].as_f64().unwrap() - 0.1 * m.powf(0.5)).abs() < 1e-15);
    assert_eq!(q["shape"], serde_json::json!([512, 512]));
    for n in ["norm.weight", "lm_head.weight"] {
        let o = get(n);
        assert_eq!(o["class"], "vector_like", "{n}");
        assert_eq!(o["lr"].as_f64().unwrap(), 0.01, "{n}");
        assert_eq!(o["weight_decay"].as_f64().unwrap(), 0.0, "{n}");
    }
}

#[test]
fn table_output_is_for_people_and_names_the_rule() {
    let base = tmp("b2.json", r#"{"w": [8, 8]}"#);
    let target = tmp("t2.json", r#"{"w": [32, 32]}"#);
    let out = rules(&["--base-shapes", base.to_str().unwrap(), "--shapes", target.to_str().unwrap(), "--lr", "1e-3", "--wd", "0.1", "--rule", "mup-coupled"]);
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains("mup-coupled") && s.contains("matrix_like") && s.contains("[32, 32]"), "{s}");
}

#[test]
fn bad_input_exits_2_with_a_message_naming_the_culprit() {
    let base = tmp("b3.json", r#"{"blocks.3.mlp.up.weight": [128]}"#);
    let target = tmp("t3.json", r#"{"blocks.3.mlp.up.weight": [512, 2048]}"#);
    let out = rules(&["--base-shapes", base.to_str().unwrap(), "--shapes", target.to_str().unwrap(), "--lr", "1e-3", "--wd", "0.1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`blocks.3.mlp.up.weight`") && err.contains("rank 2") && err.contains("rank 1"), "{err}");

    let out = rules(&["--base-shapes", "/nonexistent/base.json", "--shapes", target.to_str().unwrap(), "--lr", "1e-3", "--wd", "0.1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/base.json"));

    let broken = tmp("broken.json", "{not json");
    let out = rules(&["--base-shapes", broken.to_str().unwrap(), "--shapes", target.to_str().unwrap(), "--lr", "1e-3", "--wd", "0.1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.json"));

    let out = rules(&["--base-shapes", base.to_str().unwrap(), "--shapes", target.to_str().unwrap(), "--lr", "1e-3", "--wd", "0.1", "--rule", "mup"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown rule `mup`"));
}

#[test]
fn an_undeclared_plain_linear_readout_is_flagged_in_the_json_and_a_declared_one_is_not() {
    // A plain `Linear(d, vocab)` head: weight [vocab, d], only its fan-in grows. Under μP its output must be
    // divided by m (MuReadout); nothing in the shapes says whether that is done.
    let base = tmp("b5.json", r#"{"base": {"blocks.0.mlp.up.weight": [256, 64], "head.weight": [100, 64]}, "delta": {"blocks.0.mlp.up.weight": [512, 128], "head.weight": [100, 128]}}"#);
    let target = tmp("t5.json", r#"{"blocks.0.mlp.up.weight": [1024, 256], "head.weight": [100, 256]}"#);
    let args = ["--base-shapes", base.to_str().unwrap(), "--shapes", target.to_str().unwrap(), "--lr", "0.01", "--wd", "0.1", "--format", "json"];
    let out = rules(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let get = |v: &serde_json::Value, n: &str| v.as_array().unwrap().iter().find(|o| o["name"] == n).unwrap().clone();
    let head = get(&v, "head.weight");
    assert_eq!(head["class"], "vector_like");
    assert_eq!(head["warnings"].as_array().unwrap().len(), 1, "{head}");
    assert_eq!(head["warnings"][0]["kind"], "possible_readout");
    assert!(head["warnings"][0]["message"].as_str().unwrap().contains("MuReadout"), "{head}");
    assert_eq!(get(&v, "blocks.0.mlp.up.weight")["warnings"], serde_json::json!([]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible_readout"));

    let declared = rules(&[&args[..], &["--overrides", r#"[{"pattern": "head.weight", "role": "readout"}]"#]].concat());
    let v: serde_json::Value = serde_json::from_slice(&declared.stdout).unwrap();
    assert_eq!((get(&v, "head.weight")["warnings"].clone(), get(&v, "head.weight")["role"].clone()), (serde_json::json!([]), serde_json::json!("readout")));
}

// The width dimensions of a base + delta pair are microsoft/mup's: for the same shapes, mup's own
// `set_base_shapes(model, base, delta=delta)` (run in the project's virtualenv by `peers/mup_infshapes.py`) and
// `gainguard rules` must agree, per parameter, on the infinite dimensions, their count, the fan-in
// (`InfShape.main_idx`) and the width multiplier. Where mup silently calls a changed dimension finite (a
// vocabulary change), gainguard refuses until an override declares the dimensions, and then agrees with mup.

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
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugin/tests/peers/mup_infshapes.py");
    let out = Command::new(python()).arg(&script).arg(&input).arg(&output).output().unwrap();
    assert!(out.status.success(), "mup_infshapes.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let verdicts: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    verdicts
}

/// `gainguard rules --format json` for the base+delta pair and `target`, with `extra` arguments.
fn plan(base: &ShapeMap, delta: &ShapeMap, target: &ShapeMap, extra: &[&str]) -> Result<Value, String> {
    let key = format!("{}-{}", target.len(), target.values().map(|s| s.iter().sum::<i64>()).sum::<i64>());
    let pair = tmp(&format!("mup-pair-{key}.json"), &json!({ "base": base, "delta": delta }).to_string());
    let target = tmp(&format!("mup-target-{key}.json"), &serde_json::to_string(target).unwrap());
    let args = ["--base-shapes", pair.to_str().unwrap(), "--shapes", target.to_str().unwrap(), "--lr", "1e-3", "--wd", "0.1", "--format", "json"];
    let out = rules(&[&args[..], extra].concat());
    match out.status.success() {
        true => Ok(serde_json::from_slice(&out.stdout).unwrap()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

fn assert_agrees(case: &str, plan: &Value, mup: &Value) {
    let (mup, rows) = (mup.as_object().unwrap(), plan.as_array().unwrap());
    assert_eq!(mup.len(), rows.len(), "{case}");
    for d in rows {
        let name = d["name"].as_str().unwrap();
        let m = &mup[name];
        let width_dims: Vec<usize> = serde_json::from_value(d["width_dims"].clone()).unwrap();
        let inf_dims: Vec<usize> = serde_json::from_value(m["inf_dims"].clone()).unwrap();
        let ninf = m["ninf"].as_u64().unwrap() as usize;
        assert_eq!(width_dims, inf_dims, "{case}: `{name}` width dims");
        assert_eq!(width_dims.len(), ninf, "{case}: `{name}` ninf");
        // MuAdamW's matrix-like groups are ninf == 2 (it refuses more).
        assert_eq!(d["class"] == "matrix_like", ninf == 2, "{case}: `{name}` class {} vs ninf {ninf}", d["class"]);
        assert_eq!(d["fan_in_dim"], m["main_idx"], "{case}: `{name}` fan-in dim vs InfShape.main_idx");
        assert_eq!(d["width_multiplier"].as_f64(), m["width_mult"].as_f64(), "{case}: `{name}` width multiplier");
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
    let up = p.as_array().unwrap().iter().find(|r| r["name"] == "blocks.0.moe.experts.up").unwrap();
    assert_eq!((&up["width_dims"], &up["fan_in_dim"], &up["width_multiplier"]), (&json!([1, 2]), &json!(2), &json!(4.0)));

    // The proxy itself: the same width dims, with m = 1.
    let p = plan(&base, &delta, &base, &[]).unwrap();
    assert_agrees("proxy", &p, &verdicts[1]);
    assert_eq!(p.as_array().unwrap().iter().find(|r| r["name"] == "blocks.0.attn.o.weight").unwrap()["class"], "matrix_like");

    // A vocabulary change (8 → 10) where base and delta agree: mup calls dim 0 finite without a word;
    // gainguard names both parameters and the dimension.
    let e = plan(&base, &delta, &vocab_changed, &[]).unwrap_err();
    for name in ["tok_emb.weight", "lm_head.weight", "lm_head.bias"] {
        assert!(e.contains(&format!("parameter `{name}`: dimension 0 is 8 in the base and the delta")), "{e}");
    }
    // Declared, it is what mup made of it.
    let declared = r#"[{"pattern": "*_emb.weight", "width_dims": [1]}, {"pattern": "lm_head.weight", "width_dims": [1]}, {"pattern": "lm_head.bias", "width_dims": []}]"#;
    let p = plan(&base, &delta, &vocab_changed, &["--overrides", declared]).unwrap();
    assert_agrees("vocabulary change, declared", &p, &verdicts[2]);
}
