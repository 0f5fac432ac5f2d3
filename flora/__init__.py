"""flora: fused low-rank adapters that ride inside a Llama's projection GEMMs."""
from . import ops
from ._version import __version__
from .info import format_info, info

__all__ = ["ops", "info", "format_info", "__version__"]
