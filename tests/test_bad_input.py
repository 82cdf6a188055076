"""Nothing a user saved is lost, and every bad input gets a clear answer before the expensive work."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, TrainerCallback

from conftest import STORIES_DATA, STORIES_MODEL, build_host, require_shared, token_batch
from hf_lorsa import LorsaModel, capture, splice
from hf_lorsa.base.usage import UsageError
from hf_lorsa.evaluation.evaluation import evaluate_lorsa
from hf_lorsa.training.run_training import parse, train
from hf_lorsa.training.trainer import TrainingDiverged
from test_training import options


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load a host's weights fails the test: errors must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def snapshot(folder) -> dict:
    """Every file under `folder` with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---- output folders ---------------------------------------------------------------------------------------


def test_the_host_models_own_folder_is_refused_and_untouched(tmp_path, no_model_loading):
    require_shared()
    host = tmp_path / "host"
    shutil.copytree(STORIES_MODEL, host)
    before = snapshot(host)
    for overwrite in ("false", "true"):
        with pytest.raises(UsageError, match="files that no hf-lorsa run made"):
            train(*parse(options(host, model_name_or_path=host, overwrite_output_dir=overwrite)))
    assert snapshot(host) == before


@pytest.mark.parametrize("files", [{"README.md": "# my notes\n", "config.json": "{}"}, {"checkpoint-6/x.bin": "old"}])
def test_a_folder_of_the_users_files_is_refused_and_untouched(tmp_path, no_model_loading, files):
    require_shared()
    out = tmp_path / "out"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = snapshot(out)
    for overwrite in ("false", "true"):
        with pytest.raises(UsageError, match="no hf-lorsa run made"):
            train(*parse(options(out, overwrite_output_dir=overwrite)))
    assert snapshot(out) == before


def test_a_run_folder_with_the_users_files_is_refused(tmp_path, no_model_loading):
    require_shared()
    out = tmp_path / "out"
    out.mkdir()
    (out / "lorsa_run.json").write_text(json.dumps({"signature": {}, "status": "finished"}))
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(UsageError, match=r"also files that no run made \(notes.txt\)"):
        train(*parse(options(out, overwrite_output_dir="true")))
    assert snapshot(out) == before


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 7:
            raise RuntimeError("killed")


def test_overwrite_starts_over_and_a_rerun_never_resumes_the_old_run(tmp_path):
    require_shared()
    out = tmp_path / "out"
    train(*parse(options(out, layer=2, keep_checkpoints="true")))  # an earlier run, with results and checkpoints
    (out / "analysis").mkdir()
    (out / "analysis" / "meta.json").write_text('{"n_tokens": 1}')
    assert (out / "checkpoint-12").is_dir() and (out / "eval_results.json").exists()
    new = options(out, layer=3, holdout_fraction=0.0, overwrite_output_dir="true")
    with pytest.raises(RuntimeError, match="killed"):
        train(*parse(new), callbacks=[Crash()])
    assert not (out / "analysis").exists() and not (out / "eval_results.json").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]  # the old run's are gone
    train(*parse(new))  # the same command again, as after any crash
    straight = train(*parse(options(tmp_path / "straight", layer=3, holdout_fraction=0.0)))
    saved = load_file(out / "model.safetensors")
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(saved[name], tensor.cpu(), atol=1e-6, rtol=0)
    card = (out / "README.md").read_text()
    assert "## Evaluation" not in card and not (out / "eval_results.json").exists()  # no stale results
    assert LorsaModel.from_pretrained(out).config.layer == 3


def test_a_checkpoint_of_another_run_is_never_resumed(tmp_path):
    require_shared()
    train(*parse(options(tmp_path / "a", layer=2, keep_checkpoints="true", holdout_fraction=0.0)))
    with pytest.raises(UsageError, match="was not made by a run with these options"):
        train(*parse(options(tmp_path / "b", layer=3, resume_from_checkpoint=tmp_path / "a" / "checkpoint-6")))


