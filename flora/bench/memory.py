"""Peak memory for the benchmarks: CUDA's allocator statistics on a GPU, the
process's resident set on the host (Linux: ``VmHWM`` in /proc/self/status,
reset through /proc/self/clear_refs)."""
from __future__ import annotations

import torch


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split(field + ":")[1].split()[0]) * 1024


def resident_bytes(device) -> int:
    """Bytes in use now: allocated tensors on CUDA, the resident set on the host."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _status("VmRSS")


def reset_peak(device) -> int:
    """Start a new peak at what is in use now; returns that (``resident_bytes``)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident set (VmHWM) restarts from the current one
    return resident_bytes(device)


def peak_bytes(device) -> int:
    """The most in use since :func:`reset_peak`."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _status("VmHWM")
