"""Training with the Trainer on the real stories260K model: outputs, resume, processes, cache, bad input."""

import functools
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import ROOT, STORIES_DATA, STORIES_MODEL, require_shared
from hf_lorsa import LorsaModel
from hf_lorsa.model.model_card import SELECTIONS
from hf_lorsa.training.head_balance import MAX_FREQUENCY, balance_thresholds
from hf_lorsa.training.run_training import parse, train
from hf_lorsa.training.trainer import LorsaTrainer, annealed_k

pytestmark = pytest.mark.usefixtures("shared")


@pytest.fixture
def shared():
    require_shared()


def options(output_dir, **overrides) -> list[str]:
    opts = {
        "model_name_or_path": STORIES_MODEL, "layer": 2, "dataset": STORIES_DATA, "output_dir": output_dir,
        "expansion_factor": 2, "top_k": 8, "context_length": 64, "batch_size": 4, "max_tokens": 256 * 12,
        "holdout_fraction": 0.02, "eval_tokens": 2048, "save_steps": 6, "logging_steps": 3, "report_to": "none",
        "seed": 3, "dead_tokens": 512, "disable_tqdm": "true",
        "use_cpu": "true",  # the same exact arithmetic whether or not the machine has a GPU
    }  # fmt: skip
    opts.update(overrides)
    return [f"--{k}={v}" for k, v in opts.items()]


def test_annealed_k_decays_exponentially_then_stays():
    ks = [annealed_k(step, 100, 512, 16, 0.1) for step in range(12)]
    assert ks[0] == 512 and ks[5] == round(512 * (16 / 512) ** 0.5) and ks[10:] == [16, 16]
    assert all(a >= b for a, b in zip(ks, ks[1:]))


