"""The reconstruction floor of a dictionary of this size (BENCHMARKS.md, "The recipe at every depth"): a top-K SAE with
as many latents as the Lorsa has heads, the same K and the same tokens, trained on the same layers' attention outputs.

    python scripts/bench_sae_bound.py [--layers 3,9,15,18,24,29] [--shared DIR] [--latents 2304] [--top_k 32]
                                      [--max_tokens 300000] [--learning_rate 1e-3]

One host pass per batch (4 windows of 256 tokens of the embedded stories, the last 10% held out, as
scripts/bench_depth.py) feeds one SAE per layer; each SAE reconstructs the attention output from itself (encoder,
ReLU, the top K, unit-norm decoder; Adam, the learning rate constant after a 2% warmup). Prints one JSON line per
layer: the held-out FVU on the first 10,240 held-out tokens (bench_depth.py's), at the end. A benchmark, not a
feature: it says how far a Lorsa's FVU is from what any sparse dictionary of that size reaches on that budget.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hf_lorsa.host.attention_mask import counted_positions
from hf_lorsa.host.hooks import collect_layers
from hf_lorsa.inputs.activations import document_separator, load_text, pack, skip_tokens, split_holdout
from hf_lorsa.inputs.loading import open_host, open_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HELD_OUT_WINDOWS = 40


class TopKSAE(torch.nn.Module):
    def __init__(self, d: int, latents: int, k: int, mean: torch.Tensor):
        super().__init__()
        decoder = torch.nn.functional.normalize(torch.randn(latents, d), dim=-1)
        self.W_dec = torch.nn.Parameter(decoder)
        self.W_enc = torch.nn.Parameter(decoder.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(latents))
        self.b_dec = torch.nn.Parameter(mean.clone())
        self.k = k

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        pre = (y - self.b_dec) @ self.W_enc + self.b_enc
        top = pre.relu().topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values) @ self.W_dec + self.b_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.data = torch.nn.functional.normalize(self.W_dec.data, dim=-1)


def fvu(sae: TopKSAE, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((sae(y) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="3,9,15,18,24,29")
    parser.add_argument("--shared", default=str(SHARED))
    parser.add_argument("--latents", type=int, default=2304)
    parser.add_argument("--top_k", type=int, default=32)
    parser.add_argument("--max_tokens", type=int, default=300_000)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    args = parser.parse_args()
    layers = [int(layer) for layer in args.layers.split(",")]
    torch.manual_seed(0)
    host_dir = str(Path(args.shared) / "models" / "smollm2-135m-instruct-q4")
    tokenizer, host = open_tokenizer(host_dir, GGUF), open_host(host_dir, GGUF)
    separator = document_separator(tokenizer)
    skip = skip_tokens(tokenizer, separator)
    train_text, held_text = split_holdout(load_text("hf_lorsa:stories260K"), 0.1)
    windows = pack(train_text, tokenizer, 256, "text", separator).shuffle(seed=0)
    held = torch.tensor(pack(held_text, tokenizer, 256, "text", separator)[:HELD_OUT_WINDOWS]["input_ids"])

    def outputs(ids: torch.Tensor) -> dict[int, torch.Tensor]:
        counted = counted_positions(ids, skip).flatten()
        records = collect_layers(host, layers, input_ids=ids)
        return {layer: records[layer].attention_output.float().flatten(0, 1)[counted] for layer in layers}

    held_y = outputs(held)
    saes, optimizers = {}, {}
    steps = args.max_tokens // 1024
    for step in range(steps):
        ys = outputs(torch.tensor(windows[step * 4 : step * 4 + 4]["input_ids"]))
        for layer, y in ys.items():
            if layer not in saes:
                saes[layer] = TopKSAE(y.shape[-1], args.latents, args.top_k, y.mean(0))
                optimizers[layer] = torch.optim.Adam(saes[layer].parameters(), lr=args.learning_rate)
            for group in optimizers[layer].param_groups:
                group["lr"] = args.learning_rate * min(1.0, (step + 1) / max(1, int(0.02 * steps)))
            loss = (saes[layer](y) - y).pow(2).sum(-1).mean()
            optimizers[layer].zero_grad()
            loss.backward()
            optimizers[layer].step()
            saes[layer].normalize_decoder()
    for layer in layers:
        print(json.dumps({"layer": layer, "latents": args.latents, "top_k": args.top_k, "tokens": steps * 1024,
                          "held_out_fvu": round(fvu(saes[layer], held_y[layer]), 4)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
