"""pytest-benchmark view of the same cases run.py times (collected only when asked for):

    python -m pytest benchmarks/test_bench_suites.py --benchmark-only [-k attention]

Cases come from the suites' cases() (quick workloads); on GPU every call is synchronized.
A timing harness only: it checks no values (the tests do, tests/), and run.py remains the
main command (limits, % of limit, speedups, results files).
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")  # (here: in the test, the fixture failed first)

from benchmarks import bench_attention, bench_block, bench_patch, bench_rope, timing, workloads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WORKLOADS = workloads.select(DEVICE, quick=True)
CASES = []
for suite in (bench_patch, bench_rope, bench_attention, bench_block):
    CASES += suite.cases(DEVICE, True, WORKLOADS)[0]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.name}-{c.mode}-{c.provider}-{c.workload.name}" for c in CASES])
def test_bench(benchmark, case):
    prepared = case.build()

    def call():
        timing._clear_grads(prepared)  # as run.py's samples: no add into the last call's grads
        prepared.fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    benchmark.extra_info.update(flops=case.flops, bytes=case.bytes, tokens=case.workload.num_tokens)
    benchmark(call)
