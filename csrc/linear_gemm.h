// The forward GEMM of patch_embed and linear_unpatchify (csrc/patch_gemm_host.cpp):
// out (M, N) = a (M, K) @ w (N, K)^T (+ bias (N)), as nn.Linear computes it. Host
// compiler only; no CUDA header here (csrc/linear_gemm_host.cpp holds the cuBLASLt code).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace vdit {

// CUDA float16 / bfloat16 operands with contiguous rows: one cublasLtMatmul with a plan
// (descriptors and the heuristic's algorithm) kept per shape, dtype, device and alignment;
// everything else, or VDIT_CUBLASLT=0, or cuBLASLt refusing: ATen's addmm / mm. The same
// float32 accumulation either way (cuBLASLt's reduction never in the output dtype).
at::Tensor linear_forward(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& bias);

// What linear_forward used in this process: the library and its plans, calls by path.
std::string linear_forward_info();

}  // namespace vdit
