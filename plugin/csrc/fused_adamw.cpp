// gainguard's C++ shim, reached from Rust only through plugin/src/shim.rs: the fused AdamW step's kernels
// (plugin/src/fused.rs), a C entry point to ATen's `_fused_adamw_` (the kernel behind
// `torch.optim.AdamW(fused=True)`), the gradients' sums of squares, dropping gradients (`set_to_none`), and
// the spectra worker's per-thread thread limit. Tensors arrive as tch's `C_tensor*`, which are `at::Tensor*`
// (torch-sys torch_api.h: `typedef torch::Tensor *tensor;`).
//
// Kernel semantics (ATen FusedAdamKernel.cpp / fused_adamw_impl.cu, PyTorch 2.11), per element:
//   param *= 1 - lr·weight_decay
//   exp_avg = lerp(exp_avg, grad, 1 − beta1)
//   exp_avg_sq = beta2·exp_avg_sq + (1 − beta2)·grad²
//   param -= lr / (1 − beta1^step) · exp_avg / (sqrt(exp_avg_sq) / sqrt(1 − beta2^step) + eps)
// `step` is read from `state_steps` (one per tensor, as torch keeps `state['step']` per parameter) and not
// incremented (Python's caller increments it first).
//
// On CPU, `gainguard_adamw_cpu` is used instead (unless the caller picked ATen's kernel): one pass per
// group, parallel over torch's own OpenMP thread pool (at::parallel_for; this file must be compiled with
// -fopenmp, see build.rs), in exactly the reference path's order of roundings (libtorch's AdamW: mul, add,
// mul, add, sqrt, div, add, div, mul, sub, each rounded to the parameter's dtype, no FMA), so that it
// is bit-identical to the reference path, which takes the same correctly rounded sqrt (gainguard_sqrt_cpu),
// and follows libtorch's C++ AdamW, whose CPU sqrt may be MKL's, to a rounding.
// ATen's CPU fused kernel (also reachable here, CpuKernel::Aten) uses lerp and FMA instead: other roundings,
// though after 200 steps of the example model it is as close to libtorch's AdamW (~5e-7 relative).
//
// Only the op headers are included, not <ATen/ATen.h>, to keep the compile short.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/full.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <vector>

// MKL's per-thread setting, exported by x86 libtorch builds that bundle MKL; weak, so builds without MKL
// link and skip it. The C entry point is MKL_Set_Num_Threads_Local (mkl.h maps mkl_set_num_threads_local to
// it); the lower-case symbol libtorch exports is the Fortran one, which takes a pointer.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace {

void write_error(char *err, size_t cap, const char *what) {
  if (err == nullptr || cap == 0) return;
  std::strncpy(err, what, cap - 1);
  err[cap - 1] = '\0';
}

// Runs `body` (which returns the entry point's status) and turns any C++ exception into status 1 with its
// text in `err` (`what` when it carries none), so that no exception crosses into Rust.
template <typename Body>
int guarded(char *err, size_t cap, const char *what, Body body) {
  try {
    return body();
  } catch (const std::exception &e) {
    write_error(err, cap, e.what());
    return 1;
  } catch (...) {
    write_error(err, cap, what);
    return 1;
  }
}

std::vector<at::Tensor> gather(void *const *ptrs, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*static_cast<const at::Tensor *>(ptrs[i]));
  return out;
}

// One AdamW update of `n` elements, in the reference path's rounding order. `target_clones` builds an
// AVX2 and a baseline version, picked at load time; -ffp-contract=off keeps FMA out (it changes roundings).
#define GAINGUARD_ADAMW_LOOP(T, NAME)                                                                      \
  __attribute__((target_clones("avx2", "default"))) void NAME(                                            \
      T *__restrict p, const T *__restrict g, T *__restrict m, T *__restrict v, int64_t n, T decay, T beta1, \
      T one_minus_beta1, T beta2, T one_minus_beta2, T bias_correction2_sqrt, T eps, T step_size) {      \
    for (int64_t i = 0; i < n; ++i) {                                                                    \
      const T gi = g[i];                                                                                 \
      const T pi = p[i] * decay;                                                                         \
      const T mi = m[i] * beta1 + gi * one_minus_beta1;                                                  \
      const T vi = v[i] * beta2 + (gi * gi) * one_minus_beta2;                                           \
      const T denom = std::sqrt(vi) / bias_correction2_sqrt + eps;                                       \
      m[i] = mi;                                                                                         \
      v[i] = vi;                                                                                         \
      p[i] = pi - (mi / denom) * step_size;                                                              \
    }                                                                                                    \
  }

