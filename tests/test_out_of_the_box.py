"""A clone or a pip install with nothing beside it: the embedded host and stories, paths that work from any folder,
defaults that fit any host, progress off a terminal, a card ready for the Hub."""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoModelForCausalLM, TrainerControl, TrainerState

from conftest import STORIES_MODEL, build_host
from hf_lorsa import LorsaModel, embedded
from hf_lorsa.base.usage import UsageError, check_model_name
from hf_lorsa.inputs.activations import load_text
from hf_lorsa.model.model_card import model_card, publishable_base
from hf_lorsa.training.json_logs import Progress
from hf_lorsa.training.run_training import parse, train
from test_training import options


def hf_lorsa(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "hf_lorsa", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_the_embedded_host_and_stories_are_package_data():
    assert embedded.STORIES_MODEL == STORIES_MODEL.resolve() and embedded.STORIES_MODEL.parent.name == "embedded"
    model = AutoModelForCausalLM.from_pretrained(embedded.model_location("hf_lorsa:stories260K"))
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (5, 64)
    assert "MIT License" in (embedded.STORIES_MODEL / "LICENSE").read_text()
    stories = load_text("hf_lorsa:stories260K")
    assert len(stories) == 4075 and stories[0]["text"].startswith("Once upon a time")
    check_model_name("hf_lorsa:stories260K")
    with pytest.raises(UsageError, match="embeds only hf_lorsa:stories260K"):
        check_model_name("hf_lorsa:gpt2")
    with pytest.raises(ValueError, match="not an embedded dataset"):
        load_text("hf_lorsa:wikitext")


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--model_name_or_path", "./no/host", "--layer", "2", "--dataset", "hf_lorsa:stories260K"],
         "--model_name_or_path ./no/host: no such folder."),
        (["train", "--model_name_or_path", "hf_lorsa:stories260K", "--layer", "2", "--dataset", "~/no/such/stories"],
         "Dataset file"),
        (["evaluate", "--lorsa", "runs/never-trained"], "there is no such local folder"),
        (["analyze", "--lorsa", "./runs/never-trained"], "no such folder"),
    ],
)  # fmt: skip
def test_a_missing_local_path_is_reported_as_missing_never_tried_on_the_hub(tmp_path, args, message):
    result = hf_lorsa(*args, "--output_dir", str(tmp_path / "out"), cwd=tmp_path) if args[0] == "train" else None
    result = result or hf_lorsa(*args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_context_default_follows_a_host_with_fewer_positions(tmp_path):
    config = AutoConfig.from_pretrained(STORIES_MODEL)
    config.max_position_embeddings = 128  # fewer than the default context of 256
    host = AutoModelForCausalLM.from_pretrained(STORIES_MODEL, config=config)
    host.save_pretrained(tmp_path / "host")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "host" / name).write_bytes((STORIES_MODEL / name).read_bytes())
    base = {"model_name_or_path": tmp_path / "host", "context_length": None, "max_steps": 2, "max_tokens": 4096}
    argv = [a for a in options(tmp_path / "run", **base) if not a.startswith("--context_length")]
    lorsa = train(*parse(argv))
    assert lorsa.config.training_args["context_length"] == 128
    with pytest.raises(UsageError, match="--context_length 256 exceeds the model's 128 positions"):
        train(*parse(options(tmp_path / "run2", **{**base, "context_length": 256})))


def test_a_lorsa_records_local_paths_resolved_and_works_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(STORIES_MODEL.parent)  # relative names, as a user types them in the clone
    argv = options(tmp_path / "run", model_name_or_path="stories260K", dataset="stories260K-stories.jsonl", max_steps=2)
    lorsa = train(*parse(argv))
    assert lorsa.config.base_model_name_or_path == str(STORIES_MODEL.resolve())
    assert lorsa.config.dataset_name == str(STORIES_MODEL.parent.resolve() / "stories260K-stories.jsonl")
    result = hf_lorsa("evaluate", "--lorsa", str(tmp_path / "run"), "--max_tokens", "512", "--output",
                      str(tmp_path / "r.json"), cwd="/")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["n_tokens"] > 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes


