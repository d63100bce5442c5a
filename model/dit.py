"""A compact Sora-style video DiT over packed spacetime patches.

One forward takes B videos of different sizes as a VideoPack: all videos' tokens are
one (N, hidden) sequence, attention is block-diagonal over the pack (varlen), and the
per-video timestep conditioning is gathered per token with pack.segment_ids. Nothing
here reads a device value back to the host, so the forward is torch.compile-able and
needs no padding.

    latents (B x (C, T_i, H_i, W_i))
      -> patch_embed (Conv3d weights, one launch)               x (N, hidden)
      -> depth x Block:
           adaLN-Zero self-attention, q/k RMSNorm, fused 3D RoPE (varlen over the pack)
           cross-attention to each video's own text tokens (pack.cu_seqlens_k)
           adaLN-Zero MLP (GELU tanh)
      -> LayerNorm + shift/scale from c -> linear_unpatchify    B x (C, T_i, H_i, W_i)

`backend=` on forward picks the vdit_kernels backend for every op ("reference",
"triton", "cuda", "auto"/None), or per op family with a dict such as
{"patch": "cuda", "rope": "triton", "attention": "reference"}. `sp=` (a
vk.SequenceParallel) runs the model with the tokens sharded across ranks after the patch
embedding: self-attention by the layout's scheme (Ulysses, all-gather, ring or USP),
cross-attention locally, the output layer's features gathered before the unpatchify
(inference, or training with each rank's parameter gradients summed over the ranks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import vdit_kernels as vk
from vdit_kernels import backend as _backend
from vdit_kernels import reference as ref
from vdit_kernels.checks import (as_ints, check_flag, check_pack, check_positive_finite, check_theta, check_videos,
                                 positive_int)

Backend = Union[None, str, dict]


# -- config ---------------------------------------------------------------------------

def wan_rope_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan's head-dim split: h = w = 2 * (head_dim // 6), t gets the rest (128 -> 44, 42, 42)."""
    hw = 2 * (head_dim // 6)
    return (head_dim - 2 * hw, hw, hw)


@dataclass
class DiTConfig:
    in_channels: int = 16
    hidden: int = 1536
    heads: int = 12
    head_dim: int = 128
    depth: int = 30
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    rope_dims: Optional[tuple[int, int, int]] = None  # (t, h, w); None -> wan_rope_dims(head_dim)
    rope_theta: float = 10000.0
    qk_norm: bool = True       # per-head RMSNorm on q and k (HunyuanVideo's; Wan's spans all heads)
    fused_rope: bool = True    # RoPE inside varlen_attention; False: apply_rope_3d, then attention
    # training: each block's activations recomputed in the backward (torch.utils.checkpoint,
    # non-reentrant) instead of kept, one block's at a time: about a third more compute
    gradient_checkpointing: bool = False
    time_freq_dim: int = 256   # sinusoidal timestep embedding width
    eps: float = 1e-6

    def __post_init__(self):
        for name in ("in_channels", "hidden", "heads", "head_dim", "depth", "text_dim", "time_freq_dim"):
            setattr(self, name, positive_int(getattr(self, name), name))
        check_positive_finite("mlp_ratio", self.mlp_ratio)
        check_positive_finite("eps", self.eps)
        self.rope_theta = check_theta(self.rope_theta)
        if self.mlp_hidden < 1:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} leaves the MLP no hidden units at hidden {self.hidden}")
        self.qk_norm = check_flag("qk_norm", self.qk_norm)
        self.fused_rope = check_flag("fused_rope", self.fused_rope)
        self.gradient_checkpointing = check_flag("gradient_checkpointing", self.gradient_checkpointing)
        patch = as_ints(self.patch_size, "patch_size")
        if len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"patch_size must be three positive ints (pt, ph, pw), got {self.patch_size!r}")
        self.patch_size = patch
        if self.rope_dims is None:
            self.rope_dims = wan_rope_dims(self.head_dim)
        self.rope_dims = as_ints(self.rope_dims, "rope_dims")
        if self.heads * self.head_dim != self.hidden:
            raise ValueError(f"hidden ({self.hidden}) must be heads ({self.heads}) x head_dim ({self.head_dim})")
        if (len(self.rope_dims) != 3 or sum(self.rope_dims) != self.head_dim
                or any(d < 0 or d % 2 for d in self.rope_dims)):
            raise ValueError(f"rope_dims {self.rope_dims} must be three even non-negative ints (t, h, w) "
                             f"summing to head_dim {self.head_dim}")

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.hidden * self.mlp_ratio))

    @property
    def patch_features(self) -> int:
        pt, ph, pw = self.patch_size
        return self.in_channels * pt * ph * pw

    @classmethod
    def from_name(cls, name: str, **overrides) -> "DiTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        if "head_dim" in overrides and "rope_dims" not in overrides:
            overrides["rope_dims"] = None  # re-derive the split for the new head_dim
        return replace(PRESETS[name], **overrides)


