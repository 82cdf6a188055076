"""The options of `hf-lorsa train`: three dataclasses, each checked when it is built (whether from the command line,
a YAML/JSON file or `train_lorsa(**options)`, so that bad input fails before anything loads), and the run signature.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments

from ..base.locations import resolved, resolved_files
from ..base.parser_snapshot import unrecognized
from ..base.placement import DEVICE_MAP_HELP, MAX_MEMORY_HELP, OFFLOAD_HELP, check_placement
from ..base.usage import (
    UsageError,
    check_float,
    check_int,
    check_layer_options,
    check_model_name,
    check_writable_dir,
    parse_layers,
    require,
)
from ..embedded import STORIES
from ..model.configuration_lorsa import ACT_FNS
from .head_balance import MAX_FREQUENCY

DEFAULT_CONTEXT = 256  # tokens per window unless the host has fewer positions (host_checks.check_against_host)
DTYPES = ("auto", "float32", "bfloat16", "float16")
INITS = ("host", "host_even", "random")


@dataclass
class LorsaArguments:
    """The host layer and the Lorsa's sizes and recipe."""

    _argument_group_name = "the host and the Lorsa"

    model_name_or_path: str = field(
        metadata={"help": f"host causal LM: Hub id, local folder, or {STORIES} (embedded) (required)"}
    )
    layer: int | None = field(
        default=None, metadata={"help": "index of the layer whose attention is replaced (or give --layers)"}
    )
    layers: str | None = field(
        default=None, metadata={"help": "several layers from one host pass: 2,4,6 or 0-29:3 or all; in OUTPUT/layer{L}"}
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "host GGUF file in --model_name_or_path (pip install 'hf_lorsa[gguf]')"}
    )
    expansion_factor: int | None = field(default=8, metadata={"help": "n_ov_heads = expansion_factor * d_model"})
    n_ov_heads: int | None = field(default=None, metadata={"help": "dictionary size (overrides expansion_factor)"})
    n_qk_heads: int | None = field(default=None, metadata={"help": "QK heads (None: n_ov_heads / head_dim)"})
    top_k: int = field(default=16, metadata={"help": "active OV heads per position"})
    topk_rule: str = field(
        default="relu", metadata={"help": "rank heads by ReLU(z) ('relu', the authors' rule) or |z| ('abs')"}
    )
    act_fn: str = field(default="batchtopk", metadata={"help": "batchtopk (K on average) or topk (K per position)"})
    init: str = field(default="host", metadata={"help": "host (the layer's heads), host_even (evenly shared), random"})
    k_anneal_start: int | None = field(default=None, metadata={"help": "K at step 0 (None: n_ov_heads)"})
    k_anneal_fraction: float = field(default=0.05, metadata={"help": "fraction of training spent annealing K"})
    aux_k: int | None = field(default=None, metadata={"help": "dead heads used by AuxK (None: d_model / 2)"})
    aux_k_coef: float = field(default=1 / 32, metadata={"help": "weight of the AuxK loss (0 turns it off)"})
    dead_tokens: int | None = field(default=None, metadata={"help": "heads silent this long are dead (None: by rule)"})
    revive_dead_heads: bool = field(
        default=True, metadata={"help": "raise the value bias of dead heads until they fire (every dead_tokens / 3)"}
    )
    rare_head_tokens: int | None = field(
        default=None, metadata={"help": "lower a head's threshold while silent this long (None: by rule; 0: never)"}
    )
    max_head_frequency: float = field(
        default=MAX_FREQUENCY, metadata={"help": "raise a head's threshold while it fires on more positions (1: never)"}
    )
    stop_on_collapse: bool = field(
        default=True,
        metadata={
            "help": "stop when the training FVU comes apart, keeping the best weights (hf_lorsa.training.collapse_guard)"
        },
    )
    norm_ratio: float = field(default=4.0, metadata={"help": "start each head at ||w_v|| / ||w_o|| = this (0: off)"})
    torch_dtype: str = field(default="auto", metadata={"help": "host dtype: auto (bf16 on GPU), float32, ..."})
    device_map: str | None = field(default=None, metadata={"help": DEVICE_MAP_HELP})
    max_memory: str | None = field(default=None, metadata={"help": MAX_MEMORY_HELP})
    offload_folder: str | None = field(default=None, metadata={"help": OFFLOAD_HELP})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the host's own code (off)"})

    def __post_init__(self):
        check_model_name(self.model_name_or_path)
        check_placement(self.device_map, self.max_memory, self.offload_folder)
        self.model_name_or_path = resolved(self.model_name_or_path)  # recorded with the Lorsa: valid from anywhere

        check_layer_options(self.layer, self.layers)
        check_int("expansion_factor", self.expansion_factor, optional=True)
        check_int("n_ov_heads", self.n_ov_heads, optional=True)
        require(self.expansion_factor or self.n_ov_heads, "Give --expansion_factor or --n_ov_heads.")
        check_int("n_qk_heads", self.n_qk_heads, optional=True)
        check_int("top_k", self.top_k)
        require(self.topk_rule in ("abs", "relu"), f"--topk_rule must be 'abs' or 'relu', got {self.topk_rule!r}.")
        require(self.act_fn in ACT_FNS, f"--act_fn must be one of {', '.join(ACT_FNS)}, got {self.act_fn!r}.")
        require(self.init in INITS, f"--init must be one of {', '.join(INITS)}, got {self.init!r}.")
        check_int("k_anneal_start", self.k_anneal_start, optional=True)
        if self.k_anneal_start is not None:
            require(self.k_anneal_start >= self.top_k, "--k_anneal_start must be at least --top_k.")
        check_float("k_anneal_fraction", self.k_anneal_fraction, 0.0, 1.0)
        check_int("aux_k", self.aux_k, optional=True)
        check_float("aux_k_coef", self.aux_k_coef, 0.0, 1e6)
        check_int("dead_tokens", self.dead_tokens, optional=True)
        check_int("rare_head_tokens", self.rare_head_tokens, optional=True, minimum=0)
        check_float("max_head_frequency", self.max_head_frequency, 0.0, 1.0, low_open=True)
        check_float("norm_ratio", self.norm_ratio, 0.0, 1e6)
        require(self.torch_dtype in DTYPES, f"--torch_dtype must be one of {DTYPES}, got {self.torch_dtype!r}.")

    def n_ov_for(self, d_model: int) -> int:
        return self.n_ov_heads or self.expansion_factor * d_model

    @property
    def several(self) -> bool:
        """Several layers (--layers): the output folder is a release of OUTPUT/layer{L} folders."""
        return self.layers is not None

    def layer_list(self, n_layers: int) -> list[int]:
        """The layers to train, in increasing order, checked against the host's depth."""

        return [self.layer] if self.layers is None else parse_layers(self.layers, n_layers)


