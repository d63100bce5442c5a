"""FLOP and byte counts of every benchmarked op: the ONE place these formulas live.

Attention (block-diagonal over a pack, no causal mask), per head of size D:
    forward  FLOPs = 4 * sum_i(Lq_i * Lk_i) * H * D     (QK^T and PV, 2 FLOPs per MAC)
    backward FLOPs = 2.5 * forward                       (QK^T recomputed, dV, dP, dQ, dK: 5 matmuls vs 2)
    fwd+bwd  FLOPs = 3.5 * forward
patch_embed (a GEMM): 2 * N * K * hidden, K = C * pt * ph * pw; with K = 64 (16 channels,
    patch 1x2x2) it does 64 FLOPs per byte of its (N, hidden) output, so on an H100 the
    bytes bound it (64 x ~3 TB/s = ~190 TFLOP/s, far below the matmul peak): its limit is
    the roofline, the larger of FLOPs / matmul peak and bytes / copy bandwidth, with the
    fewest bytes any implementation must move (patch_embed_bytes).
Memory-bound ops count the bytes read plus the bytes written:
    patchify / unpatchify: 2 * N * K * element size
    3D RoPE of q and k:    2 * N * (Hq + Hk) * D * element size (+ positions, int32 (N, 3))
"""
from __future__ import annotations

from typing import Sequence

BWD_FACTOR = 2.5


def attention_flops(seqlens_q: Sequence[int], seqlens_k: Sequence[int], heads: int, head_dim: int,
                    mode: str = "fwd") -> float:
    """FLOPs of block-diagonal attention over a pack; mode fwd, bwd or fwd+bwd."""
    if len(seqlens_q) != len(seqlens_k):
        raise ValueError("seqlens_q and seqlens_k must have the same length")
    fwd = 4.0 * sum(int(a) * int(b) for a, b in zip(seqlens_q, seqlens_k)) * heads * head_dim
    factor = {"fwd": 1.0, "bwd": BWD_FACTOR, "fwd+bwd": 1.0 + BWD_FACTOR}
    if mode not in factor:
        raise ValueError(f"mode must be one of {sorted(factor)}, got {mode!r}")
    return fwd * factor[mode]


def patch_embed_flops(num_tokens: int, features: int, hidden: int) -> float:
    """2 * N * K * hidden (bias adds are ignored)."""
    return 2.0 * num_tokens * features * hidden


def _linear_bytes(read: int, weight: int, written: int, element_size: int, mode: str) -> float:
    """The fewest bytes of a linear layer y = x W^T that reads `read` elements of x and
    `weight` of W and writes `written` of y. fwd+bwd adds: read y's gradient once (one pass
    can feed both x's and W's gradients), x and W again, write their gradients."""
    fwd = read + weight + written
    if mode == "fwd":
        return float(fwd * element_size)
    if mode != "fwd+bwd":
        raise ValueError(f"mode must be fwd or fwd+bwd, got {mode!r}")
    return float((fwd + written + 2 * (read + weight)) * element_size)


def patch_embed_bytes(num_tokens: int, features: int, hidden: int, element_size: int,
                      mode: str = "fwd") -> float:
    """The fewest bytes patch_embed can move: read the latents (N x K) and the weight
    (hidden x K), write (N, hidden) (the bias is negligible); fwd+bwd as _linear_bytes. The
    (N, hidden) terms dominate: N x hidden x 2 elements for fwd+bwd."""
    return _linear_bytes(num_tokens * features, hidden * features, num_tokens * hidden, element_size, mode)


def linear_unpatchify_bytes(num_tokens: int, features: int, hidden: int, element_size: int,
                            mode: str = "fwd") -> float:
    """The fewest bytes linear_unpatchify (the output layer) can move: read x (N, hidden)
    and the weight (K x hidden), write the videos' N x K elements; fwd+bwd as _linear_bytes.
    The (N, hidden) terms dominate, as in patch_embed."""
    return _linear_bytes(num_tokens * hidden, hidden * features, num_tokens * features, element_size, mode)


def patchify_bytes(num_tokens: int, features: int, element_size: int) -> float:
    """patchify or unpatchify: read every element once, write it once."""
    return 2.0 * num_tokens * features * element_size


def rope_bytes(num_tokens: int, heads_q: int, heads_k: int, head_dim: int, element_size: int,
               position_bytes: int = 12) -> float:
    """RoPE of q and k (out of place): read and write q and k, read the positions."""
    return 2.0 * num_tokens * (heads_q + heads_k) * head_dim * element_size + num_tokens * position_bytes
