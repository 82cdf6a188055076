"""LorsaModel on its own: the fused and explicit paths, masks, top-k, decode and weight folding."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_lorsa import LorsaConfig, LorsaModel
from hf_lorsa.model import qk_projection
from hf_lorsa.model.rotary import rotate_half_split

ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def make(seed: int = 0, **overrides) -> LorsaModel:
    torch.manual_seed(seed)
    kwargs = dict(d_model=32, n_qk_heads=4, d_qk_head=8, n_ov_heads=64, top_k=8, rope_parameters=ROPE)
    kwargs.update(overrides)
    model = LorsaModel(LorsaConfig(**kwargs)).eval()
    with torch.no_grad():
        for p in (model.b_Q, model.b_K, model.b_v, model.b_D):
            p.normal_(std=0.1)
        model.w_o.mul_(torch.rand(model.config.n_ov_heads, 1) + 0.5)  # non-unit norms matter for ranking
        if model.q_norm is not None:  # norm weights other than one, so that they matter
            model.q_norm.weight.copy_(torch.rand(model.q_norm.weight.shape) + 0.5)  # (dqk,) or per head (Hqk, dqk)
            model.k_norm.weight.copy_(torch.rand(model.k_norm.weight.shape) + 0.5)
    return model


def reference_z(model: LorsaModel, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """z computed head by head with explicit loops over the masking rules (no shared helpers)."""
    c = model.config
    B, T, _ = x.shape
    mask = torch.ones(B, T) if mask is None else mask.float()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    inv_freq = 1.0 / (c.rope_parameters["rope_theta"] ** (torch.arange(0, c.d_qk_head, 2).float() / c.d_qk_head))
    ang = pos[..., None] * inv_freq  # (B, T, dqk/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(t):
        half = t.shape[-1] // 2
        rot = torch.cat([-t[..., half:], t[..., :half]], -1)
        return t * cos + rot * sin

    def norm(t, weight):  # per-head RMSNorm (Qwen3, Gemma 3)
        if not c.qk_norm:
            return t
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + c.qk_norm_eps) * weight

    z = torch.zeros(B, T, c.n_ov_heads)
    for h in range(c.n_qk_heads):
        q_weight, k_weight = (None, None) if not c.qk_norm else (model.q_norm.weight, model.k_norm.weight)
        if c.qk_norm_per_head:
            q_weight, k_weight = q_weight[h], k_weight[h]
        q = rope(norm(x @ model.W_Q[h] + model.b_Q[h], q_weight))
        k = rope(norm(x @ model.W_K[h] + model.b_K[h], k_weight))
        logits = q @ k.transpose(-1, -2) / math.sqrt(c.d_qk_head)
        if c.attn_logit_softcapping:
            logits = torch.tanh(logits / c.attn_logit_softcapping) * c.attn_logit_softcapping
        for b in range(B):
            for t in range(T):
                for s in range(T):
                    visible = s <= t and mask[b, s] > 0
                    if c.sliding_window is not None:
                        visible = visible and t - s < c.sliding_window
                    if not visible and s != t:
                        logits[b, t, s] = float("-inf")
        A = logits.softmax(-1)
        for g in range(c.group_size):
            i = h * c.group_size + g
            z[..., i] = (A @ (x @ model.w_v[i] + model.b_v[i])[..., None])[..., 0]
    return z


@pytest.fixture(params=["pair order", "head by head"])
def qk_path(request, monkeypatch):
    """Both ways the CPU computes queries and keys (hf_lorsa.model.qk_projection); head by head must be taken."""
    calls = []
    project_by_head = qk_projection.project_by_head
    monkeypatch.setattr(qk_projection, "project_by_head", lambda *a: calls.append(1) or project_by_head(*a))
    monkeypatch.setattr(qk_projection, "HEAD_PRODUCT_WIDTH", 0 if request.param == "head by head" else 10**9)
    yield
    assert bool(calls) == (request.param == "head by head")


@pytest.mark.usefixtures("qk_path")
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"sliding_window": 3},
        {"attn_logit_softcapping": 2.0},
        {"qk_norm": True},
        {"qk_norm": True, "topk_rule": "relu"},
        {"qk_norm": True, "qk_norm_per_head": True},
    ],
)
@torch.no_grad()
def test_pre_activations_match_reference(overrides):
    model = make(**overrides)
    x = torch.randn(2, 7, 32)
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    z = model(x, attention_mask=mask, output_pre_activations=True).pre_activations
    expected = reference_z(model, x, mask)
    real = mask.bool()
    torch.testing.assert_close(z[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("qk_path")
@pytest.mark.parametrize("n_ov_heads", [32, 64])  # value width G = dqk (SDPA's fused kernel) and G = 2 dqk
@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True, "qk_norm_per_head": True}])
@torch.no_grad()
def test_unpadded_pre_activations_match_reference(n_ov_heads, overrides):
    model = make(n_ov_heads=n_ov_heads, **overrides)
    x = torch.randn(2, 7, 32)
    z = model(x, output_pre_activations=True).pre_activations
    torch.testing.assert_close(z, reference_z(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("qk_path")
@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True}, {"qk_norm": True, "qk_norm_per_head": True}])
def test_gradients_match_reference(overrides):
    """Queries and keys are computed with each rotary pair's dims side by side (hf_lorsa.model.qk_projection): the
    gradients reaching the projections and the QK norm's gain are those of the host's order."""
    model = make(**overrides)
    x = torch.randn(2, 7, 32)
    weights = torch.randn(2, 7, model.config.n_ov_heads)
    params = [model.W_Q, model.W_K, model.b_Q, model.b_K, model.w_v]
    params += [model.q_norm.weight, model.k_norm.weight] if model.q_norm is not None else []
    got = torch.autograd.grad((model(x, output_pre_activations=True).pre_activations * weights).sum(), params)
    expected = torch.autograd.grad((reference_z(model, x) * weights).sum(), params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rot", [16, 8])  # all of a 16-wide head, or half of it
def test_half_split_rotation_is_the_hosts_rotate_half(rot):
    """rotary.rotate_half_split rotates dims j and j + rot/2 as transformers' rotate_half does, the rest unchanged;
    its backward is the rotation's transpose (gradcheck in float64)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 16, dtype=torch.float64)  # (Hqk, B, T, dqk)
    angle = torch.rand(2, 5, rot // 2, dtype=torch.float64) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)  # (B, T, rot): the host's
    rotated, _ = apply_rotary_pos_emb(x[..., :rot].transpose(0, 1), x[..., :rot].transpose(0, 1), cos, sin)
    expected = torch.cat([rotated.transpose(0, 1), x[..., rot:]], -1)
    torch.testing.assert_close(rotate_half_split(x, angle.cos(), angle.sin()), expected, atol=1e-12, rtol=0)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: rotate_half_split(t, angle.cos(), angle.sin()), (x,))