@pytest.mark.parametrize("command", ["evaluate", "analyze"])
def test_evaluate_and_analyze_do_not_replace_results_without_overwrite(tmp_path, command, no_model_loading, capsys):
    require_shared()
    from hf_lorsa.cli import main

    model = build_host("llama")
    lorsa = LorsaModel.from_host(model, 1, n_ov_heads=32, top_k=4)
    lorsa.save_pretrained(tmp_path)
    target = tmp_path / ("eval_results.json" if command == "evaluate" else "analysis/heads.parquet")
    target.parent.mkdir(exist_ok=True)
    target.write_text("earlier results")
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--lorsa", str(tmp_path), "--dataset", str(STORIES_DATA)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "already exists" in err and "pass --overwrite" in err
    assert snapshot(tmp_path) == before


# ---- options, checked when parsed -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"expansion_factor": 0}, "--expansion_factor must be an integer >= 1"),
        ({"k_anneal_fraction": 5}, r"--k_anneal_fraction must be a number in \[0.0, 1.0\]"),
        ({"holdout_fraction": -0.1}, "--holdout_fraction must be a number in"),
        ({"holdout_fraction": 1.5}, "--holdout_fraction must be a number in"),
        ({"learning_rate": -1}, "--learning_rate must be a number in"),
        ({"learning_rate": "nan"}, "--learning_rate must be a number in"),
        ({"context_length": 0}, "--context_length must be an integer >= 1"),
        ({"batch_size": 0}, "--batch_size must be an integer >= 1"),
        ({"norm_batches": 0}, "--norm_batches must be an integer >= 1"),
        ({"torch_dtype": "float99"}, "--torch_dtype must be one of"),
        ({"top_k": 1000}, "--top_k 1000 exceeds the 128 OV heads"),
        ({"n_qk_heads": 7}, "--n_qk_heads 7 must divide the 128 OV heads"),
        ({"k_anneal_start": 4}, "--k_anneal_start must be at least --top_k"),
        ({"max_head_frequency": 0}, r"--max_head_frequency must be a number in \(0.0, 1.0\]"),
        ({"rare_head_tokens": -5}, "--rare_head_tokens must be an integer >= 0"),
        ({"max_steps": 0}, "--max_steps must be positive"),
        ({"num_train_epochs": 2}, "--num_train_epochs is not used.*--max_tokens"),
        ({"per_device_train_batch_size": 8}, "--per_device_train_batch_size is not used.*--batch_size"),
        ({"model_name_or_path": "./no/such/model"}, "no such folder"),
        ({"model_name_or_path": "not a repo id!"}, "neither an existing folder nor a Hub id"),
        ({"output_dir": "FILE"}, "is a file; give a folder"),
        ({"output_dir": "FILE/sub"}, "which is a file"),
        ({"activation_cache": "FILE"}, "--activation_cache .* is a file"),
        ({"output_dir": "/proc/hf-lorsa-run"}, "cannot write into"),
    ],
)
def test_bad_options_fail_before_the_model_loads(tmp_path, no_model_loading, overrides, message):
    require_shared()
    (tmp_path / "FILE").write_text("a file")
    overrides = {k: str(v).replace("FILE", str(tmp_path / "FILE")) for k, v in overrides.items()}
    out = overrides.pop("output_dir", tmp_path / "run")
    with pytest.raises(UsageError, match=message):
        train(*parse(options(out, **overrides)))


@pytest.mark.parametrize(
    "content, message",
    [
        ("layer: two\n", r"stories.yaml: --layer must be a number, got 'two'"),
        ("layer: 2\nlearning_rate: 2e\n", r"stories.yaml: --learning_rate must be a number, got '2e'"),
        ("layer: [2\n", "stories.yaml is not valid YAML"),
    ],
)
def test_bad_options_files_name_the_file(tmp_path, no_model_loading, content, message):
    """YAML reads `1e-3` as a string: numbers are converted as on the command line, the rest refused."""
    require_shared()
    path = tmp_path / "stories.yaml"
    path.write_text(f"model_name_or_path: {STORIES_MODEL}\ndataset: {STORIES_DATA}\n{content}")
    with pytest.raises(UsageError, match=message):
        parse([str(path)])


