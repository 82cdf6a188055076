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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from einops import einsum
from safetensors.torch import load_file, save_file

WEIGHTS_FILE = "sae_weights.safetensors"
PICKLED_FILES = ("sae_weights.pt", "sae_weights.dcp/.metadata", "checkpoints/final.pt")
BUFFERS = ("mask", "IGNORE", "rotary_sin", "rotary_cos")  # their model's precomputed buffers, recomputed here
STASH_KEY = "hf_lorsa"  # our own config, kept in an exported config.json (their loader ignores unknown keys)
STRUCTURE = ("d_model", "n_qk_heads", "d_qk_head", "n_ov_heads", "top_k", "rope_parameters", "rope_interleaved")
LAYER_PATTERN = re.compile(r"^blocks\.(\d+)\.")


def is_llamascopium_config(config: dict) -> bool:
    """A config.json written by llamascopium (any of its dictionaries), not by transformers."""
    return "sae_type" in config and "model_type" not in config


def _require(ok: bool, message: str) -> None:
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
    _require(kind == "lorsa", f"{where} holds a llamascopium {kind!r} dictionary, not a Lorsa (sae_type 'lorsa'): "
                              "hf_lorsa reads Lorsas only; load their SAEs, transcoders and CLTs with llamascopium.")  # fmt: skip
    needed = ["d_model", "expansion_factor", "n_qk_heads", "d_qk_head", "top_k", "hook_point_in", "hook_point_out"]
    rotary = cfg.get("positional_embedding_type", "rotary") == "rotary"
    needed += ["rotary_dim"] if rotary else []
    missing = [key for key in needed if cfg.get(key) is None]
    _require(not missing, f"The config.json of the Lorsa at {where} lacks {missing}.")
    act_fn = cfg.get("act_fn", "relu")
    _require(act_fn == "topk", f"{where}: act_fn {act_fn!r} is not supported; hf_lorsa Lorsas keep the top-k heads "
                               "(act_fn 'topk').")  # fmt: skip
    _require(cfg.get("sparsity_include_decoder_norm", True), f"{where}: sparsity_include_decoder_norm false ranks "
             "heads by ReLU(z) alone; hf_lorsa ranks by ReLU(z) x ||w_o|| (their default) and cannot load it exactly.")  # fmt: skip
    mode = cfg.get("norm_activation", "dataset-wise")
    _require(mode in ("dataset-wise", "inference"), f"{where}: norm_activation {mode!r} normalises each token or "
             "batch by its own norm; hf_lorsa reads 'dataset-wise' or 'inference' Lorsas.")  # fmt: skip
    _require(cfg.get("rotary_scale", 1) == 1, f"{where}: rotary_scale {cfg.get('rotary_scale')} is not supported.")
    if layer is None:
        match = LAYER_PATTERN.match(cfg["hook_point_in"])
        _require(match is not None, f"{where}: the hook point {cfg['hook_point_in']!r} names no layer; pass layer= "
                                    "(the index of the decoder layer whose attention it replaces).")  # fmt: skip
        layer = int(match.group(1))
    d_model, d_qk = int(cfg["d_model"]), int(cfg["d_qk_head"])
    factors = {"input_norm_factor": 1.0, "output_norm_factor": 1.0}
    if mode == "dataset-wise":
        for name, hook in (("input_norm_factor", "hook_point_in"), ("output_norm_factor", "hook_point_out")):
            if norms is None:
                continue
            _require(cfg[hook] in norms, f"{where}: norm_activation is 'dataset-wise' but the weights hold no "
                                         f"dataset_average_activation_norm.{cfg[hook]}.")  # fmt: skip
            factors[name] = math.sqrt(d_model) / norms[cfg[hook]]
    scale = cfg.get("attn_scale") or math.sqrt(d_qk)
    qk_norm = bool(cfg.get("use_post_qk_ln", False))
    _require(not qk_norm or cfg.get("normalization_type") == "RMS",
             f"{where}: QK norm of type {cfg.get('normalization_type')!r} is not supported (RMS is).")  # fmt: skip
    return {
        "d_model": d_model, "n_qk_heads": int(cfg["n_qk_heads"]), "d_qk_head": d_qk,
        "n_ov_heads": int(d_model * cfg["expansion_factor"]), "top_k": int(cfg["top_k"]), "topk_rule": "relu",
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
    from .hub import repo_file

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
    from .hub import repo_file

    where = f"{name_or_path}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    config_path = repo_file(name_or_path, "config.json", subfolder, **hub_kwargs)
    _require(config_path is not None, f"{where} has no config.json.")
    cfg = json.loads(Path(config_path).read_text())
    weights_path = repo_file(name_or_path, WEIGHTS_FILE, subfolder, **hub_kwargs)
    if weights_path is None:
        _refuse_pickles(name_or_path, subfolder, hub_kwargs)
        raise OSError(f"{where} has a llamascopium config.json but no {WEIGHTS_FILE}.")
    return cfg, load_file(weights_path)


def is_llamascopium_folder(name_or_path, subfolder: str = "", **hub_kwargs) -> bool:
    """Whether the folder or repository's config.json was written by llamascopium."""
    from .hub import repo_file

    try:
        path = repo_file(name_or_path, "config.json", subfolder, **hub_kwargs)
        return path is not None and is_llamascopium_config(json.loads(Path(path).read_text()))
    except (OSError, ValueError):
        return False  # the usual loader says what is wrong


def load_llamascopium(name_or_path, subfolder: str = "", layer: int | None = None, **hub_kwargs):
    """A LorsaModel from their folder or Hub repository (its weights still read TransformerLens' input)."""
    cfg, weights = read_folder(name_or_path, subfolder, **hub_kwargs)
    where = f"{name_or_path}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    return from_llamascopium(cfg, weights, layer, where)


def from_llamascopium(cfg: dict, weights: dict[str, torch.Tensor], layer: int | None = None, where: str = ""):
    """A LorsaModel computing what their model computes on TransformerLens' input (`input_before_gain`)."""
    from .configuration_lorsa import LorsaConfig
    from .modeling_lorsa import LorsaModel

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
    _require(not missing, f"The weights of the Lorsa at {where} lack {missing}.")
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
    lorsa = LorsaModel(LorsaConfig(**fields))
    expected = {name: tuple(t.shape) for name, t in lorsa.state_dict().items() if name in state}
    wrong = [f"{theirs} {tuple(weights[theirs].shape)} (expected {expected[ours]})"
             for theirs, ours in names.items() if tuple(state[ours].shape) != expected[ours]]  # fmt: skip
    _require(not wrong, f"The weights of the Lorsa at {where} do not match its config.json: {', '.join(wrong)}.")
    lorsa.load_state_dict(state, strict=False)
    return lorsa.eval()


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
    from . import hosts

    c = lorsa.config
    if not c.input_before_gain:
        return
    gain, bias = hosts.input_norm_affine(model, c.layer)
    _require(bool((gain != 0).all()), f"Layer {c.layer}'s input norm has a zero gain in some dimension, so a Lorsa "
                                      "trained before it cannot be expressed after it.")  # fmt: skip
    _transform_input(lorsa, 1.0 / gain.double(), bias.double(), fold=True)
    cfg = hosts.host_config(model)
    arch = hosts.architecture_of(model)
    c.input_before_gain = False
    c.host_model_type = c.host_model_type or cfg.model_type
    c.base_model_name_or_path = c.base_model_name_or_path or getattr(cfg, "_name_or_path", None) or None
    c.host_fingerprint = hosts.fingerprint(model, c.layer)
    c.attn_input_module = f"{arch.layers}.{c.layer}.{arch.input_norm}"
    c.attn_output_module = f"{arch.layers}.{c.layer}.{arch.attention}"


def _transform_input(lorsa, scale: torch.Tensor, bias: torch.Tensor, fold: bool) -> None:
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


# ---- writing their format ----------------------------------------------------------------------------


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
    exported = copy.deepcopy(lorsa).float().cpu()
    if not c.input_before_gain:
        _require(host is not None, "Exporting needs the host model (host=...): their input is taken before the "
                                   "host's input-norm gain, which must be taken out of the weights.")  # fmt: skip
        from .hooks import check_lorsa_matches
        from .hosts import input_norm_affine

        check_lorsa_matches(host, lorsa)
        gain, bias = (t.double() for t in input_norm_affine(host, c.layer))
        with torch.no_grad():
            _transform_input(exported, gain, bias, fold=False)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_their_weights(exported, n_ctx), folder / WEIGHTS_FILE, {"format": "pt", "written_by": "hf_lorsa"})
    stash = c.to_dict()
    (folder / "config.json").write_text(json.dumps({**_their_config(c, n_ctx), STASH_KEY: stash}, indent=4))
    return folder


