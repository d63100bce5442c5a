"""Build vdit_kernels with its compiled extension vdit_kernels._C.

What gets built:
  * CUDA torch + nvcc found      -> csrc/ops.cpp + csrc/*.cu (CUDA kernels for the
                                    memory-bound ops), for TORCH_CUDA_ARCH_LIST
  * otherwise, or VDIT_SKIP_CUDA_BUILD=1 -> csrc/ops.cpp alone (op schemas, no kernels)
  * VDIT_SKIP_BUILD=1            -> no extension (an earlier in-place build is removed); the
                                    Python paths still work
No GPU is needed or looked for: the architectures come from TORCH_CUDA_ARCH_LIST
(default below, also where it is empty; "native" needs a visible GPU). Wrong values of the
switches (CUDA_HOME without nvcc, MAX_JOBS=0, VDIT_SKIP_BUILD=yes) stop the build with the
reason; a build without CUDA kernels says why in _C's build_info(). Build with
`pip install --no-build-isolation -e .` (torch must be importable at build time; the
extension is tied to that torch).
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
DEFAULT_ARCH_LIST = "8.0;9.0a;9.0+PTX"  # A100, H100/H200 (wgmma-capable 9.0a), PTX for newer GPUs


def say(msg: str) -> None:
    print(f"[vdit_kernels setup] {msg}", file=sys.stderr, flush=True)


def real_cuda_home():
    """The CUDA toolkit folder: CUDA_HOME/CUDA_PATH if set, else where `nvcc` really lives.

    The nvcc on PATH can be a wrapper script (e.g. /usr/local/bin/nvcc doing
    `exec /usr/local/cuda-13.0/bin/nvcc "$@"`); torch would then guess the folder above
    the wrapper. We follow symlinks, then read a small wrapper script for the nvcc it runs.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
                return Path(home), f"${var}"
            # the toolkit the user named, not another one found elsewhere without a word (pip
            # shows a build's messages only with -v or when it fails)
            raise SystemExit(f"[vdit_kernels setup] ${var}={home} has no bin/nvcc or no include/cuda_runtime.h: "
                             f"point it at a CUDA toolkit, unset it (nvcc on PATH is then followed), or "
                             f"set VDIT_SKIP_CUDA_BUILD=1 for a CPU-only build")
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append((real.parent.parent, f"nvcc on PATH ({nvcc} -> {real})"))
        try:
            if real.stat().st_size < 4096:
                text = real.read_text(errors="ignore")
                for match in re.findall(r"(/[^\s\"']+)/bin/nvcc\b", text):
                    candidates.append((Path(match), f"the wrapper script {real}"))
        except OSError:
            pass
    candidates.append((Path("/usr/local/cuda"), "the standard location /usr/local/cuda"))
    for home, how in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return home.resolve(), how
    return None, "no nvcc on PATH, no CUDA_HOME, nothing in /usr/local/cuda"


