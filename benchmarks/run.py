"""The main command (scripts/bench.sh): the vdit_kernels ops and their peers, side by side.

    python -m benchmarks.run [--quick] [--op patch|rope|attention|block|dit ...] [--provider SUBSTR ...]
                             [--workload NAME ...] [--out DIR] [--no-static]
    python -m benchmarks.run --from-partial DIR/rows.partial.jsonl [--out DIR]

For each op: one table of workload, provider, median ms (min/max), TFLOP/s or GB/s,
% of the hardware limit measured in this run (benchmarks/limits.py: large D2D copy,
large bf16 matmul), for memory-bound ops on a GPU also the kernels' own device time and
bandwidth (profiler, host overhead excluded: benchmarks/timing.py kernel_ms) as a % of
the large copy's (its device time too: limits.py) and of a copy of the same bytes
(copy_kernel_ms), and speedup
over the reference provider (the vdit reference path;
where it cannot run, the first baseline of BASELINES that ran). Peers that cannot run
are listed with the reason. The summary judges the issues' targets (TARGETS); on a GPU
one whose ratio lies near its threshold (H2H_BAND), or whose rows' minimums judge it
otherwise than their medians, is timed again head to head (our default provider and the
peer in turns). Results go to --out (default on a GPU:
benchmarks/results/<gpu-name>/; on CPU a temporary directory): results.json (rows,
environment, limits), summary.md, plots (if matplotlib is installed) and
static_report.json (benchmarks/static_report.py, unless --no-static). Every finished case
is also appended to rows.partial.jsonl at once: a run killed before it wrote its results
(SIGKILL at a GPU lease's end) gets them back with --from-partial, which times nothing.

On CPU the default workload is a tiny one ("cpu-tiny"), through the reference providers
(with --cpu-peers and TRITON_INTERPRET=1 also the eager peers and Triton's under the
interpreter, as a code check): a smoke test of the suite, not a performance result;
--workload names a full-size one, which then runs slowly on the CPU.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch._dynamo

from . import bench_attention, bench_block, bench_dit, bench_patch, bench_rope, limits, timing, workloads
from .common import OPTIONS
from .readme_table import result_cells
from .timing import bench, copy_kernel_ms, host_ms, kernel_ms

ROOT = Path(__file__).resolve().parent.parent
SUITES = {"patch": bench_patch, "rope": bench_rope, "attention": bench_attention, "block": bench_block,
          "dit": bench_dit}
# speedup column: the first of these that ran for the same (op, name, mode, workload)
BASELINES = {
    "patch": ("vdit-reference", "torch-permute", "nn.Conv3d"),
    "rope": ("vdit-reference", "reference-compile"),
    "attention": ("vdit-reference", "sdpa-padded", "torch-varlen"),
    "block": ("vdit-reference", "torch-varlen"),
    "dit": ("torch-padded", "vdit-reference"),
}
BANNER = ("=" * 78 + "\n CPU SMOKE TEST: tiny sizes, reference providers only. "
          "NOT A PERFORMANCE RESULT.\n" + "=" * 78)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


# environment variables that change what a run measures, recorded with it
SETTINGS_PREFIXES = ("VDIT_", "TRITON_", "TORCHINDUCTOR_", "TORCH_CUDA_ARCH_LIST", "CUDA_VISIBLE_DEVICES")


def environment(device: str, lim: dict, head_to_head: bool = False) -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001  (absent or broken: just record it)
            return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:  # noqa: BLE001
        commit, dirty = None, None
    import vdit_kernels
    env = {
        "device": device, "gpu": gpu_name(), "torch": torch.__version__, "triton": version("triton"),
        "cuda": torch.version.cuda, "vdit_kernels": vdit_kernels.__version__, "git_commit": commit,
        "git_dirty": dirty, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "host": platform.node(), "limits": lim,
        "performance_result": device == "cuda",
        "timing_method": timing.METHOD, "head_to_head": head_to_head,
        # (e.g. VDIT_ATTN_BWD=split: a forced variant, not what a default call runs)
        "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith(SETTINGS_PREFIXES)},
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(sm=f"{p.major}{p.minor}", sm_count=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1))
    return env


class Progress:
    """tqdm over the cases, or plain lines when tqdm is missing."""

    def __init__(self, total: int):
        self.bar = None
        try:
            if not sys.stderr.isatty():
                raise ImportError("not a terminal: plain progress lines")
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="case", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            self.bar = None
        self.total, self.done = total, 0

    def step(self, text: str):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(text[:60], refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {text}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_case(case, device: str, quick: bool, lim: dict) -> dict:
    wl = case.workload
    row = {"op": case.op, "name": case.name, "mode": case.mode, "workload": wl.name, "tokens": wl.num_tokens,
           "videos": len(wl.shapes), "shapes": [list(s) for s in wl.shapes], "heads": wl.heads,
           "head_dim": wl.head_dim, "hidden": wl.hidden, "provider": case.provider, "note": case.note,
           "flops": case.flops, "bytes": case.bytes}
    try:
        prepared = case.build()
        t = bench(prepared.fn, device, quick=quick, grad_to_none=prepared.grad_to_none)
        row.update(t)
        row.update(prepared.extra)
        sec = t["median_ms"] * 1e-3
        row["tokens_per_s"] = wl.num_tokens / sec
        if case.flops and case.bytes:  # a GEMM the bytes may bound: the roofline is its limit
            row["tflops"] = case.flops / sec / 1e12
            compute_s = case.flops / (lim["compute_tflops"] * 1e12)
            memory_s = case.bytes / (lim["bandwidth_gbs"] * 1e9)
            row["pct_of_limit"] = 100 * max(compute_s, memory_s) / sec
            row["limit"] = "roofline: " + ("memory" if memory_s > compute_s else "compute")
        elif case.flops:
            row["tflops"] = case.flops / sec / 1e12
            row["pct_of_limit"] = 100 * row["tflops"] / lim["compute_tflops"]
            row["limit"] = "compute"
        elif case.bytes:
            row["gbs"] = case.bytes / sec / 1e9
            row["pct_of_limit"] = 100 * row["gbs"] / lim["bandwidth_gbs"]
            row["limit"] = "bandwidth"
        del prepared
        roofline = bool(case.bytes and case.flops and row["limit"] == "roofline: memory")
        if case.breakdown or roofline:
            # which kernels take the device time of a row that asks (case.breakdown: no
            # bytes, so one set of inputs, an attention backward's being GBs) or of a GEMM
            # the bytes bound (patch embedding); as device_ms, not GB/s (FLOPs count too)
            measured = kernel_ms(case.build, case.bytes or 1e12, device, quick=quick)
            row.update({k: v for k, v in measured.items() if k in ("kernel_breakdown", "kernel_note")})
            if measured.get("kernel_ms"):
                row["device_ms"] = measured["kernel_ms"]
            if roofline and case.provider.startswith("vdit-"):  # median_ms far above device_ms: whose host time
                # 50 calls: a forward+backward launches ~10 kernels, and 200 of them would
                # fill CUDA's launch queue, making the loop wait for the GPU
                row.update(host_ms(case.build, device, calls=50))
        elif case.bytes and not case.flops and case.mode == "fwd":
            row.update(kernel_ms(case.build, case.bytes, device, quick=quick))
            if case.provider.startswith("vdit-"):
                row.update(host_ms(case.build, device))
            if row.get("kernel_ms"):
                row["kernel_gbs"] = case.bytes / (row["kernel_ms"] * 1e-3) / 1e9
                # device time against device time (limits.py); the timed copy's rate where
                # the profiler could not time the large copy
                row["kernel_pct_of_limit"] = 100 * row["kernel_gbs"] / (lim.get("bandwidth_device_gbs")
                                                                         or lim["bandwidth_gbs"])
                copy_ms = copy_kernel_ms(case.bytes, device, quick=quick)
                if copy_ms:  # the same bytes copied: what the GPU does with a kernel this size
                    row["copy_kernel_ms"] = copy_ms
                    row["kernel_pct_of_copy"] = 100 * copy_ms / row["kernel_ms"]
    except Exception as exc:  # noqa: BLE001  (one failing provider must not end the run)
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if device == "cuda":
            try:
                torch.cuda.synchronize()
            except RuntimeError as sticky:  # a sticky CUDA error: later cases cannot run either
                row["error"] += f" (CUDA context lost: {sticky})"
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def kernel_breakdown(rows: list[dict]) -> list[str]:
    """One line per row the profiler broke down: where a memory-bound op's device time goes."""
    return [f"{r['name']} {r['mode']} {r['provider']} ({r['workload']}): "
            + ", ".join(f"{name} {us:.1f} us" for name, us in r["kernel_breakdown"])
            for r in rows if r.get("kernel_breakdown")]


