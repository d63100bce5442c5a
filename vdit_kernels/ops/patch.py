"""Patchify, unpatchify, patch embedding and the DiT output layer (linear + unpatchify).

Public functions validate against the VideoPack and resolve a backend; the
registered ops (`torch.ops.vdit.*`) carry the concrete backend name as a string
argument, so a compiled graph keeps the choice made at trace time.

Backend contract (functions every backend module for the "patch" family provides;
videos are lists of (C, T, H, W) tensors, shapes a flat [T0, H0, W0, T1, ...] list):
  patchify(videos, patch_size) -> (N, C*pt*ph*pw)
  unpatchify(tokens, shapes, patch_size, channels) -> list of videos
  patch_embed(videos, weight, bias) -> (N, hidden)
  patch_embed_backward(grad, videos, weight, with_bias) -> (grad_videos, grad_weight, grad_bias|None)
  linear_unpatchify(x, weight, bias, shapes, patch_size, channels) -> list of videos
  linear_unpatchify_backward(grad_videos, x, weight, patch_size, with_bias)
      -> (grad_x, grad_weight, grad_bias|None)
  DTYPES: the dtypes it computes in (vdit_kernels.backend resolves by device and dtype)
  AUTOGRAD (optional): {"patch_embed": fn, "linear_unpatchify": fn}, the same ops with their
      autograd formula built in (fn takes the op's arguments but the backend name), which
      eager calls run instead of the registered op's Python formula (ops/direct.py); they
      must compute what the contract functions above compute
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import backend as _backend
from .. import reference as ref
from ..checks import autocast_inputs, check_float, check_pack, check_same, check_videos, positive_int
from .direct import call, define, register_autograd

FAMILY = "patch"


def _triples(flat: Sequence[int]) -> list[tuple[int, int, int]]:
    return [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]


def _flat(shapes) -> list[int]:
    """(T, H, W) triples (pack.shapes, or videos' sizes) as the ops' flat `shapes` list, the
    sizes as they are: under torch.compile the fake implementations get symbolic sizes, and
    an int() of one would specialize the graph to it (a compiled step recompiled for every
    pack of other video sizes). (chain: 0.5 us for 6 videos, a comprehension with int() 1.4.)"""
    return list(itertools.chain.from_iterable(shapes))


def _num_tokens(shapes: Sequence[int], patch_size: Sequence[int]) -> int:
    pt, ph, pw = patch_size
    return sum((t // pt) * (h // ph) * (w // pw) for t, h, w in _triples(shapes))


class _Pack:
    """The few VideoPack fields reference.py reads, rebuilt from an op's int arguments."""

    def __init__(self, shapes: Sequence[int], patch_size: Sequence[int]):
        self.shapes = _triples(shapes)
        self.patch_size = tuple(patch_size)
        pt, ph, pw = self.patch_size
        self.seqlens = [(t // pt) * (h // ph) * (w // pw) for t, h, w in self.shapes]


def _owned(out: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """Registered ops must return fresh tensors: no views of inputs or of one shared buffer."""
    out = out.contiguous()
    ptr = out.untyped_storage().data_ptr()
    if out.storage_offset() or any(ptr == t.untyped_storage().data_ptr() for t in inputs):
        return out.clone()
    return out


@ref.without_autocast
class _Reference:
    """The reference backend in the contract's form (calls reference.py)."""

    @staticmethod
    def patchify(videos, patch_size):
        return ref.patchify(videos, _Pack(_flat(v.shape[1:] for v in videos), patch_size))

    @staticmethod
    def unpatchify(tokens, shapes, patch_size, channels):
        outs = ref.unpatchify(tokens, _Pack(shapes, patch_size), channels)
        return [_owned(o, [tokens]) for o in outs]

    @staticmethod
    def patch_embed(videos, weight, bias):
        pack = _Pack(_flat(v.shape[1:] for v in videos), weight.shape[2:])
        return ref.patch_embed(videos, pack, weight, bias)

    @staticmethod
    def patch_embed_backward(grad, videos, weight, with_bias):
        cd = ref.compute_dtype(grad.dtype)
        pack = _Pack(_flat(v.shape[1:] for v in videos), weight.shape[2:])
        x = ref.patchify(videos, pack).to(cd)
        g = grad.to(cd)
        w = weight.flatten(1).to(cd)
        grad_x = ref.unpatchify((g @ w).to(grad.dtype), pack, videos[0].shape[0])
        grad_x = [_owned(gx.to(v.dtype), [grad]) for gx, v in zip(grad_x, videos)]
        grad_w = (g.t() @ x).reshape(weight.shape).to(weight.dtype)
        grad_b = g.sum(0).to(weight.dtype) if with_bias else None
        return grad_x, grad_w, grad_b

    @staticmethod
    def linear_unpatchify(x, weight, bias, shapes, patch_size, channels):
        outs = ref.linear_unpatchify(x, _Pack(shapes, patch_size), weight, bias, channels)
        return [_owned(o, [x]) for o in outs]

    @staticmethod
    def linear_unpatchify_backward(grad_videos, x, weight, patch_size, with_bias):
        cd = ref.compute_dtype(x.dtype)
        pack = _Pack(_flat(g.shape[1:] for g in grad_videos), patch_size)
        g = ref.patchify(grad_videos, pack).to(cd)
        grad_x = (g @ weight.to(cd)).to(x.dtype)
        grad_w = (g.t() @ x.to(cd)).to(weight.dtype)
        grad_b = g.sum(0).to(weight.dtype) if with_bias else None
        return grad_x, grad_w, grad_b


def _impl(backend: str):
    return _Reference if backend == "reference" else _backend.implementation(backend, FAMILY)


def _native(name: str):
    """define()'s `native` for op `name`: the backend's version with its autograd built in
    (the backend module's AUTOGRAD table), where it has one."""
    def lookup(backend: str):
        return None if backend == "reference" else getattr(_impl(backend), "AUTOGRAD", {}).get(name)
    return lookup


# -- registered ops ---------------------------------------------------------------

def _patchify(videos: list[Tensor], patch_size: list[int], backend: str) -> Tensor:
    return _impl(backend).patchify(videos, patch_size)


patchify_op = define("vdit::patchify", _patchify)


@patchify_op.register_fake
def _(videos, patch_size, backend):
    shapes = _flat(v.shape[1:] for v in videos)
    c = videos[0].shape[0]
    pt, ph, pw = patch_size
    return videos[0].new_empty(_num_tokens(shapes, patch_size), c * pt * ph * pw)


def _unpatchify(tokens: Tensor, shapes: list[int], patch_size: list[int], channels: int,
                backend: str) -> list[Tensor]:
    return _impl(backend).unpatchify(tokens, shapes, patch_size, channels)


unpatchify_op = define("vdit::unpatchify", _unpatchify)


@unpatchify_op.register_fake
def _(tokens, shapes, patch_size, channels, backend):
    return [tokens.new_empty(channels, *s) for s in _triples(shapes)]


def _patchify_setup(ctx, inputs, output):
    videos, patch_size, backend = inputs
    ctx.shapes = _flat(v.shape[1:] for v in videos)
    ctx.patch_size, ctx.channels, ctx.backend = patch_size, videos[0].shape[0], backend


def _patchify_backward(ctx, grad):
    grads = call(unpatchify_op, grad.contiguous(), ctx.shapes, ctx.patch_size, ctx.channels, ctx.backend)
    return grads, None, None


def _unpatchify_setup(ctx, inputs, output):
    tokens, shapes, patch_size, channels, backend = inputs
    ctx.patch_size, ctx.backend = patch_size, backend


def _unpatchify_backward(ctx, grads):
    return call(patchify_op, [g.contiguous() for g in grads], ctx.patch_size, ctx.backend), None, None, None, None


register_autograd(patchify_op, _patchify_setup, _patchify_backward)
register_autograd(unpatchify_op, _unpatchify_setup, _unpatchify_backward)


def _patch_embed(videos: list[Tensor], weight: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    return _impl(backend).patch_embed(videos, weight, bias)


patch_embed_op = define("vdit::patch_embed", _patch_embed, native=_native("patch_embed"))


@patch_embed_op.register_fake
def _(videos, weight, bias, backend):
    n = _num_tokens(_flat(v.shape[1:] for v in videos), weight.shape[2:])
    return videos[0].new_empty(n, weight.shape[0])


def _patch_embed_backward_impl(grad: Tensor, videos: list[Tensor], weight: Tensor, with_bias: bool,
                               backend: str) -> tuple[list[Tensor], Tensor, Tensor]:
    grad_x, grad_w, grad_b = _impl(backend).patch_embed_backward(grad, videos, weight, with_bias)
    # an op cannot return None: an empty tensor stands for "no bias"
    return grad_x, grad_w, grad_b if grad_b is not None else weight.new_empty(0)


patch_embed_backward_op = define("vdit::patch_embed_backward", _patch_embed_backward_impl)


@patch_embed_backward_op.register_fake
def _(grad, videos, weight, with_bias, backend):
    # contiguous, as every backend's gradients (empty_like would keep a channels-last or
    # permuted layout, which torch.compile would then assume of the real ones)
    return ([v.new_empty(v.shape) for v in videos], weight.new_empty(weight.shape),
            weight.new_empty(weight.shape[0] if with_bias else 0))


def _patch_embed_setup(ctx, inputs, output):
    videos, weight, bias, backend = inputs
    ctx.save_for_backward(weight, *videos)
    ctx.with_bias, ctx.backend = bias is not None, backend


def _patch_embed_backward(ctx, grad):
    weight, *videos = ctx.saved_tensors
    grad_x, grad_w, grad_b = call(patch_embed_backward_op, grad.contiguous(), videos, weight,
                                  ctx.with_bias, ctx.backend)
    return grad_x, grad_w, grad_b if ctx.with_bias else None, None


register_autograd(patch_embed_op, _patch_embed_setup, _patch_embed_backward)


def _linear_unpatchify(x: Tensor, weight: Tensor, bias: Optional[Tensor], shapes: list[int],
                       patch_size: list[int], channels: int, backend: str) -> list[Tensor]:
    return _impl(backend).linear_unpatchify(x, weight, bias, shapes, patch_size, channels)


linear_unpatchify_op = define("vdit::linear_unpatchify", _linear_unpatchify,
                              native=_native("linear_unpatchify"))


@linear_unpatchify_op.register_fake
def _(x, weight, bias, shapes, patch_size, channels, backend):
    return [x.new_empty(channels, *s) for s in _triples(shapes)]


def _linear_unpatchify_backward_impl(grad_videos: list[Tensor], x: Tensor, weight: Tensor,
                                     patch_size: list[int], with_bias: bool,
                                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    grad_x, grad_w, grad_b = _impl(backend).linear_unpatchify_backward(
        grad_videos, x, weight, patch_size, with_bias)
    return grad_x, grad_w, grad_b if grad_b is not None else weight.new_empty(0)


linear_unpatchify_backward_op = define("vdit::linear_unpatchify_backward", _linear_unpatchify_backward_impl)


@linear_unpatchify_backward_op.register_fake
def _(grad_videos, x, weight, patch_size, with_bias, backend):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),  # contiguous, as above
            weight.new_empty(weight.shape[0] if with_bias else 0))


def _linear_unpatchify_setup(ctx, inputs, output):
    x, weight, bias, shapes, patch_size, channels, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.with_bias, ctx.patch_size, ctx.backend = bias is not None, patch_size, backend


def _linear_unpatchify_backward(ctx, grads):
    x, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = call(linear_unpatchify_backward_op,
                                  [g.contiguous() for g in grads], x, weight, ctx.patch_size, ctx.with_bias,
                                  ctx.backend)
    return grad_x, grad_w, grad_b if ctx.with_bias else None, None, None, None, None


register_autograd(linear_unpatchify_op, _linear_unpatchify_setup, _linear_unpatchify_backward)


# -- public functions ---------------------------------------------------------------

def patchify(latents, pack, *, backend: Optional[str] = None) -> Tensor:
    """Gather a pack of videos into packed tokens, in one launch on GPU backends.

    latents: a list of B videos (C, T_i, H_i, W_i), or one (B, C, T, H, W) batch when
    all videos share a shape; pack: their VideoPack.
    Returns (N, C*pt*ph*pw) in the input dtype, tokens of video i at rows
    pack.cu_seqlens[i]:pack.cu_seqlens[i+1] in raster (t, h, w) order, features in
    (c, pt, ph, pw) order (an nn.Conv3d weight's flattening). Differentiable; the
    backward is unpatchify.
    """
    videos = ref.as_video_list(latents)
    check_videos(videos, pack)
    name = _backend.resolve(FAMILY, videos[0].device, backend, "patchify", videos[0].dtype)
    return call(patchify_op, videos, list(pack.patch_size), name)


def unpatchify(tokens: Tensor, pack, channels: int, *, backend: Optional[str] = None) -> list[Tensor]:
    """The inverse of patchify: (N, C*pt*ph*pw) tokens -> list of B contiguous
    (C, T_i, H_i, W_i) videos in the tokens' dtype. Differentiable; the backward is patchify."""
    check_float("tokens", tokens)
    check_pack(pack)
    channels = positive_int(channels, "channels")
    pt, ph, pw = pack.patch_size
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (N, C*pt*ph*pw), got shape {tuple(tokens.shape)}")
    if tokens.shape[0] != pack.num_tokens:
        raise ValueError(f"tokens has {tokens.shape[0]} rows, the pack has {pack.num_tokens} tokens")
    if tokens.shape[1] != channels * pt * ph * pw:
        raise ValueError(f"tokens has {tokens.shape[1]} features, "
                         f"expected channels*pt*ph*pw = {channels * pt * ph * pw}")
    name = _backend.resolve(FAMILY, tokens.device, backend, "unpatchify", tokens.dtype)
    return call(unpatchify_op, tokens, _flat(pack.shapes), list(pack.patch_size), channels, name)


def patch_embed(latents, pack, weight: Tensor, bias: Optional[Tensor] = None, *,
                backend: Optional[str] = None) -> Tensor:
    """Patch embedding of a whole pack: (N, hidden) = patchify(latents) @ W.flatten(1).T + b.

    weight (hidden, C, pt, ph, pw) and bias (hidden,) in nn.Conv3d layout, so an
    existing Conv3d(C, hidden, kernel_size=stride=patch_size)'s parameters pass
    unchanged; the result equals that conv per video, flattened to tokens.
    Fused backends gather the patches inside the GEMM (the patchified matrix never
    exists in memory). Output in the latents' dtype; differentiable in all three. Under
    torch.autocast, latents, weight and bias are first cast to the autocast dtype (float64
    excepted), as nn.Conv3d's are.
    """
    videos = ref.as_video_list(latents)
    channels = check_videos(videos, pack)
    check_float("weight", weight)
    if weight.dim() != 5:
        raise ValueError(f"weight must be (hidden, C, pt, ph, pw), got shape {tuple(weight.shape)}")
    if tuple(weight.shape[2:]) != tuple(pack.patch_size):
        raise ValueError(f"weight's kernel {tuple(weight.shape[2:])} is not the pack's "
                         f"patch size {pack.patch_size}")
    if weight.shape[1] != channels:
        raise ValueError(f"weight expects {weight.shape[1]} channels, videos have {channels}")
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    *videos, weight, bias = autocast_inputs(*videos, weight, bias)  # as nn.Conv3d under autocast
    tensors, names = [videos[0], weight], ["latents", "weight"]
    if bias is not None:
        tensors.append(bias)
        names.append("bias")
    check_same(names, tensors)
    # resolved in the dtype the backend computes in: the autocast dtype where autocast cast
    name = _backend.resolve(FAMILY, videos[0].device, backend, "patch_embed", videos[0].dtype)
    return call(patch_embed_op, videos, weight, bias, name)


def linear_unpatchify(x: Tensor, pack, weight: Tensor, bias: Optional[Tensor], channels: int, *,
                      backend: Optional[str] = None) -> list[Tensor]:
    """The DiT output layer: unpatchify(x @ W.T + b), one latent video per pack entry.

    x (N, hidden); weight (C*pt*ph*pw, hidden) and bias (C*pt*ph*pw,) in nn.Linear
    layout, output features ordered (c, pt, ph, pw). Returns a list of
    (C, T_i, H_i, W_i) videos in x's dtype. Fused backends scatter from the GEMM
    epilogue. Differentiable in x, weight and bias. Under torch.autocast, x, weight and
    bias are first cast to the autocast dtype (float64 excepted), as nn.Linear's are.
    """
    check_float("x", x)
    check_float("weight", weight)
    check_pack(pack)
    channels = positive_int(channels, "channels")
    pt, ph, pw = pack.patch_size
    features = channels * pt * ph * pw
    if not (x.dim() == 2 and x.shape[0] == pack.num_tokens):
        raise ValueError(f"x must be (N={pack.num_tokens}, hidden), got shape {tuple(x.shape)}")
    if not (weight.dim() == 2 and weight.shape == (features, x.shape[1])):
        raise ValueError(f"weight must be (C*pt*ph*pw={features}, hidden={x.shape[1]}), "
                         f"got shape {tuple(weight.shape)}")
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != (features,):
            raise ValueError(f"bias must be ({features},), got {tuple(bias.shape)}")
    x, weight, bias = autocast_inputs(x, weight, bias)  # as nn.Linear under autocast
    tensors, names = [x, weight], ["x", "weight"]
    if bias is not None:
        tensors.append(bias)
        names.append("bias")
    check_same(names, tensors)
    name = _backend.resolve(FAMILY, x.device, backend, "linear_unpatchify", x.dtype)
    return call(linear_unpatchify_op, x, weight, bias, _flat(pack.shapes), list(pack.patch_size), channels,
                name)
