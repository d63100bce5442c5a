"""Triton backend of the attention family against the reference (interpreter on CPU, or a GPU).

Correctness rules:
  float32: the Triton result vs the float64-free float32 reference, atol/rtol 1e-4
           (IEEE dots on a GPU, no tf32).
  float16 / bfloat16: flash-attention's rule, max error vs the float32 reference at most
           2x the error of "PyTorch in the same dtype". That baseline is plain dense
           attention written with PyTorch ops on the half-precision tensors, per segment:
           S = (q k^T) * scale, P = softmax(S), O = P v, every op in float16/bfloat16
           (softmax accumulates internally in float32 but returns the half dtype, as a user
           writing attention in that dtype gets), and its grads by autograd through it.
  lse:     within 1e-3 absolute of the reference (float32 everywhere).
"""
import json
import logging
import os
import random
import subprocess
import sys

import pytest
import torch
import triton

from conftest import DEVICE, DOT_DTYPES, OutOfSharedMemory, assert_matmul_rule, assert_verbose_close, gpu_only

import vdit_kernels as vk
from vdit_kernels import reference as ref


# Triton 3.5's interpreter checks a descriptor's strides in elements, not bytes (3.6 fixed
# it; its GPU path checks bytes): the backward's (H*Nq, 4) float32 row statistics, rows of
# 16 bytes, fail that check there
_OLD_TMA_INTERPRETER = pytest.mark.skipif(
    DEVICE.type == "cpu" and tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 6),
    reason="Triton < 3.6's interpreter rejects 16-byte descriptor rows (element-stride check)")
TMA = pytest.param("tma", marks=_OLD_TMA_INTERPRETER)


def _cu(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=DEVICE)


def _inputs(nq, nk, h, hk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(nq, h, d, generator=g)
    k = torch.randn(nk, hk, d, generator=g)
    v = torch.randn(nk, hk, d, generator=g)
    do = torch.randn(nq, h, d, generator=g)
    return [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v, do)]


def _same_dtype_torch(q, k, v, cu_q, cu_k, scale, rope=None):
    """Dense attention in q's dtype with plain PyTorch ops, per segment (the baseline)."""
    if rope is not None:
        q, k = ref.apply_rope_3d(q, k, None, rope.dims, rope.theta, rope.interleaved,
                                 positions=rope.positions)
    groups = q.shape[1] // k.shape[1]
    outs = []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]].transpose(0, 1)
        ki = k[ck[i]:ck[i + 1]].transpose(0, 1).repeat_interleave(groups, 0)
        vi = v[ck[i]:ck[i + 1]].transpose(0, 1).repeat_interleave(groups, 0)
        if ki.shape[1] == 0:
            outs.append(torch.zeros_like(qi).transpose(0, 1) * qi.sum())  # keeps the graph
            continue
        p = torch.softmax((qi @ ki.transpose(1, 2)) * scale, dim=-1)
        outs.append((p @ vi).transpose(0, 1))
    return torch.cat(outs, 0)


def _run(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    lse = None
    if isinstance(out, tuple):
        out, lse = out
    # materialize_grads: where no segment has keys, the per-segment baseline never uses k and v
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do, materialize_grads=True)
    return out.detach(), lse, dq, dk, dv


def _check(lens_q, lens_k, h, hk, d, dtype, max_q=None, max_k=None, rope_dims=None,
           interleaved=True, grads=True, seed=0, softmax_scale=None):
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    max_q = max(lens_q) if max_q is None else max_q
    max_k = max(lens_k) if max_k is None else max_k
    q, k, v, do = _inputs(sum(lens_q), sum(lens_k), h, hk, d, dtype, seed)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    rope = None
    if rope_dims is not None:
        g = torch.Generator().manual_seed(seed + 7)
        pos = torch.randint(0, 9, (sum(lens_q), 3), generator=g).float().to(DEVICE)
        rope = vk.Rope3D(pos, tuple(rope_dims), 500.0, interleaved)

    def api(backend):
        return lambda q, k, v: vk.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True,
                                                   rope=rope, backend=backend, softmax_scale=softmax_scale)

    tri = _run(api("triton"), q, k, v, do)
    # the float32 reference, float32 leaves: its gradients are not rounded to `dtype`
    exp = _run(api("reference"), q.float(), k.float(), v.float(), do.float())
    names = ("out", "lse", "dq", "dk", "dv")
    assert tri[0].dtype == dtype and tri[1].dtype == torch.float32
    assert tri[1].shape == (h, sum(lens_q))
    lse_atol = 1e-3
    if rope is not None and dtype != torch.float32:
        # the rotated q and k enter the tensor cores in `dtype`: rounding them moves the
        # scores by ~|q||k| * 2^-8 (bfloat16), more than 1e-3 at head dim 64. The bound is
        # that rounding's own effect on lse (reference float32 attention of the rotated,
        # rounded q and k) twice over, plus the 1e-3 of the unrotated case.
        qr, kr = ref.apply_rope_3d(q.float(), k.float(), None, rope.dims, rope.theta, rope.interleaved,
                                   positions=rope.positions)
        _, lse_rounded = vk.varlen_attention(qr.to(dtype).float(), kr.to(dtype).float(), v.float(), cu_q,
                                             cu_k, max_q, max_k, return_lse=True, backend="reference")
        finite = torch.isfinite(exp[1])
        lse_atol += 2 * (lse_rounded - exp[1])[finite].abs().max().item()
    assert_verbose_close(tri[1], exp[1], atol=lse_atol, rtol=0, name="lse")
    if dtype == torch.float32:
        for name, a, e in zip(names, tri, exp):
            if name != "lse" and (grads or name == "out"):
                assert_verbose_close(a, e, atol=1e-4, rtol=1e-4, name=name)
    else:
        base = _run(lambda q, k, v: _same_dtype_torch(q, k, v, cu_q, cu_k, scale, rope),
                    q, k, v, do)
        for name, a, b, e in zip(names, tri, base, exp):
            if name != "lse" and (grads or name == "out"):
                assert torch.isfinite(a).all(), name
                assert_matmul_rule(a, b, e, name=name)
    return tri


# -- forward + backward against the reference --------------------------------------------

@pytest.fixture(params=["split", "atomic-dq", "torch-fa2"])
def strategy(request, monkeypatch):
    """Every backward strategy: split (no atomics), atomic-dq (FlashAttention-2's scheme in
    Triton) and, on a GPU, torch-fa2 (PyTorch's own FlashAttention-2 backward on the Triton
    forward's out and lse; where it cannot run, e.g. float32, split runs instead)."""
    if request.param == "torch-fa2" and DEVICE.type != "cuda":
        pytest.skip("torch-fa2 is PyTorch's CUDA FlashAttention-2 backward")
    monkeypatch.setenv("VDIT_ATTN_BWD", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
def test_mixed_lengths_gqa(dtype, strategy):
    # lengths 0, 1, 17, 97 in one pack; GQA 4 query heads on 2 kv heads; max_seqlen > any
    _check([17, 0, 1, 97], [17, 0, 1, 97], 4, 2, 64, dtype, max_q=120, max_k=130)


@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
def test_cross_attention_empty_keys(dtype, strategy):
    # segment 1 has no keys: out 0, lse -inf, zero grads; segment 3 has no queries
    tri = _check([5, 9, 20, 0], [3, 0, 33, 4], 4, 1, 72, dtype)
    out, lse, dq = tri[0], tri[1], tri[2]
    assert torch.all(out[5:14] == 0) and torch.all(lse[:, 5:14] == float("-inf"))
    assert torch.all(dq[5:14] == 0)


@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
def test_cross_attention_no_keys_at_all(dtype):
    # no segment has keys (k and v are (0, hk, D)): out 0, lse -inf, dq 0 (an H100 run drew
    # it among the random combinations in bfloat16, 2026-11-27)
    out, lse, dq, dk, dv = _check([2, 5], [0, 0], 2, 1, 32, dtype, max_q=12, max_k=7, seed=8)
    assert torch.all(out == 0) and torch.all(lse == float("-inf")) and torch.all(dq == 0)
    assert dk.shape == dv.shape == (0, 1, 32)


@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
def test_many_tiny_segments(dtype, strategy):
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(0, 6, (32,), generator=g).tolist()
    _check(lens, lens, 2, 2, 80, dtype, max_q=8, max_k=8)


def test_single_segment_one_block():
    _check([16], [16], 1, 1, 64, torch.float32)


@pytest.mark.parametrize("lens", [[17], [97, 5]], ids=str)
def test_max_seqlen_equal_to_the_longest_segment(lens):
    # the launch grids cover max_seqlen exactly: one more row than whole 16-row blocks
    # (elsewhere max_seqlen exceeds the longest segment, which hides a short grid)
    _check(lens, lens, 2, 1, 64, torch.float32)


@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
def test_whole_blocks_and_partial_tails(dtype, strategy):
    # lengths that are whole multiples of the interpreter's 16-row tiles (no partial block:
    # only the unmasked loop runs) beside ones with partial tails, for queries and keys
    _check([32, 48, 16, 33], [16, 47, 64, 32], 2, 2, 64, dtype)


def test_very_negative_scores_keep_gradients_finite(strategy):
    # every score about -300: lse ~ -300, so a padded key (k = 0, score 0) would get
    # P = exp(300) = inf in float32; the partial key block must not let it into dQ
    lens = [21, 5]
    cu = _cu(lens)
    n, h, d = sum(lens), 2, 64
    q = torch.full((n, h, d), 6.0, device=DEVICE).requires_grad_(True)
    k = torch.full((n, h, d), -6.0, device=DEVICE)
    k = (k + 0.1 * torch.randn(n, h, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)).requires_grad_(True)
    v = torch.randn(n, h, d, device=DEVICE).requires_grad_(True)
    grads = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float32),
                           ("reference", torch.float64)):
        args = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out, lse = vk.varlen_attention(*args, cu, cu, 21, 21, return_lse=True, backend=backend)
        assert lse.max().item() < -250
        grads[backend, dtype] = torch.autograd.grad((out.double() * out.double()).sum(), args)
    # scores of -300 leave float32 about 3e-3 of dK (the reference's own error against
    # float64): the rule is no worse than twice the float32 reference, not closeness to it
    for i, name in enumerate(("dq", "dk", "dv")):
        a = grads["triton", torch.float32][i]
        assert torch.isfinite(a).all(), name
        exact = grads["reference", torch.float64][i]
        err = (a.double() - exact).abs().max().item()
        base = (grads["reference", torch.float32][i].double() - exact).abs().max().item()
        assert err <= 2 * base + 1e-6, f"{name}: error {err:.3e} > 2 x the float32 reference's {base:.3e}"


