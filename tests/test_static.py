"""Every Triton kernel compiles ahead of time for sm_90a (no GPU) without register spills
(extra autotuning candidates: within their stated budget; defaults: none); the CUDA
kernels (csrc/*.cu) too, for sm_90a and sm_80, where a CUDA toolkit is installed."""
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import vdit_kernels.triton as triton_pkg

ROOT = Path(__file__).resolve().parents[1]


def test_every_triton_module_lists_its_kernels():
    # (a module without kernels, such as tuning_cache, has nothing to list)
    with_kernels = []
    for mod in pkgutil.iter_modules(triton_pkg.__path__):
        source = (Path(triton_pkg.__path__[0]) / f"{mod.name}.py").read_text()
        if "@triton.jit" in source:
            with_kernels.append(mod.name)
            assert "def aot_specs(" in source, f"vdit_kernels/triton/{mod.name}.py has no aot_specs()"
    assert {"attention", "patch", "rope"} <= set(with_kernels)


def _launches(source: str):
    """(line, names passed with **) of every `kernel[grid](...)` call in the source."""
    import ast

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            yield node.lineno, {k.value.id for k in node.keywords if k.arg is None and isinstance(k.value, ast.Name)}


def test_every_kernel_launch_passes_the_compile_options():
    # Triton 3.10 turns FMA contraction off by default (3.9 warns); every launch asks for
    # it (vdit_kernels.triton.COMPILE_OPTIONS), so the kernels compile the same everywhere
    launches = 0
    for mod in pkgutil.iter_modules(triton_pkg.__path__):
        path = Path(triton_pkg.__path__[0]) / f"{mod.name}.py"
        for line, starred in _launches(path.read_text()):
            launches += 1
            assert "COMPILE_OPTIONS" in starred, f"{path.name}:{line} launches a kernel without **COMPILE_OPTIONS"
    assert launches >= 10
    assert triton_pkg.COMPILE_OPTIONS == {"enable_fp_fusion": True}


def test_launch_finder_sees_a_launch_without_the_options():
    found = list(_launches("k[(1,)](x, BLOCK=4, num_warps=4)\nk[g](x, **COMPILE_OPTIONS)\ny = a[0]"))
    assert found == [(1, set()), (2, {"COMPILE_OPTIONS"})]


def _raw_loop_bounds(source: str):
    """(line, bound) of every range() / tl.range() argument in a @triton.jit function that
    is neither a literal, a constexpr parameter nor a loop_bound(...) call."""
    import ast

    for fn in ast.walk(ast.parse(source)):
        if not (isinstance(fn, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in fn.decorator_list)):
            continue
        constexprs = {a.arg for a in fn.args.args if a.annotation is not None and "constexpr" in ast.unparse(a.annotation)}
        for node in ast.walk(fn):
            if isinstance(node, ast.For) and isinstance(node.iter, ast.Call) \
                    and ast.unparse(node.iter.func) in ("range", "tl.range"):
                for arg in node.iter.args:
                    if not (isinstance(arg, ast.Constant) or (isinstance(arg, ast.Name) and arg.id in constexprs)
                            or (isinstance(arg, ast.Call) and ast.unparse(arg.func) == "loop_bound")):
                        yield node.lineno, ast.unparse(arg)


def test_runtime_loop_bounds_go_through_loop_bound():
    # Triton 3.6's interpreter cannot take a runtime scalar as a range() bound under numpy
    # >= 2.4 (vdit_kernels.triton.loop_bound); CI meets that only in the compat job
    found = []
    for mod in pkgutil.iter_modules(triton_pkg.__path__):
        path = Path(triton_pkg.__path__[0]) / f"{mod.name}.py"
        found += [f"{path.name}:{line} {bound}" for line, bound in _raw_loop_bounds(path.read_text())]
    assert not found, f"range() bounds not passed through loop_bound(): {found}"


def test_loop_bound_finder_sees_a_raw_bound():
    src = ("@triton.jit\ndef k(N, B: tl.constexpr):\n    for i in range(0, N, B):\n        pass\n"
           "    for i in range(loop_bound(N), 8):\n        pass\n"
           "def host(n):\n    for i in range(n):\n        pass\n")
    assert list(_raw_loop_bounds(src)) == [(3, "N")]


