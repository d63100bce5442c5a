#!/usr/bin/env bash
# The ONE GPU script: build, run every test (GPU-only ones included), run the benchmarks.
#
# Usage (repository root, on a CUDA machine with torch, triton and nvcc preinstalled;
# no package registry needed):
#   bash benchmarks/gpu_check.sh                 # all three steps: build, test, bench
#   bash benchmarks/gpu_check.sh build           # pip install --no-build-isolation --no-deps -e .
#   bash benchmarks/gpu_check.sh test [-k rope]  # python -m pytest tests (args go to pytest)
#   bash benchmarks/gpu_check.sh bench [--quick] # python -m benchmarks.run (args go to run.py)
#   bash benchmarks/gpu_check.sh all --quick     # all steps, args go to run.py
#   bash benchmarks/gpu_check.sh lease           # one short device lease (about 9 minutes):
#       build (the error probe only with PROBE=1, without gdb); the tests (capped at
#       TEST_TIMEOUT, default 150 s; on a GPU the GPU-only tests and the bfloat16 cases,
#       what CPU CI cannot run, come first: conftest.gpu_tests_first);
#       patch ops and RoPE on the mixed pack into <results>-mem (MEM_TIMEOUT, default
#       180 s: its 53 cases took 155 s on the H200, 2026-11-28, and 4 forced RoPE rows came
#       since; the rows the targets judge first, so a cap cuts linear_unpatchify's and the
#       forced variants); our RoPE (and Liger's) and patch ops on the train-pack workload
#       (368k tokens) into <results>-mem-large (MEM_LARGE_TIMEOUT, default 140 s: RoPE's 9
#       rows in 33 s, then 21 of the patch suite's 31 cases in 65 s on the H200); attention on the mixed
#       pack, the vdit-triton rows and the peers the issue judges it by, torch-varlen and
#       flex-attention (ATTN_TIMEOUT, default 230 s: the first backward autotunes about 40
#       tiles, the first forward 11: 100 s of autotuning in all); the DiT block on
#       mixed-60k, Triton and padded PyTorch (grid- and token-padded, eager and compiled)
#       and the step's self-attention alone, into <results>-dit (DIT_TIMEOUT, default 240 s,
#       cut to what is left, skipped under DIT_MIN = 200 s: its first autotuning alone
#       takes about 100 s at 57k tokens). The suites list the comparison rows before the
#       variants, so a cap cuts variants first. Each step has its own cap, so a slow
#       one (first-call autotuning) cannot take the others' rows, cut to what LEASE_BUDGET
#       (default 550 s from the start) leaves; $OUT is refreshed after every step, so a
#       lease that ends mid-way still brings back what finished. LEASE_STEPS (default
#       "test mem mem-large attention dit", run in that order; "ncu", opt-in, runs after
#       mem-large: Nsight Compute on the RoPE and patch kernels, run_ncu) picks the steps after the build, for a short
#       second call (e.g. LEASE_STEPS=attention with VDIT_ATTN_BWD=split exported): its
#       rows still come back through $OUT, step by step. The bench steps share
#       VDIT_TUNING_CACHE=/tmp/vdit_tuning (TUNING_CACHE names another folder, 0 turns it
#       off): a later step or call on the same machine uses the tiles and variants an
#       earlier one timed (the summary's last variants line says which).
# Steps can run in separate calls (each stays under a 10-minute command limit); the
# build output stays in the working tree between them.
# Results: benchmarks/results/<gpu-slug>/ or $RESULTS_DIR (results.json, summary.md,
# static_report.json, plots) plus logs/ (build.log, pytest.log, bench.log). If $OUT is set (the device
# tool collects at most 8 files from it, 2 folder levels deep), it also receives:
#   $OUT/summary.md, $OUT/results.json, $OUT/rows.partial.jsonl, $OUT/<step>.log tails,
#   $OUT/gpu_check.tar.gz (everything).
# The build step also runs benchmarks/error_probe.py (logs/error_probe.log) unless PROBE=0.
# Optional peers: wheels in .whl/ (scripts/fetch_gpu_wheels.sh: liger-kernel, diffusers; and
# flash-attn's Triton rotary module as flash_attn_rotary.py)
# are installed into $PEER_SITE (default /tmp/vdit_peers) once per machine and put on
# PYTHONPATH for every step; without .whl/ those benchmark rows and tests are skipped.
# PYTHON picks the interpreter (default: python). TEST_TIMEOUT / BENCH_TIMEOUT (seconds,
# default none) cap the test and bench steps, so a short GPU lease still brings back the
# logs and the benchmark rows finished so far (rows.partial.jsonl). With pytest-xdist
# installed the tests run on TEST_WORKERS processes (default 8) sharing the GPU.
# Exit status: non-zero if a step failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
STEP=${1:-all}
[ $# -gt 0 ] && shift
SLUG=$($PY -c "import torch, re; n = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'; print(re.sub(r'[^a-z0-9]+', '-', n.lower()).strip('-'))")
RES=${RESULTS_DIR:-benchmarks/results/$SLUG}
LOGS=$RES/logs
mkdir -p "$LOGS"
status=0

if compgen -G ".whl/*.whl" > /dev/null; then
    PEER_SITE=${PEER_SITE:-/tmp/vdit_peers}
    if [ ! -f "$PEER_SITE/.installed" ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$PEER_SITE" .whl/*.whl && touch "$PEER_SITE/.installed" \
            || echo "gpu_check: installing the peer wheels in .whl failed; going on without them"
    fi
    cp .whl/*.py "$PEER_SITE/" 2>/dev/null || true  # single-module peers (flash_attn_rotary.py)
    export PYTHONPATH="$PEER_SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: peers from .whl on PYTHONPATH: $(ls .whl | tr '\n' ' ')"
fi
echo "gpu_check: step=$STEP gpu=$SLUG $($PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)')"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv > "$LOGS/nvidia-smi.txt" 2>&1 || true

run_build() {
    echo "== build: pip install --no-build-isolation --no-deps -e . (log: $LOGS/build.log)"
    local t0=$SECONDS
    # -v: the compiler command lines stay in the log (the segfault diagnosis compares them)
    if ! $PY -m pip install -v --no-build-isolation --no-deps -e . > "$LOGS/build.log" 2>&1; then
        echo "BUILD FAILED"; tail -40 "$LOGS/build.log"; status=1
        # the Triton and reference paths need no CUDA kernels: go on without them
        echo "== build again without the CUDA kernels (VDIT_SKIP_CUDA_BUILD=1)"
        VDIT_SKIP_CUDA_BUILD=1 $PY -m pip install --no-build-isolation --no-deps -e . >> "$LOGS/build.log" 2>&1 \
            || { echo "BUILD FAILED again"; tail -20 "$LOGS/build.log"; return 1; }
    fi
    echo "built in $((SECONDS - t0)) s" | tee -a "$LOGS/build.log"
    # what runs here and why not the rest (the _C build's toolkit and architectures among it);
    # the install check itself (--check) runs in the test step (tests/test_info.py)
    $PY -m vdit_kernels 2>&1 | tee "$LOGS/report.log" | tee -a "$LOGS/build.log"
    # how bad arguments reach Python here (a segfault on the torch 2.11 machine): toolchains,
    # child-process probes, a gdb backtrace if gdb exists; PROBE=0 skips it (the lease does:
    # tests/test_cuda_ext.py's bad-input test runs the same raising in a child process)
    if [ "${PROBE:-1}" = 1 ]; then
        timeout 150 $PY -m benchmarks.error_probe ${PROBE_ARGS:-} > "$LOGS/error_probe.log" 2>&1
        grep -A8 "^\[" "$LOGS/error_probe.log" | head -80
    fi
}

run_tests() {
    echo "== test: python -m pytest tests $* (log: $LOGS/pytest.log)"
    local par=()
    # -v with xdist: one line per finished test, so a run stopped at the time cap (whose
    # summary xdist loses to the interrupt) still shows what passed and what did not
    $PY -c "import xdist" 2>/dev/null && par=(-n "${TEST_WORKERS:-8}" -v)
    # SIGINT at the time cap: pytest then still prints the failures and the summary so far
    env -u TRITON_INTERPRET timeout -s INT -k 30 "${TEST_TIMEOUT:-0}" $PY -m pytest tests -q -p no:logging -rfEs \
        "${par[@]}" "$@" \
        > "$LOGS/pytest.log" 2>&1 || { rc=$?; status=1; echo "pytest failed or timed out (exit $rc; 124 = TEST_TIMEOUT)"; }
    tail -25 "$LOGS/pytest.log"
}

run_bench() {  # BENCH_OUT: the results folder (default $RES)
    local out=${BENCH_OUT:-$RES}
    mkdir -p "$out/logs"
    echo "== bench: python -m benchmarks.run --out $out $* (log: $out/logs/bench.log)"
    # the log also records each autotuning (candidates, time taken, the pick): first-call
    # autotuning is what a time cap cuts first
    # at the cap, SIGTERM: run.py writes results.json from the cases that ran (20 s grace)
    # VDIT_TUNING_CACHE: the steps and calls of a lease time each variant and tile once (a
    # second call re-timed the attention's for ~100 s, 2026-11-27); TUNING_CACHE=0: off
    env -u TRITON_INTERPRET PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1 VDIT_TUNING_CACHE="${TUNING_CACHE:-/tmp/vdit_tuning}" \
        timeout -k 20 "${BENCH_TIMEOUT:-0}" \
        $PY -m benchmarks.run --out "$out" "$@" 2>&1 \
        | tee "$out/logs/bench.log" | grep -v '^\[[0-9]*/[0-9]*\]\|^Autotuning kernel'
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

save_out() {  # copy what exists so far to $OUT (after every lease step: a kill keeps it)
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    tar -czf "$OUT/gpu_check.tar.gz" "$RES" $(for d in "$RES-mem" "$RES-mem-large" "$RES-dit" "$RES-ncu"; do [ -d "$d" ] && echo "$d"; done)
    for f in summary.md results.json rows.partial.jsonl; do [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/"; done
    for f in build pytest bench; do [ -f "$LOGS/$f.log" ] && tail -c 200000 "$LOGS/$f.log" > "$OUT/$f.log"; done
    return 0
}

run_ncu() {  # NCU_OPS (default "rope patch"), NCU_WORKLOAD (default mixed-pack), cap NCU_TIMEOUT a op
    local ncu op
    ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    [ -n "$ncu" ] || { echo "== ncu step skipped: no ncu on this machine"; return 0; }
    mkdir -p "$RES-ncu"
    for op in ${NCU_OPS:-rope patch}; do
        echo "== ncu: $op on ${NCU_WORKLOAD:-mixed-pack} (log: $RES-ncu/ncu_$op.txt)"
        env -u TRITON_INTERPRET timeout -k 10 "$(cap "${NCU_TIMEOUT:-90}")" "$ncu" --clock-control none --nvtx \
            -k "regex:$op" -c 60 --section SpeedOfLight --section Occupancy --section MemoryWorkloadAnalysis \
            --section WarpStateStats --section LaunchStats \
            $PY -m benchmarks.profile_cases --op "$op" --workload "${NCU_WORKLOAD:-mixed-pack}" \
            --provider vdit-cuda --provider vdit-triton --provider liger --warmup 1 > "$RES-ncu/ncu_$op.txt" 2>&1 \
            || echo "ncu on $op failed or timed out (exit $?): see its log"
        grep -E "^  [^ ].*\(|Duration|DRAM Throughput" "$RES-ncu/ncu_$op.txt" | head -60
    done
}

want() {  # is lease step $1 in LEASE_STEPS?
    [[ " ${LEASE_STEPS:-test mem mem-large attention dit} " == *" $1 "* ]]
}

cap() {  # a step's time cap: its own ($1 s), cut to what LEASE_BUDGET leaves (30 s reserve)
    local left=$(( ${LEASE_BUDGET:-550} - SECONDS - 30 ))
    (( left < $1 )) && echo $(( left > 0 ? left : 1 )) || echo "$1"
}

case "$STEP" in
    build) run_build ;;
    test) run_tests "$@" ;;
    bench) run_bench "$@" ;;
    all) run_build && { run_tests; run_bench "$@"; } ;;
    lease)
        per_test=()
        $PY -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 150)
        # the probe found its cause (a static libstdc++ in _C: setup.py's choose_cxx) and
        # tests/test_cuda_ext.py checks the raising: off unless PROBE=1 (saves ~30 s)
        PROBE=${PROBE:-0} PROBE_ARGS=--no-gdb run_build && {
            save_out
            # not the static report and the benchmarks' CPU runs (CI has them); the
            # benchmark peers' GPU checks stay
            want test && TEST_TIMEOUT=$(cap "${TEST_TIMEOUT:-150}") run_tests "${per_test[@]}" --ignore=tests/test_static.py \
                --deselect tests/test_benchmarks.py::test_main_command_quick \
                --deselect tests/test_benchmarks.py::test_dit_suite_packed_and_padded_steps_run_and_count_flops
            save_out
            # the patch/RoPE suite before attention: its rows are cheap and hold the most
            # unmeasured work (2026-11-27); RoPE first, its 9 rows take ~15 s, so the cap
            # cuts the patch suite's last rows (the forced variants) instead
            want mem && BENCH_OUT="$RES-mem" BENCH_TIMEOUT=$(cap "${MEM_TIMEOUT:-180}") run_bench --workload mixed-pack \
                --op rope --op patch --no-static
            save_out
            # our RoPE and patch ops (and Liger's rope) on a 9x larger pack, where a kernel's
            # bandwidth is not capped by its few microseconds of launch ramp and tail (before
            # attention since session 20's lease met the attention targets and left this step
            # no time); RoPE first: its 9 rows took 33 s on the H200 (2026-11-28)
            want mem-large && BENCH_OUT="$RES-mem-large" BENCH_TIMEOUT=$(cap "${MEM_LARGE_TIMEOUT:-140}") run_bench \
                --workload train-pack --op rope --op patch --provider vdit- --provider liger --no-static
            save_out
            # hardware counters (opt-in: LEASE_STEPS with "ncu"): Nsight Compute on our RoPE and
            # patch kernels and Liger's rope, one launch of each case after a warm-up
            # (benchmarks/profile_cases.py), into <results>-ncu/ncu_<op>.txt; about 30 s an op
            # on the H200 (2026-11-28); where ncu cannot read the counters (gVisor machines,
            # the device tool's KINDS.md) the file says so
            want ncu && run_ncu
            save_out
            want attention && BENCH_TIMEOUT=$(cap "${ATTN_TIMEOUT:-230}") run_bench --workload mixed-pack --op attention \
                --provider vdit-triton --provider torch-varlen --provider flex --no-static
            save_out
            # the reference model would materialize 40k x 40k scores per head: not run
            # the last step takes what the lease has left (cap), padded baselines before the
            # compiled ones and ours compiled (bench_dit._order)
            # under DIT_MIN seconds left (default 200) it would stop inside the first
            # autotuning and bring back nothing: skipped, with a message
            if ! want dit; then
                :
            elif (( $(cap "${DIT_TIMEOUT:-240}") >= ${DIT_MIN:-200} )); then
                BENCH_OUT="$RES-dit" BENCH_TIMEOUT=$(cap "${DIT_TIMEOUT:-240}") run_bench --workload mixed-60k \
                    --op dit --provider vdit-triton --provider torch-padded --no-static
            else
                echo "== DiT step skipped: $(cap 9999) s left of LEASE_BUDGET, under DIT_MIN=${DIT_MIN:-200}"
            fi
        } ;;
    *) echo "unknown step $STEP (all|build|test|bench|lease)"; exit 2 ;;
esac

save_out
[ -n "${OUT:-}" ] && echo "copied results to $OUT: $(ls "$OUT" | tr '\n' ' ')"
echo "gpu_check: step=$STEP status=$status results in $RES"
exit $status
