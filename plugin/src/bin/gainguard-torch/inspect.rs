//! `gainguard inspect --full` and `gainguard inspect --device cuda|auto`: the inspect backend that needs
//! libtorch (a float64 SVD per matrix; products on a GPU). The reader, the rows and the table are
//! `gainguard_cli::inspect`'s, shared with the libtorch-free CPU path of `gainguard` itself.

use anyhow::Result;
use gainguard::spectra::{full_spectrum, Estimator, FullPrecision, MatrixLayout, SpectraError};
use gainguard_cli::inspect::{Args, Backend, Dtype, Entry, Quantiles, Row};
use tch::{Device, Kind, Tensor};

use crate::BadInput;

pub struct Torch {
    device: Device,
}

impl Torch {
    pub fn new(a: &Args) -> Result<Torch> {
        // Loading libtorch's CUDA backend maps cuBLAS and friends (a third of a second); not for the CPU.
        let device = if a.device == "cpu" { Device::Cpu } else { gainguard::device::parse_device(&a.device).map_err(BadInput)? };
        // One matrix per thread, each single-threaded: libtorch's own threads (LAPACK, the full SVD) stay
        // off the cores the other matrices use.
        tch::set_num_threads(1);
        Ok(Torch { device })
    }
}

fn kind_of(dtype: Dtype) -> Kind {
    match dtype {
        Dtype::F64 => Kind::Double,
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::Bool => Kind::Bool,
    }
}

/// The tensor viewing its bytes in the mapping (a copy when they are not aligned for the dtype).
fn tensor_of(entry: &Entry, bytes: &[u8]) -> Result<Tensor> {
    let kind = kind_of(entry.dtype);
    let strides: Vec<i64> = (0..entry.shape.len()).map(|i| entry.shape[i + 1..].iter().product()).collect();
    if (bytes.as_ptr() as usize) % entry.dtype.size() == 0 {
        // SAFETY: `bytes` holds exactly numel·elt bytes (checked when the header was read), aligned, and
        // the mapping outlives every tensor made here; nothing writes through it (the pages are read-only).
        Ok(unsafe { Tensor::f_from_blob(bytes.as_ptr(), &entry.shape, &strides, kind, Device::Cpu)? })
    } else {
        let t = Tensor::f_empty(entry.shape.as_slice(), (kind, Device::Cpu))?;
        // SAFETY: `t` is a fresh contiguous tensor of exactly bytes.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), t.data_ptr() as *mut u8, bytes.len()) };
        Ok(t)
    }
}

impl Backend for Torch {
    fn place(&self) -> String {
        format!("{:?}", self.device)
    }

    fn threads(&self, requested: Option<usize>) -> usize {
        match self.device {
            Device::Cpu => gainguard_cli::inspect::every_core(requested),
            // A GPU takes one stream of work.
            _ => 1,
        }
    }

    fn worker_setup(&self) {
        gainguard::fused::limit_this_thread(1);
    }

    fn inspect(&self, entry: &Entry, bytes: &[u8], a: &Args, row: &mut Row) -> Result<()> {
        tch::no_grad(|| {
            let t = tensor_of(entry, bytes)?;
            let m = MatrixLayout::leading_rows(entry.shape.len()).apply(&t.to_device(self.device))?;
            let (rows, cols) = entry.matrix();
            if a.full && rows.min(cols) <= a.max_full_dim {
                match full_spectrum(&m, FullPrecision::Double) {
                    Err(SpectraError::NonFinite(_)) => row.nonfinite = true,
                    Err(e) => return Err(e.into()),
                    Ok(f) => {
                        let q = &f.quantiles;
                        row.method = "svd";
                        row.sigma_max = Some(f.sigma_max);
                        row.top_k = f.singular_values.iter().take(a.top_k).copied().collect();
                        row.stable_rank = Some(f.stable_rank);
                        row.frobenius_norm = Some(f.frobenius_norm);
                        row.effective_rank = Some(f.effective_rank);
                        row.quantiles = Some(Quantiles { p10: q.p10, p50: q.p50, p90: q.p90, p99: q.p99 });
                    }
                }
                return Ok(());
            }
            match Estimator::new(a.estimator_config()).estimate(&m) {
                Err(SpectraError::NonFinite(_)) => row.set_estimate(gainguard_spectra::Outcome::NonFinite),
                Err(e) => return Err(e.into()),
                Ok(e) => row.set_estimate(gainguard_spectra::Outcome::Done(e)),
            }
            Ok(())
        })
    }
}
