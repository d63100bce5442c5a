"""Which backends exist here and how one is chosen for a call.

Backends: "reference" (plain PyTorch, always available), "triton" (Triton kernels
in vdit_kernels/triton/<family>.py) and "cuda" (kernels from csrc/, compiled into
vdit_kernels._C, wrapped in vdit_kernels/cuda/<family>.py). Op families: "patch"
(patchify, unpatchify, patch_embed, linear_unpatchify), "rope" and "attention".

Choice, first match wins: the op's `backend=` argument, then `use_backend(...)`,
then the VDIT_BACKEND environment variable, then "auto". "auto" takes, for CUDA tensors,
the first backend of DEFAULT_ORDER[family] that can run on them and falls back to
"reference" (the only place a fallback happens); for CPU tensors always "reference" (the
Triton interpreter runs only where asked for by name). "Can run" covers the device and
the dtype: each implementation module lists the dtypes it computes in (DTYPES; float64 is
for gradcheck and runs on the reference path unless a module lists it). A backend asked for by
name that cannot run raises BackendUnavailable saying why; it never falls back.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
import warnings
from functools import lru_cache
from typing import Optional

import torch

BACKENDS = ("reference", "triton", "cuda")
FAMILIES = ("patch", "rope", "attention")

# The default per op family on a GPU, fastest first. The evidence is the "Backend choice"
# table of a GPU benchmark run (benchmarks/run.py writes it to
# benchmarks/results/<gpu>/summary.md, marking rows where the faster backend is not first
# here). Measured on an H100 80GB HBM3 (benchmarks/results/nvidia-h100-80gb-hbm3/, torch
# 2.11, Triton 3.6; `bash benchmarks/gpu_check.sh all --workload mixed-pack`), bf16, the
# mixed pack of 41430 tokens: patchify 0.093 ms cuda vs 0.356 ms triton, unpatchify
# 0.077 vs 0.258, rope_3d (24 heads x 128) 0.358 vs 1.155. patch_embed and linear_unpatchify
# on "cuda" are those kernels around PyTorch's GEMMs with a C++ autograd formula, which is
# what Triton's measured choice picked on the H100 (its "gemm" variant) at less host time.
# An op a backend lacks takes the next one.
DEFAULT_ORDER = {
    "patch": ("cuda", "triton"),
    "rope": ("cuda", "triton"),
    "attention": ("triton",),
}

_requested: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "vdit_backend", default=None
)


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here or on these tensors."""


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops called inside the `with` block on backend `name` ("auto", "reference",
    "triton", "cuda") unless a call names its own `backend=`; it takes precedence over the
    VDIT_BACKEND environment variable. Per thread and async task (a context variable).
    Under torch.compile the choice is made at trace time and kept in the graph: a later
    use_backend or VDIT_BACKEND does not recompile a function compiled before it."""
    _check_name(name)
    token = _requested.set(name)
    try:
        yield
    finally:
        _requested.reset(token)


def _check_name(name: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")


@lru_cache(maxsize=None)
def triton_interpreter() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors. Read once,
    at the first op call, as Triton itself decides once (when a module's kernels are
    decorated) whether they are interpreted; a read per call was 0.85 us of host time
    (os.environ.get) at every op call."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


_EXTENSION: dict = {}


def extension():
    """The compiled vdit_kernels._C module, or None (with a one-time warning saying why)."""
    if "module" not in _EXTENSION:
        try:
            from vdit_kernels import _C  # noqa: F401  (importing registers torch.ops.vdit_C)
            _EXTENSION["module"], _EXTENSION["error"] = _C, None
        except ImportError as exc:  # only a missing or unloadable build; real errors propagate
            _EXTENSION["module"], _EXTENSION["error"] = None, str(exc)
            warnings.warn(
                f"vdit_kernels._C is not available ({exc}); the CUDA backend is disabled, "
                "the reference and Triton backends work. Reinstall with the compile step "
                "(pip install --no-build-isolation -e .) to build it.",
                stacklevel=3,
            )
    return _EXTENSION["module"]


def extension_has_cuda() -> bool:
    """True when _C was built with its CUDA kernels (not a CPU-only build)."""
    if "has_cuda" not in _EXTENSION:  # asked once: a dispatcher call, on every op's resolution
        _EXTENSION["has_cuda"] = extension() is not None and bool(torch.ops.vdit_C.has_cuda())
        if extension() is not None and not _EXTENSION["has_cuda"] and torch.cuda.is_available():
            info = str(torch.ops.vdit_C.build_info())
            if "no CUDA toolkit" in info:  # not asked for (VDIT_SKIP_CUDA_BUILD=1 is, and says so)
                warnings.warn(f"{info}: the cuda backend is disabled on this GPU machine (auto takes the "
                              "Triton kernels); rebuild with the toolkit: CUDA_HOME=/path/to/cuda "
                              "pip install --no-build-isolation -e .", stacklevel=3)
    return _EXTENSION["has_cuda"]


# the ops csrc/ops.cpp defines: a _C built from older sources lacks some (an editable
# install after a pull, not rebuilt), and the cuda backend then says so instead of failing
# inside a call
EXTENSION_OPS = ("has_cuda", "build_info", "patchify", "unpatchify", "patch_embed", "patch_embed_backward",
                 "linear_unpatchify", "linear_unpatchify_backward", "rope_3d", "rope_3d_")


# the Python functions csrc/direct_host.cpp adds to _C in CUDA builds (the cuda backend's
# eager calls, vdit_kernels/cuda/patch.py and cuda/rope.py): a CUDA build from older sources lacks them
EXTENSION_DIRECT_CALLS = ("direct_patchify", "direct_unpatchify", "direct_patch_embed", "direct_linear_unpatchify",
                          "direct_rope_3d", "direct_rope_3d_")


def extension_missing_ops() -> tuple:
    """What the loaded _C lacks (asked once): the ops of EXTENSION_OPS it does not register
    ("vdit_C::<op>") and, in a CUDA build, the functions of EXTENSION_DIRECT_CALLS ("_C.<name>")."""
    if "missing" not in _EXTENSION:
        module = extension()
        names = set(torch._C._dispatch_get_all_op_names()) if module is not None else set()
        missing = [f"vdit_C::{op}" for op in EXTENSION_OPS if f"vdit_C::{op}" not in names]
        if not missing and extension_has_cuda():
            missing += [f"_C.{name}" for name in EXTENSION_DIRECT_CALLS if not hasattr(module, name)]
        _EXTENSION["missing"] = tuple(missing)
    return _EXTENSION["missing"]


def _lacks(backend: str, family: str, op: Optional[str]) -> Optional[str]:
    """A backend may implement part of a family: say so when `op` is missing."""
    if op is not None and not hasattr(implementation(backend, family), op):
        return f"the {backend} backend does not implement {op} yet"
    return None


def _lacks_dtype(backend: str, family: str, dtype: Optional[torch.dtype]) -> Optional[str]:
    """A backend computes in the dtypes its module lists (DTYPES): say so for another one,
    rather than compute it in a narrower one or fail inside a kernel."""
    dtypes = implementation(backend, family).DTYPES
    if dtype is not None and dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return (f"its {family} kernels take {names}, not {str(dtype).replace('torch.', '')} "
                "(backend='reference' computes every floating dtype)")
    return None


def why_not(backend: str, family: str, device: torch.device, op: Optional[str] = None,
            dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None if `backend` can run op `op` of family `family` on `device` (and on tensors of
    `dtype`, when given), else the reason."""
    # every answer depends only on these arguments, the device's type, the interpreter
    # switch and what this process has installed and built: asked again at every op call
    # (auto's resolution, about 10 us of host time on the H100 machine), answered once
    device = torch.device(device)
    return _why_not(backend, family, device.type, op, dtype, triton_interpreter())


