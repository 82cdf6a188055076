"""`hf-lorsa train` / `accelerate launch scripts/train.py`: the run, step by step.

Its parts live elsewhere: the options in `arguments`, the output folder's rules in `output_folder`, text,
windows, normalisation and the activation cache in `activations`, the loop in `trainer`.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import IterableDataset
from transformers import TrainingArguments

from ..base.placement import placement
from ..base.usage import UsageError
from ..evaluation.evaluation import evaluate_lorsa
from ..formats.release import LorsaLayers, write_release_card
from ..host import families
from ..inputs.activations import (
    CacheKey,
    activation_sample,
    cached_activations,
    document_separator,
    load_text,
    norm_factors,
    pack,
    skip_tokens,
    split_holdout,
)
from ..inputs.loading import open_host, open_tokenizer
from ..kernels.freed_memory import keep_freed_memory
from ..model.configuration_lorsa import LorsaConfig
from ..model.files import layer_folder, release_layers
from ..model.initialization import balance_head_norms, calibrate, initialize_from_host
from ..model.modeling_lorsa import LorsaModel
from ..model.replica import head_output_variance
from . import output_folder
from .arguments import (
    DataArguments,
    LorsaArguments,
    LorsaTrainingArguments,
    parse,
    parse_dict,
    run_signature,
    tokens_per_step,
)
from .head_balance import default_rare_tokens
from .host_checks import check_against_host
from .launch import release_process_group_at_exit
from .output_folder import RUN_FILE
from .recipe import (
    default_aux_k,
    default_dead_tokens,
    default_learning_rate,
    revive_every,
    scheduler_kwargs,
    steps_for_budget,
)
from .trainer import LorsaTrainer, saved_norm_factors

logger = logging.getLogger(__name__)
CALIBRATION_TOKENS = 8192  # positions of the activation sample the initial calibration uses
__all__ = [
    "RUN_FILE",
    "parse",
    "run_signature",
    "tokens_per_step",
    "train",
    "train_layers",
    "train_lorsa",
    "train_lorsas",
]


def train_lorsa(callbacks=None, **options) -> LorsaModel:
    """Train from Python with the command line's option names, e.g.
    `train_lorsa(model_name_or_path="gpt2", layer=5, dataset="data.jsonl", output_dir="runs/gpt2-l5")`."""
    return train(*parse_dict(options), callbacks)


def train_lorsas(callbacks=None, **options) -> dict[int, LorsaModel]:
    """`train_lorsa` for several layers from one host pass (`layers="2,4,6"`): {layer: Lorsa}, a release."""
    return train_layers(*parse_dict(options), callbacks)


def train(
    model_args: LorsaArguments, data_args: DataArguments, args: LorsaTrainingArguments, callbacks=None
) -> LorsaModel:
    """Run (or resume) the training run of one layer (--layer); returns the final Lorsa, also saved in
    args.output_dir."""
    if model_args.several:
        raise UsageError("--layers trains several Lorsas: call train_layers (train_lorsas from Python) instead.")
    return next(iter(train_layers(model_args, data_args, args, callbacks).values()))


def train_layers(
    model_args: LorsaArguments, data_args: DataArguments, args: LorsaTrainingArguments, callbacks=None
) -> dict[int, LorsaModel]:
    """Run (or resume) a training run: {layer: final Lorsa}, saved in args.output_dir (--layer) or, with --layers,
    in args.output_dir/layer{L} (a release)."""
    layers, depth = check_against_host(model_args, data_args, args)
    signature = run_signature(model_args, data_args)
    try:
        return run(model_args, data_args, args, callbacks, signature, layers, depth)
    finally:  # the folder is free again, whether the run finished or stopped
        if args.should_save:
            output_folder.unlock(args.output_dir)


def run(
    model_args, data_args, args, callbacks, signature: dict, layers: list[int], depth: int
) -> dict[int, LorsaModel]:
    """The run itself, in the output folder it holds (`train_layers`)."""
    folder = claim_output_folder(args, signature)
    if folder.state == "finished":
        logger.warning(
            "%s already holds the finished run of this command (%s tokens trained): nothing to do. To train again, "
            "pass --overwrite_output_dir or choose another --output_dir.", args.output_dir,
            folder.record.get("tokens_trained"),
        )  # fmt: skip
        return load_finished(args.output_dir, model_args.several)
    resume = resume_checkpoint(args, signature)
    tokenizer = open_tokenizer(model_args.model_name_or_path, model_args.gguf_file, model_args.trust_remote_code)
    separator = document_separator(tokenizer, data_args.document_separator)
    windows, eval_windows = load_windows(data_args, tokenizer, separator, args.seed)

    # the training steps read no block of the host above the deepest layer; an evaluation while training runs them
    partial = args.eval_strategy == "no" and max(layers) + 1 < depth
    host = load_host(model_args, args.device, max(layers) if partial else None)
    skip = skip_tokens(tokenizer, separator)
    lorsas = {layer: build_lorsa(model_args, host, skip, separator, layer) for layer in layers}
    if resume:  # the checkpoint's weights are in its own normalisation
        factors = saved_norm_factors(resume)
        for layer, lorsa in lorsas.items():
            lorsa.set_norm_factors(*factors[layer])
    else:
        for lorsa in lorsas.values():
            normalise_and_calibrate(lorsa, host, model_args, data_args, windows, skip, args.device)
    train_data = windows
    if data_args.activation_cache:
        train_data = activation_cache(host, model_args, data_args, args, windows, separator, layers)

    model = LorsaLayers(lorsas) if model_args.several else lorsas[layers[0]]
    trainer = build_trainer(model_args, data_args, args, model, host, train_data, eval_windows, signature, callbacks)
    del host  # the trainer holds it, and lets a partial host go before the evaluation loads the whole one
    if resume:
        trainer.load_extra_state(resume)
        logger.info("Resuming from %s", resume)
    release_process_group_at_exit()
    if args.should_save:  # until now a refusal left nothing worth keeping: a rerun starts afresh
        output_folder.write_run_file(args.output_dir, signature, "running")
    # from here each step reuses the memory the last one freed, not fresh pages from the kernel; the start (the host's
    # load, the calibration) gave back what it freed, so the process keeps no more than the steps' own peak
    keep_freed_memory()
    trainer.train(resume_from_checkpoint=resume)
    return finish(trainer, model_args, data_args, args, eval_windows, signature, partial)


def load_finished(output_dir: str, several: bool) -> dict[int, LorsaModel]:
    if not several:
        lorsa = LorsaModel.from_pretrained(output_dir)
        return {lorsa.config.layer: lorsa}
    return {layer: LorsaModel.from_pretrained(output_dir, subfolder=layer_folder(layer))
            for layer in release_layers(output_dir)}  # fmt: skip


def normalise_and_calibrate(lorsa, host, model_args, data_args, windows, skip, device) -> None:
    """Normalisation factors from the first batches; with host initialisation, part of the same sample shares the
    QK heads among host heads by the variance of their outputs (not with `--init host_even`) and calibrates the
    initial heads (`initialization.calibrate`); then every head gets the norm ratio of `--norm_ratio`."""
    layer = lorsa.config.layer
    sample = activation_sample(host, layer, windows, data_args.batch_size, data_args.norm_batches, skip)
    if not bool(sample[2].any()):
        raise UsageError(f"The first {sample[2].numel()} positions of --dataset {data_args.dataset} are all document "
                         "separators, BOS, padding or window starts: there is nothing to train on. Check the text "
                         "(--text_column) and --document_separator.")  # fmt: skip
    rows = max(1, CALIBRATION_TOKENS // sample[0].shape[1])
    x, y = (t[:rows].to(device, torch.float32) for t in sample[:2])
    counted = sample[2][:rows].to(device)
    if model_args.init == "host":  # the one initialisation from the host (build_lorsa left the Lorsa random)
        variance = head_output_variance(host, layer, x, counted)
        logger.info("Host heads' output variance: %s", [round(v, 4) for v in variance.tolist()])
        initialize_from_host(lorsa, host, layer, head_weights=variance)
    lorsa.set_norm_factors(*norm_factors(*sample))
    if model_args.init != "random":
        k_start = model_args.k_anneal_start or lorsa.config.n_ov_heads
        logger.info("Calibrated the initial Lorsa: %s", json.dumps(calibrate(lorsa, x, y, counted, k_start)))
    if model_args.norm_ratio > 0:
        balance_head_norms(lorsa, model_args.norm_ratio)


def claim_output_folder(args: TrainingArguments, signature: dict) -> output_folder.OutputFolder:
    """Decide (main process first) whether this run may use its output folder, and mark it as this run's."""
    with args.main_process_first(local=False, desc="output folder"):
        if args.should_save:  # one run at a time in a folder
            output_folder.lock(args.output_dir)
        folder = output_folder.prepare(args.output_dir, signature, args.overwrite_output_dir)
        if folder.state == "new" and args.should_save:
            folder.path.mkdir(parents=True, exist_ok=True)
            output_folder.write_run_file(folder.path, signature, "starting")  # "running" at the first step
    return folder


