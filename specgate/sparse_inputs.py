"""Sparse inputs: a draft that reads only the weight columns its large inputs multiply.

Within a branch a draft runs, most of each projection's input entries are small. A draft pass with
sparse inputs zeroes the entries at or below a threshold, per layer and projection (the fused
q/k/v projection, the output projection, gate/up, down), so the weight columns they would multiply
need not be read; the verifier never does this, so output stays lossless. Decoding streams the
weights, so the compute skipped is counted as for skipped branches: weights not read, as a share
of all layers' weights (:meth:`Engine.branch_costs`). Sparse inputs combine with the gates' skips
(they cut the branches the draft runs) or stand alone (``SpecConfig(draft_budget=0, sparse_inputs=s)``).

Thresholds are quantiles of each projection's input magnitudes on calibration text, as for TEAL
(Liu et al., 2024): at compute share ``s`` a projection zeroes a share of its inputs that depends
on its kind and its layer, both chosen by measurement (:func:`calibrate_cuts`). They are stored
with the gates, per share (``GateSet.input_cuts``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

PROJECTIONS = ("qkv", "o", "gate_up", "down")  # columns of a (num_layers, 4) thresholds tensor
MAX_SHARE = 0.97  # the most of a projection's inputs a draft zeroes


class InputCuts:
    """A draft's thresholds: (num_layers, 4) tensor, one per layer and projection (:data:`PROJECTIONS`);
    entries with ``|x| <= threshold`` are zeroed."""

    def __init__(self, thresholds: torch.Tensor):
        self.thresholds = thresholds
        self.values = thresholds.tolist()  # host copies: a draft step reads no device value

    def keep(self, x: torch.Tensor, layer: int, proj: int) -> torch.Tensor:
        """Where x's entries are read (bool, x's shape)."""
        return x.abs() > self.values[layer][proj]

    def apply(self, x: torch.Tensor, proj: int, n_out: int, layer: int) -> torch.Tensor:
        """x with its small entries zeroed (a :data:`specgate.layers.Cut` once ``layer`` is bound)."""
        return x * self.keep(x, layer, proj)


class _Recorder(InputCuts):
    """Records input magnitudes (a sample of them per layer and projection) instead of cutting."""

    def __init__(self, num_layers: int, per_call: int = 65536):
        self.magnitudes = [[[] for _ in PROJECTIONS] for _ in range(num_layers)]
        self.per_call = per_call

    def apply(self, x, proj, n_out, layer):
        a = x.detach().abs().flatten().float()
        if a.numel() > self.per_call:
            a = a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(layer * 4 + proj))[: self.per_call]]
        self.magnitudes[layer][proj].append(a)
        return x


def projection_weights(weights) -> list[int]:
    """Weights per projection kind in one layer (all layers alike in the models we run)."""
    lw = weights.layers[0]
    return [lw.qkv_w.numel(), lw.o_w.numel(), lw.gate_up_w.numel(), lw.down_w.numel()]


def allocations(share: float, weights: list[int]) -> list[tuple[float, ...]]:
    """Candidate per-kind shares of inputs zeroed that skip ``share`` of the weights: the q/k/v and
    output projections alike, the down projection at or above the share, gate/up what makes the sum."""
    total = sum(weights)
    out = []
    for a, extra in itertools.product((-0.2, -0.1, 0.0, 0.1), (0.0, 0.1, 0.2, 0.3)):
        qkv = o = min(max(share + a, 0.0), 0.95)
        down = min(share + extra, 0.95)
        gate_up = (share * total - qkv * weights[0] - o * weights[1] - down * weights[3]) / weights[2]
        if 0.0 <= gate_up <= 0.95:
            out.append((qkv, o, gate_up, down))
    return out


@dataclass
class Calibrated:
    """What :func:`calibrate_cuts` found: ``thresholds`` (num_layers, 4), the ``split`` of the share
    among projection kinds, the ``spread`` of the per-layer shares and the ``agreement`` they reach."""

    thresholds: torch.Tensor
    split: tuple[float, ...]
    spread: float
    agreement: float


@torch.inference_mode()
def calibrate_cuts(weights, samples: torch.Tensor, share: float, prefix: int = 0, spreads=(0.05, 0.1, 0.15)) -> Calibrated:
    """Thresholds (num_layers, 4) that skip ``share`` of the weights, from the full model's input
    magnitudes on ``samples`` (B, N) token ids, chosen in two steps by how often the draft's first
    tokens agree with the full model's top-1 (teacher-forced: every position after ``prefix`` drafts
    one token against the full model's K/V before it, as after a verify pass):

    1. the split among projection kinds (:func:`allocations`), the same in every layer;
    2. shares moved between layers: each layer's sensitivity is the agreement lost when it alone
       zeroes 0.2 more of its inputs; layer i's shares change by ``-spread * z_i`` (z: the
       standardized sensitivities), then all by one constant so that they skip ``share`` again; the
       spread (0: none) that agrees most wins.
    """
    from .layers import dense_forward

    L, per_kind = len(weights.layers), torch.tensor(projection_weights(weights), dtype=torch.float)
    recorder, kvs = _Recorder(L), []
    full = dense_forward(weights, samples, kvs=kvs, cuts=recorder).argmax(-1)[:, prefix:]
    mags = [[torch.cat(m) for m in layer] for layer in recorder.magnitudes]

    def thresholds(shares: torch.Tensor) -> torch.Tensor:  # (L, 4) shares of inputs zeroed
        return torch.tensor([[float(torch.quantile(m[p], float(s))) if s > 0 else -1.0 for p, s in enumerate(row)]
                             for m, row in zip(mags, shares.tolist())])  # fmt: skip

    def agreement(shares: torch.Tensor) -> tuple[float, torch.Tensor]:
        t = thresholds(shares)
        draft = dense_forward(weights, samples, history=kvs, cuts=InputCuts(t)).argmax(-1)[:, prefix:]
        return float((draft == full).float().mean()), t

    best = None
    for split in allocations(share, per_kind.tolist()):
        agree, t = agreement(torch.tensor([split] * L))
        if best is None or agree > best.agreement:
            best = Calibrated(t, split, 0.0, agree)
    base = torch.tensor([best.split] * L)
    lost = []
    for i in range(L):
        alone = torch.zeros(L, 4)
        alone[i] = (base[i] + 0.2).clamp(max=MAX_SHARE)
        lost.append(1.0 - agreement(alone)[0])
    z = torch.tensor(lost)
    z = (z - z.mean()) / z.std().clamp(min=1e-9)
    for spread in spreads:
        shares = base - spread * z[:, None]
        for _ in range(3):  # shift back to the share (clamping may move it)
            shares = (shares + share - float((shares * per_kind).sum() / (L * per_kind.sum()))).clamp(0.0, MAX_SHARE)
        agree, t = agreement(shares)
        if agree > best.agreement:
            best = Calibrated(t, best.split, spread, agree)
    return best