@pytest.mark.parametrize(
    "lines, message",
    [
        (b'{"text": "Once upon a time"}\n{"text": null}\n', "Row 1 of the dataset has None in column 'text'"),
        (b'{"text": 5}\n', "holds int64 values, not text"),
        (b'{"text": "Once upon a \xff time"}\n', "is not UTF-8 text"),
        (b'{"text": "Once upon a time"}\nnot json\n', "holds one JSON object per line"),
    ],
)
def test_bad_data_fails_before_the_model_loads(tmp_path, no_model_loading, lines, message):
    require_shared()
    data = tmp_path / "data.jsonl"
    data.write_bytes(lines)
    with pytest.raises(ValueError, match=message):
        train(*parse(options(tmp_path / "run", dataset=data, holdout_fraction=0.0)))


def test_the_command_line_prints_the_message_not_a_traceback(tmp_path):
    require_shared()
    cmd = [sys.executable, "-m", "hf_lorsa", "train", *options(tmp_path / "run", expansion_factor=0)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "hf-lorsa train: error: --expansion_factor must be an integer >= 1, got 0." in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "command, extra, message",
    [
        ("evaluate", ["--batch_size", "0"], "--batch_size must be an integer >= 1"),
        ("evaluate", ["--context_length", "0"], "--context_length must be an integer >= 1"),
        ("evaluate", ["--context_length", "100000"], "--context_length 100000 exceeds the 64 positions"),
        ("evaluate", ["--max_tokens", "-5"], "--max_tokens must be an integer >= 1"),
        ("evaluate", ["--torch_dtype", "float99"], "--torch_dtype must be one of"),
        ("analyze", ["--top_n", "0"], "--top_n must be an integer >= 1"),
        ("analyze", ["--top_n", "-1"], "--top_n must be an integer >= 1"),
        ("analyze", ["--output", "FILE"], "--output .*FILE is a file; give a folder"),
        ("analyze", ["--lorsa", "HOST"], "holds a 'llama' model, not a Lorsa"),
    ],
)
def test_evaluate_and_analyze_options_fail_first(tmp_path, no_model_loading, capsys, command, extra, message):
    require_shared()
    from hf_lorsa.cli import main

    (tmp_path / "FILE").write_text("a file")
    lorsa = LorsaModel.from_host(build_host("llama"), 1, n_ov_heads=32, top_k=4)
    lorsa.save_pretrained(tmp_path / "lorsa")
    extra = [str(STORIES_MODEL) if e == "HOST" else str(tmp_path / "FILE") if e == "FILE" else e for e in extra]
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--lorsa", str(tmp_path / "lorsa"), "--dataset", str(STORIES_DATA), *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"hf-lorsa {command}: error:" in err
    assert __import__("re").search(message, err), err


# ---- loading is strict ----------------------------------------------------------------------------------


