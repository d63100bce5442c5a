"""The oracle against independent formulations: Conv3d, complex multiplication, dense masked softmax."""
import math

import pytest
import torch

import vdit_kernels as vk
from vdit_kernels import reference as ref
from conftest import assert_verbose_close, random_videos

SHAPES = [[(4, 6, 8), (1, 4, 2), (3, 2, 2)], [(1, 2, 2)], [(2, 4, 4)] * 3]


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("patch", [(1, 2, 2), (1, 1, 1)])
def test_patchify_round_trip_and_order(shapes, patch):
    pack = vk.VideoPack.from_shapes(shapes, patch)
    videos = random_videos(pack, 3, device="cpu")
    tokens = ref.patchify(videos, pack)
    assert tokens.shape == (pack.num_tokens, 3 * math.prod(patch))
    for v, back in zip(videos, ref.unpatchify(tokens, pack, 3)):
        assert torch.equal(v, back)
    # token 1 of video 0 is the patch at grid (0, 0, 1), features ordered (c, pt, ph, pw)
    pt, ph, pw = patch
    if pack.grid_sizes[0][2] > 1:
        expect = videos[0][:, 0:pt, 0:ph, pw:2 * pw].reshape(-1)
        assert torch.equal(tokens[1], expect)


@pytest.mark.parametrize("shapes", SHAPES)
def test_patch_embed_equals_conv3d(shapes):
    patch = (1, 2, 2)
    pack = vk.VideoPack.from_shapes(shapes, patch)
    conv = torch.nn.Conv3d(4, 24, kernel_size=patch, stride=patch, dtype=torch.float64)
    videos = random_videos(pack, 4, dtype=torch.float64, device="cpu")
    out = ref.patch_embed(videos, pack, conv.weight, conv.bias)
    expect = torch.cat([conv(v[None])[0].flatten(1).t() for v in videos])
    assert_verbose_close(out, expect.detach())
    # the definition in the docstring
    manual = ref.patchify(videos, pack) @ conv.weight.flatten(1).t() + conv.bias
    assert_verbose_close(out, manual.detach())


def test_batch_tensor_equals_list():
    pack = vk.VideoPack.from_shapes([(2, 4, 4)] * 2, (1, 2, 2))
    batch = torch.randn(2, 3, 2, 4, 4)
    assert torch.equal(ref.patchify(batch, pack), ref.patchify(list(batch), pack))


def test_linear_unpatchify_is_linear_then_unpatchify():
    pack = vk.VideoPack.from_shapes([(2, 4, 6), (1, 2, 2)], (1, 2, 2))
    x = torch.randn(pack.num_tokens, 32, dtype=torch.float64)
    lin = torch.nn.Linear(32, 3 * 4, dtype=torch.float64)
    outs = ref.linear_unpatchify(x, pack, lin.weight, lin.bias, 3)
    for o, e in zip(outs, ref.unpatchify(lin(x), pack, 3)):
        assert_verbose_close(o, e.detach())


