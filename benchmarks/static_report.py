"""The static report: every Triton kernel compiled ahead of time for sm_90a, on any machine.

No GPU is needed: triton.compile builds PTX and a cubin for the target, and the
cuobjdump shipped with triton reads registers, shared memory and local-memory
(spill) use from the cubin. Each Triton module of vdit_kernels lists the
configurations it launches on a GPU in `aot_specs()`: a list of dicts with keys
name, fn, signature, constexprs, num_warps, num_stages, maxnreg (optional: a register cap
per thread, as the launch sets it) and expect_mma (True where the kernel should use
tensor cores: wgmma on sm_90a), expect_tma (True where it should read through TMA
descriptors: cp.async.bulk.tensor),
spill_budget (bytes, default 0; for extra autotuning candidates, and for a default only where a
GPU measured that spilling tile fastest: attention's MEASURED_DEFAULTS), loop_spill_free (True:
no local-memory access in the main loop, whatever the budget; the attention defaults that
deterministic=True and VDIT_AUTOTUNE=0 run) and
min_access_bytes (memory-bound kernels: the widest global load and store must be at least
this wide, e.g. 16 for 16-byte vectors).

Arguments are compiled with the specialization a real launch gets for typical tensors:
pointers 16-byte aligned and integer arguments named stride_* divisible by 16 (Triton
marks both "tt.divisibility = 16" at launch), and the arguments a spec lists in
"unit_args" (strides that are 1 for the tensors it launches on) as the constant 1, which a
launch makes of any integer argument equal to 1. Without this the compiler could prove no
alignment or contiguity and the PTX would show scalar accesses a GPU run never executes.
Other integer arguments divisible by 16 in the configuration the spec stands for (a
feature count of 64, hidden 3072) are listed in its "divisible_args"; strides that are
not (a head stride of 72, the LSE's stride of a token count) in its "unaligned_args".

Each row also gives the kernel's main loop in its SASS (main_loop(): instructions, HGMMA,
HMMA and local-memory accesses per step), which registers and spill totals do not show.

GPUs with less shared memory: every launch is also built for a 99 KB GPU (pointer variants
for sm_86, as sm_89; TMA variants for sm_120), candidates in list order until one fits, i.e.
the tile a fixed launch (deterministic=True, VDIT_AUTOTUNE=0) falls to there; none fitting is
a problem.

The CUDA kernels of a built vdit_kernels._C (its sm_90a cubins): registers, local memory
(spills: a problem) and, for LOADS_FIRST_KERNELS (the tiled RoPE kernel, the patch
kernel), whether their load/store loops issue every global load of a step before any
loaded value is used (loop_loads(); a problem where they do not).

python -m benchmarks.static_report [--json out.json] [--sass all|checked] exits non-zero when a kernel
spills or misses its expected tensor-core instructions, or a launch has no tile for 99 KB
(out.json holds the rows, out_cuda.json those of _C, out_small_gpus.json the 99 KB builds).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SM = 90


def nvidia_tool(name: str) -> Path:
    """cuobjdump / ptxas as shipped inside the triton wheel."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def with_unit_args(spec: dict) -> dict:
    """The spec with its "unit_args" turned into constexpr 1, as a launch specializes them."""
    unit = spec.get("unit_args", ())
    if not unit:
        return spec
    sig = {n: ("constexpr" if n in unit else t) for n, t in spec["signature"].items()}
    return {**spec, "signature": sig, "constexprs": {**spec.get("constexprs", {}), **{n: 1 for n in unit}}}


def launch_attrs(spec: dict) -> dict:
    """{(arg index,): [["tt.divisibility", 16]]} for the arguments a launch marks divisible."""
    names = spec["fn"].arg_names
    sig = spec["signature"]
    divisible = [n for n, t in sig.items()
                 if t.startswith("*") or (t in ("i32", "i64") and n.startswith("stride"))]
    divisible += list(spec.get("divisible_args", ()))
    unaligned = set(spec.get("unaligned_args", ()))
    divisible = [n for n in divisible if sig.get(n) != "constexpr" and n not in unaligned]
    return {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}


