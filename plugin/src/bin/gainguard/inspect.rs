//! `gainguard inspect FILE.safetensors [--format table|json] [--device cpu|cuda|auto] [--top-k K] [--full]`
//!
//! Singular-value statistics of every tensor of rank ≥ 2 in a safetensors file. By default what people
//! ask of a checkpoint — sigma_max, the top k, stable rank and Frobenius norm — from the block Krylov
//! estimator (`gainguard::spectra::Estimator`, every top-k value to 1e-6 between iterations, the
//! Frobenius norm summed exactly in float64); with `--full`, every singular value in float64, which adds
//! the effective rank and quantiles at the cost of a full SVD per matrix.
//!
//! The file is memory-mapped and its tensors are read in place (no copy of the checkpoint); matrices
//! are spread over `--threads` threads (default: every core), one matrix per thread at a time, largest
//! first. Tensors of rank > 2 are read as `[shape[0], rest]` (PyTorch's `weight.view(out, -1)`); with no
//! base shapes there is no width information to do better.

use anyhow::Result;
use gainguard::spectra::{full_spectrum, Estimator, EstimatorConfig, FullPrecision, MatrixLayout, SpectraError};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
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
    /// Every singular value (float64 SVD): adds the effective rank and the quantiles p10–p99.
    #[arg(long)]
    full: bool,
    /// With --full, matrices whose smaller side exceeds this still get the estimator (a full spectrum
    /// of a 32000-row embedding costs minutes).
    #[arg(long, default_value_t = 8192)]
    max_full_dim: i64,
    /// Matrices inspected at once on the CPU (default: the number of cores).
    #[arg(long)]
    threads: Option<usize>,
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
    /// With --full only.
    effective_rank: Option<f64>,
    /// With --full only.
    quantiles: Option<Quantiles>,
    nonfinite: bool,
    /// `krylov` (the top-k estimate) or `svd` (the full spectrum, float64, with --full).
    method: &'static str,
    /// Krylov iterations, and whether the estimate met its tolerance before the iteration cap.
    iterations: Option<u32>,
    converged: Option<bool>,
}

/// One tensor's entry in the safetensors header.
struct Entry {
    name: String,
    kind: Kind,
    shape: Vec<i64>,
    /// Byte range within the data section.
    start: usize,
    end: usize,
}

fn kind_of(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F64" => Kind::Double,
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        _ => return None,
    })
}