PRESETS = {
    # tests: 2 heads of 24 -> rope dims (8, 8, 8)
    "tiny": DiTConfig(in_channels=4, hidden=48, heads=2, head_dim=24, depth=2, mlp_ratio=2.0,
                      text_dim=32, time_freq_dim=32),
    "small": DiTConfig(in_channels=16, hidden=384, heads=6, head_dim=64, depth=6, text_dim=256),
    # Wan2.1 1.3B: dim 1536, 12 heads, 30 layers, ffn 8960, umT5 text (4096)
    "wan-1.3b-like": DiTConfig(hidden=1536, heads=12, head_dim=128, depth=30, mlp_ratio=8960 / 1536),
    # HunyuanVideo width: 3072, 24 heads of 128, rope split (16, 56, 56), theta 256
    "hunyuan-like": DiTConfig(hidden=3072, heads=24, head_dim=128, depth=40, mlp_ratio=4.0,
                              rope_dims=(16, 56, 56), rope_theta=256.0),
}


# -- backend choice -------------------------------------------------------------------

def family_backends(backend: Backend) -> dict:
    """backend= as one name for every family, or a dict per family (missing ones: auto)."""
    if backend is None or isinstance(backend, str):
        return {f: backend for f in _backend.FAMILIES}
    if not isinstance(backend, Mapping):  # a list of names read as families once
        raise TypeError(f"backend must be None, a backend name or a dict {{family: name}}, got "
                        f"{type(backend).__name__} {backend!r}")
    unknown = set(backend) - set(_backend.FAMILIES)
    if unknown:
        raise ValueError(f"unknown op families {sorted(unknown)}; families are {_backend.FAMILIES}")
    return {f: backend.get(f) for f in _backend.FAMILIES}


def model_ops(config: DiTConfig) -> list[tuple[str, str]]:
    """(family, backend-contract function) pairs a forward + backward of the model calls."""
    ops = [("patch", "patch_embed"), ("patch", "patch_embed_backward"),
           ("patch", "linear_unpatchify"), ("patch", "linear_unpatchify_backward"),
           ("attention", "varlen_attention_fwd"), ("attention", "varlen_attention_bwd")]
    if not config.fused_rope:
        ops.append(("rope", "rope_3d"))
    return ops


