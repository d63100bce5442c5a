"""The compiled extension vdit_kernels._C: load, schemas, backend selection, argument
checks, and the CUDA kernels (csrc/patch.cu, csrc/rope.cu) against the reference.

Numerical tests need a GPU (conftest.gpu_only); without one they are skipped with a reason.
The argument checks (csrc/*_host.cpp) run on CPU tensors too, so they are tested here on
the GPU where there is one and on CPU otherwise.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vdit_kernels as vk
from vdit_kernels import backend as B
from vdit_kernels import reference as ref
from conftest import ALL_DTYPES, DEVICE, assert_verbose_close, gpu_only, needs_extension

pytestmark = needs_extension

SCHEMAS = {
    "has_cuda": "vdit_C::has_cuda() -> bool",
    "build_info": "vdit_C::build_info() -> str",
    "patchify": "vdit_C::patchify(Tensor[] videos, int[] patch_size) -> Tensor",
    "unpatchify": "vdit_C::unpatchify(Tensor tokens, int[] shapes, int[] patch_size, int channels) -> Tensor[]",
    "patch_embed": "vdit_C::patch_embed(Tensor[] videos, Tensor weight, Tensor? bias) -> Tensor",
    "patch_embed_backward": "vdit_C::patch_embed_backward(Tensor grad, Tensor[] videos, Tensor weight, "
                            "bool with_bias) -> (Tensor[], Tensor, Tensor)",
    "linear_unpatchify": "vdit_C::linear_unpatchify(Tensor x, Tensor weight, Tensor? bias, int[] shapes, "
                         "int[] patch_size, int channels) -> Tensor[]",
    "linear_unpatchify_backward": "vdit_C::linear_unpatchify_backward(Tensor[] grad_videos, Tensor x, "
                                  "Tensor weight, int[] patch_size, bool with_bias) -> (Tensor, Tensor, Tensor)",
    "rope_3d": "vdit_C::rope_3d(Tensor q, Tensor k, Tensor positions, int[] dims, float theta, "
               "bool interleaved, bool inverse) -> (Tensor, Tensor)",
    "rope_3d_": "vdit_C::rope_3d_(Tensor(a!) q, Tensor(b!) k, Tensor positions, int[] dims, float theta, "
                "bool interleaved, bool inverse) -> ()",
}


def _cuda_build() -> bool:
    return B.extension() is not None and bool(torch.ops.vdit_C.has_cuda())


needs_cuda_build = pytest.mark.skipif(not _cuda_build(), reason="vdit_kernels._C was built without CUDA")


# -- the extension and its schemas ------------------------------------------------------

def test_extension_loaded():
    assert B.extension() is not None, "vdit_kernels._C did not load"
    if torch.version.cuda:
        assert torch.ops.vdit_C.has_cuda(), (
            "torch is a CUDA build but _C has no CUDA kernels: " + torch.ops.vdit_C.build_info())
        info = torch.ops.vdit_C.build_info()
        assert "cuda=1" in info
        # the toolkit and architectures setup.py built for (python -m vdit_kernels shows them)
        archs = info.split(" archs=")[1].split(",")
        assert " toolkit=1" in info and archs and all(a[0].isdigit() for a in archs), info


@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_schema(op):
    assert B.extension() is not None
    assert str(getattr(torch.ops.vdit_C, op).default._schema) == SCHEMAS[op]


def test_no_unexpected_ops():
    assert B.extension() is not None
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("vdit_C::")}
    assert registered == {f"vdit_C::{op}" for op in SCHEMAS}
    # the backend's list of the ops a current build has (a stale build is reported)
    assert set(B.EXTENSION_OPS) == set(SCHEMAS) and B.extension_missing_ops() == ()


@pytest.mark.parametrize("missing", ["vdit_C::patch_embed", "_C.direct_patch_embed"])
def test_a_stale_build_is_reported(monkeypatch, missing):
    # _C built from older sources (no patch_embed op, or no direct calls): the cuda backend
    # says to rebuild, and auto takes another backend instead of failing inside a call
    B._why_not.cache_clear()
    monkeypatch.setattr(B, "_gpu_visible", lambda: True)  # (else "no GPU" alone keeps cuda out)
    monkeypatch.setitem(B._EXTENSION, "missing", (missing,))
    try:
        reason = B.why_not("cuda", "patch", torch.device("cuda"), "patch_embed")
        assert "built from older sources" in reason and missing in reason
        assert B.resolve("patch", torch.device("cuda"), None, "patch_embed", torch.float16) != "cuda"
    finally:
        B._why_not.cache_clear()


# -- backend selection ---------------------------------------------------------------

@needs_cuda_build
@pytest.mark.parametrize("family,ops", [
    ("patch", ("patchify", "unpatchify", "patch_embed", "patch_embed_backward", "linear_unpatchify",
               "linear_unpatchify_backward")),
    ("rope", ("rope_3d", "rope_3d_"))])
def test_cuda_backend_available_for_cuda_tensors(family, ops, monkeypatch):
    # as on a GPU machine (this one may have none: then the backend says so, below)
    monkeypatch.setattr(B, "_gpu_visible", lambda: True)
    monkeypatch.setattr(B, "_why_not", B._why_not.__wrapped__)  # uncached: the patched answer
    for op in ops:
        assert B.why_not("cuda", family, torch.device("cuda"), op) is None
    # ops the CUDA backend does not implement are reported as missing, not broken
    assert "does not implement rope_3d_backward" in B.why_not("cuda", family, torch.device("cuda"),
                                                              "rope_3d_backward")


@needs_cuda_build
def test_cuda_backend_needs_cuda_tensors():
    with pytest.raises(vk.BackendUnavailable, match="CUDA tensors"):
        B.resolve("patch", torch.device("cpu"), "cuda", "patchify")
    with pytest.raises(vk.BackendUnavailable, match="CUDA tensors"):
        B.resolve("rope", torch.device("cpu"), "cuda", "rope_3d")


@needs_cuda_build
def test_cpu_tensors_fail_cleanly():
    videos = [torch.randn(2, 1, 2, 2)]
    with pytest.raises(RuntimeError, match="need CUDA tensors, got cpu"):
        torch.ops.vdit_C.patchify(videos, [1, 2, 2])
    with pytest.raises(RuntimeError, match="need CUDA tensors, got cpu"):
        torch.ops.vdit_C.unpatchify(torch.randn(1, 8), [1, 2, 2], [1, 2, 2], 2)
    q = torch.randn(2, 1, 12)
    with pytest.raises(RuntimeError, match="need CUDA tensors, got cpu"):
        torch.ops.vdit_C.rope_3d(q, q, torch.zeros(2, 3), [4, 4, 4], 10000.0, True, False)
    with pytest.raises(RuntimeError, match="need CUDA tensors, got cpu"):
        torch.ops.vdit_C.rope_3d_(q, q.clone(), torch.zeros(2, 3), [4, 4, 4], 10000.0, True, False)


# -- patchify / unpatchify on a GPU ----------------------------------------------------

PACKS = {
    "mixed": [(2, 4, 6), (1, 2, 2), (4, 2, 4)],
    "one_video": [(4, 16, 32)],
    "odd_width": [(2, 6, 6), (2, 2, 10)],          # rows not 16-byte aligned: scalar paths
    "wide": [(1, 4, 200), (2, 2, 70)],              # several tiles per token row
    "many": [(2, 2, 2) if i % 3 else (2, 2, 4) for i in range(70)],  # > kInlineVideos (48): device table
}


def _pack(shapes, patch_size):
    pt = patch_size[0]
    shapes = [(max(pt, t - t % pt), h, w) for t, h, w in shapes]
    return vk.VideoPack.from_shapes(shapes, patch_size, device="cuda")


def _videos(pack, channels, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(channels, *s, generator=g).to(device="cuda", dtype=dtype) for s in pack.shapes]


def _check_patch(videos, pack, channels):
    tok = vk.patchify(videos, pack, backend="cuda")
    expected = vk.patchify(videos, pack, backend="reference")
    assert tok.dtype == expected.dtype and torch.equal(tok, expected)
    outs = vk.unpatchify(expected, pack, channels, backend="cuda")
    refs = vk.unpatchify(expected, pack, channels, backend="reference")
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.is_contiguous() and o.shape == r.shape and torch.equal(o, r)


@gpu_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("patch_size", [(1, 2, 2), (2, 2, 2), (1, 1, 1), (1, 4, 4), (2, 1, 3)])
@pytest.mark.parametrize("name", sorted(PACKS))
def test_patch_matches_reference(dtype, patch_size, name):
    shapes = PACKS[name]
    if patch_size == (2, 1, 3):
        shapes = [(t, h, w - w % 3 or 3) for t, h, w in shapes]
    if patch_size == (1, 4, 4):
        shapes = [(t, max(4, h - h % 4), max(4, w - w % 4)) for t, h, w in shapes]
    pack = _pack(shapes, patch_size)
    _check_patch(_videos(pack, 4, dtype), pack, 4)


@gpu_only
@pytest.mark.parametrize("channels", [1, 3, 16, 96])
def test_patch_channels(channels):
    pack = _pack(PACKS["mixed"], (1, 2, 2))
    _check_patch(_videos(pack, channels, torch.bfloat16, seed=channels), pack, channels)


@gpu_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_patchify_non_contiguous_videos(dtype):
    pack = _pack([(2, 4, 6), (2, 6, 4)], (1, 2, 2))
    base = _videos(pack, 4, dtype)
    videos = [
        # W not the fastest axis (stride_w != 1)
        base[0].transpose(2, 3).contiguous().transpose(2, 3),
        # a frame slice of a longer video: offset data pointer (misaligned), T stride
        # larger than H * W
        torch.cat([base[1], base[1]], 1)[:, 1:3],
    ]
    assert not videos[0].is_contiguous() and not videos[1].is_contiguous()
    tok = vk.patchify(videos, pack, backend="cuda")
    assert torch.equal(tok, vk.patchify(videos, pack, backend="reference"))
    # a batch tensor sliced along W: stride_w == 1 but rows not contiguous
    batch = torch.randn(3, 4, 2, 4, 12, device="cuda").to(dtype)[..., 2:10]
    pack = vk.VideoPack.from_shapes([(2, 4, 8)] * 3, (1, 2, 2), device="cuda")
    assert torch.equal(vk.patchify(batch, pack, backend="cuda"), vk.patchify(batch, pack, backend="reference"))


@gpu_only
def test_unpatchify_non_contiguous_tokens_and_grad():
    pack = _pack(PACKS["mixed"], (1, 2, 2))
    wide = torch.randn(pack.num_tokens, 32, device="cuda")
    tokens = wide[:, ::2]  # (N, 16) with stride 2
    outs = vk.unpatchify(tokens, pack, 4, backend="cuda")
    for o, r in zip(outs, vk.unpatchify(tokens, pack, 4, backend="reference")):
        assert torch.equal(o, r)
    videos = [v.requires_grad_() for v in _videos(pack, 4, torch.float32)]
    vk.patchify(videos, pack, backend="cuda").square().sum().backward()
    for v in videos:
        assert torch.equal(v.grad, 2 * v.detach())


def _patch_bad_input_checks():
    # both ways in: the registered ops and the direct calls cuda.patch makes (csrc/direct_host.cpp)
    import vdit_kernels.cuda.patch  # noqa: F401  (loads _C)
    from vdit_kernels import _C
    v = torch.randn(4, 2, 4, 6, device=DEVICE)
    for patchify, unpatchify in ((torch.ops.vdit_C.patchify, torch.ops.vdit_C.unpatchify),
                                 (_C.direct_patchify, _C.direct_unpatchify)):
        with pytest.raises(RuntimeError, match="patch_size"):
            patchify([v], [1, 2])
        with pytest.raises(RuntimeError, match="divisible"):
            patchify([v], [1, 4, 4])
        with pytest.raises(RuntimeError, match="dtype"):
            patchify([v, v.half()], [1, 2, 2])
        with pytest.raises(RuntimeError, match="rows"):
            unpatchify(torch.randn(5, 16, device=DEVICE), [2, 4, 6], [1, 2, 2], 4)
        with pytest.raises(RuntimeError, match=r"channels\*pt\*ph\*pw = 16\), got \[12, 20\]"):  # too wide too
            unpatchify(torch.randn(12, 20, device=DEVICE), [2, 4, 6], [1, 2, 2], 4)
        with pytest.raises(RuntimeError, match="patch_size must be in"):
            patchify([v], [1, 0, 2])
        with pytest.raises(RuntimeError, match="patch_size must be in"):  # C*pt*ph*pw would overflow int64
            patchify([v], [1, 2 ** 40, 2])
        with pytest.raises(RuntimeError, match="channels must be in"):
            unpatchify(torch.randn(5, 16, device=DEVICE), [2, 4, 6], [1, 2, 2], 2 ** 62)
        with pytest.raises(RuntimeError, match="token count overflows int64 at shape 0"):  # 2^64 wrapped to 0
            unpatchify(torch.randn(0, 16, device=DEVICE), [2 ** 21, 2 ** 22, 2 ** 23], [1, 2, 2], 4)
    # the direct calls' own argument conversion (the ops' schemas do it for torch.ops)
    for call, message in ((lambda: _C.direct_patchify([v]), "takes 2 arguments, got 1"),
                          (lambda: _C.direct_patchify(v, [1, 2, 2]), "videos must be a list or tuple, got Tensor"),
                          (lambda: _C.direct_patchify([v, 3], [1, 2, 2]), "videos must hold tensors, got int"),
                          (lambda: _C.direct_patchify([v], [1, True, 2]), "patch_size must be an int, got bool"),
                          (lambda: _C.direct_unpatchify(v, [2, 4, 6], [1, 2, 2], 4.0), "channels must be an int"),
                          (lambda: _C.direct_unpatchify([v], [2, 4, 6], [1, 2, 2], 4), "tokens must be a tensor")):
        with pytest.raises(TypeError, match=message):
            call()


@needs_cuda_build
def test_direct_calls_are_the_ops(monkeypatch):
    # cuda.patch calls the ops' implementation directly; on CPU tensors both ways run the
    # same checks, then refuse the same way (on a GPU the patch tests compare results)
    from vdit_kernels import _C
    from vdit_kernels.cuda import patch as cuda_patch
    # the backend's list of them is what a CUDA build has (a stale build is reported)
    assert {name for name in dir(_C) if name.startswith("direct_")} == set(B.EXTENSION_DIRECT_CALLS)
    calls = []
    for name in ("direct_patchify", "direct_unpatchify"):
        monkeypatch.setattr(_C, name, lambda *args, name=name: calls.append((name, args)) or name)
    assert cuda_patch.patchify(["v"], [1, 2, 2]) == "direct_patchify"
    assert cuda_patch.unpatchify("t", [2, 4, 6], [1, 2, 2], 4) == "direct_unpatchify"
    assert calls == [("direct_patchify", (["v"], [1, 2, 2])), ("direct_unpatchify", ("t", [2, 4, 6], [1, 2, 2], 4))]
    monkeypatch.undo()
    v = torch.randn(4, 2, 4, 6)
    for direct, op, args in ((_C.direct_patchify, torch.ops.vdit_C.patchify, ([v], [1, 2, 2])),
                             (_C.direct_patchify, torch.ops.vdit_C.patchify, ([v, v.half()], [1, 2, 2])),
                             (_C.direct_unpatchify, torch.ops.vdit_C.unpatchify,
                              (torch.randn(12, 16), [2, 4, 6], [1, 2, 2], 4))):
        errors = []
        for fn in (direct, op):
            with pytest.raises(RuntimeError) as info:
                fn(*args)
            errors.append(str(info.value))
        assert errors[0] == errors[1]


@needs_cuda_build
@pytest.mark.parametrize("checks", ["_patch_bad_input_checks", "_rope_bad_input_checks", "_gemm_bad_input_checks"])
def test_bad_input_raises_cleanly(checks):
    # Errors raised by the host code (csrc/*_host.cpp) must reach Python as RuntimeError
    # naming the argument. In a child process: on the H100 machine (torch 2.11) raising
    # from vdit_C crashed the process (segfault) instead, also from the host .cpp; a crash
    # here fails this test with its signal instead of ending the test session.
    proc = subprocess.run([sys.executable, "-c", f"import test_cuda_ext as t; t.{checks}(); print('checks ok')"],
                          cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "checks ok" in proc.stdout, \
        f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}"


def _graph_capture_checks():
    # > 48 videos (kInlineVideos): the launch table is copied from a pinned host buffer that
    # the graph could not replay, so capturing raises; <= 48: records travel in the launch
    # parameters, so a captured patchify replays exactly on new video contents
    many = _pack(PACKS["many"], (1, 2, 2))
    videos = _videos(many, 4, torch.float16)
    vk.patchify(videos, many, backend="cuda")  # allocations outside the capture
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            vk.patchify(videos, many, backend="cuda")
    except RuntimeError as exc:
        assert "CUDA graph" in str(exc), exc
    else:
        raise AssertionError("a 70-video pack was captured")
    small = _pack(PACKS["mixed"], (1, 2, 2))
    videos = _videos(small, 4, torch.float16)
    vk.patchify(videos, small, backend="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = vk.patchify(videos, small, backend="cuda")
    for v in videos:
        v.normal_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(tokens, vk.patchify(videos, small, backend="reference"))
    # patch embedding's backward (its bias columns are filled inside the capture, so the
    # fill runs at replay): the replay equals eager
    weight = torch.randn(16, 4, 1, 2, 2, device="cuda", dtype=torch.float16)
    grad = torch.randn(small.num_tokens, 16, device="cuda", dtype=torch.float16)
    torch.ops.vdit_C.patch_embed_backward(grad, videos, weight, True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.vdit_C.patch_embed_backward(grad, videos, weight, True)
    grad.normal_()
    graph.replay()
    torch.cuda.synchronize()
    eager = torch.ops.vdit_C.patch_embed_backward(grad, videos, weight, True)
    for a, b in zip([*captured[0], *captured[1:]], [*eager[0], *eager[1:]]):
        assert torch.equal(a, b)


@gpu_only
@needs_cuda_build
def test_cuda_graph_capture():
    # in a child process, as the error tests above (an error raised from vdit_C crashed the
    # torch 2.11 GPU machine's process)
    proc = subprocess.run([sys.executable, "-c", "import test_cuda_ext as t; t._graph_capture_checks(); "
                           "print('checks ok')"],
                          cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "checks ok" in proc.stdout, \
        f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}"


# -- RoPE on a GPU -----------------------------------------------------------------------

def _rope_inputs(n, hq, hk, dims, dtype, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    d = sum(dims)
    q = torch.randn(n, hq, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(n, hk, d, generator=g).to(device=device, dtype=dtype)
    pos = (torch.rand(n, 3, generator=g) * 64).to(device)
    return q, k, pos


def _check_rope(q, k, pos, dims, interleaved, inverse=False, theta=10000.0):
    eq, ek = ref.apply_rope_3d(q, k, None, dims, theta, interleaved, positions=pos, inverse=inverse)
    gq, gk = torch.ops.vdit_C.rope_3d(q, k, pos, list(dims), theta, interleaved, inverse)
    assert gq.dtype == q.dtype and gk.dtype == k.dtype
    assert_verbose_close(gq, eq, name="q")
    assert_verbose_close(gk, ek, name="k")
    q2, k2 = q.clone(), k.clone()
    torch.ops.vdit_C.rope_3d_(q2, k2, pos, list(dims), theta, interleaved, inverse)
    assert torch.equal(q2, gq) and torch.equal(k2, gk)


# the CUDA RoPE's kernels (VDIT_ROPE_CUDA, read by the op at every call): the tiled
# kernel's two shapes (the first the default) and the shared-table kernel
ROPE_VARIANTS = ["tiled", "tiled-heads", "shared"]


@gpu_only
@pytest.mark.parametrize("variant", ROPE_VARIANTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
# head dims 12, 128 (two splits), 64, 72, 96, and odd splits
@pytest.mark.parametrize("dims", [(4, 4, 4), (44, 42, 42), (16, 56, 56), (16, 24, 24), (24, 24, 24), (32, 32, 32),
                                  (6, 4, 2), (0, 8, 8), (2, 2, 2)])
def test_rope_matches_reference(dtype, interleaved, dims, variant, monkeypatch):
    monkeypatch.setenv("VDIT_ROPE_CUDA", variant)
    q, k, pos = _rope_inputs(37, 3, 2, dims, dtype)
    _check_rope(q, k, pos, dims, interleaved)
    _check_rope(q, k, pos, dims, interleaved, inverse=True, theta=500.0)


@gpu_only
@pytest.mark.parametrize("variant", ["tiled", "tiled-heads"])
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_tiled_many_heads_and_beyond_its_head_dim(interleaved, variant, monkeypatch):
    # 48 + 41 heads over 8192 tokens: on a 132-SM GPU the grid's 5 to 17 head groups each
    # walk several heads (tiled-heads: four a step, the last step past the heads; at 300
    # tokens every group held one head); head_dim 600 is past the tiled kernel's 512 (its
    # frequencies travel in the launch parameters): the shared kernel runs it
    monkeypatch.setenv("VDIT_ROPE_CUDA", variant)
    q, k, pos = _rope_inputs(8192, 48, 41, (44, 42, 42), torch.bfloat16)
    _check_rope(q, k, pos, (44, 42, 42), interleaved)
    q, k, pos = _rope_inputs(9, 2, 1, (200, 200, 200), torch.float32)
    _check_rope(q, k, pos, (200, 200, 200), interleaved)


@gpu_only
@pytest.mark.parametrize("variant", ROPE_VARIANTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_non_contiguous_and_inverse_roundtrip(dtype, interleaved, variant, monkeypatch):
    monkeypatch.setenv("VDIT_ROPE_CUDA", variant)
    dims = (16, 24, 24)
    n, h, d = 50, 4, sum(dims)
    qkv = torch.randn(n, 3, h, d, device="cuda").to(dtype)
    q, k = qkv[:, 0], qkv[:, 1]  # strided views, as from a fused qkv projection
    pos = (torch.rand(n, 3, device="cuda") * 32)
    _check_rope(q, k, pos, dims, interleaved)
    # stride_d != 1
    qt = torch.randn(n, d, h, device="cuda").to(dtype).transpose(1, 2)
    _check_rope(qt, qt.clone(), pos, dims, interleaved)
    # forward then inverse is the identity (up to rounding)
    q32, k32, _ = _rope_inputs(n, 2, 2, dims, torch.float32)
    fq, fk = torch.ops.vdit_C.rope_3d(q32, k32, pos, list(dims), 10000.0, interleaved, False)
    bq, bk = torch.ops.vdit_C.rope_3d(fq, fk, pos, list(dims), 10000.0, interleaved, True)
    assert_verbose_close(bq, q32, atol=1e-5, rtol=1e-5)
    # in-place on strided views writes only the views
    before = qkv[:, 2].clone()
    eq, ek = ref.apply_rope_3d(q, k, None, dims, 10000.0, interleaved, positions=pos)
    torch.ops.vdit_C.rope_3d_(q, k, pos, list(dims), 10000.0, interleaved, False)
    assert_verbose_close(q, eq)
    assert_verbose_close(k, ek)
    assert torch.equal(qkv[:, 2], before)


@gpu_only
@pytest.mark.parametrize("inplace", [False, True])
def test_rope_public_api(inplace):
    pack = vk.VideoPack.from_shapes([(2, 4, 6), (1, 6, 4)], (1, 2, 2), device="cuda")
    q, k, _ = _rope_inputs(pack.num_tokens, 4, 2, (8, 12, 12), torch.bfloat16)
    eq, ek = vk.apply_rope_3d(q, k, pack, (8, 12, 12), backend="reference")
    gq, gk = vk.apply_rope_3d(q.clone(), k.clone(), pack, (8, 12, 12), inplace=inplace, backend="cuda")
    assert_verbose_close(gq, eq)
    assert_verbose_close(gk, ek)


@gpu_only
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_grad_matches_reference(interleaved):
    pack = vk.VideoPack.from_shapes([(2, 4, 6)], (1, 2, 2), device="cuda")
    q, k, _ = _rope_inputs(pack.num_tokens, 2, 2, (4, 6, 6), torch.float32)
    grads = []
    for backend in ("cuda", "reference"):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        oq, ok = vk.apply_rope_3d(qq, kk, pack, (4, 6, 6), interleaved=interleaved, backend=backend)
        (oq.square().sum() + ok.sum()).backward()
        grads.append((qq.grad, kk.grad))
    assert_verbose_close(grads[0][0], grads[1][0])
    assert_verbose_close(grads[0][1], grads[1][1])


def _rope_bad_input_checks():
    # both ways in: the registered ops and the direct calls cuda.rope makes (csrc/direct_host.cpp)
    import vdit_kernels.cuda.rope  # noqa: F401  (loads _C)
    from vdit_kernels import _C
    q, k, pos = _rope_inputs(4, 2, 2, (4, 4, 4), torch.float32, device=DEVICE)
    for rope, rope_ in ((torch.ops.vdit_C.rope_3d, torch.ops.vdit_C.rope_3d_), (_C.direct_rope_3d, _C.direct_rope_3d_)):
        with pytest.raises(RuntimeError, match="dims"):
            rope(q, k, pos, [4, 4, 2], 1e4, True, False)
        with pytest.raises(RuntimeError, match="dims"):
            rope(q, k, pos, [3, 5, 4], 1e4, True, False)
        with pytest.raises(RuntimeError, match="at most head_dim"):  # the sum wraps to 12 in int64
            rope(q, k, pos, [2**63 - 2, 2**63 - 2, 16], 1e4, True, False)
        with pytest.raises(RuntimeError, match="positions"):
            rope(q, k, pos.double(), [4, 4, 4], 1e4, True, False)
        # a head_dim past the kernels' (its half narrowed to int32 wrapped into the tiled
        # kernel's range): stride-0 views, no memory
        for d in (16384, 2**32, 2**33 + 128):
            huge = torch.zeros(1, 1, 1, device=DEVICE).expand(4, 2, d)
            with pytest.raises(RuntimeError, match=f"head_dim {d} is larger than the CUDA kernels take \\(8192\\)"):
                op = rope_ if d == 16384 else rope
                op(huge, huge, pos, [d - 128, 64, 64], 1e4, True, False)
        for rows in (pos[:3], torch.cat([pos, pos[:1]])):  # too few rows, or too many
            with pytest.raises(RuntimeError, match="positions"):
                rope(q, k, rows, [4, 4, 4], 1e4, True, False)
        with pytest.raises(RuntimeError, match="dtype"):
            rope(q, k.half(), pos, [4, 4, 4], 1e4, True, False)
        with pytest.raises(RuntimeError, match="must share N and head_dim"):  # (not "k": the CPU refusal has one)
            rope(q, k[:, :, :8], pos, [4, 4, 4], 1e4, True, False)
        for theta in (0.0, -1.0, float("inf"), float("nan")):  # theta^(-2j/d): NaN or inf angles
            for op in (rope, rope_):
                with pytest.raises(RuntimeError, match="theta .* must be a positive finite number"):
                    op(q, k, pos, [4, 4, 4], theta, True, False)
        # the kernel choice: "shared", "tiled", "tiled-heads" or unset, a clear error otherwise
        # (CPU tensors too)
        os.environ["VDIT_ROPE_CUDA"] = "fast"
        try:
            for op in (rope, rope_):
                with pytest.raises(ValueError, match='VDIT_ROPE_CUDA must be "shared", "tiled" or "tiled-heads" '
                                                     '.*got "fast"'):
                    op(q, k, pos, [4, 4, 4], 1e4, True, False)
        finally:
            del os.environ["VDIT_ROPE_CUDA"]
        # in place: elements reachable twice would be rotated twice (q is k, a stride-0 view)
        with pytest.raises(ValueError, match="rope_3d_: inplace RoPE: q and k may share elements"):
            rope_(q, q, pos, [4, 4, 4], 1e4, True, False)
        # positions in q's memory: overwritten while other tokens read them
        buf = torch.randn(4 * 2 * 12, device=DEVICE)
        for q_, k_ in ((buf.view(4, 2, 12), k), (q, buf.view(4, 2, 12))):  # in q's, then in k's
            with pytest.raises(ValueError, match="rope_3d_: inplace RoPE: positions share memory with q or k"):
                rope_(q_, k_, buf[:12].view(4, 3), [4, 4, 4], 1e4, True, False)
        # one memory, two storages (DLPack): by address, not by storage
        with pytest.raises(ValueError, match="rope_3d_: inplace RoPE: q and k may share elements"):
            rope_(torch.from_dlpack(q), torch.from_dlpack(q[:, 1:]), pos, [4, 4, 4], 1e4, True, False)
        with pytest.raises(ValueError, match="rope_3d_: inplace RoPE: q .* more than once"):
            rope_(q[:, :1].expand(-1, 2, -1), k, pos, [4, 4, 4], 1e4, True, False)
        # token rows that overlap with no zero stride (ATen's own test cannot tell: "too hard")
        overlapping = torch.randn(4 * 4 + 2 * 12, device=DEVICE).as_strided((4, 2, 12), (4, 12, 1))
        for qq, kk, name in ((overlapping, k, "q"), (q, overlapping, "k")):
            with pytest.raises(ValueError, match=f"rope_3d_: inplace RoPE: {name} .* may address some elements "
                                                 "more than once"):
                rope_(qq, kk, pos, [4, 4, 4], 1e4, True, False)
    # the direct calls' own argument conversion (the ops' schemas do it for torch.ops)
    for call, message in ((lambda: _C.direct_rope_3d(q, k, pos, [4, 4, 4], 1e4, True), "takes 7 arguments, got 6"),
                          (lambda: _C.direct_rope_3d(q, k, pos, [4, 4, 4], "1e4", True, False), "theta must be a float"),
                          (lambda: _C.direct_rope_3d(q, k, pos, [4, 4, 4], True, True, False), "theta must be a float"),
                          (lambda: _C.direct_rope_3d(q, k, pos, [4, 4, 4], 1e4, 1, False), "interleaved must be a bool"),
                          (lambda: _C.direct_rope_3d_(q, k, pos, [4, 4, 4.0], 1e4, True, False), "dims must be an int"),
                          (lambda: _C.direct_rope_3d_(q, None, pos, [4, 4, 4], 1e4, True, False), "k must be a tensor")):
        with pytest.raises(TypeError, match=message):
            call()


@needs_cuda_build
def test_cpp_inplace_overlap_checks_match_python():
    # the cuda backend leaves check_inplace_rope to its C++ op (cuda.rope.CHECKS_INPLACE_OVERLAP):
    # on CPU tensors the op runs every check, then refuses the device, so its verdict on
    # random views of one buffer (and of two) is seen here, against the Python one's
    from vdit_kernels import _C
    from vdit_kernels.checks import check_inplace_rope
    from vdit_kernels.cuda import rope as cuda_rope
    assert cuda_rope.CHECKS_INPLACE_OVERLAP
    g = torch.Generator().manual_seed(0)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    buf = torch.randn(3000)
    seen = {"q overlaps itself": 0, "k overlaps itself": 0, "q and k share": 0, "accepted": 0}
    for i in range(900):
        n = rand(1, 4)
        stride = (rand(0, 80), rand(0, 26), 1 if i % 4 else rand(0, 2))
        q = buf.as_strided((n, rand(1, 3), 12), stride, rand(0, 600))
        if i % 5 == 0:  # another buffer
            k = torch.randn(n, rand(1, 3), 12)
        else:  # the same strides (a fused qkv projection's views: the exact case) or others
            k = buf.as_strided((n, rand(1, 3), 12), stride if i % 3 else (rand(0, 80), rand(0, 26), 1), rand(0, 600))
        try:
            check_inplace_rope(q, k)
            expected = None
        except ValueError as exc:
            expected = str(exc)
        with pytest.raises(ValueError if expected else RuntimeError) as info:
            _C.direct_rope_3d_(q, k, torch.zeros(n, 3), [4, 4, 4], 1e4, True, False)
        brackets = lambda text: text.replace("[", "(").replace("]", ")")  # (C++ prints sizes as [..])
        got = brackets(str(info.value))
        if expected is None:
            assert "CUDA tensors" in got, (q.shape, q.stride(), k.shape, k.stride(), got)
            seen["accepted"] += 1
        else:
            assert got == brackets("vdit_C::rope_3d_: " + expected), (got, expected)
            seen["q and k share" if "share" in expected else f"{expected[14]} overlaps itself"] += 1
    assert min(seen.values()) >= 40, seen


# -- patch_embed / linear_unpatchify: gathers around ATen's GEMMs, autograd in C++ --------
# (csrc/patch_gemm_host.cpp). The same code runs CPU tensors with ATen's copies in place of
# the patch kernel: the formulas and the autograd wiring are tested here without a GPU.

GEMM_SHAPES = [(2, 4, 6), (1, 2, 2), (3, 2, 4)]


def _gemm_inputs(dtype, with_bias, device="cpu", seed=0, hidden=8, channels=3):
    """(pack, videos, weight, bias) of patch_embed and (x, lin_w, lin_b) of linear_unpatchify,
    all leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    leaf = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    pack = vk.VideoPack.from_shapes(GEMM_SHAPES, (1, 2, 2), device=device)
    videos = [leaf(channels, *s) for s in GEMM_SHAPES]
    weight, bias = leaf(hidden, channels, 1, 2, 2), leaf(hidden) if with_bias else None
    x, lin_w = leaf(pack.num_tokens, hidden), leaf(channels * 4, hidden)
    lin_b = leaf(channels * 4) if with_bias else None
    return pack, videos, weight, bias, x, lin_w, lin_b


