"""The Lorsa training recipe as a transformers Trainer: loss, K annealing, AuxK for dead heads, logging.

The host model runs frozen inside `compute_loss` (only up to layer L); the Trainer provides the loop,
data sharding across processes, mixed precision, gradient clipping, LR schedule and checkpoints.

Axes: B batch, T positions, D d_model, Hov OV heads, K active heads.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from ..base.usage import CommandStopped
from ..evaluation.evaluation import evaluate_lorsa
from ..formats.release import LorsaLayers
from ..host.attention_mask import counted_positions
from ..host.hooks import collect_layers
from ..model.configuration_lorsa import LorsaConfig
from .collapse_guard import CollapseGuard
from .head_balance import balance_thresholds, bound_rows, dense_bound, follow_bound
from .json_logs import JsonLogPrinter, JsonLogProgress, Progress
from .output_folder import write_run_file

STATE_FILE = "lorsa_trainer_state.safetensors"


class TrainingDiverged(CommandStopped):
    """The loss or the weights became NaN or infinite."""


def annealed_k(step: int, total_steps: int, k_start: int, k_end: int, fraction: float) -> int:
    """K at `step`: exponential decay from k_start to k_end over the first `fraction` of training (LORSA.md)."""
    anneal_steps = fraction * total_steps
    if step >= anneal_steps or k_start <= k_end:
        return k_end
    return max(k_end, round(k_start * (k_end / k_start) ** (step / anneal_steps)))


def masked_variance(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sum over the rows of t (N, D) where weight (N, 1) is 1 of their squared distance from those rows' mean."""
    mean = (t * weight).sum(0) / weight.sum()
    return ((t - mean).pow(2) * weight).sum()


