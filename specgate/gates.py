"""GateSkip residual gates and gate files.

Every attention and every MLP branch of every decoder layer gets a gate ``g = sigmoid(W x + b)``
that reads the branch's normed input ``x`` (detached) and scales the branch's output before the
residual add: ``h <- h + g * branch(x)``. A token's importance for the branch is ``mean_j g_j``;
low-importance tokens skip the branch (see ../shared/reference/GATESKIP.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from .policy import BudgetPolicy
from .sparse_inputs import PROJECTIONS, InputCuts
from .standin import StandIns

GateKind = Literal["full", "lowrank", "scalar"]
WEIGHTS_NAME, CONFIG_NAME = "gates.safetensors", "gate_config.json"
RANKING_KEY = "token_ranking"  # the draft vocabulary's ranking, stored with the gates


class Gate(nn.Module):
    """One branch's gate: (..., d) -> (..., d) values in (0, 1), or (..., 1) for ``scalar``."""

    def __init__(self, hidden: int, kind: GateKind = "lowrank", rank: int = 64, bias_init: float = 5.0):
        super().__init__()
        if kind == "full":
            self.proj = nn.Linear(hidden, hidden)
        elif kind == "lowrank":
            self.proj = nn.Sequential(nn.Linear(hidden, rank, bias=False), nn.Linear(rank, hidden))
        elif kind == "scalar":
            self.proj = nn.Linear(hidden, 1)
        else:
            raise ValueError(f"unknown gate kind {kind!r}: use 'full', 'lowrank' or 'scalar'")
        for p in self.parameters():
            nn.init.normal_(p, std=0.01)
        out = self.proj[-1] if kind == "lowrank" else self.proj
        nn.init.constant_(out.bias, bias_init)  # sigmoid(5) ~ 0.993: starts as the original model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(x.detach()))


@dataclass(frozen=True)
class GateConfig:
    hidden_size: int
    num_layers: int
    kind: GateKind = "lowrank"
    rank: int = 64
    bias_init: float = 5.0
    model_type: str = ""
    model_name: str = ""
    scale_output: bool = True  # drafts multiply branch outputs by the gate (False: gates only pick skips)


class GateSet(nn.Module):
    """The gates of a whole model: ``attn[i]`` and ``mlp[i]`` for decoder layer ``i``.

    ``thresholds`` maps a budget (share of the single-token draft's layer compute to skip) to a
    (2, num_layers) tensor of importance thresholds, row 0 attention, row 1 MLP, measured by
    calibration; a branch with importance at or below its threshold is skipped. ``token_ranking``:
    every token id, most frequent in the model's own outputs first, for the draft vocabulary
    (:mod:`specgate.vocab`); None if the gates were saved without one. ``standins``: what a draft
    adds where it skips a branch, ``adapters``: what it adds beside a branch's output where it
    runs it (:mod:`specgate.standin`); None: nothing. A pass that skips nothing uses neither.
    ``input_cuts`` maps a compute share to the (num_layers, 4) thresholds of a sparse-inputs draft
    that skips it (:mod:`specgate.sparse_inputs`), measured by calibration too.
    """

    def __init__(self, config: GateConfig):
        super().__init__()
        self.config = config
        make = lambda: Gate(config.hidden_size, config.kind, config.rank, config.bias_init)  # noqa: E731
        self.attn = nn.ModuleList(make() for _ in range(config.num_layers))
        self.mlp = nn.ModuleList(make() for _ in range(config.num_layers))
        self.thresholds: dict[float, torch.Tensor] = {}
        self.input_cuts: dict[float, torch.Tensor] = {}
        self.token_ranking: torch.Tensor | None = None
        self.standins: StandIns | None = None
        self.adapters: StandIns | None = None

    def gate(self, layer: int, branch: int) -> Gate:
        return (self.attn if branch == 0 else self.mlp)[layer]

    def policy(self, budget: float) -> BudgetPolicy:
        """The skip policy at ``budget``, with calibrated single-token thresholds if there are any
        (budget 0 skips nothing: a draft that saves only by its precision or vocabulary)."""
        thresholds = None
        if self.thresholds and budget > 0:
            nearest = min(self.thresholds, key=lambda b: abs(b - budget))
            if abs(nearest - budget) > 1e-6:
                raise ValueError(
                    f"gates are calibrated for budgets {sorted(self.thresholds)}, not {budget}: "
                    f"run `specgate calibrate --budgets {budget}` or pick a calibrated budget"
                )
            thresholds = self.thresholds[nearest]
        return BudgetPolicy(budget=budget, thresholds=thresholds)

    def cuts(self, share: float) -> InputCuts:
        """The sparse-inputs draft that skips ``share`` of the compute (its calibrated thresholds)."""
        found = [s for s in self.input_cuts if abs(s - share) < 1e-6]
        if not found:
            raise ValueError(
                f"the gates have sparse-input thresholds for {sorted(self.input_cuts) or 'no shares'}, not {share}: "
                f"run `specgate calibrate --sparse-inputs {share}` on them, or pick a calibrated share"
            )
        return InputCuts(self.input_cuts[found[0]])

    def draft_runs(self, budget: float):
        """runs(importance, layer, branch) -> bool tensor of importance's shape: what the
        single-token draft at ``budget`` runs (importance above its calibrated threshold)."""
        thresholds = self.policy(budget).thresholds
        if thresholds is None:
            raise ValueError("this needs the draft's calibrated thresholds: run `specgate calibrate` on the gates first")
        values = thresholds.tolist()
        return lambda importance, layer, branch: importance > values[branch][layer]


