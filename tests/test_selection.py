"""BatchTopK (`act_fn="batchtopk"`): K x N heads per training batch, a learned threshold at inference."""

import pytest
import torch

from hf_lorsa import LorsaConfig, LorsaModel
from hf_lorsa.model.selection import BATCH_TOPK_CAP, THRESHOLD_DECAY


def batch_lorsa(top_k=4, rule="relu") -> LorsaModel:
    torch.manual_seed(0)
    config = LorsaConfig(d_model=16, n_qk_heads=4, d_qk_head=4, n_ov_heads=64, top_k=top_k, topk_rule=rule,
                         act_fn="batchtopk")  # fmt: skip
    return LorsaModel(config)


def scores_of(lorsa, x):
    z = lorsa.pre_activations(x).detach()
    act = z.relu() if lorsa.config.topk_rule == "relu" else z
    return act.abs() * lorsa.w_o.detach().norm(dim=-1), act


def active_map(out, n_ov):
    """(B, T, Hov) activations after selection, 0 where a head is not active."""
    dense = torch.zeros(*out.top_k_indices.shape[:2], n_ov)
    return dense.scatter(-1, out.top_k_indices, out.top_k_values.detach())


@pytest.mark.parametrize("rule", ["relu", "abs"])
def test_training_keeps_the_k_times_n_best_scores_of_the_batch(rule):
    lorsa = batch_lorsa(rule=rule).train()
    x = torch.randn(3, 20, 16)
    out = lorsa(x)
    scores, act = scores_of(lorsa, x)
    # reference: each position's 4K best, then the K x N best of those over the whole batch
    cap = BATCH_TOPK_CAP * 4
    per_position = scores.topk(cap, dim=-1).values[..., -1:]
    candidates = torch.where(scores >= per_position, scores, -1.0)
    bar = candidates.flatten().topk(4 * 60).values[-1]
    expected = torch.where(candidates >= bar, act, 0.0)
    torch.testing.assert_close(active_map(out, 64), expected)
    counts = (out.top_k_values != 0).sum(-1)
    assert counts.sum() == 4 * 60 and counts.min() < 4 < counts.max()  # K per position on average only
    assert out.top_k_values.shape[-1] == cap
    torch.testing.assert_close(lorsa.threshold, bar)  # the first batch sets the threshold


def test_the_threshold_is_a_running_mean_and_inference_uses_it_for_each_position_alone():
    lorsa = batch_lorsa().train()
    first, second = torch.randn(2, 20, 16), 3 * torch.randn(2, 20, 16)
    lorsa(first)
    t1 = lorsa.threshold.clone()
    lorsa(second)
    bar2 = scores_of(lorsa, second)[0].topk(16, dim=-1).values.flatten().topk(4 * 40).values[-1]
    torch.testing.assert_close(lorsa.threshold, THRESHOLD_DECAY * t1 + (1 - THRESHOLD_DECAY) * bar2)
    lorsa(second, top_k=8)  # K still annealing: the threshold is not learned from it
    torch.testing.assert_close(lorsa.threshold, THRESHOLD_DECAY * t1 + (1 - THRESHOLD_DECAY) * bar2)

    lorsa.eval()
    x = torch.randn(3, 20, 16)
    scores, act = scores_of(lorsa, x)
    out = lorsa(x)
    kept = scores >= scores.topk(16, dim=-1).values[..., -1:]
    torch.testing.assert_close(active_map(out, 64), torch.where(kept & (scores >= lorsa.threshold), act, 0.0))
    alone = lorsa(x[1:2])  # a row's heads do not depend on the rest of the batch
    torch.testing.assert_close(alone.reconstruction, out.reconstruction[1:2])


def test_the_threshold_survives_saving_folding_and_unit_decoders(tmp_path):
    lorsa = batch_lorsa().train()
    lorsa.set_norm_factors(2.0, 3.0)
    lorsa(torch.randn(2, 20, 16))
    lorsa.eval()
    x = torch.randn(2, 20, 16)
    before = lorsa(x).reconstruction
    learned = lorsa.threshold.clone()
    lorsa.fold_norm_factors()
    lorsa.normalize_decoder()
    torch.testing.assert_close(lorsa.threshold, learned / 3.0)  # scores are in the output's units
    lorsa.save_pretrained(tmp_path)
    loaded = LorsaModel.from_pretrained(tmp_path)
    assert loaded.config.act_fn == "batchtopk"
    torch.testing.assert_close(loaded.threshold, learned / 3.0)
    torch.testing.assert_close(loaded(x).reconstruction, before, atol=1e-5, rtol=1e-5)


def test_a_lorsa_not_yet_trained_ranks_over_the_batch_and_topk_lorsas_have_no_threshold():
    lorsa = batch_lorsa().eval()
    out = lorsa(torch.randn(2, 10, 16))
    assert (out.top_k_values != 0).sum() == 4 * 20 and float(lorsa.threshold) < 0  # inference does not learn
    plain = LorsaModel(LorsaConfig(d_model=16, n_qk_heads=4, d_qk_head=4, n_ov_heads=64, top_k=4))
    assert "threshold" not in plain.state_dict()
    with pytest.raises(ValueError, match="act_fn must be one of"):
        LorsaConfig(act_fn="jumprelu")


def test_gathering_only_the_active_heads_decodes_as_the_dense_product():
    lorsa = batch_lorsa().train()
    x = torch.randn(3, 20, 16)
    results = []
    for dense in (True, False):  # False: the CPU's gather, of the active entries only (about K of the 4K)
        lorsa.dense_decode = dense
        lorsa.zero_grad()
        out = lorsa(x)
        out.reconstruction.pow(2).sum().backward()
        assert (out.top_k_values == 0).any()  # room for 4K heads, fewer active
        results.append((out.reconstruction.detach(), lorsa.w_o.grad.clone(), lorsa.w_v.grad.clone()))
    for dense, gathered in zip(*results):
        torch.testing.assert_close(gathered, dense, rtol=1e-5, atol=1e-5)
