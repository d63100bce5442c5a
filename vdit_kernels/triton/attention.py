# Variable-length (packed) FlashAttention-2 forward and backward, with optional fused 3D RoPE.
#
# Computes, for every segment i of a pack (cu_seqlens_q / cu_seqlens_k, int32 (B+1,)) and
# query head h, out_i = softmax(scale * q_i k_i^T) v_i with k/v head h // (H // Hk) (GQA),
# and lse (H, Nq) float32 = natural-log logsumexp of each row's scaled scores. A query row
# whose key segment is empty gets out = 0 and lse = -inf (all its gradients are 0).
# Softmax runs in base 2 (log2(e) folded into the scale); scores, row statistics and all
# accumulators are float32; matmul operands are in the input dtype (tensor cores).
# With rope, q and k tiles are rotated as they are loaded: each tile is loaded at its
# natural offsets and at its partner offsets (the other member of the element's RoPE pair:
# e ^ 1 interleaved, e +- d_a/2 rotate-half), which hit the same cache lines, and
# x * cos + sign * partner * sin is formed with cos/sin computed in-kernel from the token
# positions (frequency exp2(-2j/d_a * log2(theta))); the rotated tile is rounded to the
# input dtype, as apply_rope_3d + attention would. The backward rotates q/k once with the
# rope family's Triton kernel (recomputing cos/sin in its inner loops spilled registers on
# sm_90; the kernels keep a HAS_ROPE path, unused by the launcher), computes float32 dq/dk
# w.r.t. the rotated q/k and rotates them back in place (inverse rotation) before the cast.
#
# Kernels and grids (B segments, programs whose block starts past their segment exit):
#   _attn_fwd_kernel     (cdiv(max_seqlen_q, BLOCK_M), H, B): one query block x head,
#                        online softmax over the key blocks of its segment.
#   _attn_bwd_pre_kernel (cdiv(Nq, BLOCK_M), H): delta = rowsum(dO * O), (H, Nq) float32.
#   _attn_bwd_dkdv_kernel(cdiv(max_seqlen_k, BLOCK_N), Hk, B): one key block x kv head;
#                        loops over the H // Hk query heads of the kv head and over the
#                        query blocks, accumulating dK, dV in registers (no atomics).
#   _attn_bwd_dq_kernel  (cdiv(max_seqlen_q, BLOCK_M), H, B): one query block x head;
#                        recomputes P over the key blocks and accumulates dQ (no atomics).
# The backward therefore has no atomics at all and is deterministic whether or not
# deterministic=True is asked for (both take the same path).
# Tiles: (BLOCK_M queries, BLOCK_D) and (BLOCK_N keys, BLOCK_D); BLOCK_D = head dim rounded
# up to a power of two (tl.arange needs one; 72, 80, 96 are masked). On sm_90 the forward
# uses 128 x 64 (128 x 128 for D <= 64) at 8 warps: two warpgroups of wgmma m64 over the
# query rows, with the float32 accumulator (128 x BLOCK_D) at <= 64 registers a thread;
# 64 x 32 with fused rope and 64 x 64 for masked head dims (72, 80, 96), which spilled at
# the larger tiles. The backward holds two float32 accumulators (dK, dV or dQ plus the
# recomputed P, dP): 64 own rows (the wgmma M) x 64 loop rows for D <= 64, x 32 above.
# float32 inputs use 16 x 16 tiles and IEEE dots (no tf32; FMA, not tensor cores).
# Tile sizes were chosen so that the sm_90a static report shows no spills; it compiles
# without the runtime 16-divisibility specialization, so real launches have slack.
# Under the Triton interpreter (CPU tests) tiles are 16 x 16: cheap, and small segments
# still span several blocks so the masking paths are exercised.
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreter
from .rope import rope_3d, rope_3d_

LOG2E = 1.4426950408889634


# -- helpers -----------------------------------------------------------------------------

