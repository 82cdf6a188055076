"""A Lorsa's model card, ready for the Hub: what it is, how to install and use it, how it was trained, and its
evaluation results as structured metadata (huggingface_hub's ModelCard / ModelCardData / EvalResult)."""

from __future__ import annotations

import os

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..base.locations import is_hub_id
from ..embedded import STORIES, is_embedded

CARD_METRICS = (
    "fvu", "explained_variance", "mse", "l0", "dead_heads", "loss_clean", "loss_spliced",
    "loss_zero_ablated", "loss_mean_ablated", "loss_recovered_zero", "loss_recovered_mean", "kl_spliced",
)  # fmt: skip
METRIC_MEANINGS = {
    "fvu": "variance of the attention output left unexplained, as a fraction (0 is a perfect reconstruction)",
    "explained_variance": "1 - FVU",
    "mse": "mean squared error of the reconstruction",
    "l0": "heads active per token, on average",
    "dead_heads": "heads that never fired on the evaluation text",
    "loss_clean": "the base model's next-token loss",
    "loss_spliced": "the loss with this layer's attention output replaced by the Lorsa's",
    "loss_zero_ablated": "the loss with this layer's attention output set to zero",
    "loss_mean_ablated": "the loss with this layer's attention output set to its mean",
    "loss_recovered_zero": "(zero-ablated - spliced) / (zero-ablated - clean): 1 is the base model's own loss",
    "loss_recovered_mean": "the same against mean ablation",
    "kl_spliced": "mean KL(clean || spliced) of the next-token distributions",
}
SELECTIONS = {  # how the card names a Lorsa's act_fn
    "topk": "top-k per position",
    "batchtopk": "BatchTopK (top-k is the mean; at inference each head passes its own threshold)",
}
TRAINING_SETTINGS = (  # (label, key of config.training_args)
    ("context length", "context_length"), ("sequences per step", "batch_size"), ("learning rate", "learning_rate"),
    ("schedule", "lr_scheduler_type"), ("warmup", "warmup_steps"), ("seed", "seed"), ("initialisation", "init"),
)  # fmt: skip

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A [Lorsa](https://arxiv.org/abs/2504.20938) (Low-Rank Sparse Attention) replacement for the attention of
layer {{ layer }} of {{ host }}, made with [hf_lorsa](https://pypi.org/project/hf_lorsa/): {{ n_ov }} rank-1
OV heads sharing {{ n_qk }} QK heads of width {{ d_qk }}, {{ top_k }} active per position. Its weights are
derived from the base model's and follow the base model's license.

| field | value |
| --- | --- |
{{ table }}

## Use

```bash
pip install hf_lorsa
```

```python
import hf_lorsa
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained({{ host_expr }})
tokenizer = AutoTokenizer.from_pretrained({{ host_expr }})
lorsa = hf_lorsa.LorsaModel.from_pretrained("{{ repo_hint }}"{{ subfolder_arg }})
input_ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
with hf_lorsa.splice(model, lorsa):  # layer {{ layer }}'s attention output replaced by the Lorsa
    logits = model(input_ids=input_ids).logits
```
{{ training }}{{ results }}{{ mechanisms }}"""


def host_reference(base: str | None, model_type: str | None = None) -> tuple[str, str]:
    """(how the card's text names the base model, the Python expression that loads it)."""
    if is_embedded(base):
        return f"`{base}` (the stories260K Llama embedded in hf_lorsa)", "hf_lorsa.embedded.STORIES_MODEL"
    if is_hub_id(base):
        return f"[`{base}`](https://huggingface.co/{base})", f'"{base}"'
    if not base:
        return "its base model (not recorded)", '"BASE_MODEL"'
    name = os.path.basename(os.path.normpath(base))
    return (f"`{name}`, a local {model_type or 'causal LM'} model (at `{base}` where this Lorsa was made; give its Hub "
            f"id before publishing)", f'"{base}"')  # fmt: skip


def title(config, repo_id: str | None) -> str:
    if repo_id and is_hub_id(repo_id):
        return repo_id
    base = config.base_model_name_or_path
    name = STORIES.split(":")[1] if is_embedded(base) else os.path.basename(os.path.normpath(base or "")) or "a model"
    return f"Lorsa for layer {config.layer} of {name}"


def training_section(config) -> str:
    run = getattr(config, "training_args", None) or {}
    if not run:
        return ""
    rows = [
        ("tokens trained", getattr(config, "tokens_trained", None)),
        ("data", getattr(config, "dataset_name", None)),
    ]
    rows += [("top-k (mean active heads)", config.top_k)] + [(label, run.get(key)) for label, key in TRAINING_SETTINGS]
    table = "\n".join(f"| {label} | {value} |" for label, value in rows if value is not None)
    stopped = getattr(config, "stopped_early", None)
    warning = f"\n**Stopped early.** {stopped['message']}\n" if stopped else ""
    return (f"\n## Training\n\nTrained with `hf-lorsa train` (the recipe's defaults unless listed).\n{warning}\n"
            f"| setting | value |\n| --- | --- |\n{table}\n")  # fmt: skip


def results_section(eval_results: dict | None, evaluated: str) -> str:
    if not eval_results:
        return ""
    rows = "\n".join(
        f"| {k} | {eval_results[k]:.6g} | {METRIC_MEANINGS[k]} |"
        for k in CARD_METRICS
        if eval_results.get(k) is not None
    )
    split = f" ({eval_results['dataset_split']})" if eval_results.get("dataset_split") else ""
    return (f"\n## Evaluation\n\nOn {eval_results.get('n_tokens', '?')} tokens of `{evaluated}`{split}, with the Lorsa "
            f"spliced into the base model (`hf-lorsa evaluate`).\n\n| metric | value | meaning |\n| --- | --- | --- |\n"
            f"{rows}\n")  # fmt: skip


def mechanisms_section(mechanisms: dict | None, layer: int) -> str:
    """What the probes found (`analysis/meta.json`'s "mechanisms", written by `hf-lorsa analyze`)."""
    if not mechanisms:
        return ""
    probe, threshold = mechanisms.get("probe", {}), mechanisms.get("threshold", 0.5)
    rows = []
    for name, found in mechanisms.items():
        if not isinstance(found, dict) or "host_scores" not in found:
            continue
        for host, heads in found.get("host_heads", {}).items():
            carried = ", ".join(f"{h['head']} ({h['score']:.2f}, share {h['share']:.0%})" for h in heads[:10])
            carried = f"{len(heads)}: {carried}{', ...' if len(heads) > 10 else ''}" if heads else "none"
            rebuilt = found.get("reconstructed", {}).get(host)
            rebuilt = f"{rebuilt:.0%}" if rebuilt is not None else ""
            rows.append(f"| {name} | {layer}.{host} ({found['host_scores'][int(host)]:.2f}) | {carried} | {rebuilt} |")
        rows.append(f"| {name} | all | {found['lorsa_heads']} Lorsa heads score {threshold} or more | |")
    return (f"\n## Mechanisms\n\nProbe scores on {probe.get('sequences', '?')} sequences of {probe.get('length', '?')} "
            f"random tokens repeated once (`hf-lorsa analyze`, `hf_lorsa.analysis.probes`): the host heads of layer {layer} "
            f"scoring {threshold} or more, and the Lorsa heads that score as much and whose OV map lies mostly in that "
            f"host head's OV subspace (head (score, share of its OV map inside the host head's)), and how much of the "
            f"host head's output on the probe those Lorsa heads reconstruct together.\n\n"
            f"| probe | host head (score) | Lorsa heads | host head's output they reconstruct |\n"
            f"| --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")  # fmt: skip


def eval_result_entries(eval_results: dict | None, evaluated: str, name: str | None = None) -> list[EvalResult]:
    """The results as model-index entries (`name` tells the layers of a release apart)."""
    prefix = f"{name} " if name else ""
    return [
        EvalResult(
            task_type="text-generation",
            task_name=f"{prefix}reconstruction".strip(),
            dataset_type=evaluated,
            dataset_name=evaluated,
            dataset_split=eval_results.get("dataset_split"),
            metric_type=metric,
            metric_name=f"{prefix}{metric}",
            metric_value=float(eval_results[metric]),
        )  # fmt: skip
        for metric in CARD_METRICS
        if eval_results and eval_results.get(metric) is not None
    ]


def model_card(config, eval_results: dict | None = None, repo_id: str | None = None, subfolder: str = "",
               repo_hint: str | None = None, mechanisms: dict | None = None) -> ModelCard:  # fmt: skip
    """A model card recording the base model, layer, sizes, training settings, evaluation results and (given the
    analysis' `mechanisms`) what the probes found."""
    base = config.base_model_name_or_path
    dataset = getattr(config, "dataset_name", None)
    evaluated = (eval_results or {}).get("dataset") or dataset or "unknown"
    datasets = sorted({d for d in (dataset, (eval_results or {}).get("dataset")) if is_hub_id(d)})
    card_data = ModelCardData(
        library_name="hf_lorsa",
        license="other",
        license_name="base-model-license",
        base_model=base if is_hub_id(base) else None,
        datasets=datasets or None,
        tags=["lorsa", "hf_lorsa", "sparse-attention", "interpretability", f"layer-{config.layer}"],
        model_name=title(config, repo_id),
        eval_results=eval_result_entries(eval_results, evaluated) or None,
    )
    host, host_expr = host_reference(base, config.host_model_type)
    fields = {
        "base model": base, "host model type": config.host_model_type, "layer": config.layer,
        "attention input": config.attn_input_module, "attention output": config.attn_output_module,
        "d_model": config.d_model, "QK heads": config.n_qk_heads, "QK head width": config.d_qk_head,
        "OV heads": config.n_ov_heads, "top-k": config.top_k, "top-k rule": config.topk_rule,
        "selection": SELECTIONS[config.act_fn],
        "training data": dataset, "tokens trained": getattr(config, "tokens_trained", None),
    }  # fmt: skip
    table = "\n".join(f"| {k} | {v} |" for k, v in fields.items() if v is not None)
    return ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE, title=title(config, repo_id), layer=config.layer, host=host,
        host_expr=host_expr, n_ov=config.n_ov_heads, n_qk=config.n_qk_heads, d_qk=config.d_qk_head,
        top_k=config.top_k, table=table, repo_hint=repo_id or repo_hint or "PATH_OR_REPO_ID",
        subfolder_arg=f", subfolder={subfolder!r}" if subfolder else "", training=training_section(config),
        results=results_section(eval_results, evaluated), mechanisms=mechanisms_section(mechanisms, config.layer),
    )  # fmt: skip


def publishable_base(config, base_model: str | None = None) -> str | None:
    """The base model a published card names: `base_model` (a Hub id) when given, else the recorded one, which must
    be a Hub id or embedded: a card on the Hub must not name a path on the disk it was made on."""
    if base_model is not None:
        if not is_hub_id(base_model):
            raise ValueError(f"base_model {base_model!r} is not a Hub id (org/name).")
        return base_model
    base = config.base_model_name_or_path
    if base and not is_hub_id(base) and not is_embedded(base):
        raise ValueError(
            f"This Lorsa's base model is the local path {base}: a card on the Hub would name a path on this disk. "
            "Give the base model's Hub id: push_to_hub(repo_id, base_model='org/name') or hf-lorsa push --base_model "
            "org/name. Nothing was uploaded."
        )
    return base
