"""Training throughput of the whole pipeline (host forward + Lorsa step) on a random host of realistic shape.

    python scripts/bench_pipeline.py                       # Llama-3.2-1B shape, layer 8 (a GPU's job)
    python scripts/bench_pipeline.py --shape tiny          # a two-layer dry run that fits any CPU
    python scripts/bench_pipeline.py --shape wide          # the 1B shape's width in two layers: the width on a CPU
    python scripts/bench_pipeline.py --profile             # also where steps 6-9 spend their time (torch.profiler)

The host has the shape of Llama-3.2-1B (d_model 2048, 16 layers, GQA 32/8, MLP 8192) with random weights and
the stories260K tokenizer's vocabulary (the host stops at the Lorsa's layer, so the vocabulary does not weigh
on the pipeline), built from a LlamaConfig: nothing is downloaded. It trains with `hf-lorsa train`'s defaults
on the shared stories at expansion 8, K 64, context 1024, 4 sequences per step (`bench.py --pipeline` runs the
same). Prints one JSON line: tokens per second of the training loop after its first steps, the whole
command's wall clock, the peak GPU memory and the held-out FVU and dead heads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from hf_lorsa.base.usage import quiet_when_not_a_terminal
from hf_lorsa.embedded import STORIES_MODEL
from hf_lorsa.training.run_training import parse, train

SHARED = Path(__file__).resolve().parents[2] / "shared"
# host config, plus the Lorsa's layer, the tokens per window (context) and the default --max_tokens (tokens)
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, rope_theta=500000.0, layer=8, context=1024, tokens=2_000_000),
    "wide": dict(hidden_size=2048, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=32,
                 num_key_value_heads=8, rope_theta=500000.0, layer=1, context=256, tokens=204_800),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0, layer=1, context=128, tokens=16384),
}  # fmt: skip


class StepClock(TrainerCallback):
    """Wall-clock time of each optimizer step (the first ones include warm-up and compilation)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


class StepProfiler(TrainerCallback):
    """torch.profiler over optimizer steps [first, last): prints the operators that take the most time (device
    time on a GPU, CPU time otherwise), the host's forward included as `hf_lorsa.host_activations`."""

    def __init__(self, first: int = 6, last: int = 10, rows: int = 30):
        self.first, self.last, self.rows, self.profiler = first, last, rows, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and state.global_step == self.last:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            steps = self.last - self.first
            print(f"profile of steps {self.first}-{self.last - 1} ({steps} steps), sorted by {key}:", flush=True)
            print(self.profiler.key_averages().table(sort_by=key, row_limit=self.rows), flush=True)
            print(self.profiler.key_averages().table(sort_by="cpu_time_total", row_limit=12), flush=True)
            self.profiler = None


def stories_config(**shape) -> LlamaConfig:
    """A Llama config of `shape` with the stories260K tokenizer's vocabulary and special tokens, tied embeddings."""
    vocab = len(json.loads((STORIES_MODEL / "tokenizer.json").read_text())["model"]["vocab"])
    return LlamaConfig(**shape, vocab_size=vocab, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=True)  # fmt: skip


def save_random_host(config: LlamaConfig, folder: Path) -> None:
    """Save a random-weight host of `config` (seed 0) with the stories260K tokenizer into `folder`."""
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES_MODEL / name, folder / name)


def random_host(shape: str, folder: Path) -> int:
    """Save a random-weight host of `shape` with the stories tokenizer into `folder`; returns its Lorsa layer."""
    spec = {k: v for k, v in SHAPES[shape].items() if k not in ("layer", "context", "tokens")}
    save_random_host(stories_config(**spec), folder)
    return SHAPES[shape]["layer"]


def run(shape: str, max_tokens: int, shared: Path, extra: list[str], profile: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        host = Path(tmp, "host")
        layer = random_host(shape, host)
        context = SHAPES[shape]["context"]
        options = [
            f"--model_name_or_path={host}", f"--layer={layer}", "--dataset=hf_lorsa:stories260K",
            "--expansion_factor=8", "--top_k=64", f"--context_length={context}", "--batch_size=4",
            f"--max_tokens={max_tokens}", "--holdout_fraction=0.02", "--eval_tokens=65536", f"--output_dir={tmp}/run",
            "--report_to=none", "--save_steps=1000000", "--disable_tqdm=true", *extra,
        ]  # fmt: skip
        clock = StepClock()
        callbacks = [clock, StepProfiler()] if profile else [clock]
        warmup_steps = 12 if profile else 5  # the timing starts after the profiled steps
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        lorsa = train(*parse(options), callbacks=callbacks)
        wall = time.perf_counter() - start
    per_step = 4 * context
    timed = clock.ends[warmup_steps:]
    loop = (timed[-1] - timed[0]) / (len(timed) - 1) if len(timed) > 1 else float("nan")
    results = lorsa.eval_results or {}
    out = {
        "shape": shape, "layer": layer, "d_model": lorsa.config.d_model, "n_ov_heads": lorsa.config.n_ov_heads,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "tokens_trained": lorsa.config.tokens_trained, "steps": len(clock.ends),
        "train_tokens_per_s": round(per_step / loop, 1), "wall_s": round(wall, 1),
        "fvu": results.get("fvu"), "dead_heads": results.get("dead_heads"), "max_frequency": results.get("max_frequency"),
    }  # fmt: skip
    if torch.cuda.is_available():
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--max_tokens", type=int, default=None, help="default: 2M tokens (wide: 200K, tiny: 16K)")
    parser.add_argument("--shared", default=str(SHARED), help="the folder holding models/ and data/")
    parser.add_argument("--profile", action="store_true", help="print where steps 6-9 spend their time")
    args, extra = parser.parse_known_args()
    quiet_when_not_a_terminal()
    max_tokens = args.max_tokens or SHAPES[args.shape]["tokens"]
    print(json.dumps(run(args.shape, max_tokens, Path(args.shared), extra, args.profile)), flush=True)


if __name__ == "__main__":
    main()
