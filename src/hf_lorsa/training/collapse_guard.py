"""A run that comes apart stops and says so: when a Lorsa's smoothed training FVU rises far above its best, training
stops, every Lorsa of the run gets back the weights of its best point, and the config (hence the card) records what
happened. A user never gets a Lorsa worse than the one the run had earlier without a word.

The FVU is watched once K has annealed to its final value (before that it falls with K by design), smoothed over
logs (an exponential mean, weight SMOOTHING per log); it has come apart when it stays above (1 + RISE) x its best
for PATIENCE logs in a row. The best weights are kept on the CPU, updated at each new best.
"""

from __future__ import annotations

from transformers import TrainerCallback

RISE = 0.5  # a healthy run's smoothed FVU stays within 10% of its best (BENCHMARKS.md, "The recipe at every depth")
PATIENCE = 3
SMOOTHING = 0.3


class CollapseGuard(TrainerCallback):
    """Watches `{prefix}fvu` of each Lorsa in the logs of `trainer` (a LorsaTrainer)."""

    def __init__(self, trainer, rise: float = RISE, patience: int = PATIENCE, enabled: bool = True):
        self.trainer, self.rise, self.patience, self.enabled = trainer, rise, patience, enabled
        self.smoothed: dict[int, float] = {}
        self.best: dict[int, tuple[float, int, dict]] = {}  # layer: (smoothed FVU, tokens, CPU state dict)
        self.above: dict[int, int] = {}
        self.report: dict | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.report is not None or not self.enabled:
            return
        for layer, lorsa in self.trainer.lorsas().items():
            fvu = logs.get(self.trainer.metric_name(layer, "fvu"))
            if fvu is None or logs.get("k", lorsa.config.top_k) > lorsa.config.top_k:
                continue
            smoothed = fvu if layer not in self.smoothed else SMOOTHING * fvu + (1 - SMOOTHING) * self.smoothed[layer]
            self.smoothed[layer] = smoothed
            tokens = self.trainer.tokens_seen()
            if layer not in self.best or smoothed < self.best[layer][0]:
                state_dict = {k: v.detach().to("cpu", copy=True) for k, v in lorsa.state_dict().items()}
                self.best[layer] = (smoothed, tokens, state_dict)
            self.above[layer] = self.above.get(layer, 0) + 1 if smoothed > (1 + self.rise) * self.best[layer][0] else 0
            if self.above[layer] >= self.patience:
                self.stop(layer, smoothed, tokens, control)
                return

    def stop(self, layer: int, smoothed: float, tokens: int, control) -> None:
        """Stop training, and give every Lorsa of the run the weights of its best point."""
        best, best_tokens, _ = self.best[layer]
        self.report = {
            "layer": layer, "tokens": tokens, "fvu": round(smoothed, 4), "best_fvu": round(best, 4),
            "best_tokens": best_tokens,
            "message": f"Layer {layer}'s training FVU came apart ({smoothed:.3f} at {tokens} tokens, {smoothed / best:.1f}x "
            f"its best {best:.3f} at {best_tokens} tokens): training stopped, and the Lorsa keeps the weights of its "
            "best point.",
        }  # fmt: skip
        for each, lorsa in self.trainer.lorsas().items():
            if each in self.best:
                lorsa.load_state_dict(self.best[each][2])  # copies the values in
        control.should_training_stop = True