GAINGUARD_ADAMW_LOOP(float, adamw_loop_f32)
GAINGUARD_ADAMW_LOOP(double, adamw_loop_f64)

// Mixed precision: a bf16 or f16 parameter and gradient with f32 moments. The reference path widens θ and
// g to f32 (exactly), steps in f32 as above, and rounds θ back (to nearest even) when it copies it into the
// parameter; this does the same per element, in one pass.
template <typename P>
void adamw_loop_mixed(P *__restrict p, const P *__restrict g, float *__restrict m, float *__restrict v, int64_t n,
                      float decay, float beta1, float one_minus_beta1, float beta2, float one_minus_beta2,
                      float bias_correction2_sqrt, float eps, float step_size) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = static_cast<float>(g[i]), p0 = static_cast<float>(p[i]), m0 = m[i], v0 = v[i];
    const float pi = p0 * decay;
    const float mi = m0 * beta1 + gi * one_minus_beta1;
    const float vi = v0 * beta2 + (gi * gi) * one_minus_beta2;
    const float denom = std::sqrt(vi) / bias_correction2_sqrt + eps;
    m[i] = mi;
    v[i] = vi;
    p[i] = static_cast<P>(pi - (mi / denom) * step_size);
  }
}

// The correctly rounded square root (the CPU's sqrt instruction), for the reference path: libtorch's CPU
// `sqrt` on x86 builds with MKL below AVX-512 is MKL's VML_HA vsSqrt, which is one unit in the last place off
// for about one f32 value in five. With this one, the loops above and the reference path agree bit for bit.
#define GAINGUARD_SQRT_LOOP(T, NAME)                                                                        \
  __attribute__((target_clones("avx2", "default"))) void NAME(const T *in, T *out, int64_t n) {          \
    for (int64_t i = 0; i < n; ++i) out[i] = std::sqrt(in[i]);                                          \
  }

GAINGUARD_SQRT_LOOP(float, sqrt_loop_f32)
GAINGUARD_SQRT_LOOP(double, sqrt_loop_f64)

// The step's memory traffic with no arithmetic that changes a value: reads p, g, m, v, writes p, m, v
// (each x + g·0, which the compiler may not fold away). Used only to measure the step's floor.
__attribute__((target_clones("avx2", "default"))) void stream_probe_loop(float *__restrict p,
                                                                           const float *__restrict g,
                                                                           float *__restrict m,
                                                                           float *__restrict v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float z = g[i] * 0.0f;
    p[i] = p[i] + z;
    m[i] = m[i] + z;
    v[i] = v[i] + z;
  }
}

// Runs `body(t, lo, hi)` over elements [lo, hi) of tensor t for every tensor of a group, in one parallel
// region over the concatenation of the group's tensors (one fork/join per group, not per tensor); each
// task walks the tensor segments its range covers. 64 Ki elements per task.
template <typename Body>
void for_each_segment(const int64_t *numels, size_t n, Body body) {
  constexpr int64_t grain = 1 << 16;
  std::vector<int64_t> start(n + 1, 0);
  for (size_t t = 0; t < n; ++t) start[t + 1] = start[t] + numels[t];
  at::parallel_for(0, start[n], grain, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (int64_t at = begin; at < end; ++t) {
      const int64_t lo = at - start[t], hi = std::min(end, start[t + 1]) - start[t];
      if (hi > lo) body(t, lo, hi);
      at = start[t] + hi;
    }
  });
}

