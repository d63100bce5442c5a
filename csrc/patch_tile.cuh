// The patchify / unpatchify kernel's work (csrc/patch.cu) and its launch plan, in plain
// C++ that compiles for the host too: csrc/patch_host.cpp plans launches with
// plan_patch, and tests/cpp/patch_emulation.cpp runs the kernel's per-thread code on the
// CPU (every thread of a CTA before its one barrier, then every thread after it) against
// a reference, for shapes, strides and alignments a GPU test would need a GPU for.
//
// Scheme: a CTA owns one tile = ntok <= tw consecutive tokens along gw of one token row
// (gt, gh) of one video (common/index.cuh). In the video, the tile is rows = C*pt*ph rows
// of ntok*pw elements, contiguous along W when stride_w == 1; in the token matrix it is
// ONE contiguous span of ntok*F elements. The CTA stages the tile in shared memory, row r
// = (c, it, ih) holding the row's ntok*pw elements (stage_offset), so both global sides
// are read and written in order, coalesced:
//   video side: each tile row is copied with vbytes-wide accesses (16, 8 or 4 bytes, or
//     one element: chosen per video by the host from its pointer and strides), the
//     row's last bytes element by element where the row is not a multiple of vbytes
//   token side: the span is copied in chunks of tbytes (16 where F * element size and
//     the token pointer allow), each chunk gathered from / scattered to the stage in
//     units of ubytes (the widest that divides pw * element size: 4 bytes at pw = 2 in
//     bfloat16, one unit per tile row)
//   patchify:   video -> stage, barrier, stage -> tokens
//   unpatchify: tokens -> stage, barrier, stage -> videos
// Each thread issues up to kPatchBatch global loads before it waits on any of them (one
// 2-byte load in flight per thread, the earlier element path, reached 15% of an H100's
// copy bandwidth), and divides by launch constants with one multiply (Divisor). Data moves as
// raw 2- or 4-byte words (a pure copy: exact in every dtype). Index math is 32-bit
// inside a tile (the stage is at most kMaxStageBytes), 64-bit for video offsets.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/index.cuh"