@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _load_tile(ptr, rows, offs_d, mask, pos_ptr, tok, tmask, log2_theta,
               HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
               DT: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr):
    """Load a (BLOCK, BLOCK_D) tile at row offsets `rows` (BLOCK, 1), RoPE-rotated if asked."""
    x = tl.load(ptr + rows + offs_d[None, :], mask=mask, other=0.0)
    if HAS_ROPE:
        e = offs_d
        if INTERLEAVED:
            # pairs (2j, 2j+1) across the head dim; the axis chunk follows the pair index
            pair = e // 2
            ax1 = (pair >= DT // 2).to(tl.int32)
            ax2 = (pair >= DT // 2 + DH // 2).to(tl.int32)
            j = pair - ax1 * (DT // 2) - ax2 * (DH // 2)
            d_a = tl.where(ax2 == 1, DW, tl.where(ax1 == 1, DH, DT))
            partner = e ^ 1
            sign = tl.where((e % 2) == 0, -1.0, 1.0)
        else:
            # rotate-half inside each axis chunk: (c0 + j, c0 + j + d_a/2) share angle j
            ax1 = (e >= DT).to(tl.int32)
            ax2 = (e >= DT + DH).to(tl.int32)
            c0 = ax1 * DT + ax2 * DH
            d_a = tl.where(ax2 == 1, DW, tl.where(ax1 == 1, DH, DT))
            local = e - c0
            half = d_a // 2
            first = local < half
            partner = tl.where(first, e + half, e - half)
            sign = tl.where(first, -1.0, 1.0)
            j = tl.where(first, local, local - half)
        d_safe = tl.maximum(d_a, 2).to(tl.float32)  # padded columns past D
        freq = tl.exp2(j.to(tl.float32) * (-2.0 / d_safe) * log2_theta)
        t64 = tok.to(tl.int64) * 3
        pos_t = tl.load(pos_ptr + t64 + 0, mask=tmask, other=0.0)
        pos_h = tl.load(pos_ptr + t64 + 1, mask=tmask, other=0.0)
        pos_w = tl.load(pos_ptr + t64 + 2, mask=tmask, other=0.0)
        pos = tl.where(ax2[None, :] == 1, pos_w[:, None],
                       tl.where(ax1[None, :] == 1, pos_h[:, None], pos_t[:, None]))
        angle = pos * freq[None, :]
        xp = tl.load(ptr + rows + partner[None, :], mask=mask, other=0.0)
        y = x.to(tl.float32) * tl.cos(angle) + sign[None, :] * xp.to(tl.float32) * tl.sin(angle)
        x = y.to(x.dtype)
    return x


@triton.jit
def _tile_mask(rmask, dmask, EVEN_D: tl.constexpr):
    """(rows, BLOCK_D) load mask; without a column mask when D is a power of two, which
    keeps the mask constant along the row (vectorized loads)."""
    if EVEN_D:
        m = rmask[:, None]  # tl.load / tl.store broadcast it over the columns
    else:
        m = rmask[:, None] & dmask[None, :]
    return m


# -- forward -----------------------------------------------------------------------------

@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, POS,
    stride_qn, stride_qh,
    stride_kn, stride_kh,
    stride_vn, stride_vh,
    stride_on, stride_oh,
    stride_lh,
    GROUPS, scale_log2, log2_theta,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    DT: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seg = tl.program_id(2)
    q_start = tl.load(CU_Q + seg)
    seqlen_q = tl.load(CU_Q + seg + 1) - q_start
    if pid_m * BLOCK_M >= seqlen_q:
        return
    k_start = tl.load(CU_K + seg)
    seqlen_k = tl.load(CU_K + seg + 1) - k_start
    kv_head = head // GROUPS

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    mmask = offs_m < seqlen_q
    tok_q = q_start + offs_m
    qmask = _tile_mask(mmask, dmask, D == BLOCK_D)
    rows_q = tok_q.to(tl.int64)[:, None] * stride_qn + head.to(tl.int64) * stride_qh
    q = _load_tile(Q, rows_q, offs_d, qmask, POS, tok_q, mmask,
                   log2_theta, HAS_ROPE, INTERLEAVED, DT, DH, DW)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, seqlen_k, BLOCK_N):
        # -- load k, v --
        cols = start_n + offs_n
        nmask = cols < seqlen_k
        tok_k = k_start + cols
        kvmask = _tile_mask(nmask, dmask, D == BLOCK_D)
        rows_k = tok_k.to(tl.int64)[:, None] * stride_kn + kv_head.to(tl.int64) * stride_kh
        k = _load_tile(K, rows_k, offs_d, kvmask, POS, tok_k, nmask,
                       log2_theta, HAS_ROPE, INTERLEAVED, DT, DH, DW)
        rows_v = tok_k.to(tl.int64)[:, None] * stride_vn + kv_head.to(tl.int64) * stride_vh
        v = tl.load(V + rows_v + offs_d[None, :], mask=kvmask, other=0.0)
        # -- compute qk (base 2) --
        s = _mm(q, tl.trans(k), IEEE) * scale_log2
        s = tl.where(nmask[None, :], s, float("-inf"))
        # -- online softmax (every block holds >= 1 real key, so m_new is finite) --
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE)
        m_i = m_new

    # -- epilogue: normalize, lse (natural log), -inf / 0 for an empty key segment --
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)
    rows_o = tok_q.to(tl.int64)[:, None] * stride_on + head.to(tl.int64) * stride_oh
    tl.store(O + rows_o + offs_d[None, :], out.to(O.dtype.element_ty), mask=qmask)
    tl.store(LSE + head.to(tl.int64) * stride_lh + tok_q.to(tl.int64), lse, mask=mmask)


