"""Run diffusers' video transformers on vdit_kernels' attention (Wan's and HunyuanVideo's 3D RoPE fused).

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
  use_vdit_attention checks the model's rope table against that formula (an eager call
  checks it again once the table has changed, e.g. by a RoPE-scaling patch, and if it no
  longer matches, warns and rotates in PyTorch; a compiled graph keeps the install-time
  check), then hooks model.rope so that the (cos, sin) it returns carry the token positions
  (GridRotaryEmb); self-attention then passes rope=Rope3D(...) to varlen_attention,
  which rotates q and k once with the RoPE kernel before its attention kernels (no RoPE
  in PyTorch, no cos/sin table read). A processor set by
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

HunyuanVideo (HunyuanVideoTransformer3DModel, T2V and token-replace I2V)
  Joint attention over [video; text] tokens (dual-stream blocks project the two streams
  separately, single-stream blocks together), with a key-padding mask [B, 1, 1, N]: the
  valid keys of sample b are its first n_b tokens (all video tokens, then the prompt's
  real tokens). That is varlen metadata, no mask needed: 2B segments, sample b's N
  queries against keys [bN, bN + n_b), then an empty query segment over its padding
  keys, so q, k and v stay where they are and cu_seqlens_k comes from mask.sum(1) on the
  device. Padded query rows attend to the valid keys, as with diffusers' masked SDPA.
  The mask is checked once per mask tensor to be such a prefix (anything else raises; under
  torch.compile the check is a device-side assert in the graph).
  HunyuanVideoRotaryPosEmbed (theta 256, dims (16, 56, 56), interleaved pairs, integer
  patch-grid positions) is a Rope3D; text tokens get position (0, 0, 0), the identity
  rotation, so the joint sequence is rotated by varlen_attention's RoPE pass. The hook on
  model.rope is installed after checking the module's (cos, sin) against Rope3D's
  formula. The token refiner (2 layers over the <= 256 prompt tokens, a query-and-key
  mask) keeps diffusers' own processor: it is a negligible share of the step.

Not supported
  Attention masks: Wan and CogVideoX never pass one; a mask there (or a HunyuanVideo mask
  that is not a key prefix) raises ValueError rather than being ignored. Context
  parallelism (processor._parallel_config) raises NotImplementedError.
  diffusers' set_attention_backend(...) conflicts with these processors: the next forward
  raises (diffusers' ValueError); the vdit_kernels backend is chosen with backend= (or
  vk.use_backend, VDIT_BACKEND). To go back, set the model's original processors
  (model.set_attn_processor(WanAttnProcessor())); the rope hook left in place is harmless.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backend
from ..backend import BackendUnavailable
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

    def _check(self, attention_mask=None) -> None:
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

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, rope: Optional[Rope3D] = None,
                segments: Optional[tuple] = None) -> Tensor:
        """q (B, Lq, H, D), k/v (B, Lk, Hk, D) -> (B, Lq, H*D): sample b's queries see its keys.
        segments: (cu_seqlens_q, cu_seqlens_k) over the flattened batch instead (segments
        no longer than Lq and Lk), e.g. HunyuanVideo's keys without their padding."""
        b, lq, h, d = q.shape
        lk, hk = k.shape[1], k.shape[2]
        if segments is not None:
            cu_q, cu_k = segments
        else:
            cu_q = torch.arange(b + 1, dtype=torch.int32, device=q.device) * lq
            cu_k = cu_q if lk == lq else torch.arange(b + 1, dtype=torch.int32, device=q.device) * lk
        out = varlen_attention(q.reshape(b * lq, h, d).contiguous(),
                               k.reshape(b * lk, hk, d).contiguous(),
                               v.reshape(b * lk, hk, d).contiguous(),
                               cu_q, cu_k, lq, lk, rope=rope, deterministic=self.deterministic,
                               backend=self.backend)
        return out.view(b, lq, h * d)


# -- Wan ----------------------------------------------------------------------------------

