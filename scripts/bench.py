"""Train-step throughput of LorsaModel (forward + backward + Adam step), median over several steps.

python scripts/bench.py                 # configs a and b on the CPU (c too on CUDA)
python scripts/bench.py --configs c --device cuda
python scripts/bench.py --configs c --device cuda --top_k 32768   # K = n_ov (the start of K annealing): memory
python scripts/bench.py --decode auto,gather --optimizer adam,fused   # every pair: the decodes; fused Adam (the Trainer's)
python scripts/bench.py --act_fn topk,batchtopk    # per-position top-k against BatchTopK (training's default)
python scripts/bench.py --configs a,s --attention_backward auto,full   # CPU: the backward over read rows, or all
python scripts/bench.py --configs a,s --attention_backward 0.5,0.65,0.8   # CPU: pack groups up to this share of rows
python scripts/bench.py --configs b --attention_backward auto,full --interleave   # variants a step each in turn
python scripts/bench.py --configs b --projections auto,plain --interleave   # CPU: head by head and in blocks, or not
python scripts/bench.py --configs b --context 1024   # another sequence length than the config's
python scripts/bench.py --pipeline [--shape tiny]  # host forward + Lorsa step on a random host (bench_pipeline.py)
python scripts/bench.py --allocator system   # glibc's own thresholds (the default keeps freed memory, as training does)
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from hf_lorsa import LorsaConfig, LorsaModel
from hf_lorsa.kernels import blocked_projection, causal_attention, sparse_gradient_attention
from hf_lorsa.kernels.freed_memory import keep_freed_memory
from hf_lorsa.model import qk_projection
from hf_lorsa.model.selection import room_per_position

ROW_SHARE = causal_attention.PACKED_ROW_SHARE
DENSE_SHARE = sparse_gradient_attention.DENSE_SHARE
HEAD_PRODUCT_WIDTH, BLOCK_ROWS = qk_projection.HEAD_PRODUCT_WIDTH, blocked_projection.BLOCK_ROWS
CONFIGS = {
    "a": dict(d_model=64, n_qk_heads=64, d_qk_head=8, n_ov_heads=512, top_k=16, batch=32, context=256),
    "b": dict(d_model=768, n_qk_heads=48, d_qk_head=64, n_ov_heads=6144, top_k=64, batch=2, context=256),
    "c": dict(d_model=4096, n_qk_heads=256, d_qk_head=128, n_ov_heads=32768, top_k=128, batch=4, context=1024),
    # SmolLM2-135M's sizes with the default QK heads (n_ov / head width): only when named in --configs
    "s": dict(d_model=576, n_qk_heads=36, d_qk_head=64, n_ov_heads=2304, top_k=32, batch=2, context=1024),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def is_share(text: str) -> bool:
    """Whether `text` is a share of rows in (0, 1] (`--attention_backward`)."""
    try:
        return 0 < float(text) <= 1
    except ValueError:
        return False


def use_backward(attention_backward: str) -> None:
    """Set the CPU attention backward's module settings for `--attention_backward`: "full": no group of query rows
    counts as sparse, so the backward covers every row, as SDPA's does, and values wider than the queries take the
    dense products; a number: the share of rows up to which a group is packed (causal_attention.PACKED_ROW_SHARE)."""
    shares = {"auto": ROW_SHARE, "full": -1.0}
    causal_attention.PACKED_ROW_SHARE = (
        shares[attention_backward] if attention_backward in shares else float(attention_backward)
    )
    sparse_gradient_attention.DENSE_SHARE = -1.0 if attention_backward == "full" else DENSE_SHARE


def use_projections(projections: str) -> None:
    """Set the CPU projections' module settings for `--projections`: "plain": queries and keys in one product over
    weights copied into pair order, the value projection in one product; "auto": the modules' own choice (head by
    head, blocks of rows)."""
    plain = projections == "plain"
    qk_projection.HEAD_PRODUCT_WIDTH = sys.maxsize if plain else HEAD_PRODUCT_WIDTH
    blocked_projection.BLOCK_ROWS = sys.maxsize if plain else BLOCK_ROWS


def prepare(
    name: str,
    device: torch.device,
    top_k: int | None = None,
    decode: str = "auto",
    optimizer: str = "adam",
    act_fn: str = "topk",
    attention_backward: str = "auto",
    projections: str = "auto",
    context: int | None = None,
) -> tuple[Callable[[], float], dict]:
    """One variant: a function that takes a train step and returns its seconds, and the result's fields."""
    use_backward(attention_backward)
    use_projections(projections)
    spec = dict(CONFIGS[name])
    batch, default_context = spec.pop("batch"), spec.pop("context")
    context = context or default_context
    if top_k is not None:
        spec["top_k"] = min(top_k, spec["n_ov_heads"])
    config = LorsaConfig(
        **spec,
        max_position_embeddings=context,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        act_fn=act_fn,
    )
    torch.manual_seed(0)
    with device:  # built on the device: no CPU initialisation of large weights
        model = LorsaModel(config).train()
    model.dense_decode = {"auto": None, "dense": True, "gather": False}[decode]
    fused = optimizer == "fused"
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused or None)
    x = torch.randn(batch, context, config.d_model, device=device)
    y = torch.randn(batch, context, config.d_model, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        use_backward(attention_backward)  # module settings: another variant may have set its own
        use_projections(projections)
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss = (model(x).reconstruction.float() - y).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - start

    room = room_per_position(config.n_ov_heads, config.top_k, act_fn)  # K' of the decode (K active on average)
    result = {
        "config": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "top_k": config.top_k,
        "act_fn": act_fn,
        "decode": "dense" if model.uses_dense_decode(room, device) else "gather",
        "optimizer": "fused Adam" if fused else "Adam",
        "attention_backward": attention_backward,
        "projections": projections,
        "tokens_per_step": batch * context,
    }
    return step, result


def finish(result: dict, times: list[float], device: torch.device, peak: bool = True) -> dict:
    """The result's timing fields: median step, tokens per second (and CUDA's peak memory, `peak`: of this variant
    alone)."""
    median = statistics.median(times)
    result = {**result, "median_step_s": round(median, 5), "tokens_per_s": round(result["tokens_per_step"] / median, 1)}
    if peak and device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def bench(name: str, device: torch.device, steps: int, warmup: int, *variant: str, top_k=None, context=None) -> dict:
    """One variant (`prepare`'s decode, optimizer, act_fn, attention_backward, projections), `warmup` untimed steps,
    then `steps`."""
    step, result = prepare(name, device, top_k, *variant, context=context)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(warmup + steps)][warmup:]
    return finish(result, times, device)


