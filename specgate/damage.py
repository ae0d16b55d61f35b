"""The ``damage`` objective: fit each gate to what skipping its branch really costs.

For every (token, branch) of the training text we measure the *removal damage*: the KL divergence
from the original model's next-token distribution to the one the model gives when that branch alone
is skipped for that token alone, while the history's K/V stay the original model's. That is the
situation of the first draft step after a verify pass. With K/V held fixed, positions no longer
interact, so one partial forward per branch (from the branch to the LM head, over the whole batch,
each position attending to the original K/V of earlier positions and to its own from this pass)
gives the damage of every token: 2L partial forwards per batch, no backward.

Each gate is then fitted by Poisson regression with a log link: ``exp(w . x + b)`` estimates the
expected damage E[d | x] of skipping the branch for a token whose normed branch input is ``x``.
Damage is heavy-tailed (most skips cost nothing, a few destroy the prediction). Least squares on
``log d`` would estimate the geometric mean and underrate branches with rare catastrophic tokens;
the Poisson deviance estimates ``log E[d | x]``, the quantity a sum of skip costs adds up. A gate's
importance is ``sigmoid((w . x + b - c) / s)`` with ``c``, ``s`` shared by all branches, a monotone
function of predicted damage, so a global threshold skips the (token, branch) pairs of least
expected damage first: branches that cannot be lost (SmolLM2's layer-0 MLP) are never skipped,
cheap ones are skipped for most tokens, and the rest token by token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .engine import Engine
from .gates import GateConfig, GateSet, save_gates
from .layers import attention_branch, dense_rope_masks, embed, head, mlp_branch
from .standin import StandIns
from .data import padding_id
from .loop import run_steps, save_atomic

CHECKPOINT_NAME = "labels.pt"


# decide(x, layer, branch) -> (B, T) bool, True where a draft runs the branch for normed inputs x
Decide = Callable[[torch.Tensor, int, int], torch.Tensor]


@torch.no_grad()
def removal_damage(
    engine: Engine, ids: torch.Tensor, keep: torch.Tensor, standins: StandIns | None = None, decide: Decide | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and removal damage of every branch at the ``keep`` positions of ids (B, T).

    Returns x (2L, n, d), the normed input of branch k = 2 * layer + (0 attention, 1 MLP) at the
    n kept positions, and damage (2L, n): KL(original || branch k skipped at that token alone),
    with its stand-in in its place if ``standins`` are given (what the draft would add).

    With ``decide``, the labels of a second round, in the draft's own context: the draft skips
    what ``decide`` says (stand-ins in place), and the damage of branch k is how much closer to the
    original model the draft gets by running k than by skipping it, every other branch as the draft
    decides (clamped at 0); x are the draft's inputs, what its gates see.
    """
    s = engine.weights
    ctx = _Context(s, ids, standins)
    full = head(s, ctx.h[keep]).float().log_softmax(-1)  # (n, V)
    p_full = full.exp()

    def kl(h: torch.Tensor) -> torch.Tensor:
        return (p_full * (full - head(s, h[keep]).float().log_softmax(-1))).sum(-1)

    draft: list = []
    h = ctx.run(0, embed(s, ids), decide, draft)  # without decide: the original model, recorded
    base = None if decide is None else kl(h)
    damage = []
    for k, (h, x, o, fill, run) in enumerate(draft):
        if run is None:  # skip k at every token, every other branch runs
            damage.append(kl(ctx.run(k + 1, h + fill, None)).clamp_min(0))
        else:  # flip the draft's decision on k at every token
            flipped = kl(ctx.run(k + 1, h + torch.where(run[..., None], fill, o), decide))
            damage.append(torch.where(run[keep], flipped - base, base - flipped).clamp_min(0))
    return torch.stack([x[keep] for _, x, _, _, _ in draft]), torch.stack(damage)