@dataclass
class DataArguments:
    """Where the text comes from and how much of it."""

    _argument_group_name = "the data"

    dataset: str = field(
        metadata={"help": f"Hub dataset (streamed), local .jsonl/.txt/.parquet files, or {STORIES} (embedded stories)"}
    )
    text_column: str = field(default="text", metadata={"help": "column holding the text"})
    document_separator: str | None = field(
        default=None,
        metadata={"help": "token (or id) before each document (None: the tokenizer's BOS if it adds one, else EOS)"},
    )
    dataset_split: str = field(default="train", metadata={"help": "split of a Hub dataset"})
    streaming: bool = field(default=False, metadata={"help": "stream local files too (Hub data is always streamed)"})
    eval_dataset: str | None = field(
        default=None, metadata={"help": "held-out data (None: the --holdout_fraction end of --dataset)"}
    )
    eval_split: str = field(default="validation", metadata={"help": "split of --eval_dataset"})
    holdout_fraction: float = field(default=0.0, metadata={"help": "hold out the last fraction of local documents"})
    context_length: int | None = field(
        default=None,
        metadata={"help": f"tokens per window (None: {DEFAULT_CONTEXT}, or the host's positions if fewer)"},
    )
    max_tokens: int = field(default=100_000_000, metadata={"help": "training budget in tokens"})
    batch_size: int = field(default=4, metadata={"help": "sequences per device and step"})
    activation_cache: str | None = field(default=None, metadata={"help": "folder to store/reuse activations"})
    norm_batches: int = field(default=8, metadata={"help": "batches used to estimate normalisation factors"})
    eval_tokens: int = field(default=100_000, metadata={"help": "tokens per evaluation"})
    shuffle_buffer: int = field(default=10_000, metadata={"help": "windows in the shuffle buffer (streamed data)"})

    def __post_init__(self):
        require(isinstance(self.dataset, str) and self.dataset.strip() != "", "--dataset is required.")
        self.dataset, self.eval_dataset = resolved_files(self.dataset), resolved_files(self.eval_dataset)
        require(isinstance(self.text_column, str) and self.text_column != "", "--text_column must be a column name.")
        check_float("holdout_fraction", self.holdout_fraction, 0.0, 1.0, high_open=True)
        check_int("context_length", self.context_length, optional=True)
        for name in ("max_tokens", "batch_size", "norm_batches", "eval_tokens", "shuffle_buffer"):
            check_int(name, getattr(self, name))
        if self.activation_cache is not None:
            check_writable_dir(self.activation_cache, "activation_cache")


