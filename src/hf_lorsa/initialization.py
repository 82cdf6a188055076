"""Initialise a Lorsa from its host's attention layer (LORSA.md, "Initialisation from the host layer").

QK head j copies host head j * H // Hqk (its key/value group for GQA). The OV heads of a group become
rank-1 pieces of their host head's OV circuit W_v^h W_o^h = U S V^T: w_v = S_i U_i, w_o = V_i, so that
with Hov = H * dh and top_k = Hov the Lorsa reproduces the host layer. Heads beyond a host head's dh
pieces start as small random directions inside that head's subspace.

Axes: D d_model, H host heads, dh head width, Hqk QK heads, Hov OV heads.
"""

from __future__ import annotations

import torch
from torch import nn

from . import hosts

EXTRA_HEAD_SCALE = 0.1  # extra heads start at this fraction of their host head's mean singular value


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


@torch.no_grad()
def initialize_from_host(lorsa: nn.Module, model: nn.Module, layer: int, seed: int = 0) -> None:
    """Fill `lorsa` (a LorsaModel whose config came from `LorsaConfig.from_host(model, layer, ...)`) with
    pieces of that layer's attention weights. With the replica's sizes (Hov = H * dh, Hqk = H, top_k = Hov)
    it reproduces the layer exactly."""
    config = lorsa.config
    host = hosts.read_attention(model, layer)
    generator = torch.Generator().manual_seed(seed)
    H, G = host.n_heads, config.group_size
    host_of_qk = [j * H // config.n_qk_heads for j in range(config.n_qk_heads)]
    host_of_ov = torch.tensor(host_of_qk)[torch.arange(config.n_ov_heads) // G]

    for j, h in enumerate(host_of_qk):
        kv = host.kv_head(h)
        lorsa.W_Q[j], lorsa.b_Q[j] = host.W_q[h], host.b_q[h]
        lorsa.W_K[j], lorsa.b_K[j] = host.W_k[kv], host.b_k[kv]
    if config.qk_norm:
        lorsa.q_norm.weight.copy_(host.q_norm)
        lorsa.k_norm.weight.copy_(host.k_norm)

    b_D = host.b_o.clone()
    for h in range(H):
        heads = (host_of_ov == h).nonzero().flatten().tolist()
        if not heads:
            continue
        U, S, V, coords, rest = ov_pieces(host.W_v[host.kv_head(h)], host.b_v[host.kv_head(h)], host.W_o[h])
        b_D += rest
        exact, extra = heads[: S.numel()], heads[S.numel() :]
        n = len(exact)
        lorsa.w_v[exact] = (U[:, :n] * S[:n]).T
        lorsa.w_o[exact] = V[:, :n].T
        lorsa.b_v[exact] = coords[:n]
        b_D += V[:, n:] @ coords[n:]  # pieces without a head keep their bias contribution
        if extra:
            mix_v = torch.randn(S.numel(), len(extra), generator=generator) / S.numel() ** 0.5
            mix_o = torch.randn(S.numel(), len(extra), generator=generator)
            w_o = (V @ mix_o).T
            lorsa.w_v[extra] = (U @ mix_v).T * S.mean() * EXTRA_HEAD_SCALE
            lorsa.w_o[extra] = w_o / w_o.norm(dim=-1, keepdim=True)
            lorsa.b_v[extra] = 0.0
    lorsa.b_D.copy_(b_D)
