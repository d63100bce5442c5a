// CUDA patchify / unpatchify of a whole pack of videos, one launch per call.
//
// Scheme: a CTA owns one tile = ntok <= tw consecutive tokens along gw of one token row
// (gt, gh) of one video (index math: csrc/common/index.cuh). In the video, the tile is
// C*pt*ph rows of ntok*pw elements, contiguous along W when stride_w == 1; in the token
// matrix it is ONE contiguous span of ntok*F elements. The CTA stages the tile in shared
// memory as [row r = (c, it, ih)][x = j*pw + iw], so both global sides are read and
// written in order, coalesced, with 16-byte vectors where alignment allows:
//   patchify:   video rows -> stage (vector copies per row)  |  stage -> token span
//               (vector stores, each gathering 16 B worth of elements from the stage)
//   unpatchify: token span -> stage (vector loads, scattered into the stage) | stage
//               -> video rows (vector stores per row)
// Any strides are correct: the vector paths are taken only when the host has checked
// alignment for the whole launch (video side: stride_w == 1, data pointer and C/T/H
// strides multiples of 16 B, tile starts on 16 B; token side: F*elem a multiple of 16 B
// and a 16 B-aligned token pointer); otherwise the same loops run element by element.
// Data moves as raw 2- or 4-byte words (a pure copy: exact in every dtype).
//
// Per-video records (data pointer, strides, token grid, first tile, first token) travel in
// the __grid_constant__ parameter struct for up to kInlineVideos videos (no copy at all);
// larger packs put them in a device table uploaded from pinned memory with a
// non-blocking copy on the current stream. A CTA finds its video by a binary search over
// the records' first tiles.
// Argument checks, planning (tile size, vector paths) and the registered ops live in
// csrc/patch_host.cpp; this file holds the kernel and its launch only.
#include <cuda_runtime.h>

#include <cstdint>

#include "patch.h"

namespace vdit {
namespace {

template <typename E, bool kToTokens>
__global__ void __launch_bounds__(kPatchThreads) patch_kernel(const __grid_constant__ PatchParams p) {
  constexpr int kVec = 16 / sizeof(E);
  extern __shared__ __align__(16) unsigned char stage_raw[];
  E* stage = reinterpret_cast<E*>(stage_raw);

  const int64_t tile = blockIdx.x;
  const PatchVideo* videos = p.table != nullptr ? p.table : p.videos;
  const PatchVideo v = videos[find_video(videos, p.num_videos, tile)];
  const TileIndex t = tile_index(v, tile - v.tile_begin, p.tw);
  const int32_t rows = p.C * p.pt * p.ph;
  const int32_t rowlen = t.ntok * p.pw;
  const int32_t span = t.ntok * p.F;
  E* vdata = static_cast<E*>(v.data);
  E* tok = static_cast<E*>(p.tokens) + t.first_token * p.F;

  // one side of the tile <-> the stage; `load` says global -> stage
  auto video_side = [&](bool load) {
    if (p.vec_video) {
      const int32_t vpr = static_cast<int32_t>(ceil_div(rowlen, kVec));
      for (int32_t u = threadIdx.x; u < rows * vpr; u += kPatchThreads) {
        const int32_t r = u / vpr;
        const int32_t x = (u - r * vpr) * kVec;
        E* g = vdata + tile_row_offset(v, t, r, p.pt, p.ph, p.pw) + x;
        E* s = stage + r * p.srow + x;
        if (x + kVec <= rowlen) {
          if (load) *reinterpret_cast<uint4*>(s) = *reinterpret_cast<const uint4*>(g);
          else *reinterpret_cast<uint4*>(g) = *reinterpret_cast<const uint4*>(s);
        } else {
          for (int32_t i = 0; i < rowlen - x; ++i) {
            if (load) s[i] = g[i]; else g[i] = s[i];
          }
        }
      }
    } else {
      const int64_t sw = v.stride[3];
      for (int32_t u = threadIdx.x; u < rows * rowlen; u += kPatchThreads) {
        const int32_t r = u / rowlen;
        const int32_t x = u - r * rowlen;
        E* g = vdata + tile_row_offset(v, t, r, p.pt, p.ph, p.pw) + x * sw;
        E* s = stage + r * p.srow + x;
        if (load) *s = *g; else *g = *s;
      }
    }
  };
  auto token_side = [&](bool load) {
    if (p.vec_tokens) {
      for (int32_t u = threadIdx.x; u < span / kVec; u += kPatchThreads) {
        const int32_t o = u * kVec;
        union { uint4 v; E e[kVec]; } buf;
        if (load) {
          buf.v = reinterpret_cast<const uint4*>(tok)[u];
#pragma unroll
          for (int i = 0; i < kVec; ++i) stage[span_to_stage(o + i, p.F, p.pw, p.srow)] = buf.e[i];
        } else {
#pragma unroll
          for (int i = 0; i < kVec; ++i) buf.e[i] = stage[span_to_stage(o + i, p.F, p.pw, p.srow)];
          reinterpret_cast<uint4*>(tok)[u] = buf.v;
        }
      }
    } else {
      for (int32_t o = threadIdx.x; o < span; o += kPatchThreads) {
        E* s = stage + span_to_stage(o, p.F, p.pw, p.srow);
        if (load) *s = tok[o]; else tok[o] = *s;
      }
    }
  };

  if (kToTokens) {
    video_side(true);
    __syncthreads();
    token_side(false);
  } else {
    token_side(true);
    __syncthreads();
    video_side(false);
  }
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
