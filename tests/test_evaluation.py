"""Evaluation by splicing: every number against an independent computation, plus the command line."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard

from conftest import ROOT, STORIES_DATA, STORIES_MODEL, build_host, require_shared
from hf_lorsa import LorsaModel, capture
from hf_lorsa.evaluation.evaluation import evaluate_lorsa
from hf_lorsa.host import families

KEYS = {
    "fvu", "explained_variance", "mse", "l0", "dead_heads", "heads_below_1e-5", "heads_below_1e-6", "dense_heads",
    "max_frequency", "loss_clean", "loss_spliced", "loss_zero_ablated", "loss_mean_ablated", "loss_recovered_zero",
    "loss_recovered_mean", "kl_spliced", "n_tokens",
}  # fmt: skip


def windows(n: int = 6, length: int = 20, vocab: int = 97, bos: int | None = 1, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(3, vocab, (n, length), generator=g)
    if bos is not None:
        rows[:, 0] = bos
        rows[::2, 9] = bos  # a document boundary inside some windows
    return [{"input_ids": row} for row in rows]


@torch.no_grad()
def brute_force(model, lorsa, rows, skip) -> dict:
    """The metrics from four separate full forward passes and plain formulas."""
    ids = torch.stack([r["input_ids"] for r in rows])
    counted = ~torch.isin(ids, torch.tensor(skip or [-1]))
    layer = lorsa.config.layer
    with capture(model, layer) as cap:
        clean = model(ids).logits
    x, y = cap.last.hidden_states, cap.last.attention_output
    y_hat = lorsa(x).reconstruction
    mean = y[counted].mean(0)
    attn = families.get_module(model, families.attention_path(model, layer))

    def replaced(fn):
        handle = attn.register_forward_hook(lambda m, a, o: (torch.where(counted[..., None], fn(o[0]), o[0]), *o[1:]))
        try:
            return model(ids).logits
        finally:
            handle.remove()

    logits = {
        "clean": clean,
        "spliced": replaced(lambda o: y_hat),
        "zero_ablated": replaced(torch.zeros_like),
        "mean_ablated": replaced(lambda o: mean.expand_as(o)),
    }
    valid = counted[:, :-1]
    loss = {k: F.cross_entropy(v[:, :-1][valid].double(), ids[:, 1:][valid]).item() for k, v in logits.items()}
    p = clean[:, :-1][valid].log_softmax(-1)
    q = logits["spliced"][:, :-1][valid].log_softmax(-1)
    out = lorsa(x)
    fires = torch.zeros(lorsa.config.n_ov_heads)
    for idx, val in zip(out.top_k_indices[counted], out.top_k_values[counted]):
        fires[idx[val != 0]] += 1
    yc, hc = y[counted], y_hat[counted]
    fvu = ((hc - yc) ** 2).sum() / ((yc - yc.mean(0)) ** 2).sum()
    return {
        "fvu": fvu.item(),
        "mse": ((hc - yc) ** 2).mean().item(),
        "l0": (out.top_k_values[counted] != 0).sum(-1).float().mean().item(),
        "dead_heads": int((fires == 0).sum()),
        "dense_heads": int((fires / counted.sum() > 0.1).sum()),
        "max_frequency": (fires / counted.sum()).max().item(),
        "loss_clean": loss["clean"],
        "loss_spliced": loss["spliced"],
        "loss_zero_ablated": loss["zero_ablated"],
        "loss_mean_ablated": loss["mean_ablated"],
        "loss_recovered_zero": (loss["zero_ablated"] - loss["spliced"]) / (loss["zero_ablated"] - loss["clean"]),
        "loss_recovered_mean": (loss["mean_ablated"] - loss["spliced"]) / (loss["mean_ablated"] - loss["clean"]),
        "kl_spliced": (p.exp() * (p - q)).sum(-1).mean().item(),
        "n_tokens": int(counted.sum()),
    }


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_every_number_matches_an_independent_computation(family):
    model = build_host(family)
    lorsa = LorsaModel.from_host(model, 1, n_ov_heads=64, top_k=6)
    lorsa.config.skip_token_ids = [1]
    rows = windows()
    results = evaluate_lorsa(model, lorsa, rows, max_tokens=10_000, batch_size=4, progress=False).to_dict()
    assert set(results) == KEYS
    expected = brute_force(model, lorsa, rows, [1])
    for key, value in expected.items():
        if not key.startswith("loss_recovered"):
            assert results[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # random models leave tiny loss gaps, so the ratios are checked on the (independently checked) losses
    for ablation in ("zero", "mean"):
        ablated = results[f"loss_{ablation}_ablated"]
        ratio = (ablated - results["loss_spliced"]) / (ablated - results["loss_clean"])
        assert results[f"loss_recovered_{ablation}"] == pytest.approx(ratio, rel=1e-9)
    assert results["explained_variance"] == pytest.approx(1 - expected["fvu"], rel=1e-5, abs=1e-6)


def test_exact_init_is_perfect_and_a_silent_lorsa_is_the_zero_ablation():
    model = build_host("qwen3")
    rows = windows(bos=None)
    exact = evaluate_lorsa(model, LorsaModel.from_host(model, 2), rows, max_tokens=10_000, progress=False).to_dict()
    assert exact["fvu"] < 1e-6
    assert exact["loss_spliced"] == pytest.approx(exact["loss_clean"], abs=1e-5)
    assert exact["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4) and abs(exact["kl_spliced"]) < 1e-6
    silent = LorsaModel.from_host(model, 2)
    with torch.no_grad():
        silent.w_o.zero_(), silent.b_D.zero_()
    zero = evaluate_lorsa(model, silent, rows, max_tokens=10_000, progress=False).to_dict()
    assert zero["loss_spliced"] == pytest.approx(zero["loss_zero_ablated"], abs=1e-6)
    assert zero["loss_recovered_zero"] == pytest.approx(0.0, abs=1e-6) and zero["fvu"] > 0.5


def test_budget_stops_after_enough_tokens():
    model = build_host("llama")
    results = evaluate_lorsa(
        model, LorsaModel.from_host(model, 0), windows(n=12), max_tokens=50, batch_size=2, progress=False
    ).to_dict()
    assert results["n_tokens"] == 4 * 19  # two batches of two windows (each without its first position) reach 50


def test_loss_clean_is_the_models_own_loss(stories_model, stories_tokenizer):
    require_shared()
    from hf_lorsa.inputs.activations import load_text, pack

    rows = list(pack(load_text(str(STORIES_DATA)).select(range(40)), stories_tokenizer, 128))[:8]
    lorsa = LorsaModel.from_host(stories_model, 3, n_ov_heads=256, top_k=16)
    lorsa.config.skip_token_ids = [1]
    results = evaluate_lorsa(stories_model, lorsa, rows, max_tokens=8 * 128, progress=False).to_dict()
    ids = torch.tensor([r["input_ids"] for r in rows])
    labels = ids.clone()
    labels[:, 1:][ids[:, :-1] == 1] = -100  # no prediction is made from a BOS position
    labels[:, 1] = -100  # nor from the first position (the window's attention sink)
    with torch.no_grad():
        own = stories_model(input_ids=ids, labels=labels).loss.item()
    assert results["loss_clean"] == pytest.approx(own, rel=1e-5)


def test_bad_input_and_nothing_changes():
    model = build_host("llama")
    lorsa = LorsaModel.from_host(model, 1, n_ov_heads=64, top_k=4)
    before = (
        {k: v.clone() for k, v in model.state_dict().items()},
        {k: v.clone() for k, v in lorsa.state_dict().items()},
    )
    model.train(), lorsa.eval()
    evaluate_lorsa(model, lorsa, windows(), max_tokens=100, progress=False)
    assert model.training and not lorsa.training  # modes restored
    for state, now in zip(before, (model.state_dict(), lorsa.state_dict())):
        assert all(torch.equal(state[k], now[k]) for k in state)
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        evaluate_lorsa(model, lorsa, windows(), max_tokens=0)
    with pytest.raises(ValueError, match="no full windows"):
        evaluate_lorsa(model, lorsa, [], max_tokens=100)
    with pytest.raises(ValueError, match="made for a 'llama' model"):
        evaluate_lorsa(build_host("gpt2"), lorsa, windows(), max_tokens=100)
    lorsa.config.layer = 3
    with pytest.raises(ValueError, match="layer must be"):
        evaluate_lorsa(model, lorsa, windows(), max_tokens=100)


def test_command_line_writes_results_and_card(tmp_path, stories_model):
    require_shared()
    lorsa = LorsaModel.from_host(stories_model, 1, n_ov_heads=128, top_k=8)
    lorsa.config.skip_token_ids = [1]
    lorsa.save_pretrained(tmp_path / "lorsa")
    cmd = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--lorsa", str(tmp_path / "lorsa"), "--dataset",
           str(STORIES_DATA), "--max_tokens", "2048", "--context_length", "128", "--update_card"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    results = json.loads((tmp_path / "lorsa" / "eval_results.json").read_text())
    assert KEYS <= set(results) and results["model"] == str(STORIES_MODEL) and results["layer"] == 1
    assert results["n_tokens"] > 1500
    card = ModelCard.load(tmp_path / "lorsa" / "README.md")
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics["fvu"] == pytest.approx(results["fvu"]) and metrics["loss_clean"] == pytest.approx(
        results["loss_clean"]
    )
    other = tmp_path / "other.json"
    subprocess.run(cmd[:-1] + ["--output", str(other), "--holdout_fraction", "0.05"], check=True, capture_output=True)
    assert json.loads(other.read_text())["fvu"] != results["fvu"]  # another slice of the data
    fail = subprocess.run(
        cmd[:4] + ["--dataset", str(tmp_path / "none.jsonl"), "--max_tokens", "10", "--overwrite"],
        capture_output=True,
        text=True,
    )
    assert fail.returncode != 0 and "does not exist" in fail.stderr


def test_the_host_runs_only_as_far_as_it_must():
    model = build_host("llama")
    lorsa = LorsaModel.from_host(model, 1, n_ov_heads=64, top_k=4)
    batches_seen = {0: [], 1: [], 2: []}
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, k, i=i: batches_seen[i].append(k["hidden_states"].shape[0]), with_kwargs=True
        )
        for i, layer in enumerate(model.model.layers)
    ]
    evaluate_lorsa(model, lorsa, windows(n=6), max_tokens=10_000, batch_size=3, progress=False)
    for h in hooks:
        h.remove()
    # the mean pass stops at layer 1; the main pass runs layer 0 once per batch and the rest on 4 copies
    assert batches_seen[0] == [3, 3, 3, 3]
    assert batches_seen[1] == [3, 3, 12, 12]
    assert batches_seen[2] == [12, 12]


def test_hf_lorsa_evaluate_is_the_same_command():
    from hf_lorsa import cli

    assert cli.COMMANDS["evaluate"][0] == "hf_lorsa.evaluation.command:main"
    result = subprocess.run([sys.executable, "-m", "hf_lorsa", "evaluate", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--update_card" in result.stdout and "--max_tokens" in result.stdout
