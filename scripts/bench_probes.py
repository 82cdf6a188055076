"""What the mechanism probes find in a Lorsa and its host layer (BENCHMARKS.md, "Mechanisms found").

    python scripts/bench_probes.py --lorsa DIR [--model_name_or_path M] [--gguf_file F]

Prints, per probe, every host head's score, how many Lorsa heads score 0.5 or more, and for each host head scoring
0.5 or more the Lorsa heads that do too inside its OV subspace and the share of its output on the probe they
reconstruct together (the `mechanisms` that `hf-lorsa analyze` saves), as one JSON line. The host defaults to the Lorsa's recorded base model.
"""

from __future__ import annotations

import argparse
import json

from hf_lorsa import LorsaModel
from hf_lorsa.analysis.analysis import host_correspondence, mechanisms
from hf_lorsa.analysis.probes import probe_scores
from hf_lorsa.inputs.loading import open_host, open_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lorsa", required=True)
    parser.add_argument("--model_name_or_path")
    parser.add_argument("--gguf_file")
    args = parser.parse_args()
    lorsa = LorsaModel.from_pretrained(args.lorsa).eval()
    name = args.model_name_or_path or lorsa.config.base_model_name_or_path
    gguf = args.gguf_file or lorsa.config.base_model_gguf_file
    host, tokenizer = open_host(name, gguf), open_tokenizer(name, gguf)
    scores = probe_scores(host, lorsa, tokenizer)
    found = mechanisms(scores, host_correspondence(host, lorsa), host, lorsa, tokenizer)
    summary = {"layer": lorsa.config.layer, "n_ov_heads": lorsa.config.n_ov_heads}
    for probe, result in found.items():
        if isinstance(result, dict) and "host_scores" in result:
            summary[probe] = {
                "host_scores": [round(s, 2) for s in result["host_scores"]],
                "lorsa_heads_at_least_0.5": result["lorsa_heads"],
                "per_host_head": {h: {"lorsa_heads": len(heads), "best": heads[:3],
                                      "output_reconstructed": result.get("reconstructed", {}).get(h)}
                                  for h, heads in result["host_heads"].items()},
            }  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