def _quartiles_us(r: dict) -> str:
    """A row's timed samples and their host issue times, p25 / median / p75 in us, where the
    timer recorded both: samples near their issue time were bound by the host."""
    if not (r.get("issue_ms") and "p25_ms" in r):
        return ""
    timed = "/".join(f"{r[k] * 1e3:.0f}" for k in ("p25_ms", "median_ms", "p75_ms"))
    issued = "/".join(f"{ms * 1e3:.0f}" for ms in r["issue_ms"])
    return f"; samples {timed} us (p25/median/p75), issued by the host in {issued} us"


def host_breakdown(rows: list[dict]) -> list[str]:
    """One line per row whose host time was measured: the layers a small op's call pays for."""
    return [f"{r['name']} {r['mode']} {r['provider']} ({r['workload']}): host {r['host_ms'] * 1e3:.1f} us "
            f"a call (device {(r.get('kernel_ms') or r.get('device_ms') or 0) * 1e3:.1f} us); "
            + ", ".join(f"{name} {us:.1f} us" for name, us in r.get("host_profile", [])) + _quartiles_us(r)
            for r in rows if r.get("host_ms")]


class Stopped(BaseException):
    """SIGTERM (`timeout` at a step's time cap): stop timing and write what ran. A
    BaseException, so run_case's per-case `except Exception` does not record it as a
    failing case and go on."""


def _stop(signum, frame):
    # the next SIGTERMs are ignored until main has written the results: `timeout` signals
    # the command and then its process group, so a second SIGTERM follows the first at once
    # (on an H100 it stopped the writing of 40 rows, 2026-11-27); main restores the handler
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Stopped(f"signal {signum}")


def add_speedups(rows: list[dict]) -> None:
    groups: dict = {}
    for r in rows:
        if "median_ms" in r:
            groups.setdefault((r["op"], r["name"], r["mode"], r["workload"]), {})[r["provider"]] = r
    for key, by_provider in groups.items():
        base = next((p for p in BASELINES.get(key[0], ()) if p in by_provider), None)
        for r in by_provider.values():
            r["baseline"] = base
            r["speedup"] = by_provider[base]["median_ms"] / r["median_ms"] if base else None


# patch_embed's backends: "cuda" (our gather around PyTorch's GEMMs, autograd in C++; the
# default on a GPU) and "triton" (the fused GEMMs or the same gemm variant, measured choice)
EMBED_OURS = ("vdit-cuda", "vdit-triton")

