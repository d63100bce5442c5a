"""setup.py's toolchain choices, with fake compilers and toolkits (no build)."""
import importlib.util
import os
import sys
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("vdit_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, builds nothing
    return module


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _compiler(folder: Path, name: str, shared: bool) -> Path:
    """A fake g++ answering -print-file-name=libstdc++.so as a compiler with (a path) or
    without (the bare name) a shared libstdc++ does."""
    lib = folder / f"{name}-lib" / "libstdc++.so"
    lib.parent.mkdir()
    if shared:
        lib.write_text("")
    return _script(folder / name, f'echo "{lib if shared else "libstdc++.so"}"')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libstdc++ is the Linux runtime")
def test_cxx_with_static_libstdcxx_only_is_replaced(setup_py, tmp_path, monkeypatch, capsys):
    static = _compiler(tmp_path, "static-g++", shared=False)
    shared = _compiler(tmp_path, "shared-g++", shared=True)
    monkeypatch.setenv("CXX", str(static))
    assert setup_py.shared_libstdcxx(str(static)) is None
    assert setup_py.shared_libstdcxx(str(shared)) == str(tmp_path / "shared-g++-lib" / "libstdc++.so")
    assert setup_py.choose_cxx(candidates=(str(static), str(shared))) == str(shared)
    assert os.environ["CXX"] == str(shared)
    assert "has no shared libstdc++" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libstdc++ is the Linux runtime")
def test_cxx_kept_when_shared_or_when_nothing_better(setup_py, tmp_path, monkeypatch, capsys):
    shared = _compiler(tmp_path, "shared-g++", shared=True)
    monkeypatch.setenv("CXX", str(shared))
    assert setup_py.choose_cxx(candidates=()) == str(shared)
    assert capsys.readouterr().err == ""
    static = _compiler(tmp_path, "static-g++", shared=False)
    monkeypatch.setenv("CXX", str(static))
    assert setup_py.choose_cxx(candidates=(str(static),)) == str(static)  # kept, with a warning
    assert os.environ["CXX"] == str(static)
    assert "WARNING" in capsys.readouterr().err


def test_cuda_home_follows_an_nvcc_wrapper_script(setup_py, tmp_path, monkeypatch):
    # the toolkit: bin/nvcc and include/cuda_runtime.h; PATH holds only a wrapper script
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    _script(toolkit / "bin" / "nvcc", "exit 0")
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    (toolkit / "include" / "cuda.h").write_text("#define CUDA_VERSION 13000\n")
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    _script(wrappers / "nvcc", f'exec {toolkit}/bin/nvcc "$@"')
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrappers))
    home, how = setup_py.real_cuda_home()
    assert home == toolkit.resolve() and "wrapper script" in how
    assert setup_py.toolkit_version(home) == (13, 0)
    # a CUDA_HOME without a toolkit is an error, not a silent switch to the one on PATH
    headerless = tmp_path / "headerless"  # bin/nvcc but no include/cuda_runtime.h
    (headerless / "bin").mkdir(parents=True)
    _script(headerless / "bin" / "nvcc", "exit 0")
    for var, bad in (("CUDA_HOME", tmp_path / "nowhere"), ("CUDA_HOME", headerless), ("CUDA_PATH", headerless)):
        monkeypatch.setenv(var, str(bad))
        with pytest.raises(SystemExit, match=rf"\${var}={bad} has no bin/nvcc or no include/cuda_runtime.h"):
            setup_py.real_cuda_home()
        monkeypatch.delenv(var)
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert setup_py.real_cuda_home() == (toolkit, "$CUDA_HOME")


def test_build_switches_are_checked(setup_py, monkeypatch):
    # an empty arch list is the default (torch would detect GPUs, and fail with an IndexError
    # without one); "native" needs a GPU; wrong switch values stop the build, never "off"
    for value in (None, "", "  "):
        if value is None:
            monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
        else:
            monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
        assert setup_py.arch_list() == setup_py.DEFAULT_ARCH_LIST
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    assert setup_py.arch_list() == "9.0a"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "native")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    with pytest.raises(SystemExit, match="TORCH_CUDA_ARCH_LIST=native builds for the GPUs of this machine"):
        setup_py.arch_list()
    for value, on in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv("VDIT_SKIP_BUILD", value)
        assert setup_py.switch("VDIT_SKIP_BUILD") is on
    monkeypatch.setenv("VDIT_SKIP_BUILD", "yes")
    with pytest.raises(SystemExit, match="VDIT_SKIP_BUILD must be 1 or 0, got 'yes'"):
        setup_py.switch("VDIT_SKIP_BUILD")
    monkeypatch.setenv("MAX_JOBS", "3")
    assert setup_py.max_jobs() == "3"
    for bad in ("0", "abc", "-2"):
        monkeypatch.setenv("MAX_JOBS", bad)
        with pytest.raises(SystemExit, match=f"MAX_JOBS must be a positive int, got '{bad}'"):
            setup_py.max_jobs()
    monkeypatch.delenv("MAX_JOBS")
    assert int(setup_py.max_jobs()) >= 1