@pytest.mark.parametrize("rope", [ROPE, dict(ROPE, partial_rotary_factor=0.5)])
@torch.no_grad()
def test_bfloat16_rotation_matches_float32(rope):
    """bfloat16 has no complex type: its queries and keys take the real products, which must rotate the same pairs."""
    model = make(rope_parameters=rope)
    x = torch.randn(2, 7, 32)
    expected = model.queries_keys(x)
    got = model.to(torch.bfloat16).queries_keys(x.bfloat16())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.float(), b, atol=5e-2, rtol=2e-2)


@torch.no_grad()
def test_explicit_path_agrees_with_fused_path():
    model = make(sliding_window=4)
    x = torch.randn(2, 9, 32)
    mask = torch.tensor([[1] * 9, [0, 0, 0, 1, 1, 1, 1, 1, 1]])
    z = model(x, attention_mask=mask, output_pre_activations=True).pre_activations
    pattern = model.attention_pattern(x, attention_mask=mask)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 9))
    assert pattern[1, :, 5, :3].abs().max() == 0  # padded keys are never attended
    assert pattern[0, :, 8, :5].abs().max() == 0  # outside the window of 4
    for head in (0, 17, 63):
        contributions = model.z_pattern(x, head, attention_mask=mask)  # (B, T, S)
        torch.testing.assert_close(contributions.sum(-1), z[..., head], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 3, "attn_logit_softcapping": 2.0}])
