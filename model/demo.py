"""Forward + backward of the video DiT on a pack of videos with every available backend.

    python -m vdit_kernels.model.demo [--config wan-1.3b-like] [--depth 4] [--iters 3]
    torchrun --nproc-per-node 4 -m vdit_kernels.model.demo --sp usp [--ulysses-size 2]

On a GPU: a realistic width (wan-1.3b-like, a few blocks), bfloat16, four videos of
different resolutions and lengths with text. On CPU: the small config in float32,
reference backend only (other backends are listed with the reason they were skipped).
Prints time per forward+backward, peak CUDA memory and the max difference of outputs
and latent gradients to the reference backend.

--sp (under torchrun, NCCL on GPUs, one per process, gloo on CPU): the same model
sequence-parallel over the processes (vk.SequenceParallel: ulysses, allgather, ring or
usp), auto backend, against the whole model run on every rank: time, peak memory, and the
difference of the outputs and of the latent gradients summed over the ranks.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import vdit_kernels as vk
from vdit_kernels import backend as _backend

from .dit import PRESETS, DiTConfig, VideoDiT, family_backends, model_ops, why_not

GPU_SHAPES = [(5, 30, 52), (9, 24, 40), (1, 60, 104), (13, 16, 16)]  # latent (T, H, W)
GPU_TEXT = [77, 40, 12, 0]
CPU_SHAPES = [(3, 8, 8), (2, 12, 16), (1, 16, 16)]
CPU_TEXT = [12, 7, 0]


def relative_diff(xs, refs) -> float:
    """max |x - ref| / max |ref| over lists of tensors (the scale of the whole reference)."""
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(xs, refs))
    scale = max(b.float().abs().max().item() for b in refs)
    return diff / scale if scale else diff


def resolved(cfg, backend, device, dtype) -> str:
    """Which backend each family's ops actually run on (auto picks per op and dtype)."""
    chosen = family_backends(backend)
    parts = {}
    for family, op in model_ops(cfg):
        if op.endswith("backward") or op.endswith("bwd"):
            continue
        parts.setdefault(family, _backend.resolve(family, device, chosen[family], op, dtype))
    return " ".join(f"{f}={b}" for f, b in parts.items())


def partial(cfg, backend, device, dtype):
    """backend for each family where it can run all of the model's ops of that family (on
    tensors of `dtype`), else reference."""
    mix = {}
    for family in _backend.FAMILIES:
        ops = [op for f, op in model_ops(cfg) if f == family]
        ok = ops and all(_backend.why_not(backend, family, device, op, dtype) is None for op in ops)
        mix[family] = backend if ok else "reference"
    return mix if backend in mix.values() else None


def run_once(model, pack, latents, t, text, backend, sp=None):
    latents = [x.detach().clone().requires_grad_(True) for x in latents]
    model.zero_grad(set_to_none=True)
    out = model(latents, pack, t, text, backend=backend, sp=sp)
    sum(o.float().square().mean() for o in out).backward()
    return [o.detach() for o in out], [x.grad for x in latents]


def setup(args, device):
    """(config, model, pack, latents, timesteps, text, text lengths): the same on every
    process (seeded)."""
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    cfg = DiTConfig.from_name(args.config, depth=args.depth, fused_rope=not args.unfused_rope)
    shapes, text_lengths = (GPU_SHAPES, GPU_TEXT) if cuda else (CPU_SHAPES, CPU_TEXT)
    torch.manual_seed(0)
    model = VideoDiT(cfg).init_weights(zero_init=False).to(device, dtype)
    pack = vk.VideoPack.from_shapes(shapes, cfg.patch_size, device=device, text_lengths=text_lengths)
    latents = [torch.randn(cfg.in_channels, *s, device=device, dtype=dtype) for s in shapes]
    t = torch.rand(len(shapes), device=device) * 1000
    text = torch.randn(pack.num_text_tokens, cfg.text_dim, device=device, dtype=dtype)
    return cfg, model, pack, latents, t, text, text_lengths


def timed(fn, iters: int, cuda: bool):
    """(fn's last result, ms per call, peak CUDA GiB or "-") after one warm-up call."""
    fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        result = fn()
    if cuda:
        torch.cuda.synchronize()
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if cuda else "-"
    return result, (time.perf_counter() - start) / iters * 1e3, peak


