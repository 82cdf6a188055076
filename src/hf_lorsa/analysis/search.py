"""Finding heads by the token they promote: every head ranked by how much its output direction raises that token's
logit (through the final norm and the unembedding), above the head's mean logit over the vocabulary (softmax
ignores that mean, so heads compare). A search reads the weights only: every head is ranked, not only those whose
few top tokens the analysis table lists.
"""

from __future__ import annotations

import pandas as pd
import torch

from ..host import families


def vocabulary_texts(tokenizer) -> list[str]:
    """Each token of the vocabulary as it reads alone, without case or surrounding spaces: what a search matches."""
    decoded = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [text.strip().lower() for text in decoded]


def matching_tokens(texts: list[str], text: str) -> list[int]:
    """The token ids whose text (`vocabulary_texts`) is `text`, whole, ignoring case and spaces: "the" finds "the",
    " the" and "The", not "there"."""
    needle = text.strip().lower()
    return [i for i, t in enumerate(texts) if t == needle] if needle else []


@torch.no_grad()
def token_logits(model, lorsa, tokens: list[int]) -> torch.Tensor:
    """(Hov,) for each head, the largest centred direct logit among `tokens` (the forms of one word)."""
    return families.direct_logits(model, lorsa.w_o, tokens, centred=True).amax(dim=-1).cpu()


def heads_promoting(model, lorsa, tokenizer, text: str, texts: list[str] | None = None) -> pd.DataFrame:
    """Every head that raises the token `text` (in any of its forms: case, leading space), best first: columns head,
    logit (centred, the largest over the forms). `texts`: the tokenizer's `vocabulary_texts`, when already read.
    Raises ValueError when no token of the vocabulary reads `text`."""
    tokens = matching_tokens(texts if texts is not None else vocabulary_texts(tokenizer), text)
    if not tokens:
        raise ValueError(f"No token of this model's vocabulary reads {text.strip()!r}; search for one whole token.")
    logits = token_logits(model, lorsa, tokens)
    order = logits.argsort(descending=True, stable=True)
    order = order[logits[order] > 0]
    return pd.DataFrame({"head": order.tolist(), "logit": logits[order].tolist()})