# The issues' performance targets, judged on the rows of a run: (what, op, name, mode, ours:
# the providers whose fastest row counts, the peer, ours / peer speed at least: None = a
# reported ratio without a target). The Triton backward is judged by our own kernels
# (+split, +atomic-dq): "auto" may pick PyTorch's FlashAttention-2 backward, the peer's own.
TARGETS = [
    ("patchify >= 3x the reference", "patch", "patchify", "fwd", ("vdit-cuda", "vdit-triton"), "vdit-reference", 3.0),
    ("unpatchify >= 3x the reference", "patch", "unpatchify", "fwd", ("vdit-cuda", "vdit-triton"),
     "vdit-reference", 3.0),
    ("RoPE >= 3x the reference", "rope", "rope_3d", "fwd", ("vdit-cuda", "vdit-triton"), "vdit-reference", 3.0),
    ("RoPE >= the compiled reference", "rope", "rope_3d", "fwd", ("vdit-cuda", "vdit-triton"),
     "reference-compile", 1.0),
    ("RoPE >= flash-attn's Triton rotary", "rope", "rope_3d", "fwd", ("vdit-cuda", "vdit-triton"),
     "flash-attn-rotary", 1.0),
    ("RoPE >= Liger's rope", "rope", "rope_3d", "fwd", ("vdit-cuda", "vdit-triton"), "liger-rope", 1.0),
    # liger rotates in place: ours in place too, the like-for-like match
    ("RoPE in place >= Liger's rope (in place)", "rope", "rope_3d", "fwd", ("vdit-cuda+inplace", "vdit-triton+inplace"),
     "liger-rope", 1.0),
] + [
    # the cuda backend's other RoPE kernels, forced: ratios without a target, against
    # Liger's rope and against the default cuda kernel, which say whether the default is
    # the right one (the forced rows carry with_env's ~3 us a call, ~1% here: the
    # device-time column has none)
    (f"RoPE{where}, cuda {variant} kernel (forced) vs {name}", "rope", "rope_3d", "fwd",
     (f"vdit-cuda+{variant}{suffix}",), peer + (suffix if peer == "vdit-cuda" else ""), None)
    for variant in bench_rope.CUDA_FORCED_KERNELS for where, suffix in (("", ""), (" in place", "+inplace"))
    for name, peer in (("Liger's rope", "liger-rope"), ("the default cuda kernel", "vdit-cuda"))] + [
    (f"patch_embed {mode} >= 1.2x {peer}", "patch", "patch_embed", mode,
      # like for like: against the compiled peer, ours compiled (the same torch.compile
      # wrapper around each; ours called as it is beside it, a ratio without a target)
      tuple(p + "-compile" for p in EMBED_OURS) if peer.endswith("-compile") else EMBED_OURS,
      peer, 1.2)
     for mode in ("fwd", "fwd+bwd") for peer in ("permute-linear", "permute-linear-compile")] + [
    (f"patch_embed {mode} (ours eager) vs permute-linear-compile", "patch", "patch_embed", mode, EMBED_OURS,
     "permute-linear-compile", None) for mode in ("fwd", "fwd+bwd")] + [
    ("patch_embed vs nn.Conv3d", "patch", "patch_embed", "fwd", EMBED_OURS, "nn.Conv3d", None),
    ("attention fwd >= 1.3x varlen_attn", "attention", "varlen_attention", "fwd", ("vdit-triton",),
     "torch-varlen", 1.3),
    ("attention fwd >= flex_attention", "attention", "varlen_attention", "fwd", ("vdit-triton",),
     "flex-attention", 1.0),
    ("attention bwd (our kernels) >= 1.2x varlen_attn", "attention", "varlen_attention", "bwd",
     ("vdit-triton+split", "vdit-triton+atomic-dq", "vdit-triton+split+pointers", "vdit-triton+split+tma"),
     "torch-varlen", 1.2),
    ("attention bwd as run by default vs varlen_attn", "attention", "varlen_attention", "bwd", ("vdit-triton",),
     "torch-varlen", None),
    ("attention + fused RoPE <= 1.03x attention, fwd", "attention", "varlen_attention", "fwd",
     ("vdit-triton+rope",), "vdit-triton", 1 / 1.03),
    ("attention + fused RoPE <= 1.03x attention, fwd+bwd", "attention", "varlen_attention", "fwd+bwd",
     ("vdit-triton+rope",), "vdit-triton", 1 / 1.03),
    ("DiT block >= 1.5x padded PyTorch", "dit", "dit_block", "fwd+bwd", ("vdit-triton",), "torch-padded", 1.5),
    ("DiT block >= 1.2x compiled padded PyTorch", "dit", "dit_block", "fwd+bwd", ("vdit-triton",),
     "torch-padded-compile", 1.2),
    ("DiT block vs token-padded PyTorch", "dit", "dit_block", "fwd+bwd", ("vdit-triton",), "torch-padded-tokens",
     None),
    ("DiT block vs compiled token-padded PyTorch", "dit", "dit_block", "fwd+bwd", ("vdit-triton",),
     "torch-padded-tokens-compile", None),
]
# memory-bound ops: their kernels' own bandwidth, % of the copy bandwidth measured in the run
BANDWIDTH_TARGETS = [(name, op, ("vdit-cuda", "vdit-triton"), 80.0)
                     for op, name in (("patch", "patchify"), ("patch", "unpatchify"), ("rope", "rope_3d"))]


def bandwidth_target(name: str, pct: float) -> str:
    """The name of a BANDWIDTH_TARGETS entry's target."""
    return f"{name} kernels >= {pct:.0f}% of the copy bandwidth"


def target_names() -> list[str]:
    """Every target's name, in the order the tables list them."""
    return [t[0] for t in TARGETS] + [bandwidth_target(name, pct) for name, _, _, pct in BANDWIDTH_TARGETS]


