"""Memory to plan a training run with, for hosts of Llama-3.2-1B, Llama-3.1-8B and Llama-3.1-70B shape.

    python scripts/plan_memory.py [--layer 8] [--expansion_factor 8] [--top_k 64] [--context_length 1024] [--batch_size 4]
    python scripts/plan_memory.py --device cpu    # a run on the CPU: float32 host, the process's own memory

The hosts are built from their configs on the meta device: nothing is downloaded or allocated. One JSON line per host,
in GiB, the host and the Lorsa apart:

- process: on the CPU, the process itself (Python and the libraries, the tokenised data, what the allocator keeps);
- host_loaded: the embeddings, the blocks up to --layer, the final norm and the unembedding (bfloat16 on a GPU,
  float32 on the CPU), counted from the model the truncated config builds (what training loads); host_whole: every
  block (what evaluation loads);
- host_activations: the forward pass up to the layer without gradients, batch x context x (2 d_model + 3 intermediate)
  values at the widest point (the MLP), plus the layer's input and output kept in float32;
- lorsa_states: the Lorsa's float32 weights, their gradients and Adam's two moments, 16 bytes a parameter, counted
  from the Lorsa the config builds;
- best_weights: the collapse guard's copy of the best weights (4 bytes a parameter), in the CPU's memory (beside
  the GPU's, on a GPU);
- lorsa_activations: a train step's, per token and OV head: LORSA_STEP_BYTES on a GPU, measured on an H100 at
  Llama-3.1-8B size (BENCHMARKS.md, "Train-step throughput", config c: 9.82 GiB peak, of which 8.0 GiB states);
  CPU_STEP_BYTES on the CPU, fitted to real peaks (`scripts/check_memory_plan.py`, which checks the plan);
- peak: their sum for training, on the device (a GPU: host_loaded + host_activations + lorsa_states +
  lorsa_activations; the CPU: every part but host_whole).
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
# On the CPU (float32, no autocast), fitted to two shapes of `scripts/check_memory_plan.py`, the smallest and the
# largest tokens x heads ("small": 1.12 and 1.14 GiB measured, "1b-width-batch": 6.00 and 5.99 GiB), whose peaks above
# the counted parts are CPU_PROCESS_BYTES + CPU_STEP_BYTES x tokens x OV heads: the process (Python, torch,
# transformers, datasets, the tokenised stories, what the allocator keeps) and a train step's activations with AuxK
# and the revival of dead heads (float32 (N, Hov) tensors, several at once). The other shapes check it.
CPU_STEP_BYTES = 60.5
CPU_PROCESS_BYTES = 690 * 2**20
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


DEVICES = {  # bytes of a host weight, of a host activation; the Lorsa step's bytes per token and OV head; the process
    "cuda": dict(host=2, activation=2, step=LORSA_STEP_BYTES, process=0),
    "cpu": dict(host=4, activation=4, step=CPU_STEP_BYTES, process=CPU_PROCESS_BYTES),
}


def plan(config: LlamaConfig, layer: int, expansion_factor: int, top_k: int, context: int, batch: int,
         device: str = "cuda") -> dict:  # fmt: skip
    bytes_of = DEVICES[device]
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
        "process": bytes_of["process"],
        "host_loaded": parameter_count(loaded) * bytes_of["host"],
        "host_whole": parameter_count(whole) * bytes_of["host"],
        "host_activations": tokens * (2 * config.hidden_size + 3 * config.intermediate_size) * bytes_of["activation"]
        + tokens * 2 * config.hidden_size * 4,
        "lorsa_states": parameter_count(lorsa) * 16,
        "best_weights": parameter_count(lorsa) * 4,
        "lorsa_activations": tokens * lorsa_config.n_ov_heads * bytes_of["step"],
    }
    # the collapse guard's copy of the best weights is in the CPU's memory, beside the device's on a GPU
    elsewhere = ("host_whole",) if device == "cpu" else ("host_whole", "best_weights", "process")
    sizes["peak"] = sum(v for k, v in sizes.items() if k not in elsewhere)
    return {k: round(v / GIB, 2) for k, v in sizes.items()} | {"lorsa_parameters": parameter_count(lorsa)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=8)
    parser.add_argument("--expansion_factor", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--context_length", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--device", choices=sorted(DEVICES), default="cuda", help="where the run trains")
    args = parser.parse_args()
    for name, shape in HOSTS.items():
        sizes = plan(LlamaConfig(**shape), args.layer, args.expansion_factor, args.top_k, args.context_length,
                     args.batch_size, args.device)  # fmt: skip
        print(json.dumps({"host": name, "layer": args.layer, "tokens_per_step": args.batch_size * args.context_length,
                          **sizes}))  # fmt: skip


if __name__ == "__main__":
    main()
