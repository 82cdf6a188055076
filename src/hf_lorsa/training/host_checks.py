"""Options checked against the host's config before any weights are loaded: layers, sizes, context, budget."""

from __future__ import annotations

import logging

from transformers import TrainingArguments

from ..base.usage import UsageError, require
from ..embedded import model_location
from ..formats.release import check_memory
from ..inputs.loading import check_gguf_file
from .arguments import DEFAULT_CONTEXT, DataArguments, LorsaArguments, tokens_per_step

logger = logging.getLogger(__name__)


def check_against_host(
    model_args: LorsaArguments, data_args: DataArguments, args: TrainingArguments
) -> tuple[list[int], int]:
    """Sizes checked against the host's config (no weights loaded) and the budget; the layers to train, and the
    host's number of layers."""
    from transformers import AutoConfig

    check_gguf_file(model_args.model_name_or_path, model_args.gguf_file)
    gguf = {"gguf_file": model_args.gguf_file} if model_args.gguf_file else {}
    try:
        host_config = AutoConfig.from_pretrained(
            model_location(model_args.model_name_or_path), trust_remote_code=model_args.trust_remote_code, **gguf
        )
    except (OSError, ValueError) as err:
        raise UsageError(
            f"Cannot read the config of --model_name_or_path {model_args.model_name_or_path}: {err}"
        ) from err
    text = host_config.get_text_config()
    n_layers = text.num_hidden_layers
    if model_args.layer is not None:
        require(
            0 <= model_args.layer < n_layers,
            f"--layer must be in [0, {n_layers - 1}] for {model_args.model_name_or_path}, got {model_args.layer}.",
        )
    layers = model_args.layer_list(n_layers)
    max_positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if data_args.context_length is None:  # the default follows a host with fewer positions; a given one is checked
        data_args.context_length = min(DEFAULT_CONTEXT, max_positions or DEFAULT_CONTEXT)
        if data_args.context_length < DEFAULT_CONTEXT:
            logger.info("--context_length %d: the host's %d positions (the default is %d).",
                        data_args.context_length, max_positions, DEFAULT_CONTEXT)  # fmt: skip
    elif max_positions:
        require(
            data_args.context_length <= max_positions,
            f"--context_length {data_args.context_length} exceeds the model's {max_positions} positions.",
        )
    d_model = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or d_model // text.num_attention_heads
    n_ov = model_args.n_ov_for(d_model)
    require(model_args.top_k <= n_ov, f"--top_k {model_args.top_k} exceeds the {n_ov} OV heads; lower --top_k.")
    n_qk = model_args.n_qk_heads or max(n_ov // head_dim, 1)
    require(
        n_ov % n_qk == 0,
        f"--n_qk_heads {n_qk} must divide the {n_ov} OV heads (the usual choice is n_ov / head_dim = {n_ov // head_dim}).",
    )
    if model_args.k_anneal_start is not None:
        require(model_args.k_anneal_start <= n_ov, f"--k_anneal_start cannot exceed the {n_ov} OV heads.")

    check_memory(layers, d_model, n_ov, n_qk, head_dim, args)
    per_step = tokens_per_step(data_args, args)
    require(
        data_args.max_tokens >= per_step,
        f"--max_tokens {data_args.max_tokens} is smaller than one step ({per_step} tokens = batch_size x "
        "context_length x processes x accumulation); raise the budget or shrink the batch.",
    )
    return layers, n_layers
