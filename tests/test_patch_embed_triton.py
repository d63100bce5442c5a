"""Triton patch_embed / linear_unpatchify (fused GEMMs) against the reference backend.

Forward and backward (through autograd of the public API). float32 is compared tightly;
float16 by flash-attention's rule (conftest.assert_matmul_rule): the Triton error
against a float32 reference must be at most 2x PyTorch's own float16 error. bfloat16
only on a GPU (conftest.DOT_DTYPES). Runs under the Triton interpreter without a GPU,
so the spatial sizes stay tiny.
"""
import random

import pytest
import torch

import vdit_kernels as vk
from conftest import DEVICE, DOT_DTYPES, OutOfSharedMemory, assert_matmul_rule, assert_verbose_close, random_videos

PACKS = {
    "mixed": [(2, 4, 6), (1, 2, 2), (4, 2, 4)],
    "one_frame": [(2, 2, 4), (1, 4, 2)],
    "grid_1x1": [(2, 2, 2), (2, 4, 6)],
    "sixteen": [(2, 2, 2) if i % 3 else (2, 2, 4) for i in range(16)],
    "one_video": [(3, 4, 6)],
}


def _pack(shapes, patch_size):
    pt = patch_size[0]
    shapes = [(max(pt, t - t % pt), h, w) for t, h, w in shapes]
    return vk.VideoPack.from_shapes(shapes, patch_size, device=DEVICE)


