"""Device selection shared by the CLI commands (train, demo, benchmarks)."""
from __future__ import annotations

from typing import Optional

import torch


def resolve_device(name: Optional[str]) -> torch.device:
    """``--device``: cpu or cuda[:i]; None -> cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected cpu or cuda, got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return dev
