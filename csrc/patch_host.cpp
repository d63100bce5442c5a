// Host side of the CUDA patchify / unpatchify (kernel: csrc/patch.cu): argument checks
// with clear errors, the per-video records and their launch (the plan itself, tokens
// per tile and access widths, is plan_patch in csrc/patch_tile.cuh), output allocation
// and the registered ops. Compiled by the host compiler;
// the .cu file throws nothing, so every error is raised from here.
//
// CPU tensors get the same argument checks, then an error saying the op needs CUDA
// tensors (the CPU registration below), so the checks run in CPU-only CI too.
// Outputs come from at::detail::empty_cuda, the CUDA factory itself: at::empty is a
// dispatcher call (0.34 us more a tensor, measured with the CPU factory), and unpatchify
// makes one per video.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/host_errors.h"
#include "patch.h"
#include "patch_ops.h"

namespace vdit {
namespace {

void check_dtype(const char* name, at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "vdit_C: ", name, " must be float32, float16 or bfloat16, got ", t);
}

std::vector<int64_t> check_patch_size(c10::IntArrayRef patch_size) {
  TORCH_CHECK(patch_size.size() == 3, "vdit_C: patch_size must be 3 ints (pt, ph, pw), got ",
              patch_size.size());
  // bounded, so that pt*ph*pw < 2^60 (features() bounds its product with C)
  for (auto s : patch_size)
    TORCH_CHECK(s > 0 && s < (1 << 20), "vdit_C: patch_size must be in [1, 2^20), got ", patch_size);
  return patch_size.vec();
}

// C * pt * ph * pw, the token width; refused past 2^62, where an int64 product of absurd
// arguments (a huge patch over an empty video divides it) would wrap.
int64_t features(int64_t channels, const std::vector<int64_t>& ps) {
  const double f = double(channels) * double(ps[0]) * double(ps[1]) * double(ps[2]);
  TORCH_CHECK(f < 0x1p62, "vdit_C: channels * pt * ph * pw = ", f, " is too large");
  return channels * ps[0] * ps[1] * ps[2];
}

// Plans a launch (csrc/patch_tile.cuh: plan_patch fills the records' first tiles and
// access widths) and runs it; the video tensors' data pointers and strides are read here
// (tokens: contiguous (N, F)).
void launch(bool to_tokens, std::vector<PatchVideo>& recs, const at::Tensor& tokens,
            int64_t channels, const std::vector<int64_t>& ps, at::ScalarType dtype,
            c10::Device device) {
  const int64_t pt = ps[0], ph = ps[1], pw = ps[2];
  TORCH_CHECK(channels > 0 && channels < (int64_t{1} << 31), "vdit_C: channels = ", channels, " is out of range");
  const int64_t F = channels * pt * ph * pw;
  const int64_t esize = dtype == at::kFloat ? 4 : 2;
  TORCH_CHECK(F < (1 << 30), "vdit_C: C*pt*ph*pw = ", F, " is too large");

  PatchParams p;
  std::memset(&p, 0, sizeof(p));
  p.tokens = tokens.data_ptr();
  const PatchPlan plan = plan_patch(recs.data(), static_cast<int>(recs.size()), channels, ps.data(), esize,
                                    p.tokens, p);
  TORCH_CHECK(plan.plain_stage_bytes <= kMaxStageBytes, "vdit_C: a patch of C*pt*ph*pw = ", F,
              " elements needs ", plan.plain_stage_bytes, " bytes of shared memory (limit ", kMaxStageBytes, ")");
  if (plan.tiles == 0) return;
  TORCH_CHECK(plan.tiles < (int64_t{1} << 31), "vdit_C: too many tiles (", plan.tiles, ") for one launch");

  c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  at::Tensor table;  // kept alive until the launch is enqueued; the copy is stream-ordered
  if (recs.size() <= static_cast<size_t>(kInlineVideos)) {
    std::copy(recs.begin(), recs.end(), p.videos);
  } else {
    // a graph would replay the copy from a pinned buffer that is freed and reused after
    // this call: refuse rather than replay stale records
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                "vdit_C: a pack of ", recs.size(), " videos (more than ", kInlineVideos,
                ") copies its launch table from host memory, which a CUDA graph cannot replay; "
                "capture packs of at most ", kInlineVideos, " videos, or use backend=\"triton\"");
    const int64_t bytes = static_cast<int64_t>(recs.size() * sizeof(PatchVideo));
    at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), recs.data(), bytes);
    table = host.to(device, /*non_blocking=*/true);  // H2D on the current stream
    p.table = reinterpret_cast<const PatchVideo*>(table.data_ptr());
  }

  C10_CUDA_CHECK(launch_patch_kernel(p, plan.tiles, static_cast<size_t>(plan.stage_bytes), to_tokens,
                                     static_cast<int>(esize), stream.stream()));
}

PatchVideo record(void* data, c10::IntArrayRef strides, int64_t t, int64_t h, int64_t w,
                  const std::vector<int64_t>& ps, int64_t token_begin) {
  // the kernel's token grids are int32 (one video of 2^31 tokens per axis would not fit memory anyway)
  TORCH_CHECK(t / ps[0] < (int64_t{1} << 31) && h / ps[1] < (int64_t{1} << 31) && w / ps[2] < (int64_t{1} << 31),
              "vdit_C: a video's token grid (", t / ps[0], ", ", h / ps[1], ", ", w / ps[2], ") exceeds int32");
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

}  // namespace