def _rand(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _compare(actual, same_dtype, fp32_ref, name):
    if actual.dtype == torch.float32:
        assert_verbose_close(actual, fp32_ref.to(actual.dtype), atol=1e-4, rtol=1e-4, name=name)
    else:
        assert actual.dtype == same_dtype.dtype
        assert_matmul_rule(actual, same_dtype, fp32_ref, name=name)


def _patchify_torch(videos, pack):
    """patchify in plain PyTorch (any dtype), for the same-dtype PyTorch baseline."""
    pt, ph, pw = pack.patch_size
    rows = []
    for v in videos:
        c, t, h, w = v.shape
        x = v.reshape(c, t // pt, pt, h // ph, ph, w // pw, pw).permute(1, 3, 5, 0, 2, 4, 6)
        rows.append(x.reshape(-1, c * pt * ph * pw))
    return torch.cat(rows)


def _unpatchify_torch(y, pack, c):
    pt, ph, pw = pack.patch_size
    out, start = [], 0
    for t, h, w in pack.shapes:
        n = (t // pt) * (h // ph) * (w // pw)
        x = y[start:start + n].reshape(t // pt, h // ph, w // pw, c, pt, ph, pw)
        out.append(x.permute(3, 0, 4, 1, 5, 2, 6).reshape(c, t, h, w))
        start += n
    return out


def _embed_grads(fn, videos, w, b, grad):
    vids = [_leaf(v) for v in videos]
    wl = _leaf(w)
    bl = _leaf(b) if b is not None else None
    out = fn(vids, wl, bl)
    leaves = vids + [wl] + ([bl] if bl is not None else [])
    return out.detach(), torch.autograd.grad(out, leaves, grad)


def check_patch_embed(pack, channels, hidden, dtype, bias=True, noncontig=False, seed=0):
    pt, ph, pw = pack.patch_size
    videos = random_videos(pack, channels, dtype, seed=seed)
    if noncontig:  # same values, non-contiguous storage: (T, C, H, W) buffers viewed as (C, T, H, W)
        videos = [v.transpose(0, 1).contiguous().transpose(0, 1) for v in videos]
        assert not videos[0].is_contiguous()
    scale = (channels * pt * ph * pw) ** -0.5
    w = _rand(hidden, channels, pt, ph, pw, dtype=dtype, seed=seed + 1, scale=scale)
    b = _rand(hidden, dtype=dtype, seed=seed + 2) if bias else None
    grad = _rand(pack.num_tokens, hidden, dtype=dtype, seed=seed + 3)

    def api(backend):
        return lambda v, w_, b_: vk.patch_embed(v, pack, w_, b_, backend=backend)

    out, grads = _embed_grads(api("triton"), videos, w, b, grad)
    f32 = lambda t: t.float() if t is not None else None  # noqa: E731
    ref_out, ref_grads = _embed_grads(api("reference"), [v.float() for v in videos], f32(w), f32(b),
                                      grad.float())

    def torch_same(v, w_, b_):
        y = _patchify_torch(v, pack) @ w_.flatten(1).t()
        return y + b_ if b_ is not None else y

    same_out, same_grads = _embed_grads(torch_same, videos, w, b, grad)
    assert out.dtype == dtype and out.shape == (pack.num_tokens, hidden)
    _compare(out, same_out, ref_out, "patch_embed")
    names = [f"grad_video{i}" for i in range(len(videos))] + ["grad_weight", "grad_bias"]
    assert len(grads) == len(ref_grads)
    for name, g, s, r in zip(names, grads, same_grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape
        _compare(g, s, r, name)


def check_linear_unpatchify(pack, channels, hidden, dtype, bias=True, noncontig_x=False, seed=0):
    pt, ph, pw = pack.patch_size
    f = channels * pt * ph * pw
    x = _rand(pack.num_tokens, hidden, dtype=dtype, seed=seed)
    if noncontig_x:
        x = _rand(hidden, pack.num_tokens, dtype=dtype, seed=seed).t()
    w = _rand(f, hidden, dtype=dtype, seed=seed + 1, scale=hidden ** -0.5)
    b = _rand(f, dtype=dtype, seed=seed + 2) if bias else None
    grads_out = random_videos(pack, channels, dtype, seed=seed + 3)

    def run(fn, x_, w_, b_, gs):
        xl, wl = _leaf(x_), _leaf(w_)
        bl = _leaf(b_) if b_ is not None else None
        outs = fn(xl, wl, bl)
        leaves = [xl, wl] + ([bl] if bl is not None else [])
        return [o.detach() for o in outs], torch.autograd.grad(outs, leaves, gs)

    def api(backend):
        return lambda x_, w_, b_: vk.linear_unpatchify(x_, pack, w_, b_, channels, backend=backend)

    def torch_same(x_, w_, b_):
        y = x_ @ w_.t()
        return _unpatchify_torch(y + b_ if b_ is not None else y, pack, channels)

    f32 = lambda t: t.float() if t is not None else None  # noqa: E731
    outs, grads = run(api("triton"), x, w, b, grads_out)
    ref_outs, ref_grads = run(api("reference"), x.float(), w.float(), f32(b), [g.float() for g in grads_out])
    same_outs, same_grads = run(torch_same, x, w, b, grads_out)
    assert len(outs) == len(pack.shapes)
    for i, (o, s, r) in enumerate(zip(outs, same_outs, ref_outs)):
        assert o.dtype == dtype and o.is_contiguous() and o.shape == r.shape
        _compare(o, s, r, f"video{i}")
    for name, g, s, r in zip(["grad_x", "grad_weight", "grad_bias"], grads, same_grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape
        _compare(g, s, r, name)


# the two ops with a fused and a gemm variant: (check, their variables' prefix, the
# measured choices' caches, what each variant calls, a measured_choices() line of hidden 40)
VARIANT_OPS = {
    "patch_embed": (check_patch_embed, "VDIT_PATCH_EMBED", ("_EMBED_FWD_CHOICE", "_EMBED_BWD_CHOICE"),
                    {"fused": ["_gather_gemm", "_scatter_gemm", "_wgrad"],
                     "gemm": ["_copies", "_embed_backward_gemm", "_copies"]},
                    "patch_embed backward hidden=40 F=16"),
    "linear_unpatchify": (check_linear_unpatchify, "VDIT_LINEAR_UNPATCHIFY",
                          ("_UNEMBED_FWD_CHOICE", "_UNEMBED_BWD_CHOICE"),
                          {"fused": ["_scatter_gemm", "_gather_gemm", "_wgrad"], "gemm": ["_copies", "_copies"]},
                          "linear_unpatchify backward hidden=40 F=16"),
}


@pytest.mark.parametrize("op", VARIANT_OPS)
@pytest.mark.parametrize("variant", ["fused", "gemm"])
@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("patch_size", [(1, 2, 2), (2, 2, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_dtypes(monkeypatch, op, variant, dtype, patch_size, bias):
    # both variants, forward and backward (vdit_kernels.triton.patch.EMBED_VARIANTS)
    check, env = VARIANT_OPS[op][:2]
    monkeypatch.setenv(env + "_FWD", variant)
    monkeypatch.setenv(env + "_BWD", variant)
    check(_pack(PACKS["mixed"], patch_size), 4, 40, dtype, bias=bias)


@pytest.mark.parametrize("op", VARIANT_OPS)
@pytest.mark.parametrize("variant", ["fused", "gemm"])
def test_variant_runs_what_it_names(monkeypatch, op, variant):
    import vdit_kernels.triton.patch as tp

    check, env, _, expected, _ = VARIANT_OPS[op]
    calls = []
    for name in ("_gather_gemm", "_scatter_gemm", "_wgrad", "_embed_backward_gemm", "_copies"):
        real = getattr(tp, name)
        monkeypatch.setattr(tp, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    monkeypatch.setenv(env + "_FWD", variant)
    monkeypatch.setenv(env + "_BWD", variant)
    check(_pack(PACKS["mixed"], (1, 2, 2)), 4, 40, torch.float32)
    assert calls == expected[variant]


@pytest.mark.parametrize("op", VARIANT_OPS)
def test_auto_times_the_variants_once_per_key(monkeypatch, op):
    # "auto" where it may measure (a GPU, half precision): the first call of a key times
    # both variants and keeps the faster; calls of other hidden sizes or token classes time
    # again. Here the timing is a stand-in that names "gemm" (the real one needs a GPU)
    import vdit_kernels.triton as T
    import vdit_kernels.triton.patch as tp

    check, env, caches, expected, line = VARIANT_OPS[op]
    timed = []

    def fake_fastest(what, runs):
        # (patch_embed's forward also has "fused-tma" where its output rows are 16-byte aligned)
        assert set(runs) == ({"fused", "gemm", "fused-tma"} if what == "patch_embed forward" else {"fused", "gemm"})
        timed.append(what)
        return "gemm"
    monkeypatch.setattr(T, "fastest", fake_fastest)
    monkeypatch.setattr(T, "can_measure", lambda t: True)
    for cache in caches:
        monkeypatch.setattr(tp, cache, {})
    copies = []
    real = tp._copies
    monkeypatch.setattr(tp, "_copies", lambda *a: copies.append(1) or real(*a))
    for suffix in ("_FWD", "_BWD"):
        monkeypatch.delenv(env + suffix, raising=False)
    pack = _pack(PACKS["mixed"], (1, 2, 2))
    check(pack, 4, 40, torch.float32)
    check(pack, 4, 40, torch.float32, seed=1)
    assert timed == [f"{op} forward", f"{op} backward"]
    assert len(copies) == 2 * expected["gemm"].count("_copies")  # both calls ran gemm, both ways
    check(pack, 4, 24, torch.float32)  # another hidden size: timed again
    assert len(timed) == 4
    assert any(line in choice and ": gemm" in choice for choice in tp.measured_choices())
    monkeypatch.setenv(env + "_BWD", "turbo")
    with pytest.raises(ValueError, match=f"{env}_BWD must be one of"):
        check(pack, 4, 40, torch.float32)


@pytest.mark.parametrize("variant", ["fused", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name,channels,hidden", [
    ("one_frame", 16, 24), ("grid_1x1", 16, 72), ("sixteen", 4, 24), ("mixed", 48, 24), ("one_video", 16, 40),
    ("mixed", 4, 13),  # hidden 13: output rows not 16-byte aligned
])
def test_packs_channels_hidden(monkeypatch, name, channels, hidden, dtype, variant):
    for check, env, *_ in VARIANT_OPS.values():
        monkeypatch.setenv(env + "_FWD", variant)
        monkeypatch.setenv(env + "_BWD", variant)
    shapes = [(1, 2, 2), (2, 2, 4)] if channels == 48 else PACKS[name]  # tiny spatial for C=48
    pack = _pack(shapes, (1, 2, 2))
    check_patch_embed(pack, channels, hidden, dtype, seed=channels)
    check_linear_unpatchify(pack, channels, hidden, dtype, seed=channels)


# packs with whole token blocks (16 tokens under the interpreter, 128 on a GPU) and partial
# ones: two whole blocks, a lone token, a video of exactly one block; and 1 1/8 + 3/4 blocks
TMA_PACKS = ({"whole_and_partial": [(4, 4, 8), (1, 2, 2), (2, 8, 4)], "one_partial_each": [(3, 4, 6), (2, 4, 6)]}
             if DEVICE.type != "cuda" else
             {"whole_and_partial": [(4, 16, 16), (1, 2, 2), (2, 16, 16)], "one_partial_each": [(1, 24, 24), (2, 8, 24)]})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name,channels,hidden", [
    ("whole_and_partial", 4, 40),  # 40 columns: a 32-column step, then 8 (the descriptor clips the rest)
    ("whole_and_partial", 16, 64), ("one_partial_each", 4, 24),
    ("whole_and_partial", 4, 13),  # rows of 26 / 52 bytes: no descriptor, "fused" stores through pointers
])
def test_fused_tma_forward(monkeypatch, name, channels, hidden, dtype):
    # patch_embed's "fused-tma" forward: whole token blocks stored through a TMA descriptor,
    # each video's partial last block through pointers (masked: its rows past the video
    # are the next video's); where the output rows are not 16-byte aligned the variant
    # cannot run and "fused" does
    import vdit_kernels.triton.patch as tp

    launched = []
    monkeypatch.setattr(tp, "_embed_kernel", OutOfSharedMemory(tp._embed_kernel, lambda kw: False,
                                                               lambda kw: kw["TMA_STORE"], launched))
    monkeypatch.setenv("VDIT_PATCH_EMBED_FWD", "fused-tma")
    monkeypatch.setenv("VDIT_PATCH_EMBED_BWD", "fused")
    if DEVICE.type == "cuda" and dtype == torch.float32:  # float32 on a GPU: the K-looping gather GEMM
        pytest.skip("float32 on a GPU takes the gather GEMM (no TMA stores)")
    check_patch_embed(_pack(TMA_PACKS[name], (1, 2, 2)), channels, hidden, dtype, seed=hidden)
    aligned = hidden * dtype.itemsize % 16 == 0
    tma = DEVICE.type != "cuda" or torch.cuda.get_device_capability()[0] >= 9
    assert launched == [aligned and tma]


def test_wide_features_patch_222_c48_fp16():
    # F = 48 * 8 = 384: several K blocks in the forward GEMM, several F tiles elsewhere
    pack = _pack([(2, 2, 2), (2, 2, 4)], (2, 2, 2))
    check_patch_embed(pack, 48, 24, torch.float16)
    check_linear_unpatchify(pack, 48, 24, torch.float16)


def test_non_contiguous_inputs():
    pack = _pack(PACKS["mixed"], (1, 2, 2))
    check_patch_embed(pack, 4, 24, torch.float32, noncontig=True)
    check_patch_embed(pack, 4, 24, torch.float16, noncontig=True, bias=False)
    check_linear_unpatchify(pack, 4, 24, torch.float32, noncontig_x=True)


@pytest.mark.parametrize("variant", ["fused", "gemm"])
def test_strided_weight_and_bias(variant, monkeypatch):
    # a bias and a weight that are views with gaps (columns of wider buffers): the fused
    # kernels once read bias[n] at bias_ptr + n, i.e. every second value here
    monkeypatch.setenv("VDIT_PATCH_EMBED_FWD", variant)
    monkeypatch.setenv("VDIT_LINEAR_UNPATCHIFY_FWD", variant)
    pack = _pack(PACKS["mixed"], (1, 2, 2))
    videos = random_videos(pack, 4, torch.float32, seed=0)
    wide_b = _rand(24, 3, dtype=torch.float32, seed=1).requires_grad_(True)
    wide_w = _rand(24, 4, 1, 2, 4, dtype=torch.float32, seed=2, scale=0.25).requires_grad_(True)
    w, b = wide_w[..., :2], wide_b[:, 1]
    assert not (w.is_contiguous() or b.is_contiguous())
    outs = {be: vk.patch_embed(videos, pack, w, b, backend=be) for be in ("triton", "reference")}
    torch.testing.assert_close(outs["triton"], outs["reference"], atol=1e-5, rtol=1e-5)
    grads = {be: torch.autograd.grad(outs[be].sum(), [wide_w, wide_b]) for be in outs}
    for g, r in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-5)

    x = _rand(pack.num_tokens, 24, dtype=torch.float32, seed=3)
    wl = _rand(16, 48, dtype=torch.float32, seed=4, scale=0.2)[:, ::2]  # (16, 24), column stride 2
    bl = wide_b[:16, 2].detach()  # stride 3
    outs = {be: vk.linear_unpatchify(x, pack, wl, bl, 4, backend=be) for be in ("triton", "reference")}
    for a, r in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["fused", "gemm"])
def test_zero_width_products_keep_the_bias_gradient(variant, monkeypatch):
    # hidden = 0 (linear_unpatchify) or no channels (patch_embed): the products are empty,
    # but the bias gradient is a sum over the tokens of the other operand (the fused
    # weight-gradient path returned zeros for it)
    monkeypatch.setenv("VDIT_PATCH_EMBED_BWD", variant)
    monkeypatch.setenv("VDIT_LINEAR_UNPATCHIFY_BWD", variant)
    pack = _pack(PACKS["mixed"], (1, 2, 2))
    grads = {}
    for backend in ("triton", "reference"):
        x = torch.zeros(pack.num_tokens, 0, device=DEVICE, requires_grad=True)
        w = torch.zeros(8, 0, device=DEVICE, requires_grad=True)
        b = torch.arange(8.0, device=DEVICE, requires_grad=True)
        outs = vk.linear_unpatchify(x, pack, w, b, 2, backend=backend)
        loss = sum((o * (i + 1)).sum() for i, o in enumerate(outs))
        videos = [torch.zeros(0, *s, device=DEVICE, requires_grad=True) for s in pack.shapes]
        we = torch.zeros(5, 0, 1, 2, 2, device=DEVICE, requires_grad=True)
        be = torch.zeros(5, device=DEVICE, requires_grad=True)
        y = vk.patch_embed(videos, pack, we, be, backend=backend)
        loss = loss + (y * torch.arange(y.numel(), device=DEVICE).view_as(y)).sum()
        grads[backend] = torch.autograd.grad(loss, [b, be])
    for g, r in zip(grads["triton"], grads["reference"]):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("variant", ["fused", "gemm"])
def test_bias_gradients_near_the_float32_limit(variant, monkeypatch):
    # bias gradients up to 3e37 (float32 holds 3.4e38): the fused weight-gradient kernel
    # sums equal columns of a product with ones and averages them; summed before the
    # scaling, 16 (64) copies of a gradient past float32's max / 16 (/ 64) overflowed to inf
    monkeypatch.setenv("VDIT_PATCH_EMBED_BWD", variant)
    monkeypatch.setenv("VDIT_LINEAR_UNPATCHIFY_BWD", variant)
    pack = _pack([(1, 2, 2)], (1, 2, 2))  # one token, 4 features
    for backend in ("triton", "reference"):
        w = torch.full((4, 1, 1, 2, 2), 0.5, device=DEVICE, requires_grad=True)
        b = torch.zeros(4, device=DEVICE, requires_grad=True)
        out = vk.patch_embed([torch.ones(1, 1, 2, 2, device=DEVICE)], pack, w, b, backend=backend)
        grad = torch.tensor([[1e37, -1e37, 3e37, 1.0]], device=DEVICE)
        torch.testing.assert_close(torch.autograd.grad(out, b, grad)[0], grad[0], rtol=1e-6, atol=0)
        wl = torch.full((4, 4), 0.5, device=DEVICE, requires_grad=True)
        bl = torch.zeros(4, device=DEVICE, requires_grad=True)
        video = vk.linear_unpatchify(torch.ones(1, 4, device=DEVICE), pack, wl, bl, 1, backend=backend)[0]
        grad = torch.tensor([1e37, -2e37, 6e36, 1.0], device=DEVICE)
        torch.testing.assert_close(torch.autograd.grad(video, bl, grad.view(1, 1, 2, 2))[0], grad, rtol=1e-6, atol=0)


def test_conv3d_equivalence_batch_input():
    pack = vk.VideoPack.from_shapes([(2, 4, 6)] * 2, (1, 2, 2), device=DEVICE)
    conv = torch.nn.Conv3d(4, 24, kernel_size=(1, 2, 2), stride=(1, 2, 2)).to(DEVICE)
    lat = torch.randn(2, 4, 2, 4, 6, device=DEVICE)
    out = vk.patch_embed(lat, pack, conv.weight.detach(), conv.bias.detach(), backend="triton")
    # cuDNN would run the float32 convolution in tf32 (torch.backends.cudnn.allow_tf32
    # defaults to True); the patch embedding computes exact float32 products
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        expected = conv(lat).flatten(2).transpose(1, 2).reshape(-1, 24)
    assert_verbose_close(out, expected, atol=1e-4, rtol=1e-4)


def test_backend_reports_all_contract_functions():
    from vdit_kernels.backend import why_not

    for op in ("patchify", "unpatchify", "patch_embed", "linear_unpatchify"):
        assert why_not("triton", "patch", DEVICE, op) is None


def test_float64_values_and_gradcheck():
    # float64 has no tl.dot path: Triton patchify/unpatchify around PyTorch float64 GEMMs;
    # values against the reference (gradcheck alone would pass a wrong forward whose
    # gradients are consistent with it, an added constant say)
    pack = _pack([(2, 4, 2), (1, 2, 2)], (1, 2, 2))
    videos = [torch.randn(2, *s, dtype=torch.float64, device=DEVICE, requires_grad=True) for s in pack.shapes]
    w = torch.randn(5, 2, 1, 2, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    embed = lambda backend: lambda w, b, *v: vk.patch_embed(list(v), pack, w, b, backend=backend)
    torch.testing.assert_close(embed("triton")(w, b, *videos), embed("reference")(w, b, *videos),
                               atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(embed("triton"), (w, b, *videos))
    x = torch.randn(pack.num_tokens, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    lw = torch.randn(8, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    lb = torch.randn(8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    unembed = lambda backend: lambda x, w, b: vk.linear_unpatchify(x, pack, w, b, 2, backend=backend)
    for got, expect in zip(unembed("triton")(x, lw, lb), unembed("reference")(x, lw, lb)):
        torch.testing.assert_close(got, expect, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(unembed("triton"), (x, lw, lb))


@pytest.mark.skipif(DEVICE.type == "cuda", reason="interpreter-only: exercises the GPU split path on CPU")
def test_weight_grad_split_over_token_blocks(monkeypatch):
    # the GPU code path splits the weight-gradient reduction over token blocks into fp32
    # partials; force it (with small tiles) under the interpreter
    import vdit_kernels.triton.patch as tp

    for name in ("_GEMM_GPU", "_GEMM_GPU_FP32", "_SCATTER_GPU"):
        monkeypatch.setattr(tp, name, tp._SMALL)
    for name in ("_WGRAD_GPU", "_WGRAD_GPU_FP32"):
        monkeypatch.setattr(tp, name, (*tp._SMALL, 2))  # and 2 pipeline stages
    monkeypatch.setattr(tp, "_interp", lambda t: False)
    pack = _pack(PACKS["sixteen"], (1, 2, 2))
    check_patch_embed(pack, 4, 24, torch.float32)
    check_linear_unpatchify(pack, 4, 24, torch.float32)


def test_embed_kernel_splits_columns_over_programs(monkeypatch):
    # the on-chip-A kernel (F <= 128): one token block whose 5 column blocks of 8 are split
    # over 2 programs (3 + 2 blocks, the last one partial: hidden 37)
    import vdit_kernels.triton.patch as tp

    monkeypatch.setattr(tp, "_EMBED_SMALL", (16, 8, 4, 1))
    pack = vk.VideoPack.from_shapes([(1, 4, 6)], (1, 2, 2), device=DEVICE)  # 6 tokens
    check_patch_embed(pack, 4, 37, torch.float32)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="drives the autotuner with a fake timer under the interpreter")
@pytest.mark.parametrize("variant,tuner", [("fused", "_embed_tuned"), ("fused-tma", "_embed_tuned_tma")])
def test_embed_kernel_autotuned_candidates(monkeypatch, variant, tuner):
    # the GPU path of the on-chip-A kernel under the interpreter: every candidate of
    # _EMBED_GPU (128 token rows; 128- and 64-column steps) runs on the same grid and gives
    # the right product (hidden 200: a partial column step for both); the TMA-store ones
    # with the descriptor's box set to each candidate's tile (their pre_hook), on a pack
    # with a whole 128-token block
    import vdit_kernels.triton.patch as tp

    for name in ("_GEMM_GPU", "_GEMM_GPU_FP32", "_SCATTER_GPU"):  # the backward: small tiles
        monkeypatch.setattr(tp, name, tp._SMALL)
    monkeypatch.setattr(tp, "_WGRAD_GPU", (*tp._SMALL, 1))
    monkeypatch.setattr(tp, "_interp", lambda t: False)
    monkeypatch.setenv("VDIT_AUTOTUNE", "1")
    timed = []

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        timed.append(1)
        return [1.0 / len(timed)] * 3  # the last candidate timed wins
    tuned = getattr(tp, tuner)
    monkeypatch.setitem(tuned.__dict__, "do_bench", fake_bench)
    monkeypatch.setattr(tuned, "cache", {})
    monkeypatch.setenv("VDIT_PATCH_EMBED_FWD", variant)
    shapes = [(2, 6, 8), (1, 4, 4)] if variant == "fused" else [(2, 16, 16), (1, 4, 4)]  # 28 / 132 tokens
    check_patch_embed(vk.VideoPack.from_shapes(shapes, (1, 2, 2), device=DEVICE), 16, 200, torch.float16)
    assert len(timed) == len(tp._embed_candidates(64))  # F = 64: the FP = 64 list, pruned from all
    assert tuned.cache and list(tuned.cache.values())[0].kwargs["BLOCK_N"] == tp._embed_candidates(64)[-1][0]
    assert list(tuned.cache.values())[0].kwargs.get("TMA_STORE", False) == (variant == "fused-tma")


def test_embed_kernel_not_used_for_wide_patches(monkeypatch):
    # F = 48 * 8 = 384 > 128 features: the K-looping gather GEMM runs instead
    import vdit_kernels.triton.patch as tp

    calls = []
    monkeypatch.setattr(tp, "_embed_kernel", _Recorder(tp._embed_kernel, calls))
    monkeypatch.setenv("VDIT_PATCH_EMBED_FWD", "fused")  # not the measured choice: the kernel itself
    # on a GPU float32 takes the gather GEMM whatever F is (_gather_gemm), so the narrow
    # case that must reach the kernel runs in float16 there
    dtype = torch.float16 if DEVICE.type == "cuda" else torch.float32
    pack = _pack(PACKS["mixed"], (2, 2, 2))
    check_patch_embed(pack, 48, 24, dtype)
    assert not calls
    check_patch_embed(_pack(PACKS["mixed"], (1, 2, 2)), 4, 24, dtype)
    assert calls


class _Recorder:
    """Wraps a Triton kernel to record its launches (kernel[grid](...))."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]


@pytest.mark.skipif(DEVICE.type == "cuda", reason="forces the GPU configs under the interpreter")
@pytest.mark.parametrize("variant", ["fused", "fused-tma"])
def test_fixed_embed_config_gives_way_to_one_that_fits(monkeypatch, caplog, variant):
    # VDIT_AUTOTUNE=0 (or a CUDA graph capture) on a 99 KB GPU: the first config, 131072 B
    # at FP = 128 in bf16, cannot launch; the next one runs, and later calls go to it directly
    # (fused-tma: with the descriptor's box of that config's tile, on a whole 128-token block)
    import logging

    import vdit_kernels.triton as triton_pkg
    import vdit_kernels.triton.patch as tp

    for name in ("_GEMM_GPU", "_GEMM_GPU_FP32", "_SCATTER_GPU"):  # the backward: small tiles
        monkeypatch.setattr(tp, name, tp._SMALL)
    monkeypatch.setattr(tp, "_WGRAD_GPU", (*tp._SMALL, 1))
    monkeypatch.setattr(tp, "_interp", lambda t: False)
    monkeypatch.setattr(triton_pkg, "TOO_LARGE", set())
    monkeypatch.setenv("VDIT_AUTOTUNE", "0")
    monkeypatch.setenv("VDIT_PATCH_EMBED_FWD", variant)
    launched = []
    configs = tp._embed_fixed_list(64)
    monkeypatch.setattr(tp, "_embed_kernel", OutOfSharedMemory(
        tp._embed_kernel, lambda kw: kw["BLOCK_N"] == configs[0][0],
        lambda kw: tma.append(kw["TMA_STORE"]) or (kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]), launched))
    tma = []
    shapes = [(2, 6, 8), (1, 4, 4)] if variant == "fused" else [(2, 16, 16), (1, 4, 4)]
    pack = vk.VideoPack.from_shapes(shapes, (1, 2, 2), device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="vdit_kernels"):
        check_patch_embed(pack, 16, 200, torch.float16)
    assert launched[:2] == configs[:2] and "does not fit this GPU" in caplog.text
    launched.clear()
    check_patch_embed(pack, 16, 200, torch.float16)
    assert launched and all(c == configs[1] for c in launched)
    assert set(tma) == {variant == "fused-tma"}


@pytest.mark.skipif(DEVICE.type == "cuda", reason="forces the GPU path under the interpreter")
def test_float32_patch_embed_takes_the_gemm(monkeypatch):
    # IEEE float32 products on the on-chip-A tiles spill 19-52 KB of registers: float32 takes
    # the K-looping gather GEMM at every F on a GPU
    import vdit_kernels.triton.patch as tp

    for name in ("_GEMM_GPU", "_GEMM_GPU_FP32", "_SCATTER_GPU"):
        monkeypatch.setattr(tp, name, tp._SMALL)
    monkeypatch.setattr(tp, "_WGRAD_GPU_FP32", (*tp._SMALL, 1))
    monkeypatch.setattr(tp, "_interp", lambda t: False)
    calls = []
    monkeypatch.setattr(tp, "_embed_kernel", _Recorder(tp._embed_kernel, calls))
    check_patch_embed(vk.VideoPack.from_shapes([(2, 6, 8)], (1, 2, 2), device=DEVICE), 16, 40, torch.float32)
    assert not calls


def test_embed_autotuner_prunes_to_the_candidates_of_the_call():
    # one autotuner holds every FP's candidates; a call keeps its own (FP = 128: no
    # one-warpgroup 64-column step, which spills there under Triton 3.8)
    import vdit_kernels.triton.patch as tp

    configs = tp._embed_tuned.configs
    kept = lambda **kw: [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in tp._embed_prune(configs, {}, **kw)]  # noqa: E731
    assert kept(FP=64) == tp._embed_candidates(64) and kept(FP=32) == tp._embed_candidates(64)
    assert kept(FP=128) == tp._embed_candidates(128) != tp._embed_candidates(64)


@pytest.mark.parametrize("seed", range(16))
def test_random_combinations(monkeypatch, seed):
    # seeded draws of what the tests above vary one at a time: patch size, pack (1-4
    # videos, 1 frame and 1x1 grids among them), channels, hidden, dtype, bias, variant,
    # non-contiguous inputs (150 such draws matched the reference, 2026-11-27)
    rng = random.Random(seed)
    patch = rng.choice([(1, 2, 2), (2, 2, 2), (1, 1, 1), (2, 1, 3)])
    shapes = [tuple(p * rng.randint(1, 3) for p in patch) for _ in range(rng.randint(1, 4))]
    channels, hidden = rng.choice([1, 3, 4, 5, 16]), rng.choice([1, 8, 13, 32, 48])
    dtype, bias = rng.choice(DOT_DTYPES), rng.random() < 0.7
    # (the helpers' non-contiguous videos swap C and T: a layout change only when both exceed 1)
    noncontig = rng.random() < 0.4 and channels > 1 and shapes[0][0] > 1
    for check, env, *_ in VARIANT_OPS.values():
        variant = rng.choice(["fused", "gemm"])
        monkeypatch.setenv(env + "_FWD", variant)
        monkeypatch.setenv(env + "_BWD", variant)
    pack = vk.VideoPack.from_shapes(shapes, patch, device=DEVICE)
    check_patch_embed(pack, channels, hidden, dtype, bias=bias, noncontig=noncontig, seed=seed)
    check_linear_unpatchify(pack, channels, hidden, dtype, bias=bias, noncontig_x=noncontig, seed=seed)