namespace vdit {

// 128 threads a CTA, and at least kPatchMinBlocks CTAs an SM (__launch_bounds__): the
// kernel is then held to 32 registers (65536 / (16 * 128)), where it compiled to 48-56
// and 9-10 CTAs (36-40 warps) fit an SM. At 32 it is still spill-free (sm_80, sm_90a)
// and still issues each thread's kPatchBatch loads before using any (the static
// report's LOADS_FIRST_KERNELS check), so an SM holds up to 64 warps of them in flight,
// as many as shared memory allows (13 CTAs at full 16 KB stages). Why: on an H200 the
// kernel reached 67% of the copy bandwidth on the 368K-token pack (80.6% on an H100),
// where Triton's line kernels, held to 32 registers at 64 warps an SM, reached 77%.
// (Not yet timed on a GPU at 32 registers.)
constexpr int kPatchThreads = 128;
constexpr int kPatchMinBlocks = 16;
constexpr int kPatchBatch = 4;                  // global loads a thread issues before waiting
constexpr int64_t kStageBytes = 16 * 1024;      // target staging buffer per CTA
constexpr int64_t kMaxStageBytes = 48 * 1024;   // default dynamic shared memory limit
// Inside a tile every dividend is below 2^16 and every divisor at most 2^16 (they count
// bytes or accesses of one tile): the Divisor multiplications are exact (index.cuh).
static_assert(kMaxStageBytes <= 64 * 1024, "the patch kernel's Divisor bounds assume tiles of at most 64 KB");

struct PatchParams {
  void* tokens;
  const PatchVideo* table;  // device table when num_videos > kInlineVideos, else nullptr
  int32_t num_videos;
  int32_t pt, ph, pw;
  int32_t F;                // features per token, C*pt*ph*pw
  int32_t rows;             // rows of a tile, C*pt*ph
  int32_t tw;               // tokens per tile (at most)
  int32_t pbytes;           // pw * element size: the bytes of one token in a tile row
  int32_t srow;             // stage row stride in bytes (a multiple of 16)
  int32_t swz_mask;         // stage slot permutation mask (stage_offset); 0: none
  int32_t tbytes;           // bytes per global access on the token side (a chunk)
  int32_t ubytes;           // bytes per stage access on the token side (a unit)
  Divisor div_pt, div_ph;   // by pt, ph, pbytes, and the chunks per token F * element size / tbytes
  Divisor div_pbytes, div_chunks;
  PatchVideo videos[kInlineVideos];
};

// The raw words of one access of N bytes (aligned structs: nvcc moves them with one
// 8- or 16-byte load / store, LDG.E.64 / LDG.E.128 in the SASS)
struct alignas(8) Bytes8 { uint32_t x, y; };
struct alignas(16) Bytes16 { uint32_t x, y, z, w; };
template <int N> struct Word;
template <> struct Word<2> { using T = uint16_t; };
template <> struct Word<4> { using T = uint32_t; };
template <> struct Word<8> { using T = Bytes8; };
template <> struct Word<16> { using T = Bytes16; };

// ---- launch plan (host) -----------------------------------------------------------

// The largest power of two <= cap (a power of two) that divides x.
inline int64_t pow2_dividing(int64_t x, int64_t cap) {
  int64_t g = cap;
  while (g > 1 && x % g != 0) g /= 2;
  return g;
}

// Bytes per access on video v's side: 16, 8 or 4 where every row of every tile starts
// aligned to it, else the element size. Rows start at data + c*s_c + t*s_t + h*s_h +
// w0*pw (elements; w0 a multiple of tw, 0 when one tile spans the token row) and run
// along W: unit stride_w needed. Axes of length 1 are only ever indexed at 0, so their
// strides do not count.
inline int32_t video_access_bytes(const PatchVideo& v, int64_t channels, const int64_t ps[3], int64_t tw,
                                  int64_t esize) {
  if (v.stride[3] != 1) return static_cast<int32_t>(esize);
  int64_t g = pow2_dividing(static_cast<int64_t>(reinterpret_cast<uintptr_t>(v.data) % 16), 16);
  const int64_t sizes[3] = {channels, static_cast<int64_t>(v.gt) * ps[0], static_cast<int64_t>(v.gh) * ps[1]};
  for (int a = 0; a < 3; ++a) {
    if (sizes[a] > 1) g = pow2_dividing(v.stride[a] * esize, g);
  }
  if (v.gw > tw) g = pow2_dividing(tw * ps[2] * esize, g);
  return static_cast<int32_t>(g > esize ? g : esize);
}

struct PatchPlan {
  int64_t tiles;              // CTAs of the launch
  int64_t stage_bytes;        // dynamic shared memory per CTA
  int64_t plain_stage_bytes;  // the same without the slot permutation's padding: the
                              // size the host checks against kMaxStageBytes
};

// Plans a launch: tokens per tile, the stage layout, the access widths; fills p (all but
// tokens' data, table and videos) and every record's tile_begin and vbytes. Sizes are
// those the host has checked (C < 2^31, F < 2^30, patch sizes < 2^20); the int32 fields
// are only meaningful when plain_stage_bytes <= kMaxStageBytes and tiles < 2^31, the
// host's next checks.
inline PatchPlan plan_patch(PatchVideo* recs, int num_videos, int64_t channels, const int64_t ps[3], int64_t esize,
                            const void* tokens, PatchParams& p) {
  const int64_t pt = ps[0], ph = ps[1], pw = ps[2];
  const int64_t F = channels * pt * ph * pw;
  const int64_t rows = channels * pt * ph;
  const int64_t pbytes = pw * esize;

  // tokens per tile: stage ~kStageBytes, a multiple of 8 tokens when the rows are wide
  int64_t max_gw = 1;
  for (int i = 0; i < num_videos; ++i) max_gw = recs[i].gw > max_gw ? recs[i].gw : max_gw;
  int64_t tw = kStageBytes / (F * esize);
  if (tw < 1) tw = 1;
  if (tw >= 8) tw = tw / 8 * 8;
  if (tw > max_gw) tw = max_gw;

  // stage rows: tw tokens in whole 16-byte slots; the slot permutation's period is a
  // power of two <= 8 slots, and the row is padded to a multiple of it where that fits
  PatchPlan plan;
  const int64_t slots = ceil_div(tw * pbytes, 16);
  plan.plain_stage_bytes = rows * slots * 16;
  int64_t period = 8;
  while (period > slots) period /= 2;
  int64_t srow = round_up(slots, period) * 16;
  if (rows * srow > kMaxStageBytes) {
    period = 1;
    srow = slots * 16;
  }
  plan.stage_bytes = rows * srow;

  plan.tiles = 0;
  for (int i = 0; i < num_videos; ++i) {
    PatchVideo& r = recs[i];
    r.tile_begin = plan.tiles;
    plan.tiles += video_tiles(r.gt, r.gh, r.gw, static_cast<int32_t>(tw));
    r.vbytes = video_access_bytes(r, channels, ps, tw, esize);
  }

  p.num_videos = num_videos;
  p.pt = static_cast<int32_t>(pt);
  p.ph = static_cast<int32_t>(ph);
  p.pw = static_cast<int32_t>(pw);
  p.F = static_cast<int32_t>(F);
  p.rows = static_cast<int32_t>(rows);
  p.tw = static_cast<int32_t>(tw);
  p.pbytes = static_cast<int32_t>(pbytes);
  p.srow = static_cast<int32_t>(srow);
  p.swz_mask = static_cast<int32_t>(period - 1);
  // chunks: aligned in memory and never across a token; units: never across a tile row
  const int64_t tbytes = pow2_dividing(F * esize, pow2_dividing(
      static_cast<int64_t>(reinterpret_cast<uintptr_t>(tokens) % 16), 16));
  p.tbytes = static_cast<int32_t>(tbytes > esize ? tbytes : esize);
  p.ubytes = static_cast<int32_t>(pow2_dividing(pbytes, p.tbytes));
  p.div_pt = make_divisor(p.pt);
  p.div_ph = make_divisor(p.ph);
  p.div_pbytes = make_divisor(p.pbytes);
  p.div_chunks = make_divisor(static_cast<int32_t>(F * esize / p.tbytes));  // >= 1: tbytes divides F * esize
  return plan;
}

// ---- the kernel's work (device; host-compilable for the emulation test) --------------

// What every thread of a CTA needs of its tile.
struct PatchCta {
  void* video;        // the tile's origin in its video: element (0, gt*pt, gh*ph, w0*pw)
  int64_t stride[4];  // the video's element strides
  void* tokens;       // the tile's first token row
  int32_t ntok;       // tokens in the tile
  int32_t vbytes;     // bytes per access on the video side
};

template <typename E>
VDIT_HD PatchCta patch_cta(const PatchParams& p, int32_t tile) {
  const PatchVideo* videos = p.table != nullptr ? p.table : p.videos;
  const PatchVideo& v = videos[find_video(videos, p.num_videos, tile)];
  const TileIndex t = tile_index(v, tile - static_cast<int32_t>(v.tile_begin), p.tw);
  PatchCta c;
  c.video = static_cast<E*>(v.data) + tile_origin(v, t, p.pt, p.ph, p.pw);
  for (int i = 0; i < 4; ++i) c.stride[i] = v.stride[i];
  c.tokens = static_cast<E*>(p.tokens) + t.first_token * p.F;
  c.ntok = t.ntok;
  c.vbytes = v.vbytes;
  return c;
}

// Video side: bytes [xb0, xb0 + n*kV) of every tile row between the video and the
// stage, kV bytes per access. kV > element size: the host checked unit stride_w and
// kV-aligned rows (video_access_bytes); kV = element size: any stride_w.
template <typename E, int kV, bool kToStage>
VDIT_HD void video_rows(const PatchParams& p, const PatchCta& c, unsigned char* stage, int tid, int32_t xb0,
                        int32_t n) {
  using W = typename Word<kV>::T;
  constexpr int32_t kE = sizeof(E);
  const int32_t total = p.rows * n;
  if (total == 0) return;
  const Divisor div_n = make_divisor(n);
  for (int32_t u0 = tid; u0 < total; u0 += kPatchBatch * kPatchThreads) {
    W* g[kPatchBatch];
    int32_t s[kPatchBatch];
    W w[kPatchBatch];
    VDIT_UNROLL
    for (int b = 0; b < kPatchBatch; ++b) {
      const int32_t u = u0 + b * kPatchThreads;
      if (u < total) {
        const int32_t r = u / div_n;                   // tile row
        const int32_t xb = xb0 + (u - r * n) * kV;     // byte in the tile row
        const int64_t x = xb / kE;                     // element in the tile row
        E* row = static_cast<E*>(c.video) + tile_row_offset(c.stride, r, p.pt, p.div_pt, p.ph, p.div_ph);
        g[b] = reinterpret_cast<W*>(kV > kE ? row + x : row + x * c.stride[3]);
        s[b] = stage_offset(r, xb, p.srow, p.pbytes, p.swz_mask);
        if (kToStage) w[b] = *g[b];
        else w[b] = *reinterpret_cast<const W*>(stage + s[b]);
      }
    }
    VDIT_UNROLL
    for (int b = 0; b < kPatchBatch; ++b) {
      if (u0 + b * kPatchThreads < total) {
        if (kToStage) *reinterpret_cast<W*>(stage + s[b]) = w[b];
        else *g[b] = w[b];
      }
    }
  }
}

template <typename E, int kV, bool kToStage>
VDIT_HD void video_side_v(const PatchParams& p, const PatchCta& c, unsigned char* stage, int tid) {
  const int32_t row_bytes = c.ntok * p.pbytes;
  const int32_t full = row_bytes / kV;  // whole accesses per row
  video_rows<E, kV, kToStage>(p, c, stage, tid, 0, full);
  if constexpr (kV > sizeof(E)) {  // the row's last bytes, element by element
    const int32_t tail = (row_bytes - full * kV) / static_cast<int32_t>(sizeof(E));
    if (tail > 0) video_rows<E, sizeof(E), kToStage>(p, c, stage, tid, full * kV, tail);
  }
}

// Calls f(std::integral_constant<int, W>{}) for W = the widest of 16, 8, 4 bytes that
// `bytes` allows, else the element size: a runtime width turned into a template argument.
template <typename E, typename F>
VDIT_HD void with_width(int32_t bytes, F&& f) {
  if (bytes >= 16) f(std::integral_constant<int, 16>{});
  else if (bytes >= 8) f(std::integral_constant<int, 8>{});
  else if (bytes >= 4) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, static_cast<int>(sizeof(E))>{});
}

