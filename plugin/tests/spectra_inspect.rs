//! `gainguard inspect` on safetensors files written here, against an independent float64 SVD.

use std::path::PathBuf;
use std::process::Command;
use tch::{Device, Kind, Tensor};

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("gainguard-inspect-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn inspect(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gainguard")).arg("inspect").args(args).output().unwrap()
}

fn svals(t: &Tensor) -> Vec<f64> {
    let (_, s, _) = t.to_kind(Kind::Double).svd(true, false);
    Vec::<f64>::try_from(&s).unwrap()
}

#[test]
fn json_output_matches_a_float64_svd_of_each_matrix() {
    let a = Tensor::randn([120, 80], (Kind::Float, Device::Cpu));
    let b = (Tensor::randn([64, 200], (Kind::Float, Device::Cpu)) * 0.1).to_kind(Kind::BFloat16);
    let conv = Tensor::randn([16, 8, 3, 3], (Kind::Float, Device::Cpu));
    let norm = Tensor::ones([80], (Kind::Float, Device::Cpu));
    let path = dir().join("model.safetensors");
    Tensor::write_safetensors(&[("layer.a", &a), ("layer.b", &b), ("conv", &conv), ("norm", &norm)], &path).unwrap();
    let out = inspect(&[path.to_str().unwrap(), "--format", "json", "--top-k", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 3, "the 1-D norm gain is not a matrix");
    for (name, t, shape) in [("layer.a", a.shallow_clone(), vec![120, 80]), ("layer.b", b.shallow_clone(), vec![64, 200]), ("conv", conv.reshape([16, 72]), vec![16, 8, 3, 3])] {
        let o = arr.iter().find(|o| o["name"] == name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(o["shape"], serde_json::json!(shape));
        let s = svals(&t);
        let fro = s.iter().map(|x| x * x).sum::<f64>().sqrt();
        let close = |key: &str, want: f64| {
            let got = o[key].as_f64().unwrap_or_else(|| panic!("{name}.{key} missing"));
            assert!((got - want).abs() <= 1e-9 * want.abs().max(1.0), "{name}.{key}: {got} vs {want}");
        };
        close("sigma_max", s[0]);
        close("frobenius_norm", fro);
        close("stable_rank", fro * fro / (s[0] * s[0]));
        let top: Vec<f64> = o["top_k"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(top.len(), 3);
        for i in 0..3 {
            assert!((top[i] - s[i]).abs() <= 1e-9 * s[0]);
        }
        let median = {
            let mut asc = s.clone();
            asc.reverse();
            let pos = 0.5 * (asc.len() - 1) as f64;
            let lo = pos.floor() as usize;
            asc[lo] + (asc[(lo + 1).min(asc.len() - 1)] - asc[lo]) * (pos - lo as f64)
        };
        assert!((o["quantiles"]["p50"].as_f64().unwrap() - median).abs() <= 1e-9 * s[0]);
    }
}

#[test]
fn the_table_names_every_matrix() {
    let path = dir().join("small.safetensors");
    let w = Tensor::randn([10, 6], (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(&[("blocks.0.attn.q.weight", &w)], &path).unwrap();
    let out = inspect(&[path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains("blocks.0.attn.q.weight") && s.contains("[10, 6]") && s.contains("sigma_max"), "{s}");
}

#[test]
fn missing_truncated_and_foreign_files_exit_2_naming_the_file() {
    let d = dir();
    let good = d.join("good.safetensors");
    Tensor::write_safetensors(&[("w", &Tensor::randn([50, 40], (Kind::Float, Device::Cpu)))], &good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let truncated = d.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let foreign = d.join("notes.safetensors");
    std::fs::write(&foreign, "this is a text file, not tensors\n").unwrap();
    let tiny = d.join("tiny.safetensors");
    std::fs::write(&tiny, [1u8, 2, 3]).unwrap();
    let missing = d.join("missing.safetensors");
    for (path, word) in [(&missing, "No such file"), (&truncated, "truncated"), (&foreign, "not a safetensors file"), (&tiny, "not a safetensors file")] {
        let out = inspect(&[path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", path.display());
        assert!(err.contains(path.to_str().unwrap()) && err.contains(word), "{err}");
    }
}

#[test]
fn cuda_on_a_machine_without_one_is_a_clear_error_and_works_where_there_is_one() {
    let path = dir().join("dev.safetensors");
    let w = Tensor::randn([30, 20], (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(&[("w", &w)], &path).unwrap();
    let out = inspect(&[path.to_str().unwrap(), "--device", "cuda", "--format", "json"]);
    gainguard::device::load_cuda_backend();
    if tch::Cuda::is_available() {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let want = svals(&w)[0];
        assert!((v[0]["sigma_max"].as_f64().unwrap() - want).abs() <= 1e-9 * want);
    } else {
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("cuda"));
    }
}
