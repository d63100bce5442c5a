"""Shared test settings: device, Triton interpreter, tolerances, comparison helpers.

Without a GPU, Triton kernels run under the Triton interpreter on CPU tensors; the
variable must be set before triton.jit decorates any kernel, hence at the top here.
Tolerances live in one table, per dtype. Matmul-like ops (patch embedding, attention)
use flash-attention's rule instead: the kernel's max error against a float32
reference must be at most 2x PyTorch's own max error in the same dtype.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # tests check the numerics of the default tiles; each variant (backward strategy, TMA
    # forward) is forced by its own tests, every candidate tile runs in
    # test_gpu_tiles_under_the_interpreter, and autotuning plus the measured variant
    # choice run in the benchmarks and in the tests that turn them on. Otherwise every
    # new (head dim, dtype, GQA) key of the suite would compile and time ~25 configs.
    os.environ.setdefault("VDIT_AUTOTUNE", "0")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# Inductor's on-disk caches key a compiled graph on the graph, not on our ops' fake
# implementations: a graph compiled under an earlier (wrong) fake was served again after
# the fake changed (2026-11-28, attention's output strides), so a test of the fix failed
# and, the other way round, a fake broken later could pass on an old entry. So the tests
# use a cache of their own per version of our Python sources (and of torch): a change to
# any of them starts an empty one, while runs of the same sources (CI's main and compat
# runs are separate venvs, hence separate torch versions) reuse theirs.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import hashlib
    import tempfile
    from pathlib import Path

    _digest = hashlib.sha256(torch.__version__.encode())
    for _source in sorted(Path(__file__).resolve().parent.parent.joinpath("vdit_kernels").rglob("*.py")):
        _digest.update(_source.read_bytes())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(),
                                                         "vdit_inductor_" + _digest.hexdigest()[:16])

# pytest-xdist workers (the GPU script runs 8) would each start one CPU thread per core:
# on the 16-core GPU machine the float64 reference gradchecks, 2 s alone, then ran past
# the 150 s per-test cap (2026-11-27). Each worker gets its share of the cores.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def device_for(backend: str) -> torch.device:
    """Where a test runs `backend`: Triton takes CUDA tensors where a GPU exists (CPU
    tensors only under the interpreter, which a GPU run leaves off), CUDA takes them
    always (on CPU the backend is unavailable and such tests skip); the reference CPU."""
    return DEVICE if backend in ("triton", "cuda") else torch.device("cpu")

# (atol, rtol) for elementwise ops (RoPE, data movement is exact) per dtype
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

# bfloat16 tl.dot is wrong in the Triton interpreter (it multiplies the raw bits), so
# dot-kernels are tested in bfloat16 only on a GPU
DOT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def gpu_only(test):
    """Runs where CUDA is available, skipped elsewhere with a reason; marked "gpu"."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")(test))


# the cuda backend as a test parameter: its kernels take CUDA tensors only, so it is marked
# "gpu" like a gpu_only test (a GPU run takes those first: gpu_tests_first)
CUDA_BACKEND = pytest.param("cuda", marks=pytest.mark.gpu)


def gpu_tests_first(items) -> None:
    """Reorders collected tests in place (stable): the GPU-only ones and the bfloat16 cases
    (the interpreter cannot run bfloat16 dots) first, the rest after. A GPU is lent for
    minutes and the GPU script caps the tests: what CI cannot check runs before what it did."""
    def covered_on_cpu(item) -> bool:
        params = getattr(item, "callspec", None)
        bf16 = params is not None and any(v is torch.bfloat16 for v in params.params.values())
        return not (item.get_closest_marker("gpu") is not None or bf16)
    items.sort(key=covered_on_cpu)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        gpu_tests_first(items)


# scripts/compat.sh installs the package without its compile step (other torch version)
needs_extension = pytest.mark.skipif(os.environ.get("VDIT_SKIP_BUILD") == "1",
                                     reason="installed with VDIT_SKIP_BUILD=1: no vdit_kernels._C")


def assert_verbose_close(actual, expected, atol=None, rtol=None, name="tensor"):
    """allclose that says how many elements differ, where, and about NaN/inf mismatches."""
    if atol is None:
        atol, rtol = TOLERANCES[expected.dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    finite_mismatch = torch.isfinite(a) != torch.isfinite(e)
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    sign_mismatch = torch.isinf(a) & torch.isinf(e) & (a != e)  # +inf where -inf is expected
    both = torch.isfinite(a) & torch.isfinite(e)
    bad = ((~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True) & both) | finite_mismatch | nan_mismatch
           | sign_mismatch)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = (a - e).abs().masked_fill(~both, 0).max().item()
        pairs = [(i, a[tuple(i)].item(), e[tuple(i)].item()) for i in idx]
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"max abs diff {worst:.3e}; NaN mismatches {int(nan_mismatch.sum())}, "
            f"finite/inf mismatches {int(finite_mismatch.sum())}, inf sign mismatches "
            f"{int(sign_mismatch.sum())}; first (index, actual, expected): {pairs}")


def assert_matmul_rule(actual, torch_same_dtype, reference_fp32, name="tensor", floor=1e-6):
    """flash-attention's rule: err(actual) <= 2 * err(PyTorch in the same dtype) (+ a tiny floor)."""
    ref = reference_fp32.detach().double().cpu()
    assert actual.shape == torch_same_dtype.shape == ref.shape, f"{name}: shapes {actual.shape}, {ref.shape}"
    if ref.numel() == 0:  # (nothing to compare; max() of nothing would raise)
        return
    err = (actual.detach().double().cpu() - ref).abs().max().item()
    base = (torch_same_dtype.detach().double().cpu() - ref).abs().max().item()
    assert err <= 2 * base + floor, f"{name}: max error {err:.3e} > 2 x PyTorch's {base:.3e} (+{floor})"


def random_videos(pack, channels, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(channels, *s, generator=g).to(device=device, dtype=dtype) for s in pack.shapes]


class OutOfSharedMemory:
    """Wraps a Triton kernel: records record(kwargs) of every launch, and launches for which
    refuses(kwargs) raise OutOfResources, as on a GPU with less shared memory than the
    config needs; the others run the kernel."""

    def __init__(self, kernel, refuses, record, launched: list):
        self.kernel, self.refuses, self.record, self.launched = kernel, refuses, record, launched

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launched.append(self.record(kwargs))
            if self.refuses(kwargs):
                from triton.runtime.errors import OutOfResources
                raise OutOfResources(139264, 101376, "shared memory")
            return self.kernel[grid](*args, **kwargs)
        return run
