"""Evaluate a Lorsa: reconstruction, sparsity, and next-token loss with the Lorsa spliced into its model.

The layers below L run once per batch: at layer L the batch is repeated four times (clean, spliced,
zero-ablated, mean-ablated), and only layer L's attention output differs between the copies.

Axes: B batch, T positions, D d_model, V vocabulary, Hov OV heads.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..base.writing import write_atomically
from ..host.attention_mask import counted_positions
from ..host.hooks import collect_layers, run_variants
from ..inputs.activations import batches
from ..inputs.loading import warn_if_short
from ..model.configuration_lorsa import check_positive_ints
from ..model.host_match import check_lorsa_matches
from ..model.model_card import model_card
from ..model.splicing import lorsa_output

logger = logging.getLogger(__name__)

VARIANTS = ("clean", "spliced", "zero_ablated", "mean_ablated")


@dataclass(frozen=True)
class EvaluationResult:
    """What `evaluate_lorsa` measured (LORSA.md, "How quality is measured"), over `n_tokens` counted positions.

    Attributes:
        fvu: sum ||y_hat - y||^2 / sum ||y - mean(y)||^2; explained_variance = 1 - fvu; mse per dimension.
        l0: mean number of active heads per position.
        dead_heads: heads that never fired on the evaluation text; heads_below_1e5 / heads_below_1e6: heads
            firing on fewer than that fraction of positions; dense_heads: on more than 10%; max_frequency: the
            largest fraction of positions any one head fires on.
        loss_*: next-token cross-entropy of the clean model, with the Lorsa spliced in, and with the attention
            output zero- or mean-ablated; loss_recovered_* = (ablated - spliced) / (ablated - clean).
        kl_spliced: mean KL(clean || spliced) of the next-token distributions.
    """

    fvu: float
    explained_variance: float
    mse: float
    l0: float
    dead_heads: int
    heads_below_1e5: int
    heads_below_1e6: int
    dense_heads: int
    max_frequency: float
    loss_clean: float
    loss_spliced: float
    loss_zero_ablated: float
    loss_mean_ablated: float
    loss_recovered_zero: float
    loss_recovered_mean: float
    kl_spliced: float
    n_tokens: int

    def to_dict(self) -> dict:
        """The metrics under the names of eval_results.json and the model card."""
        names = {"heads_below_1e5": "heads_below_1e-5", "heads_below_1e6": "heads_below_1e-6"}
        return {names.get(k, k): v for k, v in dataclasses.asdict(self).items()}


class _Totals:
    """Running sums over evaluated positions, in float64."""

    def __init__(self, n_heads: int, d_model: int, device):
        kw = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.sse = torch.zeros((), **kw)
        self.sum_y = torch.zeros(d_model, **kw)
        self.sum_y2 = torch.zeros((), **kw)
        self.active = torch.zeros((), **kw)
        self.fires = torch.zeros(n_heads, **kw)
        self.loss = dict.fromkeys(VARIANTS, 0.0)
        self.kl = 0.0
        self.n_pred = 0


@torch.no_grad()
def mean_attention_outputs(model, skip_token_ids: dict, windows: list[torch.Tensor]) -> dict:
    """{layer: mean of its attention output over the counted positions} for the layers of `skip_token_ids`
    ({layer: skipped ids}), from one host pass per batch up to the deepest of them."""
    total, count = dict.fromkeys(skip_token_ids, 0.0), dict.fromkeys(skip_token_ids, 0)
    for ids in windows:
        for layer, record in collect_layers(model, list(skip_token_ids), input_ids=ids).items():
            y = record.attention_output.double()
            mask = counted_positions(ids, skip_token_ids[layer]).to(y.device)  # y lives on layer L's device
            total[layer], count[layer] = total[layer] + y[mask].sum(0), count[layer] + int(mask.sum())
    return {layer: (total[layer] / count[layer]).float() for layer in skip_token_ids}


@torch.no_grad()
def evaluate_lorsa(
    model,
    lorsa,
    windows: Iterable,
    max_tokens: int,
    batch_size: int = 8,
    skip_token_ids: list[int] | None = None,
    progress: bool = True,
    strict: bool = True,
    budget_option: str = "--max_tokens",
) -> EvaluationResult:
    """The metrics of issue 'Evaluate a Lorsa' on `max_tokens` tokens of `windows` (rows of `input_ids`).

    `skip_token_ids` (default: the Lorsa's own, e.g. BOS) are positions left out of every metric, where
    the host's attention output is kept in all four runs. `strict=False` accepts a Lorsa made from another
    model of the same shape. `budget_option` is how a warning names `max_tokens` (in training: --eval_tokens).
    """
    check_positive_ints(max_tokens=max_tokens, batch_size=batch_size)
    check_lorsa_matches(model, lorsa, strict)
    skip = lorsa.config.skip_token_ids if skip_token_ids is None else skip_token_ids
    chunks = list(batches(windows, batch_size, max_tokens))  # read twice: for the mean, then for the metrics
    if not chunks:
        raise ValueError("The evaluation dataset gave no full windows; use more data or a shorter context_length.")
    warn_if_short(sum(c.numel() for c in chunks), max_tokens, budget_option)
    modes = (model.training, lorsa.training)
    model.eval(), lorsa.eval()
    try:
        mean = mean_attention_outputs(model, {lorsa.config.layer: skip}, chunks)[lorsa.config.layer]
        totals = _Totals(lorsa.config.n_ov_heads, lorsa.config.d_model, mean.device)
        for ids in tqdm(chunks, desc="Evaluating", disable=None if progress else True):  # None: only on a terminal
            _evaluate_batch(model, lorsa, ids, skip, mean, totals)
    finally:
        model.train(modes[0]), lorsa.train(modes[1])
    return _summarise(totals, lorsa)


def _evaluate_batch(model, lorsa, ids, skip, mean, totals: _Totals, clean: torch.Tensor | None = None) -> None:
    """One batch's metrics; `clean` (B, T, V): the host's logits when they are already known (several Lorsas
    evaluated on the same batch), so that only the three other versions run."""
    counted = counted_positions(ids, skip)  # (B, T)

    def variants(record, y):  # y: (B, T, D) on layer L's device
        out = lorsa_output(lorsa, record)
        y_hat = out.reconstruction.to(y.device, y.dtype)
        check_finite_batch(lorsa.config.layer, record.hidden_states, y, y_hat)
        here = counted.to(y.device)
        keep = here[..., None]
        on_lorsa = here.to(out.top_k_values.device)
        _accumulate_reconstruction(
            totals, y[here], y_hat[here], out.top_k_values[on_lorsa], out.top_k_indices[on_lorsa]
        )
        versions = [torch.where(keep, y_hat, y), torch.where(keep, 0.0, y), torch.where(keep, mean.to(y), y)]
        return versions if clean is not None else [y, *versions]

    if clean is None:
        logits = run_variants(model, lorsa.config.layer, ids, len(VARIANTS), variants)  # (4, B, T, V)
    else:
        others = run_variants(model, lorsa.config.layer, ids, len(VARIANTS) - 1, variants)
        logits = torch.cat([clean.to(others)[None], others])
    nll, kl, n_pred = prediction_sums(logits, ids, counted)
    for name, value in zip(VARIANTS, nll):
        totals.loss[name] += value
    totals.kl += kl
    totals.n_pred += n_pred


def check_finite_batch(layer: int, x: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor) -> None:
    """Say where a NaN or infinity came from, instead of reporting NaN metrics: the host (its attention input or
    output at the layer) or the Lorsa (finite input, non-finite reconstruction). One check per batch."""
    if not bool(x.isfinite().all() & y.isfinite().all()):
        raise ValueError(f"The host's layer {layer} attention has NaN or infinite values on this text (before the "
                         "Lorsa): the host itself overflows; load it in float32 or bfloat16 (--torch_dtype).")  # fmt: skip
    if not bool(y_hat.isfinite().all()):
        raise ValueError(f"The Lorsa of layer {layer} gives NaN or infinite outputs on finite input: its weights or "
                         "normalisation factors are damaged; train it again.")  # fmt: skip


def prediction_sums(logits: torch.Tensor, ids: torch.Tensor, counted: torch.Tensor) -> tuple[list[float], float, int]:
    """For logits (versions, B, T, V) of one batch, the first version the clean model's: each version's summed
    next-token loss, the summed KL(clean || second version), and the number of predictions (those made at
    counted positions)."""
    logits = logits[:, :, :-1]
    targets = ids[:, 1:].to(logits.device)
    valid = counted[:, :-1].to(logits.device)
    logp = logits.log_softmax(-1)
    nll = [F.nll_loss(lp[valid], targets[valid], reduction="sum").item() for lp in logp]
    kl = F.kl_div(logp[1][valid], logp[0][valid], log_target=True, reduction="sum").item()
    return nll, kl, int(valid.sum())


def loss_recovered(loss: dict, approximated: str, ablated: str) -> float:
    """(L_ablated - L_approximated) / (L_ablated - L_clean): 1 when the approximation does as well as the clean
    model, 0 when no better than the ablation; NaN when ablating changes nothing."""
    gap = loss[ablated] - loss["clean"]
    return (loss[ablated] - loss[approximated]) / gap if gap else float("nan")


def _accumulate_reconstruction(totals: _Totals, y, y_hat, values, indices) -> None:
    """Add a batch's counted positions to the running sums (moved to the sums' device first)."""
    device = totals.sse.device
    y, y_hat, values, indices = y.to(device).double(), y_hat.to(device).double(), values.to(device), indices.to(device)
    totals.n += y.shape[0]
    totals.sse += (y_hat - y).pow(2).sum()
    totals.sum_y += y.sum(0)
    totals.sum_y2 += y.pow(2).sum()
    active = values != 0
    totals.active += active.sum()
    totals.fires.index_add_(0, indices[active], torch.ones_like(indices[active], dtype=totals.fires.dtype))


def _summarise(t: _Totals, lorsa) -> EvaluationResult:
    variance = t.sum_y2 - t.sum_y.pow(2).sum() / t.n
    fvu = (t.sse / variance).item()
    loss = {name: t.loss[name] / t.n_pred for name in VARIANTS}
    freq = t.fires / t.n
    return EvaluationResult(
        fvu=fvu, explained_variance=1.0 - fvu, mse=(t.sse / (t.n * lorsa.config.d_model)).item(),
        l0=(t.active / t.n).item(), dead_heads=int((t.fires == 0).sum()), heads_below_1e5=int((freq < 1e-5).sum()),
        heads_below_1e6=int((freq < 1e-6).sum()), dense_heads=int((freq > 0.1).sum()), max_frequency=float(freq.max()), loss_clean=loss["clean"],
        loss_spliced=loss["spliced"], loss_zero_ablated=loss["zero_ablated"], loss_mean_ablated=loss["mean_ablated"],
        loss_recovered_zero=loss_recovered(loss, "spliced", "zero_ablated"),
        loss_recovered_mean=loss_recovered(loss, "spliced", "mean_ablated"), kl_spliced=t.kl / t.n_pred, n_tokens=t.n,
    )  # fmt: skip


# ---- command line -----------------------------------------------------------------------------------


def save_results(results: dict, path: Path) -> None:
    """The metrics, what was evaluated, and the versions that computed them, as indented JSON."""
    from importlib.metadata import version

    import transformers

    meta = {"hf_lorsa_version": version("hf_lorsa"), "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    write_atomically(path, json.dumps({**results, **meta}, indent=2) + "\n")


def update_card(lorsa, results: dict, name_or_path: str, subfolder: str = "") -> None:
    """Put the results into the model card as structured evaluation results (model-index)."""
    directory = Path(name_or_path, subfolder)
    if directory.is_dir():
        lorsa.eval_results = results
        model_card(lorsa.config, results, repo_hint=os.path.abspath(directory)).save(directory / "README.md")
    else:
        card = model_card(lorsa.config, results, repo_id=name_or_path, subfolder=subfolder)
        card.push_to_hub(name_or_path, commit_message="Add evaluation results")
