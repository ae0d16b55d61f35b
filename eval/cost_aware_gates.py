"""Make fitted damage gates rank skips by damage per unit of compute saved, without refitting.

``specgate train --objective damage`` now fits gates whose importance is the predicted log damage
minus the log of the compute a skip saves (``specgate.damage.gates_from_fit``). For gates fitted
before that, the same ranking is one bias shift per branch, done here; their thresholds are dropped
(they would skip another share now): calibrate the result again.

    python eval/cost_aware_gates.py --gates DIR --out DIR
"""

from __future__ import annotations

import argparse

import torch

import specgate
from specgate.damage import compute_saved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--gates", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    m = specgate.load(args.model, gates=args.gates)
    if m.gates.config.kind != "scalar":
        raise SystemExit("only scalar (damage-fitted) gates predict a log damage that a bias shift can rescale")
    saved = compute_saved(m.engine)
    shift = (saved / saved.mean()).log()
    with torch.no_grad():
        for k in range(len(saved)):
            m.gates.gate(k // 2, k % 2).proj.bias.sub_(float(shift[k]))
    m.gates.thresholds = {}
    specgate.save_gates(m.gates, args.out)
    print(f"saved to {args.out} (uncalibrated: run `specgate calibrate --gates {args.out}`)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
