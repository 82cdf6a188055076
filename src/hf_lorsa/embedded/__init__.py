"""The host and text that ship inside the package, so that hf_lorsa runs with nothing downloaded.

`hf_lorsa:stories260K` names them wherever a host or a dataset is asked for: as `--model_name_or_path` it is
Karpathy's stories260K Llama (5 layers, d_model 64, MIT licence; `stories260K/SOURCE.md`), as `--dataset` a
corpus of 4,075 stories sampled from that model (`stories260K-stories.md`). Names stay as given in configs
and cards, so a Lorsa trained on them opens wherever hf_lorsa is installed.
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "hf_lorsa:"
STORIES = "hf_lorsa:stories260K"
HERE = Path(__file__).resolve().parent
STORIES_MODEL = HERE / "stories260K"
STORIES_TEXT = HERE / "stories260K-stories.jsonl"
MODELS = {STORIES: STORIES_MODEL}
TEXTS = {STORIES: STORIES_TEXT}


def is_embedded(name) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def _known(name: str, table: dict, what: str) -> Path:
    if name not in table:
        raise ValueError(f"{name!r} is not an embedded {what}; the package carries {sorted(table)}.")
    return table[name]


def model_location(name_or_path: str) -> str:
    """The folder of an embedded host (`hf_lorsa:stories260K`), or `name_or_path` unchanged."""
    return str(_known(name_or_path, MODELS, "model")) if is_embedded(name_or_path) else name_or_path


def text_location(spec: str) -> str:
    """A dataset spec (comma-separated) with each embedded name replaced by its file."""
    if not isinstance(spec, str) or PREFIX not in spec:
        return spec
    return ",".join(str(_known(p, TEXTS, "dataset")) if is_embedded(p) else p for p in spec.split(","))
