"""The memory of an analysis at the size researchers train (BENCHMARKS.md, "Analysis memory").

    python scripts/bench_analysis_memory.py [--heads 16384] [--tokens 1000000]

Analyses a Lorsa of --heads heads (initialised from the host, top_k 16) on layer 2 of the embedded stories260K host over
--tokens tokens of its embedded stories (256-token windows; the stories hold about 1.37M tokens), and prints one JSON
line: the wall time, the process's resident memory before the analysis and its peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from datasets import load_dataset

from hf_lorsa import LorsaModel
from hf_lorsa.analysis.analysis import analyze
from hf_lorsa.embedded import STORIES_MODEL, STORIES_TEXT
from hf_lorsa.inputs.activations import pack
from hf_lorsa.inputs.loading import host_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=16_384)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    args = parser.parse_args()
    model, tokenizer = host_and_tokenizer(str(STORIES_MODEL), None, "float32", "cpu")
    windows = pack(load_dataset("json", data_files=str(STORIES_TEXT), split="train"), tokenizer, 256)
    lorsa = LorsaModel.from_host(model, 2, n_ov_heads=args.heads, top_k=16)
    lorsa.config.skip_token_ids = [1]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    table = analyze(model, lorsa, windows, args.tokens, tokenizer=tokenizer, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"heads": args.heads, "tokens": json.loads(table.info.description)["n_tokens"],
                      "wall_s": round(time.perf_counter() - start, 1), "before_mib": round(before),
                      "peak_mib": round(peak)}))  # fmt: skip


if __name__ == "__main__":
    main()
