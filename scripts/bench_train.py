"""End-to-end quality and speed of the default recipe on stories260K (BENCHMARKS.md, "Training").

    python scripts/bench_train.py [--output_dir runs/bench-stories-l2] [--shared DIR] [extra hf-lorsa train options]

Trains layer 2 with expansion factor 8 (512 heads) and top_k 16 on the shared stories, holding out the last
5% of the stories, for 3M tokens, then prints the held-out FVU, loss recovered and the wall-clock numbers.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from hf_lorsa.run_training import parse, train

SHARED = Path(__file__).resolve().parents[2] / "shared"


def take(args: list[str], name: str, default: str) -> str:
    if name not in args:
        return default
    i = args.index(name)
    value = args[i + 1]
    del args[i : i + 2]
    return value


def main() -> None:
    args = sys.argv[1:]
    output = take(args, "--output_dir", "runs/bench-stories-l2")
    shared = Path(take(args, "--shared", str(SHARED)))
    options = [
        f"--model_name_or_path={shared / 'models' / 'stories260K'}", "--layer=2",
        f"--dataset={shared / 'data' / 'stories260K-samples.jsonl'}", "--holdout_fraction=0.05",
        "--expansion_factor=8", "--top_k=16", "--max_tokens=3000000", "--eval_tokens=200000",
        f"--output_dir={output}", "--overwrite_output_dir=true", "--report_to=none", "--save_steps=100000",
        "--disable_tqdm=true", *args,
    ]  # fmt: skip
    start = time.perf_counter()
    lorsa = train(*parse(options))
    wall = time.perf_counter() - start
    results = lorsa.eval_results or {}
    tokens = lorsa.config.tokens_trained
    print(json.dumps({
        "fvu": results.get("fvu"), "loss_recovered_zero": results.get("loss_recovered_zero"),
        "kl_spliced": results.get("kl_spliced"), "l0": results.get("l0"), "dead_heads": results.get("dead_heads"),
        "eval_tokens": results.get("n_tokens"), "tokens_trained": tokens, "wall_s": round(wall, 1),
        "pipeline_tokens_per_s": round(tokens / wall, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