def test_static_report_sm90a_no_spills(tmp_path):
    # through the benchmark run's own call (CI's quick benchmark run passes --no-static: this
    # is the run); --sass checked disassembles only the kernels whose main loop a check reads
    # (the rest of the disassembly is for review)
    from benchmarks.run import static_report
    from benchmarks.static_report import all_specs, launch_of

    line = static_report(tmp_path, sass="checked")
    if (tmp_path / "static_report.txt").exists():
        print((tmp_path / "static_report.txt").read_text())  # shown where the test fails
    assert line.endswith(" 0 problems -> static_report.json"), line
    out = tmp_path / "static_report.json"
    rows = json.loads(out.read_text())
    assert rows, "the static report compiled no kernel"
    assert all(r["registers"] > 0 for r in rows)
    assert all(r["spill_bytes"] <= r["spill_budget"] for r in rows)
    checked = [r for r in rows if r["loop_spill_free"]]
    # (those on tensor cores: a loop without products is not told from the rest)
    assert checked and all(r["loop_instructions"] > 0 for r in checked if r["expect_mma"]), "a main loop was not read"
    # on a 99 KB GPU every launch has a tile that fits, and the D = 128 dQ default does not
    small = {r["launch"]: r for r in json.loads((tmp_path / "static_report_small_gpus.json").read_text())}
    assert len(small) == len({launch_of(s["name"]) for s in all_specs()})
    assert all(r["runs"] and r["shared_bytes"] <= 101376 for r in small.values())
    for launch, sm in (("attn_bwd_dq bf16 d=128", 86), ("attn_bwd_dq_tma bf16 d=128", 120)):
        assert small[launch]["sm"] == sm
        assert small[launch]["too_large"], "the 136 KB dQ default fits 99 KB now: update _launch's docstring"


def test_spill_budgets_only_for_extra_candidates():
    # every kernel's default tile (the first candidate of its class: "<kernel> <dtype> d=<D>"
    # followed by the tile) and every kernel without autotuning must compile spill-free,
    # but for attention's MEASURED_DEFAULTS (an H100 measured the spilling tile fastest),
    # and the pointer variants' default attention tiles may not spill inside their loop
    from benchmarks.static_report import all_specs, launch_of
    from vdit_kernels.triton import attention

    seen, measured = set(), set()
    for spec in all_specs():
        group = launch_of(spec["name"])
        if group not in seen:
            if spec.get("measured_default"):
                measured.add(group)
            else:
                assert not spec.get("spill_budget"), f"{spec['name']} is a default tile and has a spill budget"
            if group.startswith("attn_") and "_tma " not in group:
                assert spec.get("loop_spill_free"), spec["name"]
        else:
            assert not spec.get("loop_spill_free") and not spec.get("measured_default"), spec["name"]
        seen.add(group)
    # every measured default is the first tile of its lists, in both half dtypes
    assert measured == {f"attn_bwd_{tag} {dtype} d=128" for tag, cls in attention.MEASURED_DEFAULTS
                        for dtype in ("bf16", "fp16")}


def test_problems_flag_spills_inside_a_default_tiles_loop():
    from benchmarks.static_report import problems

    row = dict(kernel="k", spill_bytes=400, spill_budget=512, expect_mma=False, wgmma=False,
               loop_spill_free=True, loop_local_ops=0)
    assert problems([row]) == []
    assert "in its main loop" in problems([dict(row, loop_local_ops=3)])[0]
    assert problems([dict(row, loop_local_ops=3, loop_spill_free=False)]) == []
    assert "register spills" in problems([dict(row, spill_bytes=600)])[0]


def test_widest_access_reads_ptx_vector_widths():
    from benchmarks.static_report import widest_access

    ptx = """
        ld.global.b16 {%rs1}, [%rd1];
        @%p1 ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd2 + 0];
        ld.global.nc.L1::evict_last.v2.b32 {%r5, %r6}, [%rd3];
        st.global.v2.b16 [%rd4], {%rs2, %rs3};
        st.shared.v4.b32 [%r7], {%r1, %r2, %r3, %r4};
    """
    assert widest_access(ptx) == {"ld": 16, "st": 4}
    assert widest_access("mov.u32 %r1, 0;") == {"ld": 0, "st": 0}


