// Launch interface of the patchify / unpatchify kernel (csrc/patch.cu), shared with its
// host side (csrc/patch_host.cpp: argument checks, planning, the registered ops). The
// kernel translation unit holds no ATen code and throws nothing: every error is raised by
// the host .cpp, compiled by the host compiler like the rest of torch's C++. The kernel's
// work and the launch plan are in csrc/patch_tile.cuh (plain C++, host-compilable).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "patch_tile.cuh"

namespace vdit {

// The parameters (records of up to kInlineVideos videos inline) travel in the launch,
// within the classic 4 KB of kernel parameters (CUDA 12.1+ allows 32 KB on sm_70+, a
// launch path we do not need).
static_assert(sizeof(PatchParams) <= 4096, "PatchParams exceeds 4 KB of kernel parameters; lower kInlineVideos");

// Enqueues one launch of `tiles` CTAs with `smem` bytes of dynamic shared memory on
// `stream`; esize is the element size (2 or 4). Returns the launch's error code.
cudaError_t launch_patch_kernel(const PatchParams& p, int64_t tiles, size_t smem, bool to_tokens,
                                int esize, cudaStream_t stream);

}  // namespace vdit
