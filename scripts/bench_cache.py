"""Activations once, dictionaries many (BENCHMARKS.md, "Activations once, dictionaries many").

    python scripts/bench_cache.py [--layer 18] [--sizes 1,2,4] [--max_tokens 40960] [--documents 300] [--shared DIR]

Trains Lorsas of each expansion factor in --sizes on one layer of SmolLM2-135M-Instruct (4-bit GGUF), with the same
token budget, twice, one after the other on the same machine: as full runs that each run the host, and from one
activation cache (the first run writes it, the others read it). Prints one JSON line per run (wall clock of the
whole command and of its training loop) and the totals. No held-out evaluation, so that training dominates.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench_layers import SHARED, timed_train  # the same SmolLM2 training command, timed (scripts/ is on the path)

STORIES = Path(__file__).resolve().parents[1] / "src" / "hf_lorsa" / "embedded" / "stories260K-stories.jsonl"


def run(
    expansion: int, layer: int, output: Path, shared: Path, max_tokens: int, cache: Path | None, data: Path
) -> dict:
    options = [f"--layer={layer}", f"--dataset={data}", f"--expansion_factor={expansion}", "--top_k=16",
               f"--max_tokens={max_tokens}", "--holdout_fraction=0", f"--output_dir={output}",
               *([f"--activation_cache={cache}"] if cache else [])]  # fmt: skip
    wall, runtime = timed_train(options, shared)
    return {"expansion_factor": expansion, "cache": bool(cache), "wall_s": round(wall, 1), "train_loop_s": runtime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=18)
    parser.add_argument("--sizes", default="1,2,4")
    parser.add_argument("--max_tokens", type=int, default=40_960)
    parser.add_argument("--documents", type=int, default=300)
    parser.add_argument("--shared", type=Path, default=SHARED)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    totals = {}
    with tempfile.TemporaryDirectory() as folder:
        # a cache holds every window of its dataset: the first --documents stories, about the budget's tokens
        data = Path(folder, "stories.jsonl")
        data.write_text("".join(STORIES.read_text().splitlines(keepends=True)[: args.documents]))
        for cached in (False, True):
            cache = Path(folder, "cache") if cached else None
            rows = [run(e, args.layer, Path(folder, f"{e}-{cached}"), args.shared, args.max_tokens, cache, data)
                    for e in sizes]  # fmt: skip
            for row in rows:
                print(json.dumps(row), flush=True)
            totals["from one cache" if cached else "full runs"] = round(sum(r["wall_s"] for r in rows), 1)
    print(json.dumps({"layer": args.layer, "sizes": sizes, "max_tokens": args.max_tokens, "total_wall_s": totals}))


if __name__ == "__main__":
    main()
