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
from .layers import attention_branch, dense_rope_masks, embed, head, mlp_branch, norm
from .standin import StandIns
from .data import padding_id
from .loop import run_steps, save_atomic

CHECKPOINT_NAME = "labels.pt"


@torch.no_grad()
def removal_damage(
    engine: Engine, ids: torch.Tensor, keep: torch.Tensor, standins: StandIns | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and removal damage of every branch at the ``keep`` positions of ids (B, T).

    Returns x (2L, n, d), the normed input of branch k = 2 * layer + (0 attention, 1 MLP) at the
    n kept positions, and damage (2L, n): KL(original || branch k skipped at that token alone),
    with its stand-in in its place if ``standins`` are given (what the draft would add).
    """
    s = engine.weights
    rope, masks = dense_rope_masks(s, ids)
    before, xs, kvs, h = _full_pass(engine, ids, keep, rope, masks)
    full = head(s, h[keep]).float().log_softmax(-1)  # (n, V)
    p_full = full.exp()
    damage = []
    for k, h in enumerate(before):  # skip branch k: the residual stream passes it (plus its stand-in)
        layer, lw = k // 2, s.layers[k // 2]
        if standins is not None:
            h = h + standins(norm(s, h, lw.mlp_norm if k % 2 else lw.attn_norm), layer, k % 2)
        if k % 2 == 0:
            h = h + mlp_branch(s, lw, h)[1]
        for i in range(layer + 1, len(s.layers)):
            h = h + attention_branch(s, s.layers[i], h, rope, masks, kvs[i])[1]
            h = h + mlp_branch(s, s.layers[i], h)[1]
        logp = head(s, h[keep]).float().log_softmax(-1)
        damage.append((p_full * (full - logp)).sum(-1).clamp_min(0))
    return torch.stack(xs), torch.stack(damage)


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


def train_damage(
    model, config, gate_config: GateConfig, pieces: Callable[[], list[list[int]]], out: Path, accelerator,
    standins: StandIns | None = None,
) -> GateSet:
    """The ``damage`` objective's loop: label ``batch_size`` sequences per step, ``steps`` steps,
    then fit the gates (``out/gates``) to all labels. Each skip is priced with its stand-in in
    place if ``standins`` are given (they are saved with the gates). Labels are checkpointed
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
        _, damage = removal_damage(engine, ids, valid, standins)  # every process labels its share of the batch
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
            _fit_and_save(engine, labels, config, gate_config, out, accelerator, standins)
        raise e
    if not labels["ids"]:
        raise ValueError("no labels: the damage objective needs at least one step")
    return _fit_and_save(engine, labels, config, gate_config, out, accelerator, standins)


def _fit_and_save(engine: Engine, labels: dict, config, gate_config: GateConfig, out: Path, accelerator, standins) -> GateSet:
    """Fit the gates to every label so far and save them in ``out/gates``."""
    xs = [
        branch_inputs(engine, ids.clamp_min(0).to(engine.device), (ids >= 0).to(engine.device)).half().cpu()
        for ids in labels["ids"]
    ]
    x = torch.cat(xs, 1)
    w, b = poisson_fit(x, torch.cat(labels["damage"], 1), ridge=config.ridge)
    gates = gates_from_fit(gate_config, w, b, x, compute_saved(engine))
    gates.standins = standins
    if accelerator.is_main_process:
        save_gates(gates, out / "gates")
    return gates


def _full_pass(engine: Engine, ids, keep, rope, masks):
    """The original model over ids: the residual stream before each of the 2L branches, their
    normed inputs at the kept positions, each layer's K/V, and the final residual stream."""
    s = engine.weights
    h = embed(s, ids)
    before, xs, kvs = [], [], []
    for lw in s.layers:
        before.append(h)
        x, o, kv = attention_branch(s, lw, h, rope, masks)
        xs.append(x[keep])
        kvs.append(kv)
        h = h + o
        before.append(h)
        x, o = mlp_branch(s, lw, h)
        xs.append(x[keep])
        h = h + o
    return before, xs, kvs, h


@torch.no_grad()
def branch_inputs(engine: Engine, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x (2L, n, d): the normed input of every branch at the kept positions, original model."""
    return torch.stack(_full_pass(engine, ids, keep, *dense_rope_masks(engine.weights, ids))[1])
