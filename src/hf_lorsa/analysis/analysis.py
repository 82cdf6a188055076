"""Read the heads of a Lorsa: top contexts, z-patterns, direct logit attribution, host-head
correspondence and automatic tags, saved as a `datasets` Dataset (parquet) beside the Lorsa.

Memory stays bounded on any dataset size: the first pass keeps running counts, the top-N events of each head and
a few events drawn from each range of its activation; a second pass recomputes only the windows that hold one.

Axes: B batch, T query positions, S source positions, D d_model, Hqk QK heads, Hov OV heads, N top-N.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from ..host import families
from ..host.attention_mask import counted_positions
from ..host.hooks import collect_to_cpu
from ..inputs.activations import batches
from ..inputs.loading import warn_if_short
from ..model.configuration_lorsa import check_positive_ints
from ..model.host_match import check_lorsa_matches
from .analysis_table import (  # noqa: F401 - load_analysis is part of this module's API
    ANALYSIS_DIR,
    HEAD_FEATURES,
    TAGS,
    load_analysis,
    push_analysis,
    save_analysis,
)
from .head_statistics import COFIRING_POSITIONS, ActivationHistogram, CoFiring, histogram_edges, similar_directions
from .probes import MECHANISM_SCORE, ProbeScores, probe_scores, reconstructed_shares

CONTEXT_BEFORE, CONTEXT_AFTER = 24, 4  # tokens shown around a top activation
N_SOURCES = 5  # source tokens listed for each top activation

# A head gets a tag when at least TAG_FRACTION of its firing events (and at least TAG_MIN_EVENTS of them)
# draw most of their activation from the source position the tag names.
TAG_FRACTION = 0.5
TAG_MIN_EVENTS = 20
# A Lorsa head "spans several host heads" when no single host head's OV subspace holds this share of its
# rank-1 OV map (host subspaces overlap, so shares of different host heads do not add up to one).
SINGLE_HEAD_SHARE = 0.5


# Samples from ranges of |activation| (hf_lorsa.analysis.analysis_table's "samples"): one range a decade, from 1e-4 to
# 1e4 (the histogram's span), SAMPLES_PER_RANGE drawn uniformly from each in one pass (the events with the largest
# random keys), the SHOWN_RANGES highest ranges a head reaches kept.
SAMPLE_DECADES = (-4, 4)
SAMPLES_PER_RANGE = 2
SHOWN_RANGES = 4
SAMPLE_SEED = 0


def activation_range(values: torch.Tensor) -> torch.Tensor:
    """The range (decade) index of each activation: 0 for |a| < 1e-3, up to 7 for |a| >= 1e3."""
    low, high = SAMPLE_DECADES
    decade = values.abs().float().clamp_min(1e-30).log10().floor().clamp(low, high - 1)
    return (decade - low).long()


def range_label(index: int) -> str:
    decade = SAMPLE_DECADES[0] + index
    return f"1e{decade} to 1e{decade + 1}"


def source_kinds(ids: torch.Tensor, window: torch.Tensor, query: torch.Tensor, source: torch.Tensor,
                 bos_ids: list[int]) -> torch.Tensor:  # fmt: skip
    """Which of TAGS each (query, source) event is, as a (E, len(TAGS)) boolean matrix.

    `ids` (B, T) are the windows' tokens; `window`, `query` and `source` (E,) locate each event.
    induction: the source follows an earlier copy of the query token; duplicate: the source is one.
    """
    q_tok, s_tok = ids[window, query], ids[window, source]
    before_source = ids[window, (source - 1).clamp_min(0)]
    is_bos = torch.isin(s_tok, torch.tensor(bos_ids or [-1], device=ids.device))
    earlier = source < query
    return torch.stack(
        [
            is_bos,
            source == query - 1,
            source == query,
            earlier & (source > 0) & (before_source == q_tok) & ~is_bos,
            earlier & (s_tok == q_tok),
        ],
        dim=-1,
    )


def tags_from_counts(kind_counts: torch.Tensor, events: torch.Tensor) -> list[list[str]]:
    """Per head, the TAGS whose share of its firing events reaches TAG_FRACTION (with enough events)."""
    share = kind_counts / events.clamp_min(1)[:, None]
    ok = (share >= TAG_FRACTION) & (events[:, None] >= TAG_MIN_EVENTS)
    return [[TAGS[j] for j in range(len(TAGS)) if ok[i, j]] for i in range(ok.shape[0])]


@torch.no_grad()
def head_events(lorsa, x: torch.Tensor, counted: torch.Tensor):
    """Firing events of a batch: (batch, query, head, value, dominant source) for every kept activation.

    The dominant source is the position s with the largest A[q, s] * v[s] in the direction of the activation.
    """
    out = lorsa(x)
    fired = (out.top_k_values != 0) & counted[..., None]  # (B, T, K)
    b, t, k = fired.nonzero(as_tuple=True)
    heads = out.top_k_indices[b, t, k]
    values = out.top_k_values[b, t, k]
    v = lorsa.ov_values(x * lorsa.config.input_norm_factor)  # (B, S, Hov)
    source = torch.empty_like(t)
    for part, rows in lorsa.iter_attention_rows(x, b, heads // lorsa.config.group_size, t):  # rows: (chunk, S)
        source[part] = (rows * v[b[part], :, heads[part]] * values[part].sign()[:, None]).argmax(-1)
    return b, t, heads, values, source


@dataclass
class _TopEvents:
    """The N best-scoring events of every group (a head; or a head and a range of activation, scored by a random
    key), as (score, window, position), kept on the CPU."""

    values: torch.Tensor  # (Hov, N)
    windows: torch.Tensor  # (Hov, N)
    positions: torch.Tensor  # (Hov, N)

    @classmethod
    def empty(cls, n_heads: int, n: int) -> _TopEvents:
        return cls(torch.full((n_heads, n), -float("inf")), torch.full((n_heads, n), -1), torch.full((n_heads, n), -1))

    def update(self, heads, values, windows, positions) -> None:
        """Merge a batch of events into each group's top-N by |value| (vectorised: sort by score, then by group)."""
        n_heads, n = self.values.shape
        head_ids = torch.cat([torch.arange(n_heads).repeat_interleave(n), heads.cpu()])
        score = torch.cat([self.values.flatten(), values.abs().float().cpu()])
        window = torch.cat([self.windows.flatten(), windows.cpu()])
        position = torch.cat([self.positions.flatten(), positions.cpu()])
        order = score.argsort(descending=True, stable=True)
        order = order[head_ids[order].argsort(stable=True)]  # grouped by head, best first
        counts = torch.bincount(head_ids, minlength=n_heads)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(order)) - starts.repeat_interleave(counts)
        keep = order[rank < n]  # every head has at least n entries (its current top), so n are kept
        self.values = score[keep].view(n_heads, n)
        self.windows = window[keep].view(n_heads, n)
        self.positions = position[keep].view(n_heads, n)


