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
// #pragma unroll in code that host compilers see too (only the device pass has it)
#if defined(__CUDA_ARCH__)
#define VDIT_UNROLL _Pragma("unroll")
#else
#define VDIT_UNROLL
#endif

namespace vdit {

// ---- patchify / unpatchify --------------------------------------------------------

// Up to this many videos travel inside the kernel's parameter struct (__grid_constant__,
// no copy); larger packs go through a device table of the same PatchVideo records. 48
// records of 72 bytes keep the struct (3.5 KB) within the classic 4 KB of kernel
// parameters: no CUDA 12.1+ large-parameter launch (64 made it 4.6 KB), and builds with
// older toolkits work (csrc/patch.h checks the size).
constexpr int kInlineVideos = 48;

// One video of a pack. A "tile" is ntok <= tw consecutive tokens along gw of one token
// row (gt, gh) of one video: video rows are contiguous runs there (stride_w == 1), and
// its tokens are one contiguous span of the token matrix.
struct PatchVideo {
  void* data;            // the video's data pointer
  int64_t stride[4];     // element strides of (C, T, H, W)
  int32_t gt, gh, gw;    // token grid
  int32_t vbytes;        // bytes per access on this video's side (16, 8, 4 or the element size)
  int64_t tile_begin;    // first tile of this video in the launch
  int64_t token_begin;   // first token row of this video in the pack
};

VDIT_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
VDIT_HD int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// a / b of non-negative int32 values, as unsigned 32-bit division (signed or 64-bit
// division costs more instructions)
VDIT_HD int32_t div32(int32_t a, int32_t b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
}

// Division by a divisor d known before a loop, as one multiply: a / d = (a * m) >> 32
// with m = ceil(2^32 / d), exact for 0 <= a when a * d <= 2^32. (m = (2^32 + e) / d with
// 0 <= e < d, so a * m / 2^32 = a / d + a * e / (d * 2^32), where a * e < a * d <= 2^32
// adds less than 1 / d: not enough to reach the next integer.) The patch kernel divides
// values below 2^16 by divisors of at most 2^16 (its tiles have at most kMaxStageBytes).
struct Divisor {
  uint64_t m;  // ceil(2^32 / d): (2^32 - 1) / d + 1 for every d >= 1
};
VDIT_HD Divisor make_divisor(int32_t d) {
  return Divisor{static_cast<uint64_t>(0xFFFFFFFFu / static_cast<uint32_t>(d)) + 1};
}
VDIT_HD int32_t operator/(int32_t a, const Divisor& d) {
  return static_cast<int32_t>((static_cast<uint64_t>(static_cast<uint32_t>(a)) * d.m) >> 32);
}

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
  int32_t gt, gh;       // token row of the tile
  int32_t w0;           // first grid column (token) of the tile
  int32_t ntok;         // tokens in the tile (<= tw; the last tile of a row may be short)
  int64_t first_token;  // packed row of the tile's first token
};

// local tile l of video v -> its token row, columns and first packed token. 32-bit
// division: the host checks that a launch has fewer than 2^31 tiles, and a video's token
// grid axes are int32.
VDIT_HD TileIndex tile_index(const PatchVideo& v, int32_t l, int32_t tw) {
  const int32_t chunks = div32(v.gw - 1, tw) + 1;   // tiles per token row (gw >= 1: v owns a tile)
  const int32_t row = div32(l, chunks);             // gt * gh + gh_index
  TileIndex t;
  t.gt = div32(row, v.gh);
  t.gh = row - t.gt * v.gh;
  t.w0 = (l - row * chunks) * tw;
  const int32_t left = v.gw - t.w0;
  t.ntok = left < tw ? left : tw;
  t.first_token = v.token_begin + static_cast<int64_t>(row) * v.gw + t.w0;
  return t;
}

// Element offset of the tile's origin, video element (c = 0, gt*pt, gh*ph, w0*pw).
VDIT_HD int64_t tile_origin(const PatchVideo& v, const TileIndex& t, int32_t pt, int32_t ph, int32_t pw) {
  return static_cast<int64_t>(t.gt) * pt * v.stride[1] + static_cast<int64_t>(t.gh) * ph * v.stride[2] +
         static_cast<int64_t>(t.w0) * pw * v.stride[3];
}

// A video-side row of a tile: r = (c * pt + it) * ph + ih, covering video elements
// (c, gt*pt + it, gh*ph + ih, w0*pw + x), x < ntok*pw. Returns the element offset of x = 0
// from the tile's origin.
// (r < 2^16, ph and pt <= 2^16: exact Divisor division.)
VDIT_HD int64_t tile_row_offset(const int64_t* stride, int32_t r, int32_t pt, const Divisor& div_pt, int32_t ph,
                                const Divisor& div_ph) {
  const int32_t cit = r / div_ph;
  const int32_t ih = r - cit * ph;
  const int32_t c = cit / div_pt;
  const int32_t it = cit - c * pt;
  return c * stride[0] + it * stride[1] + ih * stride[2];
}

// The staging buffer of a tile: row r (the tile row above) holds bytes xb of the tile
// row, xb = j * pbytes + b for byte b of token j's pw elements (pbytes = pw * element
// size), rows srow bytes apart (a multiple of 16). Inside a row the 16-byte slots are
// permuted, slot xb / 16 stored at slot (xb / 16) ^ swz(r), swz(r) = ((r * pbytes) / 16)
// & swz_mask, where swz_mask + 1 (a power of two <= 8) divides the row's slot count:
// the permutation stays inside the row and moves whole aligned 16-byte slots, so every
// access of at most 16 bytes that is aligned to its size stays contiguous and aligned.
// Why: a token's 16-byte chunk of features gathers 16 / pbytes rows at the same xb, and
// the threads of a warp read consecutive chunks of the same few tokens at once; with rows
// a multiple of 128 bytes apart and no permutation, all of them hit the same banks (8-way
// conflicts at pw = 2 in bfloat16). swz(r) is the index of the 16-byte chunk of a token
// in which row r starts, so 8 consecutive chunks of a token read 8 distinct slots (of
// the 8 that 128 bytes hold): no conflict at pw = 2 in bfloat16.
VDIT_HD int32_t stage_offset(int32_t r, int32_t xb, int32_t srow, int32_t pbytes, int32_t swz_mask) {
  const int32_t swz = ((r * pbytes) >> 4) & swz_mask;
  return r * srow + ((((xb >> 4) ^ swz) << 4) | (xb & 15));
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
