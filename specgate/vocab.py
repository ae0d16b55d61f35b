"""The draft vocabulary: the draft's LM head covers only the tokens the model itself writes most.

The LM head is a fifth of SmolLM2's weights and a draft step reads all of it to pick one token. A
draft whose head covers the ``n`` tokens most frequent in the model's own outputs (frequency-ranked,
as in FR-Spec) reads a few percent of it and loses only the drafts whose token falls outside. The
verifier keeps the full head: greedy output is unchanged, and in sampling the draft's distribution
is zero outside the subset, which speculative sampling corrects exactly.

The ranking (:func:`rank_tokens`) is stored with the gates; :class:`DraftHead` holds the rows of
the LM head for the first ``n`` ranked tokens as one contiguous copy (gathering rows per call costs
more than the full head).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

from .adapters import ModelWeights
from .layers import head
from .ops import linear


def rank_tokens(documents: Iterable[list[int]], vocab_size: int) -> torch.Tensor:
    """All token ids (vocab_size,), most frequent in ``documents`` first; ties and unseen tokens
    in id order (byte-level BPE vocabularies put common pieces at low ids)."""
    counts = Counter(t for doc in documents for t in doc)
    freq = torch.zeros(vocab_size, dtype=torch.float64)
    for t, c in counts.items():
        if 0 <= t < vocab_size:
            freq[t] = c
    return torch.argsort(-freq, stable=True)


def coverage(ranking: torch.Tensor, documents: Iterable[list[int]], sizes: Iterable[int]) -> dict[int, float]:
    """Share of the tokens of ``documents`` inside the first n ranked tokens, per n in ``sizes``."""
    position = torch.empty_like(ranking)
    position[ranking] = torch.arange(len(ranking))
    tokens = torch.tensor([t for doc in documents for t in doc], dtype=torch.long)
    ranks = position[tokens]
    return {n: float((ranks < n).float().mean()) for n in sizes}


class DraftHead:
    """The LM head restricted to ``ids``: logits over the full vocabulary, -inf outside the subset."""

    def __init__(self, weights: ModelWeights, ids: torch.Tensor):
        if ids.dim() != 1 or len(ids) == 0 or len(ids) > weights.lm_head.shape[0]:
            raise ValueError(f"a draft vocabulary is 1 to {weights.lm_head.shape[0]} token ids, got shape {tuple(ids.shape)}")
        self.ids = ids.to(weights.lm_head.device)
        self.weight = weights.lm_head.detach()[self.ids].contiguous()  # (n, d), one stream to read
        self.vocab_size = weights.lm_head.shape[0]
        self.weights = weights

    def __len__(self) -> int:
        return len(self.ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, the subset's rows of the LM head, soft-capping -> (..., V) logits."""
        sub = head(self.weights, h, lambda x: linear(x, self.weight))
        out = sub.new_full((*sub.shape[:-1], self.vocab_size), float("-inf"))
        return out.index_copy_(-1, self.ids, sub)
