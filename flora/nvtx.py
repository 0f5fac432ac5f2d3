"""NVTX ranges for Nsight Systems, off by default.

The model marks prefill, each decode step and each layer's attention and MLP
with ``with flora.nvtx.range("attn", i):``. While disabled (the default) that
costs one flag test; ``enable()`` (``--nvtx`` on the benchmark) turns the
ranges on. They go to ``torch.cuda.nvtx`` on a CUDA build, else to the
``nvtx`` package when it is installed; ``enable()`` raises if neither exists,
so a user asking for ranges never silently gets none.

Inside a captured CUDA graph the ranges are recorded once, at capture; replays
of the graph show up as one graph launch per decode step.
"""
from __future__ import annotations

import contextlib

_enabled = False
_push = None
_pop = None


def _backend():
    import torch

    if torch.cuda.is_available():
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    try:
        import nvtx as _nvtx  # the `nvtx` package (works without a CUDA build of torch)
    except ImportError:
        return None
    return _nvtx.push_range, _nvtx.pop_range


def enable(flag: bool = True) -> None:
    """Turn NVTX ranges on (or off with ``flag=False``)."""
    global _enabled, _push, _pop
    if not flag:
        _enabled = False
        return
    b = _backend()
    if b is None:
        raise RuntimeError(
            "NVTX ranges need a CUDA build of torch with a CUDA device, or the `nvtx` Python package; "
            "neither is available here")
    _push, _pop = b
    _enabled = True


def is_enabled() -> bool:
    return _enabled


_NULL = contextlib.nullcontext()


@contextlib.contextmanager
def _range(name: str):
    _push(name)
    try:
        yield
    finally:
        _pop()


def range(name: str, index=None):  # noqa: A001 - mirrors torch.cuda.nvtx.range
    """A context manager marking ``name`` (``name[index]`` when given); a no-op
    unless enabled. The label is only formatted when enabled."""
    if not _enabled:
        return _NULL
    return _range(name if index is None else f"{name}[{index}]")