@torch.no_grad()
def test_attention_rows_are_rows_of_the_pattern(overrides):
    model = make(**overrides)
    x = torch.randn(2, 9, 32)
    mask = torch.tensor([[1] * 9, [0, 0, 0, 1, 1, 1, 1, 1, 1]])
    full = model.attention_pattern(x, attention_mask=mask)
    b, h, t = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([0, 3, 2, 1, 0]), torch.tensor([8, 5, 3, 4, 8])
    rows = model.attention_rows(x, b, h, t, attention_mask=mask, chunk=2)
    torch.testing.assert_close(rows, full[b, h, t])


@torch.no_grad()
def test_padding_gives_the_unpadded_values():
    model = make()
    a, b = torch.randn(1, 6, 32), torch.randn(1, 4, 32)
    pad = torch.zeros(1, 2, 32)
    for side in ("left", "right"):
        b_padded = torch.cat([pad, b], 1) if side == "left" else torch.cat([b, pad], 1)
        mask_b = torch.tensor([[0, 0, 1, 1, 1, 1]]) if side == "left" else torch.tensor([[1, 1, 1, 1, 0, 0]])
        out = model(torch.cat([a, b_padded]), attention_mask=torch.cat([torch.ones(1, 6).long(), mask_b]))
        alone_a, alone_b = model(a).reconstruction, model(b).reconstruction
        torch.testing.assert_close(out.reconstruction[:1], alone_a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.reconstruction[1:, mask_b[0].bool()], alone_b, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_top_k_keeps_the_best_ranked_heads_and_decode_is_dense_equivalent():
    model = make(top_k=5)
    x = torch.randn(2, 6, 32)
    out = model(x, output_pre_activations=True)
    z = out.pre_activations
    score = z.abs() * model.w_o.norm(dim=-1)
    kth = score.topk(5, dim=-1).values[..., -1:]
    assert out.top_k_indices.shape == (2, 6, 5)
    torch.testing.assert_close(
        score.gather(-1, out.top_k_indices).sort(-1).values, score.topk(5).values.sort(-1).values
    )
    assert (score.gather(-1, out.top_k_indices) >= kth).all()
    torch.testing.assert_close(out.top_k_values, z.gather(-1, out.top_k_indices))
    dense = torch.zeros_like(z).scatter(-1, out.top_k_indices, out.top_k_values)
    torch.testing.assert_close(out.reconstruction, dense @ model.w_o + model.b_D, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_relu_rule_keeps_only_positive_activations():
    model = make(topk_rule="relu", top_k=60)
    out = model(torch.randn(2, 6, 32), output_pre_activations=True)
    assert (out.top_k_values >= 0).all()
    positives = (out.pre_activations > 0).sum(-1)
    assert ((out.top_k_values > 0).sum(-1) == positives.clamp(max=60)).all()


@torch.no_grad()
def test_top_k_override_and_full_k_is_the_dense_layer():
    model = make()
    x = torch.randn(1, 5, 32)
    full = model(x, top_k=64, output_pre_activations=True)
    torch.testing.assert_close(full.reconstruction, full.pre_activations @ model.w_o + model.b_D, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="top_k"):
        model(x, top_k=65)


@torch.no_grad()
def test_folding_keeps_the_function():
    model = make(qk_norm=False)
    x = torch.randn(2, 6, 32)
    before = model(x).reconstruction
    model.set_norm_factors(3.0, 0.25)
    assert model.config.input_norm_factor == 3.0
    torch.testing.assert_close(model(x).reconstruction, before, atol=1e-5, rtol=1e-5)
    model.fold_norm_factors()
    assert model.config.input_norm_factor == model.config.output_norm_factor == 1.0
    torch.testing.assert_close(model(x).reconstruction, before, atol=1e-5, rtol=1e-5)
    model.normalize_decoder()
    torch.testing.assert_close(model.w_o.norm(dim=-1), torch.ones(64))
    torch.testing.assert_close(model(x).reconstruction, before, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    model = make(max_position_embeddings=16)
    with pytest.raises(ValueError, match="d_model=32"):
        model(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="batch, positions"):
        model(torch.randn(5, 32))
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(torch.randn(1, 17, 32))
    with pytest.raises(ValueError, match="ov_head"):
        model.z_pattern(torch.randn(1, 4, 32), 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_ov_heads=62), "multiple of n_qk_heads"),
        (dict(top_k=65), "cannot exceed n_ov_heads"),
        (dict(topk_rule="softmax"), "topk_rule"),
        (dict(rope_parameters={"rope_type": "spiral", "rope_theta": 1.0}), "Unknown rope_type"),
        (dict(rope_parameters={"rope_type": "default"}), "rope_theta"),
        (dict(d_model=0), "positive integer"),
    ],
)
def test_config_validation_names_the_fix(kwargs, message):
    base = dict(d_model=32, n_qk_heads=4, d_qk_head=8, n_ov_heads=64, top_k=8)
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        LorsaConfig(**base)


