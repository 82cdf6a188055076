"""The recipe beyond the toy: width-scaled defaults, document separators, the first position, calibration."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

from conftest import build_host, token_batch
from hf_lorsa import LorsaModel
from hf_lorsa.host.attention_mask import counted_positions
from hf_lorsa.host.hooks import capture
from hf_lorsa.inputs.activations import document_separator, load_text, pack, skip_tokens, split_holdout
from hf_lorsa.model.initialization import balance_head_norms, calibrate
from hf_lorsa.training.recipe import default_dead_tokens, default_learning_rate, scheduler_kwargs
from hf_lorsa.training.run_training import train_lorsa

WORDS = [f"w{i}" for i in range(200)]


def word_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with <s> (id 0) and </s> (id 1); `bos` decides whether it prepends <s> itself."""
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_default_learning_rate_keeps_the_relative_step_of_a_row_at_every_width():
    assert default_learning_rate(64) == pytest.approx(4e-3)
    assert default_learning_rate(1024) == pytest.approx(1e-3)
    assert default_learning_rate(576) == pytest.approx(1.33e-3, rel=0.01)  # the best of four rates on SmolLM2
    for width in (64, 576, 2048, 4096):  # lr x sqrt(d_model), how far one step turns a row, is the same
        assert default_learning_rate(width) * math.sqrt(width) == pytest.approx(4e-3 * 8)
    assert default_dead_tokens(3_000_000, 512, 16) == 150_000
    assert default_dead_tokens(300_000, 2304, 32) == 100_000
    assert default_dead_tokens(300_000, 32_768, 4) == 819_200  # 100 x the interval an average head fires at
    assert default_dead_tokens(10**11, 512, 16) == 10_000_000


def test_the_default_schedule_holds_then_cools_down_over_the_last_fifth():
    from transformers import get_scheduler

    kwargs = scheduler_kwargs("warmup_stable_decay", None, 1000)
    assert kwargs == {"num_decay_steps": 200, "decay_type": "linear"}
    assert scheduler_kwargs("warmup_stable_decay", {"num_decay_steps": 5}, 1000)["num_decay_steps"] == 5
    assert scheduler_kwargs("cosine", None, 1000) is None
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = get_scheduler("warmup_stable_decay", optimizer, 20, 1000, scheduler_specific_kwargs=kwargs)
    rates = []
    for _ in range(1000):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert rates[20] == rates[799] == 1.0 and rates[900] == pytest.approx(0.5, abs=0.01) and rates[-1] < 0.01


def test_documents_are_separated_by_the_hosts_own_convention():
    with_bos, without_bos = word_tokenizer(bos=True), word_tokenizer(bos=False)
    assert document_separator(with_bos) is None  # its BOS comes with every text
    assert document_separator(without_bos) == 1  # no BOS: the EOS separates documents (GPT-2, Qwen, SmolLM2)
    assert document_separator(without_bos, "w5") == 8 and document_separator(without_bos, "7") == 7
    with pytest.raises(ValueError, match="--document_separator 'nope' is neither a token"):
        document_separator(without_bos, "nope")
    from datasets import Dataset

    docs = Dataset.from_dict({"text": ["w0 w1 w2", "w3 w4", "w5 w6 w7 w8"]})
    assert list(pack(docs, without_bos, 4, separator=1)["input_ids"]) == [[1, 3, 4, 5], [1, 6, 7, 1], [8, 9, 10, 11]]
    assert list(pack(docs, with_bos, 4)["input_ids"]) == [[0, 3, 4, 5], [0, 6, 7, 0], [8, 9, 10, 11]]
    assert skip_tokens(without_bos, 1) == [0, 1]


def test_the_first_position_of_every_window_is_left_out():
    ids = torch.tensor([[5, 1, 7, 8], [9, 9, 1, 4]])
    assert counted_positions(ids, [1]).tolist() == [[False, False, True, True], [False, True, False, True]]


def layer_one_activations(batch: int):
    """A tiny Llama host and its layer 1's attention input and output on `batch` windows, with the counted positions."""
    model = build_host("llama")
    ids = token_batch(batch=batch)
    with capture(model, 1) as cap:
        model(ids)
    return model, cap.last.hidden_states, cap.last.attention_output, counted_positions(ids, [])


