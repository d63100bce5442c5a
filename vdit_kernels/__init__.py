"""vdit_kernels: fused kernels for the attention stack of video diffusion transformers.

Public API (each function validates its arguments, picks a backend - see
vdit_kernels.backend - and calls a registered torch.library op, or in plain eager code
the same implementation and autograd formula without the dispatcher: ops/direct.py):
  VideoPack                       pack metadata (cu_seqlens, positions, ...)
  patchify / unpatchify           videos <-> packed tokens
  patch_embed                     patchify + linear projection (Conv3d weights)
  linear_unpatchify               DiT output projection + unpatchify
  apply_rope_3d, Rope3D           3D rotary position embedding
  varlen_attention                packed attention, LSE, fused RoPE
  merge_attention                 merge partial attention results (out, lse) over key subsets
  shard_pack, gather_pack         sequence-parallel token shards of a pack
  shard_mask                      which rows of a shard are real tokens (not padding)
  ulysses_varlen_attention        self-attention over a pack sharded across ranks (Ulysses)
  allgather_varlen_attention      the same with all-gathered keys/values (any head count)
  ring_varlen_attention           the same with keys/values passed around a ring
  usp_varlen_attention            Ulysses inside groups, a ring between them (USP)
  usp_groups, usp_shard           USP's process groups, and the shard a rank holds
  SequenceParallel                a layout (scheme, groups) with its shard, gather, attention
  local_cross_attention           cross-attention from a query shard to replicated text keys
  use_backend, BackendUnavailable backend choice
  available_backends              the backends that can run an op family here
"""
from .backend import BackendUnavailable, available_backends, use_backend
from .ops.attention import varlen_attention
from .ops.patch import linear_unpatchify, patch_embed, patchify, unpatchify
from .ops.rope import Rope3D, apply_rope_3d
from .pack import VideoPack
from .parallel import (SequenceParallel, allgather_varlen_attention, gather_pack, local_cross_attention,
                       merge_attention, ring_varlen_attention, shard_mask, shard_pack,
                       ulysses_varlen_attention, usp_groups, usp_shard,
                       usp_varlen_attention)

__version__ = "0.1.0"

__all__ = [
    "VideoPack", "patchify", "unpatchify", "patch_embed", "linear_unpatchify",
    "apply_rope_3d", "Rope3D", "varlen_attention", "use_backend", "available_backends",
    "BackendUnavailable", "__version__",
    "merge_attention", "shard_pack", "shard_mask", "gather_pack", "ulysses_varlen_attention",
    "local_cross_attention", "allgather_varlen_attention", "ring_varlen_attention",
    "usp_varlen_attention", "usp_groups", "usp_shard", "SequenceParallel",
]
