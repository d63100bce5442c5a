# Triton patchify / unpatchify for a whole VideoPack, one launch per direction.
#
# patchify gathers B videos (C, T_i, H_i, W_i) -- separate tensors with their own
# strides, never concatenated or made contiguous -- into packed tokens
# (N, C*pt*ph*pw): rows are video 0's tokens then video 1's ..., raster order over
# the token grid (t, h, w), features in (c, pt, ph, pw) order. unpatchify is the exact
# inverse, scattering into freshly allocated videos. Both are pure copies (exact in
# every dtype).
#
# Grid: (total token blocks, cdiv(F, BLOCK_F)), F = C*pt*ph*pw. Token blocks never
# cross a video: video i owns cdiv(seqlen_i, BLOCK_T) consecutive blocks, and a program
# finds its video by a scalar binary search (LOG_B = ceil(log2 B) loads) over the B+1
# per-video block offsets. Everything about the video (data pointer, 4 strides, first
# token, token grid) is then a scalar, so an element's address is
# token_offset[:, None] + feature_offset[None, :] (two 1-D int64 vectors, one add per
# element). A program copies a BLOCK_T x BLOCK_F tile of the packed token matrix.
# Tile: BLOCK_F = the feature count padded to a power of two, at most 128 (wider rows
# go to more programs on grid axis 1); BLOCK_T = 1024 / BLOCK_F (at least 8): ~1024
# elements, 8 per thread with 4 warps. The 2048-element tile and a per-token search
# (tokens of several videos in one tile, per-element strides) spilled on sm_90
# (255 registers + stack); this shape compiles to ~100 registers with no stack.
# Packs of tiny videos pay a partial block per video (masked). All offsets are int64.
#
# Line kernels (_patchify_lines_kernel / _unpatchify_lines_kernel: the path taken when pw
# is a power of two and the token rows are contiguous): the gather above reads each
# token's features across channels, a poorly coalesced access on the video side (a warp
# touches 16 channel planes). A line program instead owns BLOCK_W consecutive tokens of
# one token row (gt, gh): it reads the (C*pt*ph, BLOCK_W*pw) block of video rows they
# cover, whole rows along w (16-byte vectors where the host proves the alignment:
# _line_align), transposes it in the chip (reshape (rows, BLOCK_W, pw) -> permute ->
# (BLOCK_W, rows*pw)) and writes BLOCK_W whole tokens, contiguous in the output; unpatchify
# the reverse. Grid (sum over videos of gt * gh * cdiv(gw, BLOCK_W),); ~4096 elements a
# program (8 warps, capped at 32 registers where that does not spill: 8 programs an SM); a
# partial last line masks along w. A program of a pack of up to _FEW videos finds its
# video by compares of the offsets, loaded at once, instead of the search (_line_video).
#
# The host side builds ONE int64 table from Python ints (shapes, strides, data_ptr());
# pack.device_table caches it by content (the same videos again copy nothing) and copies a
# new one from pinned memory without a stream sync, capturable in a CUDA graph.
#
# Fused GEMMs (patch embedding, the DiT output layer, and their backwards) reuse the same
# table and the same per-block video lookup (_find_video / _token_offsets /
# _feature_offsets), with the token block as the GEMM's M tile (BLOCK_M tokens of one
# video), so the patchified matrix A (N, F) is never materialized:
#   _gather_gemm_kernel:  out[N, NOUT] = A @ Bmat[F, NOUT] (+ bias). The A tile
#     (BLOCK_M x BLOCK_K) is loaded straight from the video (the patchify address
#     math), Bmat is dense. patch_embed: Bmat = W.flatten(1).T (NOUT = hidden);
#     linear_unpatchify's grad_x: A = patchify(grad videos), Bmat = W (F, hidden).
#   _embed_kernel: the same product when F <= 128 (C=16, patch 1x2x2: F = 64, the usual
#     case): K is one tile, so A is gathered once per token block and kept on chip while
#     the program walks a run of output column blocks (grid (token blocks, column runs),
#     ~4 programs per SM), instead of re-gathering A for every (token, column) tile. The
#     product is bound by writing the (N, hidden) output; with TMA_STORE (the "fused-tma"
#     forward, sm_90+) a whole token block writes it by TMA bulk copies (Triton keeps one
#     in flight while the next tile is computed and waits only for its read of shared
#     memory: cp.async.bulk.wait_group.read before the buffer's reuse, sm_90a PTX), in
#     place of a shared-memory round trip with two barriers and 16-byte stores per thread.
#   _scatter_gemm_kernel: videos <- unpatchify(X[N, HID] @ Bmat[HID, F] (+ bias)): dense
#     loop over HID, the epilogue stores each token's F outputs into its (fresh,
#     contiguous) video (the unpatchify address math). linear_unpatchify: X = x,
#     Bmat = W.T; patch_embed's grad videos: X = grad, Bmat = W.flatten(1).
#   _wgrad_kernel: a weight gradient, a reduction over all tokens of the pack, always
#     as dense^T @ A, (hidden, F): patch_embed's grad^T @ patchify(videos), and
#     linear_unpatchify's x^T @ patchify(grad videos), the transpose of its (F, hidden)
#     gradient (gathering A transposed instead, as the left factor, took 4x the
#     instructions a step: per-element addresses along the tokens); each program owns a
#     BLOCK_P x BLOCK_Q output tile and loops over a range of token blocks (binary search
#     per block); grid axis 2 splits the token blocks (~2 programs per SM on a GPU) into
#     fp32 partials that PyTorch sums, with the bias gradient's (row sums of dense^T, or
#     column sums of A) from the tiles the product loads anyway.
# Grid (token blocks, cdiv(NOUT or F, BLOCK_N)) for the two token GEMMs. tl.dot with float32
# accumulation (input_precision="ieee" for float32 inputs: no tf32 rounding), output in
# the input dtype; hidden / F not multiples of the blocks are masked. GPU tiles
# (_GEMM_GPU, _SCATTER_GPU, _WGRAD_GPU) are the largest that compile to wgmma with no
# spills on sm_90a (benchmarks/static_report.py; 128x128x64 spilled); the interpreter
# (CPU tensors) uses 16/32 blocks. Limitation: the weight-gradient grid is small for
# small hidden sizes and the gathered K loop recomputes the feature decomposition per
# step (F = 64 is 2 steps); only _embed_kernel is autotuned (_EMBED_GPU, by FP). float64
# (gradcheck) has no tl.dot here: it runs the Triton patchify/unpatchify copies around
# PyTorch float64 GEMMs.
from __future__ import annotations

import math
import sys
from typing import Sequence

import torch
import triton
import triton.language as tl

from .. import backend as _backend
from ..pack import device_table
from . import (COMPILE_OPTIONS, TensorDescriptor, autotune_enabled, autotuned_choices, cdiv, launch_first_that_fits,
               loop_bound, measured_choice, next_pow2, on_tensors_device, pow2_dividing, timing, tuning_cache)

# float64 too, exactly: the copies are dtype-blind and its GEMMs run in PyTorch (above)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_META = 9  # int64 fields per video: ptr, strides c/t/h/w, first token, grid h/w/t


@triton.jit
def _find_video(cu_blocks_ptr, meta_ptr, pid_t, B, LOG_B: tl.constexpr, META: tl.constexpr):
    """Token block pid_t -> (its video's table row pointer, the block's index inside the video)."""
    # scalar binary search: the largest vid with cu_blocks[vid] <= pid_t (< cu_blocks[B])
    lo = pid_t * 0
    hi = lo + B
    for _ in tl.static_range(LOG_B):  # [lo, hi) halves, rounding up, each step
        mid = (lo + hi) // 2  # lo <= mid < hi <= B
        go = tl.load(cu_blocks_ptr + mid) <= pid_t
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    row = meta_ptr + lo.to(tl.int64) * META
    return row, pid_t - tl.load(cu_blocks_ptr + lo)


@triton.jit
def _video_fields(row):
    """A video's table row after its data pointer (_tables: _META int64 fields): strides
    c, t, h, w, its first packed token, its token grid h, w, t. (Fields a caller leaves
    unused are never loaded: the compiler drops the loads.)"""
    return (tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
            tl.load(row + 5), tl.load(row + 6), tl.load(row + 7), tl.load(row + 8))


