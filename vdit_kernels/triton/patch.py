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
# The host side builds ONE int64 table from Python ints (shapes, strides, data_ptr())
# with torch.tensor(..., device=...): a host->device copy, never a device->host sync.
from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

_META = 9  # int64 fields per video: ptr, strides c/t/h/w, first token, grid h/w/t


@triton.jit
def _block_offsets(cu_blocks_ptr, meta_ptr, pid_t, pid_f, B,
                   PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                   LOG_B: tl.constexpr, META: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    """This program's video row, packed token indices, valid-token count and element offsets."""
    # scalar binary search: the largest vid with cu_blocks[vid] <= pid_t (< cu_blocks[B])
    lo = pid_t * 0
    hi = lo + B
    for _ in tl.static_range(LOG_B):  # [lo, hi) halves, rounding up, each step
        mid = (lo + hi) // 2  # lo <= mid < hi <= B
        go = tl.load(cu_blocks_ptr + mid) <= pid_t
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    row = meta_ptr + lo.to(tl.int64) * META
    s_c = tl.load(row + 1)
    s_t = tl.load(row + 2)
    s_h = tl.load(row + 3)
    s_w = tl.load(row + 4)
    tok_start = tl.load(row + 5)
    g_h = tl.load(row + 6)
    g_w = tl.load(row + 7)
    g_t = tl.load(row + 8)
    local = (pid_t - tl.load(cu_blocks_ptr + lo)).to(tl.int64) * BLOCK_T \
        + tl.arange(0, BLOCK_T).to(tl.int64)
    valid = local < g_t * g_h * g_w
    gw = local % g_w
    gh = (local // g_w) % g_h
    gt = local // (g_w * g_h)
    tok_off = gt * (PT * s_t) + gh * (PH * s_h) + gw * (PW * s_w)
    # feature f = ((c * PT + it) * PH + ih) * PW + iw
    offs_f = pid_f.to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F).to(tl.int64)
    iw = offs_f % PW
    ih = (offs_f // PW) % PH
    it = (offs_f // (PW * PH)) % PT
    c = offs_f // (PW * PH * PT)
    feat_off = c * s_c + it * s_t + ih * s_h + iw * s_w
    return row, tok_start + local, valid, offs_f, tok_off[:, None] + feat_off[None, :]


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


def _tiles(features: int) -> tuple[int, int]:
    block_f = min(triton.next_power_of_2(features), 128)
    return max(8, 1024 // block_f), block_f


def _tables(videos: Sequence[torch.Tensor], patch_size: Sequence[int], block_t: int, device):
    """One int64 device tensor: per-video token-block offsets (B+1), then B rows of _META fields."""
    pt, ph, pw = patch_size
    cu_blocks, rows, tok = [0], [], 0
    for v in videos:
        _, t, h, w = v.shape
        gt, gh, gw = t // pt, h // ph, w // pw
        cu_blocks.append(cu_blocks[-1] + -(-gt * gh * gw // block_t))
        rows.extend([v.data_ptr(), *v.stride(), tok, gh, gw, gt])
        tok += gt * gh * gw
    return torch.tensor(cu_blocks + rows, dtype=torch.int64, device=device), cu_blocks[-1]


def _launch(kernel, packed, videos, patch_size):
    pt, ph, pw = (int(p) for p in patch_size)
    b, f = len(videos), packed.shape[1]
    if packed.shape[0] == 0 or f == 0:
        return
    block_t, block_f = _tiles(f)
    table, blocks = _tables(videos, (pt, ph, pw), block_t, packed.device)
    grid = (blocks, triton.cdiv(f, block_f))
    kernel[grid](packed, table, table[b + 1:], packed.stride(0), packed.stride(1), f, b,
                 PT=pt, PH=ph, PW=pw, LOG_B=max(0, math.ceil(math.log2(b))), META=_META,
                 BLOCK_T=block_t, BLOCK_F=block_f, num_warps=4)


def patchify(videos, patch_size):
    """List of (C, T, H, W) videos (any strides) -> new (N, C*pt*ph*pw) tokens, one launch."""
    videos = list(videos)
    pt, ph, pw = (int(p) for p in patch_size)
    c = videos[0].shape[0]
    n = sum((v.shape[1] // pt) * (v.shape[2] // ph) * (v.shape[3] // pw) for v in videos)
    out = torch.empty(n, c * pt * ph * pw, dtype=videos[0].dtype, device=videos[0].device)
    _launch(_patchify_kernel, out, videos, (pt, ph, pw))
    return out


def unpatchify(tokens, shapes, patch_size, channels):
    """(N, C*pt*ph*pw) tokens -> list of new contiguous (C, T, H, W) videos, one launch."""
    outs = [torch.empty(channels, *shapes[i:i + 3], dtype=tokens.dtype, device=tokens.device)
            for i in range(0, len(shapes), 3)]
    _launch(_unpatchify_kernel, tokens, outs, patch_size)
    return outs


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
                "num_warps": 4,
            })
    return specs
