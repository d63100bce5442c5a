"""VideoPack: the metadata of a variable-length pack of videos ("patch n' pack").

A pack is B videos of different latent sizes (T_i, H_i, W_i) cut into spacetime
patches of size (pt, ph, pw) and flattened into one token sequence of length

    N = sum_i (T_i/pt) * (H_i/ph) * (W_i/pw)

Video i owns tokens cu_seqlens[i] : cu_seqlens[i+1]; inside a video, tokens are in
raster order over the token grid (t, h, w), w fastest. This is the layout
flash_attn_varlen_func uses, so every op takes (cu_seqlens, max_seqlen) and
max_seqlen is a Python int: no kernel launch ever needs a device->host sync.

Cross-attention keys (per-video text tokens) are described by `text_lengths`:
video i's queries attend to text tokens cu_seqlens_k[i] : cu_seqlens_k[i+1].
"""
from __future__ import annotations

import operator
from itertools import accumulate
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .checks import as_ints, values_checked

_AXES = ("T", "H", "W")


def _as_triple(value, name: str) -> tuple[int, int, int]:
    given = value
    if isinstance(value, bool):  # (an int to Python, never a patch size)
        raise ValueError(f"{name} must be an int or three ints (t, h, w), got {value!r}")
    try:  # one int for all three axes (a NumPy or 0-d tensor int too; arrays take the sequence path)
        value = (operator.index(value),) * 3
    except TypeError:
        pass
    if not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be an int or three ints (t, h, w), got {value!r}")
    value = as_ints(value, name)
    if len(value) != 3 or any(v <= 0 for v in value):
        raise ValueError(f"{name} must be a positive int or three positive ints (t, h, w), got {given!r}")
    return value


def tensor_device(device) -> torch.device:
    """`device` as a tensor on it reports its device: "cuda" with the current device's
    index, "cpu:0" as "cpu" (torch.device("cuda") != torch.device("cuda:0"), so a pack
    built on "cuda" compared unequal to its tokens' device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":
        return torch.device("cpu")
    return device


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A small CPU tensor on `device` without a stream synchronization: a blocking
    host->device copy (torch.tensor(..., device="cuda"), .to("cuda")) waits for all the
    work queued on the stream, so the host could not run ahead of the GPU. A non-blocking
    copy from pageable memory is staged by the driver before it returns, so `host` may
    be freed at once."""
    return host.to(device, non_blocking=True)


# device_table: small launch tables by content and stream (LRU); the ones made during a
# CUDA graph capture are kept for good (a captured graph reads its table at every replay)
_TABLES: "OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
_CAPTURED_TABLES: list = []
TABLE_CACHE_SIZE = 256


