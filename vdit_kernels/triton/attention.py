# Variable-length (packed) FlashAttention-2 forward and backward, with optional fused 3D RoPE.
#
# Computes, for every segment i of a pack (cu_seqlens_q / cu_seqlens_k, int32 (B+1,)) and
# query head h, out_i = softmax(scale * q_i k_i^T) v_i with k/v head h // (H // Hk) (GQA),
# and lse (H, Nq) float32 = natural-log logsumexp of each row's scaled scores. A query row
# whose key segment is empty gets out = 0 and lse = -inf (all its gradients are 0).
# Softmax runs in base 2 (log2(e) folded into the scale); scores, row statistics and all
# accumulators are float32; matmul operands are in the input dtype (tensor cores).
# With rope, q and k are rotated once by the rope family's fastest kernel (the CUDA
# kernel where built, else Triton) before the attention kernels run, and the backward
# rotates dq/dk back (the inverse rotation, cos/sin in float32, on dq/dk in the input dtype). Rotating inside the
# kernels, as the tiles are loaded, was measured on an H100 (bf16, 24 x 128 heads, the
# 41430-token mixed pack): 679 ms forward against 31.8 ms for the plain kernel, because
# every query block re-rotates every key tile of its segment (cos/sin of
# N^2 / BLOCK_M * D angles); the separate pass reads and writes q and k once (0.36 ms
# with the CUDA kernel, about 1% of the forward).
#
# Kernels and grids (B segments, programs whose block starts past their segment exit):
#   _attn_fwd_kernel     (cdiv(max_seqlen_q, BLOCK_M), H, B): one query block x head,
#                        online softmax over the key blocks of its segment.
#   _attn_bwd_pre_kernel (cdiv(Nq, BLOCK_M), H): the row statistics (lse * log2(e), delta =
#                        rowsum(dO * O), 0, 0), (H, Nq, 4) float32.
#   _attn_bwd_dkdv_kernel(cdiv(max_seqlen_k, BLOCK_N), Hk, B): one key block x kv head;
#                        loops over the H // Hk query heads of the kv head and over the
#                        query blocks, accumulating dK, dV in registers; with ATOMIC_DQ
#                        it also adds each block's dQ = scale * dS K into a float32 buffer
#                        with atomics (FlashAttention-2's backward).
#   _attn_bwd_dq_kernel  (cdiv(max_seqlen_q, BLOCK_M), H, B): one query block x head;
#                        recomputes P over the key blocks and accumulates dQ (no atomics).
# Backward strategies (bwd_strategy(), VDIT_ATTN_BWD): "split" = dK/dV kernel + dQ
# kernel, no atomics, bitwise reproducible for a given tile choice, but P and dP are
# recomputed twice (7 matrix products per block pair); "atomic-dq" = one kernel with
# atomic dQ (5 products, but float32 atomics into dQ: their sums depend on the run order
# in the last bits); "torch-fa2" = not ours: PyTorch's own FlashAttention-2 backward
# (the one torch.nn.attention.varlen uses), which takes this forward's out and lse as they
# are (half precision, head dims multiple of 8, no gradient into lse). It is a candidate
# so that the Triton forward never costs a user PyTorch's backward speed; the benchmarks
# time each strategy on its own row. By default ("auto") the first backward per (head
# dim, dtype, GQA groups, GPU, size class) times the available strategies, the Triton
# ones with their own autotuned tiles, and keeps the fastest (VDIT_ATTN_BWD=triton: among
# the Triton ones only); deterministic=True always runs "split" with pinned tiles.
# Tiles: (BLOCK_M queries, BLOCK_D) and (BLOCK_N keys, BLOCK_D); BLOCK_D = head dim rounded
# up to a power of two, at least 16 (tl.arange needs a power of two, tl.dot a K of 16;
# 8, 72, 80, 96 are masked). Head dims up to 256.
# On a GPU the tiles are autotuned (triton.autotune, keyed on head dim, dtypes, GQA
# groups and the size class of the segment lengths: _size_class, e.g. text-length keys vs
# a video's) over a short candidate list per head-dim class (see "launch
# configuration" below): e.g. the D = 128 forward tries 128 x 64 at 8 warps (two
# warpgroups of wgmma m64 over the query rows, the float32 accumulator at 64 registers a
# thread), 128 x 128 and 64 x 64, and with TMA 128 x 64 capped at 128 registers so that
# two programs share an SM (Tile.maxnreg, see _FWD_TILES); the backward holds two
# float32 accumulators for its own rows: dK/dV 64 x 64 (the D = 128 default) up to 128
# keys x 64 queries (flex_attention's tile, the D = 64 default), in either orientation of
# its products (queries-major or keys-major: _dkdv_step), dQ 128 x 64 (the default) to
# 128 x 128, with 1 to 3 pipeline stages. Every candidate is in aot_specs() and compiled
# by the sm_90a static report, which also counts each main loop's instructions.
# VDIT_AUTOTUNE=0 or deterministic=True (backward) use the first candidate of the class
# (the first that fits, on GPUs with less shared memory than an H100: _launch), so
# results do not depend on timing noise.
# float32 inputs use 16 x 16 tiles and IEEE dots (no tf32; FMA, not tensor cores).
# Under the Triton interpreter (CPU tests) tiles are 16 x 16: cheap, and small segments
# still span several blocks so the masking paths are exercised.
# Tried and dropped: computing the next key block's q k^T before the current block's
# softmax (FlashAttention-3's intra-warpgroup overlap) compiles under Triton 3.6 to
# "wgmma.wait_group 0" after every product, i.e. no overlap, at +30 registers; that
# overlap needs warp specialization.
# TMA: on sm_90+ (and under the interpreter) the forward can read K and V through host
# tensor descriptors over their (Nk, Hk*D) view (head dims 64 and 128, heads adjacent,
# 16-byte aligned): the copy engine fetches whole (BLOCK_N, D) blocks and the kernel
# computes no addresses (160 instead of 190 registers at 128 x 64, D = 128). A block that
# crosses the segment's end brings the next segment's rows, weighted 0: a NaN or Inf there
# makes 0 x Inf = NaN in this segment's rows, which pointer loads (reading them as 0) do
# not; left so, for finite packs (README; a select on the tail block's V would hold the
# tile in registers beside the capped accumulator, untimed). Which
# variant runs is fwd_variant() (VDIT_ATTN_FWD): by default the first forward per (head
# dim, dtype, GQA groups, GPU, size class) times both and keeps the faster. The Triton
# backward kernels can read what they stream the same way (dK/dV: q and dO as
# (Nq, H*D); dQ: k and v), measured per strategy (bwd_read(), VDIT_ATTN_BWD_READ); with
# descriptors the dK/dV kernel holds FlashAttention-2's 128-key block pipelined, which
# with pointer loads spills inside its loop. Warp specialization is not used: Triton 3.6
# to 3.9 ignore tl.range(warp_specialize=True) in this loop on sm_90 (the attribute stays,
# no partitions are made; checked on the forward's full-block loop, TMA and pointers).
from __future__ import annotations

import logging
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .. import backend as _backend
from ..checks import KERNEL_DTYPES
from . import (COMPILE_OPTIONS, TensorDescriptor, autotune_enabled, autotuned_choices, cdiv, launch_first_that_fits,
               loop_bound, measured_choice, next_pow2, on_tensors_device, pow2_dividing, timing)
from . import rope as triton_rope
from . import tuning_cache

# the accumulators are float32: a float64 product would be float32-accurate at best
DTYPES = KERNEL_DTYPES

LOG2E = 1.4426950408889634
_LOG = logging.getLogger("vdit_kernels")


# -- helpers -----------------------------------------------------------------------------

@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b with acc as the MMA's own accumulator (no separate add, no temporary)."""
    if IEEE:
        c = tl.dot(a, b, acc, input_precision="ieee")
    else:
        c = tl.dot(a, b, acc)
    return c


@triton.jit
def _tile_mask(rmask, dmask, EVEN_D: tl.constexpr, ROWS: tl.constexpr = True):
    """(rows, BLOCK_D) access mask, None where nothing needs masking: no column mask when
    D is a power of two (the mask stays constant along a row: vectorized accesses), no
    row mask with ROWS=False (a block whose rows all lie inside the segment)."""
    if ROWS:
        if EVEN_D:
            m = rmask[:, None]  # tl.load / tl.store broadcast it over the columns
        else:
            m = rmask[:, None] & dmask[None, :]
    else:
        if EVEN_D:
            m = None
        else:
            m = dmask[None, :]
    return m


@triton.jit
def _row_off(tok, head, stride_n, stride_h, ROW_ALIGN: tl.constexpr):
    """Element offsets (rows, 1) of rows tok of `head`. ROW_ALIGN: the host checked that
    every token and head stride is a multiple of it. A launch marks only strides divisible
    by 16, so without the hint a head dim of 72 (rows 144 B apart, 16-byte aligned) would
    get 4-byte accesses."""
    rows = tok.to(tl.int64) * stride_n + head.to(tl.int64) * stride_h
    if ROW_ALIGN > 1:  # on the 1-D offsets: a hint on the (rows, 1) view also pins its unit axis
        rows = tl.multiple_of(rows, ROW_ALIGN)
    return rows[:, None]