# the ops whose Triton kernels multiply matrices with tl.dot (the forward resolves; the
# backward runs on the forward's backend): wrong under the interpreter in bfloat16
INTERPRETER_BF16_DOT_OPS = ("patch_embed", "linear_unpatchify", "varlen_attention_fwd", "varlen_attention_bwd")
_NO_GPU = "no CUDA GPU is visible to this process (torch.cuda.is_available() is False)"


def _gpu_visible() -> bool:
    return torch.cuda.is_available()


@lru_cache(maxsize=None)
def _why_not(backend: str, family: str, device_type: str, op: Optional[str], dtype: Optional[torch.dtype],
             interpreter: bool) -> Optional[str]:
    device = torch.device(device_type)
    if backend == "reference":
        return None
    if backend == "triton":
        if not _has_module("triton"):
            return "triton is not installed"
        if device.type == "cpu" and not interpreter:
            return "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device.type} tensors"
        if not _has_module(f"vdit_kernels.triton.{family}"):
            return f"there is no Triton implementation of the {family} ops yet"
        if device.type == "cuda" and not _gpu_visible():
            return _NO_GPU
        if device.type == "cpu" and dtype == torch.bfloat16 and op in INTERPRETER_BF16_DOT_OPS:
            return ("the Triton interpreter multiplies bfloat16 matrices wrongly (its tl.dot multiplies "
                    "the raw bits, an upstream bug): use float16 or float32 on CPU, bfloat16 on a GPU")
        return _lacks(backend, family, op) or _lacks_dtype(backend, family, dtype)
    if backend == "cuda":
        if not _has_module(f"vdit_kernels.cuda.{family}"):
            return f"there is no CUDA implementation of the {family} ops"
        if extension() is None:
            return f"vdit_kernels._C is not built: {_EXTENSION['error']}"
        if extension_missing_ops():
            return (f"vdit_kernels._C was built from older sources (it lacks "
                    f"{', '.join(extension_missing_ops())}): rebuild it with "
                    "pip install --no-build-isolation -e .")
        if not extension_has_cuda():
            return "vdit_kernels._C was built without CUDA (CPU-only torch or no nvcc at build time)"
        if device.type != "cuda":
            return f"the CUDA kernels need CUDA tensors, got {device.type} tensors"
        if not _gpu_visible():
            return _NO_GPU
        return _lacks(backend, family, op) or _lacks_dtype(backend, family, dtype)
    raise ValueError(f"unknown backend {backend!r}")