// P is the parameter (and gradient) type, T the moments' and the arithmetic's. Scalars arrive as double and
// are rounded to T once, as ATen rounds a Python/C++ scalar operand. `step_sizes[t]` = lr / (1 − beta1^t_t) and
// `bias_correction2_sqrts[t]` = sqrt(1 − beta2^t_t) are per tensor: each parameter has its own step count.
template <typename P, typename T, typename Loop>
void adamw_cpu(Loop loop, void *const *params, const void *const *grads, void *const *exp_avgs, void *const *exp_avg_sqs,
               const int64_t *numels, size_t n, double decay, double beta1, double beta2, double eps,
               const double *step_sizes, const double *bias_correction2_sqrts) {
  const T d = static_cast<T>(decay), b1 = static_cast<T>(beta1), omb1 = static_cast<T>(1.0 - beta1),
          b2 = static_cast<T>(beta2), omb2 = static_cast<T>(1.0 - beta2), e = static_cast<T>(eps);
  for_each_segment(numels, n, [&](size_t t, int64_t lo, int64_t hi) {
    P *p = static_cast<P *>(params[t]);
    const P *g = static_cast<const P *>(grads[t]);
    T *m = static_cast<T *>(exp_avgs[t]);
    T *v = static_cast<T *>(exp_avg_sqs[t]);
    loop(p + lo, g + lo, m + lo, v + lo, hi - lo, d, b1, omb1, b2, omb2, static_cast<T>(bias_correction2_sqrts[t]), e,
         static_cast<T>(step_sizes[t]));
  });
}

// Σ x² of `n` values in a fixed order, so that the result does not depend on the thread count or on timing:
// 16 lanes square in f32 (exact for bf16 and f16 values, one rounding of 6e-8 for f32) and add 64 squares
// each in f32 before passing the partial sum to f64 lanes: f32's precision (~1e-7 relative), at the memory's
// speed (widening every value to f64 first cost 12% more time on AVX2). NaN or ±Inf in the values makes the result non-finite; so does an
// f32 square's overflow (|x| > 1.8e19), which the caller tells apart.
#define GAINGUARD_SUM_SQUARES(P, NAME)                                                                     \
  __attribute__((target_clones("avx2", "default"))) double NAME(const P *g, int64_t n) {                  \
    constexpr int lanes = 16;                                                                            \
    constexpr int64_t flush = 64 * lanes;                                                                \
    double acc[lanes] = {0};                                                                             \
    int64_t i = 0;                                                                                       \
    for (; i + flush <= n; i += flush) {                                                                 \
      float part[lanes] = {0};                                                                           \
      for (int64_t k = 0; k < flush; k += lanes)                                                         \
        for (int j = 0; j < lanes; ++j) {                                                                \
          const float x = static_cast<float>(g[i + k + j]);                                              \
          part[j] += x * x;                                                                              \
        }                                                                                                \
      for (int j = 0; j < lanes; ++j) acc[j] += part[j];                                                 \
    }                                                                                                    \
    for (int j = 0; i < n; ++i, j = (j + 1) % lanes) {                                                   \
      const float x = static_cast<float>(g[i]);                                                          \
      acc[j] += static_cast<double>(x * x);                                                              \
    }                                                                                                    \
    double sum = 0;                                                                                      \
    for (int j = 0; j < lanes; ++j) sum += acc[j];                                                       \
    return sum;                                                                                          \
  }

GAINGUARD_SUM_SQUARES(float, sum_squares_f32)
GAINGUARD_SUM_SQUARES(c10::BFloat16, sum_squares_bf16)
GAINGUARD_SUM_SQUARES(c10::Half, sum_squares_f16)

__attribute__((target_clones("avx2", "default"))) double sum_squares_f64(const double *g, int64_t n) {
  constexpr int lanes = 16;
  double acc[lanes] = {0};
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes)
    for (int j = 0; j < lanes; ++j) acc[j] += g[i + j] * g[i + j];
  for (int j = 0; i < n; ++i, ++j) acc[j] += g[i] * g[i];
  double sum = 0;
  for (int j = 0; j < lanes; ++j) sum += acc[j];
  return sum;
}

}  // namespace

extern "C" {

// `out[i] = sqrt(in[i])`, correctly rounded, for `n` contiguous f32 (`dtype` 0) or f64 (1) values over
// torch's thread pool; `out` may be `in`. Returns 0, or 1 with the exception text in `err`.
int gainguard_sqrt_cpu(const void *in, void *out, int64_t n, int dtype, char *err, size_t cap) {
  return guarded(err, cap, "unknown C++ exception in the CPU sqrt", [&] {
    if (dtype != 0 && dtype != 1) {
      write_error(err, cap, "gainguard_sqrt_cpu: unknown dtype code");
      return 1;
    }
    at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
      if (dtype == 0)
        sqrt_loop_f32(static_cast<const float *>(in) + begin, static_cast<float *>(out) + begin, end - begin);
      else
        sqrt_loop_f64(static_cast<const double *>(in) + begin, static_cast<double *>(out) + begin, end - begin);
    });
    return 0;
  });
}

