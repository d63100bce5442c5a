# Fused 3D RoPE of q and k in one Triton launch.
#
# Computes, for every token n and head of q (N, Hq, D) and k (N, Hk, D), the rotation of
# D/2 pairs: pair j of axis chunk a (size d_a, axes t, h, w in order, chunk a starting at
# element c0_a) turns by positions[n, a] * theta ** (-2j / d_a) (negated when INVERSE).
# Angles, cos and sin are computed in float32 inside the kernel from the D/2 frequencies
# (reference.rope_frequencies, float64 rounded to float32 once, as the reference and the
# CUDA kernels round them: a table of D/2 floats the launcher caches on the device; no
# cos/sin table is read). Frequencies computed in the kernel as exp2(-2j/d_a * log2(theta))
# were 8 ulp off: angle errors of 5e-4 rad at positions of 1000. Data is computed in
# float32 and stored in the input dtype.
#
# Grid: (cdiv(N, BLOCK_N), G). Program (i, g) owns tokens [i*BLOCK_N, (i+1)*BLOCK_N) and
# the combined heads g, g+G, g+2G, ... of [q heads, k heads]; cos/sin of its token block
# are computed once and reused for every head it rotates (the op is memory bound, the
# trig is the only real arithmetic). G splits the heads just enough for ~10 waves of
# programs (fewer, longer programs leave a half-empty last wave).
#
# Every load and store is a run of contiguous elements the compiler can vectorize
# (benchmarks/static_report.py prints the widest access and checks the expected one):
#   interleaved:  a head row is one (BLOCK_N, 2*HP) tile, HP = D/2 rounded up to a power
#                 of two (tl.arange needs one); reshaped to (BLOCK_N, HP, 2) and split in
#                 registers into the pair members: 16-byte accesses for any split. Pair
#                 slot p maps to its axis (and so its position and frequency) by where it
#                 falls among dt/2, dh/2, dw/2.
#   rotate-half:  the same whole-row tile; each element's partner e +- d_a/2 (pairs
#                 (c0 + j, c0 + j + d_a/2) of axis chunk a) is fetched from registers with
#                 tl.gather (warp shuffles in float32; in half precision Triton stages it
#                 through shared memory), with cos and the member-signed sin per
#                 element. Tiles per half chunk were as narrow as the chunks' alignment
#                 (4-byte accesses for (44, 42, 42) in bf16: halves at 22, 65, 107).
# Padding is masked. The first version gathered each pair's two members with strided
# scalar loads: 29% of copy bandwidth on H100, bound by instruction issue, not memory.
# Tile: BLOCK_N * D_P ~ 4096 elements (D_P = the padded head dim), 16 per thread at 8
# warps, i.e. two 16-byte vectors of bf16; rotate-half, whose cos/sin are per element,
# 2048 (one vector a thread). ~60 registers either way, capped at 64 (_MAX_REGISTERS: four
# programs per SM), spill-free on sm_90a (4 warps doubled them); cos and sin stay in
# registers across the head loop.
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..checks import KERNEL_DTYPES
from ..pack import device_table
from ..reference import rope_frequencies
from . import COMPILE_OPTIONS, cdiv, loop_bound, next_pow2, on_tensors_device, pow2_dividing

DTYPES = KERNEL_DTYPES  # cos/sin are float32: a float64 rotation would be float32-accurate


@triton.jit
def _angles(pos_ptr, n64, nmask, freq_ptr, pair, valid, ax1, ax2):
    """(BLOCK_N, K) angles pos[n, axis] * freq[pair] of K slots (pair slots or elements),
    each given its axis (ax1: past t, ax2: past h) and its pair's index among the D/2
    (slots past them, valid False: angle 0)."""
    freq = tl.load(freq_ptr + pair, mask=valid, other=0.0)
    pos_t = tl.load(pos_ptr + n64 * 3 + 0, mask=nmask, other=0.0)
    pos_h = tl.load(pos_ptr + n64 * 3 + 1, mask=nmask, other=0.0)
    pos_w = tl.load(pos_ptr + n64 * 3 + 2, mask=nmask, other=0.0)
    pos = tl.where(ax2[None, :] == 1, pos_w[:, None],
                   tl.where(ax1[None, :] == 1, pos_h[:, None], pos_t[:, None]))
    return pos * freq[None, :]


