"""flora's adapter modules, built only on flora.ops.

Building blocks: FFL, FBL, FFBL (one op each). Llama sub-blocks:
FusedAttentionProjections, FusedOutputProjection, FusedMLP, FusedLMHead and
initial_carry (the contract with flora/model.py). Parameter counts:
count_parameters(cfg, shapes).
"""
from .blocks import FBL, FFBL, FFL
from .llama import (FusedAttentionProjections, FusedLMHead, FusedMLP, FusedOutputProjection,
                    initial_carry)
from .variants import count_parameters, parameter_report

__all__ = ["FFL", "FBL", "FFBL", "FusedAttentionProjections", "FusedOutputProjection",
           "FusedMLP", "FusedLMHead", "initial_carry", "count_parameters", "parameter_report"]