# ---- what each head writes, and where it comes from -----------------------------------------------------


@torch.no_grad()
def logit_attribution(model, lorsa, k: int = 10) -> list[dict]:
    """Tokens each head's output direction promotes / suppresses, read through final norm and unembedding."""
    logits = families.direct_logits(model, lorsa.w_o)  # (Hov, V)
    top, bottom = logits.topk(k, dim=-1), (-logits).topk(k, dim=-1)
    return [
        {"promoted": top.indices[i].tolist(), "promoted_logits": top.values[i].tolist(),
         "suppressed": bottom.indices[i].tolist(), "suppressed_logits": (-bottom.values[i]).tolist()}
        for i in range(logits.shape[0])
    ]  # fmt: skip


@torch.no_grad()
def host_correspondence(model, lorsa) -> torch.Tensor:
    """(Hov, H) share of each Lorsa head's rank-1 OV map w_v w_o^T inside each host head's OV subspace:
    |P_in w_v|^2 |P_out w_o|^2 / (|w_v|^2 |w_o|^2), P_in onto span(W_v^h), P_out onto span(W_o^h)."""
    host = families.read_attention(model, lorsa.config.layer)
    w_v, w_o = lorsa.w_v.float().cpu(), lorsa.w_o.float().cpu()
    shares = []
    for h in range(host.n_heads):
        q_in = torch.linalg.qr(host.W_v[host.kv_head(h)].cpu()).Q  # (D, dh)
        q_out = torch.linalg.qr(host.W_o[h].cpu().T).Q  # (D, dh)
        inside_v = (w_v @ q_in).pow(2).sum(-1) / w_v.pow(2).sum(-1).clamp_min(1e-12)
        inside_o = (w_o @ q_out).pow(2).sum(-1) / w_o.pow(2).sum(-1).clamp_min(1e-12)
        shares.append(inside_v * inside_o)
    return torch.stack(shares, dim=-1)


