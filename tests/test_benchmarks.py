"""The benchmark suite: the main command runs end to end, the FLOP formulas, the peers' math."""
import builtins
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import flops

ROOT = Path(__file__).resolve().parent.parent


def test_attention_flops_hand_computed():
    # pack of two videos, 3 and 5 tokens, 2 heads of dim 4: 4 * (3*3 + 5*5) * 2 * 4 = 1088
    assert flops.attention_flops([3, 5], [3, 5], heads=2, head_dim=4) == 1088
    # cross attention: 3 queries x 7 keys + 5 x 1
    assert flops.attention_flops([3, 5], [7, 1], heads=1, head_dim=8) == 4 * (21 + 5) * 8
    assert flops.attention_flops([3, 5], [3, 5], 2, 4, "bwd") == 2.5 * 1088
    assert flops.attention_flops([3, 5], [3, 5], 2, 4, "fwd+bwd") == 3.5 * 1088
    # wan2.1-480p: one video of 21*30*52 tokens, 12 heads x 128
    assert flops.attention_flops([32760], [32760], 12, 128) == 4 * 32760 ** 2 * 12 * 128
    with pytest.raises(ValueError, match="mode must be one of .* got 'causal'"):
        flops.attention_flops([1], [1], 1, 1, "causal")


def test_speedups_are_against_the_first_baseline_that_ran():
    import benchmarks.run as run

    row = lambda provider, **ms: dict(op="rope", name="rope_3d", mode="fwd", workload="w", provider=provider, **ms)
    rows = [row("vdit-triton", median_ms=1.0), row("reference-compile", median_ms=2.0),
            row("vdit-reference", median_ms=4.0), row("liger-rope")]  # (the last failed: no time)
    run.add_speedups(rows)
    assert [(r.get("baseline"), r.get("speedup")) for r in rows] == [
        ("vdit-reference", 4.0), ("vdit-reference", 2.0), ("vdit-reference", 1.0), (None, None)]
    rows = rows[:2]  # without the reference: the next baseline
    run.add_speedups(rows)
    assert [r["speedup"] for r in rows] == [2.0, 1.0] and rows[0]["baseline"] == "reference-compile"


def test_other_formulas():
    assert flops.patch_embed_flops(10, 64, 3072) == 2 * 10 * 64 * 3072
    # read latents (10 x 64) and weight (3072 x 64), write the output (10 x 3072), bf16
    assert flops.patch_embed_bytes(10, 64, 3072, 2) == (640 + 3072 * 64 + 10 * 3072) * 2
    # fwd+bwd: also the output gradient once, latents and weight again, their gradients
    assert flops.patch_embed_bytes(10, 64, 3072, 2, "fwd+bwd") == \
        (640 + 3072 * 64 + 10 * 3072) * 2 + (10 * 3072 + 2 * (640 + 3072 * 64)) * 2
    with pytest.raises(ValueError, match="mode must be fwd or fwd\\+bwd, got 'bwd'"):
        flops.patch_embed_bytes(10, 64, 3072, 2, "bwd")
    # the output layer: read x (10 x 3072) and weight (64 x 3072), write the videos (10 x 64);
    # fwd+bwd: the videos' gradient once, x and weight again, their gradients
    assert flops.linear_unpatchify_bytes(10, 64, 3072, 2) == (10 * 3072 + 3072 * 64 + 640) * 2
    assert flops.linear_unpatchify_bytes(10, 64, 3072, 2, "fwd+bwd") == \
        (10 * 3072 + 3072 * 64 + 640) * 2 + (640 + 2 * (10 * 3072 + 3072 * 64)) * 2
    with pytest.raises(ValueError, match="mode must be fwd or fwd\\+bwd, got 'bwd'"):
        flops.linear_unpatchify_bytes(10, 64, 3072, 2, "bwd")
    assert flops.patchify_bytes(10, 64, 2) == 2 * 10 * 64 * 2
    assert flops.rope_bytes(10, 4, 2, 8, 2, position_bytes=0) == 2 * 10 * 6 * 8 * 2
    assert flops.rope_bytes(10, 4, 2, 8, 2) == 2 * 10 * 6 * 8 * 2 + 10 * 3 * 4  # + float32 (N, 3) positions


def test_timing_summary_reports_the_quartiles():
    from benchmarks.timing import _summary

    # half the samples twice as slow: the quartiles show the split the median hides
    t = _summary([2.0, 1.0, 2.0, 1.0, 1.0, 2.0, 1.0, 2.0], "cuda-events")
    assert (t["median_ms"], t["min_ms"], t["max_ms"], t["p25_ms"], t["p75_ms"], t["reps"]) == (1.5, 1.0, 2.0, 1.0,
                                                                                              2.0, 8)
    assert _summary([3.0], "perf_counter") == {"median_ms": 3.0, "min_ms": 3.0, "max_ms": 3.0, "p25_ms": 3.0,
                                               "p75_ms": 3.0, "reps": 1, "timer": "perf_counter"}
    # interpolated: four samples' p75 is not their max
    t = _summary([1.0, 2.0, 3.0, 4.0], "cuda-events")
    assert (t["p25_ms"], t["p75_ms"]) == (1.75, 3.25)


def test_peers_compute_the_same_thing():
    """The peer implementations benchmarked against vdit compute the same results (CPU, float32)."""
    import torch.nn.functional as F

    import vdit_kernels as vk
    from benchmarks import bench_attention, bench_patch
    from benchmarks.workloads import WORKLOADS

    wl = WORKLOADS["cpu-tiny"]
    x = bench_patch._Inputs(wl, "cpu")
    ref_tokens = vk.patchify(x.videos, x.pack, backend="reference")
    torch.testing.assert_close(bench_patch._patchify_torch(x.videos, wl.patch), ref_tokens)
    for a, b in zip(bench_patch._unpatchify_torch(x.tokens, wl.shapes, wl.patch, wl.channels),
                    vk.unpatchify(x.tokens, x.pack, wl.channels, backend="reference")):
        torch.testing.assert_close(a, b)
    ref_embed = vk.patch_embed(x.videos, x.pack, x.weight, x.bias, backend="reference")
    torch.testing.assert_close(bench_patch._conv3d(x.videos, x.weight, x.bias, wl.patch), ref_embed,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bench_patch._permute_linear(x.videos, x.weight.reshape(wl.hidden, -1), x.bias,
                                                           wl.patch), ref_embed, atol=1e-4, rtol=1e-4)
    ref_videos = vk.linear_unpatchify(x.x, x.pack, x.out_weight, x.out_bias + 0.5, wl.channels, backend="reference")
    peer_videos = bench_patch._linear_permute(x.x, x.out_weight, x.out_bias + 0.5, wl.shapes, wl.patch, wl.channels)
    assert len(peer_videos) == len(ref_videos) == len(wl.shapes)
    for a, b in zip(peer_videos, ref_videos):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    a = bench_attention._Inputs(wl, "cpu", False)
    lens = wl.seqlens
    ref_out = vk.varlen_attention(a.q, a.k, a.v, a.cu, a.cu, a.max, a.max, backend="reference")
    q, k, v = (bench_attention._padded(t, lens, max(lens)) for t in (a.q, a.k, a.v))
    valid = torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None]
    padded = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :]).transpose(1, 2)
    # float32 sums in another order: 1.6e-5 apart on the H200 machine's CPU (2026-11-28)
    torch.testing.assert_close(padded[valid], ref_out, atol=1e-4, rtol=1e-4)