def resolve(family: str, device: torch.device, backend: Optional[str] = None,
            op: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> str:
    """The concrete backend for one call of op `op` (of `family`) on `device`, with
    tensors of `dtype` (when given)."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    name, unknown, unavailable = _resolve_name(backend, family, device_type, op, dtype)
    # raised here, not inside _resolve_name: dynamo wraps what a constant-result function
    # raises into an InternalTorchDynamoError, which `except BackendUnavailable` missed
    if unknown:
        raise ValueError(unknown)
    if unavailable:
        raise BackendUnavailable(unavailable)
    return name


# Under torch.compile the choice is made once, at trace time, and baked into the graph as
# the op's backend argument: dynamo must not trace the lookups below (the context
# variable: torch <= 2.13 cannot trace ContextVar.get; the module probing: importlib).
@torch.compiler.assume_constant_result
def _resolve_name(backend: Optional[str], family: str, device: str, op: Optional[str],
                  dtype: Optional[torch.dtype]) -> tuple[str, str, str]:
    """(backend name, "", "") or ("", why the name is unknown, "") or ("", "", why it
    cannot run): strings only, so that torch.compile keeps the answer as a constant."""
    # the variables are read at every call (a use_backend block or VDIT_BACKEND may change
    # between calls); the answers of _why_not are cached
    # (backend="" is no backend name: refused below, not taken for "not given")
    name = backend if backend is not None else (_requested.get() or os.environ.get("VDIT_BACKEND") or "auto")
    try:
        _check_name(name)
    except ValueError as unknown:
        return "", str(unknown), ""
    interpreter = triton_interpreter()
    if name != "auto":
        reason = _why_not(name, family, device, op, dtype, interpreter)
        if reason is not None:
            return "", "", f"backend {name!r} cannot run {op or 'the ' + family + ' ops'}: {reason}"
        return name, "", ""
    if device == "cuda":
        for candidate in DEFAULT_ORDER[family]:
            if _why_not(candidate, family, device, op, dtype, interpreter) is None:
                return candidate, "", ""
    return "reference", "", ""


_IMPLEMENTATIONS: dict = {}


def implementation(backend: str, family: str):
    """The module holding `backend`'s kernels for `family` (imported on first use; then a
    dict lookup: importlib.import_module costs microseconds at every op call)."""
    module = _IMPLEMENTATIONS.get((backend, family))
    if module is None:
        module = _IMPLEMENTATIONS[(backend, family)] = importlib.import_module(f"vdit_kernels.{backend}.{family}")
    return module


def available_backends(family: str, device="cuda") -> list[str]:
    """The backends that can run op family `family` ("patch", "rope" or "attention") on
    tensors of `device` (default "cuda") in this process: "reference" always; "triton" and
    "cuda" where installed and built, on a visible GPU (and "triton" on CPU tensors under
    TRITON_INTERPRET=1). A backend may still refuse a dtype or one op of the family: a call
    naming it then raises BackendUnavailable with the reason (backend.why_not)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown op family {family!r}; choose one of {', '.join(FAMILIES)}")
    return [b for b in BACKENDS if why_not(b, family, torch.device(device)) is None]
