"""Block suite: the attention half of a DiT block over a pack, forward (TFLOP/s).

    x (N, hidden) -> qkv = Linear(hidden, 3*hidden) -> 3D RoPE(q, k) -> varlen attention -> Linear(hidden, hidden)

Providers: vdit-<backend> (rope and attention on that backend, RoPE as its own op),
vdit-<backend>+fused-rope (RoPE fused into attention), torch-varlen (reference RoPE
under torch.compile + torch.nn.attention.varlen.varlen_attn, CUDA only).
FLOPs: the two projections (2*N*hidden*4*hidden) plus attention forward (flops.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import vdit_kernels as vk
from vdit_kernels import reference as ref

from . import flops
from .common import VDIT_BACKENDS, Case, Prepared, Skip, dtype_for, free_memory_bytes, peer_reason, vdit_reason, wanted

OP = "block"


class _Inputs:
    def __init__(self, wl, device):
        dtype = dtype_for(device)
        g = torch.Generator(device="cpu").manual_seed(0)
        self.pack = vk.VideoPack.from_shapes(wl.shapes, wl.patch, device=device)
        h = wl.hidden
        self.x = torch.randn(wl.num_tokens, h, generator=g).to(device, dtype)
        self.w_qkv = (torch.randn(3 * h, h, generator=g) / h ** 0.5).to(device, dtype)
        self.w_out = (torch.randn(h, h, generator=g) / h ** 0.5).to(device, dtype)
        self.positions = self.pack.positions.to(torch.float32)


def _block(x, wl, rope_fn, attn_fn):
    n = x.x.shape[0]
    q, k, v = F.linear(x.x, x.w_qkv).view(n, 3, wl.heads, wl.head_dim).unbind(1)
    o = attn_fn(*rope_fn(q, k), v)
    return F.linear(o.reshape(n, -1), x.w_out)


def cases(device: str, quick: bool, workloads, providers=None):
    out, skips = [], []
    def _one(wl):  # a function, so each case's build() closes over its own workload
        lens = wl.seqlens
        fl = 2.0 * wl.num_tokens * wl.hidden * 4 * wl.hidden + flops.attention_flops(lens, lens, wl.heads, wl.head_dim)

        def add(provider, make, note=""):
            if wanted(provider, providers):
                out.append(Case(OP, "attention_block", "fwd", wl, provider, make, flops=fl, note=note))

        for b in VDIT_BACKENDS:
            reason = (vdit_reason(b, "rope", device, "rope_3d")
                      or vdit_reason(b, "attention", device, "varlen_attention_fwd"))
            if b == "reference" and reason is None and wl.heads * max(lens) ** 2 * 12 > 0.6 * free_memory_bytes(device):
                reason = f"{wl.name}: the reference attention scores would not fit in free memory"
            if reason:
                skips.append(Skip(OP, f"vdit-{b}", reason))
                continue
            for fused in (False, True):
                def make(b=b, fused=fused):
                    x = _Inputs(wl, device)
                    cu, m = x.pack.cu_seqlens, x.pack.max_seqlen
                    if fused:
                        rope = vk.Rope3D.from_pack(x.pack, wl.rope_dims)
                        rope_fn = lambda q, k: (q, k)  # noqa: E731
                    else:
                        rope = None
                        rope_fn = lambda q, k: vk.apply_rope_3d(q, k, x.pack, wl.rope_dims, backend=b)  # noqa: E731
                    attn = lambda q, k, v: vk.varlen_attention(q, k, v, cu, cu, m, m, rope=rope, backend=b)  # noqa: E731
                    return Prepared(lambda: _block(x, wl, rope_fn, attn))
                add(f"vdit-{b}" + ("+fused-rope" if fused else ""), make)

        reason = peer_reason(device, "torch.nn.attention.varlen")
        if reason:
            skips.append(Skip(OP, "torch-varlen", reason))
        else:
            def make_tv():
                from torch.nn.attention.varlen import varlen_attn

                x = _Inputs(wl, device)
                cu, m = x.pack.cu_seqlens, x.pack.max_seqlen
                rope_c = torch.compile(ref.apply_rope_3d, dynamic=False)
                rope_fn = lambda q, k: rope_c(q, k, None, wl.rope_dims, positions=x.positions)  # noqa: E731
                attn = lambda q, k, v: varlen_attn(q, k, v, cu, cu, m, m)  # noqa: E731
                return Prepared(lambda: _block(x, wl, rope_fn, attn))
            add("torch-varlen", make_tv, "compiled reference RoPE + varlen_attn")
    for wl in workloads:
        _one(wl)
    return out, skips
