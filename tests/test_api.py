"""Public API: backend choice, bad input, registered ops (opcheck, torch.compile), gradients."""

import dataclasses

import pytest
import torch

import vdit_kernels as vk
from conftest import CUDA_BACKEND, device_for, gpu_only, needs_extension
from vdit_kernels import backend as B
from vdit_kernels import reference as ref
from vdit_kernels.ops import attention as attn_ops, patch as patch_ops, rope as rope_ops


def _make_pack(device="cpu"):
    return vk.VideoPack.from_shapes([(2, 4, 6), (1, 2, 2), (3, 2, 4)], (1, 2, 2), text_lengths=[3, 0, 5],
                                    device=device)


@pytest.fixture
def pack():
    return _make_pack()


def _qkv(n, heads=4, kv_heads=2, d=12, dtype=torch.float64, nk=None, requires_grad=False):
    nk = n if nk is None else nk
    g = torch.Generator().manual_seed(0)
    mk = lambda rows, h: torch.randn(rows, h, d, generator=g, dtype=dtype).requires_grad_(requires_grad)
    return mk(n, heads), mk(nk, kv_heads), mk(nk, kv_heads)


# -- backend choice -------------------------------------------------------------------

def test_resolve_order(monkeypatch):
    monkeypatch.delenv("VDIT_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert B.resolve("patch", cpu) == "reference"  # auto on CPU is the reference path
    monkeypatch.setenv("VDIT_BACKEND", "reference")
    assert B.resolve("rope", cpu) == "reference"
    with vk.use_backend("reference"):
        assert B.resolve("attention", cpu, None) == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        B.resolve("patch", cpu, "tpu")
    with pytest.raises(ValueError, match="unknown backend"):
        with vk.use_backend("fast"):
            pass
    with pytest.raises(ValueError, match="unknown backend ''"):  # given, not "not given"
        B.resolve("patch", cpu, "")


def test_backends_run_only_the_dtypes_they_compute_in(monkeypatch):
    # float64 attention or RoPE kernels would compute in float32 (or worse): a named backend
    # says so, auto takes the reference path; the Triton patch ops compute float64 exactly.
    # The interpreter is faked in the backend's check, not in TRITON_INTERPRET: on a GPU,
    # a kernel module imported while that variable is set gets interpreted kernels for the
    # rest of the process (36 later tests of one worker failed so on 2026-11-27)
    monkeypatch.setattr(B, "triton_interpreter", lambda: True)
    monkeypatch.delenv("VDIT_BACKEND", raising=False)
    f64, cuda = torch.float64, torch.device("cuda")
    for family, op in (("attention", "varlen_attention_fwd"), ("rope", "rope_3d")):
        with pytest.raises(vk.BackendUnavailable, match="not float64.*reference"):
            B.resolve(family, torch.device("cpu"), "triton", op, f64)
        assert B.resolve(family, cuda, None, op, f64) == "reference"  # (no device is touched)
        assert B.resolve(family, torch.device("cpu"), "triton", op, torch.float16) == "triton"
    assert B.resolve("patch", torch.device("cpu"), "triton", "patch_embed", f64) == "triton"
    q = torch.randn(4, 1, 8, dtype=f64)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(vk.BackendUnavailable, match="float64"):
        vk.varlen_attention(q, q, q, cu, cu, 4, 4, backend="triton")


def test_interpreter_refuses_bfloat16_matrix_products(monkeypatch):
    # the interpreter's bfloat16 tl.dot multiplies raw bits (upstream): the matmul ops say
    # so instead of returning garbage (patch_embed was off by 1e10); the copies and RoPE run
    monkeypatch.setattr(B, "triton_interpreter", lambda: True)
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    for family, op in (("patch", "patch_embed"), ("patch", "linear_unpatchify"),
                       ("attention", "varlen_attention_fwd")):
        with pytest.raises(vk.BackendUnavailable, match="interpreter multiplies bfloat16"):
            B.resolve(family, cpu, "triton", op, bf16)
        assert B.resolve(family, cpu, "triton", op, torch.float16) == "triton"
    for family, op in (("patch", "patchify"), ("patch", "unpatchify"), ("rope", "rope_3d")):
        assert B.resolve(family, cpu, "triton", op, bf16) == "triton"
    q = torch.randn(4, 1, 16, dtype=bf16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(vk.BackendUnavailable, match="bfloat16"):
        vk.varlen_attention(q, q, q, cu, cu, 4, 4, backend="triton")
    # under autocast too: each op resolves its backend in the dtype it computes in, after
    # the cast (patch_embed resolved on its float32 inputs, then ran bfloat16 products)
    pack = vk.VideoPack.from_shapes([(1, 4, 4)], patch_size=(1, 2, 2))
    videos, w, x = [torch.randn(4, 1, 4, 4)], torch.randn(8, 4, 1, 2, 2), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=bf16):
        for call in (lambda: vk.patch_embed(videos, pack, w, None, backend="triton"),
                     lambda: vk.linear_unpatchify(x, pack, torch.randn(16, 8), None, 4, backend="triton"),
                     lambda: vk.varlen_attention(q.float(), q.float(), q.float(), cu, cu, 4, 4, backend="triton")):
            with pytest.raises(vk.BackendUnavailable, match="interpreter multiplies bfloat16"):
                call()


def test_available_backends_says_what_runs_here():
    with pytest.raises(ValueError, match="unknown op family"):
        vk.available_backends("conv")
    for family in B.FAMILIES:
        assert vk.available_backends(family, "cpu")[0] == "reference"
        if not torch.cuda.is_available():  # nothing runs on CUDA tensors without a GPU
            assert vk.available_backends(family, "cuda") == ["reference"]
            assert "no CUDA GPU is visible" in B.why_not("triton", family, torch.device("cuda"))


def test_named_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(B, "triton_interpreter", lambda: False)  # (not the variable: see above)
    with pytest.raises(vk.BackendUnavailable, match="triton.*CUDA tensors"):
        B.resolve("rope", torch.device("cpu"), "triton")
    with pytest.raises(vk.BackendUnavailable, match="cuda"):
        B.resolve("attention", torch.device("cpu"), "cuda")  # no CUDA attention, and CPU tensors
    pack = vk.VideoPack.from_shapes([(1, 2, 2)], (1, 2, 2))
    q = torch.randn(1, 1, 12)
    with vk.use_backend("cuda"):
        with pytest.raises(vk.BackendUnavailable):
            vk.apply_rope_3d(q, q, pack, (4, 4, 4))
    # the same types under torch.compile: raised inside the constant-result lookup they came
    # out as dynamo's InternalTorchDynamoError, which `except BackendUnavailable` missed
    for backend, error in (("cuda", vk.BackendUnavailable), ("bogus", ValueError)):
        torch._dynamo.reset()
        compiled = torch.compile(lambda q: vk.apply_rope_3d(q, q, pack, (4, 4, 4), backend=backend)[0],
                                 backend="eager")
        with pytest.raises(error, match=backend):
            compiled(q)


@needs_extension
def test_extension_loaded_with_its_schemas():
    assert B.extension() is not None, "vdit_kernels._C did not load"
    info = torch.ops.vdit_C.build_info()
    assert info.startswith("vdit_kernels._C cuda=")
    assert torch.ops.vdit_C.has_cuda() == ("cuda=1" in info)


# -- bad input ------------------------------------------------------------------------

def test_a_pack_that_is_not_a_videopack(pack):
    videos = [torch.randn(3, *s) for s in pack.shapes]
    q = torch.randn(pack.num_tokens, 1, 12)
    tokens = vk.patchify(videos, pack)
    for call in (lambda p: vk.patchify(videos, p), lambda p: vk.unpatchify(tokens, p, 3),
                 lambda p: vk.patch_embed(videos, p, torch.randn(8, 3, 1, 2, 2)),
                 lambda p: vk.linear_unpatchify(torch.randn(pack.num_tokens, 8), p, torch.randn(12, 8), None, 3),
                 lambda p: vk.apply_rope_3d(q, q, p, (4, 4, 4)), lambda p: vk.Rope3D.from_pack(p, (4, 4, 4))):
        for not_a_pack in (pack.shapes, {"shapes": pack.shapes}):
            with pytest.raises(TypeError, match="pack must be a VideoPack"):
                call(not_a_pack)
    # fewer q rows than the pack's tokens: said of the pack, not of positions never passed
    with pytest.raises(ValueError, match=f"q and k have 3 tokens but the pack has {pack.num_tokens}"):
        vk.apply_rope_3d(q[:3], q[:3], pack, (4, 4, 4))


def test_bad_videos(pack):
    videos = [torch.randn(3, *s) for s in pack.shapes]
    with pytest.raises(ValueError, match="got 2 videos for a pack of 3"):
        vk.patchify(videos[:2], pack)
    with pytest.raises(ValueError, match=r"video 1 has \(T, H, W\)"):
        vk.patchify([videos[0], torch.randn(3, 1, 4, 2), videos[2]], pack)
    with pytest.raises(ValueError, match="video 2 has 4 channels"):
        vk.patchify([videos[0], videos[1], torch.randn(4, *pack.shapes[2])], pack)
    with pytest.raises(ValueError, match="dtype"):
        vk.patchify([videos[0], videos[1].half(), videos[2]], pack)
    with pytest.raises(ValueError, match="video 1 is on meta but video 0 is on cpu"):
        vk.patchify([videos[0], videos[1].to("meta"), videos[2]], pack)
    with pytest.raises(TypeError, match="video 2 must be a tensor, got list"):
        vk.patchify([videos[0], videos[1], videos[2].tolist()], pack)
    for not_videos in (None, 5, dict(enumerate(videos))):  # (a dict iterates its keys)
        with pytest.raises(TypeError, match="latents must be a"):
            vk.patchify(not_videos, pack)
    with pytest.raises(ValueError, match=r"\(C, T, H, W\)"):
        vk.patchify([videos[0][0], videos[1], videos[2]], pack)
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        vk.patchify(torch.randn(3, 2, 4, 6), pack)
    with pytest.raises(ValueError, match="must be float"):
        vk.patchify([v.long() for v in videos], pack)
    w = torch.randn(8, 3, 1, 2, 2)
    with pytest.raises(ValueError, match="patch size"):
        vk.patch_embed(videos, pack, torch.randn(8, 3, 1, 1, 2))
    with pytest.raises(ValueError, match="expects 5 channels"):
        vk.patch_embed(videos, pack, torch.randn(8, 5, 1, 2, 2))
    with pytest.raises(ValueError, match="bias must be"):
        vk.patch_embed(videos, pack, w, torch.randn(7))
    with pytest.raises(ValueError, match="features"):
        vk.unpatchify(torch.randn(pack.num_tokens, 11), pack, 3)
    with pytest.raises(ValueError, match="rows"):
        vk.unpatchify(torch.randn(5, 12), pack, 3)
    for channels in (3.0, True, 0):
        with pytest.raises(ValueError, match="channels must be a positive int"):
            vk.unpatchify(torch.randn(pack.num_tokens, 12), pack, channels)
    with pytest.raises(TypeError, match="bias must be a tensor"):
        vk.patch_embed(videos, pack, w, [0.0] * 8)
    with pytest.raises(TypeError, match="weight must be a tensor"):
        vk.linear_unpatchify(torch.randn(pack.num_tokens, 8), pack, None, None, 3)


def test_videos_fast_check_accepts_what_the_named_checks_accept(pack):
    # check_videos tries one comparison per video first (host time) and names what is
    # wrong only when that fails: the two must accept the same inputs, with one channel count
    from vdit_kernels.checks import _check_each_video, _videos_match
    good = [torch.randn(3, *s) for s in pack.shapes]
    cases = [good, [v.half() for v in good], [v.double() for v in good],
             [torch.nn.Parameter(v) for v in good], [v.transpose(2, 3).contiguous().transpose(2, 3) for v in good],
             [torch.randn(0, *s) for s in pack.shapes], [good[0], good[1].half(), good[2]],
             [v.long() for v in good], [v > 0 for v in good], [good[0][0], good[1], good[2]],
             [good[0], good[1][:, :, :1], good[2]], [good[0], good[1], torch.randn(4, *pack.shapes[2])],
             [good[0], good[1].to("meta"), good[2]], [good[0], good[1].tolist(), good[2]],
             [good[0].tolist(), good[1], good[2]], [v[None] for v in good]]
    for i, videos in enumerate(cases):
        fast = _videos_match(videos, pack)
        try:
            named = _check_each_video(videos, pack)
        except (ValueError, TypeError):
            named = None
        assert fast == named, f"case {i}: the fast check says {fast}, the named checks {named}"
    assert _videos_match(good, pack) == 3


def test_pack_sizes_must_be_ints():
    for kwargs, name in ((dict(shapes=[(1, 4.5, 4)]), "video 0: shape"), (dict(shapes=["144"]), "video 0: shape"),
                         (dict(shapes=[(1, 4, 4)], patch_size=(1, 2.7, 2)), "patch_size"),
                         (dict(shapes=[(1, 4, 4)], patch_size=2.0), "patch_size"),
                         (dict(shapes=[(1, 4, 4)], text_lengths=[2.9]), "text_lengths")):
        with pytest.raises(ValueError, match=name):  # never truncated to a different video
            vk.VideoPack.from_shapes(**kwargs)
    import numpy as np
    pack = vk.VideoPack.from_shapes([(np.int64(2), torch.tensor(4), 4)], np.int32(2), text_lengths=[np.int64(3)])
    assert pack.shapes == ((2, 4, 4),) and pack.patch_size == (2, 2, 2) and pack.cu_seqlens_k.tolist() == [0, 3]


def test_bad_rope(pack):
    q = torch.randn(pack.num_tokens, 2, 12)
    with pytest.raises(ValueError, match="sum to 14"):
        vk.apply_rope_3d(q, q, pack, (4, 4, 6))
    with pytest.raises(ValueError, match="even"):
        vk.apply_rope_3d(q, q, pack, (3, 5, 4))
    with pytest.raises(ValueError, match="share N and head_dim"):
        vk.apply_rope_3d(q, q[:3], pack, (4, 4, 4))
    with pytest.raises(ValueError, match="positions has 3 rows"):
        vk.apply_rope_3d(q, q, None, (4, 4, 4), positions=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="dtype"):
        vk.apply_rope_3d(q, q.double(), pack, (4, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, heads, head_dim\)"):
        vk.apply_rope_3d(q[:, 0], q[:, 0], pack, (4, 4, 4))
    with pytest.raises(ValueError, match="records no gradient"):
        vk.apply_rope_3d(q.clone().requires_grad_(), q.clone(), pack, (4, 4, 4), inplace=True)
    for theta in (0.0, -5.0, float("inf"), float("nan"), torch.tensor(-5.0), torch.tensor([1e4, 1e4]),
                  torch.tensor(1e4, requires_grad=True), torch.tensor(True)):
        with pytest.raises(ValueError, match="theta"):
            vk.apply_rope_3d(q, q, pack, (4, 4, 4), theta=theta)
        with pytest.raises(ValueError, match="theta"):
            vk.Rope3D.from_pack(pack, (4, 4, 4), theta=theta)
    # a one-element tensor (a config buffer) is its value, as softmax_scale takes one
    expect = vk.apply_rope_3d(q, q, pack, (4, 4, 4), theta=500.0)
    for got in (vk.apply_rope_3d(q, q, pack, (4, 4, 4), theta=torch.tensor(500.0)),
                vk.apply_rope_3d(q, q, pack, (4, 4, 4), theta=torch.tensor([500], dtype=torch.int32))):
        assert all(torch.equal(a, b) for a, b in zip(got, expect))
    for theta in (torch.tensor(500.0), torch.tensor([500], dtype=torch.int32)):
        kept = vk.Rope3D.from_pack(pack, (4, 4, 4), theta=theta).theta
        # a float, not the tensor: a later bfloat16 cast of the Rope3D (FSDP's of a module's
        # inputs) would make a tensor theta of 10000 one of 9984
        assert type(kept) is float and kept == 500.0
    pos = pack.positions.float().requires_grad_()
    with pytest.raises(ValueError, match="positions.detach"):  # no gradient would reach it
        vk.apply_rope_3d(q, q, None, (4, 4, 4), positions=pos)
    with pytest.raises(ValueError, match="integer or floating"):
        vk.apply_rope_3d(q, q, None, (4, 4, 4), positions=pack.positions.bool())
    for dims in ((3, 3, 3), (4.5, 4, 4), (4, 4)):  # at once, not first at the attention call
        with pytest.raises(ValueError, match="rope dims"):
            vk.Rope3D.from_pack(pack, dims)
    # conventions and flags are bools, never the truth of something else
    for bad in (None, "no", 0):
        with pytest.raises(TypeError, match="interleaved must be a bool"):
            vk.apply_rope_3d(q, q, pack, (4, 4, 4), interleaved=bad)
        with pytest.raises(TypeError, match="inplace must be a bool"):
            vk.apply_rope_3d(q, q.clone(), pack, (4, 4, 4), inplace=bad)
        with pytest.raises(TypeError, match="interleaved must be a bool"):
            vk.Rope3D.from_pack(pack, (4, 4, 4), interleaved=bad)
    with pytest.raises(TypeError, match="rope.interleaved must be a bool"):
        vk.varlen_attention(q, q, q, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen, pack.max_seqlen,
                            rope=vk.Rope3D(pack.float_positions, (4, 4, 4), interleaved=None))
    with pytest.raises(TypeError, match="positions must be a tensor"):
        vk.apply_rope_3d(q, q, None, (4, 4, 4), positions=pack.positions.tolist())
    # from_pack's explicit positions get the same checks as apply_rope_3d's, against the pack
    with pytest.raises(TypeError, match="positions must be a tensor"):
        vk.Rope3D.from_pack(pack, (4, 4, 4), positions=pack.positions.tolist())
    with pytest.raises(ValueError, match="integer or floating"):
        vk.Rope3D.from_pack(pack, (4, 4, 4), positions=pack.positions.bool())
    with pytest.raises(ValueError, match="positions has 3 rows"):
        vk.Rope3D.from_pack(pack, (4, 4, 4), positions=torch.zeros(3, 3))
    # a pack given with positions must still describe q's tokens
    other = vk.VideoPack.from_shapes([(1, 2, 2)], (1, 2, 2))
    with pytest.raises(ValueError, match="but the pack has 1"):
        vk.apply_rope_3d(q, q, other, (4, 4, 4), positions=pack.float_positions)
    # a pack on another device is named as the pack, not as positions the caller never passed
    meta = torch.empty(pack.num_tokens, 2, 12, device="meta")
    with pytest.raises(ValueError, match="the pack is on cpu but q and k are on meta"):
        vk.apply_rope_3d(meta, meta, pack, (4, 4, 4))


def test_rope_keeps_float64_positions_for_float64_inputs(pack):
    # the reference path computes float64 in float64: fractional positions rounded to float32
    # first would cap it at float32's accuracy (about 5e-5 at positions near 1000)
    g = torch.Generator().manual_seed(0)
    pos = 1000 + torch.rand(pack.num_tokens, 3, generator=g, dtype=torch.float64)
    q = torch.randn(pack.num_tokens, 2, 12, generator=g, dtype=torch.float64)
    k = torch.randn(pack.num_tokens, 1, 12, generator=g, dtype=torch.float64)
    expect = ref.apply_rope_3d(q, k, None, (4, 4, 4), positions=pos)
    got = vk.apply_rope_3d(q, k, None, (4, 4, 4), positions=pos, backend="reference")
    assert torch.allclose(got[0], expect[0], rtol=0, atol=1e-12) and torch.allclose(got[1], expect[1], rtol=0,
                                                                                     atol=1e-12)
    rope = vk.Rope3D.from_pack(pack, (4, 4, 4), positions=pos)
    assert rope.positions.dtype == torch.float64
    # integer positions stay integers (exact under a mixed-precision cast of float inputs)
    assert vk.Rope3D.from_pack(pack, (4, 4, 4), positions=pack.positions).positions.dtype == torch.int32
    assert vk.Rope3D.from_pack(pack, (4, 4, 4)).positions.dtype == torch.int32
    v = torch.randn(pack.num_tokens, 1, 12, generator=g, dtype=torch.float64)
    out = vk.varlen_attention(q, k, v, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen, pack.max_seqlen,
                              rope=rope, backend="reference")
    expect_out = ref.varlen_attention(*expect, v, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen,
                                      pack.max_seqlen)
    assert torch.allclose(out, expect_out, rtol=0, atol=1e-12)
    # Rope3D compares by identity (== of its positions tensors has no single truth value: raised)
    assert rope != vk.Rope3D.from_pack(pack, (4, 4, 4), positions=pos)


def test_rope3d_positions_as_the_attention_reads_them(pack):
    # varlen_attention(rope=) takes float positions: a Rope3D of the pack's own positions
    # reads the pack's float32 copy (converted once per pack); other positions are
    # converted at every call, so that every change to them is seen (in place, through
    # .data, which no version counter records); float64 q gets float64 positions
    rope = vk.Rope3D.from_pack(pack, (4, 4, 4))
    first = rope.positions_for(torch.float32)
    assert first is pack.float_positions and torch.equal(first, pack.positions.float())
    assert rope.positions_for(torch.bfloat16) is first
    assert vk.Rope3D.from_pack(pack, (4, 4, 4)).positions_for(torch.float16) is first  # per pack
    assert rope.positions_for(torch.float64).dtype == torch.float64
    assert dataclasses.replace(rope, theta=500.0).positions_for(torch.float32) is not first  # not the pack's
    q, k, v = _qkv(pack.num_tokens, dtype=torch.float32)
    cu, m = pack.cu_seqlens, pack.max_seqlen
    out = vk.varlen_attention(q, k, v, cu, cu, m, m, rope=rope)
    positions = pack.positions.clone()
    rope = vk.Rope3D(positions, (4, 4, 4))
    torch.testing.assert_close(vk.varlen_attention(q, k, v, cu, cu, m, m, rope=rope), out, rtol=0, atol=0)
    for change in (lambda: positions[:, 0].add_(3), lambda: positions.data[:, 1].add_(2)):
        change()
        got = vk.varlen_attention(q, k, v, cu, cu, m, m, rope=rope)
        expect = ref.varlen_attention(*ref.apply_rope_3d(q, k, None, (4, 4, 4), positions=positions.float()),
                                      v, cu, cu, m, m)
        torch.testing.assert_close(got, expect)
    # float32 positions are taken as they are; inference tensors give a normal copy
    rope = vk.Rope3D(pack.positions.float(), (4, 4, 4))
    assert rope.positions_for(torch.float16) is rope.positions
    with torch.inference_mode():
        made = pack.positions.float()
    got = vk.Rope3D(made, (4, 4, 4)).positions_for(torch.float32)
    assert not got.is_inference() and torch.equal(got, made)


def _skip_unless_rope_runs(backend):
    reason = B.why_not(backend, "rope", device_for(backend), "rope_3d_")
    if reason is not None:
        pytest.skip(f"backend {backend}: {reason}")


@pytest.mark.parametrize("backend", ["reference", "triton", CUDA_BACKEND])  # cuda: the C++ op checks
def test_inplace_rope_refuses_overlapping_q_and_k(pack, backend):
    # each shared element would be rotated twice by the kernels (once by the reference)
    _skip_unless_rope_runs(backend)
    pack = pack.to(device_for(backend))
    x = torch.randn(pack.num_tokens, 3, 12, device=pack.device)
    for q, k in ((x, x), (x[:, 0:2], x[:, 1:3]), (x[:, :1].expand(-1, 2, -1), x[:, 2:])):
        with pytest.raises(ValueError, match="inplace RoPE"):
            vk.apply_rope_3d(q, k, pack, (4, 4, 4), inplace=True, backend=backend)
    # disjoint views of one buffer (q and k of a fused qkv projection) are fine
    qkv = torch.randn(pack.num_tokens, 3, 2, 12, device=x.device)
    expect = vk.apply_rope_3d(qkv[:, 0], qkv[:, 1], pack, (4, 4, 4), backend="reference")
    vk.apply_rope_3d(qkv[:, 0], qkv[:, 1], pack, (4, 4, 4), inplace=True, backend=backend)
    assert torch.allclose(qkv[:, 0], expect[0], atol=1e-6) and torch.allclose(qkv[:, 1], expect[1], atol=1e-6)
    # a GQA projection: 4 q heads, then 2 k heads and 2 v heads, in one (N, 8, D) buffer
    qkv = torch.randn(pack.num_tokens, 8, 12, device=x.device)
    q, k = qkv[:, :4], qkv[:, 4:6]
    expect = vk.apply_rope_3d(q, k, pack, (4, 4, 4), backend="reference")
    v = qkv[:, 6:].clone()
    vk.apply_rope_3d(q, k, pack, (4, 4, 4), inplace=True, backend=backend)
    assert torch.allclose(q, expect[0], atol=1e-6) and torch.allclose(k, expect[1], atol=1e-6)
    assert torch.equal(qkv[:, 6:], v)
    with pytest.raises(ValueError, match="inplace RoPE"):  # one head in common
        vk.apply_rope_3d(qkv[:, :4], qkv[:, 3:5], pack, (4, 4, 4), inplace=True, backend=backend)
    # positions in q's memory would be overwritten while other tokens read them
    buf = torch.randn(pack.num_tokens * 2 * 12, device=x.device)
    with pytest.raises(ValueError, match="inplace RoPE: positions share memory with q or k"):
        vk.apply_rope_3d(buf.view(-1, 2, 12), qkv[:, 4:6], dims=(4, 4, 4), inplace=True, backend=backend,
                         positions=buf[:pack.num_tokens * 3].view(-1, 3))
    # the same views through DLPack: one memory, different storages (told apart by address)
    shared = lambda t: torch.from_dlpack(t)  # noqa: E731
    q, k = shared(qkv[:, :4]), shared(qkv[:, 3:5])
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="inplace RoPE: q and k may share elements"):
        vk.apply_rope_3d(q, k, pack, (4, 4, 4), inplace=True, backend=backend)
    q, k = shared(qkv[:, :4]), shared(qkv[:, 4:6])
    expect = vk.apply_rope_3d(q, k, pack, (4, 4, 4), backend="reference")
    vk.apply_rope_3d(q, k, pack, (4, 4, 4), inplace=True, backend=backend)
    assert torch.allclose(qkv[:, :4], expect[0], atol=1e-6) and torch.allclose(qkv[:, 4:6], expect[1], atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton", CUDA_BACKEND])
def test_inplace_rope_on_inference_tensors(pack, backend):
    # torch's in-place ops refuse inference tensors outside inference mode; the reference
    # path did (through torch), the kernels wrote through pointers regardless
    _skip_unless_rope_runs(backend)
    pack = pack.to(device_for(backend))
    with torch.inference_mode():
        q, k = (torch.randn(pack.num_tokens, 2, 12, device=pack.device) for _ in range(2))
    before = q.clone(), k.clone()
    with pytest.raises(RuntimeError, match="inplace RoPE: q is an inference tensor"):
        vk.apply_rope_3d(q, k, pack, (4, 4, 4), inplace=True, backend=backend)
    assert torch.equal(q, before[0]) and torch.equal(k, before[1])
    with torch.inference_mode():  # inside inference mode: rotated
        expect = vk.apply_rope_3d(q, k, pack, (4, 4, 4), backend="reference")
        vk.apply_rope_3d(q, k, pack, (4, 4, 4), inplace=True, backend=backend)
    assert torch.allclose(q, expect[0], atol=1e-6) and torch.allclose(k, expect[1], atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton", CUDA_BACKEND])  # cuda: the C++ op checks
def test_inplace_rope_refuses_q_or_k_overlapping_itself(pack, backend):
    # token rows 4 elements apart, 24 long: overlapping, with no zero stride (torch's own
    # internal-overlap test answers "too hard" for it, as for every non-dense view)
    _skip_unless_rope_runs(backend)
    pack = pack.to(device_for(backend))
    n = pack.num_tokens
    overlapping = torch.randn(4 * n + 24, device=pack.device).as_strided((n, 2, 12), (4, 12, 1))
    k = torch.randn(n, 2, 12, device=pack.device)
    for q_, k_, name in ((overlapping, k, "q"), (k, overlapping, "k")):
        before = (q_.clone(), k_.clone())
        with pytest.raises(ValueError, match=f"inplace RoPE: {name} .* may address some elements more than once"):
            vk.apply_rope_3d(q_, k_, pack, (4, 4, 4), inplace=True, backend=backend)
        assert torch.equal(q_, before[0]) and torch.equal(k_, before[1])  # refused before any write
    # out of place it is only read: fine
    expect = vk.apply_rope_3d(overlapping.contiguous(), k, pack, (4, 4, 4), backend="reference")
    got = vk.apply_rope_3d(overlapping, k, pack, (4, 4, 4), backend=backend)
    assert torch.allclose(got[0], expect[0], atol=1e-6)


def _offsets(t):
    grid = torch.meshgrid(*[torch.arange(n) for n in t.shape], indexing="ij")
    return (t.storage_offset() + sum(i * s for i, s in zip(grid, t.stride()))).flatten().tolist()


def test_self_overlap_test_never_misses_and_passes_usual_views():
    from vdit_kernels.checks import may_overlap_itself
    g = torch.Generator().manual_seed(0)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    buf = torch.randn(2000)
    passed = 0
    for _ in range(1500):  # never a miss; most disjoint layouts of random strides pass
        t = buf.as_strided((rand(0, 4), rand(1, 3), rand(1, 5)), (rand(0, 40), rand(0, 12), rand(0, 3)))
        offsets = _offsets(t)
        if not may_overlap_itself(t):
            assert len(set(offsets)) == len(offsets), (t.shape, t.stride())
            passed += 1
    assert passed > 300
    x = torch.randn(6, 3, 4, 8)
    for view in (x, x[:, 0], x[:, 1:], x.permute(2, 0, 3, 1), x[::2, :, 1::2], x[:, :1].expand(-1, 1, -1, -1),
                 torch.randn(0, 3).expand(0, 3)):  # size-1 and empty dims: any stride
        assert not may_overlap_itself(view), (view.shape, view.stride())
    for view in (x[:, :1].expand(-1, 2, -1, -1), buf.as_strided((4, 3), (2, 1))):
        assert may_overlap_itself(view), (view.shape, view.stride())


def test_shared_element_finder_matches_brute_force():
    from vdit_kernels.checks import _may_share_elements

    def brute(a, b):
        def offsets(t):
            grid = torch.meshgrid(*[torch.arange(n) for n in t.shape], indexing="ij")
            return set((t.storage_offset() + sum(i * s for i, s in zip(grid, t.stride()))).flatten().tolist())
        return bool(offsets(a) & offsets(b))

    g = torch.Generator().manual_seed(0)
    buf = torch.randn(400)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    for _ in range(800):  # same strides (the exact case): never a miss, never a false alarm,
        # whatever the two views' sizes (fewer kv heads than q heads: GQA)
        shape, stride = (rand(1, 4), rand(1, 3), rand(1, 4)), (rand(0, 12), rand(0, 8), 1)
        a = buf.as_strided(shape, stride, rand(60, 100))
        b = buf.as_strided((rand(1, 4), rand(1, 3), rand(1, 4)), stride, rand(60, 100))
        assert _may_share_elements(a, b) == brute(a, b), (shape, stride, a.storage_offset(), b.storage_offset())
    assert not _may_share_elements(buf[:10].view(2, 1, 5), torch.randn(2, 1, 5))


def test_bad_attention(pack):
    n, cu, m = pack.num_tokens, pack.cu_seqlens, pack.max_seqlen
    q, k, v = _qkv(n, dtype=torch.float32)
    with pytest.raises(ValueError, match="int32"):
        vk.varlen_attention(q, k, v, cu.long(), cu, m, m)
    with pytest.raises(ValueError, match="non-decreasing"):
        vk.varlen_attention(q, k, v, torch.tensor([0, 20, 10, n], dtype=torch.int32), cu, m, m)
    with pytest.raises(ValueError, match="ends at"):
        vk.varlen_attention(q[:-1], k, v, cu, cu, m, m)
    with pytest.raises(ValueError, match="must start at 0"):
        vk.varlen_attention(q, k, v, cu + 1, cu, m, m)
    with pytest.raises(ValueError, match="max_seqlen_q 3 is smaller"):
        vk.varlen_attention(q, k, v, cu, cu, 3, m)
    with pytest.raises(ValueError, match=f"max_seqlen_k {m - 1} is smaller"):  # one short is too short
        vk.varlen_attention(q, k, v, cu, cu, m, m - 1)
    with pytest.raises(ValueError, match="not a tensor"):  # reading a CUDA one would wait for the GPU
        vk.varlen_attention(q, k, v, cu, cu, torch.tensor(m), m)
    for not_an_int in (float(m), True):
        with pytest.raises(ValueError, match="non-negative int"):
            vk.varlen_attention(q, k, v, cu, cu, not_an_int, m)
    with pytest.raises(ValueError, match="softmax_scale requires grad"):  # no gradient would reach it
        vk.varlen_attention(q, k, v, cu, cu, m, m, softmax_scale=torch.tensor(0.5, requires_grad=True))
    torch.testing.assert_close(vk.varlen_attention(q, k, v, cu, cu, m, m, softmax_scale=torch.tensor(0.5)),
                               vk.varlen_attention(q, k, v, cu, cu, m, m, softmax_scale=0.5))
    import numpy as np  # (requirements.txt)
    torch.testing.assert_close(vk.varlen_attention(q, k, v, cu, cu, np.int64(m), m),
                               vk.varlen_attention(q, k, v, cu, cu, m, m))
    with pytest.raises(ValueError, match="must divide"):
        vk.varlen_attention(q, k[:, :1].expand(-1, 3, -1).contiguous(), v[:, :1].expand(-1, 3, -1).contiguous(), cu, cu, m, m)
    with pytest.raises(ValueError, match="dtype"):
        vk.varlen_attention(q, k.half(), v, cu, cu, m, m)
    with pytest.raises(ValueError, match="same shape"):
        vk.varlen_attention(q, k, v[:, :1], cu, cu, m, m)
    with pytest.raises(ValueError, match="head_dim"):
        vk.varlen_attention(q, k[..., :8], v[..., :8], cu, cu, m, m)
    with pytest.raises(ValueError, match=f"same number of segments, got {len(pack.shapes)} and 1"):
        vk.varlen_attention(q, k, v, cu, torch.tensor([0, n], dtype=torch.int32), m, n)
    # not a tensor at all: the argument and what it got are named
    with pytest.raises(TypeError, match="cu_seqlens_q must be an int32 tensor, got list"):
        vk.varlen_attention(q, k, v, cu.tolist(), cu, m, m)
    with pytest.raises(TypeError, match="cu_seqlens_k must be an int32 tensor, got VideoPack"):
        vk.varlen_attention(q, k, v, cu, pack, m, m)
    with pytest.raises(ValueError, match=r"\(tokens, heads, head_dim\)"):
        vk.varlen_attention(q[:, 0], k, v, cu, cu, m, m)
    for scale in (0.0, -0.1, float("nan"), float("inf"), "0.25", True,  # (float() takes these two)
                  [0.5], 0.5j, torch.tensor([0.5, 0.5])):  # (float() raises its own errors for these)
        with pytest.raises(ValueError, match="softmax_scale must be a positive finite number"):
            vk.varlen_attention(q, k, v, cu, cu, m, m, softmax_scale=scale)
    rope = vk.Rope3D.from_pack(pack, (4, 4, 6))
    with pytest.raises(ValueError, match="sum to 14"):
        vk.varlen_attention(q, k, v, cu, cu, m, m, rope=rope)
    with pytest.raises(ValueError, match="theta"):
        vk.varlen_attention(q, k, v, cu, cu, m, m, rope=vk.Rope3D(pack.positions.float(), (4, 4, 4), -1.0))
    with pytest.raises(ValueError, match="head_dim must be positive"):
        vk.varlen_attention(q[..., :0], k[..., :0], v[..., :0], cu, cu, m, m)
    for flag in ("return_lse", "deterministic"):  # "False" would be true
        with pytest.raises(TypeError, match=f"{flag} must be a bool"):
            vk.varlen_attention(q, k, v, cu, cu, m, m, **{flag: "False"})
    with pytest.raises(TypeError, match="rope must be a Rope3D, got tuple"):
        vk.varlen_attention(q, k, v, cu, cu, m, m, rope=(pack.positions, (4, 4, 4)))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_attention_of_zero_query_heads(backend):
    # H = 0 passes "Hk divides H"; the forward is empty and the backward all zeros (the
    # reference backward divided by its 0 groups). On a GPU the triton backend takes CUDA
    # tensors (device_for): CPU ones failed there as "needs CUDA tensors" (2026-11-28)
    dev = device_for(backend)
    pack = _make_pack(dev)
    q, k, v = (t.detach().to(dev).requires_grad_() for t in
               _qkv(pack.num_tokens, heads=0, kv_heads=1, dtype=torch.float32))
    cu, m = pack.cu_seqlens, pack.max_seqlen
    out, lse = vk.varlen_attention(q, k, v, cu, cu, m, m, return_lse=True, backend=backend)
    assert out.shape == q.shape and lse.shape == (0, pack.num_tokens)
    gq, gk, gv = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v), allow_unused=True)
    assert gq.shape == q.shape and not gk.any() and not gv.any()


# -- gradients (float64 gradcheck through the registered ops) ---------------------------

def test_gradcheck_patch_ops(pack):
    videos = [torch.randn(2, *s, dtype=torch.float64, requires_grad=True) for s in pack.shapes]
    w = torch.randn(5, 2, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *v: vk.patchify(list(v), pack), videos)
    tokens = torch.randn(pack.num_tokens, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: vk.unpatchify(t, pack, 2), (tokens,))
    assert torch.autograd.gradcheck(lambda w, b, *v: vk.patch_embed(list(v), pack, w, b), (w, b, *videos))
    assert torch.autograd.gradcheck(lambda w, *v: vk.patch_embed(list(v), pack, w), (w, *videos))
    x = torch.randn(pack.num_tokens, 6, dtype=torch.float64, requires_grad=True)
    lw = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    lb = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: vk.linear_unpatchify(x, pack, w, b, 2), (x, lw, lb))


