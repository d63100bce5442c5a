// Host side of the CUDA 3D RoPE (kernels: csrc/rope.cu): argument checks with clear
// errors, the launch of the tiled kernel (the default) or, under VDIT_ROPE_CUDA=shared or
// past the tiled kernel's head dims, the shared-table one (their plans, plan_rope and
// plan_rope_tiled, are in csrc/rope_tile.cuh), output allocation and the registered ops.
// Compiled by the host compiler; the .cu file throws nothing.
//
// CPU tensors get the same argument checks, then an error saying the op needs CUDA
// tensors (the CPU registration below), so the checks run in CPU-only CI too.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/host_errors.h"
#include "rope.h"
#include "rope_ops.h"

namespace vdit {
namespace {

// VDIT_ROPE_CUDA, read at every call (a benchmark switches it): "tiled" (the default:
// rope_tiled_kernel's first shape, csrc/rope_tile.cuh, for head_dim up to
// 2 * kRopeTiledMaxHalf, the shared-table kernel beyond), "tiled-heads" (its second
// shape) or "shared" (the kernel with shared-memory tables). The tiled shape, or none for
// the shared-table kernel. Tiled is the default since the H200 timed both (2026-11-28):
// the same device time on the mixed pack (301 against 298 us), 7% less on the train pack
// (2.46 against 2.62 ms), before its loads were all put in flight together (untimed).
std::optional<RopeTiling> rope_tiled_requested(const char* op) {
  const char* v = std::getenv("VDIT_ROPE_CUDA");
  const std::string s = v == nullptr ? "" : v;
  if (s.empty() || s == "tiled") return RopeTiling::kTiled;
  if (s == "tiled-heads") return RopeTiling::kTiledHeads;
  TORCH_CHECK_VALUE(s == "shared", op, ": VDIT_ROPE_CUDA must be \"shared\", \"tiled\" or "
                    "\"tiled-heads\" (or unset), got \"", s, "\"");
  return std::nullopt;
}

// Every argument check; the kernel VDIT_ROPE_CUDA asks for (read once a call, here, so a
// bad value fails on CPU tensors too).
std::optional<RopeTiling> check_rope_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& positions, c10::IntArrayRef dims, double theta) {
  // (the kernel computes theta^(-2j/d): 0, a negative or a non-finite base gives NaN or inf)
  TORCH_CHECK(std::isfinite(theta) && theta > 0, op, ": theta (the frequency base) must be a positive finite "
              "number, got ", theta);
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
  // before anything narrows head_dim / 2 to int32 (a huge one wrapped into the tiled kernel's range)
  TORCH_CHECK(q.size(2) <= kRopeMaxHeadDim, op, ": head_dim ", q.size(2), " is larger than the CUDA kernels take (",
              kRopeMaxHeadDim, ")");
  TORCH_CHECK(dims.size() == 3, op, ": dims must be 3 ints (dt, dh, dw), got ", dims.size());
  // each part at most head_dim first: their int64 sum could wrap and pass the check below
  for (auto d : dims)
    TORCH_CHECK(d >= 0 && d % 2 == 0 && d <= q.size(2), op, ": dims must be even, >= 0 and at most head_dim ",
                q.size(2), ", got ", dims);
  TORCH_CHECK(dims[0] + dims[1] + dims[2] == q.size(2), op, ": dims ", dims, " must sum to head_dim ",
              q.size(2));
  TORCH_CHECK(positions.scalar_type() == at::kFloat, op, ": positions must be float32, got ",
              positions.scalar_type());
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == q.size(0) && positions.size(1) == 3, op,
              ": positions must be (N=", q.size(0), ", 3), got ", positions.sizes());
  TORCH_CHECK(q.size(1) < (1 << 30) && k.size(1) < (1 << 30), op, ": too many heads");
  return rope_tiled_requested(op);
}