template <typename E, bool kToStage>
VDIT_HD void video_side(const PatchParams& p, const PatchCta& c, unsigned char* stage, int tid) {
  with_width<E>(c.vbytes, [&](auto v) { video_side_v<E, decltype(v)::value, kToStage>(p, c, stage, tid); });
}

// Token side: the tile's span (ntok tokens of F elements, contiguous) between the token
// matrix and the stage, in chunks of kT bytes (kT divides F * element size and the token
// pointer's alignment: a chunk never crosses a token), each chunk as kT / kU units of kU
// bytes in the stage (kU divides kT and pbytes: a unit never crosses a tile row).
// Chunk u of the span is token j = u / per_token, its feature bytes fb .. fb + kT; the
// unit at feature byte f of token j is in tile row f / pbytes, at byte j * pbytes +
// f % pbytes of that row.
template <typename E, int kT, int kU, bool kToStage>
VDIT_HD void token_chunks(const PatchParams& p, const PatchCta& c, unsigned char* stage, int tid) {
  using TW = typename Word<kT>::T;
  using UW = typename Word<kU>::T;
  constexpr int kUnits = kT / kU;
  union Chunk {
    TW whole;
    UW unit[kUnits];
  };
  const int32_t per_token = p.F * static_cast<int32_t>(sizeof(E)) / kT;  // chunks per token
  const int32_t total = c.ntok * per_token;
  TW* tok = static_cast<TW*>(c.tokens);
  for (int32_t u0 = tid; u0 < total; u0 += kPatchBatch * kPatchThreads) {
    Chunk w[kPatchBatch];
    if (kToStage) {  // all loads first, then the stage
      VDIT_UNROLL
      for (int b = 0; b < kPatchBatch; ++b) {
        const int32_t u = u0 + b * kPatchThreads;
        if (u < total) w[b].whole = tok[u];
      }
    }
    VDIT_UNROLL
    for (int b = 0; b < kPatchBatch; ++b) {
      const int32_t u = u0 + b * kPatchThreads;
      if (u < total) {
        const int32_t j = u / p.div_chunks;             // token of the chunk (div_chunks: by per_token, kT = p.tbytes)
        const int32_t fb = (u - j * per_token) * kT;    // its first feature byte
        int32_t r = fb / p.div_pbytes;                  // tile row of its first unit
        int32_t ib = fb - r * p.pbytes;                 // byte of that unit in token j's pw elements
        VDIT_UNROLL
        for (int i = 0; i < kUnits; ++i) {
          UW* s = reinterpret_cast<UW*>(stage + stage_offset(r, j * p.pbytes + ib, p.srow, p.pbytes, p.swz_mask));
          if (kToStage) *s = w[b].unit[i];
          else w[b].unit[i] = *s;
          ib += kU;
          if (ib == p.pbytes) {  // past token j's pw elements of row r: the next row
            ib = 0;
            ++r;
          }
        }
        if (!kToStage) tok[u] = w[b].whole;
      }
    }
  }
}