@triton.jit
def _rows(X, tok, rmask, head, stride_n, stride_h, offs_d, dmask, D: tl.constexpr, BLOCK_D: tl.constexpr,
          ROW_ALIGN: tl.constexpr, TAIL: tl.constexpr = True):
    """A (rows, BLOCK_D) tile of X (tokens, heads, D) at rows tok of `head`; padding
    columns, and with TAIL (a block that may run past its segment) rows outside rmask,
    read as 0. TAIL=False loads without a row mask."""
    ptrs = X + _row_off(tok, head, stride_n, stride_h, ROW_ALIGN) + offs_d[None, :]
    if TAIL or D != BLOCK_D:
        tile = tl.load(ptrs, mask=_tile_mask(rmask, dmask, D == BLOCK_D, TAIL), other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _kv_tiles(K, V, tok_k, nmask, kv_head, stride_kn, stride_kh, stride_vn, stride_vh,
              offs_d, dmask, D: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr,
              TAIL: tl.constexpr = True):
    """k and v tiles of key rows tok_k; with TAIL rows outside nmask read as 0."""
    k = _rows(K, tok_k, nmask, kv_head, stride_kn, stride_kh, offs_d, dmask, D, BLOCK_D, ROW_ALIGN, TAIL)
    v = _rows(V, tok_k, nmask, kv_head, stride_vn, stride_vh, offs_d, dmask, D, BLOCK_D, ROW_ALIGN, TAIL)
    return k, v


@triton.jit
def _q_rows(Q, DO, STATS, tok_q, mmask, dmask, head, stride_qn, stride_qh,
            stride_don, stride_doh, N_Q, offs_d,
            D: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """What the backward reads per query row: q, dO, lse (base 2) and delta; rows outside
    mmask read as 0."""
    q = _rows(Q, tok_q, mmask, head, stride_qn, stride_qh, offs_d, dmask, D, BLOCK_D, ROW_ALIGN)
    do = _rows(DO, tok_q, mmask, head, stride_don, stride_doh, offs_d, dmask, D, BLOCK_D, ROW_ALIGN)
    rows = head.to(tl.int64) * N_Q + tok_q.to(tl.int64)
    stats = tl.load(STATS + rows[:, None] * 4 + tl.arange(0, 4)[None, :], mask=mmask[:, None], other=0.0)
    lse, delta = _split_stats(stats)
    return q, do, lse, delta


@triton.jit
def _split_stats(stats):
    """lse (base 2) and delta, the columns 0 and 1 of (rows, 4) statistics (lse2, delta,
    0, 0) as _attn_bwd_pre_kernel packs them. One 16-byte row per query: the keys-major
    dK/dV step needs lse and delta along its columns, and loading them as two (rows,)
    vectors took 32 masked scalar loads a thread with their 64-bit addresses, about half
    the instructions of its loop (D = 128, 128 keys x 64 queries: 726 -> 412 a step with
    pointer loads, 716 -> 358 with TMA; spills 1344 -> 432 B)."""
    lse_x, delta_x = tl.split(tl.reshape(stats, (stats.shape[0], 2, 2)))  # (x0, x2), (x1, x3)
    lse, _ = tl.split(lse_x)
    delta, _ = tl.split(delta_x)
    return lse, delta


@triton.jit
def _fwd_step(acc, l_i, m_i, q, K, V, first_k, offs_n, keys_left, kv_head,
              stride_kn, stride_kh, stride_vn, stride_vh, offs_d, dmask, scale_log2,
              D: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr, TMA: tl.constexpr,
              IEEE: tl.constexpr, TAIL: tl.constexpr):
    """One key block of the online softmax; m_i is kept in scaled base-2 units, so
    p = exp2(qk * scale_log2 - m) is one FMA and an exp2 per score. TAIL: the block may
    run past the segment; keys offs_n >= keys_left then get -inf scores (a uniform
    branch: only a partial block selects) and, with pointers, masked loads. TAIL=False
    (a whole block) loads without masks and has no select. TMA (K, V are (Nk, Hk*D)
    tensor descriptors): the copy engine reads whole blocks, the rows past the segment
    being the next segment's keys (or zeros past the end); their -inf scores give p = 0,
    so they add nothing."""
    nmask = offs_n < keys_left
    if TMA:  # descriptor coordinates are 32-bit (N and Hk*D fit: host-checked)
        col = (kv_head * D).to(tl.int32)
        k = K.load([first_k.to(tl.int32), col])
        v = V.load([first_k.to(tl.int32), col])
    else:
        k, v = _kv_tiles(K, V, first_k + offs_n, nmask, kv_head, stride_kn, stride_kh,
                         stride_vn, stride_vh, offs_d, dmask, D, BLOCK_D, ROW_ALIGN, TAIL)
    qk = _mm(q, tl.trans(k), IEEE)
    if TAIL:
        if keys_left < offs_n.shape[0]:  # a uniform branch: only a partial block selects
            qk = tl.where(nmask[None, :], qk, float("-inf"))
    # every block holds >= 1 real key, so m_new is finite
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk * scale_log2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
    return acc, l_i, m_new


# -- forward -----------------------------------------------------------------------------

@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qn, stride_qh,
    stride_kn, stride_kh,
    stride_vn, stride_vh,
    stride_on, stride_oh,
    stride_lh,
    GROUPS, scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr, IEEE: tl.constexpr,
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
    rows_q = _row_off(tok_q, head, stride_qn, stride_qh, ROW_ALIGN)
    q = tl.load(Q + rows_q + offs_d[None, :], mask=qmask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Half precision, D <= 128: the whole key blocks in one loop (loads without masks, no
    # select), then the partial one; at D = 128 (sm_90a, Triton 3.6) 205 -> 190 registers,
    # 182 -> 160 with TMA, 128 x 128 with TMA 255 -> 210. Not for float32 (FMA dots) or
    # D > 128: with two copies of the step inlined there, the compiler spills KBs.
    if (not IEEE) and BLOCK_D <= 128:
        full_k = seqlen_k - seqlen_k % BLOCK_N
        for start_n in range(0, loop_bound(full_k), BLOCK_N):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, k_start + start_n, offs_n, seqlen_k - start_n,
                                      kv_head, stride_kn, stride_kh, stride_vn, stride_vh, offs_d, dmask,
                                      scale_log2, D, BLOCK_D, ROW_ALIGN, TMA, IEEE, False)
        if full_k < seqlen_k:
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, k_start + full_k, offs_n, seqlen_k - full_k,
                                      kv_head, stride_kn, stride_kh, stride_vn, stride_vh, offs_d, dmask,
                                      scale_log2, D, BLOCK_D, ROW_ALIGN, TMA, IEEE, True)
    else:
        for start_n in range(0, loop_bound(seqlen_k), BLOCK_N):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, k_start + start_n, offs_n, seqlen_k - start_n,
                                      kv_head, stride_kn, stride_kh, stride_vn, stride_vh, offs_d, dmask,
                                      scale_log2, D, BLOCK_D, ROW_ALIGN, TMA, IEEE, True)

    # -- epilogue: normalize, lse (natural log), -inf / 0 for an empty key segment --
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)
    rows_o = _row_off(tok_q, head, stride_on, stride_oh, ROW_ALIGN)
    tl.store(O + rows_o + offs_d[None, :], out.to(O.dtype.element_ty), mask=qmask)
    tl.store(LSE + head.to(tl.int64) * stride_lh + tok_q.to(tl.int64), lse, mask=mmask)


# -- backward ----------------------------------------------------------------------------

