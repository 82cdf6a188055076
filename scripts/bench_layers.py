"""What training several layers from one host pass costs (BENCHMARKS.md, "Several layers").

    python scripts/bench_layers.py [--layers 2,4,6] [--alone 6] [--max_tokens 16384] [--shared DIR]

Trains Lorsas of expansion factor 2 and top_k 16 on SmolLM2-135M-Instruct (4-bit GGUF) with the same token
budget twice, one after the other on the same machine: once for every layer of --layers from one host pass
per batch, once for the layer --alone. Prints one JSON line per run (wall clock of the whole command, and of
its training loop) and their ratio. No held-out evaluation, so that the training dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def timed_train(options: list[str], shared: Path) -> tuple[float, float]:
    """`hf-lorsa train` on SmolLM2-135M-Instruct (4-bit GGUF in `shared`) with `options`, no logs or checkpoints in
    between: the wall clock of the whole command and of its training loop, in seconds."""
    command = [
        sys.executable, "-m", "hf_lorsa", "train", f"--model_name_or_path={shared / 'models' / 'smollm2-135m-instruct-q4'}",
        "--gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf", *options, "--report_to=none", "--save_steps=100000",
        "--disable_tqdm=true", "--logging_steps=1000",
    ]  # fmt: skip
    start = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return wall, float(re.search(r'"train_runtime": ([0-9.]+)', result.stdout).group(1))


def run(layer_option: str, output: Path, shared: Path, max_tokens: int) -> dict:
    options = [layer_option, "--dataset=hf_lorsa:stories260K", "--expansion_factor=2", "--top_k=16",
               f"--max_tokens={max_tokens}", f"--output_dir={output}"]  # fmt: skip
    wall, runtime = timed_train(options, shared)
    return {"layers": layer_option, "max_tokens": max_tokens, "wall_s": round(wall, 1), "train_s": runtime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,4,6")
    parser.add_argument("--alone", default="6")
    parser.add_argument("--max_tokens", type=int, default=16384)
    parser.add_argument("--shared", type=Path, default=SHARED)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        joint = run(f"--layers={args.layers}", Path(tmp, "joint"), args.shared, args.max_tokens)
        print(json.dumps(joint), flush=True)
        alone = run(f"--layer={args.alone}", Path(tmp, "alone"), args.shared, args.max_tokens)
        print(json.dumps(alone), flush=True)
    print(json.dumps({"wall_ratio": round(joint["wall_s"] / alone["wall_s"], 3),
                      "train_ratio": round(joint["train_s"] / alone["train_s"], 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
