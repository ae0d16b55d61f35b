"""Gate training, on ``accelerate``: the configuration, and one entry point for every objective.

Three objectives (``TrainConfig.objective``), siblings that share the data (:mod:`specgate.data`),
the layer math (:mod:`specgate.layers`) and the loop skeleton (:mod:`specgate.loop`):

- ``damage`` (default, :mod:`specgate.damage`): no gradient descent. Every (token, branch) of the
  data is labelled with what skipping that branch alone for that token alone costs (KL to the
  original model), and each scalar gate is fitted to predict it.
- ``paper`` and ``distill`` (:mod:`specgate.gradient`): the paper's cross-entropy + L2 objective,
  and KL distillation into the skipping draft, by gradient descent on a dense forward.
- ``standins`` (:mod:`specgate.gradient`): the gates of ``context_gates`` stay as they are; their
  stand-ins (or new ones, ``standin_rank``) and new adapters (``adapter_rank``) are trained by KL
  distillation into the draft those gates make at ``context_budget``: draft-only parameters,
  trained under the draft's own skips and its own K/V history (``draft_round`` R: the history of
  decoding instead, rounds of R draft tokens after a prefix with the original model's K/V).
  ``train_gates`` trains the gates with them (joint fine-tuning from the damage-fitted start).

``standin_rank`` fits stand-ins for skipped branches (:mod:`specgate.standin`) on the training text
first (with ``context_gates``: only at the tokens that draft skips); the objectives then train with
them in place, and they are saved with the gates.
``context_gates`` makes a second round of ``damage``: every skip is priced in the context of the
draft those (calibrated) gates make at ``context_budget``, so skips that cannot go together are not
all chosen; the new gates keep that draft's stand-ins.

``scale_output=False`` (the default) keeps every computed branch output unscaled: the gates only
decide what to skip, so at budget 0 the draft *is* the original model. ``init_order`` starts the
gates as a static skip order (least harmful branches first, measured by ``eval/gate_quality.py``).
"""

from __future__ import annotations

import functools
import re
import typing
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from . import damage, gradient
from .data import batched, chunk, collate, default_corpus, load_documents, padding_id
from .gates import CONFIG_NAME, GateConfig, GateSet, load_gates, save_gates
from .loop import check_run
from .policy import ALLOCATIONS, Allocation
from .standin import StandIns, branch_moments, fit_standins
from .vocab import rank_tokens

