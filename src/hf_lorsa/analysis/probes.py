"""Mechanism probes: which heads do induction, duplicate-token, previous-token, current-token and first-token (sink)
attention, scored for every host head of a layer and every Lorsa head, from the same inputs by the same definition.

The input is the standard one: sequences of random tokens, each repeated once (`[BOS] r_0..r_{L-1} r_0..r_{L-1}`,
BOS only where the tokenizer adds one). For a query t, each probe names one source position:

- previous_token: t - 1; current_token: t; bos (the first-token sink): 0 — over every query but the first;
- induction: the token after the query token's earlier occurrence; duplicate_token: that earlier occurrence —
  over the second copy's queries (the last one, whose induction target would be the copy's start, left out).

A head's score is the mean, over those queries, of the weight its attention gives the named source. A host head's
weight is its attention pattern A[t, s] (read through an exact replica of the layer, `LorsaModel.from_host`). A
Lorsa head reads one scalar value per source, so its weight is where its activation comes from: the share of the
source in its z-pattern A[t, s] v[s] (positive parts of sign(z) A[t, s] v[s], normalised), counted only at queries
where the head fires. With values of one sign that share is A[t, s] itself, so a host head and a Lorsa head doing the
same thing score the same; a head that never fires on the probe has no score (None).

Axes: B sequences, T query positions, S source positions, H host heads, Hov OV heads, E firing events.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..host.attention_mask import counted_positions
from ..host.hooks import collect
from ..model.modeling_lorsa import LorsaModel

PROBES = ("induction", "duplicate_token", "previous_token", "current_token", "bos")
N_SEQUENCES, LENGTH = 32, 48  # probe sequences, and random tokens in each copy
MECHANISM_SCORE = 0.5  # a head with a probe score at least this much "is" such a head (card, Space filters)


def probe_tokens(vocab_size: int, special_ids: list[int], bos_id: int | None, n: int = N_SEQUENCES,
                 length: int = LENGTH, seed: int = 0) -> torch.Tensor:  # fmt: skip
    """(n, [1] + 2 * length) token ids: random ordinary tokens, repeated once, after BOS when there is one."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[[i for i in special_ids if 0 <= i < vocab_size]] = False
    choices = allowed.nonzero().squeeze(-1)
    picks = torch.randint(len(choices), (n, length), generator=torch.Generator().manual_seed(seed))
    half = choices[picks]
    ids = torch.cat([half, half], dim=1)
    return ids if bos_id is None else torch.cat([torch.full((n, 1), bos_id), ids], dim=1)


