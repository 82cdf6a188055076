"""Evaluate a release: every layer's Lorsa spliced alone, and the whole replacement, every layer's attention
replaced by its Lorsa at once (what a circuit-tracing user runs), against ablating all of them.

Each batch runs the host once for the clean logits; each layer then runs its three other versions (spliced,
zero- and mean-ablated) from that layer on, and the whole replacement its three from the shallowest layer on.

Axes: B batch, T positions, D d_model, V vocabulary.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..base.usage import require
from ..formats.release import write_release_card
from ..host.attention_mask import counted_positions
from ..host.families import input_device
from ..host.hooks import first_copy, run_replaced
from ..inputs.activations import batches
from ..inputs.loading import open_lorsas, warn_if_short
from ..model.configuration_lorsa import check_positive_ints
from ..model.files import EVAL_RESULTS_FILE, layer_folder
from ..model.host_match import check_lorsa_matches
from ..model.splicing import lorsa_output
from .evaluation import (
    _evaluate_batch,
    _summarise,
    _Totals,
    loss_recovered,
    mean_attention_outputs,
    prediction_sums,
    save_results,
    update_card,
)

REPLACEMENT_VERSIONS = ("replaced", "zero_ablated", "mean_ablated")


@torch.no_grad()
def evaluate_release(model, lorsas: dict, windows, max_tokens: int, batch_size: int = 8, progress: bool = True,
                     strict: bool = True) -> tuple[dict, dict]:  # fmt: skip
    """({layer: EvaluationResult} of each Lorsa spliced alone, the whole replacement's metrics): loss with every
    layer replaced, with every layer's attention zero- or mean-ablated, loss recovered, KL(clean || replaced)."""
    check_positive_ints(max_tokens=max_tokens, batch_size=batch_size)
    for lorsa in lorsas.values():
        check_lorsa_matches(model, lorsa, strict)
        lorsa.eval()
    chunks = list(batches(windows, batch_size, max_tokens))
    if not chunks:
        raise ValueError("The evaluation dataset gave no full windows; use more data or a shorter context_length.")
    warn_if_short(sum(c.numel() for c in chunks), max_tokens)
    skips = {layer: lorsa.config.skip_token_ids for layer, lorsa in lorsas.items()}
    means = mean_attention_outputs(model, skips, chunks)  # one host pass per batch for every layer
    totals = {layer: _Totals(lorsa.config.n_ov_heads, lorsa.config.d_model, means[layer].device)
              for layer, lorsa in lorsas.items()}  # fmt: skip
    whole = dict.fromkeys(("clean", *REPLACEMENT_VERSIONS, "kl"), 0.0) | {"n_pred": 0}
    was_training = model.training
    model.eval()
    try:
        for ids in tqdm(chunks, desc="Evaluating", disable=None if progress else True):
            clean = model(input_ids=ids.to(input_device(model)), use_cache=False).logits.float()
            for layer, lorsa in lorsas.items():
                _evaluate_batch(model, lorsa, ids, skips[layer], means[layer], totals[layer], clean=clean)
            _replacement_batch(model, lorsas, ids, means, clean, whole)
    finally:
        model.train(was_training)
    per_layer = {layer: _summarise(totals[layer], lorsa) for layer, lorsa in lorsas.items()}
    return per_layer, _summarise_replacement(whole, sorted(lorsas))


def _replacement_batch(model, lorsas: dict, ids, means: dict, clean: torch.Tensor, whole: dict) -> None:
    """Every layer at once: the replaced model (each Lorsa reading the replaced model's own activations), and
    every attention output zero- or mean-ablated, as three copies of one batch."""
    B = ids.shape[0]
    counted = counted_positions(ids, next(iter(lorsas.values())).config.skip_token_ids)

    def replace(layer, lorsa):
        def new_output(record, y):  # y: (3B, T, D), copies in REPLACEMENT_VERSIONS order
            keep = counted.to(y.device)[..., None]
            y_hat = lorsa_output(lorsa, first_copy(record, B)).reconstruction.to(y.device, y.dtype)
            return torch.cat([torch.where(keep, y_hat, y[:B]), torch.where(keep, 0.0, y[B : 2 * B]),
                              torch.where(keep, means[layer].to(y), y[2 * B :])])  # fmt: skip

        return new_output

    replaced = run_replaced(model, {layer: replace(layer, lorsa) for layer, lorsa in lorsas.items()}, ids, 3)
    nll, kl, n_pred = prediction_sums(torch.cat([clean.to(replaced)[None], replaced]), ids, counted)
    for name, value in zip(("clean", *REPLACEMENT_VERSIONS), nll):
        whole[name] += value
    whole["kl"] += kl
    whole["n_pred"] += n_pred


def _summarise_replacement(whole: dict, layers: list[int]) -> dict:
    n = whole["n_pred"]
    loss = {name: whole[name] / n for name in ("clean", *REPLACEMENT_VERSIONS)}
    return {
        "layers": layers, "loss_clean": loss["clean"], "loss_replaced": loss["replaced"],
        "loss_zero_ablated": loss["zero_ablated"], "loss_mean_ablated": loss["mean_ablated"],
        "loss_recovered_zero": loss_recovered(loss, "replaced", "zero_ablated"),
        "loss_recovered_mean": loss_recovered(loss, "replaced", "mean_ablated"),
        "kl_replaced": whole["kl"] / n, "n_predictions": n,
    }  # fmt: skip


def release_command(args, layers: list[int]) -> dict:
    """`hf-lorsa evaluate --lorsa RELEASE`: every layer and the whole replacement. Results go beside each layer
    (layer{L}/eval_results.json) and, for the whole replacement, to RELEASE/eval_results.json; or all of them
    into --output."""
    from pathlib import Path

    root = args.lorsa_dir
    targets = [Path(args.output)] if args.output else [root / EVAL_RESULTS_FILE] + [
        root / layer_folder(layer) / EVAL_RESULTS_FILE for layer in layers
    ]  # fmt: skip
    for target in targets:
        require(args.overwrite or not target.exists(),
                f"{target} already exists (earlier results); pass --overwrite to replace it, or --output elsewhere.")  # fmt: skip
    subfolders = {layer: Path(args.subfolder, layer_folder(layer)).as_posix() for layer in layers}
    opened, loaded = open_lorsas(args, list(subfolders.values()))
    lorsas = dict(zip(layers, loaded))
    per_layer, whole = evaluate_release(opened.host, lorsas, opened.windows, args.max_tokens, args.batch_size,
                                        strict=args.strict)  # fmt: skip
    described = {
        **opened.source.describe(),
        "model": args.model_name_or_path or opened.lorsa.config.base_model_name_or_path,
    }
    results = {layer: {**r.to_dict(), **described, "lorsa": args.lorsa, "subfolder": subfolders[layer], "layer": layer}
               for layer, r in per_layer.items()}  # fmt: skip
    summary = {"whole_replacement": {**whole, **described}, "layers": {str(k): v for k, v in results.items()}}
    if args.output:
        save_results(summary, Path(args.output))
    else:
        for layer, r in results.items():
            save_results(r, root / layer_folder(layer) / EVAL_RESULTS_FILE)
        save_results({"whole_replacement": summary["whole_replacement"]}, root / EVAL_RESULTS_FILE)
    if args.update_card:
        for layer, lorsa in lorsas.items():
            update_card(lorsa, results[layer], args.lorsa, subfolders[layer])
            lorsa.eval_results = results[layer]
        write_release_card(root, lorsas, whole=summary["whole_replacement"])
    return summary
