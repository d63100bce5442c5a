"""The reference path: plain PyTorch, float32 inside, the numerical oracle.

Every op of the package is defined here first. Tests compare each backend
against these functions, and these functions against independent formulations
(nn.Conv3d, complex multiplication, dense masked softmax). Benchmarks use them as
the baseline. Nothing here imports an optional dependency, and everything runs on
CPU. Inputs of dtype float64 are computed in float64 (for gradcheck); all other
dtypes are computed in float32 and the result is cast back to the input dtype.

Layouts (see vdit_kernels.pack for the pack itself):
  video            (C, T, H, W), one tensor per video, or a (B, C, T, H, W) batch
                   when all videos share a shape
  packed tokens    (N, C*pt*ph*pw), features ordered (c, pt, ph, pw): exactly the
                   flattening of an nn.Conv3d weight (hidden, C, pt, ph, pw)
  q, k, v          (N, heads, head_dim), cu_seqlens int32 (B+1,)
  lse              (heads, N) float32 (float64 for float64), natural log
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import torch

from .checks import autocast_enabled, first_tensor

Videos = Union[torch.Tensor, Sequence[torch.Tensor]]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); every other dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def without_autocast(cls):
    """Class decorator: every static method runs with autocast off on its tensors' device.
    The registered ops run inside a caller's autocast region (torch.library ops have no
    autocast rule), where the products below would drop to its dtype; the oracle computes
    in compute_dtype whatever the caller's autocast state (the public functions cast the
    inputs as PyTorch's own ops do: vdit_kernels.checks.autocast_inputs)."""
    def off(fn):
        @functools.wraps(fn)
        def run(*args):
            t = first_tensor(args)
            if t is None or not autocast_enabled(t.device.type):
                return fn(*args)
            with torch.autocast(t.device.type, enabled=False):
                return fn(*args)
        return run

    for name, member in list(vars(cls).items()):
        if isinstance(member, staticmethod):
            setattr(cls, name, staticmethod(off(member.__func__)))
    return cls


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the attention's lse for inputs of `dtype`: the compute dtype."""
    return compute_dtype(dtype)


def as_video_list(latents: Videos) -> list[torch.Tensor]:
    """A (B, C, T, H, W) batch or a sequence of (C, T, H, W) videos -> list of videos."""
    if isinstance(latents, torch.Tensor):
        if latents.dim() != 5:
            raise ValueError(
                f"a latent batch must be (B, C, T, H, W), got shape {tuple(latents.shape)}"
            )
        return list(latents.unbind(0))
    if not isinstance(latents, (list, tuple)):  # (a dict or a generator would "work" wrongly)
        raise TypeError(f"latents must be a (B, C, T, H, W) tensor or a list of (C, T, H, W) videos, "
                        f"got {type(latents).__name__}")
    return list(latents)


# -- patchify / unpatchify / patch embedding -----------------------------------

