"""Evaluate a Lorsa: reconstruction, sparsity, and next-token loss with the Lorsa spliced into its model.

The layers below L run once per batch: at layer L the batch is repeated four times (clean, spliced,
zero-ablated, mean-ablated), and only layer L's attention output differs between the copies.

Axes: B batch, T positions, D d_model, V vocabulary, Hov OV heads.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import hosts
from .activations import batches, load_text, pack
from .attention_mask import loss_mask
from .hooks import check_lorsa_matches, collect, hooked, host_rotary_for
from .hub import EVAL_RESULTS_FILE

VARIANTS = ("clean", "spliced", "zero_ablated", "mean_ablated")


def _repeat(value, batch: int, copies: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    if isinstance(value, tuple):
        return tuple(_repeat(v, batch, copies) for v in value)
    return value


@contextmanager
def repeated_from_layer(model, layer: int, batch: int, copies: int):
    """From decoder layer `layer` on, every batch-sized input is repeated `copies` times along the batch."""
    layers = hosts.get_module(hosts.unwrap(model), hosts.architecture_of(model).layers)

    def pre_hook(module, args, kwargs):
        return _repeat(args, batch, copies), {k: _repeat(v, batch, copies) for k, v in kwargs.items()}

    handles = [layers[i].register_forward_pre_hook(pre_hook, with_kwargs=True) for i in range(layer, len(layers))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
def mean_attention_output(model, lorsa, windows: list[torch.Tensor], skip_token_ids) -> torch.Tensor:
    """Mean of layer L's attention output over the counted positions (host run up to layer L only)."""
    total, count = 0.0, 0
    for ids in windows:
        y = collect(model, lorsa.config.layer, input_ids=ids).attention_output.double()
        mask = loss_mask(ids, skip_token_ids).to(y.device)  # y lives on layer L's device
        total, count = total + y[mask].sum(0), count + int(mask.sum())
    return (total / count).float()


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
) -> dict:
    """The metrics of issue 'Evaluate a Lorsa' on `max_tokens` tokens of `windows` (rows of `input_ids`).

    `skip_token_ids` (default: the Lorsa's own, e.g. BOS) are positions left out of every metric, where
    the host's attention output is kept in all four runs. `strict=False` accepts a Lorsa made from another
    model of the same shape.
    """
    if max_tokens is None or max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}.")
    check_lorsa_matches(model, lorsa, strict)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    skip = lorsa.config.skip_token_ids if skip_token_ids is None else skip_token_ids
    chunks = list(batches(windows, batch_size, max_tokens))  # read twice: for the mean, then for the metrics
    if not chunks:
        raise ValueError("The evaluation dataset gave no full windows; use more data or a shorter context_length.")
    modes = (model.training, lorsa.training)
    model.eval(), lorsa.eval()
    try:
        mean = mean_attention_output(model, lorsa, chunks, skip)
        totals = _Totals(lorsa.config.n_ov_heads, lorsa.config.d_model, mean.device)
        for ids in tqdm(chunks, desc="Evaluating", disable=not progress):
            _evaluate_batch(model, lorsa, ids, skip, mean, totals)
    finally:
        model.train(modes[0]), lorsa.train(modes[1])
    return _summarise(totals, lorsa)


def _evaluate_batch(model, lorsa, ids, skip, mean, totals: _Totals) -> None:
    ids = ids.to(hosts.input_device(model))
    B = ids.shape[0]
    counted = loss_mask(ids, skip)  # (B, T)
    lorsa_param = next(lorsa.parameters())

    def on_output(record, output):
        y = (output[0] if isinstance(output, tuple) else output)[:B]  # (B, T, D), on layer L's device
        x = record.hidden_states[:B].to(lorsa_param.device, lorsa_param.dtype)
        pe = host_rotary_for(lorsa, _first_copy(record.position_embeddings, B))
        out = lorsa(x, position_embeddings=None if pe is None else tuple(t.to(x.device) for t in pe))
        y_hat = out.reconstruction.to(y.device, y.dtype)
        here = counted.to(y.device)
        keep = here[..., None]
        variants = [y, torch.where(keep, y_hat, y), torch.where(keep, 0.0, y), torch.where(keep, mean.to(y), y)]
        on_lorsa = here.to(x.device)
        _accumulate_reconstruction(
            totals, y[here], y_hat[here], out.top_k_values[on_lorsa], out.top_k_indices[on_lorsa]
        )
        new = torch.cat(variants)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    with hooked(model, lorsa.config.layer, None, on_output), repeated_from_layer(model, lorsa.config.layer, B, 4):
        logits = model(input_ids=ids, use_cache=False).logits.float()  # (4B, T, V)
    logits = logits.view(4, B, *logits.shape[1:])[:, :, :-1]
    targets = ids[:, 1:].to(logits.device)
    valid = counted[:, :-1].to(logits.device)  # predictions made at counted positions
    logp = logits.log_softmax(-1)
    for name, lp in zip(VARIANTS, logp):
        totals.loss[name] += F.nll_loss(lp[valid], targets[valid], reduction="sum").item()
    totals.kl += F.kl_div(logp[1][valid], logp[0][valid], log_target=True, reduction="sum").item()
    totals.n_pred += int(valid.sum())


