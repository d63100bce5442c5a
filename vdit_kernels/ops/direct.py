"""Eager calls without the dispatcher: a registered op's implementation and autograd
formula, run directly where nothing could tell the difference.

Every op is a torch.library custom op: that is what torch.compile, torch.export,
opcheck, fake tensors and the other dispatch modes see. In plain eager code the custom
op's Python layers (dispatch, the disable-dynamo wrapper, the autograd wrapper's pytree
handling of inputs and outputs) cost more host time than a small op's kernels take on
the GPU: patch_embed forward+backward on a tiny CPU pack took 216 us through the op and
138 us through call() (the reference implementation alone 88 us, permute + nn.Linear
79 us; torch 2.14, 2026-11-27), and the H100
machine's host ran the same layers about 4x slower, where a 10 MB patchify's kernel
takes 7 us. So each public function ends in `call(op, *args)`:

  * under torch.compile (dynamo), a dispatch or torch-function mode (FakeTensorMode,
    functionalization, ...), a functorch transform, or with tensor subclasses: op(*args);
  * otherwise, when no input needs a gradient: the implementation the op runs, called
    directly;
  * otherwise: the same implementation, setup_context and backward the op registered
    (define() and register_autograd() below keep them), through one torch.autograd.Function;
  * except, in the last two cases, where the backend offers the op with its autograd formula
    built in (define()'s `native`: the CUDA backend's patch_embed and linear_unpatchify, C++
    ops with an Autograd kernel that compute what the op's implementation and registered
    backward compute, with the same functions): that, called directly. A Python
    autograd.Function and its backward cost the H100 machine's host more than those ops'
    GPU work.

An op that mutates its inputs (define_mutating: in-place RoPE) takes the direct route
under the same conditions when no input needs a gradient, and its direct call bumps the
mutated tensors' version counters as the op's mutates_args would.
Both routes run the same functions, so they agree bit for bit; VDIT_DIRECT=0 (read at
import) sends every call through the ops, as tests do to compare the two. Not taken
under torch.jit.trace (the trace would hold the kernels' outputs, not the op). Forward-mode
AD is refused on both routes (no formula). Batched gradients (torch.autograd.grad(...,
is_grads_batched=True), jacobian(vectorize=True): the legacy vmap, which no check here
sees) fail on the direct route with a vmap error; VDIT_DIRECT=0 runs them through the
ops' batching fallback.
"""
from __future__ import annotations

import inspect
import operator
import os
from typing import Callable, Optional, Sequence

import torch
from torch.autograd import forward_ad as _forward_ad
from torch.utils import _python_dispatch

ENABLED = os.environ.get("VDIT_DIRECT", "1") != "0"
_FORMULAS: dict = {}  # op -> (impl, setup_context, backward)
_NATIVE: dict = {}  # op -> native(backend name): the op with its own autograd, or None
_MUTATING: dict = {}  # op -> (impl, positions of the arguments it mutates)
_REQUIRES_GRAD = operator.attrgetter("requires_grad")  # (map with it: no generator frame a tensor)
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))  # (a set: one C-level pass over the types)


def define(name: str, impl: Callable, native: Optional[Callable] = None):
    """The torch.library custom op `name` (no mutated arguments) whose body is impl, its
    schema read from impl's annotations; call() may run impl for it directly. The op's last
    argument is its backend's name; native(backend), where given, returns a function of the
    other arguments that computes the op with its own autograd formula, or None."""
    op = torch.library.custom_op(name, impl, mutates_args=())
    _FORMULAS[op] = (impl, None, None)
    if native is not None:
        _NATIVE[op] = native
    return op


def define_mutating(name: str, impl: Callable, mutates_args: Sequence[str]):
    """The torch.library custom op `name` whose body impl writes into the arguments named
    by mutates_args and returns None; call() may run impl for it directly."""
    op = torch.library.custom_op(name, impl, mutates_args=tuple(mutates_args))
    params = list(inspect.signature(impl).parameters)
    _MUTATING[op] = (impl, [params.index(a) for a in mutates_args])
    return op


def register_autograd(op, setup: Callable, backward: Callable) -> None:
    """op.register_autograd(backward, setup_context=setup), kept for call()'s direct route too."""
    op.register_autograd(backward, setup_context=setup)
    _FORMULAS[op] = (_FORMULAS[op][0], setup, backward)


