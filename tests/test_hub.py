"""Saving, loading and sharing: safetensors only, subfolders, Hub ids from a cache, push_to_hub, cards."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoModel

from hf_lorsa import LorsaConfig, LorsaModel


def small_lorsa(layer: int = 1) -> LorsaModel:
    torch.manual_seed(layer)
    config = LorsaConfig(
        d_model=32, n_qk_heads=4, d_qk_head=8, n_ov_heads=64, top_k=8, qk_norm=True, layer=layer,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, base_model_name_or_path="org/tiny-llama",
        host_model_type="llama", dataset_name="org/stories",
    )  # fmt: skip
    model = LorsaModel(config)
    with torch.no_grad():
        model.q_norm.weight.mul_(1.5)
    return model


def assert_same(a: LorsaModel, b: LorsaModel) -> None:
    assert a.config.to_diff_dict() | {"_name_or_path": ""} == b.config.to_diff_dict() | {"_name_or_path": ""}
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name
    x = torch.randn(2, 6, 32)
    assert torch.equal(a(x).reconstruction, b(x).reconstruction)


def test_save_and_load_round_trip(tmp_path):
    model = small_lorsa()
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "model.safetensors"]
    assert_same(model, LorsaModel.from_pretrained(tmp_path))
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LorsaConfig)
    assert_same(model, AutoModel.from_pretrained(tmp_path))


def test_subfolder_per_layer(tmp_path):
    layers = {layer: small_lorsa(layer) for layer in (0, 1)}
    for layer, model in layers.items():
        model.save_pretrained(tmp_path / f"layer{layer}")
    for layer, model in layers.items():
        loaded = LorsaModel.from_pretrained(tmp_path, subfolder=f"layer{layer}")
        assert loaded.config.layer == layer
        assert_same(model, loaded)


def lay_out_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "a" * 40) -> None:
    """Write `folder` into `cache` exactly as huggingface_hub leaves a download: blobs, snapshots, refs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for file in folder.rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / file.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_load_by_repo_id_from_the_cache_offline(tmp_path):
    release = tmp_path / "release"
    model, other = small_lorsa(), small_lorsa(layer=0)
    model.save_pretrained(release / "layer1")
    other.save_pretrained(release)  # a repository whose root is a Lorsa too
    lay_out_hub_cache(tmp_path / "cache", "org/lorsa-tiny", release)
    x = torch.randn(1, 5, 32)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch, hf_lorsa\n"
        "m = hf_lorsa.LorsaModel.from_pretrained('org/lorsa-tiny', subfolder='layer1')\n"
        "root = hf_lorsa.LorsaModel.from_pretrained('org/lorsa-tiny')\n"
        "assert root.config.layer == 0 and m.config.layer == 1\n"
        "x = torch.load(sys.argv[1])\n"
        "torch.save(m(x).reconstruction, sys.argv[2])\n"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"))
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], env=env, check=True)
    assert torch.equal(torch.load(tmp_path / "y.pt"), model(x).reconstruction)


class FakeHub:
    """Stands in for the Hub API that transformers' upload mixin calls."""

    def __init__(self):
        self.commits = []

    def create_repo(self, repo_id, **kwargs):
        return type("Repo", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        self.commits.append((repo_id, files, kwargs))
        return "commit"


def test_push_to_hub_uploads_weights_config_and_card(monkeypatch, tmp_path):
    import transformers.utils.hub as transformers_hub

    hub = FakeHub()
    monkeypatch.setattr(transformers_hub, "hf_api", lambda: hub)
    model = small_lorsa()
    model.eval_results = {"fvu": 0.12, "loss_recovered_zero": 0.97, "dataset": "org/stories"}
    model.push_to_hub("org/lorsa-tiny", subfolder="layer1")
    ((repo_id, files, _),) = hub.commits
    assert repo_id == "org/lorsa-tiny"
    assert set(files) == {
        "layer1/model.safetensors",
        "layer1/config.json",
        "layer1/README.md",
        "layer1/eval_results.json",
    }
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    assert_same(model, LorsaModel.from_pretrained(tmp_path, subfolder="layer1"))
    card = ModelCard.load(tmp_path / "layer1" / "README.md")
    assert card.data.library_name == "hf_lorsa" and card.data.base_model == "org/tiny-llama"
    assert "layer-1" in card.data.tags and card.data.datasets == ["org/stories"]
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics == {"fvu": 0.12, "loss_recovered_zero": 0.97}
    assert "| layer | 1 |" in card.text and "| OV heads | 64 |" in card.text


def test_pickle_checkpoints_are_refused_and_never_loaded(tmp_path, monkeypatch):
    model = small_lorsa()
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(OSError, match="never loads pickle checkpoints"):
        LorsaModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="safetensors checkpoints only"):
        LorsaModel.from_pretrained(tmp_path, use_safetensors=False)


def test_corrupted_and_missing_checkpoints(tmp_path):
    small_lorsa().save_pretrained(tmp_path / "ok")
    shutil.copytree(tmp_path / "ok", tmp_path / "bad")
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (tmp_path / "bad" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises((ValueError, OSError), match="Lorsa"):
        LorsaModel.from_pretrained(tmp_path / "bad")
    with pytest.raises(OSError, match="needs config.json and model.safetensors"):
        LorsaModel.from_pretrained(tmp_path / "nothing-here")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    config["n_ov_heads"] = 63
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="multiple of n_qk_heads"):
        LorsaModel.from_pretrained(tmp_path / "bad")
