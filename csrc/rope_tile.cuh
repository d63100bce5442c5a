// The 3D RoPE kernels' work (csrc/rope.cu) and their launch plans, in plain C++ that
// compiles for the host too: csrc/rope_host.cpp plans launches with plan_rope_tiled (the
// tiled kernel, below, the default) or plan_rope (the shared-table kernel), and
// tests/cpp/rope_emulation.cpp runs both kernels' per-thread code on the CPU against a
// reference, for strides, alignments and splits a GPU test would need a GPU for.
//
// The shared-table kernel: a CTA owns `tok` consecutive tokens and every head of q and k
// for them. Phase 0 puts the per-pair frequencies theta^(-2j/d_a) (computed in double,
// rounded to float32, as the reference does) in shared memory, phase 1 cos/sin of angle =
// pos[axis] * freq (float32; sincosf, the accurate libdevice path, on the GPU) for its
// tokens; phase 2 rotates, every head reusing them (the emulation runs every thread of a
// CTA through phase 0, then phase 1, then phase 2: the kernel's two barriers). Work units
// are groups of VP consecutive pair slots of one (token, head): interleaved, a group is
// 2*VP contiguous elements; rotate-half, two runs of VP contiguous elements (x[c0+j..],
// x[c0+j+d_a/2..]), VP dividing every d_a/2 so a group stays in one axis. VP (1, 2 or 4
// pairs; up to 16 B per access) is chosen by rope_vp from the head dim, the split and the
// alignment of pointers and strides; VP = 1 takes any strides. Math in float32, stored in
// the input dtype; inverse=True negates sin.
#pragma once

#include <cmath>
#include <initializer_list>
#include <cstdint>

#include "common/index.cuh"