# A target whose timed ratio lies within H2H_BAND of its threshold (either side), or whose
# rows' minimums judge it otherwise than their medians, is timed again head to head as
# soon as both its rows exist: our default provider's case and the
# peer's, built anew and timed in turns (timing.interleaved), so its verdict does not hang
# on two rows timed minutes apart (the H100 timed two rows of one backward kernel 2.8%
# apart, 2026-11-27, next to a 1.2x threshold). Calls over H2H_MAX_MS are left out.
H2H_BAND, H2H_BUDGET_MS, H2H_MAX_MS = 0.15, 3000.0, 1000.0


def head_to_head_on(device: str, quick: bool) -> bool:
    """Whether a run re-times its targets near their thresholds: full GPU runs only."""
    return device == "cuda" and not quick


def _judged(rows: list[dict]):
    """(target, workload, the target's providers, our rows among them in that order, peer
    row, threshold) of every TARGET these rows can judge."""
    timed = _timed_groups(rows)
    for what, op, name, mode, ours, peer, least in TARGETS:
        for (o, n, m, wl), by_provider in sorted(timed.items()):
            mine = [by_provider[p] for p in ours if p in by_provider]
            if (o, n, m) == (op, name, mode) and mine and peer in by_provider:
                yield what, wl, ours, mine, by_provider[peer], least


def _split_verdict(mine: dict, other: dict, least: float) -> bool:
    """Whether the rows' minimums judge the target otherwise than their medians: a row
    whose samples split in two, so that its verdict may hang on when it ran (on the H200,
    2026-11-28, three consecutive vdit-cuda forward rows had medians 1.6-2.1x their
    minimums, where the same route's later forward rows stayed within 1.1x)."""
    if not (mine.get("min_ms") and other.get("min_ms")):
        return False
    return (other["median_ms"] / mine["median_ms"] >= least) != (other["min_ms"] / mine["min_ms"] >= least)


def head_to_head_pairs(rows: list[dict]) -> list[tuple]:
    """(target, workload, our row, peer row) of every TARGET with a threshold whose timed
    ratio lies within H2H_BAND of it, or that its minimums judge otherwise than its
    medians (_split_verdict); our row is the first of the target's providers that ran
    (the default ahead of forced variants, as a user runs it), not the fastest."""
    pairs = []
    for what, wl, _, mine, other, least in _judged(rows):
        if not least or max(mine[0]["median_ms"], other["median_ms"]) > H2H_MAX_MS:
            continue
        ratio = other["median_ms"] / mine[0]["median_ms"] / least
        if abs(ratio - 1) <= H2H_BAND or _split_verdict(mine[0], other, least):
            pairs.append((what, wl, mine[0], other))
    return pairs


def run_head_to_heads(rows: list[dict], case_of: dict, device: str, done: list, partial: Path) -> None:
    """head_to_head for each pair of head_to_head_pairs(rows) not in `done` yet (appended
    there, printed and kept in `partial`); case_of: {id(row): its case}."""
    for what, wl, mine, other in head_to_head_pairs(rows):
        if any((h["target"], h["workload"], h["ours"], h["peer"]) == (what, wl, mine["provider"], other["provider"])
               for h in done):
            continue
        entry = head_to_head(what, mine, other, case_of, device)
        done.append(entry)
        print(f"head to head: {what} ({wl}): " + (entry.get("error") or
              f"{entry['ours']} {entry['ours_ms']:.3f} ms, {entry['peer']} {entry['peer_ms']:.3f} ms: "
              f"{entry['ratio']:.3f}x over {entry['rounds']} rounds"))
        with partial.open("a") as f:
            f.write(json.dumps({"head_to_head": entry}, default=str) + "\n")