def _count(arg) -> Optional[int]:
    """None for a tensor argument, the length of a list of tensors, else 0."""
    if isinstance(arg, torch.Tensor):
        return None
    return len(arg) if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor) else 0


def _tensors(args) -> list:
    """The tensors among an op's arguments, lists of tensors flattened, in argument order
    (the tensors _count counts; inlined: a call of _count per argument was half of this
    function's 1.6 us for unpatchify's five)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            out.extend(a)
    return out


def direct_ok(tensors) -> bool:
    """Whether a call may skip the dispatcher: eager mode, no mode or transform that
    intercepts ops, no torch.jit.trace recording (it would record the kernels' outputs,
    not the op), plain tensors (nn.Parameter included), not on the meta device (the
    registered ops' fake implementations give meta tensors their shapes)."""
    return (ENABLED
            and not (tensors and tensors[0].is_meta)  # (the ops' checks put every tensor on one device)
            and _python_dispatch._get_current_dispatch_mode() is None
            and torch._C._len_torch_function_stack() == 0
            and not torch._C._are_functorch_transforms_active()
            and not torch._C._is_tracing()
            and _PLAIN.issuperset(map(type, tensors)))


def call(op, *args):
    """op(*args), or the same computation without the dispatcher (see the module text)."""
    if torch.compiler.is_compiling():  # first: dynamo folds it and traces nothing below
        return op(*args)
    tensors = _tensors(args)
    if _forward_ad._current_level >= 0:  # (a module int: nothing to pay outside forward AD)
        _refuse_dual(op, tensors)
    if not direct_ok(tensors):
        return op(*args)
    if op in _MUTATING:
        impl, mutated = _MUTATING[op]
        if torch.is_grad_enabled() and any(map(_REQUIRES_GRAD, tensors)):
            return op(*args)  # the op's own autograd error
        impl(*args)
        torch.autograd.graph.increment_version([args[i] for i in mutated])
        return None
    if op not in _FORMULAS:
        return op(*args)
    native = _NATIVE.get(op)
    if native is not None:
        fn = native(args[-1])
        if fn is not None:
            return fn(*args[:-1])
    impl, setup, backward = _FORMULAS[op]
    if not (torch.is_grad_enabled() and any(map(_REQUIRES_GRAD, tensors))):
        return impl(*args)
    if backward is None:  # no formula: the op's own error on backward
        return op(*args)
    kind: list = []  # filled by forward: how the op's output was shaped
    flat = _Direct.apply((impl, setup, backward, kind), args, *tensors)
    return flat[0] if kind[0] is torch.Tensor else kind[0](flat)


def _refuse_dual(op, tensors) -> None:
    """Forward-mode AD (torch.autograd.forward_ad) has no formula in these ops: a dual
    input's tangent came back None from the registered op (torch's custom ops do that
    without a word) and correct from the direct route on some backends only."""
    if any(_forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(f"{getattr(op, '_qualname', op)}: forward-mode AD (torch.autograd.forward_ad "
                                  "dual tensors) is not implemented; use reverse mode (backward, "
                                  "torch.autograd.grad)")


class _Direct(torch.autograd.Function):
    """impl(*args) with the op's setup_context and backward, for tensors = _tensors(args)."""

    @staticmethod
    def forward(ctx, formula, args, *tensors):
        impl, setup, _, kind = formula
        out = impl(*args)
        setup(ctx, args, out)
        # how many of `tensors` each argument holds (the tensors themselves stay out of
        # ctx: what the backward needs, setup saved)
        ctx.formula, ctx.layout = formula, [_count(a) for a in args]
        if isinstance(out, torch.Tensor):
            kind.append(torch.Tensor)
            return (out,)
        kind.append(type(out))  # list (unpatchify) or tuple (RoPE, attention)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        _, _, backward, kind = ctx.formula
        # the op's backward takes its output's gradient shaped as the output
        if kind[0] is torch.Tensor:
            per_input = backward(ctx, grads[0])
        elif kind[0] is list:
            per_input = backward(ctx, list(grads))
        else:
            per_input = backward(ctx, *grads)
        flat = []  # one gradient per tensor of _tensors(args), in that order
        for count, g in zip(ctx.layout, per_input):
            if count is None:
                flat.append(g)
            elif count:
                flat.extend(g if g is not None else [None] * count)
        return (None, None, *flat)
