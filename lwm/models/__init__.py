"""World-model components: the Mamba-2 block and the sequence backbones.

Tensors in, tensors out: nothing here knows about language or environments.
"""

from lwm.models.backbones import (
    BACKBONES,
    Backbone,
    BackboneConfig,
    GRUBackbone,
    Mamba2Backbone,
    TransformerBackbone,
    make_backbone,
)
from lwm.models.ssm import HAS_MAMBA_SSM, BatchState, Mamba2, Mamba2State

__all__ = [
    "BACKBONES",
    "HAS_MAMBA_SSM",
    "Backbone",
    "BackboneConfig",
    "BatchState",
    "GRUBackbone",
    "Mamba2",
    "Mamba2Backbone",
    "Mamba2State",
    "TransformerBackbone",
    "make_backbone",
]