@pytest.mark.parametrize("interleaved", [True, False])
def test_gradcheck_rope(pack, interleaved):
    q = torch.randn(pack.num_tokens, 2, 12, dtype=torch.float64, requires_grad=True)
    k = torch.randn(pack.num_tokens, 1, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k: vk.apply_rope_3d(q, k, pack, (4, 2, 6), 100.0, interleaved), (q, k))


@pytest.mark.parametrize("cross", [False, True])
def test_gradcheck_attention(pack, cross):
    nk = pack.num_text_tokens if cross else pack.num_tokens
    cu_k = pack.cu_seqlens_k if cross else pack.cu_seqlens
    mk = pack.max_seqlen_k if cross else pack.max_seqlen
    q, k, v = _qkv(pack.num_tokens, nk=nk, requires_grad=True)
    rope = None if cross else vk.Rope3D.from_pack(pack, (4, 4, 4))
    fn = lambda q, k, v: vk.varlen_attention(q, k, v, pack.cu_seqlens, cu_k, pack.max_seqlen, mk, rope=rope)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_attention_through_lse(pack):
    # float64 inputs give a float64 lse (the registered fake agrees), so the default tolerances hold
    q, k, v = _qkv(pack.num_tokens, requires_grad=True)
    rope = vk.Rope3D.from_pack(pack, (4, 4, 4))
    cu, m = pack.cu_seqlens, pack.max_seqlen
    fn = lambda q, k, v: vk.varlen_attention(q, k, v, cu, cu, m, m, return_lse=True, rope=rope)[1]
    assert fn(q, k, v).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_an_unused_lse_reaches_the_backward_as_none(pack, monkeypatch):
    # not as zeros: the Triton backend's choice of PyTorch's FlashAttention-2 backward
    # (which takes no lse gradient) depends on it
    from vdit_kernels.ops import attention as ops

    seen = []
    backward = ops._Reference.varlen_attention_bwd
    monkeypatch.setattr(ops._Reference, "varlen_attention_bwd",
                        staticmethod(lambda *a: seen.append(a[6]) or backward(*a)))
    q, k, v = _qkv(pack.num_tokens, requires_grad=True)
    cu, m = pack.cu_seqlens, pack.max_seqlen
    vk.varlen_attention(q, k, v, cu, cu, m, m).square().sum().backward()
    assert seen[-1] is None
    q.grad = None
    vk.varlen_attention(q, k, v, cu, cu, m, m, return_lse=True)[1].sum().backward()  # lse alone
    assert seen[-1] is not None
    expect = torch.autograd.grad(ref.varlen_attention(q, k, v, cu, cu, m, m, return_lse=True)[1].sum(), q)[0]
    assert torch.allclose(q.grad, expect, atol=1e-12)


