"""vdit_kernels: fused kernels for the attention stack of video diffusion transformers.

Public API (each function validates its arguments, picks a backend - see
vdit_kernels.backend - and calls a registered torch.library op):
  VideoPack                       pack metadata (cu_seqlens, positions, ...)
  patchify / unpatchify           videos <-> packed tokens
  patch_embed                     patchify + linear projection (Conv3d weights)
  linear_unpatchify               DiT output projection + unpatchify
  apply_rope_3d, Rope3D           3D rotary position embedding
  varlen_attention                packed attention, LSE, fused RoPE
  use_backend, BackendUnavailable backend choice
"""
from .backend import BackendUnavailable, available_backends, use_backend
from .ops.attention import varlen_attention
from .ops.patch import linear_unpatchify, patch_embed, patchify, unpatchify
from .ops.rope import Rope3D, apply_rope_3d
from .pack import VideoPack

__version__ = "0.1.0"

__all__ = [
    "VideoPack", "patchify", "unpatchify", "patch_embed", "linear_unpatchify",
    "apply_rope_3d", "Rope3D", "varlen_attention", "use_backend", "available_backends",
    "BackendUnavailable", "__version__",
]
