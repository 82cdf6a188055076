"""The numerical checks again on a GPU, in fp32 and under bf16 autocast (skipped where CUDA is absent).

Each compares the GPU against an explicit reference computed on the CPU in fp32: the fused path against the
head-by-head reference, the two decodes against each other, a whole train step's loss and gradients, and the
exact initialisation from every host family.
"""

import pytest
import torch

from conftest import build_host, token_batch
from hf_lorsa import LorsaModel, splice
from test_modeling import make, reference_z

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def autocast(enabled: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 3}, {"qk_norm": True, "qk_norm_per_head": True}])
@torch.no_grad()
def test_fused_path_matches_reference(bf16, overrides):
    model = make(**overrides)
    x = torch.randn(2, 7, 32)
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    expected = reference_z(model, x, mask)
    with autocast(bf16):
        z = model.to(CUDA)(x.to(CUDA), attention_mask=mask.to(CUDA), output_pre_activations=True).pre_activations
    real = mask.bool()
    assert relative_error(z.cpu()[real], expected[real]) < (1e-2 if bf16 else 1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_dense_and_gathering_decode_agree_with_gradients(bf16):
    model = make(top_k=6).to(CUDA)
    torch.manual_seed(1)
    values = torch.randn(3, 5, 6, device=CUDA)
    indices = torch.stack([torch.randperm(64, device=CUDA)[:6] for _ in range(15)]).view(3, 5, 6)
    target = torch.randn(3, 5, 32, device=CUDA)
    results = []
    for dense in (True, False):
        model.dense_decode = dense
        model.zero_grad()
        leaf = values.clone().requires_grad_()
        with autocast(bf16):
            out = model.decode(leaf, indices)
        (out.float() - target).pow(2).sum().backward()
        results.append((out.detach(), leaf.grad, model.w_o.grad.clone()))
    # the reference: the same sum written as a dense product, on the CPU in fp32, with its gradients
    w_o = model.w_o.detach().cpu().requires_grad_()
    leaf = values.cpu().requires_grad_()
    dense = torch.zeros(15, 64).scatter(-1, indices.view(15, 6).cpu(), leaf.view(15, 6))
    expected = ((dense @ w_o + model.b_D.detach().cpu()) / model.config.output_norm_factor).view(3, 5, 32)
    (expected - target.cpu()).pow(2).sum().backward()
    for result in results:
        for got, want in zip(result, (expected.detach(), leaf.grad, w_o.grad)):
            assert relative_error(got, want) < (2e-2 if bf16 else 1e-5)


@pytest.mark.parametrize("act_fn", ["topk", "batchtopk"])
@pytest.mark.parametrize("bf16", [False, True])
def test_train_step_loss_and_gradients_match_the_cpu(bf16, act_fn):
    model = make(top_k=8, act_fn=act_fn).train()  # batchtopk learns its threshold in training
    torch.manual_seed(2)
    x, y = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    loss = (model(x).reconstruction - y).pow(2).mean()
    loss.backward()
    cpu_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    cpu_threshold = model.threshold.clone() if act_fn == "batchtopk" else None
    model.zero_grad()
    model.to(CUDA)
    with autocast(bf16):
        gpu_loss = (model(x.to(CUDA)).reconstruction.float() - y.to(CUDA)).pow(2).mean()
    gpu_loss.backward()
    assert abs(float(gpu_loss.detach()) - float(loss.detach())) / float(loss.detach()) < (1e-2 if bf16 else 1e-5)
    # under bf16 a few heads near the bar change sides; BatchTopK's single bar for the batch has more of them (the
    # same test with the CPU's bf16 autocast: 6.4% for W_Q's gradient)
    bound = (1e-1 if act_fn == "batchtopk" else 5e-2) if bf16 else 1e-4
    for name, p in model.named_parameters():
        assert relative_error(p.grad, cpu_grads[name]) < bound, name
    if act_fn == "batchtopk":  # the CPU step set the threshold to its bar; the GPU's bar, the same batch's, moved it 1%
        assert relative_error(model.threshold, cpu_threshold) < (1e-2 if bf16 else 1e-5)


@torch.no_grad()
def test_exact_init_reproduces_the_layer(family):
    model = build_host(family).to(CUDA)
    ids = token_batch().to(CUDA)
    clean = model(ids).logits
    lorsa = LorsaModel.from_host(model, 1)
    assert lorsa.w_o.device.type == "cuda"
    with splice(model, lorsa):
        spliced = model(ids).logits
    torch.testing.assert_close(spliced, clean, atol=1e-4, rtol=0)
    with autocast(True), splice(model, lorsa):
        spliced_bf16 = model(ids).logits.float()
    with autocast(True):
        clean_bf16 = model(ids).logits.float()
    assert relative_error(spliced_bf16, clean) < 2 * relative_error(clean_bf16, clean) + 1e-2


@torch.no_grad()
def test_host_initialisation_with_more_heads_matches_the_cpu():
    """The training default: more OV heads than the host has value dimensions, shared by output variance."""
    model = build_host("llama")
    weights = torch.tensor([1.0, 3.0, 0.5, 2.0])
    cpu = LorsaModel.from_host(model, 1, head_weights=weights, n_ov_heads=256, top_k=256)
    gpu = LorsaModel.from_host(model.to(CUDA), 1, head_weights=weights, n_ov_heads=256, top_k=256)
    assert gpu.w_v.device.type == "cuda"
    ids = token_batch()
    for name, p in cpu.named_parameters():  # the same pieces up to the signs SVD may choose
        q = gpu.get_parameter(name).cpu()
        torch.testing.assert_close(q.abs(), p.abs(), atol=1e-5, rtol=1e-4, msg=name)
    with splice(model, gpu):
        spliced = model(ids.to(CUDA)).logits.cpu()
    with splice(model.cpu(), cpu):
        expected = model(ids).logits
    assert relative_error(spliced, expected) < 1e-4


@torch.no_grad()
def test_host_initialisation_of_a_cpu_lorsa_from_a_gpu_host():
    """As training does it: the Lorsa is built on the CPU, the host already sits on the GPU."""
    from hf_lorsa import LorsaConfig
    from hf_lorsa.model.initialization import initialize_from_host

    model = build_host("llama")
    config = LorsaConfig.from_host(model, 1, n_ov_heads=256, top_k=256)
    expected = LorsaModel(config)
    initialize_from_host(expected, model, 1, head_weights=torch.tensor([1.0, 3.0, 0.5, 2.0]))
    lorsa = LorsaModel(config)
    initialize_from_host(lorsa, model.to(CUDA), 1, head_weights=torch.tensor([1.0, 3.0, 0.5, 2.0]))
    assert lorsa.w_v.device.type == "cpu"
    for name, p in expected.named_parameters():
        torch.testing.assert_close(lorsa.get_parameter(name).abs(), p.abs(), atol=1e-5, rtol=1e-4, msg=name)