def _complex_rope(x, positions, dims, theta, interleaved):
    """Independent formulation: each rotated pair is a complex number times e^{i angle}."""
    x = x.double()
    outs, c0 = [], 0
    for axis, d in enumerate(dims):
        chunk = x[..., c0:c0 + d]
        j = torch.arange(d // 2, dtype=torch.float64)
        angle = positions[:, axis, None].double() / theta ** (2 * j / d)  # (N, d/2)
        rot = torch.polar(torch.ones_like(angle), angle)[:, None, :]
        if interleaved:
            z = torch.view_as_complex(chunk.reshape(*chunk.shape[:-1], d // 2, 2).contiguous())
            outs.append(torch.view_as_real(z * rot).flatten(-2))
        else:
            z = torch.complex(chunk[..., : d // 2], chunk[..., d // 2:]) * rot
            outs.append(torch.cat((z.real, z.imag), dim=-1))
        c0 += d
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dims", [(4, 6, 6), (16, 56, 56), (44, 42, 42), (0, 4, 4)])
def test_rope_matches_complex_formulation(dims, interleaved):
    pack = vk.VideoPack.from_shapes([(3, 4, 6), (1, 2, 2)], (1, 2, 2))
    d = sum(dims)
    q = torch.randn(pack.num_tokens, 3, d, dtype=torch.float64)
    k = torch.randn(pack.num_tokens, 1, d, dtype=torch.float64)
    qr, kr = ref.apply_rope_3d(q, k, pack, dims, 10000.0, interleaved)
    assert_verbose_close(qr, _complex_rope(q, pack.positions, dims, 10000.0, interleaved))
    assert_verbose_close(kr, _complex_rope(k, pack.positions, dims, 10000.0, interleaved))
    # a rotation preserves norms; the inverse rotation undoes it
    assert_verbose_close(qr.norm(dim=-1), q.norm(dim=-1))
    q_back, _ = ref.apply_rope_3d(qr, kr, pack, dims, 10000.0, interleaved, inverse=True)
    assert_verbose_close(q_back, q)


def test_rope_float_positions_and_position_zero_is_identity():
    pack = vk.VideoPack.from_shapes([(1, 2, 2)], (1, 2, 2))
    q = torch.randn(1, 2, 12)
    qr, _ = ref.apply_rope_3d(q, q, pack, (4, 4, 4))
    assert torch.equal(qr, q)  # the single token sits at (0, 0, 0)
    pos = torch.tensor([[0.5, 1.25, 3.0]])
    qr, _ = ref.apply_rope_3d(q, q, None, (4, 4, 4), positions=pos)
    assert_verbose_close(qr.double(), _complex_rope(q, pos, (4, 4, 4), 10000.0, True), atol=1e-5, rtol=1e-5)


def _dense_attention(q, k, v, cu_q, cu_k, scale):
    """Independent formulation: one dense score matrix with a block-diagonal segment mask."""
    seg_q = torch.repeat_interleave(torch.arange(len(cu_q) - 1), torch.diff(torch.tensor(cu_q)))
    seg_k = torch.repeat_interleave(torch.arange(len(cu_k) - 1), torch.diff(torch.tensor(cu_k)))
    groups = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(groups, 1)
    v = v.double().repeat_interleave(groups, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    s = s.masked_fill(seg_q[None, :, None] != seg_k[None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no key: all -inf -> NaN -> 0
    return torch.einsum("hqk,khd->qhd", p, v), lse


@pytest.mark.parametrize("lens_q, lens_k", [
    ([5, 1, 17], [5, 1, 17]),        # self-attention over a pack
    ([7, 0, 9, 3], [4, 2, 0, 6]),    # cross-attention with empty segments on both sides
    ([33], [33]),
])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (3, 1)])
def test_attention_matches_dense_masked_softmax(lens_q, lens_k, heads, kv_heads):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(sum(lens_q), heads, 16, dtype=torch.float64)
    k = torch.randn(sum(lens_k), kv_heads, 16, dtype=torch.float64)
    v = torch.randn(sum(lens_k), kv_heads, 16, dtype=torch.float64)
    out, lse = ref.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), 0.3, return_lse=True)
    expect_out, expect_lse = _dense_attention(q, k, v, cu_q.tolist(), cu_k.tolist(), 0.3)
    assert_verbose_close(out, expect_out)
    assert_verbose_close(lse, expect_lse)  # -inf where a query has no keys, in both


def test_attention_lse_is_logsumexp_of_scores_float32():
    q, k, v = (torch.randn(10, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    out, lse = ref.varlen_attention(q, k, v, cu, cu, 6, 6, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (2, 10)
    s = torch.einsum("qhd,khd->hqk", q[4:], k[4:]) / math.sqrt(8)
    assert_verbose_close(lse[:, 4:], torch.logsumexp(s, -1))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("scale", [1e4, 7.3e4, 1.3e6])
def test_reference_attention_is_exact_at_large_scores(scale):
    # two equal scores of `scale` (and a third far below): out = mean of the two values,
    # exactly. P taken as exp(s - lse) with lse rounded to float32 was off by half an ulp of
    # lse relative: out 1.99957 at scores of 1e4, 1.889 at 1.3e6. The backward recomputes P
    # from the lse (its contract: ring attention passes the whole row's lse for a subset of
    # the keys), so its gradients are off by that much: |lse| * 2^-24 relative, documented
    q = torch.zeros(1, 1, 16)
    q[..., 0] = 1
    k = torch.zeros(3, 1, 16)
    k[:2, :, 0], k[2, :, 0] = 1, -1
    v = torch.zeros(3, 1, 16)
    v[0], v[1], v[2] = 1, 3, 100
    cq, ck = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)

    def run(dtype):
        xs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = vk.varlen_attention(*xs, cq, ck, 1, 3, softmax_scale=scale, return_lse=True,
                                       backend="reference")
        grads = torch.autograd.grad((out * torch.arange(16.0).to(dtype)).sum() + lse.sum(), xs)
        return [out, lse, *grads]

    out, lse, dq, dk, dv = run(torch.float32)
    assert torch.equal(out[0, 0], torch.full((16,), 2.0))
    exact = run(torch.float64)
    assert_verbose_close(lse, exact[1].float(), atol=0, rtol=1e-7)
    bound = abs(lse.item()) * 2.0**-24 * 2  # (and lse * log2(e)'s own rounding, in the kernels)
    for name, ours, want in (("dq", dq, exact[2]), ("dk", dk, exact[3]), ("dv", dv, exact[4])):
        err = ((ours.double() - want).abs().max() / want.abs().max()).item()
        assert err <= bound, (name, err, bound)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_keeps_input_dtype_and_computes_in_float32(dtype):
    q, k, v = (torch.randn(12, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 12], dtype=torch.int32)
    out = ref.varlen_attention(q.to(dtype), k.to(dtype), v.to(dtype), cu, cu, 12, 12)
    assert out.dtype == dtype
    expect = ref.varlen_attention(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), cu, cu, 12, 12)
    assert torch.equal(out, expect.to(dtype))  # float32 math, one rounding at the end


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_attention_backward_with_rope_is_its_forwards_gradient(dtype):
    # the forward rotates q and k in the input dtype (rounded there) before the float32
    # attention; the backward must see the same rotated values (rotated in float32 it was 5x
    # further from the exact gradient than the Triton kernel)
    g = torch.Generator().manual_seed(0)
    n, d = 32, 32
    cu = torch.tensor([0, n], dtype=torch.int32)
    pos = torch.randint(0, 8, (n, 3), generator=g).float()
    rope = vk.Rope3D(pos, (8, 8, 16), 10000.0, True)
    q, k = ((2 * torch.randn(n, 1, d, generator=g)).to(dtype) for _ in range(2))
    v = torch.randn(n, 1, d, generator=g).to(dtype)
    qq = q.clone().requires_grad_()
    _, lse = vk.varlen_attention(qq, k, v, cu, cu, n, n, return_lse=True, rope=rope, backend="reference")
    (ours,) = torch.autograd.grad(lse.sum(), qq)
    # exact: rotate in float32, round to the dtype (straight through), attention in float32
    qf = q.float().requires_grad_()
    qr, kr = ref.apply_rope_3d(qf, k.float(), None, rope.dims, rope.theta, rope.interleaved, positions=pos)
    qr, kr = (t + (t.to(dtype).float() - t).detach() for t in (qr, kr))
    (exact,) = torch.autograd.grad(ref.varlen_attention(qr, kr, v.float(), cu, cu, n, n, return_lse=True)[1].sum(),
                                   qf)
    # what is left: dq's own rounding to the dtype (|dq| <= 1: half an ulp measured, one allowed)
    assert (ours.float() - exact).abs().max() <= {torch.float16: 1e-3, torch.bfloat16: 4e-3}[dtype]


def test_the_comparison_helper_tells_infinities_apart():
    # an empty key segment's lse is -inf: +inf there must fail the comparison
    inf = float("inf")
    assert_verbose_close(torch.tensor([-inf, 1.0]), torch.tensor([-inf, 1.0]))
    for actual in ([inf, 1.0], [0.0, 1.0], [float("nan"), 1.0]):
        with pytest.raises(AssertionError):
            assert_verbose_close(torch.tensor(actual), torch.tensor([-inf, 1.0]))