@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
@pytest.mark.parametrize("scale", [0.05, 0.4])  # flatter and sharper than 1/sqrt(64) = 0.125
def test_softmax_scale(scale, dtype, strategy):
    # forward and every backward strategy use the scale given (the others run the default)
    _check([19, 0, 40], [19, 0, 40], 4, 2, 64, dtype, softmax_scale=scale, rope_dims=(16, 24, 24))
    _check([19, 0, 40], [25, 3, 40], 4, 2, 64, dtype, softmax_scale=scale)  # cross-attention


@pytest.mark.skipif(DEVICE.type != "cpu", reason="forces GPU tiles under the interpreter")
@pytest.mark.parametrize("keys_major", [False, True], ids=["queries-major", "keys-major"])
@pytest.mark.parametrize("strategy", ["split", "atomic-dq"])
def test_very_negative_scores_with_gpu_tiles(monkeypatch, keys_major, strategy):
    # test_very_negative_scores_keep_gradients_finite at a GPU dK/dV tile of 64 keys (float32
    # always runs the interpreter's 16 x 16 queries-major one): the tail block's select of
    # padded keys in each orientation, atomic-dq's included, in float16
    from vdit_kernels.triton import attention as A

    monkeypatch.setattr(A, "_half_on_gpu", lambda dtype, device: dtype == torch.float16)
    monkeypatch.setenv("VDIT_AUTOTUNE", "0")
    monkeypatch.setenv("VDIT_ATTN_BWD", strategy)
    tag = "dkdv" if strategy == "split" else "fused"
    monkeypatch.setitem(A._TILE_LISTS[tag], "d64", [A.Tile(64, 32, 8, 2, keys_major=keys_major)])
    monkeypatch.setattr(A, "_TUNERS", {})  # autotuners made from that list die with the test
    lens = [21, 5]
    cu = _cu(lens)
    n, h, d = sum(lens), 2, 64
    g = torch.Generator().manual_seed(1)
    q = torch.full((n, h, d), 6.0).half().to(DEVICE)
    k = (torch.full((n, h, d), -6.0) + 0.1 * torch.randn(n, h, d, generator=g)).half().to(DEVICE)
    v, do = (torch.randn(n, h, d, generator=g).half().to(DEVICE) for _ in range(2))
    api = lambda backend: lambda q, k, v: vk.varlen_attention(q, k, v, cu, cu, 21, 21, return_lse=True,
                                                              backend=backend)
    tri = _run(api("triton"), q, k, v, do)
    assert tri[1].max().item() < -250
    base = _run(lambda q, k, v: _same_dtype_torch(q, k, v, cu, cu, d ** -0.5), q, k, v, do)
    exp = _run(api("reference"), q.float(), k.float(), v.float(), do.float())
    for name, a, b, e in zip(("out", "lse", "dq", "dk", "dv"), tri, base, exp):
        if name != "lse":
            assert torch.isfinite(a).all(), name
            assert_matmul_rule(a, b, e, name=name)


@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
def test_fused_rope(interleaved, dtype, strategy):
    _check([19, 0, 6], [19, 0, 6], 2, 1, 64, dtype, rope_dims=(16, 24, 24),
           interleaved=interleaved)


def test_fused_rope_head_dim_72():
    _check([11, 7], [11, 7], 2, 2, 72, torch.float32, rope_dims=(24, 24, 24), interleaved=False)


def test_noncontiguous_inputs(strategy):
    lens = [9, 14]
    cu = _cu(lens)
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(sum(lens), 3, 2, 64, generator=g).to(DEVICE).requires_grad_(True)  # (N, 3, H, D)
    do = torch.randn(sum(lens), 2, 64, generator=g).to(DEVICE).transpose(0, 1).contiguous().transpose(0, 1)
    results = {}
    for backend in ("triton", "reference"):
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        assert not q.is_contiguous() and not do.is_contiguous()
        out = vk.varlen_attention(q, k, v, cu, cu, 14, 14, backend=backend)
        results[backend] = (out,) + torch.autograd.grad(out, qkv, do)
    for name, a, e in zip(("out", "d qkv"), results["triton"], results["reference"]):
        assert_verbose_close(a, e, atol=1e-4, rtol=1e-4, name=name)


