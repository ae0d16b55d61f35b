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

import itertools
from collections import Counter
from collections.abc import Iterable

import torch

from .adapters import ModelWeights
from .kernels.cpu_step import low_precision
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


def coverage(
    ranking: torch.Tensor, documents: Iterable[list[int]], sizes: Iterable[int], prompts: Iterable[list[int]] | None = None
) -> dict[int, float]:
    """Share of the tokens of ``documents`` inside the first n ranked tokens, per n in ``sizes``.
    With ``prompts`` (one per document), a token its prompt or its document's earlier tokens hold
    counts as covered too: the vocabulary :meth:`DraftHead.with_context` grows."""
    position = torch.empty_like(ranking)
    position[ranking] = torch.arange(len(ranking))
    tokens, seen = [], []
    for doc, prompt in zip(documents, prompts if prompts is not None else itertools.repeat(None)):
        held = set() if prompt is None else set(prompt)
        for t in doc:
            tokens.append(t)
            seen.append(prompt is not None and t in held)
            held.add(t)
    ranks, seen = position[torch.tensor(tokens, dtype=torch.long)], torch.tensor(seen)
    return {n: float(((ranks < n) | seen).float().mean()) for n in sizes}


class DraftHead:
    """The LM head restricted to ``ids``: logits over the full vocabulary, -inf outside the subset.

    A static frequency ranking misses the words of a text's own topic (on held-out SmolLM2 answers,
    the 8,192 most frequent tokens cover 90.5% of the tokens; with the prompt's and the answer's earlier
    tokens added, 94.4%). :meth:`with_context` gives one ``generate`` call its own copy that also
    covers the prompt's tokens, and :meth:`add` the tokens the call emits."""

    def __init__(self, weights: ModelWeights, ids: torch.Tensor):
        if ids.dim() != 1 or len(ids) == 0 or len(ids) > weights.lm_head.shape[0]:
            raise ValueError(f"a draft vocabulary is 1 to {weights.lm_head.shape[0]} token ids, got shape {tuple(ids.shape)}")
        self.weights = weights
        self.vocab_size = weights.lm_head.shape[0]
        self._ids = ids.to(weights.lm_head.device)
        self._rows = weights.lm_head.detach()[self._ids].contiguous()  # (n, d), one stream to read
        self.size = self.static = len(ids)
        self.inside = torch.zeros(self.vocab_size, dtype=torch.bool, device=self._ids.device)
        self.inside[self._ids] = True
        self._low: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # precision -> the first `static` rows in it
        self._low_added: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}  # ... the rows added, and how many

    @property
    def ids(self) -> torch.Tensor:
        return self._ids[: self.size]

    @property
    def weight(self) -> torch.Tensor:
        return self._rows[: self.size]

    def __len__(self) -> int:
        return self.size

    def with_context(self, tokens: torch.Tensor) -> "DraftHead":
        """A copy of this vocabulary that also covers ``tokens`` (any shape; ids outside the
        vocabulary ignored), with room to :meth:`add` more."""
        copy = object.__new__(DraftHead)
        copy.weights, copy.vocab_size, copy.size, copy.static = self.weights, self.vocab_size, self.size, self.size
        copy.inside = self.inside.clone()
        copy._low, copy._low_added = self._low if self.size == self.static else {}, {}  # shared: made once
        copy._ids, copy._rows = self._ids[: self.size], self._rows[: self.size]
        copy.add(tokens, room=256)
        return copy

    def add(self, tokens: torch.Tensor, room: int = 0) -> None:
        """Cover ``tokens`` too: their rows of the LM head go after the others (the ranking's ties
        keep their order). Storage grows by an eighth, or ``room`` spare rows if more."""
        t = tokens.reshape(-1).to(self.inside.device)
        t = t[(t >= 0) & (t < self.vocab_size)].unique()
        new = t[~self.inside[t]]
        end = self.size + len(new)
        if end + room > len(self._ids):
            grown = end + max(room, len(self._ids) // 8)
            self._ids = torch.cat([self._ids[: self.size], self._ids.new_empty(grown - self.size)])
            self._rows = torch.cat([self._rows[: self.size], self._rows.new_empty(grown - self.size, self._rows.shape[1])])
        self._ids[self.size : end] = new
        self._rows[self.size : end] = self.weights.lm_head.detach()[new]
        self.inside[new] = True
        self.size = end

    def logits(self, h: torch.Tensor, precision: str = "float32") -> torch.Tensor:
        """Final norm, the subset's rows of the LM head, soft-capping -> (..., V) logits. ``precision``:
        the rows' (a draft over a low-precision copy of the weights reads its head's rows in it too:
        a copy made on first use, see :func:`specgate.kernels.cpu_step.low_precision`)."""
        if precision == "float32":
            rows = lambda x: linear(x, self.weight)  # noqa: E731
        else:
            parts = [self._low_rows(precision)]
            if self.size > self.static:
                parts.append(self._added_rows(precision))
            rows = lambda x: torch.cat([_low_linear(x, *part) for part in parts], -1)  # noqa: E731
        sub = head(self.weights, h, rows)
        out = sub.new_full((*sub.shape[:-1], self.vocab_size), float("-inf"))
        return out.index_copy_(-1, self.ids, sub)

    def _low_rows(self, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        if precision not in self._low:
            self._low[precision] = low_precision(self._rows[: self.static], precision)
        return self._low[precision]

    def _added_rows(self, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        n, *rows = self._low_added.get(precision, (0, None, None))
        if n != self.size:  # a few hundred rows at most: quantized anew when they change
            rows = low_precision(self._rows[self.static : self.size], precision)
            self._low_added[precision] = (self.size, *rows)
        return tuple(rows)


def _low_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.ops.specgate.small_linear(x, weight, None, scale if scale.numel() else None)
