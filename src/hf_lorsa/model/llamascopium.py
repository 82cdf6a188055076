"""Lorsas in the authors' format (OpenMOSS Language-Model-SAEs, package `llamascopium`): read and write.

A llamascopium Lorsa folder holds `config.json` (with `sae_type: "lorsa"`) and `sae_weights.safetensors`.
Their input is TransformerLens' `blocks.L.ln1.hook_normalized`: the attention input before the pre-attention
norm's gain (TransformerLens folds the gain into the next weights). A Hugging Face host hands the attention
the input after it, normalised(x) * gain + bias, so the weights that read the input relate exactly by

    W_ours[d] = W_theirs[d] / gain[d],        b_ours = b_theirs - input_norm_factor * bias @ W_ours

per input dimension d, for the query, key and value weights. RMSNorm hosts (Llama, Qwen, Mistral, Gemma) have
no bias. A LayerNorm host (GPT-2, NeoX) has one, and TransformerLens also centres the weights that write to
the residual stream there: a Lorsa trained on such a TransformerLens model reconstructs the attention output
minus its mean over d_model. Every later LayerNorm removes that mean, so the spliced logits are unaffected,
but FVU measured against the Hugging Face attention output counts the mean as unexplained.

Axes as in modeling_lorsa: Hqk QK heads, D d_model, dqk QK head width, Hov OV heads.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from einops import einsum
from safetensors.torch import load_file

from ..host import families
from .configuration_lorsa import LorsaConfig
from .files import location, repo_file

WEIGHTS_FILE = "sae_weights.safetensors"
PICKLED_FILES = ("sae_weights.pt", "sae_weights.dcp/.metadata", "checkpoints/final.pt")
BUFFERS = ("mask", "IGNORE", "rotary_sin", "rotary_cos")  # their model's precomputed buffers, recomputed here
STASH_KEY = "hf_lorsa"  # our own config, kept in an exported config.json (their loader ignores unknown keys)
SHARED_THRESHOLD_KEY = "hf_lorsa_threshold"  # our shared threshold, beside their per-head ones
STRUCTURE = ("d_model", "n_qk_heads", "d_qk_head", "n_ov_heads", "top_k", "act_fn", "rope_parameters",
             "rope_interleaved")  # fmt: skip
LAYER_PATTERN = re.compile(r"^blocks\.(\d+)\.")
THRESHOLD_KEY = "activation_function.log_jumprelu_threshold"  # their JumpReLU's per-head log threshold
ACT_FNS = {"topk": "topk", "batchtopk": "batchtopk", "jumprelu": "batchtopk"}  # theirs -> ours


def is_llamascopium_config(config: dict) -> bool:
    """A config.json written by llamascopium (any of its dictionaries), not by transformers."""
    return "sae_type" in config and "model_type" not in config


def require_that(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def lorsa_config_dict(cfg: dict, norms: dict[str, float] | None = None, layer: int | None = None,
                      where: str = "") -> dict:  # fmt: skip
    """Our LorsaConfig fields for their config.json. `norms`: the dataset-wise average norms per hook point, from
    the weights file (None: the config alone, norm factors left at 1). `layer` overrides the hook point's."""
    fields = _translate(cfg, norms, layer, where)
    fields.update(_stashed(cfg.get(STASH_KEY), fields))
    if layer is not None:
        fields["layer"] = layer
    return fields