class _Context:
    """The original model's pass over ids (B, T) (final residual stream ``h``, each layer's K/V),
    and partial passes in which each position attends to the original K/V of the others."""

    def __init__(self, s, ids: torch.Tensor, standins: StandIns | None):
        self.s, self.standins = s, standins
        self.rope, self.masks = dense_rope_masks(s, ids)
        self.kvs, h = [], embed(s, ids)
        for lw in s.layers:
            x, o, kv = attention_branch(s, lw, h, self.rope, self.masks)
            self.kvs.append(kv)
            h = h + o
            h = h + mlp_branch(s, lw, h)[1]
        self.h = h

    def run(self, k0: int, h: torch.Tensor, decide: Decide | None, record: list | None = None) -> torch.Tensor:
        """Branches k0, k0 + 1, ... on h; where ``decide`` skips, the stand-in replaces the output.
        ``record`` gets (h, x, o, stand-in, run) before each branch."""
        s = self.s
        for k in range(k0, 2 * len(s.layers)):
            lw = s.layers[k // 2]
            if k % 2 == 0:
                x, o, _ = attention_branch(s, lw, h, self.rope, self.masks, self.kvs[k // 2])
            else:
                x, o = mlp_branch(s, lw, h)
            run = decide(x, k // 2, k % 2) if decide is not None else None
            fill = None if record is None and run is None else self._fill(x, k)
            if record is not None:
                record.append((h, x, o, fill, run))
            h = h + (o if run is None else torch.where(run[..., None], o, fill))
        return h

    def _fill(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return torch.zeros_like(x) if self.standins is None else self.standins(x, k // 2, k % 2)


def poisson_fit(x: torch.Tensor, y: torch.Tensor, ridge: float = 1.0, iterations: int = 20, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Poisson regression with log link, one independent fit per group: x (G, n, d), y (G, n) >= 0
    -> w (G, d), b (G,) with E[y | x] ~ exp(w . x + b). Newton's method on standardized features;
    ``ridge`` is the L2 penalty on the standardized weights (not on b), added to the mean deviance.
    It has to be strong: damage is heavy-tailed, and a weakly penalized fit chases a few huge labels
    with huge weights that a draft's slightly different input then amplifies."""
    G, n, d = x.shape
    W, B = torch.zeros(G, d), torch.zeros(G)
    reg = torch.full((d + 1,), ridge, dtype=torch.float64)
    reg[-1] = 0.0
    for g in range(G):
        mu, sd = x[g].float().mean(0), x[g].float().std(0)
        sd = sd.clamp_min(float(sd.median()) + 1e-6)  # near-constant features: no huge raw weights
        z = torch.cat([(x[g].float() - mu) / sd, torch.ones(n, 1)], 1)  # (n, d + 1)
        yg = y[g].float()
        w = torch.zeros(d + 1, dtype=torch.float64)
        w[-1] = float(yg.mean().clamp_min(1e-12).log())
        for _ in range(iterations):
            eta = (z @ w.float()).clamp(max=30.0)
            r = eta.exp()
            grad = (z.T @ (r - yg)).double() / n + reg * w
            hess = ((z * r[:, None]).T @ z).double() / n + torch.diag(reg)
            step = torch.linalg.solve(hess, grad)
            w = w - step
            if float(step.abs().max()) < tol:
                break
        W[g] = (w[:d] / sd.double()).float()
        B[g] = float(w[d] - (w[:d] / sd.double() * mu.double()).sum())
    return W, B


def gates_from_fit(
    config: GateConfig, w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, saved: torch.Tensor | None = None, top: float = 0.95
) -> GateSet:
    """Scalar gates whose importance is sigmoid(w . x + b - log saved - c) per branch (row
    2 * layer + branch of w, b, saved): the predicted log damage per unit of compute a skip saves
    (``saved``, see ``Engine.branch_costs``; None: per skip), shifted by c, the ``top`` quantile of
    the predictions over the inputs x. A global threshold then skips the least damage per unit of
    compute first. Below c the sigmoid is close to exp, so importances keep their ratios (and their
    ranking) in float16 and bfloat16 too, over the whole range where budgets put a threshold."""
    if saved is not None:
        b = b - (saved / saved.mean()).log()
    pred = torch.einsum("gnd,gd->gn", x[:, :: max(1, x.shape[1] // 4096)].float(), w) + b[:, None]
    c = float(pred.flatten().quantile(top))
    gates = GateSet(config)
    with torch.no_grad():
        for k in range(2 * config.num_layers):
            proj = gates.gate(k // 2, k % 2).proj
            proj.weight.copy_(w[k][None])
            proj.bias.fill_(float(b[k]) - c)
    return gates


def compute_saved(engine: Engine) -> torch.Tensor:
    """(2L,) the compute a skip saves per branch, rows in (layer, branch) order as the fit's."""
    _, saved = engine.branch_costs()
    return torch.tensor(saved).T.flatten()


def draft_decisions(gates: GateSet, budget: float) -> Decide:
    """What the single-token draft of ``gates`` at ``budget`` runs (their calibrated thresholds)."""
    runs = gates.draft_runs(budget)
    return lambda x, i, b: runs(gates.gate(i, b)(x).mean(-1), i, b)


def train_damage(
    model, config, gate_config: GateConfig, pieces: Callable[[], list[list[int]]], out: Path, accelerator,
    standins: StandIns | None = None, decide: Decide | None = None,
) -> GateSet:
    """The ``damage`` objective's loop: label ``batch_size`` sequences per step, ``steps`` steps,
    then fit the gates (``out/gates``) to all labels. Each skip is priced with its stand-in in
    place if ``standins`` are given (they are saved with the gates), and in the context of the
    draft that ``decide`` makes if given (see :func:`removal_damage`). Labels are checkpointed
    (``out/labels.pt``) every ``checkpoint_every`` steps; Ctrl-C saves them and fits the gates. A
    resumed run continues labelling (with ``steps`` already reached, it only refits, e.g. with
    another ``ridge``). The sequences of each step are a pure function of (seed, step)."""
    from accelerate.utils import gather_object

    engine = model.engine
    ckpt = out / CHECKPOINT_NAME
    labels = {"step": 0, "ids": [], "damage": []}  # per step: ids (B, T) with -1 padding, damage (2L, n)
    if config.resume and ckpt.is_file():
        labels = torch.load(ckpt, map_location="cpu", weights_only=True)

    def step(i: int, ids: torch.Tensor, valid: torch.Tensor) -> dict:
        _, damage = removal_damage(engine, ids, valid, standins, decide)  # every process labels its share of the batch
        labels["ids"].append(torch.cat(gather_object([ids.masked_fill(~valid, -1).cpu()])))
        labels["damage"].append(torch.cat(gather_object([damage.cpu()]), 1))  # rows in rank order, as ids
        labels["step"] = i + 1
        return {"damage": f"{float(damage.mean()):.4f}"}

    def save(done: int) -> None:
        if accelerator.is_main_process:
            save_atomic(labels, ckpt)

    data = pieces() if labels["step"] < config.steps else []
    try:
        run_steps(config, data, labels["step"], accelerator, step, save, padding_id(model.tokenizer))
    except KeyboardInterrupt as e:
        if labels["ids"]:
            _fit_and_save(engine, labels, config, gate_config, out, accelerator, standins, decide)
        raise e
    if not labels["ids"]:
        raise ValueError("no labels: the damage objective needs at least one step")
    return _fit_and_save(engine, labels, config, gate_config, out, accelerator, standins, decide)


def _fit_and_save(engine: Engine, labels: dict, config, gate_config: GateConfig, out: Path, accelerator, standins, decide) -> GateSet:
    """Fit the gates to every label so far and save them in ``out/gates``."""
    xs = [
        branch_inputs(engine, ids.clamp_min(0).to(engine.device), (ids >= 0).to(engine.device), standins, decide).half().cpu()
        for ids in labels["ids"]
    ]
    x = torch.cat(xs, 1)
    w, b = poisson_fit(x, torch.cat(labels["damage"], 1), ridge=config.ridge)
    gates = gates_from_fit(gate_config, w, b, x, compute_saved(engine))
    gates.standins = standins
    if accelerator.is_main_process:
        save_gates(gates, out / "gates")
    return gates


@torch.no_grad()
def branch_inputs(engine: Engine, ids: torch.Tensor, keep: torch.Tensor, standins=None, decide: Decide | None = None) -> torch.Tensor:
    """x (2L, n, d): the normed input of every branch at the kept positions, in the original model
    (or in the draft that ``decide`` and ``standins`` make, as :func:`removal_damage` has it)."""
    draft: list = []
    _Context(engine.weights, ids, standins).run(0, embed(engine.weights, ids), decide, draft)
    return torch.stack([x[keep] for _, x, _, _, _ in draft])
