"""Triton kernels, one module per op family (vdit_kernels.backend imports them on first use)."""

import os
from typing import Iterable

# Compile options every kernel launch passes (and the static report compiles with).
# enable_fp_fusion: a * b + c contracted into one FMA (the softmax's exp2 argument
# s * scale - m, the rotations of RoPE). Triton has always defaulted to it, but 3.9 warns
# in every process that the default turns to off in 3.10, which would add instructions to
# every inner loop; asking for it keeps the kernels the same on every release.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def autotune_enabled() -> bool:
    """VDIT_AUTOTUNE=0 pins every autotuned kernel to its first (default) candidate."""
    return os.environ.get("VDIT_AUTOTUNE", "1") != "0"


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