// vdit_C::patchify / unpatchify for every device: CPU tensors get every check, then the
// error saying the op needs CUDA tensors (so the checks run in CPU-only CI too).
at::Tensor patchify_tokens(at::TensorList videos, c10::IntArrayRef patch_size) {
  const auto ps = check_patchify_args(videos, patch_size);
  const at::Tensor& v0 = videos[0];
  if (!v0.is_cuda()) needs_cuda_tensors("vdit_C::patchify", v0.device());
  const int64_t channels = v0.size(0);
  std::vector<PatchVideo> recs;
  recs.reserve(videos.size());
  int64_t n = 0;
  for (size_t i = 0; i < videos.size(); ++i) {
    const at::Tensor& v = videos[i];
    recs.push_back(record(v.data_ptr(), v.strides(), v.size(1), v.size(2), v.size(3), ps, n));
    n += static_cast<int64_t>(recs.back().gt) * recs.back().gh * recs.back().gw;
  }
  const int64_t F = features(channels, ps);
  at::Tensor tokens = at::detail::empty_cuda({n, F}, v0.options());
  if (n > 0 && F > 0) launch(true, recs, tokens, channels, ps, v0.scalar_type(), v0.device());
  return tokens;
}

std::vector<at::Tensor> unpatchify_videos(const at::Tensor& tokens_in, c10::IntArrayRef shapes,
                                          c10::IntArrayRef patch_size, int64_t channels) {
  const auto ps = check_unpatchify_args(tokens_in, shapes, patch_size, channels);
  if (!tokens_in.is_cuda()) needs_cuda_tensors("vdit_C::unpatchify", tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous();  // a strided token matrix is copied once
  std::vector<at::Tensor> outs;
  std::vector<PatchVideo> recs;
  int64_t n = 0;
  for (size_t i = 0; i < shapes.size(); i += 3) {
    const int64_t t = shapes[i], h = shapes[i + 1], w = shapes[i + 2];
    at::Tensor out = at::detail::empty_cuda({channels, t, h, w}, tokens.options());
    recs.push_back(record(out.data_ptr(), out.strides(), t, h, w, ps, n));
    n += (t / ps[0]) * (h / ps[1]) * (w / ps[2]);
    outs.push_back(std::move(out));
  }
  if (n > 0 && channels > 0) launch(false, recs, tokens, channels, ps, tokens.scalar_type(), tokens.device());
  return outs;
}

// Declared in patch_ops.h: every check but where the tensors live.
std::vector<int64_t> check_patchify_args(at::TensorList videos, c10::IntArrayRef patch_size, bool kernel_dtypes) {
  const auto ps = check_patch_size(patch_size);
  TORCH_CHECK(!videos.empty(), "vdit_C::patchify: videos must hold at least one video");
  const at::Tensor& v0 = videos[0];
  TORCH_CHECK(v0.dim() == 4, "vdit_C::patchify: videos[0] must be (C, T, H, W), got ", v0.sizes());
  if (kernel_dtypes) check_dtype("videos", v0.scalar_type());
  const int64_t channels = v0.size(0);
  for (size_t i = 0; i < videos.size(); ++i) {
    const at::Tensor& v = videos[i];
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
  }
  return ps;
}

std::vector<int64_t> check_unpatchify_args(const at::Tensor& tokens_in, c10::IntArrayRef shapes,
                                           c10::IntArrayRef patch_size, int64_t channels, bool kernel_dtypes) {
  const auto ps = check_patch_size(patch_size);
  if (kernel_dtypes) check_dtype("tokens", tokens_in.scalar_type());
  // 0 channels is the gradient of 0-channel videos (patchify takes them: its tokens have 0 columns)
  TORCH_CHECK(channels >= 0 && channels < (int64_t{1} << 31), "vdit_C::unpatchify: channels must be in [0, 2^31), got ",
              channels);
  TORCH_CHECK(shapes.size() % 3 == 0, "vdit_C::unpatchify: shapes must be a flat list of (T, H, W) "
              "triples, got ", shapes.size(), " ints");
  const int64_t F = features(channels, ps);
  TORCH_CHECK(tokens_in.dim() == 2 && tokens_in.size(1) == F, "vdit_C::unpatchify: tokens must be "
              "(N, channels*pt*ph*pw = ", F, "), got ", tokens_in.sizes());
  int64_t n = 0;
  for (size_t i = 0; i < shapes.size(); i += 3) {
    const int64_t t = shapes[i], h = shapes[i + 1], w = shapes[i + 2];
    TORCH_CHECK(t >= 0 && h >= 0 && w >= 0 && t % ps[0] == 0 && h % ps[1] == 0 && w % ps[2] == 0,
                "vdit_C::unpatchify: shape ", i / 3, " (", t, ", ", h, ", ", w,
                ") is not divisible by patch_size ", patch_size);
    // (a count past int64 would wrap, e.g. to a 0-row match)
    int64_t grid = 0;
    TORCH_CHECK(!__builtin_mul_overflow(t / ps[0], h / ps[1], &grid) &&
                    !__builtin_mul_overflow(grid, w / ps[2], &grid) && !__builtin_add_overflow(n, grid, &n),
                "vdit_C::unpatchify: the shapes' token count overflows int64 at shape ", i / 3);
  }
  TORCH_CHECK(n == tokens_in.size(0), "vdit_C::unpatchify: tokens has ", tokens_in.size(0),
              " rows, the shapes make ", n, " tokens");
  return ps;
}

}  // namespace vdit

TORCH_LIBRARY_IMPL(vdit_C, CUDA, m) {
  m.impl("patchify", &vdit::patchify_tokens);
  m.impl("unpatchify", &vdit::unpatchify_videos);
}

TORCH_LIBRARY_IMPL(vdit_C, CPU, m) {
  m.impl("patchify", &vdit::patchify_tokens);
  m.impl("unpatchify", &vdit::unpatchify_videos);
}
