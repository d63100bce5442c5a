"""Diagnose how vdit_C reports bad arguments on this machine (python -m benchmarks.error_probe).

On the H100 machine of 2026-11-26 (torch 2.11) a bad argument to a vdit_C op crashed the
process with SIGSEGV instead of raising, while the same build raises cleanly under torch
2.14 here. This probe records what can tell the causes apart: the toolchains (the
compiler that built torch vs the one that built _C, the C++ ABI flag), then, each in a
child process with faulthandler on, (1) torch's own C++ error path, (2) a vdit_C op
given a CPU tensor (the error raised by the CPU registration in csrc/*_host.cpp), (3) a
vdit_C op given a bad CUDA argument, and a native backtrace from gdb if it is installed.
The same build raised cleanly under torch 2.11 on a CPU machine too (2026-11-27), and on
the GPU machine only the cases with CUDA tensors are known to crash, so there are cases
that tell "an error from vdit_C" from "an error with CUDA tensors" from "an error after
CUDA is initialised". Every case runs with a small LD_PRELOAD library, built here with the
C compiler, that prints the native stack and the libraries mapped on SIGSEGV/SIGBUS
(gdb may be missing there). Writes a report to stdout; exits 0 whatever it finds.

Found on 2026-11-27 (session 12): the machine's CXX=/opt/gcc/bin/g++ has only a static
libstdc++, so _C carried its own copy (ldd: no libstdc++.so; the native stack: the crash
inside std::ostream::_M_insert defined in _C, formatting the error message). setup.py's
choose_cxx now links with a compiler that has the shared one.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import Optional

_LOAD = "import torch; from vdit_kernels import backend; backend.extension(); "
CASES = {
    "torch error path": "import torch; torch.empty(2).view(3)",
    "torch error path, CUDA tensor": "import torch; torch.empty(2, device='cuda').view(3)",
    "vdit_C, CPU tensor after CUDA init": (_LOAD + "torch.empty(1, device='cuda'); "
                                           "torch.ops.vdit_C.patchify([torch.empty(1, 1, 2, 2)], [1, 2, 2])"),
    "vdit_C, CPU tensor": ("import torch; from vdit_kernels import backend; backend.extension(); "
                           "torch.ops.vdit_C.patchify([torch.empty(1, 1, 2, 2)], [1, 2, 2])"),
    "vdit_C, bad CUDA argument": ("import torch; from vdit_kernels import backend; backend.extension(); "
                                  "torch.ops.vdit_C.patchify([torch.empty(1, 1, 2, 2, device='cuda')], [1, 2])"),
}


# on SIGSEGV / SIGBUS: the native stack (glibc backtrace) and the mapped C++ runtime, CUDA
# runtime and extension libraries, then the default action (the exit status stays -11)
_BACKTRACE_C = r"""
#define _GNU_SOURCE
#include <execinfo.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>
static char alt_stack[1 << 16];
static char maps[1 << 20];
static void say(const char* s) { write(2, s, strlen(s)); }
static void on_fault(int sig) {
  void* frames[64];
  int n = backtrace(frames, 64);
  say(sig == SIGSEGV ? "\n[native] SIGSEGV, stack:\n" : "\n[native] SIGBUS, stack:\n");
  backtrace_symbols_fd(frames, n, 2);
  say("[native] mapped code of libstdc++, libgcc_s, cudart, torch, _C:\n");
  int fd = open("/proc/self/maps", O_RDONLY);
  if (fd >= 0) {
    ssize_t got, total = 0;
    while (total < (ssize_t)sizeof(maps) - 1 && (got = read(fd, maps + total, sizeof(maps) - 1 - total)) > 0)
      total += got;
    maps[total] = 0;
    for (char* line = strtok(maps, "\n"); line; line = strtok(NULL, "\n"))
      if (strstr(line, "r-xp") && (strstr(line, "libstdc++") || strstr(line, "libgcc_s") ||
                                   strstr(line, "cudart") || strstr(line, "libc10") || strstr(line, "_C.cpython"))) {
        say(line);
        say("\n");
      }
    close(fd);
  }
  signal(sig, SIG_DFL);
  raise(sig);
}
__attribute__((constructor)) static void install(void) {
  stack_t ss = {.ss_sp = alt_stack, .ss_size = sizeof(alt_stack), .ss_flags = 0};
  sigaltstack(&ss, 0);
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = on_fault;
  sa.sa_flags = SA_ONSTACK;
  sigaction(SIGSEGV, &sa, 0);
  sigaction(SIGBUS, &sa, 0);
}
"""


def _backtrace_preload(folder: str) -> Optional[str]:
    """The LD_PRELOAD library above, built with cc; None where no C compiler builds it."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src, lib = os.path.join(folder, "native_backtrace.c"), os.path.join(folder, "native_backtrace.so")
    with open(src, "w") as f:
        f.write(_BACKTRACE_C)
    proc = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", lib, src], capture_output=True, text=True)
    return lib if proc.returncode == 0 else None


def _run(cmd: list[str], timeout: int = 30, lines: int = 12, env: Optional[dict] = None) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=None if env is None else {**os.environ, **env})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not run: {exc}"
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-lines:]
    return f"exit {proc.returncode}\n    " + "\n    ".join(tail)


def main(argv=None) -> int:
    import argparse

    import torch

    parser = argparse.ArgumentParser(prog="python -m benchmarks.error_probe",
                                     description=(__doc__ or "").partition("\n")[0])  # no docstrings under -OO
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
    print("kernel", platform.release(), "| glibc", " ".join(platform.libc_ver()),
          "| python CC:", sysconfig.get_config_var("CC"), "| CFLAGS:", sysconfig.get_config_var("CFLAGS"))
    print("nvidia driver:", _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    watched = ("TORCH_SHOW_CPP_STACKTRACES", "LD_PRELOAD", "LD_LIBRARY_PATH", "GLIBC_TUNABLES", "CUDA_MODULE_LOADING")
    print("environment:", {k: os.environ[k] for k in watched if k in os.environ})
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as folder:
        preload = _backtrace_preload(folder)
        print("native backtrace on a crash:", "yes (LD_PRELOAD)" if preload else "no C compiler: Python stack only")
        env = {"LD_PRELOAD": preload} if preload else None
        for name, code in CASES.items():
            if "cuda" in code and not cuda:
                print(f"\n[{name}]  skipped: no CUDA device")
                continue
            print(f"\n[{name}] ", _run([sys.executable, "-X", "faulthandler", "-c", code], lines=40, env=env))
        if cuda:  # the case that crashed, with torch's own C++ stack in the message
            print("\n[vdit_C, bad CUDA argument, C++ stack] ",
                  _run([sys.executable, "-X", "faulthandler", "-c", CASES["vdit_C, bad CUDA argument"]], lines=40,
                       env={**(env or {}), "TORCH_SHOW_CPP_STACKTRACES": "1", "TORCH_SYMBOLIZE_MODE": "dladdr"}))
    gdb = None if args.no_gdb else shutil.which("gdb")
    if gdb:
        case = "vdit_C, bad CUDA argument" if cuda else "vdit_C, CPU tensor"
        print(f"\n[gdb backtrace of the {case} case]")
        print(_run([gdb, "-batch", "-ex", "run", "-ex", "bt 25", "--args", sys.executable, "-c",
                    CASES[case]], timeout=90, lines=40))
    else:
        print("\n(no gdb backtrace: " + ("--no-gdb)" if args.no_gdb else "gdb not installed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
