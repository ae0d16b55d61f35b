"""Calibration: per-branch importance thresholds so that single-token draft steps skip at a budget.

A budget is the share of the draft's layer compute skipped (weights not read; see
``Engine.branch_costs``): skipping an MLP branch counts about three times skipping attention.

A single-token step has no batch to take a quantile over, so the draft decides with thresholds
measured beforehand: skip branch (b, l) when the token's importance is at or below
``thresholds[b, l]``. The importances a draft step sees depend on what earlier layers skipped, so
thresholds are found by iterating on real draft steps: ``global`` bisects on one threshold (a
quantile of the unskipped importances) until the measured skip share matches; ``branch`` takes,
per branch, the budget's quantile of the importances measured under the current thresholds, and
repeats. Draft steps are
simulated as in the acceptance loop: rounds of ``draft_len`` single-token skipping steps
(teacher-forced on the calibration text), then one original-model pass over the round, which
rewrites those tokens' K/V, so every round starts from the original model's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import chat_ids, chunk, load_documents, self_answers
from .engine import Engine, SkipCounter
from .gates import GateSet
from .policy import ALLOCATIONS, Allocation, BudgetPolicy, SkipPolicy, budget_quantile
from .sparse_inputs import calibrate_cuts


@dataclass(frozen=True)
class CalibrateConfig:
    """Defaults of ``specgate calibrate``."""

    budgets: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    allocation: Allocation = "global"
    samples: int = 16  # sequences of calibration text (and as many held-out ones for the check)
    tokens: int = 128  # draft steps per sequence
    prefix: int = 24  # tokens prefilled by the original model before the draft steps start
    iterations: int = 3
    draft_len: int = 4
    sparse_inputs: tuple[float, ...] = ()  # compute shares of sparse-inputs drafts (specgate.sparse_inputs)
    data: str | None = None


class _Recording:
    """Wraps a policy: runs every gate (its importance is what we measure) and keeps every
    importance it is asked about, per (branch, layer)."""

    def __init__(self, policy: SkipPolicy):
        self.policy = policy
        self.log: dict[tuple[int, int], list[torch.Tensor]] = {}

    def may_skip(self, layer: int, branch: int, T: int) -> bool:
        return True

    def active(self, importance, valid, layer, branch):
        self.log.setdefault((branch, layer), []).append(importance.detach().flatten().float().cpu())
        return self.policy.active(importance, valid, layer, branch)


@torch.inference_mode()
def draft_steps(
    engine: Engine,
    gates: GateSet,
    ids: torch.Tensor,
    thresholds: torch.Tensor | None,
    prefix: int,
    draft_len: int = 4,
) -> tuple[torch.Tensor, float]:
    """Teacher-forced draft rounds over ids (B, N) after a ``prefix`` prefilled by the original model.

    Returns the importances (2, L, n) of every single-token (token, branch) evaluation, and the share
    of the layer compute skipped under ``thresholds`` (2, L) (None: nothing is skipped)."""
    B, N = ids.shape
    L = engine.num_layers
    cache = engine.new_cache(B, N)
    engine(ids[:, :prefix], cache, logits_to_keep=1)
    policy = _Recording(BudgetPolicy(thresholds=None if thresholds is None else thresholds.to(engine.device)))
    counter = SkipCounter()
    for start in range(prefix, N, draft_len):
        stop = min(N, start + draft_len)
        lengths = cache.lengths.clone()
        for t in range(start, stop):  # 1. draft steps with the skipping model
            engine(ids[:, t : t + 1], cache, gates, policy, logits_to_keep=1, counter=counter)
        cache.rewind(lengths)  # 2. the original model's pass over the round replaces their K/V
        engine(ids[:, start:stop], cache, logits_to_keep=1)
    imp = torch.stack([torch.stack([torch.cat(policy.log[(b, i)]) for i in range(L)]) for b in range(2)])
    return imp, counter.compute_fraction


def _thresholds(imp: torch.Tensor, budget: float, allocation: Allocation) -> torch.Tensor:
    """(2, L) thresholds putting ``budget`` of the importances imp (2, L, n) at or below them."""
    if allocation == "global":
        return budget_quantile(imp, budget).expand(imp.shape[:2]).clone()
    return budget_quantile(imp, budget, dim=2)


def calibrate(
    model,
    gates: GateSet,
    samples: list[list[int]] | torch.Tensor,
    budgets: list[float] | tuple[float, ...],
    allocation: Allocation = "global",
    prefix: int = 24,
    iterations: int = 3,
    draft_len: int = 4,
) -> dict[float, float]:
    """Store ``gates.thresholds[budget]`` (2, L) for each budget; returns the skip share each reached
    on ``samples`` (token ids, cut to a common length; the first ``prefix`` tokens are prompt).

    ``global``: one threshold for all branches (the gates decide which branches give up compute);
    ``branch``: every branch skips the budget's share of tokens.
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be 'global' or 'branch', got {allocation!r}")
    engine: Engine = model.engine if hasattr(model, "engine") else model
    ids = _stack(samples, prefix)
    base, _ = draft_steps(engine, gates, ids, None, prefix, draft_len)
    reached = {}
    for budget in budgets:
        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"budgets must be in [0, 1], got {budget}")
        thresholds, imp = _thresholds(base, budget, allocation), base
        best = (float("inf"), thresholds, 0.0)
        lo, hi, q = 0.0, 1.0, budget  # global: bisect on the quantile q of the unskipped importances
        for _ in range(iterations if budget > 0 else 0):
            imp, fraction = draft_steps(engine, gates, ids, thresholds, prefix, draft_len)
            if abs(fraction - budget) < best[0]:
                best = (abs(fraction - budget), thresholds, fraction)
            if allocation == "global":
                # skipping lowers later importances, so the skip share grows faster than q (and a
                # fixed-point iteration can run away); the share is monotone in q: bisect
                lo, hi = (q, hi) if fraction < budget else (lo, q)
                q = (lo + hi) / 2
                thresholds = _thresholds(base, q, allocation)
            else:
                thresholds = _thresholds(imp, budget, allocation)  # the fixed point: quantile under skipping
        gates.thresholds[float(budget)] = best[1].float().cpu()
        reached[float(budget)] = best[2]
    return reached