namespace vdit {

constexpr int kRopeThreads = 256;
constexpr int64_t kRopeMaxSmemBytes = 48 * 1024;  // default dynamic shared memory limit
// the largest head_dim a kernel takes: the shared-table kernel's cos/sin and frequencies of
// one token, 3 floats a pair, fill kRopeMaxSmemBytes (the tiled one stops at 512)
constexpr int64_t kRopeMaxHeadDim = 2 * kRopeMaxSmemBytes / (3 * static_cast<int64_t>(sizeof(float)));

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

// ---- launch plan (host) -----------------------------------------------------------

struct RopePlan {
  int vp;                  // pairs per access (1, 2 or 4)
  int64_t units_per_token; // work units of one token (every head of q and k)
  int64_t blocks;          // CTAs
  int64_t smem_bytes;      // dynamic shared memory per CTA
};

// Pairs per access: the largest VP in {4, 2, 1} with 2*VP*elem <= 16 B (interleaved) or
// VP*elem <= 16 B (rotate-half) that divides the groups' layout and alignment.
inline int rope_vp(const RopeParams& p, int64_t esize) {
  for (int cand : {4, 2}) {
    const int64_t run = (p.interleaved ? 2 * cand : cand) * esize;  // bytes per access
    if (run > 16) continue;
    bool ok = p.half % cand == 0;
    if (!p.interleaved) {
      for (int a = 0; a < 3; ++a) ok = ok && p.axes.half[a] % cand == 0 && p.axes.chunk_begin[a] % cand == 0;
    }
    for (int i = 0; i < 2 && ok; ++i) {
      if (p.heads[i] == 0) continue;
      const auto aligned = [run](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % run == 0; };
      ok = p.sd[i] == 1 && p.osd[i] == 1 && aligned(p.in[i]) && aligned(p.out[i]) &&
           (p.sn[i] * esize) % run == 0 && (p.sh[i] * esize) % run == 0 &&
           (p.osn[i] * esize) % run == 0 && (p.osh[i] * esize) % run == 0;
    }
    if (ok) return cand;
  }
  return 1;
}

// Fills p.tok and returns the plan of a launch whose other fields p holds (pointers,
// strides, heads, N >= 1, half >= 1, axes, interleaved); esize is the element size. The
// caller checks units_per_token * tok < 2^31, blocks < 2^31 and smem_bytes against
// kRopeMaxSmemBytes.
inline RopePlan plan_rope(RopeParams& p, int64_t esize) {
  RopePlan plan;
  plan.vp = rope_vp(p, esize);
  // tokens per CTA: about 2 work units per thread, at most 16 tokens
  plan.units_per_token = static_cast<int64_t>(p.heads[0] + p.heads[1]) * (p.half / plan.vp);
  int64_t tok = (2 * kRopeThreads + plan.units_per_token - 1) / plan.units_per_token;
  tok = tok < 1 ? 1 : tok;
  tok = tok > 16 ? 16 : tok;
  tok = tok > p.N ? p.N : tok;
  p.tok = static_cast<int32_t>(tok);
  plan.blocks = (p.N + tok - 1) / tok;
  plan.smem_bytes = static_cast<int64_t>(sizeof(float)) * p.half * (1 + 2 * tok);
  return plan;
}

// ---- the kernel's work (device; host-compilable for the emulation test) --------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// One unit's 2*VP elements of a head (x: the head's first element, sd its element stride),
// x0 (the pairs' first members) at i and x1 at VP + i in either convention: an interleaved
// run is split as it is read, every index a constant once unrolled, so the values stay in
// registers (an index chosen by the convention at run time put them in local memory).
template <typename T, int VP>
VDIT_HD void rope_load_unit(const T* x, int64_t sd, const RopePair& pr, bool interleaved, Pack<T, 2 * VP>& v) {
  if (VP == 1) {
    v.v[0] = x[pr.off0 * sd];
    v.v[1] = x[pr.off1 * sd];
  } else if (interleaved) {  // VP > 1: stride_d == 1 and aligned (rope_vp)
    const Pack<T, 2 * VP> a = *reinterpret_cast<const Pack<T, 2 * VP>*>(x + pr.off0);
    VDIT_UNROLL
    for (int i = 0; i < VP; ++i) {
      v.v[i] = a.v[2 * i];
      v.v[VP + i] = a.v[2 * i + 1];
    }
  } else {
    const Pack<T, VP> a = *reinterpret_cast<const Pack<T, VP>*>(x + pr.off0);
    const Pack<T, VP> b = *reinterpret_cast<const Pack<T, VP>*>(x + pr.off1);
    VDIT_UNROLL
    for (int i = 0; i < VP; ++i) {
      v.v[i] = a.v[i];
      v.v[VP + i] = b.v[i];
    }
  }
}

// Stores a unit's rotated pairs (y0: first members, y1: second) to y (the head's first
// output element, osd its element stride), in the unit's layout.
template <typename T, int VP>
VDIT_HD void rope_store_unit(T* y, int64_t osd, const RopePair& pr, bool interleaved, const float* y0,
                             const float* y1) {
  if (VP == 1) {
    y[pr.off0 * osd] = static_cast<T>(y0[0]);
    y[pr.off1 * osd] = static_cast<T>(y1[0]);
  } else if (interleaved) {
    Pack<T, 2 * VP> a;
    VDIT_UNROLL
    for (int i = 0; i < VP; ++i) {
      a.v[2 * i] = static_cast<T>(y0[i]);
      a.v[2 * i + 1] = static_cast<T>(y1[i]);
    }
    *reinterpret_cast<Pack<T, 2 * VP>*>(y + pr.off0) = a;
  } else {
    Pack<T, VP> a, b;
    VDIT_UNROLL
    for (int i = 0; i < VP; ++i) {
      a.v[i] = static_cast<T>(y0[i]);
      b.v[i] = static_cast<T>(y1[i]);
    }
    *reinterpret_cast<Pack<T, VP>*>(y + pr.off0) = a;
    *reinterpret_cast<Pack<T, VP>*>(y + pr.off1) = b;
  }
}

// y = the rotation of a unit's pairs (x0, x1) by their cos c[i] and sin s[i].
template <int VP>
VDIT_HD void rope_rotate(const float* x0, const float* x1, const float* c, const float* s, float* y0, float* y1) {
  VDIT_UNROLL
  for (int i = 0; i < VP; ++i) {
    y0[i] = x0[i] * c[i] - x1[i] * s[i];
    y1[i] = x1[i] * c[i] + x0[i] * s[i];
  }
}

// Pair slot i's frequency theta^(-2j/d_a), in double, rounded to float32 as the reference
// rounds it: the shared-table kernel's phase 0, the tiled kernel's plan (host).
VDIT_HD float rope_freq(const RopeParams& p, int32_t i) {
  const RopePair pr = rope_pair(p.axes, i, p.interleaved != 0);
  return static_cast<float>(pow(p.theta, -2.0 * pr.j / (2.0 * p.axes.half[pr.axis])));
}

// cos and sin of an angle (sin negated for the inverse rotation); on the GPU sincosf, the
// accurate libdevice path.
VDIT_HD void rope_cos_sin(float angle, bool inverse, float& c, float& s) {
#if defined(__CUDA_ARCH__)
  sincosf(angle, &s, &c);
#else
  s = std::sin(angle);
  c = std::cos(angle);
#endif
  s = inverse ? -s : s;
}

// Thread tid's part of CTA `block`, phase 0 (frequencies), 1 (cos / sin of the CTA's
// tokens) or 2 (the rotations); the kernel runs them with a barrier between each two.
// smem: p.half * (1 + 2 * p.tok) floats. T: float, c10::Half or c10::BFloat16.
template <typename T, int VP>
VDIT_HD void rope_phase(int phase, const RopeParams& p, int32_t block, float* smem, int tid) {
  float* freq = smem;                       // [half]
  float* cs = smem + p.half;                // [tok][half]
  float* sn = cs + p.tok * p.half;          // [tok][half]
  const int64_t n0 = static_cast<int64_t>(block) * p.tok;
  const int64_t left = p.N - n0;
  const int32_t ntok = static_cast<int32_t>(left < p.tok ? left : p.tok);
  const bool interleaved = p.interleaved != 0;

  if (phase == 0) {
    for (int32_t i = tid; i < p.half; i += kRopeThreads) freq[i] = rope_freq(p, i);
    return;
  }
  if (phase == 1) {
    for (int32_t i = tid; i < ntok * p.half; i += kRopeThreads) {
      const int32_t t = i / p.half;
      const int32_t q = i - t * p.half;
      const RopePair pr = rope_pair(p.axes, q, interleaved);
      rope_cos_sin(p.pos[(n0 + t) * 3 + pr.axis] * freq[q], p.inverse != 0, cs[i], sn[i]);
    }
    return;
  }

  const int32_t groups = p.half / VP;
  const int32_t heads = p.heads[0] + p.heads[1];
  const int32_t units = ntok * heads * groups;
  for (int32_t u = tid; u < units; u += kRopeThreads) {
    const int32_t g = u % groups;
    const int32_t rest = u / groups;
    const int32_t hh = rest % heads;
    const int32_t t = rest / heads;
    const int which = hh >= p.heads[0];
    const int64_t h = which ? hh - p.heads[0] : hh;
    const int64_t n = n0 + t;
    const T* x = static_cast<const T*>(p.in[which]) + n * p.sn[which] + h * p.sh[which];
    T* y = static_cast<T*>(p.out[which]) + n * p.osn[which] + h * p.osh[which];
    const int32_t p0 = g * VP;
    const RopePair pr = rope_pair(p.axes, p0, interleaved);
    // (converted to float32 as they are read: the measured kernel's code, which loading
    // through rope_load_unit, as the tiled kernel does, would change)
    const int64_t sd = p.sd[which];
    float x0[VP], x1[VP];
    if (VP == 1) {
      x0[0] = static_cast<float>(x[pr.off0 * sd]);
      x1[0] = static_cast<float>(x[pr.off1 * sd]);
    } else if (interleaved) {  // VP > 1: stride_d == 1 and aligned (plan_rope)
      const Pack<T, 2 * VP> a = *reinterpret_cast<const Pack<T, 2 * VP>*>(x + pr.off0);
      VDIT_UNROLL
      for (int i = 0; i < VP; ++i) {
        x0[i] = static_cast<float>(a.v[2 * i]);
        x1[i] = static_cast<float>(a.v[2 * i + 1]);
      }
    } else {
      const Pack<T, VP> a = *reinterpret_cast<const Pack<T, VP>*>(x + pr.off0);
      const Pack<T, VP> b = *reinterpret_cast<const Pack<T, VP>*>(x + pr.off1);
      VDIT_UNROLL
      for (int i = 0; i < VP; ++i) {
        x0[i] = static_cast<float>(a.v[i]);
        x1[i] = static_cast<float>(b.v[i]);
      }
    }
    float y0[VP], y1[VP];
    rope_rotate<VP>(x0, x1, cs + t * p.half + p0, sn + t * p.half + p0, y0, y1);
    rope_store_unit<T, VP>(y, p.osd[which], pr, interleaved, y0, y1);
  }
}

// ---- the tiled kernel (the default; VDIT_ROPE_CUDA=tiled or tiled-heads picks a shape)
//
// The kernel above spends each CTA on one token (at 48 heads of 128): a prologue of
// positions, double-precision pow and sincos behind two barriers, then one unit at a time
// per thread (load, rotate, store). It reached 81% of the copy bandwidth on an H200 where
// the Triton kernel, laid out as below, reached 93% (2026-11-28); loading a batch of units
// before the barriers at 64 registers made it slower (504 us against 300). The tiled
// kernel takes the Triton kernel's layout: a CTA owns `tok` tokens and a strided subset of
// the heads (blockIdx.y, stepping by gridDim.y); each thread owns a few (token, pair group)
// slots, computes their cos / sin once into registers (frequencies from the host, the
// float32 of the double theta^(-2j/d_a) as the reference), then walks its heads a few a
// step, every load of a step issued before its stores. No shared memory, no barrier. Two
// shapes, timed on the H200 (2026-11-28) while each load still waited for the one before
// (the fix: in rope_tiled_walk), at 301 and 294 us on the mixed pack, 2.46 and 2.52 ms
// on the train pack, where the shared-table kernel took 298 us and 2.62 ms:
//   kTiled       (tiled)        two slots a thread, one head a step: the Triton kernel's,
//                               the default;
//   kTiledHeads  (tiled-heads)  one slot a thread, four heads a step: fewer registers of
//                cos / sin, more loads in flight (Liger's kernel, at 96% on the H200,
//                holds a whole token's heads in one program).
// Where a unit is 32 B (float32 with 4 pairs an access) both halve: one slot, two heads.
enum class RopeTiling : int { kTiled = 0, kTiledHeads = 1 };

// (token, pair group) slots a thread owns. kTiled with 32-byte units: one, as two slots
// spilled 4-16 B at 64 registers (ptxas sm_90a / sm_80).
constexpr int rope_tiled_slots_per_thread(RopeTiling tiling, int vp, int64_t esize) {
  return tiling == RopeTiling::kTiledHeads || 2 * vp * esize >= 32 ? 1 : 2;
}

// Heads a thread rotates a step (all their loads before their stores).
constexpr int rope_tiled_heads_per_step(RopeTiling tiling, int vp, int64_t esize) {
  return tiling == RopeTiling::kTiled ? 1 : (2 * vp * esize >= 32 ? 2 : 4);
}
constexpr int kRopeTiledMaxHalf = 256;  // head_dim <= 512 (the frequencies travel in the launch's parameters)
// (what lets one token's pair groups always fit a CTA's slots: tok >= 1 covers them)
static_assert(kRopeTiledMaxHalf <= kRopeThreads, "a token's pair groups must fit one CTA's slots");

struct RopeTiledParams {
  RopeParams base;  // tok: tokens per CTA
  int32_t head_groups;  // gridDim.y: CTA (x, y) walks heads y, y + head_groups, ...
  float freq[kRopeTiledMaxHalf];
};

struct RopeTiledPlan {
  int vp;
  int64_t blocks;       // gridDim.x
  int64_t head_groups;  // gridDim.y
};

// The plan of a launch whose base params are filled (as for plan_rope) and half <=
// kRopeTiledMaxHalf: tokens per CTA so that its threads' slots cover tok * (half / VP)
// (at most N), head groups so that about target_ctas CTAs run (at most the heads and
// 65535, gridDim.y's limit). Fills tp.base.tok, tp.head_groups and tp.freq. A half past
// kRopeTiledMaxHalf gets vp = 0 (no plan).
inline RopeTiledPlan plan_rope_tiled(RopeTiledParams& tp, int64_t esize, int64_t target_ctas, RopeTiling tiling) {
  RopeParams& p = tp.base;
  RopeTiledPlan plan;
  if (p.half > kRopeTiledMaxHalf) {  // freq[] cannot hold it: no plan (vp = 0), the caller refuses
    plan.vp = 0;
    plan.blocks = plan.head_groups = 0;
    return plan;
  }
  plan.vp = rope_vp(p, esize);
  const int64_t groups = p.half / plan.vp;
  int64_t tok = rope_tiled_slots_per_thread(tiling, plan.vp, esize) * kRopeThreads / groups;
  tok = tok < 1 ? 1 : tok;
  tok = tok > p.N ? p.N : tok;
  p.tok = static_cast<int32_t>(tok);
  plan.blocks = (p.N + tok - 1) / tok;
  const int64_t heads = static_cast<int64_t>(p.heads[0]) + p.heads[1];
  int64_t hg = (target_ctas + plan.blocks - 1) / plan.blocks;
  hg = hg > heads ? heads : hg;
  hg = hg > 65535 ? 65535 : hg;
  hg = hg < 1 ? 1 : hg;
  plan.head_groups = hg;
  tp.head_groups = static_cast<int32_t>(hg);
  for (int32_t i = 0; i < p.half; ++i) tp.freq[i] = rope_freq(p, i);
  return plan;
}

// One (token, pair group) slot of a thread: its token, the group's first pair and offsets,
// and the cos / sin of its VP pairs.
template <int VP>
struct RopeSlot {
  bool active;
  int64_t n;
  RopePair pr;
  float c[VP], s[VP];
};

// Rotates a slot's loaded unit of one head by the slot's cos / sin and stores it.
template <typename T, int VP>
VDIT_HD void rope_tiled_store(T* y, int64_t osd, const RopeSlot<VP>& sl, bool interleaved, const Pack<T, 2 * VP>& v) {
  float x0[VP], x1[VP], y0[VP], y1[VP];
  VDIT_UNROLL
  for (int i = 0; i < VP; ++i) {
    x0[i] = static_cast<float>(v.v[i]);
    x1[i] = static_cast<float>(v.v[VP + i]);
  }
  rope_rotate<VP>(x0, x1, sl.c, sl.s, y0, y1);
  rope_store_unit<T, VP>(y, osd, sl.pr, interleaved, y0, y1);
}

// The head loop of rope_tiled_thread: heads by, by + head_groups, ... of q then k, a few a
// step, every load of a step before its stores, the convention a constant.
template <typename T, int VP, RopeTiling TILING, bool INTERLEAVED>
VDIT_HD void rope_tiled_walk(const RopeTiledParams& tp, int32_t by, int64_t n0, const RopeSlot<VP>* slot) {
  const RopeParams& p = tp.base;
  const int32_t heads = p.heads[0] + p.heads[1];
  constexpr int kSlotsPerThread = rope_tiled_slots_per_thread(TILING, VP, sizeof(T));
  constexpr int kHeadsPerStep = rope_tiled_heads_per_step(TILING, VP, sizeof(T));
  // a step: heads h0 + u * head_groups for u < kHeadsPerStep (int64: past the last head)
  for (int64_t h0 = by; h0 < heads; h0 += static_cast<int64_t>(kHeadsPerStep) * tp.head_groups) {
    // Every load of the step unconditional, an inactive slot or a head past the last
    // reading the CTA's first token or the last head (valid addresses, values unused; in
    // place, another thread may be rewriting them: the value is discarded all the same):
    // a load under its own `if` was a branch of its own whose values were unpacked inside
    // it, so each load waited for the one before (one 16-byte load in flight a thread, the
    // sm_90a SASS; 300 us where the Triton kernel, both loads issued first, took 260 us)
    Pack<T, 2 * VP> v[kHeadsPerStep][kSlotsPerThread];
    VDIT_UNROLL
    for (int u = 0; u < kHeadsPerStep; ++u) {
      int64_t hh = h0 + static_cast<int64_t>(u) * tp.head_groups;
      hh = hh < heads ? hh : heads - 1;
      const int which = hh >= p.heads[0];
      const T* x = static_cast<const T*>(p.in[which]) + (which ? hh - p.heads[0] : hh) * p.sh[which];
      VDIT_UNROLL
      for (int j = 0; j < kSlotsPerThread; ++j)
        rope_load_unit<T, VP>(x + (slot[j].active ? slot[j].n : n0) * p.sn[which], p.sd[which], slot[j].pr,
                              INTERLEAVED, v[u][j]);
    }
    VDIT_UNROLL
    for (int u = 0; u < kHeadsPerStep; ++u) {
      const int64_t hh = h0 + static_cast<int64_t>(u) * tp.head_groups;
      if (hh >= heads) continue;
      const int which = hh >= p.heads[0];
      T* y = static_cast<T*>(p.out[which]) + (which ? hh - p.heads[0] : hh) * p.osh[which];
      VDIT_UNROLL
      for (int j = 0; j < kSlotsPerThread; ++j)
        if (slot[j].active)
          rope_tiled_store<T, VP>(y + slot[j].n * p.osn[which], p.osd[which], slot[j], INTERLEAVED, v[u][j]);
    }
  }
}

// Thread tid of CTA (bx, by): its slots tid + j * kRopeThreads (token slot / groups, group
// slot % groups), rotated in every head by, by + head_groups, ... of q then k.
template <typename T, int VP, RopeTiling TILING>
VDIT_HD void rope_tiled_thread(const RopeTiledParams& tp, int32_t bx, int32_t by, int tid) {
  const RopeParams& p = tp.base;
  const bool interleaved = p.interleaved != 0;
  const int32_t groups = p.half / VP;
  const int64_t n0 = static_cast<int64_t>(bx) * p.tok;
  constexpr int kSlotsPerThread = rope_tiled_slots_per_thread(TILING, VP, sizeof(T));
  RopeSlot<VP> slot[kSlotsPerThread];
  VDIT_UNROLL
  for (int j = 0; j < kSlotsPerThread; ++j) {
    RopeSlot<VP>& sl = slot[j];
    const int32_t at = tid + j * kRopeThreads;
    const int32_t t = at / groups;
    const int32_t g = at - t * groups;
    sl.n = n0 + t;
    sl.active = t < p.tok && sl.n < p.N;
    sl.pr = rope_pair(p.axes, g * VP, interleaved);
    // the token's three positions: an interleaved group may span two axes (rope_vp asks
    // only that VP divide D / 2 there), so each pair picks its own (by selects, not an
    // index: an indexed array would live in local memory)
    float pos[3] = {0.0f, 0.0f, 0.0f};
    if (sl.active) {
      VDIT_UNROLL
      for (int a = 0; a < 3; ++a) pos[a] = p.pos[sl.n * 3 + a];
    }
    VDIT_UNROLL
    for (int i = 0; i < VP; ++i) {
      const int axis = rope_pair(p.axes, g * VP + i, interleaved).axis;
      rope_cos_sin((axis == 0 ? pos[0] : axis == 1 ? pos[1] : pos[2]) * tp.freq[g * VP + i], p.inverse != 0,
                   sl.c[i], sl.s[i]);
    }
  }
  // the convention chosen once, outside the loop: with the runtime flag inside it, both
  // layouts' accesses were predicated into one body, where one layout's register moves
  // waited for a load the other layout's next load was queued behind (float32, 4 pairs)
  if (interleaved)
    rope_tiled_walk<T, VP, TILING, true>(tp, by, n0, slot);
  else
    rope_tiled_walk<T, VP, TILING, false>(tp, by, n0, slot);
}

}  // namespace vdit