def test_under_autocast_the_ops_cast_their_inputs_like_torch(pack):
    # varlen_attention as scaled_dot_product_attention, patch_embed as nn.Conv3d,
    # linear_unpatchify as nn.Linear: inputs cast to the autocast dtype (float64 untouched);
    # the reference path inside then still computes in float32
    q, k, v = _qkv(pack.num_tokens, dtype=torch.float32)
    cu, m = pack.cu_seqlens, pack.max_seqlen
    videos = [torch.randn(2, *s) for s in pack.shapes]
    w, b = torch.randn(5, 2, 1, 2, 2, requires_grad=True), torch.randn(5)
    x, lw = torch.randn(pack.num_tokens, 5), torch.randn(8, 5)
    bf = lambda *ts: [t.bfloat16() for t in ts]
    expect = (vk.varlen_attention(*bf(q, k, v), cu, cu, m, m), vk.patch_embed(bf(*videos), pack, *bf(w, b)),
              vk.linear_unpatchify(*bf(x), pack, *bf(lw), None, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (vk.varlen_attention(q, k.bfloat16(), v, cu, cu, m, m),  # mixed: a ValueError without autocast
               vk.patch_embed(videos, pack, w, b), vk.linear_unpatchify(x, pack, lw, None, 2))
        q64, k64, v64 = _qkv(pack.num_tokens)
        assert vk.varlen_attention(q64, k64, v64, cu, cu, m, m).dtype == torch.float64
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
    assert all(torch.equal(a, e) for a, e in zip(got[2], expect[2]))
    got[1].float().sum().backward()  # the float32 weight gets a float32 gradient through the cast
    assert w.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("interleaved", [True, False])
def test_fused_rope_attention_equals_rope_then_attention(backend, interleaved):
    # outputs and gradients; float64 on the reference path, float32 (its only IEEE dtype
    # besides) on Triton
    dtype, atol = (torch.float64, 1e-12) if backend == "reference" else (torch.float32, 1e-5)
    pack = _make_pack(device_for(backend))
    q, k, v = (t.to(pack.cu_seqlens.device) for t in _qkv(pack.num_tokens, dtype=dtype, requires_grad=True))
    rope = vk.Rope3D.from_pack(pack, (4, 4, 4), theta=500.0, interleaved=interleaved)
    cu, m = pack.cu_seqlens, pack.max_seqlen
    fused = vk.varlen_attention(q, k, v, cu, cu, m, m, rope=rope, backend=backend)
    qr, kr = vk.apply_rope_3d(q, k, pack, (4, 4, 4), 500.0, interleaved, backend=backend)
    apart = vk.varlen_attention(qr, kr, v, cu, cu, m, m, backend=backend)
    assert torch.allclose(fused, apart, atol=atol)
    do = torch.randn_like(fused)
    for a, b in zip(torch.autograd.grad(fused, (q, k, v), do), torch.autograd.grad(apart, (q, k, v), do)):
        assert torch.allclose(a, b, atol=atol)


def test_inplace_rope_matches_out_of_place(pack):
    q, k, _ = _qkv(pack.num_tokens, dtype=torch.float32)
    expect = vk.apply_rope_3d(q, k, pack, (4, 4, 4))
    q2, k2 = q.clone(), k.clone()
    out = vk.apply_rope_3d(q2, k2, pack, (4, 4, 4), inplace=True)
    assert out[0] is q2 and torch.equal(q2, expect[0]) and torch.equal(k2, expect[1])


# -- registered ops: opcheck and torch.compile ------------------------------------------

def _op_samples(pack, device="cpu"):
    randn = lambda *shape: torch.randn(*shape, device=device)
    leaf = lambda *shape: randn(*shape).requires_grad_(True)
    videos = [leaf(2, *s) for s in pack.shapes]
    w = leaf(5, 2, 1, 2, 2)
    b = leaf(5)
    tokens = leaf(pack.num_tokens, 8)
    q, k, v = (t.to(device).detach().requires_grad_(True)
               for t in _qkv(pack.num_tokens, dtype=torch.float32))
    pos = pack.positions.float().to(device)
    shapes = [s for shape in pack.shapes for s in shape]
    cu, m = pack.cu_seqlens, pack.max_seqlen
    lw = leaf(8, 5)
    x = leaf(pack.num_tokens, 5)
    out, lse = vk.varlen_attention(q.detach(), k.detach(), v.detach(), cu, cu, m, m, return_lse=True,
                                   backend="reference")
    do, glse = torch.randn_like(out), torch.randn_like(lse)
    head_major = lambda t: t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    return [
        (patch_ops.patchify_op, (videos, [1, 2, 2], "reference")),
        (patch_ops.unpatchify_op, (tokens, shapes, [1, 2, 2], 2, "reference")),
        (patch_ops.patch_embed_op, (videos, w, b, "reference")),
        (patch_ops.patch_embed_op, (videos, w, None, "reference")),
        (patch_ops.linear_unpatchify_op, (x, lw, None, shapes, [1, 2, 2], 2, "reference")),
        # channels-last videos and weight (a model in torch.channels_last_3d), transposed x:
        # the gradients come back contiguous from every backend, as the fakes say
        (patch_ops.patch_embed_backward_op, (randn(pack.num_tokens, 5),
                                             [randn(*s, 2).permute(3, 0, 1, 2) for s in pack.shapes],
                                             randn(5, 1, 2, 2, 2).permute(0, 4, 1, 2, 3), True, "reference")),
        (patch_ops.linear_unpatchify_backward_op, ([randn(2, *s) for s in pack.shapes],
                                                   randn(5, pack.num_tokens).t(), lw.detach(), [1, 2, 2], True,
                                                   "reference")),
        (rope_ops.rope_3d_op, (q, k, pos, [4, 4, 4], 10000.0, True, False, "reference")),
        # head-major q: every backend returns contiguous rotations, as the fake says
        (rope_ops.rope_3d_op, (head_major(q), k, pos, [4, 4, 4], 10000.0, False, False, "reference")),
        (rope_ops.rope_3d_inplace_op, (q.detach().clone(), k.detach().clone(), pos, [4, 4, 4], 10000.0,
                                       False, False, "reference")),
        (attn_ops.varlen_attention_op, (q, k, v, cu, cu, m, m, 0.5, None, [], 10000.0, True, False, "reference")),
        (attn_ops.varlen_attention_op, (q, k, v, cu, cu, m, m, 0.5, pos, [4, 4, 4], 100.0, False, False,
                                        "reference")),
        (attn_ops.varlen_attention_backward_op, (do, q.detach(), k.detach(), v.detach(), out, lse, glse, cu,
                                                 cu, m, m, 0.5, pos, [4, 4, 4], 100.0, True, False,
                                                 "reference")),
        (attn_ops.varlen_attention_backward_op, (do, q.detach(), k.detach(), v.detach(), out, lse, None, cu,
                                                 cu, m, m, 0.5, None, [], 10000.0, True, True, "reference")),
        # head-major q, k, v (an SDPA-layout (H, L, D) tensor transposed): out and the
        # gradients come back contiguous from every backend, as the fakes say
        (attn_ops.varlen_attention_op, (head_major(q), head_major(k), v, cu, cu, m, m, 0.5, None, [], 10000.0,
                                        True, False, "reference")),
        (attn_ops.varlen_attention_backward_op, (do, head_major(q).detach(), head_major(k).detach(),
                                                 head_major(v).detach(), out, lse, None, cu, cu, m, m, 0.5, None,
                                                 [], 10000.0, True, True, "reference")),
    ]


@pytest.mark.parametrize("backend", ["reference", "triton", CUDA_BACKEND])
def test_opcheck_every_op(backend):
    # the backend name is each op's last argument; without a GPU, triton runs under the
    # interpreter on CPU tensors; cuda runs the families it implements, on a GPU only
    device = device_for(backend)
    families = {patch_ops: "patch", rope_ops: "rope", attn_ops: "attention"}
    samples = [(op, args) for op, args in _op_samples(_make_pack(device), device)
               if B.why_not(backend, next(f for m, f in families.items() if op in vars(m).values()), device) is None]
    if not samples:
        pytest.skip(f"backend {backend} cannot run on {device} tensors here")
    for op, args in samples:
        torch.library.opcheck(op, (*args[:-1], backend))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_opcheck_attention_lse_dtype(dtype):
    # the lse is float32 for half-precision q and float64 for float64 (the reference path's
    # gradcheck dtype): the fakes agree, forward and backward (_op_samples are all float32,
    # where either rule gives float32)
    pack = _make_pack()
    q, k, v = _qkv(pack.num_tokens, dtype=dtype, requires_grad=True)
    cu, m = pack.cu_seqlens, pack.max_seqlen
    torch.library.opcheck(attn_ops.varlen_attention_op,
                          (q, k, v, cu, cu, m, m, 0.5, None, [], 10000.0, True, False, "reference"))
    out, lse = vk.varlen_attention(q.detach(), k.detach(), v.detach(), cu, cu, m, m, return_lse=True,
                                   backend="reference")
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.library.opcheck(attn_ops.varlen_attention_backward_op,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, torch.randn_like(lse),
                           cu, cu, m, m, 0.5, None, [], 10000.0, True, False, "reference"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_fullgraph_whole_stack(backend):
    torch._dynamo.reset()
    device = device_for(backend)
    pack = _make_pack(device)
    videos = [torch.randn(4, *s, device=device) for s in pack.shapes]
    w = torch.randn(24, 4, 1, 2, 2, device=device, requires_grad=True)
    out_w = torch.randn(16, 24, device=device, requires_grad=True)

    def step(videos, w, out_w):
        x = vk.patch_embed(videos, pack, w)
        q = k = v = x.view(-1, 2, 12)
        q, k = vk.apply_rope_3d(q, k, pack, (4, 4, 4))
        o = vk.varlen_attention(q, k, v, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen, pack.max_seqlen)
        return vk.linear_unpatchify(o.reshape(-1, 24), pack, out_w, None, 4)

    with vk.use_backend(backend):
        eager = step(videos, w, out_w)
        compiled = torch.compile(step, fullgraph=True)(videos, w, out_w)
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e)
    # the compiled backward (RoPE, attention, both GEMM ops) against the eager one
    g = torch.Generator().manual_seed(3)
    cots = [torch.randn(o.shape, generator=g).to(device) for o in eager]
    loss = lambda outs: sum((o * c).sum() for o, c in zip(outs, cots))  # noqa: E731
    expect = torch.autograd.grad(loss(eager), (w, out_w))
    for a, e in zip(torch.autograd.grad(loss(compiled), (w, out_w)), expect):
        torch.testing.assert_close(a, e)


# (on the reference backend: the triton backend's strides against the same fakes are
# opcheck's, test_opcheck_every_op, with the same layouts)
def test_compile_training_step_of_a_channels_last_model():
    # model.to(memory_format=torch.channels_last_3d) gives the patch embedding's Conv3d a
    # permuted weight; the backward's fakes once kept that layout where every backend
    # returns contiguous gradients (inductor's stride assert failed)
    torch._dynamo.reset()
    backend = "reference"
    device = device_for(backend)
    pack = _make_pack(device)
    conv = torch.nn.Conv3d(2, 8, (1, 2, 2), (1, 2, 2)).to(device).to(memory_format=torch.channels_last_3d)
    videos = [torch.randn(*s, 2, device=device).permute(3, 0, 1, 2).requires_grad_(True) for s in pack.shapes]

    def loss(videos):
        return vk.patch_embed(videos, pack, conv.weight, conv.bias, backend=backend).square().sum()

    inputs = (*videos, conv.weight, conv.bias)
    expect = torch.autograd.grad(loss(videos), inputs)
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(videos), inputs)
    for a, e in zip(got, expect):
        torch.testing.assert_close(a, e)


def test_compile_attention_of_head_major_inputs():  # (on the reference backend, as above)
    # q from an SDPA-layout (H, L, D) tensor: the compiled graph plans its buffers by the
    # fakes' strides, and a fake that kept q's layout where the backend returns a contiguous
    # out once failed inductor's stride assert (or, without it, read out wrongly)
    torch._dynamo.reset()
    backend = "reference"
    device = device_for(backend)
    pack = _make_pack(device)
    cu, m = pack.cu_seqlens, pack.max_seqlen
    g = torch.Generator().manual_seed(0)
    qh = torch.randn(2, pack.num_tokens, 12, generator=g).to(device).requires_grad_(True)
    kv = torch.randn(pack.num_tokens, 2, 12, generator=g).to(device).requires_grad_(True)

    def fn(qh, kv):
        return vk.varlen_attention(qh.transpose(0, 1), kv, kv, cu, cu, m, m, backend=backend) * 2

    compiled_fn = torch.compile(fn, fullgraph=True)
    with torch.no_grad():  # inference (the failing case; under autograd the graph is split)
        torch.testing.assert_close(compiled_fn(qh, kv), fn(qh, kv))
    eager = fn(qh, kv)
    grads = torch.autograd.grad(eager.square().sum(), (qh, kv))
    compiled = compiled_fn(qh, kv)
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(torch.autograd.grad(compiled.square().sum(), (qh, kv)), grads):
        torch.testing.assert_close(a, e)


def test_compile_fullgraph_dynamic_shapes_and_inplace_rope():
    # dynamic=True makes softmax_scale and theta symbolic floats (math.isfinite cannot take
    # them), and in-place RoPE's storage checks cannot be traced: both once failed fullgraph
    pack = _make_pack()
    cu, m = pack.cu_seqlens, pack.max_seqlen
    g = torch.Generator().manual_seed(0)
    x = torch.randn(pack.num_tokens, 3, 2, 12, generator=g)

    def attention(q, scale, theta):
        q, k = vk.apply_rope_3d(q, q, pack, (4, 4, 4), theta=theta)
        return vk.varlen_attention(q, k, q, cu, cu, m, m, softmax_scale=scale)

    def rotate_in_place(qkv):
        vk.apply_rope_3d(qkv[:, 0], qkv[:, 1], pack, (4, 4, 4), inplace=True)
        return qkv

    for dynamic in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(attention, fullgraph=True, dynamic=dynamic)
        for scale, theta in ((0.3, 100.0), (0.5, 10000.0)):
            torch.testing.assert_close(compiled(x[:, 0], scale, theta), attention(x[:, 0], scale, theta))
        torch.testing.assert_close(torch.compile(rotate_in_place, fullgraph=True, dynamic=dynamic)(x.clone()),
                                   rotate_in_place(x.clone()))
    with pytest.raises(ValueError, match="softmax_scale"):  # a bad value still fails in eager code
        attention(x[:, 0], float("nan"), 100.0)


@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_step_does_not_recompile_per_pack(dynamic):
    # training on native resolutions: every step's pack has other video sizes. A compiled
    # step must not be specialized to each pack's sizes (an int() of a symbolic size in a
    # fake implementation did so: one recompile per pack, until dynamo's limit of 8 ran the
    # rest eagerly). Sizes > 1 and distinct (size 1 and equal sizes specialize in dynamo)
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    w = torch.randn(24, 4, 1, 2, 2, requires_grad=True)
    out_w = torch.randn(16, 24, requires_grad=True)

    def step(videos, pack, w, out_w):
        x = vk.patch_embed(videos, pack, w)
        q = k = v = x.view(-1, 2, 12)
        o = vk.varlen_attention(q, k, v, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen, pack.max_seqlen)
        return vk.linear_unpatchify(o.reshape(-1, 24), pack, out_w, None, 4)

    def step_with_rope(videos, pack, w, out_w):  # reads the pack's cached per-token tensors
        x = vk.patch_embed(videos, pack, w)
        q, k = vk.apply_rope_3d(x.view(-1, 2, 12), x.view(-1, 2, 12), pack, (4, 4, 4))
        return vk.varlen_attention(q, k, q, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen, pack.max_seqlen)

    packs = [[(2, 6, 10), (3, 4, 8)], [(3, 10, 6), (2, 8, 14)], [(4, 6, 14), (5, 10, 4)], [(2, 12, 18), (3, 6, 10)]]
    for fn in (step, step_with_rope):
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(fn, backend=counter, dynamic=dynamic, fullgraph=True)
        for i, shapes in enumerate(packs):
            pack = vk.VideoPack.from_shapes(shapes, patch_size=(1, 2, 2))
            videos = [torch.randn(4, *s) for s in pack.shapes]
            if i == 2:
                pack.positions, pack.segment_ids  # its cache filled by eager code (a data loader)
            # the same pack twice: what the first call computed is not cached for the second
            runs = [compiled(videos, pack, w, out_w) for _ in range(2)]
            expect = fn(videos, pack, w, out_w)
            listed = lambda out: out if isinstance(out, list) else [out]
            for got in runs:
                for a, e in zip(listed(got), listed(expect)):
                    torch.testing.assert_close(a, e)
        # dynamic=None: a static first graph, then one dynamic graph for every later pack
        assert counter.frame_count <= 2, f"{fn.__name__}: {counter.frame_count} graphs for {len(packs)} packs"


@gpu_only
def test_compile_fullgraph_cuda_patch_gemms():
    # the cuda backend's patch_embed / linear_unpatchify (C++ autograd in eager code) inside a
    # compiled graph: the registered ops with their Python formula over the same C++ ops,
    # forward and gradients as eager
    torch._dynamo.reset()
    pack = _make_pack("cuda")
    g = torch.Generator().manual_seed(0)
    videos = [torch.randn(4, *s, generator=g).cuda().requires_grad_(True) for s in pack.shapes]
    w = torch.randn(24, 4, 1, 2, 2, generator=g).cuda().requires_grad_(True)
    b = torch.randn(24, generator=g).cuda().requires_grad_(True)
    out_w = torch.randn(16, 24, generator=g).cuda().requires_grad_(True)

    def step(videos, w, b, out_w):
        x = vk.patch_embed(videos, pack, w, b, backend="cuda")
        return vk.linear_unpatchify(torch.tanh(x), pack, out_w, None, 4, backend="cuda")

    leaves = [*videos, w, b, out_w]
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        outs = fn(videos, w, b, out_w)
        grads = torch.autograd.grad(sum((o * o).sum() for o in outs), leaves)
        results.append([o.detach() for o in outs] + list(grads))
    for c, e in zip(results[1], results[0]):
        torch.testing.assert_close(c, e)


def test_compile_reports_an_unavailable_backend(pack):
    # the choice is made at trace time; a backend that cannot run fails there, with its reason
    torch._dynamo.reset()
    q = torch.randn(pack.num_tokens, 2, 12)
    step = torch.compile(lambda q: vk.apply_rope_3d(q, q, pack, (4, 4, 4), backend="cuda"), fullgraph=True)
    with pytest.raises(Exception, match="backend .cuda. cannot run rope_3d: "):
        step(q)


@gpu_only
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_ops_never_wait_for_the_gpu(backend):
    # No op may synchronize the host with the GPU (a blocking host->device copy of a launch
    # table did, on every call): under sync debug mode "error" a synchronizing call raises.
    pack = vk.VideoPack.from_shapes([(3, 4, 6), (1, 2, 2), (2, 6, 4)], (1, 2, 2), device="cuda")
    g = torch.Generator().manual_seed(0)
    videos = [torch.randn(4, *s, generator=g).cuda().requires_grad_(True) for s in pack.shapes]
    w = torch.randn(32, 4, 1, 2, 2, generator=g).cuda().requires_grad_(True)
    out_w = torch.randn(16, 32, generator=g).cuda().requires_grad_(True)
    rope = vk.Rope3D.from_pack(pack, (4, 6, 6))

    def step():
        x = vk.patch_embed(videos, pack, w, backend=backend)
        q = k = v = x.view(-1, 2, 16)
        qr, kr = vk.apply_rope_3d(q, k, pack, (4, 6, 6), backend=backend)
        o = vk.varlen_attention(qr, kr, v, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen,
                                pack.max_seqlen, rope=rope, backend=backend)
        outs = vk.linear_unpatchify(o.reshape(-1, 32), pack, out_w, None, 4, backend=backend)
        tok = vk.patchify(outs, pack, backend=backend)
        (tok.square().sum() + sum(u.sum() for u in vk.unpatchify(tok, pack, 4, backend=backend))).backward()

    step()  # first calls compile and autotune (which synchronizes by design)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_every_op_gives_shapes_on_the_meta_device():
    # shape inference for a port, as torch's own ops do on meta tensors: the registered
    # ops' fake implementations (torch's autocast query raised on "meta" before any check)
    pack = vk.VideoPack.from_shapes([(1, 4, 4), (2, 2, 2)], device="meta", text_lengths=[3, 4])
    videos = [torch.empty(3, *s, device="meta", requires_grad=True) for s in pack.shapes]
    tokens = vk.patchify(videos, pack)
    assert tokens.shape == (6, 12) and tokens.is_meta
    assert [v.shape for v in vk.unpatchify(tokens, pack, 3)] == [v.shape for v in videos]
    x = vk.patch_embed(videos, pack, torch.empty(32, 3, 1, 2, 2, device="meta"), torch.empty(32, device="meta"))
    assert x.shape == (6, 32) and x.is_meta
    out = vk.linear_unpatchify(x, pack, torch.empty(12, 32, device="meta"), None, 3)
    assert [v.shape for v in out] == [v.shape for v in videos]
    q = x.view(6, 2, 16)
    q_rot, k_rot = vk.apply_rope_3d(q, q, pack, (4, 6, 6))
    assert q_rot.shape == k_rot.shape == (6, 2, 16)
    o, lse = vk.varlen_attention(q, q, q, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen, pack.max_seqlen,
                                 return_lse=True, rope=vk.Rope3D.from_pack(pack, (4, 6, 6)))
    assert o.shape == (6, 2, 16) and lse.shape == (2, 6) and lse.dtype == torch.float32 and o.is_meta
    text = torch.empty(7, 2, 16, device="meta")
    assert vk.varlen_attention(q, text, text, pack.cu_seqlens, pack.cu_seqlens_k, pack.max_seqlen,
                               pack.max_seqlen_k).shape == (6, 2, 16)
    o.sum().backward()
    assert all(v.grad.shape == v.shape and v.grad.is_meta for v in videos)
    with pytest.raises(ValueError, match="k is on cpu but q is on meta"):
        vk.varlen_attention(q, torch.randn(6, 2, 16), q, pack.cu_seqlens, pack.cu_seqlens, 4, 4)