// Steps `n` contiguous CPU parameters of one dtype given their raw buffers and element counts. `dtype`:
// 0 = f32 (f32 moments), 1 = f64 (f64 moments), 2 = bf16 and 3 = f16 (gradients of the parameter's dtype,
// f32 moments). `decay` is the factor theta is multiplied by (1 − lr·wd or 1 − wd); per tensor,
// `step_sizes[t]` = lr / (1 − beta1^t) and `bias_correction2_sqrts[t]` = sqrt(1 − beta2^t) with that tensor's
// own step count t. Returns 0, or 1 with the exception text in `err`.
int gainguard_adamw_cpu(void *const *params, const void *const *grads, void *const *exp_avgs,
                        void *const *exp_avg_sqs, const int64_t *numels, size_t n, int dtype, double decay,
                        double beta1, double beta2, double eps, const double *step_sizes,
                        const double *bias_correction2_sqrts, char *err, size_t cap) {
  return guarded(err, cap, "unknown C++ exception in the CPU AdamW loop", [&] {
    switch (dtype) {
      case 0:
        adamw_cpu<float, float>(adamw_loop_f32, params, grads, exp_avgs, exp_avg_sqs, numels, n, decay, beta1, beta2,
                                eps, step_sizes, bias_correction2_sqrts);
        break;
      case 1:
        adamw_cpu<double, double>(adamw_loop_f64, params, grads, exp_avgs, exp_avg_sqs, numels, n, decay, beta1,
                                  beta2, eps, step_sizes, bias_correction2_sqrts);
        break;
      case 2:
        adamw_cpu<c10::BFloat16, float>(adamw_loop_mixed<c10::BFloat16>, params, grads, exp_avgs, exp_avg_sqs, numels,
                                        n, decay, beta1, beta2, eps, step_sizes, bias_correction2_sqrts);
        break;
      case 3:
        adamw_cpu<c10::Half, float>(adamw_loop_mixed<c10::Half>, params, grads, exp_avgs, exp_avg_sqs, numels, n,
                                    decay, beta1, beta2, eps, step_sizes, bias_correction2_sqrts);
        break;
      default:
        write_error(err, cap, "gainguard_adamw_cpu: unknown dtype code");
        return 1;
    }
    return 0;
  });
}

// Per tensor t of `n` contiguous CPU tensors (dtype codes as gainguard_adamw_cpu's, one per tensor):
// `sums[t]` = Σ x² in double. The work is cut into fixed blocks of 64 Ki elements whose partial sums are added
// in order, so the result is the same on any number of threads. Returns 0, or 1 with the text in `err`.
int gainguard_sum_squares(const void *const *tensors, const int64_t *numels, const int *dtypes, size_t n,
                          double *sums, char *err, size_t cap) {
  return guarded(err, cap, "unknown C++ exception in the sum of squares", [&] {
    constexpr int64_t block = 1 << 16;
    std::vector<int64_t> first_block(n + 1, 0);
    for (size_t t = 0; t < n; ++t) {
      if (dtypes[t] < 0 || dtypes[t] > 3) {
        write_error(err, cap, "gainguard_sum_squares: unknown dtype code");
        return 1;
      }
      first_block[t + 1] = first_block[t] + (numels[t] + block - 1) / block;
    }
    std::vector<double> partial(first_block[n], 0.0);
    at::parallel_for(0, first_block[n], 1, [&](int64_t begin, int64_t end) {
      size_t t = std::upper_bound(first_block.begin(), first_block.end(), begin) - first_block.begin() - 1;
      for (int64_t b = begin; b < end; ++b) {
        while (b >= first_block[t + 1]) ++t;
        const int64_t lo = (b - first_block[t]) * block, len = std::min(block, numels[t] - lo);
        switch (dtypes[t]) {
          case 0: partial[b] = sum_squares_f32(static_cast<const float *>(tensors[t]) + lo, len); break;
          case 1: partial[b] = sum_squares_f64(static_cast<const double *>(tensors[t]) + lo, len); break;
          case 2: partial[b] = sum_squares_bf16(static_cast<const c10::BFloat16 *>(tensors[t]) + lo, len); break;
          default: partial[b] = sum_squares_f16(static_cast<const c10::Half *>(tensors[t]) + lo, len); break;
        }
      }
    });
    for (size_t t = 0; t < n; ++t) {
      double sum = 0;
      for (int64_t b = first_block[t]; b < first_block[t + 1]; ++b) sum += partial[b];
      sums[t] = sum;
    }
    return 0;
  });
}

