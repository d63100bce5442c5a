// Errors shared by the host sides of the CUDA ops (csrc/*_host.cpp): one wording for the
// "wrong device" error of every op, raised for CPU tensors after the argument checks.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace vdit {

[[noreturn]] inline void needs_cuda_tensors(const char* op, const c10::Device& device) {
  TORCH_CHECK(false, op, ": the CUDA kernels need CUDA tensors, got ", device,
              " (backend='triton' under TRITON_INTERPRET=1, or 'reference', runs on CPU)");
  __builtin_unreachable();  // TORCH_CHECK(false, ...) always throws
}

}  // namespace vdit
