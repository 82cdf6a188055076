"""A host larger than the device: accelerate's big-model loading (--device_map, --max_memory, --offload_folder) for
evaluate, analyze and training, with the results of the host in memory."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
import torch

from conftest import ROOT, SMOLLM2, SMOLLM2_GGUF, STORIES_DATA, STORIES_MODEL, require_shared
from hf_lorsa import LorsaModel
from hf_lorsa.analysis.analysis import analyze
from hf_lorsa.analysis.inspector import Inspector
from hf_lorsa.base.placement import parse_max_memory, placement
from hf_lorsa.base.usage import UsageError
from hf_lorsa.evaluation.evaluation import evaluate_lorsa
from hf_lorsa.inputs.loading import LorsaSourceArguments, open_host, open_lorsa_source
from hf_lorsa.training.run_training import parse, train

SPREAD = "cpu=200MB"  # SmolLM2 in float32 is 540 MB: the embeddings and a few blocks stay, the rest goes to disk


def test_the_options_are_checked_as_they_are_read(tmp_path):
    assert parse_max_memory("0=20GiB, cpu=60GiB") == {0: "20GiB", "cpu": "60GiB"}
    assert placement(None, None, None) == {}
    assert placement(None, "cpu=1GB", str(tmp_path)) == {  # a limit alone means --device_map auto
        "device_map": "auto", "max_memory": {"cpu": "1GB"}, "offload_folder": str(tmp_path)}  # fmt: skip
    for options, message in [
        ({"max_memory": "cpu=lots"}, r"'lots' is not a size \(e.g. 500MiB, 20GiB\)"),
        ({"max_memory": "60GiB"}, "give DEVICE=SIZE pairs"),
        ({"device_map": "everywhere"}, "--device_map 'everywhere': give auto, balanced"),
        ({"offload_folder": str(tmp_path / "file" / "under")}, "which is a file"),
    ]:
        (tmp_path / "file").write_text("")
        with pytest.raises(UsageError, match=message):
            LorsaSourceArguments(lorsa=str(tmp_path), **options)
        with pytest.raises(UsageError, match=message):
            parse([f"--model_name_or_path={SMOLLM2}", "--layer=3", f"--output_dir={tmp_path / 'out'}", f"--dataset={STORIES_DATA}",
                   *(f"--{k}={v}" for k, v in options.items())])  # fmt: skip


def test_a_host_offloaded_to_disk_gives_the_results_of_one_in_memory(tmp_path):
    require_shared(SMOLLM2 / SMOLLM2_GGUF)
    host = open_host(str(SMOLLM2), SMOLLM2_GGUF)
    lorsa = LorsaModel.from_host(host, 3, n_ov_heads=576, top_k=8)
    lorsa.config.base_model_name_or_path, lorsa.config.base_model_gguf_file = str(SMOLLM2), SMOLLM2_GGUF
    lorsa.config.skip_token_ids = [1, 2]
    lorsa.save_pretrained(tmp_path / "lorsa")
    del host
    options = dict(lorsa=str(tmp_path / "lorsa"), dataset=str(STORIES_DATA), context_length=32, max_tokens=256,
                   batch_size=4)  # fmt: skip
    results, tables = [], []
    for spread in ({}, {"max_memory": SPREAD, "offload_folder": str(tmp_path / "offload")}):
        opened = open_lorsa_source(LorsaSourceArguments(**options, **spread))
        if spread:
            where = Counter(opened.host.hf_device_map.values())
            assert where["disk"] >= 20 and where["cpu"] >= 1, where  # most blocks on disk
        results.append(evaluate_lorsa(opened.host, opened.lorsa, opened.windows, 256, 4, progress=False).to_dict())
        tables.append(analyze(opened.host, opened.lorsa, opened.windows, 256, tokenizer=opened.tokenizer,
                              progress=False).to_list())  # fmt: skip
    assert results[0] == results[1] and results[0]["kl_spliced"] > 0
    assert tables[0] == tables[1]


def test_training_on_an_offloaded_host_is_the_same_run(tmp_path):
    require_shared(SMOLLM2 / SMOLLM2_GGUF)
    data = tmp_path / "stories.jsonl"
    data.write_text("".join(STORIES_DATA.read_text().splitlines(keepends=True)[:100]))
    options = [f"--{k}={v}" for k, v in {
        "model_name_or_path": SMOLLM2, "gguf_file": SMOLLM2_GGUF, "layer": 3, "dataset": data, "expansion_factor": 1,
        "top_k": 8, "context_length": 32, "batch_size": 4, "max_tokens": 128 * 4, "holdout_fraction": 0.0,
        "report_to": "none", "seed": 3, "disable_tqdm": "true", "use_cpu": "true"}.items()]  # fmt: skip
    memory = train(*parse([*options, f"--output_dir={tmp_path / 'memory'}"]))
    disk = train(*parse([*options, f"--output_dir={tmp_path / 'disk'}", "--max_memory=cpu=130MB",
                         f"--offload_folder={tmp_path / 'offload'}"]))  # fmt: skip
    assert any((tmp_path / "offload").iterdir())  # blocks went to disk
    for name, value in memory.state_dict().items():
        torch.testing.assert_close(disk.state_dict()[name], value, rtol=0, atol=0)


def test_the_space_reads_an_offloaded_host(tmp_path, stories_model):
    require_shared()
    lorsa = LorsaModel.from_host(stories_model, 2, n_ov_heads=64, top_k=8)
    lorsa.config.base_model_name_or_path, lorsa.config.skip_token_ids = str(STORIES_MODEL), [1]
    lorsa.save_pretrained(tmp_path / "lorsa")
    memory = Inspector.load(str(tmp_path / "lorsa"))
    disk = Inspector.load(str(tmp_path / "lorsa"), spread=("auto", "cpu=200KB", str(tmp_path / "offload")))
    assert set(disk.model.hf_device_map.values()) == {"disk"}
    assert disk.head_table().equals(memory.head_table())
    text = "Once upon a time, there was a little dog."
    assert disk.text(text) == memory.text(text) and disk.position_heads(text, 4).equals(memory.position_heads(text, 4))
    app = ROOT / "spaces" / "lorsa-inspector" / "app.py"
    refused = subprocess.run([sys.executable, str(app), "--lorsa", str(tmp_path / "lorsa"), "--max_memory", "cpu=lots"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "'lots' is not a size" in refused.stderr


def test_tied_embeddings_offloaded_to_disk_are_refused_with_the_room_they_need(tmp_path):
    require_shared(SMOLLM2 / SMOLLM2_GGUF)
    with pytest.raises(ValueError, match=r"sent lm_head.weight to disk, .* at least 108 MiB more in --max_memory"):
        open_host(
            str(SMOLLM2), SMOLLM2_GGUF, max_memory={"cpu": "60MB"}, offload_folder=str(tmp_path), device_map="auto"
        )
