"""What vdit_kernels can run here, and whether it computes right: `python -m vdit_kernels`.

    python -m vdit_kernels            # versions, GPU, the _C build, which backend each op family takes
    python -m vdit_kernels --check    # and every op, forward and gradients, on tiny inputs on every
                                      # backend that can run here, against the reference path

The report answers "which kernels will my calls run, and why not the others": per op
family and tensor device, the backend "auto" takes and, for each other backend, the
reason it cannot run (backend.why_not). `--check` is an install check, not a test suite
(that is scripts/test.sh) nor a benchmark: on a GPU it runs the Triton and CUDA kernels
in float32, float16 and bfloat16; on CPU the Triton kernels under TRITON_INTERPRET=1
(float32, float16); with the default tiles (VDIT_AUTOTUNE=0 unless set). Rule for each
result (outputs and input gradients): its largest error against the reference path
computed in float64 is at most twice the reference
path's own error in the same dtype, plus 4 units of the dtype's rounding at the
result's scale (for a product the reference computes a little more exactly than a kernel
may, e.g. float32 sums in another order). Exit status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

import vdit_kernels as vk
from vdit_kernels import backend as _backend

# which op each family's check calls, for the backend's why_not (an op a backend lacks)
_CHECKED_OPS = {
    "patch": ("patchify", "unpatchify", "patch_embed", "linear_unpatchify"),
    "rope": ("apply_rope_3d",),
    "attention": ("varlen_attention",),
}
_WHY_OP = {"apply_rope_3d": None, "varlen_attention": "varlen_attention_fwd"}
# units of the dtype's rounding allowed beyond twice the reference path's own error
_ROUNDING_UNITS = 4


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def _gpu_lines() -> list[str]:
    if not torch.cuda.is_available():
        return ["GPU: none visible (torch.cuda.is_available() is False): auto runs the reference path"]
    lines = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        lines.append(f"GPU {i}: {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                     f"{props.total_memory / 2**30:.0f} GiB")
    return lines


def _extension_line() -> str:
    module = _backend.extension()
    if module is None:
        return "_C: not loaded (the cuda backend is off; reference and triton work)"
    line = f"_C: {torch.ops.vdit_C.build_info()} at {Path(module.__file__).name}"
    missing = _backend.extension_missing_ops()
    if missing:
        line += f"; built from older sources, lacks {', '.join(missing)} (rebuild: pip install --no-build-isolation -e .)"
    return line


def _settings_lines() -> list[str]:
    names = sorted(n for n in os.environ if n.startswith("VDIT_") or n == "TRITON_INTERPRET")
    if not names:
        return ["settings: none of VDIT_* or TRITON_INTERPRET is set (README: Environment variables)"]
    return ["settings: " + ", ".join(f"{n}={os.environ[n]}" for n in names)]


def _auto_choice(family: str, device: str) -> str:
    try:
        return _backend.resolve(family, torch.device(device))
    except (ValueError, _backend.BackendUnavailable) as exc:  # VDIT_BACKEND names one that cannot run
        return f"none ({exc})"


def report() -> list[str]:
    """The lines of the report: versions, GPUs, the _C build, the settings read from the
    environment, and per op family and tensor device the backend a call without
    backend= takes and why the others cannot run."""
    lines = [f"vdit_kernels {vk.__version__} at {Path(vk.__file__).parent}",
             f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
             f"triton {_version('triton')}"]
    lines += _gpu_lines()
    lines.append(_extension_line())
    lines += _settings_lines()
    lines.append("backends per op family (a call without backend= takes 'takes'; backend=<name> "
                 "raises BackendUnavailable with the reason below):")
    for family in _backend.FAMILIES:
        for device in ("cuda", "cpu"):
            lines.append(f"  {family:<9} {device} tensors: takes {_auto_choice(family, device)}")
            for name in _backend.BACKENDS[1:]:
                reason = _backend.why_not(name, family, torch.device(device))
                lines.append(f"      {name:<7} {'can run' if reason is None else 'no: ' + reason}")
    cache = None
    if _backend._has_module("triton"):
        from vdit_kernels.triton import tuning_cache  # needs triton
        cache = tuning_cache.describe()
    lines.append(cache or "tuning cache: off (VDIT_TUNING_CACHE unset or off)")
    return lines


# --- the install check -----------------------------------------------------------------

def _inputs(family: str, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """Tiny inputs in `dtype` (float64 for the exact run is a cast of the same values): a
    pack of three videos with odd token grids (a one-frame one included), channels 3,
    patch (1, 2, 2); RoPE and attention on 2 query heads and 1 key/value head of 32."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    shapes = [(3, 6, 10), (1, 4, 2), (2, 2, 6)]
    pack = vk.VideoPack.from_shapes(shapes, patch_size=(1, 2, 2), device=device)
    inputs = {"pack": pack}
    if family == "patch":
        hidden, feats = 24, 3 * 4
        inputs.update(videos=[rand(3, *s) for s in shapes], tokens=rand(pack.num_tokens, feats),
                      weight=rand(hidden, 3, 1, 2, 2, scale=0.3), bias=rand(hidden),
                      x=rand(pack.num_tokens, hidden), out_weight=rand(feats, hidden, scale=0.2),
                      out_bias=rand(feats))
    else:
        inputs.update(q=rand(pack.num_tokens, 2, 32), k=rand(pack.num_tokens, 1, 32), v=rand(pack.num_tokens, 1, 32))
    return inputs


