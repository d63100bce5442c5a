"""Host time of one patch_embed forward + backward by route, on tiny CPU tensors.

The H100 machine's timed patch_embed calls were bound by host time, not by the GPU
(session 13: 0.35 ms of kernels under 1.4 ms a forward + backward). This measures, on
any CPU machine with the CUDA build of vdit_kernels._C, the host cost of the layers
around the same C++ computation (whose CPU tensors take ATen copies for the gather):

  c++ autograd     ops/direct.py's native route: the C++ op with its C++ autograd formula,
                   called without the dispatcher (csrc/direct_host.cpp)
  c++ via torch.ops  the same through the dispatcher (torch.ops.vdit_C.patch_embed)
  python autograd  the route the Python autograd.Function takes (the native table emptied)
  registered op    VDIT_DIRECT=0: the torch.library op and its registered Python formula
  permute+linear   the peer (the patch suite's): per-video view + permute, torch.cat, F.linear

Tensors are tiny, so the numbers are host time (Python, dispatcher, autograd engine) plus
a few microseconds of CPU copies and GEMMs that every route shares. Not a GPU timing: the
H100 machine's host took several times longer for each layer.

Second, the Python of the public patchify / unpatchify / patch_embed (forward, no gradient) /
apply_rope_3d (out of place and in place) on the cuda backend, up to its C++ op (the op replaced by a function returning
preallocated outputs, the resolution answered as for CUDA tensors): what host-bound calls
spend before the C++ op.

    python -m benchmarks.host_routes [--calls 3000]
"""
from __future__ import annotations

import argparse
import time

import torch

import vdit_kernels as vk
from vdit_kernels import backend as _backend
from vdit_kernels.cuda import patch as cuda_patch
from vdit_kernels.cuda import rope as cuda_rope
from vdit_kernels.ops import direct
from vdit_kernels.ops import patch as patch_ops

from .bench_patch import _permute_linear

SHAPES = [(2, 4, 6), (1, 2, 2), (3, 2, 4)]


def _per_call_us(fn, calls: int) -> float:
    """The best of 5 rounds of `calls` calls, microseconds a call (after a warm-up)."""
    for _ in range(calls // 10):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_routes",
                                     description=(__doc__ or "").split("\n\n")[0])  # no docstrings under -OO
    parser.add_argument("--calls", type=_positive, default=3000, help="timed calls per route")
    args = parser.parse_args(argv)
    if _backend.extension() is None or not _backend.extension_has_cuda():
        raise SystemExit("needs vdit_kernels._C built with CUDA (its C++ patch_embed)")
    # one thread: the tiny GEMMs gain nothing from more, and on a loaded machine OpenMP's
    # waiting threads made the C++ route's backward GEMMs 1.5 ms each (2 cores, 2026-11-27)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    videos = [torch.randn(4, *s, requires_grad=True) for s in SHAPES]
    weight = torch.randn(32, 4, 1, 2, 2, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)

    def ours():
        out = direct.call(patch_ops.patch_embed_op, videos, weight, bias, "cuda")
        out.backward(torch.ones_like(out))

    def peer():  # the patch suite's permute-linear row
        out = _permute_linear(videos, weight.flatten(1), bias, (1, 2, 2))
        out.backward(torch.ones_like(out))

    native, enabled = dict(direct._NATIVE), direct.ENABLED
    table = dict(cuda_patch.AUTOGRAD)
    rows = []
    try:
        rows.append(("c++ autograd", _per_call_us(ours, args.calls)))
        cuda_patch.AUTOGRAD["patch_embed"] = cuda_patch.patch_embed
        rows.append(("c++ via torch.ops", _per_call_us(ours, args.calls)))
        cuda_patch.AUTOGRAD.update(table)
        direct._NATIVE.clear()
        rows.append(("python autograd", _per_call_us(ours, args.calls)))
        direct.ENABLED = False
        rows.append(("registered op", _per_call_us(ours, args.calls)))
    finally:
        cuda_patch.AUTOGRAD.update(table)
        direct._NATIVE.update(native)
        direct.ENABLED = enabled
    rows.append(("permute+linear", _per_call_us(peer, args.calls)))
    print(f"patch_embed forward + backward, {len(SHAPES)} tiny CPU videos, torch {torch.__version__}: "
          f"host microseconds a call (best of 5 x {args.calls})")
    for name, us in rows:
        print(f"  {name:18s} {us:7.1f} us")
    python_before_the_op(args.calls)