@triton.jit
def _attn_bwd_pre_kernel(
    O, DO, LSE, STATS,
    N,
    stride_on, stride_oh,
    stride_don, stride_doh,
    stride_lh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """The backward kernels' row statistics, STATS (H, N, 4) float32: per head and query
    row (lse * log2(e), delta = rowsum(dO * O), 0, 0), 16-byte rows (one vector load, or
    a TMA box of (rows, 4))."""
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
    delta = tl.sum(o * do, 1)
    lse2 = tl.load(LSE + head.to(tl.int64) * stride_lh + tok, mask=mmask, other=0.0) * 1.4426950408889634
    zero = tl.zeros_like(delta)
    # (rows, 2, 2) [m, i, j] = column 2i + j: (lse2, 0) at j = 0, (delta, 0) at j = 1
    stats = tl.reshape(tl.join(tl.join(lse2, zero), tl.join(delta, zero)), (BLOCK_M, 4))
    rows = head.to(tl.int64) * N + tok
    tl.store(STATS + rows[:, None] * 4 + tl.arange(0, 4)[None, :], stats, mask=mmask[:, None])


@triton.jit
def _dkdv_step(dk, dv, k, v, nmask, key_tail, Q, DO, STATS, DQ, DQ_BOX, first_q, offs_m, rows_left, head,
               stride_qn, stride_qh, stride_don, stride_doh, N_Q, stride_dqn, stride_dqh,
               offs_d, dmask, scale, scale_log2,
               D: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr,
               ATOMIC_DQ: tl.constexpr, KEYS_MAJOR: tl.constexpr, TMA: tl.constexpr, IEEE: tl.constexpr,
               EMULATE_TMA_ADD: tl.constexpr):
    """dV += P^T dO and dK += dS^T Q (unscaled) for one query block of one head; with
    ATOMIC_DQ also DQ += scale * dS K for that block, added atomically (float32): with
    TMA as one bulk reduction of the whole (BLOCK_M, D) box by the copy engine (_box_add:
    the rows past the segment add the zeros their P = 0 gives), else element atomics.
    Two orientations of the same products (a tile choice, see the launch configuration):
      queries-major (default): P = exp2(q k^T - lse) is (queries, keys), so lse and delta
        vary along the MMA rows (a thread loads 2 of each, not 16); dV^T += dO^T P and
        dK^T += Q^T dS accumulate (D, keys) with P and dS staged in shared memory as the
        B operands. D = 128, 64 x 64: 202 registers instead of 254, spill-free at 2 stages.
      KEYS_MAJOR: P^T = exp2(k q^T - lse) is (keys, queries); P^T and dS^T are the A
        operands straight from registers; dK, dV accumulate (keys, D).
    With pointer loads no query mask is needed: a masked query has q = dO = 0 and lse = 0,
    so its P = exp2(0) = 1 is finite and multiplies only zero rows of dO and q (TMA reads
    other rows there: P is zeroed). Key rows past the segment
    (k = v = 0) only touch dK/dV columns that are never stored, but dQ sums over keys:
    there (key_tail: this key block runs past the segment) their P = exp2(-lse), which
    overflows for very negative lse, is zeroed."""
    mmask = offs_m < rows_left
    tok_q = first_q + offs_m
    if TMA:
        # whole blocks: q, dO as (BLOCK_M, D) boxes, the statistics as a (BLOCK_M, 4) box
        # of their (H*Nq, 4) view; the rows past the segment, the next segment's (or
        # zeros past the end), get P = 0 below. Descriptor coordinates are 32-bit: H*Nq
        # and H*D fit (host-checked).
        row = first_q.to(tl.int32)
        col = (head * D).to(tl.int32)
        q = Q.load([row, col])
        do = DO.load([row, col])
        lse, delta = _split_stats(STATS.load([(head * N_Q).to(tl.int32) + row, 0]))
    else:
        q, do, lse, delta = _q_rows(Q, DO, STATS, tok_q, mmask, dmask, head,
                                    stride_qn, stride_qh, stride_don, stride_doh, N_Q, offs_d,
                                    D, BLOCK_D, ROW_ALIGN)
    if KEYS_MAJOR:
        pt = tl.exp2(_mm(k, tl.trans(q), IEEE) * scale_log2 - lse[None, :])
        if TMA:
            if rows_left < offs_m.shape[0]:  # a uniform branch: only the tail block selects
                pt = tl.where(mmask[None, :], pt, 0.0)
        if ATOMIC_DQ:
            if key_tail:
                pt = tl.where(nmask[:, None], pt, 0.0)
        dv = _mma(pt.to(do.dtype), do, dv, IEEE)
        dst = (pt * (_mm(v, tl.trans(do), IEEE) - delta[None, :])).to(q.dtype)
        dk = _mma(dst, q, dk, IEEE)
        ds = tl.trans(dst)
    else:
        p = tl.exp2(_mm(q, tl.trans(k), IEEE) * scale_log2 - lse[:, None])
        if TMA:
            if rows_left < offs_m.shape[0]:
                p = tl.where(mmask[:, None], p, 0.0)
        if ATOMIC_DQ:
            if key_tail:
                p = tl.where(nmask[None, :], p, 0.0)
        dv = _mma(tl.trans(do), p.to(do.dtype), dv, IEEE)
        ds = (p * (_mm(do, tl.trans(v), IEEE) - delta[:, None])).to(q.dtype)
        dk = _mma(tl.trans(q), ds, dk, IEEE)
    if ATOMIC_DQ:
        dq = _mm(ds, k, IEEE) * scale
        if TMA:
            _box_add(DQ_BOX, DQ, first_q, head, dq, offs_m, offs_d, N_Q, stride_dqn, stride_dqh, D,
                     EMULATE_TMA_ADD)
        else:
            rows_dq = _row_off(tok_q, head, stride_dqn, stride_dqh, ROW_ALIGN)
            tl.atomic_add(DQ + rows_dq + offs_d[None, :], dq, mask=_tile_mask(mmask, dmask, D == BLOCK_D),
                          sem="relaxed")
    return dk, dv


@triton.jit
def _box_add(DQ_BOX, DQ, first_q, head, dq, offs_m, offs_d, N_Q, stride_dqn, stride_dqh, D: tl.constexpr,
             EMULATED: tl.constexpr):
    """DQ[first_q + i, head, :] += dq[i] for every row i of the (BLOCK_M, D) box, rows past
    the tensor's N_Q dropped: on a GPU one TMA bulk reduction of the box through DQ_BOX (a
    descriptor of DQ as (N_Q, H*D); cp.reduce.async.bulk.tensor.add: the copy engine adds
    it in L2, where element atomics cost the SM an instruction per 4 to 16 bytes and made
    this backward 40% slower than the atomic-free one on the H100). EMULATED (the
    interpreter has no descriptor reductions): the same box semantics by element atomics,
    without a segment mask, so tests see what the bulk reduction adds past a segment."""
    if EMULATED:
        rows = (first_q + offs_m).to(tl.int64)
        tl.atomic_add(DQ + rows[:, None] * stride_dqn + head * stride_dqh + offs_d[None, :], dq,
                      mask=(rows < N_Q)[:, None], sem="relaxed")
    else:  # descriptor coordinates are 32-bit (N_Q and H*D fit: host-checked)
        DQ_BOX.atomic_add([first_q.to(tl.int32), (head * D).to(tl.int32)], dq)


@triton.jit
def _dq_step(dq, q, do, lse, delta, K, V, first_k, offs_n, keys_left, kv_head,
             stride_kn, stride_kh, stride_vn, stride_vh, offs_d, dmask, scale_log2,
             D: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr, TMA: tl.constexpr,
             IEEE: tl.constexpr):
    """dQ += dS K (unscaled) for one key block. In the block that runs past the segment,
    P of the missing keys is zeroed (there k = 0 would give P = exp2(-lse), which
    overflows for very negative lse); whole blocks skip the select (a uniform branch).
    (Splitting off the partial block as the forward does raised the 64 x 64 tile from 126
    to 143 registers: one resident program per SM instead of two.)"""
    nmask = offs_n < keys_left
    if TMA:  # whole blocks as in the forward; the rows past the segment get P = 0 below
        col = (kv_head * D).to(tl.int32)
        k = K.load([first_k.to(tl.int32), col])
        v = V.load([first_k.to(tl.int32), col])
    else:
        k, v = _kv_tiles(K, V, first_k + offs_n, nmask, kv_head, stride_kn, stride_kh,
                         stride_vn, stride_vh, offs_d, dmask, D, BLOCK_D, ROW_ALIGN)
    p = tl.exp2(_mm(q, tl.trans(k), IEEE) * scale_log2 - lse[:, None])
    if keys_left < offs_n.shape[0]:
        p = tl.where(nmask[None, :], p, 0.0)
    ds = p * (_mm(do, tl.trans(v), IEEE) - delta[:, None])
    dq = _mma(ds.to(k.dtype), k, dq, IEEE)
    return dq


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, STATS, DK, DV, DQ, DQ_BOX, CU_Q, CU_K,
    stride_qn, stride_qh,
    stride_kn, stride_kh,
    stride_vn, stride_vh,
    stride_don, stride_doh,
    N_Q,
    stride_dkn, stride_dkh,
    stride_dvn, stride_dvh,
    stride_dqn, stride_dqh,
    GROUPS, scale, scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, KEYS_MAJOR: tl.constexpr, TMA: tl.constexpr, IEEE: tl.constexpr,
    EMULATE_TMA_ADD: tl.constexpr = False,
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
    # -- load the key block once --
    k, v = _kv_tiles(K, V, tok_k, nmask, kv_head, stride_kn, stride_kh, stride_vn, stride_vh,
                     offs_d, dmask, D, BLOCK_D, ROW_ALIGN)

    key_tail = (pid_n + 1) * BLOCK_N > seqlen_k
    if KEYS_MAJOR:  # (keys, D) accumulators, else (D, keys): see _dkdv_step
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    else:
        dk = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        dv = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for g in range(0, loop_bound(GROUPS)):
        head = kv_head * GROUPS + g
        for start_m in range(0, loop_bound(seqlen_q), BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, nmask, key_tail, Q, DO, STATS, DQ, DQ_BOX,
                                q_start + start_m, offs_m, seqlen_q - start_m, head,
                                stride_qn, stride_qh, stride_don, stride_doh, N_Q,
                                stride_dqn, stride_dqh, offs_d, dmask, scale, scale_log2,
                                D, BLOCK_D, ROW_ALIGN, ATOMIC_DQ, KEYS_MAJOR, TMA, IEEE, EMULATE_TMA_ADD)
    if not KEYS_MAJOR:
        dk = tl.trans(dk)
        dv = tl.trans(dv)
    dk = dk * scale

    kvmask = _tile_mask(nmask, dmask, D == BLOCK_D)
    rows_dk = _row_off(tok_k, kv_head, stride_dkn, stride_dkh, ROW_ALIGN)
    tl.store(DK + rows_dk + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kvmask)
    rows_dv = _row_off(tok_k, kv_head, stride_dvn, stride_dvh, ROW_ALIGN)
    tl.store(DV + rows_dv + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kvmask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, STATS, DQ, CU_Q, CU_K,
    stride_qn, stride_qh,
    stride_kn, stride_kh,
    stride_vn, stride_vh,
    stride_don, stride_doh,
    N_Q,
    stride_dqn, stride_dqh,
    GROUPS, scale, scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr, IEEE: tl.constexpr,
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
    # -- load q, dO, lse, delta once --
    q, do, lse, delta = _q_rows(Q, DO, STATS, tok_q, mmask, dmask, head,
                                stride_qn, stride_qh, stride_don, stride_doh, N_Q,
                                offs_d, D, BLOCK_D, ROW_ALIGN)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, loop_bound(seqlen_k), BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, K, V, k_start + start_n, offs_n, seqlen_k - start_n,
                      kv_head, stride_kn, stride_kh, stride_vn, stride_vh, offs_d, dmask,
                      scale_log2, D, BLOCK_D, ROW_ALIGN, TMA, IEEE)
    dq = dq * scale

    qmask = _tile_mask(mmask, dmask, D == BLOCK_D)
    rows_dq = _row_off(tok_q, head, stride_dqn, stride_dqh, ROW_ALIGN)
    tl.store(DQ + rows_dq + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qmask)


# -- launch configuration ----------------------------------------------------------------
#
# Candidate tiles per head-dim class for float16/bfloat16 on a GPU, the first of each list
# being the default. Every candidate is compiled by aot_specs() for sm_90a and checked by
# benchmarks/static_report.py (defaults spill-free but for MEASURED_DEFAULTS, the others
# within SPILL_BUDGET); the autotuner times the candidates of the call's class once per
# (class, D, dtypes, GQA groups) and keeps the fastest.
# A candidate is a Tile (own, loop, warps, stages[, keys_major, maxnreg]):
#   forward  own = BLOCK_M queries, loop = BLOCK_N keys
#   backward one list per kernel: own is the key block of the dK/dV kernel and the query
#            block of dQ; keys_major (dK/dV kernels) picks the orientation of their
#            products (_dkdv_step).
#   maxnreg  a register cap (forward only so far: two programs per SM, see below).
# The first tile of every list (the default, also used with VDIT_AUTOTUNE=0 and
# deterministic=True) is spill-free with Triton 3.6 (the GPU machines') and 3.8 (CI)
# alike, compiled as a launch compiles it (16-divisible pointers and strides), except
# where an H100 measured a spilling tile fastest (MEASURED_DEFAULTS). The H100
# autotuner picked dK/dV 64 x 64 (keys-major, 1 stage, 254 registers) and dQ 64 x 64 in
# session 3 (backward 390 -> 211 ms on the 41430-token mixed pack against 16-row query
# steps). The queries-major orientation came after that run: at 64 x 64 it holds 202
# registers at 1 stage and 237 (Triton 3.6) / 254 (3.8) at 2, spill-free, and was the
# D = 128 dK/dV default until a later H100 run timed it at 127 ms against 53 for
# flex_attention's tile (MEASURED_DEFAULTS); the session-3 tiles stay in the lists as
# keys-major candidates. torch's flex_attention backward, on the same Triton, took 93 ms
# there (7 products like "split", 2.3x our throughput per product) with dK/dV 128 keys x
# 64 queries keys-major and dQ 128 x 64, both at 3 stages and 8 warps (its sm_90 default
# for head dims 64-128): both are candidates here and both the D = 128 defaults (the dQ
# tile spill-free, the dK/dV one spilling outside its loop). Beyond its tiles flex has no
# leaner loop: its backward template (torch 2.11's flex_backwards.py.jinja written out
# for no score_mod and lengths that are not block multiples, the mixed pack's case) compiled for sm_90a under Triton 3.6 at those
# tiles issues 898 instructions per dK/dV step (255 registers, 128 B spilled) and 537 per
# dQ step, against 412 and 384 for the same tiles here (24 and 20 wgmma each on both).
# Extra candidates may spill up to SPILL_BUDGET bytes (the static report
# checks it); the autotuner keeps them only where they measure faster.
# Classes: "d64" BLOCK_D <= 64; "d128" D == 128; "masked" 64 < D < 128 (72, 80, 96: a
# 128-column tile with masked columns; with 4-byte accesses, as a head dim of 72 got
# before the ROW_ALIGN hint, these hit 255 registers, so the first tiles are small);
# "d256" 128 < D <= 256.
class Tile(NamedTuple):
    """A candidate launch: `own` rows a program keeps (queries in the forward and dQ,
    keys in dK/dV), `loop` rows per step of its loop, warps, pipeline stages; keys_major:
    the orientation of the dK/dV products (_dkdv_step); maxnreg: a register cap per
    thread (None: the compiler's count). The lists below hold plain (own, loop, warps,
    stages) tuples where the defaults apply; _TILE_LISTS holds them as Tiles."""
    own: int
    loop: int
    warps: int
    stages: int
    keys_major: bool = False
    maxnreg: Optional[int] = None


# Two programs of 8 warps share an SM only at <= 128 registers a thread (64K registers)
# and <= ~113 KB of shared memory each: then one program's softmax runs while the
# other's products occupy the tensor cores (what FlashAttention-3 schedules explicitly
# between warpgroups). The capped tiles below are spill-free (D = 64, 126-128 registers,
# 80 KB) or spill 24-32 B outside the key loop (D = 128 with TMA, 96 KB; the pointer
# loads' addresses need more registers: 192 B spilled inside the loop, not a candidate).
_FWD_TILES = {
    "d64": [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), Tile(128, 128, 8, 2, maxnreg=128)],
    # (64, 64, 4, 2): one warpgroup, 186 registers (150 with TMA) and 80 KB of shared
    # memory, so two programs share an SM and one's softmax overlaps the other's products
    "d128": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 8, 3), (64, 64, 4, 2)],
    "masked": [(64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 8, 2), (128, 64, 8, 3)],
    "d256": [(64, 32, 8, 2), (64, 32, 8, 1)],
}
_BWD_TILES = {
    "dkdv": {
        # the default: flex_attention's sm_90 tile, spill-free here and all on wgmma (the
        # queries-major 64 x 32 steps run q k^T and dO v^T on mma.sync: 32-row products)
        "d64": [Tile(128, 64, 8, 3, keys_major=True), (64, 32, 8, 2), (128, 64, 8, 2), (64, 32, 8, 3),
                Tile(64, 32, 8, 2, keys_major=True)],
        # (queries-major steps of 32 queries, listed here before the static report counted
        # loops, ran q k^T and dO v^T on mma.sync: dropped at D = 128. Instructions per
        # step and million products, Triton 3.6: 128 x 64 keys-major ~100, 64 x 64 ~250.)
        # The default: flex_attention's tile, a MEASURED_DEFAULT
        "d128": [Tile(128, 64, 8, 3, keys_major=True), (64, 64, 8, 2), (64, 64, 8, 1),
                 Tile(64, 64, 8, 1, keys_major=True), Tile(64, 32, 8, 2, keys_major=True),
                 Tile(128, 32, 8, 2, keys_major=True)],
        "masked": [(64, 16, 8, 1), (64, 16, 8, 2), (64, 32, 8, 1), (64, 32, 8, 2), (64, 64, 8, 1),
                   Tile(64, 16, 8, 1, keys_major=True)],
        # 64-row tiles spilled at D = 256 even with 16 warps: small mma.sync tiles instead
        "d256": [(16, 16, 4, 2), (16, 16, 4, 1)],
    },
    # dK/dV with dQ added atomically (the "atomic-dq" backward): the dK/dV kernel plus a
    # third product and the float32 atomics, so mostly smaller steps than "dkdv", and
    # FlashAttention-2's own D = 128 tile, 128 keys x 64 queries (1 stage: 256 B spilled
    # with pointer atomics; at 2 stages 392 B; the TMA variant's bulk dQ reductions: see
    # _TMA_EXTRA)
    "fused": {
        "d64": [(64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), Tile(64, 32, 8, 2, keys_major=True)],
        # (the 64 x 32 default runs two of its products on mma.sync; three more such
        # queries-major steps of 16-32 queries were dropped)
        "d128": [(64, 32, 8, 2), (64, 64, 8, 1),
                 Tile(64, 32, 8, 1, keys_major=True), Tile(64, 64, 8, 1, keys_major=True),
                 Tile(128, 64, 8, 1, keys_major=True)],
        "masked": [(64, 16, 8, 1), (64, 32, 8, 1), Tile(64, 16, 8, 1, keys_major=True)],
        "d256": [(16, 16, 4, 2)],
    },
    "dq": {
        "d64": [(128, 64, 8, 3), (64, 64, 8, 2), (128, 64, 8, 2)],
        "d128": [(128, 64, 8, 3), (64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 3)],
        "masked": [(64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 2)],
        "d256": [(32, 16, 4, 1)],
    },
}
# candidates of the TMA variants only, after those above: in the forward a capped tile
# (see above); in the backward more 128-key dK/dV blocks
# (FlashAttention-2's D = 128 backward tile is 128 keys x 64 queries), where the
# descriptors' register savings show most (Triton 3.6: 24-52 B spilled in the head loop,
# none in the query loop; 24-432 B with pointers); dQ 128 x 128 (255 registers,
# spill-free), and at 4 stages (197 KB of shared memory, spill-free; picked over 3 stages
# by the H100's autotuner on the mixed pack, 2026-11-27, session 13). (The dK/dV tile at 4
# stages, 200 KB and 20 B spilled, lost to 3 stages in the same run: dropped.) And the
# picked dK/dV step as two independent one-warpgroup programs per SM, 64 keys each (255
# registers, 99 KB, 28 B spilled as the picked tile): each program's exponentials can run
# while the other's products occupy the tensor cores, where the two warpgroups of one
# 128-key program wait for each other at every barrier (not yet timed on a GPU). The
# atomic-dq TMA variant adds dQ by bulk reductions (_box_add): its step issues 606
# instructions for 32 wgmma at 128 keys x 64 queries where element atomics took 708, and
# frees the atomics' address registers (1 stage: 0-8 B spilled against 256 B), so
# FlashAttention-2's tile also runs pipelined over 2 stages (400-424 B spilled, the
# budget's; Triton 3.8 / 3.6, sm_90a; not yet timed on a GPU). The stages matter more here
# than their loads: at 1 stage the PTX waits for each step's reduction right after
# issuing it (Triton 3.8: cp.async.bulk.wait_group 0, until the adds are done; 3.6: .read,
# until the copy engine has read the shared-memory tile), so every step stalls on it;
# at 2 stages the wait moves to the next step's reuse of that buffer, behind its products
# (wait_group.read). Hence also a spill-free 2-stage 64-key step (541 instructions for 36
# wgmma, 140 KB, both Tritons).
_TMA_EXTRA = {
    "fwd": {"d128": [Tile(128, 64, 8, 2, maxnreg=128)]},
    "dkdv": {"d128": [Tile(128, 64, 8, 2, keys_major=True), Tile(128, 64, 8, 1, keys_major=True),
                      Tile(128, 32, 8, 3, keys_major=True), Tile(64, 64, 4, 2, keys_major=True)]},
    "fused": {"d128": [Tile(128, 32, 8, 2, keys_major=True), Tile(128, 64, 8, 2, keys_major=True),
                       Tile(64, 64, 8, 2, keys_major=True)]},
    "dq": {"d128": [Tile(128, 128, 8, 2), Tile(128, 64, 8, 4)]},
}
# Default tiles that spill (within SPILL_BUDGET), each the tile an H100 measured fastest
# for its list, by a factor no timing noise explains; (kernel tag, class). dK/dV at D =
# 128: 128 keys x 64 queries keys-major over 3 stages (flex_attention's tile) took 53.2 ms
# (pointers) / 50.8 ms (TMA) on the 41430-token mixed pack where the spill-free 64 x 64
# queries-major step at 2 stages, the default before, took 126.7 / 118.0 (2026-11-27,
# commit 70bdeefc23; on the DiT's 57k-token pack 71.7 against 169.0): deterministic=True
# and VDIT_AUTOTUNE=0 ran the slow one. Its 408-432 B of spills are in the per-head
# prologue: no local-memory access in the main loop with pointers (the static report's
# loop_spill_free, checked for the pointer variants' defaults), 2-4 per step with TMA.
MEASURED_DEFAULTS = {("dkdv", "d128"), ("dkdv_tma", "d128")}
# register spills (bytes, sm_90a static report) allowed to a non-default candidate (the
# most now: flex_attention's keys-major 128 x 64 dK/dV step at 3 stages, D = 128, 432 B
# under Triton 3.6, all in the per-head prologue of its pipelined query loop; 1344 B
# before the row statistics were packed, see _split_stats)
SPILL_BUDGET = 512
# float32 (IEEE dots on FMA units, tests only) and the interpreter: one small tile (the
# float32 atomic-dq kernel spills 36-48 B with 4 warps, nothing with 8)
_SMALL = Tile(16, 16, 4, 1)
_SMALL_FUSED = Tile(16, 16, 8, 1)
MAX_HEAD_DIM = 256


