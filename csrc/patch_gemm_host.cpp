// Patch embedding and the DiT output layer as our gather / scatter around ATen's GEMMs,
// forward and backward, with the autograd formula in C++ (CUDA builds; host compiler).
//
//   patch_embed:        out (N, hidden) = patchify(videos) @ W.flatten(1).T (+ b)
//   linear_unpatchify:  videos = unpatchify(x @ W.T (+ b))
//
// The same computation as the Triton backend's "gemm" variant (vdit_kernels/triton/patch.py),
// which the H100 picked over the fused Triton GEMMs on every pack measured. It is here, in
// C++, for host time: with a pack of 41k tokens the GPU work of patch embedding forward +
// backward is 0.35 ms, and the Python layers around the same kernels (the autograd.Function,
// its backward, the variant choice) cost the H100 machine's host over 1 ms a step, more than
// permute + nn.Linear's whole step. Registered with an Autograd kernel, the forward is one
// dispatcher call and the backward runs in the autograd engine without Python.
//
// Every tensor op below is an ATen op or our patch kernel (csrc/patch.cu), and the forward
// GEMMs cuBLASLt with kept plans (csrc/linear_gemm_host.cpp: ATen's addmm's host time was most
// of a 41k-token forward's wait on the H100's host). CPU tensors run the same code with
// ATen's copies in place of the kernel and ATen's GEMMs, so the formulas and the autograd
// wiring are tested without a GPU (tests/test_cuda_ext.py).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "linear_gemm.h"
#include "patch_ops.h"

namespace vdit {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::vector<int64_t> video_shapes(at::TensorList videos) {
  std::vector<int64_t> shapes;
  shapes.reserve(3 * videos.size());
  for (const auto& v : videos)
    for (int a = 1; a < 4; ++a) shapes.push_back(v.size(a));
  return shapes;
}

// patchify (N, C*pt*ph*pw): the CUDA kernel, or ATen's copies for CPU tensors (the same
// values: a gather copies, it rounds nothing).
at::Tensor gather(at::TensorList videos, c10::IntArrayRef ps) {
  if (videos[0].is_cuda()) return patchify_tokens(videos, ps);
  // what the CUDA op refuses (a patch size of 0 would divide by 0 below)
  check_patchify_args(videos, ps, /*kernel_dtypes=*/false);
  std::vector<at::Tensor> rows;
  rows.reserve(videos.size());
  for (const auto& v : videos) {
    const int64_t c = v.size(0), t = v.size(1), h = v.size(2), w = v.size(3);
    rows.push_back(v.reshape({c, t / ps[0], ps[0], h / ps[1], ps[1], w / ps[2], ps[2]})
                       .permute({1, 3, 5, 0, 2, 4, 6})
                       .reshape({(t / ps[0]) * (h / ps[1]) * (w / ps[2]), c * ps[0] * ps[1] * ps[2]}));  // (not -1: C may be 0)
  }
  return at::cat(rows);
}

// unpatchify: fresh contiguous (C, T, H, W) videos from contiguous (N, F) tokens.
std::vector<at::Tensor> scatter(const at::Tensor& tokens, c10::IntArrayRef shapes, c10::IntArrayRef ps,
                                int64_t channels) {
  if (tokens.is_cuda()) return unpatchify_videos(tokens, shapes, ps, channels);
  // what the CUDA op refuses (shapes that do not make tokens' rows, a patch size of 0)
  check_unpatchify_args(tokens, shapes, ps, channels, /*kernel_dtypes=*/false);
  std::vector<at::Tensor> videos;
  int64_t row = 0;
  for (size_t i = 0; i < shapes.size(); i += 3) {
    const int64_t gt = shapes[i] / ps[0], gh = shapes[i + 1] / ps[1], gw = shapes[i + 2] / ps[2];
    // copied into a new tensor: .contiguous() of a permute that moves nothing (a one-token
    // video) returned a view into tokens, where the op promises fresh videos
    at::Tensor video = at::empty({channels, shapes[i], shapes[i + 1], shapes[i + 2]}, tokens.options());
    video.view({channels, gt, ps[0], gh, ps[1], gw, ps[2]})
        .copy_(tokens.narrow(0, row, gt * gh * gw)
                   .reshape({gt, gh, gw, channels, ps[0], ps[1], ps[2]})
                   .permute({3, 0, 4, 1, 5, 2, 6}));
    videos.push_back(video);
    row += gt * gh * gw;
  }
  return videos;
}

void check_embed_args(at::TensorList videos, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(!videos.empty(), "vdit_C::patch_embed: videos must hold at least one video");
  TORCH_CHECK(weight.dim() == 5, "vdit_C::patch_embed: weight must be (hidden, C, pt, ph, pw), got ",
              weight.sizes());
  for (int a = 2; a < 5; ++a)  // (before the divisibility checks below divide by them)
    TORCH_CHECK(weight.size(a) > 0, "vdit_C::patch_embed: the weight's kernel (pt, ph, pw) must be positive, got ",
                weight.sizes().slice(2));
  TORCH_CHECK(videos[0].dim() == 4 && videos[0].size(0) == weight.size(1), "vdit_C::patch_embed: weight expects ",
              weight.size(1), " channels, videos[0] has shape ", videos[0].sizes());
  for (size_t i = 0; i < videos.size(); ++i) {
    const at::Tensor& v = videos[i];
    TORCH_CHECK(v.dim() == 4 && v.size(0) == weight.size(1) && v.scalar_type() == videos[0].scalar_type() &&
                v.device() == videos[0].device(), "vdit_C::patch_embed: videos[", i, "] must be (C=", weight.size(1),
                ", T, H, W) in videos[0]'s dtype and device, got ", v.sizes(), " ", v.scalar_type(), " ", v.device());
    for (int a = 0; a < 3; ++a)
      TORCH_CHECK(v.size(a + 1) % weight.size(a + 2) == 0, "vdit_C::patch_embed: videos[", i, "] has shape ",
                  v.sizes(), ", not divisible by the weight's kernel ", weight.sizes().slice(2));
  }
  TORCH_CHECK(weight.scalar_type() == videos[0].scalar_type() && weight.device() == videos[0].device(),
              "vdit_C::patch_embed: weight (", weight.scalar_type(), ", ", weight.device(),
              ") must match the videos (", videos[0].scalar_type(), ", ", videos[0].device(), ")");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "vdit_C::patch_embed: bias must be (",
                weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type() && bias->device() == weight.device(),
                "vdit_C::patch_embed: bias (", bias->scalar_type(), ", ", bias->device(), ") must match weight");
  }
}

