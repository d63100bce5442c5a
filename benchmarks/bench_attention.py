"""Attention suite: block-diagonal attention over a video pack, fwd / bwd / fwd+bwd (TFLOP/s).

Providers:
  vdit-<backend>         vk.varlen_attention (reference, triton, cuda where implemented)
  vdit-<backend>+rope    the same with the fused 3D RoPE (rope=Rope3D); FLOPs count attention only
  vdit-triton+split, vdit-triton+atomic-dq, vdit-triton+torch-fa2
                         bwd / fwd+bwd with the backward strategy forced (VDIT_ATTN_BWD): the
                         atomic-free two Triton kernels, FlashAttention-2's scheme (one Triton
                         kernel, dQ added atomically), or PyTorch's own FlashAttention-2
                         backward kernel on the Triton forward's out and lse (not ours: the
                         row says what the Triton forward costs with it); vdit-triton itself
                         uses the default ("auto": the fastest, timed on the first call)
  vdit-triton+pointers, vdit-triton+tma
                         fwd / fwd+bwd with the forward's K/V reads forced (VDIT_ATTN_FWD):
                         masked pointer loads, or TMA tensor descriptors (sm_90)
  vdit-triton+deterministic
                         bwd with deterministic=True: the split backward's pointer variant on
                         the first tile of each list, unmeasured (what VDIT_AUTOTUNE=0 runs too)
  vdit-triton+split+pointers, vdit-triton+split+tma
                         bwd: the split backward with its reads forced (VDIT_ATTN_BWD_READ);
                         these, +deterministic and vdit-triton's bwd row also record the device time per
                         kernel (profiler)
  torch-varlen           torch.nn.attention.varlen.varlen_attn (CUDA)
  sdpa-padded            F.scaled_dot_product_attention on the pack padded to (B, H, max_seqlen, D)
                         with a key-padding mask; FLOPs counted unpadded, so padding shows as lost efficiency
  flex-attention         torch.compile'd flex_attention with a document mask (B=1); the block-mask
                         creation is timed as its own row (name create_block_mask)
  flash-attn-varlen      flash_attn.flash_attn_varlen_func, if importable
  xformers               xformers.ops.memory_efficient_attention with a BlockDiagonalMask, if importable
FLOPs: benchmarks/flops.py (4 * sum(L_i^2) * H * D forward, backward 2.5x).
The reference materialises (H, L, L) float32 scores per video: it is skipped where
that would not fit in free memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import vdit_kernels as vk

from . import flops
from .common import (VDIT_BACKENDS, Case, Prepared, Skip, backward_fn, dtype_for, free_memory_bytes,
                     peer_reason, vdit_reason, wanted, with_env)

OP = "attention"
MODES = ("fwd", "bwd", "fwd+bwd")


class _Inputs:
    def __init__(self, wl, device, grad):
        dtype = dtype_for(device)
        g = torch.Generator(device="cpu").manual_seed(0)
        self.pack = vk.VideoPack.from_shapes(wl.shapes, wl.patch, device=device)
        n = wl.num_tokens
        self.q, self.k, self.v = (torch.randn(n, wl.heads, wl.head_dim, generator=g).to(device, dtype)
                                  .requires_grad_(grad) for _ in range(3))
        self.cu, self.max = self.pack.cu_seqlens, self.pack.max_seqlen


def _padded(x, seqlens, max_len):
    """Packed (N, H, D) -> (B, H, max_len, D), zero padded (done once, outside the timing)."""
    out = x.new_zeros(len(seqlens), max_len, x.shape[1], x.shape[2])
    start = 0
    for i, n in enumerate(seqlens):
        out[i, :n] = x[start:start + n]
        start += n
    return out.transpose(1, 2).detach()


BREAKDOWN = ("vdit-triton", "vdit-triton+split+pointers", "vdit-triton+split+tma", "vdit-triton+deterministic")


def _recording_strategy(prepared: Prepared) -> Prepared:
    """The same case, recording after each call which strategy the default Triton backward
    ran (its measured choice happens in the first call), as the row's ran_as: the forced
    row it stands for (vdit-triton+split, +atomic-dq), so the target of our own kernels is
    judged from the default row when auto picked one of them (run.target_table; run_case
    reads `extra` after timing)."""
    from vdit_kernels.triton.attention import LAST_BACKWARD

    fn = prepared.fn

    def run():
        out = fn()
        if LAST_BACKWARD["strategy"] in ("split", "atomic-dq"):
            prepared.extra["ran_as"] = f"vdit-triton+{LAST_BACKWARD['strategy']}"
        return out
    return Prepared(run, grad_to_none=prepared.grad_to_none, extra=prepared.extra)


def cases(device: str, quick: bool, workloads, providers=None):
    out, skips = [], []
    modes = MODES
    def _one(wl):  # a function, so each case's build() closes over its own workload
        lens = wl.seqlens
        for mode in modes:
            grad = mode != "fwd"
            fl = flops.attention_flops(lens, lens, wl.heads, wl.head_dim, mode)

            def add(provider, make, name="varlen_attention", note="", fl=fl, mode=mode):
                if wanted(provider, providers):
                    # our backward's kernels, as chosen and with each read forced, profiled
                    breakdown = mode == "bwd" and provider in BREAKDOWN
                    out.append(Case(OP, name, mode, wl, provider, make, flops=fl, note=note, breakdown=breakdown))

            for b in VDIT_BACKENDS:
                op = "varlen_attention_bwd" if grad else "varlen_attention_fwd"
                reason = vdit_reason(b, "attention", device, op)
                if b == "reference" and reason is None:
                    need = wl.heads * max(lens) ** 2 * 4 * (6 if grad else 3)
                    if need > 0.6 * free_memory_bytes(device):
                        reason = (f"{wl.name}: would materialise ~{need / 1e9:.0f} GB of (H, L, L) scores, "
                                  f"more than the free memory")
                if reason:
                    skips.append(Skip(OP, f"vdit-{b} {mode}", reason))
                    continue
                for with_rope in (False, True):
                    def make(b=b, with_rope=with_rope, mode=mode, grad=grad):
                        x = _Inputs(wl, device, grad)
                        rope = vk.Rope3D.from_pack(x.pack, wl.rope_dims) if with_rope else None
                        prepared = backward_fn(lambda: vk.varlen_attention(x.q, x.k, x.v, x.cu, x.cu, x.max,
                                                                           x.max, rope=rope, backend=b),
                                               (x.q, x.k, x.v), mode)
                        return _recording_strategy(prepared) if b == "triton" and grad and not with_rope else prepared
                    add(f"vdit-{b}" + ("+rope" if with_rope else ""), make,
                        note="fused 3D RoPE" if with_rope else "")
                # forced variants of the Triton backend (the default picks by measuring)
                forced = []  # (variables, provider suffix, note)
                if b == "triton" and mode != "bwd":
                    forced += [({"VDIT_ATTN_FWD": v}, v, f"forward reads K/V by {v}") for v in ("pointers", "tma")]
                if b == "triton" and mode == "bwd":
                    # the split backward's two reads (its kernels autotuned 4-5 ms apart on the
                    # H100, TMA ahead, while the measured choice timed TMA slower end to end)
                    forced += [({"VDIT_ATTN_BWD": "split", "VDIT_ATTN_BWD_READ": r}, f"split+{r}",
                                f"split backward, q/dO and k/v read by {r}") for r in ("pointers", "tma")]
                if b == "triton" and grad:
                    from vdit_kernels.triton.attention import BWD_STRATEGIES, _torch_fa2_possible

                    # the op's own condition for these inputs (torch-fa2 forced where it cannot
                    # run would time the split kernels under its name)
                    probe = torch.empty(1, wl.heads, wl.head_dim, dtype=dtype_for(device), device=device)
                    for s in BWD_STRATEGIES:
                        if s != "torch-fa2" or _torch_fa2_possible(probe, None):
                            forced.append(({"VDIT_ATTN_BWD": s}, s, f"backward strategy {s}"))
                        else:
                            skips.append(Skip(OP, f"vdit-triton+{s} {mode}", "cannot run here (PyTorch's "
                                              "FlashAttention-2 backward: CUDA, half precision, head dim % 8)"))
                for env, suffix, note in forced:

                    def make_forced(mode=mode, grad=grad, env=env):
                        x = _Inputs(wl, device, grad)
                        prepared = backward_fn(lambda: vk.varlen_attention(x.q, x.k, x.v, x.cu, x.cu, x.max,
                                                                           x.max, backend="triton"),
                                               (x.q, x.k, x.v), mode)
                        return with_env(prepared, **env)
                    add(f"vdit-triton+{suffix}", make_forced, note=note)
                if b == "triton" and mode == "bwd":
                    def make_deterministic(mode=mode, grad=grad):
                        x = _Inputs(wl, device, grad)
                        return backward_fn(lambda: vk.varlen_attention(x.q, x.k, x.v, x.cu, x.cu, x.max, x.max,
                                                                       deterministic=True, backend="triton"),
                                           (x.q, x.k, x.v), mode)
                    add("vdit-triton+deterministic", make_deterministic,
                        note="deterministic=True: split, pointer reads, the default tiles (no autotuning)")

            reason = peer_reason(device, "torch.nn.attention.varlen")
            if reason:
                skips.append(Skip(OP, "torch-varlen", reason))
            else:
                def make_tv(mode=mode, grad=grad):
                    from torch.nn.attention.varlen import varlen_attn

                    x = _Inputs(wl, device, grad)
                    return backward_fn(lambda: varlen_attn(x.q, x.k, x.v, x.cu, x.cu, x.max, x.max),
                                       (x.q, x.k, x.v), mode)
                add("torch-varlen", make_tv)

            reason = peer_reason(device, needs_cuda=False, cpu_ok=True)
            if reason:
                skips.append(Skip(OP, "sdpa-padded", reason))
            else:
                def make_sd(mode=mode, grad=grad):
                    x = _Inputs(wl, device, False)
                    q, k, v = (_padded(t, lens, max(lens)).requires_grad_(grad) for t in (x.q, x.k, x.v))
                    mask = None
                    if len(set(lens)) > 1:
                        valid = torch.arange(max(lens), device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
                        mask = valid[:, None, None, :]
                    return backward_fn(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                       (q, k, v), mode)
                add("sdpa-padded", make_sd, note="padded; FLOPs counted unpadded")

            reason = peer_reason(device, "torch.nn.attention.flex_attention")
            if reason:
                skips.append(Skip(OP, "flex-attention", reason))
            else:
                def flex_setup(x):
                    from torch.nn.attention.flex_attention import create_block_mask

                    seg = x.pack.segment_ids

                    def document(b, h, q_idx, kv_idx):
                        return seg[q_idx] == seg[kv_idx]
                    n = wl.num_tokens
                    # _compile=True builds the mask without materialising an (N, N) boolean matrix
                    return lambda: create_block_mask(document, None, None, n, n, device=device, _compile=True)

                def make_fx(mode=mode, grad=grad):
                    from torch.nn.attention.flex_attention import flex_attention

                    x = _Inputs(wl, device, False)
                    block_mask = flex_setup(x)()
                    fx = torch.compile(flex_attention, dynamic=False)
                    q, k, v = (t.detach().transpose(0, 1)[None].contiguous().requires_grad_(grad)
                               for t in (x.q, x.k, x.v))
                    return backward_fn(lambda: fx(q, k, v, block_mask=block_mask), (q, k, v), mode)
                add("flex-attention", make_fx, note="document mask")
                if mode == "fwd":
                    def make_bm():
                        return Prepared(flex_setup(_Inputs(wl, device, False)))
                    add("flex-attention", make_bm, name="create_block_mask", fl=None, mode="setup",
                        note="block-mask creation, not attention")

            reason = peer_reason(device, "flash_attn")
            if reason:
                skips.append(Skip(OP, "flash-attn-varlen", reason))
            else:
                def make_fa(mode=mode, grad=grad):
                    from flash_attn import flash_attn_varlen_func

                    x = _Inputs(wl, device, grad)
                    return backward_fn(lambda: flash_attn_varlen_func(x.q, x.k, x.v, x.cu, x.cu, x.max, x.max),
                                       (x.q, x.k, x.v), mode)
                add("flash-attn-varlen", make_fa)

            reason = peer_reason(device, "xformers")
            if reason:
                skips.append(Skip(OP, "xformers", reason))
            else:
                def make_xf(mode=mode, grad=grad):
                    from xformers.ops import fmha

                    x = _Inputs(wl, device, False)
                    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(lens)
                    q, k, v = (t.detach()[None].requires_grad_(grad) for t in (x.q, x.k, x.v))
                    return backward_fn(lambda: fmha.memory_efficient_attention(q, k, v, attn_bias=bias),
                                       (q, k, v), mode)
                add("xformers", make_xf)
    for wl in workloads:
        _one(wl)
    # the variants of ours (+rope, forced strategies and reads) after the comparison rows
    # of every mode (a stable sort): a time cap, as in a short GPU lease, cuts them first,
    # and among them the FIRST_VARIANTS first (the H100 lease of 2026-11-27 was cut after
    # the forward's +rope and +pointers rows, before any backward variant)
    out.sort(key=_order)
    return out, skips


# the variant rows a capped run needs first: the split backward with each read (the
# unmet backward target; auto chose between them by a few noisy samples), the atomic-dq
# backward (its TMA bulk reductions), deterministic=True's default tiles, fused RoPE
FIRST_VARIANTS = (("bwd", "vdit-triton+split+tma"), ("bwd", "vdit-triton+split+pointers"),
                  ("bwd", "vdit-triton+atomic-dq"), ("bwd", "vdit-triton+deterministic"),
                  ("fwd", "vdit-triton+rope"), ("fwd+bwd", "vdit-triton+rope"))


def _order(case) -> tuple:
    """Sort key: comparison rows, then FIRST_VARIANTS in that order, then other variants."""
    if "+" not in case.provider:
        return (0, 0)
    key = (case.mode, case.provider)
    return (1, FIRST_VARIANTS.index(key)) if key in FIRST_VARIANTS else (2, 0)
