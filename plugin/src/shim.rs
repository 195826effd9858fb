//! The C++ shim (`csrc/fused_adamw.cpp`, compiled by `build.rs`): every foreign call of the crate, and
//! nothing else. Each entry point gets a safe wrapper here that states what the caller must hold; the rest
//! of the crate uses the wrappers (the fused step in [`crate::fused`], `zero_grad` in [`crate::optim`], the
//! spectra worker's thread limit in [`crate::sampler`]).
//!
//! A build without libtorch's headers has no shim (cfg `gainguard_fused_shim` unset): every wrapper then
//! reports [`NO_SHIM`] (or false), and the callers take their libtorch fallbacks.

use std::ffi::c_void;

use tch::Tensor;

/// The message of every wrapper in a build without the shim.
pub const NO_SHIM: &str = "built without gainguard's C++ shim (csrc/fused_adamw.cpp)";

/// Whether this build carries the shim.
pub fn available() -> bool {
    cfg!(gainguard_fused_shim)
}

/// The dtype codes the shim's CPU loops take (`dtype` of `gainguard_adamw_cpu`, `gainguard_sum_squares`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// f32 values (f32 moments).
    F32 = 0,
    /// f64 values (f64 moments).
    F64 = 1,
    /// bf16 values (f32 moments).
    BF16 = 2,
    /// f16 values (f32 moments).
    F16 = 3,
}

/// Raw buffers of one group for the CPU loops: `numels[i]` contiguous elements at each pointer.
pub struct RawGroup {
    pub params: Vec<*mut c_void>,
    pub grads: Vec<*mut c_void>,
    pub first_moments: Vec<*mut c_void>,
    pub second_moments: Vec<*mut c_void>,
    pub numels: Vec<i64>,
}

impl RawGroup {
    fn check(&self) -> usize {
        let n = self.params.len();
        assert!(self.grads.len() == n && self.first_moments.len() == n && self.second_moments.len() == n && self.numels.len() == n);
        n
    }
}

/// The scalars of `gainguard_adamw_cpu`: shared by the group, and per tensor (own step counts).
pub struct CpuStep<'a> {
    pub decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub step_sizes: &'a [f64],
    pub bias_correction2_sqrts: &'a [f64],
}

/// The scalars of `gainguard_fused_adamw` (ATen's `_fused_adamw_`), with one step count per tensor.
pub struct AtenStep<'a> {
    pub steps: &'a [f64],
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// The `at::Tensor*` behind a tch tensor, as the shim's tensor entry points take it.
pub fn handle(t: &Tensor) -> *mut c_void {
    t.as_ptr() as *mut c_void
}

#[cfg(gainguard_fused_shim)]
mod imp {
    use std::ffi::{c_char, c_int, c_void, CStr};

    use super::{AtenStep, CpuStep, DType, RawGroup};

    extern "C" {
        fn gainguard_adamw_cpu(
            params: *const *mut c_void,
            grads: *const *mut c_void,
            exp_avgs: *const *mut c_void,
            exp_avg_sqs: *const *mut c_void,
            numels: *const i64,
            n: usize,
            dtype: c_int,
            decay: f64,
            beta1: f64,
            beta2: f64,
            eps: f64,
            step_sizes: *const f64,
            bias_correction2_sqrts: *const f64,
            err: *mut c_char,
            cap: usize,
        ) -> c_int;

        fn gainguard_fused_adamw(
            params: *const *mut c_void,
            grads: *const *mut c_void,
            exp_avgs: *const *mut c_void,
            exp_avg_sqs: *const *mut c_void,
            n: usize,
            steps: *const f64,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
            err: *mut c_char,
            cap: usize,
        ) -> c_int;

        fn gainguard_sum_squares(
            tensors: *const *mut c_void,
            numels: *const i64,
            dtypes: *const c_int,
            n: usize,
            sums: *mut f64,
            err: *mut c_char,
            cap: usize,
        ) -> c_int;

        fn gainguard_clear_grads(tensors: *const *mut c_void, n: usize, err: *mut c_char, cap: usize) -> c_int;

        fn gainguard_limit_this_thread(threads: c_int);

        fn gainguard_sqrt_cpu(input: *const c_void, out: *mut c_void, n: i64, dtype: c_int, err: *mut c_char, cap: usize) -> c_int;

        fn gainguard_stream_probe(
            params: *const *mut c_void,
            grads: *const *mut c_void,
            exp_avgs: *const *mut c_void,
            exp_avg_sqs: *const *mut c_void,
            numels: *const i64,
            n: usize,
            err: *mut c_char,
            cap: usize,
        ) -> c_int;
    }

