"""Triton backend of the rope family against the reference (interpreter on CPU, or a GPU)."""
import random

import pytest
import torch

from conftest import ALL_DTYPES, DEVICE, assert_verbose_close

import vdit_kernels as vk

SHAPES = [(2, 4, 6), (1, 2, 2), (3, 2, 4)]  # 12 + 1 + 6 = 19 tokens: a partial last token block
DIMS = [(4, 4, 4), (16, 56, 56), (44, 42, 42), (8, 28, 28), (24, 24, 24), (32, 32, 32)]


def _pack(shapes=SHAPES):
    return vk.VideoPack.from_shapes(shapes, (1, 2, 2), device=DEVICE)


def _qk(n, d, dtype, heads=2, kv_heads=1, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, heads, d, generator=g).to(device=DEVICE, dtype=dtype)
    k = torch.randn(n, kv_heads, d, generator=g).to(device=DEVICE, dtype=dtype)
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad)


def _both(q, k, pack, dims, **kw):
    out = vk.apply_rope_3d(q, k, pack, dims, backend="triton", **kw)
    exp = vk.apply_rope_3d(q, k, pack, dims, backend="reference", **kw)
    return out, exp


@pytest.mark.parametrize("dims", DIMS, ids=lambda d: "x".join(map(str, d)))
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_matches_reference(dtype, interleaved, dims):
    pack = _pack()
    q, k = _qk(pack.num_tokens, sum(dims), dtype)
    (qo, ko), (qe, ke) = _both(q, k, pack, dims, theta=10000.0, interleaved=interleaved)
    assert qo.dtype == dtype and ko.dtype == dtype
    assert_verbose_close(qo, qe, name="q")
    assert_verbose_close(ko, ke, name="k")


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_matches_reference(dtype, interleaved):
    pack, dims = _pack(), (8, 28, 28)
    grads = []
    for backend in ("triton", "reference"):
        q, k = _qk(pack.num_tokens, 64, dtype, heads=3, kv_heads=2, requires_grad=True)
        gq, gk = _qk(pack.num_tokens, 64, dtype, heads=3, kv_heads=2, seed=1)
        qr, kr = vk.apply_rope_3d(q, k, pack, dims, 500.0, interleaved, backend=backend)
        ((qr * gq).sum() + (kr * gk).sum()).backward()
        grads.append((q.grad, k.grad))
    assert_verbose_close(grads[0][0], grads[1][0], name="dq")
    assert_verbose_close(grads[0][1], grads[1][1], name="dk")


def test_backward_inverts_forward():
    pack, dims = _pack(), (4, 4, 4)
    q, k = _qk(pack.num_tokens, 12, torch.float32, requires_grad=True)
    qr, kr = vk.apply_rope_3d(q, k, pack, dims, backend="triton")
    dq, dk = torch.autograd.grad((qr, kr), (q, k), (qr.detach(), kr.detach()))
    assert_verbose_close(dq, q.detach(), name="dq")  # rotating back recovers the input
    assert_verbose_close(dk, k.detach(), name="dk")


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_inplace_equals_out_of_place(dtype, interleaved):
    pack, dims = _pack(), (24, 24, 24)
    q, k = _qk(pack.num_tokens, 72, dtype)
    qo, ko = vk.apply_rope_3d(q, k, pack, dims, interleaved=interleaved, backend="triton")
    qi, ki = q.clone(), k.clone()
    r = vk.apply_rope_3d(qi, ki, pack, dims, interleaved=interleaved, inplace=True, backend="triton")
    assert r[0] is qi and r[1] is ki
    assert torch.equal(qi, qo) and torch.equal(ki, ko)