NOT_USED = {
    "num_train_epochs": "the training length is --max_tokens (tokens), optionally capped by --max_steps",
    "per_device_train_batch_size": "the batch is --batch_size (sequences per device and step)",
    "per_device_eval_batch_size": "the batch is --batch_size (sequences per device and step)",
}


@dataclass
class LorsaTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments with the Lorsa recipe's defaults."""

    output_dir: str = field(
        default="lorsa-output", metadata={"help": "where the Lorsa (or the release of --layers) is written"}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start over in the folder of an earlier run (its files are removed)"}
    )
    keep_checkpoints: bool = field(
        default=False, metadata={"help": "keep the checkpoint-* folders once the final Lorsa is saved"}
    )
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "peak learning rate (None: 4e-3 * sqrt(64 / d_model), see hf_lorsa.training.recipe)"},
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "learning-rate schedule after the warmup"})
    warmup_steps: float = field(default=0.02, metadata={"help": "warmup: steps, or a fraction of them below 1"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip each Lorsa's gradient to this norm"})
    adam_beta2: float = field(default=0.99, metadata={"help": "Adam's second-moment decay"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's weight decay"})
    logging_steps: float = field(default=10, metadata={"help": "steps between logs (and a log at least once a minute)"})
    logging_nan_inf_filter: bool = field(default=False)  # a non-finite loss stops the run; the filter synced each step
    save_steps: float = field(default=200, metadata={"help": "steps between checkpoints (a rerun resumes from one)"})
    save_total_limit: int | None = field(default=3, metadata={"help": "checkpoints kept while training"})
    remove_unused_columns: bool = field(default=False)
    report_to: str = field(
        default="tensorboard", metadata={"help": "comma-separated loggers: tensorboard, wandb, ..., all or none"}
    )
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (None: on when training on a GPU)"})
    max_steps: int = field(
        default=-1, metadata={"help": "stop after this many steps (-1: when --max_tokens are trained)"}
    )
    num_train_epochs: float | None = field(default=None, metadata={"help": f"not used: {NOT_USED['num_train_epochs']}"})
    per_device_train_batch_size: int | None = field(default=None, metadata={"help": "not used: see --batch_size"})
    per_device_eval_batch_size: int | None = field(default=None, metadata={"help": "not used: see --batch_size"})

    def __post_init__(self):
        for name, instead in NOT_USED.items():
            require(getattr(self, name) is None, f"--{name} is not used by hf-lorsa train: {instead}.")
        self.num_train_epochs, self.per_device_train_batch_size, self.per_device_eval_batch_size = 1.0, 1, 1
        if self.learning_rate is not None:
            check_float("learning_rate", self.learning_rate, 0.0, 1.0, low_open=True)
        check_int("max_steps", self.max_steps, minimum=-1)
        require(self.max_steps != 0, "--max_steps must be positive (or -1: no cap besides --max_tokens).")
        check_float("max_grad_norm", self.max_grad_norm, 0.0, 1e9)
        check_writable_dir(self.output_dir, "output_dir")
        if isinstance(self.report_to, str):
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()] or "none"
        check_loggers(self.report_to)
        require(self.save_steps > 0, f"--save_steps must be positive, got {self.save_steps!r}.")
        require(
            self.eval_steps is None or self.eval_steps > 0, f"--eval_steps must be positive, got {self.eval_steps!r}."
        )
        if self.bf16 is None:
            self.bf16 = bool(not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if not torch.cuda.is_available():  # nothing to pin to: torch would warn once per data loader
            self.dataloader_pin_memory = False
        if self.disable_tqdm is None:  # progress bars only on a terminal: no carriage-return floods in logs
            self.disable_tqdm = not sys.stderr.isatty()
        super().__post_init__()


def check_loggers(report_to) -> None:
    """Every logger of --report_to is installed (transformers would fail only once the host is loaded)."""
    from transformers.integrations import get_available_reporting_integrations

    asked = [] if report_to in ("none", None) else [report_to] if isinstance(report_to, str) else list(report_to)
    missing = [
        name for name in asked if name not in ("all", "none") and name not in get_available_reporting_integrations()
    ]
    require(not missing, f"--report_to {','.join(missing)}: not installed (pip install {' '.join(missing)}), or choose "
            "another logger (none: no logger).")  # fmt: skip


ARGUMENT_CLASSES = (LorsaArguments, DataArguments, LorsaTrainingArguments)
# The training options `hf-lorsa train --help` shows (the recipe's and those a run is steered with); the rest of
# transformers' TrainingArguments are listed by --help-all.
TRAINING_SHOWN = (
    "output_dir", "overwrite_output_dir", "keep_checkpoints", "resume_from_checkpoint", "learning_rate",
    "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta2", "max_grad_norm", "max_steps", "seed",
    "bf16", "eval_strategy", "eval_steps", "logging_steps", "save_steps", "save_total_limit", "report_to",
    "run_name", "use_cpu", "num_train_epochs", "per_device_train_batch_size",
)  # fmt: skip
HELP_OVERRIDES = {  # transformers' own text, where it does not describe what hf-lorsa train does
    "resume_from_checkpoint": "checkpoint folder to resume from (None: the newest in --output_dir, if any)",
    "seed": "random seed of the initialisation, the data order and the sampling",
    "use_cpu": "train on the CPU even when a GPU is there",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default, unless it is None (its help says what None means) or the help already gives it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser(show_all: bool = False) -> HfArgumentParser:
    """`hf-lorsa train`'s parser; its help groups the host and the Lorsa, the data, and the recipe's training
    options, and lists transformers' other TrainingArguments only with `show_all` (--help-all)."""
    built = HfArgumentParser(
        ARGUMENT_CLASSES, prog="hf-lorsa train", formatter_class=HelpFormatter,
        usage="hf-lorsa train --model_name_or_path M (--layer L | --layers LS) --dataset D [options]\n"
        "       hf-lorsa train OPTIONS.yaml",
        description="Train a Lorsa on one attention layer of a causal LM (--layers: one per layer). A single "
        ".yaml/.json argument is read as an options file. --help-all lists every transformers TrainingArguments "
        "option too.",
    )  # fmt: skip
    built.add_argument("--help-all", action="help", help="show every option, transformers' own included, and exit")
    training = built.add_argument_group("training (transformers TrainingArguments, with the recipe's defaults)")
    grouped = {a.dest for group in built._action_groups[2:] for a in group._group_actions}  # the Lorsa, the data
    for action in list(built._actions):
        if action.option_strings and action.option_strings[0].startswith("--no_"):  # HfArgumentParser's negation
            action.help = f"turn off --{action.option_strings[0][5:]}"
        if action.dest in grouped or action.dest in ("help", "help_all"):
            continue
        action.help = HELP_OVERRIDES.get(action.dest, action.help)
        if action.dest in TRAINING_SHOWN:
            for group in built._action_groups:
                if action in group._group_actions:
                    group._group_actions.remove(action)
            training._group_actions.append(action)
        elif not show_all:
            action.help = argparse.SUPPRESS
    return built


def parse(argv: list[str]) -> tuple[LorsaArguments, DataArguments, LorsaTrainingArguments]:
    """Options from a command line, or from one YAML/JSON file (its name is in any error)."""
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        return parse_file(argv[0])
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        return parse_file(argv[0], argv[1:])  # the file's options, the command line's over them
    return read(parser(show_all="--help-all" in argv), argv)


def read(built: HfArgumentParser, tokens: list[str]) -> tuple:
    """The options' dataclasses from command-line tokens; an option it does not take is refused in argparse's words
    (as `base.parser_snapshot` refuses it)."""
    *parsed, unused = built.parse_args_into_dataclasses(tokens, return_remaining_strings=True)
    if unused:
        built.error(unrecognized(unused))
    return tuple(parsed)


def parse_file(path: str, overrides: list[str] | None = None) -> tuple:
    """Options from a YAML/JSON file; `overrides` (command-line options) replace the file's."""
    import yaml

    file = Path(path)
    require(file.is_file(), f"Options file {path} does not exist.")
    try:
        options = yaml.safe_load(file.read_text()) if file.suffix != ".json" else json.loads(file.read_text())
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"Options file {path} is not valid {file.suffix[1:].upper()}: {err}") from err
    require(isinstance(options, dict), f"Options file {path} must hold a mapping of option names to values.")
    try:
        if overrides:
            option_fields(options)
            given = {k: v for k, v in options.items() if v is not None}  # null: the option's default
            tokens = [
                t
                for k, v in given.items()
                for t in (f"--{k}", json.dumps(v) if isinstance(v, (dict, list)) else str(v))
            ]
            return read(parser(), tokens + list(overrides))
        return parse_dict(options)
    except UsageError as err:
        raise UsageError(f"{path}: {err}") from err


def option_fields(options: dict) -> dict[str, dataclasses.Field]:
    """The fields of every option hf-lorsa train takes, after refusing the names of `options` it does not."""
    known = {f.name: f for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - set(known))
    require(not unknown, f"Unknown options {unknown}; see `hf-lorsa train --help`.")
    return known


def parse_dict(options: dict) -> tuple:
    """Options as keywords (`train_lorsa(**options)`); numbers given as strings are converted by type."""
    known = option_fields(options)
    return parser().parse_dict({k: _coerce(known[k], v) for k, v in options.items()})


def _coerce(f: dataclasses.Field, value):
    """YAML gives `layer: "two"` as a string: convert numbers like the command line would, refuse the rest."""
    if isinstance(value, Path):
        return str(value)
    kind = f.type.__name__ if isinstance(f.type, type) else str(f.type)  # HfArgumentParser resolves the types
    if isinstance(value, str) and kind.split(" |")[0] in ("int", "float"):
        try:
            return int(value) if kind.startswith("int") else float(value)
        except ValueError as err:
            raise UsageError(f"--{f.name} must be a number, got {value!r}.") from err
    return value


def run_signature(model_args: LorsaArguments, data_args: DataArguments) -> dict:
    """What must match for a folder to continue a run (logging, budget and resume options may change)."""
    keep = {
        k: v
        for k, v in dataclasses.asdict(model_args).items()
        if k not in ("device_map", "max_memory", "offload_folder")
    }
    data = {k: v for k, v in dataclasses.asdict(data_args).items() if k not in ("eval_tokens", "max_tokens")}
    return {"lorsa": keep, "data": data}


def tokens_per_step(data_args: DataArguments, args: TrainingArguments) -> int:
    """Training tokens per optimiser step, all processes together."""
    return data_args.batch_size * data_args.context_length * args.world_size * args.gradient_accumulation_steps