/// The file memory-mapped read-only.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn open(path: &Path) -> Result<Mapping, BadInput> {
        let shown = path.display();
        let f = std::fs::File::open(path).map_err(|e| BadInput(format!("`{shown}`: cannot open: {e}")))?;
        let meta = f.metadata().map_err(|e| BadInput(format!("`{shown}`: {e}")))?;
        if !meta.is_file() {
            return Err(BadInput(format!("`{shown}`: not a regular file")));
        }
        let len = meta.len() as usize;
        if len < 8 {
            return Err(BadInput(format!("`{shown}`: not a safetensors file: {len} bytes, shorter than the 8-byte header length")));
        }
        use std::os::fd::AsRawFd;
        // SAFETY: a private read-only mapping of a file we opened; it is unmapped in Drop, after every
        // tensor that views it is gone (they live in `run`).
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, f.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(BadInput(format!("`{shown}`: cannot map: {}", std::io::Error::last_os_error())));
        }
        Ok(Mapping { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: len bytes mapped readable at ptr for the mapping's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `open` mapped.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

// SAFETY: the mapping is read-only; threads only read it.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

/// Parses and checks the safetensors framing (8-byte little-endian header length, JSON header, dtypes,
/// shapes and data offsets), so that a truncated or foreign file gets a message that says which.
/// Returns the tensors and where the data section starts.
fn parse_header(path: &Path, bytes: &[u8]) -> Result<(Vec<Entry>, usize), BadInput> {
    let shown = path.display();
    let size = bytes.len() as u64;
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if header_len > 100_000_000 || header_len + 8 > size {
        return Err(BadInput(format!(
            "`{shown}`: not a safetensors file, or truncated: header length {header_len} does not fit in {size} bytes"
        )));
    }
    let header = &bytes[8..8 + header_len as usize];
    let json: serde_json::Value = serde_json::from_slice(header)
        .map_err(|e| BadInput(format!("`{shown}`: not a safetensors file: the header is not JSON ({e})")))?;
    let obj = json.as_object().ok_or_else(|| BadInput(format!("`{shown}`: not a safetensors file: the header is not a JSON object")))?;
    let data_len = size - 8 - header_len;
    let mut entries = Vec::new();
    for (name, entry) in obj.iter().filter(|(n, _)| n.as_str() != "__metadata__") {
        let bad = |what: &str| BadInput(format!("`{shown}`: not a safetensors file: tensor `{name}` {what}"));
        let offsets = entry["data_offsets"].as_array().filter(|o| o.len() == 2).ok_or_else(|| bad("has no data_offsets"))?;
        let (start, end) = match (offsets[0].as_u64(), offsets[1].as_u64()) {
            (Some(s), Some(e)) if s <= e => (s, e),
            _ => return Err(bad("has data_offsets that are not a range")),
        };
        if end > data_len {
            return Err(BadInput(format!(
                "`{shown}`: truncated: tensor `{name}` ends at data byte {end} but the file holds only {data_len} data bytes"
            )));
        }
        let dtype = entry["dtype"].as_str().ok_or_else(|| bad("has no dtype"))?;
        let kind = kind_of(dtype).ok_or_else(|| bad(&format!("has dtype {dtype}, which inspect does not read")))?;
        let shape: Vec<i64> = entry["shape"]
            .as_array()
            .and_then(|s| s.iter().map(|d| d.as_u64().filter(|&d| d <= i64::MAX as u64).map(|d| d as i64)).collect())
            .ok_or_else(|| bad("has no shape of non-negative integers"))?;
        let numel = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        let want = numel.and_then(|n| n.checked_mul(kind.elt_size_in_bytes() as u64));
        if want != Some(end - start) {
            return Err(bad(&format!("of shape {shape:?} and dtype {dtype} needs {want:?} bytes but has {}", end - start)));
        }
        entries.push(Entry { name: name.clone(), kind, shape, start: start as usize, end: end as usize });
    }
    Ok((entries, 8 + header_len as usize))
}

/// The tensor viewing its bytes in the mapping (a copy when they are not aligned for the dtype).
fn tensor_of(entry: &Entry, data: &[u8]) -> Result<Tensor> {
    let bytes = &data[entry.start..entry.end];
    let elt = entry.kind.elt_size_in_bytes();
    let strides: Vec<i64> = (0..entry.shape.len()).map(|i| entry.shape[i + 1..].iter().product()).collect();
    if (bytes.as_ptr() as usize) % elt == 0 {
        // SAFETY: `bytes` holds exactly numel·elt bytes (checked by parse_header), aligned, and the
        // mapping outlives every tensor made here; nothing writes through it (the pages are read-only).
        Ok(unsafe { Tensor::f_from_blob(bytes.as_ptr(), &entry.shape, &strides, entry.kind, Device::Cpu)? })
    } else {
        let t = Tensor::f_empty(entry.shape.as_slice(), (entry.kind, Device::Cpu))?;
        // SAFETY: `t` is a fresh contiguous tensor of exactly bytes.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), t.data_ptr() as *mut u8, bytes.len()) };
        Ok(t)
    }
}

fn quantiles(q: &gainguard::protocol::events::SpectrumQuantiles) -> Quantiles {
    Quantiles { p10: q.p10, p50: q.p50, p90: q.p90, p99: q.p99 }
}

fn inspect_one(entry: &Entry, t: &Tensor, device: Device, a: &Args) -> Result<Row> {
    let shape = entry.shape.clone();
    let layout = MatrixLayout::leading_rows(shape.len());
    let (rows, cols) = layout.matrix_shape(&shape);
    let mut row = Row {
        name: entry.name.clone(),
        dtype: format!("{:?}", entry.kind),
        shape,
        matrix: [rows, cols],
        sigma_max: None,
        top_k: Vec::new(),
        stable_rank: None,
        frobenius_norm: None,
        effective_rank: None,
        quantiles: None,
        nonfinite: false,
        method: "krylov",
        iterations: None,
        converged: None,
    };
    let m = layout.apply(&t.to_device(device))?;
    if a.full && rows.min(cols) <= a.max_full_dim {
        match full_spectrum(&m, FullPrecision::Double) {
            Err(SpectraError::NonFinite(_)) => row.nonfinite = true,
            Err(e) => return Err(e.into()),
            Ok(f) => {
                row.method = "svd";
                row.sigma_max = Some(f.sigma_max);
                row.top_k = f.singular_values.iter().take(a.top_k).copied().collect();
                row.stable_rank = Some(f.stable_rank);
                row.frobenius_norm = Some(f.frobenius_norm);
                row.effective_rank = Some(f.effective_rank);
                row.quantiles = Some(quantiles(&f.quantiles));
            }
        }
        return Ok(row);
    }
    let config = EstimatorConfig { k: a.top_k.max(1), tol: 1e-5, max_iters: 100, threads: 1, tol_top_k: true, warm_start: false, ..Default::default() };
    match Estimator::new(config).estimate(&m) {
        Err(SpectraError::NonFinite(_)) => row.nonfinite = true,
        Err(e) => return Err(e.into()),
        Ok(e) => {
            row.sigma_max = Some(e.sigma_max);
            row.top_k = e.top_k.into_iter().take(a.top_k).collect();
            row.frobenius_norm = Some(e.frobenius_norm);
            row.stable_rank = (e.sigma_max > 0.0).then(|| e.frobenius_norm.powi(2) / (e.sigma_max * e.sigma_max));
            row.iterations = Some(e.iterations);
            row.converged = Some(e.converged);
        }
    }
    Ok(row)
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.6e}"))
}

pub fn run(a: Args) -> Result<()> {
    let shown = a.file.display().to_string();
    // Loading libtorch's CUDA backend maps cuBLAS and friends (a third of a second); not for the CPU.
    let device = if a.device == "cpu" { Device::Cpu } else { gainguard::device::parse_device(&a.device).map_err(BadInput)? };
    let mapping = Mapping::open(&a.file)?;
    let (entries, data_start) = parse_header(&a.file, mapping.bytes())?;
    let data = &mapping.bytes()[data_start..];
    let (mut matrices, skipped): (Vec<Entry>, Vec<Entry>) = entries.into_iter().partition(|e| e.shape.len() >= 2 && e.shape.iter().all(|&d| d > 0));
    matrices.sort_by(|x, y| x.name.cmp(&y.name));
    let total_bytes: u64 = matrices.iter().map(|e| (e.end - e.start) as u64).sum();
    let bar = if std::io::stderr().is_terminal() && total_bytes >= 64 << 20 {
        let b = ProgressBar::with_draw_target(Some(matrices.len() as u64), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}") {
            b.set_style(style);
        }
        b
    } else {
        ProgressBar::hidden()
    };
    // One matrix per thread at a time, each single-threaded: no fork–join per product, and libtorch's
    // own threads (LAPACK, the full SVD) stay off the cores the other matrices use. A GPU takes one
    // stream of work.
    let threads = match device {
        Device::Cpu => a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1),
        _ => 1,
    }
    .min(matrices.len().max(1));
    tch::set_num_threads(1);
    // Largest first, so that no thread is left with a big matrix at the end.
    let mut order: Vec<usize> = (0..matrices.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(matrices[i].end - matrices[i].start));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Row>>>> = Mutex::new((0..matrices.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                gainguard::fused::limit_this_thread(1);
                tch::no_grad(|| loop {
                    let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                    let entry = &matrices[i];
                    bar.set_message(entry.name.clone());
                    let row = tensor_of(entry, data).and_then(|t| inspect_one(entry, &t, device, &a));
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(row);
                    bar.inc(1);
                });
            });
        }
    });
    bar.finish_and_clear();
    let rows: Vec<Row> = results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .zip(&matrices)
        .map(|(r, e)| r.unwrap_or_else(|| Err(anyhow::anyhow!("tensor `{}` was not inspected", e.name))).map_err(|err| err.context(format!("`{shown}`: tensor `{}`", e.name))))
        .collect::<Result<_>>()?;
    match a.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Format::Table => print_table(&rows, a.full, &shown, device, skipped.len()),
    }
    Ok(())
}

