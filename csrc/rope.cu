// CUDA fused 3D RoPE of q and k, one launch for both (out of place or in place): the
// kernels' frames (the shared-table kernel and the tiled one's two shapes) and their
// launches. Their work, per thread, and the launch plans are in csrc/rope_tile.cuh
// (host-compilable: tests/cpp/rope_emulation.cpp runs the same code on the CPU); argument
// checks, the choice between the kernels and the registered ops live in csrc/rope_host.cpp.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "rope.h"

namespace vdit {
namespace {

// phases 0 (frequencies) and 1 (cos / sin) fill the shared tables phase 2 reads.
// 8 CTAs of 256 threads an SM (full occupancy for this memory-bound kernel) caps it at 32
// registers: no spills on sm_80 or sm_90a (ptxas -v); without the cap ptxas took 32 to 40
// (the variants differ), 6 CTAs an SM at 40.
template <typename T, int VP>
__global__ void __launch_bounds__(kRopeThreads, 8) rope_kernel(const __grid_constant__ RopeParams p) {
  extern __shared__ float smem[];
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  const int tid = static_cast<int>(threadIdx.x);
  rope_phase<T, VP>(0, p, block, smem, tid);
  __syncthreads();
  rope_phase<T, VP>(1, p, block, smem, tid);
  __syncthreads();
  rope_phase<T, VP>(2, p, block, smem, tid);
}

// The tiled variants (csrc/rope_tile.cuh): 4 CTAs of 256 threads an SM (64 registers),
// the Triton kernel's occupancy; a thread's slots' cos / sin live in registers.
template <typename T, int VP, RopeTiling TILING>
__global__ void __launch_bounds__(kRopeThreads, 4) rope_tiled_kernel(const __grid_constant__ RopeTiledParams tp) {
  rope_tiled_thread<T, VP, TILING>(tp, static_cast<int32_t>(blockIdx.x), static_cast<int32_t>(blockIdx.y),
                                   static_cast<int>(threadIdx.x));
}

template <typename T, RopeTiling TILING>
void launch_tiled_shape(const RopeTiledParams& tp, int vp, dim3 grid, cudaStream_t stream) {
  switch (vp) {
    case 4: rope_tiled_kernel<T, 4, TILING><<<grid, kRopeThreads, 0, stream>>>(tp); break;
    case 2: rope_tiled_kernel<T, 2, TILING><<<grid, kRopeThreads, 0, stream>>>(tp); break;
    default: rope_tiled_kernel<T, 1, TILING><<<grid, kRopeThreads, 0, stream>>>(tp); break;
  }
}

template <typename T>
void launch_tiled_typed(const RopeTiledParams& tp, RopeTiling tiling, int vp, dim3 grid, cudaStream_t stream) {
  if (tiling == RopeTiling::kTiledHeads)
    launch_tiled_shape<T, RopeTiling::kTiledHeads>(tp, vp, grid, stream);
  else
    launch_tiled_shape<T, RopeTiling::kTiled>(tp, vp, grid, stream);
}

template <typename T>
void launch_typed(const RopeParams& p, int vp, dim3 grid, size_t smem, cudaStream_t stream) {
  switch (vp) {
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

cudaError_t launch_rope_tiled_kernel(const RopeTiledParams& tp, RopeDtype dtype, RopeTiling tiling, int vp,
                                     int64_t blocks, int64_t head_groups, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(head_groups));
  switch (dtype) {
    case RopeDtype::kFloat32: launch_tiled_typed<float>(tp, tiling, vp, grid, stream); break;
    case RopeDtype::kFloat16: launch_tiled_typed<c10::Half>(tp, tiling, vp, grid, stream); break;
    case RopeDtype::kBFloat16: launch_tiled_typed<c10::BFloat16>(tp, tiling, vp, grid, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace vdit