def test_a_checkpoint_missing_a_tensor_or_a_config_key_is_refused(tmp_path):
    lorsa = LorsaModel.from_host(build_host("llama"), 1, n_ov_heads=32, top_k=4)
    lorsa.save_pretrained(tmp_path / "ok")
    shutil.copytree(tmp_path / "ok", tmp_path / "no-w_o")
    weights = load_file(tmp_path / "ok" / "model.safetensors")
    del weights["w_o"]
    save_file(weights, tmp_path / "no-w_o" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing: w_o"):
        LorsaModel.from_pretrained(tmp_path / "no-w_o")
    shutil.copytree(tmp_path / "ok", tmp_path / "no-d_model")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    del config["d_model"]
    (tmp_path / "no-d_model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lacks \['d_model'\]"):
        LorsaModel.from_pretrained(tmp_path / "no-d_model")


def test_sizes_that_disagree_with_the_config_and_non_finite_weights_are_named(tmp_path):
    lorsa = LorsaModel.from_host(build_host("llama"), 1, n_ov_heads=32, top_k=4)
    lorsa.save_pretrained(tmp_path / "ok")
    shutil.copytree(tmp_path / "ok", tmp_path / "wider")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "wider" / "config.json").write_text(json.dumps({**config, "n_ov_heads": 64}))
    d = config["d_model"]
    with pytest.raises(ValueError, match=rf"w_o \(the file holds \(32, {d}\), its config.json asks for \(64, {d}\)\)"):
        LorsaModel.from_pretrained(tmp_path / "wider")
    shutil.copytree(tmp_path / "ok", tmp_path / "nan")
    weights = load_file(tmp_path / "ok" / "model.safetensors")
    weights["b_v"][3] = float("nan")
    save_file(weights, tmp_path / "nan" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="NaN or infinite values in b_v"):
        LorsaModel.from_pretrained(tmp_path / "nan")


def test_evaluate_says_whether_a_nan_comes_from_the_host_or_the_lorsa():
    model = build_host("llama")
    lorsa = LorsaModel.from_host(model, 1, n_ov_heads=32, top_k=4)
    windows = [{"input_ids": row} for row in token_batch(length=16, batch=4).tolist()]
    with torch.no_grad():
        lorsa.b_D[0] = float("nan")
    with pytest.raises(ValueError, match="The Lorsa of layer 1 gives NaN"):
        evaluate_lorsa(model, lorsa, windows, max_tokens=64, batch_size=2, progress=False)
    lorsa = LorsaModel.from_host(model, 1, n_ov_heads=32, top_k=4)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")  # the host overflows below the layer
    with pytest.raises(ValueError, match="The host's layer 1 attention has NaN"):
        evaluate_lorsa(model, lorsa, windows, max_tokens=64, batch_size=2, progress=False)


# ---- shapes, dtypes and models at the boundary ---------------------------------------------------------------


