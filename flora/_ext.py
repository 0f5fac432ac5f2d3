"""Loads the compiled extension, or records why it is not there.

Set FLORA_NO_EXTENSION=1 to run every op through the pure-PyTorch reference
(flora.info() then says so).
"""
import os

C = None
ERROR = None

if os.environ.get("FLORA_NO_EXTENSION", "") not in ("", "0"):
    ERROR = "disabled by FLORA_NO_EXTENSION"
else:
    try:
        from . import _C as C  # noqa: N812  (registers the flora:: ops)
    except ImportError as e:  # not built, or built against another torch
        ERROR = f"{type(e).__name__}: {e}"


def compiled_devices():
    """Devices with compiled kernels registered for the flora ops."""
    if C is None:
        return set()
    return {row[1] for row in C.kernel_info()}
