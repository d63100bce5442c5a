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
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))  # no bin/nvcc there: ignored
    assert setup_py.real_cuda_home()[0] == toolkit.resolve()
    headerless = tmp_path / "headerless"  # bin/nvcc but no include/cuda_runtime.h: ignored too
    (headerless / "bin").mkdir(parents=True)
    _script(headerless / "bin" / "nvcc", "exit 0")
    monkeypatch.setenv("CUDA_HOME", str(headerless))
    assert setup_py.real_cuda_home()[0] == toolkit.resolve()
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert setup_py.real_cuda_home() == (toolkit, "$CUDA_HOME")
