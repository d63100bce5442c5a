"""Print the README performance table (markdown) from benchmarks/results/*/results.json.

    python -m benchmarks.readme_table [--results DIR] [--op attention ...] [--mode fwd ...]

One section per result file (GPU), rows: op, mode, workload, provider, median ms,
TFLOP/s or GB/s, % of the limit measured in that run, speedup. CPU smoke results
(environment.performance_result false) are left out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def result_cells(r: dict, detailed: bool = False) -> tuple[str, str, str]:
    """(throughput, % of limit, speedup) cells of one result row, for this README table
    (compact) and for run.py's report (`detailed`: more digits, the kernels' own ms)."""
    tf, gb, pc = (".2f", ".1f", ".1f") if detailed else (".1f", ".0f", ".0f")
    thr = f"{r['tflops']:{tf}} TFLOP/s" if "tflops" in r else (f"{r['gbs']:{gb}} GB/s" if "gbs" in r else "-")
    pct = f"{r['pct_of_limit']:{pc}}%" if "pct_of_limit" in r else "-"
    if str(r.get("limit", "")).startswith("roofline"):  # bytes bound this GEMM, not FLOPs
        pct += f" ({r['limit']})"
    if r.get("kernel_ms"):  # memory-bound ops: the kernels' own device time, host overhead excluded
        ms = f"{r['kernel_ms']:.3f} ms = " if detailed else ""
        thr += f" (kernels {ms}{r['kernel_gbs']:.0f} GB/s)"
        pct += f" (kernels {r['kernel_pct_of_limit']:{pc}}%"
        pct += f", {r['kernel_pct_of_copy']:.0f}% of a same-size copy)" if r.get("kernel_pct_of_copy") else ")"
    sp = f"{r['speedup']:.2f}x vs {r['baseline']}" if r.get("speedup") else "-"
    return thr, pct, sp


def render(data: dict, ops=None, modes=None) -> str:
    env, lim = data["environment"], data["environment"]["limits"]
    lines = [f"**{env['gpu']}** (torch {env['torch']}, triton {env['triton']}, commit "
             f"{(env.get('git_commit') or '?')[:10]}{' (dirty)' if env.get('git_dirty') else ''}, "
             f"{env['date'][:10]}; measured limits: "
             f"copy {lim['bandwidth_gbs']:.0f} GB/s, {lim['matmul_dtype']} matmul {lim['compute_tflops']:.0f} TFLOP/s)",
             "", "| op | mode | workload | provider | median ms | throughput | % of limit | speedup |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in data["rows"]:
        if "median_ms" not in r or (ops and r["op"] not in ops) or (modes and r["mode"] not in modes):
            continue
        thr, pct, sp = result_cells(r)
        name = r["name"] if r["op"] != r["name"] else r["op"]
        lines.append(f"| {name} | {r['mode']} | {r['workload']} ({r['tokens']} tok) | {r['provider']} | "
                     f"{r['median_ms']:.3f} | {thr} | {pct} | {sp} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(RESULTS), help="folder holding <gpu>/results.json")
    parser.add_argument("--op", action="append", choices=("attention", "block", "dit", "patch", "rope"),
                        help="only this op suite's rows (repeatable)")
    parser.add_argument("--mode", action="append", choices=("fwd", "bwd", "fwd+bwd", "setup"),
                        help="only rows of this mode (repeatable)")
    args = parser.parse_args(argv)
    files = sorted(Path(args.results).glob("*/results.json"))
    shown = 0
    for f in files:
        data = json.loads(f.read_text())
        if not data["environment"].get("performance_result", True):
            continue
        print(render(data, args.op, args.mode) + "\n")
        shown += 1
    if not shown:
        print(f"_No GPU results under {args.results} yet: run `bash benchmarks/gpu_check.sh` on a GPU machine._")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
