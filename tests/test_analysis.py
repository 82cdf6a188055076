"""Head analysis: tags on inputs with known answers, every field against an independent computation."""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, STORIES_DATA, require_shared
from hf_lorsa import LorsaConfig, LorsaModel
from hf_lorsa.analysis.analysis import (
    HEAD_FEATURES,
    TAGS,
    analyze,
    head_events,
    host_correspondence,
    load_analysis,
    save_analysis,
    source_kinds,
    tags_from_counts,
)  # fmt: skip
from hf_lorsa.inputs.activations import load_text, pack


def repeated_sequences(n: int = 4, length: int = 20, vocab: int = 97, bos: int = 1) -> torch.Tensor:
    """BOS, a random sequence, the same sequence again: the classic induction test."""
    g = torch.Generator().manual_seed(0)
    half = torch.stack([torch.randperm(vocab - 3, generator=g)[:length] + 3 for _ in range(n)])
    return torch.cat([torch.full((n, 1), bos), half, half], dim=1)  # (n, 1 + 2 * length)


@pytest.mark.parametrize(
    "rule, tag",
    [
        (lambda q: torch.zeros_like(q), "bos"),
        (lambda q: q - 1, "previous_token"),
        (lambda q: q, "current_token"),
        (lambda q: q - 20 + 1, "induction"),  # the token after the earlier copy of the current token
        (lambda q: q - 20, "duplicate_token"),  # the earlier copy itself
    ],
)
def test_tags_on_repeated_random_sequences(rule, tag):
    ids = repeated_sequences()
    b, q = torch.meshgrid(torch.arange(4), torch.arange(22, 41), indexing="ij")  # queries in the second copy
    b, q = b.flatten(), q.flatten()
    kinds = source_kinds(ids, b, q, rule(q), [1])
    counts = kinds.long().sum(0, keepdim=True)
    assert tags_from_counts(counts, torch.tensor([len(q)])) == [[tag]]
    assert tags_from_counts(counts, torch.tensor([10 * len(q)])) == [[]]  # rare pattern: no tag
    assert tags_from_counts(counts[:, :] * 0 + 5, torch.tensor([5])) == [[]]  # too few events


def test_a_head_built_to_read_bos_is_found_by_its_events():
    vocab = 16
    config = LorsaConfig(d_model=vocab, n_qk_heads=2, d_qk_head=4, n_ov_heads=4, top_k=4, rope_parameters=None)
    lorsa = LorsaModel(config).eval()
    with torch.no_grad():
        for p in lorsa.parameters():
            p.zero_()
        lorsa.b_Q[0, 0] = 1.0
        lorsa.W_K[0, 1, 0] = 40.0  # QK head 0: every query attends to token 1 (BOS)
        lorsa.w_v[:2] = torch.eye(vocab)[1]  # OV heads 0, 1 read BOS
        lorsa.w_o[:, 0] = 1.0
    ids = torch.randint(2, vocab, (3, 12))
    ids[:, 0] = 1
    x = torch.nn.functional.one_hot(ids, vocab).float()
    counted = ids != 1
    b, t, heads, values, source = head_events(lorsa, x, counted)
    bos_head = heads < 2
    assert bos_head.any() and (source[bos_head] == 0).all()
    kinds = source_kinds(ids, b, t, source, [1])
    assert kinds[bos_head, TAGS.index("bos")].all()


@pytest.fixture(scope="module")
def analysed(stories_model, stories_tokenizer):
    require_shared()
    lorsa = LorsaModel.from_host(stories_model, 1, n_ov_heads=64, top_k=8)
    lorsa.config.skip_token_ids = [1]
    windows = list(pack(load_text(str(STORIES_DATA)).select(range(60)), stories_tokenizer, 64))[:12]
    result = analyze(stories_model, lorsa, windows, max_tokens=10_000, top_n=3, batch_size=4,
                     tokenizer=stories_tokenizer, progress=False)  # fmt: skip
    return lorsa, windows, result


def test_frequencies_and_top_contexts_match_a_direct_run(analysed, stories_model):
    from hf_lorsa import collect

    lorsa, windows, result = analysed
    assert len(result) == 64 and result["head"] == list(range(64))
    ids = torch.stack([torch.as_tensor(w["input_ids"]) for w in windows])
    x = collect(stories_model, 1, input_ids=ids).hidden_states
    out = lorsa(x)
    counted = ids != 1
    counted[:, 0] = False  # each window's first position is left out (attention_mask.counted_positions)
    acts = torch.zeros(*ids.shape, 64).scatter(-1, out.top_k_indices, out.top_k_values)
    freq = ((acts != 0) & counted[..., None]).sum((0, 1)).float() / counted.sum()
    torch.testing.assert_close(torch.tensor(result["frequency"]), freq, rtol=1e-5, atol=1e-7)
    for row in result.select(range(0, 64, 7)):
        best = acts[..., row["head"]].abs().masked_fill(~counted, 0).flatten().topk(3).values
        got = [abs(c["activation"]) for c in row["top_contexts"]]
        torch.testing.assert_close(torch.tensor(got), best, rtol=1e-4, atol=1e-5)
        ctx = row["top_contexts"][0]
        assert ctx["activations"][ctx["position"]] == pytest.approx(ctx["activation"])
        assert ctx["z"] == pytest.approx(ctx["activation"], rel=1e-4)  # the contributions add up to z
        assert abs(ctx["sources"][0]["contribution"]) >= abs(ctx["sources"][-1]["contribution"])
        assert len(ctx["pattern"]) == ctx["position"] + 1 and sum(ctx["pattern"]) <= 1 + 1e-4


