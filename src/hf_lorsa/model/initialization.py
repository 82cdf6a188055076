"""Initialise a Lorsa from its host's attention layer (LORSA.md, "Initialisation from the host layer").

QK head j copies a host head (its key/value group for GQA): host heads share the QK heads evenly (QK head j
copies host head j * H // Hqk, the authors' choice), or, given a weight per host head (in training, the variance
of each head's output on a first batch, `head_output_variance`), in proportion to the weights with at least one
each: a head whose output barely varies needs few directions, and heads given to it would die. The OV heads that
read a host head's pattern start inside that head's OV circuit W_v^h W_o^h = U S V^T:

- replica sizes (every host head gets exactly dh OV heads): the exact rank-1 pieces w_v = S_i U_i,
  w_o = V_i, so that with top_k = Hov the Lorsa reproduces the host layer;
- any other size (the dictionaries people train): every OV head is a random direction of the head's value
  subspace, w_v = U r, with w_o the head's OV map applied to it, normalised (the authors'
  `init_W_V_with_active_subspace_per_head`). All heads start alike: every w_v has norm about 1 and every
  w_o the same norm, so no head (one along a weak singular direction, say) starts out of the competition
  for the top K. The directions of a host head form a tight frame of its subspace.

`calibrate` then uses a batch of activations: it centres every head's pre-activation (the authors'
`init_encoder_bias_with_mean_hidden_pre`, so that each head is above and below its threshold about equally
often) and fits one output scale by least squares at the first step's K (their decoder-norm search).

Axes: N positions, D d_model, H host heads, dh head width, Hqk QK heads, Hov OV heads.
"""

from __future__ import annotations

import torch
from torch import nn

from ..host import families


def ov_pieces(W_v: torch.Tensor, b_v: torch.Tensor, W_o: torch.Tensor):
    """SVD of one host head's OV circuit, computed on dh x D factors (never D x D).

    Returns U (D, dh), S (dh,), V (D, dh) with W_v W_o = U diag(S) V^T, and the value bias read
    through W_o split into its coordinates along V (dh,) and the rest (D,).
    """
    Q, R = torch.linalg.qr(W_v)  # W_v = Q R, Q (D, dh)
    U_r, S, Vh = torch.linalg.svd(R @ W_o, full_matrices=False)  # (dh, dh), (dh,), (dh, D)
    U, V = Q @ U_r, Vh.T
    bias_out = b_v @ W_o  # (D,) what the value bias adds to the output (attention rows sum to 1)
    coords = V.T @ bias_out
    return U, S, V, coords, bias_out - V @ coords


def random_frame(n: int, dh: int, generator: torch.Generator) -> torch.Tensor:
    """n random directions r_i of R^dh (n, dh) with sum_i r_i r_i^T = (n / dh) I when n >= dh (a tight frame: the
    polar factor of a Gaussian matrix, rows of norm about 1); fewer than dh are unit Gaussian directions."""
    r = torch.randn(n, dh, generator=generator)
    if n < dh:
        return r / r.norm(dim=-1, keepdim=True)
    P, _, Qh = torch.linalg.svd(r, full_matrices=False)
    return P @ Qh * (n / dh) ** 0.5


def share_qk_heads(n_qk: int, weights: torch.Tensor | None, n_host: int) -> list[int]:
    """The host head each of `n_qk` QK heads copies, in host order: evenly without `weights`, else in proportion
    to the (n_host,) weights with at least one QK head per host head (largest remainders, when n_qk >= n_host)."""
    if weights is None or n_qk < n_host:
        return [j * n_host // n_qk for j in range(n_qk)]
    ideal = weights.double().clamp_min(0) / weights.double().clamp_min(0).sum().clamp_min(1e-12) * (n_qk - n_host)
    counts = 1 + ideal.floor().long()
    for h in (ideal - ideal.floor()).argsort(descending=True)[: n_qk - int(counts.sum())]:
        counts[h] += 1
    return torch.repeat_interleave(torch.arange(n_host), counts).tolist()


@torch.no_grad()
def initialize_from_host(lorsa: nn.Module, model: nn.Module, layer: int, seed: int = 0,
                         head_weights: torch.Tensor | None = None) -> None:  # fmt: skip
    """Fill `lorsa` (a LorsaModel whose config came from `LorsaConfig.from_host(model, layer, ...)`) with
    pieces of that layer's attention weights. With the replica's sizes (Hov = H * dh, Hqk = H, top_k = Hov)
    it reproduces the layer exactly. `head_weights` (H,) share the QK heads among host heads (`share_qk_heads`)."""
    config = lorsa.config
    host = families.read_attention(model, layer).to(lorsa.w_v.device)  # the host may sit on another device
    generator = torch.Generator().manual_seed(seed)
    H = host.n_heads
    host_of_qk = share_qk_heads(config.n_qk_heads, head_weights, H)
    host_of_ov = torch.tensor(host_of_qk)[torch.arange(config.n_ov_heads) // config.group_size]

    for j, h in enumerate(host_of_qk):
        kv = host.kv_head(h)
        lorsa.W_Q[j], lorsa.b_Q[j] = host.W_q[h], host.b_q[h]
        lorsa.W_K[j], lorsa.b_K[j] = host.W_k[kv], host.b_k[kv]
    if config.qk_norm:
        lorsa.q_norm.weight.copy_(host.q_norm)
        lorsa.k_norm.weight.copy_(host.k_norm)

    b_D = host.b_o.clone()
    heads_of = [(host_of_ov == h).nonzero().flatten().tolist() for h in range(H)]
    replica = all(len(heads) == host.W_v.shape[-1] for heads in heads_of)
    for h, heads in enumerate(heads_of):
        if not heads:
            continue
        U, S, V, coords, rest = ov_pieces(host.W_v[host.kv_head(h)], host.b_v[host.kv_head(h)], host.W_o[h])
        if replica:  # exact pieces, value bias along each piece
            lorsa.w_v[heads] = (U * S).T
            lorsa.w_o[heads] = V.T
            lorsa.b_v[heads] = coords
            b_D += rest
        else:  # random directions of the value subspace; the value bias is a constant output (rows sum to 1)
            r = random_frame(len(heads), S.numel(), generator).to(U.device)
            out = (r * S) @ V.T  # (n, D): the OV map of each w_v = U r
            lorsa.w_v[heads] = r @ U.T
            # heads of norm about S.mean() * dh / n for the even share n = Hov / H: together (top_k = Hov) about
            # the size of the host head when shared evenly; an uneven share leaves each head's size as it was
            size = S.mean() * S.numel() * H / config.n_ov_heads
            lorsa.w_o[heads] = out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12) * size
            lorsa.b_v[heads] = 0.0
            b_D += rest + V @ coords
    lorsa.b_D.copy_(b_D)


@torch.no_grad()
def balance_head_norms(lorsa: nn.Module, ratio: float) -> None:
    """Rescale every OV head so that ||w_v|| = ratio * ||w_o||, the function unchanged (w_o multiplied by what w_v
    and b_v are divided by). Adam moves every coordinate by about the learning rate, so a row turns by about
    lr * sqrt(D) / ||row|| per step: how a head's scale is split between w_v and w_o sets how fast each learns.
    Calibration leaves the split to the host (mean ||w_o|| 0.36 and ||w_v|| 1.2 on stories260K; 9.2 and 0.24 on
    SmolLM2-135M, where the output directions then barely moved); training starts every head at one ratio and
    lets it drift from there (BENCHMARKS.md, "Balanced heads": restoring it after every step gave the same FVU on
    SmolLM2 and a worse one on stories260K)."""
    w_o, w_v = lorsa.w_o.norm(dim=-1), lorsa.w_v.norm(dim=-1)
    scale = (w_v / (ratio * w_o)).sqrt()  # the new ||w_o|| = sqrt(||w_v|| ||w_o|| / ratio) = scale * ||w_o||
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))  # a zero row stays
    lorsa.w_o.mul_(scale[:, None].to(lorsa.w_o.dtype))
    lorsa.w_v.div_(scale[:, None].to(lorsa.w_v.dtype))
    lorsa.b_v.div_(scale.to(lorsa.b_v.dtype))


