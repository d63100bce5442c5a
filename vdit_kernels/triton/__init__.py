"""Triton kernels, one module per op family (vdit_kernels.backend imports them on first use)."""

import functools
import logging
import os
from typing import Callable, Iterable, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..checks import env_switch
from triton.runtime.errors import OutOfResources

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

from ..checks import first_tensor
from . import tuning_cache

_LOG = logging.getLogger("vdit_kernels")

# Compile options every kernel launch passes (and the static report compiles with).
# enable_fp_fusion: a * b + c contracted into one FMA (the softmax's exp2 argument
# s * scale - m, the rotations of RoPE). Triton has always defaulted to it, but 3.9 warns
# in every process that the default turns to off in 3.10, which would add instructions to
# every inner loop; asking for it keeps the kernels the same on every release.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


# Kernels pass every runtime value that bounds a loop (range's start, stop or step)
# through loop_bound(). Triton 3.6's interpreter holds kernel scalars as 1-element numpy
# arrays and range() takes them through int(array), which numpy >= 2.4 refuses ("only
# 0-dimensional arrays can be converted"; later Triton squeezes first): under the
# interpreter loop_bound reads the value as a Python int. Compiled, it is the identity,
# inlined: the same PTX and SASS (tests/test_static.py checks that every bound uses it).
if triton.knobs.runtime.interpret:  # decided at import, as triton.jit decides
    def loop_bound(x):
        return x.handle.data.item() if isinstance(x, tl.tensor) else x
else:
    @triton.jit
    def loop_bound(x):
        return x


def autotune_enabled() -> bool:
    """VDIT_AUTOTUNE=0 (or false / off / no) pins every autotuned kernel to its first
    (default) candidate; so does a CUDA graph capture (an autotuner meeting a new key would
    time candidates, and synchronize, inside the capture). Another value than those and
    1 / true / on / yes is an error, not silently "on"."""
    setting = os.environ.get("VDIT_AUTOTUNE", "")
    on = env_switch(setting) if setting.strip() else True
    if on is None:
        raise ValueError(f"VDIT_AUTOTUNE must be 1 or 0 (true / false, on / off, yes / no), got {setting!r}")
    return on and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


# (what, config, key) of fixed launches a GPU lacked the resources for (launch_first_that_fits)
TOO_LARGE: set = set()


def launch_first_that_fits(what: str, configs: Sequence, key: Callable, run: Callable) -> None:
    """run(config) with the first of `configs` the GPU has the resources for.

    The candidates are sized for an H100 (227 KB of shared memory a program); some do not
    fit a GPU with 99 KB (sm_86 / sm_89 / sm_120: RTX 3090 / 4090 / 5090, A10, L4, L40S).
    Triton's autotuner skips such configs itself; a fixed launch (VDIT_AUTOTUNE=0,
    deterministic=True, a CUDA graph capture) takes the next config in the list instead,
    the same one on every GPU of a kind, remembered per (what, config, key()) and logged
    once. key() (e.g. the device) is evaluated only once some GPU refused a config: no
    work on an H100."""
    fitting = configs
    if TOO_LARGE:
        k = key()
        fitting = [c for c in configs if (what, c, k) not in TOO_LARGE] or list(configs)[-1:]
    for i, config in enumerate(fitting):
        try:
            run(config)
            return
        except OutOfResources as exc:
            if i == len(fitting) - 1:
                raise
            TOO_LARGE.add((what, config, key()))
            _LOG.warning("%s config %s does not fit this GPU (%s); using the next candidate", what, config, exc)


def on_tensors_device(fn):
    """Run a backend function with its first tensor's CUDA device current: Triton launches
    its kernels (and its autotuner its timing runs) on the current device, not on the
    tensors' (a pack on cuda:1 while cuda:0 is current would fault or compute elsewhere)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        t = first_tensor(args)
        if t is None or not t.is_cuda or t.device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(t.device):
            return fn(*args, **kwargs)
    return run


# Host-side grid and tile arithmetic. triton.cdiv and triton.next_power_of_2 are
# ConstexprFunction objects (Triton 3.6 and 3.8): 2-3 us a call on this CPU machine, and a
# launch made several, e.g. 8 of the Triton RoPE launcher's 15 us besides Triton's own.

def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of ints (triton.cdiv's value)."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (triton.next_power_of_2's value: 0 for 0)."""
    return 1 << (x - 1).bit_length() if x > 0 else 0


def pow2_dividing(values: Iterable[int], cap: int) -> int:
    """The largest power of two up to `cap` (a power of two) that divides every value: the
    alignment a kernel may be told about (tl.multiple_of) when the values are its offsets."""
    align = cap
    for value in values:
        while align > 1 and value % align:
            align //= 2
    return align


def describe_config(config) -> str:
    """A triton.Config in one line: its constexprs, warps, stages and register cap."""
    text = " ".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    text += f" w{config.num_warps} s{config.num_stages}"
    return text + (f" maxnreg={config.maxnreg}" if getattr(config, "maxnreg", None) else "")


def autotuned_choices(tuners: dict) -> list[str]:
    """What each autotuner of {name: triton.autotune(...)} picked in this process, one line
    per key (its arguments' values and dtypes), with the candidates' times (ms) of the
    last key it timed where Triton keeps them."""
    lines = []
    for name, tuner in tuners.items():
        for key, config in getattr(tuner, "cache", {}).items():
            lines.append(f"{name} {key}: {describe_config(config)}")
        timings = getattr(tuner, "configs_timings", None)
        if timings:
            times = ", ".join(f"{describe_config(c)}: {t[0] if isinstance(t, (list, tuple)) else t:.3f}"
                              for c, t in timings.items())
            lines.append(f"{name} candidates (last key timed): {times}")
    return lines