def _outputs_and_grads(fn, leaves, seed=1):
    out = fn()
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g).to(o)).sum() for o in outs)
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, leaves))


def _gemm_calls(pack, videos, weight, bias, x, lin_w, lin_b):
    """op -> (the C++ op's call, the reference backend's call, leaves)."""
    shapes = [s for shape in pack.shapes for s in shape]
    embed_leaves = [*videos, weight] + ([bias] if bias is not None else [])
    out_leaves = [x, lin_w] + ([lin_b] if lin_b is not None else [])
    return {
        "patch_embed": (lambda: torch.ops.vdit_C.patch_embed(videos, weight, bias),
                        lambda: vk.patch_embed(videos, pack, weight, bias, backend="reference"), embed_leaves),
        "linear_unpatchify": (lambda: torch.ops.vdit_C.linear_unpatchify(x, lin_w, lin_b, shapes, [1, 2, 2], 3),
                              lambda: vk.linear_unpatchify(x, pack, lin_w, lin_b, 3, backend="reference"),
                              out_leaves),
    }


@needs_cuda_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("op", ["patch_embed", "linear_unpatchify"])
def test_gemm_direct_calls_are_the_ops(op, with_bias, dtype):
    # the cuda backend's eager route (its AUTOGRAD table) calls the ops' Autograd kernels
    # without the dispatcher (csrc/direct_host.cpp): the same outputs and gradients, bit for bit
    from vdit_kernels import _C
    from vdit_kernels.cuda import patch as cuda_patch
    direct = getattr(_C, f"direct_{op}")
    assert cuda_patch.AUTOGRAD[op] is direct
    pack, videos, weight, bias, x, lin_w, lin_b = _gemm_inputs(dtype, with_bias)
    through_op, _, leaves = _gemm_calls(pack, videos, weight, bias, x, lin_w, lin_b)[op]
    shapes = [s for shape in pack.shapes for s in shape]
    args = (videos, weight, bias) if op == "patch_embed" else (x, lin_w, lin_b, shapes, [1, 2, 2], 3)
    outs, grads = _outputs_and_grads(lambda: direct(*args), leaves)
    ref_outs, ref_grads = _outputs_and_grads(through_op, leaves)
    assert all(torch.equal(a, b) for a, b in zip(outs + grads, ref_outs + ref_grads))
    with torch.no_grad():  # no graph where nothing records one
        assert all(o.grad_fn is None for o in ([direct(*args)] if op == "patch_embed" else direct(*args)))


