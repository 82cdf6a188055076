"""The README's example and every command it documents run as written."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from conftest import ROOT, STORIES_MODEL, app_config, free_port


def test_readme_example_runs(tmp_path):
    """The first snippet as a script of its own, run from an empty folder: it needs nothing beside the package."""
    text = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(example.strip().splitlines()) == 6
    (tmp_path / "example.py").write_text(example)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "512 OV heads, 16 active per token; spliced logits (1, 5, 512)\n"
    snippets = re.findall(r"```python\n(.*?)```", text, re.S)  # each stands alone: its imports come first
    assert len(snippets) >= 2 and all(snippet.startswith("import ") for snippet in snippets)


# ---- every command of the README, run as a user types it ---------------------------------------------------

SMALL_BUDGET = "16384"  # the one change to the training commands: a small --max_tokens
NOT_RUN = ("bash .ci/setup", "python -m pytest -q")  # setting up and running this very suite


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and line not in NOT_RUN:
                commands.append(" ".join(line.split()))
    return commands


def fresh_clone(target: Path) -> Path:
    """What a clone of the working tree holds (tracked files and new ones git does not ignore), with nothing beside
    it: no ../shared."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A fresh clone in a folder of its own, so that commands write nothing into the checkout and find no ../shared."""
    root = tmp_path_factory.mktemp("readme")
    fresh_clone(root / "project")
    assert not (root / "shared").exists()
    yaml_file = root / "project" / "examples" / "stories-l2.yaml"
    yaml_file.write_text(re.sub(r"max_tokens: \d+", f"max_tokens: {SMALL_BUDGET}", yaml_file.read_text()))
    return root / "project"


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    if "train" in command.split(" --model_name_or_path")[0] and "--max_tokens" in command:
        command = re.sub(r"--max_tokens \S+", f"--max_tokens {SMALL_BUDGET}", command)
    if command == "hf-lorsa quickstart":  # its full budget is timed in BENCHMARKS.md
        command += f" --max_tokens {SMALL_BUDGET}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    raw = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, timeout=900)
    # decoded by hand: text=True would turn carriage returns into newlines and hide progress-bar floods
    result = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(), raw.stderr.decode())
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "\r" not in result.stderr and "Traceback" not in result.stderr  # no progress-bar floods in a log
    return result


def test_the_readme_lists_the_commands_these_tests_run():
    assert [c.split(" --")[0] for c in readme_commands()] == [
        "hf-lorsa quickstart", "hf-lorsa train", "accelerate launch", "hf-lorsa train examples/stories-l2.yaml",
        "hf-lorsa evaluate", "python scripts/evaluate.py", "hf-lorsa analyze",
        "python spaces/lorsa-inspector/app.py", "python scripts/build_space.py", "hf-lorsa train",
        "hf-lorsa evaluate", "hf-lorsa export", "python scripts/bench.py", "python scripts/bench.py",
        "python scripts/plan_memory.py", "python scripts/check_memory_plan.py",
    ]  # fmt: skip


