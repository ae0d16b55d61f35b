"""The screened LM head: greedy decisions as exact as the float32 head's, from about a quarter of its bytes.

A decode step reads the whole LM head to pick one token: 21% of SmolLM2-135M's weights, 63% of Gemma 3
270M's (a 262k-token vocabulary). Greedy decoding needs only each row's argmax. An int8 copy of the
head (one scale per output row, as a low-precision draft's) gives every logit y_r to within a bound
b_r that is known before looking (Cauchy-Schwarz):

    |x . w_r - y_r| <= |w_r - w~_r| |x| + |w~_r| |x - x~| + float rounding

with w~_r the dequantized row and x~ the token row as the int8 product rounds it (on CPUs with
AVX-512 VNNI, a scale per 4 inputs; elsewhere x itself). Only a row r with y_r + b_r >= max_s (y_s - b_s)
can be the maximum; those few (a median of 7 of 49,152 for SmolLM2, 13 of 262,144 for Gemma 3, on
MT-Bench answers: eval/screened_head.py) are recomputed from the float32 weights. The argmax of the
result is the float32 head's, ties within float rounding aside (as between any two float32 kernels).
Sampling with top-k reads only each row's k largest logits: with ``rank=k`` the level is the k-th
largest y_s - b_s, and the k largest of the result are exactly the float32 head's (so are their
values). The other entries are only within their bound of the float32 logits: callers that need the
whole distribution (sampling without top-k, ``output_scores`` / ``output_logits``) use the float32
head (``Engine.forward(exact_logits=True)``).

:class:`ScreenedHead` holds the copy and the per-row terms of the bound; the C++ op is
``torch.ops.specgate.screened_linear`` (``cpu_linear.cpp``); :meth:`ScreenedHead.reference` is the
same computation in PyTorch, the tests' oracle.
"""

from __future__ import annotations

import torch

from .cpu_step import low_precision, rounded_activations, int8_activations

MARGIN = 1.01  # on the bound's terms: their own float rounding


class ScreenedHead:
    """The screened product with ``weight`` (V, d) float32 (shared, not copied), and its int8 copy
    (+25% of the head's bytes; :attr:`int8` = (codes, row scales), which a low-precision draft may share).
    ``max_exact``: the most rows per token recomputed in float32 before the whole row is (default V / 32).
    A draft vocabulary's head (:class:`specgate.vocab.DraftHead`) screens its rows the same way."""

    def __init__(self, weight: torch.Tensor, max_exact: int | None = None, int8: tuple[torch.Tensor, torch.Tensor] | None = None):
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"the screened head reads a float32 CPU weight, not {weight.dtype} on {weight.device}")
        self.weight = weight.detach().contiguous()
        V, d = self.weight.shape
        self.int8 = low_precision(self.weight, "int8") if int8 is None else int8  # int8: this weight's copy, if made
        q, scale = self.int8
        err, norm = torch.empty(V), torch.empty(V)
        rounding = d * 2.0**-23  # float32 sums of d products, in the int8 product and in the recomputed one
        for r in range(0, V, 8192):  # in chunks: no float32 copy of a 671 MB head at once
            w = self.weight[r : r + 8192]
            approx = q[r : r + 8192].float() * scale[r : r + 8192, None]
            err[r : r + 8192] = ((w - approx).norm(dim=1) + rounding * w.norm(dim=1)) * MARGIN
            norm[r : r + 8192] = approx.norm(dim=1) * MARGIN
        self.err, self.norm = err, norm
        self.max_exact = max(64, V // 32) if max_exact is None else max_exact
        # The largest rank worth screening: a row with more than max_exact candidates takes the float32
        # head after the int8 pass, and at rank k about 12 k rows are candidates on SmolLM2 (9% of its
        # sampled rows past max_exact at k = 50, 29% at 100, 90% at 200).
        self.max_rank = self.max_exact // 16

    def __call__(self, x: torch.Tensor, rank: int = 1) -> torch.Tensor:
        """x (..., d) -> logits (..., V): exact where they could be among the ``rank`` largest of their row."""
        q, scale = self.int8
        return torch.ops.specgate.screened_linear(x, self.weight, q, scale, self.err, self.norm, self.max_exact, rank)

    def bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 product's logits of x (..., d) and their bounds (..., V), as the op computes them."""
        q, scale = self.int8
        x = x.float()
        bound = self.err * x.norm(dim=-1, keepdim=True)
        if int8_activations() and x.shape[-1] % 64 == 0:  # the product rounds x to int8, a step per 4 inputs
            top = x.reshape(*x.shape[:-1], -1, 4).abs().amax(-1)
            bound = bound + self.norm * (top.square().sum(-1, keepdim=True).sqrt() / 127)
            x = rounded_activations(x)
        return x @ (q.float() * scale[:, None]).T, bound

    def reference(self, x: torch.Tensor, rank: int = 1) -> torch.Tensor:
        """:meth:`__call__` in PyTorch: the int8 logits, with the candidate rows' exact."""
        approx, bound = self.bounds(x)
        low = (approx - bound).topk(min(rank, approx.shape[-1]), dim=-1).values[..., -1:]
        candidate = approx + bound >= low
        exact = x.float() @ self.weight.T
        many = candidate.sum(-1, keepdim=True) > self.max_exact
        return torch.where(candidate | many, exact, approx)
