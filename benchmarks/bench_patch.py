"""Patch suite: patchify, unpatchify (memory bound, GB/s), patch_embed and the output layer
linear_unpatchify (GEMMs, TFLOP/s), the two GEMMs forward and forward+backward (gradients
of every input: 3x the forward FLOPs).

Providers: vdit backends (reference, triton, cuda) where they implement the op;
peers: per-video reshape+permute (eager and torch.compile'd) for (un)patchify;
nn.Conv3d (F.conv3d per video + flatten), reshape+permute+nn.Linear eager and
torch.compile'd for patch_embed; nn.Linear then per-video reshape+permute (eager and
compiled) for linear_unpatchify; and on a GPU vdit-triton+fused / vdit-triton+gemm, the
Triton op with its variant forced (VDIT_PATCH_EMBED_FWD / _BWD,
VDIT_LINEAR_UNPATCHIFY_FWD / _BWD), vdit-triton+fused-tma (patch_embed's forward with
its output stored through TMA descriptors), and for patch_embed vdit-cuda-compile and
vdit-triton-compile, ours inside torch.compile (matched with the compiled peer), and
vdit-cuda+addmm, the cuda backend with its forward GEMM on ATen's addmm (VDIT_CUBLASLT=0)
instead of its kept cuBLASLt plan.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import vdit_kernels as vk

from . import flops
from .common import (VDIT_BACKENDS, Case, Prepared, Skip, backward_fn, dtype_for, peer_reason, vdit_reason,
                     wanted, with_env)

OP = "patch"


def _patchify_torch(videos, patch):
    pt, ph, pw = patch
    out = []
    for v in videos:
        c, t, h, w = v.shape
        x = v.view(c, t // pt, pt, h // ph, ph, w // pw, pw).permute(1, 3, 5, 0, 2, 4, 6)
        out.append(x.reshape(-1, c * pt * ph * pw))
    return torch.cat(out)


def _unpatchify_torch(tokens, shapes, patch, channels):
    pt, ph, pw = patch
    out, start = [], 0
    for t, h, w in shapes:
        n = (t // pt) * (h // ph) * (w // pw)
        x = tokens[start:start + n].view(t // pt, h // ph, w // pw, channels, pt, ph, pw)
        out.append(x.permute(3, 0, 4, 1, 5, 2, 6).reshape(channels, t, h, w))
        start += n
    return out


def _conv3d(videos, weight, bias, patch):
    return torch.cat([F.conv3d(v[None], weight, bias, stride=patch)[0].flatten(1).t() for v in videos])


def _permute_linear(videos, weight2d, bias, patch):
    return F.linear(_patchify_torch(videos, patch), weight2d, bias)


def _linear_permute(x, weight, bias, shapes, patch, channels):
    return _unpatchify_torch(F.linear(x, weight, bias), shapes, patch, channels)


class _Inputs:
    """A case's inputs, each made on first use from its own seed: a patchify case needs only
    the videos, and the output layer's (N, hidden) activations alone are 2.3 GB of bfloat16
    (drawn on the CPU, 4.5 GB of float32) on the train pack, made for every one of the up
    to 16 input copies kernel_ms cycles through, which took lease time from the cases."""

    def __init__(self, wl, device):
        self.wl, self.device, self.dtype = wl, device, dtype_for(device)
        self.pack = vk.VideoPack.from_shapes(wl.shapes, wl.patch, device=device)

    def _randn(self, seed: int, *shape, scale: float = 1.0) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(seed)
        return (torch.randn(*shape, generator=g) * scale).to(self.device, self.dtype)

    @functools.cached_property
    def videos(self) -> list:
        return [self._randn(i, self.wl.channels, *s) for i, s in enumerate(self.wl.shapes)]

    @functools.cached_property
    def tokens(self) -> torch.Tensor:
        return self._randn(101, self.wl.num_tokens, self.wl.features)

    @functools.cached_property
    def weight(self) -> torch.Tensor:
        return self._randn(102, self.wl.hidden, self.wl.channels, *self.wl.patch, scale=0.05)

    @functools.cached_property
    def bias(self) -> torch.Tensor:
        return torch.zeros(self.wl.hidden, device=self.device, dtype=self.dtype)

    # the output layer: (N, hidden) activations, nn.Linear's (features, hidden) weight
    @functools.cached_property
    def x(self) -> torch.Tensor:
        return self._randn(103, self.wl.num_tokens, self.wl.hidden)

    @functools.cached_property
    def out_weight(self) -> torch.Tensor:
        return self._randn(104, self.wl.features, self.wl.hidden, scale=0.02)

    @functools.cached_property
    def out_bias(self) -> torch.Tensor:
        return torch.zeros(self.wl.features, device=self.device, dtype=self.dtype)


def _embed_case(wl, device, embed, mode) -> Prepared:
    """patch_embed as `mode` (fwd, fwd+bwd) for one provider; inputs need grad for fwd+bwd."""
    x = _Inputs(wl, device)
    grad = mode != "fwd"
    videos = [v.requires_grad_(grad) for v in x.videos]
    weight, bias = x.weight.requires_grad_(grad), x.bias.requires_grad_(grad)
    return backward_fn(lambda: embed(videos, weight, bias, x.pack), [*videos, weight, bias], mode)


def _unembed_case(wl, device, unembed, mode) -> Prepared:
    """linear_unpatchify as `mode` (fwd, fwd+bwd) for one provider, as backward_fn does for
    one output: unembed(x, weight, bias, pack) returns one video per pack entry, each
    back-propagating its own gradient."""
    i = _Inputs(wl, device)
    grad = mode != "fwd"
    inputs = [t.requires_grad_(grad) for t in (i.x, i.out_weight, i.out_bias)]
    if not grad:
        return backward_fn(lambda: unembed(*inputs, i.pack), inputs, mode)
    grads = [torch.randn_like(v) for v in _unpatchify_torch(i.tokens, wl.shapes, wl.patch, wl.channels)]

    def run():
        torch.autograd.backward(unembed(*inputs, i.pack), grads)
    return Prepared(run, grad_to_none=inputs)


def cases(device: str, quick: bool, workloads, providers=None):
    out, skips = [], []
    elt = torch.empty(0, dtype=dtype_for(device)).element_size()
    def _one(wl):  # a function, so each case's build() closes over its own workload
        n, k = wl.num_tokens, wl.features
        cost = {"patchify": dict(bytes=flops.patchify_bytes(n, k, elt)),
                "unpatchify": dict(bytes=flops.patchify_bytes(n, k, elt)),
                "patch_embed": dict(flops=flops.patch_embed_flops(n, k, wl.hidden),
                                    bytes=flops.patch_embed_bytes(n, k, wl.hidden, elt)),
                "linear_unpatchify": dict(flops=flops.patch_embed_flops(n, k, wl.hidden),
                                          bytes=flops.linear_unpatchify_bytes(n, k, wl.hidden, elt))}

        def add(name, provider, make, **kw):
            if wanted(provider, providers):
                out.append(Case(OP, name, "fwd", wl, provider, make, **cost[name], **kw))

        def add_gemm(name, build_case, provider, fn, env=None):
            """patch_embed or linear_unpatchify (name), fwd and fwd+bwd, of one provider:
            build_case(wl, device, fn, mode) -> Prepared (_embed_case, _unembed_case);
            env: variables set around every call."""
            bytes_of = flops.patch_embed_bytes if name == "patch_embed" else flops.linear_unpatchify_bytes

            def build(mode):
                prepared = build_case(wl, device, fn, mode)
                return with_env(prepared, **env) if env else prepared
            add(name, provider, lambda: build("fwd"))
            if wanted(provider, providers):
                out.append(Case(OP, name, "fwd+bwd", wl, provider, lambda: build("fwd+bwd"),
                                flops=3 * cost[name]["flops"], bytes=bytes_of(n, k, wl.hidden, elt, "fwd+bwd")))

        def add_embed(provider, embed, env=None):  # embed(videos, weight5d, bias, pack) -> (N, hidden)
            add_gemm("patch_embed", _embed_case, provider, embed, env)

        def add_unembed(provider, unembed, env=None):  # unembed(x, weight, bias, pack) -> videos
            add_gemm("linear_unpatchify", _unembed_case, provider, unembed, env)

        for b in VDIT_BACKENDS:
            for name in ("patchify", "unpatchify", "patch_embed", "linear_unpatchify"):
                reason = vdit_reason(b, "patch", device, name)
                if reason:
                    skips.append(Skip(OP, f"vdit-{b} {name}", reason))
                    continue

                if name == "patch_embed":
                    add_embed(f"vdit-{b}", lambda v, w, bias, pack, b=b: vk.patch_embed(v, pack, w, bias, backend=b))
                    continue
                if name == "linear_unpatchify":
                    add_unembed(f"vdit-{b}", lambda x, w, bias, pack, b=b:
                                vk.linear_unpatchify(x, pack, w, bias, wl.channels, backend=b))
                    continue

                def make(b=b, name=name):
                    x = _Inputs(wl, device)
                    pack = x.pack
                    if name == "patchify":
                        videos = x.videos
                        return Prepared(lambda: vk.patchify(videos, pack, backend=b))
                    tokens = x.tokens
                    return Prepared(lambda: vk.unpatchify(tokens, pack, wl.channels, backend=b))
                add(name, f"vdit-{b}", make)

        for compiled in (False, True):
            suffix = "-compile" if compiled else ""
            reason = peer_reason(device, needs_cuda=compiled, cpu_ok=True)
            if reason:
                for p in (f"torch-permute{suffix}", f"permute-linear{suffix}", f"linear-permute{suffix}"):
                    skips.append(Skip(OP, p, reason))
                if not compiled:
                    skips.append(Skip(OP, "nn.Conv3d", reason))
                continue

            def wrap(fn, compiled=compiled):
                return torch.compile(fn, dynamic=False) if compiled else fn

            def make_p(wrap=wrap):
                videos, f = _Inputs(wl, device).videos, wrap(_patchify_torch)
                return Prepared(lambda: f(videos, wl.patch))

            def make_u(wrap=wrap):
                tokens, f = _Inputs(wl, device).tokens, wrap(_unpatchify_torch)
                return Prepared(lambda: f(tokens, wl.shapes, wl.patch, wl.channels))

            add("patchify", f"torch-permute{suffix}", make_p)
            add("unpatchify", f"torch-permute{suffix}", make_u)
            linear = wrap(_permute_linear)
            add_embed(f"permute-linear{suffix}",
                      lambda v, w, bias, pack, linear=linear: linear(v, w.reshape(w.shape[0], -1), bias, wl.patch))
            unembed = wrap(_linear_permute)
            add_unembed(f"linear-permute{suffix}", lambda x, w, bias, pack, unembed=unembed:
                        unembed(x, w, bias, wl.shapes, wl.patch, wl.channels))
            if not compiled:
                add_embed("nn.Conv3d", lambda v, w, bias, pack: _conv3d(v, w, bias, wl.patch))
            else:
                # ours under torch.compile too: the compiled peer's fair match (a compiled
                # graph calls the registered op, without the eager autograd layers)
                for b in ("cuda", "triton"):
                    if vdit_reason(b, "patch", device, "patch_embed"):
                        continue  # said once for the eager row above
                    ours = wrap(lambda v, w, bias, pack, b=b: vk.patch_embed(v, pack, w, bias, backend=b))
                    add_embed(f"vdit-{b}-compile", lambda v, w, bias, pack, ours=ours: ours(v, w, bias, pack))

        def add_forward_variant(provider, backend, reason, **env):
            """patch_embed's forward alone on `backend` with `env` set around every call."""
            if reason:
                skips.append(Skip(OP, provider, reason))
                return
            add("patch_embed", provider, lambda: with_env(_embed_case(
                wl, device, lambda v, w, bias, pack: vk.patch_embed(v, pack, w, bias, backend=backend), "fwd"),
                **env))

        # the Triton patch embedding with its variant forced (by default it times them on its
        # first call): first the fused forward storing whole token blocks by TMA (forward
        # only, its backward is "fused"'s; never timed on a GPU yet, so the first of the
        # forced rows a lease's time cap reaches), then the fused kernels, or our gather /
        # scatter around PyTorch's GEMMs
        reason = vdit_reason("triton", "patch", device, "patch_embed") or (
            None if device == "cuda" else "GPU only (without a GPU the fused kernels run)")
        add_forward_variant("vdit-triton+fused-tma", "triton", reason or (
            "needs sm_90+ (TMA stores; plain fused runs here)"
            if torch.cuda.get_device_capability()[0] < 9 else None), VDIT_PATCH_EMBED_FWD="fused-tma")
        for variant in ("fused", "gemm"):
            if reason:
                skips.append(Skip(OP, f"vdit-triton+{variant}", reason))
                continue
            add_embed(f"vdit-triton+{variant}",
                      lambda v, w, bias, pack: vk.patch_embed(v, pack, w, bias, backend="triton"),
                      env={"VDIT_PATCH_EMBED_FWD": variant, "VDIT_PATCH_EMBED_BWD": variant})
            add_unembed(f"vdit-triton+{variant}",
                        lambda x, w, bias, pack: vk.linear_unpatchify(x, pack, w, bias, wl.channels, backend="triton"),
                        env={"VDIT_LINEAR_UNPATCHIFY_FWD": variant, "VDIT_LINEAR_UNPATCHIFY_BWD": variant})
        # the cuda backend's patch embedding with its forward GEMM on ATen's addmm instead of
        # its kept cuBLASLt plan (csrc/linear_gemm_host.cpp): what the plan saves of host time;
        # forward only: the backward's GEMMs are ATen's either way
        add_forward_variant("vdit-cuda+addmm", "cuda", vdit_reason("cuda", "patch", device, "patch_embed") or (
            None if device == "cuda" else "GPU only (CPU tensors take ATen's GEMMs anyway)"), VDIT_CUBLASLT="0")
    for wl in workloads:
        _one(wl)
    # the rows the issues' targets judge first (a stable sort): a time cap, as in a short
    # GPU lease, cuts the output layer (no target) and then the forced variants instead
    out.sort(key=lambda case: (case.name == "linear_unpatchify", "+" in case.provider))
    return out, skips