def _as_tiles(lists: dict) -> dict:
    return {c: [Tile(*t) for t in tiles] for c, tiles in lists.items()}


def _with_tma_variants(lists_by_kernel: dict) -> dict:
    """{tag: {class: Tiles}} for every kernel and its "_tma" variant (its list plus
    _TMA_EXTRA's)."""
    out = {}
    for tag, lists in lists_by_kernel.items():
        out[tag] = _as_tiles(lists)
        out[tag + "_tma"] = _as_tiles({c: tiles + _TMA_EXTRA.get(tag, {}).get(c, []) for c, tiles in lists.items()})
    return out


# {kernel tag: {head-dim class: candidate Tiles}}, built once (looked up on every launch):
# "fwd", "dkdv", "fused", "dq", each also with "_tma"
_TILE_LISTS = _with_tma_variants({"fwd": _FWD_TILES, **_BWD_TILES})


def _block_d(d: int) -> int:
    return max(16, next_pow2(d))


def _tile_class(d: int) -> str:
    if _block_d(d) <= 64:
        return "d64"
    if d == 128:
        return "d128"
    return "masked" if d < 128 else "d256"


def _half_on_gpu(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def _candidates(kernel: str, d: int, dtype: torch.dtype, device: torch.device, tma: bool = False) -> list[Tile]:
    """The candidate tiles of a launch of `kernel` ("fwd", "dkdv", "dq" or "fused": dK/dV
    with atomic dQ); tma: those of the variant that reads through tensor descriptors."""
    if _half_on_gpu(dtype, device):
        return _TILE_LISTS[kernel + "_tma" if tma else kernel][_tile_class(d)]
    return [_SMALL_FUSED if kernel == "fused" else _SMALL]


def _prune(tag: str):
    """early_config_prune: keep the candidates of the call's class (all configs of every
    class live in one autotuner; the class is a function of the constexprs)."""
    def prune(configs, named_args, **kwargs):
        call = {**named_args, **kwargs}  # where the constexprs arrive differs across versions
        # a tile is its constexprs and launch options
        wanted = {(tuple(sorted(_tile_meta(tag, t).items())), t.warps, t.stages, t.maxnreg)
                  for t in _TILE_LISTS[tag][_tile_class(call["D"])]}
        return [c for c in configs
                if (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages, c.maxnreg) in wanted]
    return prune


def _configs(tag: str, pre_hook=None) -> list:
    out, seen = [], set()
    for cands in _TILE_LISTS[tag].values():
        for tile in cands:
            if tile in seen:
                continue
            seen.add(tile)
            out.append(triton.Config(_tile_meta(tag, tile), num_warps=tile.warps, num_stages=tile.stages,
                                     maxnreg=tile.maxnreg, pre_hook=pre_hook))
    return out


# the TMA variants' descriptor arguments of (rows, D) boxes, the constexpr of their rows,
# and those of (rows, 4) boxes (the backward's row statistics)
_DESCRIPTOR_ARGS = {"fwd_tma": (("K", "V"), "BLOCK_N", ()), "dq_tma": (("K", "V"), "BLOCK_N", ()),
                    "dkdv_tma": (("Q", "DO"), "BLOCK_M", ("STATS",)),
                    "fused_tma": (("Q", "DO", "DQ_BOX"), "BLOCK_M", ("STATS",))}


def _descriptor_blocks(tag: str):
    """Autotuner pre_hook of a TMA variant: its descriptors' boxes are the tile's."""
    names, rows, stat_names = _DESCRIPTOR_ARGS[tag]

    def set_blocks(nargs) -> None:
        for name in names:
            nargs[name].block_shape = [nargs[rows], nargs["D"]]
        for name in stat_names:
            nargs[name].block_shape = [nargs[rows], 4]
    return set_blocks


def _tile_meta(tag: str, tile: Tile) -> dict:
    """The constexprs of a candidate tile of kernel `tag`."""
    if tag.startswith(("dkdv", "fused")):  # own keys = BLOCK_N, loop queries = BLOCK_M
        return dict(BLOCK_M=tile.loop, BLOCK_N=tile.own, KEYS_MAJOR=tile.keys_major)
    return dict(BLOCK_M=tile.own, BLOCK_N=tile.loop)


# Autotuned entry points (GPU, half dtypes), one autotuner per kernel and size class of
# the call (_size_class): a short cross-attention to text and a long self-attention over
# a pack have different best tiles, and with one shared autotuner whichever ran first
# would pick for both (in a DiT's backward that is the cross-attention). Keys within a
# class: head dim and the GQA group count; triton adds the dtypes of the tensor
# arguments. The classes share the compiled kernels. Every kernel fully overwrites its
# outputs, so timing runs need no reset, except the atomic dQ accumulator (reset_to_zero).
_TUNERS: dict = {}
_TUNED_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "fused": _attn_bwd_dkdv_kernel,
                  "dq": _attn_bwd_dq_kernel}
