"""What the Lorsa inspector Space shows, computed here so that the Space holds only UI.

Every public method returns plain data (pandas DataFrames, HTML strings) and raises InspectorError with a
message for the user on bad input.
"""

from __future__ import annotations

import html
import json
import logging
import threading
import weakref
from dataclasses import dataclass
from functools import lru_cache

import pandas as pd
import torch

from ..base.placement import placement
from ..host.hooks import collect
from ..inputs.loading import host_and_tokenizer, load_lorsa_and_host
from ..model.files import LAYER_FOLDER, checked_release_layers
from ..model.host_match import check_lorsa_matches
from .analysis import analyze, token_strings
from .analysis_table import TAGS, load_analysis
from .head_statistics import histogram_edges
from .probes import PROBES
from .search import heads_promoting, vocabulary_texts

logger = logging.getLogger(__name__)
DEFAULT_CORPUS_SEQUENCES, DEFAULT_CORPUS_LENGTH = 24, 128
TEXT_LIMIT = 256  # tokens of typed text analysed; longer text is truncated with a notice
PAGE_SIZE = 100  # rows of the head table sent to the browser at once
N_SOURCES = 3  # source tokens listed per head active at a token of the user's text
TABLE_COLUMNS = ["head", "tags", "frequency", "promoted_tokens", "host_heads", "host_shares", "spans_several_host_heads",
                 "probes"]  # fmt: skip


# The library's advice, in the Space's own terms: it takes the host as --model (LORSA_MODEL) and always checks it.
SPACE_WORDING = {
    "Load that model, or pass strict=False to use it with this one anyway.": "Start the Space with that model "
    "(--model, or the variable LORSA_MODEL).",
    "pass --model_name_or_path": "start the Space with --model (or the variable LORSA_MODEL)",
}


def space_wording(message: str) -> str:
    for library, space in SPACE_WORDING.items():
        message = message.replace(library, space)
    return message


CONTEXT_LEGEND = ("<p style='font-size:small'>orange/blue: the head's activation; boxed: the query token; "
                  "green underline: source tokens carrying at least 5% of the activation.</p>")  # fmt: skip


def _context_html(ctx: dict, mark: str) -> str:
    """One context: its tokens shaded by the head's activation, the query boxed, its main sources underlined."""
    scale = max(abs(a) for a in ctx["activations"]) or 1.0
    sources = {s["position"]: s["share"] for s in ctx["sources"] if abs(s["share"]) >= 0.05}
    spans = []
    for j, (text, act) in enumerate(zip(ctx["text"], ctx["activations"])):
        extra = "outline:2px solid #222;" if j == ctx["position"] else ""
        if j in sources:
            extra += "border-bottom:3px solid #0a7;"
        title = f"activation {act:.3f}" + (f", source share {sources[j]:.0%}" if j in sources else "")
        spans.append(_token_span(text, act, scale, extra, title))
    return (f'<div class="context" data-activation="{ctx["activation"]:.4f}"><b>{mark}</b> '
            f'z = {ctx["activation"]:.3f}: {"".join(spans)}</div>')  # fmt: skip


class InspectorError(ValueError):
    """A problem the user can fix, shown as a message in the UI."""


@dataclass
class TextAnalysis:
    tokens: list[str]
    truncated: bool
    active: list[list[tuple[int, float]]]  # per token: (head, activation) of its active heads, strongest first


def _shade(value: float, scale: float) -> str:
    a = min(abs(value) / scale, 1.0) if scale else 0.0
    colour = "255, 120, 0" if value >= 0 else "40, 110, 255"
    return f"rgba({colour}, {a:.2f})"


def _token_span(text: str, value: float, scale: float, extra: str = "", title: str = "") -> str:
    shown = html.escape(text.replace("\n", "⏎")) or "&nbsp;"
    return (f'<span class="tok" title="{html.escape(title)}" style="background:{_shade(value, scale)};'
            f'padding:1px 0;{extra}">{shown}</span>')  # fmt: skip