@pytest.mark.parametrize("seed", range(16))
def test_random_combinations(monkeypatch, seed):
    # seeded draws of what the tests above vary one at a time: segment lengths (0 and 1
    # among them), cross-attention, GQA, head dim, dtype, a max_seqlen above the longest
    # segment, fused RoPE with an uneven split, backward strategy (105 such draws
    # matched the reference, 2026-11-27)
    rng = random.Random(seed)
    nseg = rng.randint(1, 4)
    lens_q = [rng.choice([0, 1, 2, 5, 17, 33]) for _ in range(nseg)]
    cross = rng.random() < 0.3
    lens_k = [rng.choice([0, 1, 3, 9, 20]) for _ in range(nseg)] if cross else lens_q
    d, hk = rng.choice([16, 32, 64, 72, 80]), rng.choice([1, 2])
    slack = rng.choice([0, 0, 7])
    rope_dims = None
    if not cross and rng.random() < 0.5:
        a = 2 * rng.randint(1, d // 6)
        b = 2 * rng.randint(1, (d - a) // 4)
        rope_dims = (a, b, d - a - b)
    strategy = rng.choice(["split", "atomic-dq"] + (["torch-fa2"] if DEVICE.type == "cuda" else []))
    monkeypatch.setenv("VDIT_ATTN_BWD", strategy)
    _check(lens_q, lens_k, hk * rng.choice([1, 2, 3]), hk, d, rng.choice(DOT_DTYPES),
           max_q=max(1, max(lens_q) + slack), max_k=max(1, max(lens_k) + slack), rope_dims=rope_dims,
           interleaved=rng.random() < 0.5, seed=seed)


@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_forward_through_tensor_descriptors(monkeypatch, dtype, d):
    # K/V read by TMA descriptors: whole blocks, the rows past a segment being the next
    # segment's keys (their scores -inf) or zeros past the end; GQA, empty key segments,
    # cross-attention lengths
    from vdit_kernels.triton import attention as A

    monkeypatch.setenv("VDIT_ATTN_FWD", "tma")
    monkeypatch.setenv("VDIT_ATTN_BWD_READ", "pointers")
    launched = []
    monkeypatch.setattr(A, "_row_descriptors", lambda a, b, n, f=A._row_descriptors: launched.append(n) or f(a, b, n))
    _check([17, 0, 1, 40], [17, 0, 1, 40], 4, 2, d, dtype, grads=False)
    _check([5, 9, 20], [3, 0, 33], 2, 1, d, dtype, grads=False)
    assert launched or torch.cuda.get_device_capability()[0] < 9  # no TMA before Hopper: pointers


@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("kernels", ["split", "atomic-dq"])
@_OLD_TMA_INTERPRETER
def test_backward_through_tensor_descriptors(monkeypatch, dtype, d, kernels):
    # dK/dV read q and dO, dQ reads k and v by TMA descriptors: whole blocks, the query rows
    # past a segment (the next segment's, or zeros past the end) get P = 0 from the tail
    # block's select in dK/dV, the key rows past one P = 0 in dQ. Lengths 0, 1 and ones that
    # end inside a block, GQA, cross-attention with an empty key segment
    from vdit_kernels.triton import attention as A

    monkeypatch.setenv("VDIT_ATTN_FWD", "pointers")
    monkeypatch.setenv("VDIT_ATTN_BWD", kernels)
    monkeypatch.setenv("VDIT_ATTN_BWD_READ", "tma")
    launched, boxes = [], []
    monkeypatch.setattr(A, "_row_descriptors", lambda a, b, n, f=A._row_descriptors: launched.append(n) or f(a, b, n))
    monkeypatch.setattr(A, "_dq_box", lambda dq, n, f=A._dq_box: boxes.append(n) or f(dq, n))
    _check([17, 0, 1, 40], [17, 0, 1, 40], 4, 2, d, dtype)
    _check([5, 9, 20], [3, 0, 33], 2, 1, d, dtype)
    # dK/dV's q and dO, and (split) dQ's k and v: two descriptor pairs per split backward;
    # atomic-dq adds its dQ boxes through one more descriptor (bulk reductions on a GPU; the
    # interpreter adds the same whole boxes, rows past a segment included, by element
    # atomics: what lands in the neighbouring segment's rows must be zeros)
    on_sm90 = DEVICE.type == "cpu" or torch.cuda.get_device_capability()[0] >= 9
    assert len(launched) == 2 * (2 if kernels == "split" else 1) or not on_sm90
    assert len(boxes) == (2 if kernels == "atomic-dq" and on_sm90 else 0)


@pytest.mark.parametrize("read", ["pointers", TMA])
def test_backward_of_a_broadcast_output_gradient(monkeypatch, read):
    # (out * w).sum() with w (H, D): autograd hands the op dO = w expanded over the tokens
    # (token stride 0). The op makes it contiguous before the kernels (ops/attention.py), so
    # the kernels never see those overlapping rows through the public API; this checks the
    # gradients end to end on both read paths. That the descriptor path refuses such rows
    # is test_tma_layout_conditions.
    monkeypatch.setenv("VDIT_ATTN_BWD_READ", read)
    lens = [17, 30]
    cu = _cu(lens)
    q, k, v, _ = _inputs(47, 47, 2, 2, 64, torch.float32, seed=9)
    w = torch.randn(2, 64, device=DEVICE)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = vk.varlen_attention(*leaves, cu, cu, 30, 30, backend=backend)
        grads[backend] = torch.autograd.grad((out * w).sum(), leaves)
    for name, a, e in zip(("dq", "dk", "dv"), grads["triton"], grads["reference"]):
        assert_verbose_close(a, e, atol=1e-4, rtol=1e-4, name=name)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="drives the autotuner with a fake timer under the interpreter")
@_OLD_TMA_INTERPRETER
def test_tma_forward_autotuner_sets_descriptor_blocks(monkeypatch):
    from vdit_kernels.triton import attention as A

    monkeypatch.setattr(A, "_half_on_gpu", lambda dtype, device: dtype == torch.float16)
    monkeypatch.setenv("VDIT_ATTN_FWD", "tma")
    monkeypatch.setenv("VDIT_ATTN_BWD", "split")
    monkeypatch.setenv("VDIT_ATTN_BWD_READ", "tma")
    size = A._size_class(130, 130)
    timed = _fake_autotune_timers(monkeypatch, tma=A._tuner("fwd_tma", size), dkdv=A._tuner("dkdv_tma", size),
                                  dq=A._tuner("dq_tma", size))
    _check([70, 3, 130], [70, 3, 130], 2, 1, 128, torch.float16)
    assert timed["tma"] == len(A._candidates("fwd", 128, torch.float16, torch.device("cuda"), tma=True))
    assert timed["dkdv"] == len(A._candidates("dkdv", 128, torch.float16, torch.device("cuda"), tma=True))
    assert timed["dq"] == len(A._candidates("dq", 128, torch.float16, torch.device("cuda"), tma=True))


def test_tma_layout_conditions(monkeypatch):
    from vdit_kernels.triton import attention as A

    monkeypatch.setattr(A, "_BWD_READ_CHOICE", {})
    monkeypatch.delenv("VDIT_ATTN_BWD_READ", raising=False)
    monkeypatch.delenv("VDIT_ATTN_FWD", raising=False)

    q = torch.empty(10, 4, 128)
    assert A._tma_possible(torch.empty(10, 2, 128), torch.empty(10, 2, 128))
    assert A._tma_possible(q, torch.empty(10, 2, 128), q)
    assert not A._tma_possible(torch.empty(10, 2, 96), torch.empty(10, 2, 96))   # head dim 96
    kv = torch.empty(10, 2, 256)[..., :128]                                       # head stride 256
    assert not A._tma_possible(kv, kv)
    shifted = torch.empty(10 * 4 * 128 + 1)[1:].view(10, 4, 128)                # base 4 bytes off 16
    assert not A._tma_possible(q, shifted)
    assert not A._tma_possible(q, torch.empty(1, 4, 128).expand(10, 4, 128))     # an expanded gradient
    assert not A._tma_possible(q.double())
    assert A.fwd_variant(False) == "pointers"
    assert A.fwd_variant(True) == "pointers"  # auto with nothing measured
    assert A.bwd_read(False, True) == "pointers"
    assert A.bwd_read(False, True, key="k", measure=lambda: "tma") == "tma"
    assert A.bwd_read(True, True, key="k", measure=lambda: "tma") == "pointers"  # deterministic


def test_backward_strategy_choice(monkeypatch):
    from vdit_kernels.triton import attention as A

    monkeypatch.setattr(A, "_STRATEGY_CHOICE", {})
    monkeypatch.delenv("VDIT_ATTN_BWD", raising=False)
    assert A.bwd_strategy(False) == "split"  # auto with nothing to measure (CPU, float32)
    timed = []

    def measure():
        timed.append(1)
        return "atomic-dq"
    assert A.bwd_strategy(False, key="k", measure=measure) == "atomic-dq"
    assert A.bwd_strategy(False, key="k", measure=measure) == "atomic-dq" and len(timed) == 1  # cached
    assert A.bwd_strategy(True, key="k", measure=measure) == "split"  # deterministic: no atomics
    assert A.bwd_strategy(False, key="k") == "atomic-dq"  # measured before: kept where it can't be timed
    assert A.bwd_strategy(False, key="other") == "split"
    monkeypatch.setenv("VDIT_ATTN_BWD", "split")
    assert A.bwd_strategy(False, key="k", measure=measure) == "split"
    monkeypatch.setenv("VDIT_ATTN_BWD", "atomic-dq")
    assert A.bwd_strategy(False) == "atomic-dq"
    monkeypatch.setenv("VDIT_ATTN_BWD", "atomics")
    with pytest.raises(ValueError, match="VDIT_ATTN_BWD must be one of"):
        A.bwd_strategy(False)
    # torch-fa2 only where the call can run it: forced elsewhere, split runs instead
    monkeypatch.setenv("VDIT_ATTN_BWD", "torch-fa2")
    assert A.bwd_strategy(False) == "split"
    assert A.bwd_strategy(False, available=A.BWD_STRATEGIES) == "torch-fa2"
    assert A.bwd_strategy(True, available=A.BWD_STRATEGIES) == "split"
    monkeypatch.setenv("VDIT_ATTN_BWD", "auto")
    assert A.bwd_strategy(False, key="k3", measure=lambda: "torch-fa2", available=A.BWD_STRATEGIES) == "torch-fa2"
    assert A.bwd_strategy(False, key="one", measure=measure, available=("split",)) == "split"
    assert len(timed) == 1  # a single available strategy is not timed
    # "triton": measured among the Triton kernels only
    monkeypatch.setattr(A, "_torch_fa2_possible", lambda q, grad_lse, *others: True)
    assert A.bwd_available(torch.empty(2, 1, 64), None) == A.BWD_STRATEGIES
    monkeypatch.setenv("VDIT_ATTN_BWD", "triton")
    assert A.bwd_available(torch.empty(2, 1, 64), None) == ("split", "atomic-dq")
    assert A.bwd_strategy(False, key="k4", measure=measure, available=("split", "atomic-dq")) == "atomic-dq"
    monkeypatch.setattr(A, "_STRATEGY_CHOICE", {(128, torch.bfloat16, 2, "cuda:0", (2, 0), A.BWD_STRATEGIES):
                                                 "torch-fa2"})
    monkeypatch.setattr(A, "_FWD_CHOICE", {})
    monkeypatch.setattr(A, "_BWD_READ_CHOICE", {(128, torch.bfloat16, 2, "cuda:0", (2, 0), "split"): "tma"})
    assert A.measured_choices()[1] == "backward read split D=128 bfloat16 GQA groups=2 cuda:0 size class (2, 0): tma"
    assert A.measured_choices()[0] == ("backward D=128 bfloat16 GQA groups=2 cuda:0 size class (2, 0): torch-fa2 "
                                       "(of split, atomic-dq, torch-fa2)")


def test_size_classes_get_their_own_autotuners():
    # a text-length cross-attention and a long self-attention pick tiles apart
    from vdit_kernels.triton import attention as A

    assert A._size_class(32760, 32760) == (2, 2) and A._size_class(32760, 77) == (2, 0)
    assert A._size_class(256, 257) == (0, 1) and A._size_class(4096, 4097) == (1, 2)
    long, text = A._tuner("dkdv", (2, 2)), A._tuner("dkdv", (2, 0))
    assert long is not text and long is A._tuner("dkdv", (2, 2)) and long.cache is not text.cache
    assert long.fn is text.fn  # one kernel: the compiled variants are shared


def test_size_classes_never_share_triton_disk_cache(monkeypatch):
    # Triton's on-disk autotuning cache (TRITON_CACHE_AUTOTUNING=1, off under the
    # interpreter) names an entry by kernel, configs and key, which has no size class: a
    # long self-attention would get the tile a text cross-attention picked
    import triton
    from vdit_kernels.triton import attention as A

    monkeypatch.setattr(A, "_TUNERS", {})
    monkeypatch.setattr(triton.knobs.autotuning, "cache", True)
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    plain = triton.autotune([triton.Config({})], key=["D"])(A._TUNED_KERNELS["dq"])
    assert plain.cache_results  # (what the setting does to an autotuner that does not opt out)
    for tag in A._TUNED_KERNELS:
        assert not A._tuner(tag, (2, 2)).cache_results and not A._tuner(tag, (2, 0)).cache_results


def test_autotuned_choices_name_the_picked_tiles():
    from types import SimpleNamespace

    import triton

    from vdit_kernels.triton import autotuned_choices

    capped = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2, maxnreg=128)
    plain = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2)
    tuner = SimpleNamespace(cache={(128, 1, "torch.bfloat16"): capped}, configs_timings={capped: [1.5, 1.4, 1.6],
                                                                                         plain: 2.0})
    lines = autotuned_choices({"fwd_tma": tuner, "unused": SimpleNamespace(cache={})})
    assert lines == ["fwd_tma (128, 1, 'torch.bfloat16'): BLOCK_M=128 BLOCK_N=64 w8 s2 maxnreg=128",
                     "fwd_tma candidates (last key timed): BLOCK_M=128 BLOCK_N=64 w8 s2 maxnreg=128: 1.500, "
                     "BLOCK_M=128 BLOCK_N=128 w8 s2: 2.000"]


