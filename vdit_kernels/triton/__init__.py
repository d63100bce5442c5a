"""Triton kernels, one module per op family (vdit_kernels.backend imports them on first use)."""

import os
from typing import Iterable


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