class LorsaTrainer(Trainer):
    """Trains a LorsaModel on one layer of a frozen host, or a LorsaLayers (one Lorsa per layer, all fed by one
    host pass per batch). Each Lorsa has its own K schedule position, dead-head counters, revival, AuxK, heads'
    thresholds (hf_lorsa.training.head_balance), gradient clipping and metrics (prefixed `layer{L}/` when there are
    several); Adam's state is per parameter anyway.

    Batches hold either `input_ids` (activations computed on the fly) or cached `hidden_states` and
    `attention_output` with their `input_ids`.
    """

    def __init__(self, *args, host, k_start: int, k_anneal_fraction: float, aux_k: int, aux_k_coef: float,
                 dead_tokens: int, tokens_per_step: int, revive_every: int = 0, rare_tokens: int = 0,
                 max_head_frequency: float = 1.0, eval_tokens: int = 100_000, run_signature: dict | None = None,
                 stop_on_collapse: bool = True, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.host = host
        self.k_start, self.k_anneal_fraction = k_start, k_anneal_fraction
        self.aux_k, self.aux_k_coef, self.dead_tokens = aux_k, aux_k_coef, dead_tokens
        self.revive_every = revive_every  # steps between revivals of dead heads (0: never)
        # BatchTopK heads' own thresholds (hf_lorsa.training.head_balance): rare_tokens 0 never lowers, frequency 1 never raises
        self.rare_tokens = rare_tokens or torch.iinfo(torch.long).max
        self.max_head_frequency = max_head_frequency
        self.tokens_per_step = tokens_per_step  # all processes together (hf_lorsa.training.arguments.tokens_per_step)
        self.eval_tokens = eval_tokens
        self.run_signature = run_signature  # written into every checkpoint, checked on resume
        self.several = isinstance(self.model, LorsaLayers)
        self.tokens_since_fired = {
            layer: torch.zeros(lorsa.config.n_ov_heads, dtype=torch.long) for layer, lorsa in self.lorsas().items()
        }
        self.dense_bounds: dict[int, torch.Tensor | None] = dict.fromkeys(self.tokens_since_fired)  # head_balance
        self._metrics: dict[str, list[float]] = {}
        self._finite = torch.ones((), dtype=torch.bool)  # stays on the device: checked at logs and saves
        self._pending_revival: dict[int, tuple] = {}
        self.add_callback(TrainerStateCallback(self))
        # logs as JSON lines of numbers (transformers prints floats as strings)
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        self.add_callback(JsonLogPrinter() if self.args.disable_tqdm else JsonLogProgress())
        self.progress = Progress(tokens_per_step)
        self.add_callback(self.progress)
        self.collapse_guard = CollapseGuard(self, enabled=stop_on_collapse)
        self.add_callback(self.collapse_guard)

    @property
    def lorsa(self):
        """The Lorsa being trained (the first one, with several layers: see `lorsas`)."""
        return next(iter(self.lorsas().values()))

    def lorsas(self) -> dict:
        """{layer: LorsaModel} of every Lorsa being trained (unwrapped once per model: unwrapping looks up
        packages, 1.8 ms a step when it ran four times a step)."""
        if getattr(self, "_lorsas_of", None) is not self.model:
            model = self.accelerator.unwrap_model(self.model)
            self._lorsas = model.by_layer() if isinstance(model, LorsaLayers) else {model.config.layer: model}
            self._lorsas_of = self.model
        return self._lorsas

    def metric_name(self, layer: int, name: str) -> str:
        """How one Lorsa's metric is named in logs: `layer{L}/name` with several layers, else `name`."""
        return f"layer{layer}/{name}" if self.several else name

    def _state_key(self, name: str, layer: int) -> str:
        return f"{name}.layer{layer}" if self.several else name

    def current_k(self) -> int:
        config = self.lorsa.config  # every Lorsa of a run has the same sizes and schedule
        return annealed_k(
            self.state.global_step, self.state.max_steps, self.k_start, config.top_k, self.k_anneal_fraction
        )

    def activations(self, inputs: dict) -> tuple[dict, dict, torch.Tensor]:
        """({layer: x}, {layer: y}, counted) for a batch: from the cache, or by running the host once, up to the
        deepest layer trained."""
        ids = inputs["input_ids"]
        layers = list(self.lorsas())
        if f"hidden_states.{layers[0]}" in inputs:  # from the activation cache
            xs = {layer: inputs[f"hidden_states.{layer}"] for layer in layers}
            ys = {layer: inputs[f"attention_output.{layer}"] for layer in layers}
        else:
            records = collect_layers(self.host, layers, input_ids=ids)
            xs = {layer: record.hidden_states for layer, record in records.items()}
            ys = {layer: record.attention_output for layer, record in records.items()}
        device = ids.device
        counted = counted_positions(ids, self.lorsa.config.skip_token_ids)
        to = {layer: x.to(device, torch.float32) for layer, x in xs.items()}
        return to, {layer: y.to(device, torch.float32) for layer, y in ys.items()}, counted

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """No host sync except on revival steps: what needs a count stays a tensor (see `layer_loss`)."""
        with torch.profiler.record_function("hf_lorsa.host_activations"):  # named in profiles (bench_pipeline.py)
            xs, ys, counted = self.activations(inputs)
        k = self.current_k()
        # no head can have been silent for dead_tokens before that many tokens were trained
        past_window = self.tokens_seen() >= self.dead_tokens
        use_aux = self.aux_k_coef > 0 and past_window
        revive = self.revive_every > 0 and past_window and self.state.global_step % self.revive_every == 0
        # the heads' dense bounds (hf_lorsa.training.head_balance) read every head's score
        bounded = (
            self.max_head_frequency < 1 and k == self.lorsa.config.top_k and self.lorsa.config.act_fn == "batchtopk"
        )
        wanted = use_aux or revive or bounded
        if self.several:
            outs = model(xs, top_k=k, output_pre_activations=wanted)
        else:
            outs = {layer: model(x, top_k=k, output_pre_activations=wanted) for layer, x in xs.items()}
        counted = counted.flatten()
        loss = sum(self.layer_loss(layer, outs[layer], ys[layer], counted, k, use_aux, revive) for layer in xs)
        self._record("k", k)
        return (loss, outs) if return_outputs else loss

    def layer_loss(self, layer: int, out, y: torch.Tensor, counted: torch.Tensor, k: int, use_aux: bool,
                   revive: bool) -> torch.Tensor:  # fmt: skip
        """One Lorsa's loss (MSE over the counted positions, in normalised units, plus AuxK over its silent heads),
        metrics, dead-head counters and revival. `counted`: (B * T,) True at the positions that count; sums are
        masked rather than indexed, so that no count has to reach the host."""
        lorsa = self.lorsas()[layer]
        dead = self.silent_heads(layer).to(counted.device)
        weight = counted.float()[:, None]  # (N, 1)
        n = weight.sum()
        scale = lorsa.config.output_norm_factor  # errors in normalised units (mean |y| = sqrt(D))
        error = torch.where(counted[:, None], out.reconstruction.flatten(0, 1).float() - y.flatten(0, 1), 0) * scale
        target = y.flatten(0, 1) * scale  # (N, D)
        squared_error = error.pow(2).sum()
        mse = squared_error / (n * error.shape[-1])
        loss = mse
        self._finite = self._finite.to(mse.device) & torch.isfinite(mse.detach())
        if use_aux:
            z = out.pre_activations.flatten(0, 1)
            aux = self.aux_loss(lorsa, z, error.detach() / scale, dead, weight) * dead.any()
            loss = loss + self.aux_k_coef * aux
            self._record(self.metric_name(layer, "aux_loss"), aux)
        if revive:  # every revive_every steps: here the counted rows and the dead heads are found on the host
            z = out.pre_activations.flatten(0, 1)[counted].detach()
            pending = self.revival(lorsa, z, k, dead)
            if pending is not None:
                self._pending_revival[layer] = pending
        values = out.top_k_values.flatten(0, 1) * weight  # uncounted positions fire nothing
        fired = self._update_fired(layer, out.top_k_indices.flatten(0, 1), values, n)
        if lorsa.config.act_fn == "batchtopk" and k == lorsa.config.top_k:  # K annealed: the bounds hold
            scale = lorsa.threshold_scale
            bound = None  # the threshold is learned by now (from K's first batch at its final value)
            if self.max_head_frequency < 1:
                rows = bound_rows(weight.shape[0])  # scores only where the bound is read
                scores = lorsa.head_scores(out.pre_activations.flatten(0, 1)[rows]) * weight[rows]
                followed = follow_bound(self.dense_bounds[layer], dense_bound(scores, self.max_head_frequency))
                self.dense_bounds[layer] = followed
                bound = followed - lorsa.threshold.float().clamp_min(1e-12).log()  # as log scales of the threshold
            since = self.tokens_since_fired[layer]
            balance_thresholds(scale, fired, n, since, self.rare_tokens, self.max_head_frequency, bound)
            self._record(self.metric_name(layer, "thresholds_lowered"), (scale < 1).sum())
            self._record(self.metric_name(layer, "thresholds_raised"), (scale > 1).sum())
        with torch.no_grad():
            self._record(self.metric_name(layer, "mse"), mse)
            self._record(self.metric_name(layer, "fvu"), squared_error / masked_variance(target, weight))
            self._record(self.metric_name(layer, "l0"), (values != 0).sum(-1).float().sum() / n)
        return loss

    def aux_loss(self, lorsa, z: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor,
                 weight: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """AuxK (Gao et al., 2024): the top aux_k silent heads reconstruct what the live ones missed, over the counted
        positions (`weight` (N, 1): 1 there, else 0; `residual` is 0 elsewhere). With fewer silent heads, the rest of
        the aux_k drawn are live ones, given no activation: the same as taking only the silent ones, without
        counting them on the host."""
        act = z.relu() if lorsa.config.topk_rule == "relu" else z
        score = (act.abs() * lorsa.w_o.detach().norm(dim=-1)).masked_fill(~dead, -1.0)
        indices = score.topk(min(self.aux_k, lorsa.config.n_ov_heads), dim=-1).indices  # (N, k_aux)
        values = act.gather(-1, indices) * dead[indices] * weight  # nothing decoded at uncounted positions
        decoded = lorsa.decode(values, indices) - lorsa.b_D / lorsa.config.output_norm_factor
        scale = lorsa.config.output_norm_factor
        total = masked_variance(residual * scale, weight).clamp_min(1e-8)
        return ((decoded - residual) * scale).pow(2).sum() / total

    @torch.no_grad()
    def revival(self, lorsa, z: torch.Tensor, k: int, dead: torch.Tensor):
        """(dead heads, b_v increments) that bring each dead head into the top k on a K / n_ov fraction of these
        positions (the average head's rate): it fires again, so the reconstruction loss trains it, and it keeps
        firing if it helps. Applied after the optimiser step (`apply_revival`); counted as `revived` in the log.

        z: (N, Hov) pre-activations of this batch's counted positions, in the Lorsa's normalised units (b_v adds
        to z as it is, since attention rows sum to 1)."""
        dead = dead.to(z.device).nonzero().flatten()
        if dead.numel() == 0:
            return None
        norms = lorsa.w_o.detach().norm(dim=-1)
        scores = z.relu() * norms
        kth = scores.topk(k, dim=-1).values[:, -1:]  # (N, 1) the score to beat at each position
        deficit = kth / norms[dead].clamp_min(1e-12) - z[:, dead]  # (N, n_dead) how far each dead head is below
        q = min(1.0, lorsa.config.top_k / lorsa.config.n_ov_heads)
        return dead, deficit.float().quantile(q, dim=0).clamp_min(0)

    @torch.no_grad()
    def apply_revival(self) -> None:
        pending, self._pending_revival = self._pending_revival, {}
        for layer, (dead, bump) in pending.items():
            lorsa = self.lorsas()[layer]
            lorsa.b_v[dead] += bump.to(lorsa.b_v.dtype)
            # the bump is sized for the shared threshold: the revived heads take it again
            if lorsa.config.act_fn == "batchtopk":
                lorsa.threshold_scale[dead.to(lorsa.threshold_scale.device)] = 1.0
            counters = self.tokens_since_fired[layer]
            counters[dead.to(counters.device)] = 0
            self._record(self.metric_name(layer, "revived"), dead.numel())

    @torch.no_grad()
    def share_thresholds(self) -> None:
        """With several processes, each BatchTopK Lorsa's threshold and heads' scales of it become the mean of the
        processes' (each learns from its own batches), so that every process holds the same Lorsa. One reduction of
        1 + Hov numbers per Lorsa, no host sync."""
        if self.accelerator.num_processes == 1:
            return
        for lorsa in self.lorsas().values():
            if lorsa.config.act_fn == "batchtopk":
                both = torch.cat((lorsa.threshold.view(1), lorsa.threshold_scale))
                mean = self.accelerator.reduce(both, reduction="mean")
                lorsa.threshold.copy_(mean[0])
                lorsa.threshold_scale.copy_(mean[1:])

    def silent_heads(self, layer: int | None = None) -> torch.Tensor:
        """(Hov,) True for heads (of `layer`'s Lorsa; default the first) that have not fired for more than
        dead_tokens tokens: the set AuxK trains and revival wakes, logged as `silent_heads`."""
        return self.tokens_since_fired[self.lorsa.config.layer if layer is None else layer] > self.dead_tokens

    @torch.no_grad()
    def _update_fired(self, layer: int, indices: torch.Tensor, values: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Counters stay on the Lorsa's device: no transfer per step. `n`: the positions counted (a tensor).
        Returns (Hov,) how many positions each head fired at."""
        counters = self.tokens_since_fired[layer].to(indices.device)
        hits = torch.zeros_like(counters).index_add_(0, indices.flatten(), (values != 0).flatten().long())
        counters += n.long()
        counters.masked_fill_(hits > 0, 0)  # no boolean indexing: no host sync
        self.tokens_since_fired[layer] = counters
        return hits

    def _clip_grad_norm(self, model):
        """Each Lorsa's gradient clipped to max_grad_norm on its own, as if it were trained alone; returns the
        norm of all of them together (logged as grad_norm)."""
        if not self.several:
            return super()._clip_grad_norm(model)
        if self.accelerator.scaler is not None:
            self.accelerator.unscale_gradients()
        norms = [torch.nn.utils.clip_grad_norm_(lorsa.parameters(), self.args.max_grad_norm)
                 for lorsa in self.lorsas().values()]  # fmt: skip
        return torch.stack(norms).norm()

    def _record(self, name: str, value) -> None:
        """Keep a metric (tensors stay on the device until the next log, to avoid a sync per step)."""
        self._metrics.setdefault(name, []).append(value.detach() if torch.is_tensor(value) else float(value))

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self._metrics and "loss" in logs:  # a training log: add the recipe's metrics, averaged
            for name, values in self._metrics.items():
                logs[name] = sum(float(v) for v in values) / len(values)
            for layer in self.tokens_since_fired:
                logs[self.metric_name(layer, "silent_heads")] = int(self.silent_heads(layer).sum())
            logs["tokens"] = self.tokens_seen()
            logs.update(self.progress.fields(self.state.global_step, self.state.max_steps))
            self._metrics = {}
            if not all(math.isfinite(v) for v in logs.values() if isinstance(v, float)):
                self._finite = torch.zeros((), dtype=torch.bool)
            self.check_finite()
        super().log(logs, start_time)

    def check_finite(self, weights: bool = False) -> None:
        """Stop with a message when the loss (and, with `weights`, the weights) stopped being finite. Every
        checkpoint is checked with its weights before it is written, so the last one is good."""
        finite = bool(self._finite)
        if weights and finite:
            finite = all(bool(torch.isfinite(p).all()) for lorsa in self.lorsas().values() for p in lorsa.parameters())
        if finite:
            return
        last = get_last_checkpoint(self.args.output_dir) if Path(self.args.output_dir).is_dir() else None
        raise TrainingDiverged(
            f"Training diverged: the loss became non-finite by step {self.state.global_step}; stopped. "
            + (f"The last good checkpoint is {last}. " if last else "No checkpoint was saved before that. ")
            + f"Lower --learning_rate (now {self.args.learning_rate:g}) and start over with --overwrite_output_dir."
        )

    def _save_checkpoint(self, model, trial) -> None:
        self.check_finite(weights=True)  # a diverged run never writes a checkpoint
        super()._save_checkpoint(model, trial)

    def tokens_seen(self) -> int:
        """Training tokens seen by all processes together."""
        return self.state.global_step * self.tokens_per_step

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Splice-based evaluation (hf_lorsa.evaluation.evaluation) of the current Lorsa on the held-out windows."""

        windows = eval_dataset if eval_dataset is not None else self.eval_dataset
        metrics = {}
        for layer, lorsa in self.lorsas().items():
            results = evaluate_lorsa(
                self.host,
                lorsa,
                windows,
                self.eval_tokens,
                self.args.per_device_eval_batch_size,
                progress=False,
                budget_option="--eval_tokens",
            ).to_dict()
            metrics.update({f"{metric_key_prefix}_{self.metric_name(layer, k)}": v for k, v in results.items()})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ---- state beyond what the Trainer checkpoints -----------------------------------------------------

    def save_extra_state(self, checkpoint_dir: str | Path) -> None:
        """Dead-head counters, the heads' dense bounds, and with several layers each Lorsa's normalisation factors (a single Lorsa's are
        in the checkpoint's config.json). Each process counts from its own batches: the others save their counters
        and bounds beside the main process's file (`rank_state_file`), as the Trainer saves each one's random state."""
        state = {}
        for layer, lorsa in self.lorsas().items():
            state[self._state_key("tokens_since_fired", layer)] = self.tokens_since_fired[layer].cpu()
            if self.dense_bounds[layer] is not None:
                state[self._state_key("dense_bounds", layer)] = self.dense_bounds[layer].cpu()
            if self.several and self.args.should_save:
                c = lorsa.config
                state[self._state_key("norm_factors", layer)] = torch.tensor(
                    [c.input_norm_factor, c.output_norm_factor], dtype=torch.float64
                )
        save_file(state, Path(checkpoint_dir, rank_state_file(self.args.process_index)))
        if self.args.should_save and self.run_signature is not None:
            write_run_file(checkpoint_dir, self.run_signature, "checkpoint", step=self.state.global_step)

    def load_extra_state(self, checkpoint_dir: str | Path) -> None:
        """This process's own counters and bounds when it saved them, else the main process's."""
        path = Path(checkpoint_dir, rank_state_file(self.args.process_index))
        if not path.exists():
            path = Path(checkpoint_dir, STATE_FILE)
        if path.exists():
            state = load_file(path)
            for layer in self.tokens_since_fired:
                self.tokens_since_fired[layer] = state[self._state_key("tokens_since_fired", layer)]
                self.dense_bounds[layer] = state.get(self._state_key("dense_bounds", layer))  # absent: not yet


def rank_state_file(process: int) -> str:
    """The file of process `process`'s own counters and bounds in a checkpoint (process 0 writes STATE_FILE)."""
    return STATE_FILE if process == 0 else STATE_FILE.replace(".safetensors", f".rank{process}.safetensors")


def saved_norm_factors(checkpoint_dir: str | Path) -> dict[int, tuple[float, float]]:
    """{layer: (input, output) normalisation factors} a checkpoint was saved with: a multi-layer checkpoint keeps
    them in its extra state (`save_extra_state`), a single Lorsa's checkpoint in its config.json."""
    path = Path(checkpoint_dir, STATE_FILE)
    state = load_file(path) if path.exists() else {}
    factors = {
        int(k.rsplit(".layer", 1)[1]): tuple(v.tolist()) for k, v in state.items() if k.startswith("norm_factors.")
    }
    if factors:
        return factors
    saved = LorsaConfig.from_pretrained(checkpoint_dir)
    return {saved.layer: (saved.input_norm_factor, saved.output_norm_factor)}


class TrainerStateCallback(TrainerCallback):
    """Saves the dead-head counters into every checkpoint, so that a resumed run continues exactly."""

    def __init__(self, trainer: LorsaTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.apply_revival()
        self.trainer.share_thresholds()

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir, f"checkpoint-{state.global_step}")
        if checkpoint.is_dir():  # every process: each keeps its own counters (`save_extra_state`)
            self.trainer.save_extra_state(checkpoint)