def load_windows(data_args: DataArguments, tokenizer, separator: int | None, seed: int):
    """Training windows (shuffled when streamed) and held-out windows (or None)."""
    dataset = load_text(data_args.dataset, data_args.text_column, data_args.dataset_split, data_args.streaming or None)
    train_text, eval_text = split_holdout(dataset, data_args.holdout_fraction)
    if data_args.eval_dataset:
        eval_text = load_text(data_args.eval_dataset, data_args.text_column, split=data_args.eval_split)
    windows = pack(train_text, tokenizer, data_args.context_length, data_args.text_column, separator)
    if isinstance(windows, IterableDataset):
        windows = windows.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer)
    eval_windows = (
        pack(eval_text, tokenizer, data_args.context_length, data_args.text_column, separator) if eval_text else None
    )
    return windows, eval_windows


def load_host(model_args: LorsaArguments, device: torch.device, up_to_layer: int | None = None):
    """The host, frozen, on `device` (or spread by --device_map); only its blocks up to `up_to_layer` when given."""
    dtype = model_args.torch_dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    spread = placement(model_args.device_map, model_args.max_memory, model_args.offload_folder)
    host = open_host(model_args.model_name_or_path, model_args.gguf_file, dtype, trust_remote_code=model_args.trust_remote_code,
                     up_to_layer=up_to_layer, **spread)  # fmt: skip
    return host if spread else host.to(device)