def check_exportable(c, n_ctx: int | None = None) -> int:
    """Refuse, before anything is loaded or written, what their format cannot hold; returns the n_ctx to write."""
    _require(c.topk_rule == "relu", "Their Lorsa keeps ReLU(z) of the heads ranked by ReLU(z) x ||w_o|| (topk_rule "
             "'relu'); this one keeps signed activations (topk_rule 'abs'), which their format cannot express.")  # fmt: skip
    _require(c.attn_logit_softcapping is None, "Their Lorsa has no attention logit soft-capping; this one uses "
                                               f"{c.attn_logit_softcapping}.")  # fmt: skip
    rope_type = (c.rope_parameters or {}).get("rope_type", "default")
    _require(rope_type in ("default", "llama3"), f"Their Lorsa has no {rope_type!r} rotary scaling.")
    _require(c.layer is not None, "This Lorsa records no layer; set lorsa.config.layer.")
    if n_ctx is None:
        n_ctx = (c.training_args or {}).get("context_length") or min(c.max_position_embeddings, 4096)
    _require(c.sliding_window is None or c.sliding_window >= n_ctx, f"Their Lorsa sees every earlier position; this "
             f"one has a sliding window of {c.sliding_window}, shorter than n_ctx {n_ctx} (pass a smaller n_ctx).")  # fmt: skip
    _require(int(c.d_model * (c.n_ov_heads / c.d_model)) == c.n_ov_heads,
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


@dataclass
class ExportArguments:
    """`hf-lorsa export`: which Lorsa, its host, and where their format goes."""

    lorsa: str = field(metadata={"help": "Lorsa folder or Hub id (required)"})
    output: str = field(metadata={"help": "folder to write config.json and sae_weights.safetensors into (required)"})
    subfolder: str = field(default="", metadata={"help": "subfolder of the Lorsa repository"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "host model, whose input-norm gain is taken out (None: the recorded one)"}
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file of the host (None: the recorded one)"})
    n_ctx: int | None = field(default=None, metadata={"help": "their n_ctx (None: the training context length)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier export in --output"})


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    from .arguments import check_int, check_writable_dir, command_line, require
    from .loading import check_gguf_file, open_host
    from .modeling_lorsa import LorsaModel

    with command_line("hf-lorsa export"):
        parser = HfArgumentParser(ExportArguments, prog="hf-lorsa export",
                                  description="Write a Lorsa in the authors' format (llamascopium).")  # fmt: skip
        (args,) = parser.parse_args_into_dataclasses(argv)
        check_int("n_ctx", args.n_ctx, optional=True)
        out = Path(args.output)
        check_writable_dir(out, "output")
        require(args.overwrite or not (out / "config.json").exists(),
                f"{out} already holds an export; pass --overwrite to replace it.")  # fmt: skip
        lorsa = LorsaModel.from_pretrained(args.lorsa, subfolder=args.subfolder)
        check_exportable(lorsa.config, args.n_ctx)
        host = None
        if not lorsa.config.input_before_gain:
            name = args.model_name_or_path or lorsa.config.base_model_name_or_path
            require(bool(name), "This Lorsa records no base model; pass --model_name_or_path.")
            gguf = args.gguf_file or (None if args.model_name_or_path else lorsa.config.base_model_gguf_file)
            check_gguf_file(name, gguf)
            host = open_host(name, gguf)
        export_llamascopium(lorsa, out, host, args.n_ctx)
    print(f"Wrote {out / 'config.json'} and {out / WEIGHTS_FILE}: layer {lorsa.config.layer}, "
          f"{lorsa.config.n_ov_heads} OV heads, hook points blocks.{lorsa.config.layer}.ln1.hook_normalized -> "
          f"blocks.{lorsa.config.layer}.hook_attn_out")  # fmt: skip
    return 0
