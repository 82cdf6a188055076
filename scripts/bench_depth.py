"""The default recipe at every depth of SmolLM2-135M (BENCHMARKS.md, "The recipe at every depth").

    python scripts/bench_depth.py [--layer 18] [--output_dir DIR] [--cache DIR] [--shared DIR] [extra hf-lorsa train options]

Trains a Lorsa of expansion 4 (2,304 heads), K 32, 300K tokens on one layer of SmolLM2-135M-Instruct (4-bit GGUF) from
the embedded stories with the last 10% held out, its activations cached in --cache (a second run with other options
skips the host), and prints every training log as a JSON line with the heads' threshold scales (the smallest, and
how many are below 0.1 and 0.01), then one JSON line: the held-out results and the training FVU's course (best, last,
the largest rise above the best so far).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import TrainerCallback

from hf_lorsa.run_training import parse, train

SHARED = Path(__file__).resolve().parents[2] / "shared"


class ScaleStats(TrainerCallback):
    """Each training log with the heads' threshold scales, and the course of the training FVU."""

    def __init__(self):
        self.fvus: list[float] = []
        self.trainer = None

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or "fvu" not in logs:
            return
        scale = model.threshold_scale.detach().float()
        row = {"tokens": logs.get("tokens"), "fvu": logs["fvu"], "aux_loss": logs.get("aux_loss"),
               "lowered": int((scale < 1).sum()), "below_0.1": int((scale < 0.1).sum()),
               "below_0.01": int((scale < 0.01).sum()), "min_scale": float(scale.min()),
               "silent": logs.get("silent_heads"), "lr": logs.get("learning_rate")}  # fmt: skip
        self.fvus.append(logs["fvu"])
        print("SCALES " + json.dumps(row), flush=True)

    def course(self) -> dict:
        best, rise = float("inf"), 0.0
        for fvu in self.fvus:
            best = min(best, fvu)
            rise = max(rise, fvu / best - 1)
        return {"train_fvu_best": best, "train_fvu_last": self.fvus[-1] if self.fvus else None, "largest_rise": rise}


def take(args: list[str], name: str, default: str) -> str:
    if name not in args:
        return default
    i = args.index(name)
    value = args[i + 1]
    del args[i : i + 2]
    return value


def main() -> None:
    args = sys.argv[1:]
    layer = take(args, "--layer", "18")
    output = take(args, "--output_dir", f"runs/bench-depth-l{layer}")
    cache = take(args, "--cache", f"runs/bench-depth-l{layer}-activations")
    shared = Path(take(args, "--shared", str(SHARED)))
    options = [
        f"--model_name_or_path={shared / 'models' / 'smollm2-135m-instruct-q4'}",
        "--gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf", f"--layer={layer}", "--dataset=hf_lorsa:stories260K",
        "--holdout_fraction=0.1", "--expansion_factor=4", "--top_k=32", "--max_tokens=300000", "--eval_tokens=30000",
        "--seed=0", f"--activation_cache={cache}", f"--output_dir={output}", "--overwrite_output_dir=true",
        "--report_to=none", "--save_steps=100000", "--disable_tqdm=true", *args,
    ]  # fmt: skip
    stats = ScaleStats()
    lorsa = train(*parse(options), callbacks=[stats])
    results = lorsa.eval_results or {}
    shown = ("fvu", "loss_recovered_zero", "kl_spliced", "l0", "dead_heads", "max_frequency", "n_tokens")
    print(json.dumps({"layer": int(layer), "options": args, **{k: results.get(k) for k in shown}, **stats.course()}))


if __name__ == "__main__":
    main()