@needs_cuda_build
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("op", ["patch_embed", "linear_unpatchify"])
def test_gemm_ops_cpu_match_reference(op, with_bias, dtype):
    mine, theirs, leaves = _gemm_calls(*_gemm_inputs(dtype, with_bias))[op]
    outs, grads = _outputs_and_grads(mine, leaves)
    ref_outs, ref_grads = _outputs_and_grads(theirs, leaves)
    assert len(outs) == len(ref_outs) and len(grads) == len(ref_grads)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous()
        assert_verbose_close(a, b, atol=tol, rtol=tol)


@needs_cuda_build
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("op", ["patch_embed", "linear_unpatchify"])
def test_gemm_ops_cpu_float16_matmul_rule(op, with_bias):
    # float16, forward and every gradient: error against a float32 reference at most 2x
    # that of plain PyTorch in float16 (per-video view + permute, torch.cat, F.linear)
    from conftest import assert_matmul_rule
    inputs = _gemm_inputs(torch.float16, with_bias)
    pack, videos, weight, bias, x, lin_w, lin_b = inputs
    mine, _, leaves = _gemm_calls(*inputs)[op]
    shapes = [tuple(v.shape[1:]) for v in videos]

    def torch_same_dtype(*ls):
        if op == "patch_embed":
            vs, w, b = ls[:len(videos)], ls[len(videos)], ls[len(videos) + 1] if with_bias else None
            rows = [v.reshape(3, t, h // 2, 2, w_ // 2, 2).permute(1, 2, 4, 0, 3, 5).reshape(-1, 12)
                    for v, (t, h, w_) in zip(vs, shapes)]
            return torch.nn.functional.linear(torch.cat(rows), w.flatten(1), b)
        xx, w, b = ls[0], ls[1], ls[2] if with_bias else None
        y, out, row = torch.nn.functional.linear(xx, w, b), [], 0
        for t, h, w_ in shapes:
            n = t * (h // 2) * (w_ // 2)
            out.append(y[row:row + n].reshape(t, h // 2, w_ // 2, 3, 2, 2).permute(3, 0, 1, 4, 2, 5)
                       .reshape(3, t, h, w_))
            row += n
        return out

    def leaves_as(dtype):
        return [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    outs, grads = _outputs_and_grads(mine, leaves)
    same_leaves, fp32_leaves = leaves_as(torch.float16), leaves_as(torch.float32)
    same_outs, same_grads = _outputs_and_grads(lambda: torch_same_dtype(*same_leaves), same_leaves)
    ref_outs, ref_grads = _outputs_and_grads(lambda: torch_same_dtype(*fp32_leaves), fp32_leaves)
    for i, (a, s_, r) in enumerate(zip(outs + grads, same_outs + same_grads, ref_outs + ref_grads)):
        assert a.dtype == torch.float16 and a.shape == r.shape
        assert_matmul_rule(a, s_, r, name=f"{op} output/gradient {i}")


@needs_cuda_build
@pytest.mark.parametrize("op", ["patch_embed", "linear_unpatchify"])
def test_gemm_ops_gradcheck(op):
    pack, videos, weight, bias, x, lin_w, lin_b = _gemm_inputs(torch.float64, True)
    shapes = [s for shape in pack.shapes for s in shape]
    if op == "patch_embed":
        assert torch.autograd.gradcheck(
            lambda *t: torch.ops.vdit_C.patch_embed(list(t[:3]), t[3], t[4]), (*videos, weight, bias))
    else:
        assert torch.autograd.gradcheck(
            lambda *t: tuple(torch.ops.vdit_C.linear_unpatchify(*t, shapes, [1, 2, 2], 3)), (x, lin_w, lin_b))


@needs_cuda_build
@pytest.mark.parametrize("op", ["patch_embed", "linear_unpatchify"])
def test_gemm_backward_op_is_the_autograd_formula(op):
    # the registered backward op (what the Python op's backward runs on backend "cuda") and
    # the C++ autograd formula compute the same, bit for bit
    pack, videos, weight, bias, x, lin_w, lin_b = _gemm_inputs(torch.float32, True)
    mine, _, leaves = _gemm_calls(pack, videos, weight, bias, x, lin_w, lin_b)[op]
    outs = mine()
    outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
    grad_outs = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, grad_outs)
    if op == "patch_embed":
        gx, gw, gb = torch.ops.vdit_C.patch_embed_backward(grad_outs[0], [v.detach() for v in videos],
                                                           weight.detach(), True)
        expected = [*gx, gw, gb]
    else:
        expected = list(torch.ops.vdit_C.linear_unpatchify_backward(grad_outs, x.detach(), lin_w.detach(),
                                                                    [1, 2, 2], True))
    for a, b in zip(grads, expected):
        assert torch.equal(a, b)


@needs_cuda_build
def test_gemm_ops_compute_only_requested_gradients():
    # frozen latents (the usual training case) or a frozen weight: the other gradients are
    # still exact, and nothing flows into the frozen ones
    pack, videos, weight, bias, x, lin_w, lin_b = _gemm_inputs(torch.float64, True)
    # (without a bias too: the weight gradient was computed where either was asked for)
    for frozen, b in (("videos", bias), ("weight", bias), ("videos", None)):
        vs = [v.detach().requires_grad_(frozen != "videos") for v in videos]
        w = weight.detach().requires_grad_(frozen != "weight")
        leaves = [t for t in (*vs, w, b) if t is not None and t.requires_grad]
        _, grads = _outputs_and_grads(lambda: torch.ops.vdit_C.patch_embed(vs, w, b), leaves)
        _, ref_grads = _outputs_and_grads(lambda: vk.patch_embed(vs, pack, w, b, backend="reference"), leaves)
        for a, b in zip(grads, ref_grads):
            assert_verbose_close(a, b, atol=1e-12, rtol=1e-12)
    for frozen in ("x", "weight"):
        xx, w = x.detach().requires_grad_(frozen != "x"), lin_w.detach().requires_grad_(frozen != "weight")
        leaves = [t for t in (xx, w, lin_b) if t.requires_grad]
        shapes = [s for shape in pack.shapes for s in shape]
        _, grads = _outputs_and_grads(lambda: torch.ops.vdit_C.linear_unpatchify(xx, w, lin_b, shapes, [1, 2, 2], 3),
                                      leaves)
        _, ref_grads = _outputs_and_grads(lambda: vk.linear_unpatchify(xx, pack, w, lin_b, 3, backend="reference"),
                                          leaves)
        for a, b in zip(grads, ref_grads):
            assert_verbose_close(a, b, atol=1e-12, rtol=1e-12)


def _zero_size_gemm_ops(device):
    # patchify takes videos of 0 channels (tokens of 0 columns), so patch_embed's gradient
    # scatters (N, 0) tokens back into (0, T, H, W) videos; the bias gradient is still
    # grad's column sum (the CUDA unpatchify refused 0 channels: an H100 run, 2026-11-27)
    shapes = [(2, 4, 6), (1, 2, 2), (4, 2, 4)]
    videos = [torch.zeros(0, *s, device=device) for s in shapes]
    weight = torch.zeros(5, 0, 1, 2, 2, device=device)
    grad = torch.randn(sum(t * (h // 2) * (w // 2) for t, h, w in shapes), 5, device=device)
    gx, gw, gb = torch.ops.vdit_C.patch_embed_backward(grad, videos, weight, True)
    assert [g.shape for g in gx] == [v.shape for v in videos] and gw.shape == weight.shape
    assert_verbose_close(gb, grad.sum(0), atol=1e-5, rtol=1e-5)
    flat = [s for shape in shapes for s in shape]
    outs = torch.ops.vdit_C.linear_unpatchify(torch.randn(grad.shape[0], 3, device=device),
                                              torch.zeros(0, 3, device=device), None, flat, [1, 2, 2], 0)
    assert [o.shape for o in outs] == [v.shape for v in videos]
    # hidden = 0 (the public patch_embed takes it): (N, 0) out, zero-size weight gradients,
    # and the videos' gradient is zero (reshape(hidden, -1) of the empty weight failed)
    videos = [torch.randn(3, *s, device=device) for s in shapes]
    weight = torch.zeros(0, 3, 1, 2, 2, device=device)
    assert torch.ops.vdit_C.patch_embed(videos, weight, torch.zeros(0, device=device)).shape == (grad.shape[0], 0)
    gx, gw, gb = torch.ops.vdit_C.patch_embed_backward(grad[:, :0], videos, weight, True)
    assert all(g.shape == v.shape and not g.any() for g, v in zip(gx, videos))
    assert gw.shape == weight.shape and gb.shape == (0,)


@needs_cuda_build
def test_gemm_ops_take_zero_channels_and_zero_hidden():
    _zero_size_gemm_ops("cpu")


@gpu_only
@needs_cuda_build
def test_gemm_ops_take_zero_channels_and_zero_hidden_on_the_gpu():
    _zero_size_gemm_ops("cuda")


@needs_cuda_build
def test_gemm_ops_non_contiguous_inputs():
    # strided videos (W not innermost), a weight and x that are views with gaps, a strided
    # bias: the same results and gradients as the reference
    pack, videos, weight, bias, x, lin_w, lin_b = _gemm_inputs(torch.float64, True)
    vs = [v.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_(True) for v in videos]
    w = torch.randn(8, 3, 1, 2, 4, dtype=torch.float64)[..., ::2].requires_grad_(True)
    b = torch.randn(16, dtype=torch.float64)[::2].requires_grad_(True)
    xx = torch.randn(pack.num_tokens, 16, dtype=torch.float64)[:, 3:11].requires_grad_(True)
    lw = torch.randn(8, 12, dtype=torch.float64).t().requires_grad_(True)
    assert not any(t.is_contiguous() for t in (*vs, w, b, xx, lw))
    shapes = [s for shape in pack.shapes for s in shape]
    for mine, theirs, leaves in (
            (lambda: torch.ops.vdit_C.patch_embed(vs, w, b),
             lambda: vk.patch_embed(vs, pack, w, b, backend="reference"), [*vs, w, b]),
            (lambda: torch.ops.vdit_C.linear_unpatchify(xx, lw, b[:12 // 2].repeat(2), shapes, [1, 2, 2], 3),
             lambda: vk.linear_unpatchify(xx, pack, lw, b[:12 // 2].repeat(2), 3, backend="reference"), [xx, lw])):
        outs, grads = _outputs_and_grads(mine, leaves)
        ref_outs, ref_grads = _outputs_and_grads(theirs, leaves)
        for a, e in zip(outs + grads, ref_outs + ref_grads):
            assert_verbose_close(a, e, atol=1e-12, rtol=1e-12)


@needs_cuda_build
def test_gemm_ops_zero_token_videos():
    # a video with no frames gives no tokens: empty rows forward, zero-size gradients back
    v = [torch.randn(3, 0, 4, 6, dtype=torch.float64, requires_grad=True),
         torch.randn(3, 1, 2, 2, dtype=torch.float64, requires_grad=True)]
    w = torch.randn(5, 3, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    out = torch.ops.vdit_C.patch_embed(v, w, b)
    assert out.shape == (1, 5)
    out.sum().backward()
    assert v[0].grad.shape == v[0].shape and torch.equal(b.grad, torch.ones_like(b))
    # a one-token video's scatter moves nothing: the op still returns fresh videos (the CPU
    # path once returned views into its GEMM's (N, F) result, which the fake op does not)
    one = torch.ops.vdit_C.linear_unpatchify(torch.randn(3, 5), torch.randn(12, 5), None, [2, 2, 2, 1, 2, 2],
                                             [1, 2, 2], 3)
    assert all(t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
               for t in one)
    x = torch.randn(0, 5, requires_grad=True)
    videos = torch.ops.vdit_C.linear_unpatchify(x, torch.randn(12, 5), torch.randn(12), [0, 4, 6], [1, 2, 2], 3)
    assert [tuple(t.shape) for t in videos] == [(3, 0, 4, 6)]
    sum(t.sum() for t in videos).backward()
    assert x.grad.shape == (0, 5)


@needs_cuda_build
@pytest.mark.parametrize("op", ["patch_embed", "linear_unpatchify"])
def test_gemm_ops_double_backward_raises(op):
    # create_graph=True works for first derivatives; differentiating them again raises
    # (as the Python ops do) rather than treating the backward as constant
    mine, _, leaves = _gemm_calls(*_gemm_inputs(torch.float64, True))[op]
    out = mine()
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    grads = torch.autograd.grad(sum(o.square().sum() for o in outs), leaves, create_graph=True)
    _, ref_grads = _outputs_and_grads(mine, leaves)  # a plain backward still works after
    with pytest.raises(RuntimeError, match="differentiable once"):
        sum(g.sum() for g in grads).backward()


def _gemm_bad_input_checks():
    v = torch.randn(3, 2, 4, 6, device=DEVICE)
    w = torch.randn(8, 3, 1, 2, 2, device=DEVICE)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.vdit_C.patch_embed([v], w[0], None)
    with pytest.raises(RuntimeError, match="channels"):
        torch.ops.vdit_C.patch_embed([v], w[:, :2].contiguous(), None)
    with pytest.raises(RuntimeError, match="not divisible"):
        torch.ops.vdit_C.patch_embed([v], torch.randn(8, 3, 1, 4, 4, device=DEVICE), None)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.vdit_C.patch_embed([v], w, torch.randn(7, device=DEVICE))
    with pytest.raises(RuntimeError, match="must match"):
        torch.ops.vdit_C.patch_embed([v], w.double(), None)
    with pytest.raises(RuntimeError, match="videos\\[1\\]"):
        torch.ops.vdit_C.patch_embed([v, v.double()], w, None)
    with pytest.raises(RuntimeError, match="grad must be"):
        torch.ops.vdit_C.patch_embed_backward(torch.randn(12, 5, device=DEVICE), [v], w, True)
    x, lw = torch.randn(12, 8, device=DEVICE), torch.randn(12, 8, device=DEVICE)
    with pytest.raises(RuntimeError, match="x \\(N, hidden\\) and weight"):
        torch.ops.vdit_C.linear_unpatchify(x, lw[:, :5], None, [2, 4, 6], [1, 2, 2], 3)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.vdit_C.linear_unpatchify(x, lw, torch.randn(5, device=DEVICE), [2, 4, 6], [1, 2, 2], 3)
    with pytest.raises(RuntimeError, match="video gradients make"):
        torch.ops.vdit_C.linear_unpatchify_backward([v[:, :1]], x, lw, [1, 2, 2], False)
    # a patch size of 0 (a division by zero in the shape arithmetic: SIGFPE before it was
    # checked), and shapes that do not cover x's rows, on CPU tensors as on CUDA ones
    with pytest.raises(RuntimeError, match="kernel \\(pt, ph, pw\\) must be positive"):
        torch.ops.vdit_C.patch_embed([v], torch.randn(8, 3, 1, 0, 2, device=DEVICE), None)
    with pytest.raises(RuntimeError, match="kernel \\(pt, ph, pw\\) must be positive"):
        torch.ops.vdit_C.patch_embed_backward(torch.randn(12, 8, device=DEVICE), [v],
                                              torch.randn(8, 3, 0, 2, 2, device=DEVICE), True)
    with pytest.raises(RuntimeError, match="patch_size must be in"):
        torch.ops.vdit_C.linear_unpatchify(x, lw, None, [2, 4, 6], [1, 0, 2], 3)
    with pytest.raises(RuntimeError, match="patch_size must be in"):
        torch.ops.vdit_C.linear_unpatchify_backward([v], x, lw, [0, 2, 2], False)
    with pytest.raises(RuntimeError, match="tokens has 12 rows, the shapes make 6 tokens"):
        torch.ops.vdit_C.linear_unpatchify(x, lw, None, [1, 4, 6], [1, 2, 2], 3)
    # the direct calls (csrc/direct_host.cpp) raise the ops' checks, and their own for arguments
    from vdit_kernels import _C
    with pytest.raises(RuntimeError, match="bias must be"):
        _C.direct_patch_embed([v], w, torch.randn(7, device=DEVICE))
    with pytest.raises(RuntimeError, match="bias must be"):
        _C.direct_linear_unpatchify(x, lw, torch.randn(5, device=DEVICE), [2, 4, 6], [1, 2, 2], 3)
    with pytest.raises(TypeError, match="bias must be a tensor, got list"):
        _C.direct_patch_embed([v], w, [0.0] * 8)
    with pytest.raises(TypeError, match="takes 6 arguments, got 5"):
        _C.direct_linear_unpatchify(x, lw, None, [2, 4, 6], [1, 2, 2])


@gpu_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("op", ["patch_embed", "linear_unpatchify"])
def test_gemm_ops_gpu_match_triton_gemm_variant_and_reference(op, with_bias, dtype, monkeypatch):
    # on backend "cuda" (the default for these ops on a GPU) the results are exactly the
    # Triton backend's "gemm" variant (the same kernels and GEMMs, issued from C++; that
    # variant meets the same-dtype error rule in test_patch_embed_triton.test_dtypes), and
    # near a float32 reference
    monkeypatch.setenv("VDIT_PATCH_EMBED_FWD", "gemm")
    monkeypatch.setenv("VDIT_PATCH_EMBED_BWD", "gemm")
    monkeypatch.setenv("VDIT_LINEAR_UNPATCHIFY_FWD", "gemm")
    monkeypatch.setenv("VDIT_LINEAR_UNPATCHIFY_BWD", "gemm")
    assert B.resolve("patch", torch.device("cuda"), None, op, dtype) == "cuda"
    pack, videos, weight, bias, x, lin_w, lin_b = _gemm_inputs(dtype, with_bias, device="cuda", hidden=72,
                                                               channels=4)
    leaves = [*videos, weight, bias] if op == "patch_embed" else [x, lin_w, lin_b]
    leaves = [t for t in leaves if t is not None]

    def run(backend, cast=None):
        ls = [t.detach().to(cast or t.dtype).requires_grad_(True) for t in leaves]
        if op == "patch_embed":
            b = ls[len(videos) + 1] if with_bias else None
            fn = lambda: vk.patch_embed(ls[:len(videos)], pack, ls[len(videos)], b, backend=backend)
        else:
            fn = lambda: vk.linear_unpatchify(ls[0], pack, ls[1], ls[2] if with_bias else None, 4, backend=backend)
        outs, grads = _outputs_and_grads(fn, ls)
        return outs + grads
    mine = run("cuda")
    tol = {torch.float32: 2e-2, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]  # TF32 may be on
    for a, r in zip(mine, run("reference", torch.float32)):
        assert_verbose_close(a.float(), r, atol=tol, rtol=tol)
    # the forward GEMM on ATen's addmm, as the Triton variant calls it (cuBLASLt's own plan
    # may pick another algorithm: test_forward_gemm_on_cublaslt_matches_aten)
    monkeypatch.setenv("VDIT_CUBLASLT", "0")
    for a, b in zip(run("cuda"), run("triton")):
        assert torch.equal(a, b)


@gpu_only
@needs_cuda_build
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_gemm_on_cublaslt_at_a_dit_shape(with_bias, monkeypatch):
    # a DiT's patch embedding: 16 channels, patch 1x2x2 (F = 64), hidden 3072, an odd token
    # count from two videos; cuBLASLt's kept plan against ATen's addmm, bfloat16
    g = torch.Generator().manual_seed(1)
    shapes = [(5, 30, 50), (3, 14, 18)]
    videos = [torch.randn(16, *s, generator=g).to("cuda", torch.bfloat16) for s in shapes]
    weight = (torch.randn(3072, 16, 1, 2, 2, generator=g) / 8).to("cuda", torch.bfloat16)
    bias = torch.randn(3072, generator=g).to("cuda", torch.bfloat16) if with_bias else None
    lt, aten = _linear_forward_calls()
    with torch.no_grad():
        got = torch.ops.vdit_C.patch_embed(videos, weight, bias)
        assert _linear_forward_calls() == (lt + 1, aten)
        monkeypatch.setenv("VDIT_CUBLASLT", "0")
        expect = torch.ops.vdit_C.patch_embed(videos, weight, bias)
    assert got.shape == (5 * 15 * 25 + 3 * 7 * 9, 3072)
    ulp = torch.finfo(torch.bfloat16).eps
    assert_verbose_close(got.float(), expect.float(), atol=ulp, rtol=ulp)


def _linear_forward_calls() -> tuple[int, int]:
    """(calls on cuBLASLt, CUDA calls on ATen) of the forward GEMMs so far (csrc/linear_gemm_host.cpp)."""
    from vdit_kernels import _C
    info = _C.linear_forward_info()
    lt, aten = (re.search(rf"(\d+) {what}", info) for what in ("calls on cuBLASLt", "CUDA calls on ATen"))
    assert lt and aten, info
    return int(lt.group(1)), int(aten.group(1))


@needs_cuda_build
def test_forward_gemm_info_and_cpu_calls():
    # CPU tensors take ATen's GEMMs and count on neither path
    from vdit_kernels import _C
    assert re.match(r"cuBLASLt (from libcublasLt\.so\.\d+|unavailable \(.+\)): \d+ plans \(\d+ usable\), ",
                    _C.linear_forward_info()), _C.linear_forward_info()
    with pytest.raises(TypeError, match="takes no arguments"):
        _C.linear_forward_info(1)
    before = _linear_forward_calls()
    pack, videos, weight, bias, x, lin_w, lin_b = _gemm_inputs(torch.float32, True)
    torch.ops.vdit_C.patch_embed(videos, weight, bias)
    torch.ops.vdit_C.linear_unpatchify(x, lin_w, lin_b, [s for shape in GEMM_SHAPES for s in shape], [1, 2, 2], 3)
    assert _linear_forward_calls() == before


@gpu_only
@needs_cuda_build
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("op", ["patch_embed", "linear_unpatchify"])
def test_forward_gemm_on_cublaslt_matches_aten(op, with_bias, dtype, monkeypatch):
    # the cuda backend's forward GEMM runs cuBLASLt with a kept plan; ATen's addmm / mm
    # (VDIT_CUBLASLT=0) is the check: the same products, float32 accumulation, one rounding
    # to the output dtype, so at most a unit in the last place apart
    pack, videos, weight, bias, x, lin_w, lin_b = _gemm_inputs(dtype, with_bias, device="cuda", hidden=72,
                                                               channels=4)
    shapes = [s for shape in GEMM_SHAPES for s in shape]

    def forward(hidden_bias=bias, out_bias=lin_b):
        with torch.no_grad():
            if op == "patch_embed":
                return torch.ops.vdit_C.patch_embed(videos, weight, hidden_bias)
            return torch.cat([v.flatten() for v in torch.ops.vdit_C.linear_unpatchify(x, lin_w, out_bias, shapes,
                                                                                       [1, 2, 2], 4)])
    lt, aten = _linear_forward_calls()
    got = forward()
    forward()  # the kept plan, again
    assert _linear_forward_calls() == (lt + 2, aten)
    monkeypatch.setenv("VDIT_CUBLASLT", "0")
    expect = forward()
    assert _linear_forward_calls() == (lt + 2, aten + 1)
    ulp = torch.finfo(dtype).eps
    assert_verbose_close(got.float(), expect.float(), atol=ulp, rtol=ulp)
    monkeypatch.delenv("VDIT_CUBLASLT")
    if with_bias:  # a bias 2 bytes off 16-byte alignment: ATen's path
        b = bias if op == "patch_embed" else lin_b
        shifted = torch.empty(b.numel() + 1, dtype=dtype, device="cuda")[1:].copy_(b)
        args = {"hidden_bias" if op == "patch_embed" else "out_bias": shifted}
        assert_verbose_close(forward(**args).float(), expect.float(), atol=ulp, rtol=ulp)
        assert _linear_forward_calls() == (lt + 2, aten + 2)