def test_float_positions():
    pack, dims = _pack(), (16, 56, 56)
    g = torch.Generator().manual_seed(3)
    pos = (torch.rand(pack.num_tokens, 3, generator=g) * 40.0 - 5.0).to(DEVICE)  # fractional
    q, k = _qk(pack.num_tokens, 128, torch.float32)
    for interleaved in (True, False):
        (qo, ko), (qe, ke) = _both(q, k, None, dims, theta=10000.0, interleaved=interleaved,
                                   positions=pos)
        assert_verbose_close(qo, qe, atol=2e-5, rtol=2e-5, name="q")
        assert_verbose_close(ko, ke, atol=2e-5, rtol=2e-5, name="k")


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("theta", [10000.0, 1e6, 256.0])
def test_large_positions_rotate_by_the_references_angles(theta, interleaved):
    # positions up to 5000: every backend multiplies the position by the same float32
    # frequency (theta^(-2j/d_a) in float64, rounded once); frequencies computed in the
    # kernel as exp2(-2j/d_a * log2(theta)) in float32 were 8 ulp off, angles then 2e-3 rad
    # apart at these positions
    pack, dims = _pack(), (16, 24, 24)
    g = torch.Generator().manual_seed(4)
    pos = (torch.rand(pack.num_tokens, 3, generator=g) * 5000.0).to(DEVICE)
    q, k = _qk(pack.num_tokens, sum(dims), torch.float32)
    (qo, ko), (qe, ke) = _both(q, k, None, dims, theta=theta, interleaved=interleaved, positions=pos)
    assert_verbose_close(qo, qe, atol=1e-5, rtol=1e-5, name="q")
    assert_verbose_close(ko, ke, atol=1e-5, rtol=1e-5, name="k")


@pytest.mark.parametrize("interleaved", [True, False])
def test_non_contiguous_inputs(interleaved):
    pack, dims = _pack(), (44, 42, 42)
    n = pack.num_tokens
    q_full, k_full = _qk(n, 128, torch.float16, heads=6, kv_heads=3)
    q = q_full[:, ::2]  # heads strided
    k = k_full.transpose(0, 1).contiguous().transpose(0, 1)  # (N, Hk, D) with heads outermost
    assert not q.is_contiguous() and not k.is_contiguous()
    (qo, ko), (qe, ke) = _both(q, k, pack, dims, interleaved=interleaved)
    assert_verbose_close(qo, qe, name="q")
    assert_verbose_close(ko, ke, name="k")
    # in place on the views writes through to the parent tensors, and only there
    before = q_full.clone()
    vk.apply_rope_3d(q, k, pack, dims, interleaved=interleaved, inplace=True, backend="triton")
    assert torch.equal(q, qo) and torch.equal(k, ko)
    assert torch.equal(q_full[:, 1::2], before[:, 1::2])