def save_gates(gates: GateSet, path: str | Path) -> Path:
    """Write ``gates.safetensors`` and ``gate_config.json`` into the directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in gates.state_dict().items()}
    for budget, t in gates.thresholds.items():
        tensors[f"thresholds.{budget:.4f}"] = t.detach().float().contiguous()
    for share, t in gates.input_cuts.items():
        tensors[f"input_cuts.{share:.4f}"] = t.detach().float().contiguous()
    if gates.token_ranking is not None:
        tensors[RANKING_KEY] = gates.token_ranking.to(torch.int32).contiguous()
    (path / WEIGHTS_NAME).write_bytes(save(tensors))  # the umask's mode: safetensors' save_file writes 0600
    (path / CONFIG_NAME).write_text(json.dumps(gates.config.__dict__, indent=2) + "\n")
    return path


def load_gates(path: str | Path, model_config=None, dtype: torch.dtype | None = None) -> GateSet:
    """Load gates saved by :func:`save_gates`; refuse them if they do not fit ``model_config``."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{path} is not a gate directory: expected {CONFIG_NAME} and {WEIGHTS_NAME} (written by save_gates)"
        )
    try:
        config = GateConfig(**json.loads((path / CONFIG_NAME).read_text()))
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / CONFIG_NAME} is not a valid gate config: {e}") from e
    if model_config is not None:
        check_fits(config, model_config, path)
    gates = GateSet(config)
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except SafetensorError as e:
        raise ValueError(
            f"gate file {path / WEIGHTS_NAME} is truncated or corrupt ({e}): write it again (save_gates, "
            "`specgate train`), or reinstall specgate for the gates it ships"
        ) from e
    for key in [k for k in tensors if k.startswith("thresholds.")]:
        gates.thresholds[float(key.split(".", 1)[1])] = tensors.pop(key)
    for key in [k for k in tensors if k.startswith("input_cuts.")]:
        gates.input_cuts[float(key.split(".", 1)[1])] = cuts = tensors.pop(key)
        if cuts.shape != (config.num_layers, len(PROJECTIONS)):
            raise ValueError(
                f"sparse-input thresholds {key} in {path / WEIGHTS_NAME} have shape {tuple(cuts.shape)}, not "
                f"({config.num_layers}, {len(PROJECTIONS)}): the file is damaged; calibrate them again"
            )
    if RANKING_KEY in tensors:
        gates.token_ranking = tensors.pop(RANKING_KEY).long()
        if model_config is not None and len(gates.token_ranking) != model_config.vocab_size:
            raise ValueError(
                f"the token ranking in {path / WEIGHTS_NAME} covers {len(gates.token_ranking)} tokens, the model has "
                f"{model_config.vocab_size}: these gates were made for another tokenizer"
            )
    for name in ("standins", "adapters"):
        if f"{name}.down" in tensors:
            setattr(gates, name, StandIns(config.num_layers, config.hidden_size, tensors[f"{name}.down"].shape[-1]))
    expected = {k: v.shape for k, v in gates.state_dict().items()}
    found = {k: v.shape for k, v in tensors.items()}
    if expected != found:
        bad = sorted(set(expected.items()) ^ set(found.items()))[:4]
        raise ValueError(f"gate file {path / WEIGHTS_NAME} does not match its config: {bad} ...")
    gates.load_state_dict(tensors)
    return gates.to(dtype) if dtype is not None else gates


def check_fits(config: GateConfig, model_config, path: Path | str = "the gate file") -> None:
    """Refuse gates trained for another model, saying what to do."""
    hidden, layers = model_config.hidden_size, model_config.num_hidden_layers
    if (config.hidden_size, config.num_layers) != (hidden, layers):
        raise ValueError(
            f"gates in {path} were trained for a model with hidden size {config.hidden_size} and "
            f"{config.num_layers} layers (model_type {config.model_type!r}), but this model has "
            f"hidden size {hidden} and {layers} layers: train gates for it with `specgate train`"
        )
    if config.model_type and config.model_type != model_config.model_type:
        raise ValueError(
            f"gates in {path} are for model_type {config.model_type!r}, this model is "
            f"{model_config.model_type!r}: train gates for it with `specgate train`"
        )