@gpu_only
def test_torch_fa2_gives_way_to_split_with_a_gradient_into_lse(monkeypatch):
    # FlashAttention-2's backward has no lse-gradient term: with one (merged partial
    # results) the forced torch-fa2 must run the Triton split kernels instead
    cu = _cu([40, 7])
    q, k, v, do = _inputs(47, 47, 4, 2, 64, torch.bfloat16)
    dlse = torch.randn(4, 47, device=DEVICE)
    grads = {}
    for forced in ("split", "torch-fa2"):
        monkeypatch.setenv("VDIT_ATTN_BWD", forced)
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = vk.varlen_attention(*leaves, cu, cu, 40, 40, return_lse=True, backend="triton")
        loss = (out.float() * do.float()).sum() + (lse * dlse).sum()
        grads[forced] = torch.autograd.grad(loss, leaves)
    for name, a, b in zip(("dq", "dk", "dv"), grads["torch-fa2"], grads["split"]):
        assert torch.equal(a, b), name


def test_torch_fa2_call_matches_the_aten_schema():
    # the arguments reach aten._flash_attention_backward's meta kernel: schema, keyword
    # names and GQA shapes are checked without a GPU (the numbers only on one)
    from vdit_kernels.triton.attention import _torch_fa2_backward

    q = torch.empty(100, 4, 64, dtype=torch.bfloat16, device="meta")
    kv = torch.empty(100, 2, 64, dtype=torch.bfloat16, device="meta")
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    lse = torch.empty(4, 100, device="meta")
    dq, dk, dv = _torch_fa2_backward(q, q, kv, kv, q, lse, cu, cu, 60, 60, 0.125)
    assert dq.shape == q.shape and dk.shape == dv.shape == kv.shape and dq.dtype == torch.bfloat16


def test_torch_fa2_conditions():
    from vdit_kernels.triton import attention as A

    q = torch.empty(4, 2, 64, dtype=torch.float16)
    assert not A._torch_fa2_possible(q, None)  # not on a GPU
    if DEVICE.type == "cuda":
        qc = q.cuda()
        expected = torch.backends.cuda.is_flash_attention_available()
        assert A._torch_fa2_possible(qc, None) == expected
        assert not A._torch_fa2_possible(qc, torch.zeros(2, 4, device="cuda"))  # gradient into lse
        assert not A._torch_fa2_possible(qc.float(), None)
        assert not A._torch_fa2_possible(torch.empty(4, 2, 68, dtype=torch.float16, device="cuda"), None)
        # its 16-byte loads: a view 8 bytes into its rows is not offered to it
        wide = torch.empty(4, 2, 72, dtype=torch.float16, device="cuda")
        assert A._torch_fa2_possible(qc, None, wide[..., :64]) == expected
        assert not A._torch_fa2_possible(qc, None, wide[..., 4:68])
        assert A.bwd_available(qc, None) == (A.BWD_STRATEGIES if expected else A.BWD_STRATEGIES[:2])


