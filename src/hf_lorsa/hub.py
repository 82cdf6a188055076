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
OV heads sharing {{ n_qk }} QK heads of width {{ d_qk }}, {{ top_k }} active per position. Its weights are
derived from the base model's and follow the base model's license.

| field | value |
| --- | --- |
{{ table }}

## Use

```python
import hf_lorsa
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{{ base_model }}")
tokenizer = AutoTokenizer.from_pretrained("{{ base_model }}")
lorsa = hf_lorsa.LorsaModel.from_pretrained("{{ repo_hint }}"{{ subfolder_arg }})
input_ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
with hf_lorsa.splice(model, lorsa):  # layer {{ layer }}'s attention output replaced by the Lorsa
    logits = model(input_ids=input_ids).logits
```
{{ results }}"""


def looks_like_a_path(name: str) -> bool:
    """Written as a local path (./x, /x, ~/x, a/b/c), not as a Hub id (org/name)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not looks_like_a_path(name)


REQUIRED_CONFIG_KEYS = ("d_model", "n_qk_heads", "d_qk_head", "n_ov_heads", "top_k")


def location(name_or_path, subfolder: str | None) -> str:
    """How messages name a Lorsa: its folder or Hub id, and the subfolder if any."""
    return f"{name_or_path}" + (f" (subfolder {subfolder!r})" if subfolder else "")


def repo_file(name_or_path, filename: str, subfolder: str = "", **kwargs) -> str | None:
    """A file of a Lorsa folder or Hub repository (through transformers' cache), or None when absent."""
    from transformers.utils import cached_file

    return cached_file(
        str(name_or_path), filename, subfolder=subfolder or "", _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False, **kwargs,
    )  # fmt: skip


def read_eval_results(name_or_path, subfolder: str = "") -> dict | None:
    """The evaluation results saved beside a Lorsa (eval_results.json), or None."""
    try:
        path = repo_file(name_or_path, EVAL_RESULTS_FILE, subfolder)
    except OSError:
        return None
    return json.loads(Path(path).read_text()) if path else None


def check_lorsa_config(name_or_path, kwargs: dict) -> dict | None:
    """The config.json of a Lorsa as a dict, after refusing with a clear message a folder that holds another
    kind of model or an incomplete config (None when `kwargs` bring their own config)."""
    from .configuration_lorsa import LorsaConfig

    subfolder = kwargs.get("subfolder") or ""
    where = location(name_or_path, subfolder)
    if kwargs.get("config") is not None:
        return None
    local = Path(str(name_or_path)).expanduser()
    if local.is_dir() and not (local / subfolder / "config.json").is_file():
        from .release import release_layers

        layers = release_layers(local / subfolder)
        if layers:
            raise OSError(f"{where} is a release of layers {layers}: pass subfolder='layer{layers[0]}' "
                          f"(--subfolder layer{layers[0]}) for one of them.")  # fmt: skip
        raise OSError(f"Could not load a Lorsa from {where}: it needs config.json and model.safetensors.")
    if not local.exists() and looks_like_a_path(str(name_or_path)):
        raise OSError(f"Could not load a Lorsa from {where}: no such folder (it needs config.json and "
                      "model.safetensors).")  # fmt: skip
    try:
        config, _ = LorsaConfig.get_config_dict(
            str(name_or_path), subfolder=subfolder, revision=kwargs.get("revision"), token=kwargs.get("token"),
            cache_dir=kwargs.get("cache_dir"), local_files_only=kwargs.get("local_files_only", False),
        )  # fmt: skip
    except (OSError, json.JSONDecodeError) as err:
        raise OSError(f"Could not read the config.json of a Lorsa at {where}: {err}") from err
    from .llamascopium import is_llamascopium_config, lorsa_config_dict

    if is_llamascopium_config(config):  # the authors' format: its config read as ours (the weights come later)
        return {"model_type": "lorsa", **lorsa_config_dict(config, layer=kwargs.get("layer"), where=where)}
    model_type = config.get("model_type")
    if model_type != "lorsa":
        raise ValueError(
            f"{where} holds a {model_type!r} model, not a Lorsa (its config.json says model_type={model_type!r}). "
            "Load it with transformers' AutoModelForCausalLM; a Lorsa folder is written by hf-lorsa train or "
            "LorsaModel.save_pretrained."
        )
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"The config.json of the Lorsa at {where} lacks {missing}; the checkpoint is incomplete.")
    return config


SELECTIONS = {  # how the card names a Lorsa's act_fn
    "topk": "top-k per position",
    "batchtopk": "BatchTopK (top-k is the mean; at inference each head passes its own threshold)",
}
# may be absent: BatchTopK Lorsas saved before heads had their own thresholds hold every head at the shared one
MAY_BE_MISSING = {"threshold_scale"}


