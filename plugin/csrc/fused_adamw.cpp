// A C entry point to ATen's `_fused_adamw_` (the kernel behind `torch.optim.AdamW(fused=True)`), for the
// fused step in plugin/src/fused.rs. Tensors arrive as tch's `C_tensor*`, which are `at::Tensor*`
// (torch-sys torch_api.h: `typedef torch::Tensor *tensor;`).
//
// Kernel semantics (ATen FusedAdamKernel.cpp / fused_adamw_impl.cu, PyTorch 2.11), per element:
//   param *= 1 - lr·weight_decay
//   exp_avg = lerp(exp_avg, grad, 1 − beta1)
//   exp_avg_sq = beta2·exp_avg_sq + (1 − beta2)·grad²
//   param -= lr / (1 − beta1^step) · exp_avg / (sqrt(exp_avg_sq) / sqrt(1 − beta2^step) + eps)
// `step` is read from `state_steps` and not incremented (Python's caller increments it first).
//
// Only the op header is included, not <ATen/ATen.h>, to keep the compile short.

#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/full.h>

#include <cstring>
#include <exception>
#include <vector>

namespace {

void write_error(char *err, size_t cap, const char *what) {
  if (err == nullptr || cap == 0) return;
  std::strncpy(err, what, cap - 1);
  err[cap - 1] = '\0';
}

std::vector<at::Tensor> gather(void *const *ptrs, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*static_cast<const at::Tensor *>(ptrs[i]));
  return out;
}

}  // namespace

extern "C" {

// Steps `n` parameters that share one device, dtype, lr and weight decay. Returns 0 on success; on a C++
// exception returns 1 and writes its message (truncated to `cap` bytes) into `err`.
int gainguard_fused_adamw(void *const *params, void *const *grads, void *const *exp_avgs, void *const *exp_avg_sqs,
                          size_t n, double step, double lr, double beta1, double beta2, double weight_decay,
                          double eps, char *err, size_t cap) {
  try {
    if (n == 0) return 0;
    std::vector<at::Tensor> p = gather(params, n), g = gather(grads, n), m = gather(exp_avgs, n),
                            v = gather(exp_avg_sqs, n);
    // Our step count is global, so one float step tensor on the parameters' device serves every member.
    at::Tensor t = at::full({}, step, at::TensorOptions().dtype(at::kFloat).device(p[0].device()));
    std::vector<at::Tensor> steps(n, t);
    at::_fused_adamw_(p, g, m, v, /*max_exp_avg_sqs=*/{}, steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (const std::exception &e) {
    write_error(err, cap, e.what());
    return 1;
  } catch (...) {
    write_error(err, cap, "unknown C++ exception in _fused_adamw_");
    return 1;
  }
}

}  // extern "C"