@gpu_only
def test_auto_strategy_is_measured_once_gpu(monkeypatch):
    from vdit_kernels.triton import attention as A

    monkeypatch.setattr(A, "_STRATEGY_CHOICE", {})
    monkeypatch.setattr(A, "_FWD_CHOICE", {})
    monkeypatch.setattr(A, "_BWD_READ_CHOICE", {})
    for env in ("VDIT_ATTN_BWD", "VDIT_ATTN_FWD", "VDIT_ATTN_BWD_READ"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("VDIT_AUTOTUNE", "1")  # the suite turns autotuning off (conftest)
    _check([300, 77], [300, 77], 4, 2, 128, torch.bfloat16)
    (choice,) = A._STRATEGY_CHOICE.values()
    assert choice in A.BWD_STRATEGIES
    (variant,) = A._FWD_CHOICE.values()
    assert variant in A.READS
    # the reads of each Triton strategy, measured inside the strategy's own timing run
    reads = dict(A._BWD_READ_CHOICE)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert {key[5] for key in reads} == ({"split", "atomic-dq"} if hopper else set())
    assert set(reads.values()) <= set(A.READS)
    _check([270, 5], [270, 5], 4, 2, 128, torch.bfloat16)  # same key (size class too): no new measurement
    assert len(A._STRATEGY_CHOICE) == 1 and len(A._FWD_CHOICE) == 1 and A._BWD_READ_CHOICE == reads


_GPU_PARAM = [pytest.mark.gpu, pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU")]


@pytest.mark.parametrize("lens", [[21, 3, 40], pytest.param([2500, 700, 1], marks=_GPU_PARAM)], ids=str)
def test_deterministic_bitwise(monkeypatch, lens):
    # deterministic=True overrides VDIT_ATTN_BWD and autotuning: the atomic-free kernels at
    # their class's first tile. Checked on what launches (the interpreter runs programs one
    # at a time, so atomics would be reproducible there too), and on a GPU bitwise over runs
    # long enough that atomic dQ adds would land in varying order
    from vdit_kernels.triton import attention as A

    monkeypatch.setenv("VDIT_ATTN_BWD", "atomic-dq")
    monkeypatch.setenv("VDIT_AUTOTUNE", "1")
    launches = []
    real = A._launch
    monkeypatch.setattr(A, "_launch", lambda raw, tuned, tag, grid, args, tiles, fixed, **kw:
                        launches.append((tag, fixed, kw.get("ATOMIC_DQ"))) or
                        real(raw, tuned, tag, grid, args, tiles, fixed, **kw))
    cu = _cu(lens)
    q, k, v, do = _inputs(sum(lens), sum(lens), 4, 1, 64, torch.float16, seed=2)
    runs = []
    for _ in range(5 if DEVICE.type == "cuda" else 2):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = vk.varlen_attention(qq, kk, vv, cu, cu, max(lens), max(lens), deterministic=True,
                                  backend="triton")
        runs.append((out,) + torch.autograd.grad(out, (qq, kk, vv), do))
    backward = [entry for entry in launches if not entry[0].startswith("fwd")]  # fwd or fwd_tma
    assert backward and {tag.removesuffix("_tma") for tag, _, _ in backward} == {"dkdv", "dq"}
    assert all(fixed and not atomic for _, fixed, atomic in backward), backward
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="forces GPU tiles under the interpreter")
def test_deterministic_runs_the_first_tiles_not_the_autotuned_ones(monkeypatch):
    # with GPU tiles (several candidates a kernel) and autotuning on, deterministic=True
    # times nothing in the backward and launches each kernel at its list's first tile
    # (test_deterministic_bitwise checks what is asked of _launch; this, what it runs)
    from vdit_kernels.triton import attention as A

    monkeypatch.setattr(A, "_half_on_gpu", lambda dtype, device: dtype == torch.float16)
    monkeypatch.setenv("VDIT_AUTOTUNE", "1")
    monkeypatch.setenv("VDIT_ATTN_BWD", "atomic-dq")
    for name in ("VDIT_ATTN_FWD", "VDIT_ATTN_BWD_READ"):
        monkeypatch.setenv(name, "pointers")
    lens = [70, 3, 130]
    size = A._size_class(130, 130)
    timed = _fake_autotune_timers(monkeypatch, **{tag: A._tuner(tag, size) for tag in ("fwd", "dkdv", "dq", "fused")})
    launched = []
    real = A.launch_first_that_fits
    monkeypatch.setattr(A, "launch_first_that_fits",
                        lambda what, tiles, key, run: launched.append((what, tiles[0])) or real(what, tiles, key, run))
    cu = _cu(lens)
    q, k, v, do = _inputs(sum(lens), sum(lens), 2, 1, 64, torch.float16, seed=2)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = vk.varlen_attention(*leaves, cu, cu, 130, 130, deterministic=True, backend="triton")
    grads = torch.autograd.grad(out, leaves, do)
    assert not {"dkdv", "dq", "fused"} & set(timed), timed
    cuda = torch.device("cuda")
    first = {f"attention {tag}": A._candidates(tag, 64, torch.float16, cuda)[0] for tag in ("dkdv", "dq")}
    assert len(A._candidates("dkdv", 64, torch.float16, cuda)) > 1 and len(A._candidates("dq", 64, torch.float16, cuda)) > 1
    assert [entry for entry in launched if entry[0] in first] == list(first.items())
    expect = torch.autograd.grad(vk.varlen_attention(*(t.float() for t in leaves), cu, cu, 130, 130,
                                                     backend="reference"), leaves, do.float())
    same = _run(lambda q, k, v: _same_dtype_torch(q, k, v, cu, cu, 1 / 8), q, k, v, do)[2:]  # plain float16 PyTorch
    for name, a, t, e in zip(("dq", "dk", "dv"), grads, same, expect):
        assert_matmul_rule(a, t, e, name=name)


@gpu_only
@pytest.mark.parametrize("max_len", [None, 1100])  # exactly the longest segment, or a bound
@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
def test_long_segment_gpu(dtype, max_len):
    _check([1025, 300], [1025, 300], 4, 2, 128, dtype, max_q=max_len, max_k=max_len)


# -- launch configuration (pure Python: no GPU needed) -----------------------------------

@pytest.mark.parametrize("d", [48, 64, 72, 96, 128, 256])
def test_autotune_candidates_are_the_class_tiles_and_statically_checked(d):
    from vdit_kernels.triton import attention as A

    cuda = torch.device("cuda")
    # a tile: its constexprs (KEYS_MAJOR too) and launch options (the register cap too)
    for tag in ("fwd", "fwd_tma", "dkdv", "dq", "fused", "dkdv_tma", "dq_tma", "fused_tma"):
        configs = A._prune(tag)(A._configs(tag), {}, D=d)
        kernel, tma = tag.removesuffix("_tma"), tag.endswith("_tma")
        tiles = A._candidates(kernel, d, torch.bfloat16, cuda, tma)
        assert sorted((sorted(c.kwargs.items()), c.num_warps, c.num_stages, c.maxnreg or 0) for c in configs) \
            == sorted((sorted(A._tile_meta(tag, t).items()), t.warps, t.stages, t.maxnreg or 0) for t in tiles)
    # every tile a GPU may run is compiled (and checked for spills) by the static report
    static = {(s["fn"].__name__, s["constexprs"]["BLOCK_M"], s["constexprs"]["BLOCK_N"], s["num_warps"],
               s["num_stages"], s.get("maxnreg"), s["constexprs"]["BLOCK_D"], s["constexprs"].get("TMA"),
               s["constexprs"].get("ATOMIC_DQ"), s["constexprs"].get("KEYS_MAJOR"))
              for s in A.aot_specs() if "BLOCK_N" in s["constexprs"]}
    bd = A._block_d(d)
    for tma in ((False, True) if d in (64, 128) else (False,)):
        for bm, bn, w, st, _, cap in A._candidates("fwd", d, torch.bfloat16, cuda, tma):
            assert ("_attn_fwd_kernel", bm, bn, w, st, cap, bd, tma, None, None) in static
        for tag, atomic in (("dkdv", False), ("fused", True)):
            for own, loop, w, st, keys_major, cap in A._candidates(tag, d, torch.bfloat16, cuda, tma):
                assert ("_attn_bwd_dkdv_kernel", loop, own, w, st, cap, bd, tma, atomic, keys_major) in static
        for own, loop, w, st, _, cap in A._candidates("dq", d, torch.bfloat16, cuda, tma):
            assert ("_attn_bwd_dq_kernel", own, loop, w, st, cap, bd, tma, None, None) in static


def test_head_dim_limit():
    cu = _cu([4])
    q = torch.randn(4, 1, 264, device=DEVICE)
    with pytest.raises(vk.BackendUnavailable, match="head_dim <= 256"):
        vk.varlen_attention(q, q, q, cu, cu, 4, 4, backend="triton")


@gpu_only
@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
def test_head_dims_gpu(d, strategy):
    _check([300, 5, 129], [300, 5, 129], 4, 2, d, torch.bfloat16)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="drives the autotuner with a fake timer under the interpreter")
@pytest.mark.parametrize("d,rope_dims", [(64, None), (64, (16, 24, 24)), (96, None), (128, (44, 42, 42)),
                                         (256, None)])
@pytest.mark.parametrize("strategy", ["split", "atomic-dq"])
def test_gpu_tiles_under_the_interpreter(monkeypatch, d, rope_dims, strategy):
    # Runs the GPU launch path (autotuner, class pruning, the large GPU tiles, grids from
    # the tuned tiles) on CPU: the interpreter executes every candidate of the class; a
    # fake timer ranks the last one timed best. float16: the interpreter's bf16 dot is wrong.
    from vdit_kernels.triton import attention as A

    monkeypatch.setattr(A, "_half_on_gpu", lambda dtype, device: dtype == torch.float16)
    monkeypatch.setenv("VDIT_ATTN_BWD", strategy)
    lens = [70, 3, 130]
    snapshots = {}
    timed = _fake_autotune_timers(monkeypatch, snapshots, **{tag: A._tuner(tag, A._size_class(130, 130))
                                                             for tag in ("fwd", "dkdv", "dq", "fused")})
    _check(lens, lens, 2, 1, d, torch.float16, seed=4, rope_dims=rope_dims)
    # _check verified the last candidate timed (the one kept); every other candidate wrote
    # the same buffers to within float16 rounding of a different summation order
    for tag, runs in snapshots.items():
        for i, run in enumerate(runs[:-1]):
            for a, kept in zip(run, runs[-1]):
                finite = torch.isfinite(kept)  # (-inf lse rows: no keys)
                assert torch.equal(finite, torch.isfinite(a)), (tag, i)
                err = (a[finite].float() - kept[finite].float()).abs().max().item()
                bound = 1e-2 * kept[finite].float().abs().max().item() + 1e-3
                assert err <= bound, f"{tag} candidate {i} of {len(runs)}: off the kept one by {err:.3g} > {bound:.3g}"
    n_fwd = len(A._candidates("fwd", d, torch.float16, torch.device("cuda")))
    assert timed.get("fwd", 0) == (n_fwd if n_fwd > 1 else 0)
    for tag in (("dkdv", "dq") if strategy == "split" else ("fused",)):
        n_bwd = len(A._candidates(tag, d, torch.float16, torch.device("cuda")))
        assert timed.get(tag, 0) == (n_bwd if n_bwd > 1 else 0), tag
    unused = {"fused"} if strategy == "split" else {"dkdv", "dq"}
    assert not unused & set(timed), "the other strategy's kernels ran"


