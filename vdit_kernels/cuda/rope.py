"""CUDA fused 3D RoPE of q and k (csrc/rope.cu): one launch for both.

Contract (vdit_kernels/ops/rope.py): q (N, Hq, D), k (N, Hk, D) CUDA tensors of one dtype
(float32, float16, bfloat16), any strides; positions float32 (N, 3); dims (dt, dh, dw)
even, summing to D. cos/sin are computed in float32 inside the kernel.
"""
from __future__ import annotations

from ..checks import KERNEL_DTYPES
from . import _backend

DTYPES = KERNEL_DTYPES


# Called without the dispatcher's boxed call, as cuda/patch.py calls the patch ops
# (csrc/direct_host.cpp): the arguments arrive as the ops' schemas type them (a list of
# ints, a float, bools), so nothing is converted here.
_C = _backend.extension()

# The C++ in-place op refuses q or k that may address an element twice, and q and k that
# may share one, with the same exact tests and messages as checks.check_inplace_rope
# (csrc/rope_host.cpp: check_no_overlap), so ops/rope.py leaves that check to it: the Python
# one was about 5 of the 17 us of Python an in-place call took (2 small CPU videos).
CHECKS_INPLACE_OVERLAP = True


def rope_3d(q, k, positions, dims, theta, interleaved, inverse):
    return _C.direct_rope_3d(q, k, positions, dims, theta, interleaved, inverse)


def rope_3d_(q, k, positions, dims, theta, interleaved, inverse):
    _C.direct_rope_3d_(q, k, positions, dims, theta, interleaved, inverse)