def test_forward_capture_and_splice_check_their_input():
    model = build_host("llama")
    lorsa = LorsaModel.from_host(model, 1, n_ov_heads=32, top_k=4)
    x = torch.randn(2, 6, 32)
    cases = [
        (lambda: lorsa(x, top_k=0), ValueError, r"top_k must be in \[1, n_ov_heads=32\], got 0"),
        (lambda: lorsa(x.half()), ValueError, "torch.float16 but this Lorsa's weights are torch.float32"),
        (lambda: lorsa(x[:, :0]), ValueError, "has no positions"),
        (lambda: lorsa(x, attention_mask=torch.ones(2, 5)), ValueError, r"attention_mask must have shape \(2, 6\)"),
        (lambda: lorsa(x, position_ids=torch.arange(6)), ValueError, r"position_ids must have shape \(2, 6\)"),
        (lambda: lorsa.attention_pattern(x, 16), ValueError, r"qk_head must be an integer in \[0, 4\)"),
        (lambda: splice(model, None).__enter__(), TypeError, "Expected a hf_lorsa.LorsaModel, got NoneType"),
        (lambda: capture(model, True).__enter__(), TypeError, "layer must be an integer"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()


def test_another_model_of_the_same_shape_is_refused_unless_asked():
    mine, other = build_host("llama", seed=0), build_host("llama", seed=1)
    lorsa = LorsaModel.from_host(mine, 1, n_ov_heads=32, top_k=4)
    ids = token_batch()
    with pytest.raises(ValueError, match="made from another model than this one"), splice(other, lorsa):
        pass
    windows = [{"input_ids": row} for row in ids]
    with pytest.raises(ValueError, match="strict=False"):
        evaluate_lorsa(other, lorsa, windows, 48, progress=False)
    with splice(other, lorsa, strict=False):
        logits = other(ids).logits
    assert torch.isfinite(logits).all()
    with splice(mine.to(torch.bfloat16), lorsa.to(torch.bfloat16)):  # the same weights in another dtype still match
        mine(ids)


def test_a_model_with_the_same_weight_norms_is_refused_too():
    """At realistic sizes two models of one shape have nearly equal weight norms (a random Llama-3.2-1B-shaped
    host and another one differed by at most 0.15%): the fingerprint compares weights, not only norms."""
    import copy

    mine = build_host("llama")
    lorsa = LorsaModel.from_host(mine, 1, n_ov_heads=32, top_k=4)
    shuffled = copy.deepcopy(mine)
    q_proj = shuffled.model.layers[1].self_attn.q_proj.weight
    with torch.no_grad():
        q_proj.copy_(q_proj.flatten()[torch.randperm(q_proj.numel())].view_as(q_proj))  # same norm, other weights
    with pytest.raises(ValueError, match="made from another model than this one"), splice(shuffled, lorsa):
        pass


def test_a_host_of_the_same_width_with_another_head_size():
    import transformers

    from conftest import FAMILIES

    wide_heads = transformers.AutoConfig.for_model("llama", **dict(FAMILIES["llama"], num_attention_heads=2))
    host = AutoModelForCausalLM.from_config(wide_heads, attn_implementation="eager").eval()  # head size 16, not 8
    lorsa = LorsaModel.from_host(build_host("llama"), 1, n_ov_heads=32, top_k=4)
    with pytest.raises(ValueError, match="made from another model"), splice(host, lorsa):
        pass
    with splice(host, lorsa, strict=False):  # the Lorsa then makes its own rotary for its 8-wide heads
        assert torch.isfinite(host(token_batch()).logits).all()


# ---- a diverging run stops and keeps its last good checkpoint ---------------------------------------------


class Poison(TrainerCallback):
    """Makes the weights non-finite after step 7, as a diverging learning rate would."""

    def __init__(self):
        self.trainer = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 7:
            with torch.no_grad():
                model.w_o[0] = float("nan")


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    require_shared()
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="last good checkpoint is .*checkpoint-6"):
        train(*parse(options(out, holdout_fraction=0.0)), callbacks=[Poison()])
    assert (
        sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
        and not (out / "model.safetensors").exists()
    )
    weights = load_file(out / "checkpoint-6" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_numbers_in_an_options_file_read_as_on_the_command_line(tmp_path):
    require_shared()
    path = tmp_path / "run.yaml"
    path.write_text(f"model_name_or_path: {STORIES_MODEL}\ndataset: {STORIES_DATA}\nlayer: 2\nlearning_rate: 1e-3\n")
    _, _, args = parse([str(path)])
    assert args.learning_rate == 1e-3


def test_export_writes_only_into_an_empty_folder_or_over_its_own_export(tmp_path):
    from hf_lorsa.formats.llamascopium_export import check_export_folder, export_llamascopium

    lorsa = LorsaModel.from_host(build_host("llama"), 1, n_ov_heads=32, top_k=4, topk_rule="relu")
    host = build_host("llama")
    check_export_folder(tmp_path / "new", overwrite=False)  # new or empty: fine
    export_llamascopium(lorsa, tmp_path / "ours", host)
    with pytest.raises(ValueError, match="already holds an export; pass --overwrite"):
        check_export_folder(tmp_path / "ours", overwrite=False)
    check_export_folder(tmp_path / "ours", overwrite=True)  # its own earlier export, with the flag
    (tmp_path / "ours" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"did not write \(notes.txt\)"):
        check_export_folder(tmp_path / "ours", overwrite=True)


def test_export_checks_its_n_ctx_against_the_lorsas_positions_and_the_disk(tmp_path, monkeypatch):
    from hf_lorsa.formats import llamascopium_export as export

    host = build_host("llama")
    lorsa = LorsaModel.from_host(host, 1, n_ov_heads=32, top_k=4, topk_rule="relu")
    positions = lorsa.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"n_ctx {positions + 1} is more positions than this Lorsa has \({positions}"):
        export.export_llamascopium(lorsa, tmp_path / "long", host, n_ctx=positions + 1)
    folder = export.export_llamascopium(lorsa, tmp_path / "fits", host, n_ctx=64)
    written = (folder / export.WEIGHTS_FILE).stat().st_size
    assert 0 <= written - export.export_bytes(lorsa.config, 64) < 4096  # the estimate is the tensors written
    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ValueError, match="The export needs 0.00 GiB and .* has 0.00 GiB free"):
        export.export_llamascopium(lorsa, tmp_path / "full", host, n_ctx=64)
    assert not (tmp_path / "full").exists()  # nothing written