def test_main_command_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["VDIT_ATTN_BWD"] = "split"
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--no-static", "--out", str(tmp_path),
           "--op", "patch", "--op", "rope", "--op", "attention"]
    if torch.cuda.is_available():  # keep it short on a GPU too: one small video, vdit providers
        cmd += ["--workload", "sweep-1", "--provider", "vdit-"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "NOT A PERFORMANCE RESULT" in proc.stdout
    assert "skipped:" in proc.stdout  # peers that cannot run say why
    data = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "summary.md").exists()
    env_info = data["environment"]
    for key in ("gpu", "torch", "triton", "git_commit", "date", "limits", "timing_method", "settings"):
        assert key in env_info
    # what changes a measurement is recorded with it (a forced variant is not the default)
    assert env_info["settings"].get("VDIT_ATTN_BWD") == "split" and env_info["head_to_head"] is False
    summary = (tmp_path / "summary.md").read_text()
    assert "settings: " in summary and "VDIT_ATTN_BWD=split" in summary and "Head to head: not run" in summary
    assert env_info["limits"]["bandwidth_gbs"] > 0 and env_info["limits"]["compute_tflops"] > 0
    rows = data["rows"]
    assert {r["op"] for r in rows} >= {"patch", "rope", "attention"}
    assert {r["mode"] for r in rows if r["op"] == "attention"} >= {"fwd", "bwd", "fwd+bwd"}
    for r in rows:
        assert "error" not in r, r
        assert r["provider"] and r["median_ms"] > 0
        assert ("tflops" in r) or ("gbs" in r), r
        assert r["pct_of_limit"] > 0
    attn = next(r for r in rows if r["op"] == "attention" and r["mode"] == "fwd")
    assert attn["flops"] == flops.attention_flops(_seqlens(attn), _seqlens(attn), attn["heads"], attn["head_dim"])


def _seqlens(row):
    return [t * h * w // 4 for t, h, w in row["shapes"]]  # patch (1, 2, 2)


def test_cases_build_their_own_workload():
    """Each case's build() uses its own workload, not the last one of the loop."""
    from benchmarks import bench_attention, bench_patch, bench_rope
    from benchmarks.workloads import WORKLOADS, Workload

    small = Workload("tiny-2", "test", ((1, 4, 4), (2, 4, 6)), 4, (1, 2, 2), 48, 2, 24)
    wls = [WORKLOADS["cpu-tiny"], small]
    for suite in (bench_patch, bench_rope, bench_attention):
        cases, _ = suite.cases("cpu", True, wls, ["vdit-reference"])
        for case in cases:
            if case.name in ("patchify", "patch_embed", "rope_3d", "varlen_attention") and case.mode == "fwd":
                out = case.build().fn()
                out = out[0] if isinstance(out, tuple) else out
                assert out.shape[0] == case.workload.num_tokens, (case.provider, case.name, case.workload.name)


def test_backend_choice_table_flags_a_default_that_lost():
    from benchmarks.run import backend_choice
    from vdit_kernels.backend import DEFAULT_ORDER

    first, other = DEFAULT_ORDER["rope"][0], [b for b in ("triton", "cuda") if b != DEFAULT_ORDER["rope"][0]][0]
    rows = [dict(op="rope", name="rope_3d", mode="fwd", workload="w", provider=f"vdit-{first}", median_ms=2.0),
            dict(op="rope", name="rope_3d", mode="fwd", workload="w", provider=f"vdit-{other}", median_ms=1.0),
            dict(op="patch", name="patchify", mode="fwd", workload="w", provider="vdit-triton", median_ms=1.0)]
    table = backend_choice(rows)
    assert f"| {other} | {first} (differs) |" in table
    assert "patchify" not in table  # timed with one backend only: no evidence either way
    rows[1]["median_ms"] = 3.0
    assert "(differs)" not in backend_choice(rows)


def test_dit_suite_packed_and_padded_steps_run_and_count_flops(monkeypatch):
    # the DiT suite's providers run one forward+backward step each (tiny, CPU), and the
    # FLOP count is the hand sum of the real tokens' matmuls and attention
    from benchmarks import bench_dit
    from benchmarks.common import OPTIONS
    from benchmarks.workloads import WORKLOADS

    monkeypatch.setitem(OPTIONS, "cpu_peers", True)  # the padded peers run on CPU too
    wl = WORKLOADS["cpu-tiny"]
    cases, _ = bench_dit.cases("cpu", True, [wl], ["vdit-reference", "torch-padded"])
    providers = {c.provider for c in cases}
    assert {"vdit-reference", "torch-padded", "torch-padded-compile", "torch-padded-tokens"} <= providers
    compiles = []
    for case in cases:
        if case.provider.endswith("-compile"):
            # compiling costs CI minutes (the eager padded paths are the same functions); the
            # call is checked: static shapes, as every suite (a second workload otherwise
            # recompiled the shared lambda with symbolic shapes, a slower peer)
            with monkeypatch.context() as m:
                m.setattr(torch, "compile", lambda fn, **kw: compiles.append(kw) or fn)
                case.build()
            continue
        prepared = case.build()
        prepared.fn()
        grads = [t.grad for t in prepared.grad_to_none]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), case.provider
    assert compiles and all(kw.get("dynamic") is False for kw in compiles), compiles

    cfg = bench_dit._config(wl, "cpu")
    n, h, f, m, s = wl.num_tokens, cfg.hidden, cfg.patch_features, cfg.mlp_hidden, 8 * len(wl.shapes)
    lens = wl.seqlens
    matmul = 2 * (n * f * h + 4 * n * h * h + 2 * n * h * h + 3 * s * h * h + 2 * n * h * m + n * h * f)
    text_in = 2 * s * cfg.text_dim * h  # the text needs no gradient: forward + weight gradient
    attn = 3.5 * 4 * cfg.heads * cfg.head_dim * (sum(x * x for x in lens) + sum(8 * x for x in lens))
    assert cases[0].flops == pytest.approx(3 * matmul + 2 * text_in + attn)


def test_with_env_sets_options_per_call_and_restores(monkeypatch):
    import os

    from benchmarks.common import Prepared, with_env

    monkeypatch.delenv("VDIT_ATTN_BWD", raising=False)
    seen = []
    case = with_env(Prepared(lambda: seen.append(os.environ.get("VDIT_ATTN_BWD"))), VDIT_ATTN_BWD="atomic-dq")
    case.fn()
    assert seen == ["atomic-dq"] and "VDIT_ATTN_BWD" not in os.environ
    monkeypatch.setenv("VDIT_ATTN_BWD", "split")
    case.fn()
    assert seen[-1] == "atomic-dq" and os.environ["VDIT_ATTN_BWD"] == "split"


