"""Print the README performance tables (markdown) from benchmarks/results/*/results.json.

    python -m benchmarks.readme_table [--results DIR] [--op attention ...] [--mode fwd ...]
    python -m benchmarks.readme_table --targets [--results DIR]

One section per result file (GPU), rows: op, mode, workload, provider, median ms,
TFLOP/s or GB/s, % of the limit measured in that run, speedup. --targets: instead, the
issues' targets at a glance, one row per target and workload, one column per GPU, each
cell from that GPU's newest result set that judges it (benchmarks/run.py's verdicts: the
same judgement as each run's summary.md). CPU smoke results (environment.performance_result
false) are left out.
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


def _performance_results(results: Path) -> list[tuple[Path, dict]]:
    out = []
    for f in sorted(results.glob("*/results.json")):
        data = json.loads(f.read_text())
        if data["environment"].get("performance_result", True):
            out.append((f, data))
    return out


def targets(found: list[tuple[Path, dict]]) -> str:
    """The targets with a threshold, a column per GPU: ratio (ours / peer speed, or % of
    the copy bandwidth), met or not, and the head-to-head ratio where one was timed."""
    from . import run  # (run imports this module)

    order = run.target_names()
    gpus: list[str] = []
    newest: dict = {}  # (target, workload) -> {gpu: (date, verdict, result set)}
    for f, data in found:
        env = data["environment"]
        if env["gpu"] not in gpus:
            gpus.append(env["gpu"])
        for v in run.verdicts(data["rows"], data.get("head_to_head")):
            if v["met"] is None:
                continue
            cells = newest.setdefault((v["target"], v["workload"]), {})
            if env["gpu"] not in cells or env["date"] >= cells[env["gpu"]][0]:
                cells[env["gpu"]] = (env["date"], v, f.parent.name)
    if not newest:
        return "_No result set judges a target yet._"
    lines = ["| target | workload | " + " | ".join(gpus) + " |", "| --- | --- |" + " --- |" * len(gpus)]
    for key in sorted(newest, key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k)):
        cells = []
        for gpu in gpus:
            if gpu not in newest[key]:
                cells.append("-")
                continue
            _, v, _ = newest[key][gpu]
            value = f"{v['value']:.2f}x" if v["unit"] == "x" else f"{v['value']:.0f}%"
            h2h = f" (head to head {v['h2h']:.2f}x)" if v["h2h"] else ""
            cells.append(f"{value} {'yes' if v['met'] else '**no**'}{h2h}")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    sets = {gpu: sorted({s for c in newest.values() for g, (_, _, s) in c.items() if g == gpu}) for gpu in gpus}
    lines += ["", "From " + "; ".join(f"{gpu}: " + ", ".join(f"`{s}`" for s in sets[gpu]) for gpu in gpus) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readme_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(RESULTS), help="folder holding <gpu>/results.json")
    parser.add_argument("--op", action="append", choices=("attention", "block", "dit", "patch", "rope"),
                        help="only this op suite's rows (repeatable)")
    parser.add_argument("--mode", action="append", choices=("fwd", "bwd", "fwd+bwd", "setup"),
                        help="only rows of this mode (repeatable)")
    parser.add_argument("--targets", action="store_true",
                        help="the issues' targets at a glance (a column per GPU) instead of the tables")
    args = parser.parse_args(argv)
    if not Path(args.results).is_dir():  # a typo, not "no results yet"
        parser.error(f"--results {args.results}: no such folder")
    found = _performance_results(Path(args.results))
    if not found:
        print(f"_No GPU results under {args.results} yet: run `bash benchmarks/gpu_check.sh` on a GPU machine._")
    elif args.targets:
        print(targets(found))
    else:
        for _, data in found:
            print(render(data, args.op, args.mode) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
