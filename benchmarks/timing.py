"""Timing: median / min / max milliseconds of a callable.

GPU: warm-up, then repetitions timed with CUDA events, the L2 cache cleared before each
(a 256 MB buffer zeroed between runs, as triton.testing.do_bench does), so memory-bound
ops are timed from DRAM, not from a warm L2. Unlike do_bench, each sample waits for the
flush to finish before its start event: a sample is the call's latency from an idle GPU,
its host time (Python, dispatch, launches) counted in full. Without that wait (do_bench's
way, and ours until 2026-11-27) the host issued the call while the GPU still cleared the
L2, about 90 us on an H100, so up to that much of a host-bound call's host time fell
outside the timed window, and the median was neither its device time nor its cost.
Unlike do_bench (at least one sample), every row has at least MIN_REPS samples (3 for
calls over a second): a 300 ms backward or a multi-second DiT step timed once would
report a single hiccup as its median.
CPU: time.perf_counter over a few repetitions (a smoke test, not a performance result).

kernel_ms (GPU, memory-bound cases): the device time of the calls alone, from the
profiler's record of every GPU activity they launch (kernels, small copies), so host
overhead is excluded. Small ops (a 10 MB patchify) are bound by Python dispatch when
timed one call at a time: that is a call's cost where nothing else runs (median_ms;
inside a model whose GPU work outlasts its host work the host time is hidden, and the
device time is what a call costs), this is the kernels' own efficiency (the % of copy
bandwidth the issues ask about). The calls cycle
over enough independently built inputs to exceed twice the L2 cache, so data comes from
DRAM as with the flush of do_bench, and each call's result lives until its inputs come
round again, so its writes go to another place than the previous call's (a result freed
at once gave the next call the same, possibly L2-resident, block).
interleaved (the head-to-head runs of benchmarks/run.py): two or more calls timed in turns,
so a drift over the run reaches them alike.
issue_ms (GPU): each timed sample's host issue time (recording its start event to recording
its end event), as its p25 / median / p75: the GPU is idle at a sample's start, so a sample
close to its issue time spent it on the host, one far above it on the GPU.
host_ms (GPU, memory-bound cases and patch embedding): the host's time to issue one call,
calls queued back to back without waiting for the GPU, and the Python functions that time
goes to (cProfile; a CUDA backward runs on autograd's own thread, which it does not see):
where median_ms exceeds the device time by far, this says which layer to make cheaper.
copy_kernel_ms: the same measurement of a device-to-device copy moving as many bytes (half
read, half written). A 10 MB op cannot reach the bandwidth of a 1 GiB copy (ramp-up and
tail of a few-microsecond kernel), and neither can a copy of its size: the ratio of the
two kernel times says how far the op is from what the GPU does with those bytes.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch


# The measuring method's date, recorded with every run (results.json's environment): rows
# of runs before a change are not comparable with rows after it. 2026-11-27: every sample
# starts on an idle GPU; 2026-11-28: kernel_ms keeps each call's result alive for a cycle.
METHOD = "2026-11-28"

# samples of a timed row: at least this many whatever the call's length (a multi-second
# DiT step timed once would make one hiccup the reported number)
MIN_REPS, MIN_REPS_SLOW, SLOW_MS = 5, 3, 1000.0


def _l2_flush_buffer() -> torch.Tensor:
    return torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")


def _cuda_events(fn: Callable, warmup_ms: float, rep_ms: float, grad_to_none) -> tuple[list[float], list[float]]:
    """(samples, issue): milliseconds of `fn` from its start on an idle GPU to the end of its
    last kernel, one sample per call, L2 flushed before each: about rep_ms of samples after
    warmup_ms of warm-up, and never fewer than MIN_REPS (MIN_REPS_SLOW for calls over
    SLOW_MS, whose warm-up is the first call alone); and each sample's host issue time (the
    host's milliseconds from the start event's record to the end event's)."""
    flush = _l2_flush_buffer()
    fn()  # compilation, autotuning, allocator
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls = 1
    while True:  # the estimate: one call, or enough calls to span a millisecond
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate = start.elapsed_time(end) / calls
        if estimate * calls >= 1.0 or calls >= 1000:
            break
        calls *= 10
    estimate = max(estimate, 1e-3)
    n_warm = int(warmup_ms / estimate)
    n_rep = max(MIN_REPS_SLOW if estimate > SLOW_MS else MIN_REPS, int(rep_ms / estimate))
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    issue = [_sample(fn, grad_to_none, flush, s, e) for s, e in zip(starts, ends)]
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)], issue


