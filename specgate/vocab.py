"""The draft vocabulary: the draft's LM head covers only the tokens the model itself writes most.

The LM head is a fifth of SmolLM2's weights and a draft step reads all of it to pick one token. A
draft whose head covers the ``n`` tokens most frequent in the model's own outputs (frequency-ranked,
as in FR-Spec) reads a few percent of it and loses only the drafts whose token falls outside. The
verifier keeps the full head: greedy output is unchanged, and in sampling the draft's distribution
is zero outside the subset, which speculative sampling corrects exactly.

The ranking (:func:`rank_tokens`) is stored with the gates; a model without gates may have one shipped
(:func:`shipped_ranking`, made by ``eval/draft_vocab.py --gates none``). :class:`DraftHead` holds the rows of
the LM head for the first ``n`` ranked tokens as one contiguous copy (gathering rows per call costs
more than the full head).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .adapters import ModelWeights
from .gates import RANKING_KEY
from .kernels.cpu_step import low_precision, low_precision_linear
from .kernels.screened_head import ScreenedHead
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


RANKINGS = Path(__file__).parent / "rankings"  # shipped rankings for models without gates, NAME.safetensors


def save_ranking(ranking: torch.Tensor, path: str | Path, keep: int = 32768) -> Path:
    """Write the first ``keep`` ranked token ids (int32; a draft vocabulary is smaller) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(save({RANKING_KEY: ranking[:keep].to(torch.int32).contiguous()}))
    return path


def load_ranking(path: str | Path, vocab_size: int) -> torch.Tensor:
    """A ranking written by :func:`save_ranking`, checked against the model's vocabulary."""
    path = Path(path)
    try:
        ranking = load_file(str(path))[RANKING_KEY].long()
    except (FileNotFoundError, SafetensorError, KeyError) as e:
        raise ValueError(f"{path} is not a token ranking (write one with eval/draft_vocab.py --gates none): {e}") from e
    if ranking.dim() != 1 or len(ranking) == 0 or len(ranking.unique()) != len(ranking) or not 0 <= int(ranking.min()) <= int(ranking.max()) < vocab_size:
        raise ValueError(f"{path} is not a ranking of distinct token ids below {vocab_size}: it was made for another tokenizer")
    return ranking


def shipped_ranking(name: str, vocab_size: int) -> torch.Tensor | None:
    """The ranking shipped for the model alias ``name`` (``specgate/rankings/``), if any."""
    path = RANKINGS / f"{name}.safetensors"
    return load_ranking(path, vocab_size) if name and "/" not in name and path.is_file() else None


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
    tokens added, 94.4%). :meth:`with_context` gives one ``generate`` call its own vocabulary that
    also covers the prompt's tokens, and :meth:`add` the tokens the call emits: their rows are kept
    apart from the ranked ones, which every call shares (never copied, each precision made once)."""

    def __init__(self, weights: ModelWeights, ids: torch.Tensor):
        if ids.dim() != 1 or len(ids) == 0 or len(ids) > weights.lm_head.shape[0]:
            raise ValueError(f"a draft vocabulary is 1 to {weights.lm_head.shape[0]} token ids, got shape {tuple(ids.shape)}")
        self.weights = weights
        self.vocab_size = weights.lm_head.shape[0]
        self.ranked = ids.to(weights.lm_head.device)
        self.inside = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.ranked.device)
        self.inside[self.ranked] = True
        self.added = self.ranked[:0]  # the text's own tokens, outside the ranked ones
        # precision -> the ranked rows in it (shared by the calls' copies), the added rows in it
        self._low = {"float32": (weights.lm_head.detach()[self.ranked].contiguous(), torch.empty(0))}  # one stream
        self._low_added: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def ids(self) -> torch.Tensor:
        return torch.cat([self.ranked, self.added]) if len(self.added) else self.ranked

    @property
    def weight(self) -> torch.Tensor:
        """All rows in float32, one contiguous matrix (the Triton path's fused draft head; joined
        once per change of the added tokens)."""
        ranked, _ = self._low["float32"]
        if not len(self.added):
            return ranked
        if "joined" not in self._low_added:
            self._low_added["joined"] = (torch.cat([ranked, self._rows("float32")[0]]), torch.empty(0))
        return self._low_added["joined"][0]

    def __len__(self) -> int:
        return len(self.ranked) + len(self.added)

    def with_context(self, tokens: torch.Tensor) -> "DraftHead":
        """A vocabulary for one call: this one's ranked rows (shared) and ``tokens`` (any shape;
        ids outside the vocabulary ignored)."""
        copy = object.__new__(DraftHead)
        copy.__dict__ |= self.__dict__
        copy.inside, copy._low_added = self.inside.clone(), {}
        copy.add(tokens)
        return copy

    def add(self, tokens: torch.Tensor) -> None:
        """Cover ``tokens`` too (after the ranked tokens: ties keep their order)."""
        t = tokens.reshape(-1).to(self.inside.device)
        t = t[(t >= 0) & (t < self.vocab_size)].unique()
        new = t[~self.inside[t]]
        if len(new):
            self.added = torch.cat([self.added, new])
            self.inside[new] = True
            self._low_added = {}

    def logits(self, h: torch.Tensor, precision: str = "float32", screened: bool = False) -> torch.Tensor:
        """Final norm, the subset's rows of the LM head, soft-capping -> (..., V) logits. ``precision``:
        the rows' (a draft over a low-precision copy of the weights reads its head's rows in it too:
        a copy made on first use, see :func:`specgate.kernels.cpu_step.low_precision`). ``screened``
        (greedy drafts, CPU kernels): whatever ``precision``, each row's argmax is the float32 rows'
        and the logits that could not be the maximum are the int8 rows' (:mod:`specgate.kernels.screened_head`):
        at about the int8 rows' cost, a draft's token is its float32 head's (an int8 head alone had an
        int4 draft's tokens accepted 0.889 of the time on SmolLM2, its float32 head 0.942)."""
        if screened:
            ranked = self._screened()
            parts = [ranked] + ([lambda x: linear(x, self._rows("float32")[0])] if len(self.added) else [])
        else:
            if precision not in self._low:
                self._low[precision] = low_precision(self._low["float32"][0], precision)
            product = (lambda x, w, _: linear(x, w)) if precision == "float32" else low_precision_linear
            parts = [lambda x, part=part: product(x, *part) for part in [self._low[precision]] + ([self._rows(precision)] if len(self.added) else [])]
        sub = head(self.weights, h, lambda x: torch.cat([part(x) for part in parts], -1))
        out = sub.new_full((*sub.shape[:-1], self.vocab_size), float("-inf"))
        return out.index_copy_(-1, self.ids, sub)

    def _screened(self) -> ScreenedHead:
        """The ranked rows' screened product (made once, sharing their int8 copy; the added rows, a few
        hundred at most, are multiplied in float32)."""
        if "screened" not in self._low:
            screened = ScreenedHead(self._low["float32"][0], int8=self._low.get("int8"))
            self._low["int8"] = screened.int8
            self._low["screened"] = screened
        return self._low["screened"]

    def _rows(self, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The added tokens' rows in ``precision`` (a few hundred at most: made anew when they change)."""
        if precision not in self._low_added:
            self._low_added[precision] = low_precision(self.weights.lm_head.detach()[self.added], precision)
        return self._low_added[precision]