class GridRotaryEmb(tuple):
    """(freqs_cos, freqs_sin) as a diffusers rope module returns them, plus what fuses the
    rotation into varlen_attention.

    Behaves as the plain tuple wherever diffusers uses it; the processors read
    `positions` ((L, 3) float32 patch-grid indices (t, h, w) of one video), `dims` and `theta`
    (pairs interleaved: the convention of both Wan and HunyuanVideo).
    """

    def __new__(cls, freqs, positions=None, dims=None, theta=WAN_ROPE_THETA):
        obj = super().__new__(cls, freqs)
        obj.positions, obj.dims, obj.theta = positions, dims, theta
        obj._rope3d = {}
        return obj

    def rope3d(self, batch: int, device, text_tokens: int = 0) -> Rope3D:
        """The Rope3D of a pack of `batch` copies of [video grid; text_tokens at (0, 0, 0)]
        (angle 0: the text tokens are not rotated). Built once: every attention layer of
        the forward that made this object asks for the same one."""
        key = (batch, str(device), text_tokens)
        if key not in self._rope3d:
            pos = self.positions.to(device)
            if text_tokens:
                pos = torch.cat([pos, pos.new_zeros(text_tokens, 3)])
            self._rope3d[key] = Rope3D(pos.repeat(batch, 1) if batch > 1 else pos, tuple(self.dims),
                                       float(self.theta), True)
        return self._rope3d[key]