def test_device_time_sums_the_gpu_activities_only():
    from types import SimpleNamespace

    from benchmarks.run import kernel_breakdown
    from benchmarks.timing import copy_kernel_ms, device_activities, kernel_ms

    events = [SimpleNamespace(key="_wgrad_kernel", device_type="DeviceType.CUDA", self_device_time_total=120.0),
              SimpleNamespace(key="_scatter_gemm_kernel", device_type="DeviceType.CUDA", self_device_time_total=30.5),
              SimpleNamespace(key="_wgrad_kernel", device_type="DeviceType.CUDA", self_device_time_total=1.5),
              SimpleNamespace(key="aten::mm", device_type="DeviceType.CPU", self_device_time_total=999.0)]
    prof = SimpleNamespace(key_averages=lambda: events)
    assert sum(device_activities(prof).values()) == 152.0
    assert device_activities(prof) == {"_wgrad_kernel": 121.5, "_scatter_gemm_kernel": 30.5}
    row = dict(name="patch_embed", mode="fwd+bwd", provider="vdit-triton", workload="w",
               kernel_breakdown=[("_wgrad_kernel", 121.5), ("_scatter_gemm_kernel", 30.5)])
    assert kernel_breakdown([row, dict(row, kernel_breakdown=None)]) == [
        "patch_embed fwd+bwd vdit-triton (w): _wgrad_kernel 121.5 us, _scatter_gemm_kernel 30.5 us"]
    from benchmarks.run import host_breakdown
    from benchmarks.timing import host_ms

    assert host_ms(lambda: None, "cpu") == {}
    row = dict(row, host_ms=0.0421, kernel_ms=0.005, host_profile=[("patch.py:331(_launch)", 6.25)])
    assert host_breakdown([row, dict(row, host_ms=None)]) == [
        "patch_embed fwd+bwd vdit-triton (w): host 42.1 us a call (device 5.0 us); patch.py:331(_launch) 6.2 us"]
    assert kernel_ms(lambda: None, 1e6, "cpu") == {"kernel_note": "GPU only"}
    assert copy_kernel_ms(1e6, "cpu") is None


def test_host_time_names_the_functions_a_call_spends_it_in(monkeypatch):
    # the GPU path's logic on CPU: synchronize made a no-op, a call whose time is one function's
    from types import SimpleNamespace

    from benchmarks.timing import host_ms

    def spends_time():
        return sum(i * i for i in range(2000))

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    out = host_ms(lambda: SimpleNamespace(fn=spends_time), "cuda", calls=20)
    assert out["host_ms"] > 0 and len(out["host_profile"]) <= 8
    names = [name for name, _ in out["host_profile"]]
    assert any("genexpr" in n for n in names), names
    assert all(us >= 0 for _, us in out["host_profile"])


def test_kernel_time_writes_each_call_to_another_place(monkeypatch):
    # the GPU path's logic on CPU (a fake profiler, an L2 of 1 MB): a call's result stays
    # alive until its input set is called again, so consecutive calls write to different
    # blocks, as the copies measured beside them do (a result freed at once handed the
    # next call the same block, whose lines could still sit in L2)
    import weakref
    from types import SimpleNamespace

    import torch.profiler as tp

    from benchmarks import timing

    live = weakref.WeakSet()
    alive_at_each_call = []

    class Result:
        pass

    def build():
        def fn():
            alive_at_each_call.append(len(live))
            r = Result()
            live.add(r)
            return r
        return SimpleNamespace(fn=fn)

    class Profile:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return [SimpleNamespace(key="kernel", device_type="DeviceType.CUDA", self_device_time_total=100.0)]

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: SimpleNamespace(L2_cache_size=1 << 20))
    monkeypatch.setattr(tp, "profile", Profile)
    out = timing.kernel_ms(build, 0.5e6, "cuda", quick=True)
    copies = out["kernel_copies"]
    assert copies == 5 and out["kernel_ms"] > 0  # 2 MB of L2 twice over, in 0.5 MB calls
    # from the first timed call on, the other copies' results are alive while a call writes
    assert min(alive_at_each_call[copies:]) == copies


def test_memory_bound_rows_show_the_kernels_against_both_copies():
    from benchmarks.run import table

    row = dict(op="patch", name="patchify", mode="fwd", workload="w", tokens=10, provider="vdit-cuda",
               median_ms=0.02, min_ms=0.02, max_ms=0.03, gbs=500.0, pct_of_limit=16.7, kernel_ms=0.008,
               kernel_gbs=1250.0, kernel_pct_of_limit=41.7, copy_kernel_ms=0.006, kernel_pct_of_copy=75.0)
    line = table([row], "patch").splitlines()[-1]
    assert "kernels 0.008 ms = 1250 GB/s" in line and "kernels 41.7%, 75% of a same-size copy" in line


def test_gemm_bound_by_bytes_is_judged_against_the_roofline(monkeypatch):
    # patch_embed (K = 64) at the mixed pack's size: 16.3 GFLOP and 260 MB; with 693 TFLOP/s
    # and 3000 GB/s the bytes take 86.8 us, the FLOPs 23.5 us: the limit is the memory roofline
    import benchmarks.run as run
    from benchmarks.common import Case, Prepared
    from benchmarks.workloads import WORKLOADS

    monkeypatch.setattr(run, "bench", lambda fn, device, quick, grad_to_none=None:
                        dict(median_ms=0.1, min_ms=0.1, max_ms=0.1))
    lim = {"compute_tflops": 693.0, "bandwidth_gbs": 3000.0}
    f, b = flops.patch_embed_flops(41430, 64, 3072), flops.patch_embed_bytes(41430, 64, 3072, 2)
    case = Case("patch", "patch_embed", "fwd", WORKLOADS["cpu-tiny"], "p", lambda: Prepared(lambda: None),
                flops=f, bytes=b)
    row = run.run_case(case, "cpu", True, lim)
    assert row["limit"] == "roofline: memory"
    assert row["tflops"] == pytest.approx(f / 1e-4 / 1e12)
    assert row["pct_of_limit"] == pytest.approx(100 * (b / 3000e9) / 1e-4)
    assert "(roofline: memory)" in run.table([row], "patch").splitlines()[-1]
    # FLOPs alone: the matmul limit, as before
    row = run.run_case(Case("patch", "patch_embed", "fwd", WORKLOADS["cpu-tiny"], "p",
                            lambda: Prepared(lambda: None), flops=f), "cpu", True, lim)
    assert row["limit"] == "compute" and row["pct_of_limit"] == pytest.approx(100 * row["tflops"] / 693.0)