def head_to_head(what: str, mine: dict, other: dict, cases: dict, device: str) -> dict:
    """Our row's case and the peer's timed in turns: their medians and the ratio."""
    entry = {"target": what, "workload": mine["workload"], "ours": mine["provider"], "peer": other["provider"]}
    try:
        built = {who: cases[id(row)].build() for who, row in (("ours", mine), ("peer", other))}
        samples = timing.interleaved({who: (p.fn, p.grad_to_none) for who, p in built.items()}, device,
                                     budget_ms=H2H_BUDGET_MS)
        del built
        ours_ms, peer_ms = (statistics.median(samples[w]) for w in ("ours", "peer"))
        entry.update(ours_ms=ours_ms, peer_ms=peer_ms, ratio=peer_ms / ours_ms, rounds=len(samples["ours"]))
    except Exception as exc:  # noqa: BLE001  (a failed re-timing is reported, the run goes on)
        entry["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return entry


def _device_ms(row: dict) -> Optional[float]:
    """A row's device time per call from the profiler (kernel_ms for a memory-bound op,
    device_ms for a broken-down one), or None where it was not measured."""
    return row.get("kernel_ms") or row.get("device_ms")


def _timed_groups(rows: list[dict]) -> dict:
    """{(op, name, mode, workload): {provider: row}} of the rows that were timed; a default
    row that ran a forced row's kernels (ran_as) also stands for that row."""
    timed: dict = {}
    for r in rows:
        if "median_ms" in r:
            by_provider = timed.setdefault((r["op"], r["name"], r["mode"], r["workload"]), {})
            by_provider[r["provider"]] = r
            if r.get("ran_as"):
                by_provider.setdefault(r["ran_as"], r)
    return timed


def verdicts(rows: list[dict], head_to_head: Optional[list] = None) -> list[dict]:
    """The TARGETS and BANDWIDTH_TARGETS these rows can judge, one dict each: target,
    workload, ours (the provider judged), value (ours / peer speed, or % of the copy
    bandwidth), unit ("x" or "%"), met (True, False, or None: a ratio without a target),
    h2h (the head-to-head ratio or None) and cells (target_table's columns after the
    first two)."""
    latest = {(h["target"], h["workload"]): h for h in head_to_head or ()}
    out = []
    # the device-time column: the same ratio from the kernels' device time alone
    # (profiler), where both rows measured it: a miss the timed calls show but the kernels
    # do not is host time or the timer's L2 state, not the kernels (timing.py). The last:
    # ours (the default provider) and the peer timed in turns, for a ratio near the
    # threshold (H2H_BAND)
    for what, wl, ours, mine, other, least in _judged(rows):
        best = min(mine, key=lambda r: r["median_ms"])
        ratio = other["median_ms"] / best["median_ms"]
        met = None if least is None else ratio >= least
        ran = f" (ran {best['ran_as'].split('+', 1)[1]})" if best.get("ran_as") in ours else ""
        mine_dev, peer_dev = _device_ms(best), _device_ms(other)
        dev = f"{peer_dev / mine_dev:.2f}x" if mine_dev and peer_dev else "-"
        h = latest.get((what, wl))
        h2h = "-" if h is None else (f"error: {h['error']}" if "error" in h else
                                     f"{h['ratio']:.3f}x ({h['ours']}, {h['rounds']} rounds)")
        out.append({"target": what, "workload": wl, "ours": best["provider"], "value": ratio, "unit": "x",
                    "met": met, "h2h": h.get("ratio") if h else None,
                    "cells": [f"{best['provider']}{ran} {best['median_ms']:.3f} ms",
                              f"{other['provider']} {other['median_ms']:.3f} ms", f"{ratio:.2f}x",
                              "-" if met is None else ("yes" if met else "NO"), dev, h2h]})
    timed = _timed_groups(rows)
    for name, op, ours, pct in BANDWIDTH_TARGETS:
        for (o, n, m, wl), by_provider in sorted(timed.items()):
            mine = [by_provider[p] for p in ours if p in by_provider and by_provider[p].get("kernel_pct_of_limit")]
            if (o, n, m) != (op, name, "fwd") or not mine:
                continue
            best = max(mine, key=lambda r: r["kernel_pct_of_limit"])
            # beside the verdict (against the large copy's bandwidth), a copy of the same
            # bytes: what the GPU reaches with a kernel this size (a 10 MB copy: half the rate)
            same = (f" (a copy of the same bytes {best['kernel_gbs'] * best['kernel_ms'] / best['copy_kernel_ms']:.0f}"
                    f" GB/s: ours {100 * best['copy_kernel_ms'] / best['kernel_ms']:.0f}% of it)"
                    if best.get("copy_kernel_ms") and best.get("kernel_ms") else "")
            met = best["kernel_pct_of_limit"] >= pct
            out.append({"target": bandwidth_target(name, pct), "workload": wl,
                        "ours": best["provider"], "value": best["kernel_pct_of_limit"], "unit": "%", "met": met,
                        "h2h": None,
                        "cells": [f"{best['provider']} {best['kernel_gbs']:.0f} GB/s",
                                  f"copy {best['kernel_gbs'] * 100 / best['kernel_pct_of_limit']:.0f} GB/s{same}",
                                  f"{best['kernel_pct_of_limit']:.0f}%", "yes" if met else "NO", "-", "-"]})
    return out


def target_table(rows: list[dict], head_to_head: Optional[list] = None) -> str:
    """The TARGETS and BANDWIDTH_TARGETS this run's rows can judge, per workload (verdicts)."""
    judged = verdicts(rows, head_to_head)
    if not judged:
        return "No target of the issues can be judged from the rows of this run."
    lines = ["| target | workload | ours | peer | ours / peer speed | met | device-time ratio | head to head |",
             "| --- | --- | --- | --- | ---: | --- | ---: | ---: |"]
    lines += [f"| {v['target']} | {v['workload']} | " + " | ".join(v["cells"]) + " |" for v in judged]
    return "\n".join(lines)


def add_attention_shares(rows: list[dict]) -> list[str]:
    """Share of a DiT step (dit suite, vdit-<b>) spent in self-attention: the attention
    suite's fwd+bwd time with fused RoPE (vdit-<b>+rope) on the same workload, where both
    ran. Sets row["attention_share"]; returns one line per share."""
    attn = {(r["workload"], r["provider"]): r["median_ms"] for r in rows
            if r["op"] == "attention" and r["mode"] == "fwd+bwd" and "median_ms" in r}
    lines = []
    for r in rows:
        key = (r["workload"], r["provider"].removesuffix("-compile") + "+rope")
        if r["op"] == "dit" and "median_ms" in r and key in attn:
            r["attention_share"] = attn[key] / r["median_ms"]
            lines.append(f"- {r['workload']} {r['provider']}: self-attention {attn[key]:.3f} ms of a "
                         f"{r['median_ms']:.3f} ms step = {100 * r['attention_share']:.0f}%")
    return lines


def backend_choice(rows: list[dict]) -> str:
    """Triton vs CUDA per op and workload, against vdit_kernels.backend.DEFAULT_ORDER (the
    table "auto" follows on a GPU): the evidence for, or against, each default."""
    from vdit_kernels.backend import DEFAULT_ORDER

    lines = ["| op | workload | mode | triton ms | cuda ms | faster | default first |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    timed: dict = {}
    for r in rows:
        if "median_ms" in r and r["provider"] in ("vdit-triton", "vdit-cuda"):
            timed.setdefault((r["op"], r["name"], r["mode"], r["workload"]), {})[r["provider"][5:]] = r["median_ms"]
    for (op, name, mode, wl), ms in sorted(timed.items()):
        if len(ms) < 2 or op not in DEFAULT_ORDER:
            continue
        faster = min(ms, key=ms.get)
        first = DEFAULT_ORDER[op][0]
        mark = "" if faster == first or abs(ms["triton"] / ms["cuda"] - 1) < 0.03 else " (differs)"
        lines.append(f"| {name} | {wl} | {mode} | {ms['triton']:.3f} | {ms['cuda']:.3f} | {faster} | {first}{mark} |")
    if len(lines) == 2:
        return "No op was timed with both the triton and the cuda backend in this run."
    return "\n".join(lines)


def _fmt_ms(r):
    return f"{r['median_ms']:.3f} ({r['min_ms']:.3f}/{r['max_ms']:.3f})"


def measured_variants() -> list[str]:
    """The variants and tiles the Triton backend picked by timing them in this run (or
    took from earlier runs' VDIT_TUNING_CACHE, which the line after them then names), and
    which GEMM path the cuda backend's patch_embed / linear_unpatchify forwards took."""
    from vdit_kernels import backend as _backend
    module = _backend.extension()
    gemm = ([f"cuda backend forward GEMMs: {module.linear_forward_info()}"]
            if module is not None and hasattr(module, "linear_forward_info") else [])
    try:
        from vdit_kernels.triton import VARIANT_TIMES, attention, patch, tuning_cache
    except ImportError:  # no Triton
        return gemm
    cache = tuning_cache.describe()
    return (attention.measured_choices() + patch.measured_choices()
            + [f"variants timed: {t}" for t in VARIANT_TIMES] + ([cache] if cache else []) + gemm)


def table(rows: list[dict], op: str) -> str:
    head = "| workload | op | mode | provider | median ms (min/max) | TFLOP/s or GB/s | % of limit | speedup |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["op"] != op:
            continue
        wl = f"{r['workload']} ({r['tokens']} tok)"
        if "error" in r:
            lines.append(f"| {wl} | {r['name']} | {r['mode']} | {r['provider']} | error: {r['error']} | | | |")
            continue
        thr, pct, sp = result_cells(r, detailed=True)
        lines.append(f"| {wl} | {r['name']} | {r['mode']} | {r['provider']} | {_fmt_ms(r)} | {thr} | {pct} | {sp} |")
    if len(lines) == 2:
        lines.append("| (no case ran for this op here: see the skipped lines) | | | | | | | |")
    return "\n".join(lines)


def plots(rows: list[dict], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed")
        return []
    made = []
    for op in sorted({r["op"] for r in rows}):
        for (name, mode) in sorted({(r["name"], r["mode"]) for r in rows if r["op"] == op}):
            sel = [r for r in rows if r["op"] == op and r["name"] == name and r["mode"] == mode
                   and r["workload"].startswith("sweep-") and "median_ms" in r and ("tflops" in r or "gbs" in r)]
            if len({r["tokens"] for r in sel}) < 2:
                continue
            fig, ax = plt.subplots(figsize=(7, 4.5))
            unit = "tflops" if "tflops" in sel[0] else "gbs"
            for prov in sorted({r["provider"] for r in sel}):
                pts = sorted((r["tokens"], r[unit]) for r in sel if r["provider"] == prov)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
            ax.set_xscale("log")
            ax.set_xlabel("sequence length (tokens, one video)")
            ax.set_ylabel("TFLOP/s" if unit == "tflops" else "GB/s")
            ax.set_title(f"{name} {mode} on {gpu_name()}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            path = out / f"plot_{op}_{slug(name)}_{slug(mode)}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=120)
            plt.close(fig)
            made.append(path.name)
    return made


def static_report(out: Path, sass: str = "all") -> str:
    """Runs benchmarks/static_report.py into out/static_report.{json,txt} (and its _cuda /
    _small_gpus JSON); returns a line: kernels compiled and problems found, or why it failed.
    sass: its --sass (the test suite's run: "checked")."""
    # a silent subprocess of minutes otherwise (every kernel and candidate compiled for sm_90a)
    print("static report: compiling every Triton kernel for sm_90a (a few minutes, up to 10; "
          "--no-static skips it) ...", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.static_report", "--json",
                               str(out / "static_report.json"), "--sass", sass], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "static report: timed out after 600 s"
    (out / "static_report.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode not in (0, 1) or not (out / "static_report.json").exists():
        return f"static report failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-300:]}"
    problems = [l for l in proc.stdout.splitlines() if l.startswith("PROBLEM")]
    n = len(json.loads((out / "static_report.json").read_text()))
    return f"static report: {n} kernels compiled for sm_90a, {len(problems)} problems -> static_report.json"


def write_results(out: Path, rows: list[dict], env: dict, ops: list[str], *, stopped: Optional[str], seen: set,
                  variants: list[str], static: bool, quick: Optional[bool], argv: list,
                  head_to_head: Optional[list] = None) -> list[dict]:
    """Prints the tables of finished `rows` and writes summary.md, results.json and the plots
    (and static_report.json if `static`) into `out`; returns the rows that failed. `env`
    is environment()'s record of the run, `seen` its skipped (op, provider, reason),
    `head_to_head` its re-timings of targets near their thresholds."""
    device, lim = env["device"], env["limits"]
    add_speedups(rows)
    shares = add_attention_shares(rows)
    md = []
    if device == "cpu":
        md.append(f"**{limits.CPU_LABEL.upper()}**\n")
    if stopped:
        md.append(f"**Cut short: {stopped}.**\n")
    settings = ", ".join(f"{k}={v}" for k, v in (env.get("settings") or {}).items())
    md.append(f"Device: {env['gpu']}, torch {env['torch']}, triton {env['triton']}, commit "
              f"{(env['git_commit'] or '?')[:12]}{' (dirty)' if env['git_dirty'] else ''}, {env['date']}, "
              f"timing method {env.get('timing_method', 'before 2026-11-28 (not recorded)')}"
              f"{'; settings: ' + settings if settings else ''}.  \n"
              f"Limits measured in this run: copy {lim['bandwidth_gbs']:.1f} GB/s"
              + (f" (device time alone {lim['bandwidth_device_gbs']:.1f} GB/s: the kernels' % of it)"
                 if lim.get("bandwidth_device_gbs") else "") + ", "
              f"{lim['matmul_dtype']} matmul {lim['compute_tflops']:.2f} TFLOP/s ({lim['label']}).\n")
    for op in ops:
        t = table(rows, op)
        if op == "dit" and shares:
            t += "\n\nShare of the step in self-attention (attention suite, same workload):\n" + "\n".join(shares)
        print(f"\n== {op} ==" + ("   (CPU smoke test, not a performance result)" if device == "cpu" else ""))
        print(t)
        md += [f"\n## {op}\n", t]
    targets = target_table(rows, head_to_head)
    print("\n== the issues' targets (ours / peer speed, this run) ==\n" + targets)
    md += ["\n## The issues' targets\n",
           "Judged on the timed calls (median ms, ours: the fastest of the target's providers). "
           "Device-time ratio: the same from the kernels' own device time (profiler), where both "
           "rows measured it. " + (
               f"Head to head: for a ratio within {H2H_BAND:.0%} of its threshold, our default provider "
               "and the peer built anew and timed in turns (ratio of their medians).\n"
               if env.get("head_to_head") else
               "Head to head: not run in this run (a full GPU run re-times targets near their threshold; "
               "runs before 2026-11-28 did not record whether they did).\n"),
           targets]
    choice = backend_choice(rows)
    print("\n== backend choice (triton vs cuda; DEFAULT_ORDER in vdit_kernels/backend.py) ==")
    print(choice)
    md += ["\n## Backend choice: triton vs cuda\n", choice]
    breakdown = kernel_breakdown(rows) + host_breakdown(rows)
    if breakdown:
        title = ("Device time per call by kernel (profiler; the 6 longest), and our calls' host "
                 "time to issue one call by Python function (cProfile; the 8 largest)")
        print(f"\n== {title} ==\n" + "\n".join(breakdown))
        md += [f"\n## {title}\n"] + [f"- {b}" for b in breakdown]
    if variants:
        title = "Triton variants and tiles picked by measurement (the vdit-triton rows), GEMM paths"
        print(f"\n== {title} ==\n" + "\n".join(variants))
        md += [f"\n## {title}\n"] + [f"- {v}" for v in variants]
    if seen:
        md.append("\n## Skipped\n")
        md += [f"- [{op}] {p}: {r}" for op, p, r in sorted(seen)]
    made = plots(rows, out)
    report = None
    if static:
        report = static_report(out)
        print(report)
        md.append(f"\n{report}\n")
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps(
        {"environment": env, "rows": rows, "skipped": [dict(op=o, provider=p, reason=r) for o, p, r in sorted(seen)],
         "plots": made, "static_report": report, "triton_variants": variants, "quick": quick,
         "stopped": stopped, "argv": argv, "head_to_head": head_to_head or []},
        indent=1, default=str))
    return [r for r in rows if "error" in r]


def rebuild(partial: Path, out: Path, argv: list) -> int:
    """results.json and summary.md from a run's rows.partial.jsonl: a run killed before it
    wrote them (SIGKILL at a lease's end) keeps its finished rows there."""
    if not partial.is_file():
        raise SystemExit(f"{partial}: no such file (a run writes rows.partial.jsonl into its --out folder)")
    text = partial.read_text().splitlines()
    lines = []
    for number, line in enumerate(text, 1):
        if not line.strip():
            continue
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(text):  # a run killed while writing its last line: the others stand
                print(f"{partial}:{number}: left out, cut off ({exc.msg}): the run was killed while writing it")
                continue
            raise SystemExit(f"{partial}:{number}: not a JSON line ({exc.msg}); the file is damaged") from exc
    if not lines or "environment" not in lines[0]:
        raise SystemExit(f"{partial}: not a rows.partial.jsonl (its first line is the run's environment)")
    env = lines[0]["environment"]
    rows = [line for line in lines[1:] if "head_to_head" not in line]
    h2h = [line["head_to_head"] for line in lines[1:] if "head_to_head" in line]
    stopped = (f"rebuilt from {partial.name} ({len(rows)} cases): the run ended before it wrote its results; "
               "the Triton variants it measured and the providers it skipped are not in that file")
    out.mkdir(parents=True, exist_ok=True)
    errors = write_results(out, rows, env, list(dict.fromkeys(r["op"] for r in rows)), stopped=stopped, seen=set(),
                           variants=[], static=False, quick=None, argv=argv, head_to_head=h2h)
    print(f"\n{len(rows)} cases, {len(errors)} errors, from {partial}; results in {out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small workloads, short timing")
    parser.add_argument("--op", action="append", choices=sorted(SUITES), help="op suite (repeatable; default all)")
    parser.add_argument("--provider", action="append", help="only providers whose name contains this (repeatable)")
    parser.add_argument("--workload", action="append",
                        help=f"workload name (repeatable): {', '.join(workloads.WORKLOADS)}, sweep-<T>")
    parser.add_argument("--out", help="results directory (default: benchmarks/results/<gpu>/ on GPU, a temp dir on CPU)")
    parser.add_argument("--no-static", action="store_true", help="skip the static (sm_90a) report")
    parser.add_argument("--cpu-peers", action="store_true", help="on CPU also run the eager peers (code check only)")
    parser.add_argument("--from-partial", metavar="JSONL",
                        help="time nothing: write results.json and summary.md from the rows.partial.jsonl of a run "
                             "killed before it wrote them (the file or its folder), into --out (default: that "
                             "file's folder)")
    args = parser.parse_args(argv)
    if args.from_partial:
        partial = Path(args.from_partial)
        if partial.is_dir():  # the run's folder: its rows.partial.jsonl
            partial = partial / "rows.partial.jsonl"
        return rebuild(partial, Path(args.out) if args.out else partial.parent,
                       sys.argv[1:] if argv is None else argv)
    OPTIONS["cpu_peers"] = args.cpu_peers
    started = time.perf_counter()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # every workload shape recompiles the torch.compile'd peers: allow that instead of
    # silently falling back to eager after 8 shapes
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
    if args.workload:
        wls = []
        for name in args.workload:
            if name in workloads.WORKLOADS:
                wls.append(workloads.WORKLOADS[name])
            elif re.fullmatch(r"sweep-0*[1-9]\d*", name):
                wls.extend(workloads.sweep([int(name.split("-")[1])]))
            else:
                parser.error(f"unknown workload {name!r}; choose from {', '.join(workloads.WORKLOADS)} or sweep-<T> "
                             "(T >= 1 frames)")
    else:
        wls = workloads.select(device, args.quick)
    if device == "cpu":
        print(BANNER)
    lim = limits.measure(device, args.quick)
    print(f"device: {gpu_name()} | torch {torch.__version__} | limits measured now: "
          f"copy {lim['bandwidth_gbs']:.1f} GB/s (read+write), {lim['matmul_dtype']} matmul "
          f"{lim['compute_tflops']:.2f} TFLOP/s" + (f"  [{limits.CPU_LABEL}]" if device == "cpu" else ""))
    print("workloads: " + "; ".join(w.label() for w in wls))

    ops = args.op or list(SUITES)
    all_cases, skips = [], []
    for op in ops:
        # the seq-length sweep (for the plots) is an attention sweep unless asked for by name
        op_wls = wls if args.workload or op == "attention" else [w for w in wls if not w.name.startswith("sweep-")]
        c, s = SUITES[op].cases(device, args.quick, op_wls, args.provider)
        all_cases += c
        skips += s
    matched_skips = [x for x in skips if not args.provider or any(p in x.provider for p in args.provider)]
    if not all_cases and not matched_skips:  # a filter that matches nothing: a typo, not an empty run
        parser.error(f"no benchmark case matches --provider {' --provider '.join(args.provider or [])} "
                     f"for --op {', '.join(ops)} on the workloads {', '.join(w.name for w in wls)}")
    names = {c.provider for c in all_cases} | {x.provider for x in skips}
    unmatched = [p for p in args.provider or () if not any(p in name for name in names)]
    if unmatched:  # one typo among several filters: said, not silently dropped
        every = set()
        for op in ops:
            built, skipped = SUITES[op].cases(device, args.quick, wls, None)
            every |= {c.provider for c in built} | {x.provider for x in skipped}
        parser.error(f"--provider {', '.join(map(repr, unmatched))} matches no provider of --op {', '.join(ops)}; "
                     f"they are: {', '.join(sorted(every))}")
    seen = set()
    grouped: dict = {}
    for s in skips:
        seen.add((s.op, s.provider, s.reason))
        base, _, detail = s.provider.partition(" ")
        details = grouped.setdefault((s.op, base, s.reason), [])
        if detail and detail not in details:
            details.append(detail)
    for (op, base, reason), details in grouped.items():
        print(f"skipped: [{op}] {base}{' (' + ', '.join(details) + ')' if details else ''}: {reason}")

    # the results folder is made once the arguments are known good: a run refused above
    # leaves no empty vdit-bench-cpu-* folder behind
    if args.out:
        out = Path(args.out)
    elif device == "cuda":
        out = ROOT / "benchmarks" / "results" / slug(gpu_name())
    else:
        out = Path(tempfile.mkdtemp(prefix="vdit-bench-cpu-"))
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(len(all_cases))
    rows = []
    # one JSON line per finished case: a run cut short (a GPU lease ending) keeps its rows
    partial = out / "rows.partial.jsonl"
    h2h_on = head_to_head_on(device, args.quick)
    # recorded once, before any case: the settings are what the run was started with (by
    # the end, torch.compile has added its own TRITON_* variables to os.environ; on the
    # H200 --from-partial's results then differed from the run's own, 2026-11-28)
    run_env = environment(device, lim, h2h_on)
    partial.write_text(json.dumps({"environment": run_env}, default=str) + "\n")
    stopped = None
    h2h, case_of = [], {}
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        for case in all_cases:
            rows.append(run_case(case, device, args.quick, lim))
            case_of[id(rows[-1])] = case
            with partial.open("a") as f:
                f.write(json.dumps(rows[-1], default=str) + "\n")
            progress.step(f"{case.op}/{case.name} {case.mode} {case.provider} {case.workload.name}")
            if h2h_on:
                run_head_to_heads(rows, case_of, device, h2h, partial)
    except Stopped as why:
        stopped = f"stopped by {why} after {len(rows)} of {len(all_cases)} cases"
        print(f"\n{stopped}: writing the results of those")
    finally:
        if stopped is None:
            signal.signal(signal.SIGTERM, previous)
    progress.close()
    errors = write_results(out, rows, run_env, ops, stopped=stopped, seen=seen,
                           variants=measured_variants(), static=not (args.no_static or stopped),
                           quick=args.quick, argv=sys.argv[1:] if argv is None else argv, head_to_head=h2h)
    print(f"\n{len(rows)} cases, {len(errors)} errors, {time.perf_counter() - started:.1f} s; results in {out}")
    for r in errors:
        print(f"ERROR: [{r['op']}] {r['name']} {r['mode']} {r['provider']} {r['workload']}: {r['error']}")
    if device == "cpu":
        print("(CPU smoke test: not a performance result)")
    # a peer failing is reported; a vdit provider failing fails the run
    if stopped:
        signal.signal(signal.SIGTERM, previous)  # (ignored since the first one: _stop)
        return 124  # as `timeout` reports a command it stopped
    return 1 if any(r["provider"].startswith("vdit-") for r in errors) else 0


if __name__ == "__main__":
    sys.exit(main())
