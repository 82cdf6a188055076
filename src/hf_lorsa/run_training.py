"""`hf-lorsa train` / `accelerate launch scripts/train.py`: arguments, checks, data, and the run itself."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import IterableDataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .activations import (
    ActivationCache,
    CacheKey,
    batches,
    collect_batch,
    load_text,
    norm_factors,
    pack,
    skip_tokens,
    split_holdout,
)
from .attention_mask import loss_mask
from .configuration_lorsa import LorsaConfig
from .modeling_lorsa import LorsaModel
from .training import LorsaTrainer, default_aux_k, default_dead_tokens, steps_for_budget

logger = logging.getLogger(__name__)
RUN_FILE = "lorsa_run.json"


@dataclass
class LorsaArguments:
    """The host layer and the Lorsa's sizes and recipe."""

    model_name_or_path: str = field(metadata={"help": "host causal LM: Hub id or local path"})
    layer: int = field(metadata={"help": "index of the layer whose attention is replaced"})
    expansion_factor: int | None = field(default=8, metadata={"help": "n_ov_heads = expansion_factor * d_model"})
    n_ov_heads: int | None = field(default=None, metadata={"help": "dictionary size (overrides expansion_factor)"})
    n_qk_heads: int | None = field(default=None, metadata={"help": "QK heads (default n_ov_heads / head_dim)"})
    top_k: int = field(default=16, metadata={"help": "active OV heads per position"})
    topk_rule: str = field(default="abs", metadata={"help": "rank heads by |z| ('abs') or ReLU(z) ('relu')"})
    init: str = field(default="host", metadata={"help": "'host' (from the layer's weights) or 'random'"})
    k_anneal_start: int | None = field(default=None, metadata={"help": "K at step 0 (default n_ov_heads)"})
    k_anneal_fraction: float = field(default=0.05, metadata={"help": "fraction of training spent annealing K"})
    aux_k: int | None = field(default=None, metadata={"help": "dead heads used by AuxK (default d_model / 2)"})
    aux_k_coef: float = field(default=1 / 32, metadata={"help": "weight of the AuxK loss (0 turns it off)"})
    dead_tokens: int | None = field(default=None, metadata={"help": "silent for this many tokens = dead"})
    torch_dtype: str = field(default="auto", metadata={"help": "host dtype: auto (bf16 on GPU), float32, ..."})
    device_map: str | None = field(default=None, metadata={"help": "'auto' spreads a large host over devices"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the host's own code (off)"})


@dataclass
class DataArguments:
    """Where the text comes from and how much of it."""

    dataset: str = field(metadata={"help": "Hub dataset (streamed) or local .jsonl/.txt/.parquet files"})
    text_column: str = field(default="text")
    dataset_split: str = field(default="train")
    streaming: bool = field(default=False, metadata={"help": "stream local files too (Hub data is always streamed)"})
    eval_dataset: str | None = field(default=None, metadata={"help": "held-out data (default: --holdout_fraction)"})
    eval_split: str = field(default="validation")
    holdout_fraction: float = field(default=0.0, metadata={"help": "hold out the last fraction of local documents"})
    context_length: int = field(default=256)
    max_tokens: int = field(default=100_000_000, metadata={"help": "training budget in tokens"})
    batch_size: int = field(default=4, metadata={"help": "sequences per device and step"})
    activation_cache: str | None = field(default=None, metadata={"help": "folder to store/reuse activations"})
    norm_batches: int = field(default=8, metadata={"help": "batches used to estimate normalisation factors"})
    eval_tokens: int = field(default=100_000, metadata={"help": "tokens per evaluation"})
    shuffle_buffer: int = field(default=10_000, metadata={"help": "windows in the shuffle buffer (streamed data)"})


@dataclass
class LorsaTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments with the Lorsa recipe's defaults."""

    output_dir: str = field(default="lorsa-output")
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start over in an output folder of another run"}
    )
    learning_rate: float = field(default=4e-3)
    lr_scheduler_type: str = field(default="cosine")
    warmup_steps: float = field(default=0.02)
    max_grad_norm: float = field(default=1.0)
    adam_beta2: float = field(default=0.99)
    weight_decay: float = field(default=0.0)
    logging_steps: float = field(default=10)
    save_steps: float = field(default=200)
    save_total_limit: int | None = field(default=3)
    remove_unused_columns: bool = field(default=False)
    report_to: str | list[str] = field(default="tensorboard")
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (default: on when training on a GPU)"})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = bool(not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        super().__post_init__()


def parse(argv: list[str]) -> tuple[LorsaArguments, DataArguments, LorsaTrainingArguments]:
    parser = HfArgumentParser((LorsaArguments, DataArguments, LorsaTrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(argv)


def train_lorsa(callbacks=None, **options) -> LorsaModel:
    """Train from Python with the command line's option names, e.g.
    `train_lorsa(model_name_or_path="gpt2", layer=5, dataset="data.jsonl", output_dir="runs/gpt2-l5")`."""
    parser = HfArgumentParser((LorsaArguments, DataArguments, LorsaTrainingArguments))
    return train(*parser.parse_dict({k: str(v) if isinstance(v, Path) else v for k, v in options.items()}), callbacks)


def run_signature(model_args: LorsaArguments, data_args: DataArguments) -> dict:
    """What must match for a folder to continue a run (logging, budget and resume options may change)."""
    keep = {k: v for k, v in dataclasses.asdict(model_args).items() if k not in ("device_map",)}
    data = {k: v for k, v in dataclasses.asdict(data_args).items() if k not in ("eval_tokens", "max_tokens")}
    return {"lorsa": keep, "data": data}


def tokens_per_step(data_args: DataArguments, args: TrainingArguments) -> int:
    """Training tokens per optimiser step, all processes together."""
    return data_args.batch_size * data_args.context_length * args.world_size * args.gradient_accumulation_steps


def check_arguments(model_args: LorsaArguments, data_args: DataArguments, args: TrainingArguments) -> None:
    """Everything that can be checked before a model is loaded."""
    host_config = AutoConfig.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
    )
    text_config = host_config.get_text_config()
    n_layers = text_config.num_hidden_layers
    if not 0 <= model_args.layer < n_layers:
        raise ValueError(
            f"--layer must be in [0, {n_layers - 1}] for {model_args.model_name_or_path}, got {model_args.layer}."
        )
    max_positions = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if max_positions and data_args.context_length > max_positions:
        raise ValueError(f"--context_length {data_args.context_length} exceeds the model's {max_positions} positions.")
    per_step = tokens_per_step(data_args, args)
    if data_args.max_tokens < per_step:
        raise ValueError(
            f"--max_tokens {data_args.max_tokens} is smaller than one step ({per_step} tokens = batch_size x "
            "context_length x processes x accumulation); raise the budget or shrink the batch."
        )
    if model_args.init not in ("host", "random"):
        raise ValueError(f"--init must be 'host' or 'random', got {model_args.init!r}.")
    run_file = Path(args.output_dir, RUN_FILE)
    if run_file.exists() and not args.overwrite_output_dir:
        previous = json.loads(run_file.read_text())
        if previous != json.loads(json.dumps(run_signature(model_args, data_args))):
            raise ValueError(
                f"{args.output_dir} holds a run with a different configuration ({run_file}); choose another "
                "--output_dir, or pass --overwrite_output_dir to start over there."
            )


def load_host(model_args: LorsaArguments, device: torch.device):
    dtype = model_args.torch_dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    host = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, dtype=getattr(torch, dtype), device_map=model_args.device_map,
        trust_remote_code=model_args.trust_remote_code,
    )  # fmt: skip
    if model_args.device_map is None:
        host = host.to(device)
    host.requires_grad_(False)
    return host.eval()


def build_lorsa(model_args: LorsaArguments, host, skip: list[int]) -> LorsaModel:
    sizes = dict(n_qk_heads=model_args.n_qk_heads, n_ov_heads=model_args.n_ov_heads, top_k=model_args.top_k)
    sizes["expansion_factor"] = None if model_args.n_ov_heads else model_args.expansion_factor
    if model_args.init == "host":
        lorsa = LorsaModel.from_host(host, model_args.layer, topk_rule=model_args.topk_rule, **sizes)
    else:
        lorsa = LorsaModel(LorsaConfig.from_host(host, model_args.layer, topk_rule=model_args.topk_rule, **sizes))
    lorsa.config.base_model_name_or_path = model_args.model_name_or_path
    lorsa.config.skip_token_ids = skip
    return lorsa.float()


def estimate_norm_factors(host, layer: int, windows, data_args: DataArguments, skip: list[int]) -> tuple[float, float]:
    xs, ys, masks = [], [], []
    for i, ids in enumerate(batches(windows, data_args.batch_size)):
        if i == data_args.norm_batches:
            break
        acts = collect_batch(host, layer, ids)
        xs.append(acts["hidden_states"])
        ys.append(acts["attention_output"])
        masks.append(loss_mask(ids, skip))
    if not xs:
        raise ValueError("The dataset gave no full window; use more text or a shorter --context_length.")
    return norm_factors(torch.cat(xs), torch.cat(ys), torch.cat(masks))


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()


def train(
    model_args: LorsaArguments, data_args: DataArguments, args: LorsaTrainingArguments, callbacks=None
) -> LorsaModel:
    """Run (or resume) a training run; returns the final Lorsa, also saved in args.output_dir."""
    check_arguments(model_args, data_args, args)
    dataset = load_text(data_args.dataset, data_args.text_column, data_args.dataset_split, data_args.streaming or None)
    train_text, eval_text = split_holdout(dataset, data_args.holdout_fraction)
    if data_args.eval_dataset:
        eval_text = load_text(data_args.eval_dataset, data_args.text_column, split=data_args.eval_split)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
    )
    windows = pack(train_text, tokenizer, data_args.context_length, data_args.text_column)
    if isinstance(windows, IterableDataset):
        windows = windows.shuffle(seed=args.seed, buffer_size=data_args.shuffle_buffer)  # streamed data
    eval_windows = pack(eval_text, tokenizer, data_args.context_length, data_args.text_column) if eval_text else None

    host = load_host(model_args, args.device)
    skip = skip_tokens(tokenizer)
    lorsa = build_lorsa(model_args, host, skip)
    resume = resume_checkpoint(args)
    if resume:  # the checkpoint's weights are in its own normalisation
        saved = LorsaConfig.from_pretrained(resume)
        lorsa.set_norm_factors(saved.input_norm_factor, saved.output_norm_factor)
    else:
        lorsa.set_norm_factors(*estimate_norm_factors(host, model_args.layer, windows, data_args, skip))

    train_data = windows
    if data_args.activation_cache:
        train_data = cached_activations(host, model_args, data_args, args, windows)

    per_step = tokens_per_step(data_args, args)
    args.max_steps = steps_for_budget(data_args.max_tokens, per_step)
    args.per_device_train_batch_size = args.per_device_eval_batch_size = data_args.batch_size
    trainer = LorsaTrainer(
        model=lorsa, args=args, train_dataset=train_data, eval_dataset=eval_windows, data_collator=collate,
        callbacks=callbacks, host=host, k_start=model_args.k_anneal_start or lorsa.config.n_ov_heads,
        k_anneal_fraction=model_args.k_anneal_fraction,
        aux_k=model_args.aux_k or default_aux_k(lorsa.config.d_model, lorsa.config.n_ov_heads),
        aux_k_coef=model_args.aux_k_coef, dead_tokens=model_args.dead_tokens or default_dead_tokens(data_args.max_tokens),
    )  # fmt: skip
    trainer.tokens_per_step, trainer.eval_tokens = per_step, data_args.eval_tokens
    if args.should_save:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        Path(args.output_dir, RUN_FILE).write_text(json.dumps(run_signature(model_args, data_args), indent=2))
    if resume:
        trainer.load_extra_state(resume)
        logger.info("Resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    return finish(trainer, model_args, data_args, args, eval_windows)


def collate(rows: list[dict]) -> dict:
    return {k: torch.stack([torch.as_tensor(row[k]) for row in rows]) for k in rows[0]}


def resume_checkpoint(args: TrainingArguments) -> str | None:
    """The checkpoint to continue from: --resume_from_checkpoint (a path, or 'latest'), else the newest
    checkpoint in the output folder, so that rerunning a crashed command picks up where it stopped."""
    requested = args.resume_from_checkpoint
    if requested and requested not in ("latest", "True", "true"):
        if not Path(requested).is_dir():
            raise ValueError(f"--resume_from_checkpoint {requested} is not a checkpoint folder.")
        return requested
    if Path(args.output_dir).is_dir() and not args.overwrite_output_dir:
        return get_last_checkpoint(args.output_dir)
    return None


def cached_activations(host, model_args, data_args, args, windows) -> ActivationCache:
    """The activation cache for this run, built once (by the main process) or reused when it matches."""
    from accelerate import PartialState

    n_windows = len(windows) if hasattr(windows, "__len__") else data_args.max_tokens // data_args.context_length
    key = CacheKey(
        model=model_args.model_name_or_path, layer=model_args.layer, dataset=data_args.dataset,
        text_column=data_args.text_column, context_length=data_args.context_length,
        dtype=str(next(host.parameters()).dtype), n_windows=n_windows, seed=args.seed,
    )  # fmt: skip
    with PartialState().main_process_first():
        if not ActivationCache.check(data_args.activation_cache, key):
            limited = windows.take(n_windows) if not hasattr(windows, "__len__") else windows
            ActivationCache.build(data_args.activation_cache, key, host, limited, data_args.batch_size)
    return ActivationCache(data_args.activation_cache)


def finish(trainer: LorsaTrainer, model_args, data_args, args, eval_windows) -> LorsaModel:
    """Fold normalisation and decoder norms into the weights, record provenance, evaluate, save."""
    lorsa = copy.deepcopy(trainer.lorsa).float().eval()
    lorsa.fold_norm_factors()
    lorsa.normalize_decoder()
    lorsa.config.dataset_name = data_args.dataset
    lorsa.config.tokens_trained = trainer.tokens_seen()
    lorsa.config.training_args = {
        **dataclasses.asdict(model_args),
        **dataclasses.asdict(data_args),
        **{
            k: getattr(args, k)
            for k in (
                "learning_rate",
                "lr_scheduler_type",
                "warmup_steps",
                "max_grad_norm",
                "seed",
                "bf16",
                "max_steps",
                "world_size",
            )
        },  # fmt: skip
    }
    summary = {
        "rank": args.process_index,
        "global_step": trainer.state.global_step,
        "tokens_seen": trainer.tokens_seen(),
        "tokens_per_step": trainer.tokens_per_step,
        "weights_sha256": weights_digest(trainer.lorsa),
        "first_batch_sha256": trainer.first_batch_digest,
    }
    Path(args.output_dir, f"train_summary_rank{args.process_index}.json").write_text(json.dumps(summary, indent=2))
    if eval_windows is not None and args.should_save:
        from .evaluation import evaluate_lorsa

        results = evaluate_lorsa(
            trainer.host, lorsa, eval_windows, data_args.eval_tokens, data_args.batch_size, progress=False
        )
        lorsa.eval_results = {**results, "dataset": data_args.dataset, "model": model_args.model_name_or_path}
        logger.info("Held-out evaluation: %s", json.dumps(results))
    if args.should_save:
        lorsa.save_pretrained(args.output_dir)
    return lorsa


def main(argv: list[str] | None = None) -> int:
    from .launch import relaunch_on_cpu

    # the processes started for `accelerate launch --cpu --num_processes N` rerun this very command line
    if (code := relaunch_on_cpu(sys.argv[0], sys.argv[1:])) is not None:
        return code
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model_args, data_args, args = parse(argv)
    lorsa = train(model_args, data_args, args)
    if lorsa.eval_results and args.should_save:
        print(json.dumps({k: lorsa.eval_results[k] for k in ("fvu", "l0", "loss_recovered_zero", "kl_spliced")}))
    return 0
