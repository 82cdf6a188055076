"""One way to open a Lorsa with its host model and its text, for evaluate, analyze and the inspector Space.

Options the user leaves out come from the Lorsa's own training run (recorded in its config): the host is
its base model, the text is the run's held-out data, the context is the run's context length.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..base.usage import check_model_name, require
from ..embedded import model_location, text_location
from ..host.families import text_config, truncated_config
from ..model import hub
from ..model.configuration_lorsa import LorsaConfig
from ..model.modeling_lorsa import LorsaModel
from .activations import load_text, pack, split_holdout
from .source_arguments import LorsaSourceArguments

logger = logging.getLogger(__name__)


@dataclass
class DataSource:
    """The text to read, resolved from the options and the Lorsa's training run."""

    dataset: str
    text_column: str
    split: str
    holdout_fraction: float
    context_length: int

    def describe(self) -> dict:
        described = {"dataset": self.dataset}
        if self.holdout_fraction:
            described["dataset_split"] = f"last {self.holdout_fraction:g} of the documents"
        elif not Path(text_location(self.dataset).split(",")[0]).exists():
            described["dataset_split"] = self.split
        return described


@dataclass
class Opened:
    """A Lorsa with its host, the host's tokenizer, and the token windows to read."""

    lorsa: object
    host: object
    tokenizer: object
    windows: object
    source: DataSource


def open_lorsa_source(args: LorsaSourceArguments, up_to_layer: int | None = None) -> Opened:
    """Everything evaluate and analyze read, checked before anything expensive: the Lorsa's config (no weights)
    resolves the defaults, the text is read (its problems surface before any model loads), then the models (the
    host only up to `up_to_layer` when given: `open_host`)."""

    config = LorsaConfig.from_dict(hub.check_lorsa_config(args.lorsa, {"subfolder": args.subfolder}))
    source = data_source(args, config)
    text = load_text(source.dataset, source.text_column, split=source.split)
    if source.holdout_fraction:
        text = split_holdout(text, source.holdout_fraction)[1]
    lorsa, host, tokenizer = load_lorsa_and_host(
        args.lorsa, args.subfolder, args.model_name_or_path, args.torch_dtype, args.device, args.gguf_file,
        up_to_layer=up_to_layer, placement=args.placement,
    )  # fmt: skip
    windows = pack(text, tokenizer, source.context_length, source.text_column, lorsa.config.document_separator)
    return Opened(lorsa, host, tokenizer, windows, source)


def open_lorsas(args: LorsaSourceArguments, subfolders: list[str], layers_only: bool = False) -> tuple[Opened, list]:
    """`open_lorsa_source` for the first of `subfolders` (of --lorsa), and the Lorsas of all of them: the host and
    the text are read once for every layer of a release. `layers_only`: the job reads nothing of the host above
    the Lorsas' layers (analysis), so the blocks above the deepest are not loaded."""

    deepest = None
    if layers_only:
        deepest = max(hub.check_lorsa_config(args.lorsa, {"subfolder": s})["layer"] for s in subfolders)
    opened = open_lorsa_source(dataclasses.replace(args, subfolder=subfolders[0]), deepest)
    rest = [LorsaModel.from_pretrained(args.lorsa, subfolder=s).to(args.device).eval() for s in subfolders[1:]]
    return opened, [opened.lorsa, *rest]


def data_source(args: LorsaSourceArguments, config) -> DataSource:
    """--dataset and friends, or the held-out data of the run that trained the Lorsa."""
    run = config.training_args or {}
    context = args.context_length or run.get("context_length") or 256
    require(
        context <= config.max_position_embeddings,
        f"--context_length {context} exceeds the {config.max_position_embeddings} positions this Lorsa supports.",
    )
    column = args.text_column or run.get("text_column") or "text"
    if args.dataset is not None:
        return DataSource(args.dataset, column, args.split or "validation", args.holdout_fraction or 0.0, context)
    if run.get("eval_dataset"):
        return DataSource(run["eval_dataset"], column, args.split or run.get("eval_split", "validation"), 0.0, context)
    fraction = args.holdout_fraction if args.holdout_fraction is not None else run.get("holdout_fraction") or 0.0
    require(
        bool(run.get("dataset")) and fraction > 0,
        "This Lorsa's training run held out no data (no --eval_dataset or --holdout_fraction); pass --dataset.",
    )
    return DataSource(run["dataset"], column, args.split or "validation", fraction, context)


