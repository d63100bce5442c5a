"""CUDA patch ops: patchify / unpatchify (csrc/patch.cu, one launch per pack and
direction), and patch_embed / linear_unpatchify as those gathers and scatters around
PyTorch's GEMMs, forward and backward in C++ (csrc/patch_gemm_host.cpp).

Contract (vdit_kernels/ops/patch.py): videos are (C, T, H, W) CUDA tensors of one dtype
(float32, float16, bfloat16), any strides; tokens (N, C*pt*ph*pw). unpatchify returns
fresh contiguous videos.

patch_embed and linear_unpatchify compute what the Triton backend's "gemm" variant
computes, the variant the H100 picked on every pack; the fused Triton GEMMs stay with
backend="triton". AUTOGRAD holds the same ops with their autograd formula in C++ (an
Autograd kernel of vdit_C): in eager code ops/direct.py calls them instead of running the
registered op's Python formula, so a training step's patch embedding costs one call of
C++ forward (not even a dispatcher call: csrc/direct_host.cpp) and no Python in the backward.
"""
from __future__ import annotations

import torch

from ..checks import KERNEL_DTYPES
from . import _backend  # (loads vdit_kernels._C)

DTYPES = KERNEL_DTYPES


# The eager calls skip the dispatcher's boxed call: patchify / unpatchify and the AUTOGRAD
# table below call the ops' C++ functions as plain Python functions of _C
# (csrc/direct_host.cpp). On 6 small CPU tensors a stand-in op of patchify's schema cost
# 6.9 us a call through torch.ops and 3.2 us so, 14.0 / 8.7 us returning 6 tensors
# (2026-11-27), beside a train pack's 39 / 35 us of patchify / unpatchify kernels on an H100
# whose host runs these layers about 4x slower. Where _C lacks them (no extension, a build
# without CUDA kernels or from older sources: backend.extension_missing_ops) the backend
# refuses every call, so nothing here runs. (The int lists arrive as the ops' schemas type
# them: no conversion here.)
_C = _backend.extension()


def patchify(videos, patch_size):
    return _C.direct_patchify(videos, patch_size)


def unpatchify(tokens, shapes, patch_size, channels):
    return _C.direct_unpatchify(tokens, shapes, patch_size, channels)


# patch_embed / linear_unpatchify stay on the dispatcher: the registered torch.ops.vdit op
# calls them below its autograd layer, where their vdit_C op must not record a graph (the
# dispatcher then skips its Autograd kernel; a direct call of that kernel would not)
def patch_embed(videos, weight, bias):
    return torch.ops.vdit_C.patch_embed(list(videos), weight, bias)


def patch_embed_backward(grad, videos, weight, with_bias):
    grad_x, grad_w, grad_b = torch.ops.vdit_C.patch_embed_backward(grad, list(videos), weight, bool(with_bias))
    return list(grad_x), grad_w, grad_b if with_bias else None


def linear_unpatchify(x, weight, bias, shapes, patch_size, channels):
    return list(torch.ops.vdit_C.linear_unpatchify(x, weight, bias, shapes, patch_size, channels))


def linear_unpatchify_backward(grad_videos, x, weight, patch_size, with_bias):
    grad_x, grad_w, grad_b = torch.ops.vdit_C.linear_unpatchify_backward(
        list(grad_videos), x, weight, patch_size, bool(with_bias))
    return grad_x, grad_w, grad_b if with_bias else None


# op name -> the same computation with its autograd formula built in (ops/direct.py, which
# calls these only in plain eager code): the vdit_C ops' Autograd kernels, the C++ autograd
# Function that records a graph where an input needs a gradient, called directly (None
# where _C lacks them, as above)
AUTOGRAD = {name: getattr(_C, f"direct_{name}", None) for name in ("patch_embed", "linear_unpatchify")}