def why_not(config: DiTConfig, backend: Backend, device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None if the model can run forward + backward with `backend` on `device` (with its
    parameters and latents in `dtype`, when given), else why not."""
    device = torch.device(device)
    chosen = family_backends(backend)
    families: dict = {}  # reason -> the families it stops (each reason said once)
    for family, op in model_ops(config):
        name = chosen[family]
        if name in (None, "auto"):
            continue  # auto always finds a backend (reference at worst)
        reason = _backend.why_not(name, family, device, op, dtype)
        if reason is not None and family not in families.setdefault(reason, []):
            families[reason].append(family)
    return "; ".join(f"{', '.join(fams)}: {reason}" for reason, fams in families.items()) or None


# -- layers ---------------------------------------------------------------------------

def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) float timesteps -> (B, dim) [cos | sin] features (DiT / Wan), float32 or float64."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class _PerToken(torch.autograd.Function):
    """Gather per-video rows to tokens; the backward sums each video's token gradients
    with a (B, N) one-hot GEMM. The default backward of index_select is an index_add:
    on a GPU, float atomics of all N tokens of a video onto the same few thousand
    addresses (contended, and accumulated in the gradient's dtype, bfloat16 included);
    the GEMM accumulates in float32 and uses no atomics."""

    @staticmethod
    def forward(ctx, mod: Tensor, segment_ids: Tensor) -> Tensor:
        ctx.save_for_backward(segment_ids)
        ctx.videos = mod.shape[0]
        return mod.index_select(0, segment_ids)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (segment_ids,) = ctx.saved_tensors
        onehot = F.one_hot(segment_ids, ctx.videos).to(grad.dtype)              # (N, B)
        summed = onehot.t() @ grad.reshape(grad.shape[0], -1)                  # (B, K)
        return summed.reshape(ctx.videos, *grad.shape[1:]), None


def per_token(mod: Tensor, segment_ids: Tensor) -> Tensor:
    """(B, ...) per-video values -> (N, ...) per-token values (gather, no host sync);
    segment_ids int64 (N,)."""
    return _PerToken.apply(mod, segment_ids)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return torch.addcmul(shift, x, 1 + scale)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned scale, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(dtype), x.shape[-1:], self.weight.to(dtype), self.eps).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: Tensor, pack: vk.VideoPack, rope: vk.Rope3D, backends: dict,
                sp: Optional[vk.SequenceParallel] = None) -> Tensor:
        n, h, d = x.shape[0], self.cfg.heads, self.cfg.head_dim
        q, k, v = self.qkv(x).view(n, 3, h, d).unbind(1)
        q, k = self.q_norm(q), self.k_norm(k)
        if not self.cfg.fused_rope:  # (rope.positions: this rank's rows under sp, see forward;
            # positions_for: float, converted once per pack or per forward, not in every block)
            q, k = vk.apply_rope_3d(q.contiguous(), k.contiguous(), positions=rope.positions_for(q.dtype),
                                    dims=rope.dims, theta=rope.theta, backend=backends["rope"])
            rope = None
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if sp is None:
            out = vk.varlen_attention(q, k, v, pack.cu_seqlens, pack.cu_seqlens, pack.max_seqlen,
                                      pack.max_seqlen, rope=rope, backend=backends["attention"])
        else:  # this rank's tokens; the pack's offsets and positions
            out = sp.self_attention(q, k, v, pack.cu_seqlens, pack.max_seqlen, rope=rope,
                                    backend=backends["attention"])
        return self.proj(out.reshape(n, h * d))


class CrossAttention(nn.Module):
    """Each video's tokens attend to its own text tokens (pack.cu_seqlens_k)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.q = nn.Linear(cfg.hidden, cfg.hidden)
        self.kv = nn.Linear(cfg.hidden, 2 * cfg.hidden)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: Tensor, context: Tensor, pack: vk.VideoPack, backends: dict,
                sp: Optional[vk.SequenceParallel] = None) -> Tensor:
        n, h, d = x.shape[0], self.cfg.heads, self.cfg.head_dim
        q = self.q_norm(self.q(x).view(n, h, d))
        k, v = self.kv(context).view(context.shape[0], 2, h, d).unbind(1)
        q, k, v = q.contiguous(), self.k_norm(k).contiguous(), v.contiguous()
        attention = vk.varlen_attention if sp is None else sp.cross_attention
        out = attention(q, k, v, pack.cu_seqlens, pack.cu_seqlens_k, pack.max_seqlen, pack.max_seqlen_k,
                        backend=backends["attention"])
        return self.proj(out.reshape(n, h * d))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.attn = SelfAttention(cfg)
        self.cross_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)  # affine, as in Wan's norm3
        self.cross_attn = CrossAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden, cfg.mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_hidden, cfg.hidden))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 6 * cfg.hidden))

    def forward(self, x: Tensor, c: Tensor, context: Tensor, pack: vk.VideoPack, rope: vk.Rope3D,
                seg: Tensor, backends: dict, sp: Optional[vk.SequenceParallel] = None) -> Tensor:
        # per-video (B, 6, hidden) modulation, gathered per token only as each piece is used
        mod = self.adaLN(c).view(c.shape[0], 6, -1)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (per_token(m, seg) for m in mod.unbind(1))
        norm = lambda t: F.layer_norm(t, t.shape[-1:], eps=self.eps)
        x = x + gate_a * self.attn(modulate(norm(x), shift_a, scale_a), pack, rope, backends, sp)
        x = x + self.cross_attn(self.cross_norm(x), context, pack, backends, sp)
        x = x + gate_m * self.mlp(modulate(norm(x), shift_m, scale_m))
        return x


