"""The gradient objectives of gate training: ``paper`` and ``distill``.

- ``paper``: next-token cross-entropy + lambda * mean over branches of mean(g^2), with hard skipping
  at an importance quantile that warms up from 0 to ``budget_max``.
- ``distill``: KL(original model || skipping model) of the next-token distributions, at budgets
  sampled in [``budget_min``, ``budget_max``] (plus the same L2 term): what draft acceptance against
  the original model rewards. The original model's pass (no grad) also gives this batch's
  importances, whose budget quantile decides how many tokens each branch skips.

Both run :func:`gated_forward`, the dense forward of :mod:`specgate.layers` with every branch
computed and then masked (a masked branch adds exactly what a skipped one adds: nothing), so the
gate's gradient follows :func:`specgate.layers.branch_factor`. Budgets are spread over branches by
``allocation`` (see :data:`specgate.policy.Allocation`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .engine import Engine
from .gates import GateSet, save_gates
from .layers import branch_factor, dense_forward
from .data import padding_id
from .loop import run_steps, save_atomic
from .policy import budget_quantile, skip_lowest

CHECKPOINT_NAME = "checkpoint.pt"

# decide(importance (B, T), layer, branch) -> run mask (B, T) bool, or None: every token runs
Decide = Callable[[torch.Tensor, int, int], "torch.Tensor | None"]


@dataclass
class ForwardRecord:
    """What one :func:`gated_forward` saw: per branch the importances and skip masks (B, T)."""

    importance: list[torch.Tensor] = field(default_factory=list)  # 2L entries, order (layer, branch)
    run: list[torch.Tensor | None] = field(default_factory=list)
    sq: list[torch.Tensor] = field(default_factory=list)  # mean_j g_j^2, (B, T), with grad


def gated_forward(
    engine: Engine,
    input_ids: torch.Tensor,
    gates: GateSet | None = None,
    decide: Decide | None = None,
    record: ForwardRecord | None = None,
    history: list | None = None,
    round_len: int = 1,
) -> torch.Tensor:
    """Differentiable dense forward over whole sequences (B, T) from position 0 -> logits (B, T, V).

    The same model as ``engine(ids, fresh_cache, gates, policy)`` with ``kv_fill="project"`` when
    ``decide`` picks the same tokens; gates scale the branches if their config says so, skipped
    tokens get the gates' stand-ins and, in a skipping pass (``decide`` given), running ones their
    adapters, if any. ``history``, ``round_len``: see :func:`specgate.layers.dense_forward`.
    """
    if gates is None:
        return dense_forward(engine.weights, input_ids)
    scale = gates.config.scale_output

    def add(h, x, o, i, branch):
        g = gates.gate(i, branch)(x)  # (B, T, d|1)
        imp = g.mean(-1)
        run = decide(imp.detach(), i, branch) if decide is not None else None
        if record is not None:
            record.importance.append(imp.detach())
            record.run.append(run)
            record.sq.append(g.pow(2).mean(-1))
        factor = branch_factor(g, run, scale)
        # 1 where the branch runs, 0 where skipped; gates that only decide get their gradient through it, so a
        # skipped token's gate learns <d loss / d h, o + adapter - stand-in>: what running the branch would gain
        on = None if run is None else factor if not scale else run[..., None].to(h.dtype)
        if on is not None and gates.standins is not None:
            h = h + gates.standins(x, i, branch) * (1 - on)
        if decide is not None and gates.adapters is not None:  # a skipping pass: the draft's adapters
            a = gates.adapters(x, i, branch)
            h = h + (a if on is None else a * on)
        return h + (o if factor is None else factor * o)

    return dense_forward(engine.weights, input_ids, add, history=history, round_len=round_len)


def quantile_decider(
    budget: float,
    valid: torch.Tensor,
    allocation: str,
    never_skip=frozenset(),
    threshold: float | None = None,
    counts: dict[tuple[int, int], int] | None = None,
) -> Decide | None:
    """Skip decisions of one training step.

    ``branch``: each branch skips the floor(budget * n_valid) lowest-importance valid tokens of the
    batch (the paper's per-batch quantile). ``global``: every branch skips the tokens with
    importance <= ``threshold``, one value for all branches (the budget's quantile of all
    importances of the previous step). ``counts`` ((layer, branch) -> tokens to skip) fixes how many
    tokens each branch skips (the lowest-importance ones): distill takes them from the original
    model's pass, so the step skips exactly its budget even when skipping lowers the importances of
    later branches.
    """
    if budget <= 0:
        return None
    n_valid = int(valid.sum())

    def decide(imp: torch.Tensor, layer: int, branch: int) -> torch.Tensor | None:
        if (layer, branch) in never_skip:
            return None
        if counts is not None:
            return skip_lowest(imp, valid, counts.get((layer, branch), 0))
        if allocation == "global":
            return None if threshold is None else (imp > threshold) | ~valid
        return skip_lowest(imp, valid, int(budget * n_valid))

    return decide


@dataclass(frozen=True)
class StepStats:
    loss: float  # objective term (CE or KL), without the sparsity term
    sparsity: float  # mean over branches of mean(g^2)
    gate_mean: float  # mean importance
    skipped: float  # share of valid (token, branch) evaluations skipped
    budget: float  # the budget of this step
    tokens: int  # valid tokens in the batch
    compute_skipped: float | None = None  # standins: share of the draft's layer compute skipped


def step_budget(config, step: int) -> float:
    """The skip budget of a step: the warm-up ramp (paper), the context budgets in turn (standins), or
    a seeded draw in the ramped range."""
    if config.objective == "standins":
        return config.context_budgets[step % len(config.context_budgets)]
    ramp = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    if config.objective == "paper":
        return ramp * config.budget_max
    u = float(torch.rand(1, generator=torch.Generator().manual_seed(config.seed * 7919 + step)))
    return ramp * (config.budget_min + u * (config.budget_max - config.budget_min))


def train_step(
    engine: Engine,
    gates: GateSet,
    ids: torch.Tensor,
    valid: torch.Tensor,
    config,
    budget: float,
    threshold: float | None,
) -> tuple[torch.Tensor, StepStats, torch.Tensor]:
    """Loss (with grad), its stats, and the flat importances of valid (token, branch) pairs."""
    counts, target_logp = None, None
    if config.objective == "standins":  # the draft as it decodes: its calibrated thresholds, every position
        kvs = [] if config.draft_round else None  # the original model's K/V: the verified prefix of each round
        with torch.no_grad():
            target_logp = dense_forward(engine.weights, ids, kvs=kvs).float().log_softmax(-1)
        runs, record = gates.draft_runs(budget), ForwardRecord()
        decide = lambda imp, i, b: runs(imp, i, b) | ~valid  # noqa: E731
        logits = gated_forward(engine, ids, gates, decide, record, kvs, config.draft_round or 1).float()
        logp = logits.log_softmax(-1)[valid]
        loss = (target_logp[valid].exp() * (target_logp[valid] - logp)).sum(-1).mean()  # KL(full || draft)
        if config.top1_weight:
            loss = loss + config.top1_weight * F.nll_loss(logp, target_logp[valid].argmax(-1))
        skips = (~torch.stack(record.run)[:, valid]).float().mean(1)  # (2L,) share skipped, order (layer, branch)
        cost, saved = engine.pass_costs("project", gates)
        compute = sum(saved[k % 2][k // 2] * float(skips[k]) for k in range(len(skips))) / sum(map(sum, cost))
        stats = StepStats(float(loss.detach()), 0.0, 0.0, float(skips.mean()), budget, int(valid.sum()), compute)
        return loss, stats, torch.zeros(0)
    if config.objective == "distill":
        with torch.no_grad():  # the original model (gates read along, nothing skipped or scaled)
            full = ForwardRecord()
            target_logp = dense_forward(engine.weights, ids, _recorder(gates, full)).float().log_softmax(-1)
        if config.allocation == "global" and threshold is None:
            # this batch's quantile at full compute says how many tokens each branch skips
            imp_full = torch.stack(full.importance)[:, valid]  # (2L, n_valid), order (layer, branch)
            below = (imp_full <= budget_quantile(imp_full, budget)).sum(1).tolist()
            counts = {(k // 2, k % 2): int(n) for k, n in enumerate(below)}
    record = ForwardRecord()
    decide = quantile_decider(budget, valid, config.allocation, frozenset(config.never_skip), threshold, counts)
    logits = gated_forward(engine, ids, gates, decide, record).float()
    if config.objective == "distill":
        kl = (target_logp.exp() * (target_logp - logits.log_softmax(-1))).sum(-1)  # (B, T)
        loss = kl[valid].mean()
    else:
        mask = valid[:, 1:] & valid[:, :-1]
        loss = F.cross_entropy(logits[:, :-1][mask], ids[:, 1:][mask])
    sparsity = torch.stack(record.sq)[:, valid].mean()  # (2L, B, T) -> mean
    imp = torch.stack(record.importance)[:, valid]  # (2L, n_valid)
    runs = [r[valid] if r is not None else torch.ones_like(valid[valid]) for r in record.run]
    skipped = 1.0 - float(torch.stack(runs).float().mean())
    stats = StepStats(float(loss.detach()), float(sparsity.detach()), float(imp.mean()), skipped, budget, int(valid.sum()))
    return loss + config.sparsity * sparsity, stats, imp.flatten()


def _recorder(gates: GateSet, record: ForwardRecord):
    """A dense-forward hook that runs every branch unchanged and records the gates' importances."""

    def add(h, x, o, i, branch):
        record.importance.append(gates.gate(i, branch)(x).mean(-1))
        return h + o

    return add


def train_gradient(model, config, gates: GateSet, pieces: Callable[[], list[list[int]]], out: Path, accelerator) -> GateSet:
    """The loop of ``paper`` and ``distill``: seeded batches, loss, backward, (all-reduce), update.
    ``out/checkpoint.pt`` holds gates, optimizer and step; the gates also go to ``out/gates``."""
    for p in model.hf_model.parameters():
        p.requires_grad_(False)
    if config.init_order:
        init_from_order(gates, [tuple(x) for x in json.loads(Path(config.init_order).read_text())])
    optimizer = make_optimizer(gates, config)
    state = {"step": 0, "prev_imp": None}
    ckpt = out / CHECKPOINT_NAME
    if config.resume and ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        if saved["gate_config"] != gates.config.__dict__:
            raise ValueError(f"{ckpt} holds gates of another shape ({saved['gate_config']}): use another output_dir")
        gates.load_state_dict(saved["gates"])
        gates.thresholds.update(saved.get("thresholds", {}))  # steered while the gates trained
        optimizer.load_state_dict(saved["optimizer"])
        state = {"step": saved["step"], "prev_imp": saved["prev_imp"]}
    for group in optimizer.param_groups:  # what lr_factor scales (checkpoints before schedules: their constant lr)
        group.setdefault("initial_lr", group["lr"])
    world = accelerator.num_processes

    def step(i: int, ids: torch.Tensor, valid: torch.Tensor) -> dict:
        budget = step_budget(config, i)
        threshold = None  # distill: the quantile of this batch's importances (see train_step)
        if config.objective == "paper" and config.allocation == "global" and budget > 0:
            if state["prev_imp"] is None:
                with torch.no_grad():  # first step: importances of the gated model at full compute
                    rec = ForwardRecord()
                    gated_forward(model.engine, ids, gates, None, rec)
                    state["prev_imp"] = torch.stack(rec.importance)[:, valid].flatten().cpu()
            threshold = float(budget_quantile(state["prev_imp"], budget))  # the previous step's quantile
        loss, stats, imp = train_step(model.engine, gates, ids, valid, config, budget, threshold)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        for p in gates.parameters():
            if p.grad is None:
                continue
            if world > 1:  # gates are called branch by branch, not through a DDP wrapper: sync by hand
                p.grad = accelerator.reduce(p.grad, reduction="mean")
            if optimizer_settings(config)[0] == "sgd":
                torch.nn.utils.clip_grad_norm_(p, config.clip)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(config, i)
        optimizer.step()
        state["prev_imp"] = imp.cpu()
        if config.train_gates:
            steer_threshold(gates, budget, stats.compute_skipped)
        shown = {"loss": f"{stats.loss:.4f}", "sparsity": f"{stats.sparsity:.3f}", "skip": f"{stats.skipped:.3f}",
                 "budget": f"{stats.budget:.2f}"}  # fmt: skip
        return shown if stats.compute_skipped is None else {**shown, "compute": f"{stats.compute_skipped:.3f}"}

    def save(done: int) -> None:
        if accelerator.is_main_process:
            save_atomic({"gates": gates.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                         "prev_imp": state["prev_imp"], "config": asdict(config), "thresholds": dict(gates.thresholds),
                         "gate_config": gates.config.__dict__}, ckpt)  # fmt: skip
            save_gates(gates, out / "gates")

    data = pieces() if state["step"] < config.steps else []
    run_steps(config, data, state["step"], accelerator, step, save, padding_id(model.tokenizer))
    return gates


def train_standins(model, config, gates: GateSet, pieces, out: Path, accelerator) -> GateSet:
    """The ``standins`` objective: the draft-only parameters of ``gates`` (stand-ins, adapters)
    trained by KL distillation into the draft the gates make at ``config.context_budget`` (several:
    in turn); the gates stay as they are (see :func:`train_step`), unless ``config.train_gates``:
    then they train with them, each skipped token's gate by what running its branch would gain
    (see :func:`gated_forward`), and each budget's threshold is steered so that the draft keeps
    skipping that share of its compute (:func:`steer_threshold`)."""
    draft_only = [m for m in (gates.standins, gates.adapters) if m is not None]
    if not draft_only:
        raise ValueError(
            f"{config.context_gates} has no stand-ins or adapters to train: pass --standin-rank R or --adapter-rank R"
        )
    for budget in config.context_budgets:  # an uncalibrated draft fails here, before any step
        gates.draft_runs(budget)
    for p in gates.parameters():
        p.requires_grad_(False)
    for p in (p for m in draft_only for p in m.parameters()):
        p.requires_grad_(True)
    if config.train_gates:
        for p in (p for m in (gates.attn, gates.mlp) for p in m.parameters()):
            p.requires_grad_(True)
    gates = train_gradient(model, config, gates, pieces, out, accelerator)
    for p in gates.parameters():
        p.requires_grad_(False)
    return gates


def steer_threshold(gates: GateSet, budget: float, skipped: float, gain: float = 2.0) -> None:
    """Move the draft's threshold at ``budget`` (in log-odds, the same value for every branch that
    may skip) by ``gain`` times how far the compute it skipped (``skipped``) fell short of the
    budget: training gates raise or lower the importances they give, the budget stays what it says."""
    key = min(gates.thresholds, key=lambda b: abs(b - budget))
    t = gates.thresholds[key]
    moved = torch.sigmoid(torch.logit(t.clamp(1e-6, 1 - 1e-6)) + gain * (budget - skipped))
    gates.thresholds[key] = torch.where(t >= 0, moved.to(t.dtype), t)  # below 0: a branch that never skips


def init_from_order(gates: GateSet, order: list[tuple[int, int]], spread: float = 4.0) -> None:
    """Start the gates as a static skip order: gate biases rise linearly from -spread (the first,
    least harmful branch of ``order``) to +spread, and the weights start at zero, so a global
    threshold at budget b first skips whole branches in this order (the Draft & Verify draft);
    training then makes the choice token-wise. Branches missing from ``order`` get +spread."""
    n = 2 * gates.config.num_layers
    with torch.no_grad():
        for i in range(gates.config.num_layers):
            for b in (0, 1):
                gate = gates.gate(i, b)
                last = gate.proj[-1] if isinstance(gate.proj, torch.nn.Sequential) else gate.proj
                rank = order.index((i, b)) if (i, b) in order else n - 1
                last.bias.fill_(-spread + 2 * spread * rank / (n - 1))
                last.weight.zero_()


def make_optimizer(gates: GateSet, config) -> torch.optim.Optimizer:
    """SGD with momentum (the gates' default) or AdamW (the stand-ins' default) over what trains.

    Why SGD for gates: the ranking of (token, branch) pairs across branches is what the global
    threshold uses, and it must follow how much each skip costs. Adam divides every parameter's step
    by its own gradient scale, so a gate whose branch barely matters moves as fast as one whose
    skipping destroys the prediction, and the ranking across branches is lost (measured here:
    importances stayed within +-0.01 of each other and KL at 5% skipped stayed > 1). SGD steps are
    proportional to the gradient (clipped per tensor, for the first catastrophic skips).
    """
    name, lr = optimizer_settings(config)
    params = _trained(gates)
    if config.train_gates:  # standins: the gates beside the draft-only parameters, at their own rate
        own = {id(p) for m in (gates.attn, gates.mlp) for p in m.parameters()}
        params = [{"params": [p for p in params if id(p) not in own]},
                  {"params": [p for p in params if id(p) in own], "lr": config.gate_lr}]  # fmt: skip
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def lr_factor(config, step: int) -> float:
    """The learning rate of ``step`` as a share of the configured one: 1 (``constant``), or a cosine
    from 1 at step 0 to 0 at ``config.steps`` (a resumed run with more steps stretches the rest of it)."""
    if config.lr_schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, config.steps) / max(1, config.steps)))


def optimizer_settings(config) -> tuple[str, float]:
    """(optimizer, learning rate): the config's, or the defaults of what the objective trains."""
    name = config.optimizer or ("adamw" if config.objective == "standins" else "sgd")
    return name, config.lr if config.lr is not None else (1e-3 if name == "adamw" else 0.5)


def _trained(gates: GateSet) -> list[torch.nn.Parameter]:
    """What a run trains: the gates, or with the ``standins`` objective only the stand-ins."""
    return [p for p in gates.parameters() if p.requires_grad]
