"""Collecting generated tokens: end of sequence, token limit, stop strings, streamers and scores.

Plain decoding emits one token per row per step, speculative decoding up to ``k + 1``; both go
through :class:`Emitter`, so a sequence ends exactly where plain decoding would end it.
"""

from __future__ import annotations

import torch


class Emitter:
    def __init__(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        eos_token_ids: tuple[int, ...] = (),
        pad_token_id: int = 0,
        stop=None,
        streamer=None,
        keep_scores: bool = False,
    ):
        """prompt: (B, P). stop: a ``transformers`` StopStringCriteria, called on prompt + new."""
        self.prompt = prompt
        self.max_new = max_new_tokens
        self.eos = set(eos_token_ids)
        self.pad = pad_token_id
        self.stop = stop
        self.streamer = streamer
        self.tokens: list[list[int]] = [[] for _ in range(prompt.shape[0])]
        self.scores: list[list[torch.Tensor]] | None = [[] for _ in self.tokens] if keep_scores else None
        self.finished = [max_new_tokens == 0] * len(self.tokens)
        if streamer is not None:
            streamer.put(prompt.cpu())  # as transformers does: streamers skip it with skip_prompt=True

    @property
    def done(self) -> bool:
        return all(self.finished)

    def emit(self, row: int, tokens: list[int], scores: torch.Tensor | None = None) -> int:
        """Append tokens to a row until it ends; returns how many were taken. scores: (n, V)."""
        taken = 0
        for j, token in enumerate(tokens):
            if self.finished[row]:
                break
            self.tokens[row].append(token)
            if self.scores is not None and scores is not None:
                self.scores[row].append(scores[j])
            taken += 1
            self.finished[row] = token in self.eos or len(self.tokens[row]) >= self.max_new or self._stopped(row)
        if self.streamer is not None and taken:
            self.streamer.put(torch.tensor(tokens[:taken]))
        return taken

    def _stopped(self, row: int) -> bool:
        if self.stop is None:
            return False
        ids = torch.cat([self.prompt[row], torch.tensor(self.tokens[row], device=self.prompt.device)])
        return bool(self.stop(ids[None], None)[0])

    def sequences(self) -> torch.Tensor:
        """(B, P + longest) prompt and new tokens; rows that ended early are padded."""
        n = max(map(len, self.tokens))
        new = torch.full((len(self.tokens), n), self.pad, dtype=torch.long)
        for b, row in enumerate(self.tokens):
            new[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        return torch.cat([self.prompt, new.to(self.prompt.device)], dim=1)

    def step_scores(self) -> tuple[torch.Tensor, ...] | None:
        """Per step (B, V), like ``transformers``; -inf after a row has ended."""
        if self.scores is None:
            return None
        n = max(map(len, self.tokens))
        ref = next(s[0] for s in self.scores if s) if any(self.scores) else None
        if ref is None:
            return ()
        filler = torch.full_like(ref, float("-inf"))
        return tuple(torch.stack([row[t] if t < len(row) else filler for row in self.scores]) for t in range(n))

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.end()