def test_launch_specialization_of_static_specs():
    # the report compiles what a launch compiles: 16-divisible pointers and strides, unit
    # strides as the constant 1, the listed exceptions left alone
    from benchmarks.static_report import launch_attrs, with_unit_args
    from vdit_kernels.triton import patch

    spec = next(s for s in patch.aot_specs() if s["name"].startswith("patchify bf16"))
    spec = with_unit_args(spec)
    assert spec["signature"]["stride_of"] == "constexpr" and spec["constexprs"]["stride_of"] == 1
    names = spec["fn"].arg_names
    marked = {names[k[0]] for k in launch_attrs(spec)}
    assert {"out_ptr", "stride_on", "F"} <= marked
    assert "stride_of" not in marked and "B" not in marked
    spec["unaligned_args"] = ["stride_on"]
    assert "stride_on" not in {names[k[0]] for k in launch_attrs(spec)}


def test_register_capped_kernels_must_leave_room_for_a_second_program():
    from benchmarks.static_report import problems

    row = dict(kernel="k", spill_bytes=0, expect_mma=False, wgmma=False, maxnreg=128, num_warps=8,
               registers=128, shared_bytes=98320)
    assert problems([row]) == []
    assert "no room for a second program" in problems([dict(row, shared_bytes=120 * 1024)])[0]
    assert "no room for a second program" in problems([dict(row, num_warps=16)])[0]


def test_main_loop_reads_sass_loops():
    # two nested loops (the inner one holds the products), an out-of-line retry stub with
    # its unconditional jump back, and a predicated tail block inside the inner loop
    from benchmarks.static_report import main_loop

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R3, R4, RZ ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0030*/                   MUFU.EX2 R5, R5 ;
        /*0040*/               @P1 BRA 0x60 ;
        /*0050*/                   FSEL R6, R6, RZ, P2 ;
        /*0060*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0070*/              @!P0 BRA 0x20 ;
        /*0080*/               @P3 BRA 0x10 ;
        /*0090*/                   EXIT ;
        /*00a0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P4, [UR5], R7 ;
        /*00b0*/              @!P4 BRA 0xa0 ;
        /*00c0*/                   BRA 0x0 ;
    """
    assert main_loop(sass) == {"loop_instructions": 6, "loop_hgmma": 2, "loop_hmma": 0, "loop_local_ops": 0}
    # a while loop (the test at the top, an unconditional jump back) on mma.sync
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/               @P0 BRA 0x50 ;
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R14, R4 ;
        /*0040*/                   BRA 0x10 ;
        /*0050*/                   EXIT ;
    """
    assert main_loop(sass) == {"loop_instructions": 4, "loop_hgmma": 0, "loop_hmma": 2, "loop_local_ops": 0}
    # a spill reloaded and stored every step, and one before the loop
    sass = """
        /*0000*/                   STL [R1+0x10], R9 ;
        /*0010*/                   LDL R9, [R1+0x10] ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/                   STL.64 [R1+0x18], R10 ;
        /*0040*/               @P0 BRA 0x10 ;
        /*0050*/                   EXIT ;
    """
    assert main_loop(sass) == {"loop_instructions": 4, "loop_hgmma": 1, "loop_hmma": 0, "loop_local_ops": 2}
    assert main_loop("        /*0000*/                   EXIT ;") == {"loop_instructions": 0, "loop_hgmma": 0,
                                                                     "loop_hmma": 0, "loop_local_ops": 0}


def test_loop_loads_counts_the_loads_issued_before_a_use():
    # two loops: the first unpacks its first load (PRMT reads R16) before its second load
    # issues, the second issues both first (a store reads its address and data registers);
    # the worse one is reported; LDG.CONSTANT (sincosf's table) is not a load of the data
    from benchmarks.static_report import cuda_problems, loop_loads

    sass = """
        /*0000*/                   LDG.E.CONSTANT R2, desc[UR4][R4.64] ;
        /*0010*/                   LDG.E.128 R16, desc[UR4][R8.64] ;
        /*0020*/                   PRMT R27, R16, 0x7610, R27 ;
        /*0030*/                   LDG.E.128 R20, desc[UR4][R10.64] ;
        /*0040*/                   STG.E.128 desc[UR4][R12.64], R20 ;
        /*0050*/               @P0 BRA 0x10 ;
        /*0060*/                   LDG.E.64 R16, desc[UR4][R8.64] ;
        /*0070*/                   LDG.E.64 R18, desc[UR4][R10.64] ;
        /*0080*/                   IMAD.U32 R30, R17, 0x10000, RZ ;
        /*0090*/                   STG.E.64 desc[UR4][R12.64], R30 ;
        /*00a0*/               @P1 BRA 0x60 ;
        /*00b0*/                   EXIT ;
    """
    assert loop_loads(sass) == {"loop_loads": 2, "loop_loads_first": 1}
    assert loop_loads(sass[sass.index("        /*0060*/"):]) == {"loop_loads": 2, "loop_loads_first": 2}
    assert loop_loads("        /*0000*/                   EXIT ;") == {"loop_loads": 0, "loop_loads_first": 0}
    # a staging loop (global loads into shared memory, the patch kernel's) counts too
    staged = sass.replace("STG.E.128 desc[UR4][R12.64], R20", "STS.128 [R12], R20")
    assert loop_loads(staged) == {"loop_loads": 2, "loop_loads_first": 1}
    row = {"kernel": "rope_tiled_kernel<float, 4, 0>", "spill_bytes": 0, "loads_first": True}
    assert cuda_problems([dict(row, loop_loads=2, loop_loads_first=2)]) == []
    assert "1 of the 2 global loads" in cuda_problems([dict(row, loop_loads=2, loop_loads_first=1)])[0]
    assert "0 of the 0" in cuda_problems([dict(row, loop_loads=0, loop_loads_first=0)])[0]


