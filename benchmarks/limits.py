"""Hardware limits measured in the same run, so "% of limit" compares like with like.

bandwidth: device-to-device copy of a large buffer, GB/s counting read + write; timed as
           the ops are (median of calls from an idle GPU), and on a GPU also by the
           profiler's device time alone (bandwidth_device_gbs), the rate the kernels' own
           device time is compared with (like with like: the timed copy includes its launch,
           and its rate read 0.5-1.6% under the device-only one on the H100 and H200).
compute:   a large bf16 matmul (fp32 accumulate), TFLOP/s.
On CPU both are measured at small sizes in float32 and labelled a smoke test.
"""
from __future__ import annotations

import torch

from .timing import bench, copy_kernel_ms

CPU_LABEL = "CPU smoke test, not a performance result"


def measure(device: str, quick: bool = False) -> dict:
    if device == "cuda":
        n_bytes = 1 << 30  # 1 GiB: far beyond any L2
        src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
        dst = torch.empty_like(src)
        copy = bench(lambda: dst.copy_(src), device, quick=quick)
        del src, dst
        device_ms = copy_kernel_ms(2 * n_bytes, device, quick=quick)
        m = 8192
        dtype = torch.bfloat16
        label = f"{torch.cuda.get_device_name()}: 1 GiB D2D copy, {m}^3 bf16 matmul"
    else:
        n_bytes = 64 << 20
        src = torch.empty(n_bytes // 4, dtype=torch.float32).normal_()
        dst = torch.empty_like(src)
        copy = bench(lambda: dst.copy_(src), device, quick=True)
        m = 512
        dtype = torch.float32
        label = CPU_LABEL
        device_ms = None
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    mm = bench(lambda: a @ b, device, quick=quick or device != "cuda")
    return {
        "bandwidth_gbs": 2 * n_bytes / (copy["median_ms"] * 1e-3) / 1e9,
        "bandwidth_device_gbs": 2 * n_bytes / (device_ms * 1e-3) / 1e9 if device_ms else None,
        "compute_tflops": 2 * m ** 3 / (mm["median_ms"] * 1e-3) / 1e12,
        "copy_bytes": n_bytes,
        "matmul_size": m,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "label": label,
    }