_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z_:0-9]+)*?(?:\.v(\d))?\.(?:b|u|s|f)(\d+)\b")


def widest_access(ptx: str) -> dict:
    """Widest global load / store in bytes per thread and instruction (0: none)."""
    widest = {"ld": 0, "st": 0}
    for op, vec, bits in _ACCESS.findall(ptx):
        widest[op] = max(widest[op], int(vec or 1) * int(bits) // 8)
    return widest


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*)$")


def _sass_ops(sass: str) -> list[tuple]:
    """(address, predicated, opcode, operands) of each instruction of a SASS listing."""
    return [(int(m.group(1), 16), bool(m.group(2)), m.group(3), m.group(4))
            for m in map(_SASS_LINE.match, sass.splitlines()) if m]


def _loops(ops: list[tuple]) -> list[tuple[int, int]]:
    """(first, last address) of each loop: a branch back to a lower address closes one."""
    loops = []
    for addr, _, op, rest in ops:
        target = re.match(r"\s*0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target is not None and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    return loops


def main_loop(sass: str) -> dict:
    """The kernel's main loop in its SASS: of the loops (a branch back to a lower address
    closes one, unless the range holds the kernel's unpredicated EXIT: then it is the
    return from an out-of-line block, such as a barrier's retry), the one with the most
    tensor-core instructions (HGMMA: wgmma, or HMMA: mma.sync, which a tile too small for
    warpgroup MMA falls back to), the shortest on a tie (the inner of nested loops).
    Returns its instruction count, conditional blocks inside it included (a tail block's
    select, say), its HGMMA and HMMA counts and its local-memory accesses (LDL / STL: the
    register spills it reloads or stores every step, where spills outside it cost once per
    program); zeros without a loop. The loop's size is what registers and spills do not
    show: the instructions issued per step besides the products (the keys-major dK/dV
    step's lse/delta loads were half of it once)."""
    ops = _sass_ops(sass)
    exits = [a for a, predicated, op, _ in ops if op == "EXIT" and not predicated]
    best = (0, 0, 0, 0, 0)  # (tensor-core instructions, -instructions, hgmma, hmma, local)
    for start, end in _loops(ops):
        if any(start <= a <= end for a in exits):
            continue
        body = [o for a, _, o, _ in ops if start <= a <= end]
        hgmma = sum(o.startswith("HGMMA") for o in body)
        hmma = sum(o.startswith("HMMA") for o in body)
        local = sum(o.startswith(("LDL", "STL")) for o in body)
        best = max(best, (hgmma + hmma, -len(body), hgmma, hmma, local))
    return {"loop_instructions": -best[1], "loop_hgmma": best[2], "loop_hmma": best[3], "loop_local_ops": best[4]}


def _compile(spec: dict, sm: int):
    """(the compiled kernel of a spec for sm_<sm> (sm_90: sm_90a), as its launch builds it,
    its options, the log of the ptxas run that assembled it). Compiled anew, past Triton's
    cache, so that its own ptxas run (with its own flags: Triton 3.8 adds
    --regAllocOptLevel=2) reports the spills of exactly this cubin."""
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    from vdit_kernels.triton import COMPILE_OPTIONS

    spec = with_unit_args(spec)
    src = triton.compiler.ASTSource(fn=spec["fn"], signature=spec["signature"],
                                    constexprs=spec.get("constexprs", {}), attrs=launch_attrs(spec))
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3),
               **COMPILE_OPTIONS}
    if spec.get("maxnreg"):  # a register cap, as the launch passes it
        options["maxnreg"] = spec["maxnreg"]
    # Triton prints its ptxas log (ptxas -v) with print() when asked to
    log = io.StringIO()
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", sm, 32), options=options)
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    return kernel, options, log.getvalue()


