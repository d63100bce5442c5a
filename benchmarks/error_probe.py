"""Diagnose how vdit_C reports bad arguments on this machine (python -m benchmarks.error_probe).

On the H100 machine of 2026-11-26 (torch 2.11) a bad argument to a vdit_C op crashed the
process with SIGSEGV instead of raising, while the same build raises cleanly under torch
2.14 here. This probe records what can tell the causes apart: the toolchains (the
compiler that built torch vs the one that built _C, the C++ ABI flag), then, each in a
child process with faulthandler on, (1) torch's own C++ error path, (2) a vdit_C op
given a CPU tensor (the error raised by the CPU registration in csrc/*_host.cpp), (3) a
vdit_C op given a bad CUDA argument, and a native backtrace from gdb if it is installed.
Writes a report to stdout; exits 0 whatever it finds.
"""
from __future__ import annotations

import shutil
import subprocess
import sys

CASES = {
    "torch error path": "import torch; torch.empty(2).view(3)",
    "vdit_C, CPU tensor": ("import torch; from vdit_kernels import backend; backend.extension(); "
                           "torch.ops.vdit_C.patchify([torch.empty(1, 1, 2, 2)], [1, 2, 2])"),
    "vdit_C, bad CUDA argument": ("import torch; from vdit_kernels import backend; backend.extension(); "
                                  "torch.ops.vdit_C.patchify([torch.empty(1, 1, 2, 2, device='cuda')], [1, 2])"),
}


def _run(cmd: list[str], timeout: int = 30) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not run: {exc}"
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
    return f"exit {proc.returncode}\n    " + "\n    ".join(tail)


def main(argv=None) -> int:
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-gdb", action="store_true", help="skip the gdb backtrace (slow)")
    args = parser.parse_args(argv)

    print("torch", torch.__version__, "CXX11 ABI:", torch.compiled_with_cxx11_abi())
    config = torch.__config__.show()
    print("torch built with:", next((l.strip() for l in config.splitlines() if "GCC" in l or "clang" in l), "?"))
    for tool in ("c++", "g++", "nvcc"):
        path = shutil.which(tool)
        version = _run([tool, "--version"]).splitlines()[1].strip() if path else "-"
        print(f"{tool}: {path or 'not found'} {version}")
    try:
        import vdit_kernels._C as ext

        print("_C:", ext.__file__)
        print(_run(["ldd", ext.__file__]).replace("\n    ", "\n      ")[:1500])
    except ImportError as exc:
        print("_C not importable:", exc)
    for name, code in CASES.items():
        print(f"\n[{name}] ", _run([sys.executable, "-X", "faulthandler", "-c", code]))
    gdb = None if args.no_gdb else shutil.which("gdb")
    if gdb:
        print("\n[gdb backtrace of the CPU-tensor case]")
        print(_run([gdb, "-batch", "-ex", "run", "-ex", "bt 25", "--args", sys.executable, "-c",
                    CASES["vdit_C, CPU tensor"]], timeout=90))
    else:
        print("\n(no gdb backtrace: " + ("--no-gdb)" if args.no_gdb else "gdb not installed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
