"""Lorsas in the authors' format (llamascopium): their files read exactly, ours written so they read them back.

The fixtures under tests/fixtures/llamascopium/ were written by their own code (make_fixtures.py there), with an
input and their reconstruction of it.
"""

import json
import os
import shutil
import subprocess
import sys

import datasets
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from conftest import ROOT, STORIES_DATA, STORIES_MODEL, build_host, require_shared, token_batch
from hf_lorsa import LorsaConfig, LorsaModel, collect, export_llamascopium, splice
from hf_lorsa.analysis.inspector import Inspector
from hf_lorsa.evaluation.evaluation import evaluate_lorsa
from hf_lorsa.host.families import input_norm_affine
from hf_lorsa.inputs.activations import load_text, pack

FIXTURES = ROOT / "tests" / "fixtures" / "llamascopium"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def test_every_case_of_the_fixture_script_is_there():
    assert CASES == sorted([
        "half_split_dataset_wise", "interleaved_folded", "qk_norm", "partial_rotary", "ntk_by_parts", "old_b_O_name",
        "no_rotary_no_decoder_bias",
    ])  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_their_reconstruction_is_reproduced(case):
    lorsa = LorsaModel.from_pretrained(FIXTURES / case)
    expected = load_file(FIXTURES / case / "expected.safetensors")
    out = lorsa(expected["input"])
    want = expected["reconstruction"]
    assert ((out.reconstruction - want).norm() / want.norm()).item() < 1e-5
    acts = torch.zeros_like(expected["feature_acts"]).scatter(-1, out.top_k_indices, out.top_k_values)
    torch.testing.assert_close(acts, expected["feature_acts"], rtol=1e-5, atol=1e-5)
    assert lorsa.config.layer == 3 and lorsa.config.input_before_gain and lorsa.config.topk_rule == "relu"


def test_their_fields_map_onto_ours():
    def config(case):
        return LorsaModel.from_pretrained(FIXTURES / case).config

    assert config("interleaved_folded").rope_interleaved and not config("half_split_dataset_wise").rope_interleaved
    assert (config("interleaved_folded").input_norm_factor, config("interleaved_folded").output_norm_factor) == (1, 1)
    dataset_wise = config("half_split_dataset_wise")  # their norms 2.5 and 0.7 x sqrt(d_model)
    assert dataset_wise.input_norm_factor == pytest.approx(
        1 / 2.5
    ) and dataset_wise.output_norm_factor == pytest.approx(1 / 0.7)
    assert config("qk_norm").qk_norm and config("qk_norm").qk_norm_per_head
    assert config("partial_rotary").rope_parameters["partial_rotary_factor"] == 0.5
    rope = config("ntk_by_parts").rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0 and rope["original_max_position_embeddings"] == 16
    assert config("no_rotary_no_decoder_bias").rope_parameters is None
    assert config("half_split_dataset_wise").scaling == pytest.approx(8**-0.5)


def test_a_hub_repository_is_read_by_id_and_subfolder_from_the_cache(tmp_path):
    """Laid out as huggingface_hub caches a repository; read offline (the suite runs with HF_HUB_OFFLINE=1)."""
    repo = tmp_path / "models--OpenMOSS-Team--Llama-Scope-2-Tiny"
    subfolder = "lorsa/8x/k64/layer3_lorsa_8x_k64"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(FIXTURES / "qk_norm", repo / "snapshots" / commit / subfolder)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    lorsa = LorsaModel.from_pretrained("OpenMOSS-Team/Llama-Scope-2-Tiny", subfolder=subfolder, cache_dir=tmp_path)
    expected = load_file(FIXTURES / "qk_norm" / "expected.safetensors")
    torch.testing.assert_close(
        lorsa(expected["input"]).reconstruction, expected["reconstruction"], rtol=1e-5, atol=1e-5
    )


# ---- hosts: the gain, splicing, export -------------------------------------------------------------------