def _sample(fn: Callable, grad_to_none, flush: torch.Tensor, start, end) -> float:
    """One GPU sample of fn between the events start and end: gradients reset, L2 flushed.
    Returns the host's milliseconds from recording start to recording end: with the GPU
    idle at the start, a sample near its issue time was bound by the host, and one far
    above it by the GPU (the H200's small calls had medians twice their minimums; this
    says on which side the slow samples lost their time)."""
    if grad_to_none:
        for t in grad_to_none:
            t.grad = None
    flush.zero_()
    torch.cuda.synchronize()  # the call starts on an idle GPU: none of its host time is hidden
    t0 = time.perf_counter()
    start.record()
    fn()
    end.record()
    return (time.perf_counter() - t0) * 1e3


def _sample_ms(fn: Callable, grad_to_none, device: str, flush=None) -> float:
    """Milliseconds of one call of fn, gradients reset first; GPU: as each of bench's
    samples (_sample, read at once), CPU: perf_counter."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _sample(fn, grad_to_none, flush, start, end)
        end.synchronize()
        return start.elapsed_time(end)
    for t in grad_to_none or ():
        t.grad = None
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved(calls: dict, device: str, budget_ms: float = 3000.0, min_rounds: int = 5,
                max_rounds: int = 15) -> dict:
    """{name: [ms of each sample]} of calls {name: (fn, grad_to_none)} timed in turns, one
    sample of each per round, the order reversed every other round (A B, B A, ...): a
    clock or temperature drift over the run (the GPU slowing after a burst of autotuning)
    reaches them alike, where rows timed one after the other can each catch another state
    (two rows of one kernel 2.8% apart on the H100, 2026-11-27). Each is called once first
    (compilation, autotuning); then min_rounds to max_rounds rounds, as many as fit
    budget_ms by the first round. Samples as bench's (_sample_ms)."""
    names = list(calls)
    for fn, _ in calls.values():
        fn()
    flush = _l2_flush_buffer() if device == "cuda" else None
    samples = {n: [_sample_ms(*calls[n], device, flush)] for n in names}  # round 0: sets the count
    rounds = max(min_rounds, min(max_rounds, int(budget_ms / max(sum(s[0] for s in samples.values()), 1e-3))))
    for r in range(1, rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            samples[name].append(_sample_ms(*calls[name], device, flush))
    return samples


def _quartiles(values: list[float]) -> list[float]:
    """[p25, median, p75], interpolated between the values over the range they span (an
    index into few samples leaned high: the max as p75 of four)."""
    return statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else list(values) * 3


def _summary(times: list[float], timer: str) -> dict:
    """Median, min, max and the quartiles (p25_ms, p75_ms: whether the samples split in two,
    as the H200's small calls seemed to, medians twice their minimums) of samples in ms."""
    q = sorted(times)
    p25, _, p75 = _quartiles(q)
    return {"median_ms": statistics.median(q), "min_ms": q[0], "max_ms": q[-1], "p25_ms": p25, "p75_ms": p75,
            "reps": len(q), "timer": timer}


def bench(fn: Callable, device: str, *, quick: bool = False,
          grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> dict:
    """{'median_ms', 'min_ms', 'max_ms', 'p25_ms', 'p75_ms', 'reps', 'timer'} of fn() on `device`;
    on a GPU also 'issue_ms': the (p25, median, p75) of the samples' host issue times."""
    if device == "cuda":
        warmup, rep = (10, 40) if quick else (25, 100)
        samples, issue = _cuda_events(fn, warmup, rep, grad_to_none)
        return {**_summary(samples, "cuda-events"), "issue_ms": _quartiles(issue)}
    fn()  # warm-up
    reps = 2 if quick else 5
    return _summary([_sample_ms(fn, grad_to_none, "cpu") for _ in range(reps)], "perf_counter")


def _clear_grads(prepared) -> None:
    """Reset the gradients a forward+backward call accumulates into (as every timed sample
    does): else each repeated call adds into the last one's .grad, an elementwise add per
    input the op does not run (173 us of the H200's 426 us linear_unpatchify fwd+bwd)."""
    for t in getattr(prepared, "grad_to_none", None) or ():
        t.grad = None


def device_activities(prof) -> dict[str, float]:
    """Self device time (us) per GPU activity name (kernel, copy) a torch.profiler run recorded."""
    times: dict[str, float] = {}
    for e in prof.key_averages():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
            times[e.key] = times.get(e.key, 0.0) + us
    return times


def kernel_ms(build: Callable, bytes_moved: float, device: str, quick: bool = False) -> dict:
    """{'kernel_ms': device ms per call, 'kernel_copies': inputs cycled, 'kernel_breakdown':
    [(activity name, device us per call)], the 6 longest} or {'kernel_note': why not}.
    build() -> an object with .fn (a fresh set of inputs).

    Each call's result is kept until its input set comes round again, so the calls write
    to `copies` + 1 places in turn (at least twice the L2 cache between two writes to one
    place, as copy_kernel_ms's copies do): a result freed at once gave the next call the
    same block, whose lines could still sit in L2, and a small op's writes then reached
    DRAM only in part."""
    if device != "cuda":
        return {"kernel_note": "GPU only"}
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError as exc:
        return {"kernel_note": f"no torch.profiler ({exc})"}
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20)
    copies = max(1, min(16, -(-int(2 * l2) // max(int(bytes_moved or 1), 1))))
    prepared = [build() for _ in range(copies)]
    results = [p.fn() for p in prepared]  # warm-up: compilation, autotuning, allocator
    torch.cuda.synchronize()
    calls = (5 if quick else 20) * copies
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(calls):
                _clear_grads(prepared[i % copies])
                results[i % copies] = prepared[i % copies].fn()
            torch.cuda.synchronize()
        activities = device_activities(prof)
        total = sum(activities.values())
    except Exception as exc:  # noqa: BLE001  (a profiler that cannot run is a note, not a failure)
        return {"kernel_note": f"profiler failed: {type(exc).__name__}: {exc}"[:200]}
    if total <= 0:
        return {"kernel_note": "the profiler recorded no GPU activity (CUPTI unavailable?)"}
    longest = sorted(activities.items(), key=lambda kv: -kv[1])[:6]
    return {"kernel_ms": total / calls / 1e3, "kernel_copies": copies,
            "kernel_breakdown": [(name[:80], round(us / calls, 2)) for name, us in longest]}


def host_ms(build: Callable, device: str, calls: int = 200) -> dict:
    """{'host_ms': host ms to issue one call, 'host_profile': [(function, us per call)],
    the 8 largest by own time} or {} off the GPU. build() -> an object with .fn."""
    if device != "cuda":
        return {}
    import cProfile
    import pstats

    prepared = build()
    for _ in range(5):
        _clear_grads(prepared)
        prepared.fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):  # 200 calls fit CUDA's launch queue: the loop never waits for the GPU
        _clear_grads(prepared)
        prepared.fn()
    issued = (time.perf_counter() - start) * 1e3 / calls
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        _clear_grads(prepared)
        prepared.fn()
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    own = sorted(((f"{Path(file).name}:{line}({name})", tt) for (file, line, name), (_, _, tt, _, _)
                  in stats.items()), key=lambda kv: -kv[1])[:8]
    return {"host_ms": issued, "host_profile": [(name, round(t * 1e6 / calls, 2)) for name, t in own]}


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