class VideoDiT(nn.Module):
    """Video DiT over a VideoPack; see the module docstring for the data flow.

    The model keeps its own copy of `config` (model.config, shared by its blocks), so that
    switching e.g. model.config.fused_rope changes this model only, never a PRESETS entry
    or another model built from the same config. Only `fused_rope`, `rope_dims`,
    `rope_theta` and `gradient_checkpointing` are read at every forward; the other fields
    (sizes, `qk_norm`, `eps`, ...) built the layers and are fixed with them: for other
    values build another model."""

    def __init__(self, config: DiTConfig, zero_init: bool = True):
        super().__init__()
        if not isinstance(config, DiTConfig):
            raise TypeError(f"config must be a DiTConfig (DiTConfig.from_name(...)), got {type(config).__name__}")
        self.config = cfg = replace(config)
        self.eps = cfg.eps  # fixed at construction, as in the blocks' norms
        self.patch_embed = nn.Conv3d(cfg.in_channels, cfg.hidden, cfg.patch_size, cfg.patch_size)
        self.time_embed = nn.Sequential(nn.Linear(cfg.time_freq_dim, cfg.hidden), nn.SiLU(),
                                        nn.Linear(cfg.hidden, cfg.hidden))
        self.text_embed = nn.Sequential(nn.Linear(cfg.text_dim, cfg.hidden), nn.GELU(approximate="tanh"),
                                        nn.Linear(cfg.hidden, cfg.hidden))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 2 * cfg.hidden))
        self.final_proj = nn.Linear(cfg.hidden, cfg.patch_features)
        self.init_weights(zero_init)

    @torch.no_grad()
    def init_weights(self, zero_init: bool = True, generator: Optional[torch.Generator] = None):
        """DiT init: xavier Linear/patch weights, zero biases, N(0, 0.02) timestep MLP.

        zero_init=True (adaLN-Zero, for training): the modulation and output layers start
        at zero, so the gated self-attention and MLP branches add nothing and the model
        outputs zeros (the cross-attention branch, ungated as in Wan, still adds its part).
        zero_init=False gives those layers small random weights instead (tests, demos:
        outputs and gradients are then non-trivial everywhere).
        """
        def xavier(w):
            fan_out, fan_in = w.shape[0], w[0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            w.copy_(torch.rand(w.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound)

        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                xavier(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for lin in (self.time_embed[0], self.time_embed[2]):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=generator) * 0.02)
        modulation = [b.adaLN[1] for b in self.blocks] + [self.final_adaLN[1], self.final_proj]
        for lin in modulation:
            if zero_init:
                lin.weight.zero_()
            else:
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=generator) * 0.02)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=generator) * 0.02)
        return self

    def check_inputs(self, latents: Sequence[Tensor], pack: vk.VideoPack, timesteps: Tensor, text: Tensor) -> None:
        """forward's arguments (its docstring) or a ValueError / TypeError naming the wrong one."""
        cfg = self.config
        check_pack(pack)
        if pack.cu_seqlens_k is None:
            raise ValueError("pack has no text lengths: build it with VideoPack.from_shapes(..., text_lengths=...)")
        if tuple(pack.patch_size) != cfg.patch_size:
            raise ValueError(f"the pack's patch size {tuple(pack.patch_size)} is not the model's {cfg.patch_size}")
        videos = ref.as_video_list(latents)
        channels = check_videos(videos, pack)
        if channels != cfg.in_channels:
            raise ValueError(f"latents have {channels} channels, the model takes {cfg.in_channels}")
        dtype = self.patch_embed.weight.dtype
        if videos[0].dtype != dtype and not torch.is_autocast_enabled(videos[0].device.type):
            # (text and timesteps are cast: they are conditions; the latents are the data, as
            # an nn.Conv3d would take them)
            raise ValueError(f"latents are {videos[0].dtype} but the model's parameters are {dtype}: cast "
                             f"them (or run under torch.autocast)")
        for name, t in (("text", text), ("timesteps", timesteps)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if not (t.is_floating_point() or (name == "timesteps" and not t.is_complex() and t.dtype != torch.bool)):
                raise ValueError(f"{name} must be a real {'number' if name == 'timesteps' else 'floating'} "
                                 f"tensor, got {t.dtype}")
        if text.dim() != 2 or text.shape != (pack.num_text_tokens, cfg.text_dim):
            raise ValueError(f"text must be (num_text_tokens={pack.num_text_tokens}, text_dim={cfg.text_dim}), "
                             f"got {tuple(text.shape)}")
        if timesteps.shape != (pack.batch_size,):
            raise ValueError(f"timesteps must be ({pack.batch_size},), got {tuple(timesteps.shape)}")

    def forward(self, latents: Sequence[Tensor], pack: vk.VideoPack, timesteps: Tensor, text: Tensor,
                backend: Backend = None, sp: Optional[vk.SequenceParallel] = None) -> list[Tensor]:
        """latents: B videos (C, T_i, H_i, W_i) matching `pack`; timesteps (B,) real numbers (float or int);
        text (pack.num_text_tokens, text_dim), video i's text at rows
        pack.cu_seqlens_k[i]:pack.cu_seqlens_k[i+1]. Returns B predictions (C, T_i, H_i, W_i)
        in the parameters' dtype (the autocast dtype inside an autocast region).

        sp: sequence parallelism (vk.SequenceParallel: every rank of its group(s) calls
        forward with the same arguments and gets the whole result). The tokens are sharded
        after the patch embedding, the blocks run on this rank's shard (self-attention by
        the layout's scheme, cross-attention to the replicated text locally), and the output
        layer's patch features are gathered before the unpatchify. Training: every rank
        computes the same loss from the whole result; each rank's parameter (and latent)
        gradients are then its share, to be all-reduced with SUM over the P ranks
        (vk.gather_pack's backward).
        """
        cfg, backends = self.config, family_backends(backend)
        self.check_inputs(latents, pack, timesteps, text)
        if sp is not None and not isinstance(sp, vk.SequenceParallel):
            raise TypeError(f"sp must be a vk.SequenceParallel (or None), got {type(sp).__name__}")
        dtype = self.patch_embed.weight.dtype
        seg = pack.segment_ids.long()
        rope = vk.Rope3D.from_pack(pack, cfg.rope_dims, cfg.rope_theta)

        x = vk.patch_embed(latents, pack, self.patch_embed.weight, self.patch_embed.bias,
                           backend=backends["patch"])                               # (N, hidden)
        if sp is not None:  # this rank's rows (padding rows: video 0's modulation, dropped at the end)
            x, seg = sp.shard_pack(x), sp.shard_pack(seg)                           # (n, hidden)
            if not cfg.fused_rope:  # apply_rope_3d rotates the shard: its float positions, cut once
                rope = replace(rope, positions=sp.shard_pack(rope.positions_for(dtype)))
        c = self.time_embed(timestep_embedding(timesteps, cfg.time_freq_dim).to(dtype))  # (B, hidden)
        context = self.text_embed(text.to(dtype))                                   # (Ntext, hidden)
        # recomputed blocks (under sp their collectives run again in the backward, on every
        # rank alike); only where a backward will follow
        checkpointed = check_flag("config.gradient_checkpointing", cfg.gradient_checkpointing) and \
            torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointed:
                x = checkpoint(block, x, c, context, pack, rope, seg, backends, sp, use_reentrant=False)
            else:
                x = block(x, c, context, pack, rope, seg, backends, sp)
        shift, scale = (per_token(m, seg) for m in self.final_adaLN(c).view(c.shape[0], 2, -1).unbind(1))
        x = modulate(F.layer_norm(x, x.shape[-1:], eps=self.eps), shift, scale)
        if sp is not None:  # the output layer on the shard, then the (N, C*pt*ph*pw) features gathered
            tokens = sp.gather_pack(F.linear(x, self.final_proj.weight, self.final_proj.bias), pack.num_tokens)
            return vk.unpatchify(tokens, pack, cfg.in_channels, backend=backends["patch"])
        return vk.linear_unpatchify(x, pack, self.final_proj.weight, self.final_proj.bias,
                                    cfg.in_channels, backend=backends["patch"])
