"""What this build of flora runs, device by device (`python -m flora info`)."""
from __future__ import annotations

import os

import torch

from . import _ext, ops
from ._version import __version__


def info() -> dict:
    """Describe the build: extension status, CPU ISA, CUDA archs, and for each
    op and device which implementation runs (compiled kernel or reference)."""
    C = _ext.C
    d = {
        "flora": __version__,
        "torch": torch.__version__,
        "extension": "compiled" if C is not None else f"missing ({_ext.ERROR})",
        "cpu_isa": C.cpu_isa() if C else None,
        "cpu_isa_detected": C.detected_cpu_isa() if C else None,
        "avx512_bf16": C.has_avx512_bf16() if C else None,
        "amx_bf16": C.has_amx_bf16() if C else None,  # the CPU decode kernels' M cutoffs follow it
        "cuda_archs": (C.cuda_archs() or None) if C else None,
        "cuda_available": torch.cuda.is_available(),
        "kernels": [],
    }
    d["cuda_kernels"] = cuda_kernels()
    if C is not None:
        for op, dev, impl, when in C.kernel_info():
            d["kernels"].append({"op": op, "device": dev, "impl": impl, "when": when})
    for op, devices in ops.REFERENCE_DEVICES.items():
        for dev in devices:
            d["kernels"].append(
                {"op": op, "device": dev, "impl": "python reference (not compiled)", "when": "all shapes"}
            )
    return d


def cuda_kernels() -> list:
    """The custom CUDA kernels and their state: not compiled (CPU build),
    compiled but not verified on a device (dispatched only with
    FLORA_CUDA_KERNELS=1), or verified (device and date)."""
    C = _ext.C
    if C is None or not hasattr(C, "cuda_kernels"):
        return []
    forced = os.environ.get("FLORA_CUDA_KERNELS") == "1"
    rows = []
    for name, arch, what, verified, built in C.cuda_kernels():
        if not built:
            status = "not compiled in this build"
        elif verified:
            status = f"verified on {verified}"
        else:
            status = "compiled, not verified on a device" + (
                " (running: FLORA_CUDA_KERNELS=1)" if forced else " (off; FLORA_CUDA_KERNELS=1 runs it)"
            )
        rows.append({"name": name, "arch": arch, "what": what, "status": status})
    return rows


def format_info(d: dict | None = None) -> str:
    d = d or info()
    lines = [
        f"flora {d['flora']}  torch {d['torch']}",
        f"extension: {d['extension']}",
    ]
    if d["cpu_isa"]:  # levels: avx512_bf16 > avx512 > avx2 > aten (FLORA_CPU_ISA caps it)
        lines.append(f"cpu isa: {d['cpu_isa']} (detected {d['cpu_isa_detected']}; "
                     f"amx bf16: {'yes' if d['amx_bf16'] else 'no'})")
    lines.append(
        f"cuda: kernels built for {d['cuda_archs']}" if d["cuda_archs"] else "cuda: not built"
    )
    lines.append(f"cuda device available: {d['cuda_available']}")
    if d.get("cuda_kernels"):
        lines.append("cuda kernels:")
        w = max(len(k["name"]) for k in d["cuda_kernels"])
        for k in d["cuda_kernels"]:
            lines.append(f"  {k['name']:<{w}} {k['arch']:<14} {k['status']}")
    lines.append("ops:")
    w = max((len(k["op"]) for k in d["kernels"]), default=5)
    for k in d["kernels"]:
        lines.append(f"  {k['op']:<{w}} {k['device']:<5} {k['impl']}  [{k['when']}]")
    return "\n".join(lines)
