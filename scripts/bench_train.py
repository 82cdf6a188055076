"""End-to-end quality and speed of the default recipe (BENCHMARKS.md, "Training" and "Recipe at scale").

    python scripts/bench_train.py [--config stories|smollm2] [--output_dir DIR] [--shared DIR] [extra hf-lorsa train options]

stories (default): stories260K layer 2, expansion factor 8 (512 heads), top_k 16, 3M tokens.
smollm2: SmolLM2-135M-Instruct (4-bit GGUF) layer 3, expansion factor 4 (2,304 heads), top_k 32, 300K tokens,
with its activations cached under the output folder's parent (a second run skips the host).
Both train on the shared stories with the last 5% held out, then print the held-out FVU, loss recovered,
KL, dead heads, the whole command's wall clock and the training loop's seconds (`train_s`) as one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from hf_lorsa.training.run_training import parse, train

SHARED = Path(__file__).resolve().parents[2] / "shared"


class TrainingClock(TrainerCallback):
    """Seconds of the training loop alone (no loading, normalisation, evaluation or saving)."""

    def __init__(self):
        self.start = self.seconds = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start


def take(args: list[str], name: str, default: str) -> str:
    if name not in args:
        return default
    i = args.index(name)
    value = args[i + 1]
    del args[i : i + 2]
    return value


def config_options(config: str, shared: Path, output: str) -> list[str]:
    data = "--dataset=hf_lorsa:stories260K"
    if config == "stories":
        return ["--model_name_or_path=hf_lorsa:stories260K", "--layer=2", data,
                "--expansion_factor=8", "--top_k=16", "--max_tokens=3000000"]  # fmt: skip
    if config == "smollm2":
        cache = Path(output).resolve().parent / "bench-smollm2-l3-activations"
        return [f"--model_name_or_path={shared / 'models' / 'smollm2-135m-instruct-q4'}",
                "--gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf", "--layer=3", data, "--expansion_factor=4",
                "--top_k=32", "--max_tokens=300000", f"--activation_cache={cache}"]  # fmt: skip
    raise SystemExit(f"--config must be stories or smollm2, got {config!r}")


def main() -> None:
    args = sys.argv[1:]
    config = take(args, "--config", "stories")
    output = take(args, "--output_dir", f"runs/bench-{config}")
    shared = Path(take(args, "--shared", str(SHARED)))
    options = [
        *config_options(config, shared, output), "--holdout_fraction=0.05", "--eval_tokens=200000",
        f"--output_dir={output}", "--overwrite_output_dir=true", "--report_to=none", "--save_steps=100000",
        "--disable_tqdm=true", *args,
    ]  # fmt: skip
    start = time.perf_counter()
    clock = TrainingClock()
    lorsa = train(*parse(options), callbacks=[clock])
    wall = time.perf_counter() - start
    results = lorsa.eval_results or {}
    tokens = lorsa.config.tokens_trained
    print(json.dumps({
        "config": config, "fvu": results.get("fvu"), "loss_recovered_zero": results.get("loss_recovered_zero"),
        "kl_spliced": results.get("kl_spliced"), "l0": results.get("l0"), "dead_heads": results.get("dead_heads"),
        "dense_heads": results.get("dense_heads"), "max_frequency": results.get("max_frequency"),
        "n_ov_heads": lorsa.config.n_ov_heads, "eval_tokens": results.get("n_tokens"), "tokens_trained": tokens,
        "wall_s": round(wall, 1), "pipeline_tokens_per_s": round(tokens / wall, 1),
        "train_s": None if clock.seconds is None else round(clock.seconds, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
