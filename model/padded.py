"""The same video DiT in plain PyTorch over a padded batch: the baseline packing replaces.

`padded_forward(model, latents, pack, timesteps, text, pad=...)` computes what
`model(latents, pack, timesteps, text)` computes, with the VideoDiT's own parameters,
the way a model without packing has to:

    pad="grid" (the videos padded to one batch tensor):
    latents (B x (C, T_i, H_i, W_i)) -> zero-padded batch (B, C, T_max, H_max, W_max)
      -> nn.Conv3d patch embedding                          x (B, L, hidden), L = prod of
                                                            the padded token grid
    pad="tokens" (the cheaper way: no padded pixels, only padded token rows):
    each video -> nn.Conv3d patch embedding -> its L_i tokens, padded to x (B, L, hidden),
                                                            L = max_i L_i
      -> per block: adaLN modulation per video, broadcast over its L tokens;
         self-attention with eager 3D RoPE (reference.apply_rope_3d) and
         F.scaled_dot_product_attention with a key-padding mask;
         cross-attention to the video's text, padded to the longest text (mask);
         MLP
      -> final LayerNorm + modulation + linear -> each video cut out of its padded grid

Every padded token is computed and thrown away: with a 720p image next to 480p videos
the padded grid holds several times the real tokens (the benchmark's mixed 60k-token
pack: 4.0x with pad="grid", 1.7x with pad="tokens"; benchmarks/bench_dit.py measures
what that costs). The result equals the packed model on the real tokens, forward and
backward (tests/test_model.py).
Limitation: a video with no text tokens would make its cross-attention rows fully
masked (SDPA returns NaN there), so every video needs at least one text token here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import vdit_kernels as vk
from vdit_kernels import reference as ref
from vdit_kernels.pack import to_device

from .dit import VideoDiT, modulate, timestep_embedding


def _attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Optional[Tensor]) -> Tensor:
    """q (B, Lq, H, D), k/v (B, Lk, H, D), key_valid (B, Lk) bool or None (every key valid:
    no mask, so that SDPA may take its FlashAttention kernel, which takes none) -> (B, Lq, H, D)."""
    mask = None if key_valid is None else key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2)


def padded_forward(model: VideoDiT, latents: Sequence[Tensor], pack: vk.VideoPack, timesteps: Tensor,
                   text: Tensor, pad: str = "grid") -> list[Tensor]:
    """Plain-PyTorch padded-batch forward of `model`; same arguments and result as
    model.forward (B predictions (C, T_i, H_i, W_i)). pad: "grid" or "tokens" (above)."""
    if pad not in ("grid", "tokens"):
        raise ValueError(f"pad must be 'grid' or 'tokens', got {pad!r}")
    cfg = model.config
    model.check_inputs(latents, pack, timesteps, text)
    if min(pack.text_lengths) < 1:
        raise ValueError("padded_forward needs >= 1 text token per video (a fully masked "
                         "cross-attention row is NaN in SDPA)")
    latents = list(latents)
    b, dev, dtype = pack.batch_size, latents[0].device, model.patch_embed.weight.dtype
    pt, ph, pw = cfg.patch_size
    gt, gh, gw = (max(g[a] for g in pack.grid_sizes) for a in range(3))
    h, d = cfg.heads, cfg.head_dim

    # -- pad and embed --
    if pad == "grid":
        batch = latents[0].new_zeros(b, cfg.in_channels, gt * pt, gh * ph, gw * pw)
        for i, x in enumerate(latents):
            batch[i, :, :x.shape[1], :x.shape[2], :x.shape[3]] = x
        x = model.patch_embed(batch).flatten(2).transpose(1, 2)              # (B, L, hidden)
        grid = torch.stack(torch.meshgrid(torch.arange(gt, device=dev), torch.arange(gh, device=dev),
                                          torch.arange(gw, device=dev), indexing="ij"), -1).view(-1, 3)
        sizes = to_device(torch.tensor(pack.grid_sizes), dev)
        valid = (grid[None] < sizes[:, None]).all(-1)                        # (B, L)
        padded = len(set(pack.grid_sizes)) > 1  # (decided on the host: no sync, none traced)
        positions = grid.float().expand(b, -1, -1).reshape(-1, 3)            # RoPE positions (t, h, w)
    else:
        tokens = [model.patch_embed(v[None]).flatten(2).transpose(1, 2)[0] for v in latents]
        x = torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True)        # (B, L, hidden)
        valid = torch.arange(x.shape[1], device=dev)[None] < to_device(torch.tensor(pack.seqlens), dev)[:, None]
        padded = len(set(pack.seqlens)) > 1
        positions = torch.nn.utils.rnn.pad_sequence(list(pack.split(pack.positions.float())),
                                                    batch_first=True).reshape(-1, 3)

    # -- conditioning; text padded to the longest --
    c = model.time_embed(timestep_embedding(timesteps, cfg.time_freq_dim).to(dtype))   # (B, hidden)
    context = model.text_embed(text.to(dtype))
    lt = pack.max_seqlen_k
    ctx = context.new_zeros(b, lt, cfg.hidden)
    for i, part in enumerate(context.split(list(pack.text_lengths))):
        ctx[i, :part.shape[0]] = part
    text_valid = torch.arange(lt, device=dev)[None] < to_device(torch.tensor(pack.text_lengths), dev)[:, None]

    norm = lambda t: F.layer_norm(t, t.shape[-1:], eps=cfg.eps)  # noqa: E731
    n_tok = x.shape[1]
    for block in model.blocks:
        mod = block.adaLN(c).view(b, 6, 1, -1)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.unbind(1)
        # self-attention: eager RoPE, SDPA with the key-padding mask
        att = block.attn
        y = modulate(norm(x), shift_a, scale_a)
        q, k, v = att.qkv(y).view(b, n_tok, 3, h, d).unbind(2)
        q, k = att.q_norm(q), att.k_norm(k)
        q, k = ref.apply_rope_3d(q.reshape(-1, h, d), k.reshape(-1, h, d), None, cfg.rope_dims,
                                 cfg.rope_theta, positions=positions)
        o = _attention(q.view(b, n_tok, h, d), k.view(b, n_tok, h, d), v, valid if padded else None)
        x = x + gate_a * att.proj(o.reshape(b, n_tok, h * d))
        # cross-attention to the padded text
        xa = block.cross_attn
        q = xa.q_norm(xa.q(block.cross_norm(x)).view(b, n_tok, h, d))
        k, v = xa.kv(ctx).view(b, lt, 2, h, d).unbind(2)
        o = _attention(q, xa.k_norm(k), v, text_valid if min(pack.text_lengths) < lt else None)
        x = x + xa.proj(o.reshape(b, n_tok, h * d))
        # MLP
        x = x + gate_m * block.mlp(modulate(norm(x), shift_m, scale_m))

    shift, scale = model.final_adaLN(c).view(b, 2, 1, -1).unbind(1)
    out = model.final_proj(modulate(norm(x), shift, scale))                 # (B, L, C*pt*ph*pw)
    if pad == "tokens":
        return [out[i, :n].view(*g, cfg.in_channels, pt, ph, pw).permute(3, 0, 4, 1, 5, 2, 6)
                .reshape(cfg.in_channels, *s) for i, (n, g, s) in enumerate(zip(pack.seqlens, pack.grid_sizes,
                                                                                 pack.shapes))]
    out = out.view(b, gt, gh, gw, cfg.in_channels, pt, ph, pw)
    out = out.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, cfg.in_channels, gt * pt, gh * ph, gw * pw)
    return [out[i, :, :s[0], :s[1], :s[2]] for i, s in enumerate(pack.shapes)]