def patchify_video(video: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """(C, T, H, W) -> (T/pt * H/ph * W/pw, C*pt*ph*pw), tokens in raster order."""
    pt, ph, pw = patch_size
    c, t, h, w = video.shape
    x = video.reshape(c, t // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(1, 3, 5, 0, 2, 4, 6)  # (gt, gh, gw, c, pt, ph, pw)
    return x.reshape((t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify_video(tokens: torch.Tensor, shape: Sequence[int], patch_size: Sequence[int],
                     channels: int) -> torch.Tensor:
    """(T/pt * H/ph * W/pw, C*pt*ph*pw) -> (C, T, H, W); the inverse of patchify_video."""
    pt, ph, pw = patch_size
    t, h, w = shape
    x = tokens.reshape(t // pt, h // ph, w // pw, channels, pt, ph, pw)
    x = x.permute(3, 0, 4, 1, 5, 2, 6)  # (c, gt, pt, gh, ph, gw, pw)
    return x.reshape(channels, t, h, w)


def patchify(latents: Videos, pack) -> torch.Tensor:
    """Videos -> packed tokens (N, C*pt*ph*pw) in the input dtype (a pure gather)."""
    videos = as_video_list(latents)
    if not videos:
        raise ValueError("patchify needs at least one video")
    return torch.cat([patchify_video(v, pack.patch_size) for v in videos], dim=0)


def unpatchify(tokens: torch.Tensor, pack, channels: int) -> list[torch.Tensor]:
    """Packed tokens (N, C*pt*ph*pw) -> list of (C, T_i, H_i, W_i) videos."""
    parts = torch.split(tokens, list(pack.seqlens))
    return [unpatchify_video(p, s, pack.patch_size, channels) for p, s in zip(parts, pack.shapes)]


def patch_embed(latents: Videos, pack, weight: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Patchify + linear projection: (N, hidden) = patchify(x) @ W.flatten(1).T + b.

    weight is in nn.Conv3d layout (hidden, C, pt, ph, pw), so this equals
    nn.Conv3d(C, hidden, kernel_size=stride=patch_size) applied per video with its
    output flattened to tokens.
    """
    x = patchify(latents, pack)
    cd = compute_dtype(x.dtype)
    out = x.to(cd) @ weight.flatten(1).to(cd).t()
    if bias is not None:
        out = out + bias.to(cd)
    return out.to(x.dtype)


def linear_unpatchify(x: torch.Tensor, pack, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], channels: int) -> list[torch.Tensor]:
    """The DiT output layer: (N, hidden) @ W.T + b -> unpatchify -> list of videos.

    weight is in nn.Linear layout (C*pt*ph*pw, hidden), features ordered (c, pt, ph, pw).
    """
    cd = compute_dtype(x.dtype)
    y = x.to(cd) @ weight.to(cd).t()
    if bias is not None:
        y = y + bias.to(cd)
    return unpatchify(y.to(x.dtype), pack, channels)


# -- 3D rotary position embedding ------------------------------------------------

def rope_frequencies(dims: Sequence[int], theta: float, device=None) -> torch.Tensor:
    """The head_dim/2 frequencies, float64: axis a of size d_a gets theta ** (-2j/d_a),
    j = 0..d_a/2-1; axes concatenated in (t, h, w) order. Every backend rounds these to
    float32 once (the Triton and CUDA kernels read them, they do not recompute them)."""
    return torch.cat([float(theta) ** (-2.0 * torch.arange(d // 2, device=device, dtype=torch.float64) / d)
                      for d in dims])


def rope_angles(positions: torch.Tensor, dims: Sequence[int], theta: float,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rotation angles (N, head_dim/2): pair j of axis a turns by that axis' position
    times its frequency (rope_frequencies, rounded to `dtype`)."""
    pos = positions.to(dtype)
    freqs = rope_frequencies(dims, theta, pos.device).to(dtype)
    parts, start = [], 0
    for axis, d in enumerate(dims):
        parts.append(pos[:, axis, None] * freqs[None, start:start + d // 2])
        start += d // 2
    return torch.cat(parts, dim=-1)


def _rotate(x: torch.Tensor, angles: torch.Tensor, dims: Sequence[int], interleaved: bool,
            inverse: bool = False) -> torch.Tensor:
    cd = compute_dtype(x.dtype)
    xf = x.to(cd)
    cos = angles.cos()[:, None, :]  # (N, 1, head_dim/2)
    sin = angles.sin()[:, None, :]
    if inverse:
        sin = -sin
    if interleaved:
        # pairs (x[2j], x[2j+1]) across the whole head dim; axis chunks are contiguous
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        # rotate-half inside each axis chunk: (x[j], x[j + d_a/2]) share angle j
        outs, c0, a0 = [], 0, 0
        for d in dims:
            x1, x2 = xf[..., c0:c0 + d // 2], xf[..., c0 + d // 2:c0 + d]
            c, s = cos[..., a0:a0 + d // 2], sin[..., a0:a0 + d // 2]
            outs.append(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))
            c0, a0 = c0 + d, a0 + d // 2
        out = torch.cat(outs, dim=-1)
    return out.to(x.dtype)


def apply_rope_3d(q: torch.Tensor, k: torch.Tensor, pack=None, dims: Sequence[int] = None,
                  theta: float = 10000.0, interleaved: bool = True,
                  positions: Optional[torch.Tensor] = None, inverse: bool = False):
    """3D rotary embedding of q and k, each (N, heads, head_dim).

    head_dim = dt + dh + dw (each even) is split into t, h, w chunks; chunk a rotates
    by pos_a * theta ** (-2j/d_a). interleaved=True rotates adjacent pairs
    (x0, x1), (x2, x3), ... (complex multiplication, Wan / HunyuanVideo style);
    interleaved=False rotates halves of each axis chunk (rotate_half). Positions
    come from `pack.positions` unless `positions` (N, 3), float or int, is given.
    inverse=True applies the inverse rotation (the backward of this op).
    Returns (q_rot, k_rot) in the input dtypes.
    """
    if positions is None:
        positions = pack.positions
    dims = tuple(int(d) for d in dims)
    cd = compute_dtype(q.dtype)
    angles = rope_angles(positions, dims, theta, cd)
    return (_rotate(q, angles, dims, interleaved, inverse),
            _rotate(k, angles, dims, interleaved, inverse))


# -- variable-length attention ---------------------------------------------------

def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     max_seqlen_q: int, max_seqlen_k: int,
                     softmax_scale: Optional[float] = None, return_lse: bool = False):
    """Segment-wise softmax attention over a pack.

    q (Nq, H, D); k, v (Nk, Hk, D) with Hk dividing H (query head h reads kv head
    h // (H // Hk)). Segment i of q (rows cu_seqlens_q[i]:cu_seqlens_q[i+1]) attends
    to segment i of k/v only:

        out_i = softmax(scale * q_i k_i^T) v_i,    lse_i = logsumexp(scale * q_i k_i^T)

    A query row whose key segment is empty gets out = 0 and lse = -inf (log of an
    empty sum), which merges correctly with other partial results. max_seqlen_* are
    upper bounds and only checked by the public API. Returns out (Nq, H, D) in q's
    dtype, and lse (H, Nq) in lse_dtype(q.dtype) (float32; float64 for float64) when return_lse.
    """
    nq, h, d = q.shape
    hk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    cd = compute_dtype(q.dtype)
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]].to(cd).transpose(0, 1)  # (H, Lq, D)
        ki = k[ck[i]:ck[i + 1]].to(cd).transpose(0, 1)  # (Hk, Lk, D)
        vi = v[ck[i]:ck[i + 1]].to(cd).transpose(0, 1)
        ki = ki.repeat_interleave(h // hk, dim=0)
        vi = vi.repeat_interleave(h // hk, dim=0)
        s = (qi @ ki.transpose(-1, -2)) * scale  # (H, Lq, Lk)
        lse = torch.logsumexp(s, dim=-1)  # -inf for an empty key segment
        # normalized by its own sum: exp(s - lse) with lse rounded to the compute dtype is
        # off by up to half an ulp of lse relative (2e-4 at scores of 1e4 in float32)
        p = torch.softmax(s, dim=-1) if s.shape[-1] else s
        oi = p @ vi if s.shape[-1] else torch.zeros_like(qi)
        outs.append(oi.transpose(0, 1))
        lses.append(lse)
    out = torch.cat(outs, dim=0).to(q.dtype) if outs else q.new_zeros(q.shape)
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=-1) if lses else q.new_zeros(h, 0, dtype=cd)
    return out, lse.to(lse_dtype(q.dtype))
