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
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>

#include "common/index.cuh"

namespace vdit {
namespace {

constexpr int kRopeThreads = 256;

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

void check_rope_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                     c10::IntArrayRef dims) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(k.device() == q.device(), op, ": k is on ", k.device(), ", q on ", q.device());
  TORCH_CHECK(positions.device() == q.device(), op, ": positions is on ", positions.device(), ", q on ",
              q.device());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt, op, ": k has dtype ", k.scalar_type(), ", q has ", dt);
  TORCH_CHECK(q.dim() == 3, op, ": q must be (N, heads, head_dim), got ", q.sizes());
  TORCH_CHECK(k.dim() == 3, op, ": k must be (N, heads, head_dim), got ", k.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2), op, ": q ", q.sizes(), " and k ", k.sizes(),
              " must share N and head_dim");
  TORCH_CHECK(dims.size() == 3, op, ": dims must be 3 ints (dt, dh, dw), got ", dims.size());
  for (auto d : dims) TORCH_CHECK(d >= 0 && d % 2 == 0, op, ": dims must be even and >= 0, got ", dims);
  TORCH_CHECK(dims[0] + dims[1] + dims[2] == q.size(2), op, ": dims ", dims, " must sum to head_dim ",
              q.size(2));
  TORCH_CHECK(positions.scalar_type() == at::kFloat, op, ": positions must be float32, got ",
              positions.scalar_type());
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == q.size(0) && positions.size(1) == 3, op,
              ": positions must be (N=", q.size(0), ", 3), got ", positions.sizes());
  TORCH_CHECK(q.size(1) < (1 << 30) && k.size(1) < (1 << 30), op, ": too many heads");
}

bool aligned_to(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

void rope_launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qo, const at::Tensor& ko,
                 const at::Tensor& positions_in, c10::IntArrayRef dims, double theta, bool interleaved,
                 bool inverse) {
  const int64_t N = q.size(0), D = q.size(2);
  if (N == 0 || D == 0 || q.size(1) + k.size(1) == 0) return;
  c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor positions = positions_in.contiguous();

  RopeParams p;
  std::memset(&p, 0, sizeof(p));
  const at::Tensor* ins[2] = {&q, &k};
  const at::Tensor* outs[2] = {&qo, &ko};
  for (int i = 0; i < 2; ++i) {
    p.in[i] = ins[i]->data_ptr();
    p.out[i] = outs[i]->data_ptr();
    p.sn[i] = ins[i]->stride(0);
    p.sh[i] = ins[i]->stride(1);
    p.sd[i] = ins[i]->stride(2);
    p.osn[i] = outs[i]->stride(0);
    p.osh[i] = outs[i]->stride(1);
    p.osd[i] = outs[i]->stride(2);
    p.heads[i] = static_cast<int32_t>(ins[i]->size(1));
  }
  p.pos = positions.data_ptr<float>();
  p.N = N;
  p.half = static_cast<int32_t>(D / 2);
  p.axes = make_rope_axes(dims[0], dims[1], dims[2]);
  p.theta = theta;
  p.interleaved = interleaved;
  p.inverse = inverse;

  // pairs per access: the largest VP in {4, 2, 1} with 2*VP*elem <= 16 B (interleaved)
  // or VP*elem <= 16 B (rotate-half) that divides the groups' layout and alignment
  const int64_t esize = q.element_size();
  int vp = 1;
  for (int cand : {4, 2}) {
    const int64_t run = (interleaved ? 2 * cand : cand) * esize;  // bytes per access
    if (run > 16) continue;
    bool ok = p.half % cand == 0;
    if (!interleaved) {
      for (int a = 0; a < 3; ++a) ok = ok && p.axes.half[a] % cand == 0 && p.axes.chunk_begin[a] % cand == 0;
    }
    for (int i = 0; i < 2 && ok; ++i) {
      if (p.heads[i] == 0) continue;
      ok = p.sd[i] == 1 && p.osd[i] == 1 && aligned_to(p.in[i], run) && aligned_to(p.out[i], run) &&
           (p.sn[i] * esize) % run == 0 && (p.sh[i] * esize) % run == 0 &&
           (p.osn[i] * esize) % run == 0 && (p.osh[i] * esize) % run == 0;
    }
    if (ok) {
      vp = cand;
      break;
    }
  }

  // tokens per CTA: about 2 work units per thread, at most 16 tokens
  const int64_t units_per_token = (q.size(1) + k.size(1)) * (p.half / vp);
  int64_t tok = std::max<int64_t>(1, (2 * kRopeThreads + units_per_token - 1) / units_per_token);
  tok = std::min<int64_t>({tok, 16, N});
  p.tok = static_cast<int32_t>(tok);
  TORCH_CHECK(units_per_token * tok < (int64_t{1} << 31), "vdit_C rope: too many heads * head_dim");
  const int64_t blocks = (N + tok - 1) / tok;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "vdit_C rope: N = ", N, " is too large");
  const size_t smem = sizeof(float) * static_cast<size_t>(p.half) * (1 + 2 * tok);
  TORCH_CHECK(smem <= 48 * 1024, "vdit_C rope: head_dim ", D, " is too large");
  auto stream = c10::cuda::getCurrentCUDAStream(q.device().index());
  const dim3 grid(static_cast<unsigned>(blocks));

#define VDIT_ROPE_LAUNCH(T)                                                                        \
  switch (vp) {                                                                                    \
    case 4: rope_kernel<T, 4><<<grid, kRopeThreads, smem, stream>>>(p); break;                   \
    case 2: rope_kernel<T, 2><<<grid, kRopeThreads, smem, stream>>>(p); break;                   \
    default: rope_kernel<T, 1><<<grid, kRopeThreads, smem, stream>>>(p); break;                  \
  }
  switch (q.scalar_type()) {
    case at::kFloat: VDIT_ROPE_LAUNCH(float) break;
    case at::kHalf: VDIT_ROPE_LAUNCH(c10::Half) break;
    case at::kBFloat16: VDIT_ROPE_LAUNCH(c10::BFloat16) break;
    default: TORCH_CHECK(false, "vdit_C rope: unsupported dtype ", q.scalar_type());
  }
#undef VDIT_ROPE_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> rope_3d_cuda(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& positions, c10::IntArrayRef dims,
                                                double theta, bool interleaved, bool inverse) {
  check_rope_args("vdit_C::rope_3d", q, k, positions, dims);
  at::Tensor qo = at::empty(q.sizes(), q.options());
  at::Tensor ko = at::empty(k.sizes(), k.options());
  rope_launch(q, k, qo, ko, positions, dims, theta, interleaved, inverse);
  return {qo, ko};
}

void rope_3d_inplace_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                          c10::IntArrayRef dims, double theta, bool interleaved, bool inverse) {
  check_rope_args("vdit_C::rope_3d_", q, k, positions, dims);
  // each element is read and written by the same thread, so in = out is safe
  rope_launch(q, k, q, k, positions, dims, theta, interleaved, inverse);
}

}  // namespace
}  // namespace vdit

TORCH_LIBRARY_IMPL(vdit_C, CUDA, m) {
  m.impl("rope_3d", &vdit::rope_3d_cuda);
  m.impl("rope_3d_", &vdit::rope_3d_inplace_cuda);
}