def measure(model, gates: GateSet, samples, budget: float, prefix: int = 24, draft_len: int = 4) -> float:
    """Share of the layer compute single-token draft steps skip at ``budget`` on ``samples``."""
    engine: Engine = model.engine if hasattr(model, "engine") else model
    _, fraction = draft_steps(engine, gates, _stack(samples, prefix), gates.policy(budget).thresholds, prefix, draft_len)
    return fraction


def _stack(samples, prefix: int) -> torch.Tensor:
    if isinstance(samples, torch.Tensor):
        return samples
    samples = [list(s) for s in samples if len(s) > prefix + 1]
    if not samples:
        raise ValueError(f"calibration needs sequences longer than prefix={prefix} tokens")
    n = min(map(len, samples))
    return torch.tensor([s[:n] for s in samples])


def calibrate_default(model, gates: GateSet, config: CalibrateConfig = CalibrateConfig()) -> dict[float, float]:
    """Calibrate on ``config.data`` or the model's own answers to train-split prompts, then check
    on its answers to held-out prompts; returns budget -> decode skip share on held-out text, and
    share -> compute share the sparse-inputs draft skips there."""
    calib, check = calibration_samples(model, config)
    if config.budgets:
        calibrate(model, gates, calib, config.budgets, config.allocation, config.prefix, config.iterations, config.draft_len)
    reached = {b: measure(model, gates, check, b, config.prefix, config.draft_len) for b in config.budgets}
    engine: Engine = model.engine
    for share in config.sparse_inputs:
        found = calibrate_cuts(engine.weights, _stack(calib, 0), share, config.prefix)
        gates.input_cuts[share] = found.thresholds
        reached[share] = cut_share(engine, gates.cuts(share), _stack(check, 0))
        print(f"sparse inputs {share:.2f}: shares zeroed (q/k/v, output, gate/up, down) {', '.join(f'{x:.2f}' for x in found.split)}, "
              f"spread over layers {found.spread}; first-token agreement on calibration text {found.agreement:.3f}; "
              f"compute skipped on held-out text {reached[share]:.3f}")  # fmt: skip
    return reached


@torch.inference_mode()
def cut_share(engine: Engine, cuts, ids: torch.Tensor) -> float:
    """Compute share a sparse-inputs pass over ``ids`` skips."""
    counter, cache = SkipCounter(), engine.new_cache(*ids.shape)
    cache.reset()
    engine(ids, cache, cuts=cuts, counter=counter)
    return counter.compute_fraction


def calibration_samples(model, config: CalibrateConfig) -> tuple[list[list[int]], list[list[int]]]:
    """(calibration, check) token sequences: of ``config.data``, or the model's own answers to
    train-split and held-out prompts."""
    from .prompts import split

    train_prompts, heldout = split()
    n_tok = config.prefix + config.tokens
    if config.data:
        docs = [d for d in chunk(load_documents(config.data, model.tokenizer), n_tok) if len(d) == n_tok]
        calib, check = docs[: config.samples], docs[config.samples : 2 * config.samples] or docs[: config.samples]
    else:
        def answers(prompts):
            outs = self_answers(model, prompts, max_new_tokens=config.tokens + 8, batch_size=config.samples)
            return [chat_ids(model.tokenizer, p, a) for p, a in zip(prompts, outs)]

        calib = answers(train_prompts[:: max(1, len(train_prompts) // config.samples)][: config.samples])
        check = answers(heldout[: config.samples])
        # the draft steps start inside the answer: prefix = the chat-template prompt of each sample
        calib = [c[-n_tok:] for c in calib if len(c) >= n_tok] or calib
        check = [c[-n_tok:] for c in check if len(c) >= n_tok] or check
    return calib, check
