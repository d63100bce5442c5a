// Index math shared by the CUDA kernels (csrc/patch.cu, csrc/rope.cu) and their host
// launchers: one definition of each mapping, usable on host and device.
//
// Layouts (vdit_kernels/reference.py):
//   video   (C, T, H, W), any strides
//   tokens  (N, F), F = C*pt*ph*pw, features in (c, pt, ph, pw) order (pw fastest);
//           video i owns rows token_begin_i .. in raster (t, h, w) order over its token
//           grid (gt, gh, gw) = (T/pt, H/ph, W/pw)
//   q, k    (N, heads, D), D = dt + dh + dw, each even
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define VDIT_HD __host__ __device__ __forceinline__
#else
#define VDIT_HD inline
#endif

namespace vdit {

// ---- patchify / unpatchify --------------------------------------------------------

// Up to this many videos travel inside the kernel's parameter struct (__grid_constant__,
// no copy); larger packs go through a device table of the same PatchVideo records.
constexpr int kInlineVideos = 64;

// One video of a pack. A "tile" is ntok <= tw consecutive tokens along gw of one token
// row (gt, gh) of one video: video rows are contiguous runs there (stride_w == 1), and
// its tokens are one contiguous span of the token matrix.
struct PatchVideo {
  void* data;            // the video's data pointer
  int64_t stride[4];     // element strides of (C, T, H, W)
  int32_t gt, gh, gw;    // token grid
  int32_t pad_;
  int64_t tile_begin;    // first tile of this video in the launch
  int64_t token_begin;   // first token row of this video in the pack
};

VDIT_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
VDIT_HD int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Tiles of one video: every token row (gt, gh) is cut into ceil(gw / tw) tiles.
VDIT_HD int64_t video_tiles(int32_t gt, int32_t gh, int32_t gw, int32_t tw) {
  return static_cast<int64_t>(gt) * gh * ceil_div(gw, tw);
}

// The video that owns tile `tile`: the last i with videos[i].tile_begin <= tile
// (binary search over B sorted starts; uniform across a CTA).
VDIT_HD int find_video(const PatchVideo* videos, int num_videos, int64_t tile) {
  int lo = 0, hi = num_videos - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (videos[mid].tile_begin <= tile) lo = mid; else hi = mid - 1;
  }
  return lo;
}

struct TileIndex {
  int64_t gt, gh;    // token row of the tile
  int64_t w0;        // first grid column (token) of the tile
  int32_t ntok;      // tokens in the tile (<= tw; the last tile of a row may be short)
  int64_t first_token;  // packed row of the tile's first token
};

// local tile l of video v -> its token row, columns and first packed token
VDIT_HD TileIndex tile_index(const PatchVideo& v, int64_t l, int32_t tw) {
  const int64_t chunks = ceil_div(v.gw, tw);
  const int64_t row = l / chunks;  // gt * gh + gh_index
  TileIndex t;
  t.gt = row / v.gh;
  t.gh = row - t.gt * v.gh;
  t.w0 = (l - row * chunks) * tw;
  const int64_t left = v.gw - t.w0;
  t.ntok = static_cast<int32_t>(left < tw ? left : tw);
  t.first_token = v.token_begin + row * v.gw + t.w0;
  return t;
}

// A video-side row of a tile: r = (c * pt + it) * ph + ih, covering video elements
// (c, gt*pt + it, gh*ph + ih, w0*pw + x), x < ntok*pw. Returns the element offset of x = 0.
VDIT_HD int64_t tile_row_offset(const PatchVideo& v, const TileIndex& t, int32_t r,
                                int32_t pt, int32_t ph, int32_t pw) {
  const int32_t ih = r % ph;
  const int32_t cit = r / ph;
  const int32_t it = cit % pt;
  const int32_t c = cit / pt;
  return c * v.stride[0] + (t.gt * pt + it) * v.stride[1] + (t.gh * ph + ih) * v.stride[2] +
         t.w0 * pw * v.stride[3];
}

// Element o of a tile's token span (token j = o / F, feature f = o % F, features
// (c, pt, ph, pw) with pw fastest) -> its slot in the tile's staging buffer, laid out
// [r][x] with row stride srow: r = f / pw, x = j * pw + f % pw.
VDIT_HD int32_t span_to_stage(int32_t o, int32_t F, int32_t pw, int32_t srow) {
  const int32_t j = o / F;
  const int32_t f = o - j * F;
  const int32_t r = f / pw;
  return r * srow + j * pw + (f - r * pw);
}

// ---- 3D RoPE ----------------------------------------------------------------------

// The head-dim split (dt, dh, dw): axis a has half[a] = d_a / 2 pairs (pair slots
// pair_begin[a] ..) and its elements start at chunk_begin[a].
struct RopeAxes {
  int32_t half[3];
  int32_t pair_begin[3];
  int32_t chunk_begin[3];
};

inline RopeAxes make_rope_axes(int64_t dt, int64_t dh, int64_t dw) {
  RopeAxes a;
  const int64_t d[3] = {dt, dh, dw};
  int32_t pairs = 0, elems = 0;
  for (int i = 0; i < 3; ++i) {
    a.half[i] = static_cast<int32_t>(d[i] / 2);
    a.pair_begin[i] = pairs;
    a.chunk_begin[i] = elems;
    pairs += a.half[i];
    elems += static_cast<int32_t>(d[i]);
  }
  return a;
}

struct RopePair {
  int32_t axis;   // 0 = t, 1 = h, 2 = w
  int32_t j;      // frequency index inside the axis: angle = pos[axis] * theta^(-2j / d_axis)
  int32_t off0;   // element offsets of the pair's two members inside a head
  int32_t off1;
};

// pair slot p (0 <= p < D/2) -> axis, frequency index and member offsets.
//   interleaved:  (2p, 2p + 1)
//   rotate-half:  (c0 + j, c0 + j + d_a/2) inside axis chunk a
VDIT_HD RopePair rope_pair(const RopeAxes& a, int32_t p, bool interleaved) {
  RopePair r;
  r.axis = p >= a.pair_begin[2] ? 2 : (p >= a.pair_begin[1] ? 1 : 0);
  // an empty axis (d_a = 0) shares its pair_begin with the next one; the ternary above
  // picks the highest axis starting at or before p, which is the non-empty one
  r.j = p - a.pair_begin[r.axis];
  if (interleaved) {
    r.off0 = 2 * p;
    r.off1 = 2 * p + 1;
  } else {
    r.off0 = a.chunk_begin[r.axis] + r.j;
    r.off1 = r.off0 + a.half[r.axis];
  }
  return r;
}

}  // namespace vdit
