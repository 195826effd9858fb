//! `gainguard inspect FILE.safetensors [--format table|json] [--device cpu|cuda|auto] [--top-k K]`
//!
//! Singular-value statistics of every tensor of rank ≥ 2 in a safetensors file: sigma_max, the top k,
//! stable rank, Frobenius norm, effective rank and quantiles, from the full spectrum in float64.
//! Tensors of rank > 2 are read as `[shape[0], rest]` (PyTorch's `weight.view(out, -1)`); with no base
//! shapes there is no width information to do better.

use anyhow::Result;
use gainguard::spectra::{all_finite, frobenius_norm, full_spectrum, Estimator, EstimatorConfig, FullPrecision, MatrixLayout};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

use crate::{BadInput, Format};

#[derive(clap::Args)]
pub struct Args {
    /// A safetensors file (e.g. a checkpoint written by `Tensor::write_safetensors` or `safetensors.torch`).
    file: PathBuf,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// cpu, cuda, cuda:N or auto (CUDA when available).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Singular values listed per tensor.
    #[arg(long, default_value_t = 4)]
    top_k: usize,
    /// Matrices whose smaller side exceeds this get sigma_max from the block Krylov estimator and no
    /// quantiles, instead of a full spectrum.
    #[arg(long, default_value_t = 8192)]
    max_full_dim: i64,
}

#[derive(Serialize)]
struct Quantiles {
    p10: f64,
    p50: f64,
    p90: f64,
    p99: f64,
}

#[derive(Serialize)]
struct Row {
    name: String,
    shape: Vec<i64>,
    dtype: String,
    /// The matrix the tensor was read as.
    matrix: [i64; 2],
    sigma_max: Option<f64>,
    top_k: Vec<f64>,
    stable_rank: Option<f64>,
    frobenius_norm: Option<f64>,
    effective_rank: Option<f64>,
    quantiles: Option<Quantiles>,
    nonfinite: bool,
    /// `svd` (full spectrum, float64) or `krylov` (top-k estimate, for matrices above --max-full-dim).
    method: &'static str,
}

/// Checks the safetensors framing (8-byte little-endian header length, JSON header, data offsets) so
/// that a truncated or foreign file gets a message that says which.
fn check_framing(path: &Path) -> Result<(), BadInput> {
    let shown = path.display();
    let mut f = std::fs::File::open(path).map_err(|e| BadInput(format!("`{shown}`: cannot open: {e}")))?;
    let size = f.metadata().map_err(|e| BadInput(format!("`{shown}`: {e}")))?.len();
    if !f.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Err(BadInput(format!("`{shown}`: not a regular file")));
    }
    let mut len = [0u8; 8];
    if size < 8 || f.read_exact(&mut len).is_err() {
        return Err(BadInput(format!("`{shown}`: not a safetensors file: {size} bytes, shorter than the 8-byte header length")));
    }
    let header_len = u64::from_le_bytes(len);
    if header_len > 100_000_000 || header_len + 8 > size {
        return Err(BadInput(format!(
            "`{shown}`: not a safetensors file, or truncated: header length {header_len} does not fit in {size} bytes"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| BadInput(format!("`{shown}`: {e}")))?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| BadInput(format!("`{shown}`: not a safetensors file: the header is not JSON ({e})")))?;
    let obj = json.as_object().ok_or_else(|| BadInput(format!("`{shown}`: not a safetensors file: the header is not a JSON object")))?;
    let data_len = size - 8 - header_len;
    for (name, entry) in obj.iter().filter(|(n, _)| n.as_str() != "__metadata__") {
        let end = entry["data_offsets"][1]
            .as_u64()
            .ok_or_else(|| BadInput(format!("`{shown}`: not a safetensors file: tensor `{name}` has no data_offsets")))?;
        if end > data_len {
            return Err(BadInput(format!(
                "`{shown}`: truncated: tensor `{name}` ends at data byte {end} but the file holds only {data_len} data bytes"
            )));
        }
    }
    Ok(())
}

fn quantiles(q: &gainguard::protocol::events::SpectrumQuantiles) -> Quantiles {
    Quantiles { p10: q.p10, p50: q.p50, p90: q.p90, p99: q.p99 }
}

fn inspect_one(name: String, t: &Tensor, device: Device, a: &Args) -> Result<Row> {
    let shape = t.size();
    let layout = MatrixLayout::leading_rows(shape.len());
    let (rows, cols) = layout.matrix_shape(&shape);
    let mut row = Row {
        name,
        dtype: format!("{:?}", t.kind()),
        shape,
        matrix: [rows, cols],
        sigma_max: None,
        top_k: Vec::new(),
        stable_rank: None,
        frobenius_norm: None,
        effective_rank: None,
        quantiles: None,
        nonfinite: false,
        method: "svd",
    };
    let m = layout.apply(&t.to_device(device))?;
    if !all_finite(&m) {
        row.nonfinite = true;
        return Ok(row);
    }
    if rows.min(cols) <= a.max_full_dim {
        let f = full_spectrum(&m, FullPrecision::Double)?;
        row.sigma_max = Some(f.sigma_max);
        row.top_k = f.singular_values.iter().take(a.top_k).copied().collect();
        row.stable_rank = Some(f.stable_rank);
        row.frobenius_norm = Some(f.frobenius_norm);
        row.effective_rank = Some(f.effective_rank);
        row.quantiles = Some(quantiles(&f.quantiles));
    } else {
        let mut est = Estimator::new(EstimatorConfig { k: a.top_k.max(1), tol: 1e-7, max_iters: 100, ..Default::default() });
        let e = est.estimate(&m.to_kind(Kind::Double))?;
        let fro = frobenius_norm(&m);
        row.method = "krylov";
        row.sigma_max = Some(e.sigma_max);
        row.top_k = e.top_k;
        row.frobenius_norm = Some(fro);
        row.stable_rank = (e.sigma_max > 0.0).then(|| fro * fro / (e.sigma_max * e.sigma_max));
    }
    Ok(row)
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.6e}"))
}