def test_cuda_kernels_compile_without_spills(tmp_path):
    # the CUDA kernels (csrc/*.cu) as setup.py builds them for sm_90a (and sm_80, its oldest
    # target), through ptxas -v: no spill stores or loads in any kernel (RoPE's 32-byte stack
    # frame is sincosf's slow-path argument reduction, not a spill)
    import importlib.util
    import re

    import pytest
    from torch.utils.cpp_extension import include_paths

    spec = importlib.util.spec_from_file_location("vdit_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    home, how = setup.real_cuda_home()
    if home is None:
        pytest.skip(f"no CUDA toolkit: {how}")
    flags = ["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc'}",
             *(f"-I{p}" for p in include_paths()), "-Xptxas", "-v", "-cubin"]
    kernels = {}
    for source in sorted((ROOT / "csrc").glob("*.cu")):
        for arch in ("sm_90a", "sm_80"):
            proc = subprocess.run([str(home / "bin" / "nvcc"), *flags, f"-arch={arch}", str(source),
                                   "-o", str(tmp_path / f"{source.stem}_{arch}.cubin")],
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-4000:]
            # ptxas prints, per kernel: "Compiling entry function 'NAME' for 'sm_XX'", then
            # "N bytes stack frame, S bytes spill stores, L bytes spill loads", "Used R registers"
            for name, body in re.findall(r"Compiling entry function '(\w+)' for '\w+'(.*?)(?=Compiling entry|\Z)",
                                         proc.stderr, re.S):
                spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
                registers = re.search(r"Used (\d+) registers", body)
                assert spills and registers, body
                kernels[f"{source.name} {arch} {name}"] = (int(registers.group(1)), int(spills.group(1)),
                                                           int(spills.group(2)))
    for name, (registers, stores, loads) in sorted(kernels.items()):
        print(f"{name}: {registers} registers, spills {stores} B stored / {loads} B loaded")
    assert len(kernels) >= 2 * (4 + 9), sorted(kernels)  # patch: 2 dtypes x 2 directions; rope: 3 x 3 widths
    assert not {name: k for name, k in kernels.items() if k[1] or k[2]}, "CUDA kernels spill"
    # the tiled RoPE kernels' loops and the patch kernel's staging loops (held to 32
    # registers) issue every load of a step before using any loaded value
    from benchmarks.static_report import (LOADS_FIRST_KERNELS, cuda_problems, loop_loads, nvidia_tool,
                                          sass_functions)
    checked = []
    for stem in ("rope", "patch"):
        sass = subprocess.run([str(nvidia_tool("cuobjdump")), "-sass", str(tmp_path / f"{stem}_sm_90a.cubin")],
                              capture_output=True, text=True, check=True).stdout
        checked += [{"kernel": name, "spill_bytes": 0, "loads_first": True, **loop_loads(body)}
                    for name, body in sass_functions(sass).items() if any(k in name for k in LOADS_FIRST_KERNELS)]
    # rope: 3 dtypes x 3 widths x 2 shapes; patch: 2 element sizes x 2 directions
    assert len(checked) == 3 * 3 * 2 + 2 * 2, sorted(r["kernel"] for r in checked)
    assert cuda_problems(checked) == [], checked