def test_last_dim_not_contiguous():
    from vdit_kernels.triton import rope as trope
    pack, dims = _pack(), (4, 4, 4)
    q, k = _qk(pack.num_tokens, 12, torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # head_dim stride != 1
    pos = pack.positions.float()
    qo, ko = trope.rope_3d(qt, k, pos, dims, 10000.0, True, False)
    qe, ke = vk.apply_rope_3d(q, k, pack, dims, backend="reference")
    assert_verbose_close(qo, qe, name="q")
    assert_verbose_close(ko, ke, name="k")
    # in place: rotated out of place and copied back into the strided view
    trope.rope_3d_(qt, k, pos, dims, 10000.0, True, False)
    assert qt.stride(2) != 1
    assert_verbose_close(qt, qe, name="q in place")
    assert_verbose_close(k, ke, name="k in place")


def test_pack_of_16_videos():
    shapes = [(1 + i % 3, 2 * (1 + i % 2), 2 * (1 + (i // 2) % 3)) for i in range(16)]
    pack = _pack(shapes)
    q, k = _qk(pack.num_tokens, 96, torch.bfloat16, heads=3, kv_heads=1)
    (qo, ko), (qe, ke) = _both(q, k, pack, (32, 32, 32), theta=256.0, interleaved=False)
    assert_verbose_close(qo, qe, name="q")
    assert_verbose_close(ko, ke, name="k")


@pytest.mark.parametrize("interleaved", [True, False])
def test_one_token_pack(interleaved):
    pack = _pack([(1, 2, 2)])
    assert pack.num_tokens == 1
    q, k = _qk(1, 64, torch.float32, heads=4, kv_heads=2)
    pos = torch.tensor([[3.0, 7.0, 11.0]], device=DEVICE)
    (qo, ko), (qe, ke) = _both(q, k, None, (8, 28, 28), interleaved=interleaved, positions=pos)
    assert_verbose_close(qo, qe, name="q")
    assert_verbose_close(ko, ke, name="k")


def test_zero_size_axes_and_many_heads():
    pack = _pack()
    q, k = _qk(pack.num_tokens, 12, torch.float32, heads=5, kv_heads=3)
    for dims in [(0, 6, 6), (6, 6, 0), (0, 12, 0)]:
        for interleaved in (True, False):
            (qo, ko), (qe, ke) = _both(q, k, pack, dims, interleaved=interleaved)
            assert_verbose_close(qo, qe, name=f"q {dims}")
            assert_verbose_close(ko, ke, name=f"k {dims}")


@pytest.mark.parametrize("dims", [(16, 56, 56), (44, 42, 42), (0, 12, 20), (10, 0, 6)],
                         ids=lambda d: "x".join(map(str, d)))
def test_rotate_half_partners_across_chunks(dims):
    # rotate-half fetches each element's partner e +- d_a/2 inside its axis chunk from
    # registers; odd half sizes and empty axes, forward and backward
    pack = _pack()
    q, k = _qk(pack.num_tokens, sum(dims), torch.float32, heads=3, kv_heads=2)
    (qo, ko), (qe, ke) = _both(q, k, pack, dims, theta=500.0, interleaved=False)
    assert_verbose_close(qo, qe, name="q")
    assert_verbose_close(ko, ke, name="k")
    grads = torch.autograd.grad(vk.apply_rope_3d(q.requires_grad_(), k.requires_grad_(), pack, dims,
                                                 theta=500.0, interleaved=False, backend="triton"),
                                (q, k), (qo, ko))
    exp = torch.autograd.grad(vk.apply_rope_3d(q, k, pack, dims, theta=500.0, interleaved=False,
                                               backend="reference"), (q, k), (qo, ko))
    for a, e in zip(grads, exp):
        assert_verbose_close(a, e, name="grad")


class _AlignRecorder:
    """Wraps the RoPE kernel: records each launch's ALIGN, then runs it."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.seen.append(kwargs["ALIGN"])
            return self.kernel[grid](*args, **kwargs)
        return run


def test_alignment_hint_claims_only_what_holds(monkeypatch):
    # ALIGN tells the compiler every token and head stride is a multiple of it (16-byte
    # vectors at head dim 72, whose strides a launch does not mark); the interpreter ignores
    # hints, so the host's value is checked here, and the results stay exact
    import vdit_kernels.triton.rope as R

    seen = []
    monkeypatch.setattr(R, "_rope_3d_kernel", _AlignRecorder(R._rope_3d_kernel, seen))
    pack = _pack()
    n = pack.num_tokens
    cases = [(torch.randn(n, 3, 72, device=DEVICE, dtype=torch.float16), (24, 24, 24), 8),    # strides 216, 72
             (torch.randn(n, 3, 72, device=DEVICE), (24, 24, 24), 4),                         # float32: 16 B = 4
             (torch.randn(n, 3, 36, device=DEVICE, dtype=torch.float16), (12, 12, 12), 4),    # head stride 36
             (torch.randn(n, 3, 2, 36, device=DEVICE, dtype=torch.float16)[:, :, 0], (12, 12, 12), 4),  # out: 36
             (torch.randn(n, 5, 9, device=DEVICE, dtype=torch.float16)[:, :, :8], (4, 2, 2), 1)]  # strides 45, 9
    for x, dims, align in cases:
        seen.clear()
        (qo, ko), (qe, ke) = _both(x, x[:, :1], pack, dims)
        assert seen == [align], (x.stride(), seen)
        assert_verbose_close(qo, qe, name="q")
        assert_verbose_close(ko, ke, name="k")


@pytest.mark.parametrize("seed", range(12))
def test_random_combinations(seed):
    # seeded draws of the split (zero-size axes among them), heads, dtype, convention and
    # pack at once
    rng = random.Random(seed)
    dims = tuple(2 * rng.randint(0 if i else 1, 8) for i in range(3))
    shapes = [(rng.randint(1, 3), 2 * rng.randint(1, 3), 2 * rng.randint(1, 3)) for _ in range(rng.randint(1, 4))]
    kv_heads = rng.choice([1, 2, 3])
    dtype, interleaved = rng.choice(ALL_DTYPES), rng.random() < 0.5
    pack = vk.VideoPack.from_shapes(shapes, (1, 2, 2), device=DEVICE)
    q, k = _qk(pack.num_tokens, sum(dims), dtype, heads=kv_heads * rng.choice([1, 2]), kv_heads=kv_heads, seed=seed)
    (qo, ko), (qe, ke) = _both(q, k, pack, dims, interleaved=interleaved)
    assert_verbose_close(qo, qe, name="q")
    assert_verbose_close(ko, ke, name="k")
