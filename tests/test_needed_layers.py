"""Only the layers a job needs: training and analysis load the host's blocks up to the deepest layer they read, never
those above; what they compute is the same as with the whole host."""

from __future__ import annotations

import logging

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from conftest import STORIES_DATA, STORIES_MODEL, require_shared
from hf_lorsa import LorsaModel
from hf_lorsa.analysis.analysis import analyze
from hf_lorsa.host.families import truncated_config
from hf_lorsa.inputs import loading
from hf_lorsa.training import run_training
from hf_lorsa.training.run_training import parse, train

LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)  # fmt: skip


def test_a_70b_host_for_layer_8_materialises_its_first_nine_blocks_only():
    config = truncated_config(LlamaConfig(**LLAMA_70B), 9)
    with torch.device("meta"):  # shapes only: nothing of 70B is allocated
        host = AutoModelForCausalLM.from_config(config)
    names = [name for name, _ in host.named_parameters()]
    blocks = {int(name.split(".")[2]) for name in names if name.startswith("model.layers.")}
    assert blocks == set(range(9))
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(names)  # read by attribution
    d, f, kv = 8192, 28672, 8 * 128
    block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d  # attention, MLP and the two norms of one block
    assert sum(p.numel() for p in host.parameters()) == 2 * 128256 * d + 9 * block + d
    assert LlamaConfig(**LLAMA_70B).num_hidden_layers == 80  # the config given is left as it was


def test_per_layer_lists_are_cut_with_the_blocks():
    config = Qwen2Config(num_hidden_layers=6, use_sliding_window=True, max_window_layers=3)
    assert len(config.layer_types) == 6
    cut = truncated_config(config, 2)
    assert (cut.num_hidden_layers, cut.layer_types) == (2, config.layer_types[:2])
    assert truncated_config(config, 6).num_hidden_layers == 6  # all of it: unchanged


def whole_host(monkeypatch):
    """Every job loads the whole host, as before only the needed blocks were loaded."""
    opened = loading.open_host
    monkeypatch.setattr(loading, "open_host", lambda *a, up_to_layer=None, **k: opened(*a, **k))
    monkeypatch.setattr(run_training, "open_host", lambda *a, up_to_layer=None, **k: opened(*a, **k))


def test_training_on_the_blocks_up_to_its_layer_is_the_same_run(tmp_path, monkeypatch, caplog):
    require_shared()
    options = [f"--{k}={v}" for k, v in {
        "model_name_or_path": STORIES_MODEL, "layer": 1, "dataset": STORIES_DATA, "expansion_factor": 2, "top_k": 8,
        "context_length": 64, "batch_size": 4, "max_tokens": 256 * 8, "holdout_fraction": 0.02, "eval_tokens": 1024,
        "report_to": "none", "seed": 3, "disable_tqdm": "true", "use_cpu": "true"}.items()]  # fmt: skip
    loaded = []
    opened = loading.open_host
    monkeypatch.setattr(run_training, "open_host", lambda *a, **k: loaded.append(k["up_to_layer"]) or opened(*a, **k))
    with caplog.at_level(logging.INFO):
        partial = train(*parse([*options, f"--output_dir={tmp_path / 'partial'}"]))
    assert loaded == [1, None]  # blocks 0-1 for the steps, the whole host for the held-out evaluation
    assert "Loading the host's blocks 0-1 of 5: this job reads none above layer 1." in caplog.text
    whole_host(monkeypatch)
    whole = train(*parse([*options, f"--output_dir={tmp_path / 'whole'}"]))
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(partial.state_dict()[name], value, rtol=0, atol=0)
    assert partial.eval_results == whole.eval_results and partial.eval_results["kl_spliced"] > 0


def test_analysis_on_the_blocks_up_to_its_layer_is_the_same_table(tmp_path, monkeypatch, stories_model):
    require_shared()
    lorsa = LorsaModel.from_host(stories_model, 2, n_ov_heads=64, top_k=8)
    lorsa.config.base_model_name_or_path, lorsa.config.skip_token_ids = str(STORIES_MODEL), [1]
    lorsa.save_pretrained(tmp_path / "lorsa")
    source = loading.LorsaSourceArguments(lorsa=str(tmp_path / "lorsa"), dataset=str(STORIES_DATA), max_tokens=2048)
    opened, (partial,) = loading.open_lorsas(source, [""], layers_only=True)
    assert len(opened.host.model.layers) == 3
    table = analyze(opened.host, partial, opened.windows, 2048, tokenizer=opened.tokenizer, progress=False)
    whole_host(monkeypatch)
    opened, (full,) = loading.open_lorsas(source, [""], layers_only=True)
    assert len(opened.host.model.layers) == 5
    assert analyze(opened.host, full, opened.windows, 2048, tokenizer=opened.tokenizer, progress=False).to_list() == (
        table.to_list()
    )