Objective = Literal["paper", "distill", "damage", "standins"]
# Settings a resumed run may change: everything else must match what the checkpoints were made from.
RESUMABLE = ("steps", "time_limit_s", "threads", "checkpoint_every", "resume", "output_dir", "ridge")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; the ``specgate train`` flags read their defaults here."""

    objective: Objective = "damage"  # see the module docstring; README: which drafts best
    data: str | None = None  # .txt or .jsonl file; None: the default corpus (see default_corpus)
    output_dir: str | None = None  # None: runs/<model>-<objective>
    steps: int = 1000
    batch_size: int = 4  # sequences per step and process
    seq_len: int = 256
    optimizer: Literal["sgd", "adamw"] | None = None  # None: sgd for gates, adamw for stand-ins (make_optimizer)
    lr: float | None = None  # None: 0.5 with sgd, 1e-3 with adamw
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: lr decays to 0 at step `steps` (lr_factor)
    clip: float = 1.0  # sgd: each parameter tensor's gradient norm is clipped to this
    sparsity: float = 0.1  # lambda of the L2 term mean(g^2)
    ridge: float = 1.0  # damage: L2 penalty on the (standardized) weights of the Poisson fit
    standin_rank: int | None = None  # stand-ins for skipped branches (specgate.standin; 0: mean); None: none
    adapter_rank: int | None = None  # standins: train draft-only adapters of this rank (0: a bias per branch); existing ones widen
    context_gates: str | None = None  # damage, standins: the draft of these calibrated gates (stand-ins included)
    context_budget: float | tuple[float, ...] = 0.5  # ... at this budget (standins: several, one per step in turn)
    draft_round: int = 0  # standins: 0: the draft's own K/V everywhere; R: rounds of R draft tokens after a verified prefix
    train_gates: bool = False  # standins: train the gates too (jointly with the stand-ins and adapters)
    gate_lr: float = 3e-5  # ... at this learning rate
    top1_weight: float = 0.0  # standins: plus this times the cross-entropy of the original model's top-1 token
    budget_max: float = 0.5  # share of (token, branch) evaluations skipped (warm-up target for paper)
    budget_min: float = 0.1  # distill: lower end of the sampled budgets
    warmup_steps: int = 200  # budget warm-up: 0 -> budget_max (paper); range scaled up (distill)
    allocation: Allocation = "global"  # one importance threshold over all branches, or per branch
    scale_output: bool = False  # True: gates scale branch outputs (the GateSkip model)
    gate_kind: str | None = None  # None: "scalar" for damage, "lowrank" otherwise
    gate_rank: int = 32
    gate_bias_init: float | None = None  # None: 5.0 with scale_output (starts as the original model), else 0.0
    init_order: str | None = None  # JSON list of [layer, branch], least harmful first: see init_from_order
    never_skip: tuple[tuple[int, int], ...] = ()  # (layer, branch) pairs that always run
    seed: int = 0
    checkpoint_every: int = 50
    resume: bool = True  # continue from the checkpoints in output_dir (refused if made from other inputs)
    time_limit_s: float | None = None  # stop (with a checkpoint) after this many seconds
    threads: int | None = None  # torch.set_num_threads on CPU
    # default corpus: the model's own answers to specgate.prompts (train split) + pydoc topics
    answers_per_prompt: int = 2  # 1 greedy, the rest sampled at temperature 0.8
    answer_tokens: int = 256
    pydoc_share: float = 0.3  # share of default-corpus tokens taken from pydoc_data.topics

    @property
    def context_budgets(self) -> tuple[float, ...]:
        b = self.context_budget
        return b if isinstance(b, tuple) else (b,)

    def __post_init__(self):
        if self.objective not in typing.get_args(Objective):
            raise ValueError(f"objective must be one of {typing.get_args(Objective)}, got {self.objective!r}")
        if self.objective == "standins" and not self.context_gates:
            raise ValueError("the standins objective trains the stand-ins of a calibrated draft: pass --context-gates DIR")
        if self.objective == "damage" and (self.gate_kind not in (None, "scalar") or self.scale_output):
            raise ValueError("the damage objective fits scalar gates that only pick skips: drop --gate-kind and --scale-output")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be 'global' or 'branch', got {self.allocation!r}")
        if not (0.0 <= self.budget_min <= 1.0 and 0.0 <= self.budget_max <= 1.0):
            raise ValueError(f"budgets must be in [0, 1], got {self.budget_min}, {self.budget_max}")
        if self.objective == "distill" and self.budget_min > self.budget_max:
            raise ValueError(f"budget_min {self.budget_min} is above budget_max {self.budget_max}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.optimizer not in (None, "sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.steps < 0 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("steps must be >= 0, batch_size >= 1 and seq_len >= 2")
        if isinstance(self.context_budget, (tuple, list)):  # one budget is kept as a float, as before
            b = self.context_budget
            object.__setattr__(self, "context_budget", b[0] if len(b) == 1 else tuple(b))  # a frozen dataclass
        if not self.context_budgets or not all(0.0 <= b <= 1.0 for b in self.context_budgets):
            raise ValueError(f"context_budget: one budget or more, each in [0, 1], got {self.context_budget}")
        if len(self.context_budgets) > 1 and (self.objective != "standins" or self.standin_rank is not None):
            raise ValueError(
                "several context budgets are for the standins objective's gradient training; damage labels and the "
                "closed-form stand-in fit (--standin-rank) take one"
            )
        if self.draft_round < 0:
            raise ValueError(f"draft_round must be >= 0, got {self.draft_round}")
        if (self.draft_round or self.train_gates or self.top1_weight) and self.objective != "standins":
            raise ValueError("draft_round, train_gates and top1_weight are for the standins objective")
        if self.top1_weight < 0:
            raise ValueError(f"top1_weight must be >= 0, got {self.top1_weight}")
        if self.gate_lr <= 0:
            raise ValueError(f"gate_lr must be > 0, got {self.gate_lr}")
        if self.context_gates and self.objective not in ("damage", "standins"):
            raise ValueError("context_gates is for the damage and standins objectives")
        if self.standin_rank is not None and self.standin_rank < 0:
            raise ValueError(f"standin_rank must be >= 0 (0: each branch's mean output), got {self.standin_rank}")
        if self.adapter_rank is not None and (self.adapter_rank < 0 or self.objective != "standins"):
            raise ValueError(f"adapter_rank (>= 0, got {self.adapter_rank}) is for the standins objective, which trains them")
        if self.checkpoint_every < 1 or (self.threads is not None and self.threads < 1):
            raise ValueError("checkpoint_every and threads must be >= 1")


def train(model_or_name, config: TrainConfig = TrainConfig(), documents: list[list[int]] | None = None) -> GateSet:
    """Train gates for a model (a :class:`SpecGateModel` or a name for :func:`specgate.load`).

    Checkpoints go to ``output_dir`` (every ``checkpoint_every`` steps, at the end, on Ctrl-C), the
    gates to ``output_dir/gates`` (load them with ``specgate.load(..., gates=output_dir + "/gates")``).
    A run resumes from the checkpoints when ``config.resume``, and refuses those of a run made from
    another model, data or settings. Data order and budgets are pure functions of (seed, step), so a
    resumed run computes the same steps as an uninterrupted one.
    """
    from accelerate import Accelerator

    from .model import SpecGateModel, load

    if config.threads:
        torch.set_num_threads(config.threads)
    model: SpecGateModel = load(model_or_name, gates=None) if isinstance(model_or_name, str) else model_or_name
    accelerator = Accelerator(cpu=model.engine.device.type == "cpu")
    out = output_dir(model, config)
    if accelerator.is_main_process:
        check_run(out, made_from(model, config, documents), config.resume)
        _warn_if_calibrated(out / "gates")
    accelerator.wait_for_everyone()

    docs = functools.cache(lambda: training_documents(model, config, out, documents))

    def pieces() -> list[list[int]]:
        return chunk(docs(), config.seq_len)

    context = None  # a calibrated draft (gates are often stored in float16: computed in the model's dtype)
    if config.context_gates:
        context = load_gates(config.context_gates, model.config, dtype=model.engine.dtype)
    standins = None if context is None else context.standins
    if config.objective == "damage" and context is not None and context.adapters is not None:
        raise ValueError(
            f"{config.context_gates} has draft adapters, which second-round damage labels do not model: "
            "take the gates they were trained on as --context-gates, then train adapters for the new gates"
        )
    if config.standin_rank is not None:  # closed form, deterministic: refitted, not checkpointed
        batches = (collate(p, padding_id(model.tokenizer)) for p in batched(pieces(), config.batch_size))
        where = None if context is None else skipped_by(context, config.context_budget)
        standins = fit_standins(branch_moments(model.engine.weights, batches, where), config.standin_rank)
        if context is not None:
            context.standins = standins
    if config.objective == "damage":  # no gradient: labels, then a convex fit per gate
        decide = None if context is None else damage.draft_decisions(context, config.context_budget)
        gates = damage.train_damage(model, config, gate_config(model, config), pieces, out, accelerator, standins, decide)
    elif config.objective == "standins":
        if config.adapter_rank is not None and context.adapters is not None:  # keep what they learned
            context.adapters = context.adapters.widen(config.adapter_rank, config.seed)
        elif config.adapter_rank is not None:
            c = model.config
            context.adapters = StandIns.adapters(c.num_hidden_layers, c.hidden_size, config.adapter_rank, config.seed)
        gates = gradient.train_standins(model, config, context, pieces, out, accelerator)
    else:
        torch.manual_seed(config.seed)
        gates = GateSet(gate_config(model, config)).to(accelerator.device)
        gates.standins = standins
        gates = gradient.train_gradient(model, config, gates, pieces, out, accelerator)
    gates.token_ranking = rank_tokens(docs(), model.config.vocab_size)  # the draft vocabulary's order
    if accelerator.is_main_process:
        save_gates(gates, out / "gates")
    return gates


def skipped_by(gates: GateSet, budget: float):
    """where(x, layer, branch): the tokens the single-token draft of ``gates`` at ``budget`` skips."""
    runs = damage.draft_decisions(gates, budget)
    return lambda x, i, b: ~runs(x, i, b)


def _warn_if_calibrated(gates_dir: Path) -> None:
    """Training rewrites ``gates_dir`` with uncalibrated gates: say so when it holds calibrated ones."""
    if (gates_dir / CONFIG_NAME).is_file() and (old := load_gates(gates_dir)).thresholds:
        print(
            f"{gates_dir} holds gates calibrated for budgets {sorted(old.thresholds)}; this run replaces them with "
            "uncalibrated gates: calibrate them again (`specgate calibrate` or `specgate train --calibrate`)",
            file=sys.stderr,
        )


def output_dir(model, config: TrainConfig) -> Path:
    """``config.output_dir``, or ``runs/<model>-<objective>``: runs of other models never share one."""
    if config.output_dir:
        return Path(config.output_dir)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model.name or model.config.model_type).name)
    return Path("runs") / f"{name}-{config.objective}"


def made_from(model, config: TrainConfig, documents) -> dict:
    """What a run's checkpoints depend on: the model (name, shape, a checksum of its weights), the
    data and every setting a resumed run may not change."""
    c = model.config
    head = model.engine.weights.lm_head
    return {
        "model": model.name, "model_type": c.model_type, "hidden_size": c.hidden_size,
        "num_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
        "weights_checksum": round(float(head[:64].detach().double().sum()), 6),
        "documents": None if documents is None else len(documents),
        **{k: v for k, v in asdict(config).items() if k not in RESUMABLE},
    }  # fmt: skip


def training_documents(model, config: TrainConfig, out: Path, documents: list[list[int]] | None = None) -> list[list[int]]:
    """The training text: ``documents``, else ``config.data``, else the default corpus (cached in
    ``out``). The draft vocabulary is ranked on it too."""
    if documents is not None:
        return documents
    if config.data:
        return load_documents(config.data, model.tokenizer)
    return default_corpus(
        model, out / "corpus.jsonl", answers_per_prompt=config.answers_per_prompt, answer_tokens=config.answer_tokens,
        pydoc_share=config.pydoc_share, max_doc_tokens=4 * config.seq_len, seed=config.seed,
    )  # fmt: skip


def gate_config(model, config: TrainConfig) -> GateConfig:
    """The shape of the gates a run trains for ``model``."""
    c = model.config
    bias = config.gate_bias_init if config.gate_bias_init is not None else (5.0 if config.scale_output else 0.0)
    kind = config.gate_kind or ("scalar" if config.objective == "damage" else "lowrank")
    return GateConfig(
        hidden_size=c.hidden_size, num_layers=c.num_hidden_layers, kind=kind, rank=config.gate_rank,
        bias_init=bias, model_type=c.model_type, model_name=model.name, scale_output=config.scale_output,
    )  # fmt: skip
