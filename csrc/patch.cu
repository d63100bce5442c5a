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
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/index.cuh"

namespace vdit {
namespace {

constexpr int kPatchThreads = 256;
constexpr int64_t kStageBytes = 16 * 1024;  // target staging buffer per CTA
constexpr int64_t kMaxStageBytes = 48 * 1024;  // default dynamic shared memory limit

struct PatchParams {
  void* tokens;
  const PatchVideo* table;  // device table when num_videos > kInlineVideos, else nullptr
  int32_t num_videos;
  int32_t C, pt, ph, pw;
  int32_t F;
  int32_t tw;               // tokens per tile
  int32_t srow;             // stage row stride in elements (tw*pw rounded up to a vector)
  int32_t vec_video;        // 16-byte accesses on the video side
  int32_t vec_tokens;       // 16-byte accesses on the token side
  PatchVideo videos[kInlineVideos];
};

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

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

void check_dtype(const char* name, at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "vdit_C: ", name, " must be float32, float16 or bfloat16, got ", t);
}

std::vector<int64_t> check_patch_size(c10::IntArrayRef patch_size) {
  TORCH_CHECK(patch_size.size() == 3, "vdit_C: patch_size must be 3 ints (pt, ph, pw), got ",
              patch_size.size());
  for (auto s : patch_size) TORCH_CHECK(s > 0, "vdit_C: patch_size must be positive, got ", patch_size);
  return patch_size.vec();
}

// Fills the records of a launch and runs it; the video tensors' data pointers and strides
// are read here (tokens: contiguous (N, F)).
void launch(bool to_tokens, std::vector<PatchVideo>& recs, const at::Tensor& tokens,
            int64_t channels, const std::vector<int64_t>& ps, at::ScalarType dtype,
            c10::Device device) {
  const int64_t pt = ps[0], ph = ps[1], pw = ps[2];
  const int64_t F = channels * pt * ph * pw;
  const int64_t esize = dtype == at::kFloat ? 4 : 2;
  const int64_t vec = 16 / esize;
  TORCH_CHECK(F < (1 << 30), "vdit_C: C*pt*ph*pw = ", F, " is too large");

  // tokens per tile: stage ~kStageBytes, a multiple of 8 tokens when the rows are wide
  int64_t max_gw = 1;
  for (const auto& r : recs) max_gw = std::max<int64_t>(max_gw, r.gw);
  int64_t tw = std::max<int64_t>(1, kStageBytes / (F * esize));
  if (tw >= 8) tw = tw / 8 * 8;
  tw = std::min(tw, max_gw);
  const int64_t srow = round_up(tw * pw, vec);
  const int64_t stage_bytes = channels * pt * ph * srow * esize;
  TORCH_CHECK(stage_bytes <= kMaxStageBytes, "vdit_C: a patch of C*pt*ph*pw = ", F,
              " elements needs ", stage_bytes, " bytes of shared memory (limit ", kMaxStageBytes, ")");

  bool vec_video = true;
  int64_t tiles = 0;
  for (auto& r : recs) {
    r.tile_begin = tiles;
    tiles += video_tiles(r.gt, r.gh, r.gw, static_cast<int32_t>(tw));
    // a tile's row starts at w0*pw, w0 a multiple of tw (only 0 when one tile spans gw)
    const bool starts_ok = (tw * pw) % vec == 0 || r.gw <= tw;
    vec_video = vec_video && r.stride[3] == 1 && aligned16(r.data) && starts_ok &&
                r.stride[0] % vec == 0 && r.stride[1] % vec == 0 && r.stride[2] % vec == 0;
  }
  if (tiles == 0) return;
  TORCH_CHECK(tiles < (int64_t{1} << 31), "vdit_C: too many tiles (", tiles, ") for one launch");

  PatchParams p;
  std::memset(&p, 0, sizeof(p));
  p.tokens = tokens.data_ptr();
  p.num_videos = static_cast<int32_t>(recs.size());
  p.C = static_cast<int32_t>(channels);
  p.pt = static_cast<int32_t>(pt);
  p.ph = static_cast<int32_t>(ph);
  p.pw = static_cast<int32_t>(pw);
  p.F = static_cast<int32_t>(F);
  p.tw = static_cast<int32_t>(tw);
  p.srow = static_cast<int32_t>(srow);
  p.vec_video = vec_video;
  p.vec_tokens = F % vec == 0 && aligned16(p.tokens);

  c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  at::Tensor table;  // kept alive until the launch is enqueued; the copy is stream-ordered
  if (recs.size() <= static_cast<size_t>(kInlineVideos)) {
    std::copy(recs.begin(), recs.end(), p.videos);
  } else {
    const int64_t bytes = static_cast<int64_t>(recs.size() * sizeof(PatchVideo));
    at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), recs.data(), bytes);
    table = host.to(device, /*non_blocking=*/true);  // H2D on the current stream
    p.table = reinterpret_cast<const PatchVideo*>(table.data_ptr());
  }

  const dim3 grid(static_cast<unsigned>(tiles));
  const size_t smem = static_cast<size_t>(stage_bytes);
  if (esize == 4) {
    if (to_tokens) patch_kernel<uint32_t, true><<<grid, kPatchThreads, smem, stream>>>(p);
    else patch_kernel<uint32_t, false><<<grid, kPatchThreads, smem, stream>>>(p);
  } else {
    if (to_tokens) patch_kernel<uint16_t, true><<<grid, kPatchThreads, smem, stream>>>(p);
    else patch_kernel<uint16_t, false><<<grid, kPatchThreads, smem, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

PatchVideo record(void* data, c10::IntArrayRef strides, int64_t t, int64_t h, int64_t w,
                  const std::vector<int64_t>& ps, int64_t token_begin) {
  PatchVideo r;
  std::memset(&r, 0, sizeof(r));
  r.data = data;
  for (int i = 0; i < 4; ++i) r.stride[i] = strides[i];
  r.gt = static_cast<int32_t>(t / ps[0]);
  r.gh = static_cast<int32_t>(h / ps[1]);
  r.gw = static_cast<int32_t>(w / ps[2]);
  r.token_begin = token_begin;
  return r;
}

at::Tensor patchify_cuda(at::TensorList videos, c10::IntArrayRef patch_size) {
  const auto ps = check_patch_size(patch_size);
  TORCH_CHECK(!videos.empty(), "vdit_C::patchify: videos must hold at least one video");
  const at::Tensor& v0 = videos[0];
  TORCH_CHECK(v0.dim() == 4, "vdit_C::patchify: videos[0] must be (C, T, H, W), got ", v0.sizes());
  check_dtype("videos", v0.scalar_type());
  const int64_t channels = v0.size(0);
  std::vector<PatchVideo> recs;
  recs.reserve(videos.size());
  int64_t n = 0;
  for (size_t i = 0; i < videos.size(); ++i) {
    const at::Tensor& v = videos[i];
    TORCH_CHECK(v.is_cuda(), "vdit_C::patchify: videos[", i, "] must be a CUDA tensor, got ", v.device());
    TORCH_CHECK(v.device() == v0.device(), "vdit_C::patchify: videos[", i, "] is on ", v.device(),
                ", videos[0] on ", v0.device());
    TORCH_CHECK(v.scalar_type() == v0.scalar_type(), "vdit_C::patchify: videos[", i, "] has dtype ",
                v.scalar_type(), ", videos[0] has ", v0.scalar_type());
    TORCH_CHECK(v.dim() == 4 && v.size(0) == channels, "vdit_C::patchify: videos[", i,
                "] must be (C=", channels, ", T, H, W), got ", v.sizes());
    for (int a = 0; a < 3; ++a) {
      TORCH_CHECK(v.size(a + 1) % ps[a] == 0, "vdit_C::patchify: videos[", i, "] has shape ", v.sizes(),
                  ", not divisible by patch_size ", patch_size);
    }
    recs.push_back(record(v.data_ptr(), v.strides(), v.size(1), v.size(2), v.size(3), ps, n));
    n += static_cast<int64_t>(recs.back().gt) * recs.back().gh * recs.back().gw;
  }
  const int64_t F = channels * ps[0] * ps[1] * ps[2];
  at::Tensor tokens = at::empty({n, F}, v0.options());
  if (n > 0 && F > 0) launch(true, recs, tokens, channels, ps, v0.scalar_type(), v0.device());
  return tokens;
}

std::vector<at::Tensor> unpatchify_cuda(const at::Tensor& tokens_in, c10::IntArrayRef shapes,
                                        c10::IntArrayRef patch_size, int64_t channels) {
  const auto ps = check_patch_size(patch_size);
  TORCH_CHECK(tokens_in.is_cuda(), "vdit_C::unpatchify: tokens must be a CUDA tensor, got ",
              tokens_in.device());
  check_dtype("tokens", tokens_in.scalar_type());
  TORCH_CHECK(channels > 0, "vdit_C::unpatchify: channels must be positive, got ", channels);
  TORCH_CHECK(shapes.size() % 3 == 0, "vdit_C::unpatchify: shapes must be a flat list of (T, H, W) "
              "triples, got ", shapes.size(), " ints");
  const int64_t F = channels * ps[0] * ps[1] * ps[2];
  TORCH_CHECK(tokens_in.dim() == 2 && tokens_in.size(1) == F, "vdit_C::unpatchify: tokens must be "
              "(N, channels*pt*ph*pw = ", F, "), got ", tokens_in.sizes());
  const at::Tensor tokens = tokens_in.contiguous();  // a strided token matrix is copied once
  std::vector<at::Tensor> outs;
  std::vector<PatchVideo> recs;
  int64_t n = 0;
  for (size_t i = 0; i < shapes.size(); i += 3) {
    const int64_t t = shapes[i], h = shapes[i + 1], w = shapes[i + 2];
    TORCH_CHECK(t >= 0 && h >= 0 && w >= 0 && t % ps[0] == 0 && h % ps[1] == 0 && w % ps[2] == 0,
                "vdit_C::unpatchify: shape ", i / 3, " (", t, ", ", h, ", ", w,
                ") is not divisible by patch_size ", patch_size);
    at::Tensor out = at::empty({channels, t, h, w}, tokens.options());
    recs.push_back(record(out.data_ptr(), out.strides(), t, h, w, ps, n));
    n += (t / ps[0]) * (h / ps[1]) * (w / ps[2]);
    outs.push_back(std::move(out));
  }
  TORCH_CHECK(n == tokens.size(0), "vdit_C::unpatchify: tokens has ", tokens.size(0),
              " rows, the shapes make ", n, " tokens");
  if (n > 0) launch(false, recs, tokens, channels, ps, tokens.scalar_type(), tokens.device());
  return outs;
}

}  // namespace
}  // namespace vdit

TORCH_LIBRARY_IMPL(vdit_C, CUDA, m) {
  m.impl("patchify", &vdit::patchify_cuda);
  m.impl("unpatchify", &vdit::unpatchify_cuda);
}
