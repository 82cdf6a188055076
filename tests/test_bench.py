"""scripts/bench.py --interleave: each variant's own settings at each of its steps, one result per variant."""

import importlib.util
from pathlib import Path

import torch

import hf_lorsa.kernels.blocked_projection as bp
import hf_lorsa.kernels.causal_attention as ca
import hf_lorsa.kernels.sparse_gradient_attention as sga
import hf_lorsa.model.qk_projection as qkp

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
    variants = [("auto", "adam", "topk", "auto", "auto"), ("auto", "adam", "topk", "full", "auto")]
    results = bench.interleaved("t", torch.device("cpu"), steps=3, warmup=1, variants=variants)
    assert [r["attention_backward"] for r in results] == ["auto", "full"]
    assert all(r["median_step_s"] > 0 and r["tokens_per_step"] == 32 for r in results)
    assert shares == [bench.DENSE_SHARE] * 4  # the auto variant's 1 + 3 steps only: "full" took the dense products


def test_interleaved_variants_keep_their_own_projections(monkeypatch):
    bench = load_bench()
    # 32-wide QK heads (head by head under "auto"), 256 OV heads: two blocks of rows
    tiny = dict(d_model=32, n_qk_heads=4, d_qk_head=32, n_ov_heads=256, top_k=2, batch=2, context=16)
    monkeypatch.setitem(bench.CONFIGS, "t", tiny)
    monkeypatch.setattr(qkp, "HEAD_PRODUCT_WIDTH", qkp.HEAD_PRODUCT_WIDTH)  # restored afterwards
    monkeypatch.setattr(bp, "BLOCK_ROWS", bp.BLOCK_ROWS)
    blocks = []
    row_blocks = bp.row_blocks
    monkeypatch.setattr(bp, "row_blocks", lambda *a: blocks.append(row_blocks(*a)) or blocks[-1])
    by_head = []
    project_by_head = qkp.project_by_head
    monkeypatch.setattr(qkp, "project_by_head", lambda *a: by_head.append(1) or project_by_head(*a))
    variants = [("auto", "adam", "topk", "auto", "auto"), ("auto", "adam", "topk", "auto", "plain")]
    results = bench.interleaved("t", torch.device("cpu"), steps=3, warmup=1, variants=variants)
    assert [r["projections"] for r in results] == ["auto", "plain"]
    assert len(by_head) == 2 * 4  # queries and keys at the auto variant's 1 + 3 steps
    assert sorted(blocks) == [1] * 4 + [2] * 4  # 256 rows: two blocks of 128 (auto), one product (plain)