# ---- the two passes over the data ---------------------------------------------------------------------


@torch.no_grad()
def analyze(model, lorsa, windows, max_tokens: int, top_n: int = 10, batch_size: int = 8, tokenizer=None,
            progress: bool = True, strict: bool = True) -> Dataset:  # fmt: skip
    """One row per OV head: frequency, tags, top contexts with z-patterns, logit attribution, host heads."""
    check_lorsa_matches(model, lorsa, strict)
    check_positive_ints(max_tokens=max_tokens, top_n=top_n, batch_size=batch_size)
    c = lorsa.config
    skip = c.skip_token_ids or []
    device = next(lorsa.parameters()).device
    fires = torch.zeros(c.n_ov_heads, dtype=torch.long)
    kinds = torch.zeros(c.n_ov_heads, len(TAGS), dtype=torch.long)
    top = _TopEvents.empty(c.n_ov_heads, top_n)
    n_ranges = SAMPLE_DECADES[1] - SAMPLE_DECADES[0]
    samples = _TopEvents.empty(c.n_ov_heads * n_ranges, SAMPLES_PER_RANGE)  # one group per (head, range)
    keys = torch.Generator().manual_seed(SAMPLE_SEED)
    histogram, cofiring = ActivationHistogram(c.n_ov_heads), CoFiring(c.n_ov_heads)
    stored: dict[int, torch.Tensor] = {}  # token ids of the windows that hold a current top event
    n_tokens, n_windows = 0, 0
    for ids in tqdm(batches(windows, batch_size, max_tokens), desc="Analysing", disable=None if progress else True):
        x = collect_to_cpu(model, c.layer, ids)["hidden_states"].to(device, next(lorsa.parameters()).dtype)
        counted = counted_positions(ids, skip).to(device)
        b, t, heads, values, source = head_events(lorsa, x, counted)
        window = b.cpu() + n_windows
        stored.update({n_windows + i: row for i, row in enumerate(ids)})
        n_windows += len(ids)
        n_tokens += int(counted.sum())
        fires += torch.bincount(heads.cpu(), minlength=c.n_ov_heads)
        kind = source_kinds(ids.to(device), b, t, source, skip).long()
        kinds.index_add_(0, heads.cpu(), kind.cpu())
        top.update(heads, values, window, t)
        groups = heads.cpu() * n_ranges + activation_range(values).cpu()
        # the largest random keys of each (head, range): a uniform draw
        samples.update(groups, torch.rand(len(groups), generator=keys), window, t)
        histogram.update(heads, values)
        cofiring.update(window * ids.shape[1] + t.cpu(), heads)
        referenced = set(top.windows.unique().tolist()) | set(samples.windows.unique().tolist())
        stored = {w: row for w, row in stored.items() if w in referenced}
    if not n_windows:
        raise ValueError("The dataset gave no full windows; use more data or a shorter context_length.")
    warn_if_short(n_windows * ids.shape[1], max_tokens)
    drawn = _drawn_samples(samples, c.n_ov_heads, n_ranges)
    wanted = [[(w, p) for w, p in zip(top.windows[h].tolist(), top.positions[h].tolist()) if w >= 0]
              + [(w, p) for w, p, _ in drawn[h]] for h in range(c.n_ov_heads)]  # fmt: skip
    found = _contexts(model, lorsa, wanted, stored, tokenizer, batch_size)
    n_top = [len(w) - len(d) for w, d in zip(wanted, drawn)]
    contexts = [sorted(found[h][: n_top[h]], key=lambda ctx: -abs(ctx["activation"])) for h in range(c.n_ov_heads)]
    sampled = [found[h][n_top[h] :] for h in range(c.n_ov_heads)]
    probes = probe_scores(model, lorsa, tokenizer)
    shares = host_correspondence(model, lorsa)
    rows = _rows(model, lorsa, fires, kinds, contexts, n_tokens, tokenizer, probes, shares)
    direction_heads, cosines = similar_directions(lorsa.w_o)
    cofiring_heads, jaccards = cofiring.similar()
    for i, row in enumerate(rows):
        row.update(samples=sampled[i], sample_ranges=[range_label(r) for _, _, r in drawn[i]],
                   histogram=histogram.counts[i].tolist(), similar_direction=direction_heads[i].tolist(),
                   similar_direction_cosine=cosines[i].tolist(), similar_cofiring=cofiring_heads[i],
                   similar_cofiring_jaccard=jaccards[i])  # fmt: skip
    dataset = Dataset.from_list(rows, features=HEAD_FEATURES)
    meta = {"n_tokens": n_tokens, "top_n": top_n, "layer": c.layer, "mechanisms": mechanisms(probes, shares, model, lorsa, tokenizer),
            "histogram_edges": histogram_edges(), "cofiring_positions": COFIRING_POSITIONS - max(cofiring.left, 0)}  # fmt: skip
    dataset.info.description = json.dumps(meta)
    return dataset


