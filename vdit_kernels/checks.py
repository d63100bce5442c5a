"""Argument checks shared by the public functions: clear errors, never a silent wrong result.

Shape, dtype and device checks are free. Checks that read tensor values (cu_seqlens
monotone, ending at N, max_seqlen large enough) cost a device->host sync on GPU, so
they run for CPU tensors always and for GPU tensors only when VDIT_CHECK_VALUES=1,
and never while torch.compile traces (values are unknown then).
Packs built by VideoPack are valid by construction.
"""
from __future__ import annotations

import math
import numbers
import operator
import os
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# what the GPU kernels compute in (each backend module's DTYPES); float64 (for gradcheck)
# runs on the reference path, or where a module lists it and computes it in float64
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check(cond: bool, message: str) -> None:
    """Raise ValueError(message) unless cond. On per-call paths, build the message only
    on failure (`if not cond: raise ValueError(f"...")`): formatting an f-string for a
    check that passes costs microseconds, and these ops are called per layer."""
    if not cond:
        raise ValueError(message)


ENV_OFF, ENV_ON = ("0", "false", "off", "no"), ("1", "true", "on", "yes")


def env_switch(value: str) -> Optional[bool]:
    """An environment variable's value as a switch: False for 0 / false / off / no, True for
    1 / true / on / yes (any case, surrounding spaces ignored), None for anything else (the
    caller says what else it takes, or refuses it)."""
    word = value.strip().lower()
    return False if word in ENV_OFF else True if word in ENV_ON else None


def check_flag(name: str, value) -> bool:
    """A bool argument as given, never the truth of another object: interleaved=None or
    "no" would silently pick a convention."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def as_ints(values, name: str) -> tuple[int, ...]:
    """Integers as given (as_int: Python, NumPy or 0-d integer tensors), never truncated
    floats, bools or digits of a string."""
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of ints, got {values!r}")
    try:
        ints = tuple(as_int(v) for v in values)
    except TypeError:  # not iterable: an int, a 0-d tensor
        raise ValueError(f"{name} must be a sequence of ints, got {values!r}") from None
    if None in ints:
        raise ValueError(f"{name} must be a sequence of ints, got {values!r}")
    return ints


def as_int(value) -> Optional[int]:
    """value as an int (operator.index: a Python or NumPy int, a 0-d integer tensor), or
    None for anything else: a bool, a float, a string."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def positive_int(value, name: str) -> int:
    """value as a positive int (as_int), or a ValueError naming it."""
    v = as_int(value)
    if v is None or v < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return v


