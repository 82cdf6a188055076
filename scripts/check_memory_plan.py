"""The memory plan (`scripts/plan_memory.py --device cpu`) against the real peak of `hf-lorsa train` on this machine.

    python scripts/check_memory_plan.py                 # every shape below (about 10 minutes on 2 cores)
    python scripts/check_memory_plan.py --shapes small  # one shape, for a dry run

Each shape is a random-weight Llama host (the stories260K tokenizer's 512-token vocabulary, so that the embeddings
weigh nothing) saved to a temporary folder and trained by `hf-lorsa train` in a fresh process for 8 steps, with the
step that needs the most memory from the second step on (AuxK and the revival of dead heads at every step:
`--dead_tokens` of one step), a log every 2 steps (the collapse guard's copy of the weights) and a checkpoint at
step 4. The peak resident memory of that process (its `ru_maxrss`) is set beside the plan for the same host,
layer and sizes. One JSON line per shape: planned parts and peak, measured peak, and planned / measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_pipeline import save_random_host, stories_config
from plan_memory import plan
from transformers import LlamaConfig

from hf_lorsa.base.usage import quiet_when_not_a_terminal

STEPS = 8
# name: host (d_model, MLP width, blocks, heads, key/value heads), layer, expansion, K, context, batch
SHAPES = {
    "small": ((512, 2048, 2, 8, 2), 1, 8, 32, 256, 4),
    "1b-width": ((2048, 8192, 3, 32, 8), 2, 8, 64, 256, 4),
    "1b-width-x4": ((2048, 8192, 3, 32, 8), 2, 4, 64, 256, 4),
    "1b-width-long": ((2048, 8192, 3, 32, 8), 2, 8, 64, 1024, 1),
    "1b-width-batch": ((2048, 8192, 3, 32, 8), 2, 8, 64, 256, 8),
    "1024": ((1024, 4096, 4, 16, 4), 3, 8, 64, 512, 4),
    "1536": ((1536, 6144, 3, 24, 8), 2, 8, 64, 512, 2),
}  # fmt: skip


def host_config(d: int, mlp: int, blocks: int, heads: int, kv_heads: int) -> LlamaConfig:
    return stories_config(hidden_size=d, intermediate_size=mlp, num_hidden_layers=blocks, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, head_dim=d // heads)  # fmt: skip


def measured_peak_mib(config: LlamaConfig, layer: int, expansion: int, top_k: int, context: int, batch: int) -> float:
    """Peak resident memory (MiB) of `hf-lorsa train` on a random host of `config`, in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        host = Path(tmp, "host")
        save_random_host(config, host)
        per_step = context * batch
        command = [
            sys.executable, "-m", "hf_lorsa", "train", f"--model_name_or_path={host}", f"--layer={layer}",
            "--dataset=hf_lorsa:stories260K", f"--expansion_factor={expansion}", f"--top_k={top_k}",
            f"--context_length={context}", f"--batch_size={batch}", f"--max_tokens={STEPS * per_step}",
            f"--dead_tokens={per_step}", "--logging_steps=2", "--save_steps=4", f"--output_dir={tmp}/run",
            "--report_to=none", "--disable_tqdm=true",
        ]  # fmt: skip
        log = Path(tmp, "stderr.txt")
        with log.open("w") as stderr:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
            _, status, usage = os.wait4(process.pid, 0)  # this child's own peak (ru_maxrss), not the largest child's
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"training failed:\n{log.read_text()[-3000:]}")
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    args = parser.parse_args()
    quiet_when_not_a_terminal()
    for name in args.shapes.split(","):
        (d, mlp, blocks, heads, kv), layer, expansion, top_k, context, batch = SHAPES[name]
        config = host_config(d, mlp, blocks, heads, kv)
        planned = plan(config, layer, expansion, top_k, context, batch, device="cpu")
        peak = measured_peak_mib(config, layer, expansion, top_k, context, batch)
        print(json.dumps({"shape": name, "d_model": d, "layer": layer, "expansion_factor": expansion, "top_k": top_k,
                          "context": context, "batch": batch, **planned, "measured_peak": round(peak / 1024, 2),
                          "planned_over_measured": round(planned["peak"] * 1024 / peak, 3)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
