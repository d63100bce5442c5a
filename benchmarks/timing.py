"""Timing: median / min / max milliseconds of a callable.

GPU: triton.testing.do_bench (warm-up, then repetitions timed with CUDA events). It
clears the L2 cache before every repetition (it zeroes a 256 MB buffer between runs:
`di.clear_cache(cache)` inside do_bench), so memory-bound ops are timed from DRAM, not
from a warm L2. Without triton, CUDA events with an explicit L2 flush do the same.
CPU: time.perf_counter over a few repetitions (a smoke test, not a performance result).

kernel_ms (GPU, memory-bound cases): the device time of the calls alone, from the
profiler's record of every GPU activity they launch (kernels, small copies), so host
overhead is excluded. Small ops (a 10 MB patchify) are bound by Python dispatch when
timed one call at a time: that is the user-visible cost (median_ms), this is the
kernels' own efficiency (the % of copy bandwidth the issues ask about). The calls cycle
over enough independently built inputs to exceed twice the L2 cache, so data comes from
DRAM as with the flush of do_bench.
copy_kernel_ms: the same measurement of a device-to-device copy moving as many bytes (half
read, half written). A 10 MB op cannot reach the bandwidth of a 1 GiB copy (ramp-up and
tail of a few-microsecond kernel), and neither can a copy of its size: the ratio of the
two kernel times says how far the op is from what the GPU does with those bytes.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Sequence

import torch


def _cuda_events(fn: Callable, warmup_ms: float, rep_ms: float, grad_to_none) -> list[float]:
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warm, n_rep = max(1, int(warmup_ms / estimate)), max(3, int(rep_ms / estimate))
    for _ in range(n_warm):
        fn()
    times = []
    for _ in range(n_rep):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return times


def bench(fn: Callable, device: str, *, quick: bool = False,
          grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> dict:
    """{'median_ms', 'min_ms', 'max_ms', 'reps'} of fn() on `device`."""
    if device == "cuda":
        warmup, rep = (10, 40) if quick else (25, 100)
        try:
            import triton.testing

            med, lo, hi = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                                  quantiles=[0.5, 0.0, 1.0])
            return {"median_ms": med, "min_ms": lo, "max_ms": hi, "reps": None, "timer": "triton.do_bench"}
        except ImportError:
            times = _cuda_events(fn, warmup, rep, grad_to_none)
            return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
                    "reps": len(times), "timer": "cuda-events"}
    fn()  # warm-up
    reps = 2 if quick else 5
    times = []
    for _ in range(reps):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "reps": reps, "timer": "perf_counter"}


def device_us(prof) -> float:
    """Total self device time (us) of the GPU activities a torch.profiler run recorded."""
    total = 0.0
    for e in prof.key_averages():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            total += getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
    return total


def kernel_ms(build: Callable, bytes_moved: float, device: str, quick: bool = False) -> dict:
    """{'kernel_ms': device ms per call, 'kernel_copies': inputs cycled} or
    {'kernel_note': why not}. build() -> an object with .fn (a fresh set of inputs)."""
    if device != "cuda":
        return {"kernel_note": "GPU only"}
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError as exc:
        return {"kernel_note": f"no torch.profiler ({exc})"}
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20)
    copies = max(1, min(16, -(-int(2 * l2) // max(int(bytes_moved or 1), 1))))
    prepared = [build() for _ in range(copies)]
    for p in prepared:  # warm-up: compilation, autotuning, allocator
        p.fn()
    torch.cuda.synchronize()
    calls = (5 if quick else 20) * copies
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(calls):
                prepared[i % copies].fn()
            torch.cuda.synchronize()
        total = device_us(prof)
    except Exception as exc:  # noqa: BLE001  (a profiler that cannot run is a note, not a failure)
        return {"kernel_note": f"profiler failed: {type(exc).__name__}: {exc}"[:200]}
    if total <= 0:
        return {"kernel_note": "the profiler recorded no GPU activity (CUPTI unavailable?)"}
    return {"kernel_ms": total / calls / 1e3, "kernel_copies": copies}


_COPY_MS: dict = {}


def copy_kernel_ms(bytes_moved: float, device: str, quick: bool = False) -> Optional[float]:
    """Device ms of a D2D copy of bytes_moved / 2 bytes (read + write = bytes_moved), by
    kernel_ms; cached per size; None where kernel_ms cannot measure."""
    n = max(16, int(bytes_moved) // 2 // 16 * 16)
    if (n, device) not in _COPY_MS:
        class _Copy:
            def __init__(self):
                self.src = torch.empty(n, dtype=torch.uint8, device=device)
                self.dst = torch.empty_like(self.src)

            def fn(self):
                self.dst.copy_(self.src)
        _COPY_MS[n, device] = kernel_ms(_Copy, 2 * n, device, quick=quick).get("kernel_ms")
    return _COPY_MS[n, device]


def once_ms(fn: Callable, device: str) -> float:
    """Wall time of one call (e.g. building a block mask), synchronized."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3
