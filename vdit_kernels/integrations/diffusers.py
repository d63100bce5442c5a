"""Run diffusers' video transformers on vdit_kernels' attention, with Wan's 3D RoPE fused.

    import torch, diffusers
    from vdit_kernels.integrations.diffusers import use_vdit_attention

    model = diffusers.WanTransformer3DModel.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                subfolder="transformer", torch_dtype=torch.bfloat16).cuda()
    use_vdit_attention(model, backend="triton")     # every attention layer -> vk.varlen_attention
    video = model(latents, timestep, text_embeds).sample   # or inside a WanPipeline, unchanged

diffusers is optional: it is imported only inside the functions that need it, so
`import vdit_kernels` (and importing this module) never requires it.

What changes is each attention layer's *processor*. The projections, q/k norms and
output projection stay the layer's own, computed exactly as diffusers does; only the
attention (and for Wan the RoPE) runs on vdit_kernels. diffusers' batch of B
equal-length sequences becomes a pack: cu_seqlens = arange(B+1) * L for the queries
(and the keys of self-attention), arange(B+1) * L_text for the keys of cross-attention.
Outputs equal diffusers' own processors' to float32 rounding (tests/test_diffusers.py).

Wan (WanTransformer3DModel, WanVACETransformer3DModel: layers of class WanAttention)
  diffusers' WanRotaryPosEmbed splits the head dim D into (t, h, w) chunks with
  h = w = 2 * (D // 6), t = D - h - w (128 -> 44, 42, 42). Chunk a of size d_a has the
  frequencies theta ** (-2j / d_a), j < d_a / 2, theta = 10000, times the token's integer
  index on the patch grid along that axis (frame, row, column, from 0). cos/sin are
  repeat_interleave'd and WanAttnProcessor rotates adjacent pairs (x[2j], x[2j+1]) of the
  whole head dim, the chunks in (t, h, w) order. That is exactly
  vk.Rope3D(positions=grid indices, dims=(t, h, w), theta=10000, interleaved=True).
  use_vdit_attention checks the model's rope table against that formula, then hooks
  model.rope so that the (cos, sin) it returns carry the token positions
  (WanRotaryEmb); self-attention then passes rope=Rope3D(...) to varlen_attention,
  which rotates q and k as it loads them (no separate RoPE pass). A processor set by
  hand (model.set_attn_processor(WanVarlenAttnProcessor())) receives plain (cos, sin)
  instead: it rotates q and k in PyTorch with Wan's own formula and calls
  varlen_attention with rope=None - same result, one more pass over q and k.
  The image-to-video branch (added_kv_proj_dim: image tokens as extra keys/values,
  attended separately and added) is a second varlen_attention call.

CogVideoX (CogVideoXTransformer3DModel)
  Joint attention over [text; video] tokens: one segment of L_text + L_video tokens per
  sample. The pipeline, not the model, builds the rotary table (from a cropped and
  rescaled grid, so positions can be fractional) and passes only (cos, sin): the
  processor never sees positions, so the RoPE is applied in PyTorch with diffusers'
  apply_rotary_emb and varlen_attention runs with rope=None. Fusing it would need the
  positions from the pipeline (get_3d_rotary_pos_embed's grid; the convention is
  interleaved with dims (D/4, 3D/8, 3D/8)), text tokens at position (0, 0, 0), the
  identity rotation.

Not supported
  HunyuanVideo: every layer gets a key-padding mask for the padded prompt tokens
  ([B, 1, 1, N]; the token refiner another one). Supporting it needs the mask turned
  into varlen metadata - keys packed to each sample's valid [video; text] tokens with
  cu_seqlens_k from mask.sum(1), queries left whole - and a processor for the token
  refiner. Its RoPE (theta 256, dims (16, 56, 56), interleaved, integer grid positions)
  is a Rope3D, with text tokens at position (0, 0, 0).
  Attention masks: Wan and CogVideoX never pass one; a mask raises ValueError rather
  than being ignored. Context parallelism (processor._parallel_config) raises
  NotImplementedError. diffusers' set_attention_backend(...) conflicts with these
  processors and raises; the vdit_kernels backend is chosen with backend= (or
  vk.use_backend, VDIT_BACKEND). To go back, set the model's original processors
  (model.set_attn_processor(WanAttnProcessor())); the rope hook left in place is harmless.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from ..ops.attention import varlen_attention
from ..ops.rope import Rope3D

WAN_ROPE_THETA = 10000.0  # WanRotaryPosEmbed's default, the only value diffusers' Wan models use
_HOOK_ATTR = "_vdit_rope_hook"


class _VarlenProcessor:
    """What the processors share: argument checks and attention over the batch as a pack."""

    _attention_backend = None  # written by diffusers' set_attention_backend
    _parallel_config = None    # written by diffusers' context-parallel setup

    def __init__(self, backend: Optional[str] = None, deterministic: bool = False):
        self.backend = backend
        self.deterministic = deterministic

    def _check(self, attention_mask) -> None:
        name = type(self).__name__
        if attention_mask is not None:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else attention_mask
            raise ValueError(
                f"{name} got an attention_mask {shape}; it attends over whole equal-length "
                "sequences (varlen attention without a mask) and would otherwise ignore it. Use "
                "diffusers' own processor for masked attention.")
        if self._parallel_config is not None:
            raise NotImplementedError(
                f"{name} does not support diffusers' context parallelism: it computes attention over "
                "the local sequence only. Disable parallelism or use diffusers' processor.")
        if self._attention_backend is not None:
            raise ValueError(
                f"diffusers' attention backend {self._attention_backend!r} was set on {name}, which "
                "computes attention with vdit_kernels: choose its backend with "
                "use_vdit_attention(model, backend=...) instead (or reset the processor's "
                "_attention_backend to None).")

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, rope: Optional[Rope3D] = None) -> Tensor:
        """q (B, Lq, H, D), k/v (B, Lk, Hk, D) -> (B, Lq, H*D): sample b's queries see its keys."""
        b, lq, h, d = q.shape
        lk, hk = k.shape[1], k.shape[2]
        cu_q = torch.arange(b + 1, dtype=torch.int32, device=q.device) * lq
        cu_k = cu_q if lk == lq else torch.arange(b + 1, dtype=torch.int32, device=q.device) * lk
        out = varlen_attention(q.reshape(b * lq, h, d).contiguous(),
                               k.reshape(b * lk, hk, d).contiguous(),
                               v.reshape(b * lk, hk, d).contiguous(),
                               cu_q, cu_k, lq, lk, rope=rope, deterministic=self.deterministic,
                               backend=self.backend)
        return out.view(b, lq, h * d)