def _run(op: str, inputs: dict, backend: str) -> list[torch.Tensor]:
    """The op's outputs and the gradients of its tensor inputs under a fixed random
    weighting of the outputs (so a wrong backward changes them)."""
    leaves = {name: t.detach().requires_grad_() for name, t in inputs.items()
              if isinstance(t, torch.Tensor) and t.is_floating_point()}
    leaves.update({name: [t.detach().requires_grad_() for t in ts] for name, ts in inputs.items()
                   if isinstance(ts, list)})
    pack = inputs["pack"]
    if op == "patchify":
        outs = [vk.patchify(leaves["videos"], pack, backend=backend)]
        grads_of = leaves["videos"]
    elif op == "unpatchify":
        outs = vk.unpatchify(leaves["tokens"], pack, 3, backend=backend)
        grads_of = [leaves["tokens"]]
    elif op == "patch_embed":
        outs = [vk.patch_embed(leaves["videos"], pack, leaves["weight"], leaves["bias"], backend=backend)]
        grads_of = [*leaves["videos"], leaves["weight"], leaves["bias"]]
    elif op == "linear_unpatchify":
        outs = vk.linear_unpatchify(leaves["x"], pack, leaves["out_weight"], leaves["out_bias"], 3, backend=backend)
        grads_of = [leaves["x"], leaves["out_weight"], leaves["out_bias"]]
    elif op == "apply_rope_3d":
        outs = list(vk.apply_rope_3d(leaves["q"], leaves["k"], pack, dims=(8, 12, 12), backend=backend))
        grads_of = [leaves["q"], leaves["k"]]
    else:
        rope = vk.Rope3D.from_pack(pack, dims=(8, 12, 12), interleaved=False)
        out, lse = vk.varlen_attention(leaves["q"], leaves["k"], leaves["v"], pack.cu_seqlens, pack.cu_seqlens,
                                       pack.max_seqlen, pack.max_seqlen, return_lse=True, rope=rope,
                                       backend=backend)
        outs = [out, lse]
        grads_of = [leaves["q"], leaves["k"], leaves["v"]]
    gen = torch.Generator().manual_seed(1)
    # the lse's weighting too: its gradient flows into q and k
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
               for o in outs)
    grads = torch.autograd.grad(loss, grads_of)
    return [o.detach() for o in outs] + list(grads)