_TUNED_KERNELS.update({tag + "_tma": kernel for tag, kernel in _TUNED_KERNELS.items()})
# segment lengths up to these (max_seqlen) share a class: text-length, medium, long
_SIZE_BOUNDS = (256, 4096)


def _size_class(max_seqlen_q: int, max_seqlen_k: int) -> tuple:
    """(query class, key class), each 0, 1 or 2 by _SIZE_BOUNDS."""
    return tuple(sum(n > b for b in _SIZE_BOUNDS) for n in (max_seqlen_q, max_seqlen_k))


def _tuner(tag: str, size: tuple):
    """The autotuner of kernel `tag` ("fwd", "dkdv", "fused", "dq", each also with "_tma")
    for one size class, made on first use."""
    if (tag, size) not in _TUNERS:
        _TUNERS[tag, size] = triton.autotune(
            _configs(tag, pre_hook=_descriptor_blocks(tag) if tag.endswith("_tma") else None),
            key=["D", "GROUPS"], reset_to_zero=["DQ"] if tag.startswith("fused") else None,
            prune_configs_by={"early_config_prune": _prune(tag)})(_TUNED_KERNELS[tag])
        # never Triton's on-disk autotuning cache (TRITON_CACHE_AUTOTUNING=1): its entry is
        # named by the kernel, the configs and the key (head dim, GQA groups, dtypes), not
        # by the size class, so the first class tuned would pick every class's tile
        _TUNERS[tag, size].cache_results = False
        tuning_cache.prefill(f"{tag} size class {size}", _TUNERS[tag, size])  # (ours instead: VDIT_TUNING_CACHE)
    return _TUNERS[tag, size]


