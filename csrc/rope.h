// Launch interface of the 3D RoPE kernel (csrc/rope.cu), shared with its host side
// (csrc/rope_host.cpp: argument checks, the vector width, the registered ops). The kernel
// translation unit holds no ATen code and throws nothing.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/index.cuh"

namespace vdit {

constexpr int kRopeThreads = 256;

// Element types of the launch: float32, float16, bfloat16.
enum class RopeDtype : int32_t { kFloat32, kFloat16, kBFloat16 };

struct RopeParams {
  const void* in[2];   // q, k
  void* out[2];        // rotated q, k (== in for the in-place op)
  int64_t sn[2], sh[2], sd[2];     // input strides (token, head, dim)
  int64_t osn[2], osh[2], osd[2];  // output strides
  int32_t heads[2];
  const float* pos;    // (N, 3) float32 contiguous
  int64_t N;
  int32_t half;        // D / 2 pairs
  int32_t tok;         // tokens per CTA
  RopeAxes axes;
  double theta;
  int32_t interleaved;
  int32_t inverse;
};

// Enqueues one launch: `blocks` CTAs of kRopeThreads, `smem` bytes of dynamic shared
// memory, vp pairs per access (1, 2 or 4). Returns the launch's error code.
cudaError_t launch_rope_kernel(const RopeParams& p, RopeDtype dtype, int vp, int64_t blocks, size_t smem,
                               cudaStream_t stream);

}  // namespace vdit