# -- Wan ----------------------------------------------------------------------------------

class WanRotaryEmb(tuple):
    """(freqs_cos, freqs_sin) as WanRotaryPosEmbed returns them, plus what fuses the rotation.

    Behaves as the plain tuple wherever diffusers uses it; WanVarlenAttnProcessor reads
    `positions` ((L, 3) float32 patch-grid indices (t, h, w) of one video), `dims` and `theta`.
    """

    def __new__(cls, freqs, positions=None, dims=None, theta=WAN_ROPE_THETA):
        obj = super().__new__(cls, freqs)
        obj.positions, obj.dims, obj.theta = positions, dims, theta
        return obj

    def rope3d(self, batch: int, device) -> Rope3D:
        """The Rope3D of a pack of `batch` copies of the video grid."""
        pos = self.positions.to(device)
        return Rope3D(pos.repeat(batch, 1) if batch > 1 else pos, tuple(self.dims), float(self.theta),
                      True)


def _grid_positions(grid, device) -> Tensor:
    """(T*H*W, 3) float32 (t, h, w) indices in raster order (Conv3d patches flattened)."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def _wan_rope_hook(module, args, kwargs, output):
    x = args[0] if args else kwargs["hidden_states"]
    pt, ph, pw = module.patch_size
    grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
    dims = (module.t_dim, module.h_dim, module.w_dim)
    return WanRotaryEmb(tuple(output), _grid_positions(grid, output[0].device), dims, WAN_ROPE_THETA)


def wan_rope_mismatch(rope, theta: float = WAN_ROPE_THETA) -> Optional[str]:
    """None if a WanRotaryPosEmbed's table is Rope3D's formula (interleaved), else why not."""
    dims = (rope.t_dim, rope.h_dim, rope.w_dim)
    cos, sin = rope.freqs_cos, rope.freqs_sin  # (max_seq_len, D), pairs repeated
    if cos.is_meta:
        return "its table is on the meta device (not materialised yet)"
    pos = torch.arange(cos.shape[0], dtype=torch.float64, device=cos.device)
    angles = []
    for d in dims:
        j = torch.arange(d // 2, dtype=torch.float64, device=cos.device)
        angles.append(pos[:, None] * theta ** (-2.0 * j / d))
    angles = torch.cat(angles, dim=1).repeat_interleave(2, dim=1)
    if angles.shape != cos.shape:
        return f"its table has shape {tuple(cos.shape)}, expected {tuple(angles.shape)}"
    atol = max(1e-5, 2 * torch.finfo(cos.dtype).eps)
    err = max((cos.double() - angles.cos()).abs().max().item(),
              (sin.double() - angles.sin()).abs().max().item())
    if err > atol:
        return (f"its table differs from dims={dims}, theta={theta}, interleaved pairs by {err:.2e}")
    return None


def _wan_qkv(attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor]):
    # diffusers' _get_qkv_projections
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if attn.fused_projections:
        if not attn.is_cross_attention:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        key, value = attn.to_kv(context).chunk(2, dim=-1)
        return attn.to_q(hidden_states), key, value
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


def _wan_added_kv(attn, encoder_hidden_states_img: Tensor):
    # diffusers' _get_added_kv_projections
    if attn.fused_projections:
        return attn.to_added_kv(encoder_hidden_states_img).chunk(2, dim=-1)
    return attn.add_k_proj(encoder_hidden_states_img), attn.add_v_proj(encoder_hidden_states_img)


def _wan_rotate(x: Tensor, freqs_cos: Tensor, freqs_sin: Tensor) -> Tensor:
    # WanAttnProcessor's rotation: pairs (x[2j], x[2j+1]), cos/sin repeated per pair
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanVarlenAttnProcessor(_VarlenProcessor):
    """diffusers' WanAttnProcessor on vdit_kernels.varlen_attention (module docstring: RoPE).

    backend: the vdit_kernels attention backend ("triton", "reference", None = auto);
    deterministic: atomic-free backward.
    """

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, rotary_emb=None) -> Tensor:
        self._check(attention_mask)
        context_img = None
        if attn.add_k_proj is not None:
            # as diffusers: image tokens first, then the text encoder's 512 tokens (hardcoded there)
            image_context_length = encoder_hidden_states.shape[1] - 512
            context_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = _wan_qkv(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        rope = None
        if rotary_emb is not None:
            fusable = (isinstance(rotary_emb, WanRotaryEmb) and rotary_emb.positions is not None
                       and encoder_hidden_states is None and context_img is None
                       and rotary_emb.positions.shape[0] == query.shape[1])
            if fusable:  # self-attention: varlen_attention rotates q and k as it loads them
                rope = rotary_emb.rope3d(query.shape[0], query.device)
            else:
                query, key = _wan_rotate(query, *rotary_emb), _wan_rotate(key, *rotary_emb)

        out = self._attend(query, key, value, rope)
        if context_img is not None:  # image-to-video: image tokens as a second set of keys
            key_img, value_img = _wan_added_kv(attn, context_img)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            out = out + self._attend(query, key_img, value_img.unflatten(2, (attn.heads, -1)))
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


# -- CogVideoX ----------------------------------------------------------------------------

class CogVideoXVarlenAttnProcessor(_VarlenProcessor):
    """diffusers' CogVideoXAttnProcessor2_0 on vdit_kernels.varlen_attention.

    Joint attention over [text; video] tokens; the RoPE table (cos, sin) from the pipeline
    is applied to the video tokens in PyTorch (the positions are not known here).
    """

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor,
                 attention_mask: Optional[Tensor] = None, image_rotary_emb=None):
        self._check(attention_mask)
        text_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        b, n, _ = hidden_states.shape
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(b, n, attn.heads, head_dim)
        key = key.view(b, n, attn.heads, head_dim)
        value = value.view(b, n, attn.heads, head_dim)
        if attn.norm_q is not None:  # per-head norms over head_dim: the layout does not matter
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            def rotate(x):
                return torch.cat([x[:, :text_len], apply_rotary_emb(x[:, text_len:], image_rotary_emb,
                                                                    sequence_dim=1)], dim=1)

            query = rotate(query)
            if not attn.is_cross_attention:
                key = rotate(key)
        out = self._attend(query, key, value)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_hidden_states, hidden_states = out.split([text_len, n - text_len], dim=1)
        return hidden_states, encoder_hidden_states


# -- installing ---------------------------------------------------------------------------

def use_vdit_attention(model: torch.nn.Module, backend: Optional[str] = None,
                       deterministic: bool = False) -> torch.nn.Module:
    """Set vdit_kernels processors on every attention layer of a diffusers video transformer.

    Wan models (WanTransformer3DModel, WanVACETransformer3DModel): WanVarlenAttnProcessor
    on every WanAttention, and a hook on model.rope that makes the self-attention RoPE
    fused into varlen_attention (after checking the rope table is Rope3D's formula; if
    not, a warning, and the RoPE runs in PyTorch). CogVideoXTransformer3DModel:
    CogVideoXVarlenAttnProcessor on every block's attention. Other models raise TypeError.
    Returns the model (modified in place). Calling it again replaces the processors.
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers import transformer_wan
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXTransformer3DModel

    wan_layers = [m for m in model.modules() if isinstance(m, transformer_wan.WanAttention)]
    if wan_layers:
        processor = WanVarlenAttnProcessor(backend, deterministic)
        for layer in wan_layers:
            layer.set_processor(processor)
        rope = getattr(model, "rope", None)
        if isinstance(rope, transformer_wan.WanRotaryPosEmbed):
            old = getattr(rope, _HOOK_ATTR, None)
            if old is not None:
                old.remove()
                setattr(rope, _HOOK_ATTR, None)
            reason = wan_rope_mismatch(rope)
            if reason is None:
                setattr(rope, _HOOK_ATTR, rope.register_forward_hook(_wan_rope_hook, with_kwargs=True))
            else:
                warnings.warn(f"the RoPE of {type(model).__name__} is not fused into varlen_attention "
                              f"(applied in PyTorch instead): {reason}", stacklevel=2)
        return model
    if isinstance(model, CogVideoXTransformer3DModel):
        processor = CogVideoXVarlenAttnProcessor(backend, deterministic)
        for m in model.modules():
            if isinstance(m, Attention):
                m.set_processor(processor)
        return model
    raise TypeError(
        f"use_vdit_attention supports diffusers' WanTransformer3DModel, WanVACETransformer3DModel "
        f"(WanAttention layers) and CogVideoXTransformer3DModel, got {type(model).__name__}; "
        "see the module docstring of vdit_kernels.integrations.diffusers for what others need")


__all__ = ["use_vdit_attention", "WanVarlenAttnProcessor", "CogVideoXVarlenAttnProcessor",
           "WanRotaryEmb", "wan_rope_mismatch"]
