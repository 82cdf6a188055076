"""The analysis table of a Lorsa: one row per OV head, its columns declared once (`HEAD_FEATURES`), stored
as `analysis/heads.parquet` with `analysis/meta.json` beside the Lorsa, locally or on the Hub.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, Features, List, Value

from ..model.files import ANALYSIS_DIR, repo_file
from .probes import PROBES

TAGS = ("bos", "previous_token", "current_token", "induction", "duplicate_token")

_SOURCE = {
    "position": Value("int64"),
    "token": Value("int64"),
    "contribution": Value("float64"),
    "share": Value("float64"),
}
_CONTEXT = {
    "tokens": List(Value("int64")),  # the context's token ids
    "text": List(Value("string")),  # each token as it reads in running text
    "activations": List(Value("float64")),  # the head's activation at each position (after top-k)
    "position": Value("int64"),  # where the top activation is, in the context
    "activation": Value("float64"),
    "z": Value("float64"),  # the head's pre-activation there: the sum of the contributions below
    "sources": List(_SOURCE),  # the source tokens carrying most of z: A[q, s] v[s] and its share of z
    "pattern": List(Value("float64")),  # the QK pattern's row at the top position, up to it
}
HEAD_FEATURES = Features({
    "head": Value("int64"), "qk_head": Value("int64"),
    "frequency": Value("float64"), "events": Value("int64"),  # share and number of counted positions it fires at
    "tags": List(Value("string")), "kind_shares": {tag: Value("float64") for tag in TAGS},
    "top_contexts": List(_CONTEXT),
    # contexts drawn at random from each of its highest ranges of |activation| (decades: the histogram's), as the
    # feature dashboards show beside the top ones, and each one's range ("1e-1 to 1e0")
    "samples": List(_CONTEXT), "sample_ranges": List(Value("string")),
    "host_heads": List(Value("int64")), "host_shares": List(Value("float64")),  # shares: see host_correspondence
    "spans_several_host_heads": Value("bool"),
    # the mechanism probes' scores (hf_lorsa.analysis.probes; None: never fired on the probe) and its firing events there
    "probes": {probe: Value("float64") for probe in PROBES}, "probe_events": Value("int64"),
    # counts of its activations per bin of log10 |activation| (edges in meta.json), and the heads most like it: by output
    # direction (cosine of w_o) and by firing at the same positions (Jaccard index) (hf_lorsa.analysis.head_statistics)
    "histogram": List(Value("int64")),
    "similar_direction": List(Value("int64")), "similar_direction_cosine": List(Value("float64")),
    "similar_cofiring": List(Value("int64")), "similar_cofiring_jaccard": List(Value("float64")),
    "promoted": List(Value("int64")), "promoted_logits": List(Value("float64")),
    "suppressed": List(Value("int64")), "suppressed_logits": List(Value("float64")),
    "promoted_tokens": List(Value("string")), "suppressed_tokens": List(Value("string")),
})  # fmt: skip


def save_analysis(dataset: Dataset, lorsa_dir: str | Path) -> Path:
    path = Path(lorsa_dir, ANALYSIS_DIR)
    path.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(path / "heads.parquet"))
    (path / "meta.json").write_text(dataset.info.description or "{}")
    return path


def load_analysis(lorsa_dir: str | Path, subfolder: str = "") -> Dataset | None:
    """The saved analysis of a Lorsa (local folder or Hub id), with its meta.json (tokens analysed, top_n) as
    the dataset's description, or None when there is none."""

    sub = f"{subfolder}/{ANALYSIS_DIR}" if subfolder else ANALYSIS_DIR
    try:
        heads = repo_file(lorsa_dir, "heads.parquet", sub)
        meta = repo_file(lorsa_dir, "meta.json", sub) if heads else None
    except (OSError, ValueError):  # no analysis published: the caller computes one
        return None
    if not heads:
        return None
    dataset = Dataset.from_parquet(heads)
    if dataset.features != HEAD_FEATURES:
        missing = sorted(set(HEAD_FEATURES) - set(dataset.features))
        raise ValueError(
            f"The analysis of {lorsa_dir} has other columns than this version of hf_lorsa reads"
            + (f" (missing {missing})" if missing else "")
            + "; run `hf-lorsa analyze --overwrite` again."
        )
    if meta:
        dataset.info.description = Path(meta).read_text()
    return dataset


def push_analysis(lorsa_dir: str | Path, repo_id: str, subfolder: str = "", token: str | None = None):
    """Upload the analysis folder next to a pushed Lorsa, with huggingface_hub."""
    from huggingface_hub import HfApi

    target = f"{subfolder}/{ANALYSIS_DIR}" if subfolder else ANALYSIS_DIR
    return HfApi(token=token).upload_folder(
        repo_id=repo_id, folder_path=str(Path(lorsa_dir, ANALYSIS_DIR)), path_in_repo=target
    )