def build_lorsa(model_args: LorsaArguments, host, skip: list[int], separator: int | None, layer: int) -> LorsaModel:
    sizes = dict(n_qk_heads=model_args.n_qk_heads, n_ov_heads=model_args.n_ov_heads, top_k=model_args.top_k)
    sizes["expansion_factor"] = None if model_args.n_ov_heads else model_args.expansion_factor
    if model_args.init == "host_even":
        lorsa = LorsaModel.from_host(host, layer, topk_rule=model_args.topk_rule, act_fn=model_args.act_fn, **sizes)
    else:  # random, or host: initialised once its first batch is read (normalise_and_calibrate), unless resumed
        config = LorsaConfig.from_host(host, layer, topk_rule=model_args.topk_rule, act_fn=model_args.act_fn, **sizes)
        lorsa = LorsaModel(config)
        if model_args.init == "host":
            lorsa.to(families.input_device(host))  # where from_host would put it, for the calibration
    lorsa.config.base_model_name_or_path = model_args.model_name_or_path
    lorsa.config.base_model_gguf_file = model_args.gguf_file
    lorsa.config.skip_token_ids = skip
    lorsa.config.document_separator = separator
    return lorsa.float()


def activation_cache(host, model_args, data_args, args, windows, separator: int | None, layers: list[int]):
    n_windows = len(windows) if hasattr(windows, "__len__") else data_args.max_tokens // data_args.context_length
    key = CacheKey(
        model=model_args.model_name_or_path, layers=layers, dataset=data_args.dataset,
        text_column=data_args.text_column, context_length=data_args.context_length,
        dtype=str(next(host.parameters()).dtype), n_windows=n_windows, seed=args.seed,
        document_separator=separator,
    )  # fmt: skip
    state = PartialState()  # every process of the run writes its share of the shards
    return cached_activations(data_args.activation_cache, key, host, windows, data_args.batch_size,
                              state.process_index, state.num_processes, state.wait_for_everyone)  # fmt: skip


def build_trainer(model_args, data_args, args, model, host, train_data, eval_windows, signature, callbacks):
    per_step = tokens_per_step(data_args, args)
    steps = steps_for_budget(data_args.max_tokens, per_step)
    args.max_steps = min(steps, args.max_steps) if args.max_steps > 0 else steps
    args.per_device_train_batch_size = args.per_device_eval_batch_size = data_args.batch_size
    lorsa = next(iter(model.by_layer().values())) if isinstance(model, LorsaLayers) else model
    c = lorsa.config
    dead_tokens = model_args.dead_tokens or default_dead_tokens(data_args.max_tokens, c.n_ov_heads, c.top_k)
    rare_tokens = model_args.rare_head_tokens
    if rare_tokens is None:
        rare_tokens = default_rare_tokens(c.n_ov_heads, c.top_k, per_step)
    if args.learning_rate is None:
        args.learning_rate = default_learning_rate(c.d_model)
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    args.lr_scheduler_kwargs = scheduler_kwargs(scheduler, args.lr_scheduler_kwargs, args.max_steps)
    return LorsaTrainer(
        model=model, args=args, train_dataset=train_data, eval_dataset=eval_windows, data_collator=collate,
        callbacks=callbacks, host=host, k_start=model_args.k_anneal_start or lorsa.config.n_ov_heads,
        k_anneal_fraction=model_args.k_anneal_fraction,
        aux_k=model_args.aux_k or default_aux_k(c.d_model, c.n_ov_heads), aux_k_coef=model_args.aux_k_coef,
        dead_tokens=dead_tokens, revive_every=revive_every(dead_tokens, per_step) if model_args.revive_dead_heads else 0,
        rare_tokens=rare_tokens, max_head_frequency=model_args.max_head_frequency,
        tokens_per_step=per_step, eval_tokens=data_args.eval_tokens, run_signature=signature,
        stop_on_collapse=model_args.stop_on_collapse,
    )  # fmt: skip