    /// Runs a shim call that reports failure as 1 and a message in the buffer it is given.
    fn checked(call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
        let mut err = vec![0 as c_char; 1024];
        if call(err.as_mut_ptr(), err.len()) == 0 {
            Ok(())
        } else {
            // SAFETY: the shim NUL-terminates within the buffer it was given.
            Err(unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned())
        }
    }

    pub fn adamw_cpu(group: &RawGroup, dtype: DType, s: &CpuStep<'_>) -> Result<(), String> {
        let n = group.check();
        assert!(s.step_sizes.len() == n && s.bias_correction2_sqrts.len() == n);
        // SAFETY (caller): every buffer belongs to a live, contiguous tensor of `dtype` (moments: f32 for
        // bf16/f16) with `numels[i]` elements; parameters, gradients and moments do not overlap.
        checked(|err, cap| unsafe {
            gainguard_adamw_cpu(
                group.params.as_ptr(),
                group.grads.as_ptr(),
                group.first_moments.as_ptr(),
                group.second_moments.as_ptr(),
                group.numels.as_ptr(),
                n,
                dtype as c_int,
                s.decay,
                s.beta1,
                s.beta2,
                s.eps,
                s.step_sizes.as_ptr(),
                s.bias_correction2_sqrts.as_ptr(),
                err,
                cap,
            )
        })
    }

    pub fn fused_adamw(params: &[*mut c_void], grads: &[*mut c_void], first: &[*mut c_void], second: &[*mut c_void], s: &AtenStep<'_>) -> Result<(), String> {
        let n = params.len();
        assert!(grads.len() == n && first.len() == n && second.len() == n && s.steps.len() == n);
        // SAFETY (caller): every pointer is a live `at::Tensor*` owned by a tch `Tensor` the caller holds; the
        // shim catches all C++ exceptions.
        checked(|err, cap| unsafe {
            gainguard_fused_adamw(
                params.as_ptr(),
                grads.as_ptr(),
                first.as_ptr(),
                second.as_ptr(),
                n,
                s.steps.as_ptr(),
                s.lr,
                s.beta1,
                s.beta2,
                s.weight_decay,
                s.eps,
                err,
                cap,
            )
        })
    }

    pub fn sum_squares(buffers: &[*mut c_void], numels: &[i64], dtypes: &[DType]) -> Result<Vec<f64>, String> {
        let n = buffers.len();
        assert!(numels.len() == n && dtypes.len() == n);
        let codes: Vec<c_int> = dtypes.iter().map(|d| *d as c_int).collect();
        let mut sums = vec![0.0; n];
        // SAFETY (caller): live contiguous CPU buffers of `numels[i]` values of `dtypes[i]`, read only.
        checked(|err, cap| unsafe { gainguard_sum_squares(buffers.as_ptr(), numels.as_ptr(), codes.as_ptr(), n, sums.as_mut_ptr(), err, cap) })?;
        Ok(sums)
    }

    pub fn clear_grads(tensors: &[*mut c_void]) -> Result<(), String> {
        // SAFETY (caller): live `at::Tensor*` handles.
        checked(|err, cap| unsafe { gainguard_clear_grads(tensors.as_ptr(), tensors.len(), err, cap) })
    }

