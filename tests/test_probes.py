"""Mechanism probes: scores known exactly on hand-built patterns, host heads through the replica equal to the host's
own attention, and a Lorsa head scored by where its activation comes from."""

import pytest
import torch

from conftest import build_host
from hf_lorsa import LorsaModel, collect
from hf_lorsa.analysis.probes import (
    event_scores,
    pattern_scores,
    probe_inputs,
    probe_scores,
    probe_targets,
    probe_tokens,
    reconstructed_shares,
    source_weights,
)

L = 6  # tokens in each copy
T = 1 + 2 * L  # BOS, then two copies


def wired(target_of) -> torch.Tensor:
    """(1, 1, T, T): a head attending fully to target_of(t) from every query t (to itself where that is None)."""
    pattern = torch.zeros(1, 1, T, T)
    for t in range(T):
        pattern[0, 0, t, target_of(t) if target_of(t) is not None else t] = 1
    return pattern


def test_perfect_heads_score_one_and_a_uniform_head_scores_what_uniform_gives():
    previous = pattern_scores(wired(lambda t: max(t - 1, 0)), L)
    assert previous["previous_token"].item() == 1 and previous["current_token"].item() == 0
    induction = pattern_scores(wired(lambda t: t - L + 1 if t > L else None), L)  # second copy: after the earlier
    assert induction["induction"].item() == 1 and induction["duplicate_token"].item() == 0
    duplicate = pattern_scores(wired(lambda t: t - L if t > L else None), L)
    assert duplicate["duplicate_token"].item() == 1 and duplicate["induction"].item() == 0
    assert pattern_scores(wired(lambda t: 0), L)["bos"].item() == 1
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    scores = pattern_scores(uniform[None, None], L)
    every = torch.arange(1, T)
    assert scores["previous_token"].item() == pytest.approx((1 / (every + 1)).mean().item())
    assert scores["bos"].item() == pytest.approx((1 / (every + 1)).mean().item())
    second = torch.arange(1 + L, 2 * L)  # the second copy's queries, its last left out
    assert scores["induction"].item() == pytest.approx((1 / (second + 1)).mean().item())


def test_probe_tokens_repeat_random_ordinary_tokens_after_bos():
    ids = probe_tokens(50, [0, 1, 2], bos_id=1, n=4, length=L, seed=0)
    assert ids.shape == (4, T) and (ids[:, 0] == 1).all() and (ids[:, 1 : 1 + L] == ids[:, 1 + L :]).all()
    assert ids[:, 1:].min() >= 3
    queries, sources = probe_targets(T, L)["induction"]
    assert (ids[:, queries - L] == ids[:, queries]).all() and (sources == queries - L + 1).all()


def test_a_lorsa_head_is_scored_where_its_activation_comes_from_and_only_where_it_fires():
    rows = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.8, 0.0]])
    values = torch.tensor([[1.0, 3.0, 5.0], [-1.0, 1.0, 1.0]])  # the first event: 0.5 and 1.5 of z = 2
    weights = source_weights(rows, values)
    torch.testing.assert_close(weights, torch.tensor([[0.25, 0.75, 0.0], [0.0, 1.0, 0.0]]))
    same_sign = source_weights(rows, torch.ones(2, 3))  # values of one sign: the pattern itself
    torch.testing.assert_close(same_sign, rows)
    # head 0 fires at query 2 reading position 1 (previous token), head 2 never fires
    w = torch.zeros(1, T)
    w[0, 1] = 1.0
    scores, events = event_scores(w, torch.tensor([0]), torch.tensor([2]), torch.tensor([0]), 3, T, L)
    assert scores["previous_token"][0] == 1 and scores["current_token"][0] == 0 and events.tolist() == [1, 0, 0]
    assert scores["previous_token"][2].isnan() and scores["induction"][0].isnan()  # no query of that probe


def test_host_heads_are_scored_from_the_hosts_own_attention_and_a_replica_scores_as_its_host():
    host = build_host("llama").float()
    layer = 1
    lorsa = LorsaModel.from_host(host, layer)  # the exact replica: each OV head reads its host head's pattern
    scores = probe_scores(host, lorsa, n_sequences=3, length=L)
    ids = probe_tokens(host.config.vocab_size, list(lorsa.config.skip_token_ids or []), None, 3, L, 0)
    host.set_attn_implementation("eager")
    out = host(input_ids=ids, output_attentions=True)
    expected = pattern_scores(out.attentions[layer], L)
    for name in expected:
        torch.testing.assert_close(scores.host[name], expected[name], rtol=1e-4, atol=1e-5)
    assert scores.lorsa["previous_token"].shape == (lorsa.config.n_ov_heads,)
    assert collect(host, layer, input_ids=ids).hidden_states.shape[1] == 2 * L


def test_the_share_of_a_host_heads_output_its_lorsa_heads_reconstruct():
    """The exact replica's own pieces of a host head rebuild all of its output on the probe; half of them less,
    exactly the share their part of the output has; no heads nothing."""
    host = build_host("llama")
    replica = LorsaModel.from_host(host, 1)
    pieces = replica.config.group_size
    every = {h: list(range(h * pieces, (h + 1) * pieces)) for h in range(replica.config.n_qk_heads)}
    shares = reconstructed_shares(host, replica, list(every.items()), n_sequences=4, length=8)
    torch.testing.assert_close(torch.tensor(shares), torch.ones(len(every)), atol=1e-5, rtol=0)
    assert reconstructed_shares(host, replica, [(0, [])], n_sequences=4, length=8) == [0.0]
    half = [(0, every[0][: pieces // 2])]
    got = reconstructed_shares(host, replica, half, n_sequences=4, length=8)[0]
    # the reference: the head's output and the other half's, on the same probe positions, computed here directly
    ids = probe_inputs(host, replica, None, 4, 8)
    out = replica(collect(host, 1, input_ids=ids).hidden_states, top_k=replica.config.n_ov_heads)
    z = torch.zeros(*ids.shape, replica.config.n_ov_heads).scatter(-1, out.top_k_indices, out.top_k_values)[:, -8:]
    whole = z[..., every[0]] @ replica.w_o[every[0]]
    rest = z[..., every[0][pieces // 2 :]] @ replica.w_o[every[0][pieces // 2 :]]
    assert got == pytest.approx(1 - (rest.pow(2).sum() / whole.pow(2).sum()).item(), abs=1e-5)
    assert 0 < got < 1
