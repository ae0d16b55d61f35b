"""Stand-ins for skipped branches: what a draft adds to the residual stream where it skips a branch.

A skipped branch need not add zero. Each branch k gets a stand-in ``s_k(x) = c_k + (x A_k) B_k``
of its normed input x: the branch output's mean (``rank=0``), or a rank-r linear map fitted by
reduced-rank ridge regression on the original model's branch inputs and outputs over the training
text (closed form, from sums over the tokens; no backpropagation). At rank 32 a stand-in reads
2 * 32 * d weights, about 1% of an MLP branch of SmolLM2.

Fit them where they are used (``branch_moments(..., where=)``: the tokens a draft skips, whose
branch outputs are small): on SmolLM2 the mean fitted there drafts best, and linear maps of the
draft's drifted inputs draft worse than the mean (README, Measured). ``specgate train --objective
standins`` then distils them in the draft itself.

Draft-only adapters have the same form and are added where a draft *runs* a branch: ``h += branch
output + a_k(x)``. They start at zero (:meth:`StandIns.adapters`: ``B = 0``, ``A`` random), so an
untrained adapter leaves the draft as it is, and are trained by the same distillation. Neither is
ever used by a pass that skips nothing (the verifier, plain decoding).

The fit (:func:`fit_standins`): with the input and output covariances ``Cxx`` and ``Cxo``, the ridge
map is ``W = (Cxx + lam I)^-1 Cxo``; its best rank-r restriction in the metric of the inputs keeps the
top r eigenvectors ``V`` of ``W^T Cxx W`` (the covariance of the fitted outputs): ``A = W V``,
``B = V^T`` and ``c = mean(o) - mean(x) A B``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .adapters import ModelWeights
from .layers import attention_branch, dense_rope_masks, embed, mlp_branch


class StandIns(nn.Module):
    """The stand-ins of every branch; row k = 2 * layer + branch (0 attention, 1 MLP)."""

    def __init__(self, num_layers: int, hidden: int, rank: int):
        super().__init__()
        self.rank = rank
        self.bias = nn.Parameter(torch.zeros(2 * num_layers, hidden), requires_grad=False)
        self.down = nn.Parameter(torch.zeros(2 * num_layers, hidden, rank), requires_grad=False)
        self.up = nn.Parameter(torch.zeros(2 * num_layers, rank, hidden), requires_grad=False)

    @classmethod
    def adapters(cls, num_layers: int, hidden: int, rank: int, seed: int = 0) -> "StandIns":
        """Untrained draft-only adapters: zero maps whose down-projections are random, so that
        gradients reach both factors."""
        a = cls(num_layers, hidden, rank)
        g = torch.Generator().manual_seed(seed)
        a.down.data = torch.randn(a.down.shape, generator=g) / hidden**0.5
        return a

    def widen(self, rank: int, seed: int = 0) -> "StandIns":
        """These maps at a higher rank, unchanged: the new down-projection columns are random and
        the new up-projection rows zero, as in untrained adapters, so training goes on from here."""
        if rank < self.rank:
            raise ValueError(f"cannot narrow rank-{self.rank} maps to rank {rank}: that would discard what they learned")
        wide = StandIns.adapters(self.bias.shape[0] // 2, self.bias.shape[1], rank, seed).to(self.bias)
        wide.bias.data.copy_(self.bias)
        wide.down.data[..., : self.rank] = self.down
        wide.up.data[:, : self.rank] = self.up
        return wide

    def forward(self, x: torch.Tensor, layer: int, branch: int) -> torch.Tensor:
        """What branch ``branch`` of ``layer`` adds in place of its output for normed inputs x (..., d)."""
        k = 2 * layer + branch
        if self.rank == 0:
            return self.bias[k].expand_as(x)
        return torch.addmm(self.bias[k], (x.reshape(-1, x.shape[-1]) @ self.down[k]), self.up[k]).view_as(x)

    def weights_read(self) -> int:
        """Weights one stand-in reads per token."""
        return self.bias.shape[1] * (1 + 2 * self.rank)


class Moments:
    """Running sums of one pass's branch inputs x and outputs o, per branch, in float64."""

    def __init__(self, branches: int, hidden: int):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.n = z(branches)  # tokens per branch
        self.sx, self.so = z(branches, hidden), z(branches, hidden)
        self.sxx, self.sxo = z(branches, hidden, hidden), z(branches, hidden, hidden)
        self.soo = z(branches)

    def add(self, k: int, x: torch.Tensor, o: torch.Tensor) -> None:
        """Branch k's inputs and outputs (n, d) at n tokens. One batch's products in float32, their
        sums over batches in float64."""
        x, o = x.float(), o.float()
        self.n[k] += len(x)
        self.sx[k] += x.double().sum(0)
        self.so[k] += o.double().sum(0)
        self.sxx[k] += (x.T @ x).double()
        self.sxo[k] += (x.T @ o).double()
        self.soo[k] += float(o.double().pow(2).sum())