def test_every_readme_command_runs_as_written(project):
    from hf_lorsa import LorsaModel

    commands = readme_commands()
    assert not any("shared" in command for command in commands)
    result = run(commands[0], project)  # hf-lorsa quickstart: trains, evaluates, says where and what next
    quick = project / "runs" / "quickstart"
    lorsa = LorsaModel.from_pretrained(quick)
    assert lorsa.config.base_model_name_or_path == "hf_lorsa:stories260K" and lorsa.config.layer == 2
    assert lorsa.config.tokens_trained == int(SMALL_BUDGET) and 0 < lorsa.eval_results["fvu"] < 1
    assert "is in runs/quickstart/" in result.stdout and "hf-lorsa analyze --lorsa runs/quickstart" in result.stdout
    assert json.loads(result.stdout.splitlines()[-1])["fvu"] == lorsa.eval_results["fvu"]
    logs = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"loss"')]
    last = logs[-1]  # a progress line: how far, of how much, how long still
    assert last["tokens_total"] == int(SMALL_BUDGET) and last["eta_s"] >= 0
    assert last["progress"] == round(100 * last["tokens"] / last["tokens_total"], 1) < 100
    assert "pin_memory" not in result.stderr and "fewer than --eval_tokens 100000" in result.stderr
    commands = commands[1:]
    trained = {}
    for command in commands[:3]:  # the three training commands
        result = run(command, project)
        assert "defaults used instead" not in result.stderr  # accelerate launch reads the config it is given
        out = project / re.search(r"--output_dir (\S+)", command + " --output_dir runs/stories-l2-yaml").group(1)
        lorsa = LorsaModel.from_pretrained(out)
        logs = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        assert any(isinstance(row.get("fvu"), float) for row in logs)  # numbers, not strings
        assert lorsa.config.tokens_trained == int(SMALL_BUDGET) and not list(out.glob("checkpoint-*"))
        assert json.loads((out / "lorsa_run.json").read_text())["status"] == "finished"
        assert 0 < lorsa.eval_results["fvu"] < 1 and lorsa.eval_results["dataset_split"].startswith("last 0.01")
        trained[out.name] = lorsa
    assert [lorsa.config.layer for lorsa in trained.values()] == [2, 3, 2]
    assert list((project / "runs" / "stories-l3" / "runs").rglob("events.out.tfevents.*"))  # default: tensorboard
    again = run(commands[0].replace(f"--max_tokens {SMALL_BUDGET}", ""), project)  # a finished run: nothing to do
    assert "nothing to do" in again.stderr

    lorsa_dir = quick
    before = json.loads((lorsa_dir / "eval_results.json").read_text())
    result = run(commands[3], project)  # hf-lorsa evaluate: the run's own held-out data
    text = (lorsa_dir / "eval_results.json").read_text()
    results = json.loads(text)
    assert text.startswith('{\n  "fvu"') and sys.executable not in text
    assert results["dataset_split"].startswith("last 0.05") and results["n_tokens"] == before["n_tokens"]
    assert results["fvu"] == pytest.approx(before["fvu"], rel=1e-4)  # the same held-out text as the run's own
    assert "fewer than --max_tokens 200000" in result.stderr
    assert f"{results['fvu']:.6g}" in (lorsa_dir / "README.md").read_text()
    assert LorsaModel.from_pretrained(lorsa_dir).eval_results["fvu"] == results["fvu"]
    run(commands[4], project)  # scripts/evaluate.py on other data, to another file (whole batches of 8 x 256)
    other = json.loads((project / "runs" / "quickstart-first-stories.json").read_text())
    assert other["dataset"] == "hf_lorsa:stories260K" and "dataset_split" not in other
    assert 18_000 < other["n_tokens"] <= 20_480 and other["fvu"] != results["fvu"]

    result = run(commands[5], project)  # hf-lorsa analyze
    analysis = json.loads((lorsa_dir / "analysis" / "meta.json").read_text())
    assert analysis["n_tokens"] == results["n_tokens"] and f"{analysis['n_tokens']} tokens" in result.stdout
    import datasets

    assert len(datasets.Dataset.from_parquet(str(lorsa_dir / "analysis" / "heads.parquet"))) == 512

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               GRADIO_ANALYTICS_ENABLED="False")  # fmt: skip
    app = subprocess.Popen(commands[6], shell=True, cwd=project, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        page = app_config(port, app)
        assert "Lorsa for layer 2" in page and f"Analysis over {analysis['n_tokens']} tokens" in page
    finally:
        os.killpg(app.pid, signal.SIGTERM)
        app.wait(timeout=30)

    run(commands[7], project)  # python scripts/build_space.py
    assert [p.name for p in (project / "spaces" / "lorsa-inspector").glob("*.whl")] == [
        "hf_lorsa-0.1.0-py3-none-any.whl"
    ]
    import zipfile

    wheel = zipfile.ZipFile(project / "spaces" / "lorsa-inspector" / "hf_lorsa-0.1.0-py3-none-any.whl").namelist()
    for name in ("stories260K/model.safetensors", "stories260K/tokenizer.json", "stories260K/LICENSE",
                 "stories260K-stories.jsonl"):  # fmt: skip
        assert f"hf_lorsa/embedded/{name}" in wheel  # pip install hf_lorsa has the embedded host and stories
    run(commands[8], project)  # hf-lorsa train --layers 1-4: a release
    release = project / "runs" / "stories-all"
    assert sorted(p.name for p in release.glob("layer*")) == ["layer1", "layer2", "layer3", "layer4"]
    assert LorsaModel.from_pretrained(release, subfolder="layer3").config.tokens_trained == int(SMALL_BUDGET)
    result = run(commands[9], project)  # hf-lorsa evaluate of the release: each layer and the whole replacement
    whole = json.loads((release / "eval_results.json").read_text())["whole_replacement"]
    assert whole["layers"] == [1, 2, 3, 4] and whole["loss_replaced"] > whole["loss_clean"]
    assert "## The whole replacement" in (release / "README.md").read_text()
    assert json.loads(result.stdout)["layers"]["2"]["layer"] == 2

    result = run(commands[10], project)  # hf-lorsa export: the authors' format, read back equal
    lorsa_dir = project / "runs" / "stories-l2"
    exported = project / "runs" / "stories-l2-llamascopium"
    assert json.loads((exported / "config.json").read_text())["hook_point_in"] == "blocks.2.ln1.hook_normalized"
    assert "blocks.2.ln1.hook_normalized" in result.stdout
    native = LorsaModel.from_pretrained(lorsa_dir)
    back = LorsaModel.from_pretrained(exported, host=transformers.AutoModelForCausalLM.from_pretrained(STORIES_MODEL))
    bookkeeping = ("_name_or_path", "architectures")  # where it was loaded from, what saving it records
    assert {k: v for k, v in back.config.to_dict().items() if k not in bookkeeping} == {
        k: v for k, v in native.config.to_dict().items() if k not in bookkeeping
    }
    for name, tensor in native.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, rtol=1e-6, atol=1e-7, msg=name)

    result = run(commands[11], project)  # python scripts/bench.py
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["config"] for row in rows] == ["a", "b"] and all(row["tokens_per_s"] > 0 for row in rows)

    result = run(commands[12], project)  # python scripts/bench.py --pipeline --shape tiny
    pipeline = json.loads(result.stdout.splitlines()[-1])
    assert pipeline["shape"] == "tiny" and pipeline["tokens_trained"] == 16384 and pipeline["steps"] == 32
    assert pipeline["train_tokens_per_s"] > 0 and pipeline["fvu"] < 0.5  # 0.22 on the 2-core CPU

    result = run(commands[13], project)  # python scripts/plan_memory.py: the README's table, from meta-device hosts
    plans = {row["host"]: row for row in map(json.loads, result.stdout.splitlines())}
    table = re.findall(r"^\| (Llama-[^|]+?) \| ([0-9.]+) GiB \| ([0-9.]+) GiB .*\| ([0-9.]+) GiB \|$",
                       (project / "README.md").read_text(), re.M)  # fmt: skip
    assert [(h, float(a), float(b), float(c)) for h, a, b, c in table] == [
        (h, plans[h]["host_loaded"], plans[h]["host_whole"], plans[h]["peak"]) for h in plans]  # fmt: skip
    eight = plans["Llama-3.1-8B"]
    assert eight["host_whole"] == round(8_030_261_248 * 2 / 2**30, 2)  # Llama-3.1-8B's parameter count, bf16
    # 256 QK heads of 128 (queries and keys with biases), 32,768 OV heads (w_v, w_o, b_v), the output bias
    assert eight["lorsa_parameters"] == 2 * 256 * 128 * 4097 + 32768 * (2 * 4096 + 1) + 4096
    assert eight["peak"] == round(sum(eight[k] for k in ("host_loaded", "host_activations", "lorsa_states",
                                                          "lorsa_activations")), 2)  # fmt: skip

    result = run(commands[14], project)  # python scripts/check_memory_plan.py --shapes 1024: the plan, a real peak
    check = json.loads(result.stdout.splitlines()[-1])
    assert check["shape"] == "1024" and check["d_model"] == 1024 and check["lorsa_parameters"] == 33_580_032
    parts = ("process", "host_loaded", "host_activations", "lorsa_states", "best_weights", "lorsa_activations")
    assert check["peak"] == pytest.approx(sum(check[k] for k in parts), abs=0.02)
    assert 0.85 < check["planned_over_measured"] < 1.15, check  # 0.98 alone on the 2-core CPU (BENCHMARKS.md)