@triton.jit
def _chunk_size(ax1, ax2, DT: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr):
    """Size d_a of each slot's axis chunk (ax1: past t, ax2: past h); padding slots and
    empty axes get 2, so every half chunk has an element."""
    return tl.maximum(tl.where(ax2 == 1, DW, tl.where(ax1 == 1, DH, DT)), 2)


@triton.jit
def _tables(pos_ptr, n64, nmask, freq_ptr,
            DT: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, HP: tl.constexpr,
            INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr):
    """What every head of a token block shares, kept in registers across the head loop.
    Interleaved: cos, sin (BLOCK_N, HP) of the HP pair slots (HP >= D/2); slot p belongs
    to axis t, h or w by where it falls among DT/2, DH/2, DW/2. Rotate-half: per element
    e of the 2*HP padded row its cos, its sin with the pair member's sign folded in (-sin
    for the first half of an axis chunk, +sin for the second), and the index of its
    partner e +- d_a/2 (e itself past D). INVERSE negates the sines."""
    if INTERLEAVED:
        k = tl.arange(0, HP)
        ax1 = (k >= DT // 2).to(tl.int32)
        ax2 = (k >= DT // 2 + DH // 2).to(tl.int32)
        pair = k
        valid = k < (DT + DH + DW) // 2
        sign = tl.full([HP], 1.0, tl.float32)
        partner = k  # unused: the pairs are split in registers
    else:
        k = tl.arange(0, 2 * HP)
        ax1 = (k >= DT).to(tl.int32)
        ax2 = (k >= DT + DH).to(tl.int32)
        d_a = _chunk_size(ax1, ax2, DT, DH, DW)
        half = d_a // 2
        i = k - ax1 * DT - ax2 * DH
        first = i < half
        pair = ax1 * (DT // 2) + ax2 * (DH // 2) + tl.where(first, i, i - half)
        valid = k < DT + DH + DW
        sign = tl.where(first, -1.0, 1.0)
        partner = tl.where(valid, tl.where(first, k + half, k - half), k)
    angle = _angles(pos_ptr, n64, nmask, freq_ptr, pair, valid, ax1, ax2)
    if INVERSE:
        sign = -sign
    return tl.cos(angle), tl.sin(angle) * sign[None, :], partner


@triton.jit
def _rotate_rows(x_ptr, o_ptr, n64, h64, stride_xn, stride_xh, stride_on, stride_oh, nmask, cos, sin,
                 partner, D: tl.constexpr, HP: tl.constexpr, BLOCK_N: tl.constexpr, INTERLEAVED: tl.constexpr,
                 ALIGN: tl.constexpr):
    """Rotate head h64 of the BLOCK_N tokens n64: one contiguous (BLOCK_N, 2*HP) tile
    loaded with 16-byte vectors. Interleaved: split in registers into the pairs' members.
    Rotate-half: each element's partner fetched by tl.gather (warp shuffles, or shared
    memory). ALIGN: the host checked that every token and head stride is a multiple of it;
    a launch marks only strides divisible by 16, so without the hint a head dim of 72 (rows
    144 B apart) would get 2- or 4-byte accesses. (The hint is set on offsets computed
    here: on a helper's argument it would be dropped.)"""
    row_x = n64 * stride_xn + h64 * stride_xh
    row_o = n64 * stride_on + h64 * stride_oh
    if ALIGN > 1:
        row_x = tl.multiple_of(row_x, ALIGN)
        row_o = tl.multiple_of(row_o, ALIGN)
    row_x = row_x[:, None]
    row_o = row_o[:, None]
    e = tl.arange(0, 2 * HP)[None, :]
    mask = nmask[:, None] & (e < D)
    x = tl.load(x_ptr + row_x + e, mask=mask, other=0.0).to(tl.float32)
    if INTERLEAVED:
        x0, x1 = tl.split(tl.reshape(x, [BLOCK_N, HP, 2]))
        y = tl.reshape(tl.join(x0 * cos - x1 * sin, x1 * cos + x0 * sin), [BLOCK_N, 2 * HP])
    else:
        y = x * cos + tl.gather(x, tl.broadcast_to(partner[None, :], (BLOCK_N, 2 * HP)), axis=1) * sin
    tl.store(o_ptr + row_o + e, y.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_3d_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr,
    N, HQ, HK,
    stride_qn, stride_qh, stride_kn, stride_kh,
    stride_qon, stride_qoh, stride_kon, stride_koh,
    freq_ptr,
    DT: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    HP: tl.constexpr, BLOCK_N: tl.constexpr, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
    ALIGN: tl.constexpr = 1,
):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    num_g = tl.num_programs(1)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    n64 = offs_n.to(tl.int64)
    cos, sin, partner = _tables(pos_ptr, n64, nmask, freq_ptr, DT, DH, DW, HP, INTERLEAVED, INVERSE)
    for hh in range(loop_bound(pid_h), loop_bound(HQ + HK), loop_bound(num_g)):
        if hh < HQ:
            _rotate_rows(q_ptr, qo_ptr, n64, tl.cast(hh, tl.int64), stride_qn, stride_qh, stride_qon, stride_qoh,
                         nmask, cos, sin, partner, DT + DH + DW, HP, BLOCK_N, INTERLEAVED, ALIGN)
        else:
            _rotate_rows(k_ptr, ko_ptr, n64, tl.cast(hh - HQ, tl.int64), stride_kn, stride_kh, stride_kon,
                         stride_koh, nmask, cos, sin, partner, DT + DH + DW, HP, BLOCK_N, INTERLEAVED, ALIGN)


_TILE_ELEMENTS = 4096  # 16 elements per thread at 8 warps: two 16-byte vectors of bf16
_NUM_WARPS = 8
# Four programs (32 warps) per SM need at most 65536 / (4 * 256) = 64 registers a thread.
# The tiles fit in 56-64 under every Triton tried, but left to itself ptxas varies: CUDA
# 12.9's (Triton 3.8) takes 80 for rotate-half (three programs per SM), CUDA 13.4's
# (Triton 3.9) stops at 64 and spills 16-24 B for interleaved; with the cap all compile
# to 59-64 registers, spill-free (benchmarks/static_report.py).
_MAX_REGISTERS = 64


def _meta(n: int, dims, heads: int, interleaved: bool, device: torch.device) -> tuple[dict, tuple]:
    """Constexprs (HP, BLOCK_N) and the grid (blocks, head groups) for N tokens."""
    hp = next_pow2(max(sum(dims) // 2, 1))
    d_padded = 2 * hp
    # rotate-half holds cos and the signed sin per element (not per pair): half the tile
    # keeps it at ~60 registers (32 tokens: 112)
    tile = _TILE_ELEMENTS if interleaved else _TILE_ELEMENTS // 2
    fit = 1 << max(0, (tile // d_padded).bit_length() - 1)  # a power of two
    block_n = max(1, min(64, fit, next_pow2(max(n, 1))))
    blocks = cdiv(n, block_n)
    if device.type == "cuda":
        # ~10 waves of resident programs (4 per SM at ~60 registers x 8 warps): a program
        # loops over its heads, so few long programs would leave the last wave half empty
        target = 32 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # interpreter: few programs are fastest; 2 still exercises the head split
        target = 2
    groups = max(1, min(heads, cdiv(target, blocks)))
    meta = {"HP": hp, "BLOCK_N": block_n}
    return meta, (blocks, groups)


@functools.lru_cache(maxsize=256)
def _frequency_values(dims: tuple, theta: float) -> tuple:
    return tuple(rope_frequencies(dims, theta).float().tolist())


def _frequencies(dims: tuple, theta: float, device: torch.device) -> torch.Tensor:
    """The D/2 float32 frequencies on `device` (cached by content and stream: pack.device_table)."""
    return device_table(_frequency_values(dims, theta), device, torch.float32)


def _launch(q, k, qo, ko, positions, dims, theta, interleaved, inverse):
    n, hq, d = q.shape
    hk = k.shape[1]
    if n == 0 or hq + hk == 0 or d == 0:
        return
    dt, dh, dw = (int(x) for x in dims)
    meta, grid = _meta(n, (dt, dh, dw), hq + hk, bool(interleaved), q.device)
    # every row offset a multiple of ALIGN elements (at most a 16-byte vector's)
    align = pow2_dividing([s for t in (q, k, qo, ko) for s in t.stride()[:2]], 16 // q.element_size())
    _rope_3d_kernel[grid](
        q, k, qo, ko, positions,
        n, hq, hk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
        _frequencies((dt, dh, dw), float(theta), q.device),
        DT=dt, DH=dh, DW=dw, **meta,
        INTERLEAVED=bool(interleaved), INVERSE=bool(inverse), ALIGN=align,
        num_warps=_NUM_WARPS, maxnreg=_MAX_REGISTERS, **COMPILE_OPTIONS,
    )


def _last_dim_contiguous(x: torch.Tensor) -> bool:
    return x.shape[-1] <= 1 or x.stride(-1) == 1


def _positions(positions: torch.Tensor) -> torch.Tensor:
    return positions.to(torch.float32).contiguous()


@on_tensors_device
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


@on_tensors_device
def rope_3d_(q, k, positions, dims, theta, interleaved, inverse):
    """Rotate q and k in place. The kernel reads and writes whole contiguous head rows; a q
    or k whose head_dim is strided (a heads-last projection's view) is rotated out of
    place and copied back (the reference and cuda backends take such views as they are)."""
    if not (_last_dim_contiguous(q) and _last_dim_contiguous(k)):
        q_rot, k_rot = rope_3d(q, k, positions, dims, theta, interleaved, inverse)
        q.copy_(q_rot)
        k.copy_(k_rot)
        return
    _launch(q, k, q, k, _positions(positions), dims, theta, interleaved, inverse)


def aot_specs() -> list[dict]:
    """Launch configurations for benchmarks/static_report.py (sm_90a, no GPU needed)."""
    specs = []
    # (dtype, dims, interleaved, ALIGN); every layout loads and stores whole rows: 16-byte
    # accesses. Head dim 72 (24 heads): strides of 72 and 1728 elements, which a launch does
    # not mark divisible by 16, so only the ALIGN hint (8 elements) gives 16-byte vectors
    for dtype, dims, interleaved, align in (("bf16", (44, 42, 42), True, 8), ("bf16", (16, 56, 56), True, 8),
                                            ("bf16", (44, 42, 42), False, 8), ("fp16", (24, 24, 24), True, 8),
                                            ("bf16", (24, 24, 24), False, 8), ("fp32", (32, 32, 32), False, 4)):
        sig = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "qo_ptr", "ko_ptr")}
        sig.update({"pos_ptr": "*fp32", "N": "i32", "HQ": "i32", "HK": "i32"})
        sig.update({s: "i64" for s in ("stride_qn", "stride_qh", "stride_kn", "stride_kh",
                                       "stride_qon", "stride_qoh", "stride_kon", "stride_koh")})
        sig["freq_ptr"] = "*fp32"
        meta, _ = _meta(1 << 20, dims, 48, interleaved, torch.device("cpu"))
        constexprs = {"DT": dims[0], "DH": dims[1], "DW": dims[2], **meta,
                      "INTERLEAVED": interleaved, "INVERSE": False, "ALIGN": align}
        sig.update({name: "constexpr" for name in constexprs})
        d = sum(dims)
        specs.append({"name": f"rope_3d {dtype} dims={dims} {'interleaved' if interleaved else 'half'}",
                      "fn": _rope_3d_kernel, "signature": sig, "constexprs": constexprs,
                      "num_warps": _NUM_WARPS, "maxnreg": _MAX_REGISTERS, "min_access_bytes": 16,
                      "unaligned_args": () if d % 16 == 0 else tuple(
                          s for s in sig if s.startswith("stride"))})
    return specs
