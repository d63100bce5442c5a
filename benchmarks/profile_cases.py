"""Run benchmark cases a few times each, untimed, for an external profiler (ncu).

The benchmark suites' own cases (the same inputs, providers and forced variants), each
called --calls times after --warmup calls, with a synchronize between providers; nothing
is timed here. Under Nsight Compute, with NVTX ranges named after the provider:

    ncu --clock-control none --nvtx --nvtx-include "regex:vdit-cuda/" \\
        --section SpeedOfLight python -m benchmarks.profile_cases --op rope \\
        --workload mixed-pack --provider vdit-cuda --provider liger

(--clock-control none: the device tool's METHOD.md leaves the clocks alone.) Each call
runs inside the NVTX range "<provider>/<name> <mode>", so one ncu report can hold several
providers' kernels and say which is which. On CPU it runs the cases too (a code check).
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import workloads
from .run import SUITES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_cases", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", required=True, choices=sorted(SUITES), help="op suite")
    parser.add_argument("--workload", required=True, choices=sorted(workloads.WORKLOADS))
    parser.add_argument("--provider", action="append", help="only providers whose name contains this (repeatable)")
    parser.add_argument("--warmup", type=int, default=2, help="untraced calls first (compilation, autotuning)")
    parser.add_argument("--calls", type=int, default=1, help="calls inside the NVTX range")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases, skips = SUITES[args.op].cases(device, False, [workloads.WORKLOADS[args.workload]], args.provider)
    for s in skips:
        if not args.provider or any(p in s.provider for p in args.provider):
            print(f"skipped {s.provider}: {s.reason}")
    if not cases:
        print("no case matched", file=sys.stderr)
        return 1
    for case in cases:
        prepared = case.build()
        for _ in range(args.warmup):
            prepared.fn()
        label = f"{case.provider}/{case.name} {case.mode}"
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_push(label)
        for _ in range(args.calls):
            prepared.fn()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
        print(f"ran {label}: {args.warmup} warm-up + {args.calls} calls", flush=True)
        del prepared
    return 0


if __name__ == "__main__":
    sys.exit(main())