# -- measured choices between implementations of one op that compute the same result ---
# Several ops have more than one way to run on a GPU whose speed depends on the GPU, the
# Triton release and the shapes (attention: backward strategies, TMA or pointer reads;
# patch embedding: the fused kernels or our gather / scatter around PyTorch's GEMMs). An
# environment variable names one, or "auto" (the default) times the ones a call can run
# on its first call per key and keeps the fastest for the process; where nothing can be
# timed (CPU and the interpreter, float32, autotuning off, a CUDA graph capture) the first
# option runs.

# every timing of variants in this process, in order: "what: name t ms, ...: fastest"
VARIANT_TIMES: list = []


def measured_choice(env: str, options: tuple, cache: dict, key, measure: Optional[Callable[[], str]],
                    available: Optional[tuple] = None, autos: tuple = ("auto",)) -> str:
    """The variant a call runs: the environment variable `env` names one of `options`
    (all with the same result; one this call cannot run, i.e. not in `available`
    (default: all), gives way to options[0]) or one of `autos` ("auto", the default): the
    variant measure() found fastest among the available ones, timed once per key and
    cached (the key must tell calls with different `available` apart; with
    VDIT_TUNING_CACHE also on disk: tuning_cache); options[0] where nothing was or can be
    measured (measure None)."""
    name = os.environ.get(env, "auto")
    if name not in options + autos:
        raise ValueError(f"{env} must be one of {options + autos}, got {name!r}")
    available = options if available is None else available
    if name not in autos:
        return name if name in available else options[0]
    if len(available) == 1:
        return available[0]
    if key not in cache:  # (a choice measured before stays, e.g. during a graph capture)
        if measure is None:
            return options[0]
        saved = tuning_cache.recall(env, key)  # an earlier process's (VDIT_TUNING_CACHE)
        cache[key] = saved if saved in available else measure()
        tuning_cache.remember(env, key, cache[key])
    return cache[key]


def can_measure(t: torch.Tensor) -> bool:
    """Whether a call may time its variants: half precision on a GPU (float32 runs the
    first option), autotuning on and no CUDA graph capture (autotune_enabled)."""
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) and autotune_enabled()


def timing(what: str, runs: dict, like: torch.Tensor) -> Optional[Callable[[], str]]:
    """measured_choice's `measure` for a call on tensors like `like`: fastest(what, runs)
    where the call may time its variants (can_measure), else None."""
    return (lambda: fastest(what, runs)) if can_measure(like) else None


def _sample_ms(fn: Callable) -> float:
    """Device milliseconds of one call of fn, timed with CUDA events, the L2 cache
    cleared first (a 256 MB buffer zeroed, as triton.testing.do_bench does; allocated per
    sample, so the caching allocator reuses one block and no measurement keeps it). The
    host does not wait for the clearing (about 90 us on an H100) before it issues fn: up to
    that much of fn's host time is hidden, on purpose. A variant is chosen for a model whose
    GPU work outlasts its host work, where host time is hidden too (the benchmarks' timer,
    benchmarks/timing.py, waits instead: it reports a call's cost from an idle GPU)."""
    torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda").zero_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


# fastest()'s rounds: at least MIN_ROUNDS, at most MAX_ROUNDS, as many as fit ROUNDS_MS
MIN_ROUNDS, MAX_ROUNDS, ROUNDS_MS = 3, 10, 100.0


def fastest(what: str, runs: dict) -> str:
    """Name of the fastest of {name: callable} on the GPU. Each runs once first (its
    compilation and autotuning; a variant that raises there, a compiler or driver without
    its feature, is skipped with a warning, and if every one raises the last error
    propagates), then the variants take turns, one call each per round (_sample_ms), for
    3 to 10 rounds (as many as fit 100 ms), and the medians decide. Taking turns: the
    clock changes that follow an autotuning burst (power, temperature) reach every
    variant alike; do_bench per variant, one after the other, timed a 90 ms backward
    once right after its own autotuning, and the 2026-11-27 H100 runs picked by samples
    like that."""
    ready, error = {}, None
    for name, fn in runs.items():
        try:
            fn()
            ready[name] = fn
        except Exception as exc:  # noqa: BLE001
            error = exc
            _LOG.warning("%s variant %s failed, not used: %s: %s", what, name, type(exc).__name__, exc)
    if not ready:
        raise error
    samples: dict = {name: [_sample_ms(fn)] for name, fn in ready.items()}
    round_ms = sum(s[0] for s in samples.values())  # the first round's length sets the count
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(ROUNDS_MS / max(round_ms, 1e-3))))
    for _ in range(rounds - 1):
        for name, fn in ready.items():
            samples[name].append(_sample_ms(fn))
    times = {name: sorted(s)[len(s) // 2] for name, s in samples.items()}
    best = min(times, key=times.get)
    timed = ", ".join(f"{n} {t:.3f} ms" for n, t in times.items())
    VARIANT_TIMES.append(f"{what}: {timed}: {best}")
    _LOG.info("%s variant chosen: %s (%s, median of %d interleaved rounds)", what, best, timed, rounds)
    return best