def _errors(results: list[torch.Tensor], exact: list[torch.Tensor]) -> list[tuple[float, float]]:
    """Per result: (largest absolute error, largest magnitude of the exact values)."""
    return [((r.double() - e).abs().max().item(), e.abs().max().item()) if e.numel() else (0.0, 0.0)
            for r, e in zip(results, exact)]


def check_op(op: str, family: str, backend: str, device: torch.device, dtype: torch.dtype,
             seed: int = 0) -> tuple[bool, str]:
    """Runs `op` on `backend` in `dtype` and judges each of its results (outputs, input
    gradients) by the rule in this module's docstring; (passed, a line on the result
    nearest its bound)."""
    exact = _run(op, {k: ([t.double() for t in v] if isinstance(v, list) else
                          v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                      for k, v in _inputs(family, device, dtype, seed).items()}, "reference")
    inputs = _inputs(family, device, dtype, seed)
    rounding = _ROUNDING_UNITS * torch.finfo(dtype).eps
    judged = [(ours, ref, 2 * ref + rounding * max(scale, 1.0))
              for (ours, _), (ref, scale) in zip(_errors(_run(op, inputs, backend), exact),
                                                 _errors(_run(op, inputs, "reference"), exact))]
    ours, ref, bound = max(judged, key=lambda j: j[0] / j[2])
    return (all(o <= b for o, _, b in judged),
            f"max error {ours:.2e} (reference path {ref:.2e}, bound {bound:.2e}; the closest of "
            f"{len(judged)} results)")


def check(device: Optional[str] = None, dtypes: Optional[list] = None,
          out: Callable[[str], None] = print) -> int:
    """Checks every op on every backend that can run it on `device` (default: the GPU if
    one is visible, else CPU) in `dtypes`; returns the number of failures."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtypes is None:
        dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    runs = [(family, op, name, dtype) for family, ops in _CHECKED_OPS.items() for op in ops
            for name in _backend.BACKENDS[1:] for dtype in dtypes]
    failures = ran = 0
    skipped: dict = {}  # reason -> how many checks it skipped, said once at the end
    for i, (family, op, name, dtype) in enumerate(runs, 1):
        label = f"[{i:>{len(str(len(runs)))}}/{len(runs)}] {op:<17} {name:<6} {str(dtype).replace('torch.', ''):<8}"
        reason = _backend.why_not(name, family, device, _WHY_OP.get(op, op), dtype)
        if reason is not None:
            skipped[f"{name}: {reason}"] = skipped.get(f"{name}: {reason}", 0) + 1
            continue
        try:
            passed, detail = check_op(op, family, name, device, dtype)
        except Exception as exc:  # noqa: BLE001 (an install check reports every failure and goes on)
            passed, detail = False, f"raised {type(exc).__name__}: {exc}"
        ran += 1
        failures += not passed
        out(f"{label} {'ok  ' if passed else 'FAIL'} {detail}")
    for reason, count in skipped.items():
        out(f"skipped {count}: {reason}")
    out(f"{ran - failures} of {ran} checks passed on {device.type}" + (
        "" if ran else " (no backend but the reference path can run here: see the report above)"))
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vdit_kernels",
                                     description=(__doc__ or "").split("\n\n")[0])  # no docstrings under -OO
    parser.add_argument("--check", action="store_true",
                        help="run every op on tiny inputs on every backend that can run here, against the reference")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        help="the tensors' device for --check (default: cuda if a GPU is visible, else cpu)")
    args = parser.parse_args(argv)
    for line in report():
        print(line)
    if not args.check:
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to this process")
    # the default tiles and variants, no timing runs: the check is about values, and the
    # first attention backward would otherwise time about 40 tiles (a minute or more)
    os.environ.setdefault("VDIT_AUTOTUNE", "0")
    print("install check (each result within 2x the reference path's own error, plus rounding):", flush=True)
    return 1 if check(args.device, out=lambda line: print(line, flush=True)) else 0


if __name__ == "__main__":
    sys.exit(main())
