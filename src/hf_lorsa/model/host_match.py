"""Whether a Lorsa fits a host: its family, width, depth and (strictly) the very weights it was made from."""

from __future__ import annotations

from torch import nn

from ..host import families
from .configuration_lorsa import LorsaConfig
from .llamascopium import fold_input_gain


def check_lorsa_matches(model: nn.Module, lorsa, strict: bool = True) -> None:
    """Refuse, before any forward pass, a Lorsa made for another model family, width or depth, and (with
    `strict`) one made from another model of the same shape (its recorded fingerprint differs). A Lorsa that
    reads the input before the host's input-norm gain (imported from llamascopium) gets the gain folded in."""
    if not isinstance(getattr(lorsa, "config", None), LorsaConfig):
        raise TypeError(f"Expected a hf_lorsa.LorsaModel, got {type(lorsa).__name__}.")
    cfg = families.host_config(model)
    lc = lorsa.config
    if lc.d_model != cfg.hidden_size:
        raise ValueError(f"This Lorsa has d_model={lc.d_model} but the model's hidden size is {cfg.hidden_size}.")
    if lc.host_model_type is not None and lc.host_model_type != cfg.model_type:
        raise ValueError(
            f"This Lorsa was made for a {lc.host_model_type!r} model, not {cfg.model_type!r} "
            f"(base model: {lc.base_model_name_or_path})."
        )
    if lc.layer is None:
        raise ValueError("This Lorsa records no `layer`; set lorsa.config.layer to the layer it replaces.")
    families.check_layer(model, lc.layer)
    recorded = getattr(lc, "host_fingerprint", None)
    if strict and recorded and not families.same_fingerprint(recorded, families.fingerprint(model, lc.layer)):
        raise ValueError(
            f"This Lorsa was made from another model than this one: layer {lc.layer}'s attention weights differ "
            f"from those it was trained on (base model: {lc.base_model_name_or_path}). Load that model, or pass "
            "strict=False to use it with this one anyway."
        )
    if lc.input_before_gain:
        fold_input_gain(lorsa, model)