def named_tuners() -> dict:
    """{name: autotuner} of the attention kernels made in this process."""
    return {f"{tag} size class {size}": tuner for (tag, size), tuner in _TUNERS.items()}


# backward strategies ("split": no atomics, the fallback) and how the kernels read the
# operands they stream ("pointers": the fallback); the measured choices of "auto", per
# (head dim, dtype, GQA groups, device, size class, available options), the backward's
# reads also per strategy
BWD_STRATEGIES = ("split", "atomic-dq", "torch-fa2")
READS = ("pointers", "tma")
_STRATEGY_CHOICE: dict = {}
_FWD_CHOICE: dict = {}
_BWD_READ_CHOICE: dict = {}
# the strategy the last backward of this process ran (the benchmarks report which kernels
# a default row timed: "auto" may pick PyTorch's FlashAttention-2 backward)
LAST_BACKWARD: dict = {"strategy": None}


def bwd_available(q, grad_lse, *others) -> tuple:
    """The strategies a backward may run: the Triton ones, and torch-fa2 where it can run
    (_torch_fa2_possible, on q and the `others` it reads) unless VDIT_ATTN_BWD=triton
    ("auto" among the Triton kernels)."""
    if os.environ.get("VDIT_ATTN_BWD") == "triton" or not _torch_fa2_possible(q, grad_lse, *others):
        return BWD_STRATEGIES[:2]
    return BWD_STRATEGIES


def bwd_strategy(deterministic: bool, key=None, measure=None, available: tuple = BWD_STRATEGIES[:2]) -> str:
    """The backward strategy of a call: "split" with deterministic=True, else VDIT_ATTN_BWD
    ("split", "atomic-dq", "torch-fa2", or "auto" / "triton": measured; see
    measured_choice) among `available` (bwd_available)."""
    if deterministic:
        return "split"
    return measured_choice("VDIT_ATTN_BWD", BWD_STRATEGIES, _STRATEGY_CHOICE, key, measure, available,
                            autos=("auto", "triton"))


def fwd_variant(tma_possible: bool, key=None, measure=None) -> str:
    """How the forward reads K and V: "pointers" (masked loads) or "tma" (tensor
    descriptors: the Hopper copy engine), by VDIT_ATTN_FWD ("pointers", "tma" or "auto";
    see vdit_kernels.triton.measured_choice); "pointers" wherever the layout rules TMA out."""
    return measured_choice("VDIT_ATTN_FWD", READS, _FWD_CHOICE, key, measure,
                            READS if tma_possible else READS[:1])


def bwd_read(deterministic: bool, tma_possible: bool, key=None, measure=None) -> str:
    """How a Triton backward strategy's kernels read what they stream (dK/dV: q and dO,
    dQ: k and v): "pointers" or "tma", by VDIT_ATTN_BWD_READ as fwd_variant() by
    VDIT_ATTN_FWD; the key names the strategy. "pointers" with deterministic=True (the
    two compile to different instruction orders, so their last bits may differ)."""
    if deterministic:
        return READS[0]
    return measured_choice("VDIT_ATTN_BWD_READ", READS, _BWD_READ_CHOICE, key, measure,
                            READS if tma_possible else READS[:1])


def measured_choices() -> list[str]:
    """The variants "auto" picked by measuring in this process, one line each, and the
    tiles the autotuners picked (for the benchmarks' summary: which backward strategy,
    forward K/V read and tiles ran)."""
    lines = []
    for what, cache in (("backward", _STRATEGY_CHOICE), ("forward read", _FWD_CHOICE),
                        ("backward read", _BWD_READ_CHOICE)):
        for key, choice in cache.items():
            d, dtype, groups, device, size = key[:5]
            among = f" (of {', '.join(key[5])})" if what == "backward" else ""
            strategy = f" {key[5]}" if what == "backward read" else ""
            lines.append(f"{what}{strategy} D={d} {str(dtype).replace('torch.', '')} GQA groups={groups} "
                         f"{device} size class {size}: {choice}{among}")
    return lines + autotuned_choices(named_tuners())


def _tma_possible(*tensors) -> bool:
    """Every (tokens, heads, D) tensor readable by a (tokens, heads*D) tensor descriptor: a
    head dim of 64 or 128 (one box row per head), heads adjacent (head stride D), rows
    apart (a token stride of at least heads*D: not an expanded gradient's 0), 16-byte
    aligned base and token strides; on a GPU, compute capability 9+ (the interpreter runs
    them on CPU)."""
    first = tensors[0]
    d = first.shape[2]
    if TensorDescriptor is None or d not in (64, 128) or first.dtype == torch.float64:
        return False
    if first.is_cuda and torch.cuda.get_device_capability(first.device)[0] < 9:
        return False
    return all(t.shape[2] == d and t.stride(1) == d and t.stride(0) >= t.shape[1] * d
               and t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0
               and 0 < t.shape[0] < 2 ** 31 for t in tensors)


def _torch_fa2_possible(q, grad_lse, *others) -> bool:
    """PyTorch's own FlashAttention-2 backward (aten._flash_attention_backward, the kernel
    behind torch.nn.attention.varlen; FlashAttention-3's where a user activated torch's
    FA3 for that op, same contract) can compute this call's gradients from the Triton
    forward's out and lse (the same (H, Nq) float32 natural-log lse it writes itself):
    float16 / bfloat16 on an sm_80+ GPU of a torch built with it, head dim a multiple of
    8 up to 256, no gradient into lse (its backward has no term for one), and q and the
    `others` (k, v, out, grad_out) 16-byte aligned, base and rows: its loads are 16-byte
    cp.async, which a misaligned view would fault on (a sticky CUDA error), where the
    Triton kernels narrow their loads (ROW_ALIGN)."""
    return (grad_lse is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[2] % 8 == 0 and q.shape[2] <= 256
            and all(t.data_ptr() % 16 == 0 and t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0
                    for t in (q, *others))
            and torch.cuda.get_device_capability(q.device) >= (8, 0)
            and torch.backends.cuda.is_flash_attention_available())


def _torch_fa2_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    """dq, dk, dv in the input dtype by PyTorch's FlashAttention-2 backward, called as
    torch.nn.attention.varlen's backward calls it (dropout 0: the rng state is unused)."""
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.empty(0, device=q.device)
    return torch.ops.aten._flash_attention_backward(
        grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, False, rng_state, unused, scale=scale)


def _row_descriptors(a, b, block_rows: int):
    """Tensor descriptors of two (tokens, heads, D) tensors as (tokens, heads*D), whose
    loads fetch (block_rows, D) boxes (one head of block_rows tokens)."""
    d = a.shape[2]
    return tuple(TensorDescriptor(t, [t.shape[0], t.shape[1] * d], [t.stride(0), 1], [block_rows, d])
                 for t in (a, b))


def _dq_box(dq, block_rows: int):
    """A tensor descriptor of the atomic-dq backward's float32 (tokens, heads, D) dQ
    accumulator as (tokens, heads*D), whose reductions add (block_rows, D) boxes."""
    flat = dq.view(dq.shape[0], -1)
    return TensorDescriptor(flat, list(flat.shape), [flat.stride(0), 1], [block_rows, dq.shape[2]])


def _stats_descriptor(stats, block_rows: int):
    """A tensor descriptor of the backward's row statistics (H, Nq, 4) as (H*Nq, 4), whose
    loads fetch block_rows rows of 16 bytes."""
    flat = stats.view(-1, 4)
    return TensorDescriptor(flat, list(flat.shape), [4, 1], [block_rows, 4])


def _device_of(args) -> Optional[torch.device]:
    return next((a.device for a in args if isinstance(a, torch.Tensor)), None)


def _launch(raw, tuned, tag, grid_of, args, tiles, fixed: bool, **constexprs):
    """Run `tuned` (autotuned over `tiles`) or, when fixed or there is one candidate, `raw`
    with the first candidate the GPU has the resources for (launch_first_that_fits: the
    D = 128 dQ default, 128 x 64 over 3 stages, takes 136 KB, over a 99 KB GPU's).
    grid_of(meta) -> grid."""
    if not (fixed or len(tiles) == 1 or not autotune_enabled()):
        tuned[grid_of](*args, **constexprs, **COMPILE_OPTIONS)
        return

    def run(tile):
        meta = _tile_meta(tag, tile)
        options = {} if tile.maxnreg is None else {"maxnreg": tile.maxnreg}
        if tile is not tiles[0]:  # the caller's TMA descriptors have the first tile's boxes
            for a in args:
                if TensorDescriptor is not None and isinstance(a, TensorDescriptor):
                    a.block_shape = [tile.loop, a.block_shape[1]]
        raw[grid_of(meta)](*args, **constexprs, **meta, num_warps=tile.warps, num_stages=tile.stages,
                           **options, **COMPILE_OPTIONS)
    launch_first_that_fits(f"attention {tag}", tiles, lambda: _device_of(args), run)