// Drops the gradient of each of `n` tensors (`at::Tensor*`), as `zero_grad(set_to_none=True)`: the next
// backward allocates a fresh one, and a tensor that gets none stays without. Returns 0, or 1 with the text.
int gainguard_clear_grads(void *const *tensors, size_t n, char *err, size_t cap) {
  return guarded(err, cap, "unknown C++ exception while dropping gradients", [&] {
    for (size_t i = 0; i < n; ++i) {
      at::Tensor *t = static_cast<at::Tensor *>(tensors[i]);
      if (t->grad().defined()) t->mutable_grad().reset();
    }
    return 0;
  });
}

// Limits libtorch's intra-op parallelism for the calling thread only. ATen initialises a thread's OpenMP
// setting lazily on its first parallel op (from the process-wide default), so that runs first; after it,
// omp_set_num_threads changes only this thread's ICV and MKL_Set_Num_Threads_Local only this thread's MKL
// setting. at::set_num_threads would also change the default every thread started later inherits.
void gainguard_limit_this_thread(int threads) {
  (void)at::get_num_threads();
  omp_set_num_threads(threads);
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(threads);
}

// The step's memory traffic over the same f32 buffers and the same split as gainguard_adamw_cpu, with
// no arithmetic that changes a value; its time is the step's floor (benches/optimizer_step.rs).
int gainguard_stream_probe(void *const *params, void *const *grads, void *const *exp_avgs, void *const *exp_avg_sqs,
                           const int64_t *numels, size_t n, char *err, size_t cap) {
  return guarded(err, cap, "unknown C++ exception in the stream probe", [&] {
    for_each_segment(numels, n, [&](size_t t, int64_t lo, int64_t hi) {
      stream_probe_loop(static_cast<float *>(params[t]) + lo, static_cast<const float *>(grads[t]) + lo,
                        static_cast<float *>(exp_avgs[t]) + lo, static_cast<float *>(exp_avg_sqs[t]) + lo, hi - lo);
    });
    return 0;
  });
}

// Steps `n` parameters that share one device, dtype, lr and weight decay; `steps[i]` is parameter i's own
// step count (this step included). One step tensor per distinct count. Returns 0 on success; on a C++
// exception returns 1 and writes its message (truncated to `cap` bytes) into `err`.
int gainguard_fused_adamw(void *const *params, void *const *grads, void *const *exp_avgs, void *const *exp_avg_sqs,
                          size_t n, const double *steps, double lr, double beta1, double beta2, double weight_decay,
                          double eps, char *err, size_t cap) {
  return guarded(err, cap, "unknown C++ exception in _fused_adamw_", [&] {
    if (n == 0) return 0;
    std::vector<at::Tensor> p = gather(params, n), g = gather(grads, n), m = gather(exp_avgs, n),
                            v = gather(exp_avg_sqs, n);
    // Most members share one count; the kernel reads each tensor's step, so they can share the tensor.
    std::vector<std::pair<double, at::Tensor>> distinct;
    std::vector<at::Tensor> state_steps;
    state_steps.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      auto it = std::find_if(distinct.begin(), distinct.end(), [&](const auto &d) { return d.first == steps[i]; });
      if (it == distinct.end()) {
        distinct.emplace_back(steps[i], at::full({}, steps[i], at::TensorOptions().dtype(at::kFloat).device(p[0].device())));
        it = distinct.end() - 1;
      }
      state_steps.push_back(it->second);
    }
    at::_fused_adamw_(p, g, m, v, /*max_exp_avg_sqs=*/{}, state_steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  });
}

}  // extern "C"