# where(x, layer, branch) -> (B, T) bool: the tokens whose branch input and output a fit counts
Where = Callable[[torch.Tensor, int, int], torch.Tensor]


@torch.no_grad()
def branch_moments(w: ModelWeights, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], where: Where | None = None) -> Moments:
    """The moments of every branch's normed input and output in the original model over batches
    of (ids (B, T), valid (B, T)) sequences that start at position 0: at every valid token, or
    only where ``where`` says (e.g. where a draft skips the branch: a stand-in is used only
    there, and the tokens a draft skips are those whose branch output is small)."""
    m = Moments(2 * len(w.layers), w.embed.shape[1])
    for ids, valid in batches:
        rope, masks = dense_rope_masks(w, ids)
        h = embed(w, ids)
        for i, lw in enumerate(w.layers):
            for b in (0, 1):
                x, o = attention_branch(w, lw, h, rope, masks)[:2] if b == 0 else mlp_branch(w, lw, h)
                use = valid if where is None else valid & where(x, i, b)
                m.add(2 * i + b, x[use], o[use])
                h = h + o
    return m


def fit_standins(m: Moments, rank: int, ridge: float = 1e-2) -> StandIns:
    """The stand-ins of the module docstring from the moments; ``ridge`` is lam relative to the
    mean input variance."""
    G, d = m.sx.shape
    s = StandIns(G // 2, d, rank)
    n = m.n.clamp_min(1)[:, None]
    mx, mo = m.sx / n, m.so / n
    for k in range(G):
        if rank == 0 or m.n[k] <= rank:  # too few tokens for a map: the mean (0 where none)
            s.bias.data[k] = mo[k].float()
            continue
        cxx = m.sxx[k] / m.n[k] - torch.outer(mx[k], mx[k])
        cxo = m.sxo[k] / m.n[k] - torch.outer(mx[k], mo[k])
        lam = ridge * float(cxx.diagonal().mean())
        W = torch.linalg.solve(cxx + lam * torch.eye(d, dtype=cxx.dtype), cxo)  # (d, d)
        _, vecs = torch.linalg.eigh(W.T @ cxx @ W)  # ascending
        V = vecs[:, -rank:]
        A = W @ V
        s.down.data[k], s.up.data[k] = A.float(), V.T.float()
        s.bias.data[k] = (mo[k] - mx[k] @ A @ V.T).float()
    return s


def explained(m: Moments, s: StandIns) -> torch.Tensor:
    """(branches,) the share of each branch's output variance that its stand-in explains over the
    tokens of ``m`` (held-out moments: 1 - squared error / variance about the output mean)."""
    out = torch.empty(len(m.sx), dtype=torch.float64)
    for k in range(len(m.sx)):
        c = s.bias[k].double()
        M = (s.down[k] @ s.up[k]).double() if s.rank else torch.zeros(len(c), len(c), dtype=torch.float64)
        pred_sq = m.n[k] * c @ c + 2 * c @ (M.T @ m.sx[k]) + (M * (m.sxx[k] @ M)).sum()
        err = m.soo[k] - 2 * (c @ m.so[k] + (M * m.sxo[k]).sum()) + pred_sq
        out[k] = 1 - err / (m.soo[k] - m.so[k] @ m.so[k] / m.n[k])
    return out
