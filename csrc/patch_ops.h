// The CUDA patch ops as C++ functions, for the host code that calls them without the
// dispatcher: patch_gemm_host.cpp builds on patchify / unpatchify, and direct_host.cpp
// exposes all four to Python. Host compiler only; no CUDA header here.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace vdit {

// vdit_C::patchify / vdit_C::unpatchify, the functions both registrations run (CPU tensors:
// every check, then the error saying the op needs CUDA tensors).
at::Tensor patchify_tokens(at::TensorList videos, c10::IntArrayRef patch_size);
std::vector<at::Tensor> unpatchify_videos(const at::Tensor& tokens, c10::IntArrayRef shapes,
                                          c10::IntArrayRef patch_size, int64_t channels);

// Every argument check of patchify / unpatchify but the device (csrc/patch_host.cpp),
// also for the CPU copies in patch_gemm_host.cpp, which must refuse the shapes the CUDA
// ops refuse; kernel_dtypes: only the kernel's float32 / float16 / bfloat16 (the CPU
// copies take any dtype: float64 for gradcheck). Each returns patch_size.
std::vector<int64_t> check_patchify_args(at::TensorList videos, c10::IntArrayRef patch_size,
                                         bool kernel_dtypes = true);
std::vector<int64_t> check_unpatchify_args(const at::Tensor& tokens, c10::IntArrayRef shapes,
                                           c10::IntArrayRef patch_size, int64_t channels,
                                           bool kernel_dtypes = true);

// vdit_C::patch_embed / vdit_C::linear_unpatchify as their Autograd kernels run them: the C++
// autograd Function (csrc/patch_gemm_host.cpp), with a graph where an input requires grad.
at::Tensor patch_embed_autograd(at::TensorList videos, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias);
std::vector<at::Tensor> linear_unpatchify_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, c10::IntArrayRef shapes,
                                                   c10::IntArrayRef patch_size, int64_t channels);

}  // namespace vdit
