//! `gainguard inspect FILE.safetensors [--format table|json] [--device cpu|cuda|auto] [--top-k K] [--full]`
//!
//! Singular-value statistics of every tensor of rank ≥ 2 in a safetensors file. By default what people
//! ask of a checkpoint — sigma_max, the top k, stable rank and Frobenius norm — from the block Krylov
//! estimator (`gainguard_spectra::Krylov` on the mapped bytes, in this process, which never loads
//! libtorch; the Frobenius norm summed exactly in float64); with `--full`, every singular value in
//! float64, which adds the effective rank and quantiles at the cost of a full SVD per matrix, and
//! `--device cuda` — both libtorch's, run by `gainguard-torch` ([`Backend`]).
//!
//! The file is memory-mapped and its tensors are read in place (no copy of the checkpoint); matrices
//! are spread over `--threads` threads (default: every core), one matrix per thread at a time, largest
//! first. Tensors of rank > 2 are read as `[shape[0], rest]` (PyTorch's `weight.view(out, -1)`); with no
//! base shapes there is no width information to do better.

use anyhow::Result;
use gainguard_spectra::{Elem, EstimatorConfig, HostMatrix, Krylov, Outcome};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::{BadInput, Format};

#[derive(clap::Args)]
pub struct Args {
    /// A safetensors file (e.g. a checkpoint written by `Tensor::write_safetensors` or `safetensors.torch`).
    pub file: PathBuf,
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// cpu, cuda, cuda:N or auto (CUDA when available; libtorch's, through gainguard-torch).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Singular values listed per tensor.
    #[arg(long, default_value_t = 4)]
    pub top_k: usize,
    /// Every singular value (float64 SVD, libtorch's, through gainguard-torch): adds the effective rank
    /// and the quantiles p10–p99.
    #[arg(long)]
    pub full: bool,
    /// With --full, matrices whose smaller side exceeds this still get the estimator (a full spectrum
    /// of a 32000-row embedding costs minutes).
    #[arg(long, default_value_t = 8192)]
    pub max_full_dim: i64,
    /// Matrices inspected at once on the CPU (default: the number of cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl Args {
    /// Whether these options need libtorch (a full SVD, or a GPU): `gainguard` then hands the command to
    /// `gainguard-torch`.
    pub fn needs_libtorch(&self) -> bool {
        self.full || self.device != "cpu"
    }

    /// The estimator's settings for one matrix: every top-k value to `TOL` between iterations.
    pub fn estimator_config(&self) -> EstimatorConfig {
        EstimatorConfig { k: self.top_k.max(1), tol: TOL, max_iters: 100, threads: 1, tol_top_k: true, warm_start: false, ..Default::default() }
    }
}

/// The change between two iterations below which every top-k value is taken as converged. Ritz values
/// approach the singular values from below and the error left is of the order of the last change: on the
/// benchmark's 84 gapless Gaussian matrices (the hardest case; BENCHMARKS.md, "gainguard inspect") 1e-4
/// leaves at most 4e-5 in sigma_max and 8e-5 in the top 4, twelve times inside the 1e-3 inspect
/// promises, in two iterations fewer than 1e-5 takes.
pub const TOL: f64 = 1e-4;

#[derive(Serialize)]
pub struct Quantiles {
    pub p10: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

#[derive(Serialize)]
pub struct Row {
    pub name: String,
    pub shape: Vec<i64>,
    pub dtype: String,
    /// The matrix the tensor was read as.
    pub matrix: [i64; 2],
    pub sigma_max: Option<f64>,
    pub top_k: Vec<f64>,
    pub stable_rank: Option<f64>,
    pub frobenius_norm: Option<f64>,
    /// With --full only.
    pub effective_rank: Option<f64>,
    /// With --full only.
    pub quantiles: Option<Quantiles>,
    pub nonfinite: bool,
    /// `krylov` (the top-k estimate) or `svd` (the full spectrum, float64, with --full).
    pub method: &'static str,
    /// Krylov iterations, and whether the estimate met its tolerance before the iteration cap.
    pub iterations: Option<u32>,
    pub converged: Option<bool>,
}

impl Row {
    /// The row of `entry`, before any value is computed.
    pub fn of(entry: &Entry) -> Row {
        let (rows, cols) = entry.matrix();
        Row {
            name: entry.name.clone(),
            dtype: entry.dtype.name().into(),
            shape: entry.shape.clone(),
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
        }
    }

    /// Fills the estimator's fields from an outcome.
    pub fn set_estimate(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::NonFinite => self.nonfinite = true,
            Outcome::Done(e) => {
                self.sigma_max = Some(e.sigma_max);
                self.top_k = e.top_k;
                self.frobenius_norm = Some(e.frobenius_norm);
                self.stable_rank = (e.sigma_max > 0.0).then(|| e.frobenius_norm.powi(2) / (e.sigma_max * e.sigma_max));
                self.iterations = Some(e.iterations);
                self.converged = Some(e.converged);
            }
        }
    }
}