// Unit width: p.ubytes (<= kT, >= the element size).
template <typename E, int kT, bool kToStage>
VDIT_HD void token_side_t(const PatchParams& p, const PatchCta& c, unsigned char* stage, int tid) {
  if constexpr (kT >= 16) {
    if (p.ubytes >= 16) return token_chunks<E, kT, 16, kToStage>(p, c, stage, tid);
  }
  if constexpr (kT >= 8) {
    if (p.ubytes >= 8) return token_chunks<E, kT, 8, kToStage>(p, c, stage, tid);
  }
  if constexpr (kT >= 4) {
    if (p.ubytes >= 4) return token_chunks<E, kT, 4, kToStage>(p, c, stage, tid);
  }
  token_chunks<E, kT, sizeof(E), kToStage>(p, c, stage, tid);
}

template <typename E, bool kToStage>
VDIT_HD void token_side(const PatchParams& p, const PatchCta& c, unsigned char* stage, int tid) {
  with_width<E>(p.tbytes, [&](auto t) { token_side_t<E, decltype(t)::value, kToStage>(p, c, stage, tid); });
}

// Thread tid's part of a tile before the CTA's barrier (phase 0) or after it (phase 1).
// E: a raw word of the element size (uint16_t or uint32_t).
template <typename E, bool kToTokens>
VDIT_HD void patch_phase(int phase, const PatchParams& p, const PatchCta& c, unsigned char* stage, int tid) {
  if (kToTokens) {
    if (phase == 0) video_side<E, true>(p, c, stage, tid);
    else token_side<E, false>(p, c, stage, tid);
  } else {
    if (phase == 0) token_side<E, true>(p, c, stage, tid);
    else video_side<E, false>(p, c, stage, tid);
  }
}

}  // namespace vdit
