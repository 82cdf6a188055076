"""What a head page shows beside its contexts, gathered in the analysis' first pass in bounded memory: each head's
activation histogram, and the heads most like it, by output direction and by firing together.

Axes: E firing events, Hov OV heads, P sampled positions.
"""

from __future__ import annotations

import torch

HISTOGRAM_LOG10 = (-4.0, 4.0)  # the histogram's range of log10 |activation|; values outside fall in the end bins
HISTOGRAM_BINS = 80
COFIRING_POSITIONS = 20_000  # positions whose active heads are counted in pairs (the first ones analysed)
N_SIMILAR = 5


def histogram_edges() -> list[float]:
    """The log10 |activation| edges of the histogram's bins (HISTOGRAM_BINS + 1)."""
    return torch.linspace(*HISTOGRAM_LOG10, HISTOGRAM_BINS + 1).tolist()


class ActivationHistogram:
    """Per head, how many of its activations fall in each bin of log10 |activation| (Hov, HISTOGRAM_BINS)."""

    def __init__(self, n_heads: int):
        self.counts = torch.zeros(n_heads, HISTOGRAM_BINS, dtype=torch.long)

    def update(self, heads: torch.Tensor, values: torch.Tensor) -> None:
        lo, hi = HISTOGRAM_LOG10
        position = (values.abs().float().clamp_min(1e-30).log10() - lo) / (hi - lo) * HISTOGRAM_BINS
        bins = position.floor().long().clamp(0, HISTOGRAM_BINS - 1)
        flat = heads.cpu() * HISTOGRAM_BINS + bins.cpu()
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat))


class CoFiring:
    """Which heads fire at the same positions, counted over the first COFIRING_POSITIONS positions analysed: each
    position adds its active heads' pairs (kept as pair ids, counted once at the end)."""

    PAIRS_PER_CHUNK = 4_000_000  # positions x width^2 handled at once

    def __init__(self, n_heads: int, max_positions: int = COFIRING_POSITIONS):
        self.n_heads, self.left = n_heads, max_positions
        self.keys: list[torch.Tensor] = []
        self.fires = torch.zeros(n_heads, dtype=torch.long)

    def update(self, position: torch.Tensor, heads: torch.Tensor) -> None:
        """`position` (E,) a position id of each firing event (unique across the analysis), `heads` (E,) its head."""
        if self.left <= 0 or len(position) == 0:
            return
        position, heads = position.cpu(), heads.cpu()
        kept = torch.unique(position)[: self.left]
        self.left -= len(kept)
        inside = torch.isin(position, kept)
        position, heads = position[inside], heads[inside]
        self.fires += torch.bincount(heads, minlength=self.n_heads)
        _, row, counts = torch.unique(position, return_inverse=True, return_counts=True)
        order = row.argsort(stable=True)
        row, heads = row[order], heads[order]
        rank = torch.arange(len(row)) - (torch.cumsum(counts, 0) - counts)[row]
        table = torch.full((len(counts), int(counts.max())), -1, dtype=torch.long)
        table[row, rank] = heads  # (P, width): each position's active heads, -1 after them
        step = max(1, self.PAIRS_PER_CHUNK // table.shape[1] ** 2)
        for part in table.split(step):
            a, b = part[:, :, None], part[:, None, :]
            self.keys.append((a * self.n_heads + b)[(a >= 0) & (a < b)])

    def similar(self, k: int = N_SIMILAR) -> tuple[list[list[int]], list[list[float]]]:
        """Per head, the k heads with the largest Jaccard index of firing positions (both / either), and that index."""
        if not self.keys:
            return [[] for _ in range(self.n_heads)], [[] for _ in range(self.n_heads)]
        keys, both = torch.unique(torch.cat(self.keys), return_counts=True)
        a, b = keys // self.n_heads, keys % self.n_heads
        jaccard = both / (self.fires[a] + self.fires[b] - both)
        head, partner, score = torch.cat([a, b]), torch.cat([b, a]), torch.cat([jaccard, jaccard])
        order = score.argsort(descending=True, stable=True)
        order = order[head[order].argsort(stable=True)]  # grouped by head, best first
        counts = torch.bincount(head, minlength=self.n_heads)
        rank = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
        keep = order[rank < k]
        heads, scores = [[] for _ in range(self.n_heads)], [[] for _ in range(self.n_heads)]
        for h, p, s in zip(head[keep].tolist(), partner[keep].tolist(), score[keep].tolist()):
            heads[h].append(p)
            scores[h].append(round(s, 4))
        return heads, scores


@torch.no_grad()
def similar_directions(w_o: torch.Tensor, k: int = N_SIMILAR, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the k other heads whose output directions have the largest cosine with its own: (Hov, k) heads and
    cosines, computed a block of rows at a time."""
    unit = torch.nn.functional.normalize(w_o.float(), dim=-1)
    k = min(k, unit.shape[0] - 1)
    heads, cosines = [], []
    for start in range(0, unit.shape[0], chunk):
        block = unit[start : start + chunk] @ unit.T  # (chunk, Hov)
        block[torch.arange(block.shape[0]), torch.arange(start, start + block.shape[0])] = -2.0  # not itself
        best = block.topk(k, dim=-1)
        heads.append(best.indices.cpu())
        cosines.append(best.values.cpu())
    return torch.cat(heads), torch.cat(cosines)
