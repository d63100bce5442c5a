"""Argument checks shared by the public functions: clear errors, never a silent wrong result.

Shape, dtype and device checks are free. Checks that read tensor values (cu_seqlens
monotone, ending at N, max_seqlen large enough) cost a device->host sync on GPU, so
they run for CPU tensors always and for GPU tensors only when VDIT_CHECK_VALUES=1,
and never while torch.compile traces (values are unknown then).
Packs built by VideoPack are valid by construction.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check(cond: bool, message: str) -> None:
    """Raise ValueError(message) unless cond. On per-call paths, build the message only
    on failure (`if not cond: raise ValueError(f"...")`): formatting an f-string for a
    check that passes costs microseconds, and these ops are called per layer."""
    if not cond:
        raise ValueError(message)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """Same dtype and device for all tensors."""
    dtype, device = tensors[0].dtype, tensors[0].device
    for n, t in zip(names[1:], tensors[1:]):
        if t.dtype != dtype:
            raise ValueError(f"{n} has dtype {t.dtype} but {names[0]} has dtype {dtype}")
        if t.device != device:
            raise ValueError(f"{n} is on {t.device} but {names[0]} is on {device}")


def values_checked(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():  # values are unknown while tracing; eager calls check them
        return False
    return t.device.type == "cpu" or os.environ.get("VDIT_CHECK_VALUES", "0") == "1"


def check_videos(videos: list[torch.Tensor], pack) -> int:
    """Videos match the pack; returns the channel count."""
    if len(videos) != pack.batch_size:
        raise ValueError(f"got {len(videos)} videos for a pack of {pack.batch_size}")
    check(len(videos) > 0, "the pack holds no video")
    first = videos[0]
    check_float("video 0", first)
    channels, dtype, device = (first.shape[0] if first.dim() else None), first.dtype, first.device
    for i, (v, shape) in enumerate(zip(videos, pack.shapes)):
        if i:
            check_float(f"video {i}", v)
        if v.dim() != 4:
            raise ValueError(f"video {i} must be (C, T, H, W), got shape {tuple(v.shape)}")
        if tuple(v.shape[1:]) != tuple(shape):
            raise ValueError(f"video {i} has (T, H, W) = {tuple(v.shape[1:])} "
                             f"but the pack says {shape}")
        if v.shape[0] != channels:
            raise ValueError(f"video {i} has {v.shape[0]} channels, video 0 has {channels}")
        if v.dtype != dtype:
            raise ValueError(f"video {i} has dtype {v.dtype} but video 0 has dtype {dtype}")
        if v.device != device:
            raise ValueError(f"video {i} is on {v.device} but video 0 is on {device}")
    return channels


def check_cu_seqlens(name: str, cu: torch.Tensor, num_tokens: int, max_seqlen: int,
                     device: torch.device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu.dtype}")
    if not (cu.dim() == 1 and cu.numel() >= 1):
        raise ValueError(f"{name} must be 1-D (B+1,), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the tokens are on {device}")
    if not (isinstance(max_seqlen, int) and not isinstance(max_seqlen, bool) and max_seqlen >= 0):
        raise ValueError(f"max_seqlen for {name} must be a non-negative Python int, "
                         f"got {max_seqlen!r}")
    if values_checked(cu):
        vals = cu.tolist()
        if vals[0] != 0:
            raise ValueError(f"{name} must start at 0, got {vals[0]}")
        lengths = [b - a for a, b in zip(vals[:-1], vals[1:])]
        if not all(n >= 0 for n in lengths):
            raise ValueError(f"{name} must be non-decreasing, got {vals}")
        if vals[-1] != num_tokens:
            raise ValueError(f"{name} ends at {vals[-1]} but there are {num_tokens} tokens")
        if max(lengths, default=0) > max_seqlen:
            raise ValueError(f"max_seqlen {max_seqlen} is smaller than the longest segment of {name} "
                             f"({max(lengths, default=0)})")


def check_rope_dims(dims: Sequence[int], head_dim: int) -> tuple[int, int, int]:
    dims = tuple(int(d) for d in dims)
    if len(dims) != 3:
        raise ValueError(f"rope dims must be (dt, dh, dw), got {dims}")
    if not all(d >= 0 and d % 2 == 0 for d in dims):
        raise ValueError(f"rope dims must be even and non-negative, got {dims}")
    if sum(dims) != head_dim:
        raise ValueError(f"rope dims {dims} sum to {sum(dims)}, not head_dim {head_dim}")
    return dims


def check_positions(positions: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    check(isinstance(positions, torch.Tensor), "positions must be a tensor (N, 3)")
    if not (positions.dim() == 2 and positions.shape[1] == 3):
        raise ValueError(f"positions must be (N, 3), got shape {tuple(positions.shape)}")
    if positions.shape[0] != num_tokens:
        raise ValueError(f"positions has {positions.shape[0]} rows but there are {num_tokens} tokens")
    if positions.device != device:
        raise ValueError(f"positions is on {positions.device} but the tokens are on {device}")