def test_bad_results_files_steps_loggers_devices_and_sizes_are_named(tmp_path):
    lorsa = LorsaModel.from_host(build_host("llama"), 1, n_ov_heads=32, top_k=4)
    lorsa.save_pretrained(tmp_path / "lorsa")
    (tmp_path / "lorsa" / "eval_results.json").write_text("{not json")
    with pytest.raises(
        ValueError, match=r"eval_results.json \(the evaluation results of the Lorsa at .*\) is not valid JSON"
    ):
        LorsaModel.from_pretrained(tmp_path / "lorsa")
    for option, message in (
        ("eval_steps", "--eval_steps must be positive"),
        ("save_steps", "--save_steps must be positive"),
    ):
        with pytest.raises(UsageError, match=message):
            parse(options(tmp_path / "run", **{option: 0, "eval_strategy": "steps"}))
    with pytest.raises(UsageError, match="--report_to wandb: not installed"):
        parse(options(tmp_path / "run", report_to="tensorboard,wandb"))
    with pytest.raises(ValueError, match="expansion_factor must be an integer >= 1"):
        LorsaModel.from_host(build_host("llama"), 1, expansion_factor=0)
    if not torch.cuda.is_available():
        from hf_lorsa.inputs.source_arguments import LorsaSourceArguments

        with pytest.raises(UsageError, match="--device cuda: this machine has no CUDA GPU"):
            LorsaSourceArguments(lorsa=str(tmp_path / "lorsa"), device="cuda")