    pub fn limit_this_thread(threads: c_int) -> bool {
        // SAFETY: sets thread-local runtime settings only.
        unsafe { gainguard_limit_this_thread(threads) };
        true
    }

    pub fn sqrt_cpu(input: *mut c_void, out: *mut c_void, n: i64, dtype: DType) -> Result<(), String> {
        // SAFETY (caller): the buffers of live contiguous CPU tensors of `n` elements of `dtype` (F32 or F64).
        checked(|err, cap| unsafe { gainguard_sqrt_cpu(input, out, n, dtype as c_int, err, cap) })
    }

    pub fn stream_probe(group: &RawGroup) -> Result<(), String> {
        let n = group.check();
        // SAFETY (caller): as for adamw_cpu: live, contiguous, non-overlapping f32 buffers.
        checked(|err, cap| unsafe {
            gainguard_stream_probe(
                group.params.as_ptr(),
                group.grads.as_ptr(),
                group.first_moments.as_ptr(),
                group.second_moments.as_ptr(),
                group.numels.as_ptr(),
                n,
                err,
                cap,
            )
        })
    }
}

#[cfg(not(gainguard_fused_shim))]
mod imp {
    use std::ffi::c_void;

    use super::{AtenStep, CpuStep, DType, RawGroup, NO_SHIM};

    pub fn adamw_cpu(_: &RawGroup, _: DType, _: &CpuStep<'_>) -> Result<(), String> {
        Err(NO_SHIM.into())
    }

    pub fn fused_adamw(_: &[*mut c_void], _: &[*mut c_void], _: &[*mut c_void], _: &[*mut c_void], _: &AtenStep<'_>) -> Result<(), String> {
        Err(NO_SHIM.into())
    }

    pub fn sum_squares(_: &[*mut c_void], _: &[i64], _: &[DType]) -> Result<Vec<f64>, String> {
        Err(NO_SHIM.into())
    }

    pub fn clear_grads(_: &[*mut c_void]) -> Result<(), String> {
        Err(NO_SHIM.into())
    }

    pub fn limit_this_thread(_: i32) -> bool {
        false
    }

    pub fn sqrt_cpu(_: *mut c_void, _: *mut c_void, _: i64, _: DType) -> Result<(), String> {
        Err(NO_SHIM.into())
    }

    pub fn stream_probe(_: &RawGroup) -> Result<(), String> {
        Err(NO_SHIM.into())
    }
}

/// One AdamW step of the CPU loop over raw buffers.
///
/// # Safety
/// Live, contiguous CPU tensors are behind every pointer of `group`, of `dtype` (f32 moments for bf16/f16),
/// with `numels[i]` elements, none overlapping another; `step.step_sizes` and `step.bias_correction2_sqrts`
/// have one entry per tensor.
pub unsafe fn adamw_cpu(group: &RawGroup, dtype: DType, step: &CpuStep<'_>) -> Result<(), String> {
    imp::adamw_cpu(group, dtype, step)
}

/// ATen's `_fused_adamw_` over `at::Tensor*` handles.
///
/// # Safety
/// Every pointer is a [`handle`] of a tensor the caller holds for the call.
pub unsafe fn fused_adamw(params: &[*mut c_void], grads: &[*mut c_void], first_moments: &[*mut c_void], second_moments: &[*mut c_void], step: &AtenStep<'_>) -> Result<(), String> {
    imp::fused_adamw(params, grads, first_moments, second_moments, step)
}

/// Σ x² per buffer, in f64 (exact squares for f32 and narrower), the same on any thread count.
///
/// # Safety
/// Live contiguous CPU tensors of `numels[i]` values of `dtypes[i]` are behind the pointers.
pub unsafe fn sum_squares(buffers: &[*mut c_void], numels: &[i64], dtypes: &[DType]) -> Result<Vec<f64>, String> {
    imp::sum_squares(buffers, numels, dtypes)
}

