// CUDA fused 3D RoPE of q and k, one launch for both (out of place or in place).
//
// A CTA owns `tok` consecutive tokens and every head of q and k for them. It first puts
// the per-pair frequencies theta^(-2j/d_a) (computed in double, rounded to float32, as
// the reference does) and then cos/sin of angle = pos[axis] * freq (float32, sincosf,
// accurate libdevice path) for its tokens in shared memory; every head reuses them.
// Work units are groups of VP consecutive pair slots of one (token, head): interleaved,
// a group is 2*VP contiguous elements; rotate-half, two runs of VP contiguous elements
// (x[c0+j..], x[c0+j+d_a/2..]), VP dividing every d_a/2 so a group stays in one axis.
// VP (1, 2 or 4 pairs; up to 16 B per access) is chosen on the host from the head
// dim, the split and the alignment of pointers and strides; VP = 1 takes any strides.
// Math in float32, stored in the input dtype; inverse=True negates sin.
// Argument checks, the vector width and the registered ops live in csrc/rope_host.cpp;
// this file holds the kernel and its launch only.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "rope.h"

namespace vdit {
namespace {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int VP>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(const __grid_constant__ RopeParams p) {
  extern __shared__ float smem[];
  float* freq = smem;                       // [half]
  float* cs = smem + p.half;                // [tok][half]
  float* sn = cs + p.tok * p.half;          // [tok][half]

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * p.tok;
  const int64_t left = p.N - n0;
  const int32_t ntok = static_cast<int32_t>(left < p.tok ? left : p.tok);
  const bool interleaved = p.interleaved != 0;

  for (int32_t i = threadIdx.x; i < p.half; i += kRopeThreads) {
    const RopePair pr = rope_pair(p.axes, i, interleaved);
    const double d = 2.0 * p.axes.half[pr.axis];
    freq[i] = static_cast<float>(pow(p.theta, -2.0 * pr.j / d));
  }
  __syncthreads();
  for (int32_t i = threadIdx.x; i < ntok * p.half; i += kRopeThreads) {
    const int32_t t = i / p.half;
    const int32_t q = i - t * p.half;
    const RopePair pr = rope_pair(p.axes, q, interleaved);
    const float angle = p.pos[(n0 + t) * 3 + pr.axis] * freq[q];
    float s, c;
    sincosf(angle, &s, &c);
    cs[i] = c;
    sn[i] = p.inverse ? -s : s;
  }
  __syncthreads();

  const int32_t groups = p.half / VP;
  const int32_t heads = p.heads[0] + p.heads[1];
  const int32_t units = ntok * heads * groups;
  for (int32_t u = threadIdx.x; u < units; u += kRopeThreads) {
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
    } else if (interleaved) {  // VP > 1: stride_d == 1 and aligned (host-checked)
      const Pack<T, 2 * VP> a = *reinterpret_cast<const Pack<T, 2 * VP>*>(x + pr.off0);
#pragma unroll
      for (int i = 0; i < VP; ++i) {
        x0[i] = static_cast<float>(a.v[2 * i]);
        x1[i] = static_cast<float>(a.v[2 * i + 1]);
      }
    } else {
      const Pack<T, VP> a = *reinterpret_cast<const Pack<T, VP>*>(x + pr.off0);
      const Pack<T, VP> b = *reinterpret_cast<const Pack<T, VP>*>(x + pr.off1);
#pragma unroll
      for (int i = 0; i < VP; ++i) {
        x0[i] = static_cast<float>(a.v[i]);
        x1[i] = static_cast<float>(b.v[i]);
      }
    }
    float y0[VP], y1[VP];
#pragma unroll
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
#pragma unroll
      for (int i = 0; i < VP; ++i) {
        a.v[2 * i] = static_cast<T>(y0[i]);
        a.v[2 * i + 1] = static_cast<T>(y1[i]);
      }
      *reinterpret_cast<Pack<T, 2 * VP>*>(y + pr.off0) = a;
    } else {
      Pack<T, VP> a, b;
#pragma unroll
      for (int i = 0; i < VP; ++i) {
        a.v[i] = static_cast<T>(y0[i]);
        b.v[i] = static_cast<T>(y1[i]);
      }
      *reinterpret_cast<Pack<T, VP>*>(y + pr.off0) = a;
      *reinterpret_cast<Pack<T, VP>*>(y + pr.off1) = b;
    }
  }
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

}  // namespace vdit