void rope_launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qo, const at::Tensor& ko,
                 const at::Tensor& positions_in, c10::IntArrayRef dims, double theta, bool interleaved,
                 bool inverse, std::optional<RopeTiling> tiling) {
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
  auto stream = c10::cuda::getCurrentCUDAStream(q.device().index());
  const RopeDtype dtype = q.scalar_type() == at::kFloat ? RopeDtype::kFloat32
                          : q.scalar_type() == at::kHalf ? RopeDtype::kFloat16
                                                         : RopeDtype::kBFloat16;

  if (tiling && p.half <= kRopeTiledMaxHalf) {
    RopeTiledParams tp;
    std::memset(&tp, 0, sizeof(tp));
    tp.base = p;
    // about 8 waves of the 4 CTAs an SM holds (the Triton kernel's grid)
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    // fills tok, head_groups, freq
    const RopeTiledPlan plan = plan_rope_tiled(tp, q.element_size(), 32 * sms, *tiling);
    TORCH_CHECK(plan.vp > 0, "vdit_C rope: no tiled plan for head_dim ", D);  // (half checked above)
    TORCH_CHECK(plan.blocks < (int64_t{1} << 31), "vdit_C rope: N = ", N, " is too large");
    C10_CUDA_CHECK(launch_rope_tiled_kernel(tp, dtype, *tiling, plan.vp, plan.blocks, plan.head_groups,
                                            stream.stream()));
    return;
  }

  const RopePlan plan = plan_rope(p, q.element_size());  // fills p.tok
  // (less kRopeThreads: the kernel's int32 loop index steps that far past the last unit)
  TORCH_CHECK(plan.units_per_token * p.tok < (int64_t{1} << 31) - kRopeThreads,
              "vdit_C rope: too many heads * head_dim");
  TORCH_CHECK(plan.blocks < (int64_t{1} << 31), "vdit_C rope: N = ", N, " is too large");
  TORCH_CHECK(plan.smem_bytes <= kRopeMaxSmemBytes, "vdit_C rope: head_dim ", D, " is too large");
  C10_CUDA_CHECK(launch_rope_kernel(p, dtype, plan.vp, plan.blocks, static_cast<size_t>(plan.smem_bytes),
                                    stream.stream()));
}

// Whether two indices of t might address one element (vdit_kernels.checks.may_overlap_itself,
// the same test): its dims of size > 1 sorted by stride, some stride not past the farthest
// offset the smaller ones reach. ATen's assert_no_internal_overlap passes every non-dense
// view, overlapping ones included.
bool may_overlap_itself(const at::Tensor& t) {
  if (t.numel() == 0) return false;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return true;
    reach += stride * (size - 1);
  }
  return false;
}

int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  return a / b - (a % b != 0 && a < 0);
}

// The addresses of the first and last byte of t's elements (t not empty).
std::pair<int64_t, int64_t> byte_range(const at::Tensor& t) {
  const auto first = static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr()));
  int64_t end = 0;
  for (int64_t d = 0; d < t.dim(); ++d) end += (t.size(d) - 1) * t.stride(d);
  return {first, first + (end + 1) * static_cast<int64_t>(t.element_size()) - 1};
}

// Whether two tensors' byte ranges (first to last element) meet.
bool bytes_meet(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto [alo, ahi] = byte_range(a);
  const auto [blo, bhi] = byte_range(b);
  return alo <= bhi && blo <= ahi;
}

// Whether q and k may address a common element: vdit_kernels.checks' _may_share_elements,
// the same test. By address, not storage: tensors over one memory may hold different
// storages (from_blob, DLPack). Exact for views with the same strides and element size and
// a unit last stride whatever their sizes (q and k sliced from one fused qkv buffer, with
// fewer kv heads under GQA): some index difference (e0, e1, e2), -(size_k - 1) <= e_i <=
// size_q - 1, must bridge their address difference. Otherwise whether their byte ranges
// intersect. (ATen's assert_no_overlap passes interleaved views of one buffer that share
// elements.)
bool may_share_elements(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto [alo, ahi] = byte_range(a);
  const auto [blo, bhi] = byte_range(b);
  if (ahi < blo || bhi < alo) return false;
  const int64_t size = static_cast<int64_t>(a.element_size()), bytes = blo - alo;
  if (a.strides() != b.strides() || a.dim() != 3 || b.dim() != 3 || a.stride(2) != 1 ||
      static_cast<int64_t>(b.element_size()) != size || bytes % size != 0)
    return true;
  const int64_t s0 = a.stride(0), s1 = a.stride(1), delta = bytes / size;
  const int64_t e0_lo = -(b.size(0) - 1), e0_hi = a.size(0) - 1;
  for (int64_t e1 = -(b.size(1) - 1); e1 < a.size(1); ++e1) {
    // e0 * s0 = delta - e1 * s1 - e2 with -(d_k - 1) <= e2 <= d_q - 1
    const int64_t lo = delta - e1 * s1 - (a.size(2) - 1), hi = delta - e1 * s1 + (b.size(2) - 1);
    if (s0 == 0) {  // (torch strides are never negative)
      if (lo <= 0 && 0 <= hi) return true;
    } else if (std::max(-floor_div(-lo, s0), e0_lo) <= std::min(floor_div(hi, s0), e0_hi)) {
      return true;
    }
  }
  return false;
}

