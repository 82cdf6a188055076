"""Attaching to host models: capture, splice, exact initialisation, every supported family."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import build_host, require_shared, token_batch
from hf_lorsa import LorsaConfig, LorsaModel, capture, collect, splice
from hf_lorsa.host.families import ARCHITECTURES, get_module, unwrap
from hf_lorsa.model.initialization import share_qk_heads
from hf_lorsa.model.replica import head_output_variance

LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "phi3": ["qkv_proj", "o_proj"],
    "qwen3": ["q_proj", "v_proj"],
}


def attention_of(model, layer):
    arch = ARCHITECTURES[unwrap(model).config.model_type]
    return get_module(unwrap(model), f"{arch.layers}.{layer}.{arch.attention}")


def test_every_family_is_tested():
    from conftest import FAMILIES

    assert set(FAMILIES) == set(ARCHITECTURES)  # each supported family has a tiny host in the tests, and no more


@torch.no_grad()
def test_exact_init_reproduces_every_layer(family):
    model = build_host(family)
    ids = token_batch()
    clean = model(ids).logits
    for layer in range(model.config.num_hidden_layers):
        lorsa = LorsaModel.from_host(model, layer)
        c = lorsa.config
        assert (c.top_k, c.layer, c.host_model_type) == (c.n_ov_heads, layer, model.config.model_type)
        with splice(model, lorsa):
            spliced = model(ids).logits
        torch.testing.assert_close(spliced, clean, atol=1e-4, rtol=0)
        # the Lorsa really replaced the layer: breaking it changes the logits
        lorsa.b_D.add_(torch.randn_like(lorsa.b_D))
        with splice(model, lorsa):
            assert (model(ids).logits - clean).abs().max() > 1e-2
    assert torch.equal(model(ids).logits, clean)


@torch.no_grad()
def test_standalone_forward_matches_captured_output(family):
    model = build_host(family)
    ids = token_batch()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with capture(model, 1) as cap:
        model(input_ids=ids, attention_mask=mask)
    record = cap.last
    assert torch.equal(record.attention_mask, mask)
    lorsa = LorsaModel.from_host(model, 1)
    # without the host's cos/sin: positions from the mask, rotary from the config (transformers' utilities)
    out = lorsa(record.hidden_states, attention_mask=mask).reconstruction
    torch.testing.assert_close(out[mask.bool()], record.attention_output[mask.bool()], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_capture_records_the_attention_input_and_output():
    model = build_host("llama")
    ids = token_batch()
    seen = {}
    layer = model.model.layers[1]
    handle = layer.self_attn.register_forward_hook(lambda m, a, o: seen.update(out=o[0]))
    with capture(model, 1) as cap:
        hidden = model(ids, output_hidden_states=True).hidden_states
    handle.remove()
    record = cap.last
    torch.testing.assert_close(record.hidden_states, layer.input_layernorm(hidden[1]))
    assert torch.equal(record.attention_output, seen["out"])
    assert len(cap.records) == 1 and record.position_embeddings[0].shape == (1, 24, 8)


@torch.no_grad()
def test_collect_stops_after_the_layer():
    model = build_host("gpt_neox")
    calls = []
    hooks = [
        layer.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, layer in enumerate(model.gpt_neox.layers)
    ]
    record = collect(model, 1, input_ids=token_batch())
    for h in hooks:
        h.remove()
    assert calls == [0]  # layer 1 started, its attention ran, and nothing after it
    with capture(model, 1) as cap:
        model(token_batch())
    assert torch.equal(record.attention_output, cap.last.attention_output)


@torch.no_grad()
def test_hooks_are_removed_after_an_exception():
    model = build_host("llama")
    ids = token_batch()
    clean = model(ids).logits
    lorsa = LorsaModel.from_host(model, 0, n_ov_heads=64, top_k=2)
    with pytest.raises(RuntimeError, match="boom"), splice(model, lorsa):
        model(ids)
        raise RuntimeError("boom")
    attn = attention_of(model, 0)
    assert not attn._forward_hooks and not attn._forward_pre_hooks
    assert not model.model._forward_pre_hooks
    assert torch.equal(model(ids).logits, clean)


@pytest.mark.parametrize("family", sorted(LORA_TARGETS))
@torch.no_grad()
def test_peft_wrapped_models(family):
    model = build_host(family)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[family], init_lora_weights=False)
    )
    peft_model.eval()
    ids = token_batch()
    clean = peft_model(input_ids=ids).logits
    lorsa = LorsaModel.from_host(peft_model, 1)
    with peft_model.disable_adapter():
        without_adapter = LorsaModel.from_host(peft_model, 1)
    assert not torch.allclose(lorsa.W_Q, without_adapter.W_Q) or not torch.allclose(lorsa.w_v, without_adapter.w_v)
    with splice(peft_model, lorsa):
        spliced = peft_model(input_ids=ids).logits
    torch.testing.assert_close(spliced, clean, atol=1e-4, rtol=0)
    assert torch.equal(peft_model(input_ids=ids).logits, clean)


@torch.no_grad()
def test_more_heads_and_sparsity_give_a_starting_point():
    model = build_host("llama")
    with capture(model, 1) as cap:
        model(token_batch())
    x, y = cap.last.hidden_states, cap.last.attention_output
    lorsa = LorsaModel.from_host(model, 1, n_ov_heads=256, top_k=256)
    assert lorsa.config.n_qk_heads == 32  # n_ov / head_dim
    fvu = ((lorsa(x).reconstruction - y) ** 2).sum() / ((y - y.mean((0, 1))) ** 2).sum()
    assert fvu < 0.5  # heads inside their host head's OV subspace, all of one norm: a starting point
    sparse = LorsaModel.from_host(model, 1, n_ov_heads=256, top_k=8)
    sparse_fvu = ((sparse(x).reconstruction - y) ** 2).sum() / ((y - y.mean((0, 1))) ** 2).sum()
    assert fvu < sparse_fvu < 1.0


def test_bad_attachments_raise_clear_errors():
    model = build_host("llama")
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 2\]"):
        LorsaModel.from_host(model, 3)
    with pytest.raises(ValueError, match=r"layer must be an integer"):
        with capture(model, -1):
            pass
    other_width = LorsaModel(LorsaConfig(d_model=16, n_qk_heads=2, d_qk_head=8, n_ov_heads=16, top_k=4, layer=0))
    with pytest.raises(ValueError, match="d_model=16"):
        with splice(model, other_width):
            pass
    lorsa = LorsaModel.from_host(model, 1)
    lorsa.config.host_model_type = "gpt2"
    with pytest.raises(ValueError, match="made for a 'gpt2' model"):
        with splice(model, lorsa):
            pass
    lorsa.config.host_model_type, lorsa.config.layer = "llama", 7
    with pytest.raises(ValueError, match="layer must be"):
        with splice(model, lorsa):
            pass


def test_unsupported_architecture_lists_supported_ones_and_explicit_paths_work():
    from transformers import AutoModelForCausalLM, OPTConfig

    model = AutoModelForCausalLM.from_config(
        OPTConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    ).eval()
    with pytest.raises(ValueError, match="Supported: gemma2.*llama.*attention_module="):
        with capture(model, 0):
            pass
    with torch.no_grad(), capture(model, 1, attention_module="model.decoder.layers.{layer}.self_attn") as cap:
        model(torch.randint(0, 50, (1, 6)))
    assert cap.last.attention_output.shape == (1, 6, 16)


@torch.no_grad()
def test_stories_exact_init_every_layer(stories_model, stories_tokenizer):
    require_shared()
    ids = stories_tokenizer(["Once upon a time, there was a little girl named Lily."] * 2, return_tensors="pt")
    clean = stories_model(**ids).logits
    for layer in range(stories_model.config.num_hidden_layers):
        with splice(stories_model, LorsaModel.from_host(stories_model, layer)):
            torch.testing.assert_close(stories_model(**ids).logits, clean, atol=1e-4, rtol=0)


ROPE_TYPES = {
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 2.0, "original_max_position_embeddings": 16},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {
        "short_factor": [1.0, 1.2, 1.5, 2.0],
        "long_factor": [1.5, 2.0, 3.0, 4.0],
        "original_max_position_embeddings": 16,
    },
}


@pytest.mark.parametrize("rope_type", sorted(ROPE_TYPES))
@torch.no_grad()
def test_standalone_rotary_matches_the_host_for_every_rope_type(rope_type):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": rope_type, "rope_theta": 1000.0, **ROPE_TYPES[rope_type]}
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, rope_parameters=rope)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 97, (2, 40))  # longer than original_max_position_embeddings: scaling applies
    with capture(model, 1) as cap:
        model(ids)
    lorsa = LorsaModel.from_host(model, 1)
    assert lorsa.config.rope_parameters["rope_type"] == rope_type
    out = lorsa(cap.last.hidden_states).reconstruction  # cos/sin from the Lorsa's own config
    torch.testing.assert_close(out, cap.last.attention_output, atol=1e-5, rtol=1e-4)


def test_share_qk_heads_evenly_or_by_weight():
    assert share_qk_heads(8, None, 4) == [0, 0, 1, 1, 2, 2, 3, 3]  # j * H // Hqk
    # 5 QK heads beyond one each, shared 1 : 0 : 3 -> 1.25, 0, 3.75 -> floors 1, 0, 3, and the last to the
    # largest remainder (0.75)
    assert share_qk_heads(8, torch.tensor([1.0, 0.0, 3.0]), 3) == [0, 0, 1, 2, 2, 2, 2, 2]
    assert share_qk_heads(2, torch.tensor([1.0, 0.0, 3.0]), 3) == [0, 1]  # fewer QK than host heads: evenly
    assert share_qk_heads(3, torch.tensor([5.0, 1.0, 1.0]), 3) == [0, 1, 2]  # at least one each


@torch.no_grad()
def test_head_output_variance_is_the_variance_of_each_host_heads_output():
    model = build_host("llama")
    ids = token_batch()
    with capture(model, 1) as cap:
        model(ids)
    x = cap.last.hidden_states
    counted = torch.ones(ids.shape, dtype=torch.bool)
    counted[:, 0] = False
    o_proj = model.model.layers[1].self_attn.o_proj
    weight, dh = o_proj.weight.clone(), model.config.head_dim
    expected = []
    for h in range(model.config.num_attention_heads):  # the host alone, every other head's output cut off
        o_proj.weight.zero_()
        o_proj.weight[:, h * dh : (h + 1) * dh] = weight[:, h * dh : (h + 1) * dh]
        with capture(model, 1) as cap:
            model(ids)
        out = cap.last.attention_output[counted]
        expected.append((out - out.mean(0)).pow(2).sum(-1).mean())
    o_proj.weight.copy_(weight)
    variance = head_output_variance(model, 1, x, counted)
    torch.testing.assert_close(variance, torch.stack(expected), rtol=1e-4, atol=1e-6)
    assert variance.max() > 1.2 * variance.min()  # the heads differ, so the test sees a swapped order
    lorsa = LorsaModel.from_host(model, 1, head_weights=variance, n_ov_heads=256)  # 32 QK heads of width 8
    copies = [sum(bool(torch.equal(lorsa.W_Q[j], model.model.layers[1].self_attn.q_proj.weight[h * dh : (h + 1) * dh].T))
                  for j in range(32)) for h in range(4)]  # fmt: skip
    assert copies == [share_qk_heads(32, variance, 4).count(h) for h in range(4)] and len(set(copies)) > 1


@torch.no_grad()
def test_training_shares_qk_heads_by_output_variance_unless_asked_for_an_even_share():
    from types import SimpleNamespace

    from hf_lorsa.inputs.activations import activation_sample
    from hf_lorsa.training.run_training import normalise_and_calibrate

    model = build_host("llama")
    windows = [{"input_ids": row} for row in token_batch(batch=8)]
    x, _, counted = activation_sample(model, 1, windows, 4, 2, [])
    q_proj = model.model.layers[1].self_attn.q_proj.weight
    variance = head_output_variance(model, 1, x, counted)
    for init, expected in (("host", share_qk_heads(32, variance, 4)), ("host_even", [j // 8 for j in range(32)])):
        lorsa = LorsaModel.from_host(model, 1, n_ov_heads=256, top_k=8)
        options = SimpleNamespace(init=init, k_anneal_start=None, norm_ratio=4.0)
        data = SimpleNamespace(batch_size=4, norm_batches=2)
        normalise_and_calibrate(lorsa, model, options, data, windows, [], "cpu")
        W_Q = lorsa.W_Q * lorsa.config.input_norm_factor  # in raw units again
        copied = [next(h for h in range(4) if torch.allclose(W_Q[j], q_proj[h * 8 : (h + 1) * 8].T, atol=1e-5))
                  for j in range(32)]  # fmt: skip
        assert copied == expected, init
    assert expected != share_qk_heads(32, variance, 4)