def first_tensor(args) -> Optional[torch.Tensor]:
    """The first tensor among `args`, or the first of the first list of tensors (videos)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    return None


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False for a device type autocast does not
    know (meta: torch raises there, before any of our checks could name the argument)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast_inputs(*tensors):
    """The tensors as a matmul-like op sees them under torch.autocast: float16/32 and
    bfloat16 cast to the autocast dtype of their device (float64 and None untouched), as
    torch casts the inputs of scaled_dot_product_attention, linear and conv3d."""
    device = next(t.device.type for t in tensors if t is not None)
    if not autocast_enabled(device):
        return tensors
    low = torch.get_autocast_dtype(device)
    return tuple(t if t is None or t.dtype == torch.float64 else t.to(low) for t in tensors)


def checked_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: Sequence[str] = ("q", "k", "v")):
    """Attention's q (Nq, H, D), k and v (Nk, Hk, D): floating tensors of one dtype and
    device after the autocast cast (as scaled_dot_product_attention's: a float32 q from a
    norm beside a bfloat16 v is common under autocast), equal positive head dims, Hk
    dividing H. Returns q, k, v as cast."""
    for name, t in zip(names, (q, k, v)):
        check_float(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must be (tokens, heads, head_dim), got shape {tuple(t.shape)}")
    q, k, v = autocast_inputs(q, k, v)
    check_same(names, [q, k, v])
    nq, nk, nv = names
    if k.shape != v.shape:
        raise ValueError(f"{nk} {tuple(k.shape)} and {nv} {tuple(v.shape)} must have the same shape")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{nq} head_dim {q.shape[2]} differs from {nk} head_dim {k.shape[2]}")
    if q.shape[2] == 0:
        raise ValueError("head_dim must be positive, got 0")
    if not (k.shape[1] >= 1 and q.shape[1] % k.shape[1] == 0):
        raise ValueError(f"{nk}/{nv} heads ({k.shape[1]}) must divide {nq} heads ({q.shape[1]})")
    return q, k, v


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """Same dtype and device for all tensors."""
    dtype, device = tensors[0].dtype, tensors[0].device
    for n, t in zip(names[1:], tensors[1:]):
        if t.dtype != dtype:
            raise ValueError(f"{n} has dtype {t.dtype} but {names[0]} has dtype {dtype}")
        if t.device != device:
            raise ValueError(f"{n} is on {t.device} but {names[0]} is on {device}")


def values_checked(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():  # values are unknown while tracing; eager calls check them
        return False
    return t.device.type == "cpu" or os.environ.get("VDIT_CHECK_VALUES", "0") == "1"


def check_pack(pack) -> None:
    """pack is a VideoPack: a TypeError naming the argument, not an AttributeError from inside."""
    if not isinstance(pack, _pack.VideoPack):
        raise TypeError(f"pack must be a VideoPack (VideoPack.from_shapes(...)), got {type(pack).__name__}")


def check_videos(videos: list[torch.Tensor], pack) -> int:
    """Videos match the pack; returns the channel count."""
    check_pack(pack)
    if len(videos) != pack.batch_size:
        raise ValueError(f"got {len(videos)} videos for a pack of {pack.batch_size}")
    check(len(videos) > 0, "the pack holds no video")
    channels = _videos_match(videos, pack)
    return channels if channels is not None else _check_each_video(videos, pack)


def _videos_match(videos: list[torch.Tensor], pack) -> Optional[int]:
    """The channel count C when every video is a floating (C, T_i, H_i, W_i) tensor of the
    pack's sizes, of one dtype and device; else None. One comparison per property and
    video: _check_each_video, which names what is wrong, took 1.4 us a video (CPU; the H100
    machine's host ~4x that), as much as a train pack's patchify kernels on an H100. It
    accepts exactly what _check_each_video accepts (tests/test_api.py compares them)."""
    first = videos[0]
    if not (isinstance(first, torch.Tensor) and first.dim() == 4 and first.dtype in FLOAT_DTYPES):
        return None
    channels, dtype, device = first.shape[0], first.dtype, first.device
    for v, (t, h, w) in zip(videos, pack.shapes):
        if not (isinstance(v, torch.Tensor) and v.shape == (channels, t, h, w)
                and v.dtype == dtype and v.device == device):
            return None
    return channels


def _check_each_video(videos: list[torch.Tensor], pack) -> int:
    """check_videos' checks one by one, raising for the first that fails; the channel count."""
    first = videos[0]
    check_float("video 0", first)
    channels, dtype, device = (first.shape[0] if first.dim() else None), first.dtype, first.device
    for i, (v, shape) in enumerate(zip(videos, pack.shapes)):
        if i:
            check_float(f"video {i}", v)
        if v.dim() != 4:
            raise ValueError(f"video {i} must be (C, T, H, W), got shape {tuple(v.shape)}")
        if tuple(v.shape[1:]) != tuple(shape):
            raise ValueError(f"video {i} has (T, H, W) = {tuple(v.shape[1:])} "
                             f"but the pack says {shape}")
        if v.shape[0] != channels:
            raise ValueError(f"video {i} has {v.shape[0]} channels, video 0 has {channels}")
        if v.dtype != dtype:
            raise ValueError(f"video {i} has dtype {v.dtype} but video 0 has dtype {dtype}")
        if v.device != device:
            raise ValueError(f"video {i} is on {v.device} but video 0 is on {device}")
    return channels


def softmax_scale_of(softmax_scale, head_dim: int) -> float:
    """The attention's scale as a positive finite float: softmax_scale, or 1/sqrt(head_dim)."""
    if isinstance(softmax_scale, (str, bytes, bool)):  # (float() would take "0.25" and True)
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale!r}")
    if isinstance(softmax_scale, torch.Tensor) and softmax_scale.requires_grad:
        # float() would detach it with only torch's generic warning
        raise ValueError("softmax_scale requires grad, but the attention is differentiable in q, k and v "
                         "only: pass a float (or softmax_scale.detach())")
    try:
        scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    except (TypeError, ValueError, RuntimeError):  # a list, a complex, a tensor of several values
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale!r}") from None
    # the kernels track the running max of the scaled scores as scale * max(q k^T)
    # (not math.isfinite: torch.compile(dynamic=True) cannot trace it; NaN fails 0 < scale)
    if not (0 < scale < math.inf):
        raise ValueError(f"softmax_scale must be a positive finite number, got {scale}")
    return scale


def _max_name(cu_name: str) -> str:
    """The max_seqlen argument beside cu_name: cu_seqlens_q -> max_seqlen_q."""
    return cu_name.replace("cu_seqlens", "max_seqlen")


