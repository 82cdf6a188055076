"""LorsaConfig: the sizes of a Lorsa and everything it needs to treat positions like its host."""

from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..base.usage import is_int
from ..host import families

TOPK_RULES = ("abs", "relu")
ACT_FNS = ("topk", "batchtopk")


def check_positive_ints(**values) -> None:
    for name, value in values.items():
        if not is_int(value) or value <= 0:
            raise ValueError(f"{name} must be positive: an integer >= 1, got {value!r}.")


class LorsaConfig(PreTrainedConfig):
    r"""Configuration of a [`LorsaModel`]: one attention layer decomposed into many rank-1 heads.

    Args:
        d_model (`int`): width of the host's residual stream (the attention input and output).
        n_qk_heads (`int`): number of QK heads (query/key pairs). Must divide `n_ov_heads`.
        d_qk_head (`int`): width of each QK head; use the host's head dimension.
        n_ov_heads (`int`, *optional*): number of rank-1 OV heads (the dictionary size). Defaults
            to `expansion_factor * d_model`, or without either to `n_qk_heads * d_qk_head` (a replica's size).
        expansion_factor (`int`, *optional*): used when `n_ov_heads` is not given.
        top_k (`int`): OV heads kept active at each position.
        topk_rule (`str`): how heads are ranked for top-k: `"abs"` ranks |z| * ||w_o|| and keeps the
            signed z (LORSA.md); `"relu"` ranks ReLU(z) * ||w_o|| and keeps ReLU(z).
        act_fn (`str`): `"topk"` keeps the `top_k` best heads at every position (the authors' Lorsa);
            `"batchtopk"` keeps the `top_k` x N best of a training batch of N positions and, at inference, the
            heads whose score passes a threshold learned in training (the buffer `threshold`, times each head's
            `threshold_scale`, `hf_lorsa.training.head_balance`), at most 4 x top_k per position (`hf_lorsa.model.selection`).
        attn_scale (`float`, *optional*): factor applied to QK logits; defaults to 1/sqrt(d_qk_head).
        attn_logit_softcapping (`float`, *optional*): tanh soft-capping of the logits (Gemma 2).
        sliding_window (`int`, *optional*): a query at position q sees keys k with q - k < window.
        rope_parameters (`dict`, *optional*): the host's rotary parameters in transformers' form
            (`rope_type`, `rope_theta`, scaling fields, `partial_rotary_factor`). `None`: no rotary
            embedding (hosts with learned absolute positions, such as GPT-2).
        rope_interleaved (`bool`): rotate adjacent pairs (GPT-J style) instead of the two halves.
        max_position_embeddings (`int`): longest sequence the positional treatment supports.
        qk_norm (`bool`): apply a per-head RMSNorm to queries and keys before rotation (Qwen3, Gemma 3).
        qk_norm_eps (`float`): epsilon of that norm.
        qk_norm_per_head (`bool`): one QK-norm weight per QK head (Lorsas trained by the authors' code) instead of
            one shared by all (the host's).
        input_before_gain (`bool`): the weights read the attention input before the host's input norm applies
            its per-channel gain (and bias): TransformerLens' `ln1.hook_normalized`, the input of a Lorsa
            imported from llamascopium without its host. `from_pretrained(..., host=model)`, `splice`,
            evaluation and analysis fold the host's gain into the weights and set this to False.
        input_norm_factor (`float`): the attention input is multiplied by this before use.
        output_norm_factor (`float`): the reconstruction is divided by this. Both are 1 once folded.
        base_model_name_or_path (`str`, *optional*): Hub id or path of the host model.
        host_fingerprint (`dict`, *optional*): the RMS and a few values of each of the host layer's attention
            weights, compared by `splice` and evaluation so that a Lorsa is not silently used with another model
            of the same shape.
        host_model_type (`str`, *optional*): `model_type` of the host (e.g. `"llama"`).
        layer (`int`, *optional*): index of the host layer this Lorsa replaces.
        attn_input_module (`str`, *optional*): module path whose input is the attention input.
        attn_output_module (`str`, *optional*): module path whose output is the attention output.
        skip_token_ids (`list[int]`, *optional*): tokens (BOS, padding) whose positions the Lorsa was not
            trained on; `splice` keeps the host's attention output there.
        document_separator (`int`, *optional*): the token put before each document of the training text (the
            host's EOS when its tokenizer adds no BOS); `None`: the tokenizer's own BOS.
        base_model_gguf_file (`str`, *optional*): the GGUF file in `base_model_name_or_path` the host was
            loaded from, if any.
        dataset_name (`str`, *optional*): the data the Lorsa was trained on.
        tokens_trained (`int`, *optional*): training tokens seen.
        stopped_early (`dict`, *optional*): why training stopped before its budget (its FVU came apart), and the
            best weights it kept instead (`hf_lorsa.training.collapse_guard`).
        training_args (`dict`, *optional*): the arguments of the training run.
        initializer_range (`float`): unused by LorsaModel (its init is scaled by d_model); kept for transformers.
    """

    model_type = "lorsa"

    d_model: int = 64
    n_qk_heads: int = 8
    d_qk_head: int = 8
    n_ov_heads: int | None = None
    expansion_factor: int | None = None
    top_k: int = 16
    topk_rule: str = "abs"
    act_fn: str = "topk"
    attn_scale: float | None = None
    attn_logit_softcapping: float | None = None
    sliding_window: int | None = None
    rope_parameters: dict | None = None
    rope_interleaved: bool = False
    max_position_embeddings: int = 2048
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    qk_norm_per_head: bool = False
    input_before_gain: bool = False
    input_norm_factor: float = 1.0
    output_norm_factor: float = 1.0
    base_model_name_or_path: str | None = None
    host_fingerprint: dict | None = None
    host_model_type: str | None = None
    layer: int | None = None
    attn_input_module: str | None = None
    attn_output_module: str | None = None
    skip_token_ids: list[int] | None = None
    document_separator: int | None = None
    base_model_gguf_file: str | None = None
    dataset_name: str | None = None
    tokens_trained: int | None = None
    stopped_early: dict | None = None
    training_args: dict | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        if self.n_ov_heads is None:  # transformers builds configs without arguments: every default is valid
            if self.expansion_factor is None:
                self.n_ov_heads = self.n_qk_heads * self.d_qk_head
            else:
                self.n_ov_heads = int(self.expansion_factor * self.d_model)
        self._validate()
        # PreTrainedConfig fills an absent `rope_parameters` with defaults; `None` means "no rotary" here.
        has_rope = self.rope_parameters is not None
        if has_rope:
            self.rope_parameters = dict(self.rope_parameters)
        super().__post_init__(**kwargs)
        if not has_rope:
            self.rope_parameters = None

    def _validate(self) -> None:
        for name in ("d_model", "n_qk_heads", "d_qk_head", "n_ov_heads", "top_k", "max_position_embeddings"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"LorsaConfig.{name} must be a positive integer, got {value!r}.")
        if self.n_ov_heads % self.n_qk_heads:
            raise ValueError(
                f"n_ov_heads ({self.n_ov_heads}) must be a multiple of n_qk_heads ({self.n_qk_heads}): each QK "
                "head serves n_ov_heads / n_qk_heads OV heads (the usual choice is n_qk_heads = n_ov_heads / d_qk_head)."
            )
        if self.top_k > self.n_ov_heads:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed n_ov_heads ({self.n_ov_heads}); lower top_k.")
        if self.topk_rule not in TOPK_RULES:
            raise ValueError(f"topk_rule must be one of {TOPK_RULES}, got {self.topk_rule!r}.")
        if self.act_fn not in ACT_FNS:
            raise ValueError(f"act_fn must be one of {ACT_FNS}, got {self.act_fn!r}.")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}.")
        if self.rope_parameters is not None:
            rope_type = self.rope_parameters.get("rope_type", self.rope_parameters.get("type", "default"))
            if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
                raise ValueError(
                    f"Unknown rope_type {rope_type!r}; transformers supports "
                    f"{sorted(['default', *ROPE_INIT_FUNCTIONS])}."
                )
            if "rope_theta" not in self.rope_parameters:
                raise ValueError("rope_parameters needs a 'rope_theta' (the host config's rope base).")
            rotary_dim = int(self.d_qk_head * self.rope_parameters.get("partial_rotary_factor", 1.0))
            if rotary_dim % 2 or rotary_dim == 0:
                raise ValueError(
                    f"d_qk_head * partial_rotary_factor = {rotary_dim} must be a positive even number of rotary dims."
                )

    @classmethod
    def from_host(
        cls,
        model,
        layer: int,
        expansion_factor: int | None = None,
        top_k: int | None = None,
        n_qk_heads: int | None = None,
        n_ov_heads: int | None = None,
        **kwargs: Any,
    ) -> LorsaConfig:
        """A config for layer `layer` of a loaded host `model` (any supported family, PEFT-wrapped or not).

        Sizes default to an exact replica of the host layer: n_ov = n_heads * head_dim, n_qk = n_heads,
        top_k = n_ov. With `expansion_factor` or `n_ov_heads`, n_qk defaults to n_ov / head_dim (LORSA.md).
        """

        families.check_layer(model, layer)
        arch = families.architecture_of(model)
        cfg = families.host_config(model)
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        if expansion_factor is not None and not (is_int(expansion_factor) and expansion_factor >= 1):
            raise ValueError(
                f"expansion_factor must be an integer >= 1 (or None: a replica), got {expansion_factor!r}."
            )
        if n_ov_heads is None:
            n_ov_heads = expansion_factor * cfg.hidden_size if expansion_factor else n_heads * head_dim
        if n_qk_heads is None:
            n_qk_heads = n_heads if n_ov_heads == n_heads * head_dim else max(n_ov_heads // head_dim, 1)
        layer_path = f"{arch.layers}.{layer}"
        settings = families.position_settings(model, layer)
        settings.update(kwargs)
        return cls(
            d_model=cfg.hidden_size,
            n_qk_heads=n_qk_heads,
            d_qk_head=head_dim,
            n_ov_heads=n_ov_heads,
            top_k=top_k if top_k is not None else n_ov_heads,
            base_model_name_or_path=getattr(cfg, "_name_or_path", None) or None,
            host_fingerprint=families.fingerprint(model, layer),
            host_model_type=cfg.model_type,
            layer=layer,
            attn_input_module=f"{layer_path}.{arch.input_norm}",
            attn_output_module=f"{layer_path}.{arch.attention}",
            **settings,
        )

    @property
    def group_size(self) -> int:
        """OV heads that share one QK head (OV head i reads QK head i // group_size)."""
        return self.n_ov_heads // self.n_qk_heads

    @property
    def scaling(self) -> float:
        return self.attn_scale if self.attn_scale is not None else 1.0 / math.sqrt(self.d_qk_head)

    # The names transformers' rotary utilities read from a config.
    @property
    def head_dim(self) -> int:
        return self.d_qk_head

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.n_qk_heads


__all__ = ["LorsaConfig"]


AutoConfig.register("lorsa", LorsaConfig)  # AutoConfig.from_pretrained reads a Lorsa folder once this module loads
