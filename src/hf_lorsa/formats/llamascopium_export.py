"""Write a Lorsa in the authors' format (llamascopium), so that their tools and Neuronpedia's graph server read what
hf_lorsa trains: the inverse of `hf_lorsa.model.llamascopium` (whose docstring states the relation to the host's input
norm). Also `hf-lorsa export`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..base.locations import nearest_existing
from ..host.families import input_norm_affine
from ..model.host_match import check_lorsa_matches
from ..model.llamascopium import (
    SHARED_THRESHOLD_KEY,
    STASH_KEY,
    THRESHOLD_KEY,
    WEIGHTS_FILE,
    require_that,
    transform_input,
)

EXPORT_FILES = ("config.json", WEIGHTS_FILE)


def check_export_folder(folder: str | Path, overwrite: bool) -> None:
    """Export writes into a new or empty folder, or (with `overwrite`) over its own earlier export: a folder holding
    anything else (a user's config.json, other files) is refused whatever the flag, and left untouched."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    others = sorted(p.name for p in folder.iterdir() if p.name not in EXPORT_FILES)
    config = folder / "config.json"
    ours = not others and config.is_file() and _written_by_us(config)
    if not ours:
        listed = ", ".join(others) or "config.json"
        raise ValueError(f"{folder} holds files hf-lorsa export did not write ({listed}); export writes only into a "
                         "new or empty folder or over its own earlier export. Choose another --output.")  # fmt: skip
    if not overwrite:
        raise ValueError(f"{folder} already holds an export; pass --overwrite to replace it.")


def _written_by_us(config: Path) -> bool:
    try:
        return STASH_KEY in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def export_llamascopium(lorsa, folder: str | Path, host=None, n_ctx: int | None = None) -> Path:
    """Write `lorsa` as llamascopium writes a Lorsa (config.json, sae_weights.safetensors) into `folder`, so that
    their `LowRankSparseAttention.from_pretrained(folder)` and tools built on it read it.

    Their input is taken before the host's input-norm gain, so a Lorsa that reads the host's attention input
    needs its `host` (the model it was made from) to take the gain out. `n_ctx` (their model precomputes an
    n_ctx x n_ctx mask): default the training context length, else max_position_embeddings up to 4096.
    """
    import copy

    c = lorsa.config
    n_ctx = check_exportable(c, n_ctx)
    check_room(folder, export_bytes(c, n_ctx))
    exported = copy.deepcopy(lorsa).float().cpu()
    if not c.input_before_gain:
        require_that(host is not None, "Exporting needs the host model (host=...): their input is taken before the "
                                   "host's input-norm gain, which must be taken out of the weights.")  # fmt: skip

        check_lorsa_matches(host, lorsa)
        gain, bias = (t.double() for t in input_norm_affine(host, c.layer))
        with torch.no_grad():
            transform_input(exported, gain, bias, fold=False)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    act_fn = their_act_fn(exported)
    weights = _their_weights(exported, n_ctx)
    if act_fn == "jumprelu":  # each head's threshold, on ReLU(z) x ||w_o|| as ours (their decoder-norm rule)
        weights[THRESHOLD_KEY] = (exported.threshold * exported.threshold_scale).float().log().contiguous()
    save_file(weights, folder / WEIGHTS_FILE, {"format": "pt", "written_by": "hf_lorsa"})
    stash = c.to_dict()
    their_config = {**_their_config(c, n_ctx), "act_fn": act_fn}
    if act_fn == "jumprelu":  # read back, the heads' scales are those of our own shared threshold again
        their_config[SHARED_THRESHOLD_KEY] = float(exported.threshold)
    (folder / "config.json").write_text(json.dumps({**their_config, STASH_KEY: stash}, indent=4))
    return folder


def their_act_fn(lorsa) -> str:
    """Their name for what selects our heads: top-k per position ('topk'); a BatchTopK Lorsa's learned threshold
    is their 'jumprelu' with each head's own threshold, and before it is learned their 'batchtopk' (top-k
    over the batch at inference too, as ours does then). Their JumpReLU has no cap of 4K heads per position."""
    if lorsa.config.act_fn == "topk":
        return "topk"
    return "jumprelu" if float(lorsa.threshold) >= 0 else "batchtopk"


def check_exportable(c, n_ctx: int | None = None) -> int:
    """Refuse, before anything is loaded or written, what their format cannot hold; returns the n_ctx to write."""
    require_that(c.topk_rule == "relu", "Their Lorsa keeps ReLU(z) of the heads ranked by ReLU(z) x ||w_o|| (topk_rule "
             "'relu'); this one keeps signed activations (topk_rule 'abs'), which their format cannot express.")  # fmt: skip
    require_that(c.attn_logit_softcapping is None, "Their Lorsa has no attention logit soft-capping; this one uses "
                                               f"{c.attn_logit_softcapping}.")  # fmt: skip
    rope_type = (c.rope_parameters or {}).get("rope_type", "default")
    require_that(rope_type in ("default", "llama3"), f"Their Lorsa has no {rope_type!r} rotary scaling.")
    require_that(c.layer is not None, "This Lorsa records no layer; set lorsa.config.layer.")
    if n_ctx is None:
        n_ctx = (c.training_args or {}).get("context_length") or min(c.max_position_embeddings, 4096)
    require_that(n_ctx <= c.max_position_embeddings, f"n_ctx {n_ctx} is more positions than this Lorsa has "
                 f"({c.max_position_embeddings}, its host's); pass --n_ctx {c.max_position_embeddings} or less.")  # fmt: skip
    require_that(c.sliding_window is None or c.sliding_window >= n_ctx, f"Their Lorsa sees every earlier position; this "
             f"one has a sliding window of {c.sliding_window}, shorter than n_ctx {n_ctx} (pass a smaller n_ctx).")  # fmt: skip
    require_that(int(c.d_model * (c.n_ov_heads / c.d_model)) == c.n_ov_heads,
             f"n_ov_heads {c.n_ov_heads} is not d_model x an expansion factor their format can store.")  # fmt: skip
    return n_ctx


def _their_config(c, n_ctx: int) -> dict:
    rope = c.rope_parameters or {}
    rotary_dim = int(c.d_qk_head * rope.get("partial_rotary_factor", 1.0))
    theta = rope.get("rope_theta", 10000)
    base = {
        "sae_type": "lorsa", "d_model": c.d_model, "expansion_factor": c.n_ov_heads / c.d_model,
        "use_decoder_bias": True, "act_fn": "topk", "sparsity_include_decoder_norm": True, "top_k": c.top_k,
        "norm_activation": "inference" if (c.input_norm_factor, c.output_norm_factor) == (1.0, 1.0) else "dataset-wise",
        "hook_point_in": f"blocks.{c.layer}.ln1.hook_normalized", "hook_point_out": f"blocks.{c.layer}.hook_attn_out",
        "n_qk_heads": c.n_qk_heads, "d_qk_head": c.d_qk_head,
        "positional_embedding_type": "rotary" if c.rope_parameters else "none", "rotary_dim": rotary_dim,
        "rotary_base": int(theta) if float(theta).is_integer() else theta, "rotary_adjacent_pairs": c.rope_interleaved,
        "rotary_scale": 1, "use_NTK_by_parts_rope": rope.get("rope_type") == "llama3",
        "NTK_by_parts_factor": rope.get("factor", 1.0), "NTK_by_parts_low_freq_factor": rope.get("low_freq_factor", 1.0),
        "NTK_by_parts_high_freq_factor": rope.get("high_freq_factor", 1.0),
        "old_context_len": rope.get("original_max_position_embeddings", 2048), "n_ctx": n_ctx,
        "attn_scale": 1.0 / c.scaling, "use_post_qk_ln": c.qk_norm, "normalization_type": "RMS" if c.qk_norm else None,
        "eps": c.qk_norm_eps, "use_triton_kernel": False, "sparsity_threshold_for_triton_spmm_kernel": 0.996,
        "jumprelu_threshold_window": 2.0,
    }  # fmt: skip
    return base


def export_bytes(c, n_ctx: int) -> int:
    """The size of what `export_llamascopium` writes: the weights in float32, their n_ctx x n_ctx mask (a byte an
    entry) and the rotary tables (two n_ctx x rotary-width float32 tables)."""
    weights = (2 * c.n_qk_heads * c.d_model * c.d_qk_head + 2 * c.n_qk_heads * c.d_qk_head
               + 2 * c.n_ov_heads * c.d_model + c.n_ov_heads + c.d_model)  # fmt: skip
    return 4 * weights + n_ctx * n_ctx + 2 * 4 * n_ctx * c.d_qk_head


def check_room(folder: str | Path, size: int) -> None:
    """Refuse, before anything is written, an export the disk under `folder` cannot hold."""
    existing = nearest_existing(folder)
    free = shutil.disk_usage(existing).free
    require_that(size < free, f"The export needs {size / 2**30:.2f} GiB and {existing} has {free / 2**30:.2f} GiB "
                              "free; free some space or write elsewhere (a smaller --n_ctx shrinks it).")  # fmt: skip


def _their_weights(lorsa, n_ctx: int) -> dict[str, torch.Tensor]:
    """Their tensors, including the buffers their strict loader expects (mask, IGNORE, rotary tables)."""
    c = lorsa.config
    weights = {"W_Q": lorsa.W_Q, "W_K": lorsa.W_K, "b_Q": lorsa.b_Q, "b_K": lorsa.b_K, "W_V": lorsa.w_v,
               "b_V": lorsa.b_v, "W_O": lorsa.w_o, "b_D": lorsa.b_D}  # fmt: skip
    if c.qk_norm:
        for theirs, norm in (("ln_q.w", lorsa.q_norm), ("ln_k.w", lorsa.k_norm)):
            weights[theirs] = norm.weight.expand(c.n_qk_heads, c.d_qk_head)
    hooks = (f"blocks.{c.layer}.ln1.hook_normalized", f"blocks.{c.layer}.hook_attn_out")
    for hook, factor in zip(hooks, (c.input_norm_factor, c.output_norm_factor)):
        weights[f"dataset_average_activation_norm.{hook}"] = torch.tensor(math.sqrt(c.d_model) / factor)
    weights["mask"] = torch.ones(n_ctx, n_ctx, dtype=torch.bool).tril()
    weights["IGNORE"] = torch.tensor(-torch.inf)
    if lorsa.rotary_emb is not None:
        inv_freq = lorsa.rotary_emb.inv_freq.double()  # (rot / 2,), transformers' (rope scaling included)
        layout = inv_freq.repeat_interleave(2) if c.rope_interleaved else inv_freq.repeat(2)
        angles = torch.arange(n_ctx, dtype=torch.float64)[:, None] * layout
        weights["rotary_sin"], weights["rotary_cos"] = angles.sin(), angles.cos()
    return {name: t.detach().float().contiguous() if t.dtype != torch.bool else t.contiguous()
            for name, t in weights.items()}  # fmt: skip


# ---- command line -----------------------------------------------------------------------------------