_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_spec(spec: dict, sass: bool = True) -> dict:
    """A spec's row. sass=False skips the disassembly (its main-loop fields are then zeros),
    the slowest step: about 0.4 s of cuobjdump for an attention kernel."""
    kernel, options, ptxas_log = _compile(spec, SM)
    if "Used" not in ptxas_log:  # no log: this Triton assembles differently; nothing is guessed
        raise RuntimeError(f"{spec['name']}: Triton printed no ptxas log (knobs.nvidia.dump_ptxas_log)")
    ptx = kernel.asm["ptx"]
    spills = [int(a) + int(b) for a, b in _SPILLS.findall(ptxas_log)]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(nvidia_tool("cuobjdump")), "-res-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        loop = main_loop(subprocess.run([str(nvidia_tool("cuobjdump")), "-sass", str(cubin)],
                                        capture_output=True, text=True, check=True).stdout if sass else "")
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {
        "kernel": spec["name"],
        "registers": int(fields.get("REG", 0)),
        "spill_bytes": sum(spills) + int(fields.get("LOCAL", 0)),
        "stack_bytes": int(fields.get("STACK", 0)),
        "static_shared_bytes": int(fields.get("SHARED", 0)),
        "shared_bytes": int(kernel.metadata.shared),
        "num_warps": options["num_warps"],
        "maxnreg": options.get("maxnreg"),
        "wgmma": "wgmma" in ptx,
        "tma": "cp.async.bulk.tensor" in ptx,
        "expect_tma": bool(spec.get("expect_tma", False)),
        "mma": "mma.sync" in ptx or "wgmma" in ptx,
        "expect_mma": bool(spec.get("expect_mma", False)),
        "spill_budget": int(spec.get("spill_budget", 0)),
        "loop_spill_free": bool(spec.get("loop_spill_free", False)),
        "load_bytes": widest_access(ptx)["ld"],
        "store_bytes": widest_access(ptx)["st"],
        "min_access_bytes": int(spec.get("min_access_bytes", 0)),
        **loop,
    }


# GPUs of compute capability 8.6 / 8.9 (RTX 3090 / 4090, A10, L4, L40S) and 12.0 (RTX 5090,
# RTX PRO 6000) give a program 99 KB of shared memory, against 163 KB on an A100 and 227 KB
# on an H100 or B200; the first run the pointer variants, the second also the TMA ones
SMALL_SM, SMALL_TMA_SM, SMALL_SHARED = 86, 120, 101376


def launch_of(name: str) -> str:
    """The launch a spec is a candidate of: "<kernel> <dtype> d=<D>" for attention tiles,
    the part before ": " for specs named "<launch>: <config>", else the spec itself."""
    if name.startswith("attn_"):
        return " ".join(name.split(" ")[:3])
    return name.split(": ")[0]


def _small_gpu_group(names: list[str]) -> dict:
    """The first candidate (list order) of one launch whose build for a 99 KB GPU (sm_86;
    TMA variants: sm_120) fits SMALL_SHARED: the tile a fixed launch falls to there
    (vdit_kernels.triton.launch_first_that_fits)."""
    by_name = {s["name"]: s for s in all_specs()}
    sm = SMALL_TMA_SM if by_name[names[0]].get("expect_tma") else SMALL_SM
    tried = []
    for name in names:
        tried.append((name, int(_compile(by_name[name], sm)[0].metadata.shared)))
        if tried[-1][1] <= SMALL_SHARED:
            break
    fits = tried[-1][1] <= SMALL_SHARED
    return {"launch": launch_of(names[0]), "sm": sm, "runs": tried[-1][0] if fits else None,
            "shared_bytes": tried[-1][1] if fits else None, "too_large": tried[:-1] if fits else tried}


def all_specs() -> list[dict]:
    import vdit_kernels.triton as pkg

    specs = []
    for mod in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"vdit_kernels.triton.{mod.name}")
        if hasattr(module, "aot_specs"):
            specs.extend(module.aot_specs())
    return specs


def _task(task: tuple, sass: str) -> dict:
    kind, arg = task
    if kind == "small":
        return _small_gpu_group(arg)
    spec = all_specs()[arg]
    return compile_spec(spec, sass=sass == "all" or bool(spec.get("loop_spill_free")))


