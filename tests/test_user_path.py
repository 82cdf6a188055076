"""What a user meets on the documented path: help and version, the step cap, results that travel with a
Lorsa, the model card, the explicit attention path by head, and configs built without arguments."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import STORIES_MODEL, build_host, require_shared
from hf_lorsa import LorsaConfig, LorsaModel
from hf_lorsa.base.usage import UsageError
from hf_lorsa.training.run_training import parse, train
from test_hub import FakeHub, small_lorsa
from test_training import options


def hf_lorsa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_lorsa", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands_and_version_prints_it(capsys):
    from importlib.metadata import version

    from hf_lorsa.cli import main

    assert main(["--help"]) == 0
    listed = re.findall(r"^  (\w+)\s{2,}\S", capsys.readouterr().out, re.M)
    assert listed == ["quickstart", "train", "evaluate", "analyze", "export", "push"]
    assert hf_lorsa("--version").stdout.strip() == f"hf-lorsa {version('hf_lorsa')}"  # as typed
    assert main(["trian"]) == 2 and "unknown command 'trian'" in capsys.readouterr().err


def test_train_help_shows_the_lorsa_and_data_options_first_with_defaults():
    text = hf_lorsa("train", "--help").stdout
    assert text.startswith("usage: hf-lorsa train --model_name_or_path M")
    order = [text.index(f"  --{name} ") for name in ("model_name_or_path", "layer", "top_k", "dataset", "max_tokens")]
    assert order == sorted(order) and order[-1] < text.index("  --learning_rate ")
    groups = ["the host and the Lorsa:", "the data:", "training (transformers TrainingArguments, with the recipe's"]
    assert [text.index(g) for g in groups] == sorted(text.index(g) for g in groups)
    flat = " ".join(text.split())  # argparse wraps lines to the terminal's width
    assert "active OV heads per position (default: 16)" in flat and "tokens per window (None: 256" in flat
    assert "not used: see --batch_size" in flat and "hf_lorsa:stories260K" in flat
    assert len(text.splitlines()) < 200 and "--optim " not in text  # transformers' other options: --help-all
    for option in ("output_dir", "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta2", "max_grad_norm"):
        block = " ".join(text[text.index(f"  --{option} ") :].split("\n  --")[0].split())
        assert "(default: " in block and len(block.split()) > 4, block  # a help text and the recipe's default
    for option in ("max_steps", "bf16"):
        assert text[text.index(f"  --{option} ") :].split("\n  --")[0].count("default") <= 1
    assert "turn off --revive_dead_heads" in flat
    everything = hf_lorsa("train", "--help-all").stdout
    assert "  --optim " in everything and len(everything.splitlines()) > 500


def test_max_steps_caps_the_budget(tmp_path):
    require_shared()
    lorsa = train(*parse(options(tmp_path / "run", max_steps=5, holdout_fraction=0.0, max_tokens=256 * 12)))
    assert lorsa.config.tokens_trained == 5 * 256 and lorsa.config.training_args["max_steps"] == 5


@pytest.mark.parametrize(
    "option, instead", [("num_train_epochs", "--max_tokens"), ("per_device_train_batch_size", "--batch_size")]
)
def test_options_that_would_be_ignored_are_refused(tmp_path, option, instead):
    require_shared()
    with pytest.raises(UsageError, match=f"--{option} is not used.*{instead}"):
        parse(options(tmp_path / "run", **{option: 2}))


def test_report_to_defaults_to_tensorboard_and_takes_a_list(tmp_path):
    require_shared()
    assert parse(options(tmp_path / "a", report_to="tensorboard"))[2].report_to == ["tensorboard"]
    from hf_lorsa.training.arguments import LorsaTrainingArguments

    assert LorsaTrainingArguments(output_dir=str(tmp_path / "b")).report_to == ["tensorboard"]
    assert parse(options(tmp_path / "c", report_to="none"))[2].report_to == []


def test_held_out_results_reach_tensorboard(tmp_path):
    require_shared()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    lorsa = train(*parse(options(out, report_to="tensorboard")))
    (events,) = {p.parent for p in out.rglob("events.out.tfevents.*")}
    scalars = EventAccumulator(str(events)).Reload()
    tags = scalars.Tags()["scalars"]
    assert "train/fvu" in tags and "train/silent_heads" in tags
    logged = scalars.Scalars("eval/fvu")[-1].value
    assert logged == pytest.approx(lorsa.eval_results["fvu"], rel=1e-6)


def test_results_travel_with_the_lorsa_through_load_save_and_push(tmp_path, monkeypatch):
    import transformers.utils.hub as transformers_hub

    model = small_lorsa()
    model.eval_results = {"fvu": 0.12, "loss_recovered_zero": 0.97, "n_tokens": 5000, "dataset": "org/stories"}
    model.save_pretrained(tmp_path / "first")
    loaded = LorsaModel.from_pretrained(tmp_path / "first")
    assert loaded.eval_results == model.eval_results
    loaded.save_pretrained(tmp_path / "second")
    assert json.loads((tmp_path / "second" / "eval_results.json").read_text()) == model.eval_results
    assert "| fvu | 0.12 |" in (tmp_path / "second" / "README.md").read_text()
    hub = FakeHub()
    monkeypatch.setattr(transformers_hub, "hf_api", lambda: hub)
    LorsaModel.from_pretrained(tmp_path / "second").push_to_hub("org/lorsa-tiny")
    ((_, files, _),) = hub.commits
    assert json.loads(files["eval_results.json"]) == model.eval_results
    card = files["README.md"].decode()
    assert "On 5000 tokens of `org/stories`" in card and "| fvu | 0.12 |" in card
    # a Lorsa without results does not inherit a stale file from the folder it is saved into
    small_lorsa().save_pretrained(tmp_path / "second")
    assert not (tmp_path / "second" / "eval_results.json").exists()


def test_the_model_card_holds_what_the_hub_shows_and_its_snippet_runs(tmp_path, monkeypatch):
    require_shared()
    host = build_host("llama")
    lorsa = LorsaModel.from_host(host, 1, n_ov_heads=32, top_k=4)
    lorsa.config.dataset_name = "org/stories"
    lorsa.config.base_model_name_or_path = "org/tiny-llama"
    lorsa.eval_results = {"fvu": 0.2, "n_tokens": 1234, "dataset": "org/stories", "dataset_split": "validation"}
    lorsa.save_pretrained(tmp_path / "hub-host")
    card = ModelCard.load(tmp_path / "hub-host" / "README.md")
    data = card.data
    assert (data.base_model, data.datasets, data.library_name, data.license) == (
        "org/tiny-llama", ["org/stories"], "hf_lorsa", "other"
    )  # fmt: skip
    assert {"lorsa", "interpretability", "layer-1"} <= set(data.tags)
    assert "On 1234 tokens of `org/stories` (validation)" in card.text
    # with a local host, the card's usage snippet runs as written
    stories = LorsaModel.from_host(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(STORIES_MODEL), 2, n_ov_heads=64, top_k=8
    )
    stories.config.base_model_name_or_path = str(STORIES_MODEL)
    stories.save_pretrained(tmp_path / "local")
    text = (tmp_path / "local" / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "base_model:" not in text.split("---")[1]  # a local path is no Hub id
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the card we just wrote
    assert namespace["logits"].shape[:2] == (1, namespace["input_ids"].shape[1])


def test_print_shows_the_sizes():
    text = repr(small_lorsa())
    assert "LorsaModel(\n  layer=1, d_model=32, n_qk_heads=4, d_qk_head=8, n_ov_heads=64, top_k=8" in text


def test_attention_pattern_of_one_qk_head():
    lorsa = small_lorsa()
    x = torch.randn(2, 6, 32)
    full = lorsa.attention_pattern(x)
    assert full.shape == (2, 4, 6, 6)
    for head in range(4):
        torch.testing.assert_close(lorsa.attention_pattern(x, head), full[:, head])
    ov = 37  # reads QK head 37 // 16 = 2
    z = lorsa.z_pattern(x, ov)
    v = x @ lorsa.w_v[ov] + lorsa.b_v[ov]
    torch.testing.assert_close(z, full[:, ov // lorsa.config.group_size] * v[:, None, :])


def test_a_config_builds_without_arguments_and_saves(tmp_path):
    config = LorsaConfig()
    assert (config.d_model, config.n_ov_heads, config.top_k) == (64, 64, 16)
    model = LorsaModel(config)
    model.save_pretrained(tmp_path)
    reloaded = LorsaModel.from_pretrained(tmp_path)
    x = torch.randn(1, 5, 64)
    assert torch.equal(model(x).reconstruction, reloaded(x).reconstruction)
    with pytest.raises(ValueError, match="multiple of n_qk_heads"):
        LorsaConfig(n_ov_heads=60)


def test_a_gguf_host_trains_and_reopens_from_its_recorded_file(tmp_path):
    """SmolLM2 ships as a 4-bit GGUF file whose tokenizer adds no BOS: documents are separated by its EOS, the
    file is recorded, and evaluate/analyze/the Space reopen the host from it without being told."""
    from conftest import SMOLLM2, SMOLLM2_GGUF, STORIES_DATA

    require_shared(SMOLLM2 / SMOLLM2_GGUF)
    out, data = tmp_path / "smol-l0", tmp_path / "stories.jsonl"
    data.write_text("".join(STORIES_DATA.read_text().splitlines(keepends=True)[:300]))  # tokenizing all takes long
    run = hf_lorsa(
        "train", "--model_name_or_path", str(SMOLLM2), "--gguf_file", SMOLLM2_GGUF, "--layer", "0",
        "--dataset", str(data), "--expansion_factor", "1", "--top_k", "8", "--context_length", "64",
        "--max_tokens", "1024", "--holdout_fraction", "0.02", "--eval_tokens", "256", "--output_dir", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    config = LorsaConfig.from_pretrained(out)
    assert (config.base_model_gguf_file, config.document_separator, config.skip_token_ids) == (SMOLLM2_GGUF, 2, [1, 2])
    assert config.host_model_type == "llama" and config.n_ov_heads == 576
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert math.isfinite(results["fvu"]) and results["fvu"] > 0  # four steps: no quality asked
    assert 4 < results["l0"] < 16  # BatchTopK's threshold, learned in three steps, keeps about K = 8 heads

    from hf_lorsa.inputs.loading import load_lorsa_and_host

    lorsa, host, tokenizer = load_lorsa_and_host(str(out))  # no --model_name_or_path, no --gguf_file
    assert tokenizer("Once upon a time").input_ids[:1] != [tokenizer.bos_token_id]
    assert host.config.num_hidden_layers == 30 and torch.equal(lorsa.w_o, LorsaModel.from_pretrained(out).w_o)
    with pytest.raises(UsageError, match="no such file"):
        load_lorsa_and_host(str(out), model_name_or_path=str(SMOLLM2), gguf_file="missing.gguf")
