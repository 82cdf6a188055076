"""LorsaModel: thousands of sparsely active rank-1 attention heads standing in for one attention layer.

Axes: B batch, T query positions, S key (source) positions, D d_model, Hqk QK heads, dqk QK head width,
G OV heads per QK head (group size), Hov = Hqk * G OV heads, K active heads per position, E events (a
head at a position in a batch row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from ..base.usage import is_int
from ..host import families
from ..host.attention_mask import attention_bias, needs_mask, positions_from_mask
from ..kernels.blocked_projection import project_positions_last
from ..kernels.causal_attention import causal_attention
from ..kernels.sparse_gradient_attention import takes_sparse_gradient
from . import hub
from .configuration_lorsa import LorsaConfig
from .files import location, read_eval_results
from .host_match import check_lorsa_matches
from .initialization import initialize_from_host
from .input_checks import check_attention_input
from .llamascopium import is_llamascopium_folder, load_llamascopium
from .qk_norm import HeadRMSNorm, qk_norm
from .qk_projection import queries_or_keys
from .rotary import LorsaRotaryEmbedding
from .selection import BATCH_TOPK_CAP, UNSET, batch_top_k, top_k_per_position

# On the CPU the decode switches from gathering K rows of w_o to a dense product at K >= n_ov / DENSE_DECODE_RATIO:
# on the 2-core CPU where the two cost the same (scripts/bench_decode.py), well before the gather's O(N * K * D)
# backward memory matters. On a GPU the dense product runs on the tensor cores in bf16: always dense there
# (H100, BENCHMARKS.md: config c's step 51 ms against 62 ms with the gather; config b's 5.7 against 5.2 ms).
DENSE_DECODE_RATIO = 32


@dataclass
class LorsaOutput(ModelOutput):
    """What one forward pass of a Lorsa returns.

    Attributes:
        reconstruction: (B, T, D) the predicted attention output.
        top_k_values: (B, T, K) activations of the heads kept at each position.
        top_k_indices: (B, T, K) which OV heads those are.
        pre_activations: (B, T, Hov) every head's z before top-k, or None unless asked for.
    """

    reconstruction: torch.Tensor | None = None
    top_k_values: torch.Tensor | None = None
    top_k_indices: torch.Tensor | None = None
    pre_activations: torch.Tensor | None = None


class LorsaPreTrainedModel(PreTrainedModel):
    config_class = LorsaConfig
    config: LorsaConfig
    base_model_prefix = "lorsa"
    main_input_name = "hidden_states"
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, LorsaModel):
            module.reset_parameters()
        elif isinstance(module, HeadRMSNorm):
            init.ones_(module.weight)
        else:  # QK norms and the rotary buffers, the transformers way
            super()._init_weights(module)


class LorsaModel(LorsaPreTrainedModel):
    """Low-Rank Sparse Attention (He et al., 2025): n_qk QK heads, each shared by a group of rank-1 OV heads."""

    eval_results: dict | None = None  # set by hf-lorsa evaluate; written to eval_results.json and the card
    dense_decode: bool | None = None  # force the dense (True) or gathering (False) decode; None: by size and device

    def __init__(self, config: LorsaConfig):
        super().__init__(config)
        c = config
        self.W_Q = nn.Parameter(torch.empty(c.n_qk_heads, c.d_model, c.d_qk_head))
        self.W_K = nn.Parameter(torch.empty(c.n_qk_heads, c.d_model, c.d_qk_head))
        self.b_Q = nn.Parameter(torch.zeros(c.n_qk_heads, c.d_qk_head))
        self.b_K = nn.Parameter(torch.zeros(c.n_qk_heads, c.d_qk_head))
        self.w_v = nn.Parameter(torch.empty(c.n_ov_heads, c.d_model))
        self.b_v = nn.Parameter(torch.zeros(c.n_ov_heads))
        self.w_o = nn.Parameter(torch.empty(c.n_ov_heads, c.d_model))
        self.b_D = nn.Parameter(torch.zeros(c.d_model))
        self.q_norm = qk_norm(c)
        self.k_norm = qk_norm(c)
        self.rotary_emb = LorsaRotaryEmbedding(c) if c.rope_parameters is not None else None
        if c.act_fn == "batchtopk":  # the score a head must pass at inference, learned in training
            self.register_buffer("threshold", torch.full((), UNSET))
            self.register_buffer(
                "threshold_scale", torch.ones(c.n_ov_heads)
            )  # per head (hf_lorsa.training.head_balance)
        self.post_init()

    def reset_parameters(self) -> None:
        """Random initialisation: fan-in scaled projections, unit-norm output directions, zero biases.

        Uses transformers' init functions, which leave weights loaded from a checkpoint untouched.
        """
        std = self.config.d_model**-0.5
        for weight in (self.W_Q, self.W_K, self.w_v):
            init.normal_(weight, std=std)
        init.copy_(self.w_o, F.normalize(torch.randn(self.w_o.shape, device=self.w_o.device), dim=-1))
        for bias in (self.b_Q, self.b_K, self.b_v, self.b_D):
            init.zeros_(bias)
        if self.config.act_fn == "batchtopk":  # a checkpoint saved before heads had their own thresholds
            init.ones_(self.threshold_scale)

    @classmethod
    def from_host(cls, model, layer: int, seed: int = 0, head_weights=None, **sizes) -> LorsaModel:
        """A Lorsa (of this class) initialised from layer `layer`'s attention, on the host's device.

        `sizes` are those of `LorsaConfig.from_host` (`n_ov_heads`, `expansion_factor`, `n_qk_heads`, `top_k`,
        config fields); without any it is an exact replica of the layer (Hov = H * dh, top_k = Hov). QK heads are
        shared evenly among host heads, or in proportion to `head_weights` (H,) (training passes the variance of
        each host head's output, `initialization.head_output_variance`).
        """
        lorsa = cls(LorsaConfig.from_host(model, layer, **sizes))
        initialize_from_host(lorsa, model, layer, seed, head_weights)
        return lorsa.to(families.input_device(model))  # where the host runs (its first device under a device_map)

    # ---- Hub -----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, host=None, layer: int | None = None, **kwargs):
        """Load from a Hub id or directory (`subfolder=` for one layer of a release); safetensors only.

        Also reads Lorsas written by the authors' code (llamascopium: config.json with `sae_type` and
        sae_weights.safetensors). Those read the attention input before the host's input-norm gain: given the
        `host` model, the gain is folded in now, else at the first `splice`, evaluation or analysis. `layer`
        names the host layer when their hook point does not. With `host=`, any Lorsa is checked against it.
        """
        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        subfolder = kwargs.get("subfolder") or ""
        if is_llamascopium_folder(pretrained_model_name_or_path, subfolder, **hub_kwargs):
            lorsa = load_llamascopium(cls, pretrained_model_name_or_path, subfolder, layer, **hub_kwargs)
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            lorsa = lorsa.to(getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else lorsa.dtype)
            info = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
        else:
            lorsa, info = cls._load_own_format(pretrained_model_name_or_path, *args, **kwargs)
            if layer is not None:
                lorsa.config.layer = layer
        hub.own_allocations(lorsa)
        if host is not None:
            check_lorsa_matches(host, lorsa)
        return (lorsa, info) if kwargs.get("output_loading_info") else lorsa

    @classmethod
    def _load_own_format(cls, pretrained_model_name_or_path, *args, **kwargs):
        hub.check_lorsa_config(pretrained_model_name_or_path, kwargs)
        kwargs["output_loading_info"] = True
        lorsa, info = hub.load_safetensors_only(super().from_pretrained, pretrained_model_name_or_path, *args, **kwargs)
        hub.check_loading_info(pretrained_model_name_or_path, info)
        hub.check_finite(lorsa, location(pretrained_model_name_or_path, kwargs.get("subfolder")))
        lorsa.eval_results = read_eval_results(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        return lorsa, info

    def extra_repr(self) -> str:
        c = self.config
        return (f"layer={c.layer}, d_model={c.d_model}, n_qk_heads={c.n_qk_heads}, d_qk_head={c.d_qk_head}, "
                f"n_ov_heads={c.n_ov_heads}, top_k={c.top_k}, topk_rule={c.topk_rule!r}")  # fmt: skip

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' save (safetensors), plus eval_results.json and a README.md model card. Every file gets the
        mode the user's umask gives new files (transformers writes the weights through a private temporary file)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        hub.write_card(self, save_directory)
        hub.usual_file_modes(save_directory)

    def push_to_hub(self, repo_id: str, subfolder: str | None = None, commit_message: str | None = None,
                    private: bool | None = None, token: str | None = None, revision: str | None = None,
                    create_pr: bool = False, base_model: str | None = None) -> object:  # fmt: skip
        """Upload to `repo_id` (under `subfolder` for one layer of a multi-layer release) with its model card. A Lorsa
        of a local host needs `base_model`, the host's Hub id, which the card then names."""
        return hub.push(self, repo_id, subfolder, commit_message, private, token, revision, create_pr, base_model)

    # ---- forward -------------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        top_k: int | None = None,
        output_pre_activations: bool = False,
    ) -> LorsaOutput:
        """Reconstruct the attention output from the attention input `hidden_states` (B, T, D).

        `attention_mask` is the usual (B, T) padding mask (1 = token); `position_ids` default to the
        positions of the real tokens; `position_embeddings` are the host's (cos, sin) when spliced.
        `top_k` overrides `config.top_k` (for annealing).
        """
        z = self.pre_activations(hidden_states, position_ids, attention_mask, position_embeddings)  # (B, T, Hov)
        values, indices = self.select_top_k(z, self.config.top_k if top_k is None else top_k)
        return LorsaOutput(
            reconstruction=self.decode(values, indices),
            top_k_values=values,
            top_k_indices=indices,
            pre_activations=z if output_pre_activations else None,
        )

    def pre_activations(self, hidden_states, position_ids=None, attention_mask=None, position_embeddings=None):
        """z of every OV head at every position (B, T, Hov), through the fused attention path."""
        x = self._check_input(hidden_states, position_ids, attention_mask) * self.config.input_norm_factor
        q, k = self.queries_keys(x, position_ids, attention_mask, position_embeddings)  # (B, Hqk, T, dqk)
        capped = self.config.attn_logit_softcapping is not None
        masked = needs_mask(attention_mask, self.config.sliding_window)
        width = self.config.n_ov_heads // self.config.n_qk_heads
        # v laid out positions last where causal_attention's sparse-gradient path reads it so
        positions_last = not (capped or masked) and takes_sparse_gradient(q, k, width)
        v = rearrange(
            self.ov_values(x, positions_last=positions_last), "b t (h g) -> b h t g", h=self.config.n_qk_heads
        )
        if capped:  # SDPA has no soft-capping: take the explicit path.
            z = self._pattern(q, k, attention_mask) @ v
        elif masked:
            allowed = attention_bias(attention_mask, x.shape[1], self.config.sliding_window, x.device)
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.config.scaling)
        else:
            z = causal_attention(q, k, v, self.config.scaling)
        return rearrange(z, "b h t g -> b t (h g)")

    def ov_values(self, x: torch.Tensor, positions_last: bool = False) -> torch.Tensor:
        """Per-position value of each OV head, x w_v + b_v: (B, T, Hov) (what attention mixes; the heads'
        activations after attention and top-k are `LorsaOutput.top_k_values`). `positions_last`: laid out
        (Hov, B * T) in memory, where `sparse_gradient_attention` reads v^T's rows and writes dv's."""
        if positions_last:
            return project_positions_last(x.flatten(0, 1), self.w_v, self.b_v).t().unflatten(0, x.shape[:2])
        return F.linear(x, self.w_v, self.b_v)

    def queries_keys(self, x, position_ids=None, attention_mask=None, position_embeddings=None):
        """Queries and keys (B, Hqk, T, dqk) with the host's QK-norm and rotary treatment, each head's dims in one
        order for both (`qk_projection`: rotary pairs side by side, or the host's): the scores q . k are the host's."""
        if self.rotary_emb is not None and position_embeddings is None:
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask, x.shape[0], x.shape[1], x.device)
            position_embeddings = self.rotary_emb(x, position_ids)
        pe = position_embeddings if self.rotary_emb is not None else None
        paired = 0 if pe is None or self.config.rope_interleaved else pe[0].shape[-1]  # half-split dims to pair up
        q = queries_or_keys(x, self.W_Q, self.b_Q, self.q_norm, pe, paired)  # (B, Hqk, T, dqk)
        return q, queries_or_keys(x, self.W_K, self.b_K, self.k_norm, pe, paired)

    def select_top_k(self, z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the k heads with the largest score at each position (LORSA.md: |z| * ||w_o|| or ReLU), or with
        act_fn "batchtopk" k per position on average (`hf_lorsa.model.selection`)."""
        if not is_int(k) or not 0 < k <= self.config.n_ov_heads:
            raise ValueError(f"top_k must be in [1, n_ov_heads={self.config.n_ov_heads}], got {k}.")
        act = z.relu() if self.config.topk_rule == "relu" else z
        if k == self.config.n_ov_heads:  # every head (the start of K annealing): no ranking to do
            return act, torch.arange(k, device=z.device).expand_as(act)
        scores = self.head_scores(z)
        if self.config.act_fn == "batchtopk":  # (B, T, 4K), zeros where a kept head is below its bar
            learn = self.training and k == self.config.top_k
            scores = scores / self.threshold_scale.to(scores.dtype)  # each head's own threshold (head_balance)
            return batch_top_k(scores, act, k, self.threshold, self.training, learn)
        return top_k_per_position(scores, act, k)

    def head_scores(self, z: torch.Tensor) -> torch.Tensor:
        """Each head's score (..., Hov) before its own threshold scale: the size of what it writes, |z| or ReLU(z)
        times ||w_o|| (LORSA.md). Ranks only: no gradient."""
        act = z.relu() if self.config.topk_rule == "relu" else z.abs()
        return act.detach() * self.w_o.detach().norm(dim=-1).to(z.dtype)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """sum_k values_k w_o[indices_k] + b_D: (B, T, D).

        Two ways, the same sum (`dense_decode` picks one; None: by DENSE_DECODE_RATIO). Gather: only the K rows
        of w_o per position, in the weights' dtype (CUDA has no bf16 backward for embedding_bag's per-sample
        weights). Dense: one (N, Hov) @ (Hov, D) product, in autocast's dtype when autocast is on, whose memory
        is O(N * Hov) whatever K is, where the gather's backward would need O(N * K * D).
        """
        batch_shape, k = values.shape[:-1], values.shape[-1]
        values, indices = values.reshape(-1, k), indices.reshape(-1, k)
        if self.uses_dense_decode(k, values.device):
            device = values.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.w_o.dtype
            dense = values.new_zeros(values.shape[0], self.config.n_ov_heads, dtype=dtype)
            flat = dense.scatter_(-1, indices, values.to(dtype)) @ self.w_o  # in place: no copy of (N, Hov)
        elif self.holds_inactive(k):  # gather only the active entries (their count reaches the host: CPU only)
            active = values != 0
            offsets = active.sum(-1).cumsum(0).roll(1)
            offsets[0] = 0
            weights = values[active].to(self.w_o.dtype)
            flat = F.embedding_bag(indices[active], self.w_o, offsets, per_sample_weights=weights, mode="sum")
        else:
            flat = F.embedding_bag(indices, self.w_o, per_sample_weights=values.to(self.w_o.dtype), mode="sum")
        out = flat.view(*batch_shape, -1) + self.b_D
        return out / self.config.output_norm_factor

    def uses_dense_decode(self, k: int, device: torch.device) -> bool:
        """Whether `decode` of (..., k) values takes the dense product (always on a GPU) or gathers rows of w_o."""
        if self.dense_decode is not None:
            return self.dense_decode
        active = k // BATCH_TOPK_CAP if self.holds_inactive(k) else k  # rows the gather would read per position
        return device.type != "cpu" or active * DENSE_DECODE_RATIO >= self.config.n_ov_heads

    def holds_inactive(self, k: int) -> bool:
        """Under batchtopk, outputs of width k < Hov have room for 4x the heads active on average (K of 4K)."""
        return self.config.act_fn == "batchtopk" and k < self.config.n_ov_heads

    # ---- explicit path (analysis) --------------------------------------------------------------------

    def _pattern(self, q, k, attention_mask) -> torch.Tensor:
        logits = (q @ k.transpose(-1, -2)).float()  # (B, Hqk, T, S)
        allowed = attention_bias(attention_mask, q.shape[2], self.config.sliding_window, q.device)
        return self._softmax(logits, allowed).to(q.dtype)

    def _softmax(self, logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        logits = logits * self.config.scaling
        if self.config.attn_logit_softcapping is not None:
            cap = self.config.attn_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)

    def attention_rows(self, hidden_states, batch_index, qk_heads, positions, attention_mask=None, chunk: int = 4096):
        """Selected rows A[b, h, t, :] of the attention patterns, for events (b, h, t) given as three (E,)
        tensors: (E, S). Only those rows are computed, so memory stays small for long contexts and many QK
        heads (the full pattern is B x Hqk x T x S)."""
        rows = [
            r
            for _, r in self.iter_attention_rows(hidden_states, batch_index, qk_heads, positions, attention_mask, chunk)
        ]
        return torch.cat(rows) if rows else hidden_states.new_zeros(0, hidden_states.shape[1])

    def iter_attention_rows(self, hidden_states, batch_index, qk_heads, positions, attention_mask=None, chunk=4096):
        """`attention_rows` chunk by chunk: yields (slice of the events, rows (chunk, S))."""
        x = self._check_input(hidden_states) * self.config.input_norm_factor
        q, k = self.queries_keys(x, None, attention_mask)  # (B, Hqk, T, dqk)
        allowed = attention_bias(attention_mask, x.shape[1], self.config.sliding_window, x.device)[:, 0]  # (B|1, T, S)
        for start in range(0, len(batch_index), chunk):
            part = slice(start, start + chunk)
            b, h, t = batch_index[part], qk_heads[part], positions[part]
            logits = einsum(q[b, h, t].float(), k[b, h].float(), "E dqk, E S dqk -> E S")
            yield part, self._softmax(logits, allowed[b if allowed.shape[0] > 1 else 0 * b, t])

    def attention_pattern(self, hidden_states, qk_head: int | None = None, position_ids=None, attention_mask=None,
                          position_embeddings=None):  # fmt: skip
        """Attention pattern softmax(QK^T * scale) with masks: of QK head `qk_head` (B, T, S), or of every QK
        head (B, Hqk, T, S) when `qk_head` is None. OV head i reads QK head i // config.group_size."""
        if qk_head is not None and not (is_int(qk_head) and 0 <= qk_head < self.config.n_qk_heads):
            raise ValueError(f"qk_head must be an integer in [0, {self.config.n_qk_heads}), got {qk_head!r}.")
        x = self._check_input(hidden_states, position_ids, attention_mask) * self.config.input_norm_factor
        q, k = self.queries_keys(x, position_ids, attention_mask, position_embeddings)
        if qk_head is not None:
            q, k = q[:, qk_head : qk_head + 1], k[:, qk_head : qk_head + 1]
        pattern = self._pattern(q, k, attention_mask)
        return pattern if qk_head is None else pattern[:, 0]

    def z_pattern(self, hidden_states, ov_head: int, position_ids=None, attention_mask=None, position_embeddings=None):
        """Contribution of each source token s to OV head `ov_head` at query t, A[t, s] * v[s]: (B, T, S).

        Summed over S it equals that head's pre-activation z.
        """
        if not (is_int(ov_head) and 0 <= ov_head < self.config.n_ov_heads):
            raise ValueError(f"ov_head must be an integer in [0, {self.config.n_ov_heads}), got {ov_head!r}.")
        pattern = self.attention_pattern(
            hidden_states, ov_head // self.config.group_size, position_ids=position_ids,
            attention_mask=attention_mask, position_embeddings=position_embeddings,
        )  # (B, T, S)  # fmt: skip
        x = hidden_states * self.config.input_norm_factor
        v = x @ self.w_v[ov_head] + self.b_v[ov_head]  # (B, S)
        return pattern * v[:, None, :]

    def _check_input(self, hidden_states, position_ids=None, attention_mask=None) -> torch.Tensor:
        return check_attention_input(self.config, self.w_v.dtype, hidden_states, position_ids, attention_mask)

    # ---- weight folding ------------------------------------------------------------------------------

    @torch.no_grad()
    def set_norm_factors(self, input_factor: float, output_factor: float) -> None:
        """Work in normalised units (x * input_factor, y * output_factor) without changing the function."""
        self.fold_norm_factors()
        self._scale_weights(1.0 / input_factor, output_factor)
        self.config.input_norm_factor, self.config.output_norm_factor = float(input_factor), float(output_factor)

    @torch.no_grad()
    def fold_norm_factors(self) -> None:
        """Absorb the normalisation factors into the weights, so the Lorsa maps raw input to raw output."""
        self._scale_weights(self.config.input_norm_factor, 1.0 / self.config.output_norm_factor)
        self.config.input_norm_factor = self.config.output_norm_factor = 1.0

    def _scale_weights(self, input_scale: float, output_scale: float) -> None:
        for weight in (self.W_Q, self.W_K, self.w_v):  # everything that reads the input
            weight.mul_(input_scale)
        for weight in (self.w_o, self.b_D):  # everything that writes the output
            weight.mul_(output_scale)
        if self.config.act_fn == "batchtopk":  # a score is |z| * ||w_o||: in the units of the output
            self.threshold.copy_(torch.where(self.threshold < 0, self.threshold, self.threshold * output_scale))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Fold ||w_o|| into w_v and b_v so every output direction has unit norm (LORSA.md, after training)."""
        norms = self.w_o.norm(dim=-1).clamp_min(1e-12)
        self.w_v.mul_(norms[:, None])
        self.b_v.mul_(norms)
        self.w_o.div_(norms[:, None])


AutoModel.register(LorsaConfig, LorsaModel)  # AutoModel.from_pretrained loads a Lorsa once this module loads