def check_loading_info(name_or_path, info: dict) -> None:
    """Every weight must come from the checkpoint: a missing or misshapen tensor is refused, not made up."""
    problems = {
        "missing": sorted(set(info.get("missing_keys") or []) - MAY_BE_MISSING),
        "unexpected": sorted(info.get("unexpected_keys") or []),
        "of the wrong shape": sorted(str(k[0]) if isinstance(k, tuple) else str(k)
                                     for k in info.get("mismatched_keys") or []),
    }  # fmt: skip
    found = {kind: keys for kind, keys in problems.items() if keys}
    if found:
        listed = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in found.items())
        raise ValueError(f"The weights of the Lorsa at {name_or_path} do not match its config ({listed}).")


def model_card(config, eval_results: dict | None = None, repo_id: str | None = None, subfolder: str = "") -> ModelCard:
    """A model card recording the base model, layer, sizes, training data and evaluation results."""
    base = config.base_model_name_or_path
    dataset = getattr(config, "dataset_name", None)
    evaluated = (eval_results or {}).get("dataset") or dataset or "unknown"
    name = f"lorsa-{(base or 'model').rstrip('/').split('/')[-1]}-l{config.layer}"
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=evaluated,
            dataset_name=evaluated,
            dataset_split=eval_results.get("dataset_split"),
            metric_type=metric,
            metric_name=metric,
            metric_value=float(eval_results[metric]),
        )  # fmt: skip
        for metric in CARD_METRICS
        if eval_results and eval_results.get(metric) is not None
    ]
    datasets = sorted({d for d in (dataset, (eval_results or {}).get("dataset")) if _is_hub_id(d)})
    card_data = ModelCardData(
        library_name="hf_lorsa",
        license="other",
        license_name="base-model-license",
        base_model=base if _is_hub_id(base) else None,
        datasets=datasets or None,
        tags=["lorsa", "hf_lorsa", "sparse-attention", "interpretability", f"layer-{config.layer}"],
        model_name=name,
        eval_results=results or None,
    )
    fields = {
        "base model": base, "host model type": config.host_model_type, "layer": config.layer,
        "attention input": config.attn_input_module, "attention output": config.attn_output_module,
        "d_model": config.d_model, "QK heads": config.n_qk_heads, "QK head width": config.d_qk_head,
        "OV heads": config.n_ov_heads, "top-k": config.top_k, "top-k rule": config.topk_rule,
        "selection": SELECTIONS[config.act_fn],
        "training data": dataset, "tokens trained": getattr(config, "tokens_trained", None),
    }  # fmt: skip
    table = "\n".join(f"| {k} | {v} |" for k, v in fields.items() if v is not None)
    results_md = ""
    if eval_results:
        rows = "\n".join(f"| {k} | {eval_results[k]:.6g} |" for k in CARD_METRICS if eval_results.get(k) is not None)
        split = f" ({eval_results['dataset_split']})" if eval_results.get("dataset_split") else ""
        results_md = (f"\n## Evaluation\n\nOn {eval_results.get('n_tokens', '?')} tokens of `{evaluated}`{split}, with the "
                      f"Lorsa spliced into the base model (`hf-lorsa evaluate`).\n\n| metric | value |\n| --- | --- |\n"
                      f"{rows}\n")  # fmt: skip
    return ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE, model_name=repo_id or name, layer=config.layer, base_model=base,
        n_ov=config.n_ov_heads, n_qk=config.n_qk_heads, d_qk=config.d_qk_head, top_k=config.top_k, table=table,
        repo_hint=repo_id or "PATH_OR_REPO_ID", subfolder_arg=f", subfolder={subfolder!r}" if subfolder else "",
        results=results_md,
    )  # fmt: skip


def write_card(lorsa, directory: str | Path, repo_id: str | None = None, subfolder: str = "") -> None:
    """Write eval_results.json (the model's own results; a stale file of another model is removed) and the
    README.md card into `directory`."""
    results_file = Path(directory, EVAL_RESULTS_FILE)
    if lorsa.eval_results:
        results_file.write_text(json.dumps(lorsa.eval_results, indent=2))
    elif results_file.exists():
        results_file.unlink()
    card = model_card(lorsa.config, lorsa.eval_results, repo_id or str(directory), subfolder)
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
        write_card(lorsa, target, repo_id, subfolder or "")
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
    where = location(name_or_path, kwargs.get("subfolder"))
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


def own_allocations(model) -> None:
    """Give each parameter and buffer that starts off a 64-byte boundary (a view into the loaded file's buffer) an
    allocation of its own. MKL's products differ in their last bits with their operands' alignment, so without this
    a loaded Lorsa's outputs would not be bitwise those of the Lorsa that was saved (tests/test_hub.py)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % 64:
            tensor.data = tensor.data.clone()
