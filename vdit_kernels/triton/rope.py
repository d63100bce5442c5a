# Fused 3D RoPE of q and k in one Triton launch.
#
# Computes, for every token n and head of q (N, Hq, D) and k (N, Hk, D), the rotation of
# D/2 pairs: pair j of axis chunk a (size d_a, axes t, h, w in order) turns by
# positions[n, a] * theta ** (-2j / d_a) (negated when INVERSE). Angles, cos and sin are
# computed in float32 inside the kernel (frequency = exp2(-2j/d_a * log2(theta))); no
# cos/sin table is read. Data is computed in float32 and stored in the input dtype.
#
# Grid: (cdiv(N, BLOCK_N), G). Program (i, g) owns tokens [i*BLOCK_N, (i+1)*BLOCK_N) and
# the combined heads g, g+G, g+2G, ... of [q heads, k heads]; cos/sin of its token block
# are computed once and reused for every head it rotates (the op is memory bound, the
# trig is the only real arithmetic). G splits the heads only as far as needed to give
# the GPU enough programs when N is small.
# Tile: (BLOCK_N tokens, PAIRS pair slots), PAIRS = D/2 rounded up to a power of two
# (tl.arange needs one; D is 72, 96, ... in general). Pair slot p maps arithmetically to
# its axis a, local index j and the element offsets of its two members (interleaved:
# 2p, 2p+1; rotate-half: c0+j, c0+j+d_a/2); the members are loaded with masked gathers,
# which hit the same cache lines, so each row is read from memory once.
# BLOCK_N * PAIRS is 512 pair slots: 4 per thread at 4 warps, which keeps cos, sin, x0, x1
# and the int64 gather offsets at ~64 registers on sm_90 (2048 slots hit 255 and spilled).
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_head(x_ptr, o_ptr, row_x, row_o, head, stride_xh, stride_oh,
                 off0, off1, mask, cos, sin):
    hx = tl.cast(head, tl.int64) * stride_xh
    ho = tl.cast(head, tl.int64) * stride_oh
    x0 = tl.load(x_ptr + row_x + hx + off0, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + row_x + hx + off1, mask=mask, other=0.0).to(tl.float32)
    y0 = x0 * cos - x1 * sin
    y1 = x1 * cos + x0 * sin
    tl.store(o_ptr + row_o + ho + off0, y0.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_ptr + row_o + ho + off1, y1.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_3d_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr,
    N, HQ, HK,
    stride_qn, stride_qh, stride_kn, stride_kh,
    stride_qon, stride_qoh, stride_kon, stride_koh,
    log2_theta,
    DT: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, D: tl.constexpr,
    PAIRS: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    num_g = tl.num_programs(1)

    # pair slot -> axis, local index, chunk start, chunk size
    p = tl.arange(0, PAIRS)
    ax1 = (p >= DT // 2).to(tl.int32)
    ax2 = (p >= DT // 2 + DH // 2).to(tl.int32)
    j = p - ax1 * (DT // 2) - ax2 * (DH // 2)
    d_a = tl.where(ax2 == 1, DW, tl.where(ax1 == 1, DH, DT))
    c0 = ax1 * DT + ax2 * DH
    d_safe = tl.maximum(d_a, 2)  # padded slots past the last chunk may see d_a = 0
    if INTERLEAVED:
        off0 = 2 * p
        off1 = 2 * p + 1
    else:
        off0 = c0 + j
        off1 = c0 + j + d_a // 2
    freq = tl.exp2(j.to(tl.float32) * (-2.0 / d_safe.to(tl.float32)) * log2_theta)
    pmask = p < D // 2

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    n64 = offs_n.to(tl.int64)
    pos_t = tl.load(pos_ptr + n64 * 3 + 0, mask=nmask, other=0.0)
    pos_h = tl.load(pos_ptr + n64 * 3 + 1, mask=nmask, other=0.0)
    pos_w = tl.load(pos_ptr + n64 * 3 + 2, mask=nmask, other=0.0)
    pos = tl.where(ax2[None, :] == 1, pos_w[:, None],
                   tl.where(ax1[None, :] == 1, pos_h[:, None], pos_t[:, None]))
    angle = pos * freq[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    if INVERSE:
        sin = -sin
    mask = nmask[:, None] & pmask[None, :]
    off0 = off0[None, :]
    off1 = off1[None, :]

    row_q = n64[:, None] * stride_qn
    row_qo = n64[:, None] * stride_qon
    row_k = n64[:, None] * stride_kn
    row_ko = n64[:, None] * stride_kon
    for hh in range(pid_h, HQ + HK, num_g):
        if hh < HQ:
            _rotate_head(q_ptr, qo_ptr, row_q, row_qo, hh, stride_qh, stride_qoh,
                         off0, off1, mask, cos, sin)
        else:
            _rotate_head(k_ptr, ko_ptr, row_k, row_ko, hh - HQ, stride_kh, stride_koh,
                         off0, off1, mask, cos, sin)


def _meta(n: int, d: int, heads: int, device: torch.device):
    pairs = triton.next_power_of_2(max(d // 2, 1))
    block_n = max(1, min(64, 512 // pairs, triton.next_power_of_2(max(n, 1))))
    blocks = triton.cdiv(n, block_n)
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # interpreter: few programs are fastest; 2 still exercises the head split
        target = 2
    groups = max(1, min(heads, triton.cdiv(target, blocks)))
    return pairs, block_n, blocks, groups


def _launch(q, k, qo, ko, positions, dims, theta, interleaved, inverse):
    n, hq, d = q.shape
    hk = k.shape[1]
    if n == 0 or hq + hk == 0 or d == 0:
        return
    dt, dh, dw = (int(x) for x in dims)
    pairs, block_n, blocks, groups = _meta(n, d, hq + hk, q.device)
    _rope_3d_kernel[(blocks, groups)](
        q, k, qo, ko, positions,
        n, hq, hk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
        math.log2(float(theta)),
        DT=dt, DH=dh, DW=dw, D=d, PAIRS=pairs, BLOCK_N=block_n,
        INTERLEAVED=bool(interleaved), INVERSE=bool(inverse),
        num_warps=4,
    )


def _last_dim_contiguous(x: torch.Tensor) -> bool:
    return x.shape[-1] <= 1 or x.stride(-1) == 1


def _positions(positions: torch.Tensor) -> torch.Tensor:
    return positions.to(torch.float32).contiguous()


def rope_3d(q, k, positions, dims, theta, interleaved, inverse):
    """Rotated copies (q_rot, k_rot) of q (N, Hq, D) and k (N, Hk, D), contiguous."""
    if not _last_dim_contiguous(q):
        q = q.contiguous()
    if not _last_dim_contiguous(k):
        k = k.contiguous()
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch(q, k, qo, ko, _positions(positions), dims, theta, interleaved, inverse)
    return qo, ko


def rope_3d_(q, k, positions, dims, theta, interleaved, inverse):
    """Rotate q and k in place (their last dim must be contiguous)."""
    if not (_last_dim_contiguous(q) and _last_dim_contiguous(k)):
        raise ValueError("in-place RoPE needs q and k with a contiguous last (head_dim) dimension, "
                         f"got strides {tuple(q.stride())} and {tuple(k.stride())}")
    _launch(q, k, q, k, _positions(positions), dims, theta, interleaved, inverse)


def aot_specs() -> list[dict]:
    """Launch configurations for benchmarks/static_report.py (sm_90a, no GPU needed)."""
    specs = []
    for dtype, dims, interleaved in (("bf16", (16, 56, 56), True), ("bf16", (44, 42, 42), False),
                                     ("fp16", (24, 24, 24), True), ("fp32", (32, 32, 32), False)):
        d = sum(dims)
        pairs = triton.next_power_of_2(d // 2)
        sig = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "qo_ptr", "ko_ptr")}
        sig.update({"pos_ptr": "*fp32", "N": "i32", "HQ": "i32", "HK": "i32"})
        sig.update({s: "i64" for s in ("stride_qn", "stride_qh", "stride_kn", "stride_kh",
                                       "stride_qon", "stride_qoh", "stride_kon", "stride_koh")})
        sig["log2_theta"] = "fp32"
        constexprs = {"DT": dims[0], "DH": dims[1], "DW": dims[2], "D": d, "PAIRS": pairs,
                      "BLOCK_N": max(1, min(64, 512 // pairs)), "INTERLEAVED": interleaved,
                      "INVERSE": False}
        sig.update({name: "constexpr" for name in constexprs})
        specs.append({"name": f"rope_3d {dtype} dims={dims} {'interleaved' if interleaved else 'half'}",
                      "fn": _rope_3d_kernel, "signature": sig, "constexprs": constexprs, "num_warps": 4})
    return specs