def _translate(cfg: dict, norms: dict[str, float] | None, layer: int | None, where: str) -> dict:
    kind = cfg.get("sae_type")
    require_that(kind == "lorsa", f"{where} holds a llamascopium {kind!r} dictionary, not a Lorsa (sae_type 'lorsa'): "
                              "hf_lorsa reads Lorsas only; load their SAEs, transcoders and CLTs with llamascopium.")  # fmt: skip
    needed = ["d_model", "expansion_factor", "n_qk_heads", "d_qk_head", "top_k", "hook_point_in", "hook_point_out"]
    rotary = cfg.get("positional_embedding_type", "rotary") == "rotary"
    needed += ["rotary_dim"] if rotary else []
    missing = [key for key in needed if cfg.get(key) is None]
    require_that(not missing, f"The config.json of the Lorsa at {where} lacks {missing}.")
    act_fn = cfg.get("act_fn", "relu")
    require_that(act_fn in ACT_FNS, f"{where}: act_fn {act_fn!r} is not supported; hf_lorsa reads Lorsas that keep the "
                                "top-k heads ('topk', 'batchtopk') or those above their thresholds ('jumprelu').")  # fmt: skip
    require_that(cfg.get("sparsity_include_decoder_norm", True), f"{where}: sparsity_include_decoder_norm false ranks "
             "heads by ReLU(z) alone; hf_lorsa ranks by ReLU(z) x ||w_o|| (their default) and cannot load it exactly.")  # fmt: skip
    mode = cfg.get("norm_activation", "dataset-wise")
    require_that(mode in ("dataset-wise", "inference"), f"{where}: norm_activation {mode!r} normalises each token or "
             "batch by its own norm; hf_lorsa reads 'dataset-wise' or 'inference' Lorsas.")  # fmt: skip
    require_that(cfg.get("rotary_scale", 1) == 1, f"{where}: rotary_scale {cfg.get('rotary_scale')} is not supported.")
    if layer is None:
        match = LAYER_PATTERN.match(cfg["hook_point_in"])
        require_that(match is not None, f"{where}: the hook point {cfg['hook_point_in']!r} names no layer; pass layer= "
                                    "(the index of the decoder layer whose attention it replaces).")  # fmt: skip
        layer = int(match.group(1))
    d_model, d_qk = int(cfg["d_model"]), int(cfg["d_qk_head"])
    factors = {"input_norm_factor": 1.0, "output_norm_factor": 1.0}
    if mode == "dataset-wise":
        for name, hook in (("input_norm_factor", "hook_point_in"), ("output_norm_factor", "hook_point_out")):
            if norms is None:
                continue
            require_that(cfg[hook] in norms, f"{where}: norm_activation is 'dataset-wise' but the weights hold no "
                                         f"dataset_average_activation_norm.{cfg[hook]}.")  # fmt: skip
            factors[name] = math.sqrt(d_model) / norms[cfg[hook]]
    scale = cfg.get("attn_scale") or math.sqrt(d_qk)
    qk_norm = bool(cfg.get("use_post_qk_ln", False))
    require_that(not qk_norm or cfg.get("normalization_type") == "RMS",
             f"{where}: QK norm of type {cfg.get('normalization_type')!r} is not supported (RMS is).")  # fmt: skip
    return {
        "d_model": d_model, "n_qk_heads": int(cfg["n_qk_heads"]), "d_qk_head": d_qk,
        "n_ov_heads": int(d_model * cfg["expansion_factor"]), "top_k": int(cfg["top_k"]), "topk_rule": "relu",
        "act_fn": ACT_FNS[act_fn],
        "attn_scale": 1.0 / scale, "rope_parameters": rope_parameters(cfg) if rotary else None,
        "rope_interleaved": bool(cfg.get("rotary_adjacent_pairs", True)) if rotary else False,
        "max_position_embeddings": int(cfg.get("n_ctx") or 2048), "qk_norm": qk_norm,
        "qk_norm_eps": float(cfg.get("eps", 1e-6)), "layer": layer, "input_before_gain": True,
        "base_model_name_or_path": cfg.get("model_name"), **factors,
    }  # fmt: skip


def rope_parameters(cfg: dict) -> dict:
    """transformers' rope_parameters for their rotary fields (NTK-by-parts is transformers' `llama3`)."""
    rope = {"rope_type": "default", "rope_theta": float(cfg.get("rotary_base", 10000))}
    if int(cfg["rotary_dim"]) != int(cfg["d_qk_head"]):
        rope["partial_rotary_factor"] = int(cfg["rotary_dim"]) / int(cfg["d_qk_head"])
    if cfg.get("use_NTK_by_parts_rope"):
        rope.update(rope_type="llama3", factor=float(cfg.get("NTK_by_parts_factor", 1.0)),
                    low_freq_factor=float(cfg.get("NTK_by_parts_low_freq_factor", 1.0)),
                    high_freq_factor=float(cfg.get("NTK_by_parts_high_freq_factor", 1.0)),
                    original_max_position_embeddings=int(cfg.get("old_context_len", 2048)))  # fmt: skip
    return rope


def _refuse_pickles(name_or_path, subfolder: str, hub_kwargs: dict) -> None:
    for name in PICKLED_FILES:
        if repo_file(name_or_path, name, subfolder, **hub_kwargs):
            raise ValueError(
                f"The Lorsa at {name_or_path} ({subfolder or 'root'}) has only {name}, a pickle, which hf_lorsa never "
                "loads. Convert it with llamascopium where you trust the file: LowRankSparseAttention.from_pretrained"
                "(folder).save_pretrained(out) writes sae_weights.safetensors (for a sharded .dcp checkpoint, load it "
                "with its device mesh first)."
            )


