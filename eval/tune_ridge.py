"""Choose the ridge of the damage fit on held-out labels (steps 36-44 of runs/damage_ship).

Fits on every 4th of steps 0-35 and prints, per budget 0.2-0.6, the summed single-skip damage
per token of the (token, branch) pairs a global ranking would skip: by the fit, and by each
branch's mean damage (a static ranking). Lower is better.

    .venv/bin/python eval/tune_ridge.py 0.1 1.0
"""
import torch, sys, specgate
from specgate.damage import branch_inputs, poisson_fit
torch.set_num_threads(2)
m = specgate.load("smollm2-135m-instruct", gates=None)
d = torch.load("runs/damage_ship/labels.pt")
xs = [branch_inputs(m.engine, ids.clamp_min(0), ids >= 0).half() if i % 4 == 0 or i >= 36 else None for i, ids in enumerate(d["ids"])]
ntr = 36
Xtr, Ytr = torch.cat(xs[:ntr:4], 1), torch.cat(d["damage"][:ntr:4], 1)
Xte, Yte = torch.cat(xs[ntr:], 1), torch.cat(d["damage"][ntr:], 1)
print("train", Xtr.shape[1], "test", Xte.shape[1], flush=True)
stat = Ytr.mean(1, keepdim=True).log().expand_as(Yte) + 1e-6 * torch.arange(60)[:, None]
def cost(score, b):
    k = int(b * Yte.numel())
    return float(Yte.flatten()[score.flatten().argsort()[:k]].sum() / Yte.shape[1])
print("static", [round(cost(stat, b), 3) for b in (0.2, 0.3, 0.4, 0.5, 0.6)], flush=True)
for ridge in [float(r) for r in sys.argv[1:]]:
    w, b = poisson_fit(Xtr, Ytr, ridge=ridge)
    pred = torch.einsum("gnd,gd->gn", Xte.float(), w) + b[:, None]
    print("ridge", ridge, [round(cost(pred, bb), 3) for bb in (0.2, 0.3, 0.4, 0.5, 0.6)], "max|w|", float(w.norm(dim=1).max()), flush=True)
