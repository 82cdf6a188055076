"""Training logs as JSON lines: numbers stay numbers (transformers prints floats as strings)."""

from __future__ import annotations

import json
import time

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


def json_line(logs: dict) -> str:
    """One log as a JSON line: numbers stay numbers (6 significant digits)."""
    shown = {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in logs.items() if k != "total_flos"}
    return json.dumps(shown)


class JsonLogPrinter(TrainerCallback):
    """Prints each log as a JSON line (output that is not a terminal: no progress bars)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            print(json_line(logs), flush=True)


class JsonLogProgress(ProgressCallback):
    """transformers' progress bars, with each log written above them as a JSON line."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            (self.training_bar.write if self.training_bar is not None else print)(json_line(logs))


class Progress(TrainerCallback):
    """How far a run is: a log at least every `seconds` (a slow host logs less often than every `logging_steps`),
    and each log's `tokens_total`, `progress` (percent) and `eta_s` (seconds left at the pace since this process
    started training)."""

    def __init__(self, tokens_per_step: int, seconds: float = 60.0):
        self.tokens_per_step, self.seconds = tokens_per_step, seconds
        self.start = self.last = time.monotonic()
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last = time.monotonic()
        self.first_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if not control.should_log and now - self.last >= self.seconds:
            control.should_log = True
        if control.should_log:
            self.last = now

    def fields(self, step: int, max_steps: int) -> dict:
        done = step - self.first_step
        pace = (time.monotonic() - self.start) / done if done > 0 else None
        fields = {
            "tokens_total": max_steps * self.tokens_per_step,
            "progress": round(100 * step / max(max_steps, 1), 1),
        }
        if pace is not None:
            fields["eta_s"] = round(pace * (max_steps - step))
        return fields