def test_attention_backward_rows_force_each_read_and_are_profiled(monkeypatch):
    # the split backward with each read forced; those and the default bwd row ask run.py
    # for a kernel breakdown (kernel_ms on one set of inputs), recorded as device_ms
    import benchmarks.run as run
    from benchmarks import bench_attention
    from benchmarks.common import Case, Prepared
    from benchmarks.workloads import WORKLOADS

    from benchmarks import common

    wl = WORKLOADS["cpu-tiny"]
    monkeypatch.setitem(common.OPTIONS, "cpu_peers", True)  # the Triton rows on CPU (interpreter)
    cases, _ = bench_attention.cases("cuda" if torch.cuda.is_available() else "cpu", False, [wl])
    bwd = {c.provider: c for c in cases if c.mode == "bwd"}
    assert {"vdit-triton+split+pointers", "vdit-triton+split+tma"} <= set(bwd)
    # order: comparison rows, then the variants a capped lease needs first, in that order
    order = [(c.mode, c.provider) for c in cases]
    variants = [i for i, (_, p) in enumerate(order) if "+" in p]
    assert variants == list(range(variants[0], len(order)))
    first = [order.index(v) for v in bench_attention.FIRST_VARIANTS if v in order]
    assert first == variants[:len(first)] and len(first) >= 4
    assert all(bwd[p].breakdown for p in bench_attention.BREAKDOWN)
    assert not bwd["vdit-triton+split"].breakdown and not any(c.breakdown for c in cases if c.mode != "bwd")
    # the default row says which strategy "auto" ran, once it has run
    from vdit_kernels.triton.attention import LAST_BACKWARD

    default = bwd["vdit-triton"].build()
    assert "ran_as" not in default.extra
    default.fn()
    if LAST_BACKWARD["strategy"] == "torch-fa2":  # (a GPU's measured choice may pick the peer's kernel)
        assert "ran_as" not in default.extra
    else:
        assert LAST_BACKWARD["strategy"] in ("split", "atomic-dq")
        assert default.extra["ran_as"] == f"vdit-triton+{LAST_BACKWARD['strategy']}"
    forced = []
    monkeypatch.setattr(bench_attention, "with_env", lambda prepared, **env: forced.append(env) or prepared)
    bwd["vdit-triton+split+tma"].build()
    assert forced == [{"VDIT_ATTN_BWD": "split", "VDIT_ATTN_BWD_READ": "tma"}]
    # the deterministic row's calls ask for deterministic=True (and nothing forced)
    calls = []
    real = bench_attention.vk.varlen_attention
    monkeypatch.setattr(bench_attention.vk, "varlen_attention",
                        lambda *a, **kw: calls.append(kw.get("deterministic")) or real(*a, **kw))
    bwd["vdit-triton+deterministic"].build().fn()
    assert calls and all(calls) and len(forced) == 1

    monkeypatch.setattr(run, "bench", lambda fn, device, quick, grad_to_none=None:
                        dict(median_ms=1.0, min_ms=1.0, max_ms=1.0))
    asked = []
    monkeypatch.setattr(run, "kernel_ms", lambda build, nbytes, device, quick=False:
                        asked.append(nbytes) or {"kernel_ms": 0.9, "kernel_breakdown": [("k", 900.0)]})
    lim = {"compute_tflops": 700.0, "bandwidth_gbs": 3000.0}
    row = run.run_case(Case("attention", "varlen_attention", "bwd", wl, "p", lambda: Prepared(lambda: None),
                            flops=1e9, breakdown=True), "cpu", True, lim)
    assert row["device_ms"] == 0.9 and row["kernel_breakdown"] == [("k", 900.0)] and asked == [1e12]
    row = run.run_case(Case("attention", "varlen_attention", "bwd", wl, "p", lambda: Prepared(lambda: None),
                            flops=1e9), "cpu", True, lim)
    assert "device_ms" not in row and len(asked) == 1


def test_rope_in_place_rows_rotate_in_place_and_meet_liger_like_for_like(monkeypatch):
    # liger's rope rotates in place: ours in place is its like-for-like match (the Triton
    # rows under the interpreter here; the CUDA ones on a GPU)
    import benchmarks.run as run
    from benchmarks import bench_rope, common
    from benchmarks.workloads import WORKLOADS

    wl = WORKLOADS["cpu-tiny"]
    monkeypatch.setitem(common.OPTIONS, "cpu_peers", True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases, _ = bench_rope.cases(device, True, [wl], ["vdit-triton"])
    by = {c.provider: c for c in cases}
    assert set(by) == {"vdit-triton", "vdit-triton+inplace"}
    out_q, out_k = by["vdit-triton"].build().fn()
    inplace = by["vdit-triton+inplace"].build()
    q, k = inplace.fn()
    q0, k0 = bench_rope._Inputs(wl, device).q, bench_rope._Inputs(wl, device).k
    assert not torch.equal(q, q0) and torch.equal(q, out_q) and torch.equal(k, out_k)
    assert q.data_ptr() == inplace.fn()[0].data_ptr()  # the same buffer, rotated again

    row = lambda provider, ms: dict(op="rope", name="rope_3d", mode="fwd", workload="w",  # noqa: E731
                                    provider=provider, median_ms=ms)
    judged = {line.split(" | ")[0].lstrip("| "): line for line in run.target_table(
        [row("vdit-cuda", 0.36), row("vdit-cuda+inplace", 0.35), row("liger-rope", 0.353)]).splitlines()[2:]}
    assert "| NO |" in judged["RoPE >= Liger's rope"]
    assert "vdit-cuda+inplace 0.350 ms" in judged["RoPE in place >= Liger's rope (in place)"]
    assert "| yes |" in judged["RoPE in place >= Liger's rope (in place)"]


def test_error_probe_reports_each_case():
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "benchmarks.error_probe", "--no-gdb"], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "[torch error path]  exit 1" in out and "RuntimeError" in out
    assert "[vdit_C, CPU tensor]" in out and "CXX11 ABI" in out


def test_error_probe_prints_the_native_stack_of_a_crash(tmp_path):
    import subprocess
    import sys

    from benchmarks.error_probe import _backtrace_preload

    lib = _backtrace_preload(str(tmp_path))
    if lib is None:
        pytest.skip("no C compiler to build the LD_PRELOAD library")
    proc = subprocess.run([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "LD_PRELOAD": lib})
    assert proc.returncode == -11 and "[native] SIGSEGV, stack:" in proc.stderr, proc.stderr[-2000:]
    assert "_ctypes" in proc.stderr and "libgcc_s" in proc.stderr  # frames, then the mapped libraries


def test_flash_attn_rotary_peer_computes_our_interleaved_rope():
    # the RoPE suite gives flash-attn's 1D rotary the concatenated per-axis angles: the same
    # rotation as interleaved 3D RoPE (its kernel needs CUDA; the module may come alone,
    # as scripts/fetch_gpu_wheels.sh fetches it)
    import importlib

    from benchmarks.bench_rope import FLASH_ROTARY_MODULES
    from benchmarks.common import has_module

    import vdit_kernels as vk
    from vdit_kernels import reference as ref

    module = next((m for m in FLASH_ROTARY_MODULES if has_module(m)), None)
    if module is None or not torch.cuda.is_available():
        pytest.skip("needs CUDA and flash-attn's Triton rotary module")
    apply_rotary = importlib.import_module(module).apply_rotary
    pack = vk.VideoPack.from_shapes([(3, 8, 10), (1, 6, 4)], (1, 2, 2), device="cuda")
    dims = (16, 24, 24)
    q = torch.randn(pack.num_tokens, 4, 64, device="cuda")
    positions = pack.positions.float()
    angles = ref.rope_angles(positions, dims, 10000.0)
    expected, _ = ref.apply_rope_3d(q, q, None, dims, positions=positions)
    got = apply_rotary(q[None], angles.cos(), angles.sin(), interleaved=True)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gpu_tests_run_first_on_a_gpu():
    # benchmarks/gpu_check.sh caps the tests of a short GPU lease: on a GPU, conftest puts
    # the GPU-only tests and the bfloat16 cases (what the CPU CI cannot run) first
    from types import SimpleNamespace

    from conftest import gpu_only, gpu_tests_first

    def item(name, gpu=False, dtype=None):
        it = SimpleNamespace(name=name, get_closest_marker=lambda m: object() if gpu and m == "gpu" else None)
        if dtype is not None:
            it.callspec = SimpleNamespace(params={"dtype": dtype, "d": 64})
        return it
    items = [item("a"), item("b", dtype=torch.float16), item("c", gpu=True), item("d", dtype=torch.bfloat16),
             item("e"), item("f", gpu=True, dtype=torch.float32)]
    gpu_tests_first(items)
    assert [it.name for it in items] == ["c", "d", "f", "a", "b", "e"]

    @gpu_only
    def marked():
        pass
    assert {m.name for m in marked.pytestmark} == {"gpu", "skipif"}