def toolkit_version(cuda_home: Path):
    """(major, minor) of the toolkit, from CUDA_VERSION in its cuda.h (e.g. 13000), or None."""
    try:
        text = (cuda_home / "include" / "cuda.h").read_text(errors="ignore")
    except OSError:
        return None
    m = re.search(r"#define\s+CUDA_VERSION\s+(\d+)", text)
    return (int(m.group(1)) // 1000, int(m.group(1)) % 1000 // 10) if m else None


def shared_libstdcxx(compiler: str):
    """The shared libstdc++ that `compiler` links C++ code against, or None when it has only
    the static libstdc++.a (it prints the bare name for a file it does not find)."""
    try:
        out = subprocess.run([compiler, "-print-file-name=libstdc++.so"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out if os.path.isabs(out) and os.path.exists(out) else None


def choose_cxx(candidates=("c++", "g++", "/usr/bin/c++", "/usr/bin/g++")):
    """Keep $CXX (torch's default: c++) unless it links libstdc++ statically; then switch
    $CXX to the first candidate that links the shared one, and say so.

    Why: a static copy of libstdc++ inside _C runs beside the shared one torch loads, two
    C++ runtimes in one process; the first error message a vdit_C op formats (iostreams,
    locales) then crashes the process with SIGSEGV instead of raising. Seen on the H100
    machine of 2026-11-27, whose CXX=/opt/gcc/bin/g++ ships libstdc++.a only; with
    /usr/bin/g++ the same sources raise cleanly. Returns the compiler chosen."""
    current = os.environ.get("CXX", "c++")
    if not sys.platform.startswith("linux") or shutil.which(current) is None:
        return current
    if shared_libstdcxx(current):
        return current
    for alt in candidates:
        path = shutil.which(alt)
        if path and Path(path).resolve() != Path(shutil.which(current)).resolve() and shared_libstdcxx(path):
            say(f"the C++ compiler {current} (CXX) has no shared libstdc++, so _C would carry a static "
                f"copy beside torch's shared one (errors raised by the CUDA ops crash such a build); "
                f"linking with {path} instead (set CXX to choose another)")
            os.environ["CXX"] = path
            return path
    say(f"WARNING: the C++ compiler {current} links libstdc++ statically and no other compiler "
        f"({', '.join(candidates)}) links the shared one: bad arguments to the CUDA ops may crash "
        "instead of raising. Set CXX to a compiler with a shared libstdc++.")
    return current


# why a build has no CUDA kernels, as _C's build_info() reports it (an int macro: a string
# one would need quoting through ninja and nvcc)
CPU_ONLY_REASONS = {"requested": 1, "no-toolkit": 2, "cpu-torch": 3}


def switch(name: str) -> bool:
    """A 0/1 build switch; any other value is an error, not silently "off"."""
    value = os.environ.get(name, "0").strip()
    if value not in ("0", "1", ""):
        raise SystemExit(f"[vdit_kernels setup] {name} must be 1 or 0, got {value!r}")
    return value == "1"


def arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST, DEFAULT_ARCH_LIST where unset or empty (torch would take an empty
    one as "detect the GPUs", and fail with an IndexError where there are none); "native" is
    refused where no GPU is visible, with the reason."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not value:
        return DEFAULT_ARCH_LIST
    if value.lower() == "native":
        import torch

        if torch.cuda.device_count() == 0:
            raise SystemExit("[vdit_kernels setup] TORCH_CUDA_ARCH_LIST=native builds for the GPUs of this "
                             "machine, and it has none: name the architectures instead, e.g. "
                             f"TORCH_CUDA_ARCH_LIST='{DEFAULT_ARCH_LIST}' (the default) or '9.0a'")
    return value


def max_jobs() -> str:
    """MAX_JOBS as given (a positive int: torch ignores a word, ninja takes 0 as "no limit"),
    else the cores, capped by memory: nvcc with torch headers takes ~2 GB per job."""
    jobs = os.environ.get("MAX_JOBS", "").strip()
    if jobs:
        if not jobs.isdigit() or int(jobs) < 1:
            raise SystemExit(f"[vdit_kernels setup] MAX_JOBS must be a positive int, got {jobs!r}")
        return jobs
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    return str(max(1, min(os.cpu_count() or 1, int(mem_gb // 3))))


def stale_inplace_build() -> list:
    """_C libraries an earlier editable build left in the source tree."""
    return sorted((ROOT / "vdit_kernels").glob("_C*.so")) + sorted((ROOT / "vdit_kernels").glob("_C*.pyd"))


def extensions():
    if switch("VDIT_SKIP_BUILD"):
        say("VDIT_SKIP_BUILD=1: not building vdit_kernels._C")
        for old in stale_inplace_build():
            # else an editable install keeps loading the earlier build: no "no extension" mode
            say(f"removing {old.relative_to(ROOT)}, left by an earlier build")
            old.unlink()
        return [], {}
    skip_cuda = switch("VDIT_SKIP_CUDA_BUILD")
    cuda_home, how = real_cuda_home() if not skip_cuda else (None, "VDIT_SKIP_CUDA_BUILD=1")
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = str(cuda_home)  # before cpp_extension reads it at import
    import torch
    from torch.utils import cpp_extension

    torch_cuda = torch.version.cuda
    with_cuda = bool(torch_cuda) and cuda_home is not None and not skip_cuda
    cpu_only = None
    if skip_cuda:
        cpu_only = "requested"
        say("VDIT_SKIP_CUDA_BUILD=1: building the CPU-only extension (op schemas, no CUDA kernels)")
    elif torch_cuda and cuda_home is None:
        cpu_only = "no-toolkit"
        say(f"torch {torch.__version__} is a CUDA {torch_cuda} build but no CUDA toolkit was found "
            f"({how}). Set CUDA_HOME to the toolkit to build the CUDA kernels; building CPU-only "
            "(its build_info() says so, and the first use on a GPU warns).")
    elif not torch_cuda:
        cpu_only = "cpu-torch"
        say(f"torch {torch.__version__} is a CPU build" + (
            f"; a CUDA toolkit is at {cuda_home}, but the CUDA kernels need a CUDA build of torch"
            if cuda_home is not None else " and no CUDA toolkit was found") + ": building CPU-only")

    os.environ["MAX_JOBS"] = max_jobs()

    choose_cxx()
    cxx_flags = ["-O3", "-DNDEBUG"]  # the C++ standard is torch's own default
    sources = ["csrc/ops.cpp"]
    if not with_cuda:
        ext = cpp_extension.CppExtension("vdit_kernels._C", sources, extra_compile_args={"cxx": cxx_flags},
                                         define_macros=[("VDIT_CPU_ONLY_REASON", str(CPU_ONLY_REASONS[cpu_only]))])
        return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}

    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list()
    # the toolkit's own headers first: nvcc must compile against the runtime headers of its
    # own release (torch >= 2.15's wheels carry a whole newer CUDA include folder)
    include_dirs = [str(ROOT / "csrc"), str(cuda_home / "include")]
    # torch's ATen/cuda headers include cusparse.h / cublas_v2.h; a bare toolkit may lack
    # them while torch's nvidia wheels ship them: that folder comes after the toolkit's
    if not all((cuda_home / "include" / h).exists() for h in ("cusparse.h", "cublas_v2.h")):
        for site in sys.path:
            extra = Path(site) / "nvidia" / "cu13" / "include"
            if extra.is_dir():
                include_dirs.append(str(extra))
                break
    toolkit = toolkit_version(cuda_home)
    if toolkit and torch_cuda and toolkit != tuple(int(x) for x in torch_cuda.split(".")[:2]):
        say(f"note: the toolkit is CUDA {'.'.join(map(str, toolkit))}, torch was built with CUDA "
            f"{torch_cuda} (torch's build accepts another minor version, not another major one)")
    # kernels (*.cu, nvcc) and their host sides (*_host.cpp: checks, planning, the
    # registered CUDA ops; host compiler)
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*_host.cpp"))
    say(f"building CUDA kernels with the CUDA {'.'.join(map(str, toolkit or ())) or '(version unknown)'} "
        f"toolkit at {cuda_home} (found via {how}), torch CUDA "
        f"{torch_cuda}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, "
        f"MAX_JOBS={os.environ['MAX_JOBS']}, sources: {', '.join(sources)}")
    # what build_info() reports (csrc/ops.cpp), host compiler only: nvcc reads the commas
    # of a -D value as a list of macros
    build_defines = [f"-DVDIT_CUDA_TOOLKIT={'.'.join(map(str, toolkit or ())) or 'unknown'}",
                     "-DVDIT_CUDA_ARCHS=" + re.sub(r"[^A-Za-z0-9.+]+", ",", os.environ["TORCH_CUDA_ARCH_LIST"]).strip(",")]
    ext = cpp_extension.CUDAExtension(
        "vdit_kernels._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("VDIT_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags + build_defines,
            "nvcc": ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    ext_modules, cmdclass = extensions()

    setup(
        name="vdit_kernels",
        version="0.1.0",
        description="Fused patchify, 3D RoPE and variable-length attention kernels for video diffusion transformers",
        packages=find_packages(include=["vdit_kernels", "vdit_kernels.*"]) + ["vdit_kernels.model"],
        package_dir={"vdit_kernels.model": "model"},
        python_requires=">=3.10",
        # the oldest releases the test suite has passed under (scripts/compat.sh with
        # COMPAT_TORCH / COMPAT_TRITON): torch 2.9.1 + Triton 3.5.1 (all but one static check:
        # 16 B spilled in the D = 256 dQ tile), up to torch 2.15 + Triton 3.9
        install_requires=["torch>=2.9", "numpy"],
        extras_require={"triton": ["triton>=3.5"], "test": ["pytest", "einops"],
                        "bench": ["pytest-benchmark", "tqdm", "matplotlib"],
                        "diffusers": ["diffusers>=0.42"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
