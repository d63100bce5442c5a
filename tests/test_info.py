"""python -m vdit_kernels: the report of what runs here, and the install check."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vdit_kernels as vk
from conftest import DEVICE, HAS_CUDA
from vdit_kernels import __main__ as info
from vdit_kernels import backend as B

ROOT = Path(__file__).parent.parent


def _run_module(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_report_says_what_each_family_takes_and_why_not_the_others():
    done = _run_module("-m", "vdit_kernels", env={"TRITON_INTERPRET": "1", "VDIT_AUTOTUNE": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"vdit_kernels {vk.__version__} at ")
    assert f"torch {torch.__version__}" in lines[1]
    settings = next(line for line in lines if line.startswith("settings: "))
    assert "TRITON_INTERPRET=1" in settings and "VDIT_AUTOTUNE=0" in settings, settings
    for family in B.FAMILIES:
        at = lines.index(f"  {family:<9} cpu tensors: takes reference")
        assert lines[at + 1] == "      triton  can run"  # the interpreter runs them on CPU tensors
        assert lines[at + 2].startswith("      cuda    no: ")
    assert "      cuda    no: there is no CUDA implementation of the attention ops" in lines
    if not HAS_CUDA:
        assert lines[2].startswith("GPU: none visible")
        assert "  patch     cuda tensors: takes reference" in lines
    if B.extension() is not None:
        assert any(line.startswith("_C: vdit_kernels._C cuda=") for line in lines)


def test_report_names_a_default_backend_that_cannot_run(monkeypatch):
    monkeypatch.setenv("VDIT_BACKEND", "cuda")
    lines = info.report()
    # CPU tensors: the cuda backend named by VDIT_BACKEND cannot run them
    line = next(line for line in lines if line.startswith("  rope      cpu tensors: takes "))
    assert line.startswith("  rope      cpu tensors: takes none (backend 'cuda' cannot run the rope ops: "), line


def test_install_check_passes_every_backend_that_runs_here():
    out = []
    failures = info.check(out=out.append)
    assert failures == 0, "\n".join(out)
    ran = [line for line in out if line.startswith("[")]
    # the Triton kernels run here (the interpreter on CPU): every op in float32 and float16
    assert sum(" triton float32 " in line and " ok " in line for line in ran) == 6, out
    assert sum(" triton float16 " in line and " ok " in line for line in ran) == 6, out
    if not HAS_CUDA:
        assert out[-1] == "12 of 12 checks passed on cpu"
        # the cuda backend: CPU tensors (or no _C, in CI's compat run), and no attention kernels
        assert any(line.startswith("skipped 10: cuda: ") for line in out), out
        assert "skipped 2: cuda: there is no CUDA implementation of the attention ops" in out


class _ScaledGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.001


@pytest.mark.parametrize("wrong", ["output", "gradient", "second output's gradient", "output 1e-5 off"])
def test_install_check_fails_a_backend_a_little_off(monkeypatch, wrong):
    # a rotation 0.1% off in its output, or in its gradient alone (q's, or k's: the second
    # output), is far above float32 rounding and must fail; so must one 1e-5 off (the bound
    # is a few units of float32 rounding, not a loose tolerance)
    right = vk.apply_rope_3d

    def off(q, k, *args, backend=None, **kwargs):
        q_out, k_out = right(q, k, *args, backend=backend, **kwargs)
        if backend == "reference":
            return q_out, k_out
        return {"output": (q_out * 1.001, k_out), "gradient": (_ScaledGradient.apply(q_out), k_out),
                "second output's gradient": (q_out, _ScaledGradient.apply(k_out)),
                "output 1e-5 off": (q_out * (1 + 1e-5), k_out)}[wrong]

    monkeypatch.setattr(vk, "apply_rope_3d", off)
    passed, detail = info.check_op("apply_rope_3d", "rope", "triton", DEVICE, torch.float32)
    assert not passed, detail
    # the line names the failing result: its error above its bound
    error, bound = (float(detail.split(word)[1].split()[0].rstrip(";,)")) for word in ("max error", "bound"))
    assert error > bound, detail
    monkeypatch.setattr(vk, "apply_rope_3d", right)
    passed, detail = info.check_op("apply_rope_3d", "rope", "triton", DEVICE, torch.float32)
    assert passed, detail


def test_install_check_reports_a_backend_that_raises_and_goes_on(monkeypatch, capsys):
    def broken(*args, backend=None, **kwargs):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(vk, "patchify", broken)
    assert info.main(["--check"]) == 1
    out = capsys.readouterr().out.splitlines()
    failed = [line for line in out if " FAIL " in line]
    assert failed and all(" patchify " in line and "raised RuntimeError: kernel launch failed" in line
                          for line in failed), out
    assert any(" unpatchify " in line and " ok " in line for line in out)  # it went on


def test_check_on_cuda_without_a_gpu_is_refused(capsys):
    if HAS_CUDA:
        pytest.skip("a GPU is visible here")
    with pytest.raises(SystemExit) as stop:
        info.main(["--check", "--device", "cuda"])
    assert stop.value.code == 2 and "no CUDA GPU is visible" in capsys.readouterr().err


def test_help_without_docstrings():
    done = _run_module("-OO", "-m", "vdit_kernels", "--help")
    assert done.returncode == 0 and "usage: python -m vdit_kernels" in done.stdout, done.stderr[-3000:]