@pytest.mark.skipif(DEVICE.type != "cpu", reason="forces GPU tiles under the interpreter")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("read", ["pointers", TMA])
def test_default_gpu_tiles_under_the_interpreter(monkeypatch, d, read):
    # the first tile of every list (what VDIT_AUTOTUNE=0 and deterministic=True run on a
    # GPU: flex_attention's keys-major 128 x 64 dK/dV step at D = 64, dQ 128 x 64), each
    # checked, not only the one an autotuner keeps
    from vdit_kernels.triton import attention as A

    monkeypatch.setattr(A, "_half_on_gpu", lambda dtype, device: dtype == torch.float16)
    monkeypatch.setenv("VDIT_AUTOTUNE", "0")
    monkeypatch.setenv("VDIT_ATTN_BWD", "split")
    monkeypatch.setenv("VDIT_ATTN_FWD", read)
    monkeypatch.setenv("VDIT_ATTN_BWD_READ", read)
    _check([70, 3, 130], [70, 3, 130], 2, 1, d, torch.float16, seed=5)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="forces GPU tiles under the interpreter")
@pytest.mark.parametrize("read", ["pointers", TMA])
def test_fixed_tiles_give_way_to_the_next_candidate_that_fits(monkeypatch, caplog, read):
    # fixed launches (VDIT_AUTOTUNE=0, as deterministic=True) on a GPU with 99 KB of shared
    # memory (sm_86 / sm_89 / sm_120): the D = 128 dQ default (128 x 64, 3 stages: 136 KB
    # there) cannot launch; the next candidate runs, gives the right result (the
    # 2x-PyTorch rule, _check), and later calls go to it directly
    import vdit_kernels.triton as triton_pkg
    from vdit_kernels.triton import attention as A

    monkeypatch.setattr(A, "_half_on_gpu", lambda dtype, device: dtype == torch.float16)
    monkeypatch.setattr(triton_pkg, "TOO_LARGE", set())
    monkeypatch.setenv("VDIT_AUTOTUNE", "0")
    monkeypatch.setenv("VDIT_ATTN_BWD", "split")
    monkeypatch.setenv("VDIT_ATTN_FWD", read)
    monkeypatch.setenv("VDIT_ATTN_BWD_READ", read)
    tiles = A._candidates("dq", 128, torch.float16, torch.device("cuda"), tma=read == "tma")
    assert tiles[1].own != tiles[0].own
    launched = []
    monkeypatch.setattr(A, "_attn_bwd_dq_kernel", OutOfSharedMemory(
        A._attn_bwd_dq_kernel, lambda kw: kw["BLOCK_M"] == tiles[0].own, lambda kw: kw["BLOCK_M"], launched))
    lens = [70, 3, 130]
    with caplog.at_level(logging.WARNING, logger="vdit_kernels"):
        first = _check(lens, lens, 2, 1, 128, torch.float16, seed=3)
    assert launched == [tiles[0].own, tiles[1].own]
    assert "does not fit this GPU" in caplog.text
    launched.clear()
    second = _check(lens, lens, 2, 1, 128, torch.float16, seed=3)
    assert launched == [tiles[1].own]
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # the same tile, the same bits


@pytest.mark.skipif(DEVICE.type != "cpu", reason="drives the autotuner with a fake timer under the interpreter")
@pytest.mark.parametrize("d,rope_dims", [(64, None), (128, (44, 42, 42))])
@pytest.mark.parametrize("strategy", ["split", "atomic-dq"])
@_OLD_TMA_INTERPRETER
def test_gpu_tiles_through_descriptors_under_the_interpreter(monkeypatch, d, rope_dims, strategy):
    # the same with every kernel reading through TMA descriptors: each candidate of the TMA
    # lists (the 128-key dK/dV blocks among them) runs, the last one timed is checked
    from vdit_kernels.triton import attention as A

    monkeypatch.setattr(A, "_half_on_gpu", lambda dtype, device: dtype == torch.float16)
    monkeypatch.setenv("VDIT_ATTN_BWD", strategy)
    monkeypatch.setenv("VDIT_ATTN_FWD", "tma")
    monkeypatch.setenv("VDIT_ATTN_BWD_READ", "tma")
    lens = [70, 3, 130]
    tags = ("fwd_tma", "dkdv_tma", "dq_tma") if strategy == "split" else ("fwd_tma", "fused_tma")
    timed = _fake_autotune_timers(monkeypatch, **{tag: A._tuner(tag, A._size_class(130, 130)) for tag in tags})
    _check(lens, lens, 2, 1, d, torch.float16, seed=4, rope_dims=rope_dims)
    cuda = torch.device("cuda")
    assert timed["fwd_tma"] == len(A._candidates("fwd", d, torch.float16, cuda, tma=True))
    for tag in tags[1:]:
        assert timed[tag] == len(A._candidates(tag.removesuffix("_tma"), d, torch.float16, cuda, tma=True)), tag


@pytest.mark.skipif(DEVICE.type != "cpu", reason="forces GPU tiles under the interpreter")
@pytest.mark.parametrize("keys_major", [False, True], ids=["queries-major", "keys-major"])
@pytest.mark.parametrize("strategy", ["split", "atomic-dq"])
def test_dkdv_orientations_with_gpu_tiles(monkeypatch, keys_major, strategy):
    # both orientations of the dK/dV products at a GPU tile (64 keys x 32 queries, wgmma
    # shapes), GQA, segments shorter than, equal to and longer than a block
    from vdit_kernels.triton import attention as A

    monkeypatch.setattr(A, "_half_on_gpu", lambda dtype, device: dtype == torch.float16)
    monkeypatch.setenv("VDIT_AUTOTUNE", "0")  # the first (only) tile, no timing
    monkeypatch.setenv("VDIT_ATTN_BWD", strategy)
    tag = "dkdv" if strategy == "split" else "fused"
    monkeypatch.setitem(A._TILE_LISTS[tag], "d64", [A.Tile(64, 32, 8, 2, keys_major=keys_major)])
    monkeypatch.setattr(A, "_TUNERS", {})  # autotuners made from that list die with the test
    _check([64, 5, 97], [64, 5, 97], 4, 2, 64, torch.float16, seed=3)


# the buffers each autotuned kernel writes (its arguments by name)
_KERNEL_OUTPUTS = {"fwd": ("O", "LSE"), "dkdv": ("DK", "DV"), "fused": ("DK", "DV", "DQ"), "dq": ("DQ",)}


def _fake_autotune_timers(monkeypatch, snapshots: dict = None, **tuners) -> dict:
    """Give each autotuner (by tag) a fake timer that runs the candidate and ranks the last
    one timed best, with an empty cache; returns {tag: candidates timed}. With `snapshots`,
    also {tag: [the buffers each candidate wrote]} (copies, in the order timed)."""
    timed = {}
    for tag, tuned in tuners.items():
        def fake_bench(kernel_call, quantiles, tag=tag, tuned=tuned):
            kernel_call()
            timed[tag] = timed.get(tag, 0) + 1
            if snapshots is not None:
                names = _KERNEL_OUTPUTS[tag.removesuffix("_tma")]
                snapshots.setdefault(tag, []).append([tuned.nargs[name].clone() for name in names])
            return [1.0 / timed[tag]] * 3
        monkeypatch.setitem(tuned.__dict__, "do_bench", fake_bench)
        monkeypatch.setattr(tuned, "cache", {})
    return timed


def _rows_reference(q, k, v, rows, scale, dtype=torch.float32):
    """Attention of the query rows `rows` of one segment over all its keys (GQA-expanded),
    every product in `dtype` (float32: the reference; q's dtype: the "PyTorch in the same
    dtype" baseline of the 2x rule): a few rows of a very long segment, without the full
    score matrix. Returns out (r, H, D) and lse (H, r) float32; differentiable."""
    groups = q.shape[1] // k.shape[1]
    qs = q[rows].to(dtype).transpose(0, 1)                                 # (H, r, D)
    ks = k.to(dtype).repeat_interleave(groups, 1).transpose(0, 1)          # (H, N, D)
    vs = v.to(dtype).repeat_interleave(groups, 1).transpose(0, 1)
    s = (qs @ ks.transpose(1, 2)) * scale
    return (torch.softmax(s, -1) @ vs).transpose(0, 1), torch.logsumexp(s.float(), -1)


