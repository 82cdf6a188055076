"""Model cards for Lorsa checkpoints, built with huggingface_hub's ModelCard / ModelCardData / EvalResult."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

EVAL_RESULTS_FILE = "eval_results.json"
CARD_METRICS = (
    "fvu", "explained_variance", "mse", "l0", "dead_heads", "loss_clean", "loss_spliced",
    "loss_zero_ablated", "loss_mean_ablated", "loss_recovered_zero", "loss_recovered_mean", "kl_spliced",
)  # fmt: skip

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A [Lorsa](https://arxiv.org/abs/2504.20938) (Low-Rank Sparse Attention) replacement for the attention of
layer {{ layer }} of `{{ base_model }}`, made with hf_lorsa: {{ n_ov }} rank-1
OV heads sharing {{ n_qk }} QK heads of width {{ d_qk }}, {{ top_k }} active per position.

| field | value |
| --- | --- |
{{ table }}

## Use

```python
import hf_lorsa
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{{ base_model }}")
lorsa = hf_lorsa.LorsaModel.from_pretrained("{{ repo_hint }}")
with hf_lorsa.splice(model, lorsa):
    outputs = model(**inputs)  # layer {{ layer }}'s attention output replaced by the Lorsa
```
{{ results }}"""


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not Path(name).is_absolute() and not name.startswith((".", "~")) and name.count("/") <= 1


def read_eval_results(directory: str | Path) -> dict | None:
    path = Path(directory, EVAL_RESULTS_FILE)
    return json.loads(path.read_text()) if path.is_file() else None


def model_card(config, eval_results: dict | None = None, repo_id: str | None = None) -> ModelCard:
    """A model card recording the base model, layer, sizes, training data and evaluation results."""
    base = config.base_model_name_or_path
    dataset = getattr(config, "dataset_name", None)
    name = repo_id or f"lorsa-{(base or 'model').rstrip('/').split('/')[-1]}-l{config.layer}"
    results = []
    for metric in CARD_METRICS:
        if eval_results and eval_results.get(metric) is not None:
            results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=eval_results.get("dataset") or dataset or "unknown",
                    dataset_name=eval_results.get("dataset") or dataset or "unknown",
                    metric_type=metric,
                    metric_name=metric,
                    metric_value=float(eval_results[metric]),
                )
            )
    card_data = ModelCardData(
        library_name="hf_lorsa",
        base_model=base if _is_hub_id(base) else None,
        datasets=[dataset] if _is_hub_id(dataset) else None,
        tags=["lorsa", "sparse-attention", "interpretability", f"layer-{config.layer}"],
        model_name=name,
        eval_results=results or None,
    )
    fields = {
        "base model": base, "host model type": config.host_model_type, "layer": config.layer,
        "attention input": config.attn_input_module, "attention output": config.attn_output_module,
        "d_model": config.d_model, "QK heads": config.n_qk_heads, "QK head width": config.d_qk_head,
        "OV heads": config.n_ov_heads, "top-k": config.top_k, "top-k rule": config.topk_rule,
        "training data": dataset, "tokens trained": getattr(config, "tokens_trained", None),
    }  # fmt: skip
    table = "\n".join(f"| {k} | {v} |" for k, v in fields.items() if v is not None)
    results_md = ""
    if eval_results:
        rows = "\n".join(f"| {k} | {eval_results[k]:.6g} |" for k in CARD_METRICS if eval_results.get(k) is not None)
        results_md = f"\n## Evaluation\n\n| metric | value |\n| --- | --- |\n{rows}\n"
    return ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE, model_name=name, layer=config.layer, base_model=base, n_ov=config.n_ov_heads,
        n_qk=config.n_qk_heads, d_qk=config.d_qk_head, top_k=config.top_k, table=table,
        repo_hint=repo_id or "PATH_OR_REPO_ID", results=results_md,
    )  # fmt: skip


def write_card(lorsa, directory: str | Path, repo_id: str | None = None) -> None:
    """Write eval_results.json (when the model carries results) and README.md into `directory`."""
    if lorsa.eval_results:
        Path(directory, EVAL_RESULTS_FILE).write_text(json.dumps(lorsa.eval_results, indent=2))
    card = model_card(lorsa.config, lorsa.eval_results or read_eval_results(directory), repo_id)
    card.save(Path(directory, "README.md"))


def push(lorsa, repo_id, subfolder, commit_message, private, token, revision, create_pr):
    """Save into a temporary folder laid out like the repository and upload it with transformers' mixin."""
    import tempfile

    from transformers.utils.hub import hf_api

    repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp, subfolder) if subfolder else Path(tmp)
        target.mkdir(parents=True, exist_ok=True)
        lorsa.save_pretrained(target)
        write_card(lorsa, target, repo_id)
        return lorsa._upload_modified_files(
            tmp, repo_id, files_timestamps={}, commit_message=commit_message or "Upload Lorsa",
            token=token, create_pr=create_pr, revision=revision,
        )  # fmt: skip


def load_safetensors_only(load, name_or_path, *args, **kwargs):
    """Call transformers' from_pretrained with safetensors forced, turning its failures into clear errors."""
    from safetensors import SafetensorError

    if kwargs.get("use_safetensors") is False:
        raise ValueError("hf_lorsa loads safetensors checkpoints only; pickle checkpoints are never loaded.")
    kwargs["use_safetensors"] = True
    where = f"{name_or_path}" + (f" (subfolder {kwargs['subfolder']!r})" if kwargs.get("subfolder") else "")
    try:
        return load(name_or_path, *args, **kwargs)
    except SafetensorError as err:
        raise ValueError(
            f"The safetensors file of the Lorsa at {where} is corrupted ({err}); download it again."
        ) from err
    except OSError as err:
        raise OSError(
            f"Could not load a Lorsa from {where}: it needs config.json and model.safetensors. hf_lorsa never "
            f"loads pickle checkpoints (pytorch_model.bin); re-save such weights with safetensors. ({err})"
        ) from err