def _grid_positions(grid, device) -> Tensor:
    """(T*H*W, 3) float32 (t, h, w) indices in raster order (Conv3d patches flattened)."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def rope_table_mismatch(cos: Tensor, sin: Tensor, positions: Tensor, dims, theta: float) -> Optional[str]:
    """None if (cos, sin) (L, D), each angle repeated for its pair, are Rope3D's interleaved
    formula at positions (L, 3): chunk a of size d_a, frequency theta ** (-2j / d_a), j < d_a / 2,
    times the position along axis a. Otherwise why not."""
    if cos.is_meta:
        return "its table is on the meta device (not materialised yet)"
    pos = positions.to(device=cos.device, dtype=torch.float64)
    angles = []
    for axis, d in enumerate(dims):
        j = torch.arange(d // 2, dtype=torch.float64, device=cos.device)
        angles.append(pos[:, axis, None] * theta ** (-2.0 * j / d))
    angles = torch.cat(angles, dim=1).repeat_interleave(2, dim=1)
    if angles.shape != cos.shape:
        return f"its table has shape {tuple(cos.shape)}, expected {tuple(angles.shape)}"
    atol = max(1e-5, 2 * torch.finfo(cos.dtype).eps)
    err = max((cos.double() - angles.cos()).abs().max().item(),
              (sin.double() - angles.sin()).abs().max().item())
    if err > atol:
        return f"its table differs from dims={tuple(dims)}, theta={theta}, interleaved pairs by {err:.2e}"
    return None


_TABLE_ATTR = "_vdit_rope_table"  # on a hooked WanRotaryPosEmbed: (its table's state, mismatch)


def _wan_table_mismatch(rope) -> Optional[str]:
    """wan_rope_mismatch(rope), asked again only when its table changed since the last time:
    other tensors (reassigned, or moved by model.to()) or an in-place write (a RoPE-scaling
    patch applied after use_vdit_attention, once fused with the old formula regardless)."""
    state = (rope.freqs_cos, _version(rope.freqs_cos), rope.freqs_sin, _version(rope.freqs_sin))
    seen = getattr(rope, _TABLE_ATTR, None)
    if seen is not None and all((a is b) if isinstance(a, Tensor) else a == b for a, b in zip(seen[0], state)):
        return seen[1]
    reason = wan_rope_mismatch(rope)
    if reason is not None and seen is not None and seen[1] is None:
        warnings.warn(f"the RoPE table of {type(rope).__name__} changed after use_vdit_attention and is "
                      f"no longer fused into varlen_attention (applied in PyTorch instead): {reason}")
    # (not a buffer: no state_dict entry; the hook reads it outside torch.compile only)
    object.__setattr__(rope, _TABLE_ATTR, (state, reason))
    return reason


def _wan_rope_hook(module, args, kwargs, output):
    # eager calls re-check a changed table (one host sync then); a traced graph keeps the
    # table it was traced with, checked when use_vdit_attention installed the hook
    if not torch.compiler.is_compiling() and _wan_table_mismatch(module) is not None:
        return None  # diffusers' own (cos, sin): the processor rotates in PyTorch
    x = args[0] if args else kwargs["hidden_states"]
    pt, ph, pw = module.patch_size
    grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
    dims = (module.t_dim, module.h_dim, module.w_dim)
    return GridRotaryEmb(tuple(output), _grid_positions(grid, output[0].device), dims, WAN_ROPE_THETA)


def wan_rope_mismatch(rope, theta: float = WAN_ROPE_THETA) -> Optional[str]:
    """None if a WanRotaryPosEmbed's table is Rope3D's formula (interleaved), else why not.
    Row p of its (max_seq_len, D) table is every chunk at position p."""
    cos = rope.freqs_cos
    pos = torch.arange(cos.shape[0], dtype=torch.float64, device=cos.device)[:, None].expand(-1, 3)
    return rope_table_mismatch(cos, rope.freqs_sin, pos, (rope.t_dim, rope.h_dim, rope.w_dim), theta)


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
            fusable = (isinstance(rotary_emb, GridRotaryEmb) and rotary_emb.positions is not None
                       and encoder_hidden_states is None and context_img is None
                       and rotary_emb.positions.shape[0] == query.shape[1])
            if fusable:  # self-attention: varlen_attention rotates q and k (its RoPE kernel)
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


# -- HunyuanVideo -------------------------------------------------------------------------

def _hunyuan_rope_hook(module, args, kwargs, output):
    x = args[0] if args else kwargs["hidden_states"]
    grid = (x.shape[2] // module.patch_size_t, x.shape[3] // module.patch_size,
            x.shape[4] // module.patch_size)
    return GridRotaryEmb(tuple(output), _grid_positions(grid, output[0].device),
                         tuple(module.rope_dim), float(module.theta))


def hunyuan_rope_mismatch(rope, device=None) -> Optional[str]:
    """None if a HunyuanVideoRotaryPosEmbed computes Rope3D's formula (interleaved, its
    rope_dim and theta, grid positions), checked on a small (2, 3, 4) patch grid."""
    p, pt = rope.patch_size, rope.patch_size_t
    probe = torch.empty(1, 1, 2 * pt, 3 * p, 4 * p, device=device)
    cos, sin = rope(probe)
    return rope_table_mismatch(cos, sin, _grid_positions((2, 3, 4), cos.device), tuple(rope.rope_dim),
                               float(rope.theta))


def _hunyuan_heads(attn, x: Tensor, to_q, to_k, to_v, norm_q, norm_k):
    """q, k, v (B, L, heads, D) of one stream (the layer's own or its added projections),
    with their optional per-head norms, as HunyuanVideoAttnProcessor2_0 computes them."""
    q, k, v = (proj(x).unflatten(2, (attn.heads, -1)) for proj in (to_q, to_k, to_v))
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v


def _version(t: Tensor) -> Optional[int]:
    """t's version counter (bumped by every in-place write), or None for a tensor made
    under torch.inference_mode, which has none (such a tensor is cached by identity: a
    pipeline builds its mask once per forward and does not write to it)."""
    return None if t.is_inference() else t._version


class HunyuanVideoVarlenAttnProcessor(_VarlenProcessor):
    """diffusers' HunyuanVideoAttnProcessor2_0 on vdit_kernels.varlen_attention.

    Joint attention over [video; text]; the key-padding mask becomes segment offsets and
    the RoPE is fused when model.rope is hooked (module docstring).
    """

    def __init__(self, backend: Optional[str] = None, deterministic: bool = False):
        super().__init__(backend, deterministic)
        self._mask_cache = None  # (weakref to the mask, its version, its segments)

    def _segments(self, mask: Optional[Tensor], batch: int, tokens: int) -> Optional[tuple]:
        """(cu_seqlens_q, cu_seqlens_k) of a [B, 1, 1, N] boolean key-prefix mask, built and
        checked once per mask tensor (the layers of a forward share it): segment 2b holds
        sample b's N queries and its n_b valid keys [bN, bN + n_b), segment 2b+1 no queries
        and the padding keys. Nothing moves; the offsets stay on the device."""
        if mask is None:
            return None
        # the shape first, also for a cached mask: the same tensor passed with other
        # (batch, tokens) once split the queries into wrong segments without an error
        if not (isinstance(mask, Tensor) and mask.dtype == torch.bool
                and tuple(mask.shape) == (batch, 1, 1, tokens)):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else mask
            raise ValueError(f"{type(self).__name__} takes a boolean key-padding mask of shape "
                             f"{(batch, 1, 1, tokens)} (as HunyuanVideoTransformer3DModel builds it), "
                             f"got {shape} {getattr(mask, 'dtype', '')}")
        compiling = torch.compiler.is_compiling()  # no weakref cache or data-dependent branch to trace
        cached = self._mask_cache
        if not compiling and cached is not None and cached[0]() is mask and cached[1] == _version(mask):
            return cached[2]
        flat = mask.view(batch, tokens)
        lengths = flat.sum(dim=1, dtype=torch.int32)
        prefix = torch.arange(tokens, device=mask.device) < lengths[:, None]
        gaps = (f"{type(self).__name__}: the attention mask must keep a prefix of each sample's tokens "
                "(video, then the prompt's real tokens); this one has gaps, which segment offsets "
                "cannot express")
        if compiling:  # checked on the device, in the graph (a failed device assert there)
            torch._assert_async((flat == prefix).all(), gaps)
        elif not torch.equal(flat, prefix):  # one device sync per mask tensor, not per layer
            raise ValueError(gaps)
        starts = torch.arange(batch + 1, dtype=torch.int32, device=mask.device) * tokens
        cu_q = starts.repeat_interleave(2)[1:]
        cu_k = torch.cat([starts[:1], torch.stack([starts[:-1] + lengths, starts[1:]], dim=1).flatten()])
        if not compiling:
            self._mask_cache = (weakref.ref(mask), _version(mask), (cu_q, cu_k))
        return cu_q, cu_k

    def __getstate__(self) -> dict:
        # a weakref does not pickle: torch.save(model) failed after the first forward
        return {**self.__dict__, "_mask_cache": None}

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, image_rotary_emb=None):
        self._check()
        text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = _hunyuan_heads(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v,
                                           attn.norm_q, attn.norm_k)
        # the RoPE covers the video tokens only: [video; text] in a single-stream layer
        video_len = query.shape[1] - (text_len if single_stream else 0)

        rope = None
        if image_rotary_emb is not None:
            if (isinstance(image_rotary_emb, GridRotaryEmb) and image_rotary_emb.positions is not None
                    and image_rotary_emb.positions.shape[0] == video_len):
                rope = image_rotary_emb.rope3d(query.shape[0], query.device, text_len)
            else:
                from diffusers.models.embeddings import apply_rotary_emb

                def rotate(x):
                    video = apply_rotary_emb(x[:, :video_len], image_rotary_emb, sequence_dim=1)
                    return torch.cat([video, x[:, video_len:]], dim=1)

                query, key = rotate(query), rotate(key)

        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query, encoder_key, encoder_value = _hunyuan_heads(
                attn, encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                attn.norm_added_q, attn.norm_added_k)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        out = self._attend(query, key, value, rope,
                           self._segments(attention_mask, query.shape[0], query.shape[1]))
        if encoder_hidden_states is None:  # as diffusers: no output projection without text
            return out, None
        out, encoder_out = out[:, :-text_len], out[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_out = attn.to_add_out(encoder_out)
        return out, encoder_out


# -- installing ---------------------------------------------------------------------------

def _hook_rope(model, rope, hook, mismatch: Optional[str]) -> None:
    """Replace the fusing hook on `rope` (a repeated call must not stack hooks); install it
    only when the module computes Rope3D's formula, else warn (RoPE stays in PyTorch)."""
    old = getattr(rope, _HOOK_ATTR, None)
    if old is not None:
        old.remove()
        setattr(rope, _HOOK_ATTR, None)
    if mismatch is None:
        setattr(rope, _HOOK_ATTR, rope.register_forward_hook(hook, with_kwargs=True))
    else:
        warnings.warn(f"the RoPE of {type(model).__name__} is not fused into varlen_attention "
                      f"(applied in PyTorch instead): {mismatch}", stacklevel=3)


def use_vdit_attention(model: torch.nn.Module, backend: Optional[str] = None,
                       deterministic: bool = False) -> torch.nn.Module:
    """Set vdit_kernels processors on every attention layer of a diffusers video transformer.

    Wan models (WanTransformer3DModel, WanVACETransformer3DModel): WanVarlenAttnProcessor
    on every WanAttention. HunyuanVideoTransformer3DModel: HunyuanVideoVarlenAttnProcessor
    on every dual- and single-stream block (the text token refiner keeps diffusers' own).
    For both, a hook on model.rope fuses the self-attention RoPE into varlen_attention
    (after checking the module computes Rope3D's formula; if not, a warning, and the RoPE
    runs in PyTorch). CogVideoXTransformer3DModel: CogVideoXVarlenAttnProcessor on every
    block's attention. Other models raise TypeError.
    Returns the model (modified in place). Calling it again replaces the processors.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"use_vdit_attention takes a diffusers transformer (an nn.Module), got {type(model).__name__}")
    if backend is not None:  # now, not at the first forward: a typo, or a backend without attention
        # kernels (whether it runs on the model's device is asked at each call: the model may move)
        _backend._check_name(backend)
        if backend not in ("auto", "reference") and not _backend._has_module(f"vdit_kernels.{backend}.attention"):
            raise BackendUnavailable(f"backend {backend!r} has no attention kernels; use 'triton', 'reference' "
                                     "or 'auto'")
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers import transformer_hunyuan_video as hunyuan
    from diffusers.models.transformers import transformer_wan
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXTransformer3DModel

    wan_layers = [m for m in model.modules() if isinstance(m, transformer_wan.WanAttention)]
    if wan_layers:
        processor = WanVarlenAttnProcessor(backend, deterministic)
        for layer in wan_layers:
            layer.set_processor(processor)
        rope = getattr(model, "rope", None)
        if isinstance(rope, transformer_wan.WanRotaryPosEmbed):
            object.__setattr__(rope, _TABLE_ATTR, None)  # checked afresh
            _hook_rope(model, rope, _wan_rope_hook, _wan_table_mismatch(rope))
        return model
    if isinstance(model, hunyuan.HunyuanVideoTransformer3DModel):
        processor = HunyuanVideoVarlenAttnProcessor(backend, deterministic)
        for m in model.modules():
            if isinstance(m, Attention) and isinstance(m.processor, (hunyuan.HunyuanVideoAttnProcessor2_0,
                                                                     HunyuanVideoVarlenAttnProcessor)):
                m.set_processor(processor)
        device = next(model.parameters()).device
        _hook_rope(model, model.rope, _hunyuan_rope_hook, hunyuan_rope_mismatch(model.rope, device))
        return model
    if isinstance(model, CogVideoXTransformer3DModel):
        processor = CogVideoXVarlenAttnProcessor(backend, deterministic)
        for m in model.modules():
            if isinstance(m, Attention):
                m.set_processor(processor)
        return model
    raise TypeError(
        f"use_vdit_attention supports diffusers' WanTransformer3DModel, WanVACETransformer3DModel, "
        f"HunyuanVideoTransformer3DModel and CogVideoXTransformer3DModel, got {type(model).__name__}; "
        "see the module docstring of vdit_kernels.integrations.diffusers for what others need")


__all__ = ["use_vdit_attention", "WanVarlenAttnProcessor", "HunyuanVideoVarlenAttnProcessor",
           "CogVideoXVarlenAttnProcessor", "GridRotaryEmb", "rope_table_mismatch", "wan_rope_mismatch",
           "hunyuan_rope_mismatch"]
