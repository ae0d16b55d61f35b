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
on its kind (the MLP's down projection, whose inputs are the most concentrated, more than the
rest), the split among kinds chosen by measurement (:func:`calibrate_cuts`). They are stored with
the gates, per share (``GateSet.input_cuts``).
"""

from __future__ import annotations

import itertools

import torch

PROJECTIONS = ("qkv", "o", "gate_up", "down")  # columns of a (num_layers, 4) thresholds tensor


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


@torch.inference_mode()
def calibrate_cuts(weights, samples: torch.Tensor, share: float, prefix: int = 0) -> tuple[torch.Tensor, tuple[float, ...], float]:
    """Thresholds (num_layers, 4) that skip ``share`` of the weights, from the full model's input
    magnitudes on ``samples`` (B, N) token ids; the split among projection kinds is the candidate
    (:func:`allocations`) whose first draft tokens agree most often with the full model's top-1
    (teacher-forced: every position after ``prefix`` drafts one token against the full model's K/V
    before it, as after a verify pass). Returns (thresholds, the split, its agreement)."""
    from .layers import dense_forward

    recorder, kvs = _Recorder(len(weights.layers)), []
    full = dense_forward(weights, samples, kvs=kvs, cuts=recorder).argmax(-1)[:, prefix:]
    mags = [[torch.cat(m) for m in layer] for layer in recorder.magnitudes]
    best = None
    for split in allocations(share, projection_weights(weights)):
        thresholds = torch.tensor([[float(torch.quantile(m[p], s)) if s > 0 else -1.0 for p, s in enumerate(split)] for m in mags])
        draft = dense_forward(weights, samples, history=kvs, cuts=InputCuts(thresholds)).argmax(-1)[:, prefix:]
        agree = float((draft == full).float().mean())
        if best is None or agree > best[2]:
            best = (thresholds, split, agree)
    return best