def test_expansion_factor_sets_the_dictionary_size():
    config = LorsaConfig(d_model=32, n_qk_heads=32, d_qk_head=8, expansion_factor=8, top_k=4)
    assert config.n_ov_heads == 256 and config.group_size == 8


@torch.no_grad()
def test_interleaved_partial_rotary_is_gptj_rotary():
    """rope_interleaved rotates adjacent pairs as GPT-J does (transformers' own GPT-J functions), and only the
    first partial_rotary_factor of each QK head."""
    from einops import einsum
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions

    model = make(rope_interleaved=True, rope_parameters=dict(ROPE, partial_rotary_factor=0.5))
    x = torch.randn(2, 8, 32)
    q, k = model.queries_keys(x)  # (B, Hqk, T, dqk)
    rot = 4
    sincos = create_sinusoidal_positions(8, rot)[None].expand(2, -1, -1)  # (B, T, rot)
    sin, cos = sincos[..., : rot // 2], sincos[..., rot // 2 :]
    for got, W, b in ((q, model.W_Q, model.b_Q), (k, model.W_K, model.b_K)):
        raw = einsum(x, W, "B T D, H D e -> B T H e") + b  # GPT-J's layout (B, T, H, dqk)
        expected = torch.cat([apply_rotary_pos_emb(raw[..., :rot], sin, cos), raw[..., rot:]], -1)
        torch.testing.assert_close(got, expected.transpose(1, 2))


@torch.no_grad()
def test_rope_scaling_and_no_rope():
    x = torch.randn(1, 8, 32)
    # linear scaling by 4 is the same as positions divided by 4
    scaled = make(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
    pos = torch.arange(8)[None].float()
    torch.testing.assert_close(scaled(x).reconstruction, make()(x, position_ids=pos / 4).reconstruction)
    # without rotary the queries are the plain projections
    plain = make(rope_parameters=None)
    q, _ = plain.queries_keys(x)
    torch.testing.assert_close(q, (torch.einsum("btd,hde->bhte", x, plain.W_Q) + plain.b_Q[:, None]))


def test_backward_reaches_every_parameter():
    model = make(qk_norm=True).train()
    out = model(torch.randn(2, 6, 32))
    F.mse_loss(out.reconstruction, torch.randn(2, 6, 32)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