def test_every_gpu_only_test_is_marked_gpu():
    # a test skipped without a GPU but not marked "gpu" would run after what CPU CI covers,
    # and a lease's time cap would cut it (the realistic bf16 model test was such a one)
    import re

    # the same for the cuda backend as a parameter: a bare "cuda" in a parametrize list, or
    # a pytest.param naming it without the marker (use conftest.CUDA_BACKEND)
    unmarked = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.search(r"skipif\(.*(DEVICE\.type != .cuda.|not HAS_CUDA)", line):
                if "pytest.mark.gpu" not in line and "pytest.mark.gpu" not in lines[i - 1]:
                    unmarked.append(f"{path.name}:{i + 1}")
            param = " ".join(lines[i:i + 2])  # (a pytest.param may wrap onto a second line)
            if (re.search(r"parametrize\(.*\[.*[\"']cuda[\"']", line)
                    or re.search(r"pytest\.param\(.*[\"']cuda[\"']", line) and "pytest.mark.gpu" not in param):
                unmarked.append(f"{path.name}:{i + 1}")
    assert not unmarked, f"GPU-only tests without the gpu marker (use conftest.gpu_only): {unmarked}"


@pytest.fixture
def fake_gpu_timer(monkeypatch):
    """benchmarks.timing on a fake GPU: a clock that calls advance (fake.tick(ms)), CUDA
    events that read it, and the record of flushes, syncs, events (and what tests append)
    in fake.order."""
    import types

    import benchmarks.timing as T

    fake = types.SimpleNamespace(clock=0.0, order=[])

    def tick(ms):
        fake.clock += ms

    class Event:
        def __init__(self, enable_timing=True):
            self.t = None

        def record(self):
            self.t = fake.clock
            fake.order.append("event")

        def elapsed_time(self, other):
            return other.t - self.t

        def synchronize(self):
            pass

    class Flush:
        def zero_(self):
            fake.order.append("flush")

    fake.tick = tick
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: fake.order.append("sync"))
    monkeypatch.setattr(T, "_l2_flush_buffer", lambda: Flush())
    return fake


@pytest.mark.parametrize("call_ms,samples", [(2000.0, 3), (300.0, 5), (50.0, 5), (0.015625, 6400)])
def test_every_row_has_several_samples(fake_gpu_timer, call_ms, samples):
    # each call of fn advances the fake clock by call_ms
    import benchmarks.timing as T

    row = T.bench(lambda: fake_gpu_timer.tick(call_ms), "cuda")
    assert row["reps"] == samples and row["timer"] == "cuda-events"
    assert row["median_ms"] == pytest.approx(call_ms)


def test_samples_record_their_host_issue_time(fake_gpu_timer):
    # each GPU sample also records how long the host took to issue it (real time here: a
    # 2 ms sleep, where the fake GPU takes 50 ms); the summary prints both side by side
    import time

    import benchmarks.run as run
    import benchmarks.timing as T

    row = T.bench(lambda: (time.sleep(0.002), fake_gpu_timer.tick(50.0)), "cuda")
    p25, median, p75 = row["issue_ms"]
    assert 2.0 <= p25 <= median <= p75 < 50.0 and row["median_ms"] == pytest.approx(50.0)
    line = run.host_breakdown([dict(row, name="patchify", mode="fwd", provider="vdit-cuda", workload="w",
                                    host_ms=0.03, kernel_ms=0.008, issue_ms=[0.02, 0.025, 0.03])])[0]
    assert line.endswith("; samples 50000/50000/50000 us (p25/median/p75), issued by the host in 20/25/30 us")


def test_each_sample_starts_on_an_idle_gpu(fake_gpu_timer):
    # the flush before a sample must finish before its start event, or the host issues the
    # timed call while the GPU still clears the L2 and that host time goes untimed (a
    # host-bound patchify's median once sat between its device time and its host time)
    import benchmarks.timing as T

    order = fake_gpu_timer.order
    T.bench(lambda: (order.append("call"), fake_gpu_timer.tick(1.0)), "cuda", quick=True)
    timed = order[order.index("flush"):]  # after the warm-up and the estimate
    n = timed.count("flush")
    assert n >= T.MIN_REPS and timed == ["flush", "sync", "event", "call", "event"] * n + ["sync"], timed[:10]


def test_cli_filters_that_match_nothing_are_errors(capsys, monkeypatch, tmp_path):
    # a typo once printed "0 cases, 0 errors" (or empty tables) and exited 0
    import tempfile

    import benchmarks.readme_table as readme_table
    import benchmarks.run as run

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a CPU run's default --out goes
    for argv in (["--provider", "vdit-refrence", "--op", "rope", "--no-static"], ["--workload", "wan2.1"]):
        with pytest.raises(SystemExit) as stop:
            run.main(argv)
        assert stop.value.code == 2
    assert "no benchmark case matches --provider vdit-refrence" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # a refused run leaves no empty results folder
    with pytest.raises(SystemExit) as stop:
        readme_table.main(["--op", "atention"])
    assert stop.value.code == 2


def test_target_table_judges_the_issues_targets():
    import benchmarks.run as run

    row = lambda op, name, mode, provider, ms, **kw: dict(op=op, name=name, mode=mode, workload="w",  # noqa: E731
                                                          provider=provider, median_ms=ms, **kw)
    rows = [row("attention", "varlen_attention", "bwd", "vdit-triton+split", 100.0),
            row("attention", "varlen_attention", "bwd", "vdit-triton+atomic-dq", 90.0),
            row("attention", "varlen_attention", "bwd", "vdit-triton", 80.0),  # auto may be PyTorch's kernel
            row("attention", "varlen_attention", "bwd", "torch-varlen", 100.0),
            row("patch", "patchify", "fwd", "vdit-cuda", 0.05, kernel_gbs=2500.0, kernel_pct_of_limit=83.3,
                kernel_ms=0.04),
            row("patch", "patchify", "fwd", "vdit-reference", 0.2, kernel_ms=0.11),
            row("patch", "patch_embed", "fwd", "vdit-triton", 0.124),
            row("patch", "patch_embed", "fwd", "vdit-triton-compile", 0.09),
            row("patch", "patch_embed", "fwd", "permute-linear", 0.13),
            row("patch", "patch_embed", "fwd", "permute-linear-compile", 0.117)]
    lines = run.target_table(rows).splitlines()
    judged = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert "| 1.11x | NO |" in judged["attention bwd (our kernels) >= 1.2x varlen_attn"]  # +atomic-dq, not auto
    assert "| 1.25x | - |" in judged["attention bwd as run by default vs varlen_attn"]
    # a default row that ran our split kernels stands for +split where that row did not run
    alone = [row("attention", "varlen_attention", "bwd", "vdit-triton", 80.0, ran_as="vdit-triton+split"),
             row("attention", "varlen_attention", "bwd", "torch-varlen", 100.0)]
    line = run.target_table(alone).splitlines()[2]
    assert line.startswith("| attention bwd (our kernels) >= 1.2x varlen_attn |")
    assert "vdit-triton (ran split) 80.000 ms" in line and "| 1.25x | yes |" in line
    rows[2]["ran_as"] = "vdit-triton+split"  # the forced +split row (100 ms) still counts as itself
    judged = {line.split(" | ")[0].lstrip("| "): line for line in run.target_table(rows).splitlines()[2:]}
    assert "| 1.11x | NO |" in judged["attention bwd (our kernels) >= 1.2x varlen_attn"]
    # the last column: the kernels' device times (kernel_ms / device_ms), where both rows have one
    assert judged["patchify >= 3x the reference"].endswith("| 4.00x | yes | 2.75x | - |")
    assert judged["patch_embed fwd >= 1.2x permute-linear"].endswith("| - |")
    assert "| 83% | yes |" in judged["patchify kernels >= 80% of the copy bandwidth"]
    # with a copy of the same bytes timed, the row names its rate beside the large copy's
    next(r for r in rows if r["provider"] == "vdit-cuda" and r["name"] == "patchify")["copy_kernel_ms"] = 0.08
    judged = {line.split(" | ")[0].lstrip("| "): line for line in run.target_table(rows).splitlines()[2:]}
    assert ("| copy 3001 GB/s (a copy of the same bytes 1250 GB/s: ours 200% of it) | 83% | yes |"
            in judged["patchify kernels >= 80% of the copy bandwidth"])
    # ours compiled counts against the compiled peer only
    assert "vdit-triton 0.124 ms" in judged["patch_embed fwd >= 1.2x permute-linear"]
    assert "vdit-triton-compile 0.090 ms | permute-linear-compile 0.117 ms | 1.30x | yes |" in \
        judged["patch_embed fwd >= 1.2x permute-linear-compile"]
    # ours eager against the compiled peer: reported beside it, judged by nothing
    assert "vdit-triton 0.124 ms | permute-linear-compile 0.117 ms | 0.94x | - |" in \
        judged["patch_embed fwd (ours eager) vs permute-linear-compile"]
    # and never the target's row: an eager row faster than our compiled one does not count
    rows.append(row("patch", "patch_embed", "fwd", "vdit-cuda", 0.05))
    judged = {line.split(" | ")[0].lstrip("| "): line for line in run.target_table(rows).splitlines()[2:]}
    assert "| 1.30x | yes |" in judged["patch_embed fwd >= 1.2x permute-linear-compile"]
    assert run.target_table([]).startswith("No target")


