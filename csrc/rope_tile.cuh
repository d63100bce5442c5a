// The 3D RoPE kernel's work (csrc/rope.cu) and its launch plan, in plain C++ that
// compiles for the host too: csrc/rope_host.cpp plans launches with plan_rope, and
// tests/cpp/rope_emulation.cpp runs the kernel's per-thread code on the CPU (every thread
// of a CTA through phase 0, then phase 1, then phase 2: the kernel's two barriers) against
// a reference, for strides, alignments and splits a GPU test would need a GPU for.
//
// A CTA owns `tok` consecutive tokens and every head of q and k for them. Phase 0 puts
// the per-pair frequencies theta^(-2j/d_a) (computed in double, rounded to float32, as
// the reference does) in shared memory, phase 1 cos/sin of angle = pos[axis] * freq
// (float32; sincosf, the accurate libdevice path, on the GPU) for its tokens; phase 2
// rotates, every head reusing them. Work units are groups of VP consecutive pair slots of
// one (token, head): interleaved, a group is 2*VP contiguous elements; rotate-half, two
// runs of VP contiguous elements (x[c0+j..], x[c0+j+d_a/2..]), VP dividing every d_a/2 so
// a group stays in one axis. VP (1, 2 or 4 pairs; up to 16 B per access) is chosen by
// plan_rope from the head dim, the split and the alignment of pointers and strides; VP =
// 1 takes any strides. Math in float32, stored in the input dtype; inverse=True negates sin.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/index.cuh"

namespace vdit {

constexpr int kRopeThreads = 256;
constexpr int64_t kRopeMaxSmemBytes = 48 * 1024;  // default dynamic shared memory limit

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

// Fills p.tok and returns the plan of a launch whose other fields p holds (pointers,
// strides, heads, N >= 1, half >= 1, axes, interleaved); esize is the element size. The
// caller checks units_per_token * tok < 2^31, blocks < 2^31 and smem_bytes against
// kRopeMaxSmemBytes.
inline RopePlan plan_rope(RopeParams& p, int64_t esize) {
  RopePlan plan;
  // pairs per access: the largest VP in {4, 2, 1} with 2*VP*elem <= 16 B (interleaved)
  // or VP*elem <= 16 B (rotate-half) that divides the groups' layout and alignment
  plan.vp = 1;
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
    if (ok) {
      plan.vp = cand;
      break;
    }
  }
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
    for (int32_t i = tid; i < p.half; i += kRopeThreads) {
      const RopePair pr = rope_pair(p.axes, i, interleaved);
      const double d = 2.0 * p.axes.half[pr.axis];
      freq[i] = static_cast<float>(pow(p.theta, -2.0 * pr.j / d));
    }
    return;
  }
  if (phase == 1) {
    for (int32_t i = tid; i < ntok * p.half; i += kRopeThreads) {
      const int32_t t = i / p.half;
      const int32_t q = i - t * p.half;
      const RopePair pr = rope_pair(p.axes, q, interleaved);
      const float angle = p.pos[(n0 + t) * 3 + pr.axis] * freq[q];
      float s, c;
#if defined(__CUDA_ARCH__)
      sincosf(angle, &s, &c);
#else
      s = std::sin(angle);
      c = std::cos(angle);
#endif
      cs[i] = c;
      sn[i] = p.inverse ? -s : s;
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
    const int64_t sd = p.sd[which], osd = p.osd[which];
    const int32_t p0 = g * VP;
    const RopePair pr = rope_pair(p.axes, p0, interleaved);
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
    VDIT_UNROLL
    for (int i = 0; i < VP; ++i) {
      const float c = cs[t * p.half + p0 + i];
      const float s = sn[t * p.half + p0 + i];
      y0[i] = x0[i] * c - x1[i] * s;
      y1[i] = x1[i] * c + x0[i] * s;
    }
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
}

}  // namespace vdit