// -- patch_embed --------------------------------------------------------------------------

at::Tensor patch_embed(at::TensorList videos, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_embed_args(videos, weight, bias);
  const at::Tensor w = weight.flatten(1).contiguous();            // (hidden, F) (hidden may be 0: no -1)
  const at::Tensor a = gather(videos, weight.sizes().slice(2));  // (N, F)
  return linear_forward(a, w, bias);
}

// grad (N, hidden) -> grad videos, grad weight, grad bias (an empty tensor without bias).
// grad^T @ [A | 1 ...] gives dW and, as its column F, db in one pass over grad (a column
// sum of the 250 MB gradient alone costs the H100 as long as the GEMM); 8 columns of ones
// keep A's rows 16 bytes apart (columns F+1.. are db again, unused). The ones are made per
// call (a 16-byte fill, captured by a CUDA graph like any other kernel). dX = unpatchify(grad @ W). Parts whose flag is
// false come back undefined (the autograd formula skips gradients nobody asked for).
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> embed_backward(
    const at::Tensor& grad_in, at::TensorList videos, const at::Tensor& weight, bool with_bias, bool need_x,
    bool need_w) {
  check_embed_args(videos, weight, std::nullopt);
  const auto ps = weight.sizes().slice(2);
  const int64_t f = weight.size(1) * ps[0] * ps[1] * ps[2];  // (not numel / hidden: hidden may be 0)
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(1) == weight.size(0), "vdit_C::patch_embed_backward: grad must be "
              "(N, hidden=", weight.size(0), "), got ", grad_in.sizes());
  const at::Tensor grad = grad_in.to(videos[0].scalar_type()).contiguous();
  const at::Tensor w = weight.flatten(1).contiguous();
  std::vector<at::Tensor> gx;
  at::Tensor gw, gb;
  if (need_w || with_bias) {
    at::Tensor a = gather(videos, ps);
    if (with_bias) {
      a = at::cat({a, at::ones({1, 8}, a.options()).expand({a.size(0), 8})}, 1);
      const at::Tensor gwb = at::mm(grad.t(), a);  // (hidden, F + 8)
      gw = gwb.narrow(1, 0, f).contiguous();
      gb = gwb.select(1, f).contiguous();
    } else {
      gw = at::mm(grad.t(), a);
    }
    gw = gw.reshape(weight.sizes()).to(weight.scalar_type());
    gb = with_bias ? gb.to(weight.scalar_type()) : weight.new_empty({0});
  }
  if (need_x) gx = scatter(at::mm(grad, w), video_shapes(videos), ps, videos[0].size(0));
  return {gx, gw, gb};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> patch_embed_backward(
    const at::Tensor& grad, at::TensorList videos, const at::Tensor& weight, bool with_bias) {
  return embed_backward(grad, videos, weight, with_bias, true, true);
}

