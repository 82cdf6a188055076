"""What the exact replica of a host layer (`LorsaModel.from_host` at the host's own sizes) measures of its heads."""

from __future__ import annotations

import torch
from torch import nn

from .modeling_lorsa import LorsaModel


@torch.no_grad()
def head_output_variance(model: nn.Module, layer: int, x: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """(H,) variance of each host head's output (its mean squared distance from its mean) over the counted
    positions of the attention input x (B, T, D), computed by the exact replica of the layer."""
    replica = LorsaModel.from_host(model, layer).to(x.device, torch.float32).eval()
    z = replica(x.float(), output_pre_activations=True).pre_activations[counted]  # (N, H * dh)
    pieces = replica.config.group_size
    variance = []
    for h in range(replica.config.n_qk_heads):
        out = z[:, h * pieces : (h + 1) * pieces] @ replica.w_o[h * pieces : (h + 1) * pieces]  # (N, D)
        variance.append((out - out.mean(0)).pow(2).sum(-1).mean())
    return torch.stack(variance).cpu()
