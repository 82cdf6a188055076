"""hf_lorsa: Low-Rank Sparse Attention (Lorsa) for Hugging Face causal language models."""

from transformers import AutoConfig, AutoModel

from .configuration_lorsa import LorsaConfig
from .hooks import AttentionRecord, Capture, capture, collect, splice
from .modeling_lorsa import LorsaModel, LorsaOutput

AutoConfig.register("lorsa", LorsaConfig)
AutoModel.register(LorsaConfig, LorsaModel)

__all__ = [
    "AttentionRecord",
    "Capture",
    "LorsaConfig",
    "LorsaModel",
    "LorsaOutput",
    "capture",
    "collect",
    "splice",
]