def test_calibration_centres_every_head_and_fits_the_output():
    model, x, y, counted = layer_one_activations(batch=4)
    lorsa = LorsaModel.from_host(model, 1, n_ov_heads=128, top_k=8)
    report = calibrate(lorsa, x, y, counted, top_k=128)
    z = lorsa.pre_activations(x)[counted]
    assert z.mean(0).abs().max() < 1e-5  # every head above and below zero alike
    assert report["fvu_calibrated"] <= report["fvu_at_init"] + 1e-6
    with torch.no_grad():
        after = lorsa(x, top_k=128).reconstruction[counted]
    target = y[counted]
    recomputed = float(((after - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum())
    assert report["fvu_calibrated"] == pytest.approx(recomputed, rel=1e-4)
    # the least-squares fit: scaling the output directions further does not help
    out = lorsa(x, top_k=128).reconstruction[counted]
    base = lorsa.b_D / lorsa.config.output_norm_factor
    target = y[counted]
    for factor in (0.9, 1.1):
        scaled = base + (out - base) * factor
        scaled = scaled - scaled.mean(0) + target.mean(0)
        assert ((scaled - target) ** 2).sum() >= ((out - target) ** 2).sum() - 1e-5


def test_calibration_by_chunks_equals_calibration_at_once():
    # one window at a time (the default reads 2,048 positions at a time) against every window in one pass: the fit is
    # made from the same sums, so the weights and both FVUs agree to float rounding
    model, x, y, counted = layer_one_activations(batch=6)
    counted[2, 3:] = False  # windows with fewer counted positions than others
    torch.manual_seed(0)
    at_once = LorsaModel.from_host(model, 1, n_ov_heads=128, top_k=8)
    by_window = LorsaModel.from_host(model, 1, n_ov_heads=128, top_k=8)
    by_window.load_state_dict(at_once.state_dict())
    whole = calibrate(at_once, x, y, counted, top_k=16, chunk=10**9)
    chunked = calibrate(by_window, x, y, counted, top_k=16, chunk=x.shape[1])
    assert chunked == pytest.approx(whole, rel=1e-9)
    assert 0 < whole["fvu_calibrated"] < whole["fvu_at_init"]
    for name, value in at_once.state_dict().items():
        torch.testing.assert_close(by_window.state_dict()[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_balancing_head_norms_keeps_the_function_and_sets_the_ratio():
    torch.manual_seed(0)
    lorsa = LorsaModel.from_host(build_host("llama"), 1, n_ov_heads=128, top_k=8)
    with torch.no_grad():
        lorsa.w_o.mul_(torch.rand(128, 1) * 10)  # norms of every size, as calibration and training leave them
        lorsa.b_v.normal_()
        lorsa.w_v[5] = 0.0  # a head with nothing to balance stays as it is
    x = torch.randn(2, 12, lorsa.config.d_model)
    before = lorsa(x, output_pre_activations=True)
    products = lorsa.w_v.norm(dim=-1) * lorsa.w_o.norm(dim=-1)
    w_o_5 = lorsa.w_o[5].clone()
    balance_head_norms(lorsa, 4.0)
    after = lorsa(x, output_pre_activations=True)
    torch.testing.assert_close(after.reconstruction, before.reconstruction, atol=1e-5, rtol=1e-5)
    assert torch.equal(after.top_k_indices, before.top_k_indices)
    ratio = lorsa.w_v.norm(dim=-1) / lorsa.w_o.norm(dim=-1)
    live = torch.arange(128) != 5
    torch.testing.assert_close(ratio[live], torch.full((127,), 4.0))
    torch.testing.assert_close(lorsa.w_v.norm(dim=-1) * lorsa.w_o.norm(dim=-1), products)
    assert torch.equal(lorsa.w_o[5], w_o_5) and torch.isfinite(lorsa.b_v).all()


@pytest.fixture(scope="module")
def wide_host(tmp_path_factory):
    """A random Llama of realistic width (d_model 1024, 16 heads of 64, GQA 16/4), two layers, with a
    tokenizer that adds no BOS and a text file of random words: a host the recipe was not tuned on."""
    folder = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=1024, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4,
        vocab_size=len(WORDS) + 3, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder / "model")
    word_tokenizer(bos=False).save_pretrained(folder / "model")
    g = torch.Generator().manual_seed(0)
    with open(folder / "text.jsonl", "w") as f:
        for _ in range(400):
            n = int(torch.randint(20, 120, (1,), generator=g))
            words = " ".join(WORDS[int(i)] for i in torch.randint(0, 60, (n,), generator=g))
            f.write(json.dumps({"text": words}) + "\n")
    return folder


class LogTo(TrainerCallback):
    def __init__(self, logs: list):
        self.logs = logs

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_the_default_command_trains_at_realistic_width_without_divergence(wide_host, tmp_path):
    logs = []
    lorsa = train_lorsa(
        model_name_or_path=str(wide_host / "model"), layer=1, dataset=str(wide_host / "text.jsonl"),
        expansion_factor=2, top_k=32, context_length=64, max_tokens=64 * 4 * 150, holdout_fraction=0.1,
        eval_tokens=4096, output_dir=str(tmp_path / "run"), report_to="none", logging_steps=10,
        callbacks=[LogTo(logs)],
    )  # fmt: skip
    assert lorsa.config.training_args["learning_rate"] == pytest.approx(1e-3)  # 4e-3 * sqrt(64 / 1024)
    assert lorsa.config.document_separator == 1 and lorsa.config.skip_token_ids == [0, 1]
    assert all(math.isfinite(log["loss"]) for log in logs if "loss" in log)

    # the start: the same host initialisation, calibrated on held-out activations, at the final K
    host = LlamaForCausalLM.from_pretrained(wide_host / "model").eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(wide_host / "model")
    texts = load_text(str(wide_host / "text.jsonl"))
    windows = list(pack(split_holdout(texts, 0.1)[1], tokenizer, 64, separator=1))
    ids = torch.tensor([w["input_ids"] for w in windows])
    with torch.no_grad(), capture(host, 1) as cap:
        host(ids)
    start = LorsaModel.from_host(host, 1, expansion_factor=2, top_k=32)
    counted = counted_positions(ids, [0, 1])
    fvu_start = calibrate(start, cap.last.hidden_states, cap.last.attention_output, counted, 32)["fvu_calibrated"]
    trained = lorsa.eval_results
    # random weights on random words: attention with little structure; 150 steps at the default rate (1e-3) with
    # heads balanced at the start remove 30% of the error (0.796 -> 0.559; 0.733 at 5e-4 with the split calibration
    # left)
    assert trained["fvu"] < 0.8 * fvu_start, (trained["fvu"], fvu_start)
    assert trained["max_frequency"] <= 0.5, trained
    # no bound on dead heads here: 38K tokens are less than the 100K-token dead window, so neither AuxK nor revival
    # acts in this run (BENCHMARKS.md, "Recipe at scale", for runs long enough)


def test_revival_brings_a_dead_head_back_into_the_top_k():
    from types import SimpleNamespace

    from hf_lorsa.training.trainer import LorsaTrainer

    model = build_host("llama")
    ids = token_batch(batch=4)
    with capture(model, 1) as cap:
        model(ids)
    x = cap.last.hidden_states
    lorsa = LorsaModel.from_host(model, 1, n_ov_heads=64, top_k=4, topk_rule="relu")
    with torch.no_grad():
        lorsa.b_v[[3, 40]] -= 100.0  # two heads that never fire
    out = lorsa(x, output_pre_activations=True)
    assert not torch.isin(out.top_k_indices, torch.tensor([3, 40])).any()
    silent = torch.zeros(64, dtype=torch.long)
    silent[[3, 40]] = 10**6
    dead, bump = LorsaTrainer.revival(SimpleNamespace(), lorsa, out.pre_activations.flatten(0, 1), 4, silent > 1000)
    assert dead.tolist() == [3, 40] and (bump > 99).all()
    with torch.no_grad():
        lorsa.b_v[dead] += bump
    fired = lorsa(x).top_k_indices.flatten(0, 1)
    for head in (3, 40):
        rate = (fired == head).any(-1).float().mean()
        assert 0.03 <= rate <= 0.25, (head, rate)  # about the average head's rate, K / n_ov = 1/16
