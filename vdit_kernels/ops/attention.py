"""Variable-length (packed) attention with optional fused 3D RoPE.

Backend contract (every backend module for the "attention" family provides):
  varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       softmax_scale, rope) -> (out (Nq, H, D), lse (H, Nq) float32)
      (float64 lse for float64 inputs, on the reference path)
  varlen_attention_bwd(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k,
                       max_seqlen_q, max_seqlen_k, softmax_scale, rope, deterministic)
      -> (grad_q, grad_k, grad_v)
  DTYPES: the dtypes it computes in (vdit_kernels.backend resolves by device and dtype)
grad_lse is None or (H, Nq) in lse's dtype: the gradient flowing into lse (when partial results
are merged, e.g. vdit_kernels.parallel.merge_attention). Since d lse_i / d S_ij = P_ij,
it enters the backward as dS = P * (dP - (rowsum(dO * O) - grad_lse)).
rope is None or a tuple (positions float32 (N, 3) (float64 for float64 q), dims, theta,
interleaved): q and k are rotated first (the Triton backend: one pass of the RoPE kernel
before the attention kernels); grads are w.r.t. the unrotated q and k.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backend
from .. import reference as ref
from ..checks import (check, check_cu_seqlens, check_flag, check_positions, check_rope_dims, check_theta,
                      checked_qkv, softmax_scale_of)
from .direct import call, define, register_autograd
from .rope import Rope3D

FAMILY = "attention"


def _rope_tuple(positions, dims, theta, interleaved):
    return None if positions is None else (positions, list(dims), theta, interleaved)


@ref.without_autocast
class _Reference:
    @staticmethod
    def _forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, rope):
        if rope is not None:
            positions, dims, theta, interleaved = rope
            q, k = ref.apply_rope_3d(q, k, None, dims, theta, interleaved, positions=positions)
        return ref.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, return_lse=True)

    @staticmethod
    def varlen_attention_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, rope):
        return _Reference._forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, rope)

    @staticmethod
    def varlen_attention_bwd(grad_out, q, k, v, out, lse, grad_lse, cu_q, cu_k, max_q, max_k, scale,
                             rope, deterministic):
        # Explicit FlashAttention backward math per segment (autograd is off inside an op):
        #   P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O) + dlse),
        #   dQ = scale dS K, dK = scale dS^T Q; RoPE'd q/k are rotated back at the end.
        # (P from the given lse, not a softmax of these keys' scores: ring attention calls the
        # backward for a subset of the keys with the whole row's lse)
        cd = ref.compute_dtype(q.dtype)
        qr, kr = q, k
        if rope is not None:  # rotated in the input dtype, as the forward's scores saw them
            positions, dims, theta, interleaved = rope
            qr, kr = ref.apply_rope_3d(q, k, None, dims, theta, interleaved, positions=positions)
        qf, kf, vf = qr.to(cd), kr.to(cd), v.to(cd)
        do, o = grad_out.to(cd), out.to(cd)
        groups = q.shape[1] // k.shape[1]
        # contiguous, as the kernels' (zeros_like would keep a permuted q's layout)
        dq, dk, dv = qf.new_zeros(qf.shape), kf.new_zeros(kf.shape), vf.new_zeros(vf.shape)
        cq, ck = cu_q.tolist(), cu_k.tolist()
        if groups == 0:  # no query heads: no scores, every gradient is zero
            cq = []
        for i in range(len(cq) - 1):
            sq, sk = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
            if cq[i] == cq[i + 1] or ck[i] == ck[i + 1]:
                continue  # no scores: every gradient of this segment is zero
            qi = qf[sq].transpose(0, 1)  # (H, Lq, D)
            ki = kf[sk].transpose(0, 1).repeat_interleave(groups, 0)
            vi = vf[sk].transpose(0, 1).repeat_interleave(groups, 0)
            doi, oi = do[sq].transpose(0, 1), o[sq].transpose(0, 1)
            p = torch.exp((qi @ ki.transpose(1, 2)) * scale - lse[:, sq, None].to(cd))
            dvi = p.transpose(1, 2) @ doi
            ds = p * (doi @ vi.transpose(1, 2) - (doi * oi).sum(-1, keepdim=True))
            if grad_lse is not None:
                ds = ds + p * grad_lse[:, sq, None].to(cd)
            dq[sq] = (scale * ds @ ki).transpose(0, 1)
            dki = scale * ds.transpose(1, 2) @ qi
            h, lk = dki.shape[0] // groups, dki.shape[1]
            dk[sk] = dki.reshape(h, groups, lk, -1).sum(1).transpose(0, 1)
            dv[sk] = dvi.reshape(h, groups, lk, -1).sum(1).transpose(0, 1)
        if rope is not None:
            dq, dk = ref.apply_rope_3d(dq, dk, None, dims, theta, interleaved, positions=positions,
                                       inverse=True)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _impl(backend: str):
    return _Reference if backend == "reference" else _backend.implementation(backend, FAMILY)


def _varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                      max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                      rope_positions: Optional[Tensor], rope_dims: list[int], rope_theta: float,
                      rope_interleaved: bool, deterministic: bool,
                      backend: str) -> tuple[Tensor, Tensor]:
    rope = _rope_tuple(rope_positions, rope_dims, rope_theta, rope_interleaved)
    return _impl(backend).varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                               max_seqlen_k, softmax_scale, rope)


varlen_attention_op = define("vdit::varlen_attention", _varlen_attention)


@varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      rope_positions, rope_dims, rope_theta, rope_interleaved, deterministic, backend):
    # contiguous whatever q's strides, as every backend's out (empty_like would keep a
    # permuted q's layout, which torch.compile would then assume of the real output)
    return q.new_empty(q.shape), q.new_empty(q.shape[1], q.shape[0], dtype=ref.lse_dtype(q.dtype))


def _varlen_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                               lse: Tensor, grad_lse: Optional[Tensor], cu_seqlens_q: Tensor,
                               cu_seqlens_k: Tensor,
                               max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                               rope_positions: Optional[Tensor], rope_dims: list[int],
                               rope_theta: float, rope_interleaved: bool, deterministic: bool,
                               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    rope = _rope_tuple(rope_positions, rope_dims, rope_theta, rope_interleaved)
    return _impl(backend).varlen_attention_bwd(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens_q,
                                               cu_seqlens_k,
                                               max_seqlen_q, max_seqlen_k, softmax_scale, rope,
                                               deterministic)


varlen_attention_backward_op = define("vdit::varlen_attention_backward", _varlen_attention_backward)


@varlen_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the forward's


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, rope_positions, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rope_positions)
    # an output no loss reached comes to the backward as None, not as zeros: an unused
    # lse (return_lse=False) then lets the backward skip the grad_lse term, and run
    # PyTorch's FlashAttention-2 backward, which has no such input
    ctx.set_materialize_grads(False)
    ctx.args = (max_q, max_k, scale)
    ctx.rest = tuple(rest)  # rope_dims, rope_theta, rope_interleaved, deterministic, backend


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k, rope_positions = ctx.saved_tensors
    if grad_out is None:  # a loss on lse alone
        grad_out = torch.zeros_like(out)
    # grad_lse is non-zero when partial results are merged through their lse
    grad_lse = None if grad_lse is None else grad_lse.to(lse.dtype).contiguous()
    gq, gk, gv = call(varlen_attention_backward_op, grad_out.contiguous(), q, k, v, out, lse, grad_lse, cu_q,
                      cu_k, *ctx.args, rope_positions, *ctx.rest)
    return (gq, gk, gv) + (None,) * 11


register_autograd(varlen_attention_op, _attention_setup, _attention_backward)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, softmax_scale: Optional[float] = None,
                     return_lse: bool = False, rope: Optional[Rope3D] = None,
                     deterministic: bool = False, *, backend: Optional[str] = None):
    """Attention over a packed batch of variable-length segments (flash_attn_varlen_func layout).

    q: (Nq, H, D); k, v: (Nk, Hk, D) with Hk dividing H (grouped-query attention: query
    head h reads kv head h // (H // Hk)). cu_seqlens_q / cu_seqlens_k: int32 (B+1,)
    segment offsets; max_seqlen_q / max_seqlen_k: Python ints, upper bounds of the
    segment lengths. Segment i of q attends to segment i of k/v only:

        q tokens   [ seg 0 | seg 1 | ... ]       out_i = softmax(scale * q_i k_i^T) v_i
        k tokens   [ seg 0 | seg 1 | ... ]       (block-diagonal over the pack)

    Same cu_seqlens on both sides is self-attention over a video pack; pack.cu_seqlens
    with pack.cu_seqlens_k is per-video cross-attention to text tokens. Zero-length
    segments are allowed; a query row with an empty key segment gets out = 0 and
    lse = -inf. softmax_scale defaults to 1/sqrt(D).
    softmax_scale must be positive.
    Under torch.autocast, q, k and v are first cast to the autocast dtype (float64 excepted),
    as scaled_dot_product_attention does.
    rope: a Rope3D, for q and k of the same tokens (Nq == Nk: k is rotated with q's
    positions, as in self-attention): equal to apply_rope_3d followed by attention; the
    backends rotate q and k once with the fastest RoPE kernel (one pass over q and k, ~1%
    of the forward) and rotate dq and dk back in the backward.
    deterministic=True: a backward free of atomics with fixed tiles, bitwise
    reproducible (the Triton backend may otherwise add dQ atomically or run PyTorch's
    FlashAttention-2 backward, whichever it measured fastest: VDIT_ATTN_BWD).
    Returns out (Nq, H, D) in q's dtype, and with return_lse=True also
    lse (H, Nq) float32 (float64 for float64 inputs), the natural-log logsumexp of each
    row's scaled scores.
    Differentiable in q, k and v, through out and through lse (merging partial results by
    their lse, as vdit_kernels.parallel.merge_attention does, has exact gradients).
    Precision at extreme scores: every backward, as FlashAttention's, recomputes the
    softmax as exp(scale * s - lse) from the float32 lse (which lets a ring of key subsets
    share one row's lse), so gradients carry a relative error of a few |lse| * 2^-24 (1e-3
    at scores of 1e4; negligible at the usual |scores| < 100; the forwards normalize each
    row by its own sum and stay exact). In float16 the Triton backward rounds the dS tile
    to float16 before the dQ / dK products (as PyTorch's FlashAttention-2 does), so an
    entry of dS above 65504, possible under a large loss scale, gives inf and then NaN
    gradients.
    """
    q, k, v = checked_qkv(q, k, v)
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same number of segments, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    scale = softmax_scale_of(softmax_scale, q.shape[2])
    rope_args = (None, [], 10000.0, True)
    if rope is not None:
        if not isinstance(rope, Rope3D):
            raise TypeError(f"rope must be a Rope3D, got {type(rope).__name__}")
        check(q.shape[0] == k.shape[0], "rope= is for self-attention: q and k need the same tokens")
        dims = check_rope_dims(rope.dims, q.shape[2])
        theta = check_theta(rope.theta)
        check_positions(rope.positions, q.shape[0], q.device)
        positions = rope.positions_for(q.dtype)  # (a pack's: converted once per pack)
        interleaved = check_flag("rope.interleaved", rope.interleaved)
        rope_args = (positions, list(dims), theta, interleaved)
    deterministic = check_flag("deterministic", deterministic)
    return_lse = check_flag("return_lse", return_lse)
    name = _backend.resolve(FAMILY, q.device, backend, "varlen_attention_fwd", q.dtype)
    out, lse = call(varlen_attention_op, q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                    int(max_seqlen_k), scale, *rope_args, deterministic, name)
    return (out, lse) if return_lse else out