def device_table(values: Sequence[int], device, dtype=torch.int64) -> torch.Tensor:
    """A small table of integers (launch metadata: pointers, strides, offsets; or a
    constant, as patch embedding's bias columns) on `device`, in `dtype`, cached by its
    content. The same values again on the same stream (the same videos, as
    in a loop over static buffers) reuse one device tensor and copy nothing; new values are
    copied from pinned memory with a non-blocking copy, and the cache keeps both copies
    alive. Keyed by stream too: a kernel on another stream could otherwise read a table
    whose copy is still queued, or use it after the LRU freed it (memory is reused in
    the order of its own stream only). During a CUDA graph capture every call copies
    afresh (a capturable copy: pinned memory) and the table is never freed: a cached
    table could be evicted while the graph still reads it, and a table copied inside one
    capture holds its values only once that graph has replayed. Never write to it."""
    device = torch.device(device)
    stream = None
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_current_stream_capturing():
            host = torch.tensor(list(values), dtype=dtype).pin_memory()
            _CAPTURED_TABLES.append((host, host.to(device, non_blocking=True)))
            return _CAPTURED_TABLES[-1][1]
        stream = torch.cuda.current_stream(device).cuda_stream
    key = (device, stream, dtype, tuple(values))  # (Python ints: the callers' pointers, strides, offsets)
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit[1]
    host = torch.tensor(key[3], dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    entry = (host, host.to(device, non_blocking=True))
    _TABLES[key] = entry
    if len(_TABLES) > TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return entry[1]


def _cumsum_int32(lengths: Sequence[int], device) -> torch.Tensor:
    # (never an inference tensor: a pack made under torch.inference_mode may train later,
    # and attention saves its offsets for the backward)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    with torch.inference_mode(False):
        return to_device(torch.tensor(cu, dtype=torch.int32), device)


@dataclass(eq=False)
class VideoPack:
    """Metadata of a pack of B videos; build it with `VideoPack.from_shapes`.

    Attributes (Python values, no device syncs to read them):
      shapes:      B latent sizes (T, H, W)
      patch_size:  (pt, ph, pw)
      grid_sizes:  B token grids (T/pt, H/ph, W/pw)
      seqlens:     B token counts
      num_tokens:  N = sum(seqlens)
      max_seqlen:  max(seqlens) (0 for an empty pack)
      text_lengths, num_text_tokens, max_seqlen_k: the cross-attention key side
        (None / 0 / 0 when no text lengths were given)
    Tensors on `device`:
      cu_seqlens:    int32 (B+1,)
      cu_seqlens_k:  int32 (B+1,) text-token offsets, or None
      positions:     int32 (N, 3) token coordinates (t, h, w), built lazily and cached
      float_positions: the same as float32, lazy and cached (what the RoPE ops read)
      segment_ids:   int32 (N,) the video each token belongs to, lazy and cached
    The lazy tensors are copied to the device on the stream current at their first use
    (without a host sync): first use them on the stream that reads them, or make that
    stream wait for the one that built them.
    """

    shapes: tuple[tuple[int, int, int], ...]
    patch_size: tuple[int, int, int]
    device: torch.device
    grid_sizes: tuple[tuple[int, int, int], ...]
    seqlens: tuple[int, ...]
    cu_seqlens: torch.Tensor
    text_lengths: Optional[tuple[int, ...]] = None
    cu_seqlens_k: Optional[torch.Tensor] = None

    def __post_init__(self):
        # the lazy per-token tensors: an attribute, not a field, so that every copy by
        # dataclasses.replace(pack, ...) gets a cache of its own, and replace(pack, **all
        # fields) works (FSDP's and DDP's mixed-precision casts of a module's inputs rebuild
        # dataclasses so; a field(init=False) made it fail)
        self._cache: dict = {}
        # every other field follows from shapes, patch_size and text_lengths (from_shapes
        # builds them all): a pack made by hand or by dataclasses.replace(pack, shapes=...)
        # whose fields disagree would place tokens wrongly without a word. Python values and
        # tensor shapes only: nothing waits for the GPU.
        grids = tuple(tuple(int(n) // int(p) for n, p in zip(shape, self.patch_size)) for shape in self.shapes)
        b = len(grids)
        wrong = []
        if tuple(map(tuple, self.grid_sizes)) != grids:
            wrong.append(f"grid_sizes {list(self.grid_sizes)} (shapes / patch_size: {list(grids)})")
        if tuple(self.seqlens) != tuple(t * h * w for t, h, w in grids):
            wrong.append(f"seqlens {list(self.seqlens)}")
        if tuple(self.cu_seqlens.shape) != (b + 1,) or self.cu_seqlens.device != self.device:
            wrong.append(f"cu_seqlens of shape {tuple(self.cu_seqlens.shape)} on {self.cu_seqlens.device}")
        if (self.text_lengths is None) != (self.cu_seqlens_k is None) or (
                self.text_lengths is not None and (len(self.text_lengths) != b or tuple(self.cu_seqlens_k.shape) !=
                                                   (b + 1,) or self.cu_seqlens_k.device != self.device)):
            wrong.append("text_lengths / cu_seqlens_k")
        if not wrong and not torch.compiler.is_compiling():
            # the offsets' values too where that costs no sync (CPU, or VDIT_CHECK_VALUES=1):
            # replace(pack, text_lengths=...) kept the old cu_seqlens_k, and the text of one
            # video went to another
            for name, cu, lengths in (("cu_seqlens", self.cu_seqlens, self.seqlens),
                                      ("cu_seqlens_k", self.cu_seqlens_k, self.text_lengths)):
                if cu is not None and values_checked(cu) and cu.tolist() != list(accumulate(lengths, initial=0)):
                    wrong.append(f"{name} {cu.tolist()} (the offsets of {list(lengths)})")
        if wrong:
            raise ValueError(f"VideoPack fields disagree with its {b} shapes {list(self.shapes)}, patch size "
                             f"{self.patch_size} on {self.device}: " + "; ".join(wrong)
                             + " (build packs with VideoPack.from_shapes)")

    @classmethod
    def from_shapes(
        cls,
        shapes: Sequence[Sequence[int]],
        patch_size=(1, 2, 2),
        device=None,
        text_lengths: Optional[Sequence[int]] = None,
    ) -> "VideoPack":
        """Pack videos of latent sizes `shapes` [(T, H, W), ...].

        Each axis must be divisible by the matching patch size (pt, ph, pw), or one
        int for all three; `text_lengths` (one non-negative int per video) describes
        per-video text tokens for cross-attention. The pack's tensors live on `device`
        (default CPU: build it on the tokens' device). Raises ValueError naming the
        video and axis at fault.
        """
        patch_size = _as_triple(patch_size, "patch_size")
        try:
            device = tensor_device(device if device is not None else "cpu")
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must name a torch device (e.g. 'cuda', 'cuda:1', 'cpu'), got {device!r}") \
                from exc
        if isinstance(shapes, (str, bytes)) or not hasattr(shapes, "__iter__"):
            raise TypeError(f"shapes must be a sequence of (T, H, W), one per video, got {type(shapes).__name__}")
        shapes = [as_ints(shape, f"video {i}: shape") for i, shape in enumerate(shapes)]
        grids = []
        for i, shape in enumerate(shapes):
            if len(shape) != 3:
                raise ValueError(f"video {i}: shape must be (T, H, W), got {shape}")
            grid = []
            for axis, size, p in zip(_AXES, shape, patch_size):
                if size <= 0:
                    raise ValueError(f"video {i}: axis {axis} has size {size}, must be positive")
                if size % p:
                    raise ValueError(
                        f"video {i}: axis {axis} size {size} is not divisible by patch size {p}"
                    )
                grid.append(size // p)
            grids.append(tuple(grid))
        seqlens = tuple(t * h * w for t, h, w in grids)
        cu_k = None
        if text_lengths is not None:
            text_lengths = as_ints(text_lengths, "text_lengths")
            if len(text_lengths) != len(shapes):
                raise ValueError(
                    f"text_lengths has {len(text_lengths)} entries for {len(shapes)} videos"
                )
            if any(n < 0 for n in text_lengths):
                raise ValueError(f"text_lengths must be non-negative, got {text_lengths}")
            cu_k = _cumsum_int32(text_lengths, device)
        return cls(
            shapes=tuple(shapes),
            patch_size=patch_size,
            device=device,
            grid_sizes=tuple(grids),
            seqlens=seqlens,
            cu_seqlens=_cumsum_int32(seqlens, device),
            text_lengths=text_lengths,
            cu_seqlens_k=cu_k,
        )

    # -- sizes -------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return len(self.shapes)

    @property
    def num_tokens(self) -> int:
        return sum(self.seqlens)

    @property
    def max_seqlen(self) -> int:
        # (not max(..., default=0): torch 2.13's dynamo cannot trace the keyword over the
        # symbolic sizes of a pack passed to a compiled function)
        return max(self.seqlens) if self.seqlens else 0

    @property
    def offsets(self) -> tuple[int, ...]:
        """Python copy of cu_seqlens (B+1 ints)."""
        out = [0]
        for n in self.seqlens:
            out.append(out[-1] + n)
        return tuple(out)

    @property
    def num_text_tokens(self) -> int:
        return sum(self.text_lengths) if self.text_lengths is not None else 0

    @property
    def max_seqlen_k(self) -> int:
        return max(self.text_lengths) if self.text_lengths else 0

    # -- lazily built per-token tensors --------------------------------------
    def _per_token(self, key: str, build):
        """self._cache[key]: build(device) made once in eager code, on the CPU and copied
        (to_device). Under torch.compile it is built inside the graph, on the pack's device
        (no CPU ops in a graph a CUDA graph may capture), the cache neither read nor
        written: a graph that read it would guard on what the cache holds (one more compile
        once it fills, or when a data loader filled it first), and one that wrote it would
        keep a graph output, which a CUDA graph (mode="reduce-overhead") overwrites on its
        next replay."""
        if torch.compiler.is_compiling():
            return build(self.device)
        cached = self._cache.get(key)
        if cached is None:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # a pageable host copy cannot be captured, and values made inside a capture
                # exist only once the graph runs: built on the device, not kept
                return build(self.device)
            # never an inference tensor (a first use under torch.inference_mode would make
            # every later training step with this pack fail to save it for backward)
            with torch.inference_mode(False):
                cached = self._cache[key] = to_device(build("cpu"), self.device)
        return cached

    @property
    def positions(self) -> torch.Tensor:
        """int32 (N, 3): the (t, h, w) token coordinates, raster order per video."""
        def build(device):
            parts = []
            for t, h, w in self.grid_sizes:
                axes = (torch.arange(n, dtype=torch.int32, device=device) for n in (t, h, w))
                parts.append(torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3))
            return torch.cat(parts) if parts else torch.zeros(0, 3, dtype=torch.int32, device=device)
        return self._per_token("positions", build)

    @property
    def float_positions(self) -> torch.Tensor:
        """float32 (N, 3) contiguous: `positions` as the RoPE kernels read them, converted
        once (per call, the conversion was a 4 us kernel beside a 355 us RoPE on the H100)."""
        if torch.compiler.is_compiling():  # nothing read or kept in a graph (_per_token)
            return self.positions.to(torch.float32).contiguous()
        cached = self._cache.get("float_positions")
        if cached is None:
            with torch.inference_mode(False):  # (as _per_token's)
                cached = self.positions.to(torch.float32).contiguous()
            # not kept when converted inside a CUDA graph capture (its values exist only
            # once the graph runs)
            if not (cached.is_cuda and torch.cuda.is_current_stream_capturing()):
                self._cache["float_positions"] = cached
        return cached

    @property
    def segment_ids(self) -> torch.Tensor:
        """int32 (N,): index of the video each token belongs to."""
        # output_size: a shape known without reading the repeats, so torch.compile traces
        # this without a graph break
        return self._per_token("segment_ids", lambda device: torch.repeat_interleave(
            torch.arange(self.batch_size, dtype=torch.int32, device=device),
            torch.tensor(self.seqlens, dtype=torch.int64, device=device), output_size=self.num_tokens))

    def to(self, device) -> "VideoPack":
        """The same pack with its tensors on `device`."""
        return VideoPack.from_shapes(self.shapes, self.patch_size, device, self.text_lengths)

    def split(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Split a packed (N, ...) tensor into per-video (seqlen_i, ...) views."""
        if tokens.shape[0] != self.num_tokens:
            raise ValueError(f"tokens has {tokens.shape[0]} rows, the pack has {self.num_tokens}")
        return list(torch.split(tokens, list(self.seqlens)))

    def __repr__(self) -> str:
        return (
            f"VideoPack(B={self.batch_size}, N={self.num_tokens}, max_seqlen={self.max_seqlen}, "
            f"patch_size={self.patch_size}, grids={list(self.grid_sizes)}, device={self.device})"
        )
