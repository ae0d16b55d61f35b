"""What a draft skips: the :class:`SkipPolicy` protocol, the budget policy, and the quantile rule.

A policy only decides which tokens run each branch. How a skipped token is handled (its K/V fill,
whether gates scale the branches they keep) is the engine's business (``Engine.forward``'s
``kv_fill``, ``GateConfig.scale_output``). Evaluation code plugs in its own policies (random or
static skips, recording wrappers) by implementing the two methods of the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, Protocol

import torch

# How a budget is spread over branches: ``global`` skips every (token, branch) whose importance is at
# or below one threshold shared by all branches, so the gates decide which branches give up compute;
# ``branch`` skips the budget's share of tokens in every branch (the paper).
Allocation = Literal["global", "branch"]
ALLOCATIONS = ("global", "branch")


class SkipPolicy(Protocol):
    """The plug-in point of every skipping forward; branch 0 is attention, 1 the MLP."""

    def may_skip(self, layer: int, branch: int, T: int) -> bool:
        """Whether a pass of T tokens can skip this branch at all (if not, its gate need not run)."""

    def active(self, importance: torch.Tensor, valid: torch.Tensor, layer: int, branch: int) -> torch.Tensor | None:
        """Which tokens run the branch. importance, valid: (B, T). Returns (B, T) bool, or None for all."""


@dataclass(frozen=True)
class BudgetPolicy:
    """The draft's policy: skip a share ``budget`` of (token, branch) evaluations.

    Multi-token passes skip, per branch, the ``floor(budget * n_valid)`` lowest-importance valid
    tokens (padding never counts). Single-token steps have no quantile to take: they skip a branch
    when the token's importance is at or below its calibrated threshold (``thresholds`` (2, L), row
    0 attention; without thresholds they skip nothing). ``never_skip``: (layer, branch) pairs that
    always run.
    """

    budget: float = 0.0
    thresholds: torch.Tensor | None = None
    never_skip: frozenset[tuple[int, int]] = field(default_factory=frozenset)

    def __post_init__(self):
        if not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"skip budget must be in [0, 1], got {self.budget}")

    def may_skip(self, layer: int, branch: int, T: int) -> bool:
        if (layer, branch) in self.never_skip:
            return False
        if T == 1:
            return (layer, branch) in self._single_skippable
        return self.budget > 0

    @cached_property
    def _threshold_values(self) -> list[list[float]]:
        """The thresholds as Python numbers: a comparison with one costs one operation per step."""
        return self.thresholds.tolist()

    @cached_property
    def _single_skippable(self) -> frozenset[tuple[int, int]]:
        """Branches a single-token step can skip: importance is in (0, 1), so a threshold below 0
        is never reached. Read once, not per step: a tensor read per branch costs a host sync."""
        if self.thresholds is None:
            return frozenset()
        return frozenset((int(layer), int(b)) for b, layer in (self.thresholds >= 0).nonzero().tolist())

    def threshold(self, layer: int, branch: int) -> float:
        """The single-token threshold of a branch (importance at or below it skips)."""
        return self._threshold_values[branch][layer]

    def active(self, importance: torch.Tensor, valid: torch.Tensor, layer: int, branch: int) -> torch.Tensor | None:
        if (layer, branch) in self.never_skip:
            return None
        if importance.shape[1] == 1 and self.thresholds is not None:
            return importance > self.threshold(layer, branch)
        return skip_lowest(importance, valid, int(self.budget * int(valid.sum())))


def skip_lowest(importance: torch.Tensor, valid: torch.Tensor, n_skip: int) -> torch.Tensor | None:
    """(B, T) run mask that skips the n_skip lowest-importance valid tokens (None: skip nothing)."""
    if n_skip == 0:
        return None
    ranked = importance.masked_fill(~valid, float("inf")).flatten().argsort(stable=True)  # padding last
    keep = torch.ones(importance.numel(), dtype=torch.bool, device=importance.device)
    keep[ranked[:n_skip]] = False
    return keep.view_as(importance)


def budget_quantile(importance: torch.Tensor, budget: float, dim: int | None = None) -> torch.Tensor:
    """The threshold that puts a share ``budget`` of ``importance`` at or below it (skip there):
    over all values (``dim=None``, a 0-d tensor) or along ``dim``. -inf for a zero budget."""
    n = importance.numel() if dim is None else importance.shape[dim]
    if budget <= 0 or n == 0:
        shape = () if dim is None else importance.amin(dim).shape
        return torch.full(shape, float("-inf"))
    k = max(1, min(n, round(budget * n)))
    flat = importance.float().flatten() if dim is None else importance.float()
    return flat.kthvalue(k, dim=0 if dim is None else dim).values
