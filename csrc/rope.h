// Launch interface of the 3D RoPE kernels (csrc/rope.cu), shared with their host side
// (csrc/rope_host.cpp: argument checks, the kernel choice, the registered ops). The kernel
// translation unit holds no ATen code and throws nothing. The kernels' work and launch
// plans (vector width, tokens per CTA, head groups) are in csrc/rope_tile.cuh (plain C++,
// host-compilable).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "rope_tile.cuh"

namespace vdit {

// Element types of the launch: float32, float16, bfloat16.
enum class RopeDtype : int32_t { kFloat32, kFloat16, kBFloat16 };

// Enqueues one launch: `blocks` CTAs of kRopeThreads, `smem` bytes of dynamic shared
// memory, vp pairs per access (1, 2 or 4). Returns the launch's error code.
cudaError_t launch_rope_kernel(const RopeParams& p, RopeDtype dtype, int vp, int64_t blocks, size_t smem,
                               cudaStream_t stream);

// The tiled kernel (VDIT_ROPE_CUDA unset, tiled or tiled-heads): a grid of blocks x head_groups
// CTAs of kRopeThreads, no shared memory (plan_rope_tiled).
cudaError_t launch_rope_tiled_kernel(const RopeTiledParams& tp, RopeDtype dtype, RopeTiling tiling, int vp,
                                     int64_t blocks, int64_t head_groups, cudaStream_t stream);

}  // namespace vdit
