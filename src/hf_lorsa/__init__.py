"""hf_lorsa: Low-Rank Sparse Attention (Lorsa) for Hugging Face causal language models."""

from transformers import AutoConfig, AutoModel

from . import embedded  # the host and stories the package carries: hf_lorsa.embedded.STORIES_MODEL, STORIES_TEXT
from .configuration_lorsa import LorsaConfig
from .hooks import AttentionRecord, Capture, capture, collect, splice
from .modeling_lorsa import LorsaModel, LorsaOutput

AutoConfig.register("lorsa", LorsaConfig)
AutoModel.register(LorsaConfig, LorsaModel)

# Heavier entry points (datasets, the Trainer) load on first use.
_LAZY = {
    "train_lorsa": "run_training",
    "train_lorsas": "run_training",
    "evaluate_lorsa": "evaluation",
    "analyze": "analysis",
    "load_analysis": "analysis",
    "export_llamascopium": "llamascopium_export",
    "push_release": "release",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hf_lorsa' has no attribute {name!r}")


__all__ = [
    "AttentionRecord",
    "Capture",
    "LorsaConfig",
    "LorsaModel",
    "LorsaOutput",
    "analyze",
    "capture",
    "collect",
    "evaluate_lorsa",
    "export_llamascopium",
    "load_analysis",
    "push_release",
    "splice",
    "train_lorsa",
    "train_lorsas",
    "embedded",
]
