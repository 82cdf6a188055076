"""Several Lorsas at once: trained together (`LorsaLayers`), saved as a release (a folder of `layer{L}` folders,
each a complete Lorsa, with a card listing every layer's results at the root), pushed to the Hub in one call."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..base.locations import is_hub_id
from ..base.usage import require
from ..model.configuration_lorsa import LorsaConfig
from ..model.files import LAYER_FOLDER, RELEASE_LAYERS_KEY, layer_folder, release_layers
from ..model.hub import uploading
from ..model.model_card import eval_result_entries, publishable_base
from ..model.modeling_lorsa import LorsaModel

CARD_COLUMNS = ("fvu", "l0", "dead_heads", "loss_recovered_zero", "kl_spliced")
NOT_PUBLISHED = ["checkpoint-*", "*/checkpoint-*", "runs/*", "lorsa_run.json", ".lorsa_lock"]  # training state and logs


class LorsaLayers(nn.Module):
    """One Lorsa per host layer, trained together from one host pass per batch (each its own parameters, so
    Adam treats them as if trained alone)."""

    def __init__(self, lorsas: dict):
        super().__init__()
        self.lorsas = nn.ModuleDict({layer_folder(layer): lorsas[layer] for layer in sorted(lorsas)})

    def by_layer(self) -> dict:
        """{layer: LorsaModel}, in increasing layer order."""
        return {int(LAYER_FOLDER.match(name).group(1)): lorsa for name, lorsa in self.lorsas.items()}

    def forward(self, inputs: dict[int, torch.Tensor], **kwargs) -> dict:
        """Each layer's Lorsa on that layer's attention input: {layer: LorsaOutput}."""
        return {layer: self.lorsas[layer_folder(layer)](x, **kwargs) for layer, x in inputs.items()}


def check_memory(layers: list[int], d_model: int, n_ov: int, n_qk: int, head_dim: int, args) -> None:
    """Refuse up front a set of Lorsas whose weights, gradients and Adam moments (16 bytes a parameter in
    float32) cannot fit the training device, with the estimate."""
    params = 2 * n_qk * head_dim * (d_model + 1) + n_ov * (2 * d_model + 1) + d_model
    need = 16 * params * len(layers)
    if torch.cuda.is_available() and not args.use_cpu:
        have, kind = torch.cuda.get_device_properties(args.device).total_memory, f"{args.device} memory"
    else:
        have, kind = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"
    require(need < have, f"{len(layers)} Lorsa(s) of {params:,} parameters need about {need / 2**30:.1f} GiB for weights, "
            f"gradients and Adam state, more than the {have / 2**30:.1f} GiB of {kind}: train fewer layers per run "
            "(--layers) or shrink them (--expansion_factor).")  # fmt: skip


def write_release_card(folder: str | Path, lorsas: dict, repo_id: str | None = None, whole: dict | None = None) -> None:
    """README.md at the root of a release: what it is, how to load one layer, each layer's results, and (from
    `hf-lorsa evaluate`) the whole replacement's."""
    from huggingface_hub import ModelCard, ModelCardData

    first = lorsas[min(lorsas)].config
    base = first.base_model_name_or_path
    rows = []
    for layer, lorsa in sorted(lorsas.items()):
        results = lorsa.eval_results or {}
        cells = [f"{results[k]:.4g}" if isinstance(results.get(k), (int, float)) else "" for k in CARD_COLUMNS]
        rows.append(f"| {layer} | `{layer_folder(layer)}` | {lorsa.config.n_ov_heads} | {lorsa.config.top_k} | "
                    + " | ".join(cells) + " |")  # fmt: skip
    entries = [  # every layer's results as model-index entries, told apart by name
        entry for layer, lorsa in sorted(lorsas.items())
        for entry in eval_result_entries(lorsa.eval_results, (lorsa.eval_results or {}).get("dataset") or "unknown",
                                         name=f"layer {layer}")
    ]  # fmt: skip
    data = ModelCardData(
        library_name="hf_lorsa", license="other", license_name="base-model-license",
        base_model=base if is_hub_id(base) else None, model_name=repo_id or f"Lorsa release for {base}",
        tags=["lorsa", "hf_lorsa", "sparse-attention", "interpretability"], eval_results=entries or None,
        **{RELEASE_LAYERS_KEY: sorted(lorsas)},
    )  # fmt: skip
    where = repo_id or str(folder)
    text = f"""---
{data.to_yaml()}
---

# Lorsa release for `{base}`

[Lorsas](https://arxiv.org/abs/2504.20938) (Low-Rank Sparse Attention) for {len(lorsas)} attention layers of
`{base}`, trained together with hf_lorsa (one host pass per batch feeding every layer). Each `layer{{L}}` folder
is a complete Lorsa with its own model card and evaluation results.

```python
import hf_lorsa
lorsa = hf_lorsa.LorsaModel.from_pretrained("{where}", subfolder="{layer_folder(min(lorsas))}")
```

| layer | folder | OV heads | top-k | {" | ".join(CARD_COLUMNS)} |
| --- | --- | --- | --- | {" | ".join("---" for _ in CARD_COLUMNS)} |
{chr(10).join(rows)}
"""
    if whole:
        text += (f"\n## The whole replacement\n\nEvery layer's attention replaced by its Lorsa at once (`hf-lorsa evaluate`, "
                 f"{whole['n_predictions']} predictions): loss {whole['loss_clean']:.4f} clean, {whole['loss_replaced']:.4f} "
                 f"replaced, {whole['loss_zero_ablated']:.4f} with every attention zero-ablated; loss recovered "
                 f"{whole['loss_recovered_zero']:.4f} (zero), {whole['loss_recovered_mean']:.4f} (mean); "
                 f"KL {whole['kl_replaced']:.4g}.\n")  # fmt: skip
    ModelCard(text).save(Path(folder, "README.md"))