// In place, an element reachable twice (a stride-0 or overlapping view, or q and k sharing
// memory) would be rotated twice by different threads. The same tests and messages as the
// Python layer's (vdit_kernels.checks.check_inplace_rope), which the cuda backend leaves
// to this function; a ValueError like it.
void check_no_overlap(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions) {
  auto check_self = [](const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(!may_overlap_itself(t), "vdit_C::rope_3d_: inplace RoPE: ", name, " (shape ", t.sizes(),
                      ", strides ", t.strides(), ") may address some elements more than once (an expanded, "
                      "stride-0 or overlapping view, or strides that interleave); use inplace=False");
  };
  check_self("q", q);
  check_self("k", k);
  TORCH_CHECK_VALUE(!may_share_elements(q, k), "vdit_C::rope_3d_: inplace RoPE: q and k may share elements (their "
                    "address ranges meet, and their layouts do not tell them apart), so a shared element would be "
                    "rotated twice; pass disjoint views with the same strides (e.g. qkv[:, 0] and qkv[:, 1]) or use "
                    "inplace=False");
  // the kernels read positions while other CTAs write q and k
  TORCH_CHECK_VALUE(!bytes_meet(positions, q) && !bytes_meet(positions, k), "vdit_C::rope_3d_: inplace RoPE: "
                    "positions share memory with q or k, which the rotation overwrites while other tokens still "
                    "read their positions; pass positions of their own (positions.clone()) or use inplace=False");
}

}  // namespace

// vdit_C::rope_3d / rope_3d_ for every device (declared in rope_ops.h for the direct calls):
// CPU tensors get every check, then the error saying the op needs CUDA tensors.
std::tuple<at::Tensor, at::Tensor> rope_3d_tokens(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& positions, c10::IntArrayRef dims, double theta,
                                                  bool interleaved, bool inverse) {
  const auto tiling = check_rope_args("vdit_C::rope_3d", q, k, positions, dims, theta);
  if (!q.is_cuda()) needs_cuda_tensors("vdit_C::rope_3d", q.device());
  at::Tensor qo = at::empty(q.sizes(), q.options());
  at::Tensor ko = at::empty(k.sizes(), k.options());
  rope_launch(q, k, qo, ko, positions, dims, theta, interleaved, inverse, tiling);
  return {qo, ko};
}

void rope_3d_in_place(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                      c10::IntArrayRef dims, double theta, bool interleaved, bool inverse) {
  const auto tiling = check_rope_args("vdit_C::rope_3d_", q, k, positions, dims, theta);
  check_no_overlap(q, k, positions);
  if (!q.is_cuda()) needs_cuda_tensors("vdit_C::rope_3d_", q.device());
  // each element is read and written by the same thread, so in = out is safe
  rope_launch(q, k, q, k, positions, dims, theta, interleaved, inverse, tiling);
}

}  // namespace vdit

TORCH_LIBRARY_IMPL(vdit_C, CUDA, m) {
  m.impl("rope_3d", &vdit::rope_3d_tokens);
  m.impl("rope_3d_", &vdit::rope_3d_in_place);
}

TORCH_LIBRARY_IMPL(vdit_C, CPU, m) {
  m.impl("rope_3d", &vdit::rope_3d_tokens);
  m.impl("rope_3d_", &vdit::rope_3d_in_place);
}
