"""DiT suite: one whole video DiT block, forward + backward, packed vs padded (TFLOP/s, tokens/s).

The unit timed is vdit_kernels.model.VideoDiT with depth 1: patch embedding, timestep
and text conditioning, one block (adaLN-Zero self-attention with 3D RoPE, cross-attention
to each video's text, MLP), final layer back to latents; then the backward of
sum_i <out_i, g_i>. Text: TEXT_TOKENS per video.

Providers:
  vdit-<backend>          the packed model on that backend for every op family
                          (vdit_kernels.model; fused patch embedding, varlen attention,
                          RoPE fused into attention)
  vdit-<backend>-compile  the same under torch.compile (the ops stay custom ops)
  vdit-triton+triton-bwd  vdit-triton with the attention backward chosen among our Triton
                          kernels only (VDIT_ATTN_BWD=triton; "auto" may pick torch-fa2)
  torch-padded            the same model and weights in plain PyTorch over a padded batch
                          (vdit_kernels.model.padded, pad="grid": the videos zero-padded to
                          one (B, C, T, H, W) tensor, nn.Conv3d patch embedding, eager RoPE,
                          F.scaled_dot_product_attention with key-padding masks)
  torch-padded-tokens     the same with only the token rows padded (pad="tokens": nn.Conv3d per
                          video, each video's tokens padded to the longest; on the mixed 60k
                          pack 1.7x the real tokens where the padded grid holds 4.0x): the
                          stronger plain-PyTorch baseline
  torch-padded(-tokens)-compile  those under torch.compile
  vdit-<backend>+rope (attention suite rows, op attention): the step's self-attention alone,
                          fwd+bwd with fused RoPE on the same pack, for its share of the step
FLOPs: the real (unpadded) tokens' matmuls and attention (flops.py), forward + backward,
so the padded providers' wasted work shows as lower TFLOP/s. run.py adds, per vdit row,
the share of the step spent in self-attention where the attention suite timed the same
workload and backend (fwd+bwd with fused RoPE).
"""
from __future__ import annotations

import torch

import vdit_kernels as vk

from . import flops
from .common import VDIT_BACKENDS, Case, Prepared, Skip, dtype_for, peer_reason, wanted, with_env

OP = "dit"
TEXT_TOKENS = {"cuda": 512, "cpu": 8}   # umT5 context length of Wan; tiny on CPU


def _config(wl, device):
    from vdit_kernels.model import DiTConfig

    return DiTConfig(in_channels=wl.channels, hidden=wl.hidden, heads=wl.heads, head_dim=wl.head_dim,
                     depth=1, patch_size=wl.patch, rope_dims=wl.rope_dims,
                     text_dim=4096 if device == "cuda" else wl.hidden)


def dit_flops(wl, cfg, text_tokens: int) -> float:
    """Forward + backward FLOPs of the depth-1 model on the real tokens."""
    n, h, f, m = wl.num_tokens, cfg.hidden, cfg.patch_features, cfg.mlp_hidden
    s = text_tokens * len(wl.shapes)
    matmul = 2.0 * (n * f * h            # patch embedding
                    + n * h * 4 * h      # qkv + self-attention output projection
                    + n * h * 2 * h      # cross-attention q + output projection
                    + s * h * h + s * h * 2 * h  # text MLP's second layer, cross k/v
                    + n * h * m * 2      # MLP
                    + n * h * f)         # final projection
    # the text MLP's first layer: forward and weight gradient only (the text needs none)
    text_in = 2.0 * s * cfg.text_dim * h
    lens = wl.seqlens
    attn = (flops.attention_flops(lens, lens, cfg.heads, cfg.head_dim, "fwd+bwd")
            + flops.attention_flops(lens, [text_tokens] * len(lens), cfg.heads, cfg.head_dim, "fwd+bwd"))
    return 3.0 * matmul + 2.0 * text_in + attn


class _Inputs:
    def __init__(self, wl, device):
        from vdit_kernels.model import VideoDiT

        self.cfg = cfg = _config(wl, device)
        dtype = dtype_for(device)
        g = torch.Generator().manual_seed(0)
        n_text = TEXT_TOKENS["cuda" if device == "cuda" else "cpu"]
        self.model = VideoDiT(cfg).init_weights(zero_init=False, generator=g).to(device, dtype)
        self.pack = vk.VideoPack.from_shapes(wl.shapes, wl.patch, device=device,
                                             text_lengths=[n_text] * len(wl.shapes))
        # the pack's per-token tensors built once, before timing, as a data loader would
        # (eager steps read them; compiled ones build them in their graph: VideoPack._per_token)
        self.pack.positions, self.pack.segment_ids
        self.latents = [torch.randn(wl.channels, *s, generator=g).to(device, dtype).requires_grad_(True)
                        for s in wl.shapes]
        self.text = torch.randn(self.pack.num_text_tokens, cfg.text_dim, generator=g).to(device, dtype)
        self.t = torch.linspace(1.0, 999.0, len(wl.shapes)).to(device, dtype)
        self.cot = [torch.randn(wl.channels, *s, generator=g).to(device, dtype) for s in wl.shapes]

    def step(self, forward):
        def run():
            out = forward(self.latents, self.pack, self.t, self.text)
            sum((o * c).sum() for o, c in zip(out, self.cot)).backward()
        return Prepared(run, grad_to_none=[*self.model.parameters(), *self.latents])