# -- backward ----------------------------------------------------------------------------

@triton.jit
def _attn_bwd_pre_kernel(
    O, DO, DELTA,
    N,
    stride_on, stride_oh,
    stride_don, stride_doh,
    stride_dlh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < N
    mask = mmask[:, None] & (offs_d < D)[None, :]
    tok = offs_m.to(tl.int64)
    o = tl.load(O + tok[:, None] * stride_on + head.to(tl.int64) * stride_oh + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + tok[:, None] * stride_don + head.to(tl.int64) * stride_doh + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + head.to(tl.int64) * stride_dlh + tok, tl.sum(o * do, 1), mask=mmask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, POS,
    stride_qn, stride_qh,
    stride_kn, stride_kh,
    stride_vn, stride_vh,
    stride_don, stride_doh,
    stride_lh,
    stride_dkn, stride_dkh,
    stride_dvn, stride_dvh,
    GROUPS, scale, scale_log2, log2_theta,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    DT: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    kv_head = tl.program_id(1)
    seg = tl.program_id(2)
    k_start = tl.load(CU_K + seg)
    seqlen_k = tl.load(CU_K + seg + 1) - k_start
    if pid_n * BLOCK_N >= seqlen_k:
        return
    q_start = tl.load(CU_Q + seg)
    seqlen_q = tl.load(CU_Q + seg + 1) - q_start

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    nmask = offs_n < seqlen_k
    tok_k = k_start + offs_n
    kvmask = _tile_mask(nmask, dmask, D == BLOCK_D)
    # -- load the key block once (rotated) --
    rows_k = tok_k.to(tl.int64)[:, None] * stride_kn + kv_head.to(tl.int64) * stride_kh
    k = _load_tile(K, rows_k, offs_d, kvmask, POS, tok_k, nmask,
                   log2_theta, HAS_ROPE, INTERLEAVED, DT, DH, DW)
    rows_v = tok_k.to(tl.int64)[:, None] * stride_vn + kv_head.to(tl.int64) * stride_vh
    v = tl.load(V + rows_v + offs_d[None, :], mask=kvmask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUPS):
        head = kv_head * GROUPS + g
        for start_m in range(0, seqlen_q, BLOCK_M):
            # -- load q, dO, lse, delta of a query block --
            rows = start_m + offs_m
            mmask = rows < seqlen_q
            tok_q = q_start + rows
            qmask = _tile_mask(mmask, dmask, D == BLOCK_D)
            rows_q = tok_q.to(tl.int64)[:, None] * stride_qn + head.to(tl.int64) * stride_qh
            q = _load_tile(Q, rows_q, offs_d, qmask, POS, tok_q, mmask,
                           log2_theta, HAS_ROPE, INTERLEAVED, DT, DH, DW)
            rows_do = tok_q.to(tl.int64)[:, None] * stride_don + head.to(tl.int64) * stride_doh
            do = tl.load(DO + rows_do + offs_d[None, :], mask=qmask, other=0.0)
            lrow = head.to(tl.int64) * stride_lh + tok_q.to(tl.int64)
            lse = tl.load(LSE + lrow, mask=mmask, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + lrow, mask=mmask, other=0.0)
            # -- recompute P^T (keys x queries) --
            st = _mm(k, tl.trans(q), IEEE) * scale_log2
            pt = tl.exp2(st - lse[None, :])
            pt = tl.where(mmask[None, :] & nmask[:, None], pt, 0.0)
            # -- dV += P^T dO; dS^T = P^T * (V dO^T - delta); dK += dS^T Q --
            dv += _mm(pt.to(do.dtype), do, IEEE)
            dpt = _mm(v, tl.trans(do), IEEE)
            dst = pt * (dpt - delta[None, :])
            dk += _mm(dst.to(q.dtype), q, IEEE)
    dk = dk * scale

    rows_dk = tok_k.to(tl.int64)[:, None] * stride_dkn + kv_head.to(tl.int64) * stride_dkh
    tl.store(DK + rows_dk + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kvmask)
    rows_dv = tok_k.to(tl.int64)[:, None] * stride_dvn + kv_head.to(tl.int64) * stride_dvh
    tl.store(DV + rows_dv + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kvmask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, POS,
    stride_qn, stride_qh,
    stride_kn, stride_kh,
    stride_vn, stride_vh,
    stride_don, stride_doh,
    stride_lh,
    stride_dqn, stride_dqh,
    GROUPS, scale, scale_log2, log2_theta,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    DT: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seg = tl.program_id(2)
    q_start = tl.load(CU_Q + seg)
    seqlen_q = tl.load(CU_Q + seg + 1) - q_start
    if pid_m * BLOCK_M >= seqlen_q:
        return
    k_start = tl.load(CU_K + seg)
    seqlen_k = tl.load(CU_K + seg + 1) - k_start
    kv_head = head // GROUPS

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    mmask = offs_m < seqlen_q
    qmask = _tile_mask(mmask, dmask, D == BLOCK_D)
    tok_q = q_start + offs_m
    # -- load q (rotated), dO, lse, delta once --
    rows_q = tok_q.to(tl.int64)[:, None] * stride_qn + head.to(tl.int64) * stride_qh
    q = _load_tile(Q, rows_q, offs_d, qmask, POS, tok_q, mmask,
                   log2_theta, HAS_ROPE, INTERLEAVED, DT, DH, DW)
    rows_do = tok_q.to(tl.int64)[:, None] * stride_don + head.to(tl.int64) * stride_doh
    do = tl.load(DO + rows_do + offs_d[None, :], mask=qmask, other=0.0)
    lrow = head.to(tl.int64) * stride_lh + tok_q.to(tl.int64)
    lse = tl.load(LSE + lrow, mask=mmask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + lrow, mask=mmask, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, seqlen_k, BLOCK_N):
        # -- load k (rotated), v --
        cols = start_n + offs_n
        nmask = cols < seqlen_k
        tok_k = k_start + cols
        kvmask = _tile_mask(nmask, dmask, D == BLOCK_D)
        rows_k = tok_k.to(tl.int64)[:, None] * stride_kn + kv_head.to(tl.int64) * stride_kh
        k = _load_tile(K, rows_k, offs_d, kvmask, POS, tok_k, nmask,
                       log2_theta, HAS_ROPE, INTERLEAVED, DT, DH, DW)
        rows_v = tok_k.to(tl.int64)[:, None] * stride_vn + kv_head.to(tl.int64) * stride_vh
        v = tl.load(V + rows_v + offs_d[None, :], mask=kvmask, other=0.0)
        # -- recompute P; dS = P * (dO V^T - delta); dQ += dS K --
        s = _mm(q, tl.trans(k), IEEE) * scale_log2
        p = tl.exp2(s - lse[:, None])
        p = tl.where(mmask[:, None] & nmask[None, :], p, 0.0)
        dp = _mm(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, IEEE)
    dq = dq * scale

    rows_dq = tok_q.to(tl.int64)[:, None] * stride_dqn + head.to(tl.int64) * stride_dqh
    tl.store(DQ + rows_dq + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qmask)


# -- launch configuration ----------------------------------------------------------------

def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _fwd_config(d: int, dtype: torch.dtype, device: torch.device, rope: bool) -> dict:
    """BLOCK_M, BLOCK_N, num_warps, num_stages of the forward kernel."""
    if device.type != "cuda":  # interpreter: small tiles keep CPU tests fast
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype in (torch.float32, torch.float64):  # IEEE dots run on FMA units
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if rope:  # the partner loads and cos/sin of the k tile cost registers
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if _block_d(d) != d:  # masked head dims (72, 80, 96) cost registers for the masks
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    block_n = 128 if _block_d(d) <= 64 else 64
    return dict(BLOCK_M=128, BLOCK_N=block_n, num_warps=8, num_stages=3)


def _bwd_config(d: int, dtype: torch.dtype, device: torch.device, rope: bool) -> dict:
    """Tiles of the dK/dV and dQ kernels: OWN rows per program (keys for dK/dV, queries
    for dQ; the wgmma M dimension) and LOOP rows per inner iteration."""
    if device.type != "cuda":
        return dict(OWN=16, LOOP=16, num_warps=4, num_stages=1)
    if dtype in (torch.float32, torch.float64):
        return dict(OWN=16, LOOP=16, num_warps=4, num_stages=1)
    if _block_d(d) <= 64 and not rope:
        return dict(OWN=64, LOOP=64, num_warps=8, num_stages=2)
    # 64 x 32 keeps the wgmma M at 64 while the float32 accumulators stay in registers
    return dict(OWN=64, LOOP=32, num_warps=8, num_stages=2)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def _rope_args(rope, ref: torch.Tensor):
    """(HAS_ROPE, INTERLEAVED, DT, DH, DW, positions, log2_theta) for the kernels."""
    if rope is None:
        return False, False, 0, 0, 0, ref, 0.0
    positions, dims, theta, interleaved = rope
    dt, dh, dw = (int(x) for x in dims)
    pos = positions.to(device=ref.device, dtype=torch.float32).contiguous()
    return True, bool(interleaved), dt, dh, dw, pos, math.log2(float(theta))


# -- backend contract --------------------------------------------------------------------

def varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale, rope):
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    nq, h, d = q.shape
    hk = k.shape[1]
    out = torch.empty((nq, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((h, nq), dtype=torch.float32, device=q.device)
    nseg = cu_seqlens_q.numel() - 1
    if nq == 0 or h == 0 or nseg <= 0 or max_seqlen_q <= 0:
        return out.zero_(), lse.fill_(float("-inf"))
    cu_q = cu_seqlens_q.to(torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(torch.int32).contiguous()
    has_rope, inter, dt, dh, dw, pos, log2_theta = _rope_args(rope, q)
    cfg = _fwd_config(d, q.dtype, q.device, rope is not None)
    grid = (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), h, nseg)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k, pos,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        lse.stride(0),
        h // hk, float(softmax_scale) * LOG2E, log2_theta,
        D=d, BLOCK_D=_block_d(d), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        HAS_ROPE=has_rope, INTERLEAVED=inter, DT=dt, DH=dh, DW=dw,
        IEEE=q.dtype in (torch.float32, torch.float64),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def varlen_attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, softmax_scale, rope, deterministic):
    # deterministic is accepted and ignored: neither path uses atomics (see the header)
    q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()
    nq, h, d = q.shape
    nk, hk = k.shape[0], k.shape[1]
    nseg = cu_seqlens_q.numel() - 1
    # with rope, dq/dk are computed w.r.t. the rotated q/k in float32, then rotated back
    gdt_q = torch.float32 if rope is not None else q.dtype
    gdt_k = torch.float32 if rope is not None else k.dtype
    dq = torch.zeros((nq, h, d), dtype=gdt_q, device=q.device)
    dk = torch.zeros((nk, hk, d), dtype=gdt_k, device=k.device)
    dv = torch.zeros((nk, hk, d), dtype=v.dtype, device=v.device)
    if nq == 0 or nk == 0 or h == 0 or nseg <= 0 or max_seqlen_q <= 0 or max_seqlen_k <= 0:
        return dq.to(q.dtype), dk.to(k.dtype), dv
    cu_q = cu_seqlens_q.to(torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(torch.int32).contiguous()
    if rope is not None:
        # the backward reads every q/k tile many times: rotate them once with the rope
        # family's kernel instead of recomputing cos/sin in the inner loops (which spilled)
        positions, dims, theta, interleaved = rope
        q, k = rope_3d(q, k, positions, dims, theta, interleaved, False)
    has_rope, inter, dt, dh, dw, pos, log2_theta = _rope_args(None, q)
    cfg = _bwd_config(d, q.dtype, q.device, False)
    bd = _block_d(d)
    ieee = q.dtype in (torch.float32, torch.float64)
    scale = float(softmax_scale)

    # -- delta = rowsum(dO * O) --
    delta = torch.empty((h, nq), dtype=torch.float32, device=q.device)
    pre_m = 16
    _attn_bwd_pre_kernel[(triton.cdiv(nq, pre_m), h)](
        out, grad_out, delta, nq,
        out.stride(0), out.stride(1),
        grad_out.stride(0), grad_out.stride(1),
        delta.stride(0),
        D=d, BLOCK_D=bd, BLOCK_M=pre_m, num_warps=4,
    )
    common = dict(D=d, BLOCK_D=bd,
                  HAS_ROPE=has_rope, INTERLEAVED=inter, DT=dt, DH=dh, DW=dw, IEEE=ieee,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    # -- dK, dV: one key block x kv head, looping over its query heads --
    _attn_bwd_dkdv_kernel[(triton.cdiv(max_seqlen_k, cfg["OWN"]), hk, nseg)](
        q, k, v, grad_out, lse, delta, dk, dv, cu_q, cu_k, pos,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1),
        lse.stride(0),
        dk.stride(0), dk.stride(1),
        dv.stride(0), dv.stride(1),
        h // hk, scale, scale * LOG2E, log2_theta,
        BLOCK_M=cfg["LOOP"], BLOCK_N=cfg["OWN"], **common,
    )
    # -- dQ: one query block x head --
    _attn_bwd_dq_kernel[(triton.cdiv(max_seqlen_q, cfg["OWN"]), h, nseg)](
        q, k, v, grad_out, lse, delta, dq, cu_q, cu_k, pos,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1),
        lse.stride(0),
        dq.stride(0), dq.stride(1),
        h // hk, scale, scale * LOG2E, log2_theta,
        BLOCK_M=cfg["OWN"], BLOCK_N=cfg["LOOP"], **common,
    )
    if rope is not None:
        rope_3d_(dq, dk, positions, dims, theta, interleaved, inverse=True)
    return dq.to(q.dtype), dk.to(k.dtype), dv


# -- ahead-of-time compile specs (benchmarks/static_report.py) ---------------------------

def _sig(dtype: str, tensors, int_args, float_args, constexprs) -> dict:
    sig = {}
    for name, kind in tensors:
        sig[name] = {"x": f"*{dtype}", "f": "*fp32", "i": "*i32"}[kind]
    sig.update({name: "i64" for name in int_args})
    sig.update({name: "fp32" for name in float_args})
    sig.update({name: "constexpr" for name in constexprs})
    return sig


def aot_specs() -> list[dict]:
    """Launch configurations for benchmarks/static_report.py (sm_90a, no GPU needed)."""
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    cuda = torch.device("cuda")
    specs = []
    for dtype, d, rope in (("bf16", 128, None), ("bf16", 64, None), ("bf16", 128, (32, 48, 48)),
                           ("bf16", 72, None), ("fp16", 128, None), ("fp32", 128, None)):
        mma = dtype == "bf16"
        rope_c = dict(HAS_ROPE=rope is not None, INTERLEAVED=True,
                      DT=rope[0] if rope else 0, DH=rope[1] if rope else 0, DW=rope[2] if rope else 0)
        tag = f"{dtype} d={d}{' rope' if rope else ''}"
        # forward
        cfg = _fwd_config(d, tdt[dtype], cuda, rope is not None)
        ce = dict(D=d, BLOCK_D=_block_d(d), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  IEEE=dtype == "fp32", **rope_c)
        sig = _sig(dtype, [("Q", "x"), ("K", "x"), ("V", "x"), ("O", "x"), ("LSE", "f"),
                           ("CU_Q", "i"), ("CU_K", "i"), ("POS", "f")],
                   ["stride_qn", "stride_qh", "stride_kn", "stride_kh", "stride_vn", "stride_vh",
                    "stride_on", "stride_oh", "stride_lh", "GROUPS"],
                   ["scale_log2", "log2_theta"], ce)
        specs.append({"name": f"attn_fwd {tag}", "fn": _attn_fwd_kernel, "signature": sig,
                      "constexprs": ce, "num_warps": cfg["num_warps"],
                      "num_stages": cfg["num_stages"], "expect_mma": mma})
        if rope:  # the backward runs on pre-rotated q/k: the same kernels as without rope
            continue
        # backward
        cfg = _bwd_config(d, tdt[dtype], cuda, rope is not None)
        ce = dict(D=d, BLOCK_D=_block_d(d), BLOCK_M=cfg["LOOP"], BLOCK_N=cfg["OWN"],
                  IEEE=dtype == "fp32", **rope_c)
        sig = _sig(dtype, [("Q", "x"), ("K", "x"), ("V", "x"), ("DO", "x"), ("LSE", "f"),
                           ("DELTA", "f"), ("DK", "x"), ("DV", "x"), ("CU_Q", "i"), ("CU_K", "i"),
                           ("POS", "f")],
                   ["stride_qn", "stride_qh", "stride_kn", "stride_kh", "stride_vn", "stride_vh",
                    "stride_don", "stride_doh", "stride_lh", "stride_dkn", "stride_dkh",
                    "stride_dvn", "stride_dvh", "GROUPS"],
                   ["scale", "scale_log2", "log2_theta"], ce)
        if rope:
            sig["DK"] = "*fp32"
        specs.append({"name": f"attn_bwd_dkdv {tag}", "fn": _attn_bwd_dkdv_kernel, "signature": sig,
                      "constexprs": ce, "num_warps": cfg["num_warps"],
                      "num_stages": cfg["num_stages"], "expect_mma": mma})
        sig = _sig(dtype, [("Q", "x"), ("K", "x"), ("V", "x"), ("DO", "x"), ("LSE", "f"),
                           ("DELTA", "f"), ("DQ", "f" if rope else "x"), ("CU_Q", "i"),
                           ("CU_K", "i"), ("POS", "f")],
                   ["stride_qn", "stride_qh", "stride_kn", "stride_kh", "stride_vn", "stride_vh",
                    "stride_don", "stride_doh", "stride_lh", "stride_dqn", "stride_dqh", "GROUPS"],
                   ["scale", "scale_log2", "log2_theta"], ce)
        ce = dict(ce, BLOCK_M=cfg["OWN"], BLOCK_N=cfg["LOOP"])
        specs.append({"name": f"attn_bwd_dq {tag}", "fn": _attn_bwd_dq_kernel, "signature": sig,
                      "constexprs": ce, "num_warps": cfg["num_warps"],
                      "num_stages": cfg["num_stages"], "expect_mma": mma})
    d = 128
    ce = dict(D=d, BLOCK_D=d, BLOCK_M=16)
    sig = _sig("bf16", [("O", "x"), ("DO", "x"), ("DELTA", "f")],
               ["N", "stride_on", "stride_oh", "stride_don", "stride_doh", "stride_dlh"], [], ce)
    sig["N"] = "i32"
    specs.append({"name": "attn_bwd_pre bf16 d=128", "fn": _attn_bwd_pre_kernel, "signature": sig,
                  "constexprs": ce, "num_warps": 4})
    return specs
