"""Text -> token windows -> (attention input, attention output) pairs, with an optional disk cache.

Axes: N windows, B batch, T positions (context_length), D d_model.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, IterableDataset, load_dataset
from datasets.exceptions import DatasetGenerationError
from safetensors import safe_open
from safetensors.torch import save_file

from ..base.locations import looks_like_a_path, nearest_existing
from ..base.writing import write_atomically
from ..embedded import text_location
from ..host.attention_mask import counted_positions
from ..host.families import host_config
from ..host.hooks import collect_layers, collect_to_cpu

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


def load_text(spec: str, text_column: str = "text", split: str = "train", streaming: bool | None = None):
    """A text dataset from local files (comma-separated .jsonl/.json/.txt/.parquet) or a Hub name (streamed).

    Raises before any model is loaded when files are missing, empty, of an unknown format, or lack the column.
    `hf_lorsa:stories260K` is the package's own corpus (`hf_lorsa.embedded`).
    """
    paths = [Path(p).expanduser() for p in text_location(spec).split(",")]
    local = all(p.suffix in LOCAL_FORMATS for p in paths) or any(p.exists() for p in paths) or looks_like_a_path(spec)
    if local:
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"Dataset file {p} does not exist.")
            if p.suffix not in LOCAL_FORMATS:
                raise ValueError(f"Unknown dataset file type {p.suffix!r}; use one of {sorted(LOCAL_FORMATS)}.")
            if p.stat().st_size == 0:
                raise ValueError(f"Dataset file {p} is empty.")
            if p.suffix != ".parquet":
                check_utf8(p)
        formats = {LOCAL_FORMATS[p.suffix] for p in paths}
        if len(formats) > 1:
            raise ValueError(f"Dataset files mix formats {sorted(formats)}; pass files of one type.")
        kind = formats.pop()
        try:
            dataset = load_dataset(kind, data_files=[str(p) for p in paths], split="train", streaming=bool(streaming))
        except (DatasetGenerationError, UnicodeDecodeError, ValueError) as err:
            cause = err.__cause__ or err
            raise ValueError(
                f"Could not read {spec} as {kind} ({type(cause).__name__}: {str(cause)[:300]}). Files must be UTF-8 "
                "text; a .jsonl file holds one JSON object per line."
            ) from err
    else:
        dataset = load_dataset(spec, split=split, streaming=True if streaming is None else streaming)
    columns = dataset.column_names or list(next(iter(dataset)).keys())
    if text_column not in columns:
        raise ValueError(f"Dataset {spec} has no column {text_column!r} (columns: {columns}); set --text_column.")
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"Dataset {spec} has no rows.")
    feature = (dataset.features or {}).get(text_column)
    if feature is not None and getattr(feature, "dtype", "string") not in ("string", "large_string", "null"):
        raise ValueError(f"Column {text_column!r} of {spec} holds {feature.dtype} values, not text; set --text_column.")
    return dataset


def check_utf8(path: Path, chunk: int = 1 << 24) -> None:
    """Text files must be UTF-8 (reading them once is cheap next to tokenizing them)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"Dataset file {path} is not UTF-8 text (byte {offset + err.start}: {err.reason}); convert it to "
                    "UTF-8 first."
                ) from None
            offset += len(block)


def split_holdout(dataset, fraction: float):
    """(train, held-out) with the last `fraction` of the documents held out (map-style datasets only)."""
    if not fraction:
        return dataset, None
    if not isinstance(dataset, Dataset):
        raise ValueError("A held-out fraction needs a local (map-style) dataset; pass --eval_dataset for Hub data.")
    n_eval = max(1, int(len(dataset) * fraction))
    return dataset.select(range(len(dataset) - n_eval)), dataset.select(range(len(dataset) - n_eval, len(dataset)))


def pack(dataset, tokenizer, context_length: int, text_column: str = "text", separator: int | None = None,
         batch_size: int = 1000):  # fmt: skip
    """Tokenize documents and cut the concatenated stream into windows of exactly `context_length` tokens (a
    last partial one is dropped). Each document starts with `separator` (`document_separator`), or, when it is
    None, with what the tokenizer adds itself (its BOS).
    """

    def tokenize_and_cut(batch, indices):
        for text, index in zip(batch[text_column], indices):
            if not isinstance(text, str):
                raise ValueError(f"Row {index} of the dataset has {text!r} in column {text_column!r}, not text.")
        stream = []
        for ids in tokenizer(batch[text_column], add_special_tokens=separator is None).input_ids:
            if separator is not None:
                stream.append(separator)
            stream.extend(ids)
        n = len(stream) // context_length
        return {"input_ids": [stream[i * context_length : (i + 1) * context_length] for i in range(n)]}

    kwargs = {} if isinstance(dataset, IterableDataset) else {"desc": "Tokenizing"}
    return dataset.map(
        tokenize_and_cut, batched=True, with_indices=True, batch_size=batch_size, remove_columns=dataset.column_names,
        **kwargs,
    )  # fmt: skip


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts every text with its BOS token (Llama, Gemma; not GPT-2, Qwen, SmolLM2)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True).input_ids[:1] == [bos]


