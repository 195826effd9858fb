//! Device selection, with the CUDA backend of libtorch loaded explicitly.
//!
//! tch links `libtorch_cuda.so` with the linker's default `--as-needed`, which drops it because no
//! symbol of it is referenced, so `tch::Cuda::is_available()` says false even on a GPU (docs/design.md §5.2).
//! [`load_cuda_backend`] `dlopen`s it from the directory that holds the already-loaded
//! `libtorch_cpu.so`, whatever `LD_LIBRARY_PATH` or rpath found that one.

use std::ffi::{CStr, CString};
use std::sync::OnceLock;

/// What happened when the CUDA backend was looked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CudaBackend {
    /// `libtorch_cuda.so` is loaded.
    Loaded(String),
    /// This libtorch has no CUDA backend, or it could not be loaded (message says why).
    Unavailable(String),
}

static BACKEND: OnceLock<CudaBackend> = OnceLock::new();

/// The directory of the `libtorch_cpu.so` this process has mapped (tch's own shim is linked statically
/// into the executable, so the loader's view of the mapped libraries is where libtorch's path is found).
fn libtorch_lib_dir() -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| std::path::Path::new(p).parent().map(|d| d.to_path_buf()))
}

/// Loads libtorch's CUDA backend once per process. Safe to call many times and on machines with no GPU.
pub fn load_cuda_backend() -> &'static CudaBackend {
    BACKEND.get_or_init(|| {
        let Some(dir) = libtorch_lib_dir() else {
            return CudaBackend::Unavailable("could not locate the loaded libtorch_cpu.so".into());
        };
        let lib = dir.join("libtorch_cuda.so");
        if !lib.exists() {
            return CudaBackend::Unavailable(format!("{} does not exist (CPU-only libtorch)", lib.display()));
        }
        let c = CString::new(lib.to_string_lossy().as_bytes()).expect("path has no NUL");
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            let msg = unsafe { CStr::from_ptr(libc::dlerror()) }.to_string_lossy().into_owned();
            return CudaBackend::Unavailable(format!("dlopen {}: {msg}", lib.display()));
        }
        CudaBackend::Loaded(lib.display().to_string())
    })
}

/// Parses `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available, else CPU). Loads the CUDA backend
/// first, so `cuda` works on a GPU machine.
pub fn parse_device(s: &str) -> Result<tch::Device, String> {
    load_cuda_backend();
    let cuda_ok = tch::Cuda::is_available();
    match s {
        "cpu" => Ok(tch::Device::Cpu),
        "auto" => Ok(if cuda_ok { tch::Device::Cuda(0) } else { tch::Device::Cpu }),
        _ => {
            let idx = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| format!("device `{s}`: expected cpu, auto, cuda or cuda:N"))?,
                None => return Err(format!("device `{s}`: expected cpu, auto, cuda or cuda:N")),
            };
            if !cuda_ok {
                let why = match load_cuda_backend() {
                    CudaBackend::Loaded(_) => "no CUDA device is visible (driver or GPU missing)".to_string(),
                    CudaBackend::Unavailable(m) => m.clone(),
                };
                return Err(format!("device `{s}` requested but CUDA is not available: {why}"));
            }
            let n = tch::Cuda::device_count() as usize;
            if idx >= n {
                return Err(format!("device `{s}`: only {n} CUDA device(s) visible"));
            }
            Ok(tch::Device::Cuda(idx))
        }
    }
}