def load_lorsa_and_host(lorsa: str, subfolder: str = "", model_name_or_path: str | None = None,
                        torch_dtype: str = "float32", device: str = "cpu", gguf_file: str | None = None,
                        open_host_and_tokenizer=None, up_to_layer: int | None = None,
                        placement: dict | None = None):  # fmt: skip
    """The Lorsa, its host model (default: the recorded base model, from its recorded GGUF file if any; only up to
    `up_to_layer` when given; spread or offloaded by `placement`: `base.placement`) and the host's tokenizer. `open_host_and_tokenizer(name, gguf_file, torch_dtype,
    device)` may replace the opening of the host (the Space shares one host between the layers of a release)."""

    model = LorsaModel.from_pretrained(lorsa, subfolder=subfolder)
    host_name = model_name_or_path or model.config.base_model_name_or_path
    require(bool(host_name), "This Lorsa records no base model; pass --model_name_or_path.")
    if not model_name_or_path:
        check_model_name(host_name, option="model_name_or_path (the Lorsa's recorded base model)")
        gguf_file = gguf_file or model.config.base_model_gguf_file
    check_gguf_file(host_name, gguf_file)
    if open_host_and_tokenizer is None:
        host, tokenizer = host_and_tokenizer(host_name, gguf_file, torch_dtype, device, up_to_layer, placement)
    else:
        host, tokenizer = open_host_and_tokenizer(host_name, gguf_file, torch_dtype, device)
    return model.to(device).eval(), host, tokenizer


def host_and_tokenizer(name: str, gguf_file: str | None, torch_dtype: str, device: str,
                       up_to_layer: int | None = None, placement: dict | None = None):  # fmt: skip
    """The host in eval mode on `device`, or where `placement` (`base.placement`) puts it (only up to `up_to_layer`
    when given: `open_host`), and its tokenizer."""
    tokenizer = open_tokenizer(name, gguf_file)
    placement = placement or {}
    host = open_host(name, gguf_file, torch_dtype, up_to_layer=up_to_layer, **placement)
    return (host if placement else host.to(device)).eval(), tokenizer


def check_gguf_file(model_name_or_path: str, gguf_file: str | None) -> None:
    """A GGUF host needs the `gguf` package, and a local folder must hold the file."""
    if gguf_file is None:
        return
    import importlib.util

    require(
        importlib.util.find_spec("gguf") is not None,
        f"--gguf_file {gguf_file}: reading GGUF files needs the gguf package: pip install 'hf_lorsa[gguf]'.",
    )
    folder = Path(model_name_or_path).expanduser()
    if folder.is_dir():
        require((folder / gguf_file).is_file(), f"--gguf_file {gguf_file}: no such file in {folder}.")


def open_tokenizer(model_name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(
        model_location(model_name_or_path), trust_remote_code=trust_remote_code, **kwargs
    )


def open_host(model_name_or_path: str, gguf_file: str | None = None, torch_dtype: str = "float32",
              device_map: str | None = None, trust_remote_code: bool = False, up_to_layer: int | None = None,
              max_memory: dict | None = None, offload_folder: str | None = None):  # fmt: skip
    """The host causal LM, frozen, in eval mode; from a GGUF file through transformers' own GGUF support
    (dequantised to `torch_dtype`) when `gguf_file` is given. With `up_to_layer`, only the blocks up to that layer
    (and the embeddings, final norm and unembedding): for a job that reads no layer above it. `device_map`,
    `max_memory` and `offload_folder` are accelerate's big-model loading (`base.placement`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if up_to_layer is not None:
        config = AutoConfig.from_pretrained(model_location(model_name_or_path), trust_remote_code=trust_remote_code,
                                            **kwargs)  # fmt: skip
        kwargs["config"] = truncated_config(config, up_to_layer + 1)
        full = text_config(config).num_hidden_layers
        if up_to_layer + 1 < full:
            logger.info("Loading the host's blocks 0-%d of %d: this job reads none above layer %d.", up_to_layer,
                        full, up_to_layer)  # fmt: skip
    host = AutoModelForCausalLM.from_pretrained(
        model_location(model_name_or_path), dtype=getattr(torch, torch_dtype), device_map=device_map,
        max_memory=max_memory, offload_folder=offload_folder, trust_remote_code=trust_remote_code, **kwargs,
    )  # fmt: skip
    check_offloaded_weights_found(host)
    host.requires_grad_(False)
    return host.eval()


def check_offloaded_weights_found(host) -> None:
    """Refuse a host whose offloaded weights accelerate cannot find again: a tied unembedding sent to disk with its
    embeddings (a GGUF host such as SmolLM2) is missing from the offload index, and the first forward pass would
    fail deep inside accelerate."""
    for name, module in host.named_modules():
        hook = getattr(module, "_hf_hook", None)
        stored = getattr(getattr(hook, "weights_map", None), "dataset", None)
        if not getattr(hook, "offload", False) or not hasattr(stored, "all_keys"):
            continue
        keys, prefix = set(stored.all_keys), hook.weights_map.prefix
        for weight, value in module.named_parameters(recurse=False):
            if prefix + weight not in keys:
                size = value.numel() * value.element_size()
                raise ValueError(
                    f"--max_memory sent {name}.{weight} to disk, where accelerate cannot find it again (the host ties "
                    f"it to its embeddings); give the CPU (or a GPU) at least {size / 2**20:.0f} MiB more in "
                    "--max_memory, so that the embeddings stay in memory."
                )


def warn_if_short(read: int, asked: int, option: str = "--max_tokens") -> None:
    """Say when the text held fewer tokens than the budget `option` asked for."""
    if read < asked:
        logger.warning("Only %d tokens of text were available, fewer than %s %d.", read, option, asked)
