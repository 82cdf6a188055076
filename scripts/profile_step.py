"""Where a LorsaModel train step spends its time: torch.profiler table of one bench config.

    python scripts/profile_step.py --config c --device cuda

Also times the step with torch.optim.Adam's default (bench.py's: on the CPU a loop over the parameters, since
foreach is the default on CUDA only), foreach and fused implementations (mean of 10 steps); the Trainer's default
optimizer is the fused one. The table profiles the fused one. Freed memory stays in the process, as in training
(`hf_lorsa.kernels.freed_memory`).
"""

from __future__ import annotations

import argparse
import time

import torch
from bench import CONFIGS, synchronize
from torch.profiler import ProfilerActivity, profile

from hf_lorsa import LorsaConfig, LorsaModel
from hf_lorsa.kernels.freed_memory import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="a", choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    keep_freed_memory()
    device = torch.device(args.device)
    spec = dict(CONFIGS[args.config])
    batch, context = spec.pop("batch"), spec.pop("context")
    config = LorsaConfig(
        **spec, max_position_embeddings=context, rope_parameters={"rope_type": "default", "rope_theta": 1e4}
    )
    with device:  # built on the device: no CPU initialisation of large weights
        model = LorsaModel(config).train()
    x = torch.randn(batch, context, config.d_model, device=device)
    y = torch.randn_like(x)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for implementation in ("default", "foreach", "fused"):  # default: as bench.py builds it (per tensor on the CPU)
        flags = {} if implementation == "default" else {implementation: True}
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, **flags)

        def step(optimizer=optimizer):
            with autocast:
                loss = (model(x).reconstruction.float() - y).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(10):
            step()
        synchronize(device)
        print(
            f"config {args.config}, Adam {implementation}: {(time.perf_counter() - start) * 100:.2f} ms per step",
            flush=True,
        )
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"  # on the CPU, time in the op itself
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
