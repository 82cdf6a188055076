"""One way to open a Lorsa with its host model and its text, for evaluate, analyze and the inspector Space.

Options the user leaves out come from the Lorsa's own training run (recorded in its config): the host is
its base model, the text is the run's held-out data, the context is the run's context length.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..base.locations import looks_like_a_path, resolved, resolved_files
from ..base.usage import DTYPES, UsageError, check_int, check_model_name, check_writable_dir, require
from ..embedded import model_location, text_location
from ..model import hub
from ..model.configuration_lorsa import LorsaConfig
from ..model.modeling_lorsa import LorsaModel
from .activations import load_text, pack, split_holdout

logger = logging.getLogger(__name__)


@dataclass
class LorsaSourceArguments:
    """Which Lorsa, which host, which text."""

    lorsa: str = field(metadata={"help": "Lorsa folder or Hub id (required)"})
    subfolder: str = field(default="", metadata={"help": "subfolder of the Lorsa repository (one layer of a release)"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "host model (None: the Lorsa's recorded base model)"}
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file of the host in --model_name_or_path (None: the recorded one)"}
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "Hub dataset or local .jsonl/.txt/.parquet files (None: the training run's held-out data)"},
    )
    text_column: str | None = field(default=None, metadata={"help": "text column (None: the run's, else 'text')"})
    split: str | None = field(default=None, metadata={"help": "split of a Hub dataset (None: the run's)"})
    holdout_fraction: float | None = field(
        default=None, metadata={"help": "use the last fraction of local documents (None: the run's)"}
    )
    context_length: int | None = field(default=None, metadata={"help": "tokens per window (None: the run's, else 256)"})
    max_tokens: int = field(default=200_000, metadata={"help": "token budget"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass"})
    torch_dtype: str = field(default="float32", metadata={"help": "host dtype: float32, bfloat16 or float16"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1, ... (None: cuda when available)"})
    strict: bool = field(
        default=True, metadata={"help": "refuse a host other than the one the Lorsa was made from (--no_strict)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace earlier results at the output"})

    def __post_init__(self):
        require(isinstance(self.lorsa, str) and self.lorsa.strip() != "", "--lorsa is required.")
        local = Path(self.lorsa).expanduser()
        require(local.exists() or not looks_like_a_path(self.lorsa), f"--lorsa {self.lorsa}: no such folder.")
        if self.model_name_or_path is not None:
            check_model_name(self.model_name_or_path)
        self.model_name_or_path, self.dataset = resolved(self.model_name_or_path), resolved_files(self.dataset)
        if self.holdout_fraction is not None:
            ok = isinstance(self.holdout_fraction, (int, float)) and 0 <= self.holdout_fraction < 1
            require(ok, f"--holdout_fraction must be in [0, 1), got {self.holdout_fraction!r}.")
        check_int("context_length", self.context_length, optional=True)
        check_int("max_tokens", self.max_tokens)
        check_int("batch_size", self.batch_size)
        require(self.torch_dtype in DTYPES[1:], f"--torch_dtype must be one of {DTYPES[1:]}, got {self.torch_dtype!r}.")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(self.device)
        except RuntimeError as err:
            raise UsageError(f"--device {self.device!r} is not a device (cpu, cuda, cuda:1, ...).") from err
        if device.type == "cuda":
            require(
                torch.cuda.is_available(), f"--device {self.device}: this machine has no CUDA GPU; use --device cpu."
            )
            require(device.index is None or device.index < torch.cuda.device_count(),
                    f"--device {self.device}: this machine has {torch.cuda.device_count()} GPUs.")  # fmt: skip

    @property
    def lorsa_dir(self) -> Path:
        return Path(self.lorsa, self.subfolder)

    def output_path(self, output: str | None, default_name: str) -> Path:
        """Where results go: `output`, else beside a local Lorsa; refused when it would replace earlier
        results without --overwrite. Checked before anything is loaded."""
        if output is None:
            require(
                self.lorsa_dir.is_dir(),
                f"--lorsa {self.lorsa}: there is no such local folder (as a Hub id, its results need --output FILE).",
            )
            path = self.lorsa_dir / default_name
        else:
            path = Path(output)
        check_writable_dir(path.parent, "output")
        require(
            self.overwrite or not path.exists(),
            f"{path} already exists (earlier results); pass --overwrite to replace it, or --output elsewhere.",
        )
        return path


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


def open_lorsa_source(args: LorsaSourceArguments) -> Opened:
    """Everything evaluate and analyze read, checked before anything expensive: the Lorsa's config (no weights)
    resolves the defaults, the text is read (its problems surface before any model loads), then the models."""

    config = LorsaConfig.from_dict(hub.check_lorsa_config(args.lorsa, {"subfolder": args.subfolder}))
    source = data_source(args, config)
    text = load_text(source.dataset, source.text_column, split=source.split)
    if source.holdout_fraction:
        text = split_holdout(text, source.holdout_fraction)[1]
    lorsa, host, tokenizer = load_lorsa_and_host(
        args.lorsa, args.subfolder, args.model_name_or_path, args.torch_dtype, args.device, args.gguf_file
    )
    windows = pack(text, tokenizer, source.context_length, source.text_column, lorsa.config.document_separator)
    return Opened(lorsa, host, tokenizer, windows, source)


def open_lorsas(args: LorsaSourceArguments, subfolders: list[str]) -> tuple[Opened, list]:
    """`open_lorsa_source` for the first of `subfolders` (of --lorsa), and the Lorsas of all of them: the host and
    the text are read once for every layer of a release."""

    opened = open_lorsa_source(dataclasses.replace(args, subfolder=subfolders[0]))
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
                        open_host_and_tokenizer=None):  # fmt: skip
    """The Lorsa, its host model (default: the recorded base model, from its recorded GGUF file if any) and the
    host's tokenizer. `open_host_and_tokenizer(name, gguf_file, torch_dtype, device)` may replace the opening of
    the host (the Space shares one host between the layers of a release)."""

    model = LorsaModel.from_pretrained(lorsa, subfolder=subfolder)
    host_name = model_name_or_path or model.config.base_model_name_or_path
    require(bool(host_name), "This Lorsa records no base model; pass --model_name_or_path.")
    if not model_name_or_path:
        check_model_name(host_name, option="model_name_or_path (the Lorsa's recorded base model)")
        gguf_file = gguf_file or model.config.base_model_gguf_file
    check_gguf_file(host_name, gguf_file)
    host, tokenizer = (open_host_and_tokenizer or host_and_tokenizer)(host_name, gguf_file, torch_dtype, device)
    return model.to(device).eval(), host, tokenizer


def host_and_tokenizer(name: str, gguf_file: str | None, torch_dtype: str, device: str):
    """The host in eval mode on `device`, and its tokenizer."""
    tokenizer = open_tokenizer(name, gguf_file)
    return open_host(name, gguf_file, torch_dtype).to(device).eval(), tokenizer


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
              device_map: str | None = None, trust_remote_code: bool = False):  # fmt: skip
    """The host causal LM, frozen, in eval mode; from a GGUF file through transformers' own GGUF support
    (dequantised to `torch_dtype`) when `gguf_file` is given."""
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    host = AutoModelForCausalLM.from_pretrained(
        model_location(model_name_or_path), dtype=getattr(torch, torch_dtype), device_map=device_map,
        trust_remote_code=trust_remote_code, **kwargs,
    )  # fmt: skip
    host.requires_grad_(False)
    return host.eval()


def warn_if_short(read: int, asked: int, option: str = "--max_tokens") -> None:
    """Say when the text held fewer tokens than the budget `option` asked for."""
    if read < asked:
        logger.warning("Only %d tokens of text were available, fewer than %s %d.", read, option, asked)