def test_a_command_refused_after_claiming_its_folder_leaves_the_corrected_command_free_to_run(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(OSError, match="Dataset file .* does not exist"):  # refused once the folder was claimed
        train(*parse(options(out, dataset=str(tmp_path / "typo.jsonl"), max_steps=2)))
    assert json.loads((out / "lorsa_run.json").read_text())["status"] == "starting"
    lorsa = train(*parse(options(out, max_steps=2)))  # the corrected command, into the same folder
    assert lorsa.config.tokens_trained == 2 * 256
    assert json.loads((out / "lorsa_run.json").read_text())["status"] == "finished"


def test_one_run_at_a_time_in_a_folder_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    import os

    from hf_lorsa.training.output_folder import LOCK_FILE, lock

    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(str(sleeper.pid))  # another live run holds the folder
        with pytest.raises(UsageError, match=rf"in use by another hf-lorsa run \(process {sleeper.pid}\)"):
            train(*parse(options(out, max_steps=2)))
        assert (out / LOCK_FILE).read_text() == str(sleeper.pid) and sorted(os.listdir(out)) == [LOCK_FILE]
    finally:
        sleeper.kill()
        sleeper.wait()
    lorsa = train(*parse(options(out, max_steps=2)))  # its process is gone: the lock is taken over
    assert lorsa.config.tokens_trained == 512 and "which no longer runs" in caplog.text
    assert not (out / LOCK_FILE).exists()  # released at the end
    lock(out)
    lock(out)  # the holder may take it again
    assert (out / LOCK_FILE).read_text() == str(os.getpid())


def test_an_options_file_with_command_line_options_over_it(tmp_path):
    from conftest import ROOT

    model_args, data_args, args = parse([str(ROOT / "examples" / "stories-l2.yaml"), "--layer", "3", "--output_dir",
                                         str(tmp_path / "run"), "--max_tokens", "4096"])  # fmt: skip
    assert (model_args.layer, model_args.model_name_or_path, data_args.dataset) == (3, *["hf_lorsa:stories260K"] * 2)
    assert (
        data_args.max_tokens == 4096 and data_args.holdout_fraction == 0.01 and args.output_dir == str(tmp_path / "run")
    )
    nulls = tmp_path / "nulls.yaml"  # null keeps an option's default, with overrides as without
    nulls.write_text((ROOT / "examples" / "stories-l2.yaml").read_text() + "aux_k: null\n")
    assert parse([str(nulls), "--layer", "3", "--output_dir", str(tmp_path / "run")])[0].aux_k is None
    result = subprocess.run([sys.executable, "-m", "hf_lorsa", "train", str(ROOT / "examples" / "stories-l2.yaml"),
                             "--layer", "nine"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and len(result.stderr.splitlines()) <= 4 and "--layer" in result.stderr


def test_text_with_nothing_to_train_on_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join('{"text": ""}\n' for _ in range(3000)))
    with pytest.raises(UsageError, match="nothing to train on"):
        train(*parse(options(tmp_path / "run", dataset=str(empty), holdout_fraction=0.0, max_steps=2)))


def test_an_upload_that_fails_says_so_and_that_no_commit_was_made(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError

    from hf_lorsa.formats import commands

    def unreachable(self, *args, **kwargs):
        raise HTTPError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    lorsa = LorsaModel.from_host(build_host("llama"), 1, n_ov_heads=32, top_k=4)
    lorsa.config.base_model_name_or_path = "org/model"
    with pytest.raises(OSError, match="Uploading to the Hub repository me/one failed .*Name or service not known"):
        lorsa.push_to_hub("me/one")
    lorsa.save_pretrained(tmp_path / "release" / "layer1")
    with pytest.raises(SystemExit) as stopped:
        commands.push_main(["--folder", str(tmp_path / "release"), "--repo_id", "me/release"])
    assert stopped.value.code == 2
    assert "me/release failed ([Errno -2] Name or service not known); no commit was made" in capsys.readouterr().err


def test_a_release_checks_itself_against_its_folders_and_its_card(tmp_path, capsys):
    from hf_lorsa.analysis import command as analyze_command
    from hf_lorsa.evaluation import command as evaluate_command
    from hf_lorsa.formats.release import write_release_card
    from hf_lorsa.model.files import checked_release_layers

    host = build_host("llama")
    lorsas = {layer: LorsaModel.from_host(host, layer, n_ov_heads=32, top_k=4) for layer in (0, 1)}
    for layer, lorsa in lorsas.items():
        lorsa.save_pretrained(tmp_path / "release" / f"layer{layer}")
    write_release_card(tmp_path / "release", lorsas)
    assert checked_release_layers(tmp_path / "release") == [0, 1]
    shutil.copytree(tmp_path / "release", tmp_path / "deleted")
    shutil.rmtree(tmp_path / "deleted" / "layer1")
    shutil.copytree(tmp_path / "release", tmp_path / "swapped")
    shutil.rmtree(tmp_path / "swapped" / "layer0")
    shutil.move(tmp_path / "swapped" / "layer1", tmp_path / "swapped" / "layer0")
    for main in (evaluate_command.main, analyze_command.main):
        with pytest.raises(SystemExit):
            main(["--lorsa", str(tmp_path / "deleted")])
        assert "lists layers [0, 1] in its card, but [1] are missing (layer1/)" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            main(["--lorsa", str(tmp_path / "swapped")])
        assert "layer0 holds the Lorsa of layer 1, not 0: move it to layer1/" in capsys.readouterr().err