def test_readme_targets_take_each_gpus_newest_verdict(tmp_path, capsys):
    # --targets: a row per target and workload, a column per GPU, each cell from that GPU's
    # newest result set that judges it (run.verdicts, the summaries' judgement); ratios
    # without a threshold and CPU smoke runs are left out
    import json

    import benchmarks.readme_table as readme_table

    def rope(provider, ms):
        return dict(op="rope", name="rope_3d", mode="fwd", workload="mixed-pack", provider=provider, median_ms=ms)

    def results(name, gpu, date, rows, head_to_head=(), performance=True):
        env = {"gpu": gpu, "date": date, "performance_result": performance}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"environment": env, "rows": rows, "head_to_head": list(head_to_head)}))

    h2h = {"target": "RoPE >= Liger's rope", "workload": "mixed-pack", "ours": "vdit-cuda", "ratio": 0.9, "rounds": 5}
    results("h200-old", "H200", "2026-11-28T04:00:00+00:00", [rope("vdit-cuda", 0.4), rope("liger-rope", 0.3)])
    results("h200-new", "H200", "2026-11-28T07:00:00+00:00", [rope("vdit-cuda", 0.3), rope("liger-rope", 0.33)],
            [h2h])
    results("h100", "H100", "2026-11-27T20:00:00+00:00",
            [rope("vdit-cuda", 0.5), rope("liger-rope", 0.4), rope("vdit-cuda+shared", 0.1)])
    results("cpu", "cpu", "2026-11-29T00:00:00+00:00", [rope("vdit-cuda", 0.1), rope("liger-rope", 1.0)],
            performance=False)
    assert readme_table.main(["--targets", "--results", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| target | workload | H100 | H200 |"
    assert lines[2] == "| RoPE >= Liger's rope | mixed-pack | 0.80x **no** | 1.10x yes (head to head 0.90x) |"
    assert len([x for x in lines if x.startswith("| RoPE")]) == 1  # the forced kernel's ratio has no threshold
    assert lines[-1] == "From H100: `h100`; H200: `h200-new`."


def test_readme_performance_section_is_generated(capsys):
    # "never typed by hand": the README holds readme_table's output for the committed
    # results, the tables and the targets at a glance, verbatim (a new result set committed
    # without regenerating them fails here)
    import benchmarks.readme_table as readme_table

    readme = (ROOT / "README.md").read_text()
    for argv in ([], ["--targets"]):
        readme_table.main(argv)
        out = capsys.readouterr().out.strip()
        assert out.startswith(("**", "| target")) and out in readme, f"README lacks readme_table {argv}'s output"


def test_head_to_head_pairs_are_the_targets_near_their_threshold():
    # within H2H_BAND (15%) of the threshold, either side; ours: the first of the target's
    # providers that ran (the default), not the fastest; no call over H2H_MAX_MS
    import benchmarks.run as run

    row = lambda provider, ms, **kw: dict(op="attention", name="varlen_attention", mode="bwd",  # noqa: E731
                                          workload="w", provider=provider, median_ms=ms, **kw)
    rows = [row("vdit-triton", 88.0, ran_as="vdit-triton+split"), row("torch-varlen", 105.5),
            row("vdit-triton+split+tma", 85.5)]
    pairs = run.head_to_head_pairs(rows)
    assert [(what, wl, mine["provider"], other["provider"]) for what, wl, mine, other in pairs] == \
        [("attention bwd (our kernels) >= 1.2x varlen_attn", "w", "vdit-triton", "torch-varlen")]
    assert run.head_to_head_pairs([row("vdit-triton", 70.0, ran_as="vdit-triton+split"),
                                   row("torch-varlen", 105.5)]) == []  # 1.51x: far above 1.2x
    assert len(run.head_to_head_pairs([row("vdit-triton", 100.0, ran_as="vdit-triton+split"),
                                       row("torch-varlen", 105.5)])) == 1  # 1.055x: 12% under
    assert run.head_to_head_pairs([row("vdit-triton", 1100.0, ran_as="vdit-triton+split"),
                                   row("torch-varlen", 1320.0)]) == []  # calls over a second
    entry = {"target": "attention bwd (our kernels) >= 1.2x varlen_attn", "workload": "w", "ours": "vdit-triton",
             "peer": "torch-varlen", "ours_ms": 86.0, "peer_ms": 105.0, "ratio": 105.0 / 86.0, "rounds": 15}
    line = run.target_table(rows, [entry]).splitlines()[2]
    assert line.endswith("| 1.23x | yes | - | 1.221x (vdit-triton, 15 rounds) |")


def test_head_to_head_pairs_include_verdicts_their_minimums_overturn():
    # far from the threshold by medians, but the rows' minimums judge the target otherwise
    # (our samples split in two): re-timed in turns too; agreeing minimums are not
    import benchmarks.run as run

    row = lambda provider, med, low: dict(op="patch", name="patchify", mode="fwd", workload="w",  # noqa: E731
                                          provider=provider, median_ms=med, min_ms=low)
    peer = row("vdit-reference", 0.107, 0.098)
    split = run.head_to_head_pairs([row("vdit-cuda", 0.058, 0.028), peer])  # 1.85x by medians, 3.5x by minimums
    assert [(what, mine["provider"], other["provider"]) for what, _, mine, other in split] == \
        [("patchify >= 3x the reference", "vdit-cuda", "vdit-reference")]
    assert run.head_to_head_pairs([row("vdit-cuda", 0.058, 0.050), peer]) == []  # 1.96x by minimums: both miss
    assert run.head_to_head_pairs([row("vdit-cuda", 0.020, 0.018), peer]) == []  # 5.4x: both meet
    assert run.head_to_head_pairs([dict(row("vdit-cuda", 0.058, 0.028), min_ms=None), peer]) == []  # no minimum


def test_head_to_head_runs_in_the_main_command(monkeypatch, tmp_path):
    # a target near its threshold is re-timed in turns as soon as both rows exist, and the
    # summary, results.json and --from-partial carry it (CPU: forced on, a test target)
    import benchmarks.run as run
    from benchmarks import timing

    monkeypatch.setattr(run, "head_to_head_on", lambda device, quick: True)
    monkeypatch.setattr(run, "H2H_BAND", 100.0)  # whatever the CPU times
    monkeypatch.setattr(run, "TARGETS", [("test: patchify >= the reference", "patch", "patchify", "fwd",
                                          ("vdit-reference",), "vdit-reference", 1.0)])
    orders = []
    real = timing.interleaved

    def interleaved(calls, device, **kw):
        orders.append(list(calls))
        return real(calls, device, **kw)
    monkeypatch.setattr(timing, "interleaved", interleaved)
    # one workload, the target's rows only: a GPU's --quick default is two workloads (two
    # head-to-heads, not one) of every provider
    assert run.main(["--quick", "--op", "patch", "--out", str(tmp_path), "--no-static",
                     "--workload", "cpu-tiny", "--provider", "vdit-reference"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    (entry,) = result["head_to_head"]
    assert orders == [["ours", "peer"]] and entry["rounds"] >= 5 and entry["ratio"] > 0
    assert f"{entry['ratio']:.3f}x (vdit-reference, {entry['rounds']} rounds) |" in \
        (tmp_path / "summary.md").read_text()
    rebuilt = tmp_path / "rebuilt"
    assert run.main(["--from-partial", str(tmp_path / "rows.partial.jsonl"), "--out", str(rebuilt)]) == 0
    again = json.loads((rebuilt / "results.json").read_text())
    assert again["head_to_head"] == result["head_to_head"] and again["rows"] == result["rows"]


def test_interleaved_samples_on_the_gpu_as_bench_does(fake_gpu_timer):
    # each sample: gradients reset, L2 flushed, idle GPU, events around the call; a fake
    # clock that slows every call by 5% more than the one before (a GPU heating up): the
    # ratio of the medians stays within a drift step of the true 1.5x
    import benchmarks.timing as T

    order, calls = fake_gpu_timer.order, [0]

    def call(ms):
        def run():
            calls[0] += 1
            fake_gpu_timer.tick(ms * (1 + 0.05 * calls[0]))
            order.append("call")
        return run
    leaf = torch.zeros(1, requires_grad=True)
    leaf.grad = torch.ones(1)
    samples = T.interleaved({"ours": (call(2.0), [leaf]), "peer": (call(3.0), None)}, "cuda", budget_ms=1e9,
                            max_rounds=8)
    assert leaf.grad is None and [len(v) for v in samples.values()] == [8, 8]
    assert order[2:] == ["flush", "sync", "event", "call", "event"] * 16
    ratio = statistics.median(samples["peer"]) / statistics.median(samples["ours"])
    assert ratio == pytest.approx(1.5, rel=0.005)  # (A B A B ...: 1.55)


def test_interleaved_alternates_the_order():
    # A B, B A, A B, ...: a drift over the run reaches both alike
    from benchmarks import timing

    calls = []
    fns = {name: ((lambda name=name: calls.append(name)), None) for name in ("a", "b")}
    samples = timing.interleaved(fns, "cpu", budget_ms=1e9, min_rounds=5, max_rounds=6)
    assert calls[:2] == ["a", "b"]  # the first calls (compilation, autotuning)
    assert calls[2:] == ["a", "b", "b", "a"] * 3 and [len(v) for v in samples.values()] == [6, 6]


def test_sigterm_writes_the_results_so_far(monkeypatch, tmp_path):
    # `timeout` at a GPU lease step's cap sends SIGTERM, to the command and then to its
    # process group: the rows that ran still reach results.json (which the README table
    # reads), marked as cut short, whatever SIGTERMs follow the first while they are written
    import os
    import signal

    import benchmarks.run as run

    real_case, real_speedups, calls, later = run.run_case, run.add_speedups, [], []

    def run_case(case, *args):
        calls.append(case.provider)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during the second case
        return real_case(case, *args)

    def print_then_signal(*args, **kwargs):  # the second SIGTERM, while the first is handled
        builtins.print(*args, **kwargs)
        if "writing the results" in str(args[0]):
            os.kill(os.getpid(), signal.SIGTERM)

    def add_speedups(rows):  # and a third one, while the results are written
        os.kill(os.getpid(), signal.SIGTERM)
        return real_speedups(rows)

    monkeypatch.setattr(run, "run_case", run_case)
    monkeypatch.setattr(run, "print", print_then_signal, raising=False)
    monkeypatch.setattr(run, "add_speedups", add_speedups)
    before = signal.signal(signal.SIGTERM, lambda signum, frame: later.append(signum))  # (not pytest's death)
    try:
        # cpu-tiny: on a GPU --quick would run two full-size workloads inside the test
        assert run.main(["--quick", "--op", "patch", "--workload", "cpu-tiny", "--out", str(tmp_path),
                         "--no-static"]) == 124
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
    result = json.loads((tmp_path / "results.json").read_text())
    assert len(calls) == 2 and len(result["rows"]) == 1 and "stopped by signal" in result["stopped"]
    assert "Cut short" in (tmp_path / "summary.md").read_text()
    assert not later and restored not in (run._stop, signal.SIG_IGN)  # the caller's handler is back


def test_from_partial_rebuilds_the_results_of_a_killed_run(monkeypatch, tmp_path):
    # a run killed before it wrote its results (SIGKILL) keeps its finished rows in
    # rows.partial.jsonl; --from-partial writes the same tables from them, timing nothing
    import benchmarks.run as run
    monkeypatch.setattr(run, "measured_variants", lambda: ["tiles this process measured"])
    # a case that sets a recorded variable, as torch.compile sets TRITON_CACHE_DIR on a GPU:
    # the results record the settings the run started with, as its partial rows do
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    run_case = run.run_case

    def run_case_that_sets_a_setting(*args, **kwargs):
        os.environ["TRITON_CACHE_DIR"] = str(tmp_path / "set-by-a-case")
        return run_case(*args, **kwargs)
    monkeypatch.setattr(run, "run_case", run_case_that_sets_a_setting)
    assert run.main(["--quick", "--op", "patch", "--workload", "cpu-tiny", "--out", str(tmp_path),
                     "--no-static"]) == 0
    monkeypatch.delenv("TRITON_CACHE_DIR")
    written = json.loads((tmp_path / "results.json").read_text())
    assert "TRITON_CACHE_DIR" not in written["environment"]["settings"]
    (tmp_path / "results.json").unlink()
    summary = (tmp_path / "summary.md").read_text()
    (tmp_path / "summary.md").unlink()
    rebuilt_dir = tmp_path / "rebuilt"
    assert run.main(["--from-partial", str(tmp_path / "rows.partial.jsonl"), "--out", str(rebuilt_dir)]) == 0
    rebuilt = json.loads((rebuilt_dir / "results.json").read_text())
    assert len(written["rows"]) > 3 and rebuilt["rows"] == written["rows"]
    assert rebuilt["environment"] == written["environment"]
    assert "rebuilt from rows.partial.jsonl" in rebuilt["stopped"]
    # (the op tables and the targets; not the Triton variants this process measured, which
    # earlier tests leave in a full run and the partial rows do not record)
    tables = summary[summary.index("## patch"):summary.index("## Backend choice")]
    assert "tiles this process measured" in summary
    assert tables in (rebuilt_dir / "summary.md").read_text()
    assert "tiles this process measured" not in (rebuilt_dir / "summary.md").read_text()
    (tmp_path / "bad.jsonl").write_text('{"op": "patch"}\n')
    with pytest.raises(SystemExit, match="not a rows.partial.jsonl"):
        run.main(["--from-partial", str(tmp_path / "bad.jsonl")])
    # a last line cut off by the kill is left out, the finished rows stand; the folder names
    # its file; a missing file or a damaged line inside is a one-line error
    partial = (tmp_path / "rows.partial.jsonl").read_text()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "rows.partial.jsonl").write_text(partial + '{"op": "patch", "name": "patchify", "med')
    assert run.main(["--from-partial", str(cut)]) == 0
    assert json.loads((cut / "results.json").read_text())["rows"] == written["rows"]
    with pytest.raises(SystemExit, match="no such file"):
        run.main(["--from-partial", str(tmp_path / "nowhere.jsonl")])
    (cut / "rows.partial.jsonl").write_text(partial.replace("\n", "\n{oops\n", 1))
    with pytest.raises(SystemExit, match=r"rows.partial.jsonl:2: not a JSON line"):
        run.main(["--from-partial", str(cut / "rows.partial.jsonl")])


def test_host_routes_runs_and_restores_the_routes(capsys):
    import vdit_kernels as vk
    from vdit_kernels import backend as B
    from vdit_kernels.ops import direct
    if B.extension() is None or not B.extension_has_cuda():
        pytest.skip("vdit_kernels._C was built without CUDA")
    from benchmarks import host_routes
    from vdit_kernels.cuda import patch as cuda_patch
    from vdit_kernels.cuda import rope as cuda_rope
    native, enabled = dict(direct._NATIVE), direct.ENABLED
    patched = (B.resolve, B._gpu_visible, cuda_patch.patchify, cuda_patch.unpatchify, cuda_rope.rope_3d,
               cuda_rope.rope_3d_)
    host_routes.main(["--calls", "10"])
    out = capsys.readouterr().out
    for route in ("c++ autograd", "c++ via torch.ops", "python autograd", "registered op", "permute+linear",
                  "patchify", "unpatchify", "patch_embed", "apply_rope_3d", "apply_rope_3d in place"):
        assert re.search(rf"^  {re.escape(route)} +[0-9.]+ us$", out, re.M), route
    assert direct._NATIVE == native and direct.ENABLED == enabled
    assert cuda_patch.AUTOGRAD["patch_embed"] is vk._C.direct_patch_embed
    # the faked GPU and stubbed ops are gone, and so is what the resolution cached under them
    assert (B.resolve, B._gpu_visible, cuda_patch.patchify, cuda_patch.unpatchify, cuda_rope.rope_3d,
            cuda_rope.rope_3d_) == patched
    if not torch.cuda.is_available():
        with pytest.raises(vk.BackendUnavailable, match="no CUDA GPU"):
            B.resolve("patch", torch.device("cuda"), "cuda", "patchify", torch.float32)


def test_profile_cases_runs_the_suites_cases_for_a_profiler(capsys):
    # benchmarks/profile_cases.py: the cases ncu profiled on the H200 (2026-11-28), run
    # untimed; on CPU the reference's (the GPU providers say why they are skipped)
    from benchmarks import profile_cases
    assert profile_cases.main(["--op", "rope", "--workload", "cpu-tiny", "--provider", "vdit-", "--calls", "2"]) == 0
    out = capsys.readouterr().out
    assert "ran vdit-reference/rope_3d fwd: 2 warm-up + 2 calls" in out
    if torch.cuda.is_available():
        assert "ran vdit-cuda+shared/rope_3d fwd" in out
    else:
        assert "skipped vdit-cuda+shared" in out
    assert profile_cases.main(["--op", "rope", "--workload", "cpu-tiny", "--provider", "no-such-provider"]) == 1


def test_command_line_mistakes_are_named(capsys, tmp_path):
    # a typo'd folder, a zero-frame sweep, no calls: argparse's one-line errors (exit 2),
    # not "no results yet", a run of failing cases, or a ZeroDivisionError
    import benchmarks.host_routes as host_routes
    import benchmarks.readme_table as readme_table
    import benchmarks.run as run

    for main, argv, message in ((readme_table.main, ["--results", str(tmp_path / "typo")], "no such folder"),
                                (run.main, ["--workload", "sweep-0"], "unknown workload 'sweep-0'"),
                                (host_routes.main, ["--calls", "0"], "must be a positive int, got 0"),
                                (run.main, ["--quick", "--op", "rope", "--no-static", "--out", str(tmp_path),
                                            "--provider", "vdit-reference", "--provider", "vdit-refrence"],
                                 "--provider 'vdit-refrence' matches no provider of --op rope; they are: ")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_kernel_and_host_timings_reset_gradients_between_calls(monkeypatch):
    # a fwd+bwd call repeated without resetting .grad adds into the last call's gradient,
    # an elementwise add per input the op does not run (173 of the H200's 426 us for
    # linear_unpatchify fwd+bwd). kernel_ms's and host_ms's own loops, on CPU: the CUDA
    # calls stubbed, the profiler recording CPU ops in place of GPU activities
    import types

    import torch.profiler as tp

    from benchmarks import bench_patch, timing
    from benchmarks.workloads import WORKLOADS

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(L2_cache_size=1 << 10))
    monkeypatch.setattr(tp.ProfilerActivity, "CUDA", tp.ProfilerActivity.CPU)
    monkeypatch.setattr(timing, "device_activities", lambda prof: {
        e.key: float(e.count) for e in prof.key_averages() if e.key in ("aten::add_", "aten::mm")})
    cases, _ = bench_patch.cases("cpu", True, [WORKLOADS["cpu-tiny"]])
    case = next(c for c in cases if (c.name, c.mode, c.provider) == ("linear_unpatchify", "fwd+bwd", "vdit-reference"))
    counts = dict(timing.kernel_ms(case.build, case.bytes, "cuda", quick=True)["kernel_breakdown"])
    assert counts.get("aten::mm", 0) > 0 and "aten::add_" not in counts
    # host_ms: every call starts from no gradient
    from benchmarks.common import Prepared

    t = torch.zeros(2, requires_grad=True)
    fresh = []

    def fn():
        fresh.append(t.grad is None)
        (2 * t).sum().backward()
    timing.host_ms(lambda: Prepared(fn, grad_to_none=[t]), "cuda", calls=3)
    assert len(fresh) == 5 + 3 + 3 and all(fresh)


def test_command_line_help_without_docstrings():
    # python -OO strips docstrings, which some parsers took their description from (an
    # AttributeError before --help printed anything)
    code = ("import contextlib, importlib, io\n"
            "for name in ('benchmarks.run', 'benchmarks.readme_table', 'benchmarks.host_routes',\n"
            "             'benchmarks.error_probe', 'benchmarks.static_report', 'benchmarks.profile_cases',\n"
            "             'vdit_kernels.model.demo'):\n"
            "    out = io.StringIO()\n"
            "    try:\n"
            "        with contextlib.redirect_stdout(out):\n"
            "            importlib.import_module(name).main(['--help'])\n"
            "    except SystemExit as stop:\n"
            "        assert stop.code == 0 and 'usage: python -m ' + name in out.getvalue(), (name, stop.code)\n")
    done = subprocess.run([sys.executable, "-OO", "-c", code], cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
