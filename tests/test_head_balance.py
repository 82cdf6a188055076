"""Each BatchTopK head's own threshold (`hf_lorsa.training.head_balance`): lowered while rare, raised while dense."""

import math

import torch
from safetensors.torch import load_file, save_file

from hf_lorsa import LorsaConfig, LorsaModel
from hf_lorsa.training.head_balance import (
    BOUND_MARGIN,
    LOG_RANGE,
    STEP,
    balance_thresholds,
    default_rare_tokens,
    dense_bound,
    follow_bound,
)


def batch_lorsa() -> LorsaModel:
    torch.manual_seed(0)
    config = LorsaConfig(d_model=16, n_qk_heads=4, d_qk_head=4, n_ov_heads=64, top_k=4, topk_rule="relu",
                         act_fn="batchtopk")  # fmt: skip
    return LorsaModel(config)


def test_rare_heads_are_lowered_dense_ones_raised_and_the_rest_move_back_towards_one():
    # heads: rare / dense / fired, below 1 / fired, above 1 / fired, at 1 / silent, not yet rare / rare at the floor
    scale = torch.tensor([1.0, 1.0, 0.5, 2.0, 1.0, 0.7, math.exp(LOG_RANGE[0])])
    fired = torch.tensor([0, 60, 3, 10, 5, 0, 0])
    since = torch.tensor([5000, 0, 0, 0, 0, 900, 5000])
    balance_thresholds(scale, fired, torch.tensor(100), since, rare_tokens=1000, max_frequency=0.45)
    expected = [
        math.exp(-STEP), math.exp(STEP), 0.5 * math.exp(STEP), 2.0 * math.exp(-STEP), 1.0, 0.7 * math.exp(STEP),
        math.exp(LOG_RANGE[0]),
    ]  # fmt: skip
    torch.testing.assert_close(scale, torch.tensor(expected))
    small = torch.tensor([math.exp(-STEP / 2), math.exp(STEP / 2)])  # moving back stops at 1, not past it
    balance_thresholds(small, torch.tensor([1, 1]), torch.tensor(100), torch.zeros(2), 1000, 0.45)
    torch.testing.assert_close(small, torch.ones(2))


def test_the_rare_window_is_five_average_intervals_and_at_least_one_step():
    assert default_rare_tokens(512, 16, 1024) == 1024  # stories260K: 160 tokens, less than a step
    assert default_rare_tokens(2304, 32, 1024) == 1024  # SmolLM2-135M layer 3, expansion 4, K 32: 360
    assert default_rare_tokens(4608, 16, 1024) == 1440  # layer 15, expansion 8, K 16
    assert default_rare_tokens(32768, 128, 4096) == 4096  # Llama-3-8B size, 4 x 1024 tokens a step


def test_each_head_passes_its_own_threshold_at_inference():
    lorsa = batch_lorsa().train()
    lorsa(torch.randn(2, 20, 16))  # learns the threshold
    with torch.no_grad():
        lorsa.threshold_scale.copy_(torch.rand(64) * 2)
    lorsa.eval()
    x = torch.randn(3, 20, 16)
    z = lorsa.pre_activations(x).detach()
    scores = z.relu() * lorsa.w_o.detach().norm(dim=-1)
    out = lorsa(x)
    active = torch.zeros(3, 20, 64).scatter(-1, out.top_k_indices, out.top_k_values.detach())
    # reference: the 4K best of score / scale at each position, of those the ones at or above threshold x scale
    adjusted = scores / lorsa.threshold_scale
    kept = adjusted >= adjusted.topk(16, dim=-1).values[..., -1:]
    expected = torch.where(kept & (scores >= lorsa.threshold * lorsa.threshold_scale), z.relu(), 0.0)
    torch.testing.assert_close(active, expected)
    assert 0 < (active != 0).sum() < 3 * 20 * 16


def test_the_scales_are_saved_kept_by_folding_and_default_to_one_for_older_files(tmp_path):
    lorsa = batch_lorsa().train()
    lorsa.set_norm_factors(2.0, 3.0)
    lorsa(torch.randn(2, 20, 16))
    with torch.no_grad():
        lorsa.threshold_scale.copy_(torch.rand(64) + 0.5)
    scales = lorsa.threshold_scale.clone()
    lorsa.eval()
    x = torch.randn(2, 20, 16)
    before = lorsa(x).reconstruction
    lorsa.fold_norm_factors()
    lorsa.normalize_decoder()
    torch.testing.assert_close(lorsa.threshold_scale, scales)  # no units: folding leaves them
    lorsa.save_pretrained(tmp_path / "new")
    loaded = LorsaModel.from_pretrained(tmp_path / "new")
    torch.testing.assert_close(loaded.threshold_scale, scales)
    torch.testing.assert_close(loaded(x).reconstruction, before, atol=1e-5, rtol=1e-5)
    # a BatchTopK Lorsa saved before heads had their own thresholds: every head at the shared one
    lorsa.save_pretrained(tmp_path / "old")
    weights = load_file(tmp_path / "old" / "model.safetensors")
    del weights["threshold_scale"]
    save_file(weights, tmp_path / "old" / "model.safetensors", {"format": "pt"})
    old = LorsaModel.from_pretrained(tmp_path / "old")
    torch.testing.assert_close(old.threshold_scale, torch.ones(64))
    torch.testing.assert_close(old.threshold, lorsa.threshold)