def read_folder(name_or_path, subfolder: str = "", **hub_kwargs) -> tuple[dict, dict[str, torch.Tensor]]:
    """Their config.json and weights, from a local folder or a Hub repository (through the Hugging Face cache)."""
    where = location(name_or_path, subfolder)
    config_path = repo_file(name_or_path, "config.json", subfolder, **hub_kwargs)
    require_that(config_path is not None, f"{where} has no config.json.")
    cfg = json.loads(Path(config_path).read_text())
    weights_path = repo_file(name_or_path, WEIGHTS_FILE, subfolder, **hub_kwargs)
    if weights_path is None:
        _refuse_pickles(name_or_path, subfolder, hub_kwargs)
        raise OSError(f"{where} has a llamascopium config.json but no {WEIGHTS_FILE}.")
    return cfg, load_file(weights_path)


def is_llamascopium_folder(name_or_path, subfolder: str = "", **hub_kwargs) -> bool:
    """Whether the folder or repository's config.json was written by llamascopium."""
    try:
        path = repo_file(name_or_path, "config.json", subfolder, **hub_kwargs)
        return path is not None and is_llamascopium_config(json.loads(Path(path).read_text()))
    except (OSError, ValueError):
        return False  # the usual loader says what is wrong


def load_llamascopium(model_class, name_or_path, subfolder: str = "", layer: int | None = None, **hub_kwargs):
    """A `model_class` (LorsaModel) from their folder or Hub repository (its weights still read TransformerLens'
    input)."""
    cfg, weights = read_folder(name_or_path, subfolder, **hub_kwargs)
    where = location(name_or_path, subfolder)
    return from_llamascopium(model_class, cfg, weights, layer, where)


