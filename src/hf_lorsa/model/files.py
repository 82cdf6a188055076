"""Where a Lorsa's files are: a local folder or a Hub repository (read through transformers' cache), the files kept
beside its weights, and the `layer{L}` folders of a release."""

from __future__ import annotations

import json
import re
from pathlib import Path

EVAL_RESULTS_FILE = "eval_results.json"
ANALYSIS_DIR = "analysis"  # the folder beside a Lorsa that holds its analysis (hf_lorsa.analysis.analysis_table)
LAYER_FOLDER = re.compile(r"^layer(\d+)$")
RELEASE_LAYERS_KEY = "hf_lorsa_layers"  # the release card's metadata: the layers the release holds


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
    if not path:
        return None
    try:
        results = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} (the evaluation results of the Lorsa at {location(name_or_path, subfolder)}) is not "
                         f"valid JSON ({err}); fix it, or delete it and run hf-lorsa evaluate again.") from err  # fmt: skip
    if not isinstance(results, dict):
        raise ValueError(f"{path} must hold a JSON object of results; delete it and run hf-lorsa evaluate again.")
    return results


def layer_folder(layer: int) -> str:
    """The subfolder of a release that holds layer `layer`'s Lorsa."""
    return f"layer{layer}"


def release_layers(folder: str | Path) -> list[int]:
    """The layers of a local release folder (its `layer{L}` subfolders holding a config.json); [] when it is not
    one: no such folder, or a Lorsa itself (its own config.json)."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / "config.json").is_file():
        return []
    found = [LAYER_FOLDER.match(p.name) for p in folder.iterdir() if (p / "config.json").is_file()]
    return sorted(int(m.group(1)) for m in found if m)


def checked_release_layers(folder: str | Path) -> list[int]:
    """`release_layers`, after checking the release against itself: each `layer{L}` folder holds the Lorsa of layer L
    (its config.json says so), and every layer the release card lists is there. A release that fails either is
    refused with what is wrong: its results would be reported under the wrong layer, or for fewer layers."""
    from huggingface_hub.repocard import metadata_load  # reads the card's YAML front matter

    folder = Path(folder)
    layers = release_layers(folder)
    for layer in layers:
        recorded = json.loads((folder / layer_folder(layer) / "config.json").read_text()).get("layer")
        if recorded is not None and recorded != layer:
            raise ValueError(f"{folder / layer_folder(layer)} holds the Lorsa of layer {recorded}, not {layer}: move it to "
                             f"{layer_folder(recorded)}/ (a release keeps each layer's Lorsa in layer{{L}}/).")  # fmt: skip
    card = folder / "README.md"
    listed = (metadata_load(card) or {}).get(RELEASE_LAYERS_KEY) if layers and card.is_file() else None
    missing = sorted(set(listed or []) - set(layers))
    if missing:
        raise ValueError(f"The release {folder} lists layers {sorted(listed)} in its card, but {missing} are missing "
                         f"({', '.join(layer_folder(m) + '/' for m in missing)}); restore them, or remove them from "
                         f"the card's {RELEASE_LAYERS_KEY} to use the rest.")  # fmt: skip
    return layers
