// CUDA patchify / unpatchify of a whole pack of videos, one launch per call: one CTA per
// tile, staged in shared memory. The scheme, the access widths and the index math are in
// csrc/patch_tile.cuh (host-compilable: tests/cpp/patch_emulation.cpp runs the same code
// on the CPU); this file holds the kernel's frame and its launch only.
//
// Per-video records (data pointer, strides, token grid, first tile, first token, access
// width) travel in the __grid_constant__ parameter struct for up to kInlineVideos videos
// (no copy at all); larger packs put them in a device table uploaded from pinned memory
// with a non-blocking copy on the current stream. A CTA finds its video by a binary
// search over the records' first tiles.
// Argument checks, planning and the registered ops live in csrc/patch_host.cpp.
#include <cuda_runtime.h>

#include <cstdint>

#include "patch.h"

namespace vdit {
namespace {

// E: a raw word of the element size (uint16_t: float16 / bfloat16, uint32_t: float32)
template <typename E, bool kToTokens>
__global__ void __launch_bounds__(kPatchThreads, kPatchMinBlocks) patch_kernel(const __grid_constant__ PatchParams p) {
  extern __shared__ __align__(16) unsigned char stage[];
  const PatchCta c = patch_cta<E>(p, static_cast<int32_t>(blockIdx.x));
  patch_phase<E, kToTokens>(0, p, c, stage, static_cast<int>(threadIdx.x));
  __syncthreads();
  patch_phase<E, kToTokens>(1, p, c, stage, static_cast<int>(threadIdx.x));
}

}  // namespace

cudaError_t launch_patch_kernel(const PatchParams& p, int64_t tiles, size_t smem, bool to_tokens,
                                int esize, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(tiles));
  if (esize == 4) {
    if (to_tokens) patch_kernel<uint32_t, true><<<grid, kPatchThreads, smem, stream>>>(p);
    else patch_kernel<uint32_t, false><<<grid, kPatchThreads, smem, stream>>>(p);
  } else {
    if (to_tokens) patch_kernel<uint16_t, true><<<grid, kPatchThreads, smem, stream>>>(p);
    else patch_kernel<uint16_t, false><<<grid, kPatchThreads, smem, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace vdit