def sequence_parallel(args) -> None:
    """--sp: the model over the torchrun processes against the whole model on each."""
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit("--sp runs under torchrun, e.g. torchrun --nproc-per-node 2 -m "
                         "vdit_kernels.model.demo --sp ulysses")
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if args.sp == "usp":
            u = args.ulysses_size or (2 if world % 2 == 0 and world > 2 else 1)
            sp = vk.SequenceParallel("usp", *vk.usp_groups(u))
            layout = f"usp, {u} x {world // u} (Ulysses x ring)"
        else:
            sp, layout = vk.SequenceParallel(args.sp), args.sp
        cfg, model, pack, latents, t, text, _ = setup(args, device)
        (out, grads), ms_whole, peak_whole = timed(lambda: run_once(model, pack, latents, t, text, "auto"),
                                                   args.iters, cuda)
        (out_sp, grads_sp), ms_sp, peak_sp = timed(
            lambda: run_once(model, pack, latents, t, text, "auto", sp=sp), args.iters, cuda)
        for g in grads_sp:  # each rank's share of the latent gradients
            dist.all_reduce(g)
        if rank == 0:
            n = vk.parallel.shard_size(pack.num_tokens, world)
            print(f"sequence parallel: {world} processes ({'NCCL' if cuda else 'gloo'}), {layout}; "
                  f"{pack.num_tokens} tokens, {n} a rank; config {args.config}, depth {cfg.depth}, "
                  f"{args.dtype}, backend auto")
            print(f"  whole model on one rank: {ms_whole:.1f} ms fwd+bwd, peak {peak_whole} GiB")
            print(f"  sharded over {world}:      {ms_sp:.1f} ms fwd+bwd, peak {peak_sp} GiB")
            print(f"  rel. diff to the whole model: out {relative_diff(out_sp, out):.2e}, "
                  f"d latents (summed over ranks) {relative_diff(grads_sp, grads):.2e}")
            if not cuda:
                print("(CPU run: timings are not a performance result)")
    finally:
        dist.destroy_process_group()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vdit_kernels.model.demo",
                                     description=(__doc__ or "").partition("\n")[0])  # no docstrings under -OO
    cuda = torch.cuda.is_available()
    parser.add_argument("--config", default="wan-1.3b-like" if cuda else "small", choices=sorted(PRESETS))
    parser.add_argument("--depth", type=_positive, default=4 if cuda else 2, help="number of blocks")
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32",
                        choices=("float32", "float16", "bfloat16", "float64"))
    parser.add_argument("--iters", type=_positive, default=3, help="timed iterations (after one warm-up)")
    parser.add_argument("--unfused-rope", action="store_true",
                        help="apply_rope_3d then attention (runs the rope family's kernels)")
    parser.add_argument("--sp", choices=vk.parallel.SCHEMES,
                        help="under torchrun: the model sequence-parallel over the processes")
    parser.add_argument("--ulysses-size", type=_positive, default=None,
                        help="--sp usp: ranks per Ulysses group (default 2 where it divides P > 2, else 1)")
    args = parser.parse_args(argv)
    if args.ulysses_size is not None and args.sp != "usp":
        parser.error("--ulysses-size is for --sp usp")
    if args.sp:
        return sequence_parallel(args)

    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    cfg, model, pack, latents, t, text, text_lengths = setup(args, device)
    shapes = pack.shapes

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
        reason = why_not(cfg, name, device, dtype)
        if reason is None:
            candidates.append((name, name))
            continue
        print(f"skipped {name}: {reason}")
        mix = partial(cfg, name, device, dtype)
        if mix is not None:
            candidates.append((f"{name} where available", mix))
    candidates.append(("auto", "auto"))
    for label, backend in candidates:
        # a warm-up call first (JIT compile, caches)
        (out, grads), ms, peak = timed(lambda: run_once(model, pack, latents, t, text, backend), args.iters, cuda)
        if ref is None:
            ref = (out, grads)
        rows.append((label, resolved(cfg, backend, device, dtype), f"{ms:.1f}", peak,
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