// -- linear_unpatchify --------------------------------------------------------------------

void check_unembed_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && weight.size(1) == x.size(1),
              "vdit_C::linear_unpatchify: x (N, hidden) and weight (F, hidden) expected, got ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
              "vdit_C::linear_unpatchify: weight (", weight.scalar_type(), ", ", weight.device(),
              ") must match x (", x.scalar_type(), ", ", x.device(), ")");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "vdit_C::linear_unpatchify: bias must be (",
                weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "vdit_C::linear_unpatchify: bias (", bias->scalar_type(), ", ", bias->device(), ") must match x");
  }
}

std::vector<at::Tensor> linear_unpatchify(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias, c10::IntArrayRef shapes,
                                          c10::IntArrayRef patch_size, int64_t channels) {
  check_unembed_args(x, weight, bias);
  const at::Tensor y = linear_forward(x, weight, bias);
  return scatter(y, shapes, patch_size, channels);
}

// grad videos -> grad x, grad weight, grad bias (empty without bias): gy = patchify(grad),
// (N, F), is small (F columns against hidden), so PyTorch's GEMMs take it as it is.
std::tuple<at::Tensor, at::Tensor, at::Tensor> unembed_backward(at::TensorList grad_videos, const at::Tensor& x,
                                                                const at::Tensor& weight, c10::IntArrayRef patch_size,
                                                                bool with_bias, bool need_x, bool need_w) {
  check_unembed_args(x, weight, std::nullopt);
  TORCH_CHECK(!grad_videos.empty(), "vdit_C::linear_unpatchify_backward: no video gradients");
  std::vector<at::Tensor> grads;
  grads.reserve(grad_videos.size());
  for (const auto& g : grad_videos) grads.push_back(g.to(x.scalar_type()).contiguous());
  const at::Tensor gy = gather(grads, patch_size);
  TORCH_CHECK(gy.size(0) == x.size(0) && gy.size(1) == weight.size(0), "vdit_C::linear_unpatchify_backward: the "
              "video gradients make ", gy.sizes(), " tokens x features, x and weight ask for (", x.size(0), ", ",
              weight.size(0), ")");
  at::Tensor gx, gw, gb;
  if (need_x) gx = at::mm(gy, weight);
  if (need_w) gw = at::mm(gy.t(), x).to(weight.scalar_type()).contiguous();
  // the bias gradient summed in float32 for 16-bit gradients, in their own dtype otherwise
  const auto sum_dtype = at::isReducedFloatingType(gy.scalar_type()) ? at::kFloat : gy.scalar_type();
  gb = with_bias ? gy.sum(0, /*keepdim=*/false, sum_dtype).to(weight.scalar_type()) : weight.new_empty({0});
  return {gx, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_unpatchify_backward(at::TensorList grad_videos,
                                                                          const at::Tensor& x,
                                                                          const at::Tensor& weight,
                                                                          c10::IntArrayRef patch_size,
                                                                          bool with_bias) {
  return unembed_backward(grad_videos, x, weight, patch_size, with_bias, true, true);
}

// -- autograd ----------------------------------------------------------------------------

// A backward's results with create_graph=True: computed as usual, and a second backward
// through them raises (the Python ops raise there too: their backward ops have no formula)
// instead of returning zeros. (Arguments as TensorList: the Function counts the tensors of a
// TensorList as its inputs, those of a std::vector not.)
struct OnceDifferentiable : public torch::autograd::Function<OnceDifferentiable> {
  static variable_list forward(AutogradContext*, at::TensorList results, at::TensorList inputs) {
    (void)inputs;  // the tensors the results depend on: their edges make the error reachable
    variable_list out;
    out.reserve(results.size());
    for (const auto& r : results) out.push_back(r.view_as(r));  // an output of this node
    return out;
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "vdit_C: patch_embed and linear_unpatchify are differentiable once: their backward "
                "has no gradient formula (double backward)");
  }
};

variable_list once(variable_list results, const variable_list& inputs) {
  if (!at::GradMode::is_enabled()) return results;  // the usual backward (create_graph=False)
  variable_list defined, inputs_defined;
  for (const auto& r : results)
    if (r.defined()) defined.push_back(r);
  for (const auto& t : inputs)
    if (t.defined()) inputs_defined.push_back(t);
  variable_list wrapped = OnceDifferentiable::apply(at::TensorList(defined), at::TensorList(inputs_defined));
  size_t next = 0;
  for (auto& r : results)
    if (r.defined()) r = wrapped[next++];
  return results;
}

struct PatchEmbedFunction : public torch::autograd::Function<PatchEmbedFunction> {
  static at::Tensor forward(AutogradContext* ctx, at::TensorList videos, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out = patch_embed(videos, weight, bias);
    variable_list saved(videos.begin(), videos.end());
    saved.push_back(weight);
    ctx->save_for_backward(saved);
    ctx->saved_data["with_bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();
    const at::Tensor weight = saved.back();
    saved.pop_back();
    const size_t b = saved.size();
    const bool with_bias = ctx->saved_data["with_bias"].toBool();
    bool need_x = false;
    for (size_t i = 0; i < b; ++i) need_x = need_x || ctx->needs_input_grad(i);
    const bool need_w = ctx->needs_input_grad(b);
    auto [gx, gw, gb] = embed_backward(grads[0], saved, weight, with_bias, need_x, need_w);
    variable_list out = need_x ? variable_list(gx.begin(), gx.end()) : variable_list(b);
    out.push_back(gw);
    out.push_back(with_bias ? gb : at::Tensor());
    variable_list inputs(saved);
    inputs.push_back(weight);
    inputs.push_back(grads[0]);
    return once(std::move(out), inputs);
  }
};

struct LinearUnpatchifyFunction : public torch::autograd::Function<LinearUnpatchifyFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, c10::IntArrayRef shapes,
                               c10::IntArrayRef patch_size, int64_t channels) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto videos = linear_unpatchify(x, weight, bias, shapes, patch_size, channels);
    ctx->save_for_backward({x, weight});
    ctx->saved_data["with_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["patch_size"] = patch_size.vec();
    return videos;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const bool with_bias = ctx->saved_data["with_bias"].toBool();
    const auto patch_size = ctx->saved_data["patch_size"].toIntVector();
    auto [gx, gw, gb] = unembed_backward(grads, saved[0], saved[1], patch_size, with_bias,
                                         ctx->needs_input_grad(0), ctx->needs_input_grad(1));
    variable_list inputs(saved);
    inputs.insert(inputs.end(), grads.begin(), grads.end());
    variable_list out = once({gx, gw, with_bias ? gb : at::Tensor()}, inputs);
    out.resize(6);  // shapes, patch_size, channels: no gradient
    return out;
  }
};

}  // namespace

at::Tensor patch_embed_autograd(at::TensorList videos, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  return PatchEmbedFunction::apply(videos, weight, bias);
}

std::vector<at::Tensor> linear_unpatchify_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, c10::IntArrayRef shapes,
                                                   c10::IntArrayRef patch_size, int64_t channels) {
  return LinearUnpatchifyFunction::apply(x, weight, bias, shapes, patch_size, channels);
}

}  // namespace vdit

// Device-generic bodies (CPU: ATen copies for the gather), the autograd formula on top.
TORCH_LIBRARY_IMPL(vdit_C, CompositeExplicitAutograd, m) {
  m.impl("patch_embed", &vdit::patch_embed);
  m.impl("patch_embed_backward", &vdit::patch_embed_backward);
  m.impl("linear_unpatchify", &vdit::linear_unpatchify);
  m.impl("linear_unpatchify_backward", &vdit::linear_unpatchify_backward);
}

TORCH_LIBRARY_IMPL(vdit_C, Autograd, m) {
  m.impl("patch_embed", &vdit::patch_embed_autograd);
  m.impl("linear_unpatchify", &vdit::linear_unpatchify_autograd);
}
