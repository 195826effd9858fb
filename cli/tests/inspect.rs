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

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

fn json(args: &[&str]) -> Vec<serde_json::Value> {
    let out = inspect(args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

fn row<'a>(rows: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    rows.iter().find(|o| o["name"] == name).unwrap_or_else(|| panic!("{name} missing"))
}

/// `U diag(s) Vᵀ + noise`: a top spectrum with gaps on a Gaussian bulk, as trained weights look.
fn trained_like(m: i64, n: i64) -> Tensor {
    let r = 16;
    let u = Tensor::linalg_qr(&Tensor::randn([m, r], (Kind::Double, Device::Cpu)), "reduced").0;
    let v = Tensor::linalg_qr(&Tensor::randn([n, r], (Kind::Double, Device::Cpu)), "reduced").0;
    let s = Tensor::arange(r, (Kind::Double, Device::Cpu)).g_add_scalar(1.0).pow_tensor_scalar(-0.5) * 3.0;
    ((u * s.unsqueeze(0)).matmul(&v.tr()) + Tensor::randn([m, n], (Kind::Double, Device::Cpu)) * 0.02).to_kind(Kind::Float)
}

#[test]
fn the_default_estimates_match_a_float64_svd_within_1e_3() {
    // Gaussian matrices (no gap at the top of the spectrum: the estimator's hardest case), tall and
    // wide, bf16, a conv kernel read as [out, in·kh·kw], and a trained-like spectrum.
    let gauss = Tensor::randn([300, 200], (Kind::Float, Device::Cpu)) * 0.02;
    let wide = (Tensor::randn([96, 400], (Kind::Float, Device::Cpu)) * 0.1).to_kind(Kind::BFloat16);
    let conv = Tensor::randn([40, 16, 3, 3], (Kind::Float, Device::Cpu));
    let trained = trained_like(384, 256);
    let norm = Tensor::ones([80], (Kind::Float, Device::Cpu));
    let path = dir().join("estimates.safetensors");
    Tensor::write_safetensors(&[("gauss", &gauss), ("wide", &wide), ("conv", &conv), ("trained", &trained), ("norm", &norm)], &path).unwrap();
    let rows = json(&[path.to_str().unwrap(), "--format", "json", "--top-k", "3"]);
    assert_eq!(rows.len(), 4, "the 1-D norm gain is not a matrix");
    for (name, t) in [("gauss", gauss.shallow_clone()), ("wide", wide.shallow_clone()), ("conv", conv.reshape([40, 144])), ("trained", trained.shallow_clone())] {
        let o = row(&rows, name);
        let s = svals(&t);
        let fro = s.iter().map(|x| x * x).sum::<f64>().sqrt();
        let got = |key: &str| o[key].as_f64().unwrap_or_else(|| panic!("{name}.{key} missing: {o}"));
        assert!(rel(got("sigma_max"), s[0]) <= 1e-3, "{name}.sigma_max: {} vs {}", got("sigma_max"), s[0]);
        assert!(rel(got("stable_rank"), fro * fro / (s[0] * s[0])) <= 1e-3, "{name}.stable_rank");
        // The Frobenius norm is summed exactly, in float64, not estimated.
        assert!(rel(got("frobenius_norm"), fro) <= 1e-9, "{name}.frobenius_norm: {} vs {fro}", got("frobenius_norm"));
        let top: Vec<f64> = o["top_k"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(top.len(), 3);
        for i in 0..3 {
            assert!(rel(top[i], s[i]) <= 1e-3, "{name}.top_k[{i}]: {} vs {}", top[i], s[i]);
        }
        assert_eq!(o["method"], "krylov");
        assert!(o["quantiles"].is_null() && o["effective_rank"].is_null(), "quantiles need --full: {o}");
    }
}

#[test]
fn full_output_matches_a_float64_svd_of_each_matrix() {
    let a = Tensor::randn([120, 80], (Kind::Float, Device::Cpu));
    let b = (Tensor::randn([64, 200], (Kind::Float, Device::Cpu)) * 0.1).to_kind(Kind::BFloat16);
    let conv = Tensor::randn([16, 8, 3, 3], (Kind::Float, Device::Cpu));
    let norm = Tensor::ones([80], (Kind::Float, Device::Cpu));
    let path = dir().join("model.safetensors");
    Tensor::write_safetensors(&[("layer.a", &a), ("layer.b", &b), ("conv", &conv), ("norm", &norm)], &path).unwrap();
    let arr = json(&[path.to_str().unwrap(), "--format", "json", "--top-k", "3", "--full"]);
    assert_eq!(arr.len(), 3, "the 1-D norm gain is not a matrix");
    for (name, t, shape) in [("layer.a", a.shallow_clone(), vec![120, 80]), ("layer.b", b.shallow_clone(), vec![64, 200]), ("conv", conv.reshape([16, 72]), vec![16, 8, 3, 3])] {
        let o = row(&arr, name);
        assert_eq!(o["shape"], serde_json::json!(shape));
        assert_eq!(o["method"], "svd");
        let s = svals(&t);
        let fro = s.iter().map(|x| x * x).sum::<f64>().sqrt();
        let close = |key: &str, want: f64| {
            let got = o[key].as_f64().unwrap_or_else(|| panic!("{name}.{key} missing"));
            assert!((got - want).abs() <= 1e-9 * want.abs().max(1.0), "{name}.{key}: {got} vs {want}");
        };
        close("sigma_max", s[0]);
        close("frobenius_norm", fro);
        close("stable_rank", fro * fro / (s[0] * s[0]));
        let total: f64 = s.iter().sum();
        close("effective_rank", s.iter().map(|x| x / total).map(|p| -p * p.ln()).sum::<f64>().exp());
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

/// A safetensors file written byte by byte, so that tensors can start at offsets no writer would pick.
fn write_raw(path: &std::path::Path, tensors: &[(&str, &str, &[i64], Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        header.insert(name.to_string(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}));
        data.extend_from_slice(bytes);
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend(h);
    file.extend(data);
    std::fs::write(path, file).unwrap();
}

fn le_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous();
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut v = vec![0u8; n];
    t.copy_data_u8(&mut v, t.numel());
    v
}

#[test]
fn tensors_at_unaligned_offsets_and_every_thread_count_give_the_same_answers() {
    // 15 bf16 values (30 bytes) put the next f32 tensor at an offset that is not a multiple of 4: it is
    // copied out of the mapping; the one after it is 4-aligned and read in place.
    let small = Tensor::randn([3, 5], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let odd = Tensor::randn([70, 50], (Kind::Float, Device::Cpu));
    let pad = Tensor::randn([1, 1], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let even = Tensor::randn([60, 90], (Kind::Float, Device::Cpu));
    let path = dir().join("unaligned.safetensors");
    write_raw(&path, &[("a.small", "BF16", &[3, 5], le_bytes(&small)), ("b.odd", "F32", &[70, 50], le_bytes(&odd)), ("c.pad", "BF16", &[1, 1], le_bytes(&pad)), ("d.even", "F32", &[60, 90], le_bytes(&even))]);
    let one = json(&[path.to_str().unwrap(), "--format", "json", "--threads", "1"]);
    for (name, t) in [("a.small", &small), ("b.odd", &odd), ("d.even", &even)] {
        let s = svals(t);
        let got = row(&one, name)["sigma_max"].as_f64().unwrap();
        assert!(rel(got, s[0]) <= 1e-3, "{name}: {got} vs {}", s[0]);
    }
    // Each matrix is estimated on one thread from its own seed: the thread count changes nothing.
    let three = json(&[path.to_str().unwrap(), "--format", "json", "--threads", "3"]);
    assert_eq!(one, three);
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
    // A header whose shape and dtype need more bytes than its offsets give the tensor.
    let lying = d.join("lying.safetensors");
    write_raw(&lying, &[("w", "F32", &[10, 10], vec![0u8; 396])]);
    let fp8 = d.join("fp8.safetensors");
    write_raw(&fp8, &[("w", "F8_E4M3", &[4, 4], vec![0u8; 16])]);
    for (path, word) in [
        (&missing, "No such file"),
        (&truncated, "truncated"),
        (&foreign, "not a safetensors file"),
        (&tiny, "not a safetensors file"),
        (&lying, "needs Some(400) bytes but has 396"),
        (&fp8, "dtype F8_E4M3"),
    ] {
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

#[test]
fn the_gainguard_binary_does_not_load_libtorch() {
    // glibc's loader lists the shared objects a binary needs and exits (what `ldd` prints).
    let out = Command::new(env!("CARGO_BIN_EXE_gainguard")).env("LD_TRACE_LOADED_OBJECTS", "1").output().unwrap();
    let libs = String::from_utf8_lossy(&out.stdout);
    assert!(libs.contains("libc.so"), "the loader listed nothing: {libs}");
    assert!(!libs.contains("libtorch") && !libs.contains("libc10"), "{libs}");
}

#[test]
fn integer_and_boolean_matrices_are_read_as_their_float_values() {
    let ints = Tensor::randint_low(-50, 50, [60, 40], (Kind::Int, Device::Cpu));
    let flags = Tensor::rand([50, 70], (Kind::Float, Device::Cpu)).gt(0.5);
    let path = dir().join("ints.safetensors");
    Tensor::write_safetensors(&[("ints", &ints), ("flags", &flags)], &path).unwrap();
    let rows = json(&[path.to_str().unwrap(), "--format", "json"]);
    for (name, t) in [("ints", &ints), ("flags", &flags)] {
        let s = svals(&t.to_kind(Kind::Double));
        let o = row(&rows, name);
        assert!(rel(o["sigma_max"].as_f64().unwrap(), s[0]) <= 1e-3, "{name}: {o} vs {}", s[0]);
        let fro = s.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(rel(o["frobenius_norm"].as_f64().unwrap(), fro) <= 1e-12, "{name}: {o} vs {fro}");
    }
}