def _first_copy(position_embeddings, batch: int):
    if position_embeddings is None:
        return None
    return tuple(t[:batch] if t.shape[0] > batch else t for t in position_embeddings)


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


def _summarise(t: _Totals, lorsa) -> dict:
    variance = t.sum_y2 - t.sum_y.pow(2).sum() / t.n
    fvu = (t.sse / variance).item()
    loss = {name: t.loss[name] / t.n_pred for name in VARIANTS}

    def recovered(ablated: str) -> float:
        gap = loss[ablated] - loss["clean"]
        return (loss[ablated] - loss["spliced"]) / gap if gap else float("nan")

    freq = t.fires / t.n
    return {
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "mse": (t.sse / (t.n * lorsa.config.d_model)).item(),
        "l0": (t.active / t.n).item(),
        "dead_heads": int((t.fires == 0).sum()),
        "heads_below_1e-5": int((freq < 1e-5).sum()),
        "heads_below_1e-6": int((freq < 1e-6).sum()),
        "dense_heads": int((freq > 0.1).sum()),
        "loss_clean": loss["clean"],
        "loss_spliced": loss["spliced"],
        "loss_zero_ablated": loss["zero_ablated"],
        "loss_mean_ablated": loss["mean_ablated"],
        "loss_recovered_zero": recovered("zero_ablated"),
        "loss_recovered_mean": recovered("mean_ablated"),
        "kl_spliced": t.kl / t.n_pred,
        "n_tokens": t.n,
    }


# ---- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-lorsa evaluate", description="Evaluate a Lorsa spliced into its model.")
    p.add_argument("--lorsa", required=True, help="Lorsa directory or Hub id")
    p.add_argument("--dataset", required=True, help="Hub dataset name or local .jsonl/.txt/.parquet files")
    p.add_argument("--max_tokens", type=int, required=True, help="evaluation budget in tokens")
    p.add_argument("--model_name_or_path", default=None, help="host model (default: the Lorsa's base model)")
    p.add_argument("--output", default=None, help=f"results file (default: LORSA_DIR/{EVAL_RESULTS_FILE})")
    p.add_argument("--subfolder", default="", help="subfolder of the Lorsa repository (one layer of a release)")
    p.add_argument("--text_column", default="text")
    p.add_argument("--split", default="validation", help="split of a Hub dataset")
    p.add_argument("--holdout_fraction", type=float, default=0.0, help="evaluate on the last fraction of local data")
    p.add_argument("--context_length", type=int, default=None, help="default: the training context length")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--torch_dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--update_card", action="store_true", help="write the results into the model card")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_tokens <= 0:
        raise SystemExit("--max_tokens must be positive.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .activations import split_holdout
    from .modeling_lorsa import LorsaModel

    dataset = load_text(args.dataset, args.text_column, split=args.split)
    if args.holdout_fraction:
        dataset = split_holdout(dataset, args.holdout_fraction)[1]
    lorsa = LorsaModel.from_pretrained(args.lorsa, subfolder=args.subfolder)
    host_name = args.model_name_or_path or lorsa.config.base_model_name_or_path
    if not host_name:
        raise SystemExit("This Lorsa records no base model; pass --model_name_or_path.")
    context = args.context_length or (lorsa.config.training_args or {}).get("context_length") or 256
    tokenizer = AutoTokenizer.from_pretrained(host_name)
    model = AutoModelForCausalLM.from_pretrained(host_name, dtype=getattr(torch, args.torch_dtype)).to(args.device)
    results = evaluate_lorsa(
        model,
        lorsa.to(args.device),
        pack(dataset, tokenizer, context, args.text_column),
        args.max_tokens,
        args.batch_size,
    )
    results.update(dataset=args.dataset, model=host_name, lorsa=args.lorsa, layer=lorsa.config.layer)
    lorsa_dir = Path(args.lorsa, args.subfolder)
    output = Path(args.output) if args.output else lorsa_dir / EVAL_RESULTS_FILE
    if not args.output and not lorsa_dir.is_dir():
        raise SystemExit(f"{args.lorsa} is not a local directory; pass --output for the results file.")
    save_results(results, output)
    if args.update_card:
        update_card(lorsa, results, args.lorsa, args.subfolder)
    print(json.dumps(results, indent=2))
    return 0


def save_results(results: dict, path: Path) -> None:
    """Write the metrics with their run metadata (time, versions) through the `evaluate` library."""
    import evaluate

    path.parent.mkdir(parents=True, exist_ok=True)
    evaluate.save(str(path), **results)


def update_card(lorsa, results: dict, name_or_path: str, subfolder: str = "") -> None:
    """Put the results into the model card as structured evaluation results (model-index)."""
    from .hub import model_card

    directory = Path(name_or_path, subfolder)
    if directory.is_dir():
        model_card(lorsa.config, results).save(directory / "README.md")
    else:
        card = model_card(lorsa.config, results, repo_id=name_or_path)
        card.push_to_hub(name_or_path, commit_message="Add evaluation results")