def test_samples_come_from_each_of_the_highest_ranges_of_activation(analysed, stories_model):
    """Beside its top contexts, each head shows contexts drawn from the decades of |activation| it reaches (its
    histogram's), the highest SHOWN_RANGES of them, each sample inside the range it is labelled with."""
    from hf_lorsa.analysis.analysis import SAMPLES_PER_RANGE, SHOWN_RANGES

    lorsa, windows, result = analysed
    edges = json.loads(result.info.description)["histogram_edges"]
    checked = 0
    for row in result:
        assert len(row["samples"]) == len(row["sample_ranges"])
        reached = sorted({int(math.floor(edges[i])) for i, n in enumerate(row["histogram"]) if n}, reverse=True)
        expected = [f"1e{d} to 1e{d + 1}" for d in reached[:SHOWN_RANGES]]
        assert sorted(set(row["sample_ranges"]), reverse=True, key=lambda r: float(r.split()[0])) == expected
        for ctx, label in zip(row["samples"], row["sample_ranges"]):
            low = float(label.split()[0])
            assert low <= abs(ctx["activation"]) < 10 * low  # inside its range
            assert ctx["activations"][ctx["position"]] == pytest.approx(ctx["activation"])
        counts = [row["sample_ranges"].count(label) for label in expected]
        assert all(1 <= n <= SAMPLES_PER_RANGE for n in counts)
        checked += bool(row["samples"])
    assert checked > 32


def test_exact_pieces_belong_to_their_host_head_and_logit_attribution(analysed, stories_model):
    lorsa, _, result = analysed
    shares = host_correspondence(stories_model, lorsa)
    for head in range(64):
        host = head // 8  # from_host: 8 QK heads copy the 8 host heads, 8 OV pieces each
        assert result[head]["host_heads"][0] == host and shares[head, host] > 0.99
        assert not result[head]["spans_several_host_heads"]
    direction = lorsa.w_o.detach() * stories_model.model.norm.weight.detach()
    logits = direction @ stories_model.lm_head.weight.detach().T
    assert result[5]["promoted"] == logits[5].topk(10).indices.tolist()
    assert result[5]["suppressed"] == (-logits[5]).topk(10).indices.tolist()


def test_saved_analysis_loads_without_recomputation(analysed, tmp_path):
    _, _, result = analysed
    path = save_analysis(result, tmp_path)
    assert (path / "heads.parquet").exists()
    loaded = load_analysis(tmp_path)
    assert loaded.to_list() == result.to_list()
    assert load_analysis(tmp_path / "missing") is None


def test_analyze_command(tmp_path, stories_model):
    require_shared()
    lorsa = LorsaModel.from_host(stories_model, 2, n_ov_heads=64, top_k=8)
    lorsa.save_pretrained(tmp_path)
    cmd = [sys.executable, "-m", "hf_lorsa", "analyze", "--lorsa", str(tmp_path), "--dataset", str(STORIES_DATA),
           "--max_tokens", "1024", "--context_length", "64", "--top_n", "2"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    loaded = load_analysis(tmp_path)
    # the command saved what analyze() computes in-process on the same windows
    from transformers import AutoTokenizer

    from conftest import STORIES_MODEL

    tokenizer = AutoTokenizer.from_pretrained(STORIES_MODEL)
    windows = pack(load_text(str(STORIES_DATA)), tokenizer, 64)
    expected = analyze(stories_model, LorsaModel.from_pretrained(tmp_path), windows, 1024, top_n=2, tokenizer=tokenizer,
                       progress=False)  # fmt: skip
    assert loaded.to_list() == expected.to_list() and loaded.features == HEAD_FEATURES
    assert json.loads(loaded.info.description)["n_tokens"] == json.loads(expected.info.description)["n_tokens"] > 900


def test_push_analysis_uploads_the_folder(analysed, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from hf_lorsa.analysis.analysis import push_analysis

    calls = []
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(kw) or "ok")
    save_analysis(analysed[2], tmp_path)
    push_analysis(tmp_path, "org/lorsa", subfolder="layer1")
    assert calls == [
        {"repo_id": "org/lorsa", "folder_path": str(tmp_path / "analysis"), "path_in_repo": "layer1/analysis"}
    ]
