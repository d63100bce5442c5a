"""CUDA patchify / unpatchify (csrc/patch.cu): one launch per pack and direction.

Contract (vdit_kernels/ops/patch.py): videos are (C, T, H, W) CUDA tensors of one dtype
(float32, float16, bfloat16), any strides; tokens (N, C*pt*ph*pw). unpatchify returns
fresh contiguous videos. The other patch-family ops (patch_embed, linear_unpatchify and
their backwards) have no CUDA implementation: the backend reports them as missing.
"""
from __future__ import annotations

import torch

from ..checks import KERNEL_DTYPES
from . import _backend  # noqa: F401  (loads vdit_kernels._C)

DTYPES = KERNEL_DTYPES


def patchify(videos, patch_size):
    return torch.ops.vdit_C.patchify(list(videos), [int(p) for p in patch_size])


def unpatchify(tokens, shapes, patch_size, channels):
    return list(torch.ops.vdit_C.unpatchify(tokens, [int(s) for s in shapes],
                                            [int(p) for p in patch_size], int(channels)))
