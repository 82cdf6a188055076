"""Where a Lorsa's files are: a local folder or a Hub repository (read through transformers' cache), the files kept
beside its weights, and the `layer{L}` folders of a release."""

from __future__ import annotations

import json
import re
from pathlib import Path

EVAL_RESULTS_FILE = "eval_results.json"
ANALYSIS_DIR = "analysis"  # the folder beside a Lorsa that holds its analysis (hf_lorsa.analysis.analysis_table)
LAYER_FOLDER = re.compile(r"^layer(\d+)$")


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
