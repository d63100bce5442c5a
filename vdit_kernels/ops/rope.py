"""Fused 3D rotary position embedding of q and k.

Backend contract (every backend module for the "rope" family provides):
  rope_3d(q, k, positions, dims, theta, interleaved, inverse) -> (q_rot, k_rot)
  rope_3d_(q, k, positions, dims, theta, interleaved, inverse) -> None  (in place)
  DTYPES: the dtypes it computes in (vdit_kernels.backend resolves by device and dtype)
q, k (N, heads, head_dim) (heads may differ between q and k), positions float32
(N, 3) contiguous (float64 where q is: the reference path's float64 is float64
throughout), dims (dt, dh, dw) even with dt+dh+dw = head_dim. inverse=True
rotates by the negative angle: the backward of the forward rotation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import backend as _backend
from .. import reference as ref
from ..checks import (check, check_flag, check_float, check_inplace_rope, check_pack, check_positions,
                      check_rope_dims, check_same, check_theta)
from .direct import call, define, define_mutating, register_autograd

FAMILY = "rope"


@ref.without_autocast
class _Reference:
    @staticmethod
    def rope_3d(q, k, positions, dims, theta, interleaved, inverse):
        q_rot, k_rot = ref.apply_rope_3d(q, k, None, dims, theta, interleaved, positions=positions,
                                         inverse=inverse)
        return q_rot.contiguous(), k_rot.contiguous()  # as the kernels' (and the fake's)

    @staticmethod
    def rope_3d_(q, k, positions, dims, theta, interleaved, inverse):
        q_rot, k_rot = _Reference.rope_3d(q, k, positions, dims, theta, interleaved, inverse)
        q.copy_(q_rot)
        k.copy_(k_rot)


def _impl(backend: str):
    return _Reference if backend == "reference" else _backend.implementation(backend, FAMILY)


def _rope_3d(q: Tensor, k: Tensor, positions: Tensor, dims: list[int], theta: float,
             interleaved: bool, inverse: bool, backend: str) -> tuple[Tensor, Tensor]:
    return _impl(backend).rope_3d(q, k, positions, dims, theta, interleaved, inverse)


rope_3d_op = define("vdit::rope_3d", _rope_3d)


@rope_3d_op.register_fake
def _(q, k, positions, dims, theta, interleaved, inverse, backend):
    # contiguous whatever q's and k's strides (empty_like would keep a permuted layout,
    # which torch.compile would then assume of every backend's result)
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_setup(ctx, inputs, output):
    q, k, positions, dims, theta, interleaved, inverse, backend = inputs
    ctx.save_for_backward(positions)
    ctx.args = (dims, theta, interleaved, not inverse, backend)


def _rope_backward(ctx, grad_q, grad_k):
    (positions,) = ctx.saved_tensors
    # a rotation's backward is the inverse rotation of the incoming gradient
    gq, gk = call(rope_3d_op, grad_q.contiguous(), grad_k.contiguous(), positions, *ctx.args)
    return gq, gk, None, None, None, None, None, None


register_autograd(rope_3d_op, _rope_setup, _rope_backward)


def _rope_3d_inplace(q: Tensor, k: Tensor, positions: Tensor, dims: list[int], theta: float,
                     interleaved: bool, inverse: bool, backend: str) -> None:
    # the overlap check here, on the tensors the op gets, not in apply_rope_3d: torch.compile
    # cannot trace the storage checks, and a compiled graph runs this body on real tensors;
    # a backend whose own op runs the same check says so (the cuda backend's C++)
    impl = _impl(backend)
    if not torch.is_inference_mode_enabled():
        for name, t in (("q", q), ("k", k)):
            if t.is_inference():  # what torch's own in-place ops refuse; kernels write through pointers
                raise RuntimeError(f"inplace RoPE: {name} is an inference tensor (made under "
                                   "torch.inference_mode), which may be updated in place only inside "
                                   "inference mode; rotate it there, or use inplace=False")
    if not getattr(impl, "CHECKS_INPLACE_OVERLAP", False):
        check_inplace_rope(q, k, positions)
    impl.rope_3d_(q, k, positions, dims, theta, interleaved, inverse)


# call()'s direct route bumps q's and k's version counters as the op's mutates_args do (a
# kernel writing through pointers does not; autograd relies on them to refuse tensors
# changed after being saved)
rope_3d_inplace_op = define_mutating("vdit::rope_3d_", _rope_3d_inplace, mutates_args=("q", "k"))


@rope_3d_inplace_op.register_fake
def _(q, k, positions, dims, theta, interleaved, inverse, backend):
    return None


@dataclass(frozen=True, eq=False)  # (identity: == of the positions tensors has no one truth value)
class Rope3D:
    """What 3D RoPE needs, bundled for `varlen_attention(..., rope=...)`.

    positions: (N, 3) token coordinates (t, h, w): integers (a pack's, int32), float32, or
    float64 for float64 attention on the reference path (use `from_pack`);
    dims: head-dim split (dt, dh, dw), each even; theta: the frequency base;
    interleaved: pairs (x0, x1), ... (True) or rotate-half per axis chunk (False).
    """

    positions: Tensor
    dims: tuple[int, int, int]
    theta: float = 10000.0
    interleaved: bool = True

    @classmethod
    def from_pack(cls, pack, dims: Sequence[int], theta: float = 10000.0,
                  interleaved: bool = True, positions: Optional[Tensor] = None) -> "Rope3D":
        """The RoPE of `pack` (its integer (t, h, w) token positions, or `positions` (N, 3)
        on the pack's device, one row per token of the pack), for varlen_attention(...,
        rope=...); dims (dt, dh, dw) even, summing to the head dim (checked against it at
        the attention call). Integer positions stay integers (the pack's: int32): a
        mixed-precision cast of a module's floating inputs (FSDP's cast_forward_inputs, which
        rebuilds the dataclasses among them) leaves them exact, where float32 coordinates
        past 256 became other coordinates in bfloat16. The attention reads them as float32
        (positions_for: the pack's float_positions, converted once per pack; explicit
        integer positions converted at each call). Floating positions are stored as float32
        (float64 stay float64)."""
        check_pack(pack)
        theta = check_theta(theta)
        dims = check_rope_dims(dims)  # the sum: at the attention call, which knows the head dim
        interleaved = check_flag("interleaved", interleaved)
        if positions is None:
            rope = cls(pack.positions, dims, theta, interleaved)
            object.__setattr__(rope, "_pack", pack)  # (frozen; positions_for reads its float positions)
            return rope
        check_positions(positions, pack.num_tokens, pack.device)
        if positions.is_floating_point():
            positions = positions.to(positions_dtype(positions.dtype))
        positions = _not_inference(positions.contiguous(), kept=True)
        return cls(positions, dims, theta, interleaved)

    def positions_for(self, dtype: torch.dtype) -> Tensor:
        """`positions` as the ops take them for q of `dtype`: (N, 3) contiguous in
        positions_dtype(dtype) (float32; float64 for float64). A Rope3D of a pack's own
        positions (from_pack without `positions`) reads its pack's float_positions,
        converted once per pack (per call, the conversion was a kernel and ~4 us of host
        time in every attention call on the H100); any other positions are converted at
        each call, so that a change to them (in place, through .data, by a collective into
        the same buffer) is always seen: nothing here keeps a copy of a tensor it does not
        own. A normal tensor for a training call where the positions are an inference
        tensor (as apply_rope_3d's)."""
        pack = getattr(self, "_pack", None)  # (from_pack's: not a field, so replace() drops it)
        return _as_taken(pack.float_positions if pack is not None else self.positions, dtype)


def _not_inference(t: Tensor, kept: bool = False) -> Tensor:
    """t, or a normal copy of it where it is an inference tensor (made, or converted, under
    torch.inference_mode) that a backward may need: RoPE saves its positions for the
    backward, which a training call cannot do with an inference tensor. kept: t outlives the
    call (Rope3D's, as the pack's own positions, never an inference tensor), copied even
    under inference mode; a call's own positions only outside it. (Not while torch.compile
    traces, which cannot ask: a compiled graph's inputs are its caller's.)"""
    if torch.compiler.is_compiling() or not t.is_inference() or (torch.is_inference_mode_enabled() and not kept):
        return t
    with torch.inference_mode(False):
        return t.clone()


def positions_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops take positions in for q of `dtype`: float32, float64 for float64 (the
    reference path: fractional positions rounded to float32 would cap its accuracy)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def float_positions(pack, positions: Optional[Tensor], num_tokens: int, device,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Positions as the ops take them: (N, 3) contiguous in positions_dtype(dtype) for q of
    `dtype`, checked against the tokens (and against the pack, where both are given)."""
    if pack is not None:
        check_pack(pack)
        # (before positions, which the caller may not have passed)
        if pack.num_tokens != num_tokens:
            raise ValueError(f"q and k have {num_tokens} tokens but the pack has {pack.num_tokens}")
        if pack.device != device:
            raise ValueError(f"the pack is on {pack.device} but q and k are on {device}")
    if positions is None:
        check(pack is not None, "apply_rope_3d needs a pack or explicit positions")
        positions = pack.float_positions  # converted once per pack, not per call
    check_positions(positions, num_tokens, device)
    return _as_taken(positions, dtype)


def _as_taken(positions: Tensor, dtype: torch.dtype) -> Tensor:
    """Checked positions as the ops take them for q of `dtype`: contiguous, in
    positions_dtype(dtype), a normal tensor for a training call (no copy where they are so)."""
    return _not_inference(positions.to(positions_dtype(dtype)).contiguous())


def apply_rope_3d(q: Tensor, k: Tensor, pack=None, dims: Sequence[int] = None,
                  theta: float = 10000.0, interleaved: bool = True,
                  positions: Optional[Tensor] = None, *, inplace: bool = False,
                  backend: Optional[str] = None):
    """Rotate q and k by 3D RoPE, both in one launch on GPU backends.

    q (N, Hq, D), k (N, Hk, D), same N, dtype and device. D = dt + dh + dw, each even,
    split into time, height and width chunks; chunk a of size d_a rotates by
    angle_j = pos_a * theta ** (-2j / d_a), j < d_a / 2.
      interleaved=True:  (x[2j], x[2j+1]) -> (x0 cos - x1 sin, x1 cos + x0 sin) (complex multiply)
      interleaved=False: (x[j], x[j + d_a/2]) of each axis chunk (rotate_half)
    Positions: pack.positions, or `positions` (N, 3), float allowed (scaled or offset
    coordinates for resolution extrapolation); where both are given, the pack must match
    q's tokens and device too. Angles are computed in float32 from the positions inside
    the kernels (float64 for float64 q on the reference path); no (N, D) cos/sin table is
    read.
    inplace=True rotates q and k in place and returns them (inference only: it does
    not record a gradient); q and k may be disjoint views of one buffer (a fused qkv
    projection), never views sharing an element (refused in eager code; a compiled graph
    writes rotated copies back instead and does not check). Otherwise returns new
    contiguous (q_rot, k_rot) in the input dtype, differentiable; the backward rotates the
    gradients back.
    """
    check_float("q", q)
    check_float("k", k)
    if not (q.dim() == 3 and k.dim() == 3):
        raise ValueError(f"q and k must be (N, heads, head_dim), "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    if not (q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share N and head_dim")
    check_same(["q", "k"], [q, k])
    check(dims is not None, "apply_rope_3d needs dims=(dt, dh, dw)")
    dims = list(check_rope_dims(dims, q.shape[2]))
    theta = check_theta(theta)
    interleaved = check_flag("interleaved", interleaved)
    inplace = check_flag("inplace", inplace)
    pos = float_positions(pack, positions, q.shape[0], q.device, q.dtype)
    name = _backend.resolve(FAMILY, q.device, backend, "rope_3d_" if inplace else "rope_3d", q.dtype)
    if inplace:
        check(not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)),
              "inplace RoPE records no gradient; use inplace=False when q or k requires grad")
        if torch.compiler.is_compiling():
            # the rotated copies written back: torch.compile(dynamic=True) handed the
            # mutating op q and k of qkv[:, 0] / qkv[:, 1] both at qkv's offset 0 (torch
            # 2.14, 2026-11-27: k left unrotated, caught by the op's check below; the
            # dropped view offset of pytorch/pytorch#198068, open), and inductor fuses the
            # copies back into the buffer anyway
            q_rot, k_rot = rope_3d_op(q, k, pos, dims, theta, interleaved, False, name)
            q.copy_(q_rot)
            k.copy_(k_rot)
            return q, k
        call(rope_3d_inplace_op, q, k, pos, dims, theta, interleaved, False, name)
        return q, k
    return call(rope_3d_op, q, k, pos, dims, theta, interleaved, False, name)
