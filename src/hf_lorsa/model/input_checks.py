"""Checks of a Lorsa's attention input at the boundary, with messages that say what to pass instead."""

from __future__ import annotations

import torch


def check_attention_input(
    c, weight: torch.dtype, hidden_states, position_ids=None, attention_mask=None
) -> torch.Tensor:
    """`hidden_states` (B, T, d_model) against the config `c` and the weights' dtype `weight`; the masks' shapes."""
    if not torch.is_tensor(hidden_states) or hidden_states.dim() != 3 or hidden_states.shape[-1] != c.d_model:
        shape = tuple(hidden_states.shape) if torch.is_tensor(hidden_states) else type(hidden_states).__name__
        raise ValueError(
            f"LorsaModel expects the attention input as (batch, positions, d_model={c.d_model}), got {shape}."
        )
    B, T = hidden_states.shape[:2]
    if B == 0 or T == 0:
        raise ValueError(f"The attention input has no positions (shape {tuple(hidden_states.shape)}).")
    if T > c.max_position_embeddings:
        raise ValueError(
            f"Sequence of {T} positions exceeds max_position_embeddings="
            f"{c.max_position_embeddings} of this Lorsa; use shorter contexts."
        )
    if hidden_states.dtype != weight and not torch.is_autocast_enabled(hidden_states.device.type):
        raise ValueError(
            f"The attention input is {hidden_states.dtype} but this Lorsa's weights are {weight}: cast one to "
            f"the other (e.g. lorsa.to({hidden_states.dtype}) or hidden_states.to({weight}))."
        )
    for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if t is not None and (t.dim() != 2 or t.shape[1] != T or t.shape[0] not in (1, B)):
            raise ValueError(f"{name} must have shape ({B}, {T}) (batch, positions), got {tuple(t.shape)}.")
    return hidden_states
