"""The training path's causal attention: its CPU backward over the rows with a gradient equals the full backward."""

import pytest
import torch
import torch.nn.functional as F

import hf_lorsa.kernels.causal_attention as ca
from hf_lorsa import LorsaConfig, LorsaModel
from hf_lorsa.kernels.causal_attention import causal_attention, packs_rows

B, H, T, D, G, K = 2, 16, 96, 8, 8, 8  # G OV heads per QK head, K of H * G kept per position


def kept_heads_gradient(pattern: str, generator: torch.Generator) -> torch.Tensor:
    """A gradient for z (B, H, T, G) laid out as the model's (B, T, H * G) one: nonzero only at kept heads."""
    scores = torch.rand(B, T, H * G, generator=generator)
    if pattern == "busy pairs":  # two QK heads take most of K: their pairs have nearly every row
        scores[..., : 2 * G] += 0.3
    keep = K if pattern != "every row" else H * G
    kept = scores.topk(keep, dim=-1).indices
    grad = torch.zeros(B, T, H * G).scatter(-1, kept, torch.randn(B, T, keep, generator=generator))
    if pattern == "none":
        grad.zero_()
    return grad.view(B, T, H, G).transpose(1, 2)  # (B, H, T, G), strided as the rearrange's backward gives it


def attention_and_grads(attention, q, k, v, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("pattern", ["kept heads", "busy pairs", "every row", "none"])
def test_backward_over_read_rows_equals_the_full_backward(pattern, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=generator) for _ in range(3))
    grad = kept_heads_gradient(pattern, generator)
    calls = []
    flash_backward = ca._flash_backward
    monkeypatch.setattr(ca, "_flash_backward", lambda *a, **kw: calls.append(a[7]) or flash_backward(*a, **kw))
    expected = attention_and_grads(
        lambda *t: F.scaled_dot_product_attention(*t, is_causal=True, scale=0.3), q, k, v, grad
    )
    got = attention_and_grads(lambda *t: causal_attention(*t, scale=0.3), q, k, v, grad)
    for name, a, b in zip(["output", "dq", "dk", "dv"], got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    # The groups took the packed kernel (causal False) where rows were few, the full one where they were many.
    packed, full = calls.count(False), calls.count(True)
    assert {"kept heads": full == 0 and packed == len(ca.group_ends(B * H)), "busy pairs": full == 1 and packed > 0,
            "every row": packed == 0 and full == 1, "none": not calls}[pattern], calls  # fmt: skip


def test_bf16_backward_matches_the_full_backward():
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, T, D, generator=generator).bfloat16() for _ in range(3))
    grad = kept_heads_gradient("kept heads", generator).bfloat16()
    expected = attention_and_grads(
        lambda *t: F.scaled_dot_product_attention(*t, is_causal=True, scale=0.3), q, k, v, grad
    )
    got = attention_and_grads(lambda *t: causal_attention(*t, scale=0.3), q, k, v, grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_packing_only_where_the_kernel_and_a_gradient_are():
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    assert packs_rows(q, q, q)
    assert not packs_rows(q, q, torch.randn(1, 2, 4, 16))  # value width differs: SDPA's composite path
    assert not packs_rows(q.double(), q.double(), q.double())
    meta = torch.empty(1, 2, 4, 8, device="meta", requires_grad=True)
    assert not packs_rows(meta, meta, meta)  # any device but the CPU keeps SDPA's backward (no host reads)
    with torch.no_grad():
        assert not packs_rows(q, q, q)
    assert not packs_rows(q.detach(), q.detach(), q.detach())


def test_model_gradients_are_those_of_the_full_backward(monkeypatch):
    """A train step of a stories260K-sized Lorsa (8 OV heads per QK head) gives the same gradients either way."""
    torch.manual_seed(0)
    config = LorsaConfig(d_model=64, n_qk_heads=32, d_qk_head=8, n_ov_heads=256, top_k=8, max_position_embeddings=64,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    model = LorsaModel(config).train()
    x, y = torch.randn(4, 64, 64), torch.randn(4, 64, 64)

    def grads():
        model.zero_grad()
        (model(x).reconstruction - y).pow(2).mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    packed = grads()
    monkeypatch.setattr(ca, "PACKED_ROW_SHARE", -1.0)  # every group takes the full backward
    full = grads()
    assert packed.keys() == full.keys()
    for name in full:
        torch.testing.assert_close(packed[name], full[name], atol=1e-6, rtol=1e-5, msg=name)