def test_a_silent_head_is_lowered_no_further_than_a_tenth_and_a_revived_head_takes_the_shared_threshold():
    """The mechanism that took SmolLM2's layer 18 apart: a head silent for long had its threshold lowered to 1e-4;
    revival then raised its value bias to reach the shared bar, so it passed its own bar by 10,000 times and fired
    on nearly every position, crowding out the other heads (BENCHMARKS.md, "The recipe at every depth")."""
    from hf_lorsa.training.trainer import LorsaTrainer

    scale = torch.ones(3)
    for _ in range(1000):  # silent all along
        balance_thresholds(scale, torch.zeros(3), torch.tensor(100), torch.full((3,), 10**6), 1000, 0.45)
    torch.testing.assert_close(scale, torch.full((3,), 0.1))

    lorsa = batch_lorsa().train()
    x = torch.randn(8, 16, 16)
    z = lorsa.pre_activations(x)
    head = int(z.amax(dim=(0, 1)).argmin())  # the head furthest from firing: make it dead, its threshold lowered
    with torch.no_grad():
        lorsa.b_v[head] -= z[..., head].max() + 1
        lorsa.threshold_scale[head] = 0.1
    dead = torch.zeros(64, dtype=torch.bool)
    dead[head] = True

    class Run:  # what LorsaTrainer.apply_revival reads of the trainer
        _pending_revival = {0: LorsaTrainer.revival(None, lorsa, lorsa.pre_activations(x).flatten(0, 1), 4, dead)}
        tokens_since_fired = {0: torch.zeros(64, dtype=torch.long)}

        def lorsas(self):
            return {0: lorsa}

        def _record(self, name, value):
            pass

        def metric_name(self, layer, name):
            return name

    LorsaTrainer.apply_revival(Run())
    assert lorsa.threshold_scale[head] == 1 and (lorsa.threshold_scale == 1).all()
    out = lorsa(x, top_k=4)  # BatchTopK over the batch, as in training
    fired = ((out.top_k_indices == head) & (out.top_k_values != 0)).any(-1).float().mean()
    assert 0 < fired < 0.1  # about an average head's K / n_ov = 6% (at its lowered threshold: 77% of positions)


def near_constant_scores(windows: int, seed: int, window: int = 256) -> torch.Tensor:
    """(windows x window, 4) scores, in units of the shared threshold: head 0 reads only the attention sink, above
    the threshold (within 3% of 1.02, the same at every position of a window); head 1 too, but at 0.3 of it (the
    heads at SmolLM2-135M layer 18 that lowering made fire); head 2 an ordinary sparse head; head 3 silent until
    step 150, then reading the sink at 0.6 (a revived head)."""
    g = torch.Generator().manual_seed(seed)
    sink = (1.0 + 0.03 * torch.rand(windows, generator=g)).repeat_interleave(window)
    sparse = torch.rand(windows * window, generator=g).pow(8) * 3
    revived = 0.6 * sink if seed >= 150 else torch.zeros_like(sink)  # silent, then revived reading the sink
    return torch.stack((sink, 0.3 * sink, sparse, revived), dim=-1)


def trained_scales(bounded: bool, steps: int) -> torch.Tensor:
    """Each step a batch of 4 windows, balanced as the trainer does (silence counted, rare after one step)."""
    scale, since, bound = torch.ones(4), torch.zeros(4), None
    for step in range(steps):
        scores = near_constant_scores(4, step)
        fired = (scores >= scale).sum(0)
        since = torch.where(fired > 0, 0, since + 1024)
        if step == 150:
            scale[3] = 1.0  # revival gives it the shared threshold
        if bounded:
            bound = follow_bound(bound, dense_bound(scores, 0.45))  # the threshold is 1
        balance_thresholds(scale, fired, torch.tensor(1024), since, 1024, 0.45, bound)
    return scale


def test_a_head_whose_score_hardly_varies_is_held_at_its_dense_bound_instead_of_flipping():
    """Steps of 5% flip a head whose score varies by 3% between every position and none, whether it was raised
    (above the threshold) or lowered (below it); the dense bound keeps it to the windows where it is highest."""
    held_out = near_constant_scores(400, 10**6)
    for steps in (200, 201, 202, 203):  # whichever step training ends on
        frequency = (held_out >= trained_scales(True, steps)).float().mean(0)
        assert (frequency[[0, 1, 3]] < 0.5).all() and frequency[0] > 0.05, frequency  # a lowered one may end silent
        assert frequency[2] == (held_out[:, 2] >= 1).float().mean()  # the ordinary head keeps the shared threshold
    unbounded = torch.stack([(held_out >= trained_scales(False, steps)).float().mean(0) for steps in (200, 201)])
    assert unbounded[:, :2].max() > 0.85  # unbounded: nearly every position on some step


def test_the_dense_bound_is_the_scale_at_which_a_head_fires_on_its_share_of_positions():
    scores = torch.arange(1, 1001, dtype=torch.float)[:, None].repeat(1, 3) * torch.tensor([1.0, 2.0, 0.0])
    bound = dense_bound(scores, 0.5).exp()  # 40% of 1,000 positions: scores above 600
    torch.testing.assert_close(bound[:2], torch.tensor([600.0, 1200.0]) * (1 + BOUND_MARGIN))
    assert ((scores[:, 0] >= bound[0]).float().mean()) == 0.4
    assert bound[2] < 1e-6  # a head that never scores is not raised by it