class Inspector:
    """A host model, a Lorsa and its head analysis (loaded, or computed on a default corpus).

    One inspector serves every user of the Space: the hooks that read the host are installed per forward
    pass, so forward passes through the shared host run one at a time (`self.lock`, one per host: the inspectors
    of a release's layers share their host and its lock).
    """

    def __init__(self, lorsa, model, tokenizer, analysis=None, max_tokens: int = 6_000):
        try:
            check_lorsa_matches(model, lorsa)
        except ValueError as err:
            raise InspectorError(f"This Lorsa does not belong to this model: {space_wording(str(err))}") from err
        self.lorsa, self.model, self.tokenizer = lorsa.eval().requires_grad_(False), model.eval(), tokenizer
        with _LOADING:
            self.lock = _HOST_LOCKS.setdefault(model, threading.RLock())
        self.notice = ""
        if analysis is None:
            self.notice = (f"No precomputed analysis was found for this Lorsa: the head statistics below come from "
                           f"{DEFAULT_CORPUS_SEQUENCES} texts sampled from the model itself "
                           f"(about {DEFAULT_CORPUS_SEQUENCES * DEFAULT_CORPUS_LENGTH} tokens).")  # fmt: skip
            windows = [{"input_ids": row} for row in self._default_corpus()]
            analysis = analyze(model, lorsa, windows, max_tokens, top_n=5, tokenizer=tokenizer, progress=False)
        self.analysis = analysis
        self.meta = json.loads(analysis.info.description or "{}")  # tokens analysed, the probes' host heads
        self.table = _browse_table(analysis)  # the head table's rows, indexed by head; a head's page reads its row
        self._row_of = {int(h): i for i, h in enumerate(self.table.index)}
        self._vocabulary: list[str] | None = None

    @classmethod
    def load(cls, lorsa_id: str, model_id: str | None = None, subfolder: str = "", gguf_file: str | None = None,
             spread: tuple = (None, None, None)):  # fmt: skip
        """The inspector of a Lorsa with its host (shared with the other layers of a release); `spread`: the host's
        (--device_map, --max_memory, --offload_folder), for a host larger than memory (`base.placement`)."""

        def open_host(name, gguf, dtype, device):
            return _shared_host(name, gguf, dtype, device, tuple(spread))

        try:
            lorsa, model, tokenizer = load_lorsa_and_host(lorsa_id, subfolder, model_id, gguf_file=gguf_file,
                                                          open_host_and_tokenizer=open_host)  # fmt: skip
        except (OSError, ValueError) as err:
            raise InspectorError(
                f"Could not load the Lorsa {lorsa_id!r} with its model: {space_wording(str(err))}"
            ) from err
        try:
            analysis = load_analysis(lorsa_id, subfolder)
        except ValueError as err:
            raise InspectorError(str(err)) from err
        return cls(lorsa, model, tokenizer, analysis)

    @torch.no_grad()
    def _default_corpus(self) -> torch.Tensor:
        torch.manual_seed(0)  # the same corpus (and statistics) every time the Space starts
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else 0
        prompt = torch.full((DEFAULT_CORPUS_SEQUENCES, 1), start)
        return self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_length=DEFAULT_CORPUS_LENGTH,
                                   min_length=DEFAULT_CORPUS_LENGTH, do_sample=True, top_k=0, pad_token_id=start)  # fmt: skip

    # ---- head browser ------------------------------------------------------------------------------------

    def head_table(self, tag: str = "any", token: str = "", sort_by: str = "frequency", probe: str = "any",
                   min_score: float = 0.0) -> pd.DataFrame:  # fmt: skip
        """One row per head with its probe scores: filtered by tag and by a probe score of at least `min_score`,
        sorted by frequency, head or a probe's score (best first). With `token`, only the heads that promote that
        token (any case, with or without a leading space), ranked by its centred logit (`search.heads_promoting`):
        every head is searched through its weights, not only the few top tokens the table lists."""
        if probe not in ("", "any", None) and probe not in PROBES:
            raise InspectorError(f"Unknown probe {probe!r}; choose one of {', '.join(PROBES)}.")
        if sort_by not in ("frequency", "head", *PROBES):
            raise InspectorError(f"Cannot sort by {sort_by!r}; sort by frequency, head or a probe.")
        try:
            min_score = float(min_score or 0.0)
        except (TypeError, ValueError) as err:
            raise InspectorError("The minimum score must be a number between 0 and 1.") from err
        table = self.table
        if tag not in ("", "any", None):
            table = table[table["tags"].map(lambda tags: tag in tags.split(", "))]
        if probe in PROBES:
            table = table[table[probe].fillna(-1.0) >= min_score]
        if token and token.strip():
            if self._vocabulary is None:
                self._vocabulary = vocabulary_texts(self.tokenizer)
            try:
                found = heads_promoting(self.model, self.lorsa, self.tokenizer, token, self._vocabulary)
            except ValueError as err:
                raise InspectorError(str(err)) from err
            found = found[found["head"].isin(table.index)]
            table = table.loc[found["head"]].assign(**{"logit of token": found["logit"].round(3).to_numpy()})
        else:
            table = table.sort_values(sort_by, ascending=sort_by == "head", kind="stable", na_position="last")
        return table.reset_index(drop=True)

    def head_table_page(self, table: pd.DataFrame, page=1) -> tuple[pd.DataFrame, str, int]:
        """Page `page` (from 1) of a head table, PAGE_SIZE rows, its caption and the page shown (clamped to the
        table's pages): the browser gets one page, however many heads the Lorsa has."""
        try:
            page = int(page or 1)
        except (TypeError, ValueError) as err:
            raise InspectorError("The page must be a number.") from err
        pages = max(1, -(-len(table) // PAGE_SIZE))
        page = min(max(page, 1), pages)
        first = (page - 1) * PAGE_SIZE
        shown = table.iloc[first : first + PAGE_SIZE]
        if shown.empty:
            return shown, "No head matches.", page
        caption = f"heads {first + 1}-{first + len(shown)} of {len(table)} (page {page} of {pages})"
        return shown, caption, page

    def sort_choices(self) -> list[str]:
        return ["frequency", "head", *PROBES]

    def probe_choices(self) -> list[str]:
        return ["any", *PROBES]

    def host_mechanisms(self) -> str:
        """The host heads of the layer that the probes find (score >= 0.5), and the Lorsa heads that carry each."""
        mechanisms = (self.meta or {}).get("mechanisms")
        if not mechanisms:
            return ""
        lines = []
        for name in PROBES:
            found = mechanisms.get(name, {}).get("host_heads", {})
            for host, heads in found.items():
                score = mechanisms[name]["host_scores"][int(host)]
                carried = ", ".join(f"{h['head']} ({h['score']:.2f})" for h in heads[:8]) or "none"
                lines.append(f"- host head {host} is a {name.replace('_', '-')} head ({score:.2f}); Lorsa heads "
                             f"doing the same inside its OV subspace: {carried}")  # fmt: skip
        return "\n".join(lines) or "No host head of this layer scores 0.5 or more on a probe."

    def tag_choices(self) -> list[str]:
        return ["any", *TAGS]

    # ---- head page ---------------------------------------------------------------------------------------

    def head(self, head) -> dict:
        try:
            index = int(head)
        except (TypeError, ValueError) as err:
            raise InspectorError(f"Head must be a number between 0 and {self.lorsa.config.n_ov_heads - 1}.") from err
        if index not in self._row_of:
            if 0 <= index < self.lorsa.config.n_ov_heads:
                raise InspectorError(f"Head {index} is not in this analysis.")
            raise InspectorError(
                f"Head {index} does not exist: this Lorsa has heads 0 to {self.lorsa.config.n_ov_heads - 1}."
            )
        return self.analysis[self._row_of[index]]  # one row read from the table: a page opens at once at any size

    def head_summary(self, head) -> str:
        row = self.head(head)
        shares = ", ".join(f"{k} {v:.0%}" for k, v in row["kind_shares"].items())
        probes = ", ".join(f"{k} {v:.2f}" for k, v in (row.get("probes") or {}).items() if v is not None)
        return (f"**Head {row['head']}** (QK group {row['qk_head']}) · fires on {row['frequency']:.3%} of tokens "
                f"({row['events']} events) · tags: {', '.join(row['tags']) or 'none'} · dominant source: {shares}"
                f" · probe scores: {probes or 'never fired on the probe'}")  # fmt: skip

    def contexts_html(self, head) -> str:
        """Top contexts, tokens shaded by the head's activation; the sources of each activation underlined."""
        row = self.head(head)
        if not row["top_contexts"]:
            return "<p>This head never fired on the analysed text.</p>"
        parts = [_context_html(ctx, f"#{i + 1}") for i, ctx in enumerate(row["top_contexts"])]
        return CONTEXT_LEGEND + "".join(parts)

    def samples_html(self, head) -> str:
        """Contexts drawn from each of the head's highest ranges of |activation|, highest first, as the feature
        dashboards show below the top ones: what the head does when it fires weakly too."""
        row = self.head(head)
        if not row.get("samples"):
            return ""
        parts, current = ["<h4>Samples by activation range</h4>"], None
        for ctx, label in zip(row["samples"], row["sample_ranges"]):
            if label != current:
                parts.append(f'<div class="sample-range"><b>|z| from {label}</b></div>')
                current = label
            parts.append(_context_html(ctx, "·"))
        return "".join(parts)

    def pattern_html(self, head, context: int = 0) -> str:
        """Heatmap of the z-pattern (A[q, s] * v[s]) of the head's top context, for each query position."""
        row = self.head(head)
        if not row["top_contexts"]:
            return "<p>No context to show.</p>"
        ctx = row["top_contexts"][min(int(context), len(row["top_contexts"]) - 1)]
        ids = torch.tensor(ctx["tokens"])[None]
        contributions = self._z_pattern(ids, row["head"])[0]  # (T, S)
        return heatmap_html(contributions, ctx["text"], f"z-pattern of head {row['head']}: A[q, s] · v[s]")

    def logit_table(self, head) -> pd.DataFrame:
        row = self.head(head)
        tokens, logits = (
            [*row["promoted_tokens"], *row["suppressed_tokens"]],
            [*row["promoted_logits"], *row["suppressed_logits"]],
        )
        return pd.DataFrame({"token": tokens, "logit": logits})

    def histogram_table(self, head) -> pd.DataFrame:
        """The head's activations per bin of log10 |activation| (the analysed text), from its first to its last
        non-empty bin: the density histogram of the dashboards, on a log scale of activation."""
        row = self.head(head)
        counts = row.get("histogram") or []
        edges = self.meta.get("histogram_edges") or histogram_edges()
        filled = [i for i, n in enumerate(counts) if n]
        if not filled:
            return pd.DataFrame({"log10 activation": [], "activations": []})
        span = range(filled[0], filled[-1] + 1)
        return pd.DataFrame({
            "log10 activation": [round((edges[i] + edges[i + 1]) / 2, 2) for i in span],
            "activations": [counts[i] for i in span],
        })  # fmt: skip

    def similar_table(self, head) -> pd.DataFrame:
        """The heads most like this one: by output direction (cosine of w_o) and by firing at the same positions
        (Jaccard index), with what each does."""
        row = self.head(head)
        found = [
            ("output direction", h, c)
            for h, c in zip(row.get("similar_direction") or [], row.get("similar_direction_cosine") or [])
        ]
        found += [("fires together", h, j) for h, j in zip(row.get("similar_cofiring") or [],
                                                          row.get("similar_cofiring_jaccard") or [])]  # fmt: skip
        rows = []
        for kind, other, score in found:
            their = self.table.loc[other] if other in self._row_of else {}
            rows.append({"head": other, "alike by": kind, "score": round(score, 3), "tags": their.get("tags", "-"),
                         "promotes": " ".join(their.get("promotes", "").split()[:4])})  # fmt: skip
        return pd.DataFrame(rows, columns=["head", "alike by", "score", "tags", "promotes"])

    def host_table(self, head) -> pd.DataFrame:
        """Per host head, the share of this head's rank-1 OV map that lies inside that host head's OV subspace.
        Host subspaces overlap, so the shares of one head need not add up to 1."""
        row = self.head(head)
        return pd.DataFrame(
            {"host head": [str(h) for h in range(len(row["host_shares"]))], "share": row["host_shares"]}
        )

    def shaded_tokens(self, analysis: TextAnalysis, head) -> list[tuple[str, float | None]]:
        """(token, activation of `head` scaled to [-1, 1]) per token, for a highlighted text; None where the
        head is silent."""
        index = self.head(head)["head"]
        acts = [dict(heads).get(index) for heads in analysis.active]
        scale = max((abs(a) for a in acts if a is not None), default=0.0) or 1.0
        return [(tok, None if a is None else round(a / scale, 4)) for tok, a in zip(analysis.tokens, acts)]

    # ---- your text -----------------------------------------------------------------------------------------

    def _encode(self, text: str) -> tuple[torch.Tensor, bool]:
        if not text or not text.strip():
            raise InspectorError("Type some text first.")
        ids = self.tokenizer(text, return_tensors="pt").input_ids
        limit = min(TEXT_LIMIT, self.lorsa.config.max_position_embeddings)
        return ids[:, :limit], ids.shape[1] > limit

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        """The attention input of the Lorsa's layer for `ids` (the host stops after that layer)."""
        with self.lock:
            return collect(self.model, self.lorsa.config.layer, input_ids=ids).hidden_states

    @torch.no_grad()
    def text(self, text: str) -> TextAnalysis:
        ids, truncated = self._encode(text)
        out = self.lorsa(self._run(ids))
        skip = set(self.lorsa.config.skip_token_ids or [])
        active = []
        for t in range(ids.shape[1]):
            pairs = [] if int(ids[0, t]) in skip else [
                (int(h), float(v)) for h, v in zip(out.top_k_indices[0, t], out.top_k_values[0, t]) if v != 0
            ]  # fmt: skip
            active.append(sorted(pairs, key=lambda p: -abs(p[1])))
        return TextAnalysis(token_strings(self.tokenizer, ids[0].tolist()), truncated, active)

    def text_html(self, analysis: TextAnalysis) -> str:
        spans = []
        for i, (tok, heads) in enumerate(zip(analysis.tokens, analysis.active)):
            top = ", ".join(f"{h}: {v:.2f}" for h, v in heads[:8]) or "none (skipped token)"
            spans.append(
                f'<span class="tok" data-index="{i}" title="{i}: heads {html.escape(top)}">{html.escape(tok) or "&nbsp;"}</span>'
            )
        table = "".join(
            f"<tr><td>{i}</td><td>{html.escape(tok)}</td><td>{', '.join(f'{h} ({v:.2f})' for h, v in heads[:6])}</td></tr>"
            for i, (tok, heads) in enumerate(zip(analysis.tokens, analysis.active))
        )
        notice = (f"<p class='notice'><b>Text truncated to the first {len(analysis.tokens)} tokens.</b></p>"
                  if analysis.truncated else "")  # fmt: skip
        return (f"{notice}<div class='text'>{''.join(spans)}</div><table class='active'><tr><th>#</th>"
                f"<th>token</th><th>active heads (activation)</th></tr>{table}</table>")  # fmt: skip

    @torch.no_grad()
    def _z_pattern(self, ids: torch.Tensor, head: int) -> torch.Tensor:
        return self.lorsa.z_pattern(self._run(ids), head)

    def text_pattern_html(self, text: str, token_index, head) -> str:
        row = self.head(head)
        ids, _ = self._encode(text)
        q = self._position(ids, token_index)
        contributions = self._z_pattern(ids, row["head"])[0, q, : q + 1]  # (S,)
        tokens = token_strings(self.tokenizer, ids[0, : q + 1].tolist())
        z = contributions.sum().item()
        scale = contributions.abs().max().item() or 1.0
        spans = "".join(_token_span(t, c, scale, title=f"{c:.3f}") for t, c in zip(tokens, contributions.tolist()))
        top = contributions.abs().argsort(descending=True)[:5].tolist()
        rows = "".join(f"<tr><td>{s}</td><td>{html.escape(tokens[s])}</td><td>{contributions[s]:.3f}</td>"
                       f"<td>{contributions[s].item() / z if z else 0:.0%}</td></tr>" for s in top)  # fmt: skip
        return (f"<p>Head {row['head']} at token {q} ({html.escape(tokens[q])!s}): z = {z:.3f}</p>"
                f"<div class='zpattern'>{spans}</div><table class='sources'><tr><th>source</th><th>token</th>"
                f"<th>contribution</th><th>share</th></tr>{rows}</table>")  # fmt: skip

    def position_heads(self, text: str, token_index) -> pd.DataFrame:
        """Every head active at token `token_index` of `text`, strongest first, with the source tokens it read there
        (its z-pattern's largest contributions A[q, s] v[s] and their shares of z)."""
        ids, _ = self._encode(text)
        q = self._position(ids, token_index)
        active = self.text(text).active[q]
        rows = []
        if active:
            x = self._run(ids)
            tokens = token_strings(self.tokenizer, ids[0, : q + 1].tolist())
            for head, value in active:
                with torch.no_grad():
                    contributions = self.lorsa.z_pattern(x, head)[0, q, : q + 1]
                z = contributions.sum().item()
                top = contributions.abs().argsort(descending=True)[:N_SOURCES].tolist()
                read = ", ".join(f"{s} {tokens[s].strip() or repr(tokens[s])} ({contributions[s].item() / z:.0%})"
                                 for s in top) if z else "-"  # fmt: skip
                rows.append({"head": head, "activation": round(value, 4), "read from (position token share)": read,
                             "tags": self.table.loc[head, "tags"] if head in self._row_of else "-"})  # fmt: skip
        return pd.DataFrame(rows, columns=["head", "activation", "read from (position token share)", "tags"])

    def _position(self, ids: torch.Tensor, token_index) -> int:
        try:
            q = int(token_index)
        except (TypeError, ValueError) as err:
            raise InspectorError("Pick a token position (a number).") from err
        if not 0 <= q < ids.shape[1]:
            raise InspectorError(f"Token position must be between 0 and {ids.shape[1] - 1}.")
        return q


def _browse_table(analysis) -> pd.DataFrame:
    """The head table's columns for every head (indexed by head), read once from the analysis without its contexts."""
    rows = []
    for row in analysis.select_columns(TABLE_COLUMNS).to_list():
        promoted = [t.replace("▁", " ").replace("Ġ", " ").strip() for t in row["promoted_tokens"]]
        scores = row.get("probes") or {}
        shares = row["host_shares"]
        rows.append({
            "head": row["head"], "tags": ", ".join(row["tags"]) or "-", "frequency": round(row["frequency"], 5),
            **{name: None if scores.get(name) is None else round(scores[name], 3) for name in PROBES},
            "promotes": " ".join(promoted[:5]),
            "host heads (OV share)": ", ".join(f"{h} ({shares[h]:.2f})" for h in row["host_heads"][:2]),
            "spans several": row["spans_several_host_heads"],
        })  # fmt: skip
    columns = ["head", "tags", "frequency", *PROBES, "promotes", "host heads (OV share)", "spans several"]
    table = pd.DataFrame(rows, columns=columns)
    table.index = table["head"].to_numpy()
    return table


def heatmap_html(values: torch.Tensor, labels: list[str], title: str) -> str:
    """A (T, S) matrix as an HTML heatmap with token labels on both axes."""
    scale = values.abs().max().item() or 1.0
    head = "".join(f"<th class='col'>{html.escape(t)}</th>" for t in labels)
    body = []
    for q, label in enumerate(labels):
        cells = "".join(f"<td style='background:{_shade(v, scale)}' title='{v:.3f}'></td>" if s <= q else "<td></td>"
                        for s, v in enumerate(values[q].tolist()))  # fmt: skip
        body.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    return (f"<div class='heatmap' style='overflow:auto;max-width:100%'><p>{html.escape(title)} (rows: queries, "
            f"columns: sources)</p>"
            f"<table><tr><th></th>{head}</tr>{''.join(body)}</table></div>")  # fmt: skip


_LOADING = threading.RLock()
_HOST_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # host model -> the lock of its forward passes


def cached_inspector(lorsa_id: str, model_id: str | None, subfolder: str = "", gguf_file: str | None = None,
                     spread: tuple = (None, None, None)):  # fmt: skip
    """Inspectors are shared between sessions: loading is the slow part (and happens once)."""
    with _LOADING:
        return _load_inspector(lorsa_id, model_id or None, subfolder, gguf_file or None, tuple(spread))


@lru_cache(maxsize=2)
def _shared_host(name: str, gguf_file: str | None, torch_dtype: str, device: str, spread: tuple):
    """One copy of a host for every inspector that reads it (the layers of a release)."""

    return host_and_tokenizer(name, gguf_file, torch_dtype, device, placement=placement(*spread))


@lru_cache(maxsize=4)
def _load_inspector(lorsa_id: str, model_id: str | None, subfolder: str, gguf_file: str | None,
                    spread: tuple) -> Inspector:  # fmt: skip
    return Inspector.load(lorsa_id, model_id, subfolder, gguf_file, spread)


def release_subfolders(lorsa_id: str, subfolder: str = "") -> list[str]:
    """The `layer{L}` subfolders when `lorsa_id` (under `subfolder`) is a release of several Lorsas, a local folder
    or a Hub repository; [] for one Lorsa (or when the Hub cannot be asked)."""
    from pathlib import Path

    folder = Path(lorsa_id, subfolder)
    if folder.is_dir():
        prefix = f"{subfolder}/" if subfolder else ""
        return [f"{prefix}layer{layer}" for layer in checked_release_layers(folder)]
    try:
        from huggingface_hub import list_repo_files

        files = list_repo_files(lorsa_id)
    except Exception:  # noqa: BLE001 - offline or private: treated as one Lorsa, whose loading says what is wrong
        return []
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    if f"{prefix}config.json" in files:
        return []
    found = {f[len(prefix) :].split("/")[0] for f in files if f.startswith(prefix) and f.endswith("/config.json")}
    names = sorted((n for n in found if LAYER_FOLDER.match(n)), key=lambda n: int(LAYER_FOLDER.match(n).group(1)))
    return [prefix + n for n in names]


def describe(inspector: Inspector) -> str:
    c = inspector.lorsa.config
    header = (f"Lorsa for layer {c.layer} of `{c.base_model_name_or_path}`: {c.n_ov_heads} OV heads, {c.n_qk_heads} "
              f"QK heads, top-{c.top_k}. Analysis over {inspector.meta.get('n_tokens', '?')} tokens.")  # fmt: skip
    mechanisms = inspector.host_mechanisms()
    return header + (f"\n\n**Mechanisms** (probes on repeated random tokens):\n{mechanisms}" if mechanisms else "")