def mechanisms(probes: ProbeScores, shares: torch.Tensor, model=None, lorsa=None, tokenizer=None) -> dict:
    """Per probe: every host head's score, the host heads that are such heads (score >= MECHANISM_SCORE), for each
    of those the Lorsa heads that are too and whose OV map lies mostly in that host head's OV subspace, and (given
    the model and the Lorsa) how much of that host head's output on the probe they reconstruct together."""
    home = shares.argmax(-1)  # each Lorsa head's host head
    summary = {"probe": {"sequences": probes.n_sequences, "length": probes.length}, "threshold": MECHANISM_SCORE}
    for name, host in probes.host.items():
        lorsa_heads = probes.lorsa_heads(name)
        summary[name] = {
            "host_scores": [round(s, 4) for s in host.tolist()],
            "lorsa_heads": len(lorsa_heads),
            "host_heads": {  # best first
                str(h): sorted(({"head": i, "score": round(probes.lorsa[name][i].item(), 4),
                                 "share": round(shares[i, h].item(), 4)}
                                for i in lorsa_heads if home[i] == h and shares[i, h] >= SINGLE_HEAD_SHARE),
                               key=lambda entry: -entry["score"])
                for h in probes.host_heads(name)
            },
        }  # fmt: skip
    if model is not None:  # one run of the probe for every probe's host heads
        found = [
            (name, h, [e["head"] for e in heads])
            for name in probes.host
            for h, heads in summary[name]["host_heads"].items()
        ]
        rebuilt = reconstructed_shares(model, lorsa, [(int(h), heads) for _, h, heads in found], tokenizer,
                                       probes.n_sequences, probes.length)  # fmt: skip
        for (name, h, _), share in zip(found, rebuilt):
            summary[name].setdefault("reconstructed", {})[h] = round(share, 4)
    return summary


def _rows(model, lorsa, fires, kinds, contexts, n_tokens: int, tokenizer, probes: ProbeScores,
          shares: torch.Tensor) -> list[dict]:  # fmt: skip
    """The table's rows (HEAD_FEATURES) from the first pass's counts, the second pass's contexts and the probes."""
    c = lorsa.config
    tags = tags_from_counts(kinds, fires)
    dla = logit_attribution(model, lorsa)
    rows = []
    for i in range(c.n_ov_heads):
        share = shares[i]
        row = {
            "head": i,
            "qk_head": i // c.group_size,
            "frequency": fires[i].item() / max(n_tokens, 1),
            "events": fires[i].item(),
            "tags": tags[i],
            "kind_shares": {t: kinds[i, j].item() / max(fires[i].item(), 1) for j, t in enumerate(TAGS)},
            "top_contexts": contexts[i],
            "host_heads": share.argsort(descending=True)[:3].tolist(),
            "host_shares": share.tolist(),
            "spans_several_host_heads": bool(share.max() < SINGLE_HEAD_SHARE),
            "probes": {name: None if scores[i].isnan() else scores[i].item() for name, scores in probes.lorsa.items()},
            "probe_events": int(probes.lorsa_events[i]),
            **dla[i],
        }  # fmt: skip
        for kind in ("promoted", "suppressed"):
            ids = row[kind]
            row[f"{kind}_tokens"] = tokenizer.convert_ids_to_tokens(ids) if tokenizer else list(map(str, ids))
        rows.append(row)
    return rows


