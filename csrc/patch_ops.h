// The CUDA patchify / unpatchify as C++ functions (csrc/patch_host.cpp), for the host code
// that builds on them without a dispatcher call (csrc/patch_gemm_host.cpp). Host compiler
// only; no CUDA header here.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace vdit {

// vdit_C::patchify / vdit_C::unpatchify on CUDA tensors (the same checks and kernels).
at::Tensor patchify_tokens(at::TensorList videos, c10::IntArrayRef patch_size);
std::vector<at::Tensor> unpatchify_videos(const at::Tensor& tokens, c10::IntArrayRef shapes,
                                          c10::IntArrayRef patch_size, int64_t channels);

}  // namespace vdit