def probe_targets(n_positions: int, length: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{probe: (queries, sources)} (each (Q,)) of sequences of `n_positions` whose two copies of `length` tokens
    end the sequence (a BOS, if any, before them)."""
    start = n_positions - 2 * length  # the first copy's first position (1 after a BOS, else 0)
    every = torch.arange(1, n_positions)
    second = torch.arange(start + length, start + 2 * length - 1)  # the second copy, but its last query
    return {
        "induction": (second, second - length + 1),
        "duplicate_token": (second, second - length),
        "previous_token": (every, every - 1),
        "current_token": (every, every),
        "bos": (every, torch.zeros_like(every)),
    }


def pattern_scores(pattern: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
    """{probe: (H,)} the mean weight heads' patterns (B, H, T, S) give each probe's source."""
    targets = probe_targets(pattern.shape[-2], length)
    return {name: pattern[:, :, q, s].float().mean(dim=(0, 2)) for name, (q, s) in targets.items()}


def source_weights(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(E, S) where each firing event's activation comes from: the positive parts of sign(z) A[t, s] v[s] over
    attention rows `rows` (E, S) and the head's values `values` (E, S), normalised to sum to 1 (0 where none)."""
    contributions = rows.float() * values.float()
    sign = torch.where(contributions.sum(-1, keepdim=True) >= 0, 1.0, -1.0)
    positive = (contributions * sign).clamp_min(0)
    return positive / positive.sum(-1, keepdim=True).clamp_min(1e-30)


def event_scores(weights: torch.Tensor, batch: torch.Tensor, query: torch.Tensor, heads: torch.Tensor,
                 n_heads: int, n_positions: int, length: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:  # fmt: skip
    """({probe: (Hov,)} mean source weight of each head's firing events among the probe's queries (NaN without
    one), (Hov,) events counted among every query) from events' `weights` (E, S) at (`batch`, `query`) of `heads`."""
    scores, events = {}, torch.zeros(n_heads)
    for name, (queries, sources) in probe_targets(n_positions, length).items():
        source_of = torch.full((n_positions,), -1, dtype=torch.long)
        source_of[queries] = sources
        picked = source_of[query.cpu()]
        inside = picked >= 0
        got = weights[inside.to(weights.device)].gather(-1, picked[inside].to(weights.device)[:, None]).squeeze(-1)
        total = torch.zeros(n_heads).index_add_(0, heads[inside].cpu(), got.float().cpu())
        count = torch.zeros(n_heads).index_add_(0, heads[inside].cpu(), torch.ones(int(inside.sum())))
        scores[name] = torch.where(count > 0, total / count.clamp_min(1), torch.nan)
        if name == "previous_token":
            events = count
    return scores, events


@dataclass
class ProbeScores:
    """The probes' scores: `host[probe]` (H,) per host head, `lorsa[probe]` (Hov,) per Lorsa head (NaN where the
    head never fired on the probe's queries), and `lorsa_events` (Hov,) its firing events on the probe."""

    host: dict[str, torch.Tensor]
    lorsa: dict[str, torch.Tensor]
    lorsa_events: torch.Tensor
    n_sequences: int
    length: int

    def host_heads(self, probe: str, at_least: float = MECHANISM_SCORE) -> list[int]:
        return [h for h, s in enumerate(self.host[probe].tolist()) if s >= at_least]

    def lorsa_heads(self, probe: str, at_least: float = MECHANISM_SCORE) -> list[int]:
        return [h for h, s in enumerate(self.lorsa[probe].tolist()) if s >= at_least]


@torch.no_grad()
def probe_inputs(model, lorsa, tokenizer=None, n_sequences: int = N_SEQUENCES, length: int = LENGTH,
                 seed: int = 0) -> torch.Tensor:  # fmt: skip
    """The probe's token ids for this host (`probe_tokens`): no special token, BOS first when the tokenizer adds one."""
    vocab = model.get_input_embeddings().weight.shape[0]
    specials = list(getattr(tokenizer, "all_special_ids", None) or []) + list(lorsa.config.skip_token_ids or [])
    adds_bos = (
        tokenizer is not None
        and tokenizer.bos_token_id is not None
        and bool(tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id])
    )
    bos = tokenizer.bos_token_id if adds_bos else None
    return probe_tokens(vocab, specials, bos, n_sequences, length, seed)


def probe_scores(model, lorsa, tokenizer=None, n_sequences: int = N_SEQUENCES, length: int = LENGTH,
                 seed: int = 0) -> ProbeScores:  # fmt: skip
    """Every probe's score for every host head of the Lorsa's layer and every Lorsa head (`ProbeScores`)."""
    c = lorsa.config
    ids = probe_inputs(model, lorsa, tokenizer, n_sequences, length, seed)
    record = collect(model, c.layer, input_ids=ids)
    device, dtype = next(lorsa.parameters()).device, next(lorsa.parameters()).dtype
    x = record.hidden_states.to(device, torch.float32)
    replica = LorsaModel.from_host(model, c.layer).float().to(device)  # the host layer, head by head
    host = pattern_scores(replica.attention_pattern(x), length)
    x = x.to(dtype)
    out = lorsa(x)
    counted = counted_positions(ids, c.skip_token_ids or []).to(device)
    fired = (out.top_k_values != 0) & counted[..., None]
    b, t, k = fired.nonzero(as_tuple=True)
    heads = out.top_k_indices[b, t, k]
    v = lorsa.ov_values(x * c.input_norm_factor)  # (B, S, Hov)
    weights = torch.zeros(len(b), ids.shape[1], device=device)
    for part, rows in lorsa.iter_attention_rows(x, b, heads // c.group_size, t):
        weights[part] = source_weights(rows, v[b[part], :, heads[part]])
    scores, events = event_scores(weights, b, t, heads, c.n_ov_heads, ids.shape[1], length)
    return ProbeScores({k: v.cpu() for k, v in host.items()}, scores, events, n_sequences, length)


@torch.no_grad()
def reconstructed_shares(model, lorsa, groups: list[tuple[int, list[int]]], tokenizer=None,
                         n_sequences: int = N_SEQUENCES, length: int = LENGTH, seed: int = 0) -> list[float]:  # fmt: skip
    """For each (host head h, Lorsa heads S) of `groups`, from one run of the probe: how much of h's output on the
    second copy of the probe's sequences the Lorsa heads S reconstruct together, 1 - sum ||o_h - o_S||^2 / sum ||o_h||^2 (1: all of it; 0: none, or no
    heads). o_h is the host head's output (its exact replica's OV pieces), o_S the Lorsa heads' outputs where they
    fire (no bias), both in the host's units."""
    c = lorsa.config
    ids = probe_inputs(model, lorsa, tokenizer, n_sequences, length, seed)
    device, dtype = next(lorsa.parameters()).device, next(lorsa.parameters()).dtype
    x = collect(model, c.layer, input_ids=ids).hidden_states.to(device, torch.float32)
    second = torch.zeros(ids.shape[1], dtype=torch.bool, device=device)
    second[ids.shape[1] - length :] = True  # the positions of the repeated copy
    replica = LorsaModel.from_host(model, c.layer).float().to(device)
    host_out = replica(x, top_k=replica.config.n_ov_heads)
    lorsa_out = lorsa(x.to(dtype))

    def written(model_, out, heads: list[int]) -> torch.Tensor:  # (B, T_second, D): what these heads write
        keep = torch.zeros(model_.config.n_ov_heads, dtype=torch.bool, device=device)
        keep[heads] = True
        values = out.top_k_values * keep[out.top_k_indices]
        bias = model_.decode(torch.zeros_like(values), out.top_k_indices)
        return (model_.decode(values, out.top_k_indices) - bias)[:, second].float()

    pieces = replica.config.group_size
    shares = []
    for h, heads in groups:
        target = written(replica, host_out, list(range(h * pieces, (h + 1) * pieces)))
        error = target - (written(lorsa, lorsa_out, heads) if heads else 0)
        shares.append(1 - (error.pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)).item())
    return shares
