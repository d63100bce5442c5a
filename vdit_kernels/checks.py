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
    if not cond:
        raise ValueError(message)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    check(t.dtype in FLOAT_DTYPES, f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """Same dtype and device for all tensors."""
    for n, t in zip(names[1:], tensors[1:]):
        check(t.dtype == tensors[0].dtype,
              f"{n} has dtype {t.dtype} but {names[0]} has dtype {tensors[0].dtype}")
        check(t.device == tensors[0].device,
              f"{n} is on {t.device} but {names[0]} is on {tensors[0].device}")


def values_checked(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():  # values are unknown while tracing; eager calls check them
        return False
    return t.device.type == "cpu" or os.environ.get("VDIT_CHECK_VALUES", "0") == "1"


def check_videos(videos: list[torch.Tensor], pack) -> int:
    """Videos match the pack; returns the channel count."""
    check(len(videos) == pack.batch_size,
          f"got {len(videos)} videos for a pack of {pack.batch_size}")
    check(len(videos) > 0, "the pack holds no video")
    channels = None
    for i, v in enumerate(videos):
        check_float(f"video {i}", v)
        check(v.dim() == 4, f"video {i} must be (C, T, H, W), got shape {tuple(v.shape)}")
        check(tuple(v.shape[1:]) == tuple(pack.shapes[i]),
              f"video {i} has (T, H, W) = {tuple(v.shape[1:])} but the pack says {pack.shapes[i]}")
        channels = v.shape[0] if channels is None else channels
        check(v.shape[0] == channels, f"video {i} has {v.shape[0]} channels, video 0 has {channels}")
    check_same([f"video {i}" for i in range(len(videos))], videos)
    return channels


def check_cu_seqlens(name: str, cu: torch.Tensor, num_tokens: int, max_seqlen: int,
                     device: torch.device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor, got {type(cu).__name__}")
    check(cu.dtype == torch.int32, f"{name} must be int32, got {cu.dtype}")
    check(cu.dim() == 1 and cu.numel() >= 1, f"{name} must be 1-D (B+1,), got shape {tuple(cu.shape)}")
    check(cu.device == device, f"{name} is on {cu.device} but the tokens are on {device}")
    check(isinstance(max_seqlen, int) and not isinstance(max_seqlen, bool) and max_seqlen >= 0,
          f"max_seqlen for {name} must be a non-negative Python int, got {max_seqlen!r}")
    if values_checked(cu):
        vals = cu.tolist()
        check(vals[0] == 0, f"{name} must start at 0, got {vals[0]}")
        lengths = [b - a for a, b in zip(vals[:-1], vals[1:])]
        check(all(n >= 0 for n in lengths), f"{name} must be non-decreasing, got {vals}")
        check(vals[-1] == num_tokens, f"{name} ends at {vals[-1]} but there are {num_tokens} tokens")
        check(max(lengths, default=0) <= max_seqlen,
              f"max_seqlen {max_seqlen} is smaller than the longest segment of {name} "
              f"({max(lengths, default=0)})")


def check_rope_dims(dims: Sequence[int], head_dim: int) -> tuple[int, int, int]:
    dims = tuple(int(d) for d in dims)
    check(len(dims) == 3, f"rope dims must be (dt, dh, dw), got {dims}")
    check(all(d >= 0 and d % 2 == 0 for d in dims), f"rope dims must be even and non-negative, got {dims}")
    check(sum(dims) == head_dim, f"rope dims {dims} sum to {sum(dims)}, not head_dim {head_dim}")
    return dims


def check_positions(positions: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    check(isinstance(positions, torch.Tensor), "positions must be a tensor (N, 3)")
    check(positions.dim() == 2 and positions.shape[1] == 3,
          f"positions must be (N, 3), got shape {tuple(positions.shape)}")
    check(positions.shape[0] == num_tokens,
          f"positions has {positions.shape[0]} rows but there are {num_tokens} tokens")
    check(positions.device == device, f"positions is on {positions.device} but the tokens are on {device}")
