"""RoPE suite: 3D rotary embedding of q and k (memory bound: GB/s against the copy limit).

Providers: vdit backends (out of place; forward; the GPU backends also in place,
vdit-<backend>+inplace, liger's way; the cuda backend's other kernels forced, the
shared-table one and the tiled one's second shape, vdit-cuda+shared[+inplace] and
vdit-cuda+tiled-heads[+inplace], VDIT_ROPE_CUDA), the reference under torch.compile,
and, if importable, flash-attn's Triton rotary kernel (apply_rotary from
flash_attn.ops.triton.rotary, or the same module fetched alone as flash_attn_rotary by
scripts/fetch_gpu_wheels.sh: flash-attn's wheels need a CUDA build, this module does
not) and liger_kernel's rope, both given the 3D angles as a 1D cos/sin table
(interleaved 3D RoPE is 1D RoPE with concatenated per-axis angles; liger rotates halves
of the whole head dim instead, same bytes moved). The peers read a precomputed (N, D/2)
cos/sin table; vdit computes angles in-kernel from the (N, 3) positions.
"""
from __future__ import annotations

import importlib

import torch

import vdit_kernels as vk
from vdit_kernels import reference as ref

from . import flops
from .common import (VDIT_BACKENDS, Case, Prepared, Skip, dtype_for, has_module, peer_reason, vdit_reason, wanted,
                     with_env)

OP = "rope"
# VDIT_ROPE_CUDA's values other than the default (tiled), each a forced row vdit-cuda+<value>
CUDA_FORCED_KERNELS = ("shared", "tiled-heads")
# where flash-attn's apply_rotary is found: the package, else the standalone module
FLASH_ROTARY_MODULES = ("flash_attn.ops.triton.rotary", "flash_attn_rotary")


class _Inputs:
    def __init__(self, wl, device):
        dtype = dtype_for(device)
        # drawn where they are used: the train pack's q and k drawn on the CPU took about
        # 90 s of a 100 s capped step (H200, 2026-11-28)
        g = torch.Generator(device=device).manual_seed(0)
        self.pack = vk.VideoPack.from_shapes(wl.shapes, wl.patch, device=device)
        n = wl.num_tokens
        self.q = torch.randn(n, wl.heads, wl.head_dim, generator=g, device=device, dtype=dtype)
        self.k = torch.randn(n, wl.heads, wl.head_dim, generator=g, device=device, dtype=dtype)
        self.positions = self.pack.positions.to(torch.float32)
        self.angles = ref.rope_angles(self.positions, wl.rope_dims, 10000.0)


def cases(device: str, quick: bool, workloads, providers=None):
    out, skips = [], []
    elt = torch.empty(0, dtype=dtype_for(device)).element_size()
    def _one(wl):  # a function, so each case's build() closes over its own workload
        nbytes = flops.rope_bytes(wl.num_tokens, wl.heads, wl.heads, wl.head_dim, elt)

        def add(provider, make, note=""):
            if wanted(provider, providers):
                out.append(Case(OP, "rope_3d", "fwd", wl, provider, make, bytes=nbytes, note=note))

        for b in VDIT_BACKENDS:
            reason = vdit_reason(b, "rope", device, "rope_3d")
            if reason:
                skips.append(Skip(OP, f"vdit-{b}", reason))
                continue

            def make(b=b):
                x = _Inputs(wl, device)
                return Prepared(lambda: vk.apply_rope_3d(x.q, x.k, x.pack, wl.rope_dims, backend=b))
            add(f"vdit-{b}", make)
            if b == "reference" or vdit_reason(b, "rope", device, "rope_3d_"):
                continue

            # in place, as liger's rope runs: the like-for-like match of that peer (the same
            # bytes move; repeated rotations of one buffer time the same)
            def make_inplace(b=b):
                x = _Inputs(wl, device)
                return Prepared(lambda: vk.apply_rope_3d(x.q, x.k, x.pack, wl.rope_dims, inplace=True, backend=b))
            add(f"vdit-{b}+inplace", make_inplace, "in place")

        reason = peer_reason(device)
        if reason:
            skips.append(Skip(OP, "reference-compile", reason))
        else:
            def make_c():
                x = _Inputs(wl, device)
                f = torch.compile(ref.apply_rope_3d, dynamic=False)
                return Prepared(lambda: f(x.q, x.k, None, wl.rope_dims, positions=x.positions))
            add("reference-compile", make_c)

        fa_module = next((m for m in FLASH_ROTARY_MODULES if has_module(m)), FLASH_ROTARY_MODULES[0])
        reason = peer_reason(device, fa_module)
        if reason:
            skips.append(Skip(OP, "flash-attn-rotary", reason))
        else:
            def make_fa(fa_module=fa_module):
                apply_rotary = importlib.import_module(fa_module).apply_rotary
                x = _Inputs(wl, device)
                cos, sin = x.angles.cos().to(x.q.dtype), x.angles.sin().to(x.q.dtype)

                def run():
                    return (apply_rotary(x.q[None], cos, sin, interleaved=True),
                            apply_rotary(x.k[None], cos, sin, interleaved=True))
                return Prepared(run)
            add("flash-attn-rotary", make_fa, "1D table of the 3D angles")

        reason = peer_reason(device, "liger_kernel")
        if reason:
            skips.append(Skip(OP, "liger-rope", reason))
        else:
            def make_lg():
                from liger_kernel.ops.rope import LigerRopeFunction

                x = _Inputs(wl, device)
                # liger takes HF's (B, heads, S, D) view of (B, S, heads, D) memory: our
                # (N, H, D) tokens as they are, rotated in place (no copy; repeated rotations
                # of the same buffer time the same)
                q, k = x.q[None].transpose(1, 2), x.k[None].transpose(1, 2)
                ang = torch.cat([x.angles, x.angles], dim=-1)[None]
                cos, sin = ang.cos().to(q.dtype), ang.sin().to(q.dtype)
                return Prepared(lambda: LigerRopeFunction.apply(q, k, cos, sin))
            add("liger-rope", make_lg, "rotate-half 1D table, in place")

        # the cuda backend's other kernels (VDIT_ROPE_CUDA), forced: the evidence for, or
        # against, the default (the vdit-cuda rows above); last, so a time cap cuts these first
        reason = vdit_reason("cuda", "rope", device, "rope_3d")
        for variant in CUDA_FORCED_KERNELS:
            for suffix, inplace in (("", False), ("+inplace", True)):
                if reason:
                    skips.append(Skip(OP, f"vdit-cuda+{variant}{suffix}", reason))
                    continue

                def make_forced(inplace=inplace, variant=variant):
                    x = _Inputs(wl, device)
                    return with_env(Prepared(lambda: vk.apply_rope_3d(x.q, x.k, x.pack, wl.rope_dims,
                                                                      inplace=inplace, backend="cuda")),
                                    VDIT_ROPE_CUDA=variant)
                add(f"vdit-cuda+{variant}{suffix}", make_forced, f"{variant} kernel" + (", in place" if inplace else ""))
    for wl in workloads:
        _one(wl)
    return out, skips
