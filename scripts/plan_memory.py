"""Memory to plan a training run with, for hosts of Llama-3.2-1B, Llama-3.1-8B and Llama-3.1-70B shape.

    python scripts/plan_memory.py [--layer 8] [--expansion_factor 8] [--top_k 64] [--context_length 1024] [--batch_size 4]

The hosts are built from their configs on the meta device: nothing is downloaded or allocated. One JSON line per host,
in GiB, the host and the Lorsa apart:

- host_loaded: the embeddings, the blocks up to --layer, the final norm and the unembedding in bfloat16, counted from
  the model the truncated config builds (what training loads); host_whole: every block (what evaluation loads);
- host_activations: the forward pass up to the layer without gradients, batch x context x (2 d_model + 3 intermediate)
  bfloat16 values at the widest point (the MLP), plus the layer's input and output kept in float32;
- lorsa_states: the Lorsa's float32 weights, their gradients and Adam's two moments, 16 bytes a parameter, counted
  from the Lorsa the config builds;
- lorsa_activations: a train step's, LORSA_STEP_BYTES per token and OV head, measured on an H100 at Llama-3.1-8B size
  (BENCHMARKS.md, "Train-step throughput", config c: 9.82 GiB peak, of which 8.0 GiB states);
- peak: their sum for training (host_loaded + host_activations + lorsa_states + lorsa_activations).
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_lorsa import LorsaConfig, LorsaModel
from hf_lorsa.host.families import truncated_config

GIB = 2**30
LORSA_STEP_BYTES = 14.5  # (9.82 GiB - 16 x 536,973,312 bytes) / (4,096 tokens x 32,768 heads), H100, bf16 autocast
HOSTS = {
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
    "Llama-3.1-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}  # fmt: skip


def parameter_count(module: torch.nn.Module) -> int:
    """Parameters of a module, tied ones once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def plan(config: LlamaConfig, layer: int, expansion_factor: int, top_k: int, context: int, batch: int) -> dict:
    with torch.device("meta"):
        loaded = AutoModelForCausalLM.from_config(truncated_config(config, layer + 1))
        whole = AutoModelForCausalLM.from_config(config)
        lorsa_config = LorsaConfig(
            d_model=config.hidden_size, n_ov_heads=expansion_factor * config.hidden_size, top_k=top_k,
            n_qk_heads=expansion_factor * config.hidden_size // config.head_dim, d_qk_head=config.head_dim,
        )  # fmt: skip
        lorsa = LorsaModel(lorsa_config)
    tokens = batch * context
    sizes = {
        "host_loaded": parameter_count(loaded) * 2,
        "host_whole": parameter_count(whole) * 2,
        "host_activations": tokens * (2 * config.hidden_size + 3 * config.intermediate_size) * 2
        + tokens * 2 * config.hidden_size * 4,
        "lorsa_states": parameter_count(lorsa) * 16,
        "lorsa_activations": tokens * lorsa_config.n_ov_heads * LORSA_STEP_BYTES,
    }
    sizes["peak"] = sum(v for k, v in sizes.items() if k != "host_whole")
    return {k: round(v / GIB, 2) for k, v in sizes.items()} | {"lorsa_parameters": parameter_count(lorsa)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--expansion_factor", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--context_length", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=4)
    args = parser.parse_args()
    for name, shape in HOSTS.items():
        sizes = plan(LlamaConfig(**shape), args.layer, args.expansion_factor, args.top_k, args.context_length,
                     args.batch_size)  # fmt: skip
        print(json.dumps({"host": name, "layer": args.layer, "tokens_per_step": args.batch_size * args.context_length,
                          **sizes}))  # fmt: skip


if __name__ == "__main__":
    main()