def _row_align(*tensors: torch.Tensor, strides: tuple = ()) -> int:
    """ROW_ALIGN of the kernels: the largest power of two up to 8 dividing every token and
    head stride (elements) of the (tokens, heads, D) tensors a launch touches, and `strides`
    (those of buffers not yet allocated)."""
    return pow2_dividing([s for t in tensors for s in t.stride()[:2]] + list(strides), 8)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def _rotate(q, k, rope, inverse: bool, inplace: bool = False):
    """RoPE on q and k: on a GPU with the rope family's default backend (DEFAULT_ORDER in
    vdit_kernels/backend.py: the CUDA kernel where built), under the interpreter with the
    Triton kernel."""
    positions, dims, theta, interleaved = rope
    positions = positions.to(device=q.device, dtype=torch.float32)
    impl = triton_rope
    if q.device.type == "cuda":
        op = "rope_3d_" if inplace else "rope_3d"
        impl = _backend.implementation(_backend.resolve("rope", q.device, "auto", op, q.dtype), "rope")
    fn = impl.rope_3d_ if inplace else impl.rope_3d
    return fn(q, k, positions, [int(x) for x in dims], float(theta), bool(interleaved), inverse)


# limits of these kernels that the backend's resolution (by device and dtype) does not see:
# BackendUnavailable, as a backend asked for by name that cannot run (auto on a GPU takes
# this backend for any head dim: the error names the way out)
def _check_head_dim(d: int) -> None:
    if d > MAX_HEAD_DIM:
        raise _backend.BackendUnavailable(f"the Triton attention supports head_dim <= {MAX_HEAD_DIM}, got {d} "
                                          "(backend='reference' has no limit)")


MAX_SEGMENTS = 65535  # the grids' z dimension is the segment (CUDA's limit on gridDim.z)


def _check_segments(nseg: int) -> None:
    if nseg > MAX_SEGMENTS:
        raise _backend.BackendUnavailable(f"the Triton attention takes packs of up to {MAX_SEGMENTS} segments "
                                          f"(one CUDA grid layer each), got {nseg}: split the pack "
                                          "(backend='reference' has no limit)")


# -- backend contract --------------------------------------------------------------------