pub fn run(a: Args) -> Result<()> {
    let shown = a.file.display().to_string();
    let device = gainguard::device::parse_device(&a.device).map_err(BadInput)?;
    check_framing(&a.file)?;
    let tensors = Tensor::read_safetensors(&a.file).map_err(|e| BadInput(format!("`{shown}`: not a readable safetensors file: {e}")))?;
    let mut tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    tensors.sort_by(|x, y| x.0.cmp(&y.0));
    let (matrices, skipped): (Vec<_>, Vec<_>) = tensors.into_iter().partition(|(_, t)| t.dim() >= 2 && t.size().iter().all(|&d| d > 0));
    let total_bytes: u64 = matrices.iter().map(|(_, t)| t.numel() as u64 * t.kind().elt_size_in_bytes() as u64).sum();
    let bar = if std::io::stderr().is_terminal() && total_bytes >= 64 << 20 {
        let b = ProgressBar::with_draw_target(Some(matrices.len() as u64), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}") {
            b.set_style(style);
        }
        b
    } else {
        ProgressBar::hidden()
    };
    let mut rows = Vec::with_capacity(matrices.len());
    for (name, t) in matrices {
        bar.set_message(name.clone());
        rows.push(tch::no_grad(|| inspect_one(name, &t, device, &a))?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    match a.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Format::Table => {
            let header = ["tensor", "shape", "sigma_max", "stable_rank", "frobenius", "eff_rank", "p50", "p99"];
            let cells: Vec<[String; 8]> = rows
                .iter()
                .map(|r| {
                    let shape = format!("[{}]", r.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "));
                    let q = r.quantiles.as_ref();
                    if r.nonfinite {
                        return [r.name.clone(), shape, "NaN/Inf".into(), "-".into(), "-".into(), "-".into(), "-".into(), "-".into()];
                    }
                    [
                        r.name.clone(),
                        shape,
                        fmt(r.sigma_max),
                        r.stable_rank.map_or("-".into(), |x| format!("{x:.2}")),
                        fmt(r.frobenius_norm),
                        r.effective_rank.map_or("-".into(), |x| format!("{x:.1}")),
                        fmt(q.map(|q| q.p50)),
                        fmt(q.map(|q| q.p99)),
                    ]
                })
                .collect();
            let mut widths = header.map(|h| h.len());
            for r in &cells {
                for (w, c) in widths.iter_mut().zip(r) {
                    *w = (*w).max(c.chars().count());
                }
            }
            let line = |c: &[String]| c.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string();
            println!("{}", line(&header.map(String::from)));
            println!("{}", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
            for c in &cells {
                println!("{}", line(c));
            }
            println!("{} matrices in `{shown}` ({:?}); {} tensors of rank < 2 skipped", rows.len(), device, skipped.len());
        }
    }
    Ok(())
}