def test_the_card_is_ready_for_the_hub_and_push_wants_a_hub_id_for_a_local_host(tmp_path):
    lorsa = LorsaModel.from_host(build_host("llama"), 1, n_ov_heads=32, top_k=4)
    lorsa.config.base_model_name_or_path = "/data/models/my-llama"
    lorsa.config.training_args = {"context_length": 256, "batch_size": 4, "learning_rate": 4e-3, "seed": 7}
    lorsa.config.tokens_trained = 1000
    lorsa.eval_results = {"fvu": 0.2, "l0": 4.0, "n_tokens": 99, "dataset": "org/stories"}
    lorsa.save_pretrained(tmp_path / "run")
    card = ModelCard.load(tmp_path / "run" / "README.md")
    text = card.text
    assert text.lstrip().startswith("# Lorsa for layer 1 of my-llama") and "pip install hf_lorsa" in text
    assert "a local llama model" in text and "| context length | 256 |" in text and "| seed | 7 |" in text
    assert "| fvu | 0.2 | variance of the attention output left unexplained" in text
    assert f'from_pretrained("{(tmp_path / "run").resolve()}")' in text  # the snippet works from any folder
    assert [r.metric_name for r in card.data.eval_results] == ["fvu", "l0"]
    with pytest.raises(ValueError, match="local path /data/models/my-llama.*base_model='org/name'.*Nothing was"):
        lorsa.push_to_hub("org/lorsa")
    assert publishable_base(lorsa.config, "org/my-llama") == "org/my-llama"
    lorsa.config.base_model_name_or_path = "hf_lorsa:stories260K"
    assert publishable_base(lorsa.config) == "hf_lorsa:stories260K"
    assert "hf_lorsa.embedded.STORIES_MODEL" in ModelCard(str(model_card(
        lorsa.config))).text  # fmt: skip


def test_progress_is_logged_at_least_every_interval_with_total_and_time_left():
    progress = Progress(tokens_per_step=100, seconds=0.0)
    state, control = TrainerState(max_steps=40, global_step=0), TrainerControl()
    progress.on_train_begin(None, state, control)
    state.global_step = 10
    progress.on_step_end(None, state, control)
    assert control.should_log  # the interval passed: a log even between logging_steps
    fields = progress.fields(10, 40)
    assert fields["tokens_total"] == 4000 and fields["progress"] == 25.0 and fields["eta_s"] >= 0
    slow = Progress(tokens_per_step=100, seconds=3600.0)
    control = TrainerControl()
    slow.on_train_begin(None, state, control)
    slow.on_step_end(None, state, control)
    assert not control.should_log


def test_a_cpu_run_prints_no_pin_memory_warning_and_names_eval_tokens(tmp_path):
    argv = [a.replace("=", " ", 1).split(" ", 1) for a in options(tmp_path / "run", max_steps=2, eval_tokens=10**6)]
    result = hf_lorsa("train", *[t for pair in argv for t in pair])
    assert result.returncode == 0, result.stderr
    assert "pin_memory" not in result.stderr and "fewer than --eval_tokens 1000000" in result.stderr
    assert torch.cuda.is_available() or "fewer than --max_tokens" not in result.stderr


def test_a_release_card_holds_every_layers_results_as_metadata(tmp_path):
    from hf_lorsa.formats.release import write_release_card

    host, lorsas = build_host("llama"), {}
    for layer in (1, 2):
        lorsas[layer] = LorsaModel.from_host(host, layer, n_ov_heads=32, top_k=4)
        lorsas[layer].config.base_model_name_or_path = "org/tiny"
        lorsas[layer].eval_results = {"fvu": 0.1 * layer, "l0": 4.0, "dataset": "org/stories"}
    write_release_card(tmp_path, lorsas)
    card = ModelCard.load(tmp_path / "README.md")
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [
        ("layer 1 fvu", 0.1), ("layer 1 l0", 4.0), ("layer 2 fvu", 0.2), ("layer 2 l0", 4.0)
    ]  # fmt: skip
    assert card.data.base_model == "org/tiny"


def test_quickstart_help_names_the_embedded_host_and_its_options(capsys):
    from hf_lorsa.quickstart import DEFAULTS, main, options

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: hf-lorsa quickstart") and "hf_lorsa:stories260K" in text
    assert "  --max_tokens 1000000" in text and "  --output_dir runs/quickstart" in text
    argv = options(["--max_tokens", "4096"])  # an option given after it replaces the quickstart's own
    assert argv[-2:] == ["--max_tokens", "4096"] and len(argv) == 2 * len(DEFAULTS) + 2


def test_every_public_name_imports():
    import hf_lorsa

    assert {"train_lorsas", "embedded", "LorsaModel", "splice"} <= set(hf_lorsa.__all__)
    for name in hf_lorsa.__all__:
        assert getattr(hf_lorsa, name) is not None, name