class InitialNormRatio(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.ratio = (model.w_v.norm(dim=-1) / model.w_o.norm(dim=-1)).detach().clone()


def test_training_writes_a_loadable_recorded_lorsa(tmp_path, monkeypatch):
    out = tmp_path / "run"
    start = InitialNormRatio()
    balanced = []  # each step's heads' own thresholds (hf_lorsa.training.head_balance), as the trainer updated them

    def recording(scale, fired, positions, since, rare_tokens, max_frequency, bound):
        assert bound.shape == scale.shape and bound.isfinite().all()  # each head's dense bound on this batch
        balance_thresholds(scale, fired, positions, since, rare_tokens, max_frequency, bound)
        balanced.append((scale.clone(), int(fired.sum()), int(positions), rare_tokens, max_frequency))

    monkeypatch.setattr("hf_lorsa.training.trainer.balance_thresholds", recording)
    kept = []  # the run keeps freed memory for its steps (hf_lorsa.kernels.freed_memory)
    monkeypatch.setattr("hf_lorsa.training.run_training.keep_freed_memory", lambda: kept.append(True))
    final = train(*parse(options(out, eval_strategy="steps", eval_steps=6, keep_checkpoints="true")), [start])
    assert kept == [True]
    # every head starts with ||w_v|| / ||w_o|| = --norm_ratio (4); calibration alone leaves them from 0.3 to 1.8 here
    torch.testing.assert_close(start.ratio, torch.full_like(start.ratio, 4.0))
    loaded = LorsaModel.from_pretrained(out)
    c = loaded.config
    assert (c.layer, c.base_model_name_or_path, c.dataset_name) == (2, str(STORIES_MODEL), str(STORIES_DATA))
    assert c.tokens_trained == 12 * 256 and c.training_args["top_k"] == 8 and c.training_args["context_length"] == 64
    assert c.skip_token_ids == [1] and c.input_norm_factor == c.output_norm_factor == 1.0
    torch.testing.assert_close(loaded.w_o.norm(dim=-1), torch.ones(c.n_ov_heads))
    results = json.loads((out / "eval_results.json").read_text())
    # the default BatchTopK keeps K = 8 heads per position on average: the threshold it learned, on held-out text
    assert abs(results["l0"] - 8) < 2 and 0 < results["fvu"] < 1 and results["n_tokens"] > 0
    assert c.act_fn == "batchtopk" and float(loaded.threshold) > 0
    # every step at the final K balanced the heads' thresholds, with the rule's window (one step's 256 tokens) and the
    # default bound; the Lorsa keeps the last step's scales
    assert len(balanced) == 11 and {row[3:] for row in balanced} == {(256, MAX_FREQUENCY)}
    assert all(7 < fired / positions < 9 for _, fired, positions, _, _ in balanced)  # K 8 heads a position on average
    revived = (loaded.threshold_scale == 1) & (balanced[-1][0] != 1)  # after the last balancing: the shared threshold
    assert revived.sum() <= 2
    torch.testing.assert_close(loaded.threshold_scale[~revived], balanced[-1][0][~revived])
    assert any((scale != 1).any() for scale, *_ in balanced)  # (with a dead window of 2 steps, revival resets them)
    card = (out / "README.md").read_text()
    assert "fvu" in card and f"| selection | {SELECTIONS['batchtopk']} |" in card
    # folding kept the function: the last checkpoint (normalised units) and the saved Lorsa agree
    checkpoint = LorsaModel.from_pretrained(out / "checkpoint-12")
    assert checkpoint.config.input_norm_factor != 1.0
    x = torch.randn(2, 16, 64) * 3
    torch.testing.assert_close(checkpoint(x).reconstruction, loaded(x).reconstruction, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(final.state_dict().values(), loaded.state_dict().values()))
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    logged = [row for row in state["log_history"] if "fvu" in row]
    assert {"mse", "fvu", "l0", "k", "silent_heads", "learning_rate", "tokens"} <= set(logged[0])
    lowered = [int((scale < 1).sum()) for scale, *_ in balanced[-3:]]  # the log of steps 10-12 averages them
    assert logged[-1]["thresholds_lowered"] == pytest.approx(sum(lowered) / 3) and "thresholds_raised" in logged[-1]
    assert logged[0]["k"] > logged[-1]["k"] == 8  # K annealed down to top_k
    evaluations = [row for row in state["log_history"] if "eval_fvu" in row]
    assert [row["step"] for row in evaluations] == [6, 12] and evaluations[-1]["eval_l0"] == results["l0"]


class CountHostSyncs(TrainerCallback):
    """Records, from the start to the end of each optimizer step, every call from hf_lorsa's code that would wait
    for a GPU: a tensor read into Python, a nonzero, a boolean-mask index. (The host's own forward syncs once, at
    its start, when transformers looks for packed sequences; that wait does not split the step.)"""

    READS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__")
    # their backwards run on the CPU only (test_causal_attention.py, test_sparse_gradient_attention.py)
    CPU_ONLY = ("causal_attention.py", "sparse_gradient_attention.py", "storage_units.py")

    def __init__(self):
        self.calls, self.saved, self.step = {}, {}, None

    def _wrap(self, name, original):
        def counting(t, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            index = args[0] if name == "__getitem__" and isinstance(args[0], tuple) else args
            boolean = any(torch.is_tensor(i) and i.dtype == torch.bool for i in index)
            counted = "hf_lorsa" in caller and not caller.endswith(self.CPU_ONLY)
            if counted and (name != "__getitem__" or boolean):
                self.calls.setdefault(self.step, []).append(f"{name} in {caller}:{sys._getframe(1).f_lineno}")
            return original(t, *args, **kwargs)

        return counting

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step
        for name in (*self.READS, "__getitem__"):
            self.saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, self.saved[name]))

    def on_step_end(self, args, state, control, **kwargs):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


def test_a_training_step_makes_no_host_sync(tmp_path):
    """With AuxK training silent heads and revival off, no step waits for the device (revival steps and logs do)."""
    counter = CountHostSyncs()
    opts = options(tmp_path / "run", dead_tokens=256, revive_dead_heads="false")
    train(*parse(opts), callbacks=[counter])
    assert counter.step == 11 and not counter.calls, counter.calls


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 7:
            raise RuntimeError("killed")