CALIBRATION_CHUNK = 2048  # positions a calibration pass reads at once (whole windows, at least one)


@torch.no_grad()
def calibrate(lorsa: nn.Module, x: torch.Tensor, y: torch.Tensor, counted: torch.Tensor, top_k: int,
              chunk: int = CALIBRATION_CHUNK) -> dict:  # fmt: skip
    """Centre each OV head's pre-activation over the counted positions of (x, y), then fit one scale of the
    output directions and the output bias by least squares at `top_k` (the first training step's K).
    Returns the FVU before and after, for the log.

    x, y: attention input and output (B, T, D) in raw units; counted: (B, T) positions that are trained on.
    The Lorsa reads `chunk` positions (whole windows) at a time and every fit is made from sums over the chunks
    (float64), so that calibrating at K = Hov on many positions costs no more memory than a train step: an
    (N, Hov) pass over 8,192 positions at once was the run's peak (BENCHMARKS.md, "Memory to plan with").
    """
    rows = max(1, chunk // x.shape[1])
    chunks = [(x[i : i + rows], y[i : i + rows], counted[i : i + rows]) for i in range(0, x.shape[0], rows)]
    targets = [cy[c].double() for _, cy, c in chunks]
    n = sum(len(t) for t in targets)
    target_mean = sum(t.sum(0) for t in targets) / n
    target_spread = sum(float((t - target_mean).pow(2).sum()) for t in targets)

    def reconstructions():  # per chunk, the counted positions of the reconstruction at top_k
        for (cx, _, c), target in zip(chunks, targets):
            yield lorsa(cx, top_k=top_k).reconstruction[c].double(), target

    before = sum(float((out - target).pow(2).sum()) for out, target in reconstructions()) / target_spread
    z_sum = sum(lorsa.pre_activations(cx)[c].double().sum(0) for cx, _, c in chunks)
    lorsa.b_v.sub_((z_sum / n).to(lorsa.b_v.dtype))
    # heads: the reconstruction without b_D, in raw units; the least-squares fit of target ~ scale * heads + bias
    # needs the sums of heads, heads x target and heads^2 only
    base = lorsa.b_D.double() / lorsa.config.output_norm_factor
    heads_sum, cross, square = 0.0, 0.0, 0.0
    for out, target in reconstructions():
        heads = out - base
        heads_sum = heads_sum + heads.sum(0)
        cross += float((heads * target).sum())
        square += float(heads.pow(2).sum())
    heads_mean = heads_sum / n
    cross -= n * float(heads_mean @ target_mean)  # centred sums
    square -= n * float(heads_mean @ heads_mean)
    scale = cross / max(square, 1e-12)
    if scale > 0:
        lorsa.w_o.mul_(scale)
    else:
        scale = 1.0
    bias = target_mean - scale * heads_mean
    lorsa.b_D.copy_((bias * lorsa.config.output_norm_factor).to(lorsa.b_D.dtype))
    # one scale of every w_o leaves the top-k choice as it was: the new reconstruction is scale * heads + bias, whose
    # squared error about the target is scale^2 square - 2 scale cross + target_spread
    after = (scale * scale * square - 2 * scale * cross + target_spread) / target_spread
    return {"fvu_at_init": before, "fvu_calibrated": after}