def interleaved(name: str, device: torch.device, steps: int, warmup: int, variants, top_k=None, context=None):
    """Several variants of one config in one process, one step of each in turn (the order rotating), so that a
    machine whose speed drifts slows them alike: their ratios compare where separate runs' do not."""
    prepared = [prepare(name, device, top_k, *variant, context=context) for variant in variants]
    for step, _ in prepared:
        for _ in range(warmup):
            step()
    times = [[] for _ in prepared]
    for i in range(steps):
        for j in range(len(prepared)):
            k = (i + j) % len(prepared)
            times[k].append(prepared[k][0]())
    return [finish(result, t, device, peak=False) for (_, result), t in zip(prepared, times)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=None, help="comma-separated subset of a,b,c,s")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top_k", type=int, default=None, help="K instead of each config's (at most n_ov)")
    parser.add_argument("--context", type=int, default=None, help="positions per sequence instead of each config's")
    parser.add_argument(
        "--decode",
        default="auto",
        help="comma-separated auto, dense, gather (auto: the model's choice for the size and device)",
    )
    parser.add_argument(
        "--optimizer",
        default="adam",
        help="comma-separated adam (torch.optim.Adam, as in the "
        "authors' benchmark), fused (fused Adam, as the Trainer uses)",
    )
    parser.add_argument(
        "--act_fn", default="topk", help="comma-separated topk (the authors' rule), batchtopk (training's default)"
    )
    parser.add_argument(
        "--attention_backward",
        default="auto",
        help="comma-separated auto (CPU: over the query rows a kept head reads, or the gradient's nonzeros where values "
        "are wider than queries), full (every row, dense products), or a share of rows in (0, 1] up to which a group "
        "of (batch, QK head) pairs is packed",
    )
    parser.add_argument(
        "--projections",
        default="auto",
        help="comma-separated auto (CPU: queries and keys head by head for heads 32 wide or more, the value "
        "projection in blocks of rows), plain (one product each, weights copied into pair order)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time the variants of each config in one process, a step of each in turn (a drifting machine slows "
        "them alike), instead of one after another",
    )
    parser.add_argument(
        "--allocator",
        default="keep",
        choices=("keep", "system"),
        help="keep: freed memory stays in the process, as in training (hf_lorsa.kernels.freed_memory); system: glibc's "
        "thresholds as the environment sets them",
    )
    parser.add_argument("--pipeline", action="store_true", help="time the whole pipeline instead (bench_pipeline.py)")
    args, extra = parser.parse_known_args()
    kept = args.allocator == "keep" and keep_freed_memory()
    if args.pipeline:
        import bench_pipeline

        sys.argv = [bench_pipeline.__file__, *extra]
        return bench_pipeline.main()
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    device = torch.device(args.device)
    names = args.configs.split(",") if args.configs else (["a", "b", "c"] if device.type == "cuda" else ["a", "b"])
    decodes, optimizers, act_fns = args.decode.split(","), args.optimizer.split(","), args.act_fn.split(",")
    backwards, projections = args.attention_backward.split(","), args.projections.split(",")
    choices = (
        (names, tuple(CONFIGS)),
        (decodes, ("auto", "dense", "gather")),
        (optimizers, ("adam", "fused")),
        (act_fns, ("topk", "batchtopk")),
        (backwards, ("auto", "full", *(b for b in backwards if is_share(b)))),
        (projections, ("auto", "plain")),
    )
    for choice, allowed in choices:
        if not set(choice) <= set(allowed):
            parser.error(f"choose among {', '.join(allowed)}, got {','.join(choice)}")
    variants = list(itertools.product(decodes, optimizers, act_fns, backwards, projections))
    for name in names:
        if args.interleave:
            results = interleaved(name, device, args.steps, args.warmup, variants, args.top_k, args.context)
        else:
            results = (
                bench(name, device, args.steps, args.warmup, *v, top_k=args.top_k, context=args.context)
                for v in variants
            )
        for result in results:
            print(json.dumps({**result, "freed_memory": "kept" if kept else "system"}), flush=True)


if __name__ == "__main__":
    main()