def test_resume_after_a_crash_gives_the_uninterrupted_weights(tmp_path):
    train(*parse(options(tmp_path / "straight")))
    with pytest.raises(RuntimeError, match="killed"):
        train(*parse(options(tmp_path / "crashed")), callbacks=[Crash()])
    assert (tmp_path / "crashed" / "checkpoint-6").is_dir() and not (
        tmp_path / "crashed" / "model.safetensors"
    ).exists()
    train(*parse(options(tmp_path / "crashed", keep_checkpoints="true")))  # continues from checkpoint-6
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "crashed" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    log = json.loads((tmp_path / "crashed" / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]
    assert [row["step"] for row in log if "fvu" in row] == [3, 6, 9, 12]


def test_a_checkpoint_cut_off_while_being_written_is_dropped_and_the_run_resumes_from_the_one_before(
    tmp_path, monkeypatch
):
    """A kill at any point of a save leaves a checkpoint without its run file (written last): the rerun removes it
    and resumes from the last complete one, ending as the uninterrupted run."""
    train(*parse(options(tmp_path / "straight")))
    save = LorsaTrainer.save_extra_state

    def killed_at_step_12(self, checkpoint_dir):
        if self.state.global_step == 12:
            Path(checkpoint_dir, "model.safetensors").write_bytes(b"half")  # and a file cut short
            raise RuntimeError("killed")
        save(self, checkpoint_dir)

    monkeypatch.setattr(LorsaTrainer, "save_extra_state", killed_at_step_12)
    with pytest.raises(RuntimeError, match="killed"):
        train(*parse(options(tmp_path / "crashed")))
    monkeypatch.setattr(LorsaTrainer, "save_extra_state", save)
    crashed = tmp_path / "crashed"
    assert (crashed / "checkpoint-12").is_dir() and not (crashed / "checkpoint-12" / "lorsa_run.json").exists()
    train(*parse(options(crashed)))  # continues from checkpoint-6
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(crashed / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


SUMMARY_SCRIPT = """
import hashlib, json, os, sys
from pathlib import Path
from transformers import TrainerCallback
import hf_lorsa.training.run_training as run
from hf_lorsa.training.launch import relaunch_on_cpu

if (code := relaunch_on_cpu(sys.argv[0], sys.argv[1:])) is not None:
    sys.exit(code)
first = {}
collate = run.collate

def recording_collate(rows):  # the first batch this process trains on
    batch = collate(rows)
    first.setdefault("ids", hashlib.sha256(batch["input_ids"].numpy().tobytes()).hexdigest())
    return batch

class Summary(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.removeprefix("module.").encode() + tensor.detach().cpu().numpy().tobytes())
        summary = {"weights": digest.hexdigest(), "first_batch": first["ids"], "global_step": state.global_step}
        Path(os.environ["SUMMARY_DIR"], f"rank{args.process_index}.json").write_text(json.dumps(summary))

run.collate = recording_collate
run.train_layers(*run.parse(sys.argv[1:]), callbacks=[Summary()])
"""


EXIT_SCRIPT = """
import atexit, sys
import torch.distributed as dist
from hf_lorsa.training.launch import release_process_group_at_exit

atexit.register(lambda: print("group alive at exit:", dist.is_initialized()))  # runs after those registered later
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
release_process_group_at_exit()
release_process_group_at_exit()  # a second training run in the same process registers nothing more
"""


def test_the_process_group_is_destroyed_before_the_interpreter_shuts_down(tmp_path):
    """Without it a gloo process may abort while exiting (its worker threads free tensors after the GIL is gone)."""
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(tmp_path / "store")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "group alive at exit: False"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def failure_report(stderr: str) -> str:
    """The lines that say why a process died (anywhere in its output), then the end of the output."""
    causes = [line for line in stderr.splitlines() if re.search(r"Error|terminate|abort|Abort|signal", line)]
    return "\n".join(causes[:40]) + "\n...\n" + stderr[-2000:]


@pytest.mark.parametrize("layers", [None, "2,3"])
def test_two_processes_keep_identical_weights_and_see_twice_the_tokens(tmp_path, layers):
    """`accelerate launch --num_processes 2 --cpu`: a callback of the test's own records each process's view;
    with --layers each process holds every layer's Lorsa."""
    script = tmp_path / "train_with_summary.py"
    script.write_text(SUMMARY_SCRIPT)
    (tmp_path / "summaries").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", SUMMARY_DIR=str(tmp_path / "summaries"))
    opts = options(tmp_path / "ddp", holdout_fraction=0.0, max_tokens=256 * 8)
    if layers:
        opts = [o for o in opts if not o.startswith("--layer=")] + [f"--layers={layers}"]
    port = ["--main_process_port", str(free_port())]  # not the default 29500, which another program may hold
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        *port,
        "--cpu",
        str(script),
        *opts,
    ]
    done = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, failure_report(done.stderr)
    ranks = [json.loads((tmp_path / "summaries" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]  # each process reads its own data
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4  # 2 x 4 x 64 tokens per step
    for subfolder in ["layer2", "layer3"] if layers else [""]:
        assert LorsaModel.from_pretrained(tmp_path / "ddp", subfolder=subfolder).config.tokens_trained == 256 * 8


def test_activation_cache_is_reused_and_checked(tmp_path, monkeypatch):
    cache, data = tmp_path / "cache", tmp_path / "stories.jsonl"  # the cache holds every window: a short file
    data.write_text("".join(STORIES_DATA.read_text().splitlines(keepends=True)[:200]))
    short = functools.partial(options, dataset=data)
    first = train(*parse(short(tmp_path / "a", activation_cache=cache, holdout_fraction=0.0, max_tokens=256 * 4)))
    assert (cache / "cache.json").exists()
    calls = []
    import hf_lorsa.training.trainer as training

    monkeypatch.setattr(training, "collect_layers", lambda *a, **k: calls.append(1))
    second = train(*parse(short(tmp_path / "b", activation_cache=cache, holdout_fraction=0.0, max_tokens=256 * 4)))
    assert calls == []  # the training steps never ran the host
    for p, q in zip(first.state_dict().values(), second.state_dict().values()):
        torch.testing.assert_close(p.cpu(), q.cpu(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="made for other settings.*layer"):
        train(*parse(short(tmp_path / "c", activation_cache=cache, layer=1, holdout_fraction=0.0)))


def test_activation_cache_on_a_full_disk_keeps_nothing(tmp_path, monkeypatch, stories_model):
    """A disk too small is refused before the host runs; a write that fails anyway removes what it wrote."""
    import shutil as sh

    import hf_lorsa.inputs.activations as activations
    from hf_lorsa.inputs.activations import ActivationCache, CacheKey

    key = CacheKey(model="stories", layers=[2], dataset="d", text_column="text", context_length=32,
                   dtype="torch.float32", n_windows=8, seed=0)  # fmt: skip
    assert ActivationCache.size(key, 64) == 8 * 32 * (8 + 2 * 64 * 4)
    windows = [{"input_ids": list(range(1, 33))} for _ in range(8)]
    free = sh.disk_usage(tmp_path)
    monkeypatch.setattr(
        activations.shutil, "disk_usage", lambda path: free._replace(free=ActivationCache.size(key, 64) - 1)
    )
    monkeypatch.setattr(activations, "collect_layers", lambda *a, **k: pytest.fail("the host ran"))
    with pytest.raises(ValueError, match=r"needs 0.00 GiB and .* has 0.00 GiB free; free some space"):
        ActivationCache.build(tmp_path / "cache", key, stories_model, windows, batch_size=2, shard_size=2)
    assert not (tmp_path / "cache").exists()
    monkeypatch.undo()
    written = []

    def fill_the_disk(tensors, path):  # the third shard finds the disk full, half written
        if len(written) == 2:
            Path(path).write_bytes(b"half")
            raise OSError(28, "No space left on device")
        written.append(path)
        sh.copyfile(__file__, path)

    monkeypatch.setattr(activations, "save_file", fill_the_disk)
    with pytest.raises(OSError, match=r"failed \(No space left on device\); nothing of it was kept"):
        ActivationCache.build(tmp_path / "cache", key, stories_model, windows, batch_size=2, shard_size=2)
    assert len(written) == 2 and not (tmp_path / "cache").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    written.clear()
    with pytest.raises(OSError, match="nothing of it was kept"):  # a folder the user made stays, with their file
        ActivationCache.build(tmp_path / "mine", key, stories_model, windows, batch_size=2, shard_size=2)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_an_activation_cache_written_by_two_processes_is_the_one_of_one(tmp_path, stories_model):
    """Each process of a run writes every other shard; the first writes the manifest: the same files as one process."""
    from hf_lorsa.inputs.activations import ActivationCache, CacheKey

    key = CacheKey(model="stories", layers=[1, 3], dataset="d", text_column="text", context_length=32,
                   dtype="torch.float32", n_windows=7, seed=0)  # fmt: skip
    windows = [{"input_ids": torch.randint(2, 512, (32,), generator=torch.Generator().manual_seed(i)).tolist()}
               for i in range(7)]  # fmt: skip
    ActivationCache.build(tmp_path / "one", key, stories_model, windows, batch_size=2, shard_size=2)
    for process in (1, 0):  # the first process writes cache.json once the other's shards are there
        ActivationCache.build(tmp_path / "two", key, stories_model, windows, batch_size=2, shard_size=2,
                              process=process, processes=2)  # fmt: skip
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == ["cache.json", *(f"shard-{i:05d}.safetensors" for i in range(4))]
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    cache = ActivationCache(tmp_path / "two", [3])
    assert len(cache) == 7 and sorted(cache[6]) == ["attention_output.3", "hidden_states.3", "input_ids"]


def test_python_entry_point_is_the_same_run(tmp_path):
    import yaml

    import hf_lorsa

    pairs = (arg.lstrip("-").split("=", 1) for arg in options(tmp_path / "py", holdout_fraction=0.0, max_tokens=512))
    from_python = hf_lorsa.train_lorsa(**{k: yaml.safe_load(v) for k, v in pairs})
    from_cli = train(*parse(options(tmp_path / "cli", holdout_fraction=0.0, max_tokens=256 * 2)))
    for p, q in zip(from_python.state_dict().values(), from_cli.state_dict().values()):
        assert torch.equal(p.cpu(), q.cpu())


def test_top_k_training_keeps_exactly_k_heads_at_every_position(tmp_path):
    lorsa = train(*parse(options(tmp_path / "topk", act_fn="topk", max_tokens=256 * 6)))
    loaded = LorsaModel.from_pretrained(tmp_path / "topk")
    assert loaded.config.act_fn == "topk" and "threshold" not in loaded.state_dict()
    assert lorsa.eval_results["l0"] == 8.0  # the authors' rule: K = 8 at every held-out position


def test_options_file_gives_the_same_arguments(tmp_path):
    import yaml

    cli = parse(options(tmp_path / "run"))
    path = tmp_path / "train.yaml"
    values = dict(arg.lstrip("-").split("=", 1) for arg in options(tmp_path / "run"))
    path.write_text(yaml.safe_dump({k: yaml.safe_load(v) for k, v in values.items()}))
    from_file = parse([str(path)])
    assert cli[0] == from_file[0] and cli[1] == from_file[1]
    assert cli[2].learning_rate == from_file[2].learning_rate and cli[2].output_dir == from_file[2].output_dir


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"layer": 5}, r"--layer must be in \[0, 4\]"),
        ({"context_length": 1024}, "exceeds the model's 512 positions"),
        ({"max_tokens": 100}, "smaller than one step"),
        ({"text_column": "story"}, "no column 'story'"),
        ({"dataset": "EMPTY"}, "is empty"),
        ({"init": "zeros"}, "--init must be"),
    ],
)
def test_bad_input_fails_before_the_model_loads(tmp_path, monkeypatch, overrides, message):
    from transformers import AutoModelForCausalLM

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    if overrides.get("dataset") == "EMPTY":
        (tmp_path / "empty.jsonl").write_text("")
        overrides = {"dataset": tmp_path / "empty.jsonl"}
    with pytest.raises(ValueError, match=message):
        train(*parse(options(tmp_path / "run", **overrides)))