fn print_table(rows: &[Row], full: bool, shown: &str, device: Device, skipped: usize) {
    let mut header = vec!["tensor", "shape", "sigma_max", "stable_rank", "frobenius"];
    if full {
        header.extend(["eff_rank", "p50", "p99"]);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let shape = format!("[{}]", r.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "));
            let mut c = vec![r.name.clone(), shape];
            if r.nonfinite {
                c.push("NaN/Inf".into());
                c.resize(header.len(), "-".into());
                return c;
            }
            c.extend([fmt(r.sigma_max), r.stable_rank.map_or("-".into(), |x| format!("{x:.2}")), fmt(r.frobenius_norm)]);
            if full {
                let q = r.quantiles.as_ref();
                c.extend([r.effective_rank.map_or("-".into(), |x| format!("{x:.1}")), fmt(q.map(|q| q.p50)), fmt(q.map(|q| q.p99))]);
            }
            c
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &cells {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |c: &[String]| c.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string();
    println!("{}", line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>()));
    println!("{}", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
    for c in &cells {
        println!("{}", line(c));
    }
    let how = if full { "full spectra (float64 SVD)" } else { "top-k estimates (block Krylov; --full for every singular value)" };
    println!("{} matrices in `{shown}` ({device:?}, {how}); {skipped} tensors of rank < 2 skipped", rows.len());
}
