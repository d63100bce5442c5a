"""Sequence parallelism for packs that outgrow one GPU (torch.distributed, any backend).

Sharding scheme: P ranks of a process group each hold one contiguous slice of the pack's
N tokens, all slices of the same size n = ceil(N / P). The pack is zero-padded at the end
to P * n tokens, so only the last rank(s) hold padding, at most P - 1 rows. N = 37, P = 4:

    tokens  0 ......... 10 ......... 20 ......... 30 ...... 37 (3 zero rows) 40
            |  rank 0    |  rank 1    |  rank 2    |  rank 3                  |

Shard boundaries ignore video boundaries: a video may span ranks.

`shard_pack` cuts any per-token tensor (tokens, positions, segment ids, ...) this way,
`gather_pack` puts the shards back together. Equal shards need no token count at call
time (n is the local shape, N is never read from a device tensor) and make every
all-to-all chunk the same size. Padding rows never touch real tokens: the attention
functions below give them a segment of their own.

Self-attention over the pack (Ulysses, DeepSpeed-Ulysses' scheme): an all-to-all turns
"n tokens x H heads" on every rank into "all P*n tokens x H/P heads", each rank runs
`varlen_attention` over the whole pack for its heads (fused RoPE included), and a second
all-to-all turns the result back. Communication per rank and call: (P-1)/P of its q, k, v
and output shards, (P-1)/P * n * D * (2H + 2Hk) elements, forward; the same again in the
backward. That does not grow with P for a fixed n (unlike all-gathering k and v).

Self-attention with all-gathered keys and values (`allgather_varlen_attention`, the
context-parallel scheme of Llama 3's training): queries stay sharded, k and v shards are
all-gathered (the backward reduce-scatters their gradients), and each rank attends from
its query shard to the whole pack. Any head count works (no divisibility), RoPE rotates
the local q/k shards before the gather (one extra pass, not fused). Communication per
rank: (P-1)/P * N * Hk * D * 2 elements forward, the same for the gradients; it suits GQA
(few kv heads) and head counts that P does not divide.

Cross-attention to text: text keys are short, so they are replicated on every rank and
each rank attends from its own query shard (`local_cross_attention`); no communication.

Ring attention (`ring_varlen_attention`): k/v shards passed around the ring, partial
results merged by their lse (`merge_attention`); a rank holds three k/v shards at most
(its own, the one it computes with, the incoming one), never the whole pack's: for packs
whose keys and values do not fit on one GPU.

Ulysses x ring (USP, the unified sequence parallelism of xDiT / Fang & Zhao 2024,
`usp_varlen_attention`): the P = U x R ranks form R ring groups of U Ulysses ranks each,
as `usp_groups(U)` builds them from consecutive ranks (a node's GPUs with NVLink for the
all-to-all, the ring between nodes). A Ulysses all-to-all turns U shards into one
super-shard of U*n tokens with H/U heads, ring attention runs over the R super-shards,
and a second all-to-all turns the result back. Heads need only be divisible by U (kv heads
fewer than U: replicated, as Ulysses does); per rank the ring moves (R-1) k/v super-shards of H/U heads, the all-to-alls (U-1)/U of the shards.

Not implemented: uneven shards.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import backend as _backend
from .checks import (as_int, check, check_cu_seqlens, check_float, check_same, checked_qkv, positive_int,
                     softmax_scale_of)
from .ops import attention as attn_ops
from .ops.attention import varlen_attention
from .ops.rope import Rope3D, apply_rope_3d


# -- merging partial attention results -------------------------------------------------

def merge_attention(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Merge attention results of the same queries over disjoint parts of their keys.

    Part i gives out_i (Nq, H, D) and lse_i (H, Nq) (what `varlen_attention(...,
    return_lse=True)` returns for that part's keys). With the keys split into parts, the
    softmax over all keys is a weighted mix of the per-part softmaxes:

        lse = log sum_i exp(lse_i)                      (H, Nq)
        out = sum_i exp(lse_i - lse) * out_i            (Nq, H, D), weights broadcast over D

    computed stably around m = max_i lse_i. A part without keys for a row (lse_i = -inf)
    gets weight 0; a row with no keys in any part gets out = 0 and lse = -inf, no NaN, in
    the values and in the gradients. Weights and sums are float32 (float64 for float64
    inputs). outs share one dtype, lses one dtype, all one device. Returns out in outs'
    dtype and lse in lses' dtype (float32 from every backend). Differentiable in outs and
    lses (plain PyTorch ops).

    `varlen_attention` is differentiable through its lse, so gradients through a merge of
    its partial results are those of attention over all the keys.
    """
    check(len(outs) > 0 and len(outs) == len(lses),
          f"need as many outs as lses, at least one (got {len(outs)} and {len(lses)})")
    for i, (o, l) in enumerate(zip(outs, lses)):
        for name, t in ((f"outs[{i}]", o), (f"lses[{i}]", l)):
            check_float(name, t)
        check(o.dim() == 3 and o.shape == outs[0].shape,
              f"outs[{i}] must be (Nq, H, D) like outs[0] {tuple(outs[0].shape)}, "
              f"got {tuple(o.shape)}")
        check(tuple(l.shape) == (o.shape[1], o.shape[0]),
              f"lses[{i}] must be (H, Nq) = {(o.shape[1], o.shape[0])}, got {tuple(l.shape)}")
        # one dtype for the outs and one for the lses (a float64 part would be rounded to
        # the first part's dtype), all on one device
        check_same([f"outs[{i}]", "outs[0]"], [o, outs[0]])
        check_same([f"lses[{i}]", "lses[0]"], [l, lses[0]])
        check(l.device == o.device, f"lses[{i}] is on {l.device} but outs[{i}] is on {o.device}")
    lse_dtype = torch.promote_types(lses[0].dtype, torch.float32)
    acc_dtype = torch.promote_types(outs[0].dtype, lse_dtype)
    stacked = torch.stack([l.to(lse_dtype) for l in lses])          # (P, H, Nq)
    m = stacked.amax(0).detach()                                    # the result is independent of m
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))      # all parts empty: any finite m
    w = torch.exp(stacked - m)                                      # exp(-inf) = 0 for empty parts
    total = w.sum(0)
    has_keys = total > 0
    total = torch.where(has_keys, total, torch.ones_like(total))    # 0/0 and log(0) never happen
    lse = torch.where(has_keys, m + torch.log(total), torch.full_like(total, float("-inf")))
    out = 0
    for o, wi in zip(outs, (w / total).transpose(1, 2)):            # wi: (Nq, H)
        out = out + wi.unsqueeze(-1).to(acc_dtype) * o.to(acc_dtype)
    return out.to(outs[0].dtype), lse.to(lses[0].dtype)