def test_an_output_folder_of_another_run_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "lorsa_run.json").write_text(json.dumps({"lorsa": {"layer": 1}, "data": {}}))
    with pytest.raises(ValueError, match="holds a run with a different configuration"):
        train(*parse(options(out)))


def test_command_line_entry_points_are_the_same_run(tmp_path):
    """`hf-lorsa train`, `python scripts/train.py` and `accelerate launch scripts/train.py` write the same bytes."""
    budget = dict(holdout_fraction=0.0, max_tokens=256 * 2)
    commands = {
        "cli": [sys.executable, "-m", "hf_lorsa", "train"],
        "script": [sys.executable, str(ROOT / "scripts" / "train.py")],
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
                       str(ROOT / "scripts" / "train.py")],
    }  # fmt: skip
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    for name, command in commands.items():
        done = subprocess.run([*command, *options(tmp_path / name, **budget)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in commands}
    assert weights["cli"] == weights["script"] == weights["accelerate"]


def test_streamed_data_trains_like_hub_data(tmp_path):
    out = tmp_path / "stream"
    lorsa = train(*parse(options(out, streaming="true", holdout_fraction=0.0, max_tokens=256 * 4)))
    assert lorsa.config.tokens_trained == 256 * 4
    run = json.loads((out / "lorsa_run.json").read_text())
    assert run["status"] == "finished" and run["tokens_trained"] == 256 * 4
    assert not list(out.glob("checkpoint-*"))  # removed once the final Lorsa is saved
    assert LorsaModel.from_pretrained(out).config.training_args["streaming"] is True


def test_device_map_auto_and_tensorboard_logs(tmp_path):
    out = tmp_path / "run"
    train(*parse(options(out, device_map="auto", report_to="tensorboard", holdout_fraction=0.0, max_tokens=256 * 3)))
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # the Trainer's default TensorBoard folder
    assert LorsaModel.from_pretrained(out).config.tokens_trained == 256 * 3


DYING_SCRIPT = """
import logging, os, sys
from transformers import TrainerCallback
from hf_lorsa.training import run_training as run
from hf_lorsa.training.launch import relaunch_on_cpu

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


class DieAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ.get("DIE_AT_STEP", "0")) and int(os.environ["RANK"]) == 1:
            os._exit(3)  # the second machine's process goes away without a word


if (code := relaunch_on_cpu(sys.argv[0], sys.argv[1:])) is not None:
    raise SystemExit(code)
run.train_layers(*run.parse(sys.argv[1:]), callbacks=[DieAt()])
"""


def launch(script, opts, env, *, machines: int) -> list[subprocess.CompletedProcess]:
    """`accelerate launch --cpu` of two processes in all: on one machine, or as two machines of one process each with
    the README's config file (two launchers on this machine, meeting at 127.0.0.1), run together."""
    port = str(free_port())
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", port]
    if machines == 1:
        command = [*launcher, "--cpu", "--num_processes", "2", str(script), *opts]
        return [subprocess.run(command, env=env, timeout=600, capture_output=True, text=True)]
    config = ROOT / "examples" / "accelerate-two-machines.yaml"
    launchers = [
        subprocess.Popen([*launcher, "--config_file", str(config), "--machine_rank", str(rank), str(script), *opts],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]  # fmt: skip
    done = []
    for process in launchers:
        out, err = process.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return done


def test_two_machines_train_as_two_processes_and_a_dead_machine_stops_the_run_which_resumes(tmp_path):
    """`accelerate launch --config_file examples/accelerate-two-machines.yaml --machine_rank R` (gloo): the same
    weights as two processes on one machine; a machine that dies stops the other at once (no hang), and the rerun
    resumes to the weights of the run that never stopped."""
    script = tmp_path / "train.py"
    script.write_text(DYING_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    opts = options(tmp_path / "one", holdout_fraction=0.0, max_tokens=256 * 8, save_steps=2)
    (single,) = launch(script, opts, env, machines=1)
    assert single.returncode == 0, failure_report(single.stderr)
    two = [o.replace(str(tmp_path / "one"), str(tmp_path / "two")) for o in opts]
    for machine in launch(script, two, env, machines=2):
        assert machine.returncode == 0, failure_report(machine.stderr)
    one_weights, two_weights = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    assert all(torch.equal(one_weights[k], two_weights[k]) for k in one_weights)

    dying = [o.replace(str(tmp_path / "one"), str(tmp_path / "dying")) for o in opts]
    start = time.perf_counter()
    first, second = launch(script, dying, {**env, "DIE_AT_STEP": "3"}, machines=2)
    assert second.returncode != 0 and first.returncode != 0 and time.perf_counter() - start < 120
    assert "Connection reset by peer" in first.stderr or "Connection closed by peer" in first.stderr
    assert sorted(p.name for p in (tmp_path / "dying").glob("checkpoint-*")) == ["checkpoint-2"]
    for machine in launch(script, dying, env, machines=2):
        assert machine.returncode == 0, failure_report(machine.stderr)
        assert f"Resuming from {tmp_path / 'dying' / 'checkpoint-2'}" in machine.stderr
    assert LorsaModel.from_pretrained(tmp_path / "dying").config.tokens_trained == 256 * 8
    resumed = load_file(tmp_path / "dying" / "model.safetensors")  # each process resumed its own counters
    assert all(torch.equal(resumed[k], two_weights[k]) for k in two_weights)