def collate(rows: list[dict]) -> dict:
    return {k: torch.stack([torch.as_tensor(row[k]) for row in rows]) for k in rows[0]}


def resume_checkpoint(args: TrainingArguments, signature: dict) -> str | None:
    """The checkpoint to continue from: --resume_from_checkpoint (a path, or 'latest'), else the newest
    checkpoint in the output folder, so that rerunning a crashed command picks up where it stopped.
    Only checkpoints made with the same options are accepted."""
    requested = args.resume_from_checkpoint
    if requested and requested not in ("latest", "True", "true"):
        if not Path(requested).is_dir():
            raise UsageError(f"--resume_from_checkpoint {requested} is not a checkpoint folder.")
        checkpoint = requested
    elif Path(args.output_dir).is_dir():
        checkpoint = output_folder.last_complete_checkpoint(args.output_dir)
    else:
        checkpoint = None
    if checkpoint:
        output_folder.check_checkpoint(checkpoint, signature)
    return checkpoint


def finish(trainer: LorsaTrainer, model_args, data_args, args, eval_windows, signature: dict,
           partial_host: bool = False) -> dict[int, LorsaModel]:  # fmt: skip
    """Finalise every Lorsa (into OUTPUT, or OUTPUT/layer{L} with a release card for --layers), record the run as
    finished, and remove the intermediate checkpoints (unless --keep_checkpoints)."""
    trainer.check_finite(weights=True)
    stopped = trainer.collapse_guard.report
    if stopped:
        logger.warning(stopped["message"])
    if eval_windows is not None and args.should_save and partial_host:
        # trained on the blocks up to the deepest layer only: the evaluation splices into the whole host
        trainer.host = None  # the partial host goes first
        gc.collect()
        trainer.host = load_host(model_args, args.device)
    finished = {}
    for layer, trained in trainer.lorsas().items():
        where = Path(args.output_dir, layer_folder(layer)) if model_args.several else Path(args.output_dir)
        finished[layer] = finalise(trainer, trained, where, model_args, data_args, args, eval_windows)
    if args.should_save:
        if model_args.several:
            write_release_card(args.output_dir, finished)
        if not args.keep_checkpoints:
            output_folder.remove_checkpoints(args.output_dir)
        output_folder.write_run_file(args.output_dir, signature, "finished", tokens_trained=trainer.tokens_seen())
    return finished


def finalise(trainer: LorsaTrainer, trained, where: Path, model_args, data_args, args, eval_windows) -> LorsaModel:
    """Fold normalisation and decoder norms into the weights, record provenance, evaluate on the held-out
    windows, and save into `where`."""
    lorsa = copy.deepcopy(trained).float().eval()
    lorsa.fold_norm_factors()
    lorsa.normalize_decoder()
    lorsa.config.dataset_name = data_args.dataset
    lorsa.config.tokens_trained = trainer.tokens_seen()
    lorsa.config.stopped_early = trainer.collapse_guard.report  # the card says so
    recorded = ("learning_rate", "lr_scheduler_type", "warmup_steps", "max_grad_norm", "seed", "bf16", "max_steps",
                "world_size")  # fmt: skip
    lorsa.config.training_args = {
        **dataclasses.asdict(model_args), **dataclasses.asdict(data_args), **{k: getattr(args, k) for k in recorded}
    }  # fmt: skip
    if eval_windows is not None and args.should_save:
        results = evaluate_lorsa(
            trainer.host,
            lorsa,
            eval_windows,
            data_args.eval_tokens,
            data_args.batch_size,
            progress=False,
            budget_option="--eval_tokens",
        ).to_dict()
        lorsa.eval_results = {**results, **evaluated_data(data_args), "model": model_args.model_name_or_path}
        trainer.log(
            {f"eval_{trainer.metric_name(lorsa.config.layer, k)}": v for k, v in results.items()}
        )  # held-out results reach TensorBoard too
        logger.info("Held-out evaluation of layer %d: %s", lorsa.config.layer, json.dumps(results))
    if args.should_save:
        lorsa.save_pretrained(where)
    return lorsa


def evaluated_data(data_args: DataArguments) -> dict:
    """What the held-out evaluation read: --eval_dataset, or the held-out end of --dataset."""
    if data_args.eval_dataset:
        return {"dataset": data_args.eval_dataset, "dataset_split": data_args.eval_split}
    return {
        "dataset": data_args.dataset,
        "dataset_split": f"last {data_args.holdout_fraction:g} of the documents (--holdout_fraction)",
    }
