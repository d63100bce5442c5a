"""Triton kernels, one module per op family (vdit_kernels.backend imports them on first use)."""

import functools
import os
from typing import Iterable

import torch

from ..checks import first_tensor

# Compile options every kernel launch passes (and the static report compiles with).
# enable_fp_fusion: a * b + c contracted into one FMA (the softmax's exp2 argument
# s * scale - m, the rotations of RoPE). Triton has always defaulted to it, but 3.9 warns
# in every process that the default turns to off in 3.10, which would add instructions to
# every inner loop; asking for it keeps the kernels the same on every release.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def autotune_enabled() -> bool:
    """VDIT_AUTOTUNE=0 pins every autotuned kernel to its first (default) candidate; so
    does a CUDA graph capture (an autotuner meeting a new key would time candidates, and
    synchronize, inside the capture)."""
    return os.environ.get("VDIT_AUTOTUNE", "1") != "0" and not (
        torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


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