def python_before_the_op(calls: int) -> None:
    """Host us of the public patchify / unpatchify / patch_embed / apply_rope_3d's Python on the
    cuda route, 6 videos."""
    shapes = [(3, 4, 4)] * 4 + [(5, 2, 4)] * 2
    pack = vk.VideoPack.from_shapes(shapes, patch_size=(1, 2, 2))
    videos = [torch.randn(16, *s) for s in shapes]
    tokens = torch.empty(pack.num_tokens, 64)
    outs = [torch.empty(16, *s) for s in shapes]
    q, k = torch.randn(pack.num_tokens, 4, 16), torch.randn(pack.num_tokens, 4, 16)
    rotated = (torch.empty_like(q), torch.empty_like(k))
    weight, bias = torch.randn(32, 16, 1, 2, 2), torch.randn(32)
    embedded = torch.empty(pack.num_tokens, 32)
    saved = (_backend.resolve, _backend._gpu_visible, cuda_patch.patchify, cuda_patch.unpatchify,
             cuda_rope.rope_3d, cuda_rope.rope_3d_, dict(cuda_patch.AUTOGRAD))
    resolve = _backend.resolve
    try:  # resolved as for CUDA tensors (a visible GPU), the C++ ops' place taken by stubs
        _backend._gpu_visible = lambda: True
        _backend.resolve = lambda family, device, *rest: resolve(family, torch.device("cuda"), *rest)
        cuda_patch.patchify = lambda v, patch_size: tokens
        cuda_patch.unpatchify = lambda t, s, patch_size, channels: outs
        cuda_rope.rope_3d = lambda *args: rotated
        cuda_rope.rope_3d_ = lambda *args: None
        cuda_patch.AUTOGRAD["patch_embed"] = lambda v, w, b: embedded
        assert vk.patchify(videos, pack) is tokens  # the cuda route, not the reference
        assert vk.patch_embed(videos, pack, weight, bias) is embedded
        assert vk.apply_rope_3d(q, k, pack, (4, 6, 6))[0] is rotated[0]
        with torch.no_grad():
            rows = [("patchify", _per_call_us(lambda: vk.patchify(videos, pack), calls)),
                    ("unpatchify", _per_call_us(lambda: vk.unpatchify(tokens, pack, 16), calls)),
                    ("patch_embed", _per_call_us(lambda: vk.patch_embed(videos, pack, weight, bias), calls)),
                    ("apply_rope_3d", _per_call_us(lambda: vk.apply_rope_3d(q, k, pack, (4, 6, 6)), calls)),
                    ("apply_rope_3d in place",
                     _per_call_us(lambda: vk.apply_rope_3d(q, k, pack, (4, 6, 6), inplace=True), calls))]
    finally:
        (_backend.resolve, _backend._gpu_visible, cuda_patch.patchify, cuda_patch.unpatchify,
         cuda_rope.rope_3d, cuda_rope.rope_3d_, autograd) = saved
        cuda_patch.AUTOGRAD.update(autograd)
        _backend._why_not.cache_clear()  # it cached answers for the faked GPU
    print(f"public functions on the cuda route, {len(shapes)} videos (RoPE: 4 heads of 16): host us of the Python "
          "before the C++ op")
    for name, us in rows:
        print(f"  {name:18s} {us:7.1f} us")


if __name__ == "__main__":
    main()
