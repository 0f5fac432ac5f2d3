"""Device selection shared by the CLI commands (train, demo, benchmarks)."""
from __future__ import annotations

from typing import Optional

import torch


def resolve_device(name: Optional[str], auto: bool = True) -> Optional[torch.device]:
    """``--device``: cpu, cuda or cuda:N that exists here, checked before anything loads.

    None -> cuda when available, else cpu (``auto=False``: None, for callers
    with a default of their own, such as the training launcher's per-rank device).
    """
    if name is None:
        if not auto:
            return None
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device: expected cpu or cuda (cuda:N for one device), got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda (cuda:N for one device), got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev
