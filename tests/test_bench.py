"""scripts/bench.py --interleave: each variant's own settings at each of its steps, one result per variant."""

import importlib.util
from pathlib import Path

import torch

import hf_lorsa.causal_attention as ca
import hf_lorsa.sparse_gradient_attention as sga

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", SCRIPTS / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_interleaved_variants_keep_their_own_attention_backward(monkeypatch):
    bench = load_bench()
    # 16 OV heads per 8-wide QK head, K 2 of 64: the sparse-gradient attention, sparse under DENSE_SHARE
    tiny = dict(d_model=32, n_qk_heads=4, d_qk_head=8, n_ov_heads=64, top_k=2, batch=2, context=16)
    monkeypatch.setitem(bench.CONFIGS, "t", tiny)
    monkeypatch.setattr(sga, "DENSE_SHARE", sga.DENSE_SHARE)  # restored afterwards: the variants set it
    monkeypatch.setattr(ca, "PACKED_ROW_SHARE", ca.PACKED_ROW_SHARE)
    shares = []
    sparse = sga._sparse_products
    monkeypatch.setattr(sga, "_sparse_products", lambda *a: shares.append(sga.DENSE_SHARE) or sparse(*a))
    variants = [("auto", "adam", "topk", "auto"), ("auto", "adam", "topk", "full")]
    results = bench.interleaved("t", torch.device("cpu"), steps=3, warmup=1, variants=variants)
    assert [r["attention_backward"] for r in results] == ["auto", "full"]
    assert all(r["median_step_s"] > 0 and r["tokens_per_step"] == 32 for r in results)
    assert shares == [bench.DENSE_SHARE] * 4  # the auto variant's 1 + 3 steps only: "full" took the dense products