def push_release(folder: str | Path, repo_id: str, private: bool | None = None, token: str | None = None,
                 commit_message: str | None = None, revision: str | None = None, create_pr: bool = False,
                 base_model: str | None = None):  # fmt: skip
    """Upload a release folder (every `layer{L}` Lorsa and the release card; not checkpoints or training logs)
    to the Hub repository `repo_id` in one commit, with huggingface_hub's folder upload. A release of a local host
    needs `base_model`, the host's Hub id: the Lorsas and cards are then uploaded naming it (the folder is unchanged)."""
    import tempfile

    from huggingface_hub import HfApi

    folder = Path(folder)
    layers = release_layers(folder)
    if not layers:
        if (folder / "config.json").is_file():
            raise ValueError(f"{folder} is one Lorsa, not a release: upload it with "
                             "LorsaModel.from_pretrained(folder).push_to_hub(repo_id).")  # fmt: skip
        raise ValueError(f"{folder} is not a release: it has no layer{{L}} folders holding a Lorsa.")
    recorded = LorsaConfig.from_pretrained(folder, subfolder=layer_folder(layers[0]))
    base = publishable_base(recorded, base_model)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as staging:
        if base != recorded.base_model_name_or_path:  # the release as it will read on the Hub
            lorsas = {layer: LorsaModel.from_pretrained(folder, subfolder=layer_folder(layer)) for layer in layers}
            for layer, lorsa in lorsas.items():
                lorsa.config.base_model_name_or_path = base
                lorsa.save_pretrained(Path(staging, layer_folder(layer)))
            write_release_card(staging, lorsas, repo_id)
            folder = Path(staging)
        with uploading(repo_id):
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            return api.upload_folder(
                folder_path=str(folder), repo_id=repo_id, commit_message=commit_message or "Upload Lorsa release",
                ignore_patterns=NOT_PUBLISHED, revision=revision, create_pr=create_pr,
            )  # fmt: skip
