"""Several layers from one host pass (`--layers`): the same Lorsas as trained alone, a release folder, resume,
evaluation of the whole replacement, publishing, and bad input."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import STORIES_DATA, STORIES_MODEL, require_shared
from hf_lorsa import LorsaModel
from hf_lorsa.base.usage import UsageError, parse_layers
from hf_lorsa.training.run_training import parse, train, train_layers
from test_bad_input import Crash, no_model_loading, snapshot  # noqa: F401 - fixtures
from test_training import options


def several(output_dir, layers="2,3", **overrides) -> list[str]:
    return [o for o in options(output_dir, **overrides) if not o.startswith("--layer=")] + [f"--layers={layers}"]


def weights(folder) -> dict:
    return load_file(folder / "model.safetensors")


def test_each_layer_of_a_joint_run_equals_that_layer_trained_alone(tmp_path):
    require_shared()
    clipped = {"holdout_fraction": 0.0, "max_grad_norm": 0.05}  # every step clipped: each Lorsa on its own
    joint = train_layers(*parse(several(tmp_path / "joint", **clipped)))
    assert sorted(joint) == [2, 3]
    for layer in (2, 3):
        alone = tmp_path / f"alone-{layer}"
        train(*parse(options(alone, layer=layer, **clipped)))
        together = weights(tmp_path / "joint" / f"layer{layer}")
        for name, tensor in weights(alone).items():
            torch.testing.assert_close(together[name], tensor, atol=1e-6, rtol=0, msg=f"layer {layer} {name}")
        assert LorsaModel.from_pretrained(tmp_path / "joint", subfolder=f"layer{layer}").config.layer == layer


def test_a_release_folder_holds_every_layer_and_a_card_of_their_results(tmp_path):
    require_shared()
    out = tmp_path / "release"
    result = train_layers(*parse(several(out, layers="1-3:2", report_to="tensorboard")))
    assert sorted(result) == [1, 3] and sorted(p.name for p in out.iterdir()) == [
        "README.md", "layer1", "layer3", "lorsa_run.json", "runs",
    ]  # fmt: skip
    card = (out / "README.md").read_text()
    for layer in (1, 3):
        folder = out / f"layer{layer}"
        assert {"config.json", "model.safetensors", "README.md", "eval_results.json"} <= {
            p.name for p in folder.iterdir()
        }
        fvu = json.loads((folder / "eval_results.json").read_text())["fvu"]
        assert f"| {layer} | `layer{layer}` | 128 | 8 | {fvu:.4g} |" in card
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "runs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"train/layer1/fvu", "train/layer3/fvu", "train/layer3/silent_heads"} <= set(events.Tags()["scalars"])
    # the rerun of a finished release does nothing and gives the same Lorsas
    again = train_layers(*parse(several(out, layers="1-3:2", report_to="tensorboard")))
    assert torch.equal(again[3].w_o, result[3].w_o)


def test_a_run_killed_midway_and_rerun_ends_as_the_uninterrupted_run(tmp_path):
    require_shared()
    straight = tmp_path / "straight"
    train_layers(*parse(several(straight, holdout_fraction=0.0)))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        train_layers(*parse(several(out, holdout_fraction=0.0)), callbacks=[Crash()])
    assert (out / "checkpoint-6").is_dir()
    train_layers(*parse(several(out, holdout_fraction=0.0)))  # the same command again
    for layer in (2, 3):
        resumed, uninterrupted = weights(out / f"layer{layer}"), weights(straight / f"layer{layer}")
        for name, tensor in uninterrupted.items():
            torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=0, msg=f"layer {layer} {name}")


# ---- bad input ----------------------------------------------------------------------------------------


def test_layer_lists_parse_and_bad_ones_name_the_problem():
    assert parse_layers("2,4,6", 30) == [2, 4, 6] and parse_layers("0-29:3", 30) == list(range(0, 30, 3))
    assert parse_layers("all", 5) == [0, 1, 2, 3, 4] and parse_layers(" 7 , 1-2", 8) == [1, 2, 7]
    for spec, message in [
        ("2,2", r"names layer\(s\) \[2\] more than once"), ("1-3,3", r"\[3\] more than once"),
        ("", "is not a layer"), ("two", "is not a layer"), ("5-2", "is empty"), ("1-4:0", "is empty"),
        ("0-9", r"layer\(s\) \[5, 6, 7, 8, 9\] do not exist; the model has layers 0-4"),
    ]:  # fmt: skip
        with pytest.raises(UsageError, match=message):
            parse_layers(spec, 5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layer=2", "--layers=2,3"], "Give --layer L .* or --layers .*, not both"),
        (["--layers=2,2"], "more than once"),
        (["--layers=1,9"], r"layer\(s\) \[9\] do not exist; the model has layers 0-4"),
        (["--layers="], "is not a layer"),
        (
            ["--layers=all", "--expansion_factor=1000000"],
            r"5 Lorsa\(s\) of .* parameters need about \d+.\d GiB .* more than",
        ),
    ],
)
def test_bad_layer_options_fail_before_any_model_loads(tmp_path, no_model_loading, argv, message):  # noqa: F811
    require_shared()
    base = [o for o in options(tmp_path / "out") if not o.startswith("--layer=")]
    with pytest.raises(UsageError, match=message):
        train_layers(*parse(base + argv))
    assert not (tmp_path / "out").exists()


def test_one_host_pass_cached_for_several_layers_serves_every_lorsa_of_them(tmp_path, monkeypatch):
    """Activations once, dictionaries many: a cache of layers 2 and 3 trains them together, then layer 3 alone at
    another size, without running the host for a step; the same Lorsas as without the cache."""
    require_shared()
    cache, data = tmp_path / "cache", tmp_path / "stories.jsonl"
    data.write_text("".join(Path(STORIES_DATA).read_text().splitlines(keepends=True)[:200]))
    short = {"dataset": data, "holdout_fraction": 0.0, "max_tokens": 256 * 4}
    joint = train_layers(*parse(several(tmp_path / "joint", activation_cache=cache, **short)))
    assert sorted(json.loads((cache / "cache.json").read_text())["key"]["layers"]) == [2, 3]
    import hf_lorsa.training.trainer as training

    real = training.collect_layers
    monkeypatch.setattr(training, "collect_layers", lambda *a, **k: pytest.fail("a step ran the host"))
    bigger = {**short, "expansion_factor": 4}
    alone = train(*parse(options(tmp_path / "alone", layer=3, activation_cache=cache, **bigger)))
    monkeypatch.setattr(training, "collect_layers", real)
    without = train_layers(*parse(several(tmp_path / "without", **short)))
    for layer in (2, 3):
        for name, value in without[layer].state_dict().items():
            torch.testing.assert_close(joint[layer].state_dict()[name], value, atol=1e-6, rtol=0)
    reference = train(*parse(options(tmp_path / "reference", layer=3, **bigger)))
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(alone.state_dict()[name], value, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"made for other settings \{'layers': \(\[2, 3\], \[1, 2\]\)\}"):
        train_layers(*parse(several(tmp_path / "other", layers="1,2", activation_cache=cache, **short)))


def test_a_release_given_where_one_lorsa_is_expected_and_the_reverse(tmp_path):
    require_shared()
    out = tmp_path / "release"
    train_layers(*parse(several(out, holdout_fraction=0.0)))
    with pytest.raises(OSError, match=r"a release of layers \[2, 3\]: pass subfolder='layer2'"):
        LorsaModel.from_pretrained(out)
    from hf_lorsa import push_release

    with pytest.raises(ValueError, match="is one Lorsa, not a release"):
        push_release(out / "layer2", "org/name")


def test_push_release_uploads_the_folder_in_one_commit_without_training_state(tmp_path, monkeypatch, capsys):
    require_shared()
    out = tmp_path / "release"
    embedded = {"model_name_or_path": "hf_lorsa:stories260K", "dataset": "hf_lorsa:stories260K"}
    train_layers(*parse(several(out, holdout_fraction=0.0, keep_checkpoints="true", **embedded)))
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, **kwargs):
            calls.append(kwargs)
            return "commit"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    from hf_lorsa import push_release

    assert push_release(out, "org/lorsa-release") == "commit" and len(calls) == 1
    import fnmatch

    uploaded = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    kept = [p for p in uploaded if not any(fnmatch.fnmatch(p, pattern) for pattern in calls[0]["ignore_patterns"])]
    assert calls[0]["folder_path"] == str(out) and calls[0]["repo_id"] == "org/lorsa-release"
    assert sorted(kept) == sorted(
        ["README.md"] + [f"layer{layer}/{name}" for layer in (2, 3)
                         for name in ("README.md", "config.json", "model.safetensors")]
    )  # fmt: skip
    from hf_lorsa.cli import main  # the same from the command line

    assert main(["push", "--folder", str(out), "--repo_id", "org/lorsa-release"]) == 0 and len(calls) == 2
    assert "Pushed" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["push", "--folder", str(out / "layer2"), "--repo_id", "org/lorsa-release"])
    assert exit_info.value.code == 2 and "is one Lorsa, not a release" in capsys.readouterr().err
    local = tmp_path / "local"  # a release of a local host's folder: published only with the host's Hub id
    train_layers(*parse(several(local, holdout_fraction=0.0)))
    with pytest.raises(ValueError, match="local path .*--base_model org/name. Nothing was uploaded"):
        push_release(local, "org/lorsa-release")
    assert len(calls) == 2
    staged = {}
    FakeApi.upload_folder = lambda self, **kwargs: staged.update(
        {p.relative_to(kwargs["folder_path"]).as_posix(): p.read_text() for p in Path(kwargs["folder_path"]).rglob("*.md")}
    )  # fmt: skip
    push_release(local, "org/lorsa-release", base_model="org/stories260K")
    assert sorted(staged) == ["README.md", "layer2/README.md", "layer3/README.md"]
    assert all("base_model: org/stories260K" in text for text in staged.values())
    assert str(STORIES_MODEL) in (local / "layer2" / "config.json").read_text()  # the user's folder is unchanged


def test_evaluating_a_release_gives_each_layer_and_the_whole_replacement(tmp_path):
    require_shared()
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import STORIES_DATA, STORIES_MODEL
    from hf_lorsa import splice
    from hf_lorsa.evaluation.evaluation import evaluate_lorsa
    from hf_lorsa.host.attention_mask import counted_positions
    from hf_lorsa.inputs.activations import load_text, pack

    out = tmp_path / "release"
    lorsas = train_layers(*parse(several(out)))
    command = [sys.executable, "-m", "hf_lorsa", "evaluate", "--lorsa", str(out), "--dataset", str(STORIES_DATA),
               "--context_length", "64", "--max_tokens", "2048", "--overwrite", "--update_card"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    whole = json.loads((out / "eval_results.json").read_text())["whole_replacement"]
    host = AutoModelForCausalLM.from_pretrained(STORIES_MODEL)
    windows = pack(load_text(str(STORIES_DATA), "text"), AutoTokenizer.from_pretrained(STORIES_MODEL), 64, "text")
    for layer in (2, 3):
        got = json.loads((out / f"layer{layer}" / "eval_results.json").read_text())
        want = evaluate_lorsa(host, lorsas[layer], windows, 2048, progress=False)
        assert got["fvu"] == pytest.approx(want.fvu, rel=1e-5) and got["n_tokens"] == want.n_tokens
        assert got["loss_spliced"] == pytest.approx(want.loss_spliced, rel=1e-5)
        assert f"{got['fvu']:.6g}" in (out / f"layer{layer}" / "README.md").read_text()
    # the whole replacement, computed here with both Lorsas spliced at once
    ids = torch.stack([torch.as_tensor(w["input_ids"]) for w in windows.select(range(32))])
    counted = counted_positions(ids, lorsas[2].config.skip_token_ids)[:, :-1]
    with torch.no_grad():
        clean = host(input_ids=ids).logits[:, :-1]
        with splice(host, lorsas[2]), splice(host, lorsas[3]):
            replaced = host(input_ids=ids).logits[:, :-1]
    targets = ids[:, 1:][counted]
    loss = torch.nn.functional.cross_entropy(replaced[counted], targets).item()
    assert whole["layers"] == [2, 3] and whole["n_predictions"] == int(counted.sum())
    assert whole["loss_replaced"] == pytest.approx(loss, rel=1e-4)
    assert whole["loss_clean"] == pytest.approx(
        torch.nn.functional.cross_entropy(clean[counted], targets).item(), rel=1e-4
    )
    assert whole["loss_replaced"] > max(
        json.loads((out / f"layer{layer}" / "eval_results.json").read_text())["loss_spliced"] for layer in (2, 3)
    )
    assert 0 < whole["loss_recovered_zero"] < 1 and "## The whole replacement" in (out / "README.md").read_text()


def test_analyze_and_the_space_take_a_release(tmp_path):
    require_shared()
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT, STORIES_DATA, app_config, free_port

    out = tmp_path / "release"
    train_layers(*parse(several(out)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "hf_lorsa", "analyze", "--lorsa", str(out), "--dataset", str(STORIES_DATA),
               "--context_length", "64", "--max_tokens", "1024", "--top_n", "3"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Saved the analysis of 128 heads") == 2
    assert all((out / f"layer{layer}" / "analysis" / "heads.parquet").exists() for layer in (2, 3))
    from hf_lorsa.analysis.inspector import cached_inspector  # the Space's layers share one host, and its lock

    two, three = cached_inspector(str(out), None, "layer2"), cached_inspector(str(out), None, "layer3")
    assert (two.lorsa.config.layer, three.lorsa.config.layer) == (2, 3) and len(three.head_table()) == 128
    assert two.model is three.model and two.lock is three.lock

    port = free_port()
    env.update(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False")
    app = subprocess.Popen([sys.executable, str(ROOT / "spaces" / "lorsa-inspector" / "app.py"), "--lorsa", str(out)],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        page = app_config(port, app)
        assert "layer-picker" in page and '"layer3"' in page and "Lorsa for layer 2" in page
        from gradio_client import Client

        header = Client(f"http://127.0.0.1:{port}/", verbose=False).predict("layer3", api_name="/pick_layer")
        assert "Lorsa for layer 3" in header
    finally:
        os.killpg(app.pid, signal.SIGTERM)
        app.wait(timeout=30)


def test_one_lorsa_or_several_each_have_their_own_call(tmp_path):
    require_shared()
    with pytest.raises(UsageError, match="call train_layers"):
        train(*parse(several(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
