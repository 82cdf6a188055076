"""Where the attention of layer L lives in each supported host, and what it computes.

Weights are read by probing the host's own projection modules with the identity matrix, so LoRA
adapters, Conv1D layouts and fused QKV projections need no special cases beyond their output layout.

Axes: D d_model, H query heads, Hkv key/value heads, dh head width.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, fields, replace
from functools import reduce

import torch
from accelerate.utils import align_module_device, has_offloaded_params
from torch import nn


@dataclass(frozen=True)
class Architecture:
    """Module paths of one model family, relative to the causal LM (PEFT wrappers removed)."""

    layers: str  # the ModuleList of decoder layers
    attention: str  # attribute of a decoder layer
    input_norm: str  # attribute of a decoder layer: the norm whose output the attention reads
    final_norm: str  # the norm before the unembedding
    qkv: str  # "separate" (q_proj/k_proj/v_proj/o_proj), "phi3", "gpt2" or "neox"


_LLAMA_LIKE = Architecture("model.layers", "self_attn", "input_layernorm", "model.norm", "separate")
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": Architecture("model.layers", "self_attn", "input_layernorm", "model.norm", "phi3"),
    "gpt2": Architecture("transformer.h", "attn", "ln_1", "transformer.ln_f", "gpt2"),
    "gpt_neox": Architecture("gpt_neox.layers", "attention", "input_layernorm", "gpt_neox.final_layer_norm", "neox"),
}


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def get_module(root: nn.Module, path: str) -> nn.Module:
    try:
        return reduce(getattr, path.split("."), root) if path else root
    except AttributeError as err:
        raise ValueError(f"{type(root).__name__} has no module at path {path!r}.") from err


def architecture_of(model: nn.Module) -> Architecture:
    model_type = getattr(getattr(unwrap(model), "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"Unsupported architecture {model_type!r}. Supported: {', '.join(sorted(ARCHITECTURES))}. "
            "For another causal LM, pass the attention module path explicitly, e.g. "
            "capture(model, layer, attention_module='model.layers.{layer}.self_attn'), or register it with "
            "hf_lorsa.host.families.ARCHITECTURES[model_type] = Architecture(...)."
        )
    return ARCHITECTURES[model_type]


def num_layers(model: nn.Module) -> int:
    return len(get_module(unwrap(model), architecture_of(model).layers))


@contextlib.contextmanager
def weights_in_memory(model: nn.Module, *modules: nn.Module):
    """Inside the block, the weights of `modules` are real tensors on their execution device even where accelerate
    offloaded them to the CPU or disk (`device_map`): each offloaded unit holding them (the module itself, its parts,
    or the nearest whole it belongs to) is brought in, then offloaded again. A no-op for a model in memory."""
    root = unwrap(model)
    names = {id(module): name for name, module in root.named_modules()}
    owners = {}
    for module in modules:
        owners.update({id(part): part for part in module.modules() if has_offloaded_params(part)})
        parts = names[id(module)].split(".") if names[id(module)] else []
        for i in range(len(parts) - 1, -1, -1):
            whole = get_module(root, ".".join(parts[:i]))
            if has_offloaded_params(whole):
                owners[id(whole)] = whole
                break
    with contextlib.ExitStack() as stack:
        for owner in owners.values():
            stack.enter_context(align_module_device(owner))
        yield


def truncated_config(config, n_layers: int):
    """A copy of a host's config with only its first `n_layers` decoder blocks: a model built or loaded from it has
    the embeddings, those blocks, the final norm and the unembedding, never the blocks above (their weights in the
    checkpoint are not read into memory). Per-layer lists (`layer_types`, ...) are cut to match."""
    config = copy.deepcopy(config)
    text = text_config(config)
    full = text.num_hidden_layers
    if n_layers >= full:
        return config
    text.num_hidden_layers = n_layers
    for name, value in vars(text).items():
        if "layer" in name and isinstance(value, list) and len(value) == full:
            setattr(text, name, value[:n_layers])
    return config


def check_layer(model: nn.Module, layer: int) -> None:
    n = num_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer must be an integer in [0, {n - 1}] for this {n}-layer model, got {layer!r}.")


def attention_path(model: nn.Module, layer: int, attention_module: str | None = None) -> str:
    """Dotted path of layer `layer`'s attention module in the unwrapped model."""
    if attention_module is not None:
        return attention_module.format(layer=layer)
    arch = architecture_of(model)
    check_layer(model, layer)
    return f"{arch.layers}.{layer}.{arch.attention}"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The host's decoder layers, in order."""
    return get_module(unwrap(model), architecture_of(model).layers)