def report(jobs: int | None = None, sass: str = "all") -> tuple[list[dict], list[dict]]:
    """(a row per spec compiled for sm_90a, a _small_gpu_group per launch), all built in
    one pool of `jobs` worker processes (default: one per CPU core), since each compile is
    single-threaded and there are hundreds of them. sass="checked" disassembles only the
    specs whose main loop is checked (loop_spill_free): every problem is still found, in
    about half the time (the test suite's run)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the static report compiles real kernels")
    specs = all_specs()
    groups: dict = {}
    for spec in specs:
        groups.setdefault(launch_of(spec["name"]), []).append(spec["name"])
    if sass not in ("all", "checked"):
        raise ValueError(f"sass must be 'all' or 'checked', got {sass!r}")
    tasks = [("spec", i) for i in range(len(specs))] + [("small", g) for g in groups.values()]
    done = _map(functools.partial(_task, sass=sass), tasks, jobs)
    return done[:len(specs)], done[len(specs):]


def _map(fn, items: list, jobs: int | None) -> list:
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(items)))
    if jobs == 1:
        return [fn(x) for x in items]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: forking a process that already imported torch and triton is not safe
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(fn, items))


# CUDA kernels whose load/store loops must issue every global load of a step before any
# loaded value is used (memory-bound: bytes in flight are what they run on); the tiled
# RoPE kernel once unpacked each load inside its own branch, so each waited for the one
# before (H200 ncu, 2026-11-28); the patch kernel's staging loops (global loads into
# shared memory) are held to 32 registers, where the compiler could trade that batching
# for registers
LOADS_FIRST_KERNELS = ("rope_tiled_kernel", "patch_kernel")
_REG = re.compile(r"\bR(\d+)(?:\.64)?\b")


def _registers(operands: str) -> set[int]:
    """Registers an operand list names (R32.64: R32 and R33)."""
    out = set()
    for m in _REG.finditer(operands):
        out.add(int(m.group(1)))
        if m.group(0).endswith(".64"):
            out.add(int(m.group(1)) + 1)
    return out


def loop_loads(sass: str) -> dict:
    """Of a kernel's innermost loops that hold global loads and stores, global or shared (a
    branch back to a lower address closes a loop; a kernel may have one per layout), the worst: its global
    loads (LDG, not the read-only constant tables' LDG.CONSTANT) and how many of them
    issue before the first instruction that reads a register one of them wrote. Equal
    counts: every load of a step in flight together. Zeros without such a loop."""
    ops = _sass_ops(sass)
    loops = []
    for start, end in _loops(ops):
        body = [(o, r) for a, _, o, r in ops if start <= a <= end]
        if any(_global_load(o) for o, _ in body) and any(o.startswith(("STG", "STS")) for o, _ in body):
            loops.append((start, end, body))
    innermost = [body for lo, hi, body in loops
                 if not any(lo <= lo2 and hi2 <= hi and (lo2, hi2) != (lo, hi) for lo2, hi2, _ in loops)]
    worst = {"loop_loads": 0, "loop_loads_first": 0}
    for body in innermost:
        loaded, total, first, used = set(), 0, 0, False
        for op, rest in body:
            if _global_load(op):
                total += 1
                first += not used
                dst = re.match(r"\s*R(\d+)", rest)
                width = {"128": 4, "64": 2}.get(op.rsplit(".", 1)[-1], 1)
                if dst:
                    loaded.update(range(int(dst.group(1)), int(dst.group(1)) + width))
                continue
            # a store reads every register it names; anything else, those after its destination
            reads = _registers(rest if op.startswith("ST") else rest.split(",", 1)[1] if "," in rest else "")
            used = used or bool(reads & loaded)
        if not worst["loop_loads"] or total - first > worst["loop_loads"] - worst["loop_loads_first"]:
            worst = {"loop_loads": total, "loop_loads_first": first}
    return worst


def sass_functions(sass: str) -> dict:
    """{mangled name: its SASS} of a cuobjdump -sass listing."""
    return dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S))


def _global_load(op: str) -> bool:
    return op.startswith("LDG") and ".CONSTANT" not in op


def cuda_rows() -> tuple[list[dict], str]:
    """Resource use of the compiled CUDA kernels in vdit_kernels._C (sm_90a cubins), read
    with cuobjdump: ([rows], "") or ([], why there are none)."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("vdit_kernels._C")
    if spec is None or not spec.origin:
        return [], "vdit_kernels._C is not built"
    usage = subprocess.run([str(nvidia_tool("cuobjdump")), "-res-usage", spec.origin],
                           capture_output=True, text=True).stdout
    rows, arch = [], None
    names = []
    for line in usage.splitlines():
        m = re.match(r"\s*arch = (\S+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            names.append(m.group(1))
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and arch == f"sm_{SM}a" and names:
            reg, stack, shared, local = (int(x) for x in m.groups())
            rows.append({"kernel": names[-1], "registers": reg, "spill_bytes": local,
                         "stack_bytes": stack, "shared_bytes": shared})
    if not rows:
        return [], f"vdit_kernels._C has no sm_{SM}a kernels (a CPU-only build, or another arch list)"
    if any(k in r["kernel"] for r in rows for k in LOADS_FIRST_KERNELS):
        sass = subprocess.run([str(nvidia_tool("cuobjdump")), "-sass", "-arch", f"sm_{SM}a", spec.origin],
                              capture_output=True, text=True).stdout
        functions = sass_functions(sass)
        for r in rows:  # (a kernel the listing lacks gets zeros: a problem, not a pass)
            if any(k in r["kernel"] for k in LOADS_FIRST_KERNELS):
                r.update(loop_loads(functions.get(r["kernel"], "")), loads_first=True)
    if shutil.which("c++filt"):
        plain = subprocess.run(["c++filt"], input="\n".join(r["kernel"] for r in rows),
                               capture_output=True, text=True).stdout.splitlines()
        for r, name in zip(rows, plain):
            # "void vdit::(anonymous namespace)::patch_kernel<unsigned short, true>(...)"
            name = name.replace("(anonymous namespace)::", "").replace("vdit::", "")
            # (the argument list only: a template argument may hold a cast, "(RopeTiling)0")
            r["kernel"] = re.sub(r"^void |\([^()]*\)$", "", name)
    return rows, ""


def cuda_problems(rows: list[dict]) -> list[str]:
    """The CUDA kernels' problems: local memory (spills), and a LOADS_FIRST_KERNELS kernel
    whose loop uses a loaded value before its last load (or whose loop was not found)."""
    out = [f"{r['kernel']} (CUDA): {r['spill_bytes']} B of local memory" for r in rows if r["spill_bytes"]]
    for r in rows:
        if r.get("loads_first") and not (0 < r["loop_loads"] == r["loop_loads_first"]):
            out.append(f"{r['kernel']} (CUDA): {r['loop_loads_first']} of the {r['loop_loads']} global loads of "
                       "its loop issue before a loaded value is used; all should")
    return out


def problems(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        # spill_budget: for extra autotuning candidates, which the autotuner keeps only
        # where they measure faster, and for the default tiles a GPU measured fastest
        # (attention's MEASURED_DEFAULTS); loop_spill_free: the pointer variants' default
        # tiles, which deterministic=True and VDIT_AUTOTUNE=0 run, may not spill per step
        if r["spill_bytes"] > r.get("spill_budget", 0):
            out.append(f"{r['kernel']}: {r['spill_bytes']} B of register spills"
                       + (f" (budget {r['spill_budget']} B)" if r.get("spill_budget") else ""))
        if r.get("loop_spill_free") and r.get("loop_local_ops"):
            out.append(f"{r['kernel']}: {r['loop_local_ops']} local-memory accesses (spills) in its main loop, "
                       "a default tile's")
        if r["expect_mma"] and not r["wgmma"]:
            out.append(f"{r['kernel']}: no wgmma instruction in the sm_90a PTX")
        if r.get("expect_tma") and not r.get("tma"):
            out.append(f"{r['kernel']}: no TMA copy (cp.async.bulk.tensor) in the sm_90a PTX")
        if r.get("maxnreg"):
            # a register cap is for two programs per SM (sm_90: 64K registers, 228 KB of
            # shared memory, 1 KB of it reserved per program)
            if 2 * r["num_warps"] * 32 * r["registers"] > 65536 or 2 * (r["shared_bytes"] + 1024) > 228 * 1024:
                out.append(f"{r['kernel']}: capped at {r['maxnreg']} registers, but {r['registers']} "
                           f"registers and {r['shared_bytes']} B of shared memory leave no room for a "
                           "second program on an SM")
        need = r.get("min_access_bytes", 0)
        if need and min(r["load_bytes"], r["store_bytes"]) < need:
            out.append(f"{r['kernel']}: widest global load/store {r['load_bytes']}/{r['store_bytes']} B, "
                       f"expected {need} B vectors")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.static_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU cores)")
    parser.add_argument("--sass", choices=("all", "checked"), default="all",
                        help="disassemble every kernel for its main loop (all), or only those whose "
                             "main loop is checked (checked: same problems found, about half the time)")
    args = parser.parse_args(argv)
    rows, small = report(args.jobs, args.sass)
    print(f"Static report: Triton kernels compiled for sm_{SM}a (no GPU needed)")
    print("(ld/st B: the widest global load / store per thread and instruction, 16 = 128-bit vectors;")
    print(" loop: SASS instructions / HGMMA / HMMA / local-memory accesses of the main loop, per warp")
    print(" and step: main_loop(); -: no loop" + (", or not disassembled (--sass checked))" if args.sass == "checked"
                                                  else ")"))
    print(f"{'kernel':<50}{'warps':>6}{'regs':>6}{'spill B':>9}{'stack B':>9}{'smem B':>9}{'wgmma':>7}"
          f"{'ld/st B':>9}{'loop':>15}")
    for r in rows:
        loop = (f"{r['loop_instructions']}/{r['loop_hgmma']}/{r['loop_hmma']}/{r['loop_local_ops']}"
                if r["loop_instructions"] else "-")
        print(f"{r['kernel']:<50}{r['num_warps']:>6}{r['registers']:>6}{r['spill_bytes']:>9}"
              f"{r['stack_bytes']:>9}{r['shared_bytes']:>9}{('yes' if r['wgmma'] else 'no'):>7}"
              f"{r['load_bytes']:>5}/{r['store_bytes']:<3}{loop:>15}")
    print(f"\nOn GPUs with {SMALL_SHARED // 1024} KB of shared memory a program (sm_{SMALL_SM} / sm_89; "
          f"TMA variants: sm_{SMALL_TMA_SM}), launches whose first candidate does not fit:")
    for r in small:
        if r["too_large"]:
            tile = lambda name: name[len(r["launch"]):].lstrip(": ")  # noqa: E731
            skipped = ", ".join(f"{tile(n)} ({b} B)" for n, b in r["too_large"])
            runs = f"{tile(r['runs'])} ({r['shared_bytes']} B)" if r["runs"] else "NOTHING FITS"
            print(f"  {r['launch']:<32} sm_{r['sm']}: {skipped} -> {runs}")
    cuda, why = cuda_rows()
    print(f"\nCUDA kernels of vdit_kernels._C, sm_{SM}a cubins (cuobjdump -res-usage)")
    if why:
        print(f"  none: {why}")
    for r in cuda:
        loads = (f"  loop loads {r['loop_loads_first']}/{r['loop_loads']} before a use" if r.get("loads_first")
                 else "")
        print(f"  {r['kernel']:<48}{r['registers']:>6} regs{r['spill_bytes']:>6} B local"
              f"{r['stack_bytes']:>6} B stack{r['shared_bytes']:>7} B static smem{loads}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
        Path(args.json).with_name(Path(args.json).stem + "_cuda.json").write_text(json.dumps(cuda, indent=2))
        Path(args.json).with_name(Path(args.json).stem + "_small_gpus.json").write_text(json.dumps(small, indent=2))
    bad = problems(rows) + cuda_problems(cuda)
    bad += [f"{r['launch']}: no candidate fits the {SMALL_SHARED} B of shared memory of an sm_{r['sm']} GPU"
            for r in small if r["runs"] is None]
    for line in bad:
        print("PROBLEM:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
