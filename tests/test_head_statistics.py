"""A head page's histogram and its most alike heads, on inputs whose answers are known."""

import torch

from hf_lorsa.analysis.head_statistics import (
    HISTOGRAM_BINS,
    ActivationHistogram,
    CoFiring,
    histogram_edges,
    similar_directions,
)


def test_the_histogram_counts_each_activation_in_its_log_bin():
    histogram = ActivationHistogram(3)
    histogram.update(torch.tensor([0, 0, 0, 2]), torch.tensor([1.0, -1.0, 1e-3, 1e9]))
    edges = histogram_edges()
    one = next(i for i in range(HISTOGRAM_BINS) if edges[i] <= 0 < edges[i + 1])
    thousandth = next(i for i in range(HISTOGRAM_BINS) if edges[i] <= -3 < edges[i + 1])
    assert histogram.counts[0, one] == 2 and histogram.counts[0, thousandth] == 1  # |activation|: signs alike
    assert histogram.counts[2, -1] == 1 and histogram.counts.sum() == 4  # beyond the range: the end bin


def test_heads_firing_together_are_found_by_their_jaccard_index():
    cofiring = CoFiring(5, max_positions=3)
    # position 0: heads 0, 1, 2; position 1: heads 0, 1; position 2: head 3; position 3: past the sample
    cofiring.update(torch.tensor([0, 0, 0, 1, 1, 2, 3, 3]), torch.tensor([0, 1, 2, 0, 1, 3, 0, 4]))
    heads, scores = cofiring.similar(k=2)
    assert heads[0] == [1, 2] and scores[0] == [1.0, 0.5]  # 0 and 1 together at both of theirs; 0 and 2 at 1 of 2
    assert heads[2] == [0, 1] and scores[2] == [0.5, 0.5]
    assert heads[3] == [] and heads[4] == []  # alone; and head 4 fired only past the sample


def test_alike_output_directions_by_cosine():
    w_o = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    heads, cosines = similar_directions(w_o, k=2, chunk=3)
    assert heads[0].tolist() == [1, 2] and cosines[0].tolist() == [0.800000011920929, 0.0]
    assert heads[3].tolist()[0] == 2  # cosine 0 beats the opposite directions
