// The CUDA RoPE ops as C++ functions, for the host code that calls them without the
// dispatcher (direct_host.cpp exposes them to Python, as patch_ops.h does the patch ops).
// Host compiler only; no CUDA header here.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace vdit {

// vdit_C::rope_3d / vdit_C::rope_3d_, the functions both registrations run (CPU tensors:
// every check, then the error saying the ops need CUDA tensors).
std::tuple<at::Tensor, at::Tensor> rope_3d_tokens(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& positions, c10::IntArrayRef dims, double theta,
                                                  bool interleaved, bool inverse);
void rope_3d_in_place(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                      c10::IntArrayRef dims, double theta, bool interleaved, bool inverse);

}  // namespace vdit