def relu_replica(host, layer: int) -> LorsaModel:
    """An exact replica of the layer under the ReLU rule their format uses: each rank-1 piece of the host's OV
    maps twice, as +piece and -piece, so that ReLU(z) w_o + ReLU(-z) (-w_o) = z w_o."""
    exact = LorsaModel.from_host(host, layer)  # signed (abs rule) replica: Hov = H * dh
    c = exact.config
    dh, n = c.d_qk_head, c.n_ov_heads
    lorsa = LorsaModel(LorsaConfig.from_host(host, layer, n_ov_heads=2 * n, n_qk_heads=c.n_qk_heads, top_k=2 * n,
                                             topk_rule="relu"))  # fmt: skip
    heads = torch.arange(n)
    plus = heads // dh * 2 * dh + heads % dh
    with torch.no_grad():
        for name in ("W_Q", "W_K", "b_Q", "b_K", "b_D"):
            getattr(lorsa, name).copy_(getattr(exact, name))
        if c.qk_norm:
            lorsa.q_norm.weight.copy_(exact.q_norm.weight)
            lorsa.k_norm.weight.copy_(exact.k_norm.weight)
        for name in ("w_v", "b_v", "w_o"):
            getattr(lorsa, name)[plus] = getattr(exact, name)
            getattr(lorsa, name)[plus + dh] = -getattr(exact, name)
    return lorsa.eval()


def logits(host, ids, lorsa=None):
    with torch.no_grad():
        if lorsa is None:
            return host(input_ids=ids).logits
        with splice(host, lorsa):
            return host(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "gpt_neox"])  # RMSNorm hosts, and LayerNorm (a bias)
def test_an_exact_lorsa_exported_and_loaded_back_reproduces_the_logits(family, tmp_path):
    host, layer, ids = build_host(family), 1, token_batch()
    lorsa = relu_replica(host, layer)
    clean = logits(host, ids)
    torch.testing.assert_close(logits(host, ids, lorsa), clean, rtol=1e-4, atol=1e-4)  # the replica is exact

    folder = export_llamascopium(lorsa, tmp_path / "theirs", host)
    # In their convention: on TransformerLens' input (before the norm's gain) it gives the attention output.
    pending = LorsaModel.from_pretrained(folder)
    assert pending.config.input_before_gain
    record = collect(host, layer, input_ids=ids)
    gain, bias = input_norm_affine(host, layer)
    normalized = (record.hidden_states - bias) / gain
    torch.testing.assert_close(pending(normalized).reconstruction, record.attention_output, rtol=1e-4, atol=1e-5)
    # Spliced into the Hugging Face host, the gain folded in at load or at the first splice: the same logits.
    spliced = logits(host, ids, lorsa)
    torch.testing.assert_close(logits(host, ids, pending), spliced, rtol=1e-5, atol=1e-5)
    assert not pending.config.input_before_gain and pending.config.host_fingerprint
    loaded = LorsaModel.from_pretrained(folder, host=host)
    torch.testing.assert_close(logits(host, ids, loaded), spliced, rtol=1e-5, atol=1e-5)
    loaded.save_pretrained(tmp_path / "ours")  # our format from here on
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "lorsa"
    torch.testing.assert_close(logits(host, ids, LorsaModel.from_pretrained(tmp_path / "ours")), spliced)


def test_ours_to_theirs_to_ours_is_exact(tmp_path):
    host = build_host("qwen3")
    lorsa = LorsaModel.from_host(host, 2, n_ov_heads=128, top_k=8, topk_rule="relu")
    with torch.no_grad():
        lorsa.set_norm_factors(0.4, 3.0)  # dataset-wise norms travel too
        lorsa.b_D.normal_()
    back = LorsaModel.from_pretrained(export_llamascopium(lorsa, tmp_path / "theirs", host), host=host)
    assert back.config.to_dict() == lorsa.config.to_dict()
    for name, tensor in lorsa.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    unit = build_host("llama")  # a host whose norm gain is one: nothing to divide, bit for bit
    with torch.no_grad():
        unit.model.layers[1].input_layernorm.weight.fill_(1.0)
    lorsa = LorsaModel.from_host(unit, 1, n_ov_heads=64, top_k=8, topk_rule="relu")
    back = LorsaModel.from_pretrained(export_llamascopium(lorsa, tmp_path / "unit", unit), host=unit)
    assert all(torch.equal(back.state_dict()[name], t) for name, t in lorsa.state_dict().items())


