"""The CPU attention for values wider than the queries: its backward over the gradient's nonzeros equals SDPA's."""

import pytest
import torch
import torch.nn.functional as F

import hf_lorsa.kernels.sparse_gradient_attention as sga
from hf_lorsa import LorsaConfig, LorsaModel
from hf_lorsa.kernels.causal_attention import causal_attention
from hf_lorsa.kernels.sparse_gradient_attention import takes_sparse_gradient

B, H, T, D, G = 2, 6, 40, 4, 8  # QK heads of width D; G OV heads per QK head


def values(layout: str, dtype=torch.float32) -> torch.Tensor:
    """A leaf v laid out as the model makes it: (B, T, H * G) by default, (H * G, B * T) with positions last."""
    v = torch.randn(B, T, H * G, dtype=dtype)
    if layout == "positions last":
        v = v.flatten(0, 1).t().contiguous().t().unflatten(0, (B, T))
    return v.requires_grad_()


def kept_heads_gradient(kept: int, dtype=torch.float32) -> torch.Tensor:
    """z's gradient (B, T, H * G) with `kept` nonzeros per position, as top-k's backward gives it."""
    heads = torch.rand(B, T, H * G).topk(kept, dim=-1).indices
    return torch.zeros(B, T, H * G, dtype=dtype).scatter(-1, heads, torch.randn(B, T, kept, dtype=dtype))


def attend(attention, q, k, v, grad):
    """Output and gradients of q, k, v (given as the model's layouts) through `attention` on (B, H, T, *) views."""
    leaves = [q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_(), v]
    z = attention(*(t.transpose(1, 2) for t in leaves[:2]), v.unflatten(-1, (H, G)).transpose(1, 2))
    z = z.transpose(1, 2).flatten(2)  # (B, T, H * G): the model's rearrange
    z.backward(grad)
    out = [z.detach()] + [t.grad.clone() for t in leaves]
    v.grad = None
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["positions last", "model"])
@pytest.mark.parametrize("kept", [0, 2, H * G])  # kept heads per position: none, 2 of 48 (sparse), every one
def test_equals_sdpa(kept, layout, dtype, monkeypatch):
    torch.manual_seed(kept)
    monkeypatch.setattr(sga, "DENSE_SHARE", 0.05)  # 2 of 48 per position is sparse here
    q, k = torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, T, H, D, dtype=dtype)
    v, grad = values(layout, dtype), kept_heads_gradient(kept, dtype)
    expected = attend(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True, scale=0.4), q, k, v, grad)
    calls = []
    sparse = sga._sparse_products
    monkeypatch.setattr(sga, "_sparse_products", lambda *a: calls.append(1) or sparse(*a))
    got = attend(lambda *t: causal_attention(*t, scale=0.4), q, k, v, grad)
    tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    for name, a, b in zip(["z", "dq", "dk", "dv"], got, expected):
        torch.testing.assert_close(a, b, **tolerance, msg=name)
    assert len(calls) == (kept < H * G)  # the dense products past DENSE_SHARE
    assert got[3].stride() == v.stride()  # dv in v's own layout: no copy on its way back to the projection


def test_runs_on_the_cpu_for_unequal_float_widths_only():
    q = torch.randn(1, 2, 4, 8)
    assert takes_sparse_gradient(q, q, 16) and takes_sparse_gradient(q.double(), q.double(), 4)
    assert not takes_sparse_gradient(q, q, 8)  # equal widths: the fused kernel
    assert not takes_sparse_gradient(q.bfloat16(), q.bfloat16(), 16)
    meta = torch.empty(1, 2, 4, 8, device="meta")
    assert not takes_sparse_gradient(meta, meta, 16)  # any other device: SDPA
    assert not takes_sparse_gradient(q[:, :, :0], q[:, :, :0], 16)


def test_model_step_equals_sdpa(monkeypatch):
    """A train step of a Lorsa with 16 OV heads per 8-wide QK head: z, the kept heads and every parameter's
    gradient as through SDPA; and the values laid out positions last only where this attention reads them."""
    torch.manual_seed(0)
    config = LorsaConfig(d_model=32, n_qk_heads=4, d_qk_head=8, n_ov_heads=64, top_k=2, max_position_embeddings=48,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    model = LorsaModel(config).train()
    x, y = torch.randn(3, 48, 32), torch.randn(3, 48, 32)

    def step():
        model.zero_grad()
        out = model(x, output_pre_activations=True)
        (out.reconstruction - y).pow(2).mean().backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters()}

    (out, grads), layouts = step(), []
    ov_values = model.ov_values
    monkeypatch.setattr(model, "ov_values", lambda *a, **kw: layouts.append(kw) or ov_values(*a, **kw))
    padded = torch.ones(3, 48, dtype=torch.long)
    padded[0, :5] = 0
    model(x, attention_mask=padded)  # the masked path is SDPA's: v in the model's layout
    assert layouts == [{"positions_last": False}]
    layouts.clear()
    monkeypatch.setattr("hf_lorsa.model.modeling_lorsa.takes_sparse_gradient", lambda *a: False)
    monkeypatch.setattr("hf_lorsa.kernels.causal_attention.takes_sparse_gradient", lambda *a: False)
    sdpa, sdpa_grads = step()
    assert layouts == [{"positions_last": False}]
    torch.testing.assert_close(out.pre_activations, sdpa.pre_activations, atol=1e-6, rtol=1e-5)
    assert torch.equal(out.top_k_indices, sdpa.top_k_indices)
    for name in sdpa_grads:
        torch.testing.assert_close(grads[name], sdpa_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_only_the_gradients_asked_for_and_no_second_derivative():
    torch.manual_seed(3)
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, H, D, requires_grad=True)
    v, grad = values("positions last"), kept_heads_gradient(2)
    z = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.unflatten(-1, (H, G)).transpose(1, 2), scale=0.4)
    assert z.grad_fn.name() == "SparseGradientCausalAttentionBackward"
    z.transpose(1, 2).flatten(2).backward(grad)  # q needs none: its product is skipped
    expected = attend(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True, scale=0.4), q, k, v, grad)
    torch.testing.assert_close(k.grad, expected[2], atol=1e-6, rtol=1e-5)
    q.requires_grad_()
    z = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.unflatten(-1, (H, G)).transpose(1, 2), scale=0.4)
    (dq,) = torch.autograd.grad(z.transpose(1, 2).flatten(2), q, grad, create_graph=True)
    with pytest.raises(RuntimeError):  # the backward built no graph: an error, not a wrong second derivative
        dq.sum().backward()