@on_tensors_device
def varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale, rope):
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    nq, h, d = q.shape
    _check_head_dim(d)
    hk = k.shape[1]
    out = torch.empty((nq, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((h, nq), dtype=torch.float32, device=q.device)
    nseg = cu_seqlens_q.numel() - 1
    _check_segments(nseg)
    if nq == 0 or h == 0 or nseg <= 0 or max_seqlen_q <= 0:
        return out.zero_(), lse.fill_(float("-inf"))
    cu_q = cu_seqlens_q.to(torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(torch.int32).contiguous()
    if rope is not None:
        q, k = _rotate(q, k, rope, inverse=False)
    common = dict(D=d, BLOCK_D=_block_d(d), ROW_ALIGN=_row_align(q, k, v, out),
                  IEEE=q.dtype in (torch.float32, torch.float64))
    size = _size_class(max_seqlen_q, max_seqlen_k)

    def run(variant: str):
        tma = variant == "tma"
        tiles = _candidates("fwd", d, q.dtype, q.device, tma)
        kk, vv = _row_descriptors(k, v, tiles[0].loop) if tma else (k, v)
        args = (q, kk, vv, out, lse, cu_q, cu_k,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                out.stride(0), out.stride(1), lse.stride(0),
                h // hk, float(softmax_scale) * LOG2E)
        _launch(_attn_fwd_kernel, _tuner("fwd_tma" if tma else "fwd", size), "fwd_tma" if tma else "fwd",
                lambda meta: (cdiv(max_seqlen_q, meta["BLOCK_M"]), h, nseg), args,
                tiles, fixed=False, TMA=tma, **common)

    run(fwd_variant(_tma_possible(k, v), key=(d, q.dtype, h // hk, q.device, size),
                    measure=timing("attention forward read", {n: (lambda n=n: run(n)) for n in READS}, q)))
    return out, lse


@on_tensors_device
def varlen_attention_bwd(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k, softmax_scale, rope, deterministic):
    # deterministic=True: the "split" strategy (no atomics) with the tiles pinned to the
    # class default instead of the autotuned choice, so results are bitwise reproducible
    # across processes and machines of the same kind. Otherwise bwd_strategy() decides.
    q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()
    nq, h, d = q.shape
    _check_head_dim(d)
    nk, hk = k.shape[0], k.shape[1]
    nseg = cu_seqlens_q.numel() - 1
    _check_segments(nseg)
    if nq == 0 or nk == 0 or h == 0 or nseg <= 0 or max_seqlen_q <= 0 or max_seqlen_k <= 0:
        # contiguous, as the fake says (zeros_like would keep a permuted layout)
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    cu_q = cu_seqlens_q.to(torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(torch.int32).contiguous()
    if rope is not None:
        # the kernels run on the rotated q/k, as in the forward; their dq/dk (w.r.t. the
        # rotated q/k, in the input dtype as without rope: one rounding more than a
        # float32 buffer, which measured no larger error than the rounding of the result,
        # at half the bytes) are rotated back at the end
        q, k = _rotate(q, k, rope, inverse=False)
    bd = _block_d(d)
    ieee = q.dtype in (torch.float32, torch.float64)
    scale = float(softmax_scale)
    size = _size_class(max_seqlen_q, max_seqlen_k)

    def row_stats():
        """The Triton strategies' row statistics, (H, Nq, 4) float32: (lse * log2(e),
        delta = rowsum(dO * O) - grad_lse, 0, 0) per head and query row."""
        stats = torch.empty((h, nq, 4), dtype=torch.float32, device=q.device)
        pre_m = 16
        _attn_bwd_pre_kernel[(cdiv(nq, pre_m), h)](
            out, grad_out, lse, stats, nq,
            out.stride(0), out.stride(1),
            grad_out.stride(0), grad_out.stride(1),
            lse.stride(0),
            D=d, BLOCK_D=bd, BLOCK_M=pre_m, num_warps=4, **COMPILE_OPTIONS,
        )
        if grad_lse is not None:
            # d lse_i / d S_ij = P_ij: a gradient into lse shifts the row term of dS = P (dP - delta)
            stats[..., 1].sub_(grad_lse)
        return stats

    # the gradient buffers are fresh (tokens, heads, D) tensors: strides heads * D and D
    row_align = _row_align(q, k, v, grad_out, strides=(h * d, hk * d, d))

    stats = None

    # (the packed statistics' row coordinate head * Nq + q is 32-bit too)
    tma_possible = _tma_possible(q, k, v, grad_out) and h * nq < 2 ** 31

    def run(strategy: str):
        """dq, dk, dv (fresh buffers) with one strategy's kernels."""
        if strategy == "torch-fa2":
            return _torch_fa2_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k,
                                       scale)
        read = bwd_read(deterministic, tma_possible, key=(d, q.dtype, h // hk, q.device, size, strategy),
                        measure=timing(f"attention backward read ({strategy})",
                                       {r: (lambda r=r: run_triton(strategy, r)) for r in READS}, q))
        return run_triton(strategy, read)

    def run_triton(strategy: str, read: str):
        nonlocal stats
        if stats is None:
            stats = row_stats()
        atomic = strategy == "atomic-dq"
        tma = read == "tma"
        # the kernels store every row of their segments; only the atomics add into dq
        # (in float32), which therefore starts at zero
        gq = (torch.zeros((nq, h, d), dtype=torch.float32, device=q.device) if atomic
              else torch.empty((nq, h, d), dtype=q.dtype, device=q.device))
        gk = torch.empty((nk, hk, d), dtype=k.dtype, device=k.device)
        gv = torch.empty((nk, hk, d), dtype=v.dtype, device=v.device)
        common = dict(D=d, BLOCK_D=bd, IEEE=ieee, ROW_ALIGN=row_align, TMA=tma)
        # -- dK, dV (and, atomic-dq, dQ): one key block x kv head --
        kernel = "fused" if atomic else "dkdv"
        tag = kernel + "_tma" if tma else kernel
        tiles = _candidates(kernel, d, q.dtype, q.device, tma)
        qq, dout = _row_descriptors(q, grad_out, tiles[0].loop) if tma else (q, grad_out)
        rows = _stats_descriptor(stats, tiles[0].loop) if tma else stats
        box = _dq_box(gq, tiles[0].loop) if atomic and tma else gq
        args = (qq, k, v, dout, rows, gk, gv, gq, box, cu_q, cu_k,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                grad_out.stride(0), grad_out.stride(1), nq,
                gk.stride(0), gk.stride(1), gv.stride(0), gv.stride(1), gq.stride(0), gq.stride(1),
                h // hk, scale, scale * LOG2E)
        _launch(_attn_bwd_dkdv_kernel, _tuner(tag, size), tag,
                lambda meta: (cdiv(max_seqlen_k, meta["BLOCK_N"]), hk, nseg), args,
                tiles, fixed=deterministic, ATOMIC_DQ=atomic, EMULATE_TMA_ADD=q.device.type != "cuda",
                **common)
        # -- dQ: one query block x head --
        if not atomic:
            tag = "dq_tma" if tma else "dq"
            tiles = _candidates("dq", d, q.dtype, q.device, tma)
            kk, vv = _row_descriptors(k, v, tiles[0].loop) if tma else (k, v)
            args = (q, kk, vv, grad_out, stats, gq, cu_q, cu_k,
                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                    grad_out.stride(0), grad_out.stride(1), nq,
                    gq.stride(0), gq.stride(1),
                    h // hk, scale, scale * LOG2E)
            _launch(_attn_bwd_dq_kernel, _tuner(tag, size), tag,
                    lambda meta: (cdiv(max_seqlen_q, meta["BLOCK_M"]), h, nseg), args,
                    tiles, fixed=deterministic, **common)
        return gq, gk, gv

    available = bwd_available(q, grad_lse, k, v, out, grad_out)
    strategy = bwd_strategy(deterministic, key=(d, q.dtype, h // hk, q.device, size, available),
                            measure=timing("attention backward", {s: (lambda s=s: run(s)) for s in available}, q),
                            available=available)
    dq, dk, dv = run(strategy)
    LAST_BACKWARD["strategy"] = strategy
    dq = dq.to(q.dtype)  # atomic-dq accumulates in float32; the rope kernels take one dtype
    if rope is not None:
        _rotate(dq, dk, rope, inverse=True, inplace=True)
    return dq, dk, dv


# -- ahead-of-time compile specs (benchmarks/static_report.py) ---------------------------

def _cap(tile: Tile) -> str:
    return "" if tile.maxnreg is None else f" r{tile.maxnreg}"


def aot_specs() -> list[dict]:
    """Every candidate launch configuration, for benchmarks/static_report.py (sm_90a, no
    GPU needed): each class at representative head dims, every tile of its list."""
    fwd_sig = (["Q", "K", "V", "O"], ["LSE"], ["CU_Q", "CU_K"],
               ["stride_qn", "stride_qh", "stride_kn", "stride_kh", "stride_vn", "stride_vh",
                "stride_on", "stride_oh", "stride_lh", "GROUPS"], ["scale_log2"])
    dkdv_sig = (["Q", "K", "V", "DO"], ["STATS"], ["CU_Q", "CU_K"],
                ["stride_qn", "stride_qh", "stride_kn", "stride_kh", "stride_vn", "stride_vh",
                 "stride_don", "stride_doh", "N_Q", "stride_dkn", "stride_dkh",
                 "stride_dvn", "stride_dvh", "stride_dqn", "stride_dqh", "GROUPS"], ["scale", "scale_log2"])
    dq_sig = (["Q", "K", "V", "DO"], ["STATS"], ["CU_Q", "CU_K"],
              ["stride_qn", "stride_qh", "stride_kn", "stride_kh", "stride_vn", "stride_vh",
               "stride_don", "stride_doh", "N_Q", "stride_dqn", "stride_dqh", "GROUPS"],
              ["scale", "scale_log2"])

    def sig(dtype, layout, constexprs, out=()):
        xs, fs, cs, ints, floats = layout
        s = {name: f"*{dtype}" for name in (*xs, *out)}
        s.update({n: "*fp32" for n in fs})
        s.update({n: "*i32" for n in cs})
        s.update({n: "i64" for n in ints})
        s.update({n: "fp32" for n in floats})
        s.update({n: "constexpr" for n in constexprs})
        return s

    specs = []
    cases = [("bf16", 64), ("bf16", 48), ("bf16", 128), ("bf16", 72), ("bf16", 96), ("bf16", 256),
             ("fp16", 128), ("fp32", 128)]
    for dtype, d in cases:
        tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        # ROW_ALIGN 8: every listed head dim is a multiple of 8, so are a pack's strides
        base = dict(D=d, BLOCK_D=_block_d(d), ROW_ALIGN=8, IEEE=dtype == "fp32")
        mma = dtype != "fp32"
        tag = f"{dtype} d={d}"
        # what a launch can't mark divisible by 16: the LSE's token stride (Nq), and the
        # head strides (= D) of head dims such as 72
        unaligned = ["stride_lh"] + ([n for n in ("stride_qh", "stride_kh", "stride_vh", "stride_oh",
                                                   "stride_doh", "stride_dkh", "stride_dvh", "stride_dqh")]
                                     if d % 16 else [])
        # the TMA variant where its layout condition can hold (head dims 64, 128)
        for tma in ((False, True) if d in (64, 128) and dtype != "fp32" else (False,)):
            for i, tile in enumerate(_candidates("fwd", d, tdt, torch.device("cuda"), tma)):
                bm, bn, w, st = tile[:4]
                ce = dict(base, BLOCK_M=bm, BLOCK_N=bn, TMA=tma)
                signature = sig(dtype, fwd_sig, ce)
                if tma:
                    signature.update({n: f"tensordesc<{dtype}[{bn},{d}]>" for n in ("K", "V")})
                specs.append({"name": f"attn_fwd{'_tma' if tma else ''} {tag} {bm}x{bn} w{w}s{st}{_cap(tile)}",
                              "fn": _attn_fwd_kernel, "signature": signature,
                              "constexprs": ce, "num_warps": w, "num_stages": st, "maxnreg": tile.maxnreg,
                              "expect_mma": mma, "expect_tma": tma, "unaligned_args": unaligned,
                              "spill_budget": SPILL_BUDGET if i else 0, "loop_spill_free": not (i or tma)})
        for tma in ((False, True) if d in (64, 128) and dtype != "fp32" else (False,)):
            suffix = "_tma" if tma else ""
            for kernel, atomic in (("dkdv", False), ("fused", True)):
                measured = (kernel + suffix, _tile_class(d)) in MEASURED_DEFAULTS
                for i, tile in enumerate(_candidates(kernel, d, tdt, torch.device("cuda"), tma)):
                    own, loop, w, st = tile[:4]
                    ce = dict(base, **_tile_meta(kernel, tile), ATOMIC_DQ=atomic, TMA=tma, EMULATE_TMA_ADD=False)
                    signature = sig(dtype, dkdv_sig, ce, out=("DK", "DV"))
                    signature["DQ"] = signature["DQ_BOX"] = "*fp32" if atomic else f"*{dtype}"
                    if tma:  # q, dO and the row statistics read by descriptors
                        signature.update({n: f"tensordesc<{dtype}[{loop},{d}]>" for n in ("Q", "DO")})
                        signature["STATS"] = f"tensordesc<fp32[{loop},4]>"
                        if atomic:  # dQ added by bulk reductions of (loop, D) boxes
                            signature["DQ_BOX"] = f"tensordesc<fp32[{loop},{d}]>"
                    # wgmma needs 64-row tiles; the small D = 256 tiles run on mma.sync
                    major = "-keys" if ce["KEYS_MAJOR"] else ""
                    specs.append({"name": f"attn_bwd_{kernel}{suffix} {tag} {own}x{loop}{major} w{w}s{st}{_cap(tile)}",
                                  "fn": _attn_bwd_dkdv_kernel, "signature": signature,
                                  "constexprs": ce, "num_warps": w, "num_stages": st, "maxnreg": tile.maxnreg,
                                  "expect_mma": mma and own >= 64, "expect_tma": tma,
                                  "spill_budget": SPILL_BUDGET if i or (measured and mma) else 0,
                                  "measured_default": measured and mma and not i,
                                  "loop_spill_free": not (i or tma), "unaligned_args": unaligned})
            for i, tile in enumerate(_candidates("dq", d, tdt, torch.device("cuda"), tma)):
                own, loop, w, st = tile[:4]
                ce = dict(base, BLOCK_M=own, BLOCK_N=loop, TMA=tma)
                signature = sig(dtype, dq_sig, ce, out=("DQ",))
                if tma:  # k and v read by descriptors
                    signature.update({n: f"tensordesc<{dtype}[{loop},{d}]>" for n in ("K", "V")})
                specs.append({"name": f"attn_bwd_dq{suffix} {tag} {own}x{loop} w{w}s{st}{_cap(tile)}",
                              "fn": _attn_bwd_dq_kernel, "signature": signature,
                              "constexprs": ce, "num_warps": w, "num_stages": st, "maxnreg": tile.maxnreg,
                              "expect_mma": mma and own >= 64, "expect_tma": tma,
                              "spill_budget": SPILL_BUDGET if i else 0, "loop_spill_free": not (i or tma),
                              "unaligned_args": unaligned})
    d = 128
    ce = dict(D=d, BLOCK_D=d, BLOCK_M=16)
    pre = {"O": "*bf16", "DO": "*bf16", "LSE": "*fp32", "STATS": "*fp32", "N": "i32",
           "stride_on": "i64", "stride_oh": "i64", "stride_don": "i64", "stride_doh": "i64",
           "stride_lh": "i64"}
    pre.update({n: "constexpr" for n in ce})
    specs.append({"name": "attn_bwd_pre bf16 d=128", "fn": _attn_bwd_pre_kernel, "signature": pre,
                  "constexprs": ce, "num_warps": 4, "unaligned_args": ["stride_lh"], "loop_spill_free": True})
    return specs
