"""A Lorsa in its host: run it on what a host layer's attention saw, or splice it in place of that attention."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..host.attention_mask import counted_positions
from ..host.hooks import AttentionRecord, first_output, hooked
from .host_match import check_lorsa_matches
from .modeling_lorsa import LorsaModel


def _check_is_lorsa(lorsa) -> None:
    if not isinstance(lorsa, LorsaModel):
        raise TypeError(f"Expected a hf_lorsa.LorsaModel, got {type(lorsa).__name__}.")


@contextmanager
def splice(model: nn.Module, lorsa, attention_module: str | None = None, strict: bool = True) -> Iterator[None]:
    """Replace the output of layer `lorsa.config.layer`'s attention by the Lorsa reconstruction.

    The Lorsa reads that layer's attention input with the host's own positions (rotary cos/sin) and
    padding mask. Where it was not trained (each sequence's first position, and tokens of
    `lorsa.config.skip_token_ids`: BOS, document separator, padding) the host's own output is kept when the
    host was called with `input_ids`. Logits are bit-identical to the clean model again once
    the block exits. `strict=False` accepts a Lorsa made from another model of the same shape.
    """
    if attention_module is None:
        check_lorsa_matches(model, lorsa, strict)
    else:
        _check_is_lorsa(lorsa)

    def on_output(record: AttentionRecord, output):
        x = record.hidden_states
        out = lorsa_output(lorsa, record).reconstruction.to(x.device, x.dtype)
        if record.input_ids is not None:
            counted = counted_positions(record.input_ids, lorsa.config.skip_token_ids).to(x.device)
            out = torch.where(counted[..., None], out, first_output(output))
        return (out, *output[1:]) if isinstance(output, tuple) else out

    with hooked(model, lorsa.config.layer, attention_module, on_output):
        yield


def host_rotary_for(lorsa, position_embeddings):
    """The host's (cos, sin) when the Lorsa's QK heads can use them as they are, else None (it makes its own)."""
    if position_embeddings is None or lorsa.rotary_emb is None:
        return None
    rotary_dim = int(lorsa.config.d_qk_head * lorsa.config.rope_parameters.get("partial_rotary_factor", 1.0))
    return position_embeddings if position_embeddings[0].shape[-1] == rotary_dim else None


def lorsa_output(lorsa, record: AttentionRecord):
    """The Lorsa run on what the host's attention saw: moved to the Lorsa's device and dtype (a device_map host
    may hold the layer elsewhere), with the host's own rotary (cos, sin) when it fits the Lorsa's QK heads."""
    param = next(lorsa.parameters())

    def moved(t):
        return None if t is None else t.to(param.device)

    pe = host_rotary_for(lorsa, record.position_embeddings)
    return lorsa(
        record.hidden_states.to(param.device, param.dtype), position_ids=moved(record.position_ids),
        attention_mask=moved(record.attention_mask), position_embeddings=None if pe is None else tuple(map(moved, pe)),
    )  # fmt: skip
