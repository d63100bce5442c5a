// CUDA fused 3D RoPE of q and k, one launch for both (out of place or in place): the
// kernel's frame and its launch. Its work, per thread and phase, and the launch plan are
// in csrc/rope_tile.cuh (host-compilable: tests/cpp/rope_emulation.cpp runs the same code
// on the CPU); argument checks and the registered ops live in csrc/rope_host.cpp.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "rope.h"

namespace vdit {
namespace {

// phase 0 (the first batch's loads, frequencies) and phase 1 (cos / sin) fill the shared
// tables phase 2 reads; `loaded` stays in registers across the barriers. 256 threads and
// at least 4 CTAs an SM: up to 64 registers, room for a batch of 64 B (rope_batch); at 8
// CTAs, 32 registers, the kernel held one unit at a time. 16-bit VP = 8 (two 16 B runs a
// unit, converted to 32 floats) spilled 4 B at 64 registers: 3 CTAs, up to 80.
template <typename T, int VP>
__global__ void __launch_bounds__(kRopeThreads, VP == 8 ? 3 : 4) rope_kernel(const __grid_constant__ RopeParams p) {
  extern __shared__ float smem[];
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  const int tid = static_cast<int>(threadIdx.x);
  RopeLoaded<T, VP> loaded;
  rope_phase<T, VP>(0, p, block, smem, tid, loaded);
  __syncthreads();
  rope_phase<T, VP>(1, p, block, smem, tid, loaded);
  __syncthreads();
  rope_phase<T, VP>(2, p, block, smem, tid, loaded);
}

template <typename T>
void launch_typed(const RopeParams& p, int vp, dim3 grid, size_t smem, cudaStream_t stream) {
  switch (vp) {
    case 8:  // rotate-half 16-bit types only (8 pairs of float32 are 32 B: plan_rope never picks it)
      if constexpr (sizeof(T) == 2) rope_kernel<T, 8><<<grid, kRopeThreads, smem, stream>>>(p);
      break;
    case 4: rope_kernel<T, 4><<<grid, kRopeThreads, smem, stream>>>(p); break;
    case 2: rope_kernel<T, 2><<<grid, kRopeThreads, smem, stream>>>(p); break;
    default: rope_kernel<T, 1><<<grid, kRopeThreads, smem, stream>>>(p); break;
  }
}

}  // namespace

cudaError_t launch_rope_kernel(const RopeParams& p, RopeDtype dtype, int vp, int64_t blocks, size_t smem,
                               cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (dtype) {
    case RopeDtype::kFloat32: launch_typed<float>(p, vp, grid, smem, stream); break;
    case RopeDtype::kFloat16: launch_typed<c10::Half>(p, vp, grid, smem, stream); break;
    case RopeDtype::kBFloat16: launch_typed<c10::BFloat16>(p, vp, grid, smem, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace vdit