def check_cu_seqlens(name: str, cu: torch.Tensor, num_tokens: int, max_seqlen: int,
                     device: torch.device, padding: int = 0) -> None:
    """cu an int32 (B+1,) tensor on `device`, max_seqlen a non-negative int; where values are
    checked (values_checked): cu starts at 0, never decreases, ends at num_tokens (or up
    to `padding` rows before it: a sequence-parallel pack padded to equal shards), and no
    segment is longer than max_seqlen."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu.dtype}")
    if not (cu.dim() == 1 and cu.numel() >= 1):
        raise ValueError(f"{name} must be 1-D (B+1,), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the tokens are on {device}")
    # a Python or NumPy int; never a bool, a truncated float or a tensor (reading a CUDA
    # one would wait for the GPU)
    # (isinstance, not hasattr(__index__): torch 2.13's dynamo cannot trace hasattr of a SymInt)
    if (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (numbers.Integral, torch.SymInt))
            or max_seqlen < 0):
        raise ValueError(f"{_max_name(name)} (for {name}) must be a non-negative int (a Python or NumPy int, "
                         f"not a tensor), got {max_seqlen!r}")
    if values_checked(cu):
        vals = cu.tolist()
        if vals[0] != 0:
            raise ValueError(f"{name} must start at 0, got {vals[0]}")
        lengths = [b - a for a, b in zip(vals[:-1], vals[1:])]
        if not all(n >= 0 for n in lengths):
            raise ValueError(f"{name} must be non-decreasing, got {vals}")
        if not num_tokens - padding <= vals[-1] <= num_tokens:
            raise ValueError(f"{name} ends at {vals[-1]} but there are {num_tokens} tokens" if not padding else
                             f"{name} ends at {vals[-1]} but the shards hold {num_tokens} rows: the pack "
                             f"must have between {num_tokens - padding} and {num_tokens} tokens")
        if max(lengths, default=0) > max_seqlen:
            raise ValueError(f"{_max_name(name)} {max_seqlen} is smaller than the longest segment of {name} "
                             f"({max(lengths, default=0)})")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The addresses of the first and last byte of t's elements (t not empty)."""
    first = t.data_ptr()
    return first, first + (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size() - 1


def _bytes_meet(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' byte ranges (first to last element) meet."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    (alo, ahi), (blo, bhi) = _byte_span(a), _byte_span(b)
    return alo <= bhi and blo <= ahi


def _may_share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two (N, H, D) views may address a common element. By address, not storage:
    two tensors over one memory may hold different storages (torch.from_numpy of two numpy
    views, DLPack, torch.frombuffer). Exact for views with the same strides and element size
    and a unit last stride, whatever their sizes (q and k sliced from one fused qkv buffer,
    with fewer kv heads under GQA): some index difference (e0, e1, e2),
    -(size_b - 1) <= e_i <= size_a - 1, must bridge their address difference. Otherwise
    whether their byte ranges intersect (conservative)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    (alo, ahi), (blo, bhi) = _byte_span(a), _byte_span(b)
    if ahi < blo or bhi < alo:
        return False
    size = a.element_size()
    if (a.stride() != b.stride() or a.dim() != 3 or b.dim() != 3 or a.stride(2) != 1
            or b.element_size() != size or (blo - alo) % size):
        return True
    # equal addresses: e0 * s0 + e1 * s1 + e2 = delta, e = (index in a) - (index in b)
    s0, s1, _ = a.stride()
    delta = (blo - alo) // size
    e0_lo, e0_hi = -(b.shape[0] - 1), a.shape[0] - 1
    for e1 in range(-(b.shape[1] - 1), a.shape[1]):
        # e0 * s0 = delta - e1 * s1 - e2 with -(d_b - 1) <= e2 <= d_a - 1
        lo, hi = delta - e1 * s1 - (a.shape[2] - 1), delta - e1 * s1 + (b.shape[2] - 1)
        if s0 == 0:  # (torch strides are never negative)
            if lo <= 0 <= hi:
                return True
        elif max(-(-lo // s0), e0_lo) <= min(hi // s0, e0_hi):
            return True
    return False


def may_overlap_itself(t: torch.Tensor) -> bool:
    """Whether two indices of t might address one element. False when, its dims of size > 1
    sorted by stride, each stride exceeds the farthest offset the smaller ones reach (dense
    tensors, their slices, permutes and qkv views); True for every overlapping layout, and
    for the rare disjoint ones whose strides interleave (told apart only by search).
    (torch._debug_has_internal_overlap answers "too hard" for every non-dense view, the
    overlapping ones included.)"""
    if t.numel() == 0:
        return False
    reach = 0
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def check_inplace_rope(q: torch.Tensor, k: torch.Tensor, positions: Optional[torch.Tensor] = None) -> None:
    """In-place RoPE reads and writes q and k: an element reachable twice would be rotated
    twice, and positions in their memory would be overwritten while other tokens read them."""
    for name, t in (("q", q), ("k", k)):
        if may_overlap_itself(t):
            raise ValueError(f"inplace RoPE: {name} (shape {tuple(t.shape)}, strides {t.stride()}) may "
                             "address some elements more than once (an expanded, stride-0 or overlapping "
                             "view, or strides that interleave); use inplace=False")
    if _may_share_elements(q, k):
        raise ValueError("inplace RoPE: q and k may share elements (their address ranges meet, and "
                         "their layouts do not tell them apart), so a shared element would be rotated "
                         "twice; pass disjoint views with the same strides (e.g. qkv[:, 0] and "
                         "qkv[:, 1]) or use inplace=False")
    if positions is not None and (_bytes_meet(positions, q) or _bytes_meet(positions, k)):
        raise ValueError("inplace RoPE: positions share memory with q or k, which the rotation overwrites "
                         "while other tokens still read their positions; pass positions of their own "
                         "(positions.clone()) or use inplace=False")


def check_rope_dims(dims: Sequence[int], head_dim: Optional[int] = None) -> tuple[int, int, int]:
    """(dt, dh, dw): three even non-negative ints (never truncated floats), summing to
    head_dim when it is given."""
    dims = as_ints(dims, "rope dims")
    if len(dims) != 3:
        raise ValueError(f"rope dims must be (dt, dh, dw), got {dims}")
    if not all(d >= 0 and d % 2 == 0 for d in dims):
        raise ValueError(f"rope dims must be even and non-negative, got {dims}")
    if head_dim is not None and sum(dims) != head_dim:
        raise ValueError(f"rope dims {dims} sum to {sum(dims)}, not head_dim {head_dim}")
    return dims


def check_positive_finite(name: str, value) -> None:
    """value a real number in (0, inf): not a bool, a string, NaN or inf."""
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0
            and value != math.inf):  # (not math.isfinite: torch.compile(dynamic=True) cannot trace it)
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_theta(theta) -> float:
    """RoPE's frequency base as a positive finite float: a real number, or a one-element
    tensor (a config buffer) as softmax_scale takes one."""
    name = "rope theta (the frequency base)"
    if isinstance(theta, torch.Tensor):
        if theta.numel() != 1 or theta.dtype == torch.bool or theta.is_complex():
            raise ValueError(f"{name} must be a positive finite number or a one-element real tensor, "
                             f"got a {theta.dtype} tensor of shape {tuple(theta.shape)}")
        if theta.requires_grad:
            raise ValueError(f"{name} requires grad, but RoPE is differentiable in q and k only: "
                             "pass a float (or theta.detach())")
        theta = theta.item()
    check_positive_finite(name, theta)
    return float(theta)


def check_positions(positions: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a tensor (N, 3), got {type(positions).__name__}")
    if positions.dtype == torch.bool or positions.is_complex():
        raise ValueError(f"positions must be an integer or floating tensor, got {positions.dtype}")
    if positions.dtype in (torch.float16, torch.bfloat16):
        # whole coordinates past 2048 (float16) or 256 (bfloat16) are not representable: the
        # rotation would be another position's, without a word
        raise ValueError(f"positions are {positions.dtype}, which holds whole coordinates only up to "
                         f"{2048 if positions.dtype == torch.float16 else 256}: pass integer or float32 positions "
                         "(a mixed-precision cast of a module's floating inputs, e.g. FSDP's cast_forward_inputs, "
                         "makes float32 positions half precision; integer ones, as Rope3D.from_pack(pack, ...) "
                         "keeps a pack's, it leaves alone)")
    if positions.requires_grad and torch.is_grad_enabled():
        # the ops take positions as constants (no kernel computes d/dpositions); a silent
        # None gradient would look like a zero one
        raise ValueError("positions requires grad, but RoPE is differentiable in q and k only: "
                         "pass positions.detach()")
    if not (positions.dim() == 2 and positions.shape[1] == 3):
        raise ValueError(f"positions must be (N, 3), got shape {tuple(positions.shape)}")
    if positions.shape[0] != num_tokens:
        raise ValueError(f"positions has {positions.shape[0]} rows but there are {num_tokens} tokens")
    if positions.device != device:
        raise ValueError(f"positions is on {positions.device} but the tokens are on {device}")


# Last, as pack.py imports this module: whichever of the two is imported first, the other
# is complete by the time check_pack runs. (An import statement inside check_pack cost 1 us
# a call; a functools.cache around it made torch.compile warn at every traced call.)
from . import pack as _pack  # noqa: E402
