//! `gainguard rules` against shapes files, checked with formulas written here independently.

use std::process::Command;

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