def test_a_batch_top_k_lorsa_travels_as_their_jumprelu_with_a_threshold_per_head(tmp_path):
    host = build_host("llama")
    lorsa = LorsaModel.from_host(host, 1, n_ov_heads=64, top_k=8, topk_rule="relu", act_fn="batchtopk")
    untrained = export_llamascopium(lorsa, tmp_path / "untrained", host)
    assert json.loads((untrained / "config.json").read_text())["act_fn"] == "batchtopk"  # theirs ranks the batch too
    assert float(LorsaModel.from_pretrained(untrained, host=host).threshold) < 0
    x = collect(host, 1, input_ids=token_batch()).hidden_states
    with torch.no_grad():
        lorsa.set_norm_factors(0.5, 2.0)
        scores = lorsa.pre_activations(x).relu() * lorsa.w_o.norm(dim=-1)
        threshold = float(scores.flatten().quantile(0.95))  # about 3 of the 64 heads pass at a position
        lorsa.threshold.fill_(threshold)
    folder = export_llamascopium(lorsa, tmp_path / "theirs", host)
    assert json.loads((folder / "config.json").read_text())["act_fn"] == "jumprelu"
    weights = load_file(folder / "sae_weights.safetensors")
    torch.testing.assert_close(
        weights["activation_function.log_jumprelu_threshold"], torch.full((64,), threshold).log()
    )
    back = LorsaModel.from_pretrained(folder, host=host)
    assert back.config.to_dict() == lorsa.config.to_dict()
    for name, tensor in lorsa.state_dict().items():  # one threshold for all: the same buffers, scales of 1
        torch.testing.assert_close(back.state_dict()[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(back.eval()(x).reconstruction, lorsa.eval()(x).reconstruction)
    assert (lorsa(x).top_k_values != 0).sum() > 0
    # heads with their own thresholds (hf_lorsa.training.head_balance): theirs per head, and back
    with torch.no_grad():
        lorsa.threshold_scale.copy_(torch.linspace(0.2, 1.5, 64))
    folder = export_llamascopium(lorsa, tmp_path / "per-head", host)
    weights = load_file(folder / "sae_weights.safetensors")
    expected = (threshold * torch.linspace(0.2, 1.5, 64)).log()
    torch.testing.assert_close(weights["activation_function.log_jumprelu_threshold"], expected)
    back = LorsaModel.from_pretrained(folder, host=host).eval()
    torch.testing.assert_close(back.threshold * back.threshold_scale, lorsa.threshold * lorsa.threshold_scale)
    # an hf_lorsa export records its shared threshold: the same buffers come back (a folder of theirs: the largest)
    torch.testing.assert_close(back.threshold, lorsa.threshold, rtol=0, atol=0)
    torch.testing.assert_close(back.threshold_scale, lorsa.threshold_scale, rtol=1e-6, atol=1e-7)
    config = json.loads((folder / "config.json").read_text())
    del config["hf_lorsa_threshold"]
    (folder / "config.json").write_text(json.dumps(config))
    theirs = LorsaModel.from_pretrained(folder, host=host).eval()
    assert theirs.threshold_scale.max() == 1  # the largest is the shared threshold
    torch.testing.assert_close(theirs(x).reconstruction, lorsa(x).reconstruction)
    torch.testing.assert_close(back(x).reconstruction, lorsa(x).reconstruction)
    with torch.no_grad():
        lorsa.threshold_scale.fill_(1.0)
    assert not torch.equal(back(x).top_k_values != 0, lorsa(x).top_k_values != 0)  # the heads' own thresholds count


def test_their_files_hold_what_their_loader_expects(tmp_path):
    host = build_host("qwen3")
    lorsa = LorsaModel.from_host(host, 2, n_ov_heads=64, top_k=8, topk_rule="relu")
    folder = export_llamascopium(lorsa, tmp_path / "theirs", host, n_ctx=24)
    theirs, ours = (
        json.loads((folder / "config.json").read_text()),
        json.loads((FIXTURES / "qk_norm" / "config.json").read_text()),
    )
    assert set(ours) <= set(theirs) and theirs["sae_type"] == "lorsa" and theirs["n_ctx"] == 24
    assert theirs["hook_point_in"] == "blocks.2.ln1.hook_normalized" and theirs["use_post_qk_ln"]
    weights, reference = (
        load_file(folder / "sae_weights.safetensors"),
        load_file(FIXTURES / "qk_norm" / "sae_weights.safetensors"),
    )
    assert {k.split(".blocks")[0] for k in weights} == {k.split(".blocks")[0] for k in reference}
    assert weights["ln_q.w"].shape == (lorsa.config.n_qk_heads, 16) and weights["mask"].shape == (24, 24)
    torch.testing.assert_close(weights["W_V"] / host.model.layers[2].input_layernorm.weight, lorsa.w_v.detach())
    # their rotary tables: the angles of transformers' frequencies in their (half-split) layout
    inv_freq = lorsa.rotary_emb.inv_freq.double()
    torch.testing.assert_close(weights["rotary_cos"][5].double(), torch.cos(5 * inv_freq).repeat(2).float().double())


# ---- bad input ----------------------------------------------------------------------------------------


def copy_case(tmp_path, case="half_split_dataset_wise"):
    folder = tmp_path / case
    shutil.copytree(FIXTURES / case, folder)
    return folder


def test_another_kind_of_dictionary_is_named(tmp_path):
    folder = copy_case(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sae_type": "clt"}))
    with pytest.raises(ValueError, match="llamascopium 'clt' dictionary, not a Lorsa"):
        LorsaModel.from_pretrained(folder)


def test_a_missing_tensor_is_named(tmp_path):
    folder = copy_case(tmp_path)
    weights = load_file(folder / "sae_weights.safetensors")
    del weights["W_V"]
    save_file(weights, folder / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"lack \['W_V'\]"):
        LorsaModel.from_pretrained(folder)


def test_a_hook_point_without_a_layer_asks_for_one(tmp_path):
    folder = copy_case(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "sae_weights.safetensors")
    renamed = {"hook_point_in": "attn_in", "hook_point_out": "attn_out"}
    weights = {k.replace(config["hook_point_in"], "attn_in").replace(config["hook_point_out"], "attn_out"): v
               for k, v in weights.items()}  # fmt: skip
    save_file(weights, folder / "sae_weights.safetensors")
    (folder / "config.json").write_text(json.dumps({**config, **renamed}))
    with pytest.raises(ValueError, match="names no layer; pass layer="):
        LorsaModel.from_pretrained(folder)
    assert LorsaModel.from_pretrained(folder, layer=5).config.layer == 5


@pytest.mark.parametrize("pickle_file", ["sae_weights.pt", "sae_weights.dcp/.metadata"])
def test_pickled_checkpoints_are_refused_unread(tmp_path, pickle_file):
    folder = copy_case(tmp_path)
    (folder / "sae_weights.safetensors").unlink()
    (folder / pickle_file).parent.mkdir(exist_ok=True)
    (folder / pickle_file).write_bytes(b"not even a pickle: reading it would fail otherwise")
    with pytest.raises(ValueError, match="a pickle, which hf_lorsa never loads.*sae_weights.safetensors"):
        LorsaModel.from_pretrained(folder)


def test_what_their_format_cannot_hold_is_refused(tmp_path):
    host = build_host("llama")
    with pytest.raises(ValueError, match="topk_rule 'abs'"):
        export_llamascopium(LorsaModel.from_host(host, 1), tmp_path / "a", host)
    with pytest.raises(ValueError, match=r"needs the host model \(host=...\)"):
        export_llamascopium(LorsaModel.from_host(host, 1, topk_rule="relu"), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_lorsa_in_their_format_evaluates_and_analyses_from_the_command_line(tmp_path):
    """Their files alone (no hf_lorsa config inside): the host is named, the gain folded at the first pairing."""
    require_shared(STORIES_MODEL, STORIES_DATA)
    host = transformers.AutoModelForCausalLM.from_pretrained(STORIES_MODEL)
    native = LorsaModel.from_host(host, 2, n_ov_heads=256, top_k=16, topk_rule="relu")
    folder = export_llamascopium(native, tmp_path / "theirs", host)
    config = json.loads((folder / "config.json").read_text())
    del config["hf_lorsa"]
    (folder / "config.json").write_text(json.dumps(config))
    windows = pack(load_text(str(STORIES_DATA), "text"), AutoTokenizer.from_pretrained(STORIES_MODEL), 128, "text")
    want = evaluate_lorsa(host, native, windows, max_tokens=2048, progress=False)

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    common = ["--lorsa", str(folder), "--model_name_or_path", str(STORIES_MODEL), "--dataset", str(STORIES_DATA),
              "--context_length", "128", "--max_tokens", "2048"]  # fmt: skip
    evaluate = [sys.executable, "-m", "hf_lorsa", "evaluate", *common, "--output", str(tmp_path / "eval.json")]
    result = subprocess.run(evaluate, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads((tmp_path / "eval.json").read_text())
    assert got["layer"] == 2 and got["n_tokens"] == want.n_tokens
    assert got["fvu"] == pytest.approx(want.fvu, rel=1e-4) and got["kl_spliced"] == pytest.approx(
        want.kl_spliced, rel=1e-3
    )
    analyze = [sys.executable, "-m", "hf_lorsa", "analyze", *common, "--max_tokens", "1024"]
    result = subprocess.run(analyze, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(datasets.Dataset.from_parquet(str(folder / "analysis" / "heads.parquet"))) == 256
    inspector = Inspector.load(str(folder), str(STORIES_MODEL))  # the Space, on that analysis
    assert (
        inspector.notice == "" and len(inspector.head_table()) == 256 and not inspector.lorsa.config.input_before_gain
    )
    z = inspector.lorsa.z_pattern(collect(host, 2, input_ids=token_batch(512)).hidden_states, 7).sum(-1)
    want_z = native(collect(host, 2, input_ids=token_batch(512)).hidden_states, output_pre_activations=True)
    torch.testing.assert_close(z, want_z.pre_activations[..., 7], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("rule", "extra", "message"),
    [
        ("abs", [], "topk_rule 'abs'"),
        ("relu", ["--n_ctx", "0"], "--n_ctx must be an integer >= 1"),
        ("relu", ["--output", "EXISTING"], "holds files hf-lorsa export did not write (config.json)"),
        (
            "relu",
            ["--output", "EXISTING", "--overwrite"],
            "holds files hf-lorsa export did not write",
        ),  # whatever the flag
    ],
)
def test_the_export_command_fails_first_with_the_fix(tmp_path, capsys, rule, extra, message):
    from hf_lorsa.cli import main

    lorsa = LorsaModel.from_host(build_host("llama"), 1, n_ov_heads=32, top_k=4, topk_rule=rule)
    lorsa.config.base_model_name_or_path = str(tmp_path / "no-such-host")  # opening it would fail otherwise
    lorsa.save_pretrained(tmp_path / "lorsa")
    (tmp_path / "EXISTING").mkdir()
    (tmp_path / "EXISTING" / "config.json").write_text("{}")
    extra = [str(tmp_path / e) if e == "EXISTING" else e for e in extra]
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--lorsa", str(tmp_path / "lorsa"), "--output", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "hf-lorsa export: error:" in err and message in err, err
    assert not (tmp_path / "out").exists() and (tmp_path / "EXISTING" / "config.json").read_text() == "{}"


def test_fewer_stored_qk_heads_are_repeated_as_their_loader_does(tmp_path):
    folder = copy_case(tmp_path, "qk_norm")
    weights = load_file(folder / "sae_weights.safetensors")
    for name in ("W_Q", "W_K", "b_Q", "b_K", "ln_q.w", "ln_k.w"):  # 4 configured QK heads, 2 stored
        weights[name] = weights[name][::2].contiguous()
    save_file(weights, folder / "sae_weights.safetensors")
    lorsa = LorsaModel.from_pretrained(folder)
    assert lorsa.W_Q.shape[0] == 4
    for head, stored in ((0, 0), (1, 0), (2, 1), (3, 1)):
        torch.testing.assert_close(lorsa.W_Q[head], weights["W_Q"][stored])
    torch.testing.assert_close(lorsa.q_norm.weight[1], weights["ln_q.w"][0])