@torch.no_grad()
def direct_logits(model: nn.Module, directions: torch.Tensor, tokens: list[int] | None = None,
                  centred: bool = False) -> torch.Tensor:  # fmt: skip
    """What writing each direction (N, D) into the last residual stream does to the logits: through the final
    norm's per-channel scale (and a LayerNorm's centring) and the unembedding. (N, V), or (N, len(tokens)) for the
    given tokens only, float32. `centred`: minus each direction's mean logit over the vocabulary, which softmax
    ignores, so that logits of different directions compare."""
    output = unwrap(model).get_output_embeddings()
    norm = get_module(unwrap(model), architecture_of(model).final_norm)
    with weights_in_memory(model, output, norm):  # offloaded weights are brought in to be read
        unembedding = output.weight  # (V, D)
        W_U = unembedding if tokens is None else unembedding[torch.as_tensor(tokens, device=unembedding.device)]
        W_U = W_U.float()
        d = directions.float().to(W_U.device) * probe_norm_scale(norm, directions.shape[-1]).to(W_U.device)
        if "LayerNorm" in type(norm).__name__:
            d = d - d.mean(-1, keepdim=True)
        logits = d @ W_U.T
        return logits - d @ unembedding.float().mean(0)[:, None] if centred else logits


def backbone(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers; it receives the 2-D padding mask as `attention_mask`."""
    arch = architecture_of(model)
    return get_module(unwrap(model), arch.layers.rsplit(".", 1)[0])


def input_device(model: nn.Module) -> torch.device:
    """Where the model's token ids go: its input embedding's device (the first one under a device_map; where it runs
    when accelerate offloads it to the CPU or disk)."""
    embedding = unwrap(model).get_input_embeddings()
    for module in (embedding, unwrap(model)):
        running = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if running is not None:
            return torch.device(running)
    return embedding.weight.device


def host_config(model: nn.Module):
    return text_config(unwrap(model).config)


def text_config(config):
    """The text part of a host's config (the config itself for a text-only model)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# ---- what the attention computes ----------------------------------------------------------------


@dataclass
class HostAttention:
    """One host attention layer in explicit form (fp32). out = sum_h A_h (x W_v^h + b_v^h) W_o^h + b_o."""

    W_q: torch.Tensor  # (H, D, dh)
    b_q: torch.Tensor  # (H, dh)
    W_k: torch.Tensor  # (Hkv, D, dh)
    b_k: torch.Tensor  # (Hkv, dh)
    W_v: torch.Tensor  # (Hkv, D, dh)
    b_v: torch.Tensor  # (Hkv, dh)
    W_o: torch.Tensor  # (H, dh, D)
    b_o: torch.Tensor  # (D,)
    q_norm: torch.Tensor | None  # (dh,) effective RMSNorm scale, or None
    k_norm: torch.Tensor | None

    @property
    def n_heads(self) -> int:
        return self.W_q.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.W_k.shape[0]

    def kv_head(self, head: int) -> int:
        return head // (self.n_heads // self.n_kv_heads)

    def to(self, device: torch.device) -> HostAttention:
        """The same layer with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return replace(self, **{name: t.to(device) for name, t in moved.items()})


@torch.no_grad()
def probe_affine(module: nn.Module, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, b) with module(x) = x @ M + b, read by feeding 0 and the identity: M (d_in, d_out), b (d_out,)."""
    param = next(module.parameters())
    x = torch.cat([torch.zeros(1, d_in), torch.eye(d_in)]).to(param.device, param.dtype)
    y = module(x).float().cpu()  # weights are assembled on the CPU, whatever device the host is on
    return y[1:] - y[0], y[0]


@torch.no_grad()
def probe_norm_scale(norm: nn.Module | None, dim: int) -> torch.Tensor | None:
    """Effective per-channel scale of an RMSNorm or LayerNorm (Gemma's 1 + w included), on the CPU.

    Read at an input of alternating +-1e3 (zero mean, RMS 1e3), minus the output at zero (a LayerNorm bias).
    """
    if norm is None:
        return None
    param = next(norm.parameters())
    probe = torch.zeros(2, dim)
    probe[0, ::2], probe[0, 1::2] = 1e3, -1e3
    out = norm(probe.to(param.device, param.dtype)).float().cpu()
    return (out[0] - out[1]) * probe[0].sign()


@torch.no_grad()
def input_norm_affine(model: nn.Module, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gain, bias) of layer `layer`'s pre-attention norm, each (D,) float32 on the CPU: the attention input is
    normalised(x) * gain + bias (bias zero for an RMSNorm; Gemma's 1 + w is the gain)."""
    check_layer(model, layer)
    arch = architecture_of(model)
    norm = get_module(unwrap(model), f"{arch.layers}.{layer}.{arch.input_norm}")
    dim = host_config(model).hidden_size
    param = next(norm.parameters())
    bias = norm(torch.zeros(1, dim, device=param.device, dtype=param.dtype)).float().cpu()[0]
    return probe_norm_scale(norm, dim), bias


def read_attention(model: nn.Module, layer: int) -> HostAttention:
    """The weights of layer `layer`'s attention, whatever the family's projection layout (offloaded weights are
    brought in while they are read)."""
    attn = get_module(unwrap(model), attention_path(model, layer))
    with weights_in_memory(model, attn):
        return _read_attention(model, attn)


def _read_attention(model: nn.Module, attn: nn.Module) -> HostAttention:
    arch = architecture_of(model)
    cfg = host_config(model)
    D = cfg.hidden_size
    H = cfg.num_attention_heads
    dh = getattr(cfg, "head_dim", None) or D // H
    Hkv = getattr(cfg, "num_key_value_heads", None) or H

    if arch.qkv == "separate":
        (Mq, bq), (Mk, bk), (Mv, bv) = (probe_affine(getattr(attn, n), D) for n in ("q_proj", "k_proj", "v_proj"))
        Mo, bo = probe_affine(attn.o_proj, H * dh)
    elif arch.qkv == "phi3":
        M, b = probe_affine(attn.qkv_proj, D)
        sizes = [H * dh, Hkv * dh, Hkv * dh]
        (Mq, Mk, Mv), (bq, bk, bv) = M.split(sizes, dim=1), b.split(sizes)
        Mo, bo = probe_affine(attn.o_proj, H * dh)
    elif arch.qkv == "gpt2":
        M, b = probe_affine(attn.c_attn, D)
        (Mq, Mk, Mv), (bq, bk, bv) = M.split(D, dim=1), b.split(D)
        Mo, bo = probe_affine(attn.c_proj, D)
    elif arch.qkv == "neox":
        M, b = probe_affine(attn.query_key_value, D)
        M, b = M.view(D, H, 3, dh), b.view(H, 3, dh)  # the layout GPTNeoXAttention's .view/.chunk reads
        Mq, Mk, Mv = (M[:, :, i].reshape(D, H * dh) for i in range(3))
        bq, bk, bv = (b[:, i].reshape(H * dh) for i in range(3))
        Mo, bo = probe_affine(attn.dense, D)
    else:  # pragma: no cover - guarded by ARCHITECTURES
        raise ValueError(f"Unknown projection layout {arch.qkv!r}.")

    def heads(M: torch.Tensor, b: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return M.view(D, n, dh).transpose(0, 1).contiguous(), b.view(n, dh)

    W_q, b_q = heads(Mq, bq, H)
    W_k, b_k = heads(Mk, bk, Hkv)
    W_v, b_v = heads(Mv, bv, Hkv)
    return HostAttention(
        W_q, b_q, W_k, b_k, W_v, b_v, Mo.view(H, dh, D), bo,
        probe_norm_scale(getattr(attn, "q_norm", None), dh),
        probe_norm_scale(getattr(attn, "k_norm", None), dh),
    )  # fmt: skip


def position_settings(model: nn.Module, layer: int) -> dict:
    """The LorsaConfig fields that make its QK heads treat positions like layer `layer` of the host."""
    cfg = host_config(model)
    attn = get_module(unwrap(model), attention_path(model, layer))
    rope = getattr(cfg, "rope_parameters", None) if architecture_of(model).qkv != "gpt2" else None
    if rope and getattr(cfg, "layer_types", None) and cfg.layer_types[layer] in rope:
        rope = rope[cfg.layer_types[layer]]  # per-layer-type rotary (Gemma 3: local vs global)
    window = getattr(attn, "sliding_window", getattr(cfg, "sliding_window", None))
    q_norm = getattr(attn, "q_norm", None)
    return {
        "rope_parameters": dict(rope) if rope else None,
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None) or cfg.n_positions,
        "attn_scale": float(attn.scaling),
        "attn_logit_softcapping": getattr(cfg, "attn_logit_softcapping", None),
        "sliding_window": window,
        "qk_norm": q_norm is not None,
        "qk_norm_eps": float(getattr(q_norm, "variance_epsilon", getattr(q_norm, "eps", 1e-6))),
    }


FINGERPRINT_SAMPLES = 16  # weights read at fixed positions of each matrix


@torch.no_grad()
def fingerprint(model: nn.Module, layer: int) -> dict[str, list[float]]:
    """Per weight of layer `layer`'s attention (LoRA adapters left out): its RMS, then its values at
    FINGERPRINT_SAMPLES fixed positions. The same in any dtype to within rounding, and different for another
    model of the same shape: at realistic sizes two random or related models have nearly equal norms, but not
    equal weights."""
    attn = get_module(unwrap(model), attention_path(model, layer))
    prints = {}
    with weights_in_memory(model, attn):  # read where they are (offloaded ones brought in meanwhile)
        for name, param in attn.named_parameters():
            if "lora_" in name:
                continue
            flat = param.detach().flatten()
            positions = torch.randint(flat.numel(), (FINGERPRINT_SAMPLES,), generator=torch.Generator().manual_seed(0))
            rms = flat.float().pow(2).mean().sqrt()
            values = [rms, *flat[positions.to(flat.device)].float()]
            prints[name.replace(".base_layer", "")] = [float(f"{float(v):.7g}") for v in values]
    return prints


def same_fingerprint(a: dict[str, list[float]], b: dict[str, list[float]], rtol: float = 1e-2) -> bool:
    """Equal up to rounding: each value within rtol of its own size plus rtol of its weight's RMS (bf16 rounds
    by at most 2^-8 of a value)."""
    if a.keys() != b.keys():
        return False
    for name in a:
        rms = abs(a[name][0])
        if len(a[name]) != len(b[name]) or any(abs(x - y) > rtol * (abs(x) + rms) for x, y in zip(a[name], b[name])):
            return False
    return True