/// Drops the gradients of `tensors` (`set_to_none`), leaving them undefined until the next backward.
pub fn clear_grads(tensors: &[&Tensor]) -> Result<(), String> {
    let handles: Vec<*mut c_void> = tensors.iter().map(|t| handle(t)).collect();
    imp::clear_grads(&handles)
}

/// Limits libtorch's intra-op parallelism (its OpenMP team and MKL's) **for the calling thread only** to
/// `threads`, leaving every other thread's setting, and the process-wide default that `tch::set_num_threads`
/// would change, as they are. Used by the spectra worker. Returns false when this build has no shim.
pub fn limit_this_thread(threads: usize) -> bool {
    imp::limit_this_thread(threads.clamp(1, i32::MAX as usize) as i32)
}

/// The correctly rounded square root of `n` contiguous F32 or F64 values at `input` into `out` (which may be
/// `input`).
///
/// # Safety
/// Live contiguous CPU tensors of at least `n` values of `dtype` are behind both pointers.
pub unsafe fn sqrt_cpu(input: *mut c_void, out: *mut c_void, n: i64, dtype: DType) -> Result<(), String> {
    imp::sqrt_cpu(input, out, n, dtype)
}

/// The step's memory traffic over f32 buffers, with no arithmetic that changes a value.
///
/// # Safety
/// As for [`adamw_cpu`], with f32 buffers.
pub unsafe fn stream_probe(group: &RawGroup) -> Result<(), String> {
    imp::stream_probe(group)
}

/// libgomp's team as the spectra passes' thread pool (`gainguard_spectra::set_parallel_runner`): the
/// OpenMP runtime libtorch itself uses, so that the passes do not wait behind its spinning workers. None
/// in a build without the shim (the passes then use rayon's pool).
pub fn parallel_runner() -> Option<gainguard_spectra::ParallelRunner> {
    #[cfg(gainguard_fused_shim)]
    {
        Some(omp::run)
    }
    #[cfg(not(gainguard_fused_shim))]
    {
        None
    }
}

#[cfg(gainguard_fused_shim)]
mod omp {
    use std::ffi::c_void;
    use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
    use std::sync::Mutex;

    // libgomp's entry points (GCC ≥ 4.9 ABI), from the runtime libtorch itself uses (linked by build.rs).
    extern "C" {
        fn GOMP_parallel(f: unsafe extern "C" fn(*mut c_void), data: *mut c_void, num_threads: u32, flags: u32);
        fn omp_get_thread_num() -> i32;
        fn omp_get_num_threads() -> i32;
    }

    struct Region<'a> {
        count: usize,
        f: &'a (dyn Fn(usize) + Sync),
        panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    }

    unsafe extern "C" fn body(data: *mut c_void) {
        // SAFETY: `data` is the Region that `run` keeps alive until GOMP_parallel returns.
        let region = &*(data as *const Region);
        let (t, team) = (omp_get_thread_num().max(0) as usize, omp_get_num_threads().max(1) as usize);
        // The team may be smaller than asked for (nested regions get one thread): stride over the parts,
        // so that each index is run exactly once.
        let mut i = t;
        while i < region.count {
            if let Err(e) = catch_unwind(AssertUnwindSafe(|| (region.f)(i))) {
                *region.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
            i += team;
        }
    }

    pub(super) fn run(count: usize, f: &(dyn Fn(usize) + Sync)) {
        let region = Region { count, f, panic: Mutex::new(None) };
        // SAFETY: body only touches `region`, which outlives the call; a panic in `f` is carried across
        // the C frames and resumed here.
        unsafe { GOMP_parallel(body, &region as *const Region as *mut c_void, count as u32, 0) };
        if let Some(e) = region.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
            resume_unwind(e);
        }
    }
}