@triton.jit
def _token_offsets(row, local_block, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    """Packed token indices, valid mask and element offset of each token's first element.
    The (t, h, w) of a token inside its video is found by 32-bit division (a video has
    fewer than 2^31 tokens: _tables refuses larger ones): 64-bit division is a
    software routine of tens of instructions and branches per token (the weight
    gradient's 128-token step, Triton 3.8: 1603 -> 1140 instructions; 3.6: 849 -> 790)."""
    _, s_t, s_h, s_w, tok_start, g_h, g_w, g_t = _video_fields(row)
    local = local_block.to(tl.int32) * BLOCK_T + tl.arange(0, BLOCK_T)
    gw32 = g_w.to(tl.int32)
    ghw32 = (g_h * g_w).to(tl.int32)
    valid = local < (g_t * g_h * g_w).to(tl.int32)
    gw = (local % gw32).to(tl.int64)
    gh = ((local % ghw32) // gw32).to(tl.int64)
    gt = (local // ghw32).to(tl.int64)
    return tok_start + local.to(tl.int64), valid, gt * (PT * s_t) + gh * (PH * s_h) + gw * (PW * s_w)


@triton.jit
def _feature_offsets(row, offs_f, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """Element offset of feature f = ((c * PT + it) * PH + ih) * PW + iw inside a patch."""
    s_c, s_t, s_h, s_w, _, _, _, _ = _video_fields(row)
    iw = offs_f % PW
    ih = (offs_f // PW) % PH
    it = (offs_f // (PW * PH)) % PT
    c = offs_f // (PW * PH * PT)
    return c * s_c + it * s_t + ih * s_h + iw * s_w


@triton.jit
def _block_offsets(cu_blocks_ptr, meta_ptr, pid_t, pid_f, B,
                   PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                   LOG_B: tl.constexpr, META: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    """This program's video row, packed token indices, valid-token count and element offsets."""
    row, local_block = _find_video(cu_blocks_ptr, meta_ptr, pid_t, B, LOG_B, META)
    tok, valid, tok_off = _token_offsets(row, local_block, PT, PH, PW, BLOCK_T)
    offs_f = pid_f.to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F).to(tl.int64)
    feat_off = _feature_offsets(row, offs_f, PT, PH, PW)
    return row, tok, valid, offs_f, tok_off[:, None] + feat_off[None, :]


@triton.jit
def _patchify_kernel(out_ptr, cu_blocks_ptr, meta_ptr,
                     stride_on, stride_of,
                     F, B,
                     PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                     LOG_B: tl.constexpr, META: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    row, tok, valid, offs_f, off = _block_offsets(
        cu_blocks_ptr, meta_ptr, tl.program_id(0), tl.program_id(1), B,
        PT, PH, PW, LOG_B, META, BLOCK_T, BLOCK_F)
    src = tl.load(row).to(tl.pointer_type(out_ptr.dtype.element_ty))
    mask = valid[:, None] & (offs_f < F)[None, :]
    x = tl.load(src + off, mask=mask)
    tl.store(out_ptr + tok[:, None] * stride_on + offs_f[None, :] * stride_of, x, mask=mask)


@triton.jit
def _unpatchify_kernel(tokens_ptr, cu_blocks_ptr, meta_ptr,
                       stride_tn, stride_tf,
                       F, B,
                       PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                       LOG_B: tl.constexpr, META: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    row, tok, valid, offs_f, off = _block_offsets(
        cu_blocks_ptr, meta_ptr, tl.program_id(0), tl.program_id(1), B,
        PT, PH, PW, LOG_B, META, BLOCK_T, BLOCK_F)
    dst = tl.load(row).to(tl.pointer_type(tokens_ptr.dtype.element_ty))
    mask = valid[:, None] & (offs_f < F)[None, :]
    x = tl.load(tokens_ptr + tok[:, None] * stride_tn + offs_f[None, :] * stride_tf, mask=mask)
    tl.store(dst + off, x, mask=mask)


@triton.jit
def _line_video(cu_blocks_ptr, meta_ptr, pid, B, LOG_B: tl.constexpr, META: tl.constexpr, NB: tl.constexpr):
    """Line-program pid -> its video's table fields (data pointer, strides c/t/h/w, first
    token, grid h/w) and the line's index inside the video. NB > 0 (a pack of NB <= _FEW
    videos): the NB - 1 program offsets past video 0's are loaded at once and the video
    picked by compares, so its row is read in the second memory round trip, where the
    binary search (NB = 0, _find_video) reads it in round LOG_B + 2 (the table comes from
    DRAM when the pack's data evicted it, and a single-wave launch of a few microseconds
    waits for it). (Loading every row at once, then selecting, took 50-54 registers a
    thread against 40: fewer programs resident on an SM.)"""
    if NB == 0:
        row, line = _find_video(cu_blocks_ptr, meta_ptr, pid, B, LOG_B, META)
    else:
        vid = pid * 0
        first = pid.to(tl.int64) * 0  # program offset of the video picked (video 0's: 0)
        for i in tl.static_range(1, NB):
            offset = tl.load(cu_blocks_ptr + i)
            here = offset <= pid  # offsets never decrease: the last video starting at or before pid
            vid = tl.where(here, i, vid)
            first = tl.where(here, offset, first)
        row = meta_ptr + vid.to(tl.int64) * META
        line = pid - first
    s_c, s_t, s_h, s_w, tok_start, g_h, g_w, _ = _video_fields(row)
    return tl.load(row), s_c, s_t, s_h, s_w, tok_start, g_h, g_w, line


@triton.jit
def _line_offsets(cu_blocks_ptr, meta_ptr, pid, B, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                  LOG_B: tl.constexpr, META: tl.constexpr, NB: tl.constexpr, BLOCK_W: tl.constexpr,
                  RP: tl.constexpr, ALIGN: tl.constexpr):
    """Line-program pid -> (video base address as int64, first packed token, valid tokens of
    the line from it, element offsets (RP, BLOCK_W*PW) of its patch rows in the video).
    A line is BLOCK_W consecutive tokens of one token row (gt, gh). ALIGN > 0: every
    video has unit w stride (checked on the host), so a row is BLOCK_W*PW contiguous
    elements."""
    base, s_c, s_t, s_h, s_w, tok_start, g_h, g_w, line = _line_video(cu_blocks_ptr, meta_ptr, pid, B, LOG_B,
                                                                       META, NB)
    w_blocks = (g_w + BLOCK_W - 1) // BLOCK_W
    gth = line // w_blocks  # token row gt * g_h + gh
    w0 = (line % w_blocks) * BLOCK_W
    gt = gth // g_h
    gh = gth % g_h
    # patch row r = (c, it, ih); x = position along w inside the line (w0 * PW + x)
    r = tl.arange(0, RP).to(tl.int64)
    ih = r % PH
    it = (r // PH) % PT
    c = r // (PH * PT)
    x = tl.arange(0, BLOCK_W * PW).to(tl.int64)
    off_r = c * s_c + (gt * PT + it) * s_t + (gh * PH + ih) * s_h
    if ALIGN > 0:
        off = off_r[:, None] + (w0 * PW + x)[None, :]
    else:
        off = off_r[:, None] + (w0 * PW + x)[None, :] * s_w
    n_valid = tl.minimum(g_w - w0, BLOCK_W)
    return base, tok_start + gth * g_w + w0, n_valid, off


@triton.jit
def _video_ptrs(base, off, dtype, BLOCK_W: tl.constexpr, PW: tl.constexpr, ALIGN: tl.constexpr):
    """Pointers of a line's video tile. ALIGN > 0 (bytes): the host checked that every row
    of the tile starts ALIGN-aligned and runs BLOCK_W*PW contiguous elements; the pointers
    come from a table, so the compiler cannot see it without these hints (scalar accesses).
    The hints say exactly that: along w, runs of BLOCK_W*PW whose first address is a
    multiple of ALIGN; nothing along the rows."""
    ptrs = base.to(tl.pointer_type(dtype)) + off
    if ALIGN > 0:
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [1, ALIGN]), [1, BLOCK_W * PW])
    return ptrs


@triton.jit
def _patchify_lines_kernel(out_ptr, cu_blocks_ptr, meta_ptr, stride_on, F, R, B,
                           PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                           LOG_B: tl.constexpr, META: tl.constexpr, NB: tl.constexpr, BLOCK_W: tl.constexpr, RP: tl.constexpr,
                           ALIGN: tl.constexpr):
    base, tok0, n_valid, off = _line_offsets(cu_blocks_ptr, meta_ptr, tl.program_id(0), B, PT, PH, PW,
                                             LOG_B, META, NB, BLOCK_W, RP, ALIGN)
    src = _video_ptrs(base, off, out_ptr.dtype.element_ty, BLOCK_W, PW, ALIGN)
    rmask = tl.arange(0, RP) < R
    # read whole video rows (coalesced along w), transpose in the chip, write whole tokens;
    # a whole line masks rows only, which keeps the mask constant along w (vector loads)
    if n_valid == BLOCK_W:
        x = tl.load(src, mask=rmask[:, None])                                  # (RP, BLOCK_W*PW)
    else:
        xmask = tl.arange(0, BLOCK_W * PW) < n_valid * PW
        x = tl.load(src, mask=rmask[:, None] & xmask[None, :])
    x = tl.reshape(tl.permute(tl.reshape(x, [RP, BLOCK_W, PW]), (1, 0, 2)), [BLOCK_W, RP * PW])
    j = tl.arange(0, BLOCK_W)
    f = tl.arange(0, RP * PW)
    rows = (tok0 + j).to(tl.int64)[:, None] * stride_on
    tl.store(out_ptr + rows + f[None, :], x, mask=(j < n_valid)[:, None] & (f < F)[None, :])


@triton.jit
def _unpatchify_lines_kernel(tokens_ptr, cu_blocks_ptr, meta_ptr, stride_tn, F, R, B,
                             PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                             LOG_B: tl.constexpr, META: tl.constexpr, NB: tl.constexpr, BLOCK_W: tl.constexpr,
                             RP: tl.constexpr, ALIGN: tl.constexpr):
    base, tok0, n_valid, off = _line_offsets(cu_blocks_ptr, meta_ptr, tl.program_id(0), B, PT, PH, PW,
                                             LOG_B, META, NB, BLOCK_W, RP, ALIGN)
    dst = _video_ptrs(base, off, tokens_ptr.dtype.element_ty, BLOCK_W, PW, ALIGN)
    j = tl.arange(0, BLOCK_W)
    f = tl.arange(0, RP * PW)
    rows = (tok0 + j).to(tl.int64)[:, None] * stride_tn
    y = tl.load(tokens_ptr + rows + f[None, :], mask=(j < n_valid)[:, None] & (f < F)[None, :])
    y = tl.reshape(tl.permute(tl.reshape(y, [BLOCK_W, RP, PW]), (1, 0, 2)), [RP, BLOCK_W * PW])
    rmask = tl.arange(0, RP) < R
    if n_valid == BLOCK_W:
        tl.store(dst, y, mask=rmask[:, None])
    else:
        xmask = tl.arange(0, BLOCK_W * PW) < n_valid * PW
        tl.store(dst, y, mask=rmask[:, None] & xmask[None, :])


def _num_tokens(videos, patch_size) -> int:
    """N: the tokens of a pack of (C, T, H, W) videos cut into patches of patch_size."""
    pt, ph, pw = patch_size
    return sum((v.shape[1] // pt) * (v.shape[2] // ph) * (v.shape[3] // pw) for v in videos)


def _tiles(features: int) -> tuple[int, int]:
    block_f = min(next_pow2(features), 128)
    return max(8, 1024 // block_f), block_f


def _tables(videos: Sequence[torch.Tensor], patch_size: Sequence[int], block_t: int, device,
            lines: bool = False):
    """One int64 device tensor: per-video program offsets (B+1), then B rows of _META
    fields. A program is a block of block_t tokens, or with lines=True a line of block_t
    tokens inside one token row (so a video has gt * gh * cdiv(gw, block_t) of them)."""
    pt, ph, pw = patch_size
    cu_blocks, rows, tok = [0], [], 0
    for i, v in enumerate(videos):
        _, t, h, w = v.shape
        gt, gh, gw = t // pt, h // ph, w // pw
        if not lines and gt * gh * gw >= 2**31:  # (_token_offsets divides in 32 bits; the lines in 64)
            raise _backend.BackendUnavailable(f"the Triton patch kernels index a video's tokens in 32 bits: video {i} "
                                              f"has {gt * gh * gw} tokens (at most 2^31 - 1); the cuda backend "
                                              "takes it")
        programs = gt * gh * cdiv(gw, block_t) if lines else cdiv(gt * gh * gw, block_t)
        cu_blocks.append(cu_blocks[-1] + programs)
        rows.extend([v.data_ptr(), *v.stride(), tok, gh, gw, gt])
        tok += gt * gh * gw
    return device_table(cu_blocks + rows, device), cu_blocks[-1]


_LINE_TILE = 4096  # elements of a line program's tile: 16 per thread at 8 warps
# packs of up to _FEW videos: the line kernels find a program's video by compares of
# offsets loaded at once (_line_video; a kernel variant per count), larger ones search
_FEW = 4
# a register cap on the line kernels: uncapped, ptxas gives them 40 registers a thread for
# 16 channels at patch 1x2x2, so 6 programs of 8 warps fit an SM; capped at 32 (no spill
# there, sm_90a: the static report) 8 do, the most 64 warps allow. The mixed pack
# makes 915 line programs: 792 fit an H100 at once uncapped (a second wave of 123), all 1056
# capped. Other shapes spill under the cap (16-100 bytes a thread at some row counts and
# patch widths, in a static sweep): a configuration whose capped build spilled (the compiled
# kernel's n_spills, known after its first launch) is launched uncapped from then on.
_LINE_MAXNREG = 32
_LINE_CAP_SPILLED: set = set()


def _line_tiles(videos, patch_size, features: int):
    """(BLOCK_W, RP) of the line kernels, or None where they do not apply: pw must be a
    power of two (the tile is reshaped to (rows, BLOCK_W, pw)), a patch row not huge, and
    the programs, one per line of BLOCK_W tokens, few enough for a grid's x (2^31 - 1:
    rows one token wide make a program per token)."""
    pt, ph, pw = patch_size
    rows = features // pw
    if pw & (pw - 1) or rows > 2048:
        return None
    rp = next_pow2(rows)
    widest = max(v.shape[3] // pw for v in videos)
    block_w = max(1, min(_LINE_TILE // (rp * pw), next_pow2(max(widest, 1))))
    programs = sum((v.shape[1] // pt) * (v.shape[2] // ph) * cdiv(v.shape[3] // pw, block_w) for v in videos)
    return (block_w, rp) if programs < 2**31 else None


def _line_align(videos, line_elements: int) -> int:
    """ALIGN of the line kernels, in bytes (at most 16): what every row of a line tile
    starts aligned to, given unit w strides (else 0: the generic strided path). A row
    starts at data_ptr + (c*s_c + t*s_t + h*s_h + w0*pw) elements, w0*pw a multiple of
    line_elements."""
    elt = videos[0].element_size()
    if any(v.stride(3) != 1 and v.shape[3] > 1 for v in videos):
        return 0
    align = pow2_dividing([line_elements * elt] + [x for v in videos
                                                   for x in (v.data_ptr(), *(s * elt for s in v.stride()[:3]))], 16)
    return align if align > elt else 0  # one element per access: no hint needed


def _launch(kernel, packed, videos, patch_size):
    pt, ph, pw = (int(p) for p in patch_size)
    b, f = len(videos), packed.shape[1]
    if packed.shape[0] == 0 or f == 0:
        return
    log_b = _log_b(b)
    line = _line_tiles(videos, (pt, ph, pw), f) if packed.stride(1) == 1 else None
    if line is not None:
        block_w, rp = line
        table, programs = _tables(videos, (pt, ph, pw), block_w, packed.device, lines=True)
        lines_kernel = _patchify_lines_kernel if kernel is _patchify_kernel else _unpatchify_lines_kernel
        nb, align = (b if b <= _FEW else 0), _line_align(videos, block_w * pw)
        config = (lines_kernel, packed.dtype, pt, ph, pw, block_w, rp, align, nb)
        cap = {} if config in _LINE_CAP_SPILLED else {"maxnreg": _LINE_MAXNREG}
        compiled = lines_kernel[(programs,)](packed, table, table[b + 1:], packed.stride(0), f, f // pw, b,
                                             PT=pt, PH=ph, PW=pw, LOG_B=log_b, META=_META, NB=nb, BLOCK_W=block_w,
                                             RP=rp, ALIGN=align, num_warps=8, **cap, **COMPILE_OPTIONS)
        if cap and getattr(compiled, "n_spills", 0):  # (the interpreter returns nothing)
            _LINE_CAP_SPILLED.add(config)
        return
    block_t, block_f = _tiles(f)
    table, blocks = _tables(videos, (pt, ph, pw), block_t, packed.device)
    grid = (blocks, cdiv(f, block_f))
    kernel[grid](packed, table, table[b + 1:], packed.stride(0), packed.stride(1), f, b,
                 PT=pt, PH=ph, PW=pw, LOG_B=log_b, META=_META,
                 BLOCK_T=block_t, BLOCK_F=block_f, num_warps=4, **COMPILE_OPTIONS)


@on_tensors_device
def patchify(videos, patch_size):
    """List of (C, T, H, W) videos (any strides) -> new (N, C*pt*ph*pw) tokens, one launch."""
    videos = list(videos)
    pt, ph, pw = (int(p) for p in patch_size)
    c = videos[0].shape[0]
    n = _num_tokens(videos, (pt, ph, pw))
    out = torch.empty(n, c * pt * ph * pw, dtype=videos[0].dtype, device=videos[0].device)
    _launch(_patchify_kernel, out, videos, (pt, ph, pw))
    return out


@on_tensors_device
def unpatchify(tokens, shapes, patch_size, channels):
    """(N, C*pt*ph*pw) tokens -> list of new contiguous (C, T, H, W) videos, one launch."""
    outs = [torch.empty(channels, *shapes[i:i + 3], dtype=tokens.dtype, device=tokens.device)
            for i in range(0, len(shapes), 3)]
    _launch(_unpatchify_kernel, tokens, outs, patch_size)
    return outs


# -- fused GEMMs: patch embedding and the output layer --------------------------------

@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # float32 inputs: exact fp32 products, not tf32
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _gather_gemm_kernel(out_ptr, b_ptr, bias_ptr, cu_blocks_ptr, meta_ptr,
                        stride_om, stride_on, stride_bk, stride_bn,
                        NOUT, F, B,
                        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                        PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                        LOG_B: tl.constexpr, META: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[N, NOUT] = patchify(videos)[N, F] @ b[F, NOUT] (+ bias), A gathered from the videos."""
    row, local_block = _find_video(cu_blocks_ptr, meta_ptr, tl.program_id(0), B, LOG_B, META)
    tok, valid, tok_off = _token_offsets(row, local_block, PT, PH, PW, BLOCK_M)
    src = tl.load(row).to(tl.pointer_type(out_ptr.dtype.element_ty))
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_ok = offs_n < NOUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, loop_bound(F), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = offs_k < F
        feat_off = _feature_offsets(row, offs_k, PT, PH, PW)
        a = tl.load(src + tok_off[:, None] + feat_off[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + tok[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _embed_kernel(out_ptr, out_desc, b_ptr, bias_ptr, cu_blocks_ptr, meta_ptr,
                  stride_om, stride_on, stride_bk, stride_bn,
                  NOUT, F, B, N_PER_PROGRAM,
                  HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                  PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                  LOG_B: tl.constexpr, META: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP: tl.constexpr,
                  TMA_STORE: tl.constexpr = False):
    """The same product for a small F (<= FP, one K tile): A is gathered once per token
    block and stays on chip while the program walks its N_PER_PROGRAM output columns in
    BLOCK_N steps (b tiles prefetched by the pipeline). The output write (N x NOUT) is
    the bulk of the traffic; the gather is done once, not once per output column block.
    TMA_STORE: a whole token block (all of a video's blocks but a partial last one) writes each
    (BLOCK_M, BLOCK_N) tile through out_desc (a TMA descriptor of out, box (BLOCK_M,
    BLOCK_N)): one bulk copy from shared memory, issued by one thread and left in flight
    while the next tile is computed, in place of the pointer path's shared-memory round
    trip, barriers and per-thread 16-byte stores. A partial block (its rows past the
    video's end belong to the next video) stores through pointers, masked."""
    row, local_block = _find_video(cu_blocks_ptr, meta_ptr, tl.program_id(0), B, LOG_B, META)
    tok, valid, tok_off = _token_offsets(row, local_block, PT, PH, PW, BLOCK_M)
    src = tl.load(row).to(tl.pointer_type(out_ptr.dtype.element_ty))
    offs_k = tl.arange(0, FP).to(tl.int64)
    k_ok = offs_k < F
    a = tl.load(src + tok_off[:, None] + _feature_offsets(row, offs_k, PT, PH, PW)[None, :],
                mask=valid[:, None] & k_ok[None, :], other=0.0)
    n_start = tl.program_id(1) * N_PER_PROGRAM
    n_end = tl.minimum(n_start + N_PER_PROGRAM, NOUT)
    if TMA_STORE:
        if (local_block + 1) * BLOCK_M <= _video_tokens(row):
            first_row = tl.load(row + 5).to(tl.int32) + local_block.to(tl.int32) * BLOCK_M
            for n0 in range(loop_bound(n_start), loop_bound(n_end), BLOCK_N):
                acc = _embed_tile(a, b_ptr, bias_ptr, offs_k, k_ok, n0, n_end, stride_bk, stride_bn,
                                  HAS_BIAS, IEEE, BLOCK_M, BLOCK_N)
                # columns past NOUT are clipped by the descriptor's shape; a program's run
                # of columns ends at a whole multiple of BLOCK_N or at NOUT
                out_desc.store([first_row, n0], acc.to(out_ptr.dtype.element_ty))
        else:
            _embed_store_pointers(a, out_ptr, b_ptr, bias_ptr, tok, valid, offs_k, k_ok, n_start, n_end,
                                  stride_om, stride_on, stride_bk, stride_bn, HAS_BIAS, IEEE, BLOCK_M, BLOCK_N)
    else:
        _embed_store_pointers(a, out_ptr, b_ptr, bias_ptr, tok, valid, offs_k, k_ok, n_start, n_end,
                              stride_om, stride_on, stride_bk, stride_bn, HAS_BIAS, IEEE, BLOCK_M, BLOCK_N)


@triton.jit
def _video_tokens(row):
    """A video's token count, gt * gh * gw (32-bit: _tables refuses larger videos)."""
    return (tl.load(row + 8) * tl.load(row + 6) * tl.load(row + 7)).to(tl.int32)


@triton.jit
def _embed_tile(a, b_ptr, bias_ptr, offs_k, k_ok, n0, n_end, stride_bk, stride_bn,
                HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """_embed_kernel's (BLOCK_M, BLOCK_N) float32 tile of columns n0.. (< n_end) (+ bias)."""
    offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
    n_ok = offs_n < n_end
    b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    acc = _dot(a, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _embed_store_pointers(a, out_ptr, b_ptr, bias_ptr, tok, valid, offs_k, k_ok, n_start, n_end,
                          stride_om, stride_on, stride_bk, stride_bn,
                          HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """_embed_kernel's column run stored through pointers, masked to the valid tokens."""
    rows = tok[:, None] * stride_om
    for n0 in range(loop_bound(n_start), loop_bound(n_end), BLOCK_N):
        acc = _embed_tile(a, b_ptr, bias_ptr, offs_k, k_ok, n0, n_end, stride_bk, stride_bn,
                          HAS_BIAS, IEEE, BLOCK_M, BLOCK_N)
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        tl.store(out_ptr + rows + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & (offs_n < n_end)[None, :])


@triton.jit
def _scatter_gemm_kernel(x_ptr, b_ptr, bias_ptr, cu_blocks_ptr, meta_ptr,
                         stride_xm, stride_xk, stride_bk, stride_bn,
                         HID, F, B,
                         HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                         PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                         LOG_B: tl.constexpr, META: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """videos <- unpatchify(x[N, HID] @ b[HID, F] (+ bias)), scattered from the epilogue."""
    row, local_block = _find_video(cu_blocks_ptr, meta_ptr, tl.program_id(0), B, LOG_B, META)
    tok, valid, tok_off = _token_offsets(row, local_block, PT, PH, PW, BLOCK_M)
    dst = tl.load(row).to(tl.pointer_type(x_ptr.dtype.element_ty))
    offs_f = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    f_ok = offs_f < F
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_f[None, :] * stride_bn
    for k0 in range(0, loop_bound(HID), BLOCK_K):  # dense operands: pointers advance, the standard GEMM loop
        k_ok = offs_k < HID - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & f_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, IEEE)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
    feat_off = _feature_offsets(row, offs_f, PT, PH, PW)
    tl.store(dst + tok_off[:, None] + feat_off[None, :], acc.to(x_ptr.dtype.element_ty),
             mask=valid[:, None] & f_ok[None, :])


@triton.jit
def _wgrad_kernel(out_ptr, bias_out_ptr, dense_ptr, cu_blocks_ptr, meta_ptr,
                  stride_dn, stride_dh, stride_os, stride_op, stride_oq, stride_bs,
                  HID, F, B, BLOCKS, BLOCKS_PER_SPLIT,
                  BIAS: tl.constexpr, IEEE: tl.constexpr,
                  PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                  LOG_B: tl.constexpr, META: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Split s of a weight gradient, a reduction over the pack's tokens (fp32 partials):
    out[s, HID, F] = dense^T @ patchify(videos). BIAS: 0 none; 1 bias_out[s, HID] = the
    row sums of dense^T (patch_embed's bias gradient), stored by the programs of the
    first F column block; 2 bias_out[s, F] = the column sums of patchify(videos)
    (linear_unpatchify's), stored by those of the first HID row block. The sums are
    products with a tile of ones on the tensor cores, whose equal columns (rows) are
    averaged at the end: summed on the FMA pipe they were ~130 FADDs and shuffles a step,
    a fifth of this issue-bound loop (the static report's: 790 -> 611 instructions, Triton
    3.6)."""
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    offs_q = tl.program_id(1).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    split = tl.program_id(2)
    p_ok = offs_p < HID
    q_ok = offs_q < F
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    rows_here = BIAS == 1 and tl.program_id(1) == 0
    cols_here = BIAS == 2 and tl.program_id(0) == 0
    bias_mm = tl.zeros((BLOCK_P, 16), dtype=tl.float32)
    bias_mm_cols = tl.zeros((64, BLOCK_Q), dtype=tl.float32)
    first = split * BLOCKS_PER_SPLIT
    last = tl.minimum(first + BLOCKS_PER_SPLIT, BLOCKS)
    for blk in range(loop_bound(first), loop_bound(last)):
        row, local_block = _find_video(cu_blocks_ptr, meta_ptr, blk, B, LOG_B, META)
        tok, valid, tok_off = _token_offsets(row, local_block, PT, PH, PW, BLOCK_T)
        src = tl.load(row).to(tl.pointer_type(dense_ptr.dtype.element_ty))
        feat_off = _feature_offsets(row, offs_q, PT, PH, PW)
        lt = tl.load(dense_ptr + offs_p[:, None] * stride_dh + tok[None, :] * stride_dn,
                     mask=p_ok[:, None] & valid[None, :], other=0.0)
        rt = tl.load(src + tok_off[:, None] + feat_off[None, :],
                     mask=valid[:, None] & q_ok[None, :], other=0.0)
        acc = _dot(lt, rt, acc, IEEE)
        if rows_here:
            bias_mm = _dot(lt, tl.full((BLOCK_T, 16), 1.0, lt.dtype), bias_mm, IEEE)
        if cols_here:
            bias_mm_cols = _dot(tl.full((64, BLOCK_T), 1.0, rt.dtype), rt, bias_mm_cols, IEEE)
    tl.store(out_ptr + split * stride_os + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq,
             acc, mask=p_ok[:, None] & q_ok[None, :])
    # (each column scaled before the sum: summed first, a gradient past float32's max / 16
    # overflowed to inf; the scaling is exact, a power of two)
    if rows_here:
        bias_rows = tl.sum(bias_mm * (1.0 / 16), axis=1)
        tl.store(bias_out_ptr + split * stride_bs + offs_p, bias_rows, mask=p_ok)
    if cols_here:
        bias_cols = tl.sum(bias_mm_cols * (1.0 / 64), axis=0)
        tl.store(bias_out_ptr + split * stride_bs + offs_q, bias_cols, mask=q_ok)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for the two token GEMMs and (BLOCK_T, BLOCK_P,
# BLOCK_Q, num_warps, num_stages) for the weight gradient: on a GPU; the interpreter gets
# small blocks
_GEMM_GPU = (128, 128, 32, 8)
_SCATTER_GPU = (64, 64, 64, 8)
# weight gradient: 128-token steps (16 HGMMA, 8 of them the bias sums, in 611 instructions a
# step under Triton 3.6, 955 under 3.8; 32-token steps took 517 and 1287 for 2 HGMMA: the
# static report's loop column)
_WGRAD_GPU = (128, 128, 64, 8, 2)
# float32 gather GEMM (patch_embed at every F): _GEMM_GPU spills 48 B under Triton 3.8
_GEMM_GPU_FP32 = (64, 128, 32, 8)
# float32 (IEEE products, no tensor cores): the largest tile that compiles spill-free for
# every bias variant under Triton 3.6 and 3.8 (_WGRAD_GPU spills 7-30 KB there)
_WGRAD_GPU_FP32 = (32, 64, 64, 8, 2)
_SMALL = (16, 32, 32, 4)
# _embed_kernel (F <= _EMBED_MAX_F: A kept on chip): BLOCK_M = 128 token rows and the
# (BLOCK_N, warps, stages) candidates autotuned on a GPU (VDIT_AUTOTUNE=0: the first), by
# the padded feature count FP: two warpgroups with 128-column steps (136 registers under
# Triton 3.6, 96 KB at FP = 64: one program per SM), or 64-column steps, with one
# warpgroup at FP <= 64 (126-128 registers, 48 KB: four programs, 16 warps per SM, twice
# the stores in flight) and two at FP = 128 (one spills 4.8 KB there under Triton 3.8).
# The interpreter: (BLOCK_M, BLOCK_N, warps, stages) = _EMBED_SMALL.
_EMBED_MAX_F = 128
_EMBED_BLOCK_M = 128
_EMBED_GPU = {64: [(128, 8, 3), (64, 4, 3)], 128: [(128, 8, 3), (64, 8, 3)]}
_EMBED_SMALL = (16, 32, 4, 1)
# A fixed launch (VDIT_AUTOTUNE=0, a CUDA graph capture) takes the first config of
# _embed_fixed_list the GPU has the shared memory for (bf16 at FP = 128: 131072 B in the
# first, over the 101376 B of sm_86 / sm_89 / sm_120; 98304 B in the next); the autotuner
# skips such configs itself. Every one is spill-free under Triton 3.6 and 3.8 (static
# report). float32 takes the K-looping gather GEMM instead: IEEE float32 products on
# these tiles spill 19-52 KB of registers (and need up to 208 KB of shared memory).
_EMBED_FALLBACK = [(128, 8, 2), (64, 8, 2), (32, 8, 2)]


def _embed_candidates(fp: int) -> list:
    return _EMBED_GPU[64 if fp <= 64 else 128]


def _embed_fixed_list(fp: int) -> list:
    cands = _embed_candidates(fp)
    return cands + [c for c in _EMBED_FALLBACK if c not in cands]


def _embed_prune(configs, named_args, **kwargs):
    """early_config_prune: the candidates of the call's FP (one autotuner holds them all)."""
    wanted = _embed_candidates({**named_args, **kwargs}["FP"])
    return [c for c in configs if (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]


# autotuned per (hidden, F) and dtype; the kernel overwrites its output, so the timing
# runs need no reset
def _embed_configs(pre_hook=None, **kwargs) -> list:
    return [triton.Config({"BLOCK_N": bn, **kwargs}, num_warps=w, num_stages=st, pre_hook=pre_hook)
            for bn, w, st in dict.fromkeys(c for cands in _EMBED_GPU.values() for c in cands)]


def _embed_out_box(nargs) -> None:
    """pre_hook of the TMA-store candidates: out_desc's box is the tile's (BLOCK_M, BLOCK_N)."""
    nargs["out_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_N"]]


_embed_tuned = triton.autotune(_embed_configs(), key=["NOUT", "F"],
                               prune_configs_by={"early_config_prune": _embed_prune})(_embed_kernel)
# the same candidates storing whole token blocks through TMA (the "fused-tma" variant)
_embed_tuned_tma = triton.autotune(_embed_configs(_embed_out_box, TMA_STORE=True), key=["NOUT", "F"],
                                   prune_configs_by={"early_config_prune": _embed_prune})(_embed_kernel)


# Patch embedding runs one of two variants, forward and backward each, with the same
# products (float32 accumulation, one rounding to the output dtype): "fused", the Triton
# GEMM that gathers A from the videos (forward) and the scatter GEMM plus the
# weight-gradient reduction (backward); or "gemm", our gather (patchify) and scatter
# (unpatchify) around PyTorch's GEMMs, in the backward two passes over grad (dX, and dW
# with the bias gradient as one more column of the same product). On an H100 (Triton 3.6,
# 41K tokens, hidden 3072, 2026-11-27) the fused backward took ~1.5 ms where PyTorch's
# permute + Linear took 0.54 ms in all: which wins depends on the GPU, the Triton release
# and the shapes, so "auto" (the default) times both on the first call per (hidden, F,
# dtype, GPU, bias, token class); VDIT_PATCH_EMBED_FWD / VDIT_PATCH_EMBED_BWD = fused |
# gemm force one. Without measurement (CPU, float32, autotuning off, a graph capture):
# fused. linear_unpatchify (the output layer) has the same two variants, the other way
# round (forward: PyTorch's addmm, then our scatter; backward: our gather, then dX, dW
# and the bias gradient as a column sum), keyed and forced alike
# (VDIT_LINEAR_UNPATCHIFY_FWD / VDIT_LINEAR_UNPATCHIFY_BWD).
EMBED_VARIANTS = ("fused", "gemm")
# patch_embed's forward has a third: "fused-tma", the fused kernel storing whole token
# blocks through a TMA descriptor (_embed_kernel's TMA_STORE; sm_90+, 16-byte aligned
# output rows: _tma_store_possible, else "fused" runs), not yet timed on a GPU, so "auto"
# measures it beside the others and nothing picks it unmeasured
EMBED_FWD_VARIANTS = EMBED_VARIANTS + ("fused-tma",)
_EMBED_FWD_CHOICE: dict = {}
_EMBED_BWD_CHOICE: dict = {}
_UNEMBED_FWD_CHOICE: dict = {}
_UNEMBED_BWD_CHOICE: dict = {}


def _embed_key(w: torch.Tensor, videos, patch_size, with_bias: bool) -> tuple:
    """The measured choice's key: (hidden, F, dtype, device, bias, token class: up to 4K,
    up to 64K, more tokens, 2^31 or more: _token_class)."""
    n = _num_tokens(videos, patch_size)
    return (*w.shape, videos[0].dtype, videos[0].device, with_bias, _token_class(n))


def _token_class(n: int) -> int:
    """0: up to 4K tokens, 1: up to 64K, 2: more, 3: 2^31 or more (past 32-bit TMA
    coordinates: no "fused-tma")."""
    return sum(n > b for b in (4096, 65536, 2 ** 31 - 1))


def _unembed_key(x: torch.Tensor, weight: torch.Tensor, with_bias: bool) -> tuple:
    """linear_unpatchify's measured choice key, as _embed_key's: (hidden, F, dtype, device,
    bias, token class); weight is (F, hidden)."""
    return (weight.shape[1], weight.shape[0], x.dtype, x.device, with_bias, _token_class(x.shape[0]))


def measured_choices() -> list[str]:
    """The variants and tiles the patch ops picked by measuring in this process."""
    caches = (("patch_embed forward", _EMBED_FWD_CHOICE, EMBED_FWD_VARIANTS),
              ("patch_embed backward", _EMBED_BWD_CHOICE, EMBED_VARIANTS),
              ("linear_unpatchify forward", _UNEMBED_FWD_CHOICE, EMBED_VARIANTS),
              ("linear_unpatchify backward", _UNEMBED_BWD_CHOICE, EMBED_VARIANTS))
    lines = [f"{what} hidden={k[0]} F={k[1]} {str(k[2]).replace('torch.', '')} {k[3]} "
             f"bias={k[4]} token class {k[5]}: {choice} (of {', '.join(options)})"
             for what, cache, options in caches for k, choice in cache.items()]
    return lines + autotuned_choices({"patch_embed": _embed_tuned, "patch_embed tma": _embed_tuned_tma})


def _interp(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _log_b(b: int) -> int:
    return max(0, math.ceil(math.log2(b)))


def _tma_store_possible(videos, patch_size, f: int, nout: int) -> bool:
    """Whether _gather_gemm can store its output (N, NOUT) through a TMA descriptor: the
    on-chip-A kernel's case (F <= _EMBED_MAX_F; half precision on a GPU), Triton with host
    descriptors, 16-byte aligned rows (a fresh output: its base is), 32-bit coordinates,
    and on a GPU compute capability 9+ (the interpreter runs it on CPU)."""
    v0 = videos[0]
    if TensorDescriptor is None or not 0 < f <= _EMBED_MAX_F or v0.dtype == torch.float64:
        return False
    if v0.is_cuda and (v0.dtype == torch.float32 or torch.cuda.get_device_capability(v0.device)[0] < 9):
        return False
    n = _num_tokens(videos, patch_size)
    return nout * v0.element_size() % 16 == 0 and 0 < n < 2 ** 31 and 0 < nout < 2 ** 31


def _gather_gemm(videos, b_mat, bias, patch_size, tma_store: bool = False):
    """(N, NOUT) = patchify(videos) @ b_mat (F, NOUT) (+ bias), one launch, A never stored.
    tma_store: the on-chip-A kernel writes whole token blocks through a TMA descriptor
    (the caller checks _tma_store_possible)."""
    bias = None if bias is None else bias.contiguous()  # the kernel reads bias[n] at bias_ptr + n
    pt, ph, pw = patch_size
    v0 = videos[0]
    f, nout = b_mat.shape
    n = _num_tokens(videos, patch_size)
    out = torch.empty(n, nout, dtype=v0.dtype, device=v0.device)
    if n == 0 or nout == 0:
        return out
    if f == 0:
        return out.copy_(bias.expand(n, nout) if bias is not None else torch.zeros_like(out))
    b = len(videos)
    if f <= _EMBED_MAX_F and (v0.dtype != torch.float32 or _interp(v0)):
        interp = _interp(v0)
        fp = max(16, next_pow2(f))
        bm, bn, warps, stages = _EMBED_SMALL if interp else (_EMBED_BLOCK_M, *_embed_candidates(fp)[0])
        table, blocks = _tables(videos, patch_size, bm, v0.device)
        # enough programs to fill the GPU (~4 per SM), each walking a run of column blocks;
        # runs are whole multiples of every candidate's BLOCK_N, so the grid is the same
        step = bn if interp else max(c[0] for c in _embed_fixed_list(fp))
        col_steps = cdiv(nout, step)
        sms = torch.cuda.get_device_properties(v0.device).multi_processor_count if v0.is_cuda else 1
        target = 2 if interp else 4 * sms
        splits = max(1, min(col_steps, cdiv(target, blocks)))
        per_program = cdiv(col_steps, splits) * step
        # (a descriptor's box is set per launch: bm x the config's BLOCK_N)
        desc = TensorDescriptor(out, list(out.shape), list(out.stride()), [bm, bn]) if tma_store else out
        args = (out, desc, b_mat, bias if bias is not None else out, table, table[b + 1:],
                out.stride(0), out.stride(1), b_mat.stride(0), b_mat.stride(1), nout, f, b, per_program)
        consts = dict(HAS_BIAS=bias is not None, IEEE=v0.dtype == torch.float32, PT=pt, PH=ph, PW=pw,
                      LOG_B=_log_b(b), META=_META, BLOCK_M=bm, FP=fp)
        grid = (blocks, cdiv(nout, per_program))
        if interp:
            _embed_kernel[grid](*args, **consts, BLOCK_N=bn, TMA_STORE=tma_store, num_warps=warps,
                                num_stages=stages, **COMPILE_OPTIONS)
        elif not autotune_enabled():  # the first config the GPU has the shared memory for
            def fixed(c):
                if tma_store:
                    desc.block_shape = [bm, c[0]]
                _embed_kernel[grid](*args, **consts, BLOCK_N=c[0], TMA_STORE=tma_store, num_warps=c[1],
                                    num_stages=c[2], **COMPILE_OPTIONS)
            launch_first_that_fits("patch_embed" + " tma" * tma_store, _embed_fixed_list(fp),
                                   lambda: (fp, v0.dtype, v0.device), fixed)
        else:
            name, tuner = ("patch_embed tma", _embed_tuned_tma) if tma_store else ("patch_embed", _embed_tuned)
            tuning_cache.prefill(name, tuner)
            tuner[grid](*args, **consts, **COMPILE_OPTIONS)
        return out
    bm, bn, bk, warps = (_SMALL if _interp(v0) else
                         _GEMM_GPU_FP32 if v0.dtype == torch.float32 else _GEMM_GPU)
    table, blocks = _tables(videos, patch_size, bm, v0.device)
    _gather_gemm_kernel[(blocks, cdiv(nout, bn))](
        out, b_mat, bias if bias is not None else out, table, table[b + 1:],
        out.stride(0), out.stride(1), b_mat.stride(0), b_mat.stride(1), nout, f, b,
        HAS_BIAS=bias is not None, IEEE=v0.dtype == torch.float32,
        PT=pt, PH=ph, PW=pw, LOG_B=_log_b(b), META=_META,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **COMPILE_OPTIONS)
    return out


def _scatter_gemm(x, b_mat, bias, shapes, patch_size, channels):
    """unpatchify(x (N, HID) @ b_mat (HID, F) (+ bias)) into new contiguous videos, one launch."""
    bias = None if bias is None else bias.contiguous()  # the kernel reads bias[n] at bias_ptr + n
    pt, ph, pw = patch_size
    hid, f = b_mat.shape
    outs = [torch.empty(channels, *shapes[i:i + 3], dtype=x.dtype, device=x.device)
            for i in range(0, len(shapes), 3)]
    if x.shape[0] == 0 or f == 0:
        return outs
    if hid == 0:
        for o in outs:
            o.copy_(bias.view(channels, pt, ph, pw).repeat(1, o.shape[1] // pt, o.shape[2] // ph,
                                                            o.shape[3] // pw)
                    if bias is not None else torch.zeros_like(o))
        return outs
    bm, bn, bk, warps = _SMALL if _interp(x) else _SCATTER_GPU
    table, blocks = _tables(outs, patch_size, bm, x.device)
    b = len(outs)
    _scatter_gemm_kernel[(blocks, cdiv(f, bn))](
        x, b_mat, bias if bias is not None else x, table, table[b + 1:],
        x.stride(0), x.stride(1), b_mat.stride(0), b_mat.stride(1), hid, f, b,
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        PT=pt, PH=ph, PW=pw, LOG_B=_log_b(b), META=_META,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **COMPILE_OPTIONS)
    return outs


def _wgrad(videos, dense, patch_size, bias):
    """float32 (HID, F) = dense^T @ patchify(videos), and the float32 sums over tokens of
    bias = "dense" ((HID,): patch_embed's bias gradient) or "gathered" ((F,):
    linear_unpatchify's), or None: one pass over both operands."""
    pt, ph, pw = patch_size
    v0 = videos[0]
    hid = dense.shape[1]
    f = v0.shape[0] * pt * ph * pw
    p, q = hid, f
    with_bias = bias is not None
    if dense.shape[0] == 0 or p == 0 or q == 0:
        # an empty product; the bias gradient, a sum over the tokens of one operand, is not
        # empty where only the other operand's width is 0 (hidden = 0 or F = 0)
        zeros = torch.zeros(p, q, dtype=torch.float32, device=v0.device)
        if bias == "dense":
            return zeros, dense.sum(0, dtype=torch.float32)
        if bias == "gathered":
            return zeros, patchify(videos, patch_size).sum(0, dtype=torch.float32)
        return zeros, None
    bt, bp, bq, warps, stages = ((*_SMALL, 1) if _interp(v0) else
                                 _WGRAD_GPU_FP32 if v0.dtype == torch.float32 else _WGRAD_GPU)
    table, blocks = _tables(videos, patch_size, bt, v0.device)
    tiles = cdiv(p, bp) * cdiv(q, bq)
    # split the token reduction so that a GPU has ~2 programs per SM; partials summed below
    # (the interpreter takes two splits, so that the CPU tests cover the partial sums)
    splits = min(blocks, 2) if _interp(v0) else max(1, min(blocks, 264 // tiles))
    per_split = cdiv(blocks, splits)
    splits = cdiv(blocks, per_split)
    part = torch.empty(splits, p, q, dtype=torch.float32, device=v0.device)
    bias_part = (torch.empty(splits, p if bias == "dense" else q, dtype=torch.float32, device=v0.device)
                 if with_bias else part)
    b = len(videos)
    _wgrad_kernel[(cdiv(p, bp), cdiv(q, bq), splits)](
        part, bias_part, dense, table, table[b + 1:],
        dense.stride(0), dense.stride(1), part.stride(0), part.stride(1), part.stride(2),
        bias_part.stride(0), hid, f, b, blocks, per_split,
        BIAS={None: 0, "dense": 1, "gathered": 2}[bias], IEEE=v0.dtype == torch.float32,
        PT=pt, PH=ph, PW=pw, LOG_B=_log_b(b), META=_META,
        BLOCK_T=bt, BLOCK_P=bp, BLOCK_Q=bq, num_warps=warps, num_stages=stages, **COMPILE_OPTIONS)
    def total(partials):
        return partials[0] if splits == 1 else partials.sum(0)
    return total(part), (total(bias_part) if with_bias else None)


@on_tensors_device
def patch_embed(videos, weight, bias):
    """(N, hidden) = patchify(videos) @ weight.flatten(1).T + bias: one fused GEMM launch."""
    videos = list(videos)
    w = weight.flatten(1).contiguous()  # (hidden, F)
    patch_size = tuple(int(s) for s in weight.shape[2:])
    if videos[0].dtype == torch.float64:  # no float64 tl.dot: Triton gather + PyTorch GEMM
        out = patchify(videos, patch_size) @ w.t()
        return out + bias if bias is not None else out

    def gemm():
        a = _copies(videos[0]).patchify(videos, patch_size)
        return torch.addmm(bias, a, w.t()) if bias is not None else a @ w.t()
    runs = {"fused": lambda: _gather_gemm(videos, w.t(), bias, patch_size), "gemm": gemm}
    if _tma_store_possible(videos, patch_size, w.shape[1], w.shape[0]):
        runs["fused-tma"] = lambda: _gather_gemm(videos, w.t(), bias, patch_size, tma_store=True)
    key = _embed_key(w, videos, patch_size, bias is not None)
    run = runs[measured_choice("VDIT_PATCH_EMBED_FWD", EMBED_FWD_VARIANTS, _EMBED_FWD_CHOICE, key,
                               timing("patch_embed forward", runs, videos[0]), available=tuple(runs))]
    return run()


def _copies(like: torch.Tensor):
    """The gather / scatter of the gemm variant: the patch family's default backend
    (DEFAULT_ORDER: the CUDA kernels where built, whose calls cost the H100 0.027 ms of
    host time against 0.1-0.24 ms for this module's Triton launches), this module under
    the interpreter."""
    if like.device.type != "cuda":
        return sys.modules[__name__]
    return _backend.implementation(_backend.resolve("patch", like.device, "auto", "patchify", like.dtype), "patch")


def _embed_backward_gemm(grad, videos, w, patch_size, with_bias, shapes):
    """patch_embed's gradients by PyTorch's GEMMs between our gather and scatter:
    grad^T @ [A | 1 | 0 ...] gives dW and, as its column F, the bias gradient in one pass
    over grad; dX = unpatchify(grad @ W)."""
    n, f = grad.shape[0], w.shape[1]
    copies = _copies(grad)
    a = copies.patchify(videos, patch_size)
    if with_bias:  # [A | 1 | 0 ...]: 8 more columns keep the rows 16 bytes apart
        ones_then_zeros = device_table((1, 0, 0, 0, 0, 0, 0, 0), a.device, a.dtype)
        a = torch.cat((a, ones_then_zeros.expand(n, 8)), dim=1)
    gw = grad.t() @ a  # (hidden, F [+ 8])
    gx = copies.unpatchify(grad @ w, shapes, patch_size, videos[0].shape[0])
    if not with_bias:
        return gx, gw, None
    return gx, gw[:, :f].contiguous(), gw[:, f].contiguous()  # (outputs of an op never alias)


@on_tensors_device
def patch_embed_backward(grad, videos, weight, with_bias):
    """grad (N, hidden) -> (grad videos, grad weight, grad bias | None)."""
    videos = list(videos)
    patch_size = tuple(int(s) for s in weight.shape[2:])
    grad = grad.to(videos[0].dtype)
    w = weight.flatten(1).contiguous()  # (hidden, F)
    shapes = [int(s) for v in videos for s in v.shape[1:]]
    if grad.dtype == torch.float64:
        a = patchify(videos, patch_size)
        return (unpatchify(grad @ w, shapes, patch_size, videos[0].shape[0]),
                (grad.t() @ a).reshape(weight.shape), grad.sum(0) if with_bias else None)

    def fused():
        grad_x = _scatter_gemm(grad, w, None, shapes, patch_size, videos[0].shape[0])
        return (grad_x, *_wgrad(videos, grad, patch_size, bias="dense" if with_bias else None))
    runs = {"fused": fused, "gemm": lambda: _embed_backward_gemm(grad, videos, w, patch_size, with_bias, shapes)}
    key = _embed_key(w, videos, patch_size, with_bias)
    run = runs[measured_choice("VDIT_PATCH_EMBED_BWD", EMBED_VARIANTS, _EMBED_BWD_CHOICE, key,
                               timing("patch_embed backward", runs, videos[0]))]
    grad_x, grad_w, grad_b = run()
    return (grad_x, grad_w.reshape(weight.shape).to(weight.dtype),
            grad_b.to(weight.dtype) if with_bias else None)


@on_tensors_device
def linear_unpatchify(x, weight, bias, shapes, patch_size, channels):
    """videos = unpatchify(x @ weight.T + bias): fused, scattered from the GEMM epilogue in
    one launch; gemm, PyTorch's addmm and then our scatter (measured choice, see above)."""
    shapes, patch_size = [int(s) for s in shapes], tuple(int(p) for p in patch_size)
    if x.dtype == torch.float64:  # no float64 tl.dot: PyTorch GEMM + Triton scatter
        y = x @ weight.t()
        return unpatchify(y + bias if bias is not None else y, shapes, patch_size, channels)

    def gemm():
        y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        return _copies(x).unpatchify(y, shapes, patch_size, channels)
    runs = {"fused": lambda: _scatter_gemm(x, weight.t(), bias, shapes, patch_size, channels), "gemm": gemm}
    run = runs[measured_choice("VDIT_LINEAR_UNPATCHIFY_FWD", EMBED_VARIANTS, _UNEMBED_FWD_CHOICE,
                               _unembed_key(x, weight, bias is not None),
                               timing("linear_unpatchify forward", runs, x))]
    return run()


@on_tensors_device
def linear_unpatchify_backward(grad_videos, x, weight, patch_size, with_bias):
    """grad videos -> (grad x, grad weight, grad bias | None); fused: grad_y is gathered
    inside the products, never stored; gemm: gathered once, (N, F), for PyTorch's GEMMs."""
    patch_size = tuple(int(p) for p in patch_size)
    grad_videos = [g.to(x.dtype) for g in grad_videos]
    if x.dtype == torch.float64:
        gy = patchify(grad_videos, patch_size)
        return gy @ weight, gy.t() @ x, gy.sum(0) if with_bias else None

    def fused():
        grad_x = _gather_gemm(grad_videos, weight, None, patch_size)
        grad_wt, grad_b = _wgrad(grad_videos, x, patch_size, bias="gathered" if with_bias else None)
        return grad_x, grad_wt.t(), grad_b

    def gemm():  # gy, the gathered gradient (N, F), is small: F columns against hidden
        gy = _copies(x).patchify(grad_videos, patch_size)
        return gy @ weight, gy.t() @ x, gy.sum(0, dtype=torch.float32) if with_bias else None
    runs = {"fused": fused, "gemm": gemm}
    run = runs[measured_choice("VDIT_LINEAR_UNPATCHIFY_BWD", EMBED_VARIANTS, _UNEMBED_BWD_CHOICE,
                               _unembed_key(x, weight, with_bias),
                               timing("linear_unpatchify backward", runs, x))]
    grad_x, grad_w, grad_b = run()
    return grad_x, grad_w.to(weight.dtype).contiguous(), grad_b.to(weight.dtype) if with_bias else None


def aot_specs() -> list[dict]:
    """Launch configurations for benchmarks/static_report.py (sm_90a, no GPU needed)."""
    specs = []
    for name, fn, first in (("patchify", _patchify_kernel, "out_ptr"),
                            ("unpatchify", _unpatchify_kernel, "tokens_ptr")):
        strides = ("stride_on", "stride_of") if name == "patchify" else ("stride_tn", "stride_tf")
        for dtype, (pt, ph, pw), c in (("bf16", (1, 2, 2), 16), ("fp32", (2, 2, 2), 48)):
            block_t, block_f = _tiles(c * pt * ph * pw)
            specs.append({
                "name": f"{name} {dtype} patch={pt}x{ph}x{pw} C={c}",
                "fn": fn,
                "signature": {first: f"*{dtype}", "cu_blocks_ptr": "*i64", "meta_ptr": "*i64",
                              strides[0]: "i64", strides[1]: "i64", "F": "i32", "B": "i32",
                              "PT": "constexpr", "PH": "constexpr", "PW": "constexpr",
                              "LOG_B": "constexpr", "META": "constexpr",
                              "BLOCK_T": "constexpr", "BLOCK_F": "constexpr"},
                "constexprs": {"PT": pt, "PH": ph, "PW": pw, "LOG_B": 2, "META": _META,
                               "BLOCK_T": block_t, "BLOCK_F": block_f},
                "num_warps": 4, "unit_args": (strides[1],), "divisible_args": ("F",),
            })
    # the line kernels (the launch path for power-of-two pw): bf16, realistic widths
    for name, fn, first, stride in (("patchify lines", _patchify_lines_kernel, "out_ptr", "stride_on"),
                                    ("unpatchify lines", _unpatchify_lines_kernel, "tokens_ptr", "stride_tn")):
        # a pack of 3 videos (the table rows loaded at once) and, for the first shape, of more
        # than _FEW (the search)
        for dtype, (pt, ph, pw), c, nb in (("bf16", (1, 2, 2), 16, 3), ("bf16", (1, 2, 2), 16, 0),
                                           ("bf16", (2, 2, 2), 48, 3), ("fp32", (1, 2, 2), 4, 3)):
            rows = c * pt * ph
            rp = next_pow2(rows)
            block_w = max(1, min(_LINE_TILE // (rp * pw), 64))
            specs.append({
                "name": f"{name} {dtype} patch={pt}x{ph}x{pw} C={c} " + (f"{nb} videos" if nb else "many videos"),
                "fn": fn,
                "signature": {first: f"*{dtype}", "cu_blocks_ptr": "*i64", "meta_ptr": "*i64",
                              stride: "i64", "F": "i32", "R": "i32", "B": "i32",
                              **{k: "constexpr" for k in ("PT", "PH", "PW", "LOG_B", "META", "NB", "BLOCK_W", "RP",
                                                          "ALIGN")}},
                "constexprs": {"PT": pt, "PH": ph, "PW": pw, "LOG_B": 2, "META": _META, "NB": nb,
                               "BLOCK_W": block_w, "RP": rp, "ALIGN": 16},
                "num_warps": 8, "maxnreg": _LINE_MAXNREG,
                "divisible_args": ("F",) if c * pt * ph * pw % 16 == 0 else (),
                "min_access_bytes": 16,
            })
    # the fused GEMMs: bf16, hidden 3072, F = 64 (C=16, patch 1x2x2), GPU tile shapes;
    # unit_args: the strides that are 1 for the launchers' operands
    tab = {"cu_blocks_ptr": "*i64", "meta_ptr": "*i64"}
    fixed = {"PT": 1, "PH": 2, "PW": 2, "LOG_B": 2, "META": _META}
    consts = {k: "constexpr" for k in ("HAS_BIAS", "IEEE", "PT", "PH", "PW", "LOG_B", "META")}
    def gemm(name, fn, dtype, first, strides, sizes, blocks, warps, stages=None, out_desc=None, **checks):
        """A fused GEMM's spec: operands in `dtype` (float32: IEEE products, no wgmma);
        out_desc: _embed_kernel's out_desc argument (a pointer, or a TMA descriptor's type)."""
        sig = {first: f"*{dtype}", **({"out_desc": out_desc} if out_desc else {}),
               "b_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", **tab,
               **{k: "i64" for k in strides}, **{k: "i32" for k in sizes}, **consts,
               **{k: "constexpr" for k in blocks}}
        return {"name": name, "fn": fn, "signature": sig,
                "constexprs": {"HAS_BIAS": True, "IEEE": dtype == "fp32", **fixed, **blocks},
                "num_warps": warps, **({"num_stages": stages} if stages else {}),
                "expect_mma": dtype != "fp32", **checks}

    # out (N, hidden); b = weight (hidden, F) transposed. float32: every F
    for dtype, (bm, bn, bk, warps) in (("bf16", _GEMM_GPU), ("fp32", _GEMM_GPU_FP32)):
        specs.append(gemm(f"patch_embed {dtype} F=64 hidden=3072", _gather_gemm_kernel, dtype, "out_ptr",
                          ("stride_om", "stride_on", "stride_bk", "stride_bn"), ("NOUT", "F", "B"),
                          {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, warps,
                          unit_args=("stride_on", "stride_bk"), divisible_args=("NOUT", "F")))
    # one launch per FP: "<launch>: <config>", its candidates in _embed_fixed_list order
    # (the autotuned ones first); the static report builds them for a 99 KB GPU too, where
    # a fixed launch falls back
    # The TMA-store variant ("fused-tma", autotuned only): its own launch, the same tiles
    for fp in (64, 128):
        for tma in (False, True):
            for bn, warps, stages in _embed_fixed_list(fp):
                desc = f"tensordesc<bf16[{_EMBED_BLOCK_M},{bn}]>" if tma else "*bf16"
                specs.append(gemm(f"patch_embed (A on chip{', TMA stores' * tma}) bf16 FP={fp} hidden=3072: "
                                  f"{_EMBED_BLOCK_M}x{bn} w{warps} s{stages}", _embed_kernel, "bf16", "out_ptr",
                                  ("stride_om", "stride_on", "stride_bk", "stride_bn"),
                                  ("NOUT", "F", "B", "N_PER_PROGRAM"),
                                  {"BLOCK_M": _EMBED_BLOCK_M, "BLOCK_N": bn, "FP": fp, "TMA_STORE": tma},
                                  warps, stages, out_desc=desc, expect_tma=tma,
                                  unit_args=("stride_on", "stride_bk"), divisible_args=("NOUT", "F", "N_PER_PROGRAM")))
    # x (N, hidden); b = weight (F, hidden) transposed
    bm, bn, bk, warps = _SCATTER_GPU
    for dtype in ("bf16", "fp32"):
        specs.append(gemm(f"linear_unpatchify {dtype} hidden=3072 F=64", _scatter_gemm_kernel, dtype, "x_ptr",
                          ("stride_xm", "stride_xk", "stride_bk", "stride_bn"), ("HID", "F", "B"),
                          {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, warps,
                          unit_args=("stride_xk", "stride_bk"), divisible_args=("HID", "F")))
    for dtype, (bt, bp, bq, warps, stages) in (("bf16", _WGRAD_GPU), ("fp32", _WGRAD_GPU_FP32)):
        for bias, user in ((1, "patch_embed"), (2, "linear_unpatchify")):
            specs.append({
                "name": f"{user} wgrad {dtype} hidden=3072",
                "fn": _wgrad_kernel,
                "signature": {"out_ptr": "*fp32", "bias_out_ptr": "*fp32", "dense_ptr": f"*{dtype}", **tab,
                              "stride_dn": "i64", "stride_dh": "i64", "stride_os": "i64",
                              "stride_op": "i64", "stride_oq": "i64", "stride_bs": "i64",
                              "HID": "i32", "F": "i32", "B": "i32", "BLOCKS": "i32", "BLOCKS_PER_SPLIT": "i32",
                              "BIAS": "constexpr", "IEEE": "constexpr",
                              "PT": "constexpr", "PH": "constexpr", "PW": "constexpr",
                              "LOG_B": "constexpr", "META": "constexpr",
                              "BLOCK_T": "constexpr", "BLOCK_P": "constexpr", "BLOCK_Q": "constexpr"},
                "constexprs": {"BIAS": bias, "IEEE": dtype == "fp32", **fixed,
                               "BLOCK_T": bt, "BLOCK_P": bp, "BLOCK_Q": bq},
                "num_warps": warps, "num_stages": stages, "expect_mma": dtype != "fp32",
                "unit_args": ("stride_dh", "stride_oq"), "divisible_args": ("HID", "F"),  # dense (N, hidden); fp32 partials
            })
    return specs