def _drawn_samples(samples: _TopEvents, n_heads: int, n_ranges: int) -> list[list[tuple[int, int, int]]]:
    """Each head's drawn (window, position, range), its SHOWN_RANGES highest ranges first."""
    drawn: list[list[tuple[int, int, int]]] = [[] for _ in range(n_heads)]
    windows, positions = samples.windows.view(n_heads, n_ranges, -1), samples.positions.view(n_heads, n_ranges, -1)
    for h, r in (windows[..., 0] >= 0).nonzero().tolist()[::-1]:  # highest range first within a head
        if len({rng for _, _, rng in drawn[h]}) < SHOWN_RANGES:
            drawn[h] += [(w, p, r) for w, p in zip(windows[h, r].tolist(), positions[h, r].tolist()) if w >= 0]
    for h in range(n_heads):
        drawn[h].sort(key=lambda event: -event[2])
    return drawn


def _contexts(
    model, lorsa, wanted: list[list[tuple[int, int]]], stored, tokenizer, batch_size: int
) -> list[list[dict]]:
    """For each head's wanted events (window, position), in that order: the context, the head's activation at each of
    its positions, the source tokens that carry the activation (A[q, s] * v[s] and their share of z), and the QK
    pattern. Each window runs once through the host, for every head that wants it."""
    c = lorsa.config
    device = next(lorsa.parameters()).device
    per_head: list[list[dict | None]] = [[None] * len(events) for events in wanted]
    by_window: dict[int, list[tuple[int, int, int]]] = {}
    for h, events in enumerate(wanted):
        for slot, (w, p) in enumerate(events):
            by_window.setdefault(w, []).append((h, p, slot))
    needed = sorted(by_window)
    for start in range(0, len(needed), batch_size):
        group = needed[start : start + batch_size]
        ids = torch.stack([stored[w] for w in group])
        x = collect_to_cpu(model, c.layer, ids)["hidden_states"].to(device, next(lorsa.parameters()).dtype)
        out = lorsa(x)
        acts = torch.zeros(*out.top_k_indices.shape[:2], c.n_ov_heads, device=device)
        acts.scatter_(-1, out.top_k_indices, out.top_k_values.float())  # (B, T, Hov) after top-k
        v = lorsa.ov_values(x * c.input_norm_factor)  # (B, S, Hov)
        texts = [token_strings(tokenizer, row.tolist()) for row in ids]  # each window decoded once, for every head
        events = [(row, h, p, slot) for row, w in enumerate(group) for h, p, slot in by_window[w]]
        b, h, p = (torch.tensor(e, device=device) for e in list(zip(*events))[:3])
        for part, rows in lorsa.iter_attention_rows(x, b, h // c.group_size, p):  # only the rows shown
            for (row, head, pos, slot), pattern_row in zip(events[part], rows):
                per_head[head][slot] = _context(ids[row], acts[row, :, head], pattern_row, v[row, :, head], pos,
                                                texts[row])  # fmt: skip
    return per_head


def _context(ids, acts, pattern_row, v, position: int, texts: list[str]) -> dict:
    lo, hi = max(0, position - CONTEXT_BEFORE), min(len(ids), position + CONTEXT_AFTER + 1)
    contributions = (pattern_row * v).float()  # (S,)
    z = contributions.sum().item()
    order = (contributions * (1 if z >= 0 else -1)).argsort(descending=True)[:N_SOURCES]
    tokens = ids[lo:hi].tolist()
    return {
        "tokens": tokens,
        "text": texts[lo:hi],  # as the tokens read in the running text of their window
        "activations": acts[lo:hi].tolist(),
        "position": position - lo,
        "activation": acts[position].item(),
        "z": z,
        "sources": [
            {
                "position": int(s) - lo,
                "token": int(ids[s]),
                "contribution": contributions[s].item(),
                "share": contributions[s].item() / z if z else 0.0,
            }
            for s in order.tolist()
        ],  # fmt: skip
        "pattern": pattern_row[lo : position + 1].float().tolist(),
    }


def token_strings(tokenizer, tokens: list[int]) -> list[str]:
    """Each token as it reads in running text (leading spaces kept), by decoding growing prefixes."""
    if tokenizer is None:
        return [str(t) for t in tokens]
    texts = [tokenizer.decode(tokens[:i]) for i in range(len(tokens) + 1)]
    return [b[len(a) :] if b.startswith(a) else tokenizer.decode([t]) for a, b, t in zip(texts, texts[1:], tokens)]