# -- sharding a pack ---------------------------------------------------------------------

def shard_size(num_tokens: int, world_size: int) -> int:
    """Tokens per rank: ceil(num_tokens / world_size); the pack is padded to world_size times it."""
    world_size = positive_int(world_size, "world_size")
    n = as_int(num_tokens)
    if n is None or n < 0:
        raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
    return -(-n // world_size)


def _rank_of(rank, world_size: int) -> int:
    r = as_int(rank)
    if r is None or not 0 <= r < world_size:
        raise ValueError(f"rank {rank!r} is not an int in [0, world_size={world_size})")
    return r


def shard_pack(x: Tensor, world_size: int, rank: int) -> Tensor:
    """Rank `rank`'s slice of a packed (N, ...) tensor: rows [rank*n, (rank+1)*n), n = ceil(N/P).

    Rows past N are zeros (only on the last ranks). Works for any per-token tensor:
    activations, pack.positions, pack.segment_ids. Differentiable; a view when no
    padding is needed.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor (N, ...), got {type(x).__name__}")
    n = shard_size(x.shape[0], world_size)
    rank = _rank_of(rank, world_size)
    piece = x[rank * n:(rank + 1) * n]
    if piece.shape[0] < n:
        piece = torch.cat([piece, piece.new_zeros((n - piece.shape[0],) + tuple(x.shape[1:]))])
    return piece


def shard_mask(num_tokens: int, world_size: int, rank: int, device=None) -> Tensor:
    """(n,) bool: which rows of rank `rank`'s shard are real tokens (False: padding).

    The padding rows of shard_pack are not zero after a layer with a bias, and their
    segment id 0 would give them video 0's modulation: in training, weight the loss with
    this mask so that they contribute no gradient to video 0's conditioning or the weights.
    """
    n = shard_size(num_tokens, world_size)
    rank = _rank_of(rank, world_size)
    return torch.arange(rank * n, (rank + 1) * n, device=device) < operator.index(num_tokens)


def _check_group(group, name: str = "group") -> None:
    """A process group argument: None (the default group) or a ProcessGroup; anything else
    (a Rope3D passed positionally into group's place, a world size) fails here, naming the
    argument, not inside torch.distributed."""
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")


def _world(group) -> tuple[int, int]:
    """(world_size, rank) of `group`; (1, 0) when torch.distributed is not initialized."""
    _check_group(group)
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _checked_num_tokens(num_tokens, shards: int, n: int) -> int:
    """num_tokens as an int, checked against `shards` shards of n rows: shard_pack's
    shards hold P*n rows, the last P*n - N of them padding (fewer than P); a count outside
    that would drop real rows or keep padding ones without a word."""
    num = as_int(num_tokens)
    if num is None or not shards * n - shards < num <= shards * n:
        raise ValueError(f"num_tokens must be the pack's token count N, with {shards} shards of {n} "
                         f"rows between {max(shards * n - shards + 1, 0)} and {shards * n}, got {num_tokens!r}")
    return num


def gather_pack(x_local: Tensor, num_tokens: int, group=None) -> Tensor:
    """The whole pack (num_tokens, ...) on every rank from the shards (padding dropped),
    e.g. before `unpatchify`.

    Differentiable for the usual use, every rank computing the same thing from the whole
    pack (the same loss on the whole output): the backward keeps this rank's rows of its
    own gradient (no communication; Megatron's gather "split" backward). The gradient of
    each parameter on a rank is then that rank's share: all-reduce them with SUM over the
    group (DistributedDataParallel averages, which divides them by P). Where ranks compute
    different things from the gathered pack, compute the loss on the shards instead
    (without their padding rows: shard_mask).
    """
    if not isinstance(x_local, Tensor):
        raise TypeError(f"x_local must be a tensor (n, ...), got {type(x_local).__name__}")
    world_size, _ = _world(group)
    num = _checked_num_tokens(num_tokens, world_size, x_local.shape[0])
    if world_size == 1:
        return x_local[:num]
    return _GatherPack.apply(x_local, group, world_size)[:num]


# -- the differentiable all-to-all ---------------------------------------------------------

def _seq_to_heads(x: Tensor, group, world_size: int) -> Tensor:
    """(n, H, ...) token shard, all heads -> (P*n, H/P, ...) all tokens, this rank's heads."""
    n, h = x.shape[:2]
    rest = tuple(x.shape[2:])
    # chunk j of dim 0 goes to rank j: it must hold head group j of our tokens
    send = x.reshape((n, world_size, h // world_size) + rest).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)          # chunk j: rank j's tokens, our head group
    dist.all_to_all_single(recv, send, group=group)
    return recv.reshape((world_size * n, h // world_size) + rest)


def _heads_to_seq(y: Tensor, group, world_size: int) -> Tensor:
    """(P*n, H/P, ...) all tokens, this rank's heads -> (n, H, ...) token shard, all heads."""
    n, hp = y.shape[0] // world_size, y.shape[1]
    rest = tuple(y.shape[2:])
    send = y.reshape((world_size, n, hp) + rest).contiguous()  # chunk j: rank j's tokens
    recv = torch.empty_like(send)          # chunk j: our tokens, head group j
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape((n, world_size * hp) + rest)


class _AllToAll(torch.autograd.Function):
    """Tokens <-> heads all-to-all; a permutation, so its backward is the reverse one."""

    @staticmethod
    def forward(ctx, x, group, world_size, to_heads):
        ctx.args = (group, world_size, to_heads)
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group, world_size)

    @staticmethod
    def backward(ctx, grad):
        group, world_size, to_heads = ctx.args
        back = _heads_to_seq if to_heads else _seq_to_heads
        return back(grad.contiguous(), group, world_size), None, None, None


# all_gather_single / reduce_scatter_single are the current names (torch 2.13 has them;
# 2.14 deprecates all_gather_into_tensor / reduce_scatter_tensor with a FutureWarning on
# every call); torch 2.11, the GPU machines', has only the old ones
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGather(torch.autograd.Function):
    """(n, ...) shard -> (P*n, ...) on every rank; backward: sum the gradients of each rank's
    copy and keep this rank's rows (reduce-scatter; all-reduce + slice where the process
    group's backend, e.g. gloo, has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, world_size):
        ctx.args = (group, world_size)
        x = x.contiguous()
        out = x.new_empty((world_size * x.shape[0],) + tuple(x.shape[1:]))
        _all_gather_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        group, world_size = ctx.args
        grad = grad.contiguous()
        n = grad.shape[0] // world_size
        # "nccl", or "cpu:gloo,cuda:nccl" from init_process_group() without a backend: NCCL
        # serves CUDA tensors there
        if grad.is_cuda and "nccl" in str(dist.get_backend(group)):
            out = grad.new_empty((n,) + tuple(grad.shape[1:]))
            _reduce_scatter_single(out, grad, group=group)
            return out, None, None
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        rank = dist.get_rank(group)
        return grad[rank * n:(rank + 1) * n].contiguous(), None, None


class _GatherPack(_AllGather):
    """_AllGather whose backward keeps this rank's rows of its own gradient (gather_pack:
    every rank's copy is taken to get the same gradient, so nothing is summed)."""

    @staticmethod
    def backward(ctx, grad):
        group, world_size = ctx.args
        n = grad.shape[0] // world_size
        return grad.narrow(0, dist.get_rank(group) * n, n), None, None


# -- attention over a sharded pack ---------------------------------------------------------

def _checked_shards(q_local: Tensor, k_local: Tensor, v_local: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                    world_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """varlen_attention's argument checks for self-attention over a pack cut into
    world_size shards of n rows: q_local (n, H, D), k_local and v_local (n, Hk, D), floating
    tensors of one dtype and device (cast to the autocast dtype under torch.autocast, as
    varlen_attention does: before the communication, which then moves fewer bytes), Hk
    dividing H; cu_seqlens the whole pack's int32 offsets, ending at N with
    P*n - P < N <= P*n (the rows past N are the padding of shard_pack), max_seqlen an upper
    bound of its segments (values checked as varlen_attention checks them: on CPU tensors,
    on GPU ones with VDIT_CHECK_VALUES=1). Returns q, k, v as cast."""
    q, k, v = checked_qkv(q_local, k_local, v_local, ("q_local", "k_local", "v_local"))
    check(q.shape[0] == k.shape[0],
          "q_local, k_local and v_local must hold the same tokens (self-attention over the pack)")
    check_cu_seqlens("cu_seqlens", cu_seqlens, world_size * q.shape[0], max_seqlen, q.device,
                     padding=world_size - 1)
    return q, k, v


def ulysses_varlen_attention(q_local: Tensor, k_local: Tensor, v_local: Tensor,
                             cu_seqlens: Tensor, max_seqlen: int, group=None,
                             rope: Optional[Rope3D] = None, softmax_scale: Optional[float] = None,
                             return_lse: bool = False, deterministic: bool = False, *,
                             backend: Optional[str] = None):
    """Self-attention over a pack sharded by tokens across `group` (Ulysses).

    q_local (n, H, D), k_local / v_local (n, Hk, D): this rank's `shard_pack` slice of the
    pack's q, k, v, with all heads; every rank holds n tokens. H must be divisible by P =
    the group's size, and Hk too, or divide P (GQA with fewer kv heads than ranks: each is
    replicated P / Hk times, which multiplies the k/v all-to-all's bytes by that).
    cu_seqlens int32 (B+1,), max_seqlen: the WHOLE pack's (e.g. pack.cu_seqlens,
    pack.max_seqlen), the same on every rank. rope: a Rope3D over
    the whole pack's positions (Rope3D.from_pack(pack, ...)), N or P*n rows; it stays
    fused into the attention kernels.

        rank r: q_local (n, H, D) --all-to-all--> (P*n, H/P, D)   all tokens, heads of group r
                varlen_attention over the whole pack for those heads
                out (P*n, H/P, D) --all-to-all--> (n, H, D)      rank r's tokens, all heads

    Equals varlen_attention on the gathered pack, restricted to this rank's tokens;
    padding rows (past N) attend only among themselves. Returns out (n, H, D) and with
    return_lse=True also lse (H, n) float32 (float64 for float64). Differentiable in q,
    k, v through out and lse (the backward runs the reverse all-to-alls). With
    torch.distributed not initialized and group=None it is plain varlen_attention (P = 1).
    Every rank must call it (a collective).
    """
    world_size, _ = _world(group)
    q_local, k_local, v_local = _checked_shards(q_local, k_local, v_local, cu_seqlens, max_seqlen, world_size)
    k_local, v_local = _ulysses_heads(q_local, k_local, v_local, world_size, "the sequence-parallel world size")
    n_pad = world_size * q_local.shape[0]
    if rope is not None:
        if not isinstance(rope, Rope3D):
            raise TypeError(f"rope must be a Rope3D, got {type(rope).__name__}")
        rows = rope.positions.shape[0]
        check(n_pad - world_size < rows <= n_pad,
              f"rope.positions has {rows} rows; it must hold the whole pack's positions "
              f"(N rows with {n_pad - world_size} < N <= {n_pad} for {world_size} shards of "
              f"{q_local.shape[0]} tokens)")
        if rows < n_pad:  # (padded as the attention takes them: float; a pack's converted once per pack)
            positions = rope.positions_for(q_local.dtype)
            pad = positions.new_zeros(n_pad - rows, positions.shape[1])
            rope = dataclasses.replace(rope, positions=torch.cat([positions, pad]))
    # the padding rows [N, P*n) form one more segment (empty when N = P*n): no device read
    cu = torch.cat([cu_seqlens, cu_seqlens.new_full((1,), n_pad)])
    max_len = max(int(max_seqlen), world_size - 1)
    if world_size == 1:
        q, k, v = q_local, k_local, v_local
    else:
        q, k, v = (_AllToAll.apply(t, group, world_size, True) for t in (q_local, k_local, v_local))
    out, lse = varlen_attention(q, k, v, cu, cu, max_len, max_len, softmax_scale=softmax_scale,
                                return_lse=True, rope=rope, deterministic=deterministic,
                                backend=backend)
    if world_size > 1:
        out = _AllToAll.apply(out, group, world_size, False)
        if return_lse:  # (H/P, P*n) -> (n, H/P)-shaped all-to-all back -> (H, n), differentiable
            lse = _AllToAll.apply(lse.t().contiguous(), group, world_size, False).t().contiguous()
    return (out, lse) if return_lse else out


def _ulysses_heads(q, k, v, size: int, what: str):
    """Checks the heads of q, k, v (n, heads, D) for a Ulysses all-to-all over `size` ranks,
    which gives each rank heads / size of them; returns k, v with their heads replicated
    where there are fewer kv heads than ranks (GQA): Hk dividing size, each kv head
    repeated size / Hk times, so every rank holds the kv head of its q heads (the q heads
    h of a rank keep their kv head h // (H / Hk)); the all-to-all then moves size / Hk times
    the k/v bytes, and the replicas' gradients sum back (repeat_interleave's backward)."""
    for name, t in (("q_local", q), ("k_local", k), ("v_local", v)):
        check(t.dim() == 3, f"{name} must be (tokens, heads, head_dim), got shape {tuple(t.shape)}")
    check(q.shape[1] % size == 0,
          f"q_local has {q.shape[1]} heads, not divisible by {what} {size} "
          f"(Ulysses gives each rank heads / {size} heads)")
    for name, t in (("k_local", k), ("v_local", v)):
        hk = t.shape[1]
        check(hk > 0 and (hk % size == 0 or (size % hk == 0 and q.shape[1] % hk == 0)),
              f"{name} has {hk} heads, neither divisible by {what} {size} nor dividing it "
              f"(kv heads are replicated up to {size} when they divide it)")
    if k.shape[1] < size:  # GQA with fewer kv heads than ranks
        k, v = (t.repeat_interleave(size // t.shape[1], dim=1) for t in (k, v))
    return k, v


def _rotate_shards(q_local, k_local, rope, world_size, rank, backend):
    """RoPE applied to the local q/k shards (positions: this rank's slice of the pack's), for
    the schemes that attend from a query shard to other ranks' keys; q, k, v as
    _checked_shards returned them."""
    n = q_local.shape[0]
    n_pad = world_size * n
    if rope is not None:
        if not isinstance(rope, Rope3D):
            raise TypeError(f"rope must be a Rope3D, got {type(rope).__name__}")
        rows = rope.positions.shape[0]
        check(n_pad - world_size < rows <= n_pad,
              f"rope.positions has {rows} rows; it must hold the whole pack's positions "
              f"(N rows with {n_pad - world_size} < N <= {n_pad} for {world_size} shards of {n} tokens)")
        positions = rope.positions_for(q_local.dtype)  # (float; a pack's converted once per pack)
        positions = shard_pack(positions, world_size, rank) if world_size > 1 else positions
        q_local, k_local = apply_rope_3d(q_local, k_local, None, rope.dims, rope.theta, rope.interleaved,
                                         positions=positions, backend=backend)
    return q_local, k_local


def _shard_offsets(cu_seqlens: Tensor, shard: int, n: int) -> Tensor:
    """Segment offsets inside token shard `shard` (rows [shard*n, (shard+1)*n)): video i's
    tokens clamped to the shard, then the padding rows [N, P*n) as one more segment (empty
    unless the shard holds padding). Computed on the device: no host sync."""
    return torch.cat([(cu_seqlens - shard * n).clamp(0, n), cu_seqlens.new_full((1,), n)])


def allgather_varlen_attention(q_local: Tensor, k_local: Tensor, v_local: Tensor,
                               cu_seqlens: Tensor, max_seqlen: int, group=None,
                               rope: Optional[Rope3D] = None, softmax_scale: Optional[float] = None,
                               return_lse: bool = False, deterministic: bool = False, *,
                               backend: Optional[str] = None):
    """Self-attention over a pack sharded by tokens, with all-gathered keys and values.

    Arguments as ulysses_varlen_attention: q_local (n, H, D), k_local / v_local (n, Hk, D)
    this rank's `shard_pack` slice with all heads; cu_seqlens, max_seqlen and rope (its
    positions) of the WHOLE pack. Any H and Hk (no divisibility by the world size).

        rank r: k_local, v_local (n, Hk, D) --all-gather--> (P*n, Hk, D), the whole pack
                varlen_attention: video i's tokens on rank r (clamped offsets, computed on
                the device) attend to all of video i's tokens
                -> out (n, H, D) for rank r's tokens

    With rope, q_local and k_local are rotated with this rank's positions before the
    gather (apply_rope_3d, one pass over the shards). Equals varlen_attention on the
    gathered pack, restricted to this rank's tokens; padding rows attend only among
    themselves. Returns out (n, H, D) [and lse (H, n) float32, float64 for float64]; differentiable in q, k, v
    through out and lse (the k/v gradients are reduce-scattered back to their ranks).
    Without torch.distributed initialized it is plain varlen_attention (P = 1).
    """
    world_size, rank = _world(group)
    q_local, k_local, v_local = _checked_shards(q_local, k_local, v_local, cu_seqlens, max_seqlen, world_size)
    q_local, k_local = _rotate_shards(q_local, k_local, rope, world_size, rank, backend)
    n = q_local.shape[0]
    n_pad = world_size * n
    if world_size > 1:
        k, v = (_AllGather.apply(t, group, world_size) for t in (k_local, v_local))
    else:
        k, v = k_local, v_local
    # queries: video i's tokens on this shard; keys: all of video i (and padding with padding)
    cu_q = _shard_offsets(cu_seqlens, rank, n)
    cu_k = torch.cat([cu_seqlens, cu_seqlens.new_full((1,), n_pad)])
    max_q = max(min(int(max_seqlen), n), min(n, world_size - 1))
    max_k = max(int(max_seqlen), world_size - 1)
    return varlen_attention(q_local, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=softmax_scale,
                            return_lse=return_lse, deterministic=deterministic, backend=backend)


def _ring_shift(tensors, group, world_size: int, rank: int, forward: bool = True):
    """Send `tensors` to the next rank (forward) or the previous one, receive the matching
    ones from the other side; returns (received tensors, requests to wait on)."""
    dst = (rank + 1) % world_size if forward else (rank - 1) % world_size
    src = (rank - 1) % world_size if forward else (rank + 1) % world_size
    if group is not None:  # P2P ops name peers by their global rank
        dst, src = dist.get_global_rank(group, dst), dist.get_global_rank(group, src)
    recv = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), dst, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, src, group) for r in recv]
    return recv, dist.batch_isend_irecv(ops)


class _RingAttention(torch.autograd.Function):
    """Ring attention over token shards. Step s: this rank (r) attends from its queries to
    the k/v shard of rank j = r - s (mod P), passed along the ring, and merges the partial
    result by its lse. The backward runs the ring again with the final out and lse (so
    each block's P = exp(S - lse) is final): dQ accumulates here, dK/dV accumulators travel
    with their k/v shard and arrive home after a last shift. Memory: three k/v shards at
    most (its own, kept for the backward, the current and the incoming one; in the
    backward also the travelling float32 dK/dV accumulators and their incoming copies),
    never the whole pack's."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale, deterministic, backend, group, max_padding):
        # max_padding: a bound on the pack's padding rows (their own segment, at the end):
        # P - 1 for P shards, which exceeds the ring's size - 1 where its shards are USP's
        # super-shards (R ring ranks for P = U * R shards)
        world_size, rank = _world(group)
        n = q.shape[0]
        cu_q = _shard_offsets(cu_seqlens, rank, n)
        max_len = max(min(int(max_seqlen), n), min(n, max_padding))
        out = lse = None
        # the running result in float32 (float64 for float64): merged in q's dtype it was
        # rounded once per step, its error growing with the ring's size (bfloat16, 16
        # ranks: 5x a single process's)
        acc = torch.promote_types(q.dtype, torch.float32)
        k_cur, v_cur = k, v
        for step in range(world_size):
            pending = None
            if step + 1 < world_size:  # the next shard travels while this one is computed
                (k_next, v_next), pending = _ring_shift([k_cur, v_cur], group, world_size, rank)
            j = (rank - step) % world_size
            o, l = attn_ops.varlen_attention_op(q, k_cur, v_cur, cu_q, _shard_offsets(cu_seqlens, j, n),
                                                max_len, max_len, scale, None, [], 10000.0, True,
                                                deterministic, backend)
            o = o.to(acc)
            out, lse = (o, l) if out is None else merge_attention([out, o], [lse, l])
            if pending is not None:
                for req in pending:
                    req.wait()
                k_cur, v_cur = k_next, v_next
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.args = (max_len, scale, deterministic, backend, group)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        max_len, scale, deterministic, backend, group = ctx.args
        world_size, rank = _world(group)
        n = q.shape[0]
        cu_q = _shard_offsets(cu_seqlens, rank, n)
        grad_out = grad_out.contiguous()
        grad_lse = None if grad_lse is None else grad_lse.to(lse.dtype).contiguous()
        acc = torch.promote_types(q.dtype, torch.float32)  # float64 stays float64 (gradcheck)
        dq = torch.zeros_like(q, dtype=acc)
        k_cur, v_cur = k, v
        dk_acc = torch.zeros_like(k, dtype=acc)
        dv_acc = torch.zeros_like(v, dtype=acc)
        for step in range(world_size):
            pending = None
            if step + 1 < world_size:
                (k_next, v_next), pending = _ring_shift([k_cur, v_cur], group, world_size, rank)
            j = (rank - step) % world_size
            gq, gk, gv = attn_ops.varlen_attention_backward_op(
                grad_out, q, k_cur, v_cur, out, lse, grad_lse, cu_q, _shard_offsets(cu_seqlens, j, n),
                max_len, max_len, scale, None, [], 10000.0, True, deterministic, backend)
            dq += gq
            dk_acc += gk
            dv_acc += gv
            # the accumulators follow their shard: after the last step one more shift home
            (dk_acc, dv_acc), acc_pending = _ring_shift([dk_acc, dv_acc], group, world_size, rank) \
                if world_size > 1 else ((dk_acc, dv_acc), [])
            for req in (pending or []) + list(acc_pending):
                req.wait()
            if pending is not None:
                k_cur, v_cur = k_next, v_next
        return (dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype)) + (None,) * 7


def ring_varlen_attention(q_local: Tensor, k_local: Tensor, v_local: Tensor,
                          cu_seqlens: Tensor, max_seqlen: int, group=None,
                          rope: Optional[Rope3D] = None, softmax_scale: Optional[float] = None,
                          return_lse: bool = False, deterministic: bool = False, *,
                          backend: Optional[str] = None):
    """Self-attention over a pack sharded by tokens, keys and values passed around a ring.

    Arguments as allgather_varlen_attention (any head count). P steps: at step s, rank r
    attends from its query shard to the k/v shard of rank r - s (offsets of both shards
    clamped on the device), merging the partial results by their lse (merge_attention),
    while the next k/v shard is sent/received (isend/irecv) behind the compute. No rank
    ever holds more than three k/v shards (its own, the current, the incoming), so packs
    whose keys and values do not fit on one GPU work; each rank sends and receives (P-1)
    k/v shards in the forward, and in the backward as many again plus P shifts of the
    float32 dK/dV accumulators. RoPE rotates the local shards first (not fused). Equals
    varlen_attention on the gathered pack, restricted to this rank's tokens (the running
    result is kept in float32).
    Returns out (n, H, D) [and lse (H, n) float32, float64 for float64]; differentiable in
    q, k, v through out and lse. Without torch.distributed initialized it is plain
    varlen_attention (P = 1).
    """
    world_size, rank = _world(group)
    q_local, k_local, v_local = _checked_shards(q_local, k_local, v_local, cu_seqlens, max_seqlen, world_size)
    q_local, k_local = _rotate_shards(q_local, k_local, rope, world_size, rank, backend)
    out, lse = _ring(q_local, k_local, v_local, cu_seqlens, max_seqlen, group, softmax_scale,
                     deterministic, backend, max_padding=world_size - 1)
    return (out, lse) if return_lse else out


def _ring(q, k, v, cu_seqlens, max_seqlen, group, softmax_scale, deterministic, backend, max_padding):
    """_RingAttention over `group` for checked (_checked_shards) and rotated shards: (out, lse)."""
    scale = softmax_scale_of(softmax_scale, q.shape[2])
    name = _backend.resolve(attn_ops.FAMILY, q.device, backend, "varlen_attention_bwd", q.dtype)
    return _RingAttention.apply(q, k, v, cu_seqlens, int(max_seqlen), scale,
                                bool(deterministic), name, group, int(max_padding))


def usp_groups(ulysses_size: int):
    """(ulysses_group, ring_group) of this rank for usp_varlen_attention over the whole
    job (the default process group, P ranks, U = ulysses_size): R = P / U Ulysses groups of
    U consecutive ranks, [0, U), [U, 2U), ..., and U ring groups of ranks U apart,
    {0, U, 2U, ...}, {1, U + 1, ...}, ... Global rank r then holds shard r of P
    (shard_pack(x, P, r)), and with ranks numbered node by node and U at most the GPUs of
    a node, the all-to-alls stay inside a node and only the ring crosses nodes.

    Every process of the job must call it, in the same order as its other group creations
    (torch.distributed.new_group's rule). Without torch.distributed initialized:
    ulysses_size must be 1, and it returns (None, None) (usp_varlen_attention is then plain
    attention).
    """
    u = positive_int(ulysses_size, "ulysses_size")
    world_size, _ = _world(None)
    if world_size % u:
        raise ValueError(f"ulysses_size {u} does not divide the world size {world_size}")
    if not (dist.is_available() and dist.is_initialized()):
        return None, None
    ranks = list(range(world_size))
    ulysses, _ = dist.new_subgroups_by_enumeration([ranks[i:i + u] for i in range(0, world_size, u)])
    ring, _ = dist.new_subgroups_by_enumeration([ranks[j::u] for j in range(u)])
    return ulysses, ring


_USP_LAYOUTS_CHECKED: set = set()


def usp_shard(ulysses_group, ring_group) -> tuple[int, int]:
    """(P, s): the number of shards and the one this rank must hold for
    usp_varlen_attention over these groups, s = ring rank * U + Ulysses rank; so
    `shard_pack(x, *vk.usp_shard(ulysses_group, ring_group))` is this rank's shard (with
    usp_groups, s is the global rank). (1, 0) without torch.distributed initialized.

    The first call per pair of groups checks that they form a grid (the members of a
    Ulysses group share one ring rank, those of a ring group one Ulysses rank; one small
    all-gather in each group, collective), since other groups would put a super-shard's
    pieces on ranks of different ring positions: a ValueError, not a wrong result.
    """
    _check_group(ulysses_group, "ulysses_group")
    _check_group(ring_group, "ring_group")
    if not (dist.is_available() and dist.is_initialized()):
        check(ulysses_group is None and ring_group is None,
              "process groups given, but torch.distributed is not initialized")
        return 1, 0
    check(ulysses_group is not None and ring_group is not None,
          "USP needs both process groups (ulysses_group, ring_group = vk.usp_groups(ulysses_size)); "
          "None would mean the whole world for each")
    # (both checked above: ProcessGroups of an initialized world)
    u_size, u_rank = dist.get_world_size(ulysses_group), dist.get_rank(ulysses_group)
    r_size, r_rank = dist.get_world_size(ring_group), dist.get_rank(ring_group)
    key = (ulysses_group.group_name, ring_group.group_name)
    if key not in _USP_LAYOUTS_CHECKED:
        ring_ranks = [None] * u_size
        dist.all_gather_object(ring_ranks, r_rank, group=ulysses_group)
        ulysses_ranks = [None] * r_size
        dist.all_gather_object(ulysses_ranks, u_rank, group=ring_group)
        if len(set(ring_ranks)) != 1 or len(set(ulysses_ranks)) != 1:
            raise ValueError(
                "ulysses_group and ring_group do not form a grid: the members of this rank's Ulysses "
                f"group have ring ranks {ring_ranks}, those of its ring group Ulysses ranks "
                f"{ulysses_ranks} (each must be one value); build them with vk.usp_groups")
        _USP_LAYOUTS_CHECKED.add(key)
    return u_size * r_size, r_rank * u_size + u_rank


def usp_varlen_attention(q_local: Tensor, k_local: Tensor, v_local: Tensor,
                         cu_seqlens: Tensor, max_seqlen: int, ulysses_group=None, ring_group=None,
                         rope: Optional[Rope3D] = None, softmax_scale: Optional[float] = None,
                         return_lse: bool = False, deterministic: bool = False, *,
                         backend: Optional[str] = None):
    """Self-attention over a pack sharded by tokens, Ulysses inside groups and a ring
    between them (USP).

    Arguments as ulysses_varlen_attention, with two groups instead of one (usp_groups
    builds them): U = ulysses_group's size, R = ring_group's, P = U * R shards. This rank
    (Ulysses rank u, ring rank r) must hold shard s = r * U + u of the pack's P shards:
    shard_pack(x, *usp_shard(ulysses_group, ring_group)) (with usp_groups, s is the global
    rank; groups that do not form such a grid raise). H must be divisible by U (not by
    P), and Hk too, or divide U (then replicated, as in ulysses_varlen_attention).

        rank (r, u): q_local (n, H, D) --all-to-all in ulysses_group--> (U*n, H/U, D):
                     super-shard r (shards rU .. rU+U-1), head group u
                     ring attention over ring_group's R super-shards (ring_varlen_attention)
                     out (U*n, H/U, D) --all-to-all in ulysses_group--> (n, H, D)

    RoPE rotates the local shards first (rope: the whole pack's positions; one pass, not
    fused). Equals varlen_attention on the gathered pack, restricted to this rank's tokens;
    padding rows attend only among themselves. Returns out (n, H, D) [and lse (H, n)
    float32, float64 for float64]; differentiable in q, k, v through out and lse. U = 1 is
    ring attention, R = 1 Ulysses (with RoPE unfused). Without torch.distributed initialized (both groups None)
    it is plain varlen_attention. Every rank of both groups must call it (collectives).
    """
    world_size, shard = usp_shard(ulysses_group, ring_group)
    u_size = _world(ulysses_group)[0]
    q_local, k_local, v_local = _checked_shards(q_local, k_local, v_local, cu_seqlens, max_seqlen, world_size)
    q_local, k_local = _rotate_shards(q_local, k_local, rope, world_size, shard, backend)
    # (after the rotation: RoPE rotates the Hk kv heads, not their replicas)
    k_local, v_local = _ulysses_heads(q_local, k_local, v_local, u_size, "the Ulysses group's size")
    if u_size > 1:
        q, k, v = (_AllToAll.apply(t, ulysses_group, u_size, True) for t in (q_local, k_local, v_local))
    else:
        q, k, v = q_local, k_local, v_local
    out, lse = _ring(q, k, v, cu_seqlens, max_seqlen, ring_group, softmax_scale, deterministic,
                     backend, max_padding=world_size - 1)
    if u_size > 1:
        out = _AllToAll.apply(out, ulysses_group, u_size, False)
        if return_lse:  # (H/U, U*n) -> (U*n, H/U) -> all-to-all back -> (n, H) -> (H, n)
            lse = _AllToAll.apply(lse.t().contiguous(), ulysses_group, u_size, False).t().contiguous()
    return (out, lse) if return_lse else out


def local_cross_attention(q_local: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                          cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, group=None,
                          softmax_scale: Optional[float] = None, return_lse: bool = False,
                          deterministic: bool = False, *, backend: Optional[str] = None):
    """Per-video cross-attention from this rank's query shard to replicated text keys.

    q_local (n, H, D): this rank's `shard_pack` slice of the queries; k, v (Nk, Hk, D):
    ALL text tokens, the same on every rank; cu_seqlens_q / max_seqlen_q: the whole
    pack's (pack.cu_seqlens, pack.max_seqlen); cu_seqlens_k / max_seqlen_k: the text's
    (pack.cu_seqlens_k, pack.max_seqlen_k). Video i's tokens on this rank (possibly none,
    possibly part of the video) attend to video i's text; padding rows get out = 0,
    lse = -inf. No communication: the shard offsets are computed on the device.
    The gradients of k and v are this rank's share: sum them over the group (they
    usually come from a replicated projection whose weight gradients are all-reduced).
    """
    return _local_cross(q_local, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        *_world(group), softmax_scale, return_lse, deterministic, backend)


def _local_cross(q_local, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, world_size, rank,
                 softmax_scale, return_lse, deterministic, backend):
    """local_cross_attention for shard `rank` of `world_size`."""
    check_float("q_local", q_local)
    check(q_local.dim() == 3,
          f"q_local must be (tokens, heads, head_dim), got shape {tuple(q_local.shape)}")
    n = q_local.shape[0]
    # (varlen_attention checks the rest, on the offsets below: these must be the whole
    # pack's and the text's, one segment per video each)
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, world_size * n, max_seqlen_q, q_local.device,
                     padding=world_size - 1)
    if not isinstance(k, Tensor):
        raise TypeError(f"k must be a tensor (Nk, Hk, D), got {type(k).__name__}")
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q_local.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k "
                         f"{tuple(cu_seqlens_k.shape)} must hold one segment per video each")
    start = rank * n
    # segment i of the shard = video i's tokens clamped to [start, start + n); then padding
    cu_q = torch.cat([(cu_seqlens_q - start).clamp(0, n), cu_seqlens_q.new_full((1,), n)])
    cu_k = torch.cat([cu_seqlens_k, cu_seqlens_k[-1:]])
    # real segments are at most min(max_seqlen_q, n) long, the padding at most min(n, P - 1)
    max_q = max(min(int(max_seqlen_q), n), min(n, world_size - 1))
    return varlen_attention(q_local, k, v, cu_q, cu_k, max_q, max_seqlen_k,
                            softmax_scale=softmax_scale, return_lse=return_lse,
                            deterministic=deterministic, backend=backend)


# -- a layout object ---------------------------------------------------------------------

SCHEMES = ("ulysses", "allgather", "ring", "usp")


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """One sequence-parallel layout, for code that runs a whole model on shards (as
    vdit_kernels.model's VideoDiT does with forward(..., sp=)): the self-attention
    scheme and its process group(s), and the shard this rank holds.

    scheme: "ulysses", "allgather" or "ring" over `group` (None: the default group; this
    rank holds shard group rank of group size), or "usp" over `group` = the Ulysses group
    and `ring_group` (usp_groups(U) makes both; this rank holds shard usp_shard(...)).
    Without torch.distributed initialized (and no groups) every layout is P = 1.
    """

    scheme: str = "ulysses"
    group: object = None
    ring_group: object = None

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        _check_group(self.group)
        _check_group(self.ring_group, "ring_group")
        usp_distributed = self.scheme == "usp" and dist.is_available() and dist.is_initialized()
        if (self.ring_group is not None) != usp_distributed:
            raise ValueError("ring_group is for scheme='usp' (with torch.distributed initialized), and "
                             "usp needs it: group, ring_group = vk.usp_groups(ulysses_size)")

    @property
    def shard(self) -> tuple[int, int]:
        """(P, s): the number of shards and this rank's (usp: collective on first use)."""
        if self.scheme == "usp":
            return usp_shard(self.group, self.ring_group)
        return _world(self.group)

    def shard_pack(self, x: Tensor) -> Tensor:
        """This rank's rows of a packed (N, ...) tensor (shard_pack)."""
        return shard_pack(x, *self.shard)

    def shard_mask(self, num_tokens: int, device=None) -> Tensor:
        """Which rows of this rank's shard are real tokens (shard_mask)."""
        return shard_mask(num_tokens, *self.shard, device=device)

    def gather_pack(self, x_local: Tensor, num_tokens: int) -> Tensor:
        """The whole (num_tokens, ...) pack on every rank, shards in shard order
        (gather_pack, and its backward)."""
        if self.scheme != "usp" or self.shard[0] == 1:
            return gather_pack(x_local, num_tokens, self.group)
        # checked against all P = U*R shards: the pack's padding (up to P - 1 rows) may
        # exceed what one ring-level gather allows (R - 1), so both levels gather every row
        # (Ulysses group: this super-shard's U shards in order; ring group: the
        # super-shards) and the padding goes last
        num = _checked_num_tokens(num_tokens, self.shard[0], x_local.shape[0])
        x = gather_pack(x_local, _world(self.group)[0] * x_local.shape[0], self.group)
        return gather_pack(x, _world(self.ring_group)[0] * x.shape[0], self.ring_group)[:num]

    def self_attention(self, q_local: Tensor, k_local: Tensor, v_local: Tensor, cu_seqlens: Tensor,
                       max_seqlen: int, rope: Optional[Rope3D] = None, softmax_scale: Optional[float] = None,
                       return_lse: bool = False, deterministic: bool = False, *,
                       backend: Optional[str] = None):
        """Self-attention over the sharded pack by this layout's scheme (the functions
        above; cu_seqlens, max_seqlen and rope of the whole pack)."""
        kwargs = dict(rope=rope, softmax_scale=softmax_scale, return_lse=return_lse,
                      deterministic=deterministic, backend=backend)
        if self.scheme == "usp":
            return usp_varlen_attention(q_local, k_local, v_local, cu_seqlens, max_seqlen, self.group,
                                        self.ring_group, **kwargs)
        attention = {"ulysses": ulysses_varlen_attention, "allgather": allgather_varlen_attention,
                     "ring": ring_varlen_attention}[self.scheme]
        return attention(q_local, k_local, v_local, cu_seqlens, max_seqlen, self.group, **kwargs)

    def cross_attention(self, q_local: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                        cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                        softmax_scale: Optional[float] = None, return_lse: bool = False,
                        deterministic: bool = False, *, backend: Optional[str] = None):
        """local_cross_attention from this rank's query shard to replicated text keys."""
        return _local_cross(q_local, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            *self.shard, softmax_scale, return_lse, deterministic, backend)