def document_separator(tokenizer, option: str | None = None) -> int | None:
    """The token that starts each document, following the host's convention: None when its tokenizer adds a
    BOS itself, else its EOS (the end-of-text token GPT-2, Qwen and SmolLM2 put between documents), or the
    token `option` names (a token string or an id: `--document_separator`)."""
    if option is not None:
        vocab = tokenizer.get_vocab()
        if option in vocab:
            return vocab[option]
        if option.strip().isdigit() and int(option) < len(tokenizer):
            return int(option)
        raise ValueError(
            f"--document_separator {option!r} is neither a token of this tokenizer nor a token id below "
            f"{len(tokenizer)}; give e.g. {tokenizer.eos_token!r} or its id."
        )
    if adds_bos(tokenizer):
        return None
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id


def skip_tokens(tokenizer, separator: int | None = None) -> list[int]:
    """Tokens whose positions are excluded from training and evaluation: BOS, the document separator, padding."""
    return sorted({t for t in (tokenizer.bos_token_id, tokenizer.pad_token_id, separator) if t is not None})


def norm_factors(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Factors that bring the average L2 norm of x and y (at counted positions) to sqrt(d_model)."""
    d = x.shape[-1]
    return (d**0.5 / x[mask].float().norm(dim=-1).mean().item(), d**0.5 / y[mask].float().norm(dim=-1).mean().item())


# ---- disk cache ---------------------------------------------------------------------------------------


@dataclass
class CacheKey:
    """What a cache of activations was computed from; a cache is reused only when all of it matches."""

    model: str
    layers: list[int]
    dataset: str
    text_column: str
    context_length: int
    dtype: str
    n_windows: int
    seed: int
    document_separator: int | None = None

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:16]


class ActivationCache(torch.utils.data.Dataset):
    """Windows of input_ids and, for each cached layer L, `hidden_states.L` and `attention_output.L` (the attention's
    input and output), stored as safetensors shards in a folder with `cache.json` naming what they were made from: one
    host pass serves any number of Lorsas of those layers, of any size. Each item is read from its shard on demand, so
    a shuffled order reads across shards."""

    def __init__(self, directory: str | Path, layers: list[int] | None = None):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "cache.json").read_text())
        self.shard_size = self.meta["shard_size"]
        read = self.meta["key"]["layers"] if layers is None else layers  # of the layers cached, those asked for
        self.names = [
            "input_ids",
            *(f"{kind}.{layer}" for layer in read for kind in ("hidden_states", "attention_output")),
        ]

    def __len__(self) -> int:
        return self.meta["n_windows"]

    def __getitem__(self, index: int) -> dict:
        shard, row = divmod(index, self.shard_size)
        with safe_open(self.directory / f"shard-{shard:05d}.safetensors", framework="pt") as f:
            return {name: f.get_slice(name)[row : row + 1][0] for name in self.names}

    @staticmethod
    def check(directory: str | Path, key: CacheKey) -> bool:
        """True when a complete cache for `key` is there (a cache of more layers serves any of them); raise when the
        folder holds a cache made from another host, other data or other layers."""
        meta_path = Path(directory) / "cache.json"
        if not meta_path.exists():
            return False
        cached = json.loads(meta_path.read_text()).get("key", {})
        differs = {k: (cached.get(k), v) for k, v in key.__dict__.items() if k != "layers" and cached.get(k) != v}
        missing = sorted(set(key.layers) - set(cached.get("layers") or []))
        if missing:
            differs["layers"] = (cached.get("layers", cached.get("layer")), key.layers)
        if differs:
            raise ValueError(
                f"The activation cache at {directory} was made for other settings {differs} (cached, requested); "
                "use another --activation_cache folder or delete this one."
            )
        return True

    @staticmethod
    def size(key: CacheKey, d_model: int) -> int:
        """Bytes the cache of `key` takes on disk: per position its token id and two d_model vectors per layer."""
        per_value = torch.empty(0, dtype=getattr(torch, key.dtype.removeprefix("torch."))).element_size()
        return key.n_windows * key.context_length * (8 + 2 * d_model * per_value * len(key.layers))

    @staticmethod
    def build(directory, key: CacheKey, model, windows, batch_size: int, shard_size: int = 256, process: int = 0,
              processes: int = 1, barrier=None) -> None:  # fmt: skip
        """Run the host on every window once (up to the deepest layer) and write the shards, then cache.json last.
        With several processes, each writes every `processes`-th shard from its `process`, and the first writes
        cache.json once all are done (`barrier()` waits for all). Refused before the host runs when the disk cannot
        hold it; a write that fails anyway removes every shard this process wrote."""
        directory = Path(directory)
        needed, where = ActivationCache.size(key, host_config(model).hidden_size), nearest_existing(directory)
        free = shutil.disk_usage(where).free
        if needed >= free:
            raise ValueError(f"The activation cache needs {needed / 2**30:.2f} GiB and {where} has {free / 2**30:.2f} "
                             "GiB free; free some space, choose another --activation_cache folder, or train without "
                             "one.")  # fmt: skip
        made = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        shard, count, mine = 0, 0, []
        try:
            for chunk in batches(windows, shard_size):
                if shard % processes == process:
                    parts = [collect_layers_to_cpu(model, key.layers, ids) for ids in chunk.split(batch_size)]
                    tensors = {name: torch.cat([p[name] for p in parts]).contiguous() for name in parts[0]}
                    mine.append(directory / f"shard-{shard:05d}.safetensors")
                    save_file(tensors, mine[-1])
                shard, count = shard + 1, count + len(chunk)
        except OSError as err:
            for written in mine:
                written.unlink(missing_ok=True)
            if made and not any(directory.iterdir()):
                shutil.rmtree(directory, ignore_errors=True)
            raise OSError(f"Writing the activation cache in {directory} failed ({err.strerror or err}); nothing of it "
                          "was kept. Free some space or choose another --activation_cache folder.") from err  # fmt: skip
        if barrier is not None:
            barrier()  # every shard is written
        if process == 0:
            meta = {"key": key.__dict__, "n_windows": count, "shard_size": shard_size}
            write_atomically(directory / "cache.json", json.dumps(meta, indent=2))
        if barrier is not None:
            barrier()  # cache.json is there for every process


def collect_layers_to_cpu(model, layers: list[int], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One host pass over a batch: `input_ids` and each layer's `hidden_states.L`, `attention_output.L`, on the CPU."""
    records = collect_layers(model, layers, input_ids=input_ids)
    tensors = {"input_ids": input_ids.cpu()}
    for layer, record in records.items():
        tensors[f"hidden_states.{layer}"] = record.hidden_states.cpu()
        tensors[f"attention_output.{layer}"] = record.attention_output.cpu()
    return tensors


def batches(windows, size: int, max_tokens: int | None = None) -> Iterator[torch.Tensor]:
    """(size, T) tensors of input_ids from a dataset of windows; with `max_tokens`, stop after the batch
    that reaches that many tokens."""
    rows, seen = [], 0
    for row in windows:
        rows.append(torch.as_tensor(row["input_ids"]))
        if len(rows) == size:
            batch, rows = torch.stack(rows), []
            yield batch
            seen += batch.numel()
            if max_tokens is not None and seen >= max_tokens:
                return
    if rows:
        yield torch.stack(rows)


def activation_sample(host, layer: int, windows, batch_size: int, n_batches: int, skip: list[int]):
    """(x, y, counted) of the first `n_batches` batches, on the CPU: what the normalisation factors and the
    initial calibration are estimated from."""
    xs, ys, masks = [], [], []
    for i, ids in enumerate(batches(windows, batch_size)):
        if i == n_batches:
            break
        acts = collect_to_cpu(host, layer, ids)
        xs.append(acts["hidden_states"])
        ys.append(acts["attention_output"])
        masks.append(counted_positions(ids, skip))
    if not xs:
        raise ValueError("The dataset gave no full window; use more text or a shorter --context_length.")
    return torch.cat(xs), torch.cat(ys), torch.cat(masks)


def cached_activations(directory, key: CacheKey, host, windows, batch_size: int, process: int = 0, processes: int = 1,
                       barrier=None) -> ActivationCache:  # fmt: skip
    """The activation cache in `directory`: reused when it was made for `key`, else built once from the first
    `key.n_windows` windows, by the `processes` processes together (`ActivationCache.build`)."""
    if not ActivationCache.check(directory, key):  # no process writes cache.json before every one has checked
        limited = windows.take(key.n_windows) if not hasattr(windows, "__len__") else windows
        ActivationCache.build(directory, key, host, limited, batch_size, process=process, processes=processes,
                              barrier=barrier)  # fmt: skip
    return ActivationCache(directory, key.layers)
