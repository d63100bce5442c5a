"""Forward + backward of the video DiT on a pack of videos with every available backend.

    python -m vdit_kernels.model.demo [--config wan-1.3b-like] [--depth 4] [--iters 3]

On a GPU: a realistic width (wan-1.3b-like, a few blocks), bfloat16, four videos of
different resolutions and lengths with text. On CPU: the small config in float32,
reference backend only (other backends are listed with the reason they were skipped).
Prints time per forward+backward, peak CUDA memory and the max difference of outputs
and latent gradients to the reference backend.
"""
from __future__ import annotations

import argparse
import time

import torch

import vdit_kernels as vk
from vdit_kernels import backend as _backend

from .dit import DiTConfig, VideoDiT, family_backends, model_ops, why_not

GPU_SHAPES = [(5, 30, 52), (9, 24, 40), (1, 60, 104), (13, 16, 16)]  # latent (T, H, W)
GPU_TEXT = [77, 40, 12, 0]
CPU_SHAPES = [(3, 8, 8), (2, 12, 16), (1, 16, 16)]
CPU_TEXT = [12, 7, 0]


def relative_diff(xs, refs) -> float:
    """max |x - ref| / max |ref| over lists of tensors (the scale of the whole reference)."""
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(xs, refs))
    scale = max(b.float().abs().max().item() for b in refs)
    return diff / scale if scale else diff


def resolved(cfg, backend, device) -> str:
    """Which backend each family's ops actually run on (auto picks per op)."""
    chosen = family_backends(backend)
    parts = {}
    for family, op in model_ops(cfg):
        if op.endswith("backward") or op.endswith("bwd"):
            continue
        parts.setdefault(family, _backend.resolve(family, device, chosen[family], op))
    return " ".join(f"{f}={b}" for f, b in parts.items())


def partial(cfg, backend, device):
    """backend for each family where it can run all of the model's ops of that family, else reference."""
    mix = {}
    for family in _backend.FAMILIES:
        ops = [op for f, op in model_ops(cfg) if f == family]
        ok = ops and all(_backend.why_not(backend, family, device, op) is None for op in ops)
        mix[family] = backend if ok else "reference"
    return mix if backend in mix.values() else None


def run_once(model, pack, latents, t, text, backend):
    latents = [x.detach().clone().requires_grad_(True) for x in latents]
    model.zero_grad(set_to_none=True)
    out = model(latents, pack, t, text, backend=backend)
    sum(o.float().square().mean() for o in out).backward()
    return [o.detach() for o in out], [x.grad for x in latents]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--config", default="wan-1.3b-like" if cuda else "small")
    parser.add_argument("--depth", type=int, default=4 if cuda else 2, help="number of blocks")
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--unfused-rope", action="store_true",
                        help="apply_rope_3d then attention (runs the rope family's kernels)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    cfg = DiTConfig.from_name(args.config, depth=args.depth, fused_rope=not args.unfused_rope)
    shapes, text_lengths = (GPU_SHAPES, GPU_TEXT) if cuda else (CPU_SHAPES, CPU_TEXT)
    torch.manual_seed(0)
    model = VideoDiT(cfg).init_weights(zero_init=False).to(device, dtype)
    pack = vk.VideoPack.from_shapes(shapes, cfg.patch_size, device=device, text_lengths=text_lengths)
    latents = [torch.randn(cfg.in_channels, *s, device=device, dtype=dtype) for s in shapes]
    t = torch.rand(len(shapes), device=device) * 1000
    text = torch.randn(pack.num_text_tokens, cfg.text_dim, device=device, dtype=dtype)

    params = sum(p.numel() for p in model.parameters())
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; config {args.config} "
          f"(hidden {cfg.hidden}, {cfg.heads} heads x {cfg.head_dim}, depth {cfg.depth}, "
          f"{params / 1e6:.1f}M params, rope dims {cfg.rope_dims}), {args.dtype}")
    print(f"pack: {pack.batch_size} videos, latent shapes {list(shapes)}, tokens {list(pack.seqlens)} "
          f"(N={pack.num_tokens}), text tokens {text_lengths}")
    for family in _backend.FAMILIES:
        print(f"  available backends for {family}: {', '.join(vk.available_backends(family, device))}")

    rows, ref = [], None
    candidates = []
    for name in ("reference", "triton", "cuda"):
        reason = why_not(cfg, name, device)
        if reason is None:
            candidates.append((name, name))
            continue
        print(f"skipped {name}: {reason}")
        mix = partial(cfg, name, device)
        if mix is not None:
            candidates.append((f"{name} where available", mix))
    candidates.append(("auto", "auto"))
    for label, backend in candidates:
        run_once(model, pack, latents, t, text, backend)  # warm-up (JIT compile, caches)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.iters):
            out, grads = run_once(model, pack, latents, t, text, backend)
        if cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / args.iters * 1e3
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if cuda else "-"
        if ref is None:
            ref = (out, grads)
        rows.append((label, resolved(cfg, backend, device), f"{ms:.1f}", peak,
                     f"{relative_diff(out, ref[0]):.2e}", f"{relative_diff(grads, ref[1]):.2e}"))

    header = ("backend", "ops run on", "fwd+bwd ms", "peak GiB", "out: rel. diff", "d latents: rel. diff")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print()
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    # relative: the latent gradients of a mean-square loss are ~1e-5, so an absolute
    # difference would look small even for an all-zero gradient
    print("\n(rel. diff: max|x - x_ref| / max|x_ref| over the pack; x_ref: the first row's run)")
    if not cuda:
        print("(CPU run: timings are not a performance result; peak memory is measured on CUDA only)")


if __name__ == "__main__":
    main()
