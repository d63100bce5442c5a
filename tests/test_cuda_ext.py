"""The compiled extension vdit_kernels._C: load, schemas, backend selection, argument
checks, and the CUDA kernels (csrc/patch.cu, csrc/rope.cu) against the reference.

Numerical tests need a GPU (conftest.gpu_only); without one they are skipped with a reason.
The argument checks (csrc/*_host.cpp) run on CPU tensors too, so they are tested here on
the GPU where there is one and on CPU otherwise.
"""
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
        assert "cuda=1" in torch.ops.vdit_C.build_info()


@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_schema(op):
    assert B.extension() is not None
    assert str(getattr(torch.ops.vdit_C, op).default._schema) == SCHEMAS[op]


def test_no_unexpected_ops():
    assert B.extension() is not None
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("vdit_C::")}
    assert registered == {f"vdit_C::{op}" for op in SCHEMAS}


# -- backend selection ---------------------------------------------------------------

@needs_cuda_build
@pytest.mark.parametrize("family,ops", [("patch", ("patchify", "unpatchify")), ("rope", ("rope_3d", "rope_3d_"))])
def test_cuda_backend_available_for_cuda_tensors(family, ops):
    for op in ops:
        assert B.why_not("cuda", family, torch.device("cuda"), op) is None
    # ops the CUDA backend does not implement are reported as missing, not broken
    if family == "patch":
        assert "does not implement patch_embed" in B.why_not("cuda", "patch", torch.device("cuda"), "patch_embed")


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
    "many": [(2, 2, 2) if i % 3 else (2, 2, 4) for i in range(70)],  # > 64: device table
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
    v = torch.randn(4, 2, 4, 6, device=DEVICE)
    with pytest.raises(RuntimeError, match="patch_size"):
        torch.ops.vdit_C.patchify([v], [1, 2])
    with pytest.raises(RuntimeError, match="divisible"):
        torch.ops.vdit_C.patchify([v], [1, 4, 4])
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.vdit_C.patchify([v, v.half()], [1, 2, 2])
    with pytest.raises(RuntimeError, match="rows"):
        torch.ops.vdit_C.unpatchify(torch.randn(5, 16, device=DEVICE), [2, 4, 6], [1, 2, 2], 4)
    with pytest.raises(RuntimeError, match="patch_size must be in"):
        torch.ops.vdit_C.patchify([v], [1, 0, 2])
    with pytest.raises(RuntimeError, match="patch_size must be in"):  # C*pt*ph*pw would overflow int64
        torch.ops.vdit_C.patchify([v], [1, 2 ** 40, 2])
    with pytest.raises(RuntimeError, match="channels must be in"):
        torch.ops.vdit_C.unpatchify(torch.randn(5, 16, device=DEVICE), [2, 4, 6], [1, 2, 2], 2 ** 62)


@needs_cuda_build
@pytest.mark.parametrize("checks", ["_patch_bad_input_checks", "_rope_bad_input_checks"])
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
    # > 64 videos: the launch table is copied from a pinned host buffer that the graph
    # could not replay, so capturing raises; <= 64: records travel in the launch
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


@gpu_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
# head dims 12, 128 (two splits), 64, 72, 96, and odd splits
@pytest.mark.parametrize("dims", [(4, 4, 4), (44, 42, 42), (16, 56, 56), (16, 24, 24), (24, 24, 24), (32, 32, 32),
                                  (6, 4, 2), (0, 8, 8), (2, 2, 2)])
def test_rope_matches_reference(dtype, interleaved, dims):
    q, k, pos = _rope_inputs(37, 3, 2, dims, dtype)
    _check_rope(q, k, pos, dims, interleaved)
    _check_rope(q, k, pos, dims, interleaved, inverse=True, theta=500.0)


@gpu_only
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_non_contiguous_and_inverse_roundtrip(dtype, interleaved):
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
    q, k, pos = _rope_inputs(4, 2, 2, (4, 4, 4), torch.float32, device=DEVICE)
    with pytest.raises(RuntimeError, match="dims"):
        torch.ops.vdit_C.rope_3d(q, k, pos, [4, 4, 2], 1e4, True, False)
    with pytest.raises(RuntimeError, match="dims"):
        torch.ops.vdit_C.rope_3d(q, k, pos, [3, 5, 4], 1e4, True, False)
    with pytest.raises(RuntimeError, match="positions"):
        torch.ops.vdit_C.rope_3d(q, k, pos.double(), [4, 4, 4], 1e4, True, False)
    with pytest.raises(RuntimeError, match="positions"):
        torch.ops.vdit_C.rope_3d(q, k, pos[:3], [4, 4, 4], 1e4, True, False)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.vdit_C.rope_3d(q, k.half(), pos, [4, 4, 4], 1e4, True, False)
    with pytest.raises(RuntimeError, match="k"):
        torch.ops.vdit_C.rope_3d(q, k[:, :, :8], pos, [4, 4, 4], 1e4, True, False)
    # in place: elements reachable twice would be rotated twice (q is k, a stride-0 view)
    for qq, kk in ((q, q), (q[:, :1].expand(-1, 2, -1), k)):
        with pytest.raises(RuntimeError, match="single memory location|more than one element"):
            torch.ops.vdit_C.rope_3d_(qq, kk, pos, [4, 4, 4], 1e4, True, False)
