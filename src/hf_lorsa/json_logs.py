"""Training logs as JSON lines: numbers stay numbers (transformers prints floats as strings)."""

from __future__ import annotations

import json

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
