"""The default recipe at every depth of SmolLM2-135M (BENCHMARKS.md, "The recipe at every depth").

    python scripts/bench_depth.py [--layers 18] [--output_dir DIR] [--cache DIR] [--shared DIR] [extra hf-lorsa train options]

Trains Lorsas of expansion 4 (2,304 heads), K 32, 300K tokens on layers of SmolLM2-135M-Instruct (4-bit GGUF) from the
embedded stories with the last 10% held out (one layer: its activations cached in --cache, so that a second run with
other options skips the host; several: one host pass per step for all of them). Every 49 steps (50K tokens) each
Lorsa's held-out FVU is measured on the first 10,240 held-out tokens (their activations collected once, before
training). Prints a JSON line per training log with the heads' threshold scales (the smallest, how many are lowered
and below 0.2), and at the end one JSON line per layer: the held-out results, the held-out FVU's course (each value;
the largest rise above the best so far) and the training FVU's once K has annealed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from bench_train import take  # the scripts' own option reading (this folder is on the path)
from transformers import TrainerCallback

from hf_lorsa import collect
from hf_lorsa.host.attention_mask import counted_positions
from hf_lorsa.inputs.activations import document_separator, load_text, pack, skip_tokens, split_holdout
from hf_lorsa.inputs.loading import open_host, open_tokenizer
from hf_lorsa.training.run_training import parse, train_layers

SHARED = Path(__file__).resolve().parents[2] / "shared"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL_EVERY = 49  # steps of 1,024 tokens: 50K tokens
HELD_OUT_WINDOWS = 40  # of 256 tokens


def rise(values: list[float]) -> float:
    """The largest rise of a course above its best so far, as a fraction of that best."""
    best, largest = float("inf"), 0.0
    for value in values:
        best = min(best, value)
        largest = max(largest, value / best - 1)
    return largest


@torch.no_grad()
def held_out_activations(host_dir: Path, layers: list[int]) -> dict:
    """{layer: (x, y)} of the first held-out windows, and the counted positions (flattened)."""
    tokenizer = open_tokenizer(str(host_dir), GGUF)
    host = open_host(str(host_dir), GGUF)
    separator = document_separator(tokenizer)
    _, held_out = split_holdout(load_text("hf_lorsa:stories260K"), 0.1)
    ids = torch.tensor(pack(held_out, tokenizer, 256, "text", separator)[:HELD_OUT_WINDOWS]["input_ids"])
    counted = counted_positions(ids, skip_tokens(tokenizer, separator)).flatten()
    found = {}
    for layer in layers:
        record = collect(host, layer, input_ids=ids)
        found[layer] = (record.hidden_states.float(), record.attention_output.float().flatten(0, 1)[counted])
    return {"layers": found, "counted": counted}


class DepthCourse(TrainerCallback):
    """The threshold scales at each log, and each layer's held-out FVU every EVAL_EVERY steps."""

    def __init__(self, held_out: dict):
        self.held_out = held_out
        self.train_fvu: dict[int, list[float]] = {}
        self.eval_fvu: dict[int, list[tuple[int, float]]] = {}

    @staticmethod
    def lorsas(model) -> dict:
        return model.by_layer() if hasattr(model, "by_layer") else {model.config.layer: model}

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        for layer, lorsa in self.lorsas(model).items():
            key = "fvu" if len(self.held_out["layers"]) == 1 else f"layer{layer}/fvu"
            scale = lorsa.threshold_scale.detach().float()
            row = {"layer": layer, "tokens": logs.get("tokens"), "k": logs.get("k"), "fvu": logs.get(key),
                   "lowered": int((scale < 1).sum()), "below_0.2": int((scale < 0.2).sum()),
                   "min_scale": float(scale.min())}  # fmt: skip
            if logs.get("k") == lorsa.config.top_k and logs.get(key) is not None:
                self.train_fvu.setdefault(layer, []).append(logs[key])
            print("SCALES " + json.dumps(row), flush=True)

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % EVAL_EVERY and state.global_step != state.max_steps:
            return
        counted = self.held_out["counted"]
        for layer, lorsa in self.lorsas(model).items():
            x, y = self.held_out["layers"][layer]
            lorsa.eval()
            recon = torch.cat([lorsa(part).reconstruction for part in x.split(8)]).flatten(0, 1)[counted]
            lorsa.train()
            fvu = float((recon - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
            self.eval_fvu.setdefault(layer, []).append((state.global_step * 1024, round(fvu, 4)))
            print("HELDOUT " + json.dumps({"layer": layer, "tokens": state.global_step * 1024, "fvu": fvu}), flush=True)


def main() -> None:
    args = sys.argv[1:]
    layers = [int(layer) for layer in take(args, "--layers", "18").split(",")]
    name = "-".join(map(str, layers))
    output = take(args, "--output_dir", f"runs/bench-depth-l{name}")
    cache = take(args, "--cache", f"runs/bench-depth-l{name}-activations")
    host_dir = Path(take(args, "--shared", str(SHARED))) / "models" / "smollm2-135m-instruct-q4"
    which = (
        [f"--layer={layers[0]}", f"--activation_cache={cache}"]
        if len(layers) == 1
        else [f"--layers={name.replace('-', ',')}"]
    )
    options = [
        f"--model_name_or_path={host_dir}", f"--gguf_file={GGUF}", *which, "--dataset=hf_lorsa:stories260K",
        "--holdout_fraction=0.1", "--expansion_factor=4", "--top_k=32", "--max_tokens=300000", "--eval_tokens=30000",
        "--seed=0", f"--output_dir={output}", "--overwrite_output_dir=true", "--report_to=none", "--save_steps=100000",
        "--disable_tqdm=true", *args,
    ]  # fmt: skip
    course = DepthCourse(held_out_activations(host_dir, layers))
    lorsas = train_layers(*parse(options), callbacks=[course])
    shown = ("fvu", "loss_recovered_zero", "kl_spliced", "l0", "dead_heads", "max_frequency", "n_tokens")
    for layer, lorsa in lorsas.items():
        results = lorsa.eval_results or {}
        held_out = [fvu for _, fvu in course.eval_fvu.get(layer, [])]
        print(json.dumps({
            "layer": layer, "options": args, **{k: results.get(k) for k in shown},
            "stopped_early": lorsa.config.stopped_early, "held_out_fvu_course": course.eval_fvu.get(layer),
            "held_out_rise": rise(held_out), "train_fvu_rise": rise(course.train_fvu.get(layer, [])),
            "train_fvu_last": (course.train_fvu.get(layer) or [None])[-1],
        }))  # fmt: skip


if __name__ == "__main__":
    main()
