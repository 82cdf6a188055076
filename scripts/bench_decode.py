"""Where the dense decode overtakes the gather (modeling_lorsa.DENSE_DECODE_RATIO; BENCHMARKS.md).

    python scripts/bench_decode.py [--device cpu|cuda] [--threads 2]

Times forward + backward of the decode alone, both ways, for a range of K at the sizes of configs a and b of
scripts/bench.py and of SmolLM2-135M at expansion 8, and prints one JSON line per (size, K).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

SIZES = {"a": (8192, 512, 64), "b": (512, 6144, 768), "smollm2": (2048, 4608, 576)}  # tokens, heads, d_model


def gather(values, indices, w_o):
    return F.embedding_bag(indices, w_o, per_sample_weights=values, mode="sum")


def dense(values, indices, w_o):
    return values.new_zeros(values.shape[0], w_o.shape[0]).scatter(-1, indices, values) @ w_o


def time_ms(fn, values, indices, w_o, device, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(values, indices, w_o).square().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    for name, (n, heads, d) in SIZES.items():
        w_o = torch.randn(heads, d, device=device, requires_grad=True)
        for k in (16, 32, 64, 128, 256, 512, 1024):
            if k > heads:
                continue
            z = torch.randn(n, heads, device=device)
            indices = z.topk(k, dim=-1).indices
            values = z.gather(-1, indices).requires_grad_()
            row = {"size": name, "tokens": n, "heads": heads, "d_model": d, "k": k, "k_over_heads": round(k / heads, 4)}
            row["gather_ms"] = round(time_ms(gather, values, indices, w_o, device), 2)
            row["dense_ms"] = round(time_ms(dense, values, indices, w_o, device), 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
