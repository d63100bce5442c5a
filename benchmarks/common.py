"""Shared pieces of the suites: benchmark cases as data, skipped peers, provider checks.

A suite module exposes `cases(device, quick, workloads) -> (list[Case], list[Skip])`.
A Case is pure data plus a `build()` callable that allocates the inputs and returns a
Prepared (the callable to time); run.py and the pytest-benchmark wrappers both use them.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .workloads import Workload

VDIT_BACKENDS = ("reference", "triton", "cuda")
CPU_ONLY_REFERENCE = "the CPU smoke run times the reference providers only"
# run.py --cpu-peers sets this: eager peers then also run on CPU (to exercise their code)
OPTIONS = {"cpu_peers": False}


@dataclass
class Prepared:
    fn: Callable[[], Any]
    grad_to_none: Optional[Sequence[torch.Tensor]] = None
    extra: dict = field(default_factory=dict)


@dataclass
class Case:
    op: str                 # suite: patch | rope | attention | block
    name: str               # sub-op: patchify, unpatchify, patch_embed, rope_3d, varlen_attention, ...
    mode: str               # fwd | bwd | fwd+bwd
    workload: Workload
    provider: str
    build: Callable[[], Prepared]
    flops: Optional[float] = None   # compute-bound ops: TFLOP/s against the matmul limit
    bytes: Optional[float] = None   # memory-bound ops: GB/s against the copy limit; with
                                    # flops too: TFLOP/s against the roofline (the larger time)
    note: str = ""
    breakdown: bool = False  # compute-bound rows too: which kernels the device time goes to

    @property
    def key(self) -> tuple:
        return (self.op, self.name, self.mode, self.workload.name)


@dataclass(frozen=True)
class Skip:
    op: str
    provider: str
    reason: str


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # also a parent package that fails to import
        return False


def vdit_reason(backend: str, family: str, device: str, op: str) -> Optional[str]:
    """None when vdit backend `backend` can run `op` here, else why not."""
    from vdit_kernels.backend import why_not

    if device != "cuda" and backend != "reference":
        reason = why_not(backend, family, torch.device(device), op)
        if reason is None and OPTIONS["cpu_peers"]:
            return None  # TRITON_INTERPRET=1 with --cpu-peers: a code check of the Triton path
        return f"needs CUDA ({reason})" if reason else f"needs CUDA ({CPU_ONLY_REFERENCE})"
    reason = why_not(backend, family, torch.device(device), op)
    return f"backend unavailable: {reason}" if reason else None


def peer_reason(device: str, module: Optional[str] = None, needs_cuda: bool = True,
                cpu_ok: bool = False) -> Optional[str]:
    """None when a peer can run here, else why not (not installed / needs CUDA)."""
    if module is not None and not has_module(module):
        return f"not installed (no module {module!r})"
    if device != "cuda" and needs_cuda:
        return "needs CUDA"
    if device != "cuda" and not (cpu_ok and OPTIONS["cpu_peers"]):
        return f"needs CUDA ({CPU_ONLY_REFERENCE})"
    return None


def wanted(provider: str, filters: Optional[Sequence[str]]) -> bool:
    return not filters or any(f in provider for f in filters)


def dtype_for(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def backward_fn(out_fn: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor], mode: str):
    """A callable for mode fwd / bwd / fwd+bwd of out_fn() w.r.t. inputs (requires_grad)."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return out_fn()
        return Prepared(run)
    if mode == "fwd+bwd":
        def run():
            out = out_fn()
            out.backward(grad)
        out0 = out_fn()
        grad = torch.randn_like(out0)
        del out0
        return Prepared(run, grad_to_none=list(inputs))
    out = out_fn()
    grad = torch.randn_like(out)

    def run():
        torch.autograd.grad(out, list(inputs), grad, retain_graph=True)
    return Prepared(run, grad_to_none=list(inputs))


def with_env(prepared: Prepared, **env: str) -> Prepared:
    """The same case with environment variables set around every call (options the ops
    read per call, such as VDIT_ATTN_BWD), restored afterwards."""
    fn = prepared.fn

    # only these keys are set and put back: mock.patch.dict(os.environ) restores the whole
    # environment (an unsetenv and a putenv per variable), 81 us a call on this CPU machine
    # with 39 variables, which the timed rows of a 0.1 ms op would carry
    def run():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return Prepared(run, grad_to_none=prepared.grad_to_none, extra=prepared.extra)


def free_memory_bytes(device: str) -> float:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return float(free)
    return 8e9
