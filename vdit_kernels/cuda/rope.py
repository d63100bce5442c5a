"""CUDA fused 3D RoPE of q and k (csrc/rope.cu): one launch for both.

Contract (vdit_kernels/ops/rope.py): q (N, Hq, D), k (N, Hk, D) CUDA tensors of one dtype
(float32, float16, bfloat16), any strides; positions float32 (N, 3); dims (dt, dh, dw)
even, summing to D. cos/sin are computed in float32 inside the kernel.
"""
from __future__ import annotations

import torch

from ..checks import KERNEL_DTYPES
from . import _backend  # noqa: F401  (loads vdit_kernels._C)

DTYPES = KERNEL_DTYPES


def rope_3d(q, k, positions, dims, theta, interleaved, inverse):
    return torch.ops.vdit_C.rope_3d(q, k, positions, [int(d) for d in dims], float(theta),
                                    bool(interleaved), bool(inverse))


def rope_3d_(q, k, positions, dims, theta, interleaved, inverse):
    torch.ops.vdit_C.rope_3d_(q, k, positions, [int(d) for d in dims], float(theta),
                              bool(interleaved), bool(inverse))