def cases(device: str, quick: bool, workloads, providers=None):
    out, skips = [], []

    def _one(wl):  # a function, so each case's build() closes over its own workload
        from vdit_kernels.model import why_not

        fl = dit_flops(wl, _config(wl, device), TEXT_TOKENS["cuda" if device == "cuda" else "cpu"])

        def add(provider, make, note=""):
            if wanted(provider, providers):
                out.append(Case(OP, "dit_block", "fwd+bwd", wl, provider, make, flops=fl, note=note))

        for b in VDIT_BACKENDS:
            reason = why_not(_config(wl, device), b, torch.device(device))
            if reason is None and device != "cuda" and b != "reference":
                reason = "the CPU smoke run times the reference providers only"
            if reason:
                skips.append(Skip(OP, f"vdit-{b}", reason))
                continue

            # (suffix, torch.compile, environment, note): compiled, the vdit ops stay opaque custom
            # ops and torch.compile fuses what lies between them (norms, adaLN modulation,
            # gates, GELU), as it does for the padded model it is compared with; with
            # VDIT_ATTN_BWD=triton the attention backward is chosen among our kernels only
            # ("auto" may pick PyTorch's FlashAttention-2 backward)
            variants = [("", False, {}, "packed, depth 1"),
                        ("-compile", True, {}, "packed, depth 1, torch.compile")]
            if b == "triton" and device == "cuda":
                variants.append(("+triton-bwd", False, {"VDIT_ATTN_BWD": "triton"},
                                 "packed, depth 1, attention backward by Triton kernels only"))
            for suffix, compiled, env, note in variants:
                reason = peer_reason(device, needs_cuda=False, cpu_ok=True) if compiled else None
                if reason:
                    skips.append(Skip(OP, f"vdit-{b}{suffix}", reason))
                    continue

                def make(b=b, compiled=compiled, env=env):
                    x = _Inputs(wl, device)
                    fwd = lambda lat, pack, t, text: x.model(lat, pack, t, text, backend=b)  # noqa: E731
                    # dynamic=False as in every suite: fwd's code object is shared by the
                    # workloads, so a second one would recompile with symbolic shapes
                    prepared = x.step(torch.compile(fwd, dynamic=False) if compiled else fwd)
                    return with_env(prepared, **env) if env else prepared
                add(f"vdit-{b}{suffix}", make, note)

        reason = peer_reason(device, needs_cuda=False, cpu_ok=True)
        if reason:
            skips.append(Skip(OP, "torch-padded", reason))
            return
        for pad in ("grid", "tokens"):
            for compiled in (False, True):
                def make_padded(compiled=compiled, pad=pad):
                    from vdit_kernels.model.padded import padded_forward

                    x = _Inputs(wl, device)
                    fwd = lambda lat, pack, t, text: padded_forward(x.model, lat, pack, t, text, pad=pad)  # noqa: E731
                    return x.step(torch.compile(fwd, dynamic=False) if compiled else fwd)
                what = "padded batch" if pad == "grid" else "token rows padded per video"
                add("torch-padded" + ("-tokens" if pad == "tokens" else "") + ("-compile" if compiled else ""),
                    make_padded, f"{what}, nn.Conv3d, eager RoPE, SDPA" + (", torch.compile" if compiled else ""))

    for wl in workloads:
        _one(wl)
    if device == "cuda":  # the self-attention of the step alone (run.py: its share of the step)
        from . import bench_attention

        share = [f"vdit-{b}+rope" for b in VDIT_BACKENDS if wanted(f"vdit-{b}", providers)]
        attention, _ = bench_attention.cases(device, quick, workloads, share)
        out += [c for c in attention if c.mode == "fwd+bwd" and c.provider in share]
    out.sort(key=_order)
    return out, skips


def _order(case) -> int:
    """Eager ours and the eager baselines first, then our step's attention alone, the compiled
    baselines, ours compiled, the variants: a time cap, as in a short GPU lease, cuts the
    variants first and never a baseline alone (a stable sort)."""
    p = case.provider
    if case.op == "attention":
        return 1
    if "+" in p:
        return 4
    if "compile" in p:
        return 3 if p.startswith("vdit-") else 2
    return 0
