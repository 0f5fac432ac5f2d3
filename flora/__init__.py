"""flora: fused low-rank adapters that ride inside a Llama's projection GEMMs."""
from . import ops
from ._version import __version__
from .info import format_info, info
from .config import AdapterConfig, LlamaArch
from . import modules
from .modules import (FFL, FBL, FFBL, FusedAttentionProjections, FusedOutputProjection,
                      FusedMLP, FusedLMHead, initial_carry)

__all__ = ["ops", "info", "format_info", "__version__"]
__all__ += ["AdapterConfig", "LlamaArch", "modules", "FFL", "FBL", "FFBL",
            "FusedAttentionProjections", "FusedOutputProjection", "FusedMLP", "FusedLMHead",
            "initial_carry"]
from .model import FusedLlama
from .adapter_io import save_adapter, load_adapter, export_peft
from .hf_patch import patch
__all__ += ["FusedLlama", "patch", "save_adapter", "load_adapter", "export_peft"]