@gpu_only
def test_single_segment_of_100k_tokens_gpu():
    n, h, hk, d = 100_003, 4, 2, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(n, heads, d, device="cuda", generator=g, dtype=torch.bfloat16)
               for heads in (h, hk, hk))
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    out, lse = vk.varlen_attention(q, k, v, cu, cu, n, n, return_lse=True, backend="triton")
    rows = torch.cat([torch.arange(0, 64), torch.arange(n // 2, n // 2 + 64), torch.arange(n - 64, n)]).cuda()
    exp_out, exp_lse = _rows_reference(q, k, v, rows, d ** -0.5)
    # outputs average 100k values of v: about 0.005 each, so the 2x rule, not an atol
    base_out, _ = _rows_reference(q, k, v, rows, d ** -0.5, torch.bfloat16)
    assert_matmul_rule(out[rows], base_out, exp_out, name="out", floor=0)
    assert_verbose_close(lse[:, rows], exp_lse, atol=1e-3, rtol=0, name="lse")


@gpu_only
def test_pack_past_int32_element_offsets_gpu():
    # 131 segments of 2048 tokens, 64 heads of 128: q has 2.2e9 > 2^31 elements, so token
    # and head offsets must be computed in int64 (forward and backward: dq, dk, dv)
    seg, nseg, h, d = 2048, 131, 64, 128
    n = seg * nseg
    assert n * h * d > 2 ** 31
    q, k, v = (torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16).mul_(0.5).requires_grad_(True)
               for _ in range(3))
    cu = torch.arange(nseg + 1, dtype=torch.int32, device="cuda") * seg
    out, lse = vk.varlen_attention(q, k, v, cu, cu, seg, seg, return_lse=True, backend="triton")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    last = slice(n - seg, n)  # the segment whose offsets overflow int32
    every = torch.arange(seg, device="cuda")

    def segment(dtype):
        leaves = [t[last].detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        o, s_lse = _rows_reference(*leaves, every, d ** -0.5, dtype)
        return (o.detach(), s_lse) + torch.autograd.grad(o, leaves, do[last].to(dtype))

    exp, base = segment(torch.float32), segment(torch.bfloat16)
    assert_verbose_close(lse[:, last], exp[1], atol=1e-3, rtol=0, name="lse")
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), (out,) + grads, base[:1] + base[2:], exp[:1] + exp[2:]):
        assert_matmul_rule(a[last], b, e, name=name, floor=0)


def test_atomic_dq_rotates_back_in_one_dtype(monkeypatch):
    # atomic-dq accumulates dq in float32: it is cast before the inverse rotation, whose
    # CUDA kernel takes q and k of one dtype (the interpreter's Triton kernel took both)
    from vdit_kernels.triton import attention as A

    monkeypatch.setenv("VDIT_ATTN_BWD", "atomic-dq")
    seen = []
    real = A._rotate
    monkeypatch.setattr(A, "_rotate", lambda q, k, rope, inverse, inplace=False:
                        seen.append((inverse, q.dtype, k.dtype)) or real(q, k, rope, inverse, inplace))
    _check([21, 9], [21, 9], 2, 1, 64, torch.float16, rope_dims=(16, 24, 24))
    assert (True, torch.float16, torch.float16) in seen and all(qd == kd for _, qd, kd in seen)


def test_packs_past_the_grid_limit_are_refused():
    from vdit_kernels.triton import attention as A

    q = torch.randn(1, 1, 16, device=DEVICE)
    cu = torch.tensor([0] + [1] * (A.MAX_SEGMENTS + 1), dtype=torch.int32, device=DEVICE)
    with pytest.raises(vk.BackendUnavailable, match="up to 65535 segments"):
        vk.varlen_attention(q, q, q, cu, cu, 1, 1, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda" or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tensors_on_a_device_that_is_not_current():
    # Triton launches on the current device: the backend makes the tensors' device current
    with torch.cuda.device(0):
        lens = [40, 7]
        q, k, v, do = (t.to("cuda:1") for t in _inputs(47, 47, 2, 1, 64, torch.float16))
        cu = _cu(lens).to("cuda:1")
        out = vk.varlen_attention(q, k, v, cu, cu, 40, 40, backend="triton")
        exp = vk.varlen_attention(q.float(), k.float(), v.float(), cu, cu, 40, 40, backend="reference")
        assert out.device == q.device
        assert_verbose_close(out.float(), exp, atol=2e-2, rtol=0, name="out")


def test_row_alignment_hint_claims_only_what_holds():
    # ROW_ALIGN tells the compiler every row offset is a multiple of it (16-byte accesses
    # for head dims such as 72 on a GPU); the interpreter ignores hints, so the host
    # computation behind it is checked here
    from vdit_kernels.triton.attention import _row_align

    assert _row_align(torch.empty(10, 24, 72)) == 8
    assert _row_align(torch.empty(10, 24, 128), torch.empty(10, 8, 128)) == 8
    assert _row_align(torch.empty(10, 3, 36)) == 4                     # head stride 36
    assert _row_align(torch.empty(10, 24, 72), torch.empty(10, 3, 20)) == 4
    assert _row_align(torch.empty(10, 5, 16)[:, :, :9]) == 8            # strides 80, 16
    assert _row_align(torch.empty(10, 2, 3, 9)[:, :, 0]) == 1           # token stride 54, head 27


def test_measured_choice_skips_a_failing_variant(monkeypatch):
    import vdit_kernels.triton as T
    from benchmarks.run import measured_variants

    monkeypatch.setattr(T, "_sample_ms", lambda fn: fn())
    monkeypatch.setattr(T, "VARIANT_TIMES", [])

    def broken():
        raise RuntimeError("no TMA here")
    assert T.fastest("attention forward read", {"tma": broken, "pointers": lambda: 2.0}) == "pointers"
    assert T.fastest("patch_embed backward", {"a": lambda: 3.0, "b": lambda: 1.0}) == "b"
    # the timings reach the benchmarks' summary
    assert T.VARIANT_TIMES == ["attention forward read: pointers 2.000 ms: pointers",
                               "patch_embed backward: a 3.000 ms, b 1.000 ms: b"]
    assert "variants timed: patch_embed backward: a 3.000 ms, b 1.000 ms: b" in measured_variants()
    with pytest.raises(RuntimeError, match="no TMA here"):
        T.fastest("attention forward read", {"tma": broken})
    # nothing is timed on CPU tensors or in float32 (the first option runs)
    assert T.timing("attention backward", {"a": broken}, torch.empty(1, dtype=torch.float16)) is None
    assert not T.can_measure(torch.empty(1))


def test_fastest_takes_the_median_of_interleaved_rounds(monkeypatch):
    import vdit_kernels.triton as T

    order = []

    def variant(name, times):  # each call returns its next "device time"; the first is the warm-up
        it = iter(times)
        return lambda: order.append(name) or next(it)
    monkeypatch.setattr(T, "_sample_ms", lambda fn: fn())
    monkeypatch.setattr(T, "VARIANT_TIMES", [])
    # one slow first sample of "a" (60 ms: the round sets 3 rounds, the minimum) must not
    # decide: medians 2 vs 3
    assert T.fastest("x", {"a": variant("a", [0, 60, 1, 2]), "b": variant("b", [0, 3, 3, 3])}) == "a"
    assert order == ["a", "b"] + ["a", "b"] * 3  # warm-ups, then turns
    # short calls: as many rounds as fit 100 ms, at most 10
    calls = []
    T.fastest("y", {"c": lambda: calls.append(1) or 1.0})
    assert len(calls) == 1 + T.MAX_ROUNDS


# -- VDIT_TUNING_CACHE: measured variants and autotuned tiles kept between processes -----

def _new_process(monkeypatch):
    """Forget what this process measured and read from the tuning cache (as a new one)."""
    from vdit_kernels.triton import attention as A
    from vdit_kernels.triton import tuning_cache as TC
    monkeypatch.setattr(A, "_TUNERS", {})
    monkeypatch.setattr(TC, "_STATE", {"path": None, "entries": None, "new": {}})
    monkeypatch.setattr(TC, "_PREFILLED", set())
    monkeypatch.setattr(TC, "USED", [])


def test_tuning_cache_keeps_measured_variants(monkeypatch, tmp_path):
    from vdit_kernels.triton import measured_choice
    from vdit_kernels.triton import tuning_cache as TC

    key = (128, torch.bfloat16, 2, torch.device("cuda", 0), (2, 2))
    options = ("a", "b", "c")
    _new_process(monkeypatch)
    monkeypatch.delenv("VDIT_TUNING_CACHE", raising=False)  # off: nothing read or written
    assert measured_choice("VDIT_TEST_VARIANT", options, {}, key, lambda: "b") == "b"
    assert TC.recall("VDIT_TEST_VARIANT", key) is None and TC.save() is None

    monkeypatch.setenv("VDIT_TUNING_CACHE", str(tmp_path))
    assert measured_choice("VDIT_TEST_VARIANT", options, {}, key, lambda: "b") == "b"
    path = TC.save()
    assert path.parent == tmp_path and f"triton{triton.__version__}" in path.name and TC.save() is None
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as the umask allows (mkstemp: 0600)
    _new_process(monkeypatch)

    def must_not_measure():
        raise AssertionError("measured again")
    assert measured_choice("VDIT_TEST_VARIANT", options, {}, key, must_not_measure) == "b"
    assert TC.describe() == f"VDIT_TUNING_CACHE: {path}; picks of earlier processes used instead of timing: " \
                            f"VDIT_TEST_VARIANT {key!r}"
    # another key, or a saved choice this call cannot run: measured
    assert measured_choice("VDIT_TEST_VARIANT", options, {}, key[:4] + ((2, 0),), lambda: "c") == "c"
    assert measured_choice("VDIT_TEST_VARIANT", options, {}, key, lambda: "c", available=("a", "c")) == "c"
    assert measured_choice("VDIT_TEST_VARIANT", options, {}, key, None) == "a"  # nothing may be timed
    assert TC.describe().endswith(f"VDIT_TEST_VARIANT {key!r}")  # the misses are not "used" picks
    # other Triton sources (or GPU, or releases): another file
    _new_process(monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(TC, "sources_digest", lambda: "0123456789abcdef")
        assert TC.cache_path() != path and TC.recall("VDIT_TEST_VARIANT", key) is None
    # the digest covers what the measured kernels and variants run: an edit to the Triton
    # kernels, the CUDA wrappers or the launch tables' pack.py makes another file
    package = tmp_path / "package"
    for pattern in TC._SOURCES:
        for source in TC._PACKAGE.glob(pattern):
            (package / source.relative_to(TC._PACKAGE)).parent.mkdir(parents=True, exist_ok=True)
            (package / source.relative_to(TC._PACKAGE)).write_bytes(source.read_bytes())
    digests = set()
    with monkeypatch.context() as m:
        m.setattr(TC, "_PACKAGE", package)
        for edited in ("triton/patch.py", "cuda/patch.py", "pack.py"):
            with (package / edited).open("a") as f:
                f.write("\n# edited\n")
            TC.sources_digest.cache_clear()
            digests.add(TC.sources_digest())
    TC.sources_digest.cache_clear()
    assert len(digests) == 3
    # an unreadable file counts as empty, and is replaced by the next save; entries of
    # another form are ignored (a cache never fails a call)
    path.write_text("{not json")
    _new_process(monkeypatch)
    assert measured_choice("VDIT_TEST_VARIANT", options, {}, key, lambda: "c") == "c"
    assert TC.save() == path and json.loads(path.read_text()) == {"VDIT_TEST_VARIANT": {repr(key): "c"}}
    path.write_text(json.dumps({"VDIT_TEST_VARIANT": ["b"], "autotune dq size class (2, 2)": {
        "a": [1], "b": {"key": [[64], 1]}, "c": {"key": [64, 1], "config": "?"}}}))
    _new_process(monkeypatch)
    assert measured_choice("VDIT_TEST_VARIANT", options, {}, key, lambda: "a") == "a"
    from vdit_kernels.triton import attention as A
    assert A._tuner("dq", (2, 2)).cache == {}


def test_tuning_cache_is_written_at_exit(tmp_path):
    code = ("import vdit_kernels.triton as T; "
            "print(T.measured_choice('VDIT_TEST_VARIANT', ('a', 'b'), {}, (64, 'key'), lambda: 'b'))")
    env = {**os.environ, "VDIT_TUNING_CACHE": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "b", run.stderr
    (path,) = tmp_path.glob("*.json")
    assert json.loads(path.read_text()) == {"VDIT_TEST_VARIANT": {"(64, 'key')": "b"}}


def test_tuning_cache_processes_exiting_together_keep_every_pick(tmp_path):
    # torchrun's ranks exit together: each merges its picks into the file under a lock (an
    # unlocked read-merge-rename kept 1 to 5 of 8)
    # (each reads the file slowly, then waits for the others before exiting: their saves overlap)
    code = "\n".join([
        "import pathlib, sys, time", "import vdit_kernels.triton as T", "from vdit_kernels.triton import tuning_cache as TC",
        "T.measured_choice('VDIT_TEST_VARIANT', ('a', 'b'), {}, (64, int(sys.argv[1])), lambda: 'b')",
        "read = TC._read", "TC._read = lambda path: (read(path), time.sleep(0.3))[0]",
        "ready = pathlib.Path(sys.argv[2])", "(ready / sys.argv[1]).touch()",
        "while len(list(ready.iterdir())) < 4: time.sleep(0.01)"])
    (tmp_path / "ready").mkdir()
    (cache := tmp_path / "cache").mkdir()
    env = {**os.environ, "VDIT_TUNING_CACHE": str(cache)}
    runs = [subprocess.Popen([sys.executable, "-c", code, str(rank), str(tmp_path / "ready")], env=env,
                             stderr=subprocess.PIPE, text=True) for rank in range(4)]
    assert all(run.wait(timeout=300) == 0 for run in runs), [run.stderr.read() for run in runs]
    (path,) = cache.glob("*.json")
    assert json.loads(path.read_text()) == {"VDIT_TEST_VARIANT": {f"(64, {rank})": "b" for rank in range(4)}}
    assert not list(cache.glob("*.tmp"))


def test_tuning_cache_settings_and_failures(monkeypatch, tmp_path, capsys):
    # "off" words are off, "on" words the default folder; a missing home folder turns the
    # cache off with a note; a failed write leaves no partial file and fails no call
    from pathlib import Path

    from vdit_kernels.triton import autotune_enabled
    from vdit_kernels.triton import tuning_cache as TC

    _new_process(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    for word in ("0", "false", "Off", "no", ""):
        monkeypatch.setenv("VDIT_TUNING_CACHE", word)
        assert TC.cache_path() is None
    for word in ("1", "true", "ON", "yes"):
        monkeypatch.setenv("VDIT_TUNING_CACHE", word)
        assert TC.cache_path().parent == tmp_path / ".cache" / "vdit_kernels"
    monkeypatch.setattr(TC, "_WARNED", set())
    with monkeypatch.context() as m:
        m.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
        assert TC.cache_path() is None and TC.recall("VDIT_TEST_VARIANT", (1,)) is None
    assert "off: no home folder to put it in (no home)" in capsys.readouterr().err
    monkeypatch.setenv("VDIT_TUNING_CACHE", str(tmp_path / "cache"))
    TC.remember("VDIT_TEST_VARIANT", (1,), "a")
    with monkeypatch.context() as m:
        m.setattr(TC.json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        TC._save_at_exit()
    assert "could not save this run's picks" in capsys.readouterr().err
    assert list((tmp_path / "cache").iterdir()) == [TC.cache_path().with_name(TC.cache_path().name + ".lock")]
    for word, on in (("0", False), ("false", False), ("off", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("VDIT_AUTOTUNE", word)
        assert autotune_enabled() is on
    monkeypatch.setenv("VDIT_AUTOTUNE", "sometimes")
    with pytest.raises(ValueError, match="VDIT_AUTOTUNE must be 1 or 0 .*got 'sometimes'"):
        autotune_enabled()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="forces GPU tiles under the interpreter")
def test_tuning_cache_keeps_autotuned_tiles(monkeypatch, tmp_path):
    # a process saves the tiles its autotuners picked; the next starts its autotuners with
    # them and times nothing for those keys (the fake timer ranks the last candidate best,
    # not the default first one)
    from vdit_kernels.triton import attention as A
    from vdit_kernels.triton import describe_config
    from vdit_kernels.triton import tuning_cache as TC

    monkeypatch.setenv("VDIT_TUNING_CACHE", str(tmp_path))
    monkeypatch.setattr(A, "_half_on_gpu", lambda dtype, device: dtype == torch.float16)
    monkeypatch.setenv("VDIT_AUTOTUNE", "1")
    monkeypatch.setenv("VDIT_ATTN_BWD", "split")
    for name in ("VDIT_ATTN_FWD", "VDIT_ATTN_BWD_READ"):
        monkeypatch.setenv(name, "pointers")
    lens, tags = [70, 3, 130], ("fwd", "dkdv", "dq")
    size = A._size_class(130, 130)
    cu = _cu(lens)
    q, k, v, do = _inputs(sum(lens), sum(lens), 2, 1, 64, torch.float16, seed=3)

    def step():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = vk.varlen_attention(*leaves, cu, cu, 130, 130, backend="triton")
        return (out,) + torch.autograd.grad(out, leaves, do)

    _new_process(monkeypatch)
    timed = _fake_autotune_timers(monkeypatch, **{tag: A._tuner(tag, size) for tag in tags})
    first = step()
    assert set(timed) == set(tags)
    picked = {tag: {key: describe_config(c) for key, c in A._tuner(tag, size).cache.items()} for tag in tags}
    assert TC.save() is not None

    _new_process(monkeypatch)
    for tag in tags:
        tuner = A._tuner(tag, size)
        assert {key: describe_config(c) for key, c in tuner.cache.items()} == picked[tag]
        assert tuner.cache and all(c in tuner.configs for c in tuner.cache.values())
        assert f"autotune {tag} size class {size}" in TC.describe()
        monkeypatch.setitem(tuner.__dict__, "do_bench", lambda *args, **kwargs: pytest.fail("timed again"))
    for a, b in zip(step(), first):
        assert torch.equal(a, b)