def from_llamascopium(model_class, cfg: dict, weights: dict[str, torch.Tensor], layer: int | None = None,
                      where: str = ""):  # fmt: skip
    """A `model_class` (LorsaModel) computing what their model computes on TransformerLens' input
    (`input_before_gain`)."""

    norms = {
        k.split(".", 1)[1]: float(v) for k, v in weights.items() if k.startswith("dataset_average_activation_norm.")
    }
    fields = lorsa_config_dict(cfg, norms, layer, where)
    weights = dict(weights)
    if "b_O" in weights and "b_D" not in weights:  # the decoder bias's name before August 2025
        weights["b_D"] = weights.pop("b_O")
    if not cfg.get("use_decoder_bias", True):
        weights["b_D"] = torch.zeros(fields["d_model"])
    names = {"W_Q": "W_Q", "W_K": "W_K", "b_Q": "b_Q", "b_K": "b_K", "W_V": "w_v", "b_V": "b_v", "W_O": "w_o",
             "b_D": "b_D"}  # fmt: skip
    if fields["qk_norm"]:
        names.update({"ln_q.w": "q_norm.weight", "ln_k.w": "k_norm.weight"})
    missing = [name for name in names if name not in weights]
    require_that(not missing, f"The weights of the Lorsa at {where} lack {missing}.")
    state = {ours: weights[theirs].float() for theirs, ours in names.items()}
    stored = state["W_Q"].shape[0]
    if stored != fields["n_qk_heads"] and stored and fields["n_qk_heads"] % stored == 0:
        # fewer QK heads stored than configured: each serves several groups, as their loader repeats them
        for name in ("W_Q", "W_K", "b_Q", "b_K", "q_norm.weight", "k_norm.weight"):
            if name in state:
                state[name] = state[name].repeat_interleave(fields["n_qk_heads"] // stored, dim=0)
    if fields["qk_norm"]:  # one weight per QK head in their format; one shared row when all rows agree
        shared = all(bool((state[n] == state[n][:1]).all()) for n in ("q_norm.weight", "k_norm.weight"))
        fields["qk_norm_per_head"] = not shared
        if shared:
            state.update({n: state[n][0] for n in ("q_norm.weight", "k_norm.weight")})
    if cfg.get("act_fn") == "jumprelu":
        state["threshold"], state["threshold_scale"] = head_thresholds(weights, where, cfg.get(SHARED_THRESHOLD_KEY))
    lorsa = model_class(LorsaConfig(**fields))
    expected = {name: tuple(t.shape) for name, t in lorsa.state_dict().items() if name in state}
    wrong = [f"{theirs} {tuple(weights[theirs].shape)} (expected {expected[ours]})"
             for theirs, ours in names.items() if tuple(state[ours].shape) != expected[ours]]  # fmt: skip
    require_that(not wrong, f"The weights of the Lorsa at {where} do not match its config.json: {', '.join(wrong)}.")
    lorsa.load_state_dict(state, strict=False)
    return lorsa.eval()


def head_thresholds(weights: dict[str, torch.Tensor], where: str,
                    shared: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Their JumpReLU thresholds (one per head) as our BatchTopK threshold and each head's scale of it
    (hf_lorsa.training.head_balance): the `shared` threshold an hf_lorsa export recorded, else the largest of theirs,
    and every head's as a fraction of it (1 where all agree)."""
    require_that(THRESHOLD_KEY in weights, f"The weights of the JumpReLU Lorsa at {where} lack {THRESHOLD_KEY}.")
    thresholds = weights[THRESHOLD_KEY].double().exp()
    largest = torch.tensor(shared, dtype=torch.float64) if shared is not None else thresholds.max()
    require_that(
        bool(largest > 0) and bool(torch.isfinite(largest)), f"{where}: its JumpReLU thresholds are not finite."
    )
    return largest.float(), (thresholds / largest).float()


def _stashed(stash: dict | None, fields: dict) -> dict:
    """Our own config fields kept in a config.json exported by hf_lorsa, when its structure still agrees. The
    norm factors are the stash's when the weights file's float32 norms round to them."""
    if not stash or any(stash.get(key) != fields[key] for key in STRUCTURE if key != "rope_parameters"):
        return {}
    bookkeeping = ("model_type", "architectures", "transformers_version", "_name_or_path")  # transformers' own
    keep = {k: v for k, v in stash.items() if k not in bookkeeping}
    for name in ("input_norm_factor", "output_norm_factor"):
        if not math.isclose(keep.get(name, 1.0), fields[name], rel_tol=1e-6):
            keep[name] = fields[name]
    return {**keep, "input_before_gain": True, "qk_norm": fields["qk_norm"]}


@torch.no_grad()
def fold_input_gain(lorsa, model) -> None:
    """Make a Lorsa that reads TransformerLens' `ln1.hook_normalized` read the host's attention input instead (the
    relation in this module's docstring), and record the host it is now bound to."""

    c = lorsa.config
    if not c.input_before_gain:
        return
    gain, bias = families.input_norm_affine(model, c.layer)
    require_that(bool((gain != 0).all()), f"Layer {c.layer}'s input norm has a zero gain in some dimension, so a Lorsa "
                                      "trained before it cannot be expressed after it.")  # fmt: skip
    transform_input(lorsa, 1.0 / gain.double(), bias.double(), fold=True)
    cfg = families.host_config(model)
    arch = families.architecture_of(model)
    c.input_before_gain = False
    c.host_model_type = c.host_model_type or cfg.model_type
    c.base_model_name_or_path = c.base_model_name_or_path or getattr(cfg, "_name_or_path", None) or None
    c.host_fingerprint = families.fingerprint(model, c.layer)
    c.attn_input_module = f"{arch.layers}.{c.layer}.{arch.input_norm}"
    c.attn_output_module = f"{arch.layers}.{c.layer}.{arch.attention}"


def transform_input(lorsa, scale: torch.Tensor, bias: torch.Tensor, fold: bool) -> None:
    """Scale what reads the input per dimension by `scale` and move the input's `bias` into the biases: folding
    (fold=True) subtracts it after scaling, unfolding adds it before. In float64, written back in place."""
    factor = lorsa.config.input_norm_factor
    pairs = ((lorsa.W_Q, lorsa.b_Q, "D, Hqk D dqk -> Hqk dqk"), (lorsa.W_K, lorsa.b_K, "D, Hqk D dqk -> Hqk dqk"),
             (lorsa.w_v, lorsa.b_v, "D, Hov D -> Hov"))  # fmt: skip
    for weight, b, pattern in pairs:
        w = weight.double()
        shape = (1, -1, 1) if w.dim() == 3 else (1, -1)
        if fold:
            w = w * scale.view(shape).to(w.device)
            b.copy_(b.double() - factor * einsum(bias.to(w.device), w, pattern))
        else:
            b.copy_(b.double() + factor * einsum(bias.to(w.device), w, pattern))
            w = w * scale.view(shape).to(w.device)
        weight.copy_(w)
