"""The main command (scripts/bench.sh): time the fused ops on a mixed-resolution pack.

On a GPU this runs realistic sizes; on CPU it runs tiny sizes through the reference
path only and says so: CPU numbers are not a performance result.
"""
from __future__ import annotations

import argparse
import time

import torch

import vdit_kernels as vk


def timed(fn, reps: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    if gpu and not args.quick:
        shapes, channels, hidden, heads, head_dim = [(21, 60, 104), (13, 30, 52), (1, 90, 160)], 16, 3072, 24, 128
    else:
        shapes, channels, hidden, heads, head_dim = [(3, 8, 12), (1, 4, 4), (2, 6, 4)], 4, 96, 2, 48
        print("CPU run at tiny sizes: a smoke test of the ops, not a performance result.")
    pack = vk.VideoPack.from_shapes(shapes, (1, 2, 2), device=device)
    print(pack)
    videos = [torch.randn(channels, *s, device=device, dtype=dtype) for s in shapes]
    weight = torch.randn(hidden, channels, 1, 2, 2, device=device, dtype=dtype) * 0.05
    dims = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    reps = 1 if args.quick else 10
    backends = vk.available_backends("patch", device) if gpu else ["reference"]
    print(f"{'op':<18}{'backend':<11}{'shape':<22}{'ms':>10}")
    for backend in backends:
        x = vk.patch_embed(videos, pack, weight, backend=backend)
        q = k = v = x.view(-1, heads, head_dim)
        cu, m = pack.cu_seqlens, pack.max_seqlen
        rows = [
            ("patchify", lambda: vk.patchify(videos, pack, backend=backend)),
            ("patch_embed", lambda: vk.patch_embed(videos, pack, weight, backend=backend)),
            ("apply_rope_3d", lambda: vk.apply_rope_3d(q, k, pack, dims, backend=backend)),
            ("varlen_attention", lambda: vk.varlen_attention(q, k, v, cu, cu, m, m, backend=backend)),
        ]
        for name, fn in rows:
            try:
                out = fn()
            except vk.BackendUnavailable as exc:
                print(f"{name:<18}{backend:<11}skipped: {exc}")
                continue
            shape = tuple((out[0] if isinstance(out, tuple) else out).shape)
            print(f"{name:<18}{backend:<11}{str(shape):<22}{timed(fn, reps):>10.3f}")


if __name__ == "__main__":
    main()
