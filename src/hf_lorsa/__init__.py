"""hf_lorsa: Low-Rank Sparse Attention (Lorsa) for Hugging Face causal language models.

The package loads lazily, as transformers does: `import hf_lorsa` costs nothing, and each name below imports its
module on first use. LorsaConfig and LorsaModel register themselves with AutoConfig / AutoModel when their modules
load (`from hf_lorsa import LorsaModel`, or any use of them).

The layers, lowest first (each imports only those below it; `tests/test_architecture.py` checks it):
base, kernels, host, model, inputs, formats, evaluation, training | analysis, and the command line (cli, quickstart).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from . import embedded  # the host and stories the package carries: hf_lorsa.embedded.STORIES_MODEL, STORIES_TEXT

_LAZY = {
    "AttentionRecord": "host.hooks",
    "Capture": "host.hooks",
    "capture": "host.hooks",
    "collect": "host.hooks",
    "LorsaConfig": "model.configuration_lorsa",
    "LorsaModel": "model.modeling_lorsa",
    "LorsaOutput": "model.modeling_lorsa",
    "splice": "model.splicing",
    "train_lorsa": "training.run_training",
    "train_lorsas": "training.run_training",
    "evaluate_lorsa": "evaluation.evaluation",
    "analyze": "analysis.analysis",
    "load_analysis": "analysis.analysis_table",
    "export_llamascopium": "formats.llamascopium_export",
    "push_release": "formats.release",
}

if TYPE_CHECKING:
    from .analysis.analysis import analyze
    from .analysis.analysis_table import load_analysis
    from .evaluation.evaluation import evaluate_lorsa
    from .formats.llamascopium_export import export_llamascopium
    from .formats.release import push_release
    from .host.hooks import AttentionRecord, Capture, capture, collect
    from .model.configuration_lorsa import LorsaConfig
    from .model.modeling_lorsa import LorsaModel, LorsaOutput
    from .model.splicing import splice
    from .training.run_training import train_lorsa, train_lorsas


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'hf_lorsa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AttentionRecord",
    "Capture",
    "LorsaConfig",
    "LorsaModel",
    "LorsaOutput",
    "analyze",
    "capture",
    "collect",
    "embedded",
    "evaluate_lorsa",
    "export_llamascopium",
    "load_analysis",
    "push_release",
    "splice",
    "train_lorsa",
    "train_lorsas",
]