/// The safetensors dtypes inspect reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    fn parse(dtype: &str) -> Option<Dtype> {
        Some(match dtype {
            "F64" => Dtype::F64,
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "I16" => Dtype::I16,
            "I8" => Dtype::I8,
            "U8" => Dtype::U8,
            "BOOL" => Dtype::Bool,
            _ => return None,
        })
    }

    /// The safetensors spelling (`F32`, `BF16`, …).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }

    /// The element type the estimator reads in place; None for integers and booleans.
    fn elem(self) -> Option<Elem> {
        match self {
            Dtype::F64 => Some(Elem::F64),
            Dtype::F32 => Some(Elem::F32),
            Dtype::F16 => Some(Elem::F16),
            Dtype::BF16 => Some(Elem::Bf16),
            _ => None,
        }
    }

    /// Element `i` of little-endian `bytes` as float32 (integers and booleans, as libtorch converts them).
    fn to_f32(self, bytes: &[u8], i: usize) -> f32 {
        let at = |n: usize| &bytes[i * n..(i + 1) * n];
        match self {
            Dtype::I64 => i64::from_le_bytes(at(8).try_into().expect("8 bytes")) as f32,
            Dtype::I32 => i32::from_le_bytes(at(4).try_into().expect("4 bytes")) as f32,
            Dtype::I16 => i16::from_le_bytes(at(2).try_into().expect("2 bytes")) as f32,
            Dtype::I8 => at(1)[0] as i8 as f32,
            Dtype::U8 => at(1)[0] as f32,
            Dtype::Bool => (at(1)[0] != 0) as u8 as f32,
            Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16 => unreachable!("floats are read in place"),
        }
    }
}

/// One tensor's entry in the safetensors header.
pub struct Entry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<i64>,
    /// Byte range within the data section.
    start: usize,
    end: usize,
}

impl Entry {
    /// `(rows, cols)` of the matrix a tensor of rank ≥ 2 is read as: `[shape[0], rest]`, PyTorch's
    /// `weight.view(out, -1)`.
    pub fn matrix(&self) -> (i64, i64) {
        (self.shape[0], self.shape[1..].iter().product())
    }
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
        // matrix or tensor that views it is gone (they live in `run`).
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
        let kind = Dtype::parse(dtype).ok_or_else(|| bad(&format!("has dtype {dtype}, which inspect does not read")))?;
        let shape: Vec<i64> = entry["shape"]
            .as_array()
            .and_then(|s| s.iter().map(|d| d.as_u64().filter(|&d| d <= i64::MAX as u64).map(|d| d as i64)).collect())
            .ok_or_else(|| bad("has no shape of non-negative integers"))?;
        let numel = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        let want = numel.and_then(|n| n.checked_mul(kind.size() as u64));
        if want != Some(end - start) {
            return Err(bad(&format!("of shape {shape:?} and dtype {dtype} needs {want:?} bytes but has {}", end - start)));
        }
        entries.push(Entry { name: name.clone(), dtype: kind, shape, start: start as usize, end: end as usize });
    }
    Ok((entries, 8 + header_len as usize))
}

/// `--threads`, or one thread per core when it is not given.
pub fn every_core(requested: Option<usize>) -> usize {
    requested.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1)
}

/// Where and how each matrix is computed.
pub trait Backend: Sync {
    /// The place the table's footer names (`Cpu`, `Cuda(0)`).
    fn place(&self) -> String;
    /// Matrices inspected at once.
    fn threads(&self, requested: Option<usize>) -> usize;
    /// Runs on each worker thread before its first matrix.
    fn worker_setup(&self) {}
    /// Fills `row` (name, shapes and dtype set) for the tensor `entry`, whose little-endian, row-major
    /// bytes are `bytes`.
    fn inspect(&self, entry: &Entry, bytes: &[u8], args: &Args, row: &mut Row) -> Result<()>;
}

/// The estimator on the CPU, in this process, on the mapped bytes: floats in place (unaligned reads),
/// integers and booleans converted to float32 first. One matrix per thread, each on one core: no
/// fork–join per pass.
pub struct Host;

impl Backend for Host {
    fn place(&self) -> String {
        "Cpu".into()
    }

    fn threads(&self, requested: Option<usize>) -> usize {
        every_core(requested)
    }

    fn inspect(&self, entry: &Entry, bytes: &[u8], args: &Args, row: &mut Row) -> Result<()> {
        let (rows, cols) = entry.matrix();
        let (rows, cols) = (rows as usize, cols as usize);
        let converted: Vec<f32>;
        let matrix = match entry.dtype.elem() {
            // SAFETY: `bytes` holds exactly rows·cols elements of the dtype (checked by parse_header), read
            // unaligned, and outlives the matrix; nothing writes through it.
            Some(elem) => unsafe { HostMatrix::from_raw(bytes.as_ptr(), rows, cols, elem) },
            None => {
                converted = (0..rows * cols).map(|i| entry.dtype.to_f32(bytes, i)).collect();
                // SAFETY: as above, over the converted copy.
                unsafe { HostMatrix::from_raw(converted.as_ptr() as *const u8, rows, cols, Elem::F32) }
            }
        };
        row.set_estimate(Krylov::new(args.estimator_config()).estimate_host(&matrix, 1));
        Ok(())
    }
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.6e}"))
}

/// Inspects every matrix of `a.file` with `backend` and prints the rows.
pub fn run(a: &Args, backend: &dyn Backend) -> Result<()> {
    let shown = a.file.display().to_string();
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
    let threads = backend.threads(a.threads).clamp(1, matrices.len().max(1));
    // Largest first, so that no thread is left with a big matrix at the end.
    let mut order: Vec<usize> = (0..matrices.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(matrices[i].end - matrices[i].start));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Row>>>> = Mutex::new((0..matrices.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                backend.worker_setup();
                loop {
                    let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                    let entry = &matrices[i];
                    bar.set_message(entry.name.clone());
                    let mut row = Row::of(entry);
                    let done = backend.inspect(entry, &data[entry.start..entry.end], a, &mut row).map(|()| row);
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(done);
                    bar.inc(1);
                }
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
        Format::Table => print_table(&rows, a.full, &shown, &backend.place(), skipped.len()),
    }
    Ok(())
}

fn print_table(rows: &[Row], full: bool, shown: &str, place: &str, skipped: usize) {
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
    println!("{} matrices in `{shown}` ({place}, {how}); {skipped} tensors of rank < 2 skipped", rows.len());
}
